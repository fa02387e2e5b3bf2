//! Fast adversarial training (Wong, Rice & Kolter, ICLR 2020): adversarial training
//! with a single FGSM step from a random start.

use rampart_attacks::{Fgsm, StepSize};
use serde::{Deserialize, Serialize};

use super::adversarial::adversarial_cross_entropy;
use super::overrides::{MethodSettings, Overrides, Setting};
use super::{check_eps, check_fraction, BatchLoss, StatelessMethod, StepCost, TrainBatch};
use crate::error::Result;

/// Fast AT: the whole batch (or `fraction` of it) replaced by FGSM examples with a
/// random start — δ₀ ~ U(−ε, ε), δ = proj(δ₀ + α·sign(∇CE)), α = 1.25ε — made in eval
/// mode; mean cross-entropy in train mode. Meant to be run with a short cyclic
/// learning-rate schedule (`fast-at-preact-resnet18`).
///
/// By default, like every attack of `rampart-attacks`, the FGSM step returns the
/// better (misclassified first, then higher loss) of the random start and the
/// stepped point; Wong et al. always take the stepped point, which
/// `attack.last_iterate` (`--attack-last-iterate`, set by the
/// `fast-at-preact-resnet18` preset) does.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FastAt {
    /// The FGSM configuration (random start, step).
    pub attack: Fgsm,
    /// The budget ε.
    pub eps: f64,
    /// Fraction of each batch made adversarial, in (0, 1] (the paper: 1).
    pub fraction: f64,
}

impl FastAt {
    /// Checks the settings.
    pub fn new(attack: Fgsm, eps: f64, fraction: f64) -> Result<Self> {
        attack.as_pgd().validate()?;
        check_eps(eps)?;
        check_fraction(fraction)?;
        Ok(Self {
            attack,
            eps,
            fraction,
        })
    }

    /// Wong et al. on CIFAR-10: ε = 8/255, α = 10/255 (1.25ε), uniform random start,
    /// the whole batch adversarial.
    pub fn wong_cifar10() -> Self {
        Self {
            attack: Fgsm::fast_at(),
            eps: 8.0 / 255.0,
            fraction: 1.0,
        }
    }
}

impl MethodSettings for FastAt {
    const NAME: &'static str = "fast-at";
    const ACCEPTS: &'static [Setting] = &[
        Setting::Eps,
        Setting::AttackStepSize,
        Setting::AdvFraction,
        Setting::AttackLastIterate,
    ];

    /// [`FastAt::wong_cifar10`].
    fn defaults() -> Self {
        Self::wong_cifar10()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        let mut attack = self.attack;
        if let Some(s) = values.attack_step_size {
            attack.step = StepSize::Absolute(s);
        }
        if let Some(last) = values.attack_last_iterate {
            attack.last_iterate = last;
        }
        Self::new(
            attack,
            values.eps.unwrap_or(self.eps),
            values.adv_fraction.unwrap_or(self.fraction),
        )
    }
}

impl StatelessMethod for FastAt {
    /// The FGSM-RS start's seed.
    fn draws(&self) -> super::StepDraws {
        super::StepDraws::OneSeed
    }

    /// The FGSM step on the adversarial fraction, then one train-mode pass.
    fn cost(&self, _spec: &rampart_models::ModelSpec) -> StepCost {
        StepCost::adversarial(self.attack.as_pgd().perturb_cost(), self.fraction)
    }

    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        adversarial_cross_entropy(&self.attack, self.eps, self.fraction, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::testutil::tiny_problem;
    use crate::method::TrainingMethod;
    use crate::method::{attack_seed, run_attack};
    use crate::TestResult;
    use candle_core::ModuleT;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The loss is the cross-entropy on the FGSM-RS examples of the batch's seed, all
    /// inside the ε-ball.
    #[test]
    fn loss_is_cross_entropy_on_fgsm_examples() -> TestResult {
        let (model, x, y) = tiny_problem(3, 6, 4);
        let method = FastAt::wong_cifar10();
        // The expected adversarial examples first: the method's train-mode forward
        // updates the BatchNorm statistics that the eval-mode attack uses.
        let rng = ChaCha8Rng::seed_from_u64(9);
        let adv = run_attack(
            &method.attack,
            &model,
            &x,
            &y,
            method.eps,
            attack_seed(&mut rng.clone()),
        )?;
        assert!(adv
            .norm
            .iter()
            .all(|&n| f64::from(n) <= method.eps + 1e-6 && n > 0.0));
        let out = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng.clone()))?;
        let logits = model.forward_t(&adv.clipped, true)?;
        let want = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
        assert!((out.loss.to_scalar::<f32>()? - want).abs() < 1e-6);
        assert_eq!(method.name(), "fast-at");
        assert!(FastAt::new(Fgsm::fast_at(), f64::NAN, 1.0).is_err());
        Ok(())
    }
}
