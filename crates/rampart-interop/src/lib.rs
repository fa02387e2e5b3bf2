//! Models Rampart did not train: PyTorch state dicts in and out.
//!
//! * [`read_state_dict`] reads a `state_dict` saved by `torch.save` (a zip archive
//!   whose pickle is interpreted by [`pickle`], a restricted reader that never runs
//!   code from the file and refuses any pickle that tries to) or as safetensors.
//! * [`import_state_dict`] builds a Rampart [`rampart_models::Classifier`] from it for
//!   the architectures Rampart has, under the parameter names of the public
//!   implementations ([`Convention`]: RobustBench's WideResNet, Wong et al.'s
//!   PreActResNet-18, CCAT's ResNet-20), strictly: every tensor present with its
//!   shape, none left over.
//! * [`export_state_dict`] writes a model's weights as a safetensors state dict that
//!   the matching public module loads with `load_state_dict`.
//! * With the `onnx` feature (on by default; its build needs `protoc`): `load_onnx`
//!   turns an exported ONNX image classifier into a `Classifier` that every attack
//!   and evaluation runs on, with input gradients, and `export_onnx` writes a
//!   Rampart model as an ONNX graph.
//!
//! See `docs/interop.md` for the commands (`rampart import`, `rampart export`) and
//! the Python side of both directions.
#![warn(missing_docs)]

use std::path::PathBuf;

mod names;
#[cfg(feature = "onnx")]
mod onnx;
#[cfg(feature = "onnx")]
mod onnx_export;
pub mod pickle;
mod state_dict;
mod torch;

#[cfg(test)]
mod tests;
#[cfg(all(test, feature = "onnx"))]
mod tests_onnx;

pub use names::Convention;
pub use state_dict::{decode_state_dict, read_state_dict, StateDict, TensorData, CHECKPOINT_KEYS};
pub use torch::{export_state_dict, import_state_dict, metadata, ImportOptions};
#[cfg(feature = "onnx")]
pub use {
    onnx::{decode_onnx, load_onnx, OnnxOptions, SUPPORTED_OPS},
    onnx_export::export_onnx,
};

/// Errors from reading, importing or exporting PyTorch weights.
#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not a state dict this crate reads (or tries to run code).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The state dict does not fit the architecture.
    #[error("{0}")]
    Mismatch(String),
    /// The model or convention has no PyTorch counterpart.
    #[error("{0}")]
    Unsupported(String),
    /// Building the model failed.
    #[error(transparent)]
    Model(Box<rampart_models::ModelError>),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<rampart_models::ModelError> for InteropError {
    fn from(e: rampart_models::ModelError) -> Self {
        InteropError::Model(Box::new(e))
    }
}

impl From<candle_core::Error> for InteropError {
    fn from(e: candle_core::Error) -> Self {
        InteropError::Candle(Box::new(e))
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, InteropError>;
