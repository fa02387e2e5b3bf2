//! `rampart eval`: flags → checked plan → predictions and results of a saved model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rampart_attacks::{parse_eps, Norm, Objective, Pgd, Restarts, StepSize};
use rampart_data::DatasetKind;
pub use rampart_eval::StochasticFigures;
use rampart_eval::{TrustChecks, TrustConfig, WorstCase};
use rampart_metrics::Interval;
use serde::Serialize;

use crate::common::{at_least_one, DataDir, DeviceArg};

/// Version of the `results.json` written by `rampart eval`.
pub const EVAL_SCHEMA_VERSION: u32 = 1;

/// What to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Suite {
    /// Accuracy, predictions and confidences on the unmodified test images.
    Clean,
    /// The clean suite, plus robust accuracy and error under PGD (L∞, uniform random
    /// start; by default 20 steps of 2/255 at ε = 8/255, as in Madry et al. 2018) on
    /// the first --attack-limit test images: the per-example worst case over the
    /// --objectives (cross-entropy, C&W margin and conf by default), with trust checks.
    #[value(name = "pgd20")]
    #[serde(rename = "pgd20")]
    Pgd20,
    /// The evaluation protocol (see docs/evaluation.md): PGD-20 L∞ 8/255, distal
    /// examples and noise, two corruptions, an L∞ accuracy–perturbation curve; on the
    /// first --attack-limit images [default 1,000]; the last 1,000 test images pick τ.
    Quick,
    /// The CCAT evaluation: PGD-conf, PGD-CE and PGD-margin with the paper's budgets
    /// at L∞ 8/255 and 16/255, distal examples, all corruptions, the curve.
    Ccat,
    /// Every threat model: L∞ 8/255 and 16/255, L2 0.5 and 2, L1 12 and 24, L0 10,
    /// frames, distal, noise, all corruptions, the curve.
    Full,
    /// AutoAttack (standard version: APGD-CE, APGD-T, FAB-T, Square; the rand version
    /// for a stochastic model) in --norm at --eps [default: L∞ 8/255, L2 0.5, L1 12]
    /// on the first --attack-limit images [default 1,000], with the trust checks (see
    /// docs/autoattack.md); resumable. Slow on a CPU.
    Autoattack,
}

