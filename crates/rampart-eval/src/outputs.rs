//! Model outputs pulled to the host: logits of batches and data sets, and the
//! per-example quantities every metric needs.

use candle_core::{DType, Device, ModuleT, Tensor};
use indicatif::ProgressBar;
use rampart_data::ImageDataset;

use crate::error::{EvalError, Result};

/// Logits (B, K) of `xs` (B, ...) as row-major f32 on the host, and K.
/// The model is called as `forward_t(xs, false)`.
pub(crate) fn batch_logits(model: &dyn ModuleT, xs: &Tensor) -> Result<(Vec<f32>, usize)> {
    let out = model.forward_t(xs, false)?;
    let (b, k) = out.dims2().map_err(|_| {
        EvalError::Config(format!(
            "the model must return (B, K) logits, got shape {:?}",
            out.dims()
        ))
    })?;
    if b != xs.dim(0)? {
        return Err(EvalError::Config(format!(
            "the model returned {b} rows of logits for {} inputs",
            xs.dim(0)?
        )));
    }
    let values = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(EvalError::Config(format!(
            "the model returned a non-finite logit ({}) for input {}",
            values[i],
            i / k.max(1)
        )));
    }
    Ok((values, k))
}

/// Logits of every example of `ds` (N, K) row-major, in batches of `batch_size`; K.
/// The model is called as `forward_t(xs, false)`.
pub fn logits_of(
    model: &dyn ModuleT,
    ds: &ImageDataset,
    batch_size: usize,
    device: &Device,
) -> Result<(Vec<f32>, usize)> {
    dataset_logits(model, ds, batch_size, device, &ProgressBar::hidden())
}

/// Logits of every example of `ds` (N, K) row-major, in batches; K.
pub(crate) fn dataset_logits(
    model: &dyn ModuleT,
    ds: &ImageDataset,
    batch_size: usize,
    device: &Device,
    progress: &ProgressBar,
) -> Result<(Vec<f32>, usize)> {
    let mut all = Vec::new();
    let mut k = 0;
    for start in (0..ds.len()).step_by(batch_size.max(1)) {
        let idx: Vec<usize> = (start..(start + batch_size).min(ds.len())).collect();
        let (xs, _) = ds.batch_tensors(&idx, device)?;
        let (values, classes) = batch_logits(model, &xs)?;
        k = classes;
        all.extend(values);
        progress.inc(idx.len() as u64);
    }
    Ok((all, k))
}

/// What the metrics need per example, from logits (N, K) and labels (N,).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Outcomes {
    /// softmax(logits) in f64, row-major.
    pub probs: Vec<f64>,
    /// First arg-max.
    pub predicted: Vec<u32>,
    /// predicted == label.
    pub correct: Vec<bool>,
    /// max_k p_k.
    pub confidence: Vec<f64>,
    /// max_{k≠y} p_k.
    pub wrong_class_confidence: Vec<f64>,
}

impl Outcomes {
    /// The examples `rows` of these outcomes.
    pub(crate) fn slice(&self, rows: std::ops::Range<usize>) -> Outcomes {
        let k = self.probs.len() / self.correct.len().max(1);
        Outcomes {
            probs: self.probs[rows.start * k..rows.end * k].to_vec(),
            predicted: self.predicted[rows.clone()].to_vec(),
            correct: self.correct[rows.clone()].to_vec(),
            confidence: self.confidence[rows.clone()].to_vec(),
            wrong_class_confidence: self.wrong_class_confidence[rows].to_vec(),
        }
    }

    pub(crate) fn from_logits(logits: &[f32], labels: &[u32], k: usize) -> Result<Outcomes> {
        let probs = rampart_metrics::softmax_with_temperature(logits, k, 1.0)
            .map_err(EvalError::metric("softmax of the logits"))?;
        let (predicted, confidence) = rampart_metrics::predictions_and_confidences(&probs, k)
            .map_err(EvalError::metric("predictions"))?;
        let wrong_class_confidence = if k >= 2 {
            rampart_metrics::wrong_class_confidences(&probs, labels, k)
                .map_err(EvalError::metric("wrong-class confidences"))?
        } else {
            vec![0.0; labels.len()]
        };
        let correct = predicted.iter().zip(labels).map(|(p, l)| p == l).collect();
        Ok(Outcomes {
            probs,
            predicted,
            correct,
            confidence,
            wrong_class_confidence,
        })
    }
}
