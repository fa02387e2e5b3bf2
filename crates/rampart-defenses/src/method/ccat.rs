//! Confidence-calibrated adversarial training (Stutz, Hein & Schiele, ICML 2020).

use candle_core::{DType, ModuleT, Tensor};
use rampart_attacks::{Norm, Pgd};
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting};
use super::{
    adversarial_count, attack_first, attack_first_unchecked, check_eps, check_fraction,
    mixed_batch, one_hot, soft_cross_entropy, BatchLoss, StatelessMethod, StepCost, StepDraws,
    TrainBatch,
};
use crate::error::{DefenseError, Result};

/// CCAT: the first m = round(fraction·B) examples of each batch are replaced by
/// adversarial examples of the conf attack (maximising max_{k≠y} p_k, with momentum
/// and backtracking), the rest stay clean. Adversarial examples are trained towards
/// the soft target p̃ = (1 − λ)·onehot(y) + λ·uniform with
/// λ(δ) = 1 − (1 − min(1, ‖δ‖∞/ε))^ρ ([`ccat_lambda`]), so the model learns to lower
/// its confidence with the size of the perturbation. With fraction ½ the loss is
/// ½·CE(clean, onehot) + ½·CE(adversarial, p̃), computed on one train-mode forward
/// pass of the mixed batch; in general the weights are (1 − m/B) and m/B.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ccat {
    /// The training attack (L∞; its seed is drawn per batch from the method's RNG).
    pub attack: Pgd,
    /// The budget ε of the attack and of λ.
    pub eps: f64,
    /// Power ρ > 0 of the transition.
    pub rho: f64,
    /// Fraction of each batch made adversarial, in (0, 1] (the paper: ½).
    pub fraction: f64,
}

impl Ccat {
    /// Checks the settings; the attack must be L∞ (λ measures ‖δ‖∞) and ε > 0.
    pub fn new(attack: Pgd, eps: f64, rho: f64, fraction: f64) -> Result<Self> {
        attack.validate()?;
        check_eps(eps)?;
        if eps == 0.0 {
            return Err(DefenseError::Config(
                "CCAT needs ε > 0 (λ divides by it)".into(),
            ));
        }
        if attack.norm != rampart_attacks::Norm::Linf {
            return Err(DefenseError::Config(format!(
                "CCAT's λ measures ‖δ‖∞: its attack must be L∞, got {}",
                attack.norm
            )));
        }
        if !(rho.is_finite() && rho > 0.0) {
            return Err(DefenseError::Config(format!(
                "CCAT's ρ must be finite and > 0, got {rho}"
            )));
        }
        check_fraction(fraction)?;
        Ok(Self {
            attack,
            eps,
            rho,
            fraction,
        })
    }

    /// The paper's CIFAR-10 setting: the conf attack of [`Pgd::ccat_train`] (40 steps of
    /// 0.005, momentum 0.9, backtracking 1.5, one uniform-norm start) at ε = 0.03,
    /// ρ = 10, half of each batch adversarial.
    pub fn stutz_cifar10() -> Self {
        Self {
            attack: Pgd::ccat_train(),
            eps: 0.03,
            rho: 10.0,
            fraction: 0.5,
        }
    }
}

/// λ(δ) = 1 − (1 − min(1, ‖δ‖∞/ε))^ρ: 0 for δ = 0, 1 from ‖δ‖∞ = ε on.
pub fn ccat_lambda(norm: f64, eps: f64, rho: f64) -> f64 {
    let r = (norm / eps).clamp(0.0, 1.0);
    1.0 - (1.0 - r).powf(rho)
}

/// [`ccat_soft_targets`] on the device: (B, K) f32 for labels (B,) u32 and
/// perturbation norms (B,) f32, by tensor operations that do the host's f64
/// arithmetic in its order (a division, not a product with 1/ε; `powf`; the targets
/// rounded to f32 last), so that on the CPU they are its values bit for bit. A label
/// of K or more has a row of λ/K alone, as its one-hot row on the host is zero.
pub fn ccat_soft_targets_on_device(
    labels: &Tensor,
    norms: &Tensor,
    eps: f64,
    rho: f64,
    classes: usize,
) -> Result<Tensor> {
    let dev = norms.device();
    let b = norms.dim(0)?;
    // Constants kept per device: nothing is copied from the host in a step.
    let column = |v: f64| super::constants::column(v, b, dev);
    let n = norms.to_dtype(DType::F64)?.reshape((b, 1))?;
    let r = super::constants::clamp(&n.div(&column(eps)?)?, 0.0, 1.0)?;
    // λ = 1 − (1 − r)^ρ; x·(−1) + 1 is 1 − x, rounded once.
    let lambda = r.affine(-1.0, 1.0)?.powf(rho)?.affine(-1.0, 1.0)?;
    let uniform = lambda.div(&column(classes as f64)?)?;
    let hot = labels
        .to_dtype(DType::U32)?
        .reshape((b, 1))?
        .broadcast_eq(&super::constants::class_row(classes, dev)?)?
        .to_dtype(DType::F64)?
        .broadcast_mul(&lambda.affine(-1.0, 1.0)?)?;
    Ok(hot.broadcast_add(&uniform)?.to_dtype(DType::F32)?)
}

