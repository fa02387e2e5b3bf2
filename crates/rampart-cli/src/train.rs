//! `rampart train`: flags → checked plan → a training run in one output folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use rampart_attacks::parse_eps;
use rampart_data::DatasetKind;
use rampart_defenses::{
    AugmentationConfig, ConfidenceThreshold, DecayScope, MethodConfig, Milestone, Overrides,
    Progress, ScheduleKind, SgdConfig, TrainConfig, Trainer, TrainingMethod, CHECKPOINT_FILE,
    MODEL_FILE,
};
use rampart_models::{Arch, Classifier, ModelSpec, NoiseSpec, OatSpec};
use serde_json::json;

use crate::common::{
    at_least_one, create_out_dir, load_data, model_spec_for, record_command, write_json, DataDir,
    DeviceArg,
};
use crate::preset::{AttackSettings, AugmentName, MethodName, Preset, PresetName, ScheduleName};

pub mod workers;
pub use workers::Workers;

/// Batch size when neither a flag nor a preset gives one.
pub const DEFAULT_BATCH_SIZE: usize = 128;
/// Learning rate when neither a flag nor a preset gives one.
pub const DEFAULT_LR: f64 = 0.1;
/// Momentum when neither a flag nor a preset gives one.
pub const DEFAULT_MOMENTUM: f64 = 0.9;
/// Weight decay when neither a flag nor a preset gives one.
pub const DEFAULT_WEIGHT_DECAY: f64 = 5e-4;
/// Batch size of the per-epoch evaluation.
pub const DEFAULT_EVAL_BATCH_SIZE: usize = 256;
/// Multistep milestones when --milestones is not given.
pub const DEFAULT_MILESTONES: [&str; 2] = ["50%", "75%"];
/// Multistep factor when --gamma is not given.
pub const DEFAULT_MULTISTEP_GAMMA: f64 = 0.1;
/// Exponential factor when --gamma is not given (CCAT's ×0.95 per epoch).
pub const DEFAULT_EXPONENTIAL_GAMMA: f64 = 0.95;
/// Cyclic peak when --peak is not given (fast AT).
pub const DEFAULT_PEAK: f64 = 0.4;
/// Held-out test images the confidence threshold is picked on (the CCAT protocol: the
/// last 1,000 test images).
pub const DEFAULT_THRESHOLD_HELD_OUT: usize = 1000;
/// True-positive rate of the confidence threshold: 99 % of the correctly classified
/// held-out images are accepted.
pub const THRESHOLD_TPR: f64 = rampart_metrics::TPR_99;

/// Parses an ε or step size flag: a decimal or a fraction such as `8/255`.
fn parse_budget(s: &str) -> std::result::Result<f64, String> {
    parse_eps(s).map_err(|e| e.to_string())
}

/// Flags of `rampart train`, as typed.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Writes into --out: config.json (the resolved settings), command.txt (the \
command line of every session), train.log, history.jsonl (one line per epoch), \
checkpoint.safetensors (after every epoch), model.safetensors (at the end; with its \
confidence threshold, picked on the last --threshold-held-out test images, in the \
metadata) and summary.json."
)]
pub struct TrainArgs {
    /// Named published settings (architecture, epochs, optimiser, schedule,
    /// augmentation); any flag given as well overrides the preset's value.
    #[arg(long, value_enum)]
    pub preset: Option<PresetName>,

    /// Training method.
    #[arg(long, value_enum)]
    pub method: Option<MethodName>,

    /// Architecture: wrn-D-K (e.g. wrn-28-10, wrn-16-4), resnet20 or preact-resnet18.
    /// Required unless --preset gives it.
    #[arg(long)]
    pub arch: Option<String>,

    /// Data set: cifar10, cifar100, mnist or svhn. The model takes its images (MNIST:
    /// 1×28×28) and is normalised with its training set's mean and std.
    #[arg(long, default_value = "cifar10")]
    pub dataset: String,

    /// Folder holding the data set (the official files, the CIFAR archive's extracted
    /// folder, or an image folder such as the unpacked cifar10-jpeg); defaults to
    /// $RAMPART_DATA_DIR, else the per-user cache folder (~/.cache/rampart/data),
    /// filled on first use. See datasets/README.md.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Output folder of the run (created if missing).
    #[arg(long)]
    pub out: PathBuf,

