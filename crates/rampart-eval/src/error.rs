//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can stop an evaluation. File errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A stop was requested (Ctrl-C, SIGTERM) and honoured between batches.
    #[error(
        "interrupted; every finished step is saved: run the same command again to resume from it"
    )]
    Interrupted,
    /// A configuration that cannot be run (no examples to attack, batch size 0, …).
    #[error("invalid evaluation config: {0}")]
    Config(String),
    /// An attack refused its input or failed.
    #[error("attack `{attack}`: {source}")]
    Attack {
        /// The attack's name in the suite.
        attack: String,
        /// What the attack crate said.
        #[source]
        source: rampart_attacks::Error,
    },
    /// A metric refused its input.
    #[error("metric {what}: {source}")]
    Metric {
        /// Which number was being computed.
        what: String,
        /// What the metrics crate said.
        #[source]
        source: rampart_metrics::MetricsError,
    },
    /// Batching or corrupting the data failed.
    #[error(transparent)]
    Data(#[from] rampart_data::DataError),
    /// Corrupting the data failed.
    #[error(transparent)]
    Corrupt(#[from] rampart_data::CorruptError),
    /// Loading the model failed (boxed: the model crate's errors are large).
    #[error(transparent)]
    Model(Box<rampart_models::ModelError>),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A shard specification, or a set of shards to merge, that does not fit.
    #[error("{0}")]
    Shard(String),
    /// A file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be parsed or serialised.
    #[error("{}: {message}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Drawing a plot failed.
    #[error("plot {}: {message}", .path.display())]
    Plot {
        /// The plot file.
        path: PathBuf,
        /// What the plotting library said.
        message: String,
    },
}

impl From<rampart_models::ModelError> for EvalError {
    fn from(e: rampart_models::ModelError) -> Self {
        EvalError::Model(Box::new(e))
    }
}

impl EvalError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(path: &Path, message: impl ToString) -> Self {
        EvalError::Format {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    pub(crate) fn metric(
        what: impl Into<String>,
    ) -> impl FnOnce(rampart_metrics::MetricsError) -> Self {
        let what = what.into();
        move |source| EvalError::Metric { what, source }
    }

    pub(crate) fn attack(name: &str) -> impl FnOnce(rampart_attacks::Error) -> Self + '_ {
        move |source| EvalError::Attack {
            attack: name.to_string(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;

/// Returns [`EvalError::Interrupted`] when a stop was requested
/// ([`rampart_fs::interrupt`]): called between batches.
pub(crate) fn check_interrupt() -> Result<()> {
    if rampart_fs::interrupt::requested() {
        return Err(EvalError::Interrupted);
    }
    Ok(())
}
