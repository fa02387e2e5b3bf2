//! Adversarial training (Madry et al., ICLR 2018): cross-entropy on PGD examples made
//! on the fly, optionally on only a fraction of each batch.

use candle_core::ModuleT;
use rampart_attacks::{Init, Pgd, Restarts, StepSize};
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting};
use super::{
    adversarial_count, attack_first_unchecked, check_eps, check_fraction, cross_entropy,
    mixed_batch, BatchLoss, StatelessMethod, StepCost, TrainBatch,
};
use crate::error::Result;

/// Adversarial training: the first m = round(fraction·B) examples of each (shuffled)
/// batch are replaced by adversarial examples of `attack` at budget `eps`, made with
/// the model in eval mode; the loss is the mean cross-entropy over the whole mixed
/// batch in train mode, i.e. (m/B)·CE(adversarial) + (1 − m/B)·CE(clean).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdversarialTraining {
    /// The training attack (its seed is drawn per batch from the method's RNG).
    pub attack: Pgd,
    /// The budget ε of the attack.
    pub eps: f64,
    /// Fraction of each batch made adversarial, in (0, 1] (1 = Madry's 100 %, 0.5 =
    /// half clean, half adversarial).
    pub fraction: f64,
}

impl AdversarialTraining {
    /// Checks the settings.
    pub fn new(attack: Pgd, eps: f64, fraction: f64) -> Result<Self> {
        attack.validate()?;
        check_eps(eps)?;
        check_fraction(fraction)?;
        Ok(Self {
            attack,
            eps,
            fraction,
        })
    }

    /// Madry et al. (ICLR 2018) on CIFAR-10: L∞ ε = 8/255, PGD-7 with step 2/255 from a
    /// uniform random start, the whole batch adversarial.
    pub fn madry_cifar10() -> Self {
        Self {
            attack: Pgd::madry_linf_cifar10(),
            eps: 8.0 / 255.0,
            fraction: 1.0,
        }
    }

    /// The setting of the AT baseline in REFERENCE §3 (WRN-28-10 in the CCAT paper's
    /// comparison): L∞ ε = 0.03, PGD-10 with step 0.007 from a uniform random start,
    /// the whole batch adversarial.
    pub fn pgd10_cifar10() -> Self {
        Self {
            attack: Pgd {
                steps: 10,
                step_size: StepSize::Absolute(0.007),
                restarts: Restarts::same(1, Init::Uniform),
                ..Pgd::madry_linf_cifar10()
            },
            eps: 0.03,
            fraction: 1.0,
        }
    }
}

impl MethodSettings for AdversarialTraining {
    const NAME: &'static str = "at";
    const ACCEPTS: &'static [Setting] = &[
        Setting::Eps,
        Setting::AttackSteps,
        Setting::AttackStepSize,
        Setting::AdvFraction,
        Setting::AttackLastIterate,
    ];

    /// [`AdversarialTraining::madry_cifar10`].
    fn defaults() -> Self {
        Self::madry_cifar10()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        Self::new(
            values.pgd(self.attack),
            values.eps.unwrap_or(self.eps),
            values.adv_fraction.unwrap_or(self.fraction),
        )
    }
}

impl StatelessMethod for AdversarialTraining {
    /// The training attack's seed.
    fn draws(&self) -> super::StepDraws {
        super::StepDraws::OneSeed
    }

    /// The PGD attack on the adversarial fraction, then one train-mode pass.
    fn cost(&self, _spec: &rampart_models::ModelSpec) -> StepCost {
        StepCost::adversarial(self.attack.perturb_cost(), self.fraction)
    }

    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        adversarial_cross_entropy(&self.attack, self.eps, self.fraction, batch)
    }
}