    /// Number of epochs (passes over the training set). Required unless --preset gives it.
    #[arg(long)]
    pub epochs: Option<usize>,

    /// Training examples per SGD step [default: 128]. The last incomplete batch of
    /// every epoch is dropped.
    #[arg(long)]
    pub batch_size: Option<usize>,

    /// Base learning rate: the peak of cyclic schedules, the start of the others
    /// [default: 0.1].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,

    /// SGD momentum in [0, 1) [default: 0.9].
    #[arg(long, allow_negative_numbers = true)]
    pub momentum: Option<f64>,

    /// Use Nesterov momentum [the default].
    #[arg(long, conflicts_with = "no_nesterov")]
    pub nesterov: bool,

    /// Use heavy-ball (non-Nesterov) momentum.
    #[arg(long)]
    pub no_nesterov: bool,

    /// L2 weight decay added to the gradients [default: 5e-4].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,

    /// Which parameters weight decay applies to: all trainable parameters (BatchNorm
    /// scale/shift and biases included, the common CIFAR recipe) or only convolution
    /// and linear weights. BatchNorm running statistics are never decayed.
    #[arg(long, value_enum, default_value = "all")]
    pub decay_scope: DecayScopeArg,

    /// Learning-rate schedule, evaluated every iteration [default: cosine].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleName>,

    /// Multistep milestones, comma-separated: epochs (100,150) or percentages of the
    /// run (50%,75%) [default: 50%,75%].
    #[arg(long, value_delimiter = ',')]
    pub milestones: Vec<String>,

    /// Factor of the multistep (default 0.1) or exponential (default 0.95) schedule.
    #[arg(long, allow_negative_numbers = true)]
    pub gamma: Option<f64>,

    /// Position of the cyclic schedule's peak as a fraction of the run, in (0, 1)
    /// [default: 0.4].
    #[arg(long, allow_negative_numbers = true)]
    pub peak: Option<f64>,

    /// Linear warm-up: the schedule is multiplied by min(1, epoch / warmup) [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_epochs: Option<f64>,

    /// Training augmentation [default: standard; crop for mnist and svhn, whose digits
    /// must not be mirrored].
    #[arg(long, value_enum)]
    pub augment: Option<AugmentName>,

    /// Add Cutout: one square hole of this side in pixels (16 for CIFAR), after the
    /// other augmentations.
    #[arg(long)]
    pub cutout: Option<usize>,

    /// Label smoothing s: targets (1 − s)·onehot + s·uniform. normal: s in [0, 1)
    /// [default: 0]; ar-adals: every group's initial smoothing, in [0, 0.5]
    /// [default: 0.1].
    #[arg(long, allow_negative_numbers = true)]
    pub label_smoothing: Option<f64>,

    /// L∞ budget ε of the training attack (at, fast-at, trades, ccat, sat) or of the
    /// robustness probe (ar-adals): a decimal or a fraction such as 8/255 [default: the
    /// method's or the preset's].
    #[arg(long, value_parser = parse_budget, allow_negative_numbers = true)]
    pub eps: Option<f64>,

    /// Steps of the training attack (at, trades, ccat, sat) [default: the method's].
    #[arg(long)]
    pub attack_steps: Option<usize>,

    /// Step size of the training attack, absolute, e.g. 2/255 or 0.007 (fast-at: the
    /// FGSM step α, default 1.25·ε) [default: the method's].
    #[arg(long, value_parser = parse_budget, allow_negative_numbers = true)]
    pub attack_step_size: Option<f64>,

    /// The training attack returns its last iterate instead of its best evaluated
    /// point, as Madry et al.'s (at) and Wong et al.'s (fast-at) training code does
    /// (at, fast-at, ccat, sat, oat) [default: the best point].
    #[arg(long)]
    pub attack_last_iterate: bool,

    /// Fraction of each batch made adversarial, in (0, 1] (at, fast-at, ccat)
    /// [default: 1 for at and fast-at, 0.5 for ccat].
    #[arg(long, allow_negative_numbers = true)]
    pub adv_fraction: Option<f64>,

