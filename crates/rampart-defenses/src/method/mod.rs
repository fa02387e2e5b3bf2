//! Training methods: how a batch becomes a loss.
//!
//! A [`TrainingMethod`] sees the model, a batch and a seeded RNG and returns a
//! [`BatchLoss`]. It decides in which mode it calls the model: a method that attacks
//! first (adversarial training, CCAT) runs its attack with `forward_t(x, false)` and
//! computes the loss with `forward_t(x', true)`. The training loop owns everything
//! else: batching, the optimiser step, the schedule, evaluation and checkpoints.

mod normal;

pub use normal::{cross_entropy, Normal};

use candle_core::Tensor;
use rampart_models::Classifier;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// What a method made of one batch.
#[derive(Debug)]
pub struct BatchLoss {
    /// The scalar loss to minimise, differentiable with respect to the model's
    /// trainable variables.
    pub loss: Tensor,
    /// Logits (M, K) the running training accuracy is measured on: for normal training
    /// the batch's own logits, for adversarial methods those of the inputs trained on.
    pub logits: Tensor,
    /// Labels (M,) u32 matching `logits`.
    pub labels: Tensor,
}

/// Turns a batch into a loss; one implementation per training method.
///
/// **Invariant:** everything random a method does draws from `rng`, which the loop
/// seeds from (seed, epoch), so a run resumed at an epoch boundary repeats exactly.
pub trait TrainingMethod {
    /// Short name used in files and results (`"normal"`, `"at"`, `"ccat"`, …).
    fn name(&self) -> &'static str;

    /// The method's settings as JSON, recorded in checkpoints (a resumed run must use
    /// the same settings) and in the run's `config.json`.
    fn settings(&self) -> serde_json::Value;

    /// The loss of one batch: images (B, C, H, W) within the model's bounds, labels (B,)
    /// u32. Leaves the model's train/eval choice to each `forward_t` call.
    fn loss(
        &self,
        model: &Classifier,
        images: &Tensor,
        labels: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<BatchLoss>;
}
