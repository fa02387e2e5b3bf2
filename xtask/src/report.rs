//! The study's outputs: `results.json` (a stable interface, `docs/results-schema.md`)
//! and `report.md` (for people), made from the files each `rampart` run wrote.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::presets::EvalBudgets;
use crate::reproduce::{eval_dir, model_dir, protocol_dir, ModelRow};

/// Version of `results.json`'s layout.
pub const SCHEMA_VERSION: u32 = 1;

/// The study as a whole.
#[derive(Clone, Debug)]
pub struct Study {
    /// Data set name, e.g. `cifar10`.
    pub dataset: String,
    /// Preset name.
    pub preset: String,
    /// What the preset approximates.
    pub preset_about: String,
    /// When this invocation started, ISO 8601 UTC.
    pub created: String,
    /// The `cargo xtask …` command line.
    pub command: String,
    /// Wall time of this invocation after the build.
    pub wall_seconds: f64,
    /// The command that built `rampart`.
    pub build_command: String,
    /// The preset's evaluation budgets as a Markdown table.
    pub budgets: String,
}

/// `summary.json` of a finished `rampart train`, the fields used here.
#[derive(Debug, Deserialize)]
struct TrainSummary {
    method: String,
    arch: String,
    parameters: usize,
    epochs: usize,
    seed: u64,
    train_examples: usize,
    train_seconds: f64,
}

/// Standard deviations over noise draws.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// Noise draws.
    pub draws: usize,
    /// Of the clean accuracy.
    pub clean_accuracy_std: f64,
    /// Of the robust accuracy.
    pub robust_accuracy_std: Option<f64>,
}

/// `results.json` of `rampart eval`, the fields used here (the robust ones only from
/// an attack suite, the threshold only for a model saved with one).
#[derive(Debug, Deserialize)]
struct EvalResults {
    test_examples: usize,
    clean_accuracy: f64,
    clean_error: f64,
    eval_seconds: f64,
    #[serde(default)]
    attack: Option<String>,
    #[serde(default)]
    eps: Option<f64>,
    #[serde(default)]
    robust_examples: Option<usize>,
    #[serde(default)]
    robust_accuracy: Option<f64>,
    #[serde(default)]
    robust_error: Option<f64>,
    #[serde(default)]
    confidence_threshold: Option<f64>,
    #[serde(default)]
    clean_accuracy_ci: Option<Interval>,
    #[serde(default)]
    robust_accuracy_ci: Option<Interval>,
    #[serde(default)]
    eot_samples: Option<usize>,
    #[serde(default)]
    stochastic: Option<Stochastic>,
    #[serde(default)]
    trust: Option<Trust>,
}

/// `results.json` of a protocol suite (`rampart eval --suite quick`), the fields that
/// hold the PGD-20 worst case of a deterministic row
/// ([`EvalBudgets::pgd20_in_protocol`]).
#[derive(Debug, Deserialize)]
struct ProtocolResults {
    test_examples: usize,
    threat_models: BTreeMap<String, ProtocolThreatModel>,
    #[serde(default)]
    trust: Option<Trust>,
}

/// One threat model of a protocol's results, the fields used here.
#[derive(Debug, Deserialize)]
struct ProtocolThreatModel {
    eps: f64,
    attacks: BTreeMap<String, serde::de::IgnoredAny>,
    robust_error: f64,
    #[serde(default)]
    robust_error_ci: Option<Interval>,
}

impl ProtocolResults {
    /// Writes the protocol's L∞ 8/255 worst case into a clean evaluation's results: the
    /// robust figures, the attack and the trust checks (the protocol's time stays in the
    /// protocol's section).
    fn fill_robust(self, results: &mut EvalResults) -> Result<()> {
        let model = self
            .threat_models
            .get("linf_8_255")
            .context("no linf_8_255 threat model")?;
        let names: Vec<&str> = model.attacks.keys().map(String::as_str).collect();
        results.attack = Some(format!(
            "pgd-20 linf, step 0.00784, eps {:.5}, uniform start, worst case of {} (the protocol's)",
            model.eps,
            names.join(", ")
        ));
        results.eps = Some(model.eps);
        results.robust_examples = Some(self.test_examples);
        results.robust_accuracy = Some(1.0 - model.robust_error);
        results.robust_error = Some(model.robust_error);
        results.robust_accuracy_ci = model.robust_error_ci.map(|ci| Interval {
            lo: 1.0 - ci.hi,
            hi: 1.0 - ci.lo,
        });
        results.eot_samples = Some(1);
        results.trust = self.trust;
        Ok(())
    }
}

/// A 95 % interval in `results.json`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower end.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
}

/// The spread over noise draws of a stochastic model, the fields used here.
#[derive(Clone, Debug, Default, Deserialize)]
struct Stochastic {
    #[serde(default)]
    clean_accuracy_std: Option<f64>,
    #[serde(default)]
    robust_accuracy_std: Option<f64>,
    #[serde(default)]
    draws: Option<usize>,
}