    /// Weight β ≥ 0 of the regulariser: TRADES' KL term [default: 6], SAT's Sinkhorn
    /// divergence [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub beta: Option<f64>,

    /// RegMixup's α > 0: the mixing weight λ ~ Beta(α, α) [default: 20].
    #[arg(long, allow_negative_numbers = true)]
    pub mixup_alpha: Option<f64>,

    /// CCAT's power ρ > 0 of λ = 1 − (1 − min(1, ‖δ‖∞/ε))^ρ [default: 10].
    #[arg(long, allow_negative_numbers = true)]
    pub rho: Option<f64>,

    /// Keep an exponential moving average of the weights with this decay in [0, 1)
    /// (e.g. 0.999), updated every step; the average is evaluated after each epoch and
    /// saved as the final model.
    #[arg(long, allow_negative_numbers = true)]
    pub ema: Option<f64>,

    /// After training, pick the confidence threshold τ (99 % of the correctly
    /// classified held-out images accepted) on the last N test images and save it in
    /// the model's metadata (`confidence_threshold`); 0 skips it.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD_HELD_OUT)]
    pub threshold_held_out: usize,

    /// Seed of the model's initialisation, the batch order, the augmentation and the
    /// method's randomness.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Train on the first N training examples only (quick runs).
    #[arg(long)]
    pub train_limit: Option<usize>,

    /// Evaluate after each epoch on the first N test examples only; 0 skips the
    /// per-epoch evaluation [default: the whole test set].
    #[arg(long)]
    pub test_limit: Option<usize>,

    /// Batch size of the per-epoch evaluation.
    #[arg(long, default_value_t = DEFAULT_EVAL_BATCH_SIZE)]
    pub eval_batch_size: usize,

    /// Start from the weights of this model file (a `rampart train` model of the same
    /// architecture and classes) instead of a fresh initialisation: fine-tuning, e.g.
    /// adversarial fine-tuning of a normally trained model.
    #[arg(long)]
    pub init_from: Option<PathBuf>,

    /// Make the model a stochastic student: adaptive noise after every BatchNorm with
    /// std α·σ (σ the channel's batch std), each layer's α learnable and starting at
    /// this value. Combine with --init-from TEACHER to start from a trained network.
    #[arg(long, allow_negative_numbers = true)]
    pub noise: Option<f32>,

    /// --method oat: the λ values the model is trained on, comma-separated, strictly
    /// increasing in [0, 1] [default: 0,0.1,0.2,0.3,0.4,1]. One value trains a
    /// dedicated model at that fixed λ (loss (1−λ)·CE(clean) + λ·CE(adversarial)).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub lambdas: Vec<f32>,

    /// Continue the run in --out from its last checkpoint (the result equals an
    /// uninterrupted run); starts afresh when there is no checkpoint yet.
    #[arg(long)]
    pub resume: bool,

    /// Print what the run would make the network do (steps, train-mode and attack
    /// passes, evaluation passes) as one JSON line, and exit without reading data or
    /// writing anything (see docs/scale-out.md, wall-time estimates).
    #[arg(long)]
    pub dry_run: bool,

    /// Device: cpu, cuda or cuda:N; append +tf32 (cuda+tf32) to allow TF32 tensor cores,
    /// or +bf16 (cuda+bf16) for bf16 convolutions with f32 accumulation.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,

    /// Data-parallel training on N workers (alias --gpus): one process per GPU
    /// (cuda:0 … cuda:N−1, NCCL; needs a build with `--features nccl`), or N CPU
    /// processes with --device cpu. --batch-size is the global batch, split evenly;
    /// worker 0 writes every file, and a checkpoint resumes on any number of workers.
    /// See docs/scale-out.md.
    #[arg(long, alias = "gpus", default_value_t = 1)]
    pub workers: usize,

    /// With --workers: synchronised BatchNorm (PyTorch's SyncBatchNorm). Every
    /// train-mode BatchNorm normalises with the whole global batch's statistics and
    /// reduces its gradient sums over the workers, so a step equals one process's on
    /// the global batch; without it each worker normalises with its own rows (DDP's
    /// default). A stochastic student's noise σ and an OAT model's dual BatchNorms are
    /// synchronised too.
    #[arg(long)]
    pub sync_bn: bool,

