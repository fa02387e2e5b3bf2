//! Normal training: cross-entropy on the clean batch.

use candle_core::{ModuleT, Tensor};
use rampart_models::kernels::xent;
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting};
use super::{BatchLoss, StatelessMethod, TrainBatch};
use crate::error::{DefenseError, Result};

/// Cross-entropy on the clean, augmented batch with the model in training mode,
/// optionally with label smoothing.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normal {
    /// Label smoothing s ∈ [0, 1): the target is (1 − s)·onehot(y) + s·uniform,
    /// so the loss is (1 − s)·CE(y) + s·mean_k(−log p_k). 0 = plain cross-entropy.
    pub label_smoothing: f64,
}

impl Normal {
    /// Plain cross-entropy.
    pub fn new() -> Self {
        Self {
            label_smoothing: 0.0,
        }
    }

    /// Cross-entropy against smoothed labels; refuses s outside [0, 1).
    pub fn with_label_smoothing(label_smoothing: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&label_smoothing) {
            return Err(DefenseError::Config(format!(
                "label smoothing must lie in [0, 1), got {label_smoothing}"
            )));
        }
        Ok(Self { label_smoothing })
    }
}

impl Default for Normal {
    fn default() -> Self {
        Self::new()
    }
}

/// Mean cross-entropy of logits (B, K) against labels (B,) u32, with label smoothing s:
/// one fused op each way for f32 logits ([`rampart_models::kernels::xent`]).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    Ok(xent::cross_entropy(
        logits,
        xent::Targets::Labels {
            labels,
            smoothing: label_smoothing,
        },
    )?)
}

impl MethodSettings for Normal {
    const NAME: &'static str = "normal";
    const ACCEPTS: &'static [Setting] = &[Setting::LabelSmoothing];

    /// Plain cross-entropy.
    fn defaults() -> Self {
        Self::new()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        Self::with_label_smoothing(values.label_smoothing.unwrap_or(self.label_smoothing))
    }
}

impl StatelessMethod for Normal {
    /// Nothing: the loss of the batch as it is.
    fn draws(&self) -> super::StepDraws {
        super::StepDraws::Nothing
    }

    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let logits = batch.model.forward_t(batch.images, true)?;
        let loss = cross_entropy(&logits, batch.labels, self.label_smoothing)?;
        Ok(BatchLoss::of_batch(loss, logits, batch.labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestResult;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_hand_computation() -> TestResult {
        // logits (0, ln 3): p = (1/4, 3/4).
        let logits = Tensor::new(&[[0.0f32, 3f32.ln()], [0.0, 3f32.ln()]], &Device::Cpu)?;
        let labels = Tensor::new(&[0u32, 1], &Device::Cpu)?;
        let plain = cross_entropy(&logits, &labels, 0.0)?.to_scalar::<f32>()?;
        let want = (-(0.25f64.ln()) - 0.75f64.ln()) / 2.0;
        assert!((f64::from(plain) - want).abs() < 1e-6, "{plain} vs {want}");
        // s = 0.2: (1 − s)·CE + s·(−(ln ¼ + ln ¾)/2), the same for both rows.
        let smooth = cross_entropy(&logits, &labels, 0.2)?.to_scalar::<f32>()?;
        let uniform = -(0.25f64.ln() + 0.75f64.ln()) / 2.0;
        let want = 0.8 * want + 0.2 * uniform;
        assert!(
            (f64::from(smooth) - want).abs() < 1e-6,
            "{smooth} vs {want}"
        );
        Ok(())
    }

    #[test]
    fn refuses_bad_smoothing() {
        assert!(Normal::with_label_smoothing(1.0).is_err());
        assert!(Normal::with_label_smoothing(-0.1).is_err());
        assert!(Normal::with_label_smoothing(f64::NAN).is_err());
        assert!(Normal::with_label_smoothing(0.1).is_ok());
    }
}
