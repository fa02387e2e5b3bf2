//! Rejection at test time: a confidence threshold τ below which a classifier abstains.

use candle_core::{ModuleT, Tensor, D};
use rampart_data::ImageDataset;
use rampart_models::Classifier;
use serde::{Deserialize, Serialize};

use crate::error::{DefenseError, Result};
use crate::predict::{predict, Predictions};

/// Metadata key under which a model file stores its [`ConfidenceThreshold`] (JSON).
pub const CONFIDENCE_THRESHOLD_KEY: &str = "confidence_threshold";

/// What a thresholded classifier does with one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Confident enough: this class.
    Predict(u32),
    /// Max softmax probability below τ: no answer.
    Abstain,
}

/// A confidence threshold τ: an input is accepted iff its max softmax probability is
/// ≥ τ. Picked on held-out data so that a fraction `tpr` of the correctly classified
/// held-out examples is accepted (the CCAT protocol: `tpr` = 0.99 on the last 1,000
/// test images), with [`rampart_metrics::threshold_at_tpr`]'s quantile convention.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceThreshold {
    /// τ in [0, 1].
    pub tau: f64,
    /// The true-positive rate it was picked at.
    pub tpr: f64,
    /// Held-out examples it was picked on.
    pub held_out_examples: usize,
    /// Of those, the correctly classified ones (the positives).
    pub held_out_correct: usize,
}

impl ConfidenceThreshold {
    /// τ from held-out predictions: the confidences of the correctly classified
    /// examples at `tpr`. Refuses predictions with no correct example.
    pub fn fit(held_out: &Predictions, tpr: f64) -> Result<Self> {
        let positives: Vec<f64> = held_out
            .labels
            .iter()
            .zip(&held_out.predicted)
            .zip(&held_out.confidence)
            .filter(|((y, p), _)| y == p)
            .map(|(_, &c)| f64::from(c))
            .collect();
        if positives.is_empty() {
            return Err(DefenseError::Config(format!(
                "cannot pick a confidence threshold: none of the {} held-out examples is \
                 classified correctly",
                held_out.len()
            )));
        }
        let tau = rampart_metrics::threshold_at_tpr(&positives, tpr)?;
        Ok(Self {
            tau,
            tpr,
            held_out_examples: held_out.len(),
            held_out_correct: positives.len(),
        })
    }

    /// Predicts `held_out` with `model` (eval mode) and fits τ on it.
    pub fn fit_on(
        model: &Classifier,
        held_out: &ImageDataset,
        batch_size: usize,
        tpr: f64,
    ) -> Result<Self> {
        Self::fit(&predict(model, held_out, batch_size)?, tpr)
    }

    /// Whether an input of this confidence is accepted (confidence ≥ τ).
    pub fn accepts(&self, confidence: f64) -> bool {
        confidence >= self.tau
    }

    /// Decisions on per-example predictions.
    pub fn decisions(&self, predictions: &Predictions) -> Vec<Decision> {
        predictions
            .predicted
            .iter()
            .zip(&predictions.confidence)
            .map(|(&p, &c)| self.decide(p, f64::from(c)))
            .collect()
    }

    /// Classifies xs (B, C, H, W) with any classifier (called as `forward_t(xs, false)`,
    /// returning (B, K) logits; a Rampart model is best passed as its frozen view,
    /// `Classifier::frozen`), abstaining below τ.
    pub fn classify(&self, model: &dyn ModuleT, xs: &Tensor) -> Result<Vec<Decision>> {
        let logits = model.forward_t(xs, false)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let confidence = probs.max(D::Minus1)?.to_vec1::<f32>()?;
        Ok(predicted
            .into_iter()
            .zip(confidence)
            .map(|(p, c)| self.decide(p, f64::from(c)))
            .collect())
    }

    fn decide(&self, predicted: u32, confidence: f64) -> Decision {
        if self.accepts(confidence) {
            Decision::Predict(predicted)
        } else {
            Decision::Abstain
        }
    }

