//! RegMixup (Pinto et al., NeurIPS 2022): cross-entropy on the clean batch plus
//! cross-entropy on its mixup, mixup acting as a regulariser rather than replacing the
//! clean data.

use candle_core::{DType, ModuleT, Tensor};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting};
use super::{
    cross_entropy, one_hot, soft_cross_entropy, step_values_on, BatchLoss, StatelessMethod,
    StepCost, StepDraws, StepValues, TrainBatch,
};
use crate::error::{DefenseError, Result};

/// RegMixup: loss = CE(f(x), y) + CE(f(x̃), ỹ) with x̃ = λ·x + (1 − λ)·x[π] and the
/// soft target ỹ = λ·onehot(y) + (1 − λ)·onehot(y[π]), λ ~ Beta(α, α) and π a random
/// permutation of the batch, both drawn once per batch from the method's RNG. The
/// clean and the mixed batch go through the model (train mode) as one batch of 2B,
/// so BatchNorm normalises them together. Both terms have weight 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegMixup {
    /// Shape α > 0 of the symmetric Beta(α, α) the mixing weight λ is drawn from.
    /// Large α (the paper's 20 for CIFAR-10) keeps λ near ½.
    pub alpha: f64,
}

/// One batch's mixing: the weight λ ∈ [0, 1] and the partner π(i) of each example.
#[derive(Clone, Debug, PartialEq)]
pub struct MixupDraw {
    /// Weight of the original example.
    pub lambda: f64,
    /// Index of the example each one is mixed with (a permutation of 0..B).
    pub partner: Vec<u32>,
}

impl RegMixup {
    /// Checks α.
    pub fn new(alpha: f64) -> Result<Self> {
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(DefenseError::Config(format!(
                "RegMixup's α must be finite and > 0, got {alpha}"
            )));
        }
        Ok(Self { alpha })
    }

    /// Pinto et al. on CIFAR-10: α = 20.
    pub fn pinto_cifar10() -> Self {
        Self { alpha: 20.0 }
    }

    /// Draws λ ~ Beta(α, α), then a uniform permutation of `batch` examples, from `rng`.
    pub fn draw(&self, batch: usize, rng: &mut ChaCha8Rng) -> Result<MixupDraw> {
        let beta = Beta::new(self.alpha, self.alpha).map_err(|e| {
            DefenseError::Config(format!("RegMixup's Beta({0}, {0}): {e}", self.alpha))
        })?;
        let lambda = beta.sample(rng).clamp(0.0, 1.0);
        let mut partner: Vec<u32> = (0..batch as u32).collect();
        partner.shuffle(rng);
        Ok(MixupDraw { lambda, partner })
    }
}

/// Soft targets λ·onehot(y_i) + (1 − λ)·onehot(y_π(i)), row-major (B·K).
pub fn mixup_targets(labels: &[u32], draw: &MixupDraw, classes: usize) -> Vec<f32> {
    let hot = one_hot(labels, classes);
    let mut out = vec![0f32; labels.len() * classes];
    for (i, &j) in draw.partner.iter().enumerate() {
        for k in 0..classes {
            let v = draw.lambda * f64::from(hot[i * classes + k])
                + (1.0 - draw.lambda) * f64::from(hot[j as usize * classes + k]);
            out[i * classes + k] = v as f32;
        }
    }
    out
}

/// [`mixup_targets`] on the device, from the labels (B,) u32, the weights `reals`
/// = [λ, 1 − λ] (f64) and the partners π (B,) u32 there: (B, K) f32, bit for bit the
/// host's (the same f64 products and sum, rounded to f32), with nothing read back.
pub fn mixup_targets_on_device(
    labels: &Tensor,
    reals: &Tensor,
    partner: &Tensor,
    classes: usize,
) -> Result<Tensor> {
    let ks = super::constants::class_row(classes, labels.device())?;
    let hot = |l: &Tensor| -> Result<Tensor> {
        Ok(l.unsqueeze(1)?.broadcast_eq(&ks)?.to_dtype(DType::F64)?)
    };
    let own = hot(labels)?.broadcast_mul(&reals.narrow(0, 0, 1)?)?;
    let other = hot(&labels.index_select(partner, 0)?)?.broadcast_mul(&reals.narrow(0, 1, 1)?)?;
    Ok((own + other)?.to_dtype(DType::F32)?)
}

/// [`mixup_images`] with the weights `reals` = [λ, 1 − λ] (f64) and the partners π
/// (B,) u32 on the device: each weight rounded to the images' type, as the host's
/// `images * λ` rounds it.
pub fn mixup_images_on_device(images: &Tensor, reals: &Tensor, partner: &Tensor) -> Result<Tensor> {
    let weight = |i: usize| reals.narrow(0, i, 1)?.to_dtype(images.dtype());
    let partners = images.index_select(partner, 0)?;
    Ok((images.broadcast_mul(&weight(0)?)? + partners.broadcast_mul(&weight(1)?)?)?)
}

