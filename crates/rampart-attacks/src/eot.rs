//! Expectation over transformation (EOT, Athalye et al. 2018) for stochastic models.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How many forward passes are averaged for a stochastic model (noise, dropout or
/// random transformations at test time, i.e. a `ModuleT` whose eval-mode forward is
/// random).
///
/// * Every gradient is the mean of `grad_samples` input gradients, and the objective
///   value at a point is the mean over the same draws.
/// * **Success rule.** Whether a point fools the model is judged on the *mean class
///   probabilities* over draws: during the attack over the `grad_samples` draws of the
///   step, and for the returned points over `eval_samples` fresh draws. The reported
///   `success`, `confidence` and `predicted` come from those fresh draws, never from
///   the draw that happened to look best during the attack.
///
/// A deterministic model needs [`Eot::OFF`] (one pass each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eot {
    /// Forward/backward passes averaged per gradient step (≥ 1).
    pub grad_samples: usize,
    /// Forward passes averaged to judge the returned adversarial inputs (≥ 1).
    pub eval_samples: usize,
}

impl Eot {
    /// One pass for everything: deterministic models.
    pub const OFF: Eot = Eot {
        grad_samples: 1,
        eval_samples: 1,
    };

    /// `grad_samples` gradient draws per step, `eval_samples` draws to judge success.
    pub fn new(grad_samples: usize, eval_samples: usize) -> Result<Self> {
        let eot = Eot {
            grad_samples,
            eval_samples,
        };
        eot.validate()?;
        Ok(eot)
    }

    /// AutoAttack's "rand" version (Croce & Hein 2020): 20 gradient samples per step.
    /// Judging the result on 20 draws of the mean probability is this crate's choice.
    pub fn autoattack_rand() -> Eot {
        Eot {
            grad_samples: 20,
            eval_samples: 20,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.grad_samples == 0 || self.eval_samples == 0 {
            return Err(Error::Config(format!(
                "EOT needs at least one sample, got grad_samples = {}, eval_samples = {}",
                self.grad_samples, self.eval_samples
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use candle_core::{Device, Module, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::pgd::{Pgd, Restarts, StepSize};
    use crate::testutil::{trained, Mlp, CLASSES, DIM};
    use crate::{Attack, Bounds, Criterion, Init, Norm, Objective};

    /// Logits (2, 0, 0, 0) + 2·N(0, I), whatever the input: class 0 has the highest
    /// mean probability, yet a single draw misclassifies about a third of the time.
    struct NoisyLogits {
        rng: Mutex<ChaCha8Rng>,
    }

    impl Module for NoisyLogits {
        fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
            let b = xs.dim(0)?;
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
            let mut logits = Vec::with_capacity(b * CLASSES);
            for _ in 0..b {
                for k in 0..CLASSES {
                    let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
                    let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    logits.push((if k == 0 { 2.0 } else { 0.0 } + 2.0 * normal) as f32);
                }
            }
            // Depend on the input (with zero weight) so that gradients exist.
            Tensor::from_vec(logits, (b, CLASSES), xs.device())?
                .broadcast_add(&(xs.flatten_from(1)?.sum_keepdim(1)? * 0.0)?)
        }
    }

    /// Success is judged on the mean probability of fresh draws, not on the luckiest
    /// draw met during the attack: the model is never fooled in expectation.
    #[test]
    fn success_is_never_a_lucky_draw() -> Result<()> {
        let xs = Tensor::full(0.5f32, (64, 2, 4, 4), &Device::Cpu)?;
        let ys = Tensor::zeros(64, candle_core::DType::U32, &Device::Cpu)?;
        let mut cfg = Pgd::linf_pgd10();
        cfg.restarts = Restarts::same(3, Init::Uniform);
        let fooled = |eot: Eot| -> Result<usize> {
            let model = NoisyLogits {
                rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
            };
            let res = Pgd { eot, ..cfg }.run(&model, Bounds::UNIT, &xs, &ys, &[0.03], 0)?;
            Ok(res[0].success.iter().filter(|&&s| s).count())
        };
        let single = fooled(Eot::new(1, 1)?)?;
        assert!(
            single > 5,
            "a single draw should often look fooled ({single}/64)"
        );
        assert_eq!(fooled(Eot::new(1, 200)?)?, 0);
        assert_eq!(fooled(Eot::new(8, 200)?)?, 0);
        Ok(())
    }

    /// The trained MLP whose input gradient carries a large random term:
    /// logits = f(x) + s·ξ·(Bx − stop_gradient(Bx)), ξ = ±1 per forward pass. The value
    /// is exactly f(x); a single gradient is dominated by ±s·Bᵀ∂, their mean is ∇f.
    struct RandomGradient<'a> {
        base: &'a Mlp,
        b: Tensor,
        scale: f64,
        rng: Mutex<ChaCha8Rng>,
    }

    impl Module for RandomGradient<'_> {
        fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
            let sign = {
                let mut rng = self
                    .rng
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
                if rng.gen::<bool>() {
                    1.0
                } else {
                    -1.0
                }
            };
            let bx = xs.flatten_from(1)?.matmul(&self.b)?;
            let noise = ((&bx - bx.detach())? * (sign * self.scale))?;
            self.base.forward(xs)? + noise
        }
    }

    #[test]
    fn averaging_gradients_defeats_randomised_gradients() -> Result<()> {
        let t = trained();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let b: Vec<f32> = (0..DIM * CLASSES)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let b = Tensor::from_vec(b, (DIM, CLASSES), &Device::Cpu)?;
        let cfg = Pgd {
            norm: Norm::Linf,
            objective: Objective::CrossEntropy,
            criterion: Criterion::Misclassified,
            steps: 20,
            step_size: StepSize::Relative(0.1),
            momentum: 0.0,
            backtrack: None,
            restarts: Restarts::same(1, Init::Zero),
            early_stop: false,
            eot: Eot::OFF,
            last_iterate: false,
        };
        let fooled = |grad_samples: usize| -> Result<usize> {
            let model = RandomGradient {
                base: &t.model,
                b: b.clone(),
                scale: 20.0,
                rng: Mutex::new(ChaCha8Rng::seed_from_u64(1)),
            };
            let eot = Eot::new(grad_samples, 1)?;
            let res = Pgd { eot, ..cfg }.run(&model, Bounds::UNIT, &t.xs, &t.ys, &[0.08], 0)?;
            Ok(res[0].success.iter().filter(|&&s| s).count())
        };
        assert!(fooled(0).is_err(), "zero samples must be refused");
        let reference = cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.08], 0)?;
        let reference = reference[0].success.iter().filter(|&&s| s).count();
        let (one, many) = (fooled(1)?, fooled(64)?);
        assert!(
            many >= one + 8 && many + 4 >= reference,
            "EOT-64 fooled {many}, one sample {one}, true gradient {reference} of 64"
        );
        Ok(())
    }

    #[test]
    fn eot_needs_samples() {
        assert!(Eot::new(0, 1).is_err());
        assert!(Eot::new(1, 0).is_err());
        assert!(Eot::new(20, 20).is_ok());
        assert_eq!(Eot::autoattack_rand().grad_samples, 20);
    }
}