    /// Stores the threshold in the model's metadata ([`CONFIDENCE_THRESHOLD_KEY`]); it
    /// is saved with the model.
    pub fn store(&self, model: &mut Classifier) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|e| DefenseError::Config(e.to_string()))?;
        model.set_metadata(CONFIDENCE_THRESHOLD_KEY, json)?;
        Ok(())
    }

    /// The threshold saved with a model, if any; refuses an unreadable one.
    pub fn stored(model: &Classifier) -> Result<Option<Self>> {
        let Some(json) = model.metadata().get(CONFIDENCE_THRESHOLD_KEY) else {
            return Ok(None);
        };
        let t: Self = serde_json::from_str(json).map_err(|e| {
            DefenseError::Config(format!(
                "model metadata `{CONFIDENCE_THRESHOLD_KEY}` is not a confidence threshold: {e}"
            ))
        })?;
        if !(0.0..=1.0).contains(&t.tau) {
            return Err(DefenseError::Config(format!(
                "model metadata `{CONFIDENCE_THRESHOLD_KEY}` has τ = {} outside [0, 1]",
                t.tau
            )));
        }
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::testutil::{batch, tiny_model};
    use crate::TestResult;

    fn held_out() -> Predictions {
        // 100 correct examples with confidences 0.01 … 1.00 and 3 wrong, more confident
        // ones that must not influence τ.
        let mut p = Predictions {
            num_classes: 2,
            labels: vec![],
            predicted: vec![],
            confidence: vec![],
            probs: vec![],
        };
        for i in 1..=100 {
            p.labels.push(0);
            p.predicted.push(0);
            p.confidence.push(i as f32 / 100.0);
        }
        for _ in 0..3 {
            p.labels.push(1);
            p.predicted.push(0);
            p.confidence.push(0.001);
        }
        p
    }

    /// At 99 % TPR of 100 correct examples τ is the 2nd smallest of their confidences,
    /// so 99 are accepted.
    #[test]
    fn picks_tau_at_99_percent_of_correct_examples() -> TestResult {
        let t = ConfidenceThreshold::fit(&held_out(), 0.99)?;
        assert_eq!(t.tau, f64::from(0.02f32));
        assert_eq!((t.held_out_examples, t.held_out_correct), (103, 100));
        let accepted = held_out()
            .confidence
            .iter()
            .take(100)
            .filter(|&&c| t.accepts(f64::from(c)))
            .count();
        assert_eq!(accepted, 99);
        let decisions = t.decisions(&held_out());
        assert_eq!(decisions[0], Decision::Abstain);
        assert_eq!(decisions[1], Decision::Predict(0));
        assert_eq!(decisions[102], Decision::Abstain);
        let none_correct = Predictions {
            labels: vec![1],
            predicted: vec![0],
            confidence: vec![0.9],
            ..held_out()
        };
        assert!(ConfidenceThreshold::fit(&none_correct, 0.99).is_err());
        Ok(())
    }

    /// A model abstains exactly where its confidence is below τ, and τ survives a save
    /// and a load.
    #[test]
    fn any_model_abstains_below_tau_and_tau_is_saved() -> TestResult {
        let mut model = tiny_model(3, 2);
        let (x, _) = batch(16, 3, 3);
        let logits = model.forward_t(&x, false)?;
        let conf = candle_nn::ops::softmax_last_dim(&logits)?
            .max(D::Minus1)?
            .to_vec1::<f32>()?;
        let mut sorted = conf.clone();
        sorted.sort_by(f32::total_cmp);
        let t = ConfidenceThreshold {
            tau: f64::from(sorted[8]),
            tpr: 0.99,
            held_out_examples: 0,
            held_out_correct: 0,
        };
        let decisions = t.classify(&model.frozen(), &x)?;
        for (d, c) in decisions.iter().zip(&conf) {
            assert_eq!(
                *d == Decision::Abstain,
                f64::from(*c) < t.tau,
                "{d:?} at {c}"
            );
        }
        assert_eq!(
            decisions
                .iter()
                .filter(|d| **d == Decision::Abstain)
                .count(),
            8
        );

        assert_eq!(ConfidenceThreshold::stored(&model)?, None);
        t.store(&mut model)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.safetensors");
        model.save(&path)?;
        let loaded = Classifier::load(&path, &candle_core::Device::Cpu)?;
        assert_eq!(ConfidenceThreshold::stored(&loaded)?, Some(t));
        model.set_metadata(CONFIDENCE_THRESHOLD_KEY, "{\"tau\": 2}")?;
        assert!(ConfidenceThreshold::stored(&model).is_err());
        Ok(())
    }
}