/// The trust checks of an evaluation, the fields used here.
#[derive(Clone, Debug, Default, Deserialize)]
struct Trust {
    #[serde(default)]
    points: usize,
    #[serde(default)]
    issues: Vec<TrustIssue>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct TrustIssue {
    check: String,
    message: String,
}

/// One trained and evaluated model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelOutcome {
    /// The row's name: the key in `results.json` (`ls`, `student`, … for variants).
    #[serde(skip)]
    pub key: String,
    /// The `rampart train --method` it was trained with.
    pub method: String,
    /// The architecture.
    pub arch: String,
    /// Trainable parameters.
    pub parameters: usize,
    /// Epochs trained.
    pub epochs: usize,
    /// Seed of the run.
    pub seed: u64,
    /// Training images used.
    pub train_examples: usize,
    /// Wall time of training, per-epoch evaluation included, over all sessions.
    pub train_seconds: f64,
    /// The preset's epochs for this row, when it trained another number (a shortened
    /// schedule, `--epochs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_epochs: Option<usize>,
    /// The preset's schedule's training time at this row's measured time per epoch:
    /// `schedule_epochs` × `train_seconds` ÷ `epochs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_train_seconds: Option<f64>,
    /// Wall time of the final evaluation's forward passes.
    pub eval_seconds: f64,
    /// Test images of the final evaluation.
    pub test_examples: usize,
    /// Fraction of them classified correctly.
    pub clean_accuracy: f64,
    /// Its 95 % Wilson interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean_accuracy_ci: Option<Interval>,
    /// Fraction misclassified.
    pub clean_error: f64,
    /// The attack of the robust evaluation (PGD-20, L∞, cross-entropy, uniform start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack: Option<String>,
    /// Its L∞ budget ε.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Test images attacked (the first N).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub robust_examples: Option<usize>,
    /// Fraction of them classified correctly, clean and under attack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub robust_accuracy: Option<f64>,
    /// Its 95 % Wilson interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_ci: Option<Interval>,
    /// 1 − robust_accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub robust_error: Option<f64>,
    /// EOT samples of every attack (1 for a deterministic model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eot_samples: Option<usize>,
    /// A stochastic model: standard deviations over noise draws of the clean and
    /// robust accuracy (`draws` of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
    /// Images the trust checks ran on (absent: none ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_checked: Option<usize>,
    /// The trust checks that failed (`check: message`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_issues: Vec<String>,
    /// The confidence threshold τ saved with the model (99 % TPR on held-out images).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence_threshold: Option<f64>,
    /// Wong et al.'s PGD-50-10 (`OUT/<row>/pgd50-10`), where the preset runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgd50_10: Option<RobustFigure>,
    /// The model file, relative to the study folder.
    pub model_file: String,
    /// Its size in bytes (`None`: neither the file nor its record is in the folder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_bytes: Option<u64>,
    /// Its SHA-256, in hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    /// Whether the file is in the study folder; `false` when it stayed on the machine
    /// that trained it (its `model.json` record names it).
    pub model_in_folder: bool,
    /// `rampart train` command lines (one per session), not in results.json.
    #[serde(skip)]
    pub train_commands: Vec<String>,
    /// The `rampart eval` command line, not in results.json.
    #[serde(skip)]
    pub eval_command: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not what rampart writes", path.display()))
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// A robust accuracy on the first images of the test set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RobustFigure {
    /// The images attacked.
    pub examples: usize,
    /// The fraction classified correctly clean and under the attack.
    pub robust_accuracy: f64,
    /// Its 95 % Wilson interval.
    pub robust_accuracy_ci: Option<Interval>,
}

/// The robust figure of the `rampart eval --suite pgd20` results in `dir`, if that
/// run finished there.
fn robust_figure(dir: &Path) -> Result<Option<RobustFigure>> {
    let path = dir.join("results.json");
    if !path.is_file() {
        return Ok(None);
    }
    let results: EvalResults = read_json(&path)?;
    match (results.robust_examples, results.robust_accuracy) {
        (Some(examples), Some(robust_accuracy)) => Ok(Some(RobustFigure {
            examples,
            robust_accuracy,
            robust_accuracy_ci: results.robust_accuracy_ci,
        })),
        _ => bail!("{} holds no robust accuracy", path.display()),
    }
}

/// What identifies a row's model file when the file itself is not at hand: its
/// `model.json`, written beside the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The file's name in the row's folder.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, in hex.
    pub sha256: String,
}

/// The name of a row's [`ModelRecord`].
pub const MODEL_RECORD: &str = "model.json";

