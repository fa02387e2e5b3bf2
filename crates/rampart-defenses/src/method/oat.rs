//! Once-for-all adversarial training (OAT; Wang et al., NeurIPS 2020): one
//! λ-conditioned model for a whole range of clean-vs-robust trade-offs.

use candle_core::{Tensor, D};
use rampart_attacks::Pgd;
use rampart_models::Classifier;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting};
use super::{
    attack_seed, check_eps, run_attack_unchecked, BatchLoss, StatelessMethod, StepCost, TrainBatch,
};
use crate::error::{DefenseError, Result};

/// OAT: every example i of a batch draws λᵢ uniformly from the model's training λ
/// values ({0, 0.1, 0.2, 0.3, 0.4, 1.0} by default, so about 1/6 of a batch gets
/// λ = 0); the loss is
///
/// (1/B)·Σᵢ [(1 − λᵢ)·CE(f(xᵢ; λᵢ), yᵢ) + λᵢ·CE(f(x'ᵢ; λᵢ), yᵢ)],
///
/// both terms in train mode with each example conditioned on its own λ (FiLM and the
/// λ = 0 / λ > 0 BatchNorm, see `rampart_models::variant`). x'ᵢ is made by `attack`
/// against the model conditioned on λᵢ, in eval mode, one attack run per distinct
/// λ > 0 of the batch (λ = 0 examples need none: their adversarial term has weight 0).
/// The model must be λ-conditioned (`ModelSpec::oat`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Oat {
    /// The training attack (its seeds are drawn per batch from the method's RNG).
    pub attack: Pgd,
    /// The budget ε of the attack.
    pub eps: f64,
}

impl Oat {
    /// Checks the settings.
    pub fn new(attack: Pgd, eps: f64) -> Result<Self> {
        attack.validate()?;
        check_eps(eps)?;
        Ok(Self { attack, eps })
    }

    /// The published CIFAR-10 setting: PGD-7 L∞ 8/255, step 2/255, random start.
    pub fn wang_cifar10() -> Self {
        Self {
            attack: Pgd::madry_linf_cifar10(),
            eps: 8.0 / 255.0,
        }
    }
}

/// Restores a model's λ when dropped (the attacks condition it on each group's λ).
struct RestoreLambda<'a>(&'a Classifier, f32);

impl Drop for RestoreLambda<'_> {
    fn drop(&mut self) {
        // The saved λ was valid when read, so setting it back cannot fail.
        let _ = self.0.set_lambda(self.1);
    }
}

/// Per-example cross-entropy (B,) of logits (B, K) against labels (B,).
fn per_example_ce(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(log_p.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?)
}

impl MethodSettings for Oat {
    const NAME: &'static str = "oat";
    const ACCEPTS: &'static [Setting] = &[
        Setting::Eps,
        Setting::AttackSteps,
        Setting::AttackStepSize,
        Setting::AttackLastIterate,
    ];

    /// [`Oat::wang_cifar10`].
    fn defaults() -> Self {
        Self::wang_cifar10()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        Self::new(values.pgd(self.attack), values.eps.unwrap_or(self.eps))
    }
}

