//! The crate's error type.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, DefenseError>;

/// Everything that can go wrong while configuring, running, checkpointing or
/// evaluating training.
#[derive(Debug, thiserror::Error)]
pub enum DefenseError {
    /// Data-parallel training's workers could not join or lost each other.
    #[error("data-parallel training: {0}")]
    Parallel(String),

    /// A configuration value that cannot be run (epochs 0, lr ≤ 0, …).
    #[error("invalid training configuration: {0}")]
    Config(String),

    /// A value was given for a setting the training method does not have.
    #[error("{setting} does not apply to --method {method}")]
    NotApplicable {
        /// The setting.
        setting: crate::Setting,
        /// The method's name.
        method: &'static str,
    },

    /// A setting that must be positive is not.
    #[error("{setting} must be > 0, got {value}")]
    NonPositive {
        /// The setting.
        setting: crate::Setting,
        /// Its value.
        value: f64,
    },

    /// A training method refused its settings; `context` names the setting or the
    /// method.
    #[error("{context}")]
    Invalid {
        /// What was being set (`--mixup-alpha`, `invalid settings for --method at`).
        context: String,
        /// Why the method refused it.
        #[source]
        source: Box<DefenseError>,
    },

    /// The loss stopped being a finite number.
    #[error(
        "training diverged: the loss is {value} at epoch {epoch}, {}; {} \
         (lower the learning rate or check the data)",
        if .first_batch == .batch {
            format!("batch {batch}")
        } else {
            format!("in batches {first_batch}–{batch}")
        },
        match .checkpoint {
            Some(path) => format!(
                "the last good checkpoint is {} (after epoch {})",
                path.display(),
                epoch - 1
            ),
            None => "no epoch finished, so there is no checkpoint".to_string(),
        }
    )]
    Diverged {
        /// Epoch (1-based).
        epoch: usize,
        /// Batch within the epoch (1-based) at which it was seen.
        batch: usize,
        /// The first batch of the steps whose losses were read together (on a GPU the
        /// loss is read once per interval, see `Trainer::sync_every`); `batch` when
        /// read every step.
        first_batch: usize,
        /// The loss value (the sum over those batches).
        value: f32,
        /// The checkpoint of the last finished epoch, if one was written.
        checkpoint: Option<PathBuf>,
    },

    /// A training attack's checks of its batch, left on the device and read with the
    /// loss (on a GPU's device-resident loop), found a fault.
    #[error(
        "a training attack refused epoch {epoch}, {}: {source}",
        if .first_batch == .batch {
            format!("batch {batch}")
        } else {
            format!("one of batches {first_batch}–{batch} (its checks are read with the loss)")
        }
    )]
    AttackChecks {
        /// Epoch (1-based).
        epoch: usize,
        /// The last batch of the steps whose checks were read together (1-based).
        batch: usize,
        /// The first of them.
        first_batch: usize,
        /// What the checks found.
        #[source]
        source: rampart_attacks::Error,
    },

    /// A stop was requested (Ctrl-C, SIGTERM): training ended after a finished batch.
    #[error(
        "interrupted at epoch {epoch}, batch {batch}; {}",
        match .checkpoint {
            Some(path) => format!(
                "the checkpoint after epoch {} is {}: run the same command with --resume to continue from it",
                epoch - 1,
                path.display()
            ),
            None => "no epoch finished, so the run starts afresh when run again".to_string(),
        }
    )]
    Interrupted {
        /// Epoch (1-based).
        epoch: usize,
        /// The last finished batch of that epoch (1-based).
        batch: usize,
        /// The checkpoint of the last finished epoch, if one was written.
        checkpoint: Option<PathBuf>,
    },

    /// A checkpoint that cannot be resumed from.
    #[error("{}: {message}", .path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A filesystem error on a named file.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A model could not be built, saved or loaded (boxed: the error is large).
    #[error(transparent)]
    Model(Box<rampart_models::ModelError>),

    /// Data could not be read or batched (boxed: the error is large).
    #[error(transparent)]
    Data(Box<rampart_data::DataError>),

    /// A training attack refused its configuration or inputs.
    #[error("training attack: {0}")]
    Attack(#[from] rampart_attacks::Error),

    /// A metric (e.g. a confidence threshold) is undefined on the data given.
    #[error(transparent)]
    Metrics(#[from] rampart_metrics::MetricsError),

    /// A tensor computation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<rampart_models::ModelError> for DefenseError {
    fn from(e: rampart_models::ModelError) -> Self {
        Self::Model(Box::new(e))
    }
}

impl From<rampart_data::DataError> for DefenseError {
    fn from(e: rampart_data::DataError) -> Self {
        Self::Data(Box::new(e))
    }
}

impl From<rampart_fs::WriteError> for DefenseError {
    fn from(e: rampart_fs::WriteError) -> Self {
        Self::io(e.path, e.source)
    }
}

impl DefenseError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
