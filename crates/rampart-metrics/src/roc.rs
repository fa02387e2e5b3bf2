//! Thresholds at a true-positive rate and the area under the ROC curve, shared by
//! the confidence-thresholded protocol and out-of-distribution detection.
//!
//! Scores are unit-agnostic: any ordered numbers (confidences, log-probabilities,
//! energies with the sign flipped). Higher means "more positive". NaN is refused,
//! ±∞ is allowed.

use crate::check;
use crate::error::Result;

/// The TPR of the CCAT protocol: 99 % of correctly classified held-out examples accepted.
pub const TPR_99: f64 = 0.99;

/// The TPR conventional in OOD detection (FPR at 95 % TPR).
pub const TPR_95: f64 = 0.95;

/// Relative slack on tpr·n before rounding up, so that 0.99 · 100 (which is not
/// exactly 99 in floating point) asks for 99 examples, not 100.
const COUNT_SLACK: f64 = 1e-9;

/// The threshold τ at which a fraction `tpr` of the positives are accepted (score ≥ τ).
///
/// Quantile convention: with n scores and k = ⌈tpr·n⌉ (clamped to [1, n]), τ is the
/// k-th largest score. In ascending order s₍₀₎ ≤ … ≤ s₍ₙ₋₁₎ this is s₍ₙ₋ₖ₎ =
/// s₍⌊(1−tpr)·n⌋₎, the index the CCAT reference code uses
/// (`sorted[floor(n · (1 − tpr))]`). So τ is the largest threshold that accepts
/// **at least** k = ⌈tpr·n⌉ positives; ties at τ are all accepted, so more may be.
/// Example: 100 distinct scores at tpr = 0.99 → τ is the 2nd smallest, 99 accepted.
///
/// positive_scores: (n,), n ≥ 1, no NaN; tpr in (0, 1].
pub fn threshold_at_tpr(positive_scores: &[f64], tpr: f64) -> Result<f64> {
    check::non_empty("positive_scores", positive_scores)?;
    check::no_nan("positive_scores", positive_scores)?;
    check::rate("tpr", tpr)?;
    let n = positive_scores.len();
    let wanted = tpr * n as f64;
    let k = ((wanted - COUNT_SLACK * wanted).ceil() as usize).clamp(1, n);
    let mut sorted = positive_scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    Ok(sorted[n - k])
}

/// [`threshold_at_tpr`] at [`TPR_99`].
pub fn threshold_at_tpr99(positive_scores: &[f64]) -> Result<f64> {
    threshold_at_tpr(positive_scores, TPR_99)
}

/// Area under the ROC curve: the probability that a random positive scores higher
/// than a random negative, ties counting ½ (the Mann–Whitney U statistic / (n₊·n₋)).
/// In [0, 1]; 0.5 is chance.
///
/// Exact (integer counting), O((n₊ + n₋) log n₋). Both arrays non-empty, no NaN.
pub fn roc_auc(positive_scores: &[f64], negative_scores: &[f64]) -> Result<f64> {
    check::non_empty("positive_scores", positive_scores)?;
    check::non_empty("negative_scores", negative_scores)?;
    check::no_nan("positive_scores", positive_scores)?;
    check::no_nan("negative_scores", negative_scores)?;
    let mut negatives = negative_scores.to_vec();
    negatives.sort_by(f64::total_cmp);
    // Twice the U statistic: 2 per negative strictly below, 1 per tie.
    let twice_u: u128 = positive_scores
        .iter()
        .map(|&s| {
            let below = negatives.partition_point(|&x| x < s);
            let at_or_below = negatives.partition_point(|&x| x <= s);
            (below + at_or_below) as u128
        })
        .sum();
    let pairs = positive_scores.len() as u128 * negatives.len() as u128;
    Ok(twice_u as f64 / (2 * pairs) as f64)
}

