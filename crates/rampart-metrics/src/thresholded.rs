//! The confidence-thresholded protocol of CCAT (Stutz, Hein, Schiele 2020).
//!
//! A model rejects inputs whose confidence is below τ. τ is picked on held-out
//! data so that 99 % of the correctly classified held-out examples are accepted
//! ([`crate::threshold_at_tpr`]). Errors are then counted among accepted inputs only.
//!
//! Confidences are the max-softmax probability in the protocol, but nothing here
//! needs them to be in [0, 1]: any score where higher means "more confident" works,
//! as long as τ was picked on the same score. NaN is refused.

use serde::{Deserialize, Serialize};

use crate::check;
use crate::error::{MetricsError, Result};
use crate::roc::{roc_auc, threshold_at_tpr, TPR_99};

/// Err@τ: the clean error among accepted examples, #(wrong ∧ conf ≥ τ) / #(conf ≥ τ), in [0, 1].
///
/// correct, confidence: (N,), N ≥ 1. [`MetricsError::Undefined`] if τ accepts nothing.
pub fn err_at_threshold(correct: &[bool], confidence: &[f64], tau: f64) -> Result<f64> {
    check::non_empty("correct", correct)?;
    check::same_len("correct", correct, "confidence", confidence)?;
    check::no_nan("confidence", confidence)?;
    check::threshold("tau", tau)?;
    let (mut wrong, mut accepted) = (0usize, 0usize);
    for (&c, &p) in correct.iter().zip(confidence) {
        if p >= tau {
            accepted += 1;
            wrong += usize::from(!c);
        }
    }
    accepted_rate(wrong, accepted, "Err@τ", "τ rejects every example")
}

/// RErr@τ, the robust error among accepted examples, in [0, 1]; exactly
///
/// RErr@τ = Σᵢ max(1[clean wrong ∧ conf ≥ τ], 1[adv wrong ∧ adv conf ≥ τ])
///        / Σᵢ max(1[clean conf ≥ τ], 1[adv conf ≥ τ]).
///
/// An example counts once, as an error if either of its accepted versions is
/// wrong; it is left out only if both versions are rejected.
///
/// All four arrays (N,), N ≥ 1; pass the per-example worst case over attacks as
/// the adversarial arrays ([`crate::WorstCase`]). [`MetricsError::Undefined`] if
/// τ rejects every clean and adversarial example.
pub fn rerr_at_threshold(
    clean_correct: &[bool],
    clean_confidence: &[f64],
    adversarial_correct: &[bool],
    adversarial_confidence: &[f64],
    tau: f64,
) -> Result<f64> {
    let test = PairedOutcomes {
        clean_correct,
        clean_confidence,
        adversarial_correct,
        adversarial_confidence,
    };
    test.check()?;
    check::threshold("tau", tau)?;
    let (mut wrong, mut accepted) = (0usize, 0usize);
    for i in 0..clean_correct.len() {
        let clean_in = clean_confidence[i] >= tau;
        let adv_in = adversarial_confidence[i] >= tau;
        accepted += usize::from(clean_in || adv_in);
        wrong +=
            usize::from((!clean_correct[i] && clean_in) || (!adversarial_correct[i] && adv_in));
    }
    accepted_rate(
        wrong,
        accepted,
        "RErr@τ",
        "τ rejects every clean and adversarial example",
    )
}

/// `wrong / accepted`, or [`MetricsError::Undefined`] (`what`, `reason`) when nothing
/// is accepted.
fn accepted_rate(
    wrong: usize,
    accepted: usize,
    what: &'static str,
    reason: &'static str,
) -> Result<f64> {
    if accepted == 0 {
        return Err(MetricsError::Undefined { what, reason });
    }
    Ok(check::fraction(wrong, accepted))
}

/// FPR@τ: the fraction of successful adversarial examples that τ fails to reject, in [0, 1].
///
/// Negatives are the adversarial examples of clean-correct examples that are
/// misclassified (clean correct ∧ adv wrong); FPR@τ = #(negatives with adv conf ≥ τ)
/// / #negatives. This is the textbook FPR; the CCAT reference code divides by the
/// number of attacked examples N instead, which gives smaller numbers whenever the
/// attack does not always succeed.
///
/// All arrays (N,), N ≥ 1. [`MetricsError::Undefined`] if no attack succeeded.
pub fn fpr_at_threshold(
    clean_correct: &[bool],
    adversarial_correct: &[bool],
    adversarial_confidence: &[f64],
    tau: f64,
) -> Result<f64> {
    check::non_empty("clean_correct", clean_correct)?;
    check::same_len(
        "clean_correct",
        clean_correct,
        "adversarial_correct",
        adversarial_correct,
    )?;
    check::same_len(
        "clean_correct",
        clean_correct,
        "adversarial_confidence",
        adversarial_confidence,
    )?;
    check::no_nan("adversarial_confidence", adversarial_confidence)?;
    check::threshold("tau", tau)?;
    let negatives = successful_adversarial_confidences(
        clean_correct,
        adversarial_correct,
        adversarial_confidence,
    );
    if negatives.is_empty() {
        return Err(no_successful_attack("FPR@τ"));
    }
    Ok(crate::roc::accepted_fraction(&negatives, tau))
}

