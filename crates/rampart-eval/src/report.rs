//! The report of one evaluation: every number computed from the per-example records
//! with `rampart-metrics`, its serde form (`results.json`) and its Markdown form.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rampart_metrics::{
    self as metrics, AccuracyCurve, Interval, MetricsError, ReliabilityBin, WorstCase,
};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::outputs::Outcomes;
use crate::records::AttackRecord;
use crate::suite::{CurvePlan, HEADLINE_THREAT_MODEL};
use crate::trust::TrustChecks;

/// Version of the `results.json` written by an evaluation (version 1 had the clean
/// fields only; version 2 adds everything else, additively).
pub const EVAL_SCHEMA_VERSION: u32 = 2;

/// Bins of the confidence histograms (equal width on [0, 1]).
pub const HISTOGRAM_BINS: usize = 20;

/// Everything one evaluation measured. Fractions are in [0, 1]; `None` (JSON `null`)
/// marks a number that is undefined on this input (e.g. no held-out example is
/// correct, so there is no τ), never a silent 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// [`EVAL_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// `quick`, `ccat` or `full`.
    pub suite: String,
    /// The model file, when evaluated from one.
    pub model: Option<PathBuf>,
    /// Training method from the model's metadata.
    pub method: Option<String>,
    /// Architecture.
    pub arch: Option<String>,
    /// Data set name from the model's metadata.
    pub dataset: Option<String>,
    /// Attacked test examples (the first of the test split, the held-out part excluded).
    pub test_examples: usize,
    /// Held-out test examples (the last of the split), used only to pick τ and fit T.
    pub held_out_examples: usize,
    /// Clean accuracy on the attacked examples.
    pub clean_accuracy: f64,
    /// 1 − clean accuracy.
    pub clean_error: f64,
    /// 95 % Wilson interval of `clean_error`.
    #[serde(default)]
    pub clean_error_ci: Option<Interval>,
    /// Confidence level of every `*_ci` interval (0.95).
    #[serde(default)]
    pub interval_confidence: Option<f64>,
    /// Bootstrap resamples behind the intervals of ECE, AUAC, RErr@τ, FPR@τ and AUROC.
    #[serde(default)]
    pub bootstrap_resamples: Option<usize>,
    /// The TPR τ is picked at on the held-out split (0.99 as in CCAT; the `*_tpr99`
    /// fields hold the figures at this TPR).
    #[serde(default)]
    pub tau_tpr: Option<f64>,
    /// Equal-width bins of the ECE and the reliability diagram (15).
    #[serde(default)]
    pub ece_bins: Option<usize>,
    /// τ: confidence threshold at `tau_tpr` (99 %) TPR on the held-out correctly
    /// classified examples.
    pub tau_at_tpr99: Option<f64>,
    /// Fraction of the attacked split's correct examples accepted at τ (≈ 0.99).
    pub test_tpr: Option<f64>,
    /// Clean error among examples accepted at τ.
    pub err_at_tpr99: Option<f64>,
    /// 95 % bootstrap interval of `err_at_tpr99` (τ held fixed).
    #[serde(default)]
    pub err_at_tpr99_ci: Option<Interval>,
    /// RErr@τ of the headline threat model ([`HEADLINE_THREAT_MODEL`]).
    pub rerr_at_tpr99: Option<f64>,
    /// Its 95 % bootstrap interval.
    #[serde(default)]
    pub rerr_at_tpr99_ci: Option<Interval>,
    /// FPR@τ of the headline threat model.
    pub fpr_at_tpr99: Option<f64>,
    /// ROC AUC (clean correct vs successful adversarial) of the headline threat model.
    pub roc_auc: Option<f64>,
    /// The model's own threshold (`confidence_threshold` metadata), if it has one.
    pub model_confidence_threshold: Option<f64>,
    /// ECE with `ece_bins` (15) equal-width bins on the attacked split.
    pub ece: f64,
    /// 95 % bootstrap interval of `ece`.
    #[serde(default)]
    pub ece_ci: Option<Interval>,
    /// Multi-class Brier score, in [0, 2].
    pub brier: f64,
    /// Mean negative log-likelihood in nats.
    pub nll: f64,
    /// Temperature fitted on the held-out split (minimum NLL).
    pub temperature: f64,
    /// ECE after temperature scaling.
    pub ece_temperature_scaled: f64,
    /// NLL after temperature scaling.
    pub nll_temperature_scaled: f64,
    /// Brier score after temperature scaling.
    pub brier_temperature_scaled: f64,
    /// Reliability diagram of the clean predictions (15 bins).
    pub reliability: Vec<ReliabilityBin>,
    /// Area under the accuracy–perturbation curve (L∞), a fraction.
    pub auac: Option<f64>,
    /// 95 % bootstrap interval of `auac`.
    #[serde(default)]
    pub auac_ci: Option<Interval>,
    /// The accuracy–perturbation curve and how it was found.
    pub accuracy_curve: Option<CurveReport>,
    /// Per threat model: robust error and the confidence-thresholded protocol.
    pub threat_models: BTreeMap<String, ThreatModelReport>,
    /// Out-of-distribution detection with confidence as the score: `distal`, `noise`,
    /// `corrupted`.
    pub ood: BTreeMap<String, OodReport>,
    /// Error and calibration on corrupted copies of the attacked split.
    pub corruptions: Vec<CorruptionReport>,
    /// Confidence histograms (clean, adversarial, distal, noise) for the plots.
    pub confidence_histograms: ConfidenceHistograms,
    /// Wall time of the evaluation in seconds (steps loaded from disk cost ~0).
    pub eval_seconds: f64,
    /// Steps loaded from `per_example/` instead of recomputed.
    pub resumed: Vec<String>,
    /// The trust checks (gradient masking, noise, ε growth, step budget) on the
    /// headline threat model; `None` when they were switched off.
    #[serde(default)]
    pub trust: Option<TrustChecks>,
}

