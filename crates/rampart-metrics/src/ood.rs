//! Out-of-distribution detection: in-distribution inputs are the positives, and a
//! higher score means "more in-distribution" (max-softmax confidence, negative energy).

use crate::check;
use crate::error::Result;
use crate::roc::{accepted_fraction, roc_auc, threshold_at_tpr, TPR_95};

/// AUROC of separating in-distribution (positive) from out-of-distribution inputs,
/// ties counting ½; in [0, 1], 0.5 is chance. Both arrays non-empty, no NaN.
pub fn ood_auroc(in_scores: &[f64], out_scores: &[f64]) -> Result<f64> {
    roc_auc(in_scores, out_scores)
}

/// FPR at a given TPR: the fraction of out-of-distribution inputs scoring ≥ τ,
/// with τ = [`crate::threshold_at_tpr`]`(in_scores, tpr)` (so at least ⌈tpr·n⌉
/// in-distribution inputs are accepted; same quantile convention as CCAT's τ).
/// In [0, 1], lower is better. Both arrays non-empty, no NaN; tpr in (0, 1].
pub fn fpr_at_tpr(in_scores: &[f64], out_scores: &[f64], tpr: f64) -> Result<f64> {
    check::non_empty("out_scores", out_scores)?;
    check::no_nan("out_scores", out_scores)?;
    let tau = threshold_at_tpr(in_scores, tpr)?;
    Ok(accepted_fraction(out_scores, tau))
}

/// [`fpr_at_tpr`] at 95 % TPR, the usual OOD number.
pub fn fpr_at_tpr95(in_scores: &[f64], out_scores: &[f64]) -> Result<f64> {
    fpr_at_tpr(in_scores, out_scores, TPR_95)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MetricsError;

    #[test]
    fn ood_by_hand() -> Result<()> {
        // In 0.9, 0.8, 0.7, 0.6; out 0.85, 0.65, 0.5, 0.1.
        // AUROC: 0.9 beats 4, 0.8 beats 3, 0.7 beats 3, 0.6 beats 2 → 12/16.
        let (in_s, out_s) = ([0.9, 0.8, 0.7, 0.6], [0.85, 0.65, 0.5, 0.1]);
        assert_eq!(ood_auroc(&in_s, &out_s)?, 0.75);
        // TPR 75 %: k = 3 → τ = 0.7; out ≥ 0.7: only 0.85 → 1/4.
        assert_eq!(fpr_at_tpr(&in_s, &out_s, 0.75)?, 0.25);
        // TPR 95 %: k = ⌈3.8⌉ = 4 → τ = 0.6; out ≥ 0.6: 0.85, 0.65 → 2/4.
        assert_eq!(fpr_at_tpr95(&in_s, &out_s)?, 0.5);
        Ok(())
    }

    #[test]
    fn ood_bad_input() {
        assert!(matches!(
            fpr_at_tpr95(&[0.5], &[]),
            Err(MetricsError::Empty { what: "out_scores" })
        ));
        assert!(matches!(
            fpr_at_tpr95(&[], &[0.5]),
            Err(MetricsError::Empty {
                what: "positive_scores"
            })
        ));
        assert!(matches!(
            fpr_at_tpr(&[0.5], &[f64::NAN], 0.95),
            Err(MetricsError::NaN {
                what: "out_scores",
                ..
            })
        ));
        assert!(matches!(
            fpr_at_tpr(&[0.5], &[0.5], 1.5),
            Err(MetricsError::InvalidParameter { what: "tpr", .. })
        ));
        assert!(matches!(
            ood_auroc(&[0.5], &[]),
            Err(MetricsError::Empty { .. })
        ));
    }
}
