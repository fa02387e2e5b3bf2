//! The crate's error type: every variant names the argument at fault and why.

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, MetricsError>;

/// Bad input to a metric, or a metric that is undefined on the input given.
///
/// `what` fields name the offending argument as it is spelled in the function's
/// signature, so the message points at the call site.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// An array that must hold at least one entry is empty.
    #[error("`{what}` is empty")]
    Empty {
        /// The argument.
        what: &'static str,
    },

    /// An array that needs more entries than it has (e.g. a sample std of one value).
    #[error("`{what}` needs at least {needed} entries, got {got}")]
    TooFew {
        /// The argument.
        what: &'static str,
        /// The least number of entries accepted.
        needed: usize,
        /// The number given.
        got: usize,
    },

    /// Two per-example arrays that must be aligned have different lengths.
    #[error("length mismatch: `{left}` has {left_len} entries but `{right}` has {right_len}")]
    LengthMismatch {
        /// The first argument.
        left: &'static str,
        /// Its length.
        left_len: usize,
        /// The second argument.
        right: &'static str,
        /// Its length.
        right_len: usize,
    },

    /// A NaN inside an array.
    #[error("`{what}[{index}]` is NaN")]
    NaN {
        /// The argument.
        what: &'static str,
        /// Position of the first NaN.
        index: usize,
    },

    /// A value outside the range its argument allows (e.g. a confidence of 1.2).
    #[error("`{what}[{index}]` = {value} is outside {expected}")]
    OutOfRange {
        /// The argument.
        what: &'static str,
        /// Position of the first offending entry.
        index: usize,
        /// The entry.
        value: f64,
        /// The allowed range, in words (e.g. `"[0, 1]"`).
        expected: &'static str,
    },

    /// A scalar parameter outside its allowed range (a TPR of 0, a temperature of −1, a NaN τ).
    #[error("`{what}` = {value} is invalid: expected {expected}")]
    InvalidParameter {
        /// The parameter.
        what: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range, in words.
        expected: &'static str,
    },

    /// A row of a probability matrix whose entries do not sum to 1.
    #[error("row {row} of `{what}` sums to {sum}, not 1 (tolerance {tolerance})")]
    NotNormalised {
        /// The argument.
        what: &'static str,
        /// The first offending row.
        row: usize,
        /// Its sum.
        sum: f64,
        /// The tolerance allowed on |sum − 1|.
        tolerance: f64,
    },

    /// A flat row-major N×K matrix whose length is not a multiple of K.
    #[error(
        "`{what}` has {len} entries, which is not a whole number of rows of {num_classes} classes"
    )]
    RaggedRows {
        /// The argument.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The row length K.
        num_classes: usize,
    },

    /// A class count too small for the metric.
    #[error("`num_classes` = {got} is too small: need at least {needed}")]
    TooFewClasses {
        /// The least number of classes accepted.
        needed: usize,
        /// The number given.
        got: usize,
    },

    /// A label that is not below the number of classes.
    #[error("label {label} at index {index} is out of range for {num_classes} classes")]
    LabelOutOfRange {
        /// Position of the first offending label.
        index: usize,
        /// The label.
        label: u32,
        /// The number of classes.
        num_classes: usize,
    },

    /// An ε grid for an integral that does not start at exactly 0.
    #[error("the ε grid must start at 0, but starts at {first}")]
    GridNotFromZero {
        /// The first grid point.
        first: f64,
    },

    /// An ε grid that does not strictly increase.
    #[error("the ε grid must strictly increase, but eps[{index}] = {value} follows {previous}")]
    GridNotIncreasing {
        /// Position of the first offending point.
        index: usize,
        /// The point before it.
        previous: f64,
        /// The offending point.
        value: f64,
    },

    /// A reliability diagram asked for with zero bins.
    #[error("the number of bins must be at least 1")]
    ZeroBins,

    /// A count of successes larger than the number of trials it is a count out of.
    #[error("`{what}` = {count} exceeds `{total_what}` = {total}")]
    CountExceedsTotal {
        /// The count argument.
        what: &'static str,
        /// Its value.
        count: usize,
        /// The total argument.
        total_what: &'static str,
        /// Its value.
        total: usize,
    },

    /// A metric whose denominator is zero on this input (e.g. Err@τ when τ rejects everything).
    #[error("{what} is undefined: {reason}")]
    Undefined {
        /// The metric.
        what: &'static str,
        /// Why, in words.
        reason: &'static str,
    },
}