/// One threat model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThreatModelReport {
    /// `linf`, `l2`, `l1` or `l0`.
    pub norm: String,
    /// Budget.
    pub eps: f64,
    /// Per attack on its own.
    pub attacks: BTreeMap<String, AttackSummary>,
    /// Per-example worst case over the attacks: clean or any adversarial version wrong.
    pub robust_error: f64,
    /// 95 % Wilson interval of `robust_error`.
    #[serde(default)]
    pub robust_error_ci: Option<Interval>,
    /// RErr@τ under the worst case (misclassified first, then the highest wrong-class
    /// confidence: `rampart_metrics::WorstCase`).
    pub rerr_at_tpr99: Option<f64>,
    /// Its 95 % bootstrap interval.
    #[serde(default)]
    pub rerr_at_tpr99_ci: Option<Interval>,
    /// FPR@τ: successful adversarial examples accepted at τ.
    pub fpr_at_tpr99: Option<f64>,
    /// Its 95 % bootstrap interval.
    #[serde(default)]
    pub fpr_at_tpr99_ci: Option<Interval>,
    /// ROC AUC between clean-correct and successful adversarial confidences.
    pub roc_auc: Option<f64>,
    /// Its 95 % bootstrap interval.
    #[serde(default)]
    pub roc_auc_ci: Option<Interval>,
    /// RErr at the model's own threshold, if it has one.
    pub rerr_at_model_threshold: Option<f64>,
}

/// One attack alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackSummary {
    /// Robust error against this attack alone.
    pub robust_error: f64,
    /// Its 95 % Wilson interval.
    #[serde(default)]
    pub robust_error_ci: Option<Interval>,
    /// RErr@τ against this attack alone (its own adversarial examples judged at τ), so
    /// that what each attack adds to the worst case can be read off.
    #[serde(default)]
    pub rerr_at_tpr99: Option<f64>,
    /// Wall time of the attack.
    pub seconds: f64,
}

/// One out-of-distribution set against the clean attacked split (the positives).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OodReport {
    /// Out-of-distribution inputs.
    pub examples: usize,
    /// Their mean confidence.
    pub mean_confidence: f64,
    /// AUROC of clean vs these inputs by confidence (1 = perfectly separated).
    pub auroc: f64,
    /// Its 95 % bootstrap interval (both sets resampled).
    #[serde(default)]
    pub auroc_ci: Option<Interval>,
    /// Fraction of these inputs accepted at the τ that accepts 95 % of the clean split.
    pub fpr_at_tpr95: f64,
    /// Fraction accepted at the CCAT τ (99 % TPR on the held-out split).
    pub fpr_at_tpr99: Option<f64>,
}

/// One corruption at one severity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CorruptionReport {
    /// CIFAR-10-C name.
    pub corruption: String,
    /// 1 ..= 5.
    pub severity: u8,
    /// Error on the corrupted images.
    pub error: f64,
    /// Error among corrupted images accepted at τ.
    pub err_at_tpr99: Option<f64>,
    /// ECE (15 bins).
    pub ece: f64,
    /// Brier score.
    pub brier: f64,
    /// NLL in nats.
    pub nll: f64,
    /// Mean confidence.
    pub mean_confidence: f64,
    /// AUROC of clean vs corrupted confidences.
    pub auroc: f64,
}