impl Suite {
    pub(crate) fn name(self) -> &'static str {
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
    pub(crate) fn protocol(self) -> Option<rampart_eval::Suite> {
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
    /// Model file written by `rampart train` (model.safetensors), or an ONNX image
    /// classifier (.onnx; see docs/interop.md).
    #[arg(long)]
    pub model: PathBuf,

    #[command(flatten)]
    pub onnx: crate::interop::OnnxInputArgs,

    /// Folder holding the data set; defaults to $RAMPART_DATA_DIR, else the per-user
    /// cache folder (~/.cache/rampart/data), filled on first use. See datasets/README.md.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Data set: cifar10, cifar100, mnist or svhn [default: the one the model was
    /// trained on].
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

    /// pgd20: step size in input units (absolute, not a fraction of ε), a decimal or
    /// a fraction [default: 2/255, PGD-20's].
    #[arg(long, value_parser = parse_budget, allow_negative_numbers = true)]
    pub attack_step_size: Option<f64>,

    /// pgd20: runs of each objective's attack from fresh random starts, each on the
    /// images still robust, the first success kept (Wong et al.'s PGD-50-10:
    /// --attack-steps 50 --restarts 10 --objectives ce) [default: 1].
    #[arg(long)]
    pub restarts: Option<usize>,

    /// pgd20: the objectives whose per-example worst case is reported, comma-separated
    /// (ce, cw, dlr, conf) [default: ce,cw,conf].
    #[arg(long, value_delimiter = ',')]
    pub objectives: Option<Vec<String>>,

    /// autoattack: threat model, linf, l2 or l1.
    #[arg(long, default_value = "linf")]
    pub norm: String,

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

    /// Attacks on a stochastic model: EOT samples, i.e. input gradients averaged per
    /// attack step and forward passes whose mean probabilities judge success
    /// [default: 20 for stochastic models, 1 otherwise].
    #[arg(long)]
    pub eot: Option<usize>,

    /// Attacked images the trust checks run on (the first N; 0 switches them off).
    #[arg(long, default_value_t = rampart_eval::TRUST_EXAMPLES)]
    pub trust_examples: usize,

    /// Exit with an error when a trust check fails (after writing the results).
    #[arg(long)]
    pub strict_checks: bool,

    /// Print what the evaluation would make the network do (gradient and forward
    /// passes, upper bounds) as one JSON line, and exit without reading data or
    /// writing anything; needs --dataset (see docs/scale-out.md, wall-time estimates).
    #[arg(long)]
    pub dry_run: bool,

    /// quick/ccat/full: equal-width bins of the ECE and the reliability diagram.
    #[arg(long, default_value_t = rampart_metrics::ECE_BINS)]
    pub ece_bins: usize,

    /// quick/ccat/full: TPR on the held-out correct images that picks τ.
    #[arg(long, default_value_t = rampart_metrics::TPR_99)]
    pub tau_tpr: f64,

    /// quick/ccat/full: points of the accuracy–perturbation curve's ε grid [default: 65].
    #[arg(long)]
    pub curve_points: Option<usize>,

    /// Bootstrap resamples of the 95 % intervals of ECE, AUAC, RErr@τ and AUROC (0:
    /// none; rates always get Wilson intervals).
    #[arg(long, default_value_t = rampart_metrics::BOOTSTRAP_RESAMPLES)]
    pub bootstrap_resamples: usize,

    /// pgd20: also write every attack's adversarial images (adversarial.safetensors).
    #[arg(long)]
    pub save_adversarial: bool,

    /// clean/pgd20 on a stochastic model: independent noise draws the clean and robust
    /// accuracy are measured on, reported as mean ± std.
    #[arg(long, default_value_t = 5)]
    pub draws: usize,

    /// quick/ccat/full/autoattack/pgd20: run shard I of N (0-based: 0/8 … 7/8) of the
    /// attacked images, cut into contiguous runs of whole batches; `rampart merge` joins
    /// the shards' folders into the unsharded run's results (pgd20: --merge, below; see
    /// docs/scale-out.md).
    #[arg(long, value_parser = crate::common::parse_shard)]
    pub shard: Option<rampart_eval::Shard>,

    /// pgd20: the folders of this command's shards (run with --shard I/N): their
    /// attacked batches are taken instead of attacked again, and this run writes what
    /// the unsharded run writes (it needs the model and data, for the clean pass and
    /// the trust checks). Every shard must be given, each once.
    #[arg(long, num_args = 1.., value_name = "SHARD_DIR")]
    pub merge: Vec<PathBuf>,

    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,

    /// Device: cpu, cuda or cuda:N; append +tf32 (cuda+tf32) to allow TF32 tensor cores,
    /// or +bf16 (cuda+bf16) for bf16 convolutions with f32 accumulation.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// A checked `eval` invocation.
#[derive(Clone, Debug)]
pub struct EvalPlan {
    /// The model file.
    pub model: PathBuf,
    /// How an ONNX model's inputs look.
    pub onnx: crate::interop::OnnxInputArgs,
    /// The data folder.
    pub data_dir: DataDir,
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
    /// pgd20: the objectives of the worst case.
    pub objectives: Vec<Objective>,
    /// Trust checks.
    pub trust: TrustConfig,
    /// A failed trust check is an error.
    pub strict_checks: bool,
    /// Metric parameters of the protocol suites.
    pub metrics: rampart_eval::MetricSettings,
    /// Curve grid points of the protocol suites.
    pub curve_points: Option<usize>,
    /// pgd20: write the adversarial images.
    pub save_adversarial: bool,
    /// Which shard of the attacked images to run (quick/ccat/full/autoattack/pgd20).
    pub shard: rampart_eval::Shard,
    /// pgd20: the shard folders whose batches this run takes.
    pub merge: Vec<PathBuf>,
    /// The output folder.
    pub out: PathBuf,
    /// The device.
    pub device: DeviceArg,
}

/// Images attacked by `--suite autoattack` when --attack-limit is not given.
const AUTOATTACK_DEFAULT_LIMIT: usize = 1000;

/// The attack of the `pgd20` and `autoattack` suites.
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
    /// `pgd-20 linf, step 0.00784, eps 0.03137, uniform start, worst case of ce, cw, conf`
    /// (`…, uniform start, 10 restarts, …` with restarts).
    pub(crate) fn describe(&self, objectives: &[Objective]) -> String {
        let step = self.pgd.step_size.at(self.eps);
        let names: Vec<&str> = objectives.iter().map(|o| o.name()).collect();
        let restarts = match self.pgd.restarts.count {
            1 => String::new(),
            n => format!(", {n} restarts"),
        };
        format!(
            "pgd-{} {}, step {step:.5}, eps {:.5}, {} start{restarts}, worst case of {}",
            self.pgd.steps,
            self.pgd.norm,
            self.eps,
            self.pgd.restarts.first,
            names.join(", ")
        )
    }
}

impl EvalArgs {
    /// Checks the flags into a plan; `data_fallback` is the data folder when
    /// --data-dir is not given ([`DataDir::fallback`]).
    pub fn plan(&self, data_fallback: Option<DataDir>) -> Result<EvalPlan> {
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
                    ("--restarts", self.restarts.is_some()),
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
                let norm: Norm = self.norm.parse().context("--norm")?;
                let eps = self.eps.unwrap_or(match norm {
                    Norm::Linf => DEFAULT_ATTACK_EPS,
                    Norm::L2 => 0.5,
                    _ => 12.0,
                });
                norm.check_eps(eps).context("--eps")?;
                Some(AttackPlan {
                    pgd: Pgd {
                        norm,
                        step_size: StepSize::Relative(0.25),
                        ..Pgd::linf_pgd20()
                    },
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
                    ("--restarts", self.restarts.is_some()),
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
                    ("--restarts", self.restarts.is_some()),
                ] {
                    if given {
                        bail!("{flag} applies to attack suites only (e.g. --suite pgd20)");
                    }
                }
                None
            }
            Suite::Pgd20 => {
                let base = Pgd::linf_pgd20();
                let restarts = self.restarts.unwrap_or(base.restarts.count);
                let pgd = Pgd {
                    steps: at_least_one("--attack-steps", self.attack_steps.unwrap_or(base.steps))?,
                    step_size: self
                        .attack_step_size
                        .map_or(base.step_size, StepSize::Absolute),
                    restarts: Restarts::same(
                        at_least_one("--restarts", restarts)?,
                        base.restarts.first,
                    ),
                    ..base
                };
                pgd.validate().context("invalid attack flags")?;
                Norm::Linf
                    .check_eps(self.eps.unwrap_or(DEFAULT_ATTACK_EPS))
                    .context("--eps")?;
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
        if self.suite != Suite::Autoattack && self.norm != "linf" {
            bail!("--norm applies to --suite autoattack (pgd20 is L∞; the full suite has L2, L1 and L0)");
        }
        if self.suite != Suite::Pgd20 && (self.objectives.is_some() || self.save_adversarial) {
            bail!("--objectives and --save-adversarial apply to --suite pgd20");
        }
        let objectives = match &self.objectives {
            Some(names) => names
                .iter()
                .map(|n| {
                    n.parse::<Objective>()
                        .with_context(|| format!("--objectives {n}"))
                })
                .collect::<Result<Vec<_>>>()?,
            None => rampart_eval::WORST_CASE_OBJECTIVES.to_vec(),
        };
        for o in &objectives {
            if o.is_targeted() || *o == Objective::Distal {
                bail!(
                    "--objectives: `{o}` needs a target or has no label; use ce, cw, dlr or conf"
                );
            }
        }
        if objectives.is_empty() {
            bail!("--objectives needs at least one objective");
        }
        let metrics = rampart_eval::MetricSettings {
            ece_bins: self.ece_bins,
            tau_tpr: self.tau_tpr,
            bootstrap_resamples: self.bootstrap_resamples,
            seed: self.attack_seed,
        };
        metrics.validate().context("--ece-bins/--tau-tpr")?;
        if self.curve_points.is_some_and(|p| p < 2) {
            bail!("--curve-points must be at least 2");
        }
        let shard = self.shard.unwrap_or(rampart_eval::Shard::WHOLE);
        if !shard.is_whole() && self.suite == Suite::Clean {
            bail!(
                "--shard applies to the suites that attack (quick, ccat, full, autoattack, \
                 pgd20) and to `rampart attack`; --suite clean attacks nothing"
            );
        }
        if !self.merge.is_empty() && self.suite != Suite::Pgd20 {
            bail!(
                "--merge applies to --suite pgd20; join the shards of the other suites with \
                 `rampart merge`"
            );
        }
        if !self.merge.is_empty() && !shard.is_whole() {
            bail!("--merge joins the shards into the unsharded run: it takes no --shard");
        }
        Ok(EvalPlan {
            model: self.model.clone(),
            onnx: self.onnx.clone(),
            data_dir: DataDir::resolve(self.data_dir.clone(), data_fallback)?,
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
            objectives,
            trust: TrustConfig {
                examples: self.trust_examples,
                ..TrustConfig::default()
            },
            strict_checks: self.strict_checks,
            metrics,
            curve_points: self.curve_points,
            save_adversarial: self.save_adversarial,
            shard,
            merge: self.merge.clone(),
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
    /// 95 % Wilson interval of `clean_accuracy` (for a stochastic model: of the first
    /// noise draw's count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_accuracy_ci: Option<Interval>,
    /// 1 − clean_accuracy.
    pub clean_error: f64,
    /// Wall time of the evaluation (data loading excluded).
    pub eval_seconds: f64,
    /// The attack of an attack suite (e.g. `pgd-20 linf, step 0.00784, eps 0.03137,
    /// uniform start, worst case of ce, cw, conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<String>,
    /// Its threat model (`linf`, `l2`, `l1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm: Option<String>,
    /// Its budget ε.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Test images attacked (the first N evaluated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_examples: Option<usize>,
    /// Fraction of them classified correctly both clean and under every attack, in
    /// [0, 1] (for a stochastic model the mean over noise draws).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy: Option<f64>,
    /// 95 % Wilson interval of the robust accuracy (for a stochastic model: of the
    /// count by the EOT success rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_ci: Option<Interval>,
    /// 1 − robust_accuracy: wrong clean or under attack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_error: Option<f64>,
    /// Wall time of the attacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack_seconds: Option<f64>,
    /// Clean accuracy on the attacked images alone (the mean over noise draws for a
    /// stochastic model): 1 − robust_accuracy / this is the attack's success rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attacked_clean_accuracy: Option<f64>,
    /// Each attack of the worst case alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attacks: Vec<AttackFigure>,
    /// EOT samples of every attack (1 for a deterministic model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eot_samples: Option<usize>,
    /// The confidence threshold τ saved with the model (`confidence_threshold` metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_threshold: Option<f64>,
    /// Fraction of the evaluated clean images rejected (confidence < τ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_rejected: Option<f64>,
    /// Err@τ: clean error among the accepted images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_err_at_threshold: Option<f64>,
    /// RErr@τ under the attacks' worst case (per image a misclassified adversarial
    /// example first, then the highest wrong-class confidence), over the attacked
    /// images (REFERENCE §4, docs/metrics.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_err_at_threshold: Option<f64>,
    /// Its 95 % bootstrap interval (τ fixed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_err_at_threshold_ci: Option<Interval>,
    /// The λ an OAT model was evaluated at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f32>,
    /// Figures over noise draws of a stochastic model (then `clean_accuracy` and
    /// `robust_accuracy` above are their means).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stochastic: Option<StochasticFigures>,
    /// The trust checks of the attack (see docs/evaluation.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustChecks>,
    /// AutoAttack's own trust warnings (gradient masking, randomness, softmax outputs,
    /// the black-box attack beating the white-box ones), in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub autoattack_trust_warnings: Vec<String>,
}

/// One attack of a worst case, alone.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct AttackFigure {
    /// Its name (`pgd20_ce`, `pgd20_margin`, `pgd20_conf`, `apgd-ce`, …).
    pub name: String,
    /// Robust accuracy against it alone.
    pub robust_accuracy: f64,
    /// Its 95 % Wilson interval.
    pub robust_accuracy_ci: Option<Interval>,
    /// Wall time.
    pub seconds: f64,
}

/// 95 % Wilson interval of `k` of `n` (None for n = 0).
pub(crate) fn wilson(k: usize, n: usize) -> Option<Interval> {
    (n > 0)
        .then(|| rampart_metrics::wilson(k, n, rampart_metrics::CONFIDENCE_95).ok())
        .flatten()
}

/// `12.34 % [10.5, 14.4]`.
fn pct_ci(v: f64, ci: Option<Interval>) -> String {
    match ci {
        Some(ci) => format!(
            "{:.2} % [{:.1}, {:.1}]",
            100.0 * v,
            100.0 * ci.lo,
            100.0 * ci.hi
        ),
        None => format!("{:.2} %", 100.0 * v),
    }
}

impl EvalResults {
    /// A Markdown table of the figures; brackets are 95 % intervals.
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
                 | {attack} | {n} | {} | {:.2} % |\n",
                pct_ci(acc, self.robust_accuracy_ci),
                100.0 * err
            ));
            if self.attacks.len() > 1 {
                md.push_str("\n| attack alone | robust accuracy | seconds |\n|---|---:|---:|\n");
                for a in &self.attacks {
                    md.push_str(&format!(
                        "| {} | {} | {:.0} |\n",
                        a.name,
                        pct_ci(a.robust_accuracy, a.robust_accuracy_ci),
                        a.seconds
                    ));
                }
            }
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
            let rerr = match (
                self.robust_err_at_threshold,
                self.robust_err_at_threshold_ci,
            ) {
                (Some(v), ci) => pct_ci(v, ci),
                (None, _) => "–".into(),
            };
            md.push_str(&format!(
                "\n| τ (99 % TPR, saved with the model) | clean rejected | Err@τ | RErr@τ |\n\
                 |---:|---:|---:|---:|\n\
                 | {tau:.4} | {} | {} | {rerr} |\n",
                pct(self.clean_rejected),
                pct(self.clean_err_at_threshold),
            ));
        }
        if let Some(t) = &self.trust {
            md.push_str(&t.markdown());
        }
        if !self.autoattack_trust_warnings.is_empty() {
            md.push_str("\n> **Warning: AutoAttack's trust checks failed.**\n>\n");
            for w in &self.autoattack_trust_warnings {
                md.push_str(&format!("> - {w}\n"));
            }
        }
        md
    }