/// ROC AUC of confidence as a detector of successful adversarial examples, in [0, 1].
///
/// Positives: clean confidences of correctly classified clean examples. Negatives:
/// adversarial confidences where clean correct ∧ adv wrong (as in [`fpr_at_threshold`]).
/// The CCAT reference code uses *all* clean examples as positives; this follows the
/// paper's wording (correctly classified). [`MetricsError::Undefined`] if there is
/// no correctly classified example or no successful attack.
pub fn adversarial_roc_auc(
    clean_correct: &[bool],
    clean_confidence: &[f64],
    adversarial_correct: &[bool],
    adversarial_confidence: &[f64],
) -> Result<f64> {
    let test = PairedOutcomes {
        clean_correct,
        clean_confidence,
        adversarial_correct,
        adversarial_confidence,
    };
    test.check()?;
    let positives = confidences_of_correct(clean_correct, clean_confidence)?;
    if positives.is_empty() {
        return Err(MetricsError::Undefined {
            what: "the adversarial ROC AUC",
            reason: "no clean example is classified correctly",
        });
    }
    let negatives = successful_adversarial_confidences(
        clean_correct,
        adversarial_correct,
        adversarial_confidence,
    );
    if negatives.is_empty() {
        return Err(no_successful_attack("the adversarial ROC AUC"));
    }
    roc_auc(&positives, &negatives)
}

/// The confidences of the correctly classified examples (what τ is picked on).
/// correct, confidence: (N,); the result may be empty.
pub fn confidences_of_correct(correct: &[bool], confidence: &[f64]) -> Result<Vec<f64>> {
    check::same_len("correct", correct, "confidence", confidence)?;
    Ok(correct
        .iter()
        .zip(confidence)
        .filter(|(&c, _)| c)
        .map(|(_, &p)| p)
        .collect())
}

fn successful_adversarial_confidences(
    clean_correct: &[bool],
    adversarial_correct: &[bool],
    adversarial_confidence: &[f64],
) -> Vec<f64> {
    (0..clean_correct.len())
        .filter(|&i| clean_correct[i] && !adversarial_correct[i])
        .map(|i| adversarial_confidence[i])
        .collect()
}

fn no_successful_attack(what: &'static str) -> MetricsError {
    MetricsError::Undefined {
        what,
        reason: "no adversarial example of a correctly classified example is misclassified",
    }
}

/// Per-example clean and adversarial outcomes of one test split, aligned (N,) each.
/// The adversarial arrays hold the per-example worst case over attacks.
#[derive(Clone, Copy, Debug)]
pub struct PairedOutcomes<'a> {
    /// Whether each clean example is classified correctly.
    pub clean_correct: &'a [bool],
    /// Confidence (max_k p_k) on each clean example.
    pub clean_confidence: &'a [f64],
    /// Whether each adversarial example is classified correctly.
    pub adversarial_correct: &'a [bool],
    /// Confidence on each adversarial example.
    pub adversarial_confidence: &'a [f64],
}

impl PairedOutcomes<'_> {
    /// Checks lengths (equal, non-zero) and that no confidence is NaN; returns N.
    pub fn check(&self) -> Result<usize> {
        check::non_empty("clean_correct", self.clean_correct)?;
        check::same_len(
            "clean_correct",
            self.clean_correct,
            "clean_confidence",
            self.clean_confidence,
        )?;
        check::same_len(
            "clean_correct",
            self.clean_correct,
            "adversarial_correct",
            self.adversarial_correct,
        )?;
        check::same_len(
            "clean_correct",
            self.clean_correct,
            "adversarial_confidence",
            self.adversarial_confidence,
        )?;
        check::no_nan("clean_confidence", self.clean_confidence)?;
        check::no_nan("adversarial_confidence", self.adversarial_confidence)?;
        Ok(self.clean_correct.len())
    }
}