    /// Set by the launcher of --workers: this worker's rank.
    #[arg(long, hide = true)]
    pub worker_rank: Option<usize>,

    /// Set by the launcher of --workers: the file the workers meet through.
    #[arg(long, hide = true)]
    pub rendezvous: Option<PathBuf>,
}

/// `--decay-scope` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecayScopeArg {
    /// Every trainable parameter.
    All,
    /// Convolution and linear weights only.
    WeightsOnly,
}

/// The method with its settings.
pub type MethodPlan = MethodConfig;

/// A checked `train` invocation.
#[derive(Clone, Debug)]
pub struct TrainPlan {
    /// The preset the settings started from.
    pub preset: Option<Preset>,
    /// The method.
    pub method: MethodPlan,
    /// The architecture.
    pub arch: Arch,
    /// The data set.
    pub dataset: DatasetKind,
    /// Its folder.
    pub data_dir: DataDir,
    /// The output folder.
    pub out: PathBuf,
    /// The loop's configuration.
    pub config: TrainConfig,
    /// Training examples used (first N), or all.
    pub train_limit: Option<usize>,
    /// Per-epoch evaluation examples (first N), or all.
    pub test_limit: Option<usize>,
    /// Held-out test images (the last N) the confidence threshold is picked on; 0: none.
    pub threshold_held_out: usize,
    /// The model whose weights training starts from, if not a fresh initialisation.
    pub init_from: Option<PathBuf>,
    /// Initial noise factor α of a stochastic student (None: a deterministic model).
    pub noise: Option<f32>,
    /// The λ values of an OAT model.
    pub lambdas: Option<Vec<f32>>,
    /// Continue from the checkpoint.
    pub resume: bool,
    /// The device.
    pub device: DeviceArg,
    /// One process, a launcher of workers, or one worker.
    pub workers: Workers,
    /// Synchronised BatchNorm over the workers (`--sync-bn`).
    pub sync_bn: bool,
}

/// The first of a flag's and a preset's value, else the default.
fn pick<T>(flag: Option<T>, preset: Option<T>, default: T) -> T {
    flag.or(preset).unwrap_or(default)
}

fn positive(flag: &str, value: f64) -> Result<f64> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{flag} must be a finite number > 0, got {value}");
    }
    Ok(value)
}

