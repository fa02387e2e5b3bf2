//! AutoAttack over the first images of a data set, batch by batch, resumable: after
//! every batch its outcome is written atomically to `per_example/autoattack.json`, so a
//! run killed at any point and started again with the same settings continues from
//! the last finished batch and ends with the numbers of an uninterrupted run (batch
//! b's randomness depends only on the seed and its first index).

use std::path::Path;
use std::time::Instant;

use candle_core::ModuleT;
use rampart_attacks::{AutoAttack, Bounds, EvaluationReport, Norm};
use rampart_data::ImageDataset;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::io::{load_keyed, write_json, Keyed};
use crate::journal::fingerprint;
use crate::outputs::batch_logits;
use crate::shard::Rows;

/// How to run AutoAttack.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoAttackConfig {
    /// Threat model: L∞, L2 or L1.
    pub norm: Norm,
    /// Budget.
    pub eps: f64,
    /// Images attacked (the first N).
    pub limit: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Seed; batch b uses `seed + its first index`.
    pub seed: u64,
    /// The `rand` version (EOT over 20 draws, APGD-CE and APGD-DLR) instead of the
    /// standard one; for stochastic models.
    pub rand: bool,
}

impl AutoAttackConfig {
    /// The ensemble: `standard` or `rand` in the norm.
    pub fn ensemble(&self) -> AutoAttack {
        if self.rand {
            AutoAttack::rand(self.norm)
        } else {
            AutoAttack::standard(self.norm)
        }
    }
}

/// One finished batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoAttackBatch {
    /// Index of its first image.
    pub start: usize,
    /// Per image: classified correctly without attack.
    pub clean_correct: Vec<bool>,
    /// Per image: correct clean and under every stage.
    pub robust: Vec<bool>,
    /// Per image: the stage that fooled it (`None`: robust or a clean mistake).
    pub broken_by: Vec<Option<String>>,
    /// Per image: confidence of the returned point (the clean input where every stage
    /// failed).
    pub confidence: Vec<f32>,
    /// Raw logits (images × K, row-major) at the returned points (one forward pass).
    #[serde(default)]
    pub logits: Vec<f32>,
    /// The ensemble's report of the batch (stages, runtimes, trust checks).
    pub report: EvaluationReport,
}

/// The state of a run (`per_example/autoattack.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoAttackState {
    /// Fingerprint of the settings and of the model's clean logits on the first batch.
    pub key: String,
    /// The settings.
    pub config: AutoAttackConfig,
    /// Finished batches, in order.
    pub batches: Vec<AutoAttackBatch>,
}

impl Keyed for AutoAttackState {
    fn key(&self) -> &str {
        &self.key
    }
}

/// The outcome of a whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoAttackOutcome {
    /// The settings.
    pub config: AutoAttackConfig,
    /// `standard` or `rand`.
    pub version: String,
    /// Images attacked.
    pub examples: usize,
    /// Correct clean.
    pub clean_correct: usize,
    /// Correct clean and under every stage.
    pub robust: usize,
    /// Batches loaded from the state file instead of recomputed.
    pub resumed_batches: usize,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// Every trust warning of every batch, in words.
    pub trust_warnings: Vec<String>,
    /// Per-batch outcomes.
    pub batches: Vec<AutoAttackBatch>,
}

/// One stage of the ensemble (APGD-CE, APGD-T, …) over a whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageFigure {
    /// The stage's name.
    pub name: String,
    /// Images still robust after it (later stages attack only these), summed over
    /// batches.
    pub robust_after: usize,
    /// Its wall time, summed over batches.
    pub seconds: f64,
}

impl AutoAttackOutcome {
    /// The outcome of the finished `batches` of a run with `config` (of one shard, or
    /// of every shard in row order): counts and trust warnings summed over them.
    pub fn from_batches(
        config: AutoAttackConfig,
        batches: Vec<AutoAttackBatch>,
        resumed_batches: usize,
        seconds: f64,
    ) -> Self {
        let count = |f: fn(&AutoAttackBatch) -> &Vec<bool>| -> usize {
            batches
                .iter()
                .map(|b| f(b).iter().filter(|&&v| v).count())
                .sum()
        };
        let trust_warnings = batches
            .iter()
            .flat_map(|b| b.report.trust.warnings.iter().map(|w| w.to_string()))
            .collect();
        Self {
            config,
            version: config.ensemble().version,
            examples: batches.iter().map(|b| b.robust.len()).sum(),
            clean_correct: count(|b| &b.clean_correct),
            robust: count(|b| &b.robust),
            resumed_batches,
            seconds,
            trust_warnings,
            batches,
        }
    }

    /// Per attacked image, in order: correct clean and under every stage.
    pub fn robust_images(&self) -> Vec<bool> {
        self.batches
            .iter()
            .flat_map(|b| b.robust.iter().copied())
            .collect()
    }