impl StatelessMethod for Oat {
    /// The attack on the examples drawn with λ > 0 (their share of the model's λ
    /// values), then the clean pass of every example and the adversarial pass of those.
    fn cost(&self, spec: &rampart_models::ModelSpec) -> StepCost {
        let share = spec.oat.as_ref().map_or(1.0, |o| {
            o.lambdas.iter().filter(|&&l| l > 0.0).count() as f64 / o.lambdas.len().max(1) as f64
        });
        StepCost {
            train: 1.0 + share,
            ..StepCost::adversarial(self.attack.perturb_cost(), share)
        }
    }

    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let (model, images, labels) = (batch.model, batch.images, batch.labels);
        let choices = model
            .spec()
            .oat
            .as_ref()
            .map(|o| o.lambdas.clone())
            .ok_or_else(|| {
                DefenseError::Config(
                    "--method oat needs a λ-conditioned model (FiLM + dual BatchNorm); \
                     this model has none"
                        .into(),
                )
            })?;
        let b = images.dim(0)?;
        let lambdas: Vec<f32> = (0..b)
            .map(|_| choices[batch.rng.gen_range(0..choices.len())])
            .collect();
        let device = images.device();
        let saved = model.lambda().unwrap_or(1.0);
        let restore = RestoreLambda(model, saved);
        // One attack per distinct λ > 0, in the order of the training values, so the
        // seeds drawn from `rng` do not depend on anything but the batch's λ draws.
        let mut adv_parts = Vec::new();
        let mut adv_rows: Vec<u32> = Vec::new();
        let mut faults: Option<rampart_attacks::Faults> = None;
        for &lam in choices.iter().filter(|&&l| l > 0.0) {
            let rows: Vec<u32> = (0..b as u32)
                .filter(|&i| lambdas[i as usize] == lam)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::new(rows.as_slice(), device)?;
            model.set_lambda(lam)?;
            let seed = attack_seed(batch.rng);
            // The points alone: each attack's checks stay on the device (where it runs
            // there), merged, for the trainer to read with the loss.
            let adv = run_attack_unchecked(
                &self.attack,
                model,
                &images.index_select(&idx, 0)?,
                &labels.index_select(&idx, 0)?,
                self.eps,
                seed,
            )?;
            faults = match (faults, adv.faults) {
                (Some(a), Some(b)) => Some(a.merge(&b)?),
                (a, b) => a.or(b),
            };
            adv_parts.push(adv.clipped);
            adv_rows.extend(rows);
        }
        drop(restore);

        let clean_logits = model.forward_lambdas(images, &lambdas, true)?;
        let clean_weights: Vec<f32> = lambdas.iter().map(|l| 1.0 - l).collect();
        let clean_weights = Tensor::new(clean_weights.as_slice(), device)?;
        let mut total = (per_example_ce(&clean_logits, labels)? * clean_weights)?.sum_all()?;
        // With synchronised BatchNorm every worker runs the adversarial pass whenever
        // one has adversarial rows (a worker without any runs it on none), so that
        // all take part in its BatchNorms' sums.
        let adversarial_pass = if rampart_models::SyncScope::active() {
            batch.sum_over_workers(&[adv_rows.len() as f64])?[0] > 0.0
        } else {
            !adv_parts.is_empty()
        };
        if adversarial_pass {
            let adv_inputs = if adv_parts.is_empty() {
                images.narrow(0, 0, 0)?
            } else {
                Tensor::cat(&adv_parts, 0)?
            };
            let adv_lambdas: Vec<f32> = adv_rows.iter().map(|&i| lambdas[i as usize]).collect();
            let idx = Tensor::new(adv_rows.as_slice(), device)?;
            let adv_labels = labels.index_select(&idx, 0)?;
            let adv_logits = model.forward_lambdas(&adv_inputs, &adv_lambdas, true)?;
            let weights = Tensor::new(adv_lambdas.as_slice(), device)?;
            let adv_term = (per_example_ce(&adv_logits, &adv_labels)? * weights)?.sum_all()?;
            total = (total + adv_term)?;
        }
        let loss = (total / b as f64)?;
        Ok(BatchLoss::of_batch(loss, clean_logits, labels).with_faults(faults))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::testutil::{batch, neg_log_softmax, rows};
    use crate::method::{run_attack, TrainingMethod};
    use crate::TestResult;
    use candle_core::Device;
    use rampart_models::{Arch, ModelSpec, OatSpec};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn oat_model(seed: u64) -> Classifier {
        let spec = ModelSpec {
            input_shape: [3, 8, 8],
            oat: Some(OatSpec::standard()),
            ..ModelSpec::cifar(
                Arch::Wrn {
                    depth: 10,
                    widen: 1,
                },
                3,
            )
        };
        Classifier::new(spec, seed, &Device::Cpu).unwrap_or_else(|e| panic!("model: {e}"))
    }

