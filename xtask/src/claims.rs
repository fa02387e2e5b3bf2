//! The claims table: each claim of the seed papers, checked against a study's
//! `results.json`, with the figures and the 95 % interval behind every verdict.
//!
//! Every check is a difference d of two measured figures, oriented so that the claim
//! says d > 0 (or, for OAT's trade-off curve, d > −5 points), with its interval from
//! the two figures' own intervals (MOVER, [`rampart_metrics::difference_interval`]:
//! Wilson intervals for accuracies and rejection rates, the bootstrap intervals of
//! the evaluation for ECE and RErr@τ). The verdict:
//!
//! * **supported**: the interval lies above the claim's bound;
//! * **contradicted**: it lies below;
//! * **inconclusive**: it contains the bound (the run cannot tell at this size);
//! * **not measured**: a figure is missing (a row not trained, a suite without it).
//!
//! The models were evaluated on overlapping test images, for which this interval is
//! conservative (a paired test would be sharper).

use std::path::Path;

use rampart_metrics::{difference_interval, wilson, Interval, CONFIDENCE_95};
use serde::Serialize;
use serde_json::Value;

/// What a check concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Supported,
    Contradicted,
    Inconclusive,
    NotMeasured,
}

impl Verdict {
    fn text(self) -> &'static str {
        match self {
            Verdict::Supported => "supported",
            Verdict::Contradicted => "contradicted",
            Verdict::Inconclusive => "inconclusive",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// One checked claim (one row of the table).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Claim {
    /// Stable identifier, e.g. `ccat_unseen.l2_0p5`.
    pub id: String,
    /// The claim, as the paper makes it.
    pub claim: String,
    /// The paper.
    pub source: &'static str,
    /// The difference checked, in words (`at − normal, PGD-20 robust accuracy`).
    pub comparison: String,
    /// The difference d (fraction; positive means the claim's direction).
    pub estimate: Option<f64>,
    /// Its 95 % interval.
    pub ci: Option<Interval>,
    /// The bound d is compared with (0, or −0.05 for a non-inferiority claim).
    pub bound: f64,
    pub verdict: Verdict,
    /// The two figures with their sample sizes, or why the check could not run.
    pub detail: String,
}

/// A measured figure: value, interval, and how it was measured (for the detail).
#[derive(Clone, Debug)]
struct Figure {
    value: f64,
    ci: Interval,
    what: String,
}

fn interval(v: &Value) -> Option<Interval> {
    Some(Interval {
        lo: v.get("lo")?.as_f64()?,
        hi: v.get("hi")?.as_f64()?,
    })
}

/// A rate `field` of `model` with its Wilson interval: from `field_ci` when the file
/// has it, else from the count `n_field`.
fn rate(results: &Value, model: &str, field: &str, n_field: &str) -> Result<Figure, String> {
    let m = results
        .get("models")
        .and_then(|ms| ms.get(model))
        .ok_or_else(|| format!("no `{model}` row"))?;
    let value = m
        .get(field)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("`{model}` has no {field}"))?;
    let n = m.get(n_field).and_then(Value::as_u64);
    let ci = match m.get(format!("{field}_ci")).and_then(interval) {
        Some(ci) => ci,
        None => {
            let n = n.ok_or_else(|| format!("`{model}` has no {n_field}"))? as usize;
            wilson_of(value, n)?
        }
    };
    let size = n.map_or(String::new(), |n| format!(" on {n}"));
    Ok(Figure {
        value,
        ci,
        what: format!("{model} {:.2} %{size}", 100.0 * value),
    })
}

/// The Wilson interval of a rate measured on n examples.
fn wilson_of(value: f64, n: usize) -> Result<Interval, String> {
    let successes = (value * n as f64).round() as usize;
    wilson(successes.min(n), n, CONFIDENCE_95).map_err(|e| e.to_string())
}

/// A figure with a bootstrap interval under `path` (e.g. `ece`, or the RErr@τ of a
/// threat model), as `1 − value` when `complement` (so that larger is better).
fn bootstrapped(
    results: &Value,
    model: &str,
    path: &[&str],
    complement: bool,
) -> Result<Figure, String> {
    let mut node = results
        .get("models")
        .and_then(|ms| ms.get(model))
        .ok_or_else(|| format!("no `{model}` row"))?;
    let (last, parents) = path.split_last().ok_or("empty path")?;
    for p in parents {
        node = node
            .get(*p)
            .ok_or_else(|| format!("`{model}` has no {}", path.join(".")))?;
    }
    let value = node
        .get(*last)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("`{model}` has no {}", path.join(".")))?;
    let ci = node
        .get(format!("{last}_ci"))
        .and_then(interval)
        .ok_or_else(|| format!("`{model}` has no interval for {}", path.join(".")))?;
    let what = format!("{model} {} {:.2} %", path.join("."), 100.0 * value);
    Ok(if complement {
        Figure {
            value: 1.0 - value,
            ci: Interval {
                lo: 1.0 - ci.hi,
                hi: 1.0 - ci.lo,
            },
            what,
        }
    } else {
        Figure { value, ci, what }
    })
}