/// The confidence-thresholded evaluation of one model against one (worst-case) attack.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdedReport {
    /// Target TPR on the held-out correctly classified examples (0.99 in CCAT).
    pub tpr: f64,
    /// The threshold picked on held-out data ([`crate::threshold_at_tpr`]).
    pub tau: f64,
    /// Fraction of the test split's correctly classified clean examples accepted at τ.
    pub test_tpr: f64,
    /// Clean error without rejection, in [0, 1].
    pub clean_error: f64,
    /// Robust error without rejection (clean or adversarial wrong), in [0, 1].
    pub robust_error: f64,
    /// [`err_at_threshold`] at τ.
    pub err_at_tau: f64,
    /// [`rerr_at_threshold`] at τ.
    pub rerr_at_tau: f64,
    /// [`fpr_at_threshold`] at τ; `None` if no attack succeeded.
    pub fpr_at_tau: Option<f64>,
    /// [`adversarial_roc_auc`]; `None` if no attack succeeded.
    pub roc_auc: Option<f64>,
}

/// Picks τ at `tpr` on the held-out split, then evaluates the test split at τ.
///
/// held_out_correct, held_out_confidence: (M,) clean results on the held-out split
/// (the last 1,000 test images in CCAT), at least one correct. test: the test split.
/// tpr in (0, 1]. Err@τ and RErr@τ must be defined (τ accepts something).
pub fn thresholded_report(
    held_out_correct: &[bool],
    held_out_confidence: &[f64],
    test: &PairedOutcomes<'_>,
    tpr: f64,
) -> Result<ThresholdedReport> {
    check::non_empty("held_out_correct", held_out_correct)?;
    check::no_nan("held_out_confidence", held_out_confidence)?;
    let n = test.check()?;
    let held_out = confidences_of_correct(held_out_correct, held_out_confidence)?;
    if held_out.is_empty() {
        return Err(MetricsError::Empty {
            what: "held-out confidences of correctly classified examples",
        });
    }
    let tau = threshold_at_tpr(&held_out, tpr)?;
    let test_positives = confidences_of_correct(test.clean_correct, test.clean_confidence)?;
    let test_tpr = if test_positives.is_empty() {
        0.0
    } else {
        crate::roc::accepted_fraction(&test_positives, tau)
    };
    let broken = (0..n)
        .filter(|&i| !test.clean_correct[i] || !test.adversarial_correct[i])
        .count();
    let undefined_is_none = |r: Result<f64>| match r {
        Ok(v) => Ok(Some(v)),
        Err(MetricsError::Undefined { .. }) => Ok(None),
        Err(e) => Err(e),
    };
    Ok(ThresholdedReport {
        tpr,
        tau,
        test_tpr,
        clean_error: check::fraction(n - test_positives.len(), n),
        robust_error: check::fraction(broken, n),
        err_at_tau: err_at_threshold(test.clean_correct, test.clean_confidence, tau)?,
        rerr_at_tau: rerr_at_threshold(
            test.clean_correct,
            test.clean_confidence,
            test.adversarial_correct,
            test.adversarial_confidence,
            tau,
        )?,
        fpr_at_tau: undefined_is_none(fpr_at_threshold(
            test.clean_correct,
            test.adversarial_correct,
            test.adversarial_confidence,
            tau,
        ))?,
        roc_auc: undefined_is_none(adversarial_roc_auc(
            test.clean_correct,
            test.clean_confidence,
            test.adversarial_correct,
            test.adversarial_confidence,
        ))?,
    })
}

/// [`thresholded_report`] at 99 % TPR, the CCAT setting.
pub fn thresholded_report_at_tpr99(
    held_out_correct: &[bool],
    held_out_confidence: &[f64],
    test: &PairedOutcomes<'_>,
) -> Result<ThresholdedReport> {
    thresholded_report(held_out_correct, held_out_confidence, test, TPR_99)
}

/// Err@τ with τ picked at 99 % TPR on the held-out split.
pub fn err_at_tpr99(
    held_out_correct: &[bool],
    held_out_confidence: &[f64],
    correct: &[bool],
    confidence: &[f64],
) -> Result<f64> {
    let tau = tau_at_tpr99(held_out_correct, held_out_confidence)?;
    err_at_threshold(correct, confidence, tau)
}