/// Soft targets (1 − λ_i)·onehot(y_i) + λ_i/K, row-major (B·K), for labels y (B,),
/// perturbation norms ‖δ_i‖∞ (B,), ε and ρ.
pub fn ccat_soft_targets(
    labels: &[u32],
    norms: &[f32],
    eps: f64,
    rho: f64,
    classes: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(labels.len() * classes);
    for (&y, &n) in labels.iter().zip(norms) {
        let lambda = ccat_lambda(f64::from(n), eps, rho);
        let uniform = lambda / classes as f64;
        out.extend((0..classes).map(|k| {
            let hot = if k == y as usize { 1.0 - lambda } else { 0.0 };
            (hot + uniform) as f32
        }));
    }
    out
}

impl MethodSettings for Ccat {
    const NAME: &'static str = "ccat";
    const ACCEPTS: &'static [Setting] = &[
        Setting::Eps,
        Setting::AttackSteps,
        Setting::AttackStepSize,
        Setting::AdvFraction,
        Setting::Rho,
        Setting::AttackLastIterate,
    ];

    /// [`Ccat::stutz_cifar10`].
    fn defaults() -> Self {
        Self::stutz_cifar10()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        Self::new(
            values.pgd(self.attack),
            values.eps.unwrap_or(self.eps),
            values.rho.unwrap_or(self.rho),
            values.adv_fraction.unwrap_or(self.fraction),
        )
    }
}

impl StatelessMethod for Ccat {
    /// The conf attack on the adversarial fraction, then one train-mode pass.
    fn cost(&self, _spec: &rampart_models::ModelSpec) -> StepCost {
        StepCost::adversarial(self.attack.perturb_cost(), self.fraction)
    }

    /// The attack's seed (one draw), when its L∞ distances are measured on the device.
    fn draws(&self) -> StepDraws {
        if self.attack.norm == Norm::Linf {
            StepDraws::OneSeed
        } else {
            StepDraws::Other
        }
    }