/// The accuracy–perturbation curve (L∞).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurveReport {
    /// ε grid (from 0) and accuracy (fraction) at each ε.
    pub curve: AccuracyCurve,
    /// Largest ε searched.
    pub eps_max: f64,
    /// Width of the last bisection bracket, ε_max / 2^rounds.
    pub resolution: f64,
    /// Fraction of examples not broken at ε_max.
    pub unbroken: f64,
}

/// Histograms of confidences on [0, 1] in [`HISTOGRAM_BINS`] equal bins (a confidence
/// of exactly 1 goes in the last bin).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceHistograms {
    /// Bin edges, `HISTOGRAM_BINS + 1` values from 0 to 1.
    pub edges: Vec<f64>,
    /// Clean attacked split.
    pub clean: Vec<usize>,
    /// Worst-case adversarial examples of the headline threat model.
    pub adversarial: Option<Vec<usize>>,
    /// Distal adversarial examples.
    pub distal: Option<Vec<usize>>,
    /// Uniform noise.
    pub noise: Option<Vec<usize>>,
    /// τ, drawn as a line.
    pub tau: Option<f64>,
}

/// A threat model's records, as [`build_report`] takes them.
pub(crate) struct ThreatModelInputs<'a> {
    pub name: String,
    pub norm: String,
    pub eps: f64,
    pub attacks: Vec<&'a AttackRecord>,
}

/// One corrupted copy's logits.
pub(crate) struct CorruptionInputs<'a> {
    pub name: String,
    pub severity: u8,
    pub logits: &'a [f32],
}

/// Everything [`build_report`] needs, all per example and aligned.
pub(crate) struct ReportInputs<'a> {
    pub suite: String,
    pub num_classes: usize,
    pub labels: &'a [u32],
    pub logits: &'a [f32],
    pub held_out_labels: &'a [u32],
    pub held_out_logits: &'a [f32],
    pub model_threshold: Option<f64>,
    pub threat_models: Vec<ThreatModelInputs<'a>>,
    pub noise_confidence: Option<&'a [f64]>,
    pub distal_confidence: Option<&'a [f64]>,
    pub curve: Option<(&'a CurvePlan, &'a [Option<f64>])>,
    pub corruptions: Vec<CorruptionInputs<'a>>,
    pub metrics: MetricSettings,
}

/// The parameters of the metrics that papers vary, recorded in the report.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricSettings {
    /// Equal-width ECE bins.
    pub ece_bins: usize,
    /// TPR on the held-out correct examples that picks τ.
    pub tau_tpr: f64,
    /// Bootstrap resamples of the intervals (0 switches the bootstrap off).
    pub bootstrap_resamples: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
}

impl Default for MetricSettings {
    fn default() -> Self {
        MetricSettings {
            ece_bins: metrics::ECE_BINS,
            tau_tpr: metrics::TPR_99,
            bootstrap_resamples: metrics::BOOTSTRAP_RESAMPLES,
            seed: 0,
        }
    }
}

impl MetricSettings {
    /// Refuses bins of 0 and a TPR outside (0, 1].
    pub fn validate(&self) -> Result<()> {
        if self.ece_bins == 0 {
            return Err(EvalError::Config("ECE needs at least one bin".into()));
        }
        if !(self.tau_tpr > 0.0 && self.tau_tpr <= 1.0) {
            return Err(EvalError::Config(format!(
                "the TPR that picks τ must lie in (0, 1], got {}",
                self.tau_tpr
            )));
        }
        Ok(())
    }
}

/// 95 % Wilson interval of `errors` of `n` (None for n = 0).
pub(crate) fn wilson(errors: usize, n: usize) -> Option<Interval> {
    if n == 0 {
        return None;
    }
    metrics::wilson(errors, n, metrics::CONFIDENCE_95).ok()
}

/// Seeded 95 % percentile-bootstrap interval of a statistic over `n` examples
/// (None when switched off or undefined on too many resamples).
fn bootstrap<F: FnMut(&[usize]) -> Option<f64>>(
    settings: &MetricSettings,
    salt: &str,
    n: usize,
    statistic: F,
) -> Option<Interval> {
    if settings.bootstrap_resamples < 2 || n == 0 {
        return None;
    }
    let salt = salt.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    metrics::bootstrap(
        n,
        settings.bootstrap_resamples,
        metrics::CONFIDENCE_95,
        settings.seed ^ salt,
        statistic,
    )
    .ok()
    .flatten()
}