/// RErr@τ with τ picked at 99 % TPR on the held-out split.
pub fn rerr_at_tpr99(
    held_out_correct: &[bool],
    held_out_confidence: &[f64],
    test: &PairedOutcomes<'_>,
) -> Result<f64> {
    let tau = tau_at_tpr99(held_out_correct, held_out_confidence)?;
    rerr_at_threshold(
        test.clean_correct,
        test.clean_confidence,
        test.adversarial_correct,
        test.adversarial_confidence,
        tau,
    )
}

fn tau_at_tpr99(held_out_correct: &[bool], held_out_confidence: &[f64]) -> Result<f64> {
    let held_out = confidences_of_correct(held_out_correct, held_out_confidence)?;
    if held_out.is_empty() {
        return Err(MetricsError::Empty {
            what: "held-out confidences of correctly classified examples",
        });
    }
    threshold_at_tpr(&held_out, TPR_99)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The 6-example case, τ = 0.5, worked by hand:
    //
    //  i | clean ok | clean conf | adv ok | adv conf | numerator        | denominator
    //  0 |    ✓     |    0.9     |   ✓    |   0.8    | max(0, 0) = 0    | max(1, 1) = 1
    //  1 |    ✓     |    0.9     |   ✗    |   0.7    | max(0, 1) = 1    | max(1, 1) = 1
    //  2 |    ✓     |    0.9     |   ✗    |   0.3    | max(0, 0) = 0    | max(1, 0) = 1
    //  3 |    ✗     |    0.6     |   ✗    |   0.6    | max(1, 1) = 1    | max(1, 1) = 1
    //  4 |    ✗     |    0.4     |   ✗    |   0.4    | max(0, 0) = 0    | max(0, 0) = 0
    //  5 |    ✓     |    0.4     |   ✗    |   0.9    | max(0, 1) = 1    | max(0, 1) = 1
    //
    // RErr@0.5 = 3 / 5 = 0.6.
    // Err@0.5: accepted clean examples 0, 1, 2, 3; wrong among them: 3 → 1/4.
    // FPR@0.5: negatives (clean ✓, adv ✗) are 1, 2, 5 with adv conf 0.7, 0.3, 0.9;
    //          accepted 1 and 5 → 2/3.
    // ROC AUC: positives (clean ✓) 0.9, 0.9, 0.9, 0.4 vs negatives 0.7, 0.3, 0.9.
    //          Each 0.9 wins 1 + 1 + ½ = 2.5 (×3 = 7.5); 0.4 wins 1 (beats 0.3).
    //          8.5 / 12.
    const CLEAN_OK: [bool; 6] = [true, true, true, false, false, true];
    const CLEAN_CONF: [f64; 6] = [0.9, 0.9, 0.9, 0.6, 0.4, 0.4];
    const ADV_OK: [bool; 6] = [true, false, false, false, false, false];
    const ADV_CONF: [f64; 6] = [0.8, 0.7, 0.3, 0.6, 0.4, 0.9];

    fn six() -> PairedOutcomes<'static> {
        PairedOutcomes {
            clean_correct: &CLEAN_OK,
            clean_confidence: &CLEAN_CONF,
            adversarial_correct: &ADV_OK,
            adversarial_confidence: &ADV_CONF,
        }
    }

    #[test]
    fn six_example_case_by_hand() -> Result<()> {
        assert_eq!(
            rerr_at_threshold(&CLEAN_OK, &CLEAN_CONF, &ADV_OK, &ADV_CONF, 0.5)?,
            0.6
        );
        assert_eq!(err_at_threshold(&CLEAN_OK, &CLEAN_CONF, 0.5)?, 0.25);
        assert!((fpr_at_threshold(&CLEAN_OK, &ADV_OK, &ADV_CONF, 0.5)? - 2.0 / 3.0).abs() < 1e-15);
        let auc = adversarial_roc_auc(&CLEAN_OK, &CLEAN_CONF, &ADV_OK, &ADV_CONF)?;
        assert!((auc - 8.5 / 12.0).abs() < 1e-15);
        // τ = 0 accepts everything: RErr is the plain robust error, 5/6.
        let rerr0 = rerr_at_threshold(&CLEAN_OK, &CLEAN_CONF, &ADV_OK, &ADV_CONF, 0.0)?;
        assert!((rerr0 - 5.0 / 6.0).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn report_picks_tau_on_held_out_data() -> Result<()> {
        // Held out: correct examples have conf 0.5, 0.6, 0.7, 0.8 (the 0.95 one is
        // wrong and ignored). tpr = 0.75 → k = 3 → τ = 3rd largest = 0.6.
        let held_ok = [true, true, false, true, true];
        let held_conf = [0.8, 0.5, 0.95, 0.7, 0.6];
        let report = thresholded_report(&held_ok, &held_conf, &six(), 0.75)?;
        assert_eq!(report.tau, 0.6);
        // At τ = 0.6 on the six examples: clean accepted 0, 1, 2, 3 (wrong: 3) → 1/4.
        assert_eq!(report.err_at_tau, 0.25);
        // RErr: rows 0..3 and 5 as at τ = 0.5 (no confidence lies in [0.5, 0.6)), row 4 out → 3/5.
        assert_eq!(report.rerr_at_tau, 0.6);
        // Test TPR: clean-correct confs 0.9, 0.9, 0.9, 0.4 → 3/4 accepted.
        assert_eq!(report.test_tpr, 0.75);
        assert_eq!(report.clean_error, 2.0 / 6.0);
        assert_eq!(report.robust_error, 5.0 / 6.0);
        assert!((report.fpr_at_tau.unwrap_or(f64::NAN) - 2.0 / 3.0).abs() < 1e-15);
        assert!((report.roc_auc.unwrap_or(f64::NAN) - 8.5 / 12.0).abs() < 1e-15);
        // The 99 % conveniences agree with the general function.
        let r99 = thresholded_report_at_tpr99(&held_ok, &held_conf, &six())?;
        assert_eq!(r99.tau, 0.5);
        assert_eq!(
            rerr_at_tpr99(&held_ok, &held_conf, &six())?,
            r99.rerr_at_tau
        );
        assert_eq!(
            err_at_tpr99(&held_ok, &held_conf, &CLEAN_OK, &CLEAN_CONF)?,
            r99.err_at_tau
        );
        Ok(())
    }

    #[test]
    fn report_without_successful_attacks_has_no_fpr_or_auc() -> Result<()> {
        let test = PairedOutcomes {
            clean_correct: &[true, false],
            clean_confidence: &[0.9, 0.8],
            adversarial_correct: &[true, false],
            adversarial_confidence: &[0.9, 0.8],
        };
        let report = thresholded_report(&[true], &[0.5], &test, 0.99)?;
        assert_eq!((report.fpr_at_tau, report.roc_auc), (None, None));
        assert_eq!(report.rerr_at_tau, 0.5);
        Ok(())
    }

    #[test]
    fn undefined_and_bad_input() {
        // τ above every confidence.
        assert!(matches!(
            err_at_threshold(&CLEAN_OK, &CLEAN_CONF, 0.95),
            Err(MetricsError::Undefined { what: "Err@τ", .. })
        ));
        assert!(matches!(
            rerr_at_threshold(&CLEAN_OK, &CLEAN_CONF, &ADV_OK, &ADV_CONF, 0.95),
            Err(MetricsError::Undefined {
                what: "RErr@τ", ..
            })
        ));
        assert!(matches!(
            fpr_at_threshold(&[true], &[true], &[0.5], 0.5),
            Err(MetricsError::Undefined { .. })
        ));
        assert!(matches!(
            adversarial_roc_auc(&[false], &[0.5], &[false], &[0.5]),
            Err(MetricsError::Undefined { .. })
        ));
        assert!(matches!(
            err_at_threshold(&CLEAN_OK, &CLEAN_CONF, f64::NAN),
            Err(MetricsError::InvalidParameter { what: "tau", .. })
        ));
        assert!(matches!(
            err_at_threshold(&[], &[], 0.5),
            Err(MetricsError::Empty { what: "correct" })
        ));
        assert!(matches!(
            rerr_at_threshold(&CLEAN_OK, &CLEAN_CONF, &ADV_OK, &ADV_CONF[..5], 0.5),
            Err(MetricsError::LengthMismatch {
                right: "adversarial_confidence",
                ..
            })
        ));
        assert!(matches!(
            rerr_at_threshold(&[true], &[0.5], &[true], &[f64::NAN], 0.5),
            Err(MetricsError::NaN {
                what: "adversarial_confidence",
                index: 0
            })
        ));
        assert!(matches!(
            thresholded_report(&[false, false], &[0.9, 0.9], &six(), 0.99),
            Err(MetricsError::Empty { .. })
        ));
        assert!(matches!(
            thresholded_report(&[true, true], &[0.9], &six(), 0.99),
            Err(MetricsError::LengthMismatch { .. })
        ));
        assert!(matches!(
            thresholded_report(&[true], &[0.9], &six(), 0.0),
            Err(MetricsError::InvalidParameter { what: "tpr", .. })
        ));
    }
}
