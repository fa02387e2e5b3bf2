//! The fast gradient sign method, plain and with a random start: a single L∞ step of
//! the PGD loop.

use serde::{Deserialize, Serialize};

use crate::base::{Attack, Criterion};
use crate::eot::Eot;
use crate::error::Result;
use crate::norm::{Init, Norm};
use crate::objective::Objective;
use crate::pgd::{Pgd, Restarts, StepSize};
use crate::problem::{Outcome, Problem};
use crate::repeated::{Record, Rows, SingleRun, Start};

/// FGSM: δ = proj(δ₀ + α·sign(∇ objective(x + δ₀))). Like every attack here it returns
/// the better (by criterion, then objective) of the start and the stepped point.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fgsm {
    /// Objective whose gradient sign is followed.
    pub objective: Objective,
    /// When an example counts as fooled.
    pub criterion: Criterion,
    /// Start δ₀: [`Init::Zero`] for FGSM, [`Init::Uniform`] for FGSM with random start.
    pub init: Init,
    /// Step α.
    pub step: StepSize,
    /// Forward passes averaged for stochastic models.
    pub eot: Eot,
    /// Return the stepped point, not the better of the start and the stepped point
    /// (Wong et al.'s training code; [`Pgd::last_iterate`]).
    #[serde(default)]
    pub last_iterate: bool,
}

impl Fgsm {
    /// Goodfellow, Shlens & Szegedy (ICLR 2015): δ = ε·sign(∇ CE), from x.
    pub fn goodfellow() -> Fgsm {
        Fgsm {
            objective: Objective::CrossEntropy,
            criterion: Criterion::Misclassified,
            init: Init::Zero,
            step: StepSize::Relative(1.0),
            eot: Eot::OFF,
            last_iterate: false,
        }
    }

    /// The "fast is better than free" step (Wong, Rice & Kolter, ICLR 2020):
    /// δ₀ ~ U(−ε, ε), α = 1.25ε, then projection onto the ε-ball and the bounds.
    pub fn fast_at() -> Fgsm {
        Fgsm {
            init: Init::Uniform,
            step: StepSize::Relative(1.25),
            ..Fgsm::goodfellow()
        }
    }

    /// The equivalent one-step [`Pgd`] configuration.
    pub fn as_pgd(&self) -> Pgd {
        Pgd {
            norm: Norm::Linf,
            objective: self.objective,
            criterion: self.criterion,
            steps: 1,
            step_size: self.step,
            momentum: 0.0,
            backtrack: None,
            restarts: Restarts::same(1, self.init),
            early_stop: false,
            eot: self.eot,
            last_iterate: self.last_iterate,
        }
    }
}

impl Attack for Fgsm {
    fn norm(&self) -> Norm {
        Norm::Linf
    }

    fn criterion(&self) -> Criterion {
        self.criterion
    }

    fn eval_samples(&self) -> usize {
        self.eot.eval_samples
    }

    fn validate(&self) -> Result<()> {
        self.as_pgd().validate()
    }

    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        self.as_pgd().check(problem)
    }

    /// PGD's device-resident loop takes it where it applies (an L∞ configuration,
    /// f32 inputs): the batch checked there, its starts made there, nothing read before
    /// the result but a few values per example, or nothing with
    /// [`Attack::perturb_unchecked`] (the same points and errors, bit for bit).
    fn resident_pgd(&self) -> Option<Pgd> {
        Some(self.as_pgd())
    }

    /// The single step (L∞).
    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        self.as_pgd().attack_eps(problem, eps, seed)
    }
}

impl SingleRun for Fgsm {
    fn begin(&self, problem: &Problem<'_>) -> Result<Start> {
        self.as_pgd().begin(problem)
    }

    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
        self.as_pgd().run_once(problem, rows, record)
    }

    fn skips_fooled(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::input_gradient;
    use crate::testutil::trained;
    use crate::Bounds;

    /// FGSM's point is x + ε·sign(∇ CE(x)) clipped to the bounds, computed here by hand;
    /// the attack returns it unless x itself has the higher loss.
    #[test]
    fn fgsm_takes_the_signed_gradient_step() -> Result<()> {
        let t = trained();
        let eps = 0.05;
        let res = Fgsm::goodfellow().run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 0)?;
        let (loss, grad) = input_gradient(&t.model, Objective::CrossEntropy, &t.xs, &t.ys, None)?;
        let manual = (&t.xs + (grad.sign()? * eps)?)?.clamp(0f32, 1f32)?;
        let (manual_loss, _) =
            input_gradient(&t.model, Objective::CrossEntropy, &manual, &t.ys, None)?;
        let (loss, manual_loss) = (loss.to_vec1::<f32>()?, manual_loss.to_vec1::<f32>()?);
        let got = res[0].clipped.flatten_from(1)?.to_vec2::<f32>()?;
        let manual = manual.flatten_from(1)?.to_vec2::<f32>()?;
        let clean = t.xs.flatten_from(1)?.to_vec2::<f32>()?;
        let mut stepped = 0;
        for i in 0..got.len() {
            let expected = if manual_loss[i] > loss[i] {
                &manual[i]
            } else {
                &clean[i]
            };
            stepped += usize::from(manual_loss[i] > loss[i]);
            for (a, b) in got[i].iter().zip(expected) {
                assert!((a - b).abs() <= 1e-6, "example {i}: {a} vs {b}");
            }
        }
        assert!(
            stepped > got.len() / 2,
            "the step should raise the loss on most examples"
        );
        assert!(res[0].iterations.iter().all(|&n| n == 1));
        Ok(())
    }

    #[test]
    fn fast_at_stays_in_the_ball_and_differs_from_fgsm() -> Result<()> {
        let t = trained();
        let eps = 0.05;
        let fast = Fgsm::fast_at().run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 3)?;
        let plain = Fgsm::goodfellow().run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 3)?;
        assert!(fast[0].norm.iter().all(|&n| n as f64 <= eps));
        let diff = (&fast[0].clipped - &plain[0].clipped)?
            .abs()?
            .max_keepdim(0)?;
        assert!(diff.flatten_all()?.max(0)?.to_scalar::<f32>()? > 1e-3);
        Ok(())
    }
}
