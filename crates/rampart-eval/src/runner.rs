//! The evaluation pipeline: clean pass, attacks per threat model, distal examples and
//! noise, the minimal-ε search, corruptions; per-example records saved after each step
//! and, within a step, every finished batch (resumable); then the report, its Markdown
//! table and plots.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rampart_attacks::{Attack, Bounds, Criterion, Distal, Passes};
use rampart_data::ImageDataset;
use rampart_models::Classifier;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::io::{digest, load_keyed, write_json, Logits};
use crate::journal::BatchJournal;
use crate::merge::ShardDetails;
use crate::outputs::{batch_logits, dataset_logits, Outcomes};
use crate::publish::{files, norm_name, publish, Settings, Steps, ThreatModelRecords};
use crate::records::{worst_case_record, AttackRecord, DistalRecord, SearchRecord, TrustRecord};
use crate::report::{EvalReport, MetricSettings};
use crate::search::minimal_eps;
use crate::shard::{settings_digest, Fingerprint, Rows, Shard, ShardManifest, MANIFEST};
use crate::suite::{Effort, Suite, SuitePlan};
use crate::trust::{run_checks, TrustConfig};

/// Test images held out at the end of the test split to pick τ and fit the temperature
/// (CCAT: the last 1,000).
pub const CCAT_HELD_OUT: usize = 1000;

/// Metadata key of a model's own confidence threshold (written by CCAT training).
pub const CONFIDENCE_THRESHOLD_KEY: &str = "confidence_threshold";

/// EOT samples (gradient draws per step and draws judging success) of every attack on
/// a stochastic model when the caller does not choose: 20, as AutoAttack's `rand`
/// version (REFERENCE §2).
pub const STOCHASTIC_EOT: usize = 20;

/// How to run an evaluation. Written to `OUT/config.json` (all but the device).
#[derive(Clone, Debug, Serialize)]
pub struct EvalConfig {
    /// The suite.
    pub suite: Suite,
    /// Budget multipliers of every attack ([`Effort::PAPER`] = as published).
    pub effort: Effort,
    /// Attack only the first N examples of the test split (after removing the held-out
    /// part); `None`: all of them.
    pub test_limit: Option<usize>,
    /// Examples at the end of the test split held out for τ and temperature scaling;
    /// they are never attacked. CCAT: 1,000.
    pub held_out: usize,
    /// Examples per forward pass and per attack batch.
    pub batch_size: usize,
    /// Seed of every random start, noise image and corruption.
    pub seed: u64,
    /// Output folder (`results.json`, `results.md`, `config.json`, `per_example/`,
    /// `plots/`).
    pub out_dir: PathBuf,
    /// Input bounds of the model (data are in [0, 1]).
    pub bounds: Bounds,
    /// Show progress bars (they are hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Draw the plots.
    pub plots: bool,
    /// Expectation over transformation for every attack of the suite: one sample
    /// ([`Eot::OFF`]) for deterministic models; several for a stochastic model (the
    /// `rampart eval` command uses [`STOCHASTIC_EOT`] for those).
    pub eot: rampart_attacks::Eot,
    /// The trust checks run on the first attacked images ([`TrustConfig::examples`] = 0
    /// switches them off).
    pub trust: TrustConfig,
    /// ECE bins, the TPR that picks τ and the bootstrap of the intervals.
    pub metrics: MetricSettings,
    /// Points of the reported accuracy–perturbation curve's ε grid (`None`: the
    /// suite's, 65).
    pub curve_points: Option<usize>,
    /// Which shard of the attacked images to run ([`Shard::WHOLE`]: all of them).
    #[serde(skip_serializing_if = "Shard::is_whole")]
    pub shard: Shard,
    /// Device of the model and the batches.
    #[serde(skip)]
    pub device: Device,
}

impl EvalConfig {
    /// Defaults: the paper budgets, the suite's default test limit (1,000 attacked images
    /// for `quick`, all for `ccat` and `full`), 1,000 held out, batch 128, seed 0,
    /// bounds [0, 1], progress bars and plots on, unsharded, CPU.
    pub fn new(suite: Suite, out_dir: impl Into<PathBuf>) -> Self {
        EvalConfig {
            suite,
            effort: Effort::PAPER,
            test_limit: suite.default_test_limit(),
            held_out: CCAT_HELD_OUT,
            batch_size: 128,
            seed: 0,
            out_dir: out_dir.into(),
            bounds: Bounds::UNIT,
            progress: true,
            plots: true,
            eot: rampart_attacks::Eot::OFF,
            trust: TrustConfig::default(),
            metrics: MetricSettings::default(),
            curve_points: None,
            shard: Shard::WHOLE,
            device: Device::Cpu,
        }
    }