/// The check d = a − b against `bound`.
fn check(
    id: String,
    claim: String,
    source: &'static str,
    comparison: String,
    bound: f64,
    figures: Result<(Figure, Figure), String>,
) -> Claim {
    let mut out = Claim {
        id,
        claim,
        source,
        comparison,
        estimate: None,
        ci: None,
        bound,
        verdict: Verdict::NotMeasured,
        detail: String::new(),
    };
    match figures.and_then(|(a, b)| {
        let ci = difference_interval(a.value, a.ci, b.value, b.ci).map_err(|e| e.to_string())?;
        Ok((a, b, ci))
    }) {
        Err(why) => out.detail = why,
        Ok((a, b, ci)) => {
            out.estimate = Some(a.value - b.value);
            out.ci = Some(ci);
            out.verdict = if ci.lo > bound {
                Verdict::Supported
            } else if ci.hi < bound {
                Verdict::Contradicted
            } else {
                Verdict::Inconclusive
            };
            out.detail = format!("{}; {}", a.what, b.what);
        }
    }
    out
}

/// Threat models a study's protocol evaluates beside the training one (L∞ 8/255).
const UNSEEN: &[(&str, &str)] = &[
    ("linf_16_255", "L∞ 16/255"),
    ("l2_0p5", "L2 0.5"),
    ("l2_2", "L2 2"),
    ("l1_12", "L1 12"),
    ("l1_24", "L1 24"),
    ("l0_10", "L0 10"),
    ("frames", "frames"),
];

/// The calibration rows and their papers.
const CALIBRATION: &[(&str, &str, &str)] = &[
    ("ls", "label smoothing 0.1", "Müller et al. 2019"),
    ("regmixup", "RegMixup", "Pinto et al. 2022"),
    ("ar-adals", "AR-AdaLS", "Qin et al. 2021"),
];

/// OAT's sweep point at λ = 0.3 (clean and robust accuracy with their sample sizes,
/// read from the point's own results in `study`).
fn oat_point(results: &Value, study: &Path) -> Result<(Figure, Figure), String> {
    let points = results
        .pointer("/sweeps/oat/points")
        .and_then(Value::as_array)
        .ok_or("no λ sweep of the `oat` row")?;
    let p = points
        .iter()
        .find(|p| {
            p.get("value")
                .and_then(Value::as_f64)
                .is_some_and(|v| (v - 0.3).abs() < 1e-6)
        })
        .ok_or("the λ sweep has no point at 0.3")?;
    let file = p
        .get("results")
        .and_then(Value::as_str)
        .ok_or("the λ = 0.3 point names no results file")?;
    let text = std::fs::read_to_string(study.join(file))
        .map_err(|e| format!("cannot read {file}: {e}"))?;
    let point: Value = serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    let count = |k: &str| point.get(k).and_then(Value::as_u64).map(|n| n as usize);
    let clean = p
        .get("clean_accuracy")
        .and_then(Value::as_f64)
        .ok_or("no clean accuracy at λ = 0.3")?;
    let robust = p
        .get("robust_accuracy")
        .and_then(Value::as_f64)
        .ok_or("no robust accuracy at λ = 0.3")?;
    let n_clean = count("test_examples").ok_or("no test_examples at λ = 0.3")?;
    let n_robust = count("robust_examples").ok_or("no robust_examples at λ = 0.3")?;
    Ok((
        Figure {
            value: clean,
            ci: wilson_of(clean, n_clean)?,
            what: format!("oat at λ = 0.3 {:.2} % on {n_clean}", 100.0 * clean),
        },
        Figure {
            value: robust,
            ci: wilson_of(robust, n_robust)?,
            what: format!("oat at λ = 0.3 {:.2} % on {n_robust}", 100.0 * robust),
        },
    ))
}

/// The share of distal inputs a model rejects at its τ (1 − their FPR@τ), with the
/// Wilson interval over the distal inputs.
fn distal_rejected(results: &Value, model: &str) -> Result<Figure, String> {
    let d = results
        .pointer(&format!("/models/{model}/ood/distal"))
        .ok_or_else(|| format!("`{model}` has no distal evaluation"))?;
    let fpr = d
        .get("fpr_at_tpr99")
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("`{model}` has no distal FPR@τ"))?;
    let n = d
        .get("examples")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("`{model}` has no distal count"))? as usize;
    let value = 1.0 - fpr;
    Ok(Figure {
        value,
        ci: wilson_of(value, n)?,
        what: format!("{model} rejects {:.2} % of {n}", 100.0 * value),
    })
}

