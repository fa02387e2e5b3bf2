//! TRADES (Zhang et al., ICML 2019): clean cross-entropy plus β times the KL divergence
//! between the clean and the adversarial prediction, the adversarial input maximising
//! that divergence.

use candle_core::{ModuleT, Tensor, Var, D};
use rampart_models::Classifier;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting, ATTACK_AND_BETA};
use super::{
    attack_seed, check_eps, cross_entropy, BatchLoss, StatelessMethod, StepCost, StepDraws,
    TrainBatch,
};
use crate::error::{DefenseError, Result};

/// TRADES: loss = CE(f(x), y) + β·mean_i KL(p(x_i) ‖ p(x'_i)), both terms in train mode.
///
/// The adversarial x' maximises KL(p(x) ‖ p(x')) with p(x) held fixed, model in eval
/// mode: x' starts at x + `init_std`·N(0, I) (clipped to the ε-ball and the bounds),
/// then `steps` times x' ← proj(x' + `step_size`·sign(∇ KL)) onto the L∞ ball of
/// radius `eps` around x and the model's bounds. The attacks crate has no KL objective
/// (it needs the clean prediction as a second input), so this loop lives here.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trades {
    /// L∞ budget ε.
    pub eps: f64,
    /// Ascent steps of the inner maximisation (≥ 1).
    pub steps: usize,
    /// Step size of each signed-gradient step (> 0).
    pub step_size: f64,
    /// Weight β ≥ 0 of the KL term.
    pub beta: f64,
    /// Standard deviation of the Gaussian random start (≥ 0).
    pub init_std: f64,
}

impl Trades {
    /// Checks the settings.
    pub fn new(eps: f64, steps: usize, step_size: f64, beta: f64) -> Result<Self> {
        let t = Self {
            eps,
            steps,
            step_size,
            beta,
            init_std: 0.001,
        };
        t.validate()?;
        Ok(t)
    }

    /// Zhang et al. on CIFAR-10: ε = 0.031, 10 steps of 0.007, β = 6, start
    /// x + 0.001·N(0, I).
    pub fn zhang_cifar10() -> Self {
        Self {
            eps: 0.031,
            steps: 10,
            step_size: 0.007,
            beta: 6.0,
            init_std: 0.001,
        }
    }

    fn validate(&self) -> Result<()> {
        check_eps(self.eps)?;
        if self.steps == 0 {
            return Err(DefenseError::Config(
                "TRADES needs at least one attack step".into(),
            ));
        }
        if !(self.step_size.is_finite() && self.step_size > 0.0) {
            return Err(DefenseError::Config(format!(
                "TRADES step size must be finite and > 0, got {}",
                self.step_size
            )));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(DefenseError::Config(format!(
                "TRADES β must be finite and ≥ 0, got {}",
                self.beta
            )));
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return Err(DefenseError::Config(format!(
                "TRADES start noise must be finite and ≥ 0, got {}",
                self.init_std
            )));
        }
        Ok(())
    }

    /// The adversarial batch x' for images x (B, C, H, W), model in eval mode.
    pub fn adversarial(&self, model: &Classifier, images: &Tensor, seed: u64) -> Result<Tensor> {
        let (lo, hi) = model.bounds();
        let (lo, hi) = (f64::from(lo), f64::from(hi));
        let x = images.detach();
        // The bounds kept on the device: nothing copied from the host in a step.
        let lower = super::constants::clamp(&(&x - self.eps)?, lo, hi)?;
        let upper = super::constants::clamp(&(&x + self.eps)?, lo, hi)?;
        let project = |t: &Tensor| -> Result<Tensor> { Ok(t.maximum(&lower)?.minimum(&upper)?) };
        // Input gradients only: the frozen view tracks no parameter.
        let frozen = model.frozen();
        let log_p_clean =
            candle_nn::ops::log_softmax(&frozen.forward_t(&x, false)?, D::Minus1)?.detach();
        let noise = match super::step_noise_of(seed) {
            // Drawn by the trainer before the step (a replayed CUDA graph's buffer).
            Some(t) => t.reshape(x.dims())?.to_dtype(x.dtype())?,
            // Staged through page-locked memory on a GPU where switched on (no wait
            // for the previous step at the copy).
            None => rampart_data::upload::tensor(
                start_noise(seed, x.elem_count()),
                x.dims(),
                x.device(),
            )?
            .to_dtype(x.dtype())?,
        };
        let mut adv = project(&(&x + (noise * self.init_std)?)?)?;
        for _ in 0..self.steps {
            let var = Var::from_tensor(&adv)?;
            let logits = frozen.forward_t(var.as_tensor(), false)?;
            let kl = kl_per_example(&log_p_clean, &logits)?.sum_all()?;
            let grads = kl.backward()?;
            let step = match grads.get(var.as_tensor()) {
                Some(g) => (g.sign()? * self.step_size)?,
                None => adv.zeros_like()?,
            };
            adv = project(&(&adv + step)?)?;
        }
        Ok(adv.detach())
    }
}