/// The record of the model in the row folder `dir`: made from `model.safetensors` (and
/// saved as `model.json`) when the file is there, else read from `model.json`; `None`
/// when neither is.
pub fn model_record(dir: &Path) -> Result<Option<ModelRecord>> {
    let file = dir.join("model.safetensors");
    let record_path = dir.join(MODEL_RECORD);
    if file.is_file() {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut reader = std::fs::File::open(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let bytes = std::io::copy(&mut reader, &mut hasher)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let digest = hasher.finalize();
        let record = ModelRecord {
            file: "model.safetensors".to_string(),
            bytes,
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        };
        let text = serde_json::to_string_pretty(&record)?;
        write_atomic(&record_path, &format!("{text}\n"))?;
        Ok(Some(record))
    } else if record_path.is_file() {
        read_json(&record_path).map(Some)
    } else {
        Ok(None)
    }
}

impl ModelOutcome {
    /// Records the preset's `epochs` for this row: when the row trained another number,
    /// the preset's schedule and its training time at the row's measured time per
    /// epoch.
    pub fn set_schedule(&mut self, epochs: usize) {
        if epochs != self.epochs && self.epochs > 0 {
            self.schedule_epochs = Some(epochs);
            self.schedule_train_seconds =
                Some(epochs as f64 * self.train_seconds / self.epochs as f64);
        }
    }
}

/// Reads the outputs of every row's runs in the study folder `out`.
pub fn collect(out: &Path, rows: &[ModelRow], budgets: &EvalBudgets) -> Result<Vec<ModelOutcome>> {
    rows.iter()
        .map(|row| {
            let dir = model_dir(out, row.method);
            let eval = eval_dir(out, row.method);
            let train: TrainSummary = read_json(&dir.join("summary.json"))?;
            let mut results: EvalResults = read_json(&eval.join("results.json"))?;
            if row.robust_from_protocol(budgets) {
                let path = protocol_dir(out, row.method).join("results.json");
                let protocol: ProtocolResults = read_json(&path)?;
                protocol
                    .fill_robust(&mut results)
                    .with_context(|| format!("{} holds no PGD-20 worst case", path.display()))?;
            }
            let model = model_record(&dir)?;
            Ok(ModelOutcome {
                key: row.method.to_string(),
                method: train.method,
                arch: train.arch,
                parameters: train.parameters,
                epochs: train.epochs,
                seed: train.seed,
                train_examples: train.train_examples,
                train_seconds: train.train_seconds,
                schedule_epochs: None,
                schedule_train_seconds: None,
                eval_seconds: results.eval_seconds,
                test_examples: results.test_examples,
                clean_accuracy: results.clean_accuracy,
                clean_accuracy_ci: results.clean_accuracy_ci,
                clean_error: results.clean_error,
                attack: results.attack,
                eps: results.eps,
                robust_examples: results.robust_examples,
                robust_accuracy: results.robust_accuracy,
                robust_accuracy_ci: results.robust_accuracy_ci,
                robust_error: results.robust_error,
                eot_samples: results.eot_samples,
                spread: results.stochastic.as_ref().map(|st| Spread {
                    draws: st.draws.unwrap_or(0),
                    clean_accuracy_std: st.clean_accuracy_std.unwrap_or(0.0),
                    robust_accuracy_std: st.robust_accuracy_std,
                }),
                trust_checked: results.trust.as_ref().map(|t| t.points),
                trust_issues: results
                    .trust
                    .iter()
                    .flat_map(|t| {
                        t.issues
                            .iter()
                            .map(|i| format!("{}: {}", i.check, i.message))
                    })
                    .collect(),
                confidence_threshold: results.confidence_threshold,
                pgd50_10: robust_figure(&pgd50_10_dir(out, row.method))?,
                model_file: format!("{}/model.safetensors", row.method),
                model_bytes: model.as_ref().map(|m| m.bytes),
                model_sha256: model.as_ref().map(|m| m.sha256.clone()),
                model_in_folder: dir.join("model.safetensors").is_file(),
                train_commands: read_lines(&dir.join("command.txt"))?,
                eval_command: read_lines(&eval.join("command.txt"))?
                    .pop()
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// `results.json`.
#[derive(Debug, Serialize)]
struct ResultsFile<'a> {
    schema_version: u32,
    dataset: &'a str,
    preset: &'a str,
    created: &'a str,
    command: &'a str,
    rampart_version: &'a str,
    wall_seconds: f64,
    models: BTreeMap<&'a str, &'a ModelOutcome>,
}

/// The `results.json` document, keys in schema order.
pub fn results_json(study: &Study, models: &[ModelOutcome]) -> Result<String> {
    let file = ResultsFile {
        schema_version: SCHEMA_VERSION,
        dataset: &study.dataset,
        preset: &study.preset,
        created: &study.created,
        command: &study.command,
        rampart_version: env!("CARGO_PKG_VERSION"),
        wall_seconds: study.wall_seconds,
        models: models.iter().map(|m| (m.key.as_str(), m)).collect(),
    };
    let mut json = serde_json::to_string_pretty(&file)?;
    json.push('\n');
    Ok(json)
}

/// `report.md`.
pub fn report_markdown(study: &Study, models: &[ModelOutcome]) -> String {
    let mut md = format!(
        "# Rampart reproduction: {}, preset `{}`\n\n{}\n\n\
         Run {} with `{}`; this invocation took {} after the build.\n\n\
         ## Evaluation budgets\n\n{}\n\
         Brackets are 95 % intervals: Wilson for accuracies and error rates, a seeded \
         bootstrap over the attacked images for ECE, AUAC, RErr@τ and AUROC. For a \
         stochastic model ± is the standard deviation over noise draws.\n\n\
         ## Clean accuracy\n\n\
         | model | arch | parameters | epochs | train images | train time | test images | clean accuracy | clean error |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        title(&study.dataset),
        study.preset,
        study.preset_about,
        study.created,
        study.command,
        duration(study.wall_seconds),
        study.budgets,
    );
    for m in models {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} % |\n",
            m.key,
            m.arch,
            thousands(m.parameters),
            m.epochs,
            thousands(m.train_examples),
            duration(m.train_seconds),
            thousands(m.test_examples),
            with_spread(
                m.clean_accuracy,
                m.clean_accuracy_ci,
                m.spread.as_ref().map(|s| s.clean_accuracy_std)
            ),
            100.0 * m.clean_error,
        ));
    }
    if models.iter().any(|m| m.schedule_epochs.is_some()) {
        md.push_str(
            "\nRows trained on another schedule than the preset's (`--epochs`, or fitted to a \
             time limit with `--fit-minutes`: `fit.json` holds the fit and `fit/` the step \
             times it was made from): the preset's training time, projected from the row's \
             measured time per epoch (per-epoch evaluation included).\n\n\
             | model | epochs trained | train time | the preset's epochs | its train time, projected |\n\
             |---|---:|---:|---:|---:|\n",
        );
        for m in models {
            if let (Some(e), Some(t)) = (m.schedule_epochs, m.schedule_train_seconds) {
                md.push_str(&format!(
                    "| {} | {} | {} | {e} | ≈ {} |\n",
                    m.key,
                    m.epochs,
                    duration(m.train_seconds),
                    duration(t)
                ));
            }
        }
    }
    if models.iter().any(|m| m.robust_error.is_some()) {
        md.push_str(
            "\n## Robustness\n\n\
             | model | attack | attacked images | EOT | robust accuracy | robust error | τ (99 % TPR) | trust checks |\n\
             |---|---|---:|---:|---:|---:|---:|---|\n",
        );
        for m in models {
            let (Some(acc), Some(err), Some(n)) =
                (m.robust_accuracy, m.robust_error, m.robust_examples)
            else {
                continue;
            };
            let trust = match (m.trust_checked, m.trust_issues.is_empty()) {
                (None, _) => "–".to_string(),
                (Some(_), true) => "passed".to_string(),
                (Some(_), false) => format!("**failed** ({})", m.trust_issues.len()),
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.2} % | {} | {trust} |\n",
                m.key,
                m.attack.as_deref().unwrap_or("–"),
                thousands(n),
                m.eot_samples.unwrap_or(1),
                with_spread(
                    acc,
                    m.robust_accuracy_ci,
                    m.spread.as_ref().and_then(|s| s.robust_accuracy_std)
                ),
                100.0 * err,
                m.confidence_threshold
                    .map_or("–".to_string(), |t| format!("{t:.4}")),
            ));
        }
        md.push_str(
            "\nRobust error counts a test image as wrong when it is misclassified clean or \
             under any of the attacks (untargeted PGD from a uniform random start on the \
             cross-entropy, the C&W margin and the conf objective; per example the worst \
             case, each attack's best point of all iterations). τ is the confidence \
             threshold saved with each model: 99 % of the correctly classified images among \
             the last 1,000 test images have a confidence ≥ τ (the CCAT protocol).\n",
        );
        let failed: Vec<&ModelOutcome> = models
            .iter()
            .filter(|m| !m.trust_issues.is_empty())
            .collect();
        if !failed.is_empty() {
            md.push_str("\n> **Warning: trust checks failed.** These robust figures may over-state the model:\n>\n");
            for m in failed {
                for issue in &m.trust_issues {
                    md.push_str(&format!("> - **{}**: {issue}\n", m.key));
                }
            }
        }
    }
    let wong: Vec<(&ModelOutcome, RobustFigure)> = models
        .iter()
        .filter_map(|m| m.pgd50_10.map(|f| (m, f)))
        .collect();
    if !wong.is_empty() {
        md.push_str(
            "\n## PGD-50-10 (Wong et al.'s protocol)\n\nCross-entropy PGD, 50 steps of 2/255 \
             at L∞ 8/255, 10 runs from fresh uniform starts (each on the images still robust), \
             on the first test images of every deterministic row.\n\n\
             | model | attacked images | robust accuracy | robust error |\n|---|---:|---:|---:|\n",
        );
        for (m, f) in wong {
            md.push_str(&format!(
                "| {} | {} | {} | {:.2} % |\n",
                m.key,
                thousands(f.examples),
                with_spread(f.robust_accuracy, f.robust_accuracy_ci, None),
                100.0 * (1.0 - f.robust_accuracy),
            ));
        }
    }
    let published_rows: Vec<String> = models
        .iter()
        .filter_map(|m| {
            published(&m.key).map(|p| {
                // The row's figure under the published protocol where it ran.
                let ours = match (p.pgd50_10, m.pgd50_10) {
                    (true, Some(f)) => {
                        format!("{:.2} % (PGD-50-10)", 100.0 * (1.0 - f.robust_accuracy))
                    }
                    _ => m
                        .robust_error
                        .map_or("–".into(), |e| format!("{:.2} %", 100.0 * e)),
                };
                format!(
                    "| {} | {:.2} % | {:.2} % | {ours} | {} | {} |\n",
                    m.key,
                    100.0 * m.clean_error,
                    100.0 * p.clean_error,
                    p.robust_error
                        .map_or("–".into(), |e| format!("{:.2} %", 100.0 * e)),
                    p.setting,
                )
            })
        })
        .collect();
    if !published_rows.is_empty() {
        md.push_str(
            "\n## Beside the published figures\n\n\
             | model | clean error (ours) | clean error (published) | robust error (ours) | \
             robust error (published) | published setting |\n|---|---:|---:|---:|---:|---|\n",
        );
        for r in published_rows {
            md.push_str(&r);
        }
        md.push_str(
            "\nThe published figures belong to the full training budgets named beside them; \
             a preset with a smaller budget is expected to be far from them. Methods without \
             a figure in the project's reference (CCAT, OAT, SAT, AR-AdaLS, RegMixup, the \
             student) have no row here.\n",
        );
    }
    md.push_str(
        "\nClean error is the fraction of test images misclassified (the model in eval mode, \
         no augmentation). Train time is the wall time of training including the per-epoch \
         evaluation, summed over resumed sessions. Figures are also in `results.json` \
         (schema: `docs/results-schema.md`); each model's folder holds its resolved \
         `config.json`, `history.jsonl` (one line per epoch), `train.log`, the model and, \
         under `eval/`, per-example predictions.\n",
    );
    md.push_str(&model_files_markdown(models));
    md.push_str(
        "\n## Commands\n\nThe runs start in this folder (DIR) and name its files relative to \
         it; DATA is the data folder, which the runs reach through the link `data`, and BIN \
         the `rampart` binary named by `--rampart-bin`.\n\n```sh\n",
    );
    md.push_str(&study.build_command);
    md.push('\n');
    for m in models {
        for c in &m.train_commands {
            md.push_str(c);
            md.push('\n');
        }
        md.push_str(&m.eval_command);
        md.push('\n');
    }
    md.push_str("```\n");
    md
}

