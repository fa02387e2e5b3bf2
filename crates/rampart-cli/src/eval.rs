//! `rampart eval`: flags → checked plan → predictions and results of a saved model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, ValueEnum};
use rampart_attacks::{parse_eps, Attack, AutoAttack, Bounds, Norm, Pgd, StepSize};
use rampart_data::{DatasetKind, ImageDataset};
use rampart_defenses::{predict, ConfidenceThreshold, Predictions};
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
    /// The clean suite, plus robust accuracy and error under PGD (L∞, cross-entropy,
    /// uniform random start; by default 20 steps of 2/255 at ε = 8/255, as in Madry et
    /// al. 2018) on the first --attack-limit test images.
    #[value(name = "pgd20")]
    #[serde(rename = "pgd20")]
    Pgd20,
    /// The evaluation protocol (see docs/evaluation.md): PGD-20 L∞ 8/255, distal
    /// examples and noise, two corruptions, an L∞ accuracy–perturbation curve; on the
    /// first --attack-limit images [default 1,000]; the last 1,000 test images pick τ.
    Quick,
    /// The CCAT evaluation: PGD-conf and PGD-CE with the paper's budgets at L∞ 8/255
    /// and 16/255, distal examples, all corruptions, the curve.
    Ccat,
    /// Every threat model: L∞ 8/255 and 16/255, L2 0.5 and 2, L1 12 and 24, L0 10,
    /// frames, distal, noise, all corruptions, the curve.
    Full,
    /// AutoAttack (standard version: APGD-CE, APGD-T, FAB-T, Square) at L∞ --eps
    /// [default 8/255] on the first --attack-limit images [default 1,000], with the
    /// trust checks (see docs/autoattack.md). Slow on a CPU.
    Autoattack,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Clean => "clean",
            Suite::Pgd20 => "pgd20",
            Suite::Quick => "quick",
            Suite::Ccat => "ccat",
            Suite::Full => "full",
            Suite::Autoattack => "autoattack",
        }
    }

    /// The suite of the evaluation pipeline (`rampart-eval`) this names, if any.
    fn protocol(self) -> Option<rampart_eval::Suite> {
        match self {
            Suite::Clean | Suite::Pgd20 | Suite::Autoattack => None,
            Suite::Quick => Some(rampart_eval::Suite::Quick),
            Suite::Ccat => Some(rampart_eval::Suite::Ccat),
            Suite::Full => Some(rampart_eval::Suite::Full),
        }
    }
}