    /// The stages of the first batch's report, in order, each over every batch (a
    /// batch without the stage counts 0 robust images for it). Robust accuracy
    /// against a stage alone is not measured: later stages only attack what the
    /// earlier ones left.
    pub fn stages(&self) -> Vec<StageFigure> {
        let names: Vec<String> = self
            .batches
            .first()
            .map(|b| b.report.stages.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        names
            .into_iter()
            .map(|name| {
                let robust_after = self
                    .batches
                    .iter()
                    .map(|b| {
                        let idx = b.report.stages.iter().position(|s| s.name == name);
                        idx.map_or(0, |j| {
                            (b.report.stages[j].robust_accuracy * b.robust.len() as f64).round()
                                as usize
                        })
                    })
                    .sum();
                let seconds = self
                    .batches
                    .iter()
                    .flat_map(|b| b.report.stages.iter().filter(|s| s.name == name))
                    .map(|s| s.seconds)
                    .sum();
                StageFigure {
                    name,
                    robust_after,
                    seconds,
                }
            })
            .collect()
    }
}

/// Runs (or resumes) AutoAttack on the rows `rows` of the first `config.limit` images
/// of `data` (all of them: [`crate::Shard::WHOLE`]'s rows; a shard's start on a batch
/// boundary, so its batches, seeds and results are the unsharded run's), saving the
/// state into `per_example` after every batch.
pub fn run_autoattack(
    model: &dyn ModuleT,
    bounds: Bounds,
    data: &ImageDataset,
    config: &AutoAttackConfig,
    rows: Rows,
    per_example: &Path,
    device: &candle_core::Device,
) -> Result<AutoAttackOutcome> {
    let ensemble = config.ensemble();
    ensemble
        .validate()
        .map_err(EvalError::attack("autoattack"))?;
    config
        .norm
        .check_eps(config.eps)
        .map_err(EvalError::attack("autoattack"))?;
    if config.batch_size == 0 || config.limit == 0 {
        return Err(EvalError::Config(
            "AutoAttack needs a batch size and a limit of at least 1".into(),
        ));
    }
    let n = config.limit.min(data.len());
    if rows.end > n || !rows.start.is_multiple_of(config.batch_size) {
        return Err(EvalError::Shard(format!(
            "rows {}..{} are not whole batches of {} of the {n} attacked images",
            rows.start, rows.end, config.batch_size
        )));
    }
    let started = Instant::now();
    let indices: Vec<usize> = rows.range().collect();
    let chunks: Vec<&[usize]> = indices.chunks(config.batch_size).collect();
    if chunks.is_empty() {
        return Err(EvalError::Config("no image to attack".into()));
    }
    let config_json = serde_json::to_string(config)
        .map_err(|e| EvalError::Config(format!("AutoAttack settings: {e}")))?;
    let key = fingerprint(model, data, n, config.batch_size, &config_json, device)?;
    let path = per_example.join("autoattack.json");
    let mut state = match load_keyed::<AutoAttackState>(&path, &key) {
        Some(s) => {
            tracing::info!(
                batches = s.batches.len(),
                "AutoAttack resumed from {}",
                path.display()
            );
            s
        }
        None => AutoAttackState {
            key,
            config: *config,
            batches: Vec::new(),
        },
    };
    let resumed_batches = state.batches.len();
    for (b, chunk) in chunks.iter().enumerate() {
        crate::error::check_interrupt()?;
        if let Some(done) = state.batches.get(b) {
            if done.start == chunk[0] && done.robust.len() == chunk.len() {
                continue;
            }
            state.batches.truncate(b);
        }
        let (xs, ys) = data.batch_tensors(chunk, device)?;
        let seed = config.seed.wrapping_add(chunk[0] as u64);
        let eval = ensemble
            .evaluate(model, bounds, &xs, &ys, config.eps, seed)
            .map_err(EvalError::attack("autoattack"))?;
        let (logits, _) = batch_logits(model, &eval.result.clipped)?;
        let robust: Vec<bool> = eval
            .result
            .success
            .iter()
            .zip(&eval.clean_correct)
            .map(|(s, c)| *c && !*s)
            .collect();
        state.batches.push(AutoAttackBatch {
            start: chunk[0],
            clean_correct: eval.clean_correct.clone(),
            robust,
            broken_by: eval.broken_by.clone(),
            confidence: eval.result.confidence.clone(),
            logits,
            report: eval.report,
        });
        write_json(&path, &state)?;
        let robust_so_far: usize = state
            .batches
            .iter()
            .map(|b| b.robust.iter().filter(|&&r| r).count())
            .sum();
        tracing::info!(
            done = chunk[chunk.len() - 1] + 1,
            of = n,
            robust = robust_so_far,
            "autoattack batch"
        );
    }
    Ok(AutoAttackOutcome::from_batches(
        *config,
        state.batches,
        resumed_batches,
        started.elapsed().as_secs_f64(),
    ))
}