/// The model files, each with its size and SHA-256, and whether it is in the folder.
fn model_files_markdown(models: &[ModelOutcome]) -> String {
    let mut md = String::from(
        "\n## Model files\n\n| model | file | size | SHA-256 | in this folder |\n|---|---|---:|---|---|\n",
    );
    for m in models {
        md.push_str(&format!(
            "| {} | `{}` | {} | {} | {} |\n",
            m.key,
            m.model_file,
            m.model_bytes
                .map_or("–".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6)),
            m.model_sha256
                .as_deref()
                .map_or("–".to_string(), |h| format!("`{h}`")),
            if m.model_in_folder {
                "yes"
            } else {
                "no: it stayed on the machine that trained it"
            },
        ));
    }
    md
}

/// `36.20 % [33.3, 39.2]`, with `± 0.40` (a standard deviation over noise draws)
/// when given.
fn with_spread(v: f64, ci: Option<Interval>, std: Option<f64>) -> String {
    let mut text = format!("{:.2} %", 100.0 * v);
    if let Some(s) = std {
        text = format!("{:.2} ± {:.2} %", 100.0 * v, 100.0 * s);
    }
    if let Some(ci) = ci {
        text.push_str(&format!(" [{:.1}, {:.1}]", 100.0 * ci.lo, 100.0 * ci.hi));
    }
    text
}

