//! Sinkhorn adversarial training (SAT): cross-entropy on PGD examples plus β times the
//! Sinkhorn divergence between the batch of clean logits and the batch of adversarial
//! logits, seen as two uniform empirical measures.

use candle_core::{DType, ModuleT, Tensor, D};
use rampart_attacks::Pgd;
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting};
use super::{
    attack_first_unchecked, check_eps, constants, cross_entropy, BatchLoss, StatelessMethod,
    StepCost, StepDraws, TrainBatch,
};
use crate::error::{DefenseError, Result};

/// SAT: loss = CE(f(x'), y) + β·S_ε(f(x), f(x')), both forward passes in train mode.
///
/// x' is made by `attack` at budget `eps` on the whole batch, model in eval mode
/// (exactly as [`AdversarialTraining`](super::AdversarialTraining) does). S_ε is the
/// debiased Sinkhorn divergence of [`sinkhorn_divergence`] between the B clean and the
/// B adversarial logit vectors, squared-L2 cost, entropic regularisation
/// `sinkhorn_eps`, at most `sinkhorn_iters` log-domain iterations. The gradient flows
/// through both batches of logits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sat {
    /// The training attack (its seed is drawn per batch from the method's RNG).
    pub attack: Pgd,
    /// The budget ε of the attack.
    pub eps: f64,
    /// Weight β ≥ 0 of the Sinkhorn term.
    pub beta: f64,
    /// Entropic regularisation ε of the transport problem (> 0).
    pub sinkhorn_eps: f64,
    /// Sinkhorn iterations (≥ 1).
    pub sinkhorn_iters: usize,
}

impl Sat {
    /// Checks the settings, with the Sinkhorn term of [`Sat::cifar10`] (ε = 1, 50
    /// iterations).
    pub fn new(attack: Pgd, eps: f64, beta: f64) -> Result<Self> {
        let sat = Self {
            attack,
            eps,
            beta,
            ..Self::cifar10()
        };
        sat.validate()?;
        Ok(sat)
    }

    /// The CIFAR-10 setting: PGD-10 L∞ at ε = 8/255 with step 2/255 from a uniform
    /// random start ([`Pgd::linf_pgd10`]), β = 1, Sinkhorn ε = 1 and 50 iterations.
    pub fn cifar10() -> Self {
        Self {
            attack: Pgd::linf_pgd10(),
            eps: 8.0 / 255.0,
            beta: 1.0,
            sinkhorn_eps: 1.0,
            sinkhorn_iters: 50,
        }
    }

    /// Refuses settings that cannot be run.
    pub fn validate(&self) -> Result<()> {
        self.attack.validate()?;
        check_eps(self.eps)?;
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(DefenseError::Config(format!(
                "SAT's β must be finite and ≥ 0, got {}",
                self.beta
            )));
        }
        check_sinkhorn(self.sinkhorn_eps, self.sinkhorn_iters)
    }
}

fn check_sinkhorn(eps: f64, iters: usize) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(DefenseError::Config(format!(
            "the Sinkhorn regularisation ε must be finite and > 0, got {eps}"
        )));
    }
    if iters == 0 {
        return Err(DefenseError::Config(
            "the Sinkhorn loop needs at least one iteration".into(),
        ));
    }
    Ok(())
}

/// Squared Euclidean distances C_ij = ‖a_i − b_j‖²: a (N, K), b (M, K) → (N, M).
fn squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let diff = a.unsqueeze(1)?.broadcast_sub(&b.unsqueeze(0)?)?;
    Ok(diff.sqr()?.sum(D::Minus1)?)
}

/// log Σ exp along `dim`, stabilised by the (detached) maximum.
fn log_sum_exp(t: &Tensor, dim: usize) -> Result<Tensor> {
    let max = t.max_keepdim(dim)?.detach();
    let sum = t.broadcast_sub(&max)?.exp()?.sum_keepdim(dim)?;
    Ok((sum.log()? + max)?.squeeze(dim)?)
}

