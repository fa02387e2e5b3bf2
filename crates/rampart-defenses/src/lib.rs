//! Training methods for Rampart and the one training loop they share.
//!
//! This crate owns how a classifier is trained: a [`TrainingMethod`] turns a batch into
//! a loss ([`Normal`] cross-entropy now; adversarial methods run their attack with the
//! model in eval mode and compute the loss in train mode), [`Sgd`] applies the
//! gradients with (Nesterov) momentum and weight decay, an [`LrSchedule`] gives the
//! learning rate of every iteration, and the [`Trainer`] runs epochs with progress
//! bars, evaluates clean accuracy after each ([`predict`]), checkpoints atomically and
//! resumes exactly. `docs/training.md` describes the semantics in full.
//!
//! **Invariants.** BatchNorm running statistics are never touched by the optimiser.
//! Every random choice of epoch e (batch order, augmentation, the method's RNG) derives
//! from (seed, e), so a run resumed from its checkpoint ends with the weights of the
//! uninterrupted run. Files are written to a temporary sibling and renamed into place.
//!
//! It knows nothing of the command line, of output formats beyond its own files, or
//! of how metrics are computed from predictions.
#![warn(missing_docs)]

mod checkpoint;
mod config;
mod error;
mod io;
mod method;
mod predict;
mod schedule;
mod sgd;
mod trainer;

pub use checkpoint::{read_meta as read_checkpoint_meta, CheckpointMeta, CHECKPOINT_KEY};
pub use config::{AugmentationConfig, TrainConfig};
pub use error::{DefenseError, Result};
pub use io::write_atomic;
pub use method::{cross_entropy, BatchLoss, Normal, TrainingMethod};
pub use predict::{predict, Predictions};
pub use schedule::{progress, LrSchedule, Milestone, ScheduleKind};
pub use sgd::{DecayScope, Sgd, SgdConfig};
pub use trainer::{
    method_rng, read_history, EpochRecord, Progress, TrainOutcome, Trainer, CHECKPOINT_FILE,
    HISTORY_FILE, MODEL_FILE,
};

#[cfg(test)]
mod tests;