/// The mixed batch λ·x + (1 − λ)·x[π]; images (B, C, H, W).
pub fn mixup_images(images: &Tensor, draw: &MixupDraw) -> Result<Tensor> {
    let index = Tensor::new(draw.partner.as_slice(), images.device())?;
    let partners = images.index_select(&index, 0)?;
    Ok(((images * draw.lambda)? + (partners * (1.0 - draw.lambda))?)?)
}

impl MethodSettings for RegMixup {
    const NAME: &'static str = "regmixup";
    const ACCEPTS: &'static [Setting] = &[Setting::MixupAlpha];

    /// [`RegMixup::pinto_cifar10`].
    fn defaults() -> Self {
        Self::pinto_cifar10()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        Self::new(values.mixup_alpha.unwrap_or(self.alpha))
    }
}

impl StatelessMethod for RegMixup {
    /// The clean and the mixed example in one train-mode batch.
    fn cost(&self, _spec: &rampart_models::ModelSpec) -> StepCost {
        StepCost {
            train: 2.0,
            ..StepCost::CLEAN
        }
    }

    /// λ and π from the batch's RNG, which a graph of the step is given on the device.
    fn draws(&self) -> StepDraws {
        StepDraws::Values
    }

    /// [λ, 1 − λ] and π, drawn as the step draws them.
    fn values(&self, rng: &mut ChaCha8Rng, batch: usize) -> Result<Option<StepValues>> {
        let draw = self.draw(batch, rng)?;
        Ok(Some(StepValues {
            reals: vec![draw.lambda, 1.0 - draw.lambda],
            indices: draw.partner,
        }))
    }

    /// The mixing and the soft targets are made on the device from the weights and
    /// partners (drawn here, or already there under a replayed graph): the step reads
    /// nothing back.
    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let (images, labels) = (batch.images, batch.labels);
        let b = images.dim(0)?;
        let values = self
            .values(batch.rng, b)?
            .ok_or_else(|| DefenseError::Config("RegMixup drew no values".into()))?;
        let (reals, partner) = step_values_on(&values, images.device())?;
        let mixed = mixup_images_on_device(images, &reals, &partner)?;
        let k = batch.model.spec().num_classes;
        let targets = mixup_targets_on_device(labels, &reals, &partner, k)?;
        let logits = batch
            .model
            .forward_t(&Tensor::cat(&[images, &mixed], 0)?, true)?;
        let clean = logits.narrow(0, 0, b)?;
        let loss = (cross_entropy(&clean, labels, 0.0)?
            + soft_cross_entropy(&logits.narrow(0, b, b)?, &targets)?)?;
        Ok(BatchLoss::of_batch(loss, clean, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::testutil::{neg_log_softmax, rows, tiny_problem};
    use crate::method::TrainingMethod;
    use crate::TestResult;
    use rand::SeedableRng;

    #[test]
    fn beta_20_concentrates_around_one_half() -> TestResult {
        let method = RegMixup::pinto_cifar10();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 2000;
        let mut sum = 0.0;
        for _ in 0..n {
            let draw = method.draw(4, &mut rng)?;
            assert!(
                draw.lambda > 0.0 && draw.lambda < 1.0,
                "λ = {}",
                draw.lambda
            );
            let mut sorted = draw.partner.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3]);
            sum += draw.lambda;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean λ {mean}");
        // Beta(20, 20) has standard deviation ≈ 0.078: the draws vary.
        let a = method.draw(4, &mut rng)?.lambda;
        let b = method.draw(4, &mut rng)?.lambda;
        assert_ne!(a, b);
        Ok(())
    }

    /// loss = CE(clean logits, y) + Σ_k −ỹ_k·log softmax(mixed logits)_k / B, with λ
    /// and π drawn from the same seed, logits of the concatenated batch.
    #[test]
    fn loss_matches_hand_computation() -> TestResult {
        let (model, x, y) = tiny_problem(4, 6, 2);
        let method = RegMixup::pinto_cifar10();
        let rng = ChaCha8Rng::seed_from_u64(17);
        let draw = method.draw(6, &mut rng.clone())?;
        assert!(draw.partner.iter().enumerate().any(|(i, &j)| i as u32 != j));
        let out = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng.clone()))?;

