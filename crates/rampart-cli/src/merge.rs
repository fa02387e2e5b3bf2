//! `rampart merge`: joins the output folders of the shards of one `rampart eval
//! --shard I/N` or `rampart attack --shard I/N` run into the folder one unsharded run
//! writes (see docs/scale-out.md). The checks (every shard once, the same data, model
//! and settings) are `rampart_eval::read_shards`; an evaluation's merge is
//! `rampart_eval::merge_eval`; an attack's is here (its files are this command's).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use serde_json::json;

use crate::attack::AttackOutcome;
use crate::common::{create_out_dir, record_command, write_json};

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

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("cannot parse {}", path.display()))
}