/// Parses an ε or step size flag: a decimal or a fraction such as `8/255`.
fn parse_budget(s: &str) -> std::result::Result<f64, String> {
    parse_eps(s).map_err(|e| e.to_string())
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

    /// pgd20: L∞ budget ε, a decimal or a fraction [default: 8/255].
    #[arg(long, value_parser = parse_budget, allow_negative_numbers = true)]
    pub eps: Option<f64>,

    /// pgd20: attack steps [default: 20].
    #[arg(long)]
    pub attack_steps: Option<usize>,

    /// pgd20: absolute step size, a decimal or a fraction [default: 2/255].
    #[arg(long, value_parser = parse_budget, allow_negative_numbers = true)]
    pub attack_step_size: Option<f64>,

    /// pgd20: attack only the first N evaluated test images (the robust figures are
    /// over these; the clean ones over all) [default: all].
    #[arg(long)]
    pub attack_limit: Option<usize>,

    /// pgd20: seed of the attack's random starts.
    #[arg(long, default_value_t = 0)]
    pub attack_seed: u64,

    /// quick/ccat/full: multiply every attack's steps by this (step sizes grow so the
    /// distance an attack can travel stays the same) [default: 1].
    #[arg(long, default_value_t = 1.0)]
    pub steps_scale: f64,

    /// quick/ccat/full: multiply every attack's restarts by this [default: 1].
    #[arg(long, default_value_t = 1.0)]
    pub restarts_scale: f64,

    /// quick/ccat/full: the last N test images pick the confidence threshold τ and fit
    /// the temperature; they are never attacked.
    #[arg(long, default_value_t = 1000)]
    pub held_out: usize,

    /// Once-for-all (OAT) models: the λ to evaluate at, in [0, 1] [default: the largest
    /// training λ, the most robust setting].
    #[arg(long, allow_negative_numbers = true)]
    pub lambda: Option<f32>,

    /// Stochastic students: multiply the injected noise by this factor ≥ 0 (0 makes
    /// the model deterministic) [default: 1, the trained level].
    #[arg(long, allow_negative_numbers = true)]
    pub noise_scale: Option<f32>,

    /// pgd20 on a stochastic model: EOT samples, i.e. input gradients averaged per
    /// attack step and forward passes whose mean probabilities judge success
    /// [default: 10 for stochastic models, 1 otherwise].
    #[arg(long)]
    pub eot: Option<usize>,

    /// clean/pgd20 on a stochastic model: independent noise draws the clean and robust
    /// accuracy are measured on, reported as mean ± std.
    #[arg(long, default_value_t = 5)]
    pub draws: usize,

    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,

    /// Device: cpu, cuda or cuda:N; append +tf32 (cuda+tf32) to allow TF32 tensor cores.
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
    /// The attack of an attack suite, with its budget.
    pub attack: Option<AttackPlan>,
    /// quick/ccat/full: attacked images (the first N before the held-out tail).
    pub protocol_limit: Option<usize>,
    /// quick/ccat/full: seed of every attack.
    pub protocol_seed: u64,
    /// quick/ccat/full: held-out test images (the last N).
    pub held_out: usize,
    /// quick/ccat/full: (steps, restarts) multipliers.
    pub effort: (f64, f64),
    /// OAT: the λ to evaluate at.
    pub lambda: Option<f32>,
    /// Stochastic students: the noise scale.
    pub noise_scale: Option<f32>,
    /// EOT samples for attacks on stochastic models.
    pub eot: Option<usize>,
    /// Noise draws of the clean and robust accuracy of stochastic models.
    pub draws: usize,
    /// The output folder.
    pub out: PathBuf,
    /// The device.
    pub device: DeviceArg,
}

/// Images attacked by `--suite autoattack` when --attack-limit is not given.
const AUTOATTACK_DEFAULT_LIMIT: usize = 1000;

/// The attack of the `pgd20` suite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttackPlan {
    /// The PGD configuration.
    pub pgd: Pgd,
    /// Its budget.
    pub eps: f64,
    /// Images attacked (the first N), or all.
    pub limit: Option<usize>,
    /// Seed of the random starts.
    pub seed: u64,
}

/// ε of the `pgd20` suite when --eps is not given.
pub const DEFAULT_ATTACK_EPS: f64 = 8.0 / 255.0;