        // x̃_i = λ·x_i + (1 − λ)·x_π(i), built here pixel by pixel.
        let pixels = x.flatten_from(1)?.to_vec2::<f32>()?;
        let mut mixed = Vec::new();
        for (i, &j) in draw.partner.iter().enumerate() {
            for (p, q) in pixels[i].iter().zip(&pixels[j as usize]) {
                mixed.push(
                    (draw.lambda * f64::from(*p) + (1.0 - draw.lambda) * f64::from(*q)) as f32,
                );
            }
        }
        let mixed = Tensor::from_vec(mixed, x.dims(), x.device())?;
        let logits = rows(&model.forward_t(&Tensor::cat(&[&x, &mixed], 0)?, true)?);
        let labels = y.to_vec1::<u32>()?;
        let mut want = 0.0;
        for i in 0..6 {
            let (yi, yj) = (
                labels[i] as usize,
                labels[draw.partner[i] as usize] as usize,
            );
            want += neg_log_softmax(&logits[i], yi) / 6.0;
            want += (draw.lambda * neg_log_softmax(&logits[6 + i], yi)
                + (1.0 - draw.lambda) * neg_log_softmax(&logits[6 + i], yj))
                / 6.0;
        }
        let got = f64::from(out.loss.to_scalar::<f32>()?);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert_eq!(out.logits.dims(), &[6, 4]);
        Ok(())
    }

    /// The device's targets and mixed images equal the host's bit for bit, for random
    /// draws and labels.
    #[test]
    fn the_mixing_on_the_device_is_the_hosts() -> TestResult {
        let method = RegMixup::new(0.4)?;
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let dev = candle_core::Device::Cpu;
        for b in [1usize, 5, 32] {
            let draw = method.draw(b, &mut rng)?;
            let labels: Vec<u32> = (0..b as u32).map(|i| (i * 7 + 3) % 10).collect();
            let reals = Tensor::new(&[draw.lambda, 1.0 - draw.lambda], &dev)?;
            let partner = Tensor::new(draw.partner.as_slice(), &dev)?;
            let y = Tensor::new(labels.as_slice(), &dev)?;
            let got = mixup_targets_on_device(&y, &reals, &partner, 10)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let want = mixup_targets(&labels, &draw, 10);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "targets, batch {b}"
            );
            let x = Tensor::rand(0f32, 1f32, (b, 3, 4, 4), &dev)?;
            let got = mixup_images_on_device(&x, &reals, &partner)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let want = mixup_images(&x, &draw)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "images, batch {b}"
            );
        }
        Ok(())
    }

    /// The step's values drawn by `step_values` advance the RNG as the step does, and
    /// under `with_step_values` the step mixes with the values on the device, not
    /// with its own draws (what a replayed graph relies on).
    #[test]
    fn the_step_takes_its_values_from_the_device_when_given() -> TestResult {
        let (model, x, y) = tiny_problem(4, 6, 2);
        let method = RegMixup::pinto_cifar10();
        let mut drawn = ChaCha8Rng::seed_from_u64(5);
        let values = method.step_values(&mut drawn, 6)?.ok_or("no values")?;
        let mut stepped = ChaCha8Rng::seed_from_u64(5);
        let own = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut stepped))?;
        assert_eq!(
            rand::Rng::gen::<u64>(&mut drawn),
            rand::Rng::gen::<u64>(&mut stepped)
        );
        assert_eq!(values.indices.len(), 6);
        // Other values on the device: λ = 0.25 and the batch reversed.
        let draw = MixupDraw {
            lambda: 0.25,
            partner: vec![5, 4, 3, 2, 1, 0],
        };
        let reals = Tensor::new(&[0.25f64, 0.75], x.device())?;
        let partner = Tensor::new(draw.partner.as_slice(), x.device())?;
        let given = crate::method::with_step_values(&reals, &partner, || {
            method.loss(&mut TrainBatch::new(
                &model,
                &x,
                &y,
                &mut ChaCha8Rng::seed_from_u64(5),
            ))
        })?;
        let mixed = mixup_images(&x, &draw)?;
        let logits = model.forward_t(&Tensor::cat(&[&x, &mixed], 0)?, true)?;
        let targets = Tensor::from_vec(
            mixup_targets(&y.to_vec1::<u32>()?, &draw, 4),
            (6, 4),
            x.device(),
        )?;
        let want = (cross_entropy(&logits.narrow(0, 0, 6)?, &y, 0.0)?
            + soft_cross_entropy(&logits.narrow(0, 6, 6)?, &targets)?)?
        .to_scalar::<f32>()?;
        let given = given.loss.to_scalar::<f32>()?;
        assert_eq!(given.to_bits(), want.to_bits());
        assert_ne!(given.to_bits(), own.loss.to_scalar::<f32>()?.to_bits());
        // Values of another shape are refused.
        let short = Tensor::new(&[0u32, 1], x.device())?;
        let refused = crate::method::with_step_values(&reals, &short, || {
            method.loss(&mut TrainBatch::new(
                &model,
                &x,
                &y,
                &mut ChaCha8Rng::seed_from_u64(5),
            ))
        });
        assert!(refused.is_err());
        Ok(())
    }

    #[test]
    fn targets_mix_the_two_labels() {
        let draw = MixupDraw {
            lambda: 0.75,
            partner: vec![1, 0, 2],
        };
        let t = mixup_targets(&[0, 2, 1], &draw, 3);
        let want = [0.75, 0.0, 0.25, 0.25, 0.0, 0.75, 0.0, 1.0, 0.0];
        for (a, b) in t.iter().zip(want) {
            assert!((f64::from(*a) - b).abs() < 1e-7, "{t:?}");
        }
    }

    #[test]
    fn bad_alpha_is_refused() {
        assert!(RegMixup::new(0.0).is_err());
        assert!(RegMixup::new(-1.0).is_err());
        assert!(RegMixup::new(f64::NAN).is_err());
        assert!(RegMixup::new(f64::INFINITY).is_err());
        assert!(RegMixup::new(0.2).is_ok());
    }
}
