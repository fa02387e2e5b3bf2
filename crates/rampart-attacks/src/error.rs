//! The crate's error type.

/// Errors raised by attacks. Configuration and input problems are refused before the
/// first forward pass with a message that names the offending value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operation inside candle failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The attack's configuration is invalid.
    #[error("invalid attack configuration: {0}")]
    Config(String),
    /// An ε value is unusable for the threat model.
    #[error("invalid epsilon {eps}: {reason}")]
    Eps {
        /// The value as given.
        eps: String,
        /// Why it was refused.
        reason: String,
    },
    /// Inputs, labels and model outputs do not fit together.
    #[error("invalid input: {0}")]
    Input(String),
    /// The model has too few classes for the objective.
    #[error(
        "objective `{objective}` needs at least {needed} classes, the model outputs {classes}"
    )]
    TooFewClasses {
        /// Name of the objective.
        objective: &'static str,
        /// Smallest number of classes it is defined for.
        needed: usize,
        /// Number of classes the model outputs.
        classes: usize,
    },
    /// A name given to `from_str` is not known.
    #[error("unknown {kind} `{name}`; expected one of: {expected}")]
    UnknownName {
        /// What was being parsed (norm, objective, ...).
        kind: &'static str,
        /// The name as given.
        name: String,
        /// The accepted names.
        expected: &'static str,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
