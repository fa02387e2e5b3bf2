//! From per-example results to what a reader gets: the settings that shape an
//! evaluation's numbers, the per-example files' names, and the report of a whole run
//! (`results.json`, `results.md`, `plots/`), written by a run and by a merge of shards
//! alike.

use std::path::{Path, PathBuf};

use rampart_attacks::{Bounds, Eot, Norm};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::io::{write_atomic, write_json};
use crate::plot;
use crate::records::{AttackRecord, DistalRecord, SearchRecord};
use crate::report::{
    build_report, CorruptionInputs, EvalReport, MetricSettings, ReportInputs, ThreatModelInputs,
};
use crate::runner::{EvalConfig, ModelInfo};
use crate::suite::{Effort, Suite, SuitePlan};
use crate::trust::{TrustChecks, TrustConfig};

/// Everything of an [`EvalConfig`] that shapes the numbers (not where they are written,
/// the device or progress bars): what shards of one evaluation must share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Settings {
    pub suite: Suite,
    pub effort: Effort,
    pub test_limit: Option<usize>,
    pub held_out: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub bounds: Bounds,
    pub eot: Eot,
    pub trust: TrustConfig,
    pub metrics: MetricSettings,
    pub curve_points: Option<usize>,
    pub plots: bool,
}

impl Settings {
    pub(crate) fn of(c: &EvalConfig) -> Settings {
        Settings {
            suite: c.suite,
            effort: c.effort,
            test_limit: c.test_limit,
            held_out: c.held_out,
            batch_size: c.batch_size,
            seed: c.seed,
            bounds: c.bounds,
            eot: c.eot,
            trust: c.trust,
            metrics: c.metrics,
            curve_points: c.curve_points,
            plots: c.plots,
        }
    }

    /// The suite resolved with these settings' effort, bounds, EOT and curve grid.
    pub(crate) fn plan(&self) -> SuitePlan {
        let mut plan = self.suite.plan(self.effort, self.bounds);
        plan.set_eot(self.eot);
        if let Some(points) = self.curve_points {
            plan.curve.grid_points = points;
        }
        plan
    }
}

/// The files of `OUT/per_example/`.
pub(crate) mod files {
    use std::path::{Path, PathBuf};

    /// Clean logits of the attacked images.
    pub(crate) fn clean(dir: &Path) -> PathBuf {
        dir.join("clean.safetensors")
    }
    /// Clean logits of the held-out images.
    pub(crate) fn held_out(dir: &Path) -> PathBuf {
        dir.join("held_out.safetensors")
    }
    /// The record of step `name` (`<threat model>.<attack>`).
    pub(crate) fn attack(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.json"))
    }
    /// The adversarial logits of step `name`.
    pub(crate) fn attack_logits(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.logits.safetensors"))
    }
    /// A threat model's per-example worst case.
    pub(crate) fn worst(dir: &Path, threat_model: &str) -> PathBuf {
        dir.join(format!("{threat_model}.worst.json"))
    }
    /// The trust checks.
    pub(crate) fn trust(dir: &Path) -> PathBuf {
        dir.join("trust.json")
    }
    /// Noise and distal examples.
    pub(crate) fn distal(dir: &Path) -> PathBuf {
        dir.join("distal.json")
    }
    /// The minimal-ε search.
    pub(crate) fn search(dir: &Path) -> PathBuf {
        dir.join("min_eps_linf.json")
    }
    /// The logits of corruption `name` (`<corruption>_<severity>`).
    pub(crate) fn corruption(dir: &Path, name: &str) -> PathBuf {
        dir.join("corruptions").join(format!("{name}.safetensors"))
    }
}

/// A threat model's attack records, in the plan's order.
pub(crate) struct ThreatModelRecords {
    pub name: String,
    pub norm: String,
    pub eps: f64,
    pub records: Vec<AttackRecord>,
}

/// Every per-example result of an evaluation (or of a shard's rows), aligned.
pub(crate) struct Steps {
    pub classes: usize,
    pub labels: Vec<u32>,
    pub logits: Vec<f32>,
    pub held_out_labels: Vec<u32>,
    pub held_out_logits: Vec<f32>,
    pub threat_models: Vec<ThreatModelRecords>,
    pub trust: Option<TrustChecks>,
    pub distal: DistalRecord,
    pub search: SearchRecord,
    /// (corruption, severity, logits).
    pub corrupted: Vec<(String, u8, Vec<f32>)>,
}