/// The loss shared by adversarial training and fast AT: cross-entropy in train mode on
/// the batch whose first round(fraction·B) examples are replaced by `attack`'s.
pub(crate) fn adversarial_cross_entropy(
    attack: &dyn rampart_attacks::Attack,
    eps: f64,
    fraction: f64,
    batch: &mut TrainBatch<'_>,
) -> Result<BatchLoss> {
    let m = adversarial_count(batch.images.dim(0)?, fraction);
    // The points alone are needed: the attack's checks stay on the device (where it
    // runs there) for the trainer to read with the loss.
    let adv = attack_first_unchecked(attack, batch, m, eps)?;
    let inputs = mixed_batch(batch.images, &adv.clipped)?;
    let logits = batch.model.forward_t(&inputs, true)?;
    let loss = cross_entropy(&logits, batch.labels, 0.0)?;
    Ok(BatchLoss::of_batch(loss, logits, batch.labels).with_faults(adv.faults))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::attack_first;
    use crate::method::testutil::{neg_log_softmax, rows, tiny_problem};
    use crate::method::TrainingMethod;
    use crate::TestResult;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The loss is (m/B)·CE(adversarial) + (1 − m/B)·CE(clean) with m = round(f·B): the
    /// first m inputs are the attack's (same seed), the others untouched.
    #[test]
    fn loss_mixes_the_adversarial_fraction() -> TestResult {
        let (model, x, y) = tiny_problem(3, 8, 1);
        for (fraction, m) in [(0.25, 2usize), (0.5, 4), (1.0, 8)] {
            let method = AdversarialTraining::new(Pgd::madry_linf_cifar10(), 0.03, fraction)?;
            // The expected adversarial examples first: the method's train-mode forward
            // updates the BatchNorm statistics that the eval-mode attack uses.
            let rng = ChaCha8Rng::seed_from_u64(5);
            let adv = attack_first(
                &method.attack,
                &mut TrainBatch::new(&model, &x, &y, &mut rng.clone()),
                m,
                0.03,
            )?;
            assert!(adv.norm.iter().all(|&n| f64::from(n) <= 0.03 + 1e-6));
            let out = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng.clone()))?;
            let inputs = mixed_batch(&x, &adv.clipped)?;
            // The clean part is untouched, the adversarial part moved.
            let diff = (&inputs - &x)?
                .abs()?
                .flatten_from(1)?
                .max(1)?
                .to_vec1::<f32>()?;
            for (i, d) in diff.iter().enumerate() {
                assert_eq!(*d > 0.0, i < m, "example {i}: max |δ| {d}");
            }
            let logits = rows(&model.forward_t(&inputs, true)?);
            let labels = y.to_vec1::<u32>()?;
            let ce = |range: std::ops::Range<usize>| -> f64 {
                let n = range.len().max(1) as f64;
                range
                    .map(|i| neg_log_softmax(&logits[i], labels[i] as usize))
                    .sum::<f64>()
                    / n
            };
            let f = m as f64 / 8.0;
            let want = f * ce(0..m) + (1.0 - f) * ce(m..8);
            let got = f64::from(out.loss.to_scalar::<f32>()?);
            assert!(
                (got - want).abs() < 1e-5,
                "fraction {fraction}: {got} vs {want}"
            );
            assert_eq!(out.logits.dims(), &[8, 3]);
        }
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused() {
        let pgd = Pgd::madry_linf_cifar10();
        assert!(AdversarialTraining::new(pgd, -1.0, 1.0).is_err());
        assert!(AdversarialTraining::new(pgd, 0.03, 0.0).is_err());
        assert!(AdversarialTraining::new(Pgd { steps: 0, ..pgd }, 0.03, 1.0).is_err());
        assert!(AdversarialTraining::new(pgd, 0.03, 0.5).is_ok());
    }

    #[test]
    fn settings_round_trip() -> TestResult {
        let at = AdversarialTraining::pgd10_cifar10();
        let back: AdversarialTraining = serde_json::from_value(at.settings())?;
        assert_eq!(back, at);
        Ok(())
    }
}