    /// The suite resolved with this configuration's effort, bounds, EOT and curve grid:
    /// what [`evaluate`] runs.
    pub fn plan(&self) -> SuitePlan {
        Settings::of(self).plan()
    }

    /// What [`evaluate`] costs on a test set of `test_images` images, in network passes
    /// (totals, not per image): the clean pass over the attacked and held-out images,
    /// the plan on this shard's attacked images ([`SuitePlan::cost`]) and the trust
    /// checks on theirs ([`SuitePlan::trust_cost`]). Upper bounds, as the attacks'
    /// counts are.
    pub fn cost(&self, test_images: usize) -> Result<Passes> {
        self.validate(test_images)?;
        let available = test_images - self.held_out;
        let attacked = self.test_limit.unwrap_or(available).min(available);
        let rows = self.shard.rows(attacked, self.batch_size)?;
        let plan = self.plan();
        let trusted = if rows.range().start == 0 {
            self.trust.examples.min(attacked).min(rows.range().end)
        } else {
            0
        };
        let clean = attacked + self.held_out;
        Ok(Passes::forward(clean as f64)
            + plan.cost() * rows.len() as f64
            + plan.trust_cost(&self.trust) * trusted as f64)
    }

    fn validate(&self, test_len: usize) -> Result<()> {
        self.effort.validate()?;
        self.metrics.validate()?;
        if self.curve_points.is_some_and(|p| p < 2) {
            return Err(EvalError::Config(
                "the accuracy curve needs at least 2 grid points".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(EvalError::Config("batch size must be at least 1".into()));
        }
        if self.held_out == 0 {
            return Err(EvalError::Config(
                "at least one held-out example is needed to pick τ and the temperature".into(),
            ));
        }
        if self.test_limit == Some(0) {
            return Err(EvalError::Config("test_limit must be at least 1".into()));
        }
        if test_len <= self.held_out {
            return Err(EvalError::Config(format!(
                "the test split has {test_len} examples, not more than the {} held out: nothing is left to attack",
                self.held_out
            )));
        }
        if !(self.bounds.lo.is_finite()
            && self.bounds.hi.is_finite()
            && self.bounds.lo < self.bounds.hi)
        {
            return Err(EvalError::Config(format!(
                "bounds must be finite with lo < hi, got [{}, {}]",
                self.bounds.lo, self.bounds.hi
            )));
        }
        Ok(())
    }
}

/// What is known about the evaluated model, copied into the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model file.
    pub model_file: Option<PathBuf>,
    /// Training method.
    pub method: Option<String>,
    /// Architecture.
    pub arch: Option<String>,
    /// Data set it was trained on.
    pub dataset: Option<String>,
    /// Its own confidence threshold, if it carries one.
    pub confidence_threshold: Option<f64>,
}

impl ModelInfo {
    /// Reads what a [`Classifier`] knows about itself: `method` and `dataset` metadata,
    /// and [`CONFIDENCE_THRESHOLD_KEY`], either a number or a JSON object with a
    /// numeric `tau` (as CCAT training writes it); anything else is ignored with a
    /// warning.
    pub fn of(model: &Classifier, model_file: Option<&Path>) -> ModelInfo {
        let meta = model.metadata();
        let confidence_threshold = meta.get(CONFIDENCE_THRESHOLD_KEY).and_then(|v| {
            let parsed = v.trim().parse::<f64>().ok().or_else(|| {
                serde_json::from_str::<serde_json::Value>(v)
                    .ok()
                    .and_then(|j| j.get("tau").and_then(serde_json::Value::as_f64))
            });
            match parsed {
                Some(t) if t.is_finite() => Some(t),
                _ => {
                    tracing::warn!(value = %v, "ignoring the model's unparsable `{CONFIDENCE_THRESHOLD_KEY}`");
                    None
                }
            }
        });
        ModelInfo {
            model_file: model_file.map(Path::to_path_buf),
            method: meta.get("method").cloned(),
            arch: Some(model.spec().arch.to_string()),
            dataset: meta.get("dataset").cloned(),
            confidence_threshold,
        }
    }
}

/// Loads the model at `model_path` (any `Classifier` file) and evaluates it on
/// `test_set` (the whole test split: the last `config.held_out` images are held out).
/// The model's bounds replace `config.bounds`. See [`evaluate_model`].
pub fn run_suite(
    model_path: &Path,
    test_set: &ImageDataset,
    config: &EvalConfig,
) -> Result<EvalReport> {
    let model = Classifier::load(model_path, &config.device)?;
    let spec = model.spec();
    if spec.num_classes != test_set.num_classes() {
        return Err(EvalError::Config(format!(
            "{} has {} outputs but the data set has {} classes",
            model_path.display(),
            spec.num_classes,
            test_set.num_classes()
        )));
    }
    let (c, h, w) = test_set.shape();
    if spec.input_shape != [c, h, w] {
        return Err(EvalError::Config(format!(
            "{} takes inputs {:?} but the images are {:?}",
            model_path.display(),
            spec.input_shape,
            [c, h, w]
        )));
    }
    let config = EvalConfig {
        bounds: Bounds {
            lo: spec.bounds[0],
            hi: spec.bounds[1],
        },
        ..config.clone()
    };
    let info = ModelInfo::of(&model, Some(model_path));
    // Attacks and predictions read no parameter gradient: the frozen view.
    evaluate_model(&model.frozen(), &info, test_set, &config)
}

/// Evaluates any model (`forward_t(x, false)` → (B, K) logits) without model metadata.
/// See [`evaluate_model`].
pub fn evaluate(
    model: &dyn ModuleT,
    test_set: &ImageDataset,
    config: &EvalConfig,
) -> Result<EvalReport> {
    evaluate_model(model, &ModelInfo::default(), test_set, config)
}

/// Runs the suite and writes into `config.out_dir`: `config.json`, `per_example/`
/// (one record per step, written when the step finishes), `results.json` (the
/// report), `results.md` and `plots/`. Steps whose record already exists with the same
/// key are loaded instead of recomputed, so an interrupted evaluation resumes.
///
/// The test split is cut in two: the last `held_out` images pick τ (99 % TPR) and fit
/// the temperature; the first `test_limit` of the rest are attacked and measured.
///
/// With `config.shard` other than `0/1` only that shard's rows of the attacked images
/// are attacked (see the `shard` module): the clean pass still covers every image (it
/// fingerprints model and data, so every record's key is the unsharded run's), the
/// trust checks run in shard 0, and instead of the report the folder gets
/// `shard.json`, for `merge_shards`. The returned report then covers the shard's rows.
pub fn evaluate_model(
    model: &dyn ModuleT,
    info: &ModelInfo,
    test_set: &ImageDataset,
    config: &EvalConfig,
) -> Result<EvalReport> {
    let started = Instant::now();
    config.validate(test_set.len())?;
    let available = test_set.len() - config.held_out;
    let attacked = test_set.take(config.test_limit.unwrap_or(available).min(available));
    let held_out = test_set.tail(config.held_out);
    let rows = config.shard.rows(attacked.len(), config.batch_size)?;
    let settings = Settings::of(config);
    let plan = settings.plan();
    let out = &config.out_dir;
    let per_example = out.join("per_example");
    // A manifest says the shard finished: an earlier run's must not outlive this start.
    remove_manifest(out)?;
    write_json(
        &out.join("config.json"),
        &serde_json::json!({
            "rampart_version": env!("CARGO_PKG_VERSION"),
            "config": config,
            "model": info,
            "plan": plan,
            "test_split": {"attacked": attacked.len(), "held_out": held_out.len(), "total": test_set.len()},
        }),
    )?;
    tracing::info!(
        suite = %config.suite,
        attacked = attacked.len(),
        held_out = held_out.len(),
        shard = %config.shard,
        rows = ?rows.range(),
        "evaluation started"
    );
    let bar = |prefix: &str, len: usize| progress_bar(config.progress, prefix, len);

    // Clean pass over every image, in every shard (it fingerprints the model and the
    // data; always recomputed).
    let pb = bar("clean", attacked.len() + held_out.len());
    let (logits, k) = dataset_logits(model, &attacked, config.batch_size, &config.device, &pb)?;
    let (held_logits, _) =
        dataset_logits(model, &held_out, config.batch_size, &config.device, &pb)?;
    pb.finish_and_clear();
    let clean_bytes: Vec<u8> = logits
        .iter()
        .chain(&held_logits)
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let label_bytes: Vec<u8> = attacked
        .labels()
        .iter()
        .chain(held_out.labels())
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let base_key = digest([
        clean_bytes.as_slice(),
        &label_bytes,
        &(config.batch_size as u64).to_le_bytes(),
        &config.seed.to_le_bytes(),
        &config.bounds.lo.to_le_bytes(),
        &config.bounds.hi.to_le_bytes(),
    ]);
    for (path, values, n) in [
        (files::clean(&per_example), &logits, attacked.len()),
        (files::held_out(&per_example), &held_logits, held_out.len()),
    ] {
        Logits {
            key: base_key.clone(),
            rows: n,
            cols: k,
            values: values.clone(),
            part: None,
        }
        .save(&path)?;
    }
    let clean = Outcomes::from_logits(&logits, attacked.labels(), k)?;
    let held = Outcomes::from_logits(&held_logits, held_out.labels(), k)?;
    let tau = {
        let positives: Vec<f64> = held
            .confidence
            .iter()
            .zip(&held.correct)
            .filter(|(_, &c)| c)
            .map(|(&p, _)| p)
            .collect();
        if positives.is_empty() {
            None
        } else {
            Some(
                rampart_metrics::threshold_at_tpr(&positives, config.metrics.tau_tpr)
                    .map_err(EvalError::metric("τ"))?,
            )
        }
    };
    tracing::info!(
        clean_error = 1.0 - clean.correct.iter().filter(|&&c| c).count() as f64 / clean.correct.len() as f64,
        tau = ?tau,
        "clean pass done"
    );

    let run = Run {
        model,
        config,
        plan: &plan,
        data: &attacked,
        rows,
        clean: &clean,
        base_key: &base_key,
        per_example: &per_example,
    };
    let mut resumed = Vec::new();

    // Threat models.
    let mut threat_models = Vec::new();
    for tm in &plan.threat_models {
        let mut recs = Vec::new();
        for a in &tm.attacks {
            let (rec, was_resumed) = run.attack(&tm.name, tm.eps, a)?;
            if was_resumed {
                resumed.push(format!("{}.{}", tm.name, a.name));
            }
            recs.push(rec);
        }
        write_json(
            &files::worst(&per_example, &tm.name),
            &worst_case_record(&tm.name, tm.eps, &clean.slice(rows.range()), &recs),
        )?;
        threat_models.push(ThreatModelRecords {
            name: tm.name.clone(),
            norm: norm_name(tm.norm),
            eps: tm.eps,
            records: recs,
        });
    }

    // Trust checks on the headline threat model.
    let trust = match run.trust(&threat_models)? {
        Some((t, was_resumed)) => {
            if was_resumed {
                resumed.push("trust".into());
            }
            t.checks.log(&format!("suite {}", config.suite));
            Some(t.checks)
        }
        None => None,
    };

    // Uniform noise and distal examples.
    let (distal, was_resumed) = run.distal(tau)?;
    if was_resumed {
        resumed.push("distal".into());
    }

    // Minimal-ε search for the accuracy–perturbation curve.
    let (search, was_resumed) = run.search()?;
    if was_resumed {
        resumed.push("min_eps_linf".into());
    }

    // Corruptions: image i of the attacked split is corrupted by stream i, so a shard
    // corrupts the whole split and keeps its rows.
    let mut corrupted: Vec<(String, u8, Vec<f32>)> = Vec::new();
    let pairs: usize = plan.corruptions.iter().map(|c| c.severities.len()).sum();
    let pb = bar("corruptions", pairs * rows.len());
    let part = run.part();
    let row_indices: Vec<usize> = rows.range().collect();
    for cp in &plan.corruptions {
        for &severity in &cp.severities {
            let name = format!("{}_{severity}", cp.corruption.name());
            let path = files::corruption(&per_example, &name);
            let key = digest([base_key.as_bytes(), name.as_bytes()]);
            let values = match Logits::load_keyed(&path, &key, part) {
                Some(l) if l.rows == rows.len() && l.cols == k => {
                    resumed.push(format!("corruptions.{name}"));
                    pb.inc(rows.len() as u64);
                    l.values
                }
                _ => {
                    let mut ds =
                        rampart_data::corrupt(&attacked, cp.corruption, severity, config.seed)?;
                    if part.is_some() {
                        ds = ds.select(&row_indices)?;
                    }
                    let (values, _) =
                        dataset_logits(model, &ds, config.batch_size, &config.device, &pb)?;
                    Logits {
                        key,
                        rows: rows.len(),
                        cols: k,
                        values: values.clone(),
                        part,
                    }
                    .save(&path)?;
                    values
                }
            };
            corrupted.push((cp.corruption.name().to_string(), severity, values));
        }
    }
    pb.finish_and_clear();

    let steps = Steps {
        classes: k,
        labels: attacked.labels()[rows.range()].to_vec(),
        logits: logits[rows.start * k..rows.end * k].to_vec(),
        held_out_labels: held_out.labels().to_vec(),
        held_out_logits: held_logits,
        threat_models,
        trust,
        distal,
        search,
        corrupted,
    };
    let report = steps.report(
        &settings,
        &plan,
        info,
        resumed.clone(),
        started.elapsed().as_secs_f64(),
    )?;
    // Every step removed its journal; their folder goes too (kept if anything is left).
    let _ = std::fs::remove_dir(per_example.join("progress"));
    if let Some(part) = part {
        let settings_json =
            serde_json::to_value(&settings).map_err(|e| EvalError::format(out, e))?;
        let data = digest([
            attacked.images(),
            &label_bytes,
            held_out.images(),
            &(attacked.len() as u64).to_le_bytes(),
        ]);
        let manifest = ShardManifest {
            command: "eval".into(),
            shard: config.shard,
            rows: part,
            total: attacked.len(),
            fingerprint: Fingerprint {
                data,
                model: digest([clean_bytes.as_slice()]),
                settings: settings_digest(&settings_json),
            },
            settings: settings_json,
            details: serde_json::to_value(ShardDetails {
                model: info.clone(),
                labels: attacked.labels().to_vec(),
                held_out_labels: held_out.labels().to_vec(),
            })
            .map_err(|e| EvalError::format(out, e))?,
            seconds: report.eval_seconds,
            resumed,
        };
        write_json(&out.join(MANIFEST), &manifest)?;
        tracing::info!(
            shard = %config.shard,
            seconds = format!("{:.1}", report.eval_seconds),
            "shard done; merge every shard's folder with `rampart merge`"
        );
        return Ok(report);
    }
    publish(&report, info, out, config.plots)?;
    tracing::info!(
        clean_error = report.clean_error,
        robust_error = report
            .threat_models
            .get(crate::HEADLINE_THREAT_MODEL)
            .map(|t| t.robust_error),
        seconds = format!("{:.1}", report.eval_seconds),
        "evaluation done"
    );
    Ok(report)
}

/// Removes `out/shard.json` if it exists.
fn remove_manifest(out: &Path) -> Result<()> {
    let path = out.join(MANIFEST);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EvalError::io(&path, e)),
        _ => Ok(()),
    }
}