/// Writes `results.json` and `report.md` into `out`.
pub fn write(out: &Path, study: &Study, models: &[ModelOutcome]) -> Result<()> {
    write_atomic(&out.join("results.json"), &results_json(study, models)?)?;
    write_atomic(&out.join("report.md"), &report_markdown(study, models))
}

/// Writes `text` atomically (see `rampart_fs`).
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    Ok(rampart_fs::write_atomic(path, text.as_bytes())?)
}

/// Metrics of the evaluation protocol copied into each model's `results.json` entry.
pub const PROTOCOL_KEYS: &[&str] = &[
    "ece",
    "ece_ci",
    "brier",
    "nll",
    "temperature",
    "ece_temperature_scaled",
    "nll_temperature_scaled",
    "auac",
    "auac_ci",
    "err_at_tpr99",
    "err_at_tpr99_ci",
    "rerr_at_tpr99",
    "rerr_at_tpr99_ci",
    "fpr_at_tpr99",
    "roc_auc",
    "threat_models",
    "ood",
    "tau_tpr",
    "ece_bins",
];

/// Merges the evaluation protocol of every model (its `protocol/results.json`) into
/// `OUT/results.json` (each model gains the [`PROTOCOL_KEYS`] and a `protocol` object
/// naming the suite and the attacked images) and appends the comparison written by
/// `rampart compare` (`OUT/comparison.md`, plots in `OUT/plots/`) to `OUT/report.md`.
pub fn add_protocol(out: &Path, rows: &[ModelRow], suite: &str) -> Result<()> {
    let results_path = out.join("results.json");
    let text = std::fs::read_to_string(&results_path)
        .with_context(|| format!("cannot read {}", results_path.display()))?;
    let mut results: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", results_path.display()))?;
    for row in rows {
        let path = crate::reproduce::protocol_dir(out, row.method).join("results.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let protocol: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let Some(entry) = results["models"]
            .get_mut(row.method)
            .and_then(|e| e.as_object_mut())
        else {
            continue;
        };
        for key in PROTOCOL_KEYS {
            if let Some(v) = protocol.get(*key) {
                entry.insert((*key).to_string(), v.clone());
            }
        }
        entry.insert(
            "protocol".into(),
            serde_json::json!({
                "suite": suite,
                "attacked_examples": protocol.get("test_examples"),
                "held_out_examples": protocol.get("held_out_examples"),
                "trust": protocol.get("trust"),
            }),
        );
    }
    write_atomic(&results_path, &serde_json::to_string_pretty(&results)?)?;
    let comparison = std::fs::read_to_string(out.join("comparison.md"))
        .with_context(|| format!("cannot read {}", out.join("comparison.md").display()))?;
    let body = comparison
        .split_once('\n')
        .map_or(comparison.as_str(), |(_, rest)| rest);
    let mut report = std::fs::read_to_string(out.join("report.md"))?;
    report.push_str(&format!(
        "\n## Evaluation protocol (`rampart eval --suite {suite}`)\n\nFrom each model's \
         `protocol/results.json`; see docs/evaluation.md for what the suite runs.\n{body}"
    ));
    write_atomic(&out.join("report.md"), &report)
}

/// Where a row's AutoAttack evaluation writes.
pub fn autoattack_dir(out: &Path, method: &str) -> std::path::PathBuf {
    model_dir(out, method).join("autoattack")
}

/// Where Wong et al.'s PGD-50-10 of a row writes.
pub fn pgd50_10_dir(out: &Path, method: &str) -> std::path::PathBuf {
    model_dir(out, method).join("pgd50-10")
}

/// Where PGD-20 on the images AutoAttack attacked writes.
pub fn autoattack_pgd_dir(out: &Path, method: &str) -> std::path::PathBuf {
    model_dir(out, method).join("autoattack-pgd20")
}

/// Adds each AutoAttack evaluation to its model's entry in `OUT/results.json`
/// (`autoattack`) and a table comparing it with PGD-20 on the same images to
/// `OUT/report.md`.
pub fn add_autoattack(out: &Path, methods: &[&str]) -> Result<()> {
    if methods.is_empty() {
        return Ok(());
    }
    amend_study(out, |results, report| {
        add_autoattack_to(out, methods, results, report)
    })
}

fn add_autoattack_to(
    out: &Path,
    methods: &[&str],
    results: &mut serde_json::Value,
    report: &mut String,
) -> Result<()> {
    report.push_str(
        "\n## AutoAttack\n\nAutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; L∞ 8/255; the \
         `rand` version with EOT for a stochastic model) beside PGD-20 on the very same test \
         images. AutoAttack must not find fewer adversarial examples than PGD-20; the trust \
         checks (docs/autoattack.md) flag gradient masking and randomness.\n\n\
         | model | images | clean accuracy | PGD-20 robust accuracy | AutoAttack robust accuracy | \
         fooled per stage | time | trust warnings |\n|---|---:|---:|---:|---:|---|---:|---|\n",
    );
    for method in methods {
        let dir = autoattack_dir(out, method);
        let aa: EvalResults = read_json(&dir.join("results.json"))?;
        let pgd: EvalResults = read_json(&autoattack_pgd_dir(out, method).join("results.json"))?;
        let detail: serde_json::Value = read_json(&dir.join("autoattack.json"))?;
        let warnings: Vec<String> = detail["trust_warnings"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // Fooled points and time per stage, summed over batches, in stage order.
        let mut stages: Vec<(String, u64, f64)> = Vec::new();
        for batch in detail["batches"].as_array().into_iter().flatten() {
            for st in batch["stages"].as_array().into_iter().flatten() {
                let name = st["name"].as_str().unwrap_or("?").to_string();
                let fooled = st["broken"].as_u64().unwrap_or(0);
                let secs = st["seconds"].as_f64().unwrap_or(0.0);
                match stages.iter_mut().find(|s| s.0 == name) {
                    Some(s) => {
                        s.1 += fooled;
                        s.2 += secs;
                    }
                    None => stages.push((name, fooled, secs)),
                }
            }
        }
        let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.2} %", 100.0 * v));
        let n = aa.robust_examples.unwrap_or(aa.test_examples);
        report.push_str(&format!(
            "| {method} | {} | {} | {} | {} | {} | {} | {} |\n",
            thousands(n),
            pct(Some(aa.clean_accuracy)),
            pct(pgd.robust_accuracy),
            pct(aa.robust_accuracy),
            stages
                .iter()
                .map(|(name, fooled, _)| format!("{name} {fooled}"))
                .collect::<Vec<_>>()
                .join(", "),
            duration(aa.eval_seconds),
            if warnings.is_empty() {
                "none".to_string()
            } else {
                warnings.join("; ")
            },
        ));
        if let Some(entry) = results["models"]
            .get_mut(*method)
            .and_then(|e| e.as_object_mut())
        {
            entry.insert(
                "autoattack".into(),
                serde_json::json!({
                    "attack": aa.attack,
                    "eps": aa.eps,
                    "attacked_examples": n,
                    "clean_accuracy": aa.clean_accuracy,
                    "robust_accuracy": aa.robust_accuracy,
                    "robust_error": aa.robust_error,
                    "pgd20_robust_accuracy": pgd.robust_accuracy,
                    "seconds": aa.eval_seconds,
                    "stages": stages.iter().map(|(name, fooled, secs)| serde_json::json!({
                        "name": name, "fooled": fooled, "seconds": secs
                    })).collect::<Vec<_>>(),
                    "trust_warnings": warnings,
                }),
            );
        }
    }
    Ok(())
}

/// Reads `OUT/results.json` and `OUT/report.md`, lets `f` amend both, and writes them
/// back atomically.
fn amend_study(
    out: &Path,
    f: impl FnOnce(&mut serde_json::Value, &mut String) -> Result<()>,
) -> Result<()> {
    let results_path = out.join("results.json");
    let report_path = out.join("report.md");
    let mut results: serde_json::Value = read_json(&results_path)?;
    let mut report = std::fs::read_to_string(&report_path)
        .with_context(|| format!("cannot read {}", report_path.display()))?;
    f(&mut results, &mut report)?;
    write_atomic(&results_path, &serde_json::to_string_pretty(&results)?)?;
    write_atomic(&report_path, &report)
}

/// Checks the seed papers' claims against `OUT/results.json` ([`crate::claims`]):
/// adds `claims` to it and the claims table to `OUT/report.md`, replacing those of an
/// earlier invocation.
/// Each row's wall time from the study's record of its runs (`OUT/runs.jsonl`, every
/// invocation's): a section of the report and, per model of results.json,
/// `row_seconds` (its runs that finished, one after the other), `row_train_seconds`
/// (its training runs) and `row_runs`. Nothing when the study has no record.
pub fn add_row_times(out: &Path, rows: &[ModelRow]) -> Result<()> {
    let times = row_times(&out.join(crate::jobs::RUN_TIMES))?;
    if times.is_empty() {
        return Ok(());
    }
    amend_study(out, |results, report| {
        report.push_str(
            "
## Time per row

The wall time of each row's runs (training, evaluation,              protocol, PGD-50-10, AutoAttack, sweeps) that finished, summed over the              invocations that ran them (`runs.jsonl`): what the row takes one run after the              other on the study's device; runs side by side (`--jobs`) overlap. A run              stopped before its end is not counted (a resumed training's earlier part is in              its train time).

             | model | runs | training | the rest | row |
|---|---:|---:|---:|---:|
",
        );
        for row in rows {
            let Some(t) = times.get(row.method) else {
                continue;
            };
            report.push_str(&format!(
                "| {} | {} | {} | {} | {} |
",
                row.method,
                t.runs,
                duration(t.train_seconds),
                duration(t.seconds - t.train_seconds),
                duration(t.seconds)
            ));
            if let Some(entry) = results["models"]
                .get_mut(row.method)
                .and_then(|e| e.as_object_mut())
            {
                entry.insert("row_seconds".into(), t.seconds.into());
                entry.insert("row_train_seconds".into(), t.train_seconds.into());
                entry.insert("row_runs".into(), t.runs.into());
            }
        }
        Ok(())
    })
}

/// A row's finished runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowTime {
    pub runs: usize,
    pub seconds: f64,
    pub train_seconds: f64,
}

/// The finished runs of each row in the record `path` (none when it is missing);
/// lines that are not a run's are skipped.
pub fn row_times(path: &Path) -> Result<std::collections::BTreeMap<String, RowTime>> {
    let mut times = std::collections::BTreeMap::<String, RowTime>::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(times),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(row), Some(name), Some(seconds), Some(true)) = (
            v["row"].as_str(),
            v["run"].as_str(),
            v["seconds"].as_f64(),
            v["ok"].as_bool(),
        ) else {
            continue;
        };
        let t = times.entry(row.to_string()).or_default();
        t.runs += 1;
        t.seconds += seconds;
        if name.contains(": training") {
            t.train_seconds += seconds;
        }
    }
    Ok(times)
}