/// The soft c-transform of a potential: for each row i of the cost (N, M),
/// −ε·log Σ_j exp(log w_j + (pot_j − C_ij)/ε), with uniform weights w_j = 1/M.
/// pot: (M,) → (N,).
fn soft_min(cost: &Tensor, pot: &Tensor, eps: f64) -> Result<Tensor> {
    let m = cost.dim(1)? as f64;
    let inner = (pot.unsqueeze(0)?.broadcast_sub(cost)? / eps)?;
    Ok(((log_sum_exp(&inner, 1)? - m.ln())? * (-eps))?)
}

/// [`soft_min`] with ε given on the device as 1/ε and −ε, (1,) tensors of the cost's
/// type: the same operations (a product by 1/ε, as `x / ε` is in candle).
fn soft_min_at(cost: &Tensor, pot: &Tensor, inv: &Tensor, neg: &Tensor) -> Result<Tensor> {
    let m = cost.dim(1)? as f64;
    let inner = pot.unsqueeze(0)?.broadcast_sub(cost)?.broadcast_mul(inv)?;
    Ok((log_sum_exp(&inner, 1)? - m.ln())?.broadcast_mul(neg)?)
}

/// Entropic optimal transport OT_ε(a, b) between the uniform measures on the rows of
/// a (N, K) and b (M, K) with the squared-L2 cost:
/// min_P ⟨P, C⟩ + ε·KL(P ‖ μ⊗ν) over couplings P of μ = 1/N and ν = 1/M, computed as
/// its dual value ⟨μ, f⟩ + ⟨ν, g⟩.
///
/// The dual potentials f (N,), g (M,) are found by `iters` log-domain Sinkhorn
/// iterations on the *detached* cost matrix, so the loop adds nothing to the graph.
/// Each iteration updates both potentials symmetrically with averaging,
/// f ← ½(f + softmin_ε(C, g)), g ← ½(g + softmin_ε(Cᵀ, f)), and the first ⌊iters/2⌋
/// iterations anneal the regularisation geometrically from the largest cost down to
/// ε (ε-scaling): both as in GeomLoss (Feydy et al. 2019). Plain alternating updates
/// at ε = 1 converge slowly on nearby point clouds (about 0.5 % off after 50
/// iterations); with ε-scaling 50 iterations reach the fixed point to about 1e-6, and
/// OT_ε(a, b) = OT_ε(b, a) holds exactly.
///
/// A last, differentiable update then recomputes f from the detached g with the cost
/// C(a, b.detach()), and g from the detached f with C(b, a.detach()) (GeomLoss' "last
/// extrapolation"): at the fixed point the gradient of the value with respect to a_i
/// is Σ_j P_ij ∇_a C(a_i, b_j), and likewise for b, the envelope-theorem gradient of
/// OT_ε, without differentiating through the iterations.
pub fn entropic_ot(a: &Tensor, b: &Tensor, eps: f64, iters: usize) -> Result<Tensor> {
    check_sinkhorn(eps, iters)?;
    check_logit_batches(a, b)?;
    let cost = Costs::of(a, b)?;
    cost.transport(&cost.largest()?, eps, iters)
}

/// One transport problem's detached batches and cost matrix (both ways).
struct Costs<'a> {
    a: &'a Tensor,
    b: &'a Tensor,
    a_det: Tensor,
    b_det: Tensor,
    cost: Tensor,
    cost_t: Tensor,
}

impl<'a> Costs<'a> {
    fn of(a: &'a Tensor, b: &'a Tensor) -> Result<Self> {
        let (a_det, b_det) = (a.detach(), b.detach());
        let cost = squared_distances(&a_det, &b_det)?;
        let cost_t = cost.t()?.contiguous()?;
        Ok(Costs {
            a,
            b,
            a_det,
            b_det,
            cost,
            cost_t,
        })
    }