impl TrainArgs {
    /// Checks the flags into a plan; `data_fallback` is the data folder when
    /// --data-dir is not given ([`DataDir::fallback`]).
    pub fn plan(&self, data_fallback: Option<DataDir>) -> Result<TrainPlan> {
        let preset = self.preset.map(PresetName::preset);
        let p = preset.as_ref();
        let method = pick(self.method, p.map(|p| p.method), MethodName::Normal);
        let lambdas = self.oat_lambdas(method)?;
        let arch_name = self
            .arch
            .clone()
            .or(p.map(|p| p.arch.to_string()))
            .context("--arch is required unless --preset gives it (e.g. --arch wrn-16-4)")?;
        let arch: Arch = arch_name.parse().context("--arch")?;
        let dataset: DatasetKind = self.dataset.parse().context("--dataset")?;
        let data_dir = DataDir::resolve(self.data_dir.clone(), data_fallback)?;
        let epochs = self
            .epochs
            .or(p.map(|p| p.epochs))
            .context("--epochs is required unless --preset gives it")?;
        let epochs = at_least_one("--epochs", epochs)?;
        let batch_size = at_least_one(
            "--batch-size",
            pick(self.batch_size, p.map(|p| p.batch_size), DEFAULT_BATCH_SIZE),
        )?;
        let eval_batch_size = at_least_one("--eval-batch-size", self.eval_batch_size)?;
        let lr = positive("--lr", pick(self.lr, p.map(|p| p.lr), DEFAULT_LR))?;
        let momentum = pick(self.momentum, p.map(|p| p.momentum), DEFAULT_MOMENTUM);
        if !(0.0..1.0).contains(&momentum) {
            bail!("--momentum must lie in [0, 1), got {momentum}");
        }
        let flag_nesterov = match (self.nesterov, self.no_nesterov) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let nesterov = pick(flag_nesterov, p.map(|p| p.nesterov), true) && momentum > 0.0;
        if flag_nesterov == Some(true) && momentum == 0.0 {
            bail!("--nesterov needs a --momentum > 0");
        }
        let weight_decay = pick(
            self.weight_decay,
            p.map(|p| p.weight_decay),
            DEFAULT_WEIGHT_DECAY,
        );
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            bail!("--weight-decay must be finite and ≥ 0, got {weight_decay}");
        }
        let schedule = self.schedule_kind(p)?;
        let warmup_epochs = self.warmup_epochs.unwrap_or(0.0);
        if !(warmup_epochs.is_finite() && warmup_epochs >= 0.0 && warmup_epochs <= epochs as f64) {
            bail!("--warmup-epochs must lie in [0, --epochs], got {warmup_epochs}");
        }
        let augment = self.augment.unwrap_or_else(|| {
            match p.map_or(AugmentName::Standard, |p| p.augment) {
                // Digits must not be mirrored.
                AugmentName::Standard
                    if matches!(dataset, DatasetKind::Mnist | DatasetKind::Svhn) =>
                {
                    AugmentName::Crop
                }
                other => other,
            }
        });
        let cutout = self.cutout.or(p.and_then(|p| p.cutout));
        if cutout == Some(0) {
            bail!("--cutout must be at least 1 pixel");
        }
        let augmentation = match augment {
            AugmentName::Standard => AugmentationConfig {
                crop_padding: 4,
                flip: true,
                cutout,
            },
            AugmentName::Crop => AugmentationConfig {
                crop_padding: 4,
                flip: false,
                cutout,
            },
            AugmentName::None => AugmentationConfig {
                crop_padding: 0,
                flip: false,
                cutout,
            },
        };
        let method = self.method_plan(method, p.map(|p| p.attack).unwrap_or_default())?;
        if self.train_limit == Some(0) {
            bail!("--train-limit must be at least 1");
        }
        let config = TrainConfig {
            epochs,
            batch_size,
            lr,
            schedule,
            warmup_epochs,
            sgd: SgdConfig {
                momentum,
                nesterov,
                weight_decay,
                decay_scope: match self.decay_scope {
                    DecayScopeArg::All => DecayScope::All,
                    DecayScopeArg::WeightsOnly => DecayScope::WeightsOnly,
                },
            },
            augmentation,
            seed: self.seed,
            eval_batch_size,
            ema: self.ema,
        };
        config.validate().context("invalid training flags")?;
        if self.sync_bn && self.workers < 2 {
            bail!("--sync-bn synchronises the BatchNorm of --workers N (N ≥ 2) only");
        }
        let (workers, device) = Workers::plan(
            self.workers,
            self.worker_rank,
            self.rendezvous.as_deref(),
            self.device,
            config.batch_size,
        )?;
        Ok(TrainPlan {
            preset,
            method,
            arch,
            dataset,
            data_dir,
            out: self.out.clone(),
            config,
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            threshold_held_out: self.threshold_held_out,
            init_from: self.init_from.clone(),
            noise: self.noise,
            lambdas,
            resume: self.resume,
            device,
            workers,
            sync_bn: self.sync_bn,
        })
    }

    /// The λ values of an OAT model (`--lambdas`, checked), refused for other methods.
    fn oat_lambdas(&self, method: MethodName) -> Result<Option<Vec<f32>>> {
        if method != MethodName::Oat {
            if !self.lambdas.is_empty() {
                bail!("--lambdas applies to --method oat only");
            }
            return Ok(None);
        }
        let spec = if self.lambdas.is_empty() {
            OatSpec::standard()
        } else {
            OatSpec {
                lambdas: self.lambdas.clone(),
                ..OatSpec::standard()
            }
        };
        let probe = ModelSpec {
            oat: Some(spec.clone()),
            ..ModelSpec::wrn(10, 1, 10)
        };
        probe.validate().context("--lambdas")?;
        Ok(Some(spec.lambdas))
    }

    /// The method with its settings: the method's published defaults, then the
    /// preset's attack, then the flags, merged by the method's own configuration
    /// ([`MethodConfig::merge`]), which refuses a flag the method does not use.
    fn method_plan(&self, name: MethodName, preset: AttackSettings) -> Result<MethodPlan> {
        let flags = Overrides {
            label_smoothing: self.label_smoothing,
            mixup_alpha: self.mixup_alpha,
            eps: self.eps,
            attack_steps: self.attack_steps,
            attack_step_size: self.attack_step_size,
            adv_fraction: self.adv_fraction,
            beta: self.beta,
            rho: self.rho,
            attack_last_iterate: self.attack_last_iterate.then_some(true),
        };
        Ok(MethodConfig::merge(
            name.kind(),
            &flags,
            &preset.overrides(),
        )?)
    }

    /// The schedule: parameters from flags, else from the preset when its schedule is
    /// the one chosen, else the defaults. A parameter flag for another schedule is refused.
    fn schedule_kind(&self, p: Option<&Preset>) -> Result<ScheduleKind> {
        let name = pick(self.schedule, p.map(|p| p.schedule), ScheduleName::Cosine);
        let same = p.filter(|p| p.schedule == name);
        let refuse = |flag: &str, given: bool| -> Result<()> {
            if given {
                bail!(
                    "{flag} does not apply to the {} schedule",
                    format!("{name:?}").to_lowercase()
                );
            }
            Ok(())
        };
        let kind = match name {
            ScheduleName::Constant | ScheduleName::Cosine => {
                refuse("--milestones", !self.milestones.is_empty())?;
                refuse("--gamma", self.gamma.is_some())?;
                refuse("--peak", self.peak.is_some())?;
                if name == ScheduleName::Constant {
                    ScheduleKind::Constant
                } else {
                    ScheduleKind::Cosine
                }
            }
            ScheduleName::Multistep => {
                refuse("--peak", self.peak.is_some())?;
                let texts: Vec<String> = if !self.milestones.is_empty() {
                    self.milestones.clone()
                } else if let Some(p) = same.filter(|p| !p.milestones.is_empty()) {
                    p.milestones.iter().map(|s| s.to_string()).collect()
                } else {
                    DEFAULT_MILESTONES.iter().map(|s| s.to_string()).collect()
                };
                let milestones = texts
                    .iter()
                    .map(|t| t.parse::<Milestone>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .context("--milestones")?;
                let gamma = pick(
                    self.gamma,
                    same.and_then(|p| p.gamma),
                    DEFAULT_MULTISTEP_GAMMA,
                );
                ScheduleKind::Multistep { milestones, gamma }
            }
            ScheduleName::Cyclic => {
                refuse("--milestones", !self.milestones.is_empty())?;
                refuse("--gamma", self.gamma.is_some())?;
                ScheduleKind::Cyclic {
                    peak: pick(self.peak, same.and_then(|p| p.peak), DEFAULT_PEAK),
                }
            }
            ScheduleName::Exponential => {
                refuse("--milestones", !self.milestones.is_empty())?;
                refuse("--peak", self.peak.is_some())?;
                ScheduleKind::Exponential {
                    gamma: pick(
                        self.gamma,
                        same.and_then(|p| p.gamma),
                        DEFAULT_EXPONENTIAL_GAMMA,
                    ),
                }
            }
        };
        Ok(kind)
    }
}