pub fn add_claims(out: &Path) -> Result<()> {
    amend_study(out, |results, report| {
        let claims = crate::claims::evaluate(results, out);
        results["claims"] = serde_json::to_value(&claims)?;
        if let Some(start) = report.find("\n## Claims\n") {
            let end = report[start + 1..]
                .find("\n## ")
                .map_or(report.len(), |e| start + 1 + e);
            report.replace_range(start..end, "");
        }
        report.push_str(&crate::claims::markdown(&claims));
        Ok(())
    })
}

/// Where a row's sweep (λ of OAT, noise of a student) writes.
pub fn sweep_dir(out: &Path, method: &str) -> std::path::PathBuf {
    model_dir(out, method).join("sweep")
}

/// Adds each sweep (`rampart sweep`'s `sweep.json`) to `OUT/results.json` under
/// `sweeps.<row>` and its table and chart to `OUT/report.md`.
pub fn add_sweeps(out: &Path, sweeps: &[(&str, &str, std::path::PathBuf)]) -> Result<()> {
    if sweeps.is_empty() {
        return Ok(());
    }
    amend_study(out, |results, report| {
        report.push_str("\n## Test-time trade-offs\n");
        add_sweeps_to(out, sweeps, results, report)
    })
}

fn add_sweeps_to(
    out: &Path,
    sweeps: &[(&str, &str, std::path::PathBuf)],
    results: &mut serde_json::Value,
    report: &mut String,
) -> Result<()> {
    let mut all = serde_json::Map::new();
    for (method, over, dir) in sweeps {
        let sweep: serde_json::Value = read_json(&dir.join("sweep.json"))?;
        all.insert((*method).to_string(), sweep);
        let md = std::fs::read_to_string(dir.join("sweep.md"))
            .with_context(|| format!("cannot read {}", dir.join("sweep.md").display()))?;
        let body = md.split_once('\n').map_or(md.as_str(), |(_, rest)| rest);
        let rel = dir.strip_prefix(out).unwrap_or(dir).display().to_string();
        let about = match *over {
            "lambda" => format!(
                "One once-for-all model (`{method}`) evaluated at every training λ (clean \
                 accuracy on the first test images, PGD-20 L∞ 8/255 on the first of them), \
                 beside the models trained at one fixed λ (normal: λ = 0, oat-fixed: λ = 0.3, \
                 at: λ = 1; their training budgets are in the table above). The reference \
                 figures come from each model's own evaluation (clean accuracy of the \
                 protocol's attacked images or of all test images, PGD-20 on the attacked \
                 images of the budgets table), the sweep's from the first images only (see \
                 the attack line)."
            ),
            _ => format!(
                "The stochastic student (`{method}`) with its trained noise multiplied by each \
                 scale (0 = its deterministic network): clean accuracy, robust accuracy under \
                 PGD-20 with EOT, and the attack's success rate, as means over noise draws."
            ),
        };
        report.push_str(&format!(
            "\n### `{method}` over {over}\n\n{about}\n{}",
            body.replace("](plots/", &format!("]({rel}/plots/"))
        ));
    }
    results["sweeps"] = serde_json::Value::Object(all);
    Ok(())
}

