//! Clean evaluation: per-example predictions, confidences and class probabilities.

use std::path::Path;

use candle_core::{ModuleT, Tensor, D};
use rampart_data::ImageDataset;
use rampart_models::Classifier;
use serde::{Deserialize, Serialize};

use crate::error::{DefenseError, Result};
use rampart_fs::write_atomic;

/// A model's outputs on a data set, in the data set's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Predictions {
    /// Number of classes K.
    pub num_classes: usize,
    /// True label of each example.
    pub labels: Vec<u32>,
    /// Predicted class (first arg-max of the logits) of each example.
    pub predicted: Vec<u32>,
    /// Confidence of each example: its largest softmax probability.
    pub confidence: Vec<f32>,
    /// Softmax probabilities, row-major N×K. Not part of the JSON file (see
    /// [`Predictions::save_probs`]).
    #[serde(skip)]
    pub probs: Vec<f32>,
}

impl Predictions {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of correctly classified examples.
    pub fn correct(&self) -> usize {
        self.labels
            .iter()
            .zip(&self.predicted)
            .filter(|(l, p)| l == p)
            .count()
    }

    /// Fraction of correctly classified examples, in [0, 1] (0 for no examples).
    pub fn accuracy(&self) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        self.correct() as f64 / self.len() as f64
    }

    /// 1 − accuracy.
    pub fn error(&self) -> f64 {
        1.0 - self.accuracy()
    }

    /// Writes `{num_classes, labels, predicted, confidence}` as JSON, atomically.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(self).map_err(|e| DefenseError::Config(e.to_string()))?;
        Ok(write_atomic(path, &json)?)
    }

    /// Writes the probabilities as safetensors, atomically: `probs` (N, K) f32 and
    /// `labels` (N,) u32.
    pub fn save_probs(&self, path: &Path) -> Result<()> {
        let cpu = candle_core::Device::Cpu;
        let probs = Tensor::from_slice(&self.probs, (self.len(), self.num_classes), &cpu)?;
        let labels = Tensor::from_slice(&self.labels, self.len(), &cpu)?;
        let bytes = safetensors::serialize([("probs", &probs), ("labels", &labels)], None)
            .map_err(|e| DefenseError::Config(format!("cannot serialise probabilities: {e}")))?;
        Ok(write_atomic(path, &bytes)?)
    }
}

/// Runs `model` in eval mode over `dataset` in batches of `batch_size` (in data-set
/// order, no augmentation) and collects its predictions.
pub fn predict(
    model: &Classifier,
    dataset: &ImageDataset,
    batch_size: usize,
) -> Result<Predictions> {
    if batch_size == 0 {
        return Err(DefenseError::Config(
            "evaluation batch size must be at least 1".into(),
        ));
    }
    let k = model.spec().num_classes;
    if dataset.num_classes() > k {
        return Err(DefenseError::Config(format!(
            "the data set has {} classes but the model only {k}",
            dataset.num_classes()
        )));
    }
    let n = dataset.len();
    let mut out = Predictions {
        num_classes: k,
        labels: dataset.labels().to_vec(),
        predicted: Vec::with_capacity(n),
        confidence: Vec::with_capacity(n),
        probs: Vec::with_capacity(n * k),
    };
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(batch_size) {
        let (images, _) = dataset.batch_tensors(chunk, model.device())?;
        let logits = model.frozen().forward_t(&images, false)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        out.predicted
            .extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
        out.confidence
            .extend(probs.max(D::Minus1)?.to_vec1::<f32>()?);
        out.probs.extend(probs.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_files() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let p = Predictions {
            num_classes: 2,
            labels: vec![0, 1, 1, 0],
            predicted: vec![0, 1, 0, 0],
            confidence: vec![0.9, 0.6, 0.7, 0.5],
            probs: vec![0.9, 0.1, 0.4, 0.6, 0.7, 0.3, 0.5, 0.5],
        };
        assert_eq!(p.correct(), 3);
        assert!((p.accuracy() - 0.75).abs() < 1e-12 && (p.error() - 0.25).abs() < 1e-12);
        let dir = tempfile::tempdir()?;
        p.save_json(&dir.path().join("predictions.json"))?;
        let back: Predictions =
            serde_json::from_slice(&std::fs::read(dir.path().join("predictions.json"))?)?;
        assert_eq!(back.predicted, p.predicted);
        assert_eq!(back.confidence, p.confidence);
        p.save_probs(&dir.path().join("probs.safetensors"))?;
        let t = candle_core::safetensors::load(
            dir.path().join("probs.safetensors"),
            &candle_core::Device::Cpu,
        )?;
        assert_eq!(t["probs"].dims(), &[4, 2]);
        assert_eq!(t["labels"].to_vec1::<u32>()?, p.labels);
        Ok(())
    }
}