impl TrainPlan {
    /// A fresh training method of the plan's settings.
    pub(crate) fn training_method(&self) -> Result<Box<dyn TrainingMethod>> {
        self.method
            .method()
            .with_context(|| format!("--method {}", self.method.name()))
    }

    /// The model trained: the architecture for the data set, λ-conditioned for OAT,
    /// with noise injection for a stochastic student.
    pub fn model_spec(&self) -> ModelSpec {
        ModelSpec {
            noise: self.noise.map(|alpha| NoiseSpec { alpha }),
            oat: self.lambdas.clone().map(|lambdas| OatSpec {
                lambdas,
                ..OatSpec::standard()
            }),
            ..model_spec_for(self.arch, self.dataset)
        }
    }

    /// Where the log goes.
    pub fn log_file(&self) -> PathBuf {
        self.out.join("train.log")
    }

    /// The resolved settings as written to `config.json`.
    pub fn to_json(&self, command: &str) -> Result<serde_json::Value> {
        let method = self.training_method()?;
        Ok(json!({
            "command": "train",
            "rampart_version": env!("CARGO_PKG_VERSION"),
            "command_line": command,
            "preset": self.preset.map(|p| p.name),
            "method": method.name(),
            "method_settings": method.settings(),
            "arch": self.arch.to_string(),
            "dataset": self.dataset.to_string(),
            "data_dir": self.data_dir.path,
            "out": self.out,
            "train_limit": self.train_limit,
            "test_limit": self.test_limit,
            "threshold_held_out": self.threshold_held_out,
            "init_from": self.init_from,
            "noise": self.noise,
            "lambdas": self.lambdas,
            "threshold_tpr": THRESHOLD_TPR,
            "resume": self.resume,
            "device": self.device.to_string(),
            "gpu_switches": crate::common::gpu_switches(&self.device),
            "workers": self.workers.count(),
            "sync_batch_norm": self.sync_bn,
            "train": self.config,
        }))
    }

