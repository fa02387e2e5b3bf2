//! Image classifiers for Rampart and their self-describing files.
//!
//! This crate owns the architectures (Wide-ResNet WRN-d-k, ResNet-20 as in CCAT,
//! PreActResNet-18), their seeded initialisation, and saving/loading as safetensors
//! with the architecture in the metadata, so [`Classifier::load`] rebuilds any model
//! without knowing its architecture in advance. Inputs are always in the model's
//! bounds (by default [0, 1]); the mean/std normalisation lives inside the model.
//!
//! It knows nothing of data sets, attacks or training methods: a [`Classifier`] is a
//! `candle_nn::ModuleT` whose `train` flag selects BatchNorm's batch statistics.
#![warn(missing_docs)]

pub mod bn;
mod gemm;
pub mod im2col;
pub mod layers;
pub mod resnet;
mod spec;
mod store;
pub mod wrn;

pub use spec::{Arch, ModelSpec};
pub use store::METADATA_SPEC_KEY;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Errors from building, saving or loading models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The architecture description is not valid.
    #[error("invalid model specification: {0}")]
    InvalidSpec(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a safetensors file or is corrupt.
    #[error("{path}: not a readable safetensors file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the safetensors reader said.
        message: String,
    },
    /// The file's metadata does not describe a Rampart model.
    #[error("{path}: {message}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the architecture needs is absent from the file.
    #[error("{path}: tensor `{name}` required by {arch} is missing")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The missing tensor.
        name: String,
        /// The architecture from the metadata.
        arch: String,
    },
    /// The file holds a tensor the architecture does not have.
    #[error("{path}: tensor `{name}` is not part of {arch}")]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The extra tensor.
        name: String,
        /// The architecture from the metadata.
        arch: String,
    },
    /// A tensor has the wrong shape or dtype.
    #[error("{path}: tensor `{name}` has {found}, {arch} expects {expected}")]
    TensorMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What the architecture expects.
        expected: String,
        /// What the file holds.
        found: String,
        /// The architecture from the metadata.
        arch: String,
    },
    /// A tensor computation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

/// A classifier: an architecture, its weights and the normalisation of its inputs.
///
/// `forward_t(xs, train)` takes xs: (B, C, H, W) in the model's bounds and returns
/// logits (B, K). `train = true` uses (and updates) BatchNorm batch statistics.
pub struct Classifier {
    spec: ModelSpec,
    varmap: VarMap,
    /// The network proper: NHWC, normalised input → logits.
    net: Box<dyn ModuleT + Send + Sync>,
    /// Per-channel mean (C,) and reciprocal std (C,).
    mean: Tensor,
    inv_std: Tensor,
    metadata: BTreeMap<String, String>,
    device: Device,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("spec", &self.spec)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Classifier {
    /// Builds a model with freshly initialised weights, seeded by `seed`
    /// (convolutions: Kaiming normal, fan-out; linear: U(±1/√fan_in) weight, zero bias;
    /// BatchNorm: weight 1, bias 0, running mean 0, running variance 1).
    pub fn new(spec: ModelSpec, seed: u64, device: &Device) -> Result<Self> {
        spec.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let net = spec.build(vb)?;
        let c = spec.input_shape[0];
        let mean = Tensor::from_vec(spec.mean.clone(), c, device)?;
        let inv_std = Tensor::from_vec(
            spec.std.iter().map(|s| 1.0 / s).collect::<Vec<f32>>(),
            c,
            device,
        )?;
        let model = Classifier {
            spec,
            varmap,
            net,
            mean,
            inv_std,
            metadata: BTreeMap::new(),
            device: device.clone(),
        };
        model.initialise(seed)?;
        Ok(model)
    }

    fn initialise(&self, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (name, var) in self.named_vars() {
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let values: Vec<f32> = if name.ends_with("running_var") {
                vec![1.0; n]
            } else if name.ends_with("running_mean") || name.ends_with("bias") {
                vec![0.0; n]
            } else if dims.len() == 1 {
                vec![1.0; n]
            } else if dims.len() == 4 {
                let fan_out = (dims[0] * dims[2] * dims[3]) as f32;
                let std = (2.0 / fan_out).sqrt();
                (0..n).map(|_| std * standard_normal(&mut rng)).collect()
            } else {
                let bound = 1.0 / (dims[1] as f32).sqrt();
                (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
            };
            var.set(&Tensor::from_vec(values, dims, &self.device)?)?;
        }
        Ok(())
    }

    /// The architecture and input description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Free-form metadata saved with the model (e.g. the training method, a threshold).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Sets a metadata entry saved with the model. Keys starting with `rampart.` are reserved.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) -> Result<()> {
        let key = key.into();
        if key.starts_with("rampart.") {
            return Err(ModelError::InvalidSpec(format!(
                "metadata key `{key}` is reserved"
            )));
        }
        self.metadata.insert(key, value.into());
        Ok(())
    }

    /// All variables by name, sorted: trainable parameters and BatchNorm running statistics.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self
            .varmap
            .data()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The trainable parameters by name (BatchNorm running statistics excluded).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|(name, _)| !is_buffer(name))
            .collect()
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Copies every variable (parameters and statistics) from a model of the same spec.
    pub fn copy_weights_from(&self, other: &Classifier) -> Result<()> {
        if other.spec != self.spec {
            return Err(ModelError::InvalidSpec(format!(
                "cannot copy weights from {} into {}",
                other.spec.arch, self.spec.arch
            )));
        }
        for ((_, dst), (_, src)) in self.named_vars().iter().zip(other.named_vars()) {
            dst.set(&src.as_tensor().to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// The bounds inputs are expected in (the spec's `bounds`).
    pub fn bounds(&self) -> (f32, f32) {
        (self.spec.bounds[0], self.spec.bounds[1])
    }
}

thread_local! {
    static INPUT_GRADIENTS_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (typically a `backward()` call) computing gradients for the model's
/// *input* only: the fast CPU layers skip their kernel and BatchNorm parameter
/// gradients (they come back as zeros), which attacks never use and which cost as
/// much as the input gradient. Input gradients are identical to those of a full
/// backward pass. The setting is per thread and restored when `f` returns.
pub fn input_gradients_only<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INPUT_GRADIENTS_ONLY.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(INPUT_GRADIENTS_ONLY.with(|c| c.replace(true)));
    f()
}

pub(crate) fn input_gradients_only_active() -> bool {
    INPUT_GRADIENTS_ONLY.with(|c| c.get())
}

/// Whether a variable name denotes a BatchNorm running statistic (not trained by SGD).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box–Muller; u1 in (0, 1] so the logarithm is finite.
    let u1: f32 = 1.0 - rng.gen::<f32>();
    let u2: f32 = rng.gen::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl ModuleT for Classifier {
    /// xs: (B, C, H, W) in the model's bounds → logits (B, K).
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        layers::ensure_float(xs)?;
        let (_, c, h, w) = xs.dims4()?;
        if [c, h, w] != self.spec.input_shape {
            candle_core::bail!(
                "model {} expects inputs (B, {}, {}, {}), got {:?}",
                self.spec.arch,
                self.spec.input_shape[0],
                self.spec.input_shape[1],
                self.spec.input_shape[2],
                xs.dims()
            );
        }
        // Normalise while turning NCHW into the NHWC layout the layers work in.
        let xs = xs
            .permute((0, 2, 3, 1))?
            .broadcast_sub(&self.mean)?
            .broadcast_mul(&self.inv_std)?;
        self.net.forward_t(&xs, train)
    }
}

#[cfg(test)]
mod tests;
