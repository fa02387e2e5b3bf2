//! Several models side by side: comparison tables and the combined curve chart, as a
//! Markdown section a study report can embed.

use std::collections::BTreeSet;
use std::path::Path;

use crate::error::{EvalError, Result};
use crate::io::write_atomic;
use crate::plot;
use crate::publish::{file_name, write_model_plots};
use crate::report::{pct_ci, EvalReport, ThreatModelReport};
use crate::suite::HEADLINE_THREAT_MODEL;
use rampart_metrics::Interval;

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{:.2}", 100.0 * v))
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Threat models of all reports: the headline first, the rest in name order.
fn threat_model_columns(reports: &[(&str, &EvalReport)]) -> Vec<String> {
    let all: BTreeSet<&String> = reports
        .iter()
        .flat_map(|(_, r)| r.threat_models.keys())
        .collect();
    let mut cols: Vec<String> = all
        .into_iter()
        .filter(|n| n.as_str() != HEADLINE_THREAT_MODEL)
        .cloned()
        .collect();
    if reports
        .iter()
        .any(|(_, r)| r.threat_models.contains_key(HEADLINE_THREAT_MODEL))
    {
        cols.insert(0, HEADLINE_THREAT_MODEL.to_string());
    }
    cols
}

/// One Markdown cell per threat model in `tms`: the figure `of` picks, with its
/// interval, in %, or a dash where the report lacks the threat model.
fn threat_model_cells(
    r: &EvalReport,
    tms: &[String],
    of: impl Fn(&ThreatModelReport) -> (Option<f64>, Option<Interval>),
) -> String {
    tms.iter()
        .map(|t| {
            let (value, ci) = r.threat_models.get(t).map_or((None, None), &of);
            format!(" {} |", pct_ci(value, ci))
        })
        .collect()
}

/// The comparison tables (robustness, confidence-thresholded protocol, calibration and
/// OOD), one row per model, numbers in % except Brier, NLL and T.
pub fn comparison_tables(reports: &[(&str, &EvalReport)]) -> String {
    let tms = threat_model_columns(reports);
    let mut md = String::from("### Robust error (%)\n\nPer threat model: an example counts as an error if the clean image or any adversarial version is misclassified (worst case over every attack of the threat model).\n\n| model | suite | test images | clean err |");
    for t in &tms {
        md.push_str(&format!(" {t} |"));
    }
    md.push_str(" AUAC |\n|---|---|---:|---:|");
    md.push_str(&"---:|".repeat(tms.len() + 1));
    md.push('\n');
    for (name, r) in reports {
        md.push_str(&format!(
            "| {name} | {} | {} | {} |",
            r.suite,
            r.test_examples,
            pct_ci(Some(r.clean_error), r.clean_error_ci)
        ));
        md.push_str(&threat_model_cells(r, &tms, |x| {
            (Some(x.robust_error), x.robust_error_ci)
        }));
        md.push_str(&format!(" {} |\n", pct_ci(r.auac, r.auac_ci)));
    }

    md.push_str("\n### Confidence-thresholded (CCAT protocol, τ at 99 % TPR on the held-out images)\n\n| model | τ | Err@τ |");
    for t in &tms {
        md.push_str(&format!(" RErr@τ {t} |"));
    }
    md.push_str(&format!(
        " FPR@τ {HEADLINE_THREAT_MODEL} | ROC AUC {HEADLINE_THREAT_MODEL} |\n|---|---:|---:|"
    ));
    md.push_str(&"---:|".repeat(tms.len() + 2));
    md.push('\n');
    for (name, r) in reports {
        md.push_str(&format!(
            "| {name} | {} | {} |",
            r.tau_at_tpr99.map_or("–".into(), |t| format!("{t:.4}")),
            pct_ci(r.err_at_tpr99, r.err_at_tpr99_ci)
        ));
        md.push_str(&threat_model_cells(r, &tms, |x| {
            (x.rerr_at_tpr99, x.rerr_at_tpr99_ci)
        }));
        md.push_str(&format!(
            " {} | {} |\n",
            pct(r.fpr_at_tpr99),
            pct(r.roc_auc)
        ));
    }

    md.push_str("\n### Calibration and out-of-distribution inputs\n\nECE with 15 bins; (T): after temperature scaling fitted on the held-out images. Corrupted: mean over every corruption and severity run. OOD: AUROC of clean vs the set by confidence, and the share of the set accepted at τ.\n\n| model | ECE | Brier | NLL | T | ECE (T) | NLL (T) | corrupted err | corrupted ECE | distal FPR@τ | distal AUROC | noise AUROC | corrupted AUROC |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (name, r) in reports {
        let ood = |set: &str| r.ood.get(set);
        md.push_str(&format!(
            "| {name} | {} | {:.4} | {:.4} | {:.3} | {} | {:.4} | {} | {} | {} | {} | {} | {} |\n",
            pct_ci(Some(r.ece), r.ece_ci),
            r.brier,
            r.nll,
            r.temperature,
            pct(Some(r.ece_temperature_scaled)),
            r.nll_temperature_scaled,
            pct(mean(r.corruptions.iter().map(|c| c.error))),
            pct(mean(r.corruptions.iter().map(|c| c.ece))),
            pct(ood("distal").and_then(|o| o.fpr_at_tpr99)),
            pct(ood("distal").map(|o| o.auroc)),
            pct(ood("noise").map(|o| o.auroc)),
            pct(ood("corrupted").map(|o| o.auroc)),
        ));
    }
    md.push_str(&differences(reports, &tms));
    md
}