    /// Refuses to train into a folder that already holds a run, unless resuming; when
    /// resuming, refuses a checkpoint of other settings before anything is written
    /// (the trainer checks again, the training set's size included).
    pub fn check_out_dir(&self) -> Result<()> {
        let checkpoint = self.out.join(CHECKPOINT_FILE);
        if self.resume {
            if checkpoint.is_file() {
                let meta = rampart_defenses::read_checkpoint_meta(&checkpoint)?;
                let method = self.training_method()?;
                let spec = self.model_spec();
                let differs = |what: &str| {
                    anyhow::anyhow!(
                        "cannot resume {}: its checkpoint was written with another {what}; \
                         resume with the same flags (see its config.json), or choose another --out",
                        self.out.display()
                    )
                };
                if meta.method != method.name() || meta.method_settings != method.settings() {
                    return Err(differs("method or method settings"));
                }
                if meta.spec != spec {
                    return Err(differs("architecture or data set"));
                }
                if meta.config != self.config {
                    return Err(differs("training configuration"));
                }
            }
            return Ok(());
        }
        for file in [CHECKPOINT_FILE, MODEL_FILE] {
            if self.out.join(file).exists() {
                bail!(
                    "{} already holds a training run ({file}): pass --resume to continue it, \
                     or choose another --out",
                    self.out.display()
                );
            }
        }
        Ok(())
    }

    /// Runs the plan; `command` is recorded beside the outputs.
    /// A data-parallel worker other than worker 0 writes nothing and returns the
    /// summary worker 0 writes, without the confidence threshold.
    pub fn run(&self, command: &str, progress: Progress) -> Result<TrainSummary> {
        let leader = self.workers.leads();
        if leader {
            self.check_out_dir()?;
            create_out_dir(&self.out)?;
            record_command(&self.out, command)?;
            write_json(&self.out.join("config.json"), &self.to_json(command)?)?;
        }
        let device = self.device.open()?;
        let group = self.workers.join(&device)?;
        let splits = load_data(self.dataset, &self.data_dir)?;
        let train = match self.train_limit {
            Some(n) => splits.train.take(n),
            None => splits.train,
        };
        let held_out =
            (self.threshold_held_out > 0).then(|| splits.test.tail(self.threshold_held_out));
        let test = match self.test_limit {
            Some(n) => splits.test.take(n),
            None => splits.test,
        };
        let mut model = Classifier::new(self.model_spec(), self.config.seed, &device)?;
        if let Some(path) = &self.init_from {
            let init = Classifier::load(path, &device)
                .with_context(|| format!("--init-from: cannot load {}", path.display()))?;
            let fresh = model.init_from(&init).with_context(|| {
                format!(
                    "--init-from: {} (a {} with {} classes) does not fit this run's {} with {} classes",
                    path.display(),
                    init.spec().arch,
                    init.spec().num_classes,
                    model.spec().arch,
                    model.spec().num_classes
                )
            })?;
            tracing::info!(
                model = %path.display(),
                new_variables = fresh.len(),
                "starting from the weights of another model"
            );
        }
        let mut trainer = Trainer::new(self.config.clone(), &self.out)?
            .resume(self.resume)
            .progress(progress)
            .metadata("dataset", self.dataset.to_string());
        if let Some(p) = &self.preset {
            trainer = trainer.metadata("preset", p.name);
        }
        if let Some(path) = &self.init_from {
            trainer = trainer.metadata("init_from", path.display().to_string());
        }
        if let Some(group) = group {
            trainer = trainer.parallel(group).sync_batch_norm(self.sync_bn);
        }
        let train_examples = train.len();
        let method = self.training_method()?;
        let outcome = trainer.run(&mut model, method.as_ref(), Arc::new(train), &test)?;
        let threshold = match &held_out {
            Some(held_out) if leader => {
                self.store_threshold(&mut model, held_out, &outcome.model_path)?
            }
            _ => None,
        };
        let last = outcome.history.last();
        let summary = TrainSummary {
            schema_version: SUMMARY_SCHEMA_VERSION,
            method: method.name().to_string(),
            arch: self.arch.to_string(),
            dataset: self.dataset.to_string(),
            preset: self.preset.map(|p| p.name.to_string()),
            parameters: model.num_parameters(),
            epochs: self.config.epochs,
            seed: self.config.seed,
            train_examples,
            test_examples: last.map_or(0, |r| r.test_examples),
            test_accuracy: last.and_then(|r| r.test_accuracy),
            train_seconds: last.map_or(0.0, |r| r.elapsed_seconds),
            model: outcome.model_path,
            confidence_threshold: threshold.map(|t| t.tau),
        };
        if leader {
            write_json(&self.out.join(SUMMARY_FILE), &summary)?;
        }
        Ok(summary)
    }