    /// For an L∞ attack nothing is read from the device: the points' distances and the
    /// soft targets are computed there (the host's values; the attack's checks are
    /// left for the trainer); otherwise the host computes them from the attack's
    /// distances.
    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let k = batch.model.spec().num_classes;
        let b = batch.images.dim(0)?;
        let m = adversarial_count(b, self.fraction);
        if self.attack.norm == Norm::Linf {
            let adv = attack_first_unchecked(&self.attack, batch, m, self.eps)?;
            // ‖δ‖∞ of each point in f32: the f32 difference is the exact one rounded,
            // so its largest magnitude is the host's f64 distance rounded to f32.
            let x = batch.images.narrow(0, 0, m)?;
            let mut norms = (&adv.clipped - &x)?.abs()?.flatten_from(1)?.max(1)?;
            if m < b {
                let clean = Tensor::zeros(b - m, DType::F32, norms.device())?;
                norms = Tensor::cat(&[&norms, &clean], 0)?;
            }
            let targets = ccat_soft_targets_on_device(batch.labels, &norms, self.eps, self.rho, k)?;
            let inputs = mixed_batch(batch.images, &adv.clipped)?;
            let logits = batch.model.forward_t(&inputs, true)?;
            let loss = soft_cross_entropy(&logits, &targets)?;
            return Ok(BatchLoss::of_batch(loss, logits, batch.labels).with_faults(adv.faults));
        }
        let adv = attack_first(&self.attack, batch, m, self.eps)?;
        let ys = batch.host_labels()?;
        let mut targets = ccat_soft_targets(&ys[..m], &adv.norm, self.eps, self.rho, k);
        targets.extend(one_hot(&ys[m..], k));
        let inputs = mixed_batch(batch.images, &adv.clipped)?;
        let logits = batch.model.forward_t(&inputs, true)?;
        let loss = soft_cross_entropy(&logits, &batch.targets(targets)?)?;
        Ok(BatchLoss::of_batch(loss, logits, batch.labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::testutil::{neg_log_softmax, rows, smoothed_nll, tiny_problem};
    use crate::method::TrainingMethod;
    use crate::TestResult;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn lambda_and_soft_targets_match_hand_computation() {
        // ‖δ‖∞ = ε/2, ρ = 10: λ = 1 − ½¹⁰ = 1023/1024.
        assert!((ccat_lambda(0.015, 0.03, 10.0) - 1023.0 / 1024.0).abs() < 1e-12);
        assert_eq!(ccat_lambda(0.0, 0.03, 10.0), 0.0);
        assert_eq!(ccat_lambda(0.03, 0.03, 10.0), 1.0);
        assert_eq!(ccat_lambda(0.5, 0.03, 10.0), 1.0);
        // ρ = 1 is linear: ‖δ‖∞ = 0.3ε → λ = 0.3.
        assert!((ccat_lambda(0.009, 0.03, 1.0) - 0.3).abs() < 1e-12);

        // K = 4, y = 1, λ = ½ (ρ = 1, ‖δ‖∞ = ε/2): (⅛, ⅝, ⅛, ⅛); δ = 0 gives one-hot.
        let t = ccat_soft_targets(&[1, 2], &[0.015, 0.0], 0.03, 1.0, 4);
        let want = [0.125, 0.625, 0.125, 0.125, 0.0, 0.0, 1.0, 0.0];
        for (a, b) in t.iter().zip(want) {
            assert!((f64::from(*a) - b).abs() < 1e-7, "{t:?}");
        }
    }

    /// The soft targets made on the device are the host's bit for bit: distances of 0,
    /// tiny, ε/3, just under ε, ε and beyond, ρ of 1, 2.5 and 10, labels in range and
    /// one of K (a row of λ/K alone on both sides).
    #[test]
    fn soft_targets_on_the_device_are_the_hosts() -> TestResult {
        let dev = candle_core::Device::Cpu;
        let eps = 8.0f64 / 255.0;
        let norms: Vec<f32> = vec![
            0.0,
            1e-9,
            (eps / 3.0) as f32,
            (eps * 0.999) as f32,
            eps as f32,
            0.2,
            0.0313,
        ];
        let labels: Vec<u32> = vec![0, 3, 9, 10, 5, 1, 7];
        for rho in [1.0, 2.5, 10.0] {
            let host = ccat_soft_targets(&labels, &norms, eps, rho, 10);
            let device = ccat_soft_targets_on_device(
                &Tensor::new(labels.as_slice(), &dev)?,
                &Tensor::new(norms.as_slice(), &dev)?,
                eps,
                rho,
                10,
            )?
            .flatten_all()?
            .to_vec1::<f32>()?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&device), bits(&host), "ρ {rho}");
        }
        Ok(())
    }

    /// loss = (1 − m/B)·CE(clean) + (m/B)·CE(adversarial, p̃), p̃ from the returned
    /// points' ‖δ‖∞, on the mixed batch of the seed drawn from the method's RNG.
    #[test]
    fn loss_is_half_clean_half_soft_adversarial() -> TestResult {
        let (model, x, y) = tiny_problem(4, 8, 8);
        let method = Ccat {
            attack: Pgd {
                steps: 5,
                ..Pgd::ccat_train()
            },
            ..Ccat::stutz_cifar10()
        };
        // The expected adversarial examples first: the method's train-mode forward
        // updates the BatchNorm statistics that the eval-mode attack uses.
        let rng = ChaCha8Rng::seed_from_u64(13);
        let adv = attack_first(
            &method.attack,
            &mut TrainBatch::new(&model, &x, &y, &mut rng.clone()),
            4,
            0.03,
        )?;
        let out = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng.clone()))?;
        let logits = rows(&model.forward_t(&mixed_batch(&x, &adv.clipped)?, true)?);
        let labels = y.to_vec1::<u32>()?;
        let clean: f64 = (4..8)
            .map(|i| neg_log_softmax(&logits[i], labels[i] as usize))
            .sum::<f64>()
            / 4.0;
        let mut adversarial = 0.0;
        for i in 0..4 {
            let lambda = 1.0 - (1.0 - (f64::from(adv.norm[i]) / 0.03).min(1.0)).powi(10);
            adversarial += smoothed_nll(&logits[i], labels[i] as usize, lambda) / 4.0;
        }
        let want = 0.5 * clean + 0.5 * adversarial;
        let got = f64::from(out.loss.to_scalar::<f32>()?);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert!(adv.norm.iter().any(|&n| n > 0.0));
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused() {
        let pgd = Pgd::ccat_train();
        assert!(Ccat::new(pgd, 0.0, 10.0, 0.5).is_err());
        assert!(Ccat::new(pgd, 0.03, 0.0, 0.5).is_err());
        assert!(Ccat::new(pgd, 0.03, 10.0, 0.0).is_err());
        assert!(Ccat::new(
            Pgd {
                norm: rampart_attacks::Norm::L2,
                ..pgd
            },
            0.03,
            10.0,
            0.5
        )
        .is_err());
        assert!(Ccat::new(pgd, 0.03, 10.0, 0.5).is_ok());
    }
}
