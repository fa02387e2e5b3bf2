//! The evaluation of Rampart: runs a suite of attacks, OOD sets and corruptions on a
//! model, measures robustness and calibration with `rampart-metrics`, and writes the
//! results (`results.json`, a Markdown table, PNG and SVG plots).
//!
//! This crate owns the *protocol*: which attacks make up a threat model ([`Suite`],
//! [`SuitePlan`]), how the test split is cut (the last [`CCAT_HELD_OUT`] images pick
//! τ at 99 % TPR and fit the temperature; the first `test_limit` of the rest are
//! attacked), how per-example results are combined (worst case per example over every
//! attack of a threat model) and how they are saved (one record per step under
//! `OUT/per_example/`, written atomically when the step finishes and keyed by a digest
//! of the clean logits and the step's configuration, so an interrupted evaluation
//! resumes and metrics can be recomputed without re-attacking). It must not define
//! metrics (they live in `rampart-metrics`), attacks (`rampart-attacks`), models or
//! data formats; it only wires them together. `docs/evaluation.md` describes the
//! suites and outputs.
//!
//! Entry points:
//! * [`run_suite`] (a model file) and [`evaluate`] / [`evaluate_model`] (any
//!   `candle_core::ModuleT`) evaluate one model into an [`EvalReport`];
//! * [`compare_models`] writes the comparison tables and the combined
//!   accuracy–perturbation chart of several reports; [`write_report`] returns the same
//!   as a Markdown section for a study's `report.md`;
//! * [`plot_accuracy_curves`], [`plot_reliability`], [`plot_confidence_histograms`]
//!   draw single charts;
//! * [`Shard`] cuts an evaluation into shards (`EvalConfig::shard`) whose outputs
//!   [`read_shards`] checks and [`merge_eval`] merges into exactly the unsharded run's.
//!
//! Beside the suites it owns the loops of every other evaluation path, so a caller
//! (the `rampart` command) only builds configs, calls them and writes files:
//! [`worst_case`] (several attacks at one ε, per-example worst case: `--suite pgd20`),
//! [`run_autoattack`] (AutoAttack batch by batch, resumable, with
//! [`AutoAttackOutcome::stages`]), [`over_noise_draws`] (a stochastic model's clean
//! and robust accuracy over independent noise draws), [`attack_at_eps`] (one attack
//! at several ε: `rampart attack`) and [`check_first`] (the trust checks on the first
//! attacked images). The loops that attack batch by batch save every finished batch
//! ([`BatchJournal`]) so a killed run continues from the last one.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use rampart_eval::{run_suite, compare_models, EvalConfig, Suite, Effort};
//!
//! let splits = rampart_data::load(rampart_data::DatasetKind::Cifar10, Path::new("data"))?;
//! let mut config = EvalConfig::new(Suite::Quick, "runs/normal/eval");
//! config.test_limit = Some(1000);
//! config.effort = Effort::new(1.0, 1.0)?;
//! let normal = run_suite(Path::new("runs/normal/model.safetensors"), &splits.test, &config)?;
//! compare_models(&[("normal", &normal)], Path::new("runs"))?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod autoattack;
mod compare;
mod draws;
mod error;
mod io;
mod journal;
mod merge;
mod outputs;
mod plot;
mod publish;
mod records;
mod report;
mod robust;
mod runner;
mod search;
mod shard;
mod single;
mod suite;
mod trust;

pub use autoattack::{
    run_autoattack, AutoAttackBatch, AutoAttackConfig, AutoAttackOutcome, AutoAttackState,
    StageFigure,
};
pub use compare::{compare_models, comparison_tables, write_report};
pub use draws::{over_noise_draws, NoiseDraws, StochasticFigures};
pub use error::{EvalError, Result};
pub use journal::{fingerprint, BatchJournal};
pub use merge::merge_eval;
pub use outputs::logits_of as dataset_logits;
pub use plot::{
    plot_accuracy_curves, plot_confidence_histograms, plot_lines, plot_reliability, Series,
};
pub use records::{AttackRecord, DistalRecord, SearchRecord, ThreatModelRecord, TrustRecord};
pub use report::{
    AttackSummary, ConfidenceHistograms, CorruptionReport, CurveReport, EvalReport, MetricSettings,
    OodReport, ThreatModelReport, EVAL_SCHEMA_VERSION, HISTOGRAM_BINS,
};
pub use robust::{
    objective_label, objective_variants, worst_case, NamedAttack, WorstCase, WorstCaseRecord,
    WORST_CASE_OBJECTIVES,
};
pub use runner::{
    evaluate, evaluate_model, run_suite, EvalConfig, ModelInfo, CCAT_HELD_OUT,
    CONFIDENCE_THRESHOLD_KEY, STOCHASTIC_EOT,
};
pub use shard::{
    fingerprint_digest, read_shards, settings_digest, Fingerprint, Rows, Shard, ShardManifest,
    MANIFEST as SHARD_MANIFEST,
};
pub use single::{attack_at_eps, EpsResults};
pub use suite::{
    threat_model_name, AttackKind, AttackPlan, CorruptionPlan, CurvePlan, DistalPlan, Effort,
    Suite, SuitePlan, ThreatModel, DISTAL_EPS, HEADLINE_THREAT_MODEL,
};
pub use trust::{
    box_diameter, check_first, run_checks, trust_cost, EpsPoint, TrustChecks, TrustConfig,
    TrustIssue, BUDGET_FACTOR, BUDGET_TOLERANCE, EPS_FACTORS, GROWTH_TOLERANCE, NOISE_SAMPLES,
    TRUST_EXAMPLES, UNBOUNDED_TOLERANCE,
};

#[cfg(test)]
mod tests;