    /// The largest cost, on the device (the annealing starts from it).
    fn largest(&self) -> Result<Tensor> {
        Ok(self.cost.max_all()?)
    }

    /// [`entropic_ot`] given the largest cost (a scalar on the device): the annealing
    /// is made there from it ([`annealing_on_device`]), so nothing is read back.
    fn transport(&self, largest: &Tensor, eps: f64, iters: usize) -> Result<Tensor> {
        let (a, b) = (self.a, self.b);
        let mut f = Tensor::zeros(a.dim(0)?, a.dtype(), a.device())?;
        let mut g = Tensor::zeros(b.dim(0)?, a.dtype(), a.device())?;
        let schedule = annealing_on_device(eps, largest, iters)?;
        // 1/ε and −ε of every iteration in the cost's type, once.
        let inv = schedule.recip()?.to_dtype(a.dtype())?;
        let neg = schedule.neg()?.to_dtype(a.dtype())?;
        for t in 0..iters {
            let (inv, neg) = (inv.narrow(0, t, 1)?, neg.narrow(0, t, 1)?);
            let f_next = soft_min_at(&self.cost, &g, &inv, &neg)?;
            let g_next = soft_min_at(&self.cost_t, &f, &inv, &neg)?;
            f = ((f + f_next)? * 0.5)?;
            g = ((g + g_next)? * 0.5)?;
        }
        let f_final = soft_min(&squared_distances(a, &self.b_det)?, &g, eps)?;
        let g_final = soft_min(&squared_distances(b, &self.a_det)?, &f, eps)?;
        Ok((f_final.mean_all()? + g_final.mean_all()?)?)
    }
}

/// [`annealing`] on the device from the largest cost there (a scalar, any float
/// type): max(L·(ε/L)^p, ε) for the powers p = t/(s − 1), L = max(largest, ε), the
/// power taken as exp(p·ln(ε/L)) (within a few ulps of `powf`), then ε. (iters,) f64.
fn annealing_on_device(eps: f64, largest: &Tensor, iters: usize) -> Result<Tensor> {
    let dev = largest.device();
    let steps = iters / 2;
    let falling = if steps >= 2 { steps } else { 0 };
    let rest = constants::column(eps, iters - falling, dev)?.flatten_all()?;
    if falling == 0 {
        return Ok(rest);
    }
    let l = constants::maximum(&largest.to_dtype(DType::F64)?.reshape(1)?, eps)?;
    let ratio = constants::column(eps, 1, dev)?.flatten_all()?.div(&l)?;
    let values = constants::powers(steps, dev)?
        .broadcast_mul(&ratio.log()?)?
        .exp()?
        .broadcast_mul(&l)?;
    Ok(Tensor::cat(
        &[&constants::maximum(&values, eps)?, &rest],
        0,
    )?)
}

/// The regularisation of each of `iters` iterations: ⌊iters/2⌋ values falling
/// geometrically from `largest` to `eps` (both included), then `eps`.
#[cfg(test)]
fn annealing(eps: f64, largest: f64, iters: usize) -> Vec<f64> {
    let steps = iters / 2;
    let mut out: Vec<f64> = if steps >= 2 {
        (0..steps)
            .map(|t| (largest * (eps / largest).powf(t as f64 / (steps - 1) as f64)).max(eps))
            .collect()
    } else {
        Vec::new()
    };
    out.resize(iters, eps);
    out
}

fn check_logit_batches(a: &Tensor, b: &Tensor) -> Result<()> {
    let (da, db) = (a.dims(), b.dims());
    if da.len() != 2 || db.len() != 2 || da[1] != db[1] || da[0] == 0 || db[0] == 0 {
        return Err(DefenseError::Config(format!(
            "the Sinkhorn divergence needs two non-empty batches (N, K) and (M, K), got {da:?} and {db:?}"
        )));
    }
    Ok(())
}

