//! Merging the shards of one evaluation (`rampart eval --shard I/N`, see the `shard`
//! module) into the folder one unsharded run writes: the per-example records
//! concatenated in row order, the worst cases, the trust checks of shard 0, then the
//! report, its Markdown and plots, computed by the same code as a whole run's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::io::{read_json, write_json, Keyed, Logits};
use crate::outputs::Outcomes;
use crate::publish::{files, norm_name, publish, Settings, Steps, ThreatModelRecords};
use crate::records::{worst_case_record, AttackRecord, DistalRecord, SearchRecord, TrustRecord};
use crate::report::EvalReport;
use crate::runner::ModelInfo;
use crate::shard::{ShardManifest, MANIFEST};

/// What a merge needs from an evaluation shard besides its per-example files
/// (`shard.json`'s `details`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ShardDetails {
    /// The evaluated model, as the report names it.
    pub model: ModelInfo,
    /// Labels of every attacked image.
    pub labels: Vec<u32>,
    /// Labels of the held-out images.
    pub held_out_labels: Vec<u32>,
}

/// A shard's part of a per-example record.
trait Part: DeserializeOwned + Serialize + Keyed {
    fn rows(&self) -> Option<crate::shard::Rows>;
    fn examples(&self) -> usize;
    /// Appends the next shard's rows (and adds its wall time).
    fn append(&mut self, next: Self);
    /// Marks the record as the whole run's.
    fn make_whole(&mut self);
}

impl Part for AttackRecord {
    fn rows(&self) -> Option<crate::shard::Rows> {
        self.rows
    }
    fn examples(&self) -> usize {
        self.correct.len()
    }
    fn append(&mut self, next: Self) {
        self.correct.extend(next.correct);
        self.confidence.extend(next.confidence);
        self.wrong_class_confidence
            .extend(next.wrong_class_confidence);
        self.norm.extend(next.norm);
        self.seconds += next.seconds;
    }
    fn make_whole(&mut self) {
        self.rows = None;
    }
}

impl Part for DistalRecord {
    fn rows(&self) -> Option<crate::shard::Rows> {
        self.rows
    }
    fn examples(&self) -> usize {
        self.noise_confidence.len()
    }
    fn append(&mut self, next: Self) {
        self.noise_confidence.extend(next.noise_confidence);
        self.distal_confidence.extend(next.distal_confidence);
        self.seconds += next.seconds;
    }
    fn make_whole(&mut self) {
        self.rows = None;
    }
}

impl Part for SearchRecord {
    fn rows(&self) -> Option<crate::shard::Rows> {
        self.rows
    }
    fn examples(&self) -> usize {
        self.min_eps.len()
    }
    fn append(&mut self, next: Self) {
        self.min_eps.extend(next.min_eps);
        self.seconds += next.seconds;
    }
    fn make_whole(&mut self) {
        self.rows = None;
    }
}

fn per_example(dir: &Path) -> PathBuf {
    dir.join("per_example")
}

/// The shard's file at `path` must exist (the manifest is written last, so it does
/// unless the folder was tampered with).
fn present(path: &Path, m: &ShardManifest) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(EvalError::Shard(format!(
            "{} is missing from shard {}",
            path.display(),
            m.shard
        )))
    }
}

fn wrong_rows(path: &Path, m: &ShardManifest) -> EvalError {
    EvalError::Shard(format!(
        "{} does not hold rows {}..{} of shard {}",
        path.display(),
        m.rows.start,
        m.rows.end,
        m.shard
    ))
}

fn other_origin(path: &Path) -> EvalError {
    EvalError::Shard(format!(
        "{} was made from another model, data or config than the first shard's",
        path.display()
    ))
}

/// The record `file` of every shard, concatenated in row order, written into `out`.
fn merge_record<T: Part>(
    shards: &[(PathBuf, ShardManifest)],
    out: &Path,
    file: impl Fn(&Path) -> PathBuf,
) -> Result<T> {
    let mut merged: Option<T> = None;
    for (dir, m) in shards {
        let path = file(&per_example(dir));
        present(&path, m)?;
        let part: T = read_json(&path)?;
        if part.rows() != Some(m.rows) || part.examples() != m.rows.len() {
            return Err(wrong_rows(&path, m));
        }
        match &mut merged {
            None => merged = Some(part),
            Some(whole) if whole.key() == part.key() => whole.append(part),
            Some(_) => return Err(other_origin(&path)),
        }
    }
    let mut whole = merged.ok_or_else(|| EvalError::Shard("no shards to merge".into()))?;
    whole.make_whole();
    write_json(&file(&per_example(out)), &whole)?;
    Ok(whole)
}

/// The logits `file` of every shard, concatenated in row order, written into `out`.
fn merge_logits(
    shards: &[(PathBuf, ShardManifest)],
    out: &Path,
    file: impl Fn(&Path) -> PathBuf,
) -> Result<Logits> {
    let mut merged: Option<Logits> = None;
    for (dir, m) in shards {
        let path = file(&per_example(dir));
        present(&path, m)?;
        let part = Logits::load(&path)?;
        if part.part != Some(m.rows) || part.rows != m.rows.len() {
            return Err(wrong_rows(&path, m));
        }
        match &mut merged {
            None => merged = Some(part),
            Some(whole) if whole.key == part.key && whole.cols == part.cols => {
                whole.rows += part.rows;
                whole.values.extend(part.values);
            }
            Some(_) => return Err(other_origin(&path)),
        }
    }
    let mut whole = merged.ok_or_else(|| EvalError::Shard("no shards to merge".into()))?;
    whole.part = None;
    whole.save(&file(&per_example(out)))?;
    Ok(whole)
}