    fn clean_markdown(&self) -> String {
        format!(
            "# Evaluation of `{}`\n\n\
             | model | method | arch | dataset | suite | test examples | clean accuracy | clean error |\n\
             |---|---|---|---|---|---:|---:|---:|\n\
             | {} | {} | {} | {} | {} | {} | {} | {:.2} % |\n",
            self.model.display(),
            self.model.display(),
            self.method,
            self.arch,
            self.dataset,
            self.suite,
            self.test_examples,
            pct_ci(self.clean_accuracy, self.clean_accuracy_ci),
            100.0 * self.clean_error,
        )
    }

    /// Whether every trust check passed (no check: passed).
    pub fn trusted(&self) -> bool {
        self.trust.as_ref().is_none_or(TrustChecks::passed)
            && self.autoattack_trust_warnings.is_empty()
    }
}

/// The worst case of the pgd20 suite, with what the stochastic figures need.
pub(crate) type AttackOutcome = WorstCase;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: EvalArgs,
    }

    /// The plan of `rampart eval --model m --data-dir d --out o FLAGS`.
    fn plan(flags: &str) -> Result<EvalPlan> {
        let argv = ["eval", "--model", "m", "--data-dir", "d", "--out", "o"]
            .into_iter()
            .chain(flags.split_whitespace());
        Wrapper::try_parse_from(argv)?.args.plan(None)
    }

    /// Wong et al.'s PGD-50-10: 50 steps, 10 runs from fresh uniform starts, named in
    /// the attack's description; one run unless asked, and refused outside pgd20.
    #[test]
    fn pgd_takes_restarts() -> Result<()> {
        let wong = plan("--suite pgd20 --attack-steps 50 --restarts 10 --objectives ce")?;
        let attack = wong.attack.context("no attack")?;
        assert_eq!((attack.pgd.steps, attack.pgd.restarts.count), (50, 10));
        assert_eq!(attack.pgd.restarts.first, attack.pgd.restarts.rest);
        let text = attack.describe(&wong.objectives);
        assert!(
            text.contains("uniform start, 10 restarts, worst case of ce"),
            "{text}"
        );
        let plain = plan("--suite pgd20")?;
        let attack = plain.attack.context("no attack")?;
        assert_eq!(attack.pgd.restarts, Pgd::linf_pgd20().restarts);
        assert!(!attack.describe(&plain.objectives).contains("restarts"));
        for (flags, says) in [
            ("--suite pgd20 --restarts 0", "--restarts"),
            ("--suite clean --restarts 2", "attack suites only"),
            ("--suite quick --restarts 2", "applies to --suite pgd20"),
            ("--suite autoattack --restarts 2", "does not apply"),
        ] {
            let err = plan(flags)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(err.contains(says), "{flags}: {err}");
        }
        Ok(())
    }
}