/// Every claim, checked against `results` (a study's `results.json`, read from
/// `study`).
pub fn evaluate(results: &Value, study: &Path) -> Vec<Claim> {
    let both = |a: Result<Figure, String>, b: Result<Figure, String>| Ok((a?, b?));
    let mut claims = vec![
        check(
            "at_robust".into(),
            "Adversarial training buys robustness that normal training lacks".into(),
            "Madry et al. 2018",
            "at − normal, PGD-20 robust accuracy (L∞ 8/255)".into(),
            0.0,
            both(
                rate(results, "at", "robust_accuracy", "robust_examples"),
                rate(results, "normal", "robust_accuracy", "robust_examples"),
            ),
        ),
        check(
            "ccat_clean".into(),
            "CCAT keeps a higher clean accuracy than adversarial training".into(),
            "Stutz et al. 2020",
            "ccat − at, clean accuracy".into(),
            0.0,
            both(
                rate(results, "ccat", "clean_accuracy", "test_examples"),
                rate(results, "at", "clean_accuracy", "test_examples"),
            ),
        ),
    ];
    for (key, name) in UNSEEN {
        claims.push(check(
            format!("ccat_unseen.{key}"),
            format!("CCAT has a lower RErr@τ than adversarial training on the unseen {name}"),
            "Stutz et al. 2020",
            format!("at − ccat, RErr@τ under {name}"),
            0.0,
            both(
                bootstrapped(
                    results,
                    "at",
                    &["threat_models", key, "rerr_at_tpr99"],
                    false,
                ),
                bootstrapped(
                    results,
                    "ccat",
                    &["threat_models", key, "rerr_at_tpr99"],
                    false,
                ),
            ),
        ));
    }
    claims.push(check(
        "ccat_unseen.distal".into(),
        "CCAT rejects distal inputs (uniform noise) that adversarial training accepts".into(),
        "Stutz et al. 2020",
        "ccat − at, share of distal inputs rejected at τ".into(),
        0.0,
        both(
            distal_rejected(results, "ccat"),
            distal_rejected(results, "at"),
        ),
    ));
    let (oat_clean, oat_robust) = match oat_point(results, study) {
        Ok((c, r)) => (Ok(c), Ok(r)),
        Err(e) => (Err(e.clone()), Err(e)),
    };
    for (what, oat, field, n_field) in [
        ("clean", oat_clean, "clean_accuracy", "test_examples"),
        ("robust", oat_robust, "robust_accuracy", "robust_examples"),
    ] {
        claims.push(check(
            format!("oat_trace.{what}"),
            format!(
                "One OAT model at λ = 0.3 matches a dedicated fixed-λ model's {what} accuracy \
                 (within 5 points)"
            ),
            "Wang et al. 2020",
            format!("oat at λ = 0.3 − oat-fixed, {what} accuracy"),
            -0.05,
            both(oat, rate(results, "oat-fixed", field, n_field)),
        ));
    }
    claims.push(check(
        "student_eot".into(),
        "A stochastic student stays more robust than its teacher when attacked with EOT".into(),
        "Tan et al. 2020",
        "student − at, PGD-20 robust accuracy (the student's attack with EOT)".into(),
        0.0,
        both(
            rate(results, "student", "robust_accuracy", "robust_examples"),
            rate(results, "at", "robust_accuracy", "robust_examples"),
        ),
    ));
    for (key, name, source) in CALIBRATION {
        claims.push(check(
            format!("calibration.{key}"),
            format!("{name} lowers the expected calibration error below normal training's"),
            source,
            format!("normal − {key}, ECE (15 bins)"),
            0.0,
            both(
                bootstrapped(results, "normal", &["ece"], false),
                bootstrapped(results, key, &["ece"], false),
            ),
        ));
    }
    claims
}

/// The claims as a Markdown section.
pub fn markdown(claims: &[Claim]) -> String {
    let mut s = String::from(
        "\n## Claims\n\nEach claim of the seed papers checked on this run: d is the difference \
         named (positive in the claim's direction, in points), with its 95 % interval \
         (MOVER from the two figures' intervals; conservative for models evaluated on \
         the same images). Supported: the interval lies above the bound; contradicted: \
         below it; inconclusive: it contains the bound.\n\n\
         | claim | source | d = | d [95 % CI] | bound | verdict | figures |\n\
         |---|---|---|---:|---:|---|---|\n",
    );
    for c in claims {
        let d = match (c.estimate, c.ci) {
            (Some(e), Some(ci)) => format!(
                "{:+.1} [{:+.1}, {:+.1}]",
                100.0 * e,
                100.0 * ci.lo,
                100.0 * ci.hi
            ),
            _ => "—".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:+.0} | **{}** | {} |\n",
            c.claim,
            c.source,
            c.comparison,
            d,
            100.0 * c.bound,
            c.verdict.text(),
            c.detail
        ));
    }
    s
}

#[cfg(test)]
mod tests;