/// KL(p ‖ q) per example from log p (B, K) and the logits of q (B, K):
/// Σ_k p_k·(log p_k − log q_k).
fn kl_per_example(log_p: &Tensor, logits_q: &Tensor) -> Result<Tensor> {
    let log_q = candle_nn::ops::log_softmax(logits_q, D::Minus1)?;
    let p = log_p.exp()?;
    Ok((p * (log_p - log_q)?)?.sum(D::Minus1)?)
}

/// Mean over examples of KL(softmax(logits_p) ‖ softmax(logits_q)); logits (B, K).
/// Differentiable in both arguments (TRADES lets the gradient flow through both).
pub fn kl_divergence(logits_p: &Tensor, logits_q: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits_p, D::Minus1)?;
    Ok(kl_per_example(&log_p, logits_q)?.mean_all()?)
}

/// `n` standard normal draws ([`rampart_attacks::standard_normal`]).
/// The standard-normal values of the attack's start for `seed`, `n` of them.
fn start_noise(seed: u64, n: usize) -> Vec<f32> {
    gaussian(&mut ChaCha8Rng::seed_from_u64(seed), n)
}

fn gaussian(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rampart_attacks::standard_normal(rng) as f32)
        .collect()
}

impl MethodSettings for Trades {
    const NAME: &'static str = "trades";
    const ACCEPTS: &'static [Setting] = ATTACK_AND_BETA;

    /// [`Trades::zhang_cifar10`].
    fn defaults() -> Self {
        Self::zhang_cifar10()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        Self::new(
            values.eps.unwrap_or(self.eps),
            values.attack_steps.unwrap_or(self.steps),
            values.attack_step_size.unwrap_or(self.step_size),
            values.beta.unwrap_or(self.beta),
        )
    }
}

impl StatelessMethod for Trades {
    /// The clean prediction and one KL gradient per step of its attack, then the
    /// loss on the clean and the adversarial example (two train-mode passes).
    fn cost(&self, _spec: &rampart_models::ModelSpec) -> StepCost {
        StepCost {
            train: 2.0,
            attack: rampart_attacks::Passes {
                gradient: self.steps as f64,
                forward: 1.0,
            },
        }
    }

    /// The attack's seed, from which its Gaussian start is drawn on the host.
    fn draws(&self) -> StepDraws {
        StepDraws::OneSeed
    }

