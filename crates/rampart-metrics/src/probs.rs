//! Per-example quantities read off a row-major N×K probability matrix: the
//! prediction, its confidence max_k p_k, and the wrong-class confidence max_{k≠y} p_k.

use crate::check;
use crate::error::Result;

/// Top-1 prediction and confidence of every row.
///
/// probs: (N, K) row-major, each row a probability vector (checked: entries in
/// [0, 1], sum 1 within [`crate::PROBABILITY_SUM_TOLERANCE`]). Ties go to the
/// lowest class index, as `argmax` does in torch and numpy.
///
/// Returns `(predictions, confidences)`, each of length N, confidence = max_k p_k.
pub fn predictions_and_confidences<P: Copy + Into<f64>>(
    probs: &[P],
    num_classes: usize,
) -> Result<(Vec<u32>, Vec<f64>)> {
    check::whole_rows("probs", probs.len(), num_classes, 1)?;
    let p = check::probabilities("probs", probs, num_classes)?;
    Ok(p.chunks_exact(num_classes).map(argmax).unzip())
}

/// Wrong-class confidence max_{k≠y} p_k of every row: the objective of the
/// confidence attack, and the quantity the worst case over attacks maximises.
///
/// probs: (N, K) row-major probability rows (checked); labels: (N,) below K; K ≥ 2.
pub fn wrong_class_confidences<P: Copy + Into<f64>>(
    probs: &[P],
    labels: &[u32],
    num_classes: usize,
) -> Result<Vec<f64>> {
    check::rows_with_labels("probs", probs.len(), labels, num_classes, 2)?;
    let p = check::probabilities("probs", probs, num_classes)?;
    Ok(p.chunks_exact(num_classes)
        .zip(labels)
        .map(|(row, &y)| wrong_class_max(row, y as usize))
        .collect())
}

/// (index, value) of the largest entry; the first on ties. `row` is non-empty.
pub(crate) fn argmax(row: &[f64]) -> (u32, f64) {
    let mut best = (0u32, row[0]);
    for (k, &v) in row.iter().enumerate().skip(1) {
        if v > best.1 {
            best = (k as u32, v);
        }
    }
    best
}

/// max_{k≠y} row[k]; `row` has at least two entries.
pub(crate) fn wrong_class_max(row: &[f64], y: usize) -> f64 {
    row.iter()
        .enumerate()
        .filter(|&(k, _)| k != y)
        .map(|(_, &v)| v)
        .fold(f64::NEG_INFINITY, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MetricsError;

    #[test]
    fn predictions_confidences_and_wrong_class_confidences() -> Result<()> {
        // Row 0: argmax 1 (0.6); row 1: tie between 0 and 2 at 0.4 → class 0.
        let probs = [0.1f32, 0.6, 0.3, 0.4, 0.2, 0.4];
        let (pred, conf) = predictions_and_confidences(&probs, 3)?;
        assert_eq!(pred, vec![1, 0]);
        assert!((conf[0] - 0.6).abs() < 1e-7 && (conf[1] - 0.4).abs() < 1e-7);
        // Labels 1 and 2: max over the other classes is 0.3 and 0.4.
        let wrong = wrong_class_confidences(&probs, &[1, 2], 3)?;
        assert!((wrong[0] - 0.3).abs() < 1e-7 && (wrong[1] - 0.4).abs() < 1e-7);
        Ok(())
    }

    #[test]
    fn bad_probability_rows_are_refused() {
        assert!(matches!(
            predictions_and_confidences(&[0.5f64, 0.6], 2),
            Err(MetricsError::NotNormalised { row: 0, .. })
        ));
        assert!(matches!(
            predictions_and_confidences(&[1.5f64, -0.5], 2),
            Err(MetricsError::OutOfRange { index: 0, .. })
        ));
        assert!(matches!(
            predictions_and_confidences(&[0.5f64, 0.5, 1.0], 2),
            Err(MetricsError::RaggedRows { len: 3, .. })
        ));
        assert!(matches!(
            predictions_and_confidences::<f64>(&[], 2),
            Err(MetricsError::Empty { what: "probs" })
        ));
        assert!(matches!(
            wrong_class_confidences(&[1.0f64], &[0], 1),
            Err(MetricsError::TooFewClasses { needed: 2, got: 1 })
        ));
        assert!(matches!(
            wrong_class_confidences(&[0.5f64, 0.5], &[2], 2),
            Err(MetricsError::LabelOutOfRange { label: 2, .. })
        ));
    }
}
