//! Input checks shared by every metric. Each returns the first problem found.

use crate::error::{MetricsError, Result};

/// Largest |Σ_k p_k − 1| accepted for a probability row. Loose enough for f32
/// softmax outputs over thousands of classes, tight enough to catch logits or
/// unnormalised scores passed by mistake.
pub const PROBABILITY_SUM_TOLERANCE: f64 = 1e-4;

pub(crate) fn non_empty<T>(what: &'static str, xs: &[T]) -> Result<()> {
    if xs.is_empty() {
        Err(MetricsError::Empty { what })
    } else {
        Ok(())
    }
}

pub(crate) fn same_len<A, B>(
    left: &'static str,
    a: &[A],
    right: &'static str,
    b: &[B],
) -> Result<()> {
    if a.len() == b.len() {
        Ok(())
    } else {
        Err(MetricsError::LengthMismatch {
            left,
            left_len: a.len(),
            right,
            right_len: b.len(),
        })
    }
}

/// No NaN; ±∞ allowed (scores only need to be ordered).
pub(crate) fn no_nan(what: &'static str, xs: &[f64]) -> Result<()> {
    match xs.iter().position(|x| x.is_nan()) {
        Some(index) => Err(MetricsError::NaN { what, index }),
        None => Ok(()),
    }
}

/// Every entry finite.
pub(crate) fn finite(what: &'static str, xs: &[f64]) -> Result<()> {
    no_nan(what, xs)?;
    match xs.iter().position(|x| x.is_infinite()) {
        Some(index) => Err(MetricsError::OutOfRange {
            what,
            index,
            value: xs[index],
            expected: "the finite numbers",
        }),
        None => Ok(()),
    }
}

/// Every entry in [0, 1].
pub(crate) fn unit_interval(what: &'static str, xs: &[f64]) -> Result<()> {
    no_nan(what, xs)?;
    match xs.iter().position(|x| !(0.0..=1.0).contains(x)) {
        Some(index) => Err(MetricsError::OutOfRange {
            what,
            index,
            value: xs[index],
            expected: "[0, 1]",
        }),
        None => Ok(()),
    }
}

/// A rate parameter (TPR) in (0, 1].
pub(crate) fn rate(what: &'static str, value: f64) -> Result<()> {
    if value > 0.0 && value <= 1.0 {
        Ok(())
    } else {
        Err(MetricsError::InvalidParameter {
            what,
            value,
            expected: "a rate in (0, 1]",
        })
    }
}

/// A threshold that is not NaN (±∞ accept everything / nothing, which is well defined).
pub(crate) fn threshold(what: &'static str, value: f64) -> Result<()> {
    if value.is_nan() {
        Err(MetricsError::InvalidParameter {
            what,
            value,
            expected: "a number (not NaN)",
        })
    } else {
        Ok(())
    }
}

/// Labels below `num_classes`.
pub(crate) fn labels_in_range(labels: &[u32], num_classes: usize) -> Result<()> {
    match labels.iter().position(|&l| l as usize >= num_classes) {
        Some(index) => Err(MetricsError::LabelOutOfRange {
            index,
            label: labels[index],
            num_classes,
        }),
        None => Ok(()),
    }
}

/// Shape checks for a non-empty row-major N×K matrix with K ≥ `min_classes`; returns N.
pub(crate) fn whole_rows(
    what: &'static str,
    len: usize,
    num_classes: usize,
    min_classes: usize,
) -> Result<usize> {
    if num_classes < min_classes.max(1) {
        return Err(MetricsError::TooFewClasses {
            needed: min_classes.max(1),
            got: num_classes,
        });
    }
    if len == 0 {
        return Err(MetricsError::Empty { what });
    }
    if !len.is_multiple_of(num_classes) {
        return Err(MetricsError::RaggedRows {
            what,
            len,
            num_classes,
        });
    }
    Ok(len / num_classes)
}

/// Shape checks for a row-major N×K matrix aligned with N labels; returns N.
pub(crate) fn rows_with_labels(
    what: &'static str,
    len: usize,
    labels: &[u32],
    num_classes: usize,
    min_classes: usize,
) -> Result<usize> {
    let n = whole_rows(what, len, num_classes, min_classes)?;
    if n != labels.len() {
        return Err(MetricsError::LengthMismatch {
            left: what,
            left_len: n,
            right: "labels",
            right_len: labels.len(),
        });
    }
    labels_in_range(labels, num_classes)?;
    Ok(n)
}

/// Converts a row-major N×K probability matrix to f64, checking that every entry
/// is in [0, 1] and every row sums to 1 within [`PROBABILITY_SUM_TOLERANCE`].
pub(crate) fn probabilities<P: Copy + Into<f64>>(
    what: &'static str,
    probs: &[P],
    num_classes: usize,
) -> Result<Vec<f64>> {
    let p: Vec<f64> = probs.iter().map(|&x| x.into()).collect();
    no_nan(what, &p)?;
    if let Some(index) = p
        .iter()
        .position(|x| !(0.0..=1.0 + PROBABILITY_SUM_TOLERANCE).contains(x))
    {
        return Err(MetricsError::OutOfRange {
            what,
            index,
            value: p[index],
            expected: "[0, 1]",
        });
    }
    for (row, chunk) in p.chunks_exact(num_classes).enumerate() {
        let sum: f64 = chunk.iter().sum();
        if (sum - 1.0).abs() > PROBABILITY_SUM_TOLERANCE {
            return Err(MetricsError::NotNormalised {
                what,
                row,
                sum,
                tolerance: PROBABILITY_SUM_TOLERANCE,
            });
        }
    }
    Ok(p)
}

/// Fraction `count / total` for a total known to be non-zero.
pub(crate) fn fraction(count: usize, total: usize) -> f64 {
    count as f64 / total as f64
}