fn progress_bar(enabled: bool, prefix: &str, len: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>24} [{bar:30}] {pos}/{len} images, {elapsed_precise} elapsed, eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(prefix.to_string());
    pb
}

/// FNV-1a of a name: different attacks draw different random starts.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Seed of batch `batch` of step `name`: restarts add 0, 1, … to it (< 2^24 apart).
fn batch_seed(seed: u64, name: &str, batch: usize) -> u64 {
    (seed ^ name_hash(name)).wrapping_add((batch as u64) << 24)
}

/// The shared state of one evaluation's steps.
struct Run<'a> {
    model: &'a dyn ModuleT,
    config: &'a EvalConfig,
    plan: &'a SuitePlan,
    /// The whole attacked split.
    data: &'a ImageDataset,
    /// The rows this run attacks (all of them unless sharded).
    rows: Rows,
    /// Clean outcomes of the whole attacked split.
    clean: &'a Outcomes,
    base_key: &'a str,
    per_example: &'a Path,
}

impl Run<'_> {
    /// The journal of step `name`'s finished batches (`per_example/progress/NAME/`).
    fn journal(&self, name: &str, key: &str) -> BatchJournal<'static> {
        BatchJournal::new(self.per_example.join("progress").join(name), key)
    }

    /// The shard's rows as records carry them: `None` for the whole run.
    fn part(&self) -> Option<Rows> {
        (!self.config.shard.is_whole()).then_some(self.rows)
    }

    /// The batches of this run's rows, numbered and indexed as in the whole split
    /// (shards start on a batch boundary), so every seed is the unsharded run's.
    fn batches(&self) -> impl Iterator<Item = (usize, Vec<usize>)> + '_ {
        let Rows { start, end } = self.rows;
        let bs = self.config.batch_size;
        (start / bs..end.div_ceil(bs))
            .map(move |b| (b, (b * bs..((b + 1) * bs).min(end)).collect()))
    }

    /// One attack over the attacked split, or its saved record.
    fn attack(
        &self,
        tm: &str,
        eps: f64,
        a: &crate::suite::AttackPlan,
    ) -> Result<(AttackRecord, bool)> {
        let name = format!("{tm}.{}", a.name);
        let path = files::attack(self.per_example, &name);
        let config_json =
            serde_json::to_string(&a.attack).map_err(|e| EvalError::format(&path, e))?;
        let key = digest([
            self.base_key.as_bytes(),
            name.as_bytes(),
            config_json.as_bytes(),
            &eps.to_le_bytes(),
        ]);
        if let Some(rec) = load_keyed::<AttackRecord>(&path, &key) {
            if rec.correct.len() == self.rows.len() && rec.rows == self.part() {
                tracing::info!(attack = %name, "loaded from {}", path.display());
                return Ok((rec, true));
            }
        }
        let started = Instant::now();
        let pb = progress_bar(self.config.progress, &name, self.rows.len());
        let mut all_logits: Vec<f32> = Vec::new();
        let mut classes = 0;
        let mut rec = AttackRecord {
            key,
            rows: self.part(),
            threat_model: tm.to_string(),
            attack: a.name.clone(),
            eps,
            correct: Vec::new(),
            confidence: Vec::new(),
            wrong_class_confidence: Vec::new(),
            norm: Vec::new(),
            seconds: 0.0,
        };
        let journal = self.journal(&name, &rec.key);
        for (b, idx) in self.batches() {
            let (norm, mut values) = match journal.load::<Vec<f64>>(b, 1) {
                Some(saved) => saved,
                None => {
                    crate::error::check_interrupt()?;
                    let (xs, ys) = self.data.batch_tensors(&idx, &self.config.device)?;
                    let seed = batch_seed(self.config.seed, &name, b);
                    let res = a
                        .attack
                        .run(self.model, self.config.bounds, &xs, &ys, eps, seed)
                        .map_err(EvalError::attack(&name))?;
                    let (adv_logits, _) = batch_logits(self.model, &res.clipped)?;
                    let norm: Vec<f64> = res.norm.iter().map(|&v| f64::from(v)).collect();
                    journal.save(b, &norm, &[(idx.len(), &adv_logits)])?;
                    (norm, vec![adv_logits])
                }
            };
            let adv_logits = values.pop().unwrap_or_default();
            let labels: Vec<u32> = idx.iter().map(|&i| self.data.labels()[i]).collect();
            let k = adv_logits.len() / idx.len().max(1);
            let o = Outcomes::from_logits(&adv_logits, &labels, k)?;
            all_logits.extend_from_slice(&adv_logits);
            classes = k;
            rec.correct.extend(o.correct);
            rec.confidence.extend(o.confidence);
            rec.wrong_class_confidence.extend(o.wrong_class_confidence);
            rec.norm.extend(norm);
            pb.inc(idx.len() as u64);
        }
        pb.finish_and_clear();
        rec.seconds = started.elapsed().as_secs_f64();
        Logits {
            key: rec.key.clone(),
            rows: self.rows.len(),
            cols: classes,
            values: all_logits,
            part: self.part(),
        }
        .save(&files::attack_logits(self.per_example, &name))?;
        write_json(&path, &rec)?;
        journal.remove()?;
        let clean_correct = &self.clean.correct[self.rows.range()];
        let alone = rampart_metrics::robust_error(clean_correct, &[&rec.correct])
            .map_err(EvalError::metric(&name))?;
        tracing::info!(attack = %name, robust_error = alone, seconds = format!("{:.1}", rec.seconds), "attack done");
        Ok((rec, false))
    }

    /// Uniform noise (as many images as attacked ones) and, if the suite has them,
    /// distal examples made from the same noise.
    fn distal(&self, tau: Option<f64>) -> Result<(DistalRecord, bool)> {
        let path = files::distal(self.per_example);
        let plan_json =
            serde_json::to_string(&self.plan.distal).map_err(|e| EvalError::format(&path, e))?;
        let tau_bytes = tau.unwrap_or(f64::NAN).to_le_bytes();
        let key = digest([
            self.base_key.as_bytes(),
            b"distal",
            plan_json.as_bytes(),
            &tau_bytes,
        ]);
        if let Some(rec) = load_keyed::<DistalRecord>(&path, &key) {
            if rec.rows == self.part() && rec.noise_confidence.len() == self.rows.len() {
                tracing::info!("distal examples loaded from {}", path.display());
                return Ok((rec, true));
            }
        }
        let started = Instant::now();
        let pb = progress_bar(self.config.progress, "noise and distal", self.rows.len());
        let (c, h, w) = self.data.shape();
        let mut rec = DistalRecord {
            key,
            rows: self.part(),
            noise_confidence: Vec::new(),
            distal_confidence: Vec::new(),
            seconds: 0.0,
        };
        // τ is only the attack's success flag; the report uses the confidences.
        let criterion_tau = tau.unwrap_or(1.0).clamp(0.0, 1.0) as f32;
        let journal = self.journal("distal", &rec.key);
        for (b, idx) in self.batches() {
            if let Some(((noise, distal), _)) = journal.load::<(Vec<f64>, Vec<f64>)>(b, 0) {
                rec.noise_confidence.extend(noise);
                rec.distal_confidence.extend(distal);
                pb.inc(idx.len() as u64);
                continue;
            }
            let done = (rec.noise_confidence.len(), rec.distal_confidence.len());
            crate::error::check_interrupt()?;
            let seed = batch_seed(self.config.seed, "distal", b);
            let dev = &self.config.device;
            let noise = Distal::noise((idx.len(), c, h, w), self.config.bounds, seed, dev)
                .map_err(EvalError::attack("noise"))?;
            let zeros = vec![0u32; idx.len()];
            let (noise_logits, k) = batch_logits(self.model, &noise)?;
            rec.noise_confidence
                .extend(Outcomes::from_logits(&noise_logits, &zeros, k)?.confidence);
            if let Some(d) = &self.plan.distal {
                let attack = Distal {
                    pgd: rampart_attacks::Pgd {
                        criterion: Criterion::Confident(criterion_tau),
                        ..d.pgd
                    },
                };
                let ys = Tensor::zeros(idx.len(), DType::U32, dev)?;
                let res = attack
                    .run(self.model, self.config.bounds, &noise, &ys, &[d.eps], seed)
                    .map_err(EvalError::attack("distal"))?;
                let clipped = &res
                    .first()
                    .ok_or_else(|| {
                        EvalError::Config("the distal attack returned no result".into())
                    })?
                    .clipped;
                let (distal_logits, k) = batch_logits(self.model, clipped)?;
                rec.distal_confidence
                    .extend(Outcomes::from_logits(&distal_logits, &zeros, k)?.confidence);
            }
            let batch = (
                &rec.noise_confidence[done.0..],
                &rec.distal_confidence[done.1..],
            );
            journal.save(b, batch, &[])?;
            pb.inc(idx.len() as u64);
        }
        pb.finish_and_clear();
        rec.seconds = started.elapsed().as_secs_f64();
        write_json(&path, &rec)?;
        journal.remove()?;
        tracing::info!(
            seconds = format!("{:.1}", rec.seconds),
            "noise and distal examples done"
        );
        Ok((rec, false))
    }

    /// The trust checks on the first attacked images of the headline threat model (or
    /// the first), repeating its first cross-entropy PGD attack (or its first PGD).
    /// A shard runs them only if it holds the first attacked image, and then it must
    /// hold all the images they run on.
    fn trust(&self, records: &[ThreatModelRecords]) -> Result<Option<(TrustRecord, bool)>> {
        let cfg = &self.config.trust;
        let n = cfg.examples.min(self.data.len());
        if n > 0 && self.rows.start > 0 {
            return Ok(None);
        }
        if n > self.rows.end {
            return Err(EvalError::Shard(format!(
                "shard {} holds the first {} attacked images but the trust checks run on the \
                 first {n}: use fewer shards, a larger batch size or fewer trust examples",
                self.config.shard, self.rows.end
            )));
        }
        let (Some((tm, attack)), true) = (self.plan.trust_attack(), n > 0) else {
            return Ok(None);
        };
        let recs = records
            .iter()
            .find(|r| r.name == tm.name)
            .map(|r| r.records.as_slice())
            .unwrap_or(&[]);
        let white_box_robust: Vec<bool> = (0..n)
            .map(|i| self.clean.correct[i] && recs.iter().all(|r| r.correct[i]))
            .collect();
        let path = files::trust(self.per_example);
        let attack_json = serde_json::to_string(attack).map_err(|e| EvalError::format(&path, e))?;
        let cfg_json = serde_json::to_string(cfg).map_err(|e| EvalError::format(&path, e))?;
        let robust_bytes: Vec<u8> = white_box_robust.iter().map(|&b| u8::from(b)).collect();
        let key = digest([
            self.base_key.as_bytes(),
            b"trust",
            attack_json.as_bytes(),
            cfg_json.as_bytes(),
            &robust_bytes,
            &tm.eps.to_le_bytes(),
        ]);
        if let Some(rec) = load_keyed::<TrustRecord>(&path, &key) {
            return Ok(Some((rec, true)));
        }
        let idx: Vec<usize> = (0..n).collect();
        let (xs, ys) = self.data.batch_tensors(&idx, &self.config.device)?;
        let checks = run_checks(
            self.model,
            self.config.bounds,
            &xs,
            &ys,
            &white_box_robust,
            attack,
            tm.eps,
            cfg,
            batch_seed(self.config.seed, "trust", 0),
        )?;
        let rec = TrustRecord { key, checks };
        write_json(&path, &rec)?;
        Ok(Some((rec, false)))
    }

    /// Minimal L∞ ε of every attacked example.
    fn search(&self) -> Result<(SearchRecord, bool)> {
        let path = files::search(self.per_example);
        let curve = &self.plan.curve;
        let plan_json = serde_json::to_string(curve).map_err(|e| EvalError::format(&path, e))?;
        let key = digest([
            self.base_key.as_bytes(),
            b"min_eps_linf",
            plan_json.as_bytes(),
        ]);
        if let Some(rec) = load_keyed::<SearchRecord>(&path, &key) {
            if rec.min_eps.len() == self.rows.len() && rec.rows == self.part() {
                tracing::info!("minimal ε loaded from {}", path.display());
                return Ok((rec, true));
            }
        }
        let started = Instant::now();
        let pb = progress_bar(self.config.progress, "minimal ε (L∞)", self.rows.len());
        let mut min_eps = Vec::with_capacity(self.rows.len());
        let journal = self.journal("min_eps_linf", &key);
        for (b, idx) in self.batches() {
            let found = match journal.load::<Vec<Option<f64>>>(b, 0) {
                Some((found, _)) => found,
                None => {
                    crate::error::check_interrupt()?;
                    let (xs, ys) = self.data.batch_tensors(&idx, &self.config.device)?;
                    let correct: Vec<bool> = idx.iter().map(|&i| self.clean.correct[i]).collect();
                    let found = minimal_eps(
                        self.model,
                        self.config.bounds,
                        &curve.pgd,
                        &xs,
                        &ys,
                        &correct,
                        curve.eps_max,
                        curve.rounds,
                        batch_seed(self.config.seed, "min_eps_linf", b),
                        "min_eps_linf",
                    )?;
                    journal.save(b, &found, &[])?;
                    found
                }
            };
            min_eps.extend(found);
            pb.inc(idx.len() as u64);
        }
        pb.finish_and_clear();
        let rec = SearchRecord {
            key,
            rows: self.part(),
            eps_max: curve.eps_max,
            rounds: curve.rounds,
            min_eps,
            seconds: started.elapsed().as_secs_f64(),
        };
        write_json(&path, &rec)?;
        journal.remove()?;
        tracing::info!(
            seconds = format!("{:.1}", rec.seconds),
            "minimal-ε search done"
        );
        Ok((rec, false))
    }
}
