//! Training methods for Rampart and the one training loop they share.
//!
//! This crate owns how a classifier is trained: a [`TrainingMethod`] turns a batch into
//! a loss ([`Normal`] cross-entropy with optional label smoothing, Madry's
//! [`AdversarialTraining`], [`FastAt`], [`Trades`], [`Ccat`], Sinkhorn AT [`Sat`], and
//! the calibration-oriented [`RegMixup`] and [`ArAdaLs`]; adversarial methods run their
//! attack — from `rampart-attacks`, or TRADES' own KL ascent — with the model in eval
//! mode and compute the loss in train mode), [`Sgd`] applies the gradients with (Nesterov)
//! momentum and weight decay, an [`LrSchedule`] gives the learning rate of every
//! iteration, an optional [`Ema`] averages the weights, and the [`Trainer`] runs epochs
//! with progress bars, evaluates clean accuracy after each ([`predict`]), checkpoints
//! atomically and resumes exactly. A [`ConfidenceThreshold`] picked on held-out data
//! lets any classifier abstain at test time. `docs/training.md` describes the
//! semantics in full.
//!
//! **Invariants.** BatchNorm running statistics are never touched by the optimiser.
//! Every random choice of epoch e (batch order, augmentation, the method's RNG) derives
//! from (seed, e), and a method's learnt state is checkpointed with the weights, so a
//! run resumed from its checkpoint ends with the weights of the uninterrupted run.
//! Files are written to a temporary sibling and renamed into place.
//!
//! Each method's settings are a value that owns its defaults (the paper's, e.g.
//! [`AdversarialTraining::madry_cifar10`]) and declares which [`Setting`]s a caller may
//! override ([`MethodSettings`]); [`MethodConfig::merge`] lays optional values over a
//! method's defaults generically and refuses a setting the method does not have,
//! naming both. Settings are named like the `rampart train` flags that set them
//! (`--eps`, `--beta`, …), so its errors read as the command's; beyond these names it
//! knows nothing of the command line, of output formats beyond its own files, or of
//! how metrics are computed from predictions.
#![warn(missing_docs)]

mod checkpoint;
mod config;
mod ema;
mod error;
mod method;
pub mod parallel;
mod predict;
mod schedule;
mod sgd;
mod step_graph;
mod threshold;
mod trainer;

pub use checkpoint::{
    decode_meta as decode_checkpoint_meta, read_meta as read_checkpoint_meta, CheckpointMeta,
    CHECKPOINT_KEY,
};
pub use config::{AugmentationConfig, TrainConfig};
pub use ema::Ema;
pub use error::{DefenseError, Result};
pub use method::{
    adals_targets, adversarial_count, attack_seed, calibration_gaps, ccat_lambda,
    ccat_soft_targets, ccat_soft_targets_on_device, cross_entropy, entropic_ot, kl_divergence,
    merge, mixup_images, mixup_images_on_device, mixup_targets, mixup_targets_on_device,
    robustness_group, robustness_groups, sinkhorn_divergence, soft_cross_entropy, with_step_noise,
    with_step_values, AdaLsState, AdversarialTraining, ArAdaLs, ArAdaLsConfig, BatchLoss, Ccat,
    FastAt, MethodConfig, MethodKind, MethodSettings, MixupDraw, Normal, Oat, Overrides, RegMixup,
    Sat, Setting, StatelessMethod, StepCost, StepDraws, StepValues, Trades, TrainBatch,
    TrainingMethod, ADALS_GROUPS,
};
pub use predict::{predict, Predictions};
pub use schedule::{progress, LrSchedule, Milestone, ScheduleKind};
#[cfg(feature = "cuda")]
pub use sgd::sgd_kernels_ptx;
pub use sgd::{DecayScope, Sgd, SgdConfig};
pub use step_graph::{train_graph_failure, train_graph_steps, with_train_graphs, TrainGraph};
pub use threshold::{ConfidenceThreshold, Decision, CONFIDENCE_THRESHOLD_KEY};
pub use trainer::{
    method_rng, read_history, train_step, EpochRecord, Progress, StepRead, StepSums, TrainOutcome,
    Trainer, CHECKPOINT_FILE, HISTORY_FILE, MODEL_FILE,
};

/// What a test returns, so that `?` works on every error.
#[cfg(test)]
type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

#[cfg(test)]
mod tests;