impl AttackPlan {
    /// `pgd-20 linf ce, step 0.00784, eps 0.03137, uniform start`.
    fn describe(&self) -> String {
        let step = match self.pgd.step_size {
            StepSize::Absolute(a) => a,
            StepSize::Relative(r) => r * self.eps,
        };
        format!(
            "pgd-{} {} {}, step {step:.5}, eps {:.5}, {} start",
            self.pgd.steps, self.pgd.norm, self.pgd.objective, self.eps, self.pgd.restarts.first
        )
    }
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
        if self.suite.protocol().is_none()
            && (self.steps_scale != 1.0 || self.restarts_scale != 1.0)
        {
            bail!("--steps-scale and --restarts-scale apply to the quick, ccat and full suites");
        }
        let attack = match self.suite {
            Suite::Autoattack => {
                for (flag, given) in [
                    ("--attack-steps", self.attack_steps.is_some()),
                    ("--attack-step-size", self.attack_step_size.is_some()),
                ] {
                    if given {
                        bail!(
                            "{flag} does not apply to --suite autoattack (its budgets are fixed)"
                        );
                    }
                }
                if self.attack_limit == Some(0) {
                    bail!("--attack-limit must be at least 1");
                }
                let eps = self.eps.unwrap_or(DEFAULT_ATTACK_EPS);
                Norm::Linf.check_eps(eps).context("--eps")?;
                Some(AttackPlan {
                    pgd: Pgd::linf_pgd20(),
                    eps,
                    limit: Some(self.attack_limit.unwrap_or(AUTOATTACK_DEFAULT_LIMIT)),
                    seed: self.attack_seed,
                })
            }
            Suite::Quick | Suite::Ccat | Suite::Full => {
                for (flag, given) in [
                    ("--eps", self.eps.is_some()),
                    ("--attack-steps", self.attack_steps.is_some()),
                    ("--attack-step-size", self.attack_step_size.is_some()),
                ] {
                    if given {
                        bail!("{flag} applies to --suite pgd20; quick/ccat/full use their own budgets (scale them with --steps-scale/--restarts-scale)");
                    }
                }
                rampart_eval::Effort::new(self.steps_scale, self.restarts_scale)
                    .context("--steps-scale/--restarts-scale")?;
                if self.attack_limit == Some(0) {
                    bail!("--attack-limit must be at least 1");
                }
                None
            }
            Suite::Clean => {
                for (flag, given) in [
                    ("--eps", self.eps.is_some()),
                    ("--attack-steps", self.attack_steps.is_some()),
                    ("--attack-step-size", self.attack_step_size.is_some()),
                    ("--attack-limit", self.attack_limit.is_some()),
                ] {
                    if given {
                        bail!("{flag} applies to attack suites only (e.g. --suite pgd20)");
                    }
                }
                None
            }
            Suite::Pgd20 => {
                let base = Pgd::linf_pgd20();
                let pgd = Pgd {
                    steps: at_least_one("--attack-steps", self.attack_steps.unwrap_or(base.steps))?,
                    step_size: self
                        .attack_step_size
                        .map_or(base.step_size, StepSize::Absolute),
                    ..base
                };
                pgd.validate().context("invalid attack flags")?;
                if self.attack_limit == Some(0) {
                    bail!("--attack-limit must be at least 1");
                }
                Some(AttackPlan {
                    pgd,
                    eps: self.eps.unwrap_or(DEFAULT_ATTACK_EPS),
                    limit: self.attack_limit,
                    seed: self.attack_seed,
                })
            }
        };
        Ok(EvalPlan {
            model: self.model.clone(),
            data_dir: resolve_data_dir(self.data_dir.clone(), env_data_dir)?,
            dataset,
            test_limit: self.test_limit,
            batch_size: at_least_one("--batch-size", self.batch_size)?,
            suite: self.suite,
            attack,
            protocol_limit: self.attack_limit,
            protocol_seed: self.attack_seed,
            held_out: at_least_one("--held-out", self.held_out)?,
            effort: (self.steps_scale, self.restarts_scale),
            lambda: self.lambda,
            noise_scale: self.noise_scale,
            eot: self.eot.map(|e| at_least_one("--eot", e)).transpose()?,
            draws: at_least_one("--draws", self.draws)?,
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
    /// The attack of an attack suite (e.g. `pgd-20 linf ce, step 0.00784, eps 0.03137,
    /// uniform start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<String>,
    /// Its L∞ budget ε.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Test images attacked (the first N evaluated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_examples: Option<usize>,
    /// Fraction of them classified correctly both clean and under attack, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy: Option<f64>,
    /// 1 − robust_accuracy: wrong clean or under attack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_error: Option<f64>,
    /// Wall time of the attack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack_seconds: Option<f64>,
    /// Clean accuracy on the attacked images alone (the mean over noise draws for a
    /// stochastic model): 1 − robust_accuracy / this is the attack's success rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attacked_clean_accuracy: Option<f64>,
    /// The confidence threshold τ saved with the model (`confidence_threshold` metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_threshold: Option<f64>,
    /// Fraction of the evaluated clean images rejected (confidence < τ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_rejected: Option<f64>,
    /// Err@τ: clean error among the accepted images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_err_at_threshold: Option<f64>,
    /// RErr@τ under the attack, over the attacked images (REFERENCE §4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_err_at_threshold: Option<f64>,
    /// The λ an OAT model was evaluated at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f32>,
    /// Figures over noise draws of a stochastic model (then `clean_accuracy` and
    /// `robust_accuracy` above are their means).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stochastic: Option<StochasticFigures>,
}

/// How a stochastic model fared over independent noise draws.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct StochasticFigures {
    /// The noise scale evaluated (1 = as trained).
    pub noise_scale: f32,
    /// Independent noise draws.
    pub draws: usize,
    /// EOT samples of the attack (gradients averaged per step; draws judging success).
    pub eot_samples: usize,
    /// Clean accuracy of each draw.
    pub clean_accuracy_draws: Vec<f64>,
    /// Their mean and standard deviation.
    pub clean_accuracy_mean: f64,
    /// Standard deviation (n − 1) over draws; 0 for one draw.
    pub clean_accuracy_std: f64,
    /// Robust accuracy of each draw: the attacked image is classified correctly clean
    /// and adversarial within that draw.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub robust_accuracy_draws: Vec<f64>,
    /// Their mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_mean: Option<f64>,
    /// Their standard deviation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_std: Option<f64>,
    /// Mean over draws of the clean accuracy on the attacked images alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attacked_clean_accuracy_mean: Option<f64>,
    /// Robust accuracy judged by the attack's own EOT rule (mean probabilities over
    /// `eot_samples` draws).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_eot: Option<f64>,
}

/// Mean and sample standard deviation ([`rampart_metrics::mean_std`]), with a standard
/// deviation of 0 for a single value (one noise draw) and (0, 0) for none.
fn mean_std(values: &[f64]) -> Result<(f64, f64)> {
    Ok(match values {
        [] => (0.0, 0.0),
        [v] => (*v, 0.0),
        _ => rampart_metrics::mean_std(values)?,
    })
}

/// Per-example outcomes of the attacked images.
struct AttackOutcome {
    /// Correct clean and under attack.
    robust: Vec<bool>,
    /// The adversarial image is classified correctly.
    adversarial_correct: Vec<bool>,
    /// Confidence on the adversarial image.
    confidence: Vec<f64>,
    /// The adversarial images, batch by batch (kept for stochastic models only).
    adversarial: Vec<(Vec<usize>, Tensor)>,
    seconds: f64,
}

impl EvalResults {
    /// A Markdown table of the figures.
    pub fn markdown(&self) -> String {
        let mut md = self.clean_markdown();
        if let (Some(attack), Some(n), Some(acc), Some(err)) = (
            &self.attack,
            self.robust_examples,
            self.robust_accuracy,
            self.robust_error,
        ) {
            md.push_str(&format!(
                "\n| attack | attacked images | robust accuracy | robust error |\n\
                 |---|---:|---:|---:|\n\
                 | {attack} | {n} | {:.2} % | {:.2} % |\n",
                100.0 * acc,
                100.0 * err
            ));
        }
        if let Some(lambda) = self.lambda {
            md.push_str(&format!(
                "\nOnce-for-all model evaluated at λ = {lambda}.\n"
            ));
        }
        if let Some(st) = &self.stochastic {
            let robust = match (st.robust_accuracy_mean, st.robust_accuracy_std) {
                (Some(m), Some(s)) => format!("{:.2} ± {:.2} %", 100.0 * m, 100.0 * s),
                _ => "–".into(),
            };
            let eot = st
                .robust_accuracy_eot
                .map_or("–".into(), |a| format!("{:.2} %", 100.0 * a));
            md.push_str(&format!(
                "\nStochastic model (noise scale {}): figures over {} independent noise draws \
                 (mean ± std); attacks average {} EOT samples.\n\n\
                 | clean accuracy | robust accuracy | robust accuracy, EOT success rule |\n\
                 |---:|---:|---:|\n\
                 | {:.2} ± {:.2} % | {robust} | {eot} |\n",
                st.noise_scale,
                st.draws,
                st.eot_samples,
                100.0 * st.clean_accuracy_mean,
                100.0 * st.clean_accuracy_std,
            ));
        }
        if let Some(tau) = self.confidence_threshold {
            let pct =
                |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.2} %", 100.0 * v));
            md.push_str(&format!(
                "\n| τ (99 % TPR, saved with the model) | clean rejected | Err@τ | RErr@τ |\n\
                 |---:|---:|---:|---:|\n\
                 | {tau:.4} | {} | {} | {} |\n",
                pct(self.clean_rejected),
                pct(self.clean_err_at_threshold),
                pct(self.robust_err_at_threshold)
            ));
        }
        md
    }