impl Steps {
    /// The report of these results (`eval_seconds` and `resumed` as given).
    pub(crate) fn report(
        &self,
        settings: &Settings,
        plan: &SuitePlan,
        info: &ModelInfo,
        resumed: Vec<String>,
        eval_seconds: f64,
    ) -> Result<EvalReport> {
        let mut report = build_report(&ReportInputs {
            suite: settings.suite.name().to_string(),
            num_classes: self.classes,
            labels: &self.labels,
            logits: &self.logits,
            held_out_labels: &self.held_out_labels,
            held_out_logits: &self.held_out_logits,
            model_threshold: info.confidence_threshold,
            threat_models: self
                .threat_models
                .iter()
                .map(|t| ThreatModelInputs {
                    name: t.name.clone(),
                    norm: t.norm.clone(),
                    eps: t.eps,
                    attacks: t.records.iter().collect(),
                })
                .collect(),
            noise_confidence: Some(&self.distal.noise_confidence),
            distal_confidence: Some(&self.distal.distal_confidence),
            curve: Some((&plan.curve, &self.search.min_eps)),
            corruptions: self
                .corrupted
                .iter()
                .map(|(name, severity, values)| CorruptionInputs {
                    name: name.clone(),
                    severity: *severity,
                    logits: values,
                })
                .collect(),
            metrics: MetricSettings {
                seed: settings.seed,
                ..settings.metrics
            },
        })?;
        report.trust = self.trust.clone();
        report.model = info.model_file.clone();
        report.method = info.method.clone();
        report.arch = info.arch.clone();
        report.dataset = info.dataset.clone();
        report.resumed = resumed;
        report.eval_seconds = eval_seconds;
        Ok(report)
    }
}

/// Writes `results.json`, `results.md` and (with `plots`) `plots/` of `report` into
/// `out`.
pub(crate) fn publish(
    report: &EvalReport,
    info: &ModelInfo,
    out: &Path,
    plots: bool,
) -> Result<()> {
    let plots = if plots {
        write_model_plots(report, "", &out.join("plots"), true)?
    } else {
        Vec::new()
    };
    let links: Vec<(String, String)> = plots
        .iter()
        .map(|(caption, path)| (caption.clone(), format!("plots/{}", file_name(path))))
        .collect();
    write_json(&out.join("results.json"), report)?;
    let title = match (&info.method, &info.model_file) {
        (Some(m), _) => format!("Evaluation of `{m}`"),
        (None, Some(f)) => format!("Evaluation of `{}`", f.display()),
        (None, None) => "Evaluation".to_string(),
    };
    write_atomic(
        &out.join("results.md"),
        report.markdown(&title, &links).as_bytes(),
    )
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Draws a model's reliability diagram, confidence histograms and (with `with_curve`)
/// accuracy curve into `dir`, file names prefixed by `prefix`; returns (caption, PNG
/// path) of each.
pub(crate) fn write_model_plots(
    report: &EvalReport,
    prefix: &str,
    dir: &Path,
    with_curve: bool,
) -> Result<Vec<(String, PathBuf)>> {
    let mut plots = Vec::new();
    if let Some(c) = report.accuracy_curve.as_ref().filter(|_| with_curve) {
        let name = report.method.as_deref().unwrap_or("model");
        let paths = plot::plot_accuracy_curves(
            &[(name, &c.curve)],
            &dir.join(format!("{prefix}accuracy_curve")),
        )?;
        plots.push(("Accuracy–perturbation curve".to_string(), paths[0].clone()));
    }
    let paths = plot::plot_reliability(
        &report.reliability,
        report.ece,
        "Reliability diagram",
        &dir.join(format!("{prefix}reliability")),
    )?;
    plots.push(("Reliability diagram".to_string(), paths[0].clone()));
    let paths = plot::plot_confidence_histograms(
        &report.confidence_histograms,
        "Confidence on clean, adversarial and distal inputs",
        &dir.join(format!("{prefix}confidence_histogram")),
    )?;
    plots.push(("Confidence histograms".to_string(), paths[0].clone()));
    Ok(plots)
}

/// `linf`, `l2`, `l1` or `l0`.
pub(crate) fn norm_name(norm: Norm) -> String {
    match norm {
        Norm::Linf => "linf",
        Norm::L2 => "l2",
        Norm::L1 { .. } => "l1",
        Norm::L0 => "l0",
    }
    .to_string()
}