/// Pairs of models whose 95 % intervals of a figure do not overlap: the differences
/// between them that are outside the noise of the samples (a conservative rule:
/// non-overlapping intervals imply p < 0.05, overlapping ones do not imply the
/// opposite). Every trust-check failure is listed too.
fn differences(reports: &[(&str, &EvalReport)], tms: &[String]) -> String {
    type Figure = Box<dyn Fn(&EvalReport) -> Option<(f64, Interval)>>;
    let mut figures: Vec<(String, Figure)> = vec![
        (
            "clean err".into(),
            Box::new(|r: &EvalReport| r.clean_error_ci.map(|c| (r.clean_error, c))),
        ),
        (
            "ECE".into(),
            Box::new(|r: &EvalReport| r.ece_ci.map(|c| (r.ece, c))),
        ),
        (
            "AUAC".into(),
            Box::new(|r: &EvalReport| r.auac.zip(r.auac_ci)),
        ),
        (
            "Err@τ".into(),
            Box::new(|r: &EvalReport| r.err_at_tpr99.zip(r.err_at_tpr99_ci)),
        ),
    ];
    for t in tms {
        let (a, b) = (t.clone(), t.clone());
        figures.push((
            format!("robust err {t}"),
            Box::new(move |r: &EvalReport| {
                r.threat_models
                    .get(&a)
                    .and_then(|x| x.robust_error_ci.map(|c| (x.robust_error, c)))
            }),
        ));
        figures.push((
            format!("RErr@τ {t}"),
            Box::new(move |r: &EvalReport| {
                r.threat_models
                    .get(&b)
                    .and_then(|x| x.rerr_at_tpr99.zip(x.rerr_at_tpr99_ci))
            }),
        ));
    }
    let mut md = String::from(
        "
### Differences outside the noise

For each figure, the pairs of models whose 95 %          intervals (Wilson for error rates, bootstrap otherwise) do not overlap, written          `lower < higher`; a pair not listed differs by less than the sampling noise can          resolve (a conservative rule).

| figure | pairs outside the noise |
|---|---|
",
    );
    for (label, f) in &figures {
        let mut pairs = Vec::new();
        for (i, (na, ra)) in reports.iter().enumerate() {
            for (nb, rb) in &reports[i + 1..] {
                if let (Some((va, ca)), Some((vb, cb))) = (f(ra), f(rb)) {
                    if !ca.overlaps(&cb) {
                        pairs.push(if va < vb {
                            format!("{na} < {nb}")
                        } else {
                            format!("{nb} < {na}")
                        });
                    }
                }
            }
        }
        let cell = if pairs.is_empty() {
            "none".to_string()
        } else {
            pairs.join(", ")
        };
        md.push_str(&format!("| {label} | {cell} |\n"));
    }
    let failed: Vec<String> = reports
        .iter()
        .filter_map(|(name, r)| {
            r.trust.as_ref().filter(|t| !t.passed()).map(|t| {
                let checks: Vec<&str> = t.issues.iter().map(|i| i.check.as_str()).collect();
                format!("**{name}**: {}", checks.join(", "))
            })
        })
        .collect();
    if !failed.is_empty() {
        md.push_str(&format!(
            "\n> **Warning: trust checks failed** (see each model's results.md): {}\n",
            failed.join("; ")
        ));
    }
    md
}

/// Draws every plot of `reports` into `plot_dir` (the combined accuracy–perturbation
/// chart `accuracy_curves.{png,svg}`, and per model `<name>_reliability` and
/// `<name>_confidence_histogram`) and returns a Markdown section: the comparison
/// tables, then the images linked as `{link_prefix}<file>.png`. A report at `OUT/report.md`
/// with plots in `OUT/plots/` passes `link_prefix = "plots/"`.
pub fn write_report(
    reports: &[(&str, &EvalReport)],
    plot_dir: &Path,
    link_prefix: &str,
) -> Result<String> {
    if reports.is_empty() {
        return Err(EvalError::Config("no evaluation to report".into()));
    }
    let mut md = comparison_tables(reports);
    let curves: Vec<(&str, &rampart_metrics::AccuracyCurve)> = reports
        .iter()
        .filter_map(|(name, r)| r.accuracy_curve.as_ref().map(|c| (*name, &c.curve)))
        .collect();
    if !curves.is_empty() {
        let paths = plot::plot_accuracy_curves(&curves, &plot_dir.join("accuracy_curves"))?;
        md.push_str(&format!(
            "\n### Accuracy–perturbation curves\n\nAccuracy at each L∞ ε from per-example minimal adversarial ε (bisection over ε on top of PGD); AUAC is the area under the curve divided by ε_max.\n\n![Accuracy–perturbation curves]({link_prefix}{})\n",
            file_name(&paths[0])
        ));
    }
    md.push_str("\n### Calibration and confidence per model\n");
    for (name, r) in reports {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let plots = write_model_plots(r, &format!("{safe}_"), plot_dir, false)?;
        md.push_str(&format!("\n#### {name}\n\n"));
        for (caption, path) in &plots {
            md.push_str(&format!(
                "![{name}: {caption}]({link_prefix}{})\n",
                file_name(path)
            ));
        }
    }
    Ok(md)
}

/// Compares evaluated models: writes `out_dir/comparison.md` (the tables and the
/// images of [`write_report`]) with the plots in `out_dir/plots/`.
pub fn compare_models(reports: &[(&str, &EvalReport)], out_dir: &Path) -> Result<()> {
    let section = write_report(reports, &out_dir.join("plots"), "plots/")?;
    let md = format!("# Comparison of {} models\n\n{section}", reports.len());
    write_atomic(&out_dir.join("comparison.md"), md.as_bytes())
}
