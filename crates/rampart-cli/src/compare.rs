//! `rampart compare`: one report comparing several evaluated models.
//!
//! Reads the `results.json` that `rampart eval --suite quick|ccat|full` wrote for each
//! model and writes `OUT/comparison.md` (tables of every metric, side by side) with
//! the plots in `OUT/plots/`: the accuracy–perturbation curves of all models on one
//! chart, and per model its reliability diagram and confidence histograms.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rampart_eval::EvalReport;

/// Flags of `rampart compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Models to compare, each as NAME=RESULTS (the results.json of `rampart eval
    /// --suite quick|ccat|full`), e.g. normal=runs/normal/protocol/results.json.
    #[arg(required = true)]
    models: Vec<String>,
    /// Output folder for comparison.md and plots/.
    #[arg(long)]
    out: PathBuf,
}

impl CompareArgs {
    /// Reads the reports and writes the comparison.
    pub fn run(&self) -> Result<PathBuf> {
        let mut reports: Vec<(String, EvalReport)> = Vec::new();
        for spec in &self.models {
            let Some((name, path)) = spec.split_once('=') else {
                bail!("`{spec}`: expected NAME=PATH/results.json");
            };
            if name.is_empty() {
                bail!("`{spec}`: the model name is empty");
            }
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            let report: EvalReport = serde_json::from_str(&text).with_context(|| {
                format!("{path} is not the results.json of `rampart eval --suite quick|ccat|full`")
            })?;
            reports.push((name.to_string(), report));
        }
        let borrowed: Vec<(&str, &EvalReport)> =
            reports.iter().map(|(n, r)| (n.as_str(), r)).collect();
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        rampart_eval::compare_models(&borrowed, &self.out)?;
        Ok(self.out.join("comparison.md"))
    }
}
