//! `rampart merge`: joins the output folders of the shards of one `rampart eval
//! --shard I/N` or `rampart attack --shard I/N` run into the folder one unsharded run
//! writes (see docs/scale-out.md). The checks (every shard once, the same data, model
//! and settings) are `rampart_eval::read_shards`; a protocol evaluation's merge is
//! `rampart_eval::merge_eval`; an attack's and an AutoAttack evaluation's are here
//! (their files are this command's).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use serde_json::json;

use crate::attack::AttackOutcome;
use crate::common::{create_out_dir, record_command, write_json};
use crate::eval_run::PGD20_SHARD;

/// Flags of `rampart merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The shards' output folders (every shard 0/N … N−1/N exactly once, any order).
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
    /// Output folder of the merged results (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

impl MergeArgs {
    /// Where the log goes.
    pub fn log_file(&self) -> PathBuf {
        self.out.join("merge.log")
    }

    /// Checks and merges the shards; `command` is recorded beside the outputs.
    /// Returns a line saying what was merged.
    pub fn run(&self, command: &str) -> Result<String> {
        for dir in &self.shards {
            if same_folder(dir, &self.out) {
                bail!(
                    "--out {} is one of the shards' folders: merge into a new folder",
                    self.out.display()
                );
            }
        }
        let shards = rampart_eval::read_shards(&self.shards)?;
        if shards[0].1.command == PGD20_SHARD {
            bail!(
                "shards of `rampart eval --suite pgd20` are joined by the unsharded command with \
                 --merge {}: it reruns the clean pass and the trust checks on the model and takes \
                 the shards' attacked batches",
                self.shards
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        create_out_dir(&self.out)?;
        // The merged folder is a whole run's, not a shard's.
        let stale = self.out.join(rampart_eval::SHARD_MANIFEST);
        if stale.exists() {
            std::fs::remove_file(&stale)
                .with_context(|| format!("cannot remove {}", stale.display()))?;
        }
        let (_, first) = &shards[0];
        match first.command.as_str() {
            "eval" => {
                let report = rampart_eval::merge_eval(&shards, &self.out)?;
                record_command(&self.out, command)?;
                Ok(format!(
                    "{} shards merged: clean error {:.2} % on {} attacked test examples; results in {}",
                    shards.len(),
                    100.0 * report.clean_error,
                    report.test_examples,
                    self.out.display()
                ))
            }
            "attack" => {
                merge_attack(&shards, &self.out)?;
                record_command(&self.out, command)?;
                Ok(format!(
                    "{} shards of {} attacked images merged into {}",
                    shards.len(),
                    first.total,
                    self.out.display()
                ))
            }
            "eval --suite autoattack" => {
                let results = merge_autoattack(&shards, &self.out)?;
                record_command(&self.out, command)?;
                Ok(format!(
                    "{} AutoAttack shards merged: robust accuracy {:.2} % on {} images; results in {}",
                    shards.len(),
                    100.0 * results.robust_accuracy.unwrap_or(0.0),
                    results.test_examples,
                    self.out.display()
                ))
            }
            other => bail!("shards of `rampart {other}` cannot be merged"),
        }
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `rampart attack` shards: `adversarial.safetensors` concatenated in row order,
/// `summary.json` recomputed from it (wall time: the shards' sum; trust checks: shard
/// 0's), `config.json` of shard 0 without its `shard`.
fn merge_attack(shards: &[(PathBuf, rampart_eval::ShardManifest)], out: &Path) -> Result<()> {
    let mut parts: Vec<HashMap<String, Tensor>> = Vec::new();
    let mut seconds = 0.0;
    for (dir, m) in shards {
        let path = dir.join("adversarial.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for (name, t) in &tensors {
            if t.dims().first() != Some(&m.rows.len()) {
                bail!(
                    "{}: `{name}` does not hold the {} images of shard {}",
                    path.display(),
                    m.rows.len(),
                    m.shard
                );
            }
        }
        if let Some(first) = parts.first() {
            let mut a: Vec<&String> = first.keys().collect();
            let mut b: Vec<&String> = tensors.keys().collect();
            a.sort();
            b.sort();
            if a != b {
                bail!(
                    "{} holds other tensors than the first shard's",
                    path.display()
                );
            }
        }
        parts.push(tensors);
        let summary: serde_json::Value = read_json(&dir.join("summary.json"))?;
        seconds += summary["seconds"].as_f64().unwrap_or(0.0);
    }
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    for name in parts[0].keys() {
        let pieces: Vec<&Tensor> = parts.iter().filter_map(|p| p.get(name)).collect();
        merged.insert(name.clone(), Tensor::cat(&pieces, 0)?);
    }
    let (first_dir, first) = &shards[0];
    let eps: Vec<f64> = serde_json::from_value(first.settings["eps"].clone())
        .context("shard.json: the settings have no list of ε")?;
    let mut outcome = AttackOutcome {
        eps,
        success: Vec::new(),
        norms: Vec::new(),
    };
    for i in 0..outcome.eps.len() {
        let get = |name: String| {
            merged
                .get(&name)
                .with_context(|| format!("the shards have no `{name}`"))
        };
        let success = get(format!("success_{i}"))?.to_vec1::<u8>()?;
        outcome
            .success
            .push(success.iter().map(|&s| s != 0).collect());
        outcome
            .norms
            .push(get(format!("norm_{i}"))?.to_vec1::<f32>()?);
    }
    let results = outcome.summary("");
    crate::eval_run::save_safetensors(&merged, &out.join("adversarial.safetensors"))?;
    let summary: serde_json::Value = read_json(&first_dir.join("summary.json"))?;
    write_json(
        &out.join("summary.json"),
        &json!({"model": summary["model"], "attack": summary["attack"], "seconds": seconds,
                "results": results, "trust": summary["trust"]}),
    )?;
    let mut config: serde_json::Value = read_json(&first_dir.join("config.json"))?;
    if let Some(c) = config.as_object_mut() {
        c.remove("shard");
    }
    write_json(&out.join("config.json"), &config)
}

/// `rampart eval --suite autoattack` shards: their finished batches
/// (`per_example/autoattack.json`) joined in row order into the whole run's state,
/// `autoattack.json`, `results.json` and `results.md` computed from it as one run
/// computes them (wall time: the shards' sum; trust checks: shard 0's), `config.json`
/// of shard 0 with `shard` null.
fn merge_autoattack(
    shards: &[(PathBuf, rampart_eval::ShardManifest)],
    out: &Path,
) -> Result<crate::eval::EvalResults> {
    let mut merged: Option<rampart_eval::AutoAttackState> = None;
    let mut seconds = 0.0;
    for (dir, m) in shards {
        let path = dir.join("per_example").join("autoattack.json");
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let state: rampart_eval::AutoAttackState = serde_json::from_slice(&bytes)
            .with_context(|| format!("cannot parse {}", path.display()))?;
        let rows: Vec<usize> = state
            .batches
            .iter()
            .flat_map(|b| b.start..b.start + b.robust.len())
            .collect();
        if rows != m.rows.range().collect::<Vec<_>>() {
            bail!(
                "{} does not hold the finished batches of shard {} (images {}..{})",
                path.display(),
                m.shard,
                m.rows.start,
                m.rows.end
            );
        }
        seconds += m.seconds;
        match &mut merged {
            None => merged = Some(state),
            Some(whole) => whole.batches.extend(state.batches),
        }
    }
    let state = merged.context("no shard to merge")?;
    let (first_dir, first) = &shards[0];
    let info: crate::eval_run::AutoAttackModel =
        serde_json::from_value(first.details["model"].clone())
            .context("shard.json of shard 0: no model details")?;
    let trust: Option<rampart_eval::TrustChecks> =
        serde_json::from_value(first.details["trust"].clone())
            .context("shard.json of shard 0: unreadable trust checks")?;
    write_json(&out.join("per_example").join("autoattack.json"), &state)?;
    let outcome =
        rampart_eval::AutoAttackOutcome::from_batches(state.config, state.batches, 0, seconds);
    let results = crate::eval_run::write_autoattack(out, &info, &outcome, trust)?;
    write_json(&out.join("results.json"), &results)?;
    rampart_fs::write_atomic(&out.join("results.md"), results.markdown().as_bytes())?;
    // Shard 0's config.json, as the unsharded run writes it (`shard` null).
    let mut config: serde_json::Value = read_json(&first_dir.join("config.json"))?;
    if let Some(c) = config.as_object_mut() {
        c.insert("shard".into(), serde_json::Value::Null);
    }
    write_json(&out.join("config.json"), &config)?;
    Ok(results)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("cannot parse {}", path.display()))
}
