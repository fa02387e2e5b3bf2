//! RegMixup (Pinto et al., NeurIPS 2022): cross-entropy on the clean batch plus
//! cross-entropy on its mixup, mixup acting as a regulariser rather than replacing the
//! clean data.

use candle_core::{ModuleT, Tensor};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting};
use super::{
    cross_entropy, one_hot, soft_cross_entropy, BatchLoss, StatelessMethod, StepCost, TrainBatch,
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

    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let (images, labels) = (batch.images, batch.labels);
        let b = images.dim(0)?;
        let draw = self.draw(b, batch.rng)?;
        let mixed = mixup_images(images, &draw)?;
        let k = batch.model.spec().num_classes;
        let targets = batch.targets(mixup_targets(&batch.host_labels()?, &draw, k))?;
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