/// Fraction of `scores` at or above `tau` (accepted), for a non-empty array.
pub(crate) fn accepted_fraction(scores: &[f64], tau: f64) -> f64 {
    check::fraction(scores.iter().filter(|&&s| s >= tau).count(), scores.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MetricsError;

    #[test]
    fn threshold_at_99_tpr_on_a_small_list() -> Result<()> {
        // 100 distinct scores 0.01, 0.02, …, 1.00 (in scrambled order): k = ⌈99⌉ = 99,
        // τ = the 2nd smallest = 0.02, and exactly 99 scores are ≥ τ.
        let scores: Vec<f64> = (0..100)
            .map(|i| f64::from((i * 37) % 100 + 1) / 100.0)
            .collect();
        let tau = threshold_at_tpr99(&scores)?;
        assert_eq!(tau, 0.02);
        assert_eq!(scores.iter().filter(|&&s| s >= tau).count(), 99);
        // 5 scores at 99 %: k = ⌈4.95⌉ = 5 → the smallest, everything accepted.
        assert_eq!(threshold_at_tpr99(&[0.9, 0.5, 0.7, 0.8, 0.6])?, 0.5);
        // 20 scores at 95 %: 0.95·20 is 19 up to rounding → k = 19, τ = 2nd smallest.
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(threshold_at_tpr(&twenty, 0.95)?, 2.0);
        // 0.07 · 100 evaluates to 7.000000000000001; it still asks for 7 examples,
        // not 8: τ = the 7th largest of 1..=100 = 94.
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(threshold_at_tpr(&hundred, 0.07)?, 94.0);
        // tpr = 1 → the minimum; a tiny tpr still accepts one → the maximum.
        assert_eq!(threshold_at_tpr(&twenty, 1.0)?, 1.0);
        assert_eq!(threshold_at_tpr(&twenty, 1e-6)?, 20.0);
        Ok(())
    }

    #[test]
    fn threshold_accepts_every_tie() -> Result<()> {
        // k = ⌈0.5·4⌉ = 2 → the 2nd largest is 0.3, and all three 0.3's are accepted.
        let scores = [0.3, 0.9, 0.3, 0.3];
        let tau = threshold_at_tpr(&scores, 0.5)?;
        assert_eq!(tau, 0.3);
        assert_eq!(accepted_fraction(&scores, tau), 1.0);
        Ok(())
    }

    #[test]
    fn threshold_bad_input() {
        assert!(matches!(
            threshold_at_tpr(&[], 0.99),
            Err(MetricsError::Empty { .. })
        ));
        assert!(matches!(
            threshold_at_tpr(&[0.1, f64::NAN], 0.99),
            Err(MetricsError::NaN { index: 1, .. })
        ));
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(matches!(
                threshold_at_tpr(&[0.1], bad),
                Err(MetricsError::InvalidParameter { what: "tpr", .. })
            ));
        }
    }

    #[test]
    fn roc_auc_counts_ties_as_half() -> Result<()> {
        // Positives 0.8, 0.5, 0.5; negatives 0.5, 0.2. Pairs won: 0.8 beats both (2);
        // each 0.5 ties 0.5 (½) and beats 0.2 (1) → 1.5 each. (2 + 3) / 6 = 5/6.
        let auc = roc_auc(&[0.8, 0.5, 0.5], &[0.5, 0.2])?;
        assert!((auc - 5.0 / 6.0).abs() < 1e-15);
        // Perfect separation, perfect inversion, all tied.
        assert_eq!(roc_auc(&[2.0, 3.0], &[0.0, 1.0])?, 1.0);
        assert_eq!(roc_auc(&[0.0, 1.0], &[2.0, 3.0])?, 0.0);
        assert_eq!(roc_auc(&[1.0, 1.0], &[1.0])?, 0.5);
        // Infinite scores are ordered like any other.
        assert_eq!(roc_auc(&[f64::INFINITY], &[f64::NEG_INFINITY, 1e300])?, 1.0);
        Ok(())
    }

    #[test]
    fn roc_auc_matches_the_quadratic_definition() -> Result<()> {
        // Scores on a coarse grid so that ties are frequent.
        let pos: Vec<f64> = (0..57).map(|i| f64::from((i * 7) % 10)).collect();
        let neg: Vec<f64> = (0..43).map(|i| f64::from((i * 3) % 8)).collect();
        let mut won = 0.0;
        for p in &pos {
            for n in &neg {
                won += if p > n {
                    1.0
                } else if p == n {
                    0.5
                } else {
                    0.0
                };
            }
        }
        let expected = won / (pos.len() * neg.len()) as f64;
        assert!((roc_auc(&pos, &neg)? - expected).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn roc_auc_bad_input() {
        assert!(matches!(
            roc_auc(&[], &[1.0]),
            Err(MetricsError::Empty {
                what: "positive_scores"
            })
        ));
        assert!(matches!(
            roc_auc(&[1.0], &[]),
            Err(MetricsError::Empty {
                what: "negative_scores"
            })
        ));
        assert!(matches!(
            roc_auc(&[1.0], &[f64::NAN]),
            Err(MetricsError::NaN {
                what: "negative_scores",
                index: 0
            })
        ));
    }
}