/// A method's published figures (REFERENCE §3), for the report's comparison table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Published {
    /// Clean test error.
    pub clean_error: f64,
    /// Robust test error at L∞ 8/255 (or 0.03), if published.
    pub robust_error: Option<f64>,
    /// Whether that robust figure is Wong et al.'s PGD-50-10: it then meets the row's
    /// own PGD-50-10 where the preset runs it (else its PGD-20 worst case).
    pub pgd50_10: bool,
    /// The setting the figures belong to.
    pub setting: &'static str,
}

/// The published figures of the row `method`, if the reference has them.
pub fn published(method: &str) -> Option<Published> {
    let (clean_error, robust_error, pgd50_10, setting) = match method {
        "normal" => (
            0.026,
            None,
            false,
            "WRN-28-10, 250 epochs, Cutout + AutoAugment (REFERENCE §3)",
        ),
        "at" => (
            0.09,
            Some(0.479),
            false,
            "Madry AT, WRN-28-10, PGD-10 at 0.03, 150 epochs (REFERENCE §3)",
        ),
        "fast-at" => (
            0.14,
            Some(0.54),
            true,
            "fast AT, PreActResNet-18, 15 epochs, PGD-50-10 (REFERENCE §3)",
        ),
        _ => return None,
    };
    Some(Published {
        clean_error,
        robust_error,
        pgd50_10,
        setting,
    })
}

fn title(dataset: &str) -> &str {
    match dataset {
        "cifar10" => "CIFAR-10",
        "cifar100" => "CIFAR-100",
        "mnist" => "MNIST",
        "svhn" => "SVHN",
        other => other,
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let head = match digits.len() % 3 {
        0 => 3.min(digits.len()),
        r => r,
    };
    let (first, rest) = digits.split_at(head);
    let mut out = first.to_string();
    for group in rest.as_bytes().chunks(3) {
        out.push(',');
        out.push_str(&String::from_utf8_lossy(group));
    }
    out
}

/// Seconds for people: `42.0 s`, `12 min 05 s`, `3 h 07 min`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        return format!("{s:.1} s");
    }
    let total = s.round() as u64;
    if total < 3600 {
        format!("{} min {:02} s", total / 60, total % 60)
    } else {
        format!("{} h {:02} min", total / 3600, total % 3600 / 60)
    }
}

#[cfg(test)]
mod tests;