/// A matrix every shard computed whole (the clean pass): the shards' copies must be
/// equal; written into `out`.
fn same_logits(
    shards: &[(PathBuf, ShardManifest)],
    out: &Path,
    file: impl Fn(&Path) -> PathBuf,
) -> Result<Logits> {
    let mut first: Option<Logits> = None;
    for (dir, m) in shards {
        let path = file(&per_example(dir));
        present(&path, m)?;
        let l = Logits::load(&path)?;
        match &first {
            None => first = Some(l),
            Some(f) if f.key == l.key && f.values == l.values => {}
            Some(_) => return Err(other_origin(&path)),
        }
    }
    let l = first.ok_or_else(|| EvalError::Shard("no shards to merge".into()))?;
    l.save(&file(&per_example(out)))?;
    Ok(l)
}

/// Merges the shards of one `rampart eval` protocol run (checked and ordered by
/// [`crate::read_shards`]) into `out`: the same `per_example/`, `results.json`,
/// `results.md`, `plots/` and `config.json` as one unsharded run writes, apart from
/// wall times (`seconds` of every record and attack, `eval_seconds`: the shards' sum),
/// `resumed` (the steps any shard loaded from an earlier run) and `config.json`'s
/// `out_dir`. The shards' folders are only read.
pub fn merge_eval(shards: &[(PathBuf, ShardManifest)], out: &Path) -> Result<EvalReport> {
    let started = Instant::now();
    let (first_dir, first) = shards
        .first()
        .ok_or_else(|| EvalError::Shard("no shards to merge".into()))?;
    if let Some((dir, m)) = shards.iter().find(|(_, m)| m.command != "eval") {
        return Err(EvalError::Shard(format!(
            "{} holds a shard of `rampart {}`, not of `rampart eval`",
            dir.display(),
            m.command
        )));
    }
    let manifest = first_dir.join(MANIFEST);
    let settings: Settings = serde_json::from_value(first.settings.clone())
        .map_err(|e| EvalError::format(&manifest, e))?;
    let details: ShardDetails = serde_json::from_value(first.details.clone())
        .map_err(|e| EvalError::format(&manifest, e))?;
    let plan = settings.plan();
    if details.labels.len() != first.total {
        return Err(EvalError::format(
            &manifest,
            "the labels do not match the attacked images",
        ));
    }

    let clean = same_logits(shards, out, files::clean)?;
    let held = same_logits(shards, out, files::held_out)?;
    if clean.rows != first.total || held.rows != details.held_out_labels.len() {
        return Err(EvalError::format(
            &files::clean(&per_example(first_dir)),
            "the clean logits do not match the test split",
        ));
    }
    let k = clean.cols;
    let outcomes = Outcomes::from_logits(&clean.values, &details.labels, k)?;

    let mut threat_models = Vec::new();
    for tm in &plan.threat_models {
        let mut records = Vec::new();
        for a in &tm.attacks {
            let name = format!("{}.{}", tm.name, a.name);
            records.push(merge_record::<AttackRecord>(shards, out, |d| {
                files::attack(d, &name)
            })?);
            merge_logits(shards, out, |d| files::attack_logits(d, &name))?;
        }
        write_json(
            &files::worst(&per_example(out), &tm.name),
            &worst_case_record(&tm.name, tm.eps, &outcomes, &records),
        )?;
        threat_models.push(ThreatModelRecords {
            name: tm.name.clone(),
            norm: norm_name(tm.norm),
            eps: tm.eps,
            records,
        });
    }
    // The trust checks ran in shard 0, on the first attacked images.
    let trust_file = files::trust(&per_example(first_dir));
    let trust = if settings.trust.examples > 0 && trust_file.is_file() {
        let rec: TrustRecord = read_json(&trust_file)?;
        write_json(&files::trust(&per_example(out)), &rec)?;
        Some(rec.checks)
    } else {
        None
    };
    let distal = merge_record::<DistalRecord>(shards, out, files::distal)?;
    let search = merge_record::<SearchRecord>(shards, out, files::search)?;
    let mut corrupted = Vec::new();
    for cp in &plan.corruptions {
        for &severity in &cp.severities {
            let name = format!("{}_{severity}", cp.corruption.name());
            let l = merge_logits(shards, out, |d| files::corruption(d, &name))?;
            corrupted.push((cp.corruption.name().to_string(), severity, l.values));
        }
    }

    let mut resumed: Vec<String> = Vec::new();
    for (_, m) in shards {
        for step in &m.resumed {
            if !resumed.contains(step) {
                resumed.push(step.clone());
            }
        }
    }
    let seconds: f64 = shards.iter().map(|(_, m)| m.seconds).sum();
    let steps = Steps {
        classes: k,
        labels: details.labels.clone(),
        logits: clean.values,
        held_out_labels: details.held_out_labels.clone(),
        held_out_logits: held.values,
        threat_models,
        trust,
        distal,
        search,
        corrupted,
    };
    let report = steps.report(&settings, &plan, &details.model, resumed, seconds)?;
    publish(&report, &details.model, out, settings.plots)?;

    // The first shard's config.json, as the unsharded run writes it into `out`.
    let config_path = first_dir.join("config.json");
    let mut config: serde_json::Value = read_json(&config_path)?;
    match config.get_mut("config").and_then(|c| c.as_object_mut()) {
        Some(c) => {
            c.remove("shard");
            c.insert("out_dir".into(), serde_json::json!(out));
        }
        None => {
            return Err(EvalError::format(
                &config_path,
                "no `config` object: not written by an evaluation",
            ))
        }
    }
    write_json(&out.join("config.json"), &config)?;
    tracing::info!(
        shards = shards.len(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "shards merged"
    );
    Ok(report)
}