/// The debiased Sinkhorn divergence
/// S_ε(a, b) = OT_ε(a, b) − ½·OT_ε(a, a) − ½·OT_ε(b, b) between the uniform empirical
/// measures on the rows of a (N, K) and b (M, K), squared-L2 cost, entropic
/// regularisation `eps`, `iters` log-domain Sinkhorn iterations per transport problem
/// (see [`entropic_ot`] for how the gradient is formed). S_ε is symmetric, 0 for
/// identical batches and ≥ 0 once the iterations have converged (Feydy et al. 2019);
/// differentiable with respect to both batches. Returns a scalar.
pub fn sinkhorn_divergence(a: &Tensor, b: &Tensor, eps: f64, iters: usize) -> Result<Tensor> {
    check_sinkhorn(eps, iters)?;
    check_logit_batches(a, b)?;
    let problems = [Costs::of(a, b)?, Costs::of(a, a)?, Costs::of(b, b)?];
    // Each problem's annealing starts from its largest cost, which stays on the
    // device: nothing is read back (on a GPU, no wait for the step).
    let [ab, aa, bb] = [0, 1, 2].map(|i| {
        let p = &problems[i];
        p.transport(&p.largest()?, eps, iters)
    });
    Ok((ab? - ((aa? + bb?)? * 0.5)?)?)
}

impl MethodSettings for Sat {
    const NAME: &'static str = "sat";
    const ACCEPTS: &'static [Setting] = &[
        Setting::Eps,
        Setting::AttackSteps,
        Setting::AttackStepSize,
        Setting::Beta,
        Setting::AttackLastIterate,
    ];

    /// [`Sat::cifar10`].
    fn defaults() -> Self {
        Self::cifar10()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        Self::new(
            values.pgd(self.attack),
            values.eps.unwrap_or(self.eps),
            values.beta.unwrap_or(self.beta),
        )
    }
}

impl StatelessMethod for Sat {
    /// The attack on every example, then the loss on the clean and the adversarial
    /// batch (two train-mode passes).
    fn cost(&self, _spec: &rampart_models::ModelSpec) -> StepCost {
        StepCost {
            train: 2.0,
            ..StepCost::adversarial(self.attack.perturb_cost(), 1.0)
        }
    }