fn pick<T: Copy>(values: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| values[i]).collect()
}

fn count_errors(correct: &[bool]) -> usize {
    correct.iter().filter(|&&c| !c).count()
}

/// `Ok(None)` for a metric that is undefined on this input, other errors passed on.
fn defined(r: metrics::Result<f64>, what: &str) -> Result<Option<f64>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MetricsError::Undefined { .. }) => Ok(None),
        Err(e) => Err(EvalError::metric(what)(e)),
    }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Counts of `values` in [`HISTOGRAM_BINS`] equal bins of [0, 1].
pub(crate) fn histogram(values: &[f64]) -> Vec<usize> {
    let mut counts = vec![0; HISTOGRAM_BINS];
    for &v in values {
        let b = ((v * HISTOGRAM_BINS as f64).floor().max(0.0) as usize).min(HISTOGRAM_BINS - 1);
        counts[b] += 1;
    }
    counts
}

/// Computes every number of the report from per-example arrays (model fields, time and
/// `resumed` are left empty for the caller).
pub(crate) fn build_report(inp: &ReportInputs<'_>) -> Result<EvalReport> {
    let k = inp.num_classes;
    let labels = inp.labels;
    let clean = Outcomes::from_logits(inp.logits, labels, k)?;
    let held = Outcomes::from_logits(inp.held_out_logits, inp.held_out_labels, k)?;
    let clean_error =
        metrics::clean_error(&clean.predicted, labels).map_err(EvalError::metric("clean error"))?;

    let held_positive = metrics::confidences_of_correct(&held.correct, &held.confidence)
        .map_err(EvalError::metric("held-out confidences"))?;
    let tau = if held_positive.is_empty() {
        tracing::warn!(
            "no held-out example is classified correctly: τ and the numbers at τ are undefined"
        );
        None
    } else {
        Some(
            metrics::threshold_at_tpr(&held_positive, inp.metrics.tau_tpr)
                .map_err(EvalError::metric("τ at the chosen TPR"))?,
        )
    };
    let test_positive = metrics::confidences_of_correct(&clean.correct, &clean.confidence)
        .map_err(EvalError::metric("test confidences"))?;
    let test_tpr = match tau {
        Some(t) if !test_positive.is_empty() => Some(
            metrics::fraction_accepted(&test_positive, t).map_err(EvalError::metric("test TPR"))?,
        ),
        _ => None,
    };
    let err_at_tau = |correct: &[bool], conf: &[f64], what: &str| -> Result<Option<f64>> {
        match tau {
            Some(t) => defined(metrics::err_at_threshold(correct, conf, t), what),
            None => Ok(None),
        }
    };
    let err_at_tpr99 = err_at_tau(&clean.correct, &clean.confidence, "Err@τ")?;

    // Calibration and the temperature-scaled baseline (T fitted on the held-out split).
    let settings = &inp.metrics;
    settings.validate()?;
    let bins = settings.ece_bins;
    let n = labels.len();
    let calibration =
        metrics::ece(&clean.confidence, &clean.correct, bins).map_err(EvalError::metric("ECE"))?;
    let ece_ci = bootstrap(settings, "ece", n, |idx| {
        metrics::ece(
            &pick(&clean.confidence, idx),
            &pick(&clean.correct, idx),
            bins,
        )
        .ok()
        .map(|c| c.ece)
    });
    let err_at_tpr99_ci = match tau {
        Some(t) => bootstrap(settings, "err_at_tau", n, |idx| {
            metrics::err_at_threshold(&pick(&clean.correct, idx), &pick(&clean.confidence, idx), t)
                .ok()
        }),
        None => None,
    };
    let brier = metrics::brier(&clean.probs, labels, k).map_err(EvalError::metric("Brier"))?;
    let nll = metrics::nll_with_temperature(inp.logits, labels, k, 1.0)
        .map_err(EvalError::metric("NLL"))?;
    let temperature = metrics::fit_temperature(inp.held_out_logits, inp.held_out_labels, k)
        .map_err(EvalError::metric("temperature"))?;
    let scaled = metrics::softmax_with_temperature(inp.logits, k, temperature)
        .map_err(EvalError::metric("scaled softmax"))?;
    let (scaled_pred, scaled_conf) = metrics::predictions_and_confidences(&scaled, k)
        .map_err(EvalError::metric("scaled predictions"))?;
    let scaled_correct: Vec<bool> = scaled_pred
        .iter()
        .zip(labels)
        .map(|(p, l)| p == l)
        .collect();
    let ece_temperature_scaled = metrics::ece(&scaled_conf, &scaled_correct, bins)
        .map_err(EvalError::metric("scaled ECE"))?
        .ece;
    let nll_temperature_scaled = metrics::nll_with_temperature(inp.logits, labels, k, temperature)
        .map_err(EvalError::metric("scaled NLL"))?;
    let brier_temperature_scaled =
        metrics::brier(&scaled, labels, k).map_err(EvalError::metric("scaled Brier"))?;

    // Threat models: per-example worst case over the attacks.
    let mut threat_models = BTreeMap::new();
    let mut headline_adv_conf = None;
    for tm in &inp.threat_models {
        if tm.attacks.is_empty() {
            continue;
        }
        let what = |m: &str| format!("{m} of {}", tm.name);
        let mut worst =
            WorstCase::new(&clean.correct).map_err(EvalError::metric(what("worst case")))?;
        let mut attacks = BTreeMap::new();
        for rec in &tm.attacks {
            worst
                .push(&rec.correct, &rec.confidence, &rec.wrong_class_confidence)
                .map_err(EvalError::metric(what(&rec.attack)))?;
            let alone = metrics::robust_error(&clean.correct, &[&rec.correct])
                .map_err(EvalError::metric(what(&rec.attack)))?;
            let rerr_alone = match tau {
                Some(t) => defined(
                    metrics::rerr_at_threshold(
                        &clean.correct,
                        &clean.confidence,
                        &rec.correct,
                        &rec.confidence,
                        t,
                    ),
                    &what(&format!("RErr@τ of {}", rec.attack)),
                )?,
                None => None,
            };
            attacks.insert(
                rec.attack.clone(),
                AttackSummary {
                    robust_error: alone,
                    robust_error_ci: wilson((alone * n as f64).round() as usize, n),
                    rerr_at_tpr99: rerr_alone,
                    seconds: rec.seconds,
                },
            );
        }
        let (adv_correct, adv_conf) = worst
            .worst_correct_and_confidence()
            .map_err(EvalError::metric(what("worst case")))?;
        let (rerr, fpr) = match tau {
            Some(t) => (
                defined(
                    metrics::rerr_at_threshold(
                        &clean.correct,
                        &clean.confidence,
                        &adv_correct,
                        &adv_conf,
                        t,
                    ),
                    &what("RErr@τ"),
                )?,
                defined(
                    metrics::fpr_at_threshold(&clean.correct, &adv_correct, &adv_conf, t),
                    &what("FPR@τ"),
                )?,
            ),
            None => (None, None),
        };
        let roc_auc = defined(
            metrics::adversarial_roc_auc(
                &clean.correct,
                &clean.confidence,
                &adv_correct,
                &adv_conf,
            ),
            &what("ROC AUC"),
        )?;
        let rerr_at_model_threshold = match inp.model_threshold {
            Some(t) => defined(
                metrics::rerr_at_threshold(
                    &clean.correct,
                    &clean.confidence,
                    &adv_correct,
                    &adv_conf,
                    t,
                ),
                &what("RErr at the model's threshold"),
            )?,
            None => None,
        };
        let salt = |m: &str| format!("{}.{m}", tm.name);
        let (rerr_ci, fpr_ci) = match tau {
            Some(t) => (
                bootstrap(settings, &salt("rerr"), n, |idx| {
                    metrics::rerr_at_threshold(
                        &pick(&clean.correct, idx),
                        &pick(&clean.confidence, idx),
                        &pick(&adv_correct, idx),
                        &pick(&adv_conf, idx),
                        t,
                    )
                    .ok()
                }),
                bootstrap(settings, &salt("fpr"), n, |idx| {
                    metrics::fpr_at_threshold(
                        &pick(&clean.correct, idx),
                        &pick(&adv_correct, idx),
                        &pick(&adv_conf, idx),
                        t,
                    )
                    .ok()
                }),
            ),
            None => (None, None),
        };
        let roc_auc_ci = bootstrap(settings, &salt("roc_auc"), n, |idx| {
            metrics::adversarial_roc_auc(
                &pick(&clean.correct, idx),
                &pick(&clean.confidence, idx),
                &pick(&adv_correct, idx),
                &pick(&adv_conf, idx),
            )
            .ok()
        });
        if tm.name == HEADLINE_THREAT_MODEL {
            headline_adv_conf = Some(adv_conf.clone());
        }
        let robust_error = worst.robust_error();
        threat_models.insert(
            tm.name.clone(),
            ThreatModelReport {
                norm: tm.norm.clone(),
                eps: tm.eps,
                attacks,
                robust_error,
                robust_error_ci: wilson((robust_error * n as f64).round() as usize, n),
                rerr_at_tpr99: rerr,
                rerr_at_tpr99_ci: rerr_ci,
                fpr_at_tpr99: fpr,
                fpr_at_tpr99_ci: fpr_ci,
                roc_auc,
                roc_auc_ci,
                rerr_at_model_threshold,
            },
        );
    }
    let headline = threat_models.get(HEADLINE_THREAT_MODEL);

    // Out-of-distribution detection, confidence as the score.
    let in_scores = &clean.confidence;
    let ood_report = |out: &[f64], what: &str| -> Result<OodReport> {
        // Both sets resampled: one index list over the concatenation, split again.
        let m = in_scores.len();
        let auroc_ci = bootstrap(settings, &format!("ood.{what}"), m + out.len(), |idx| {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for &i in idx {
                if i < m {
                    a.push(in_scores[i]);
                } else {
                    b.push(out[i - m]);
                }
            }
            metrics::ood_auroc(&a, &b).ok()
        });
        Ok(OodReport {
            examples: out.len(),
            mean_confidence: mean(out),
            auroc: metrics::ood_auroc(in_scores, out)
                .map_err(EvalError::metric(format!("AUROC of {what}")))?,
            auroc_ci,
            fpr_at_tpr95: metrics::fpr_at_tpr95(in_scores, out)
                .map_err(EvalError::metric(format!("FPR@95 of {what}")))?,
            fpr_at_tpr99: match tau {
                Some(t) => Some(
                    metrics::fraction_accepted(out, t)
                        .map_err(EvalError::metric(format!("FPR@τ of {what}")))?,
                ),
                None => None,
            },
        })
    };
    let mut ood = BTreeMap::new();
    if let Some(d) = inp.distal_confidence.filter(|d| !d.is_empty()) {
        ood.insert("distal".to_string(), ood_report(d, "distal examples")?);
    }
    if let Some(n) = inp.noise_confidence.filter(|n| !n.is_empty()) {
        ood.insert("noise".to_string(), ood_report(n, "uniform noise")?);
    }

    // Corruptions: error and calibration per severity; the most severe level of each
    // corruption pooled is the `corrupted` OOD set.
    let mut corruptions = Vec::new();
    let mut most_severe: BTreeMap<&str, (u8, Vec<f64>)> = BTreeMap::new();
    for c in &inp.corruptions {
        let what = |m: &str| format!("{m} of {} at severity {}", c.name, c.severity);
        let out = Outcomes::from_logits(c.logits, labels, k)?;
        corruptions.push(CorruptionReport {
            corruption: c.name.clone(),
            severity: c.severity,
            error: metrics::clean_error(&out.predicted, labels)
                .map_err(EvalError::metric(what("error")))?,
            err_at_tpr99: err_at_tau(&out.correct, &out.confidence, &what("Err@τ"))?,
            ece: metrics::ece(&out.confidence, &out.correct, bins)
                .map_err(EvalError::metric(what("ECE")))?
                .ece,
            brier: metrics::brier(&out.probs, labels, k)
                .map_err(EvalError::metric(what("Brier")))?,
            nll: metrics::nll_with_temperature(c.logits, labels, k, 1.0)
                .map_err(EvalError::metric(what("NLL")))?,
            mean_confidence: mean(&out.confidence),
            auroc: metrics::ood_auroc(in_scores, &out.confidence)
                .map_err(EvalError::metric(what("AUROC")))?,
        });
        let entry = most_severe
            .entry(c.name.as_str())
            .or_insert((0, Vec::new()));
        if c.severity > entry.0 {
            *entry = (c.severity, out.confidence);
        }
    }
    if !most_severe.is_empty() {
        let pooled: Vec<f64> = most_severe.into_values().flat_map(|(_, v)| v).collect();
        ood.insert(
            "corrupted".to_string(),
            ood_report(&pooled, "corrupted images")?,
        );
    }

    // Accuracy–perturbation curve from the minimal ε of every attacked example.
    let accuracy_curve = match inp.curve {
        Some((plan, min_eps)) => {
            let norms: Vec<f64> = min_eps.iter().map(|m| m.unwrap_or(f64::INFINITY)).collect();
            let curve = AccuracyCurve::from_min_norms(&norms, &plan.grid())
                .map_err(EvalError::metric("accuracy curve"))?;
            Some(CurveReport {
                curve,
                eps_max: plan.eps_max,
                resolution: plan.eps_max / 2f64.powi(plan.rounds as i32),
                unbroken: min_eps.iter().filter(|m| m.is_none()).count() as f64
                    / min_eps.len().max(1) as f64,
            })
        }
        None => None,
    };
    let auac = match &accuracy_curve {
        Some(c) => Some(c.curve.auac().map_err(EvalError::metric("AUAC"))?),
        None => None,
    };
    let auac_ci = match inp.curve {
        Some((plan, min_eps)) if auac.is_some() => {
            let grid = plan.grid();
            let norms: Vec<f64> = min_eps.iter().map(|m| m.unwrap_or(f64::INFINITY)).collect();
            bootstrap(settings, "auac", norms.len(), |idx| {
                AccuracyCurve::from_min_norms(&pick(&norms, idx), &grid)
                    .ok()
                    .and_then(|c| c.auac().ok())
            })
        }
        _ => None,
    };

    let edges = (0..=HISTOGRAM_BINS)
        .map(|i| i as f64 / HISTOGRAM_BINS as f64)
        .collect();
    Ok(EvalReport {
        schema_version: EVAL_SCHEMA_VERSION,
        suite: inp.suite.clone(),
        model: None,
        method: None,
        arch: None,
        dataset: None,
        test_examples: labels.len(),
        held_out_examples: inp.held_out_labels.len(),
        clean_accuracy: 1.0 - clean_error,
        clean_error,
        clean_error_ci: wilson(count_errors(&clean.correct), n),
        interval_confidence: Some(metrics::CONFIDENCE_95),
        bootstrap_resamples: Some(settings.bootstrap_resamples),
        tau_tpr: Some(settings.tau_tpr),
        ece_bins: Some(bins),
        tau_at_tpr99: tau,
        test_tpr,
        err_at_tpr99,
        err_at_tpr99_ci,
        rerr_at_tpr99: headline.and_then(|h| h.rerr_at_tpr99),
        rerr_at_tpr99_ci: headline.and_then(|h| h.rerr_at_tpr99_ci),
        fpr_at_tpr99: headline.and_then(|h| h.fpr_at_tpr99),
        roc_auc: headline.and_then(|h| h.roc_auc),
        model_confidence_threshold: inp.model_threshold,
        ece: calibration.ece,
        ece_ci,
        brier,
        nll,
        temperature,
        ece_temperature_scaled,
        nll_temperature_scaled,
        brier_temperature_scaled,
        reliability: calibration.bins,
        auac,
        auac_ci,
        accuracy_curve,
        threat_models,
        ood,
        corruptions,
        confidence_histograms: ConfidenceHistograms {
            edges,
            clean: histogram(&clean.confidence),
            adversarial: headline_adv_conf.as_deref().map(histogram),
            distal: inp
                .distal_confidence
                .filter(|d| !d.is_empty())
                .map(histogram),
            noise: inp
                .noise_confidence
                .filter(|d| !d.is_empty())
                .map(histogram),
            tau,
        },
        eval_seconds: 0.0,
        resumed: Vec::new(),
        trust: None,
    })
}