    /// Picks τ on `held_out` and rewrites the saved model with it in its metadata. A
    /// model that classifies no held-out image correctly has no τ: that is logged and
    /// the model is kept without one.
    fn store_threshold(
        &self,
        model: &mut Classifier,
        held_out: &rampart_data::ImageDataset,
        path: &Path,
    ) -> Result<Option<ConfidenceThreshold>> {
        let threshold = match ConfidenceThreshold::fit_on(
            model,
            held_out,
            self.config.eval_batch_size,
            THRESHOLD_TPR,
        ) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("no confidence threshold saved: {e}");
                return Ok(None);
            }
        };
        threshold.store(model)?;
        model
            .save(path)
            .with_context(|| format!("cannot rewrite {}", path.display()))?;
        tracing::info!(
            tau = threshold.tau,
            held_out = threshold.held_out_examples,
            correct = threshold.held_out_correct,
            "confidence threshold at 99 % TPR saved with the model"
        );
        Ok(Some(threshold))
    }
}

/// Written by a finished `train` beside the model.
pub const SUMMARY_FILE: &str = "summary.json";
/// Version of [`SUMMARY_FILE`]'s layout.
pub const SUMMARY_SCHEMA_VERSION: u32 = 1;

/// What a finished `train` reports: `summary.json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    /// [`SUMMARY_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The method's short name.
    pub method: String,
    /// The architecture.
    pub arch: String,
    /// The data set.
    pub dataset: String,
    /// The preset the settings started from.
    pub preset: Option<String>,
    /// Trainable scalars of the model.
    pub parameters: usize,
    /// Epochs trained.
    pub epochs: usize,
    /// The seed.
    pub seed: u64,
    /// Training examples used.
    pub train_examples: usize,
    /// Size of the per-epoch evaluation set.
    pub test_examples: usize,
    /// Accuracy on it after the last epoch.
    pub test_accuracy: Option<f64>,
    /// Wall time of training and per-epoch evaluation, summed over resumed sessions.
    pub train_seconds: f64,
    /// The saved model.
    pub model: PathBuf,
    /// The confidence threshold τ saved with the model (`None`: not picked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence_threshold: Option<f64>,
}

impl TrainSummary {
    /// One line for the terminal.
    pub fn line(&self, out: &Path) -> String {
        let acc = match self.test_accuracy {
            Some(a) => format!(
                "test accuracy {:.2} % on {} examples",
                100.0 * a,
                self.test_examples
            ),
            None => "no per-epoch evaluation".to_string(),
        };
        format!(
            "trained {} epochs in {:.0} s: {acc}; model saved to {} (outputs in {})",
            self.epochs,
            self.train_seconds,
            self.model.display(),
            out.display()
        )
    }
}

#[cfg(test)]
mod tests;