    /// On PGD's device-resident loop (its kernels' CPU twins here) the attacks of the
    /// λ groups leave their checks, merged, with the loss, and the loss is the host
    /// loop's bit for bit; on the host loop the attacks check at once.
    #[test]
    fn on_the_device_loop_the_attacks_checks_come_with_the_loss() -> TestResult {
        let method = Oat::new(
            Pgd {
                steps: 3,
                ..Pgd::madry_linf_cifar10()
            },
            0.03,
        )?;
        let (x, y) = batch(12, 3, 2);
        let loss = || -> Result<BatchLoss> {
            let model = oat_model(1);
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng))
        };
        let host = loss()?;
        let device = rampart_attacks::with_device_resident_pgd(loss)?;
        assert_eq!(
            host.loss.to_scalar::<f32>()?.to_bits(),
            device.loss.to_scalar::<f32>()?.to_bits()
        );
        assert!(host.faults.is_none());
        let faults = device.faults.ok_or("no checks on the device loop")?;
        let values = faults.tensor().to_vec1::<f64>()?;
        assert!(
            rampart_attacks::Faults::error(&values).is_none(),
            "{values:?}"
        );
        Ok(())
    }

    /// The loss equals the λ-weighted sum worked out from the model's own outputs,
    /// the adversarial inputs stay in the ε-ball, and the model's λ is restored.
    #[test]
    fn loss_weights_clean_and_adversarial_terms_by_lambda() -> TestResult {
        let model = oat_model(1);
        model.set_lambda(0.2)?;
        let (x, y) = batch(12, 3, 2);
        let method = Oat::new(Pgd::madry_linf_cifar10(), 0.03)?;
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // Replay the method's draws: λ per example, then one seed per λ > 0 group.
        let choices = OatSpec::standard().lambdas;
        let mut replay = rng.clone();
        let lambdas: Vec<f32> = (0..12)
            .map(|_| choices[replay.gen_range(0..choices.len())])
            .collect();
        let mut adv_inputs = Vec::new();
        let mut adv_rows = Vec::new();
        for &lam in choices.iter().filter(|&&l| l > 0.0) {
            let rows_l: Vec<u32> = (0..12u32).filter(|&i| lambdas[i as usize] == lam).collect();
            if rows_l.is_empty() {
                continue;
            }
            let idx = Tensor::new(rows_l.as_slice(), &Device::Cpu)?;
            model.set_lambda(lam)?;
            let adv = run_attack(
                &method.attack,
                &model,
                &x.index_select(&idx, 0)?,
                &y.index_select(&idx, 0)?,
                0.03,
                attack_seed(&mut replay),
            )?;
            assert!(adv.norm.iter().all(|&n| f64::from(n) <= 0.03 + 1e-6));
            adv_inputs.push(adv.clipped);
            adv_rows.extend(rows_l);
        }
        model.set_lambda(0.2)?;
        // The method's own forward passes update BatchNorm statistics; snapshot the
        // weights so the expected value uses the same state as the method.
        let snapshot = oat_model(1);
        snapshot.copy_weights_from(&model)?;
        let out = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng))?;
        assert_eq!(model.lambda(), Some(0.2), "λ restored after the attacks");

        let labels = y.to_vec1::<u32>()?;
        let clean = rows(&snapshot.forward_lambdas(&x, &lambdas, true)?);
        let adv_x = Tensor::cat(&adv_inputs, 0)?;
        let adv_l: Vec<f32> = adv_rows.iter().map(|&i| lambdas[i as usize]).collect();
        let adv = rows(&snapshot.forward_lambdas(&adv_x, &adv_l, true)?);
        let mut want = 0.0;
        for (i, row) in clean.iter().enumerate() {
            want += (1.0 - f64::from(lambdas[i])) * neg_log_softmax(row, labels[i] as usize);
        }
        for (j, row) in adv.iter().enumerate() {
            let i = adv_rows[j] as usize;
            want += f64::from(lambdas[i]) * neg_log_softmax(row, labels[i] as usize);
        }
        want /= 12.0;
        let got = f64::from(out.loss.to_scalar::<f32>()?);
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        assert!(lambdas.contains(&0.0) && lambdas.iter().any(|&l| l > 0.0));
        Ok(())
    }

    #[test]
    fn plain_models_and_bad_settings_are_refused() -> TestResult {
        let plain = crate::method::testutil::tiny_model(3, 0);
        let (x, y) = batch(4, 3, 0);
        let err = Oat::wang_cifar10()
            .loss(&mut TrainBatch::new(
                &plain,
                &x,
                &y,
                &mut ChaCha8Rng::seed_from_u64(0),
            ))
            .err()
            .ok_or("a plain model must be refused")?;
        assert!(err.to_string().contains("λ-conditioned"), "{err}");
        assert!(Oat::new(Pgd::madry_linf_cifar10(), -0.1).is_err());
        let back: Oat = serde_json::from_value(Oat::wang_cifar10().settings())?;
        assert_eq!(back, Oat::wang_cifar10());
        Ok(())
    }
}