fn pct(v: f64) -> String {
    format!("{:.2}", 100.0 * v)
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), pct)
}

/// `12.34 [10.5, 14.4]`: a percentage with its interval (one decimal), if any.
pub(crate) fn pct_ci(v: Option<f64>, ci: Option<Interval>) -> String {
    match (v, ci) {
        (Some(v), Some(ci)) => format!("{} [{:.1}, {:.1}]", pct(v), 100.0 * ci.lo, 100.0 * ci.hi),
        (v, _) => opt_pct(v),
    }
}

fn headline_fpr_ci(r: &EvalReport) -> Option<Interval> {
    r.threat_models
        .get(HEADLINE_THREAT_MODEL)
        .and_then(|t| t.fpr_at_tpr99_ci)
}

fn headline_auc_ci(r: &EvalReport) -> Option<Interval> {
    r.threat_models
        .get(HEADLINE_THREAT_MODEL)
        .and_then(|t| t.roc_auc_ci)
}

impl EvalReport {
    /// The report as Markdown tables (percentages with two decimals; `–` = undefined).
    /// `plots`: Markdown image links to embed after the tables, if any.
    pub fn markdown(&self, title: &str, plots: &[(String, String)]) -> String {
        let mut md = format!("# {title}\n\n");
        md.push_str(&format!(
            "Suite `{}`: {} attacked test images, {} held-out images for τ (at {} % TPR) and \
             temperature scaling, ECE with {} bins. Errors, ECE, FPR and AUC in %; Brier in \
             [0, 2]; NLL in nats. Brackets: 95 % intervals (Wilson for error rates, a seeded \
             bootstrap over the attacked images with {} resamples for ECE, Err@τ, RErr@τ, \
             FPR@τ, AUC and AUAC; τ is held fixed).\n",
            self.suite,
            self.test_examples,
            self.held_out_examples,
            100.0 * self.tau_tpr.unwrap_or(metrics::TPR_99),
            self.ece_bins.unwrap_or(metrics::ECE_BINS),
            self.bootstrap_resamples.unwrap_or(0),
        ));
        if let Some(t) = &self.trust {
            md.push_str(&t.markdown());
        }
        md.push('\n');
        md.push_str("| clean err | Err@τ | RErr@τ (L∞ 8/255) | FPR@τ | ROC AUC | τ | ECE | Brier | NLL | T | ECE (T) | NLL (T) | AUAC |\n");
        md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.4} | {:.4} | {:.3} | {} | {:.4} | {} |\n\n",
            pct_ci(Some(self.clean_error), self.clean_error_ci),
            pct_ci(self.err_at_tpr99, self.err_at_tpr99_ci),
            pct_ci(self.rerr_at_tpr99, self.rerr_at_tpr99_ci),
            pct_ci(self.fpr_at_tpr99, headline_fpr_ci(self)),
            pct_ci(self.roc_auc, headline_auc_ci(self)),
            self.tau_at_tpr99.map_or("–".into(), |t| format!("{t:.4}")),
            pct_ci(Some(self.ece), self.ece_ci),
            self.brier,
            self.nll,
            self.temperature,
            pct(self.ece_temperature_scaled),
            self.nll_temperature_scaled,
            pct_ci(self.auac, self.auac_ci),
        ));
        if !self.threat_models.is_empty() {
            md.push_str("## Threat models\n\n| threat model | ε | robust err | RErr@τ | FPR@τ | ROC AUC | attacks (robust err / RErr@τ alone, seconds) |\n|---|---:|---:|---:|---:|---:|---|\n");
            for (name, tm) in &self.threat_models {
                let attacks: Vec<String> = tm
                    .attacks
                    .iter()
                    .map(|(a, s)| match s.rerr_at_tpr99 {
                        Some(r) => format!(
                            "{a} {} / {} ({:.0} s)",
                            pct(s.robust_error),
                            pct(r),
                            s.seconds
                        ),
                        None => format!("{a} {} ({:.0} s)", pct(s.robust_error), s.seconds),
                    })
                    .collect();
                md.push_str(&format!(
                    "| {name} | {:.4} | {} | {} | {} | {} | {} |\n",
                    tm.eps,
                    pct_ci(Some(tm.robust_error), tm.robust_error_ci),
                    pct_ci(tm.rerr_at_tpr99, tm.rerr_at_tpr99_ci),
                    pct_ci(tm.fpr_at_tpr99, tm.fpr_at_tpr99_ci),
                    pct_ci(tm.roc_auc, tm.roc_auc_ci),
                    attacks.join(", ")
                ));
            }
            md.push('\n');
        }
        if !self.ood.is_empty() {
            md.push_str("## Out-of-distribution inputs\n\n| set | examples | mean conf | AUROC | FPR@95 %TPR | FPR@τ |\n|---|---:|---:|---:|---:|---:|\n");
            for (name, o) in &self.ood {
                md.push_str(&format!(
                    "| {name} | {} | {} | {} | {} | {} |\n",
                    o.examples,
                    pct(o.mean_confidence),
                    pct_ci(Some(o.auroc), o.auroc_ci),
                    pct(o.fpr_at_tpr95),
                    opt_pct(o.fpr_at_tpr99)
                ));
            }
            md.push('\n');
        }
        if !self.corruptions.is_empty() {
            md.push_str("## Corruptions\n\n| corruption | severity | err | Err@τ | ECE | Brier | NLL | mean conf |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
            for c in &self.corruptions {
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {:.4} | {:.4} | {} |\n",
                    c.corruption,
                    c.severity,
                    pct(c.error),
                    opt_pct(c.err_at_tpr99),
                    pct(c.ece),
                    c.brier,
                    c.nll,
                    pct(c.mean_confidence)
                ));
            }
            md.push('\n');
        }
        for (caption, link) in plots {
            md.push_str(&format!("![{caption}]({link})\n\n"));
        }
        md
    }
}

#[cfg(test)]
mod tests;
