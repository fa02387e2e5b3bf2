//! Robustness and calibration metrics over per-example arrays.
//!
//! This crate owns the *definitions* of every number Rampart reports: clean and
//! robust error (per-example worst case over attacks), the confidence-thresholded
//! protocol of CCAT (τ at 99 % TPR, Err@τ, RErr@τ, FPR@τ, ROC AUC), calibration
//! (ECE with its reliability diagram, Brier, NLL, temperature scaling), the
//! accuracy–perturbation curve and its area (AUAC), OOD detection (AUROC, FPR at
//! 95 % TPR), mean ± std over stochastic runs, and the uncertainty of all of these:
//! Wilson score intervals for errors and accuracies, a seeded percentile
//! [`bootstrap`] for any per-example statistic, and tests of whether two numbers
//! differ ([`proportion_differs`] by interval overlap, [`paired_differs`] by an
//! exact McNemar test on the same examples). `docs/metrics.md` states each
//! definition and convention exactly.
//!
//! It must not know about tensors, models, attacks, data sets or files: inputs are
//! plain slices with one entry per example (probabilities and logits as row-major
//! N×K slices of `f32` or `f64`), outputs are numbers or small serde structs. Callers
//! pull per-example values off the device and hand them over; the streaming
//! accumulators ([`ErrorAccumulator`], [`CalibrationAccumulator`], [`WorstCase`]) let
//! them do so batch by batch and agree exactly with the pure functions.
//!
//! Conventions: errors and accuracies are fractions in [0, 1] (only [`auac`] and
//! [`mean_std`] are unit-agnostic and return the unit they are given). Bad input
//! (empty or misaligned arrays, NaN, unnormalised probabilities, bad grids, zero
//! bins, labels out of range) and metrics undefined on the input (a zero
//! denominator) return a [`MetricsError`]; nothing panics on user input.
//!
//! ```
//! # fn main() -> Result<(), rampart_metrics::MetricsError> {
//! // Accuracy (%) against an L∞ attack at ε = 0, 1, …, 5 (/255): AUAC in %.
//! let eps = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
//! let acc = [96.0, 64.95, 34.52, 16.73, 7.81, 3.73];
//! assert!((rampart_metrics::auac(&eps, &acc)? - 34.775).abs() < 1e-9);
//!
//! // Robust error: example 1 is broken by the attack, example 2 is wrong on clean.
//! let robust = rampart_metrics::robust_error(&[true, true, false], &[&[true, false, true]])?;
//! assert!((robust - 2.0 / 3.0).abs() < 1e-12);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod accepted;
mod calibration;
mod check;
mod classification;
mod curve;
mod error;
mod interval;
mod ood;
mod probs;
mod roc;
mod summary;
mod temperature;
mod thresholded;

pub use accepted::fraction_accepted;
pub use calibration::{
    brier, ece, ece_15, nll, Calibration, CalibrationAccumulator, ReliabilityBin, ECE_BINS,
    NLL_PROBABILITY_FLOOR,
};
pub use check::PROBABILITY_SUM_TOLERANCE;
pub use classification::{
    clean_error, robust_error, AdversarialOutcome, ErrorAccumulator, WorstCase,
};
pub use curve::{accuracy_curve, auac, AccuracyCurve};
pub use error::{MetricsError, Result};
pub use interval::{
    bootstrap, difference_interval, mcnemar_p, normal_quantile, paired_differs, proportion_differs,
    wilson, Interval, BOOTSTRAP_RESAMPLES, CONFIDENCE_95,
};
pub use ood::{fpr_at_tpr, fpr_at_tpr95, ood_auroc};
pub use probs::{predictions_and_confidences, wrong_class_confidences};
pub use roc::{roc_auc, threshold_at_tpr, threshold_at_tpr99, TPR_95, TPR_99};
pub use summary::mean_std;
pub use temperature::{
    fit_temperature, nll_with_temperature, softmax_with_temperature, MAX_TEMPERATURE,
    MIN_TEMPERATURE,
};
pub use thresholded::{
    adversarial_roc_auc, confidences_of_correct, err_at_threshold, err_at_tpr99, fpr_at_threshold,
    rerr_at_threshold, rerr_at_tpr99, thresholded_report, thresholded_report_at_tpr99,
    PairedOutcomes, ThresholdedReport,
};