    /// The training attack's seed; nothing else is drawn or read back.
    fn draws(&self) -> StepDraws {
        StepDraws::OneSeed
    }

    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let b = batch.images.dim(0)?;
        // The points alone: the attack's checks go to the trainer with the loss.
        let adv = attack_first_unchecked(&self.attack, batch, b, self.eps)?;
        let clean_logits = batch.model.forward_t(batch.images, true)?;
        let adv_logits = batch.model.forward_t(&adv.clipped, true)?;
        let robust = cross_entropy(&adv_logits, batch.labels, 0.0)?;
        let divergence = sinkhorn_divergence(
            &clean_logits,
            &adv_logits,
            self.sinkhorn_eps,
            self.sinkhorn_iters,
        )?;
        let loss = (robust + (divergence * self.beta)?)?;
        Ok(BatchLoss::of_batch(loss, adv_logits, batch.labels).with_faults(adv.faults))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::attack_first;
    use crate::method::testutil::{neg_log_softmax, rows, tiny_problem};
    use crate::method::TrainingMethod;
    use crate::TestResult;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn scalar(t: &Tensor) -> std::result::Result<f64, Box<dyn std::error::Error>> {
        Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    /// `n` random logit vectors of dimension `k` with entries in (−s, s), f64.
    fn random_logits(n: usize, k: usize, s: f64, seed: u64) -> candle_core::Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..n * k)
            .map(|_| s * (2.0 * rng.gen::<f64>() - 1.0))
            .collect();
        Tensor::from_vec(v, (n, k), &Device::Cpu)
    }

    /// The divergence is its three transport problems' values combined, bit for bit
    /// (their largest costs read together), in f32 and f64, batches of other sizes.
    #[test]
    fn the_divergence_is_its_three_transport_problems() -> TestResult {
        for (dtype, n, m) in [(DType::F64, 5, 7), (DType::F32, 8, 3)] {
            let a = random_logits(n, 4, 3.0, 1)?.to_dtype(dtype)?;
            let b = random_logits(m, 4, 2.0, 2)?.to_dtype(dtype)?;
            // Few iterations: the values are not yet those of the fixed point.
            let got = sinkhorn_divergence(&a, &b, 0.1, 4)?;
            let want = (entropic_ot(&a, &b, 0.1, 4)?
                - ((entropic_ot(&a, &a, 0.1, 4)? + entropic_ot(&b, &b, 0.1, 4)?)? * 0.5)?)?;
            assert_eq!(
                got.to_dtype(DType::F64)?.to_scalar::<f64>()?.to_bits(),
                want.to_dtype(DType::F64)?.to_scalar::<f64>()?.to_bits(),
                "{dtype:?}"
            );
        }
        Ok(())
    }

    /// OT_ε between two uniform 2-point measures by the plain (non-log) Sinkhorn
    /// scaling loop in f64: K = exp(−C/ε), u ← μ/(Kv), v ← ν/(Kᵀu), and the value
    /// ⟨P, C⟩ + ε·KL(P ‖ μ⊗ν) of the plan P = diag(u)·K·diag(v).
    fn plain_sinkhorn(x: &[[f64; 2]; 2], y: &[[f64; 2]; 2], eps: f64) -> f64 {
        let c = |i: usize, j: usize| -> f64 {
            (x[i][0] - y[j][0]).powi(2) + (x[i][1] - y[j][1]).powi(2)
        };
        let k = |i: usize, j: usize| (-c(i, j) / eps).exp();
        let (mut u, mut v) = ([1.0f64; 2], [1.0f64; 2]);
        for _ in 0..2000 {
            u = [0, 1].map(|i| 0.5 / (k(i, 0) * v[0] + k(i, 1) * v[1]));
            v = [0, 1].map(|j| 0.5 / (k(0, j) * u[0] + k(1, j) * u[1]));
        }
        let pairs = [(0, 0), (0, 1), (1, 0), (1, 1)];
        pairs
            .iter()
            .map(|&(i, j)| {
                let p = u[i] * k(i, j) * v[j];
                p * c(i, j) + eps * p * (p / 0.25).ln()
            })
            .sum()
    }

    #[test]
    fn ot_matches_a_plain_sinkhorn_loop_on_two_points() -> TestResult {
        let x = [[0.0, 0.5], [1.0, -0.3]];
        let y = [[0.4, 1.2], [-0.6, 0.1]];
        let a = Tensor::new(&x, &Device::Cpu)?;
        let b = Tensor::new(&y, &Device::Cpu)?;
        for eps in [1.0, 0.5] {
            let got = scalar(&entropic_ot(&a, &b, eps, 50)?)?;
            let want = plain_sinkhorn(&x, &y, eps);
            assert!((got - want).abs() < 1e-6, "ε {eps}: {got} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn divergence_is_zero_on_identical_batches_symmetric_and_grows_with_a_shift() -> TestResult {
        let a = random_logits(8, 5, 2.0, 1)?;
        let same = scalar(&sinkhorn_divergence(&a, &a, 1.0, 50)?)?;
        assert!(same.abs() < 1e-4, "S(a, a) = {same}");
        // f32 as in training.
        let a32 = a.to_dtype(DType::F32)?;
        let same32 = scalar(&sinkhorn_divergence(&a32, &a32, 1.0, 50)?)?;
        assert!(same32.abs() < 1e-4, "S(a, a) in f32 = {same32}");

        let direction = random_logits(1, 5, 1.0, 2)?;
        let mut last = 0.0;
        for shift in [0.1, 0.5, 1.0, 2.0] {
            let b = a.broadcast_add(&(&direction * shift)?)?;
            let s = scalar(&sinkhorn_divergence(&a, &b, 1.0, 50)?)?;
            assert!(s > last, "shift {shift}: S = {s}, previous {last}");
            let back = scalar(&sinkhorn_divergence(&b, &a, 1.0, 50)?)?;
            assert!((s - back).abs() < 1e-9 * s, "{s} vs {back}");
            // 50 iterations with ε-scaling are as good as 1,000.
            let converged = scalar(&sinkhorn_divergence(&a, &b, 1.0, 1000)?)?;
            assert!(
                (s - converged).abs() < 1e-4 * converged,
                "{s} vs {converged}"
            );
            last = s;
        }
        // Unrelated batches of other sizes: still ≥ 0.
        for seed in 3..8 {
            let b = random_logits(6, 5, 3.0, seed)?;
            let s = scalar(&sinkhorn_divergence(&a, &b, 1.0, 50)?)?;
            assert!(s > 0.0, "seed {seed}: S = {s}");
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> TestResult {
        let a = random_logits(4, 3, 1.5, 10)?;
        let b = random_logits(5, 3, 1.5, 11)?;
        let var = Var::from_tensor(&a)?;
        let s = sinkhorn_divergence(var.as_tensor(), &b, 1.0, 200)?;
        let grads = s.backward()?;
        let grad = grads
            .get(var.as_tensor())
            .ok_or("no gradient for a")?
            .to_vec2::<f64>()?;
        let base = a.to_vec2::<f64>()?;
        let h = 1e-5;
        for i in 0..4 {
            for k in 0..3 {
                let bump = |d: f64| -> std::result::Result<f64, Box<dyn std::error::Error>> {
                    let mut v = base.clone();
                    v[i][k] += d;
                    let t = Tensor::new(v, &Device::Cpu)?;
                    scalar(&sinkhorn_divergence(&t, &b, 1.0, 200)?)
                };
                let fd = (bump(h)? - bump(-h)?) / (2.0 * h);
                assert!(
                    (fd - grad[i][k]).abs() < 1e-5 * fd.abs().max(1.0),
                    "∂S/∂a[{i}][{k}]: autograd {} vs finite differences {fd}",
                    grad[i][k]
                );
            }
        }
        // The gradient with respect to b exists too.
        let var_b = Var::from_tensor(&b)?;
        let s = sinkhorn_divergence(&a, var_b.as_tensor(), 1.0, 50)?;
        assert!(s.backward()?.get(var_b.as_tensor()).is_some());
        Ok(())
    }

    /// The device's annealing is the host's to within a few ulps, from a largest cost
    /// on the device in f32 or f64, and ε alone when the cost is below ε or the
    /// iterations are too few.
    #[test]
    fn the_annealing_on_the_device_is_the_hosts() -> TestResult {
        for (eps, largest, iters) in [
            (1.0, 100.0, 50),
            (0.5, 37.25, 7),
            (1.0, 100.0, 3),
            (2.0, 1.0, 4),
            (0.1, 3.0e4, 200),
        ] {
            let want = annealing(eps, largest, iters);
            for dt in [DType::F32, DType::F64] {
                let l = Tensor::new(largest, &Device::Cpu)?.to_dtype(dt)?;
                let got = annealing_on_device(eps, &l, iters)?.to_vec1::<f64>()?;
                assert_eq!(got.len(), iters);
                for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-13 * w.abs(),
                        "ε {eps}, L {largest}, t {t}: {g} vs {w}"
                    );
                    assert!(*g >= eps);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn annealing_falls_to_eps_in_half_the_iterations() {
        let e = annealing(1.0, 100.0, 50);
        assert_eq!(e.len(), 50);
        assert_eq!((e[0], e[24], e[25], e[49]), (100.0, 1.0, 1.0, 1.0));
        assert!((e[12] - 100f64.powf(1.0 - 12.0 / 24.0)).abs() < 1e-9);
        assert!(e.windows(2).all(|w| w[1] <= w[0]));
        assert_eq!(annealing(1.0, 100.0, 3), [1.0; 3]);
        assert_eq!(annealing(2.0, 1.0, 4), [2.0; 4]);
    }

    #[test]
    fn bad_inputs_are_refused() -> TestResult {
        let a = random_logits(3, 4, 1.0, 1)?;
        let b = random_logits(3, 5, 1.0, 2)?;
        assert!(sinkhorn_divergence(&a, &b, 1.0, 50).is_err());
        assert!(sinkhorn_divergence(&a, &a, 0.0, 50).is_err());
        assert!(sinkhorn_divergence(&a, &a, 1.0, 0).is_err());
        let pgd = Pgd::linf_pgd10();
        assert!(Sat::new(pgd, -0.1, 1.0).is_err());
        assert!(Sat::new(pgd, 0.03, -1.0).is_err());
        assert!(Sat::new(pgd, 0.03, f64::NAN).is_err());
        assert!(Sat::new(Pgd { steps: 0, ..pgd }, 0.03, 1.0).is_err());
        assert!(Sat {
            sinkhorn_eps: 0.0,
            ..Sat::cifar10()
        }
        .validate()
        .is_err());
        assert!(Sat::new(pgd, 0.03, 0.0).is_ok());
        Ok(())
    }

    /// loss = CE(f(x'), y) + β·S(f(x), f(x')) with x' the PGD examples of the batch's
    /// seed, which stay in the ε-ball and the bounds.
    #[test]
    fn loss_is_adversarial_ce_plus_beta_sinkhorn() -> TestResult {
        let (model, x, y) = tiny_problem(3, 6, 4);
        let method = Sat {
            attack: Pgd {
                steps: 3,
                ..Pgd::linf_pgd10()
            },
            beta: 2.0,
            ..Sat::cifar10()
        };
        // The expected adversarial examples first: the method's train-mode forwards
        // update the BatchNorm statistics that the eval-mode attack uses.
        let rng = ChaCha8Rng::seed_from_u64(21);
        let adv = attack_first(
            &method.attack,
            &mut TrainBatch::new(&model, &x, &y, &mut rng.clone()),
            6,
            method.eps,
        )?;
        let delta = (&adv.clipped - &x)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(f64::from(delta) <= method.eps + 1e-6, "‖δ‖∞ = {delta}");
        assert!(delta > 0.0, "the attack should move");
        let lo = adv.clipped.flatten_all()?.min(0)?.to_scalar::<f32>()?;
        let hi = adv.clipped.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));

        let out = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng.clone()))?;
        let clean = model.forward_t(&x, true)?;
        let advl = model.forward_t(&adv.clipped, true)?;
        let labels = y.to_vec1::<u32>()?;
        let ce: f64 = rows(&advl)
            .iter()
            .zip(&labels)
            .map(|(r, &l)| neg_log_softmax(r, l as usize))
            .sum::<f64>()
            / 6.0;
        let s = scalar(&sinkhorn_divergence(
            &clean.to_dtype(DType::F64)?,
            &advl.to_dtype(DType::F64)?,
            1.0,
            50,
        )?)?;
        assert!(s > 0.0, "clean and adversarial logits differ: S = {s}");
        let want = ce + 2.0 * s;
        let got = scalar(&out.loss)?;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        assert_eq!(out.logits.dims(), &[6, 3]);
        Ok(())
    }

    #[test]
    fn settings_round_trip() -> TestResult {
        let sat = Sat::cifar10();
        let back: Sat = serde_json::from_value(sat.settings())?;
        assert_eq!(back, sat);
        Ok(())
    }
}
