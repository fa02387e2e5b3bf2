//! Distal adversarial examples (Stutz, Hein & Schiele, ICML 2020): inputs far from any
//! image of any class — uniform noise — perturbed within a small L∞ ball to receive a
//! confident prediction. A model is fooled when its confidence reaches its rejection
//! threshold τ.

use candle_core::{DType, Device, ModuleT, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::base::{Attack, AttackResult, Bounds, Criterion};
use crate::error::{Error, Result};
use crate::norm::Norm;
use crate::objective::Objective;
use crate::pgd::Pgd;
use crate::problem::{Outcome, Problem};
use crate::repeated::{Record, Rows, SingleRun, Start};

/// The distal attack: PGD on the `distal` objective max_k log p_k with the
/// [`Criterion::Confident`] criterion, around given anchor points (the paper's anchors
/// are uniform noise, see [`Distal::noise`] and [`Distal::run_on_noise`]). The
/// result's `confidence` is the confidence the model gives the distal examples and
/// `success` says whether it reached τ. Labels are not used by the objective or the
/// criterion.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distal {
    /// The loop; its objective must be `distal` and its criterion `Confident(τ)`.
    pub pgd: Pgd,
}

impl Distal {
    /// The CCAT evaluation setting: L∞ around U(bounds) noise (ε = 0.03 in the paper),
    /// fooled at confidence ≥ `tau` (the model's threshold, e.g. at 99 % TPR). The
    /// optimisation budget is [`Pgd::ccat_conf_eval`]'s (1000 steps of 0.001, momentum
    /// 0.9, backtracking 1.1, 11 runs with one zero start): the paper states the budget
    /// of its confidence attack, not a separate one for distal examples.
    pub fn ccat(tau: f32) -> Distal {
        Distal {
            pgd: Pgd {
                objective: Objective::Distal,
                criterion: Criterion::Confident(tau),
                ..Pgd::ccat_conf_eval()
            },
        }
    }

    /// Uniform noise in `bounds` with the given shape (B, ...), f32, from `seed`.
    pub fn noise(
        shape: impl Into<Shape>,
        bounds: Bounds,
        seed: u64,
        device: &Device,
    ) -> Result<Tensor> {
        bounds.validate()?;
        let shape = shape.into();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let data: Vec<f32> = (0..shape.elem_count())
            .map(|_| rng.gen_range(bounds.lo..=bounds.hi))
            .collect();
        Ok(Tensor::from_vec(data, shape, device)?)
    }

    /// Draws `Distal::noise(shape, bounds, seed)` and attacks it (the paper's setting).
    /// shape: (B, ...) of the model's input.
    pub fn run_on_noise(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        shape: impl Into<Shape>,
        eps: &[f64],
        seed: u64,
        device: &Device,
    ) -> Result<Vec<AttackResult>> {
        let anchors = Distal::noise(shape, bounds, seed, device)?;
        let labels = Tensor::zeros(anchors.dim(0)?, DType::U32, device)?;
        self.run(model, bounds, &anchors, &labels, eps, seed)
    }

    fn check_setting(&self) -> Result<()> {
        if self.pgd.objective != Objective::Distal {
            return Err(Error::Config(format!(
                "a distal attack maximises the `distal` objective, got `{}`",
                self.pgd.objective
            )));
        }
        if !matches!(self.pgd.criterion, Criterion::Confident(_)) {
            return Err(Error::Config(format!(
                "a distal attack is judged by Criterion::Confident, got {}",
                self.pgd.criterion
            )));
        }
        if self.pgd.norm != Norm::Linf {
            return Err(Error::Config(format!(
                "distal examples are L∞-bounded around the noise, got {}",
                self.pgd.norm
            )));
        }
        Ok(())
    }
}

impl Attack for Distal {
    fn norm(&self) -> Norm {
        self.pgd.norm
    }

    fn criterion(&self) -> Criterion {
        self.pgd.criterion
    }

    fn eval_samples(&self) -> usize {
        self.pgd.eot.eval_samples
    }

    /// The distal setting (objective, criterion, norm), then the loop's configuration.
    fn validate(&self) -> Result<()> {
        self.check_setting()?;
        self.pgd.validate()
    }

    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        self.pgd.check(problem)
    }

    /// xs: (B, ...) anchor points in `bounds` (uniform noise for the paper's setting);
    /// ys: (B,) any labels in range (unused).
    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        self.pgd.attack_eps(problem, eps, seed)
    }
}

impl SingleRun for Distal {
    fn begin(&self, problem: &Problem<'_>) -> Result<Start> {
        self.pgd.begin(problem)
    }

    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
        self.pgd.run_once(problem, rows, record)
    }

    fn skips_fooled(&self) -> bool {
        self.pgd.skips_fooled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgd::{Restarts, StepSize};
    use crate::testutil::{trained, SHAPE};
    use crate::Init;

    fn quick(tau: f32) -> Distal {
        let mut d = Distal::ccat(tau);
        d.pgd.steps = 40;
        d.pgd.step_size = StepSize::Absolute(0.01);
        d.pgd.restarts = Restarts::same(1, Init::Zero);
        d
    }

    /// Noise is perturbed within ε and the confidence the model gives it rises; success
    /// is exactly confidence ≥ τ.
    #[test]
    fn distal_examples_raise_confidence_on_noise() -> Result<()> {
        let t = trained();
        let shape = (32, SHAPE[0], SHAPE[1], SHAPE[2]);
        let noise = Distal::noise(shape, Bounds::UNIT, 5, &Device::Cpu)?;
        let lo = noise
            .min_keepdim(0)?
            .flatten_all()?
            .min(0)?
            .to_scalar::<f32>()?;
        let hi = noise
            .max_keepdim(0)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(lo >= 0.0 && hi <= 1.0 && hi - lo > 0.9);
        let clean_conf = candle_nn::ops::softmax(&t.model.forward_t(&noise, false)?, 1)?
            .max(1)?
            .to_vec1::<f32>()?;
        let tau = 0.9;
        let res = quick(tau).run_on_noise(
            &t.model,
            Bounds::UNIT,
            shape,
            &[0.0, 0.03],
            5,
            &Device::Cpu,
        )?;
        for (c0, c) in clean_conf.iter().zip(&res[0].confidence) {
            assert!(
                (c0 - c).abs() < 1e-6,
                "ε = 0 must leave the noise unchanged"
            );
        }
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!(
            mean(&res[1].confidence) > mean(&clean_conf) + 0.02,
            "confidence {} vs {} on the noise",
            mean(&res[1].confidence),
            mean(&clean_conf)
        );
        for r in &res {
            assert!(r.norm.iter().all(|&n| n as f64 <= r.eps));
            for (s, c) in r.success.iter().zip(&r.confidence) {
                assert_eq!(*s, *c >= tau);
            }
        }
        Ok(())
    }

    #[test]
    fn distal_refuses_other_objectives_criteria_and_norms() -> Result<()> {
        let t = trained();
        let mut d = quick(0.5);
        d.pgd.objective = Objective::CrossEntropy;
        assert!(d
            .run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.03], 0)
            .is_err());
        let mut d = quick(0.5);
        d.pgd.criterion = Criterion::Misclassified;
        assert!(d
            .run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.03], 0)
            .is_err());
        let mut d = quick(0.5);
        d.pgd.norm = Norm::L2;
        assert!(d
            .run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.03], 0)
            .is_err());
        assert!(quick(0.5)
            .run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.03], 0)
            .is_ok());
        Ok(())
    }
}