    fn clean_markdown(&self) -> String {
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

    /// Runs AutoAttack (standard, L∞) batch by batch over the first images and writes
    /// `autoattack.json` (the per-batch reports: stages, runtimes, trust checks) and
    /// `results.json`.
    fn run_autoattack(
        &self,
        model: &Classifier,
        method: &str,
        dataset: DatasetKind,
        test: &ImageDataset,
    ) -> Result<EvalResults> {
        let plan = self
            .attack
            .as_ref()
            .context("autoattack needs its budget")?;
        let n = plan.limit.unwrap_or(test.len()).min(test.len());
        let (lo, hi) = model.bounds();
        let bounds = Bounds::new(lo, hi)?;
        // A stochastic model gets the "rand" version (EOT over 20 draws, no FAB/Square).
        let aa = if model.is_stochastic() {
            AutoAttack::rand(Norm::Linf)
        } else {
            AutoAttack::standard(Norm::Linf)
        };
        let started = Instant::now();
        let (mut clean, mut robust) = (0usize, 0usize);
        let mut reports = Vec::new();
        let mut warnings = Vec::new();
        let indices: Vec<usize> = (0..n).collect();
        for chunk in indices.chunks(self.batch_size) {
            let (xs, ys) = test.batch_tensors(chunk, model.device())?;
            // A distinct seed per batch: each example's randomness then depends on its
            // position in the test set, not in the batch.
            let seed = plan.seed.wrapping_add(chunk[0] as u64);
            let eval = aa.evaluate(model, bounds, &xs, &ys, plan.eps, seed)?;
            clean += eval.clean_correct.iter().filter(|&&c| c).count();
            robust += eval
                .result
                .success
                .iter()
                .zip(&eval.clean_correct)
                .filter(|(s, c)| **c && !**s)
                .count();
            warnings.extend(eval.report.trust.warnings.iter().map(|w| w.to_string()));
            tracing::info!(
                done = chunk[chunk.len() - 1] + 1,
                of = n,
                robust,
                "autoattack batch"
            );
            reports.push(eval.report);
        }
        let seconds = started.elapsed().as_secs_f64();
        write_json(
            &self.out.join("autoattack.json"),
            &json!({ "eps": plan.eps, "examples": n, "seconds": seconds,
                     "robust_accuracy": robust as f64 / n as f64,
                     "trust_warnings": warnings, "batches": reports }),
        )?;
        for w in &warnings {
            tracing::warn!("trust check: {w}");
        }
        let results = EvalResults {
            schema_version: EVAL_SCHEMA_VERSION,
            suite: self.suite.name().into(),
            model: self.model.clone(),
            method: method.to_string(),
            arch: model.spec().arch.to_string(),
            dataset: dataset.to_string(),
            test_examples: n,
            clean_accuracy: clean as f64 / n as f64,
            clean_error: 1.0 - clean as f64 / n as f64,
            eval_seconds: seconds,
            attack: Some(format!(
                "autoattack {} linf, eps {:.5}",
                if model.is_stochastic() {
                    "rand"
                } else {
                    "standard"
                },
                plan.eps
            )),
            eps: Some(plan.eps),
            robust_examples: Some(n),
            robust_accuracy: Some(robust as f64 / n as f64),
            robust_error: Some(1.0 - robust as f64 / n as f64),
            attack_seconds: Some(seconds),
            attacked_clean_accuracy: Some(clean as f64 / n as f64),
            confidence_threshold: None,
            clean_rejected: None,
            clean_err_at_threshold: None,
            robust_err_at_threshold: None,
            lambda: model.lambda(),
            stochastic: None,
        };
        write_json(&self.out.join("results.json"), &results)?;
        Ok(results)
    }

    /// Runs a suite of the evaluation pipeline (`rampart-eval`): it writes
    /// `results.json` (schema in docs/results-schema.md), `results.md`, plots and
    /// per-example results into --out, and resumes a run interrupted there.
    fn run_protocol(
        &self,
        suite: rampart_eval::Suite,
        model: &Classifier,
        method: &str,
        dataset: DatasetKind,
        test: &ImageDataset,
        device: &candle_core::Device,
    ) -> Result<EvalResults> {
        let mut config = rampart_eval::EvalConfig::new(suite, &self.out);
        config.effort = rampart_eval::Effort::new(self.effort.0, self.effort.1)?;
        if self.protocol_limit.is_some() {
            config.test_limit = self.protocol_limit;
        }
        config.seed = self.protocol_seed;
        config.held_out = self.held_out;
        config.batch_size = self.batch_size;
        config.device = device.clone();
        if model.is_stochastic() || self.eot.is_some() {
            let k = self.eot.unwrap_or(10);
            config.eot = rampart_attacks::Eot::new(k, k)?;
        }
        let (lo, hi) = model.bounds();
        config.bounds = Bounds::new(lo, hi)?;
        let mut info = rampart_eval::ModelInfo::of(model, Some(&self.model));
        info.dataset = Some(dataset.to_string());
        let report = rampart_eval::evaluate_model(model, &info, test, &config)
            .with_context(|| format!("evaluating {}", self.model.display()))?;
        let linf = report.threat_models.get("linf_8_255");
        Ok(EvalResults {
            schema_version: report.schema_version,
            suite: self.suite.name().into(),
            model: self.model.clone(),
            method: method.to_string(),
            arch: model.spec().arch.to_string(),
            dataset: dataset.to_string(),
            test_examples: report.test_examples,
            clean_accuracy: report.clean_accuracy,
            clean_error: report.clean_error,
            eval_seconds: report.eval_seconds,
            attack: linf.map(|_| format!("{} suite, L∞ 8/255 worst case", self.suite.name())),
            eps: linf.map(|t| t.eps),
            robust_examples: linf.map(|_| report.test_examples),
            robust_accuracy: linf.map(|t| 1.0 - t.robust_error),
            robust_error: linf.map(|t| t.robust_error),
            attack_seconds: None,
            attacked_clean_accuracy: None,
            confidence_threshold: report.model_confidence_threshold,
            clean_rejected: None,
            clean_err_at_threshold: None,
            robust_err_at_threshold: linf.and_then(|t| t.rerr_at_model_threshold),
            lambda: model.lambda(),
            stochastic: None,
        })
    }

    /// Runs the plan; `command` is recorded beside the outputs.
    pub fn run(&self, command: &str) -> Result<EvalResults> {
        let device = self.device.open()?;
        let model = Classifier::load(&self.model, &device)
            .with_context(|| format!("cannot load the model {}", self.model.display()))?;
        if let Some(lambda) = self.lambda {
            model.set_lambda(lambda).context("--lambda")?;
        }
        if let Some(scale) = self.noise_scale {
            model.set_noise_scale(scale).context("--noise-scale")?;
        }
        model.reseed_noise(self.protocol_seed);
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
                "attack": self.attack.as_ref().map(AttackPlan::describe),
                "attack_limit": self.attack.as_ref().and_then(|a| a.limit),
                "attack_seed": self.attack.as_ref().map(|a| a.seed),
                "lambda": model.lambda(),
                "noise_scale": model.spec().noise.as_ref().map(|_| model.noise_scale()),
                "eot": self.eot,
                "draws": model.is_stochastic().then_some(self.draws),
                "device": self.device.to_string(),
            }),
        )?;
        let splits = load_data(dataset, &self.data_dir)?;
        let test = match self.test_limit {
            Some(n) => splits.test.take(n),
            None => splits.test,
        };
        if let Some(suite) = self.suite.protocol() {
            return self.run_protocol(suite, &model, &method, dataset, &test, &device);
        }
        if self.suite == Suite::Autoattack {
            return self.run_autoattack(&model, &method, dataset, &test);
        }
        let threshold = ConfidenceThreshold::stored(&model)
            .with_context(|| format!("cannot read {}", self.model.display()))?;
        let started = Instant::now();
        let predictions = predict(&model, &test, self.batch_size)?;
        let eot_samples = self
            .eot
            .unwrap_or(if model.is_stochastic() { 10 } else { 1 });
        let attack_plan = self.attack.map(|mut a| {
            a.pgd.eot = rampart_attacks::Eot {
                grad_samples: eot_samples,
                eval_samples: eot_samples,
            };
            a
        });
        let attacked = match &attack_plan {
            Some(attack) => Some(self.attack(&model, attack, &test, &predictions)?),
            None => None,
        };
        let stochastic = if model.is_stochastic() {
            Some(self.over_draws(&model, &test, attacked.as_ref(), eot_samples)?)
        } else {
            None
        };
        let eval_seconds = started.elapsed().as_secs_f64();
        predictions.save_json(&self.out.join("predictions.json"))?;
        predictions.save_probs(&self.out.join("probs.safetensors"))?;
        let clean_correct: Vec<bool> = predictions
            .labels
            .iter()
            .zip(&predictions.predicted)
            .map(|(l, p)| l == p)
            .collect();
        let clean_confidence: Vec<f64> = predictions
            .confidence
            .iter()
            .map(|&c| f64::from(c))
            .collect();
        let robust_accuracy = match &stochastic {
            Some(st) => st.robust_accuracy_mean,
            None => attacked.as_ref().map(|a| {
                a.robust.iter().filter(|&&c| c).count() as f64 / a.robust.len().max(1) as f64
            }),
        };
        let clean_accuracy = stochastic
            .as_ref()
            .map_or(predictions.accuracy(), |st| st.clean_accuracy_mean);
        let attacked_clean_accuracy = match (&stochastic, &attacked) {
            (Some(st), Some(_)) => st.attacked_clean_accuracy_mean,
            (None, Some(a)) => {
                let n = a.robust.len();
                let ok = (0..n)
                    .filter(|&i| predictions.predicted[i] == predictions.labels[i])
                    .count();
                Some(ok as f64 / n.max(1) as f64)
            }
            _ => None,
        };
        let tau = threshold.map(|t| t.tau);
        let clean_rejected = tau.map(|tau| {
            clean_confidence.iter().filter(|&&c| c < tau).count() as f64
                / clean_confidence.len().max(1) as f64
        });
        let clean_err_at_threshold = match tau {
            Some(tau) => rampart_metrics::err_at_threshold(&clean_correct, &clean_confidence, tau)
                .map_err(|e| tracing::warn!("Err@τ: {e}"))
                .ok(),
            None => None,
        };
        let robust_err_at_threshold = match (tau, &attacked) {
            (Some(tau), Some(a)) => {
                let n = a.robust.len();
                rampart_metrics::rerr_at_threshold(
                    &clean_correct[..n],
                    &clean_confidence[..n],
                    &a.adversarial_correct,
                    &a.confidence,
                    tau,
                )
                .map_err(|e| tracing::warn!("RErr@τ: {e}"))
                .ok()
            }
            _ => None,
        };
        let results = EvalResults {
            schema_version: EVAL_SCHEMA_VERSION,
            suite: self.suite.name().into(),
            model: self.model.clone(),
            method,
            arch: model.spec().arch.to_string(),
            dataset: dataset.to_string(),
            test_examples: predictions.len(),
            clean_accuracy,
            clean_error: 1.0 - clean_accuracy,
            eval_seconds,
            attack: attack_plan.as_ref().map(AttackPlan::describe),
            eps: self.attack.as_ref().map(|a| a.eps),
            robust_examples: attacked.as_ref().map(|a| a.robust.len()),
            robust_accuracy,
            robust_error: robust_accuracy.map(|a| 1.0 - a),
            attack_seconds: attacked.as_ref().map(|a| a.seconds),
            attacked_clean_accuracy,
            confidence_threshold: tau,
            clean_rejected,
            clean_err_at_threshold,
            robust_err_at_threshold,
            lambda: model.lambda(),
            stochastic,
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

impl EvalPlan {
    /// Clean and robust accuracy of a stochastic model over `self.draws` independent
    /// noise draws: each draw reseeds the noise, classifies every test image and, when
    /// there was an attack, the attacked images clean and adversarial.
    fn over_draws(
        &self,
        model: &Classifier,
        test: &ImageDataset,
        attacked: Option<&AttackOutcome>,
        eot_samples: usize,
    ) -> Result<StochasticFigures> {
        let mut clean = Vec::with_capacity(self.draws);
        let mut robust = Vec::new();
        let mut attacked_clean = Vec::new();
        for draw in 0..self.draws {
            model.reseed_noise(
                self.protocol_seed
                    .wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(draw as u64 + 1)),
            );
            let p = predict(model, test, self.batch_size)?;
            clean.push(p.accuracy());
            if let Some(a) = attacked {
                let mut ok = 0usize;
                for (rows, adv) in &a.adversarial {
                    let predicted = candle_core::ModuleT::forward_t(model, adv, false)?
                        .argmax(1)?
                        .to_vec1::<u32>()?;
                    for (&i, &pred) in rows.iter().zip(&predicted) {
                        if p.predicted[i] == p.labels[i] && pred == p.labels[i] {
                            ok += 1;
                        }
                    }
                }
                robust.push(ok as f64 / a.robust.len().max(1) as f64);
                let n = a.robust.len();
                let clean_ok = (0..n).filter(|&i| p.predicted[i] == p.labels[i]).count();
                attacked_clean.push(clean_ok as f64 / n.max(1) as f64);
            }
            tracing::info!(draw, clean_accuracy = clean[draw], "noise draw");
        }
        let (clean_mean, clean_std) = mean_std(&clean)?;
        let (robust_mean, robust_std) = mean_std(&robust)?;
        let (attacked_clean_mean, _) = mean_std(&attacked_clean)?;
        let has_attack = attacked.is_some();
        Ok(StochasticFigures {
            noise_scale: model.noise_scale(),
            draws: self.draws,
            eot_samples,
            clean_accuracy_draws: clean,
            clean_accuracy_mean: clean_mean,
            clean_accuracy_std: clean_std,
            robust_accuracy_draws: robust,
            robust_accuracy_mean: has_attack.then_some(robust_mean),
            robust_accuracy_std: has_attack.then_some(robust_std),
            attacked_clean_accuracy_mean: has_attack.then_some(attacked_clean_mean),
            robust_accuracy_eot: attacked.map(|a| {
                a.robust.iter().filter(|&&c| c).count() as f64 / a.robust.len().max(1) as f64
            }),
        })
    }

    /// Attacks the first `attack.limit` images of `test` in batches; an image counts as
    /// robust when it is classified correctly clean (`clean`) and under attack.
    fn attack(
        &self,
        model: &Classifier,
        attack: &AttackPlan,
        test: &ImageDataset,
        clean: &Predictions,
    ) -> Result<AttackOutcome> {
        let started = Instant::now();
        let n = attack.limit.map_or(test.len(), |l| l.min(test.len()));
        let (lo, hi) = model.bounds();
        let bounds = Bounds::new(lo, hi)?;
        let mut robust = Vec::with_capacity(n);
        let mut adversarial_correct = Vec::with_capacity(n);
        let mut confidence = Vec::with_capacity(n);
        let mut adversarial = Vec::new();
        let indices: Vec<usize> = (0..n).collect();
        for chunk in indices.chunks(self.batch_size) {
            let (images, labels): (Tensor, Tensor) = test.batch_tensors(chunk, model.device())?;
            let seed = attack.seed.wrapping_add(chunk[0] as u64);
            let mut results = rampart_models::input_gradients_only(|| {
                attack
                    .pgd
                    .run(model, bounds, &images, &labels, &[attack.eps], seed)
            })?;
            let result = results.pop().context("the attack returned no result")?;
            if model.is_stochastic() {
                adversarial.push((chunk.to_vec(), result.clipped.clone()));
            }
            for (j, &i) in chunk.iter().enumerate() {
                let clean_ok = clean.predicted[i] == clean.labels[i];
                robust.push(clean_ok && !result.success[j]);
                adversarial_correct.push(!result.success[j]);
                confidence.push(f64::from(result.confidence[j]));
            }
            tracing::info!(
                attacked = chunk[chunk.len() - 1] + 1,
                of = n,
                robust = robust.iter().filter(|&&c| c).count(),
                seconds = format!("{:.0}", started.elapsed().as_secs_f64()),
                "{}",
                attack.describe()
            );
        }
        Ok(AttackOutcome {
            robust,
            adversarial_correct,
            confidence,
            adversarial,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