    /// The Gaussian start's standard-normal values of `seed` ([`start_noise`]).
    fn noise(&self, seed: u64, elems: usize) -> Option<Vec<f32>> {
        Some(start_noise(seed, elems))
    }

    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let (model, labels) = (batch.model, batch.labels);
        let adv = self.adversarial(model, batch.images, attack_seed(batch.rng))?;
        let clean_logits = model.forward_t(batch.images, true)?;
        let adv_logits = model.forward_t(&adv, true)?;
        let natural = cross_entropy(&clean_logits, labels, 0.0)?;
        let robust = kl_divergence(&clean_logits, &adv_logits)?;
        let loss = (natural + (robust * self.beta)?)?;
        Ok(BatchLoss {
            loss,
            logits: Tensor::cat(&[&clean_logits, &adv_logits], 0)?,
            labels: Tensor::cat(&[labels, labels], 0)?,
            faults: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::testutil::{neg_log_softmax, rows, tiny_problem};
    use crate::method::TrainingMethod;
    use crate::TestResult;
    use candle_core::Device;

    #[test]
    fn kl_matches_hand_computation() -> TestResult {
        // p = (1/4, 3/4), q = (1/2, 1/2): KL = ¼·ln(½) + ¾·ln(3/2).
        let p = Tensor::new(&[[0.0f32, 3f32.ln()]], &Device::Cpu)?;
        let q = Tensor::new(&[[0.0f32, 0.0]], &Device::Cpu)?;
        let got = f64::from(kl_divergence(&p, &q)?.to_scalar::<f32>()?);
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // KL(p ‖ p) = 0 and KL(q ‖ p) = ½·ln(½/¼) + ½·ln(½/¾); the mean runs over rows.
        let pp = Tensor::cat(&[&p, &q], 0)?;
        let qq = Tensor::cat(&[&p, &p], 0)?;
        let got = f64::from(kl_divergence(&pp, &qq)?.to_scalar::<f32>()?);
        let want_second = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        assert!((got - want_second / 2.0).abs() < 1e-6, "{got}");
        Ok(())
    }

    /// loss = CE(clean) + β·KL(p(x) ‖ p(x')) with x' the inner maximiser of the batch's
    /// seed, which stays in the ε-ball and raises the KL above that of the start.
    #[test]
    fn loss_is_clean_ce_plus_beta_kl() -> TestResult {
        let (model, x, y) = tiny_problem(3, 6, 6);
        let method = Trades::zhang_cifar10();
        // The expected adversarial examples first: the method's train-mode forwards
        // update the BatchNorm statistics that the eval-mode attack uses.
        let rng = ChaCha8Rng::seed_from_u64(11);
        let seed = attack_seed(&mut rng.clone());
        let adv = method.adversarial(&model, &x, seed)?;
        let start = Trades {
            steps: 1,
            step_size: 1e-9,
            ..method
        }
        .adversarial(&model, &x, seed)?;
        let eval_kl = |a: &Tensor| -> Result<f32> {
            Ok(
                kl_divergence(&model.forward_t(&x, false)?, &model.forward_t(a, false)?)?
                    .to_scalar::<f32>()?,
            )
        };
        // The inner maximisation raises the eval-mode KL over its random start.
        assert!(eval_kl(&adv)? > eval_kl(&start)?);
        let out = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng.clone()))?;
        let delta = (&adv - &x)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(f64::from(delta) <= method.eps + 1e-6, "‖δ‖∞ = {delta}");
        assert!(delta > 0.02, "the attack should move: ‖δ‖∞ = {delta}");

        let clean = rows(&model.forward_t(&x, true)?);
        let advl = rows(&model.forward_t(&adv, true)?);
        let labels = y.to_vec1::<u32>()?;
        let softmax = |r: &[f64]| -> Vec<f64> {
            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = r.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        let (mut ce, mut kl) = (0.0, 0.0);
        for i in 0..6 {
            ce += neg_log_softmax(&clean[i], labels[i] as usize) / 6.0;
            let (p, q) = (softmax(&clean[i]), softmax(&advl[i]));
            kl += p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum::<f64>() / 6.0;
        }
        let want = ce + 6.0 * kl;
        let got = f64::from(out.loss.to_scalar::<f32>()?);
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Trades::new(0.031, 0, 0.007, 6.0).is_err());
        assert!(Trades::new(0.031, 10, 0.0, 6.0).is_err());
        assert!(Trades::new(0.031, 10, 0.007, -1.0).is_err());
        assert!(Trades::new(-0.1, 10, 0.007, 6.0).is_err());
        assert!(Trades::new(0.031, 10, 0.007, 6.0).is_ok());
    }
}
