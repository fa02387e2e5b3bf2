//! `rampart eval`: flags → checked plan → predictions and results of a saved model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rampart_data::DatasetKind;
use rampart_defenses::predict;
use rampart_models::Classifier;
use serde::Serialize;
use serde_json::json;

use crate::common::{
    at_least_one, create_out_dir, load_data, record_command, resolve_data_dir, write_json,
    DeviceArg,
};

/// Version of the `results.json` written by `rampart eval`.
pub const EVAL_SCHEMA_VERSION: u32 = 1;

/// What to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Suite {
    /// Accuracy, predictions and confidences on the unmodified test images.
    Clean,
}

/// Flags of `rampart eval`, as typed.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Writes into --out: results.json and results.md (the figures), \
predictions.json (per-example label, prediction and confidence), probs.safetensors \
(per-example softmax probabilities), config.json, command.txt and eval.log."
)]
pub struct EvalArgs {
    /// Model file written by `rampart train` (model.safetensors).
    #[arg(long)]
    pub model: PathBuf,

    /// Folder holding the data set; defaults to $RAMPART_DATA_DIR. See datasets/README.md.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Data set: cifar10 or cifar100 [default: the one the model was trained on].
    #[arg(long)]
    pub dataset: Option<String>,

    /// Evaluate on the first N test examples only [default: the whole test set].
    #[arg(long)]
    pub test_limit: Option<usize>,

    /// Examples per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,

    /// Which evaluation to run.
    #[arg(long, value_enum, default_value = "clean")]
    pub suite: Suite,

    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,

    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// A checked `eval` invocation.
#[derive(Clone, Debug)]
pub struct EvalPlan {
    /// The model file.
    pub model: PathBuf,
    /// The data folder.
    pub data_dir: PathBuf,
    /// The data set, if given; otherwise taken from the model's metadata.
    pub dataset: Option<DatasetKind>,
    /// Test examples used (first N), or all.
    pub test_limit: Option<usize>,
    /// Batch size.
    pub batch_size: usize,
    /// The suite.
    pub suite: Suite,
    /// The output folder.
    pub out: PathBuf,
    /// The device.
    pub device: DeviceArg,
}

impl EvalArgs {
    /// Checks the flags into a plan; `env_data_dir` is $RAMPART_DATA_DIR.
    pub fn plan(&self, env_data_dir: Option<PathBuf>) -> Result<EvalPlan> {
        let dataset = self
            .dataset
            .as_deref()
            .map(str::parse::<DatasetKind>)
            .transpose()
            .context("--dataset")?;
        if self.test_limit == Some(0) {
            bail!("--test-limit must be at least 1");
        }
        Ok(EvalPlan {
            model: self.model.clone(),
            data_dir: resolve_data_dir(self.data_dir.clone(), env_data_dir)?,
            dataset,
            test_limit: self.test_limit,
            batch_size: at_least_one("--batch-size", self.batch_size)?,
            suite: self.suite,
            out: self.out.clone(),
            device: self.device,
        })
    }
}

/// The figures of one evaluation: `results.json`.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EvalResults {
    /// [`EVAL_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The suite run.
    pub suite: String,
    /// The model file evaluated.
    pub model: PathBuf,
    /// The training method from the model's metadata (`unknown` if absent).
    pub method: String,
    /// The architecture.
    pub arch: String,
    /// The data set.
    pub dataset: String,
    /// Test examples evaluated.
    pub test_examples: usize,
    /// Fraction of them classified correctly, in [0, 1].
    pub clean_accuracy: f64,
    /// 1 − clean_accuracy.
    pub clean_error: f64,
    /// Wall time of the evaluation (data loading excluded).
    pub eval_seconds: f64,
}

impl EvalResults {
    /// A Markdown table of the figures.
    pub fn markdown(&self) -> String {
        format!(
            "# Evaluation of `{}`\n\n\
             | model | method | arch | dataset | suite | test examples | clean accuracy | clean error |\n\
             |---|---|---|---|---|---:|---:|---:|\n\
             | {} | {} | {} | {} | {} | {} | {:.2} % | {:.2} % |\n",
            self.model.display(),
            self.model.display(),
            self.method,
            self.arch,
            self.dataset,
            self.suite,
            self.test_examples,
            100.0 * self.clean_accuracy,
            100.0 * self.clean_error,
        )
    }
}

impl EvalPlan {
    /// Where the log goes.
    pub fn log_file(&self) -> PathBuf {
        self.out.join("eval.log")
    }

    /// Runs the plan; `command` is recorded beside the outputs.
    pub fn run(&self, command: &str) -> Result<EvalResults> {
        let device = self.device.open()?;
        let model = Classifier::load(&self.model, &device)
            .with_context(|| format!("cannot load the model {}", self.model.display()))?;
        let dataset = match (self.dataset, model.metadata().get("dataset")) {
            (Some(d), _) => d,
            (None, Some(name)) => name.parse().with_context(|| {
                format!(
                    "{}: metadata `dataset` = `{name}` is not a known data set; pass --dataset",
                    self.model.display()
                )
            })?,
            (None, None) => DatasetKind::Cifar10,
        };
        let k = model.spec().num_classes;
        if k != dataset.num_classes() {
            bail!(
                "{} has {k} outputs but {} has {} classes: pass the --dataset it was trained on",
                self.model.display(),
                dataset.title(),
                dataset.num_classes()
            );
        }
        let method = model
            .metadata()
            .get("method")
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        create_out_dir(&self.out)?;
        record_command(&self.out, command)?;
        write_json(
            &self.out.join("config.json"),
            &json!({
                "command": "eval",
                "rampart_version": env!("CARGO_PKG_VERSION"),
                "command_line": command,
                "model": self.model,
                "method": method,
                "arch": model.spec().arch.to_string(),
                "dataset": dataset.to_string(),
                "data_dir": self.data_dir,
                "test_limit": self.test_limit,
                "batch_size": self.batch_size,
                "suite": self.suite,
                "device": self.device.to_string(),
            }),
        )?;
        let splits = load_data(dataset, &self.data_dir)?;
        let test = match self.test_limit {
            Some(n) => splits.test.take(n),
            None => splits.test,
        };
        let started = Instant::now();
        let predictions = match self.suite {
            Suite::Clean => predict(&model, &test, self.batch_size)?,
        };
        let eval_seconds = started.elapsed().as_secs_f64();
        predictions.save_json(&self.out.join("predictions.json"))?;
        predictions.save_probs(&self.out.join("probs.safetensors"))?;
        let results = EvalResults {
            schema_version: EVAL_SCHEMA_VERSION,
            suite: "clean".into(),
            model: self.model.clone(),
            method,
            arch: model.spec().arch.to_string(),
            dataset: dataset.to_string(),
            test_examples: predictions.len(),
            clean_accuracy: predictions.accuracy(),
            clean_error: predictions.error(),
            eval_seconds,
        };
        write_json(&self.out.join("results.json"), &results)?;
        rampart_defenses::write_atomic(
            &self.out.join("results.md"),
            results.markdown().as_bytes(),
        )?;
        tracing::info!(
            accuracy = results.clean_accuracy,
            examples = results.test_examples,
            seconds = format!("{eval_seconds:.1}"),
            "evaluated"
        );
        Ok(results)
    }
}
