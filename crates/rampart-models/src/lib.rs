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

/// Instantiates a test written once, `fn $body(dev: &Device)`, for every device of
/// the build, as candle's `test_device!` does: `$cpu` always, and `$cuda` with the
/// `cuda` feature (run on a machine with an NVIDIA GPU, in full f32). Used for the
/// "fast path equals reference" tests, so that each kernel is held to its reference
/// on the CPU and, where a GPU is present, on CUDA by the same code.
#[cfg(test)]
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(&candle_core::Device::Cpu)
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() {
            // Full f32 (no TF32), set before the first CUDA call.
            std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
            let dev = candle_core::Device::new_cuda(0)
                .expect("a CUDA device (this test binary was built with the cuda feature)");
            $body(&dev)
        }
    };
}

mod flat;
pub mod kernels;
pub mod layers;
pub mod resnet;
mod spec;
mod store;
pub mod variant;
pub mod wrn;

pub use flat::{backward, flat_gradients_pending, hand_out_flat_gradients};
#[cfg(feature = "cuda")]
pub use kernels::cuda;
pub use kernels::sync_bn::{ChannelSum, SyncScope};
pub use kernels::weights::{frozen_weights, weights_frozen, FrozenWeights};

pub use spec::{
    Arch, BatchNormSpec, ModelSpec, CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, SVHN_MEAN,
    SVHN_STD,
};
pub use store::METADATA_SPEC_KEY;
pub use variant::{noise_seeds_drawn, NoiseSpec, OatSpec};

/// The arithmetic of a GPU's convolutions (`--device cuda`, `cuda+tf32`,
/// `cuda+bf16`; set by [`cuda::prepare`]). The CPU always computes in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Full f32 (the default): the CPU's results up to f32 rounding.
    #[default]
    F32,
    /// TF32 tensor cores for f32 convolutions and matrix products (10-bit mantissa),
    /// PyTorch's default for convolutions.
    Tf32,
    /// bf16 convolutions on tensor cores with f32 accumulation: each convolution's
    /// operands are rounded to bf16 and its output widened to f32; the weights, the
    /// BatchNorm statistics, the loss, the matrix products and an attack's
    /// perturbation and input gradient stay f32 (PyTorch's `autocast` to bf16).
    Bf16,
}

/// Name of the buffer holding an OAT model's λ codes (L, code_dim).
pub const LAMBDA_CODES: &str = "lambda_codes";

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use kernels::device_eval::DeviceEval;
use kernels::fused::{EvalNet, FusedEval, Program};
use kernels::fused_train::TrainNetwork;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
    net: Box<dyn Network>,
    /// The same network on detached parameters (sharing their storage, so it always
    /// sees the current weights) and the live buffers: what [`Classifier::frozen`]
    /// runs. Its operations compute no parameter gradients because no parameter is
    /// tracked.
    frozen_net: Box<dyn Network>,
    /// Per-channel mean (C,) and reciprocal std (C,).
    mean: Tensor,
    inv_std: Tensor,
    metadata: BTreeMap<String, String>,
    device: Device,
    /// State shared with the variant layers (λ condition, noise generator).
    ctx: Arc<variant::Context>,
    /// λ used by `forward_t` of an OAT model.
    lambda: Mutex<f32>,
    /// Held while a λ condition is installed in `ctx`.
    forward_lock: Mutex<()>,
    /// The λ codes buffer of an OAT model (shares storage with the varmap's entry).
    lambda_codes: Option<Var>,
    /// The parameters of the GPU's fused train program in one buffer, made by its
    /// first pass ([`flat`]).
    flat: Mutex<Option<Arc<flat::FlatParams>>>,
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
        let ctx = Arc::new(variant::Context::new(seed));
        let opts = variant::NormOptions {
            noise: spec.noise.is_some(),
            oat: spec.oat.as_ref().map(|o| o.code_dim),
            batch_norm: spec.batch_norm,
            ctx: ctx.clone(),
        };
        let net = spec.build(vb, &opts)?;
        let frozen_net = spec.build(frozen_builder(&varmap, device)?, &opts)?;
        let lambda = spec
            .oat
            .as_ref()
            .and_then(|o| o.lambdas.last().copied())
            .unwrap_or(0.0);
        let lambda_codes = varmap
            .data()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(LAMBDA_CODES)
            .cloned();
        let (mean, inv_std) = normalisation(&spec, device)?;
        let model = Classifier {
            spec,
            varmap,
            net,
            frozen_net,
            mean,
            inv_std,
            metadata: BTreeMap::new(),
            device: device.clone(),
            ctx,
            lambda: Mutex::new(lambda),
            forward_lock: Mutex::new(()),
            lambda_codes,
            flat: Mutex::new(None),
        };
        model.initialise(seed)?;
        Ok(model)
    }

    /// A classifier around a network Rampart did not build: `spec` gives the input
    /// shape, normalisation, bounds and classes (its `arch` must be
    /// [`Arch::External`]). Such a model is evaluated and attacked like any other, in
    /// eval mode; it cannot be trained, saved or made stochastic.
    pub fn from_external(
        spec: ModelSpec,
        net: Arc<dyn ExternalNetwork>,
        device: &Device,
    ) -> Result<Self> {
        spec.validate()?;
        if spec.arch != Arch::External || spec.noise.is_some() || spec.oat.is_some() {
            return Err(ModelError::InvalidSpec(
                "an external network needs a plain spec with arch `external`".into(),
            ));
        }
        let (mean, inv_std) = normalisation(&spec, device)?;
        Ok(Classifier {
            spec,
            varmap: VarMap::new(),
            net: Box::new(External(net.clone())),
            frozen_net: Box::new(External(net)),
            mean,
            inv_std,
            metadata: BTreeMap::new(),
            device: device.clone(),
            ctx: Arc::new(variant::Context::new(0)),
            lambda: Mutex::new(0.0),
            forward_lock: Mutex::new(()),
            lambda_codes: None,
            flat: Mutex::new(None),
        })
    }

    fn initialise(&self, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (name, var) in self.named_vars() {
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let values: Vec<f32> = if name == LAMBDA_CODES {
                variant::orthonormal_rows(dims[0], dims[1], &mut rng)
            } else if name.ends_with("noise.alpha") {
                let alpha = self.spec.noise.as_ref().map_or(0.0, |s| s.alpha);
                vec![alpha; n]
            } else if name.contains("film.fc2.") || name.ends_with("running_std") {
                // FiLM starts as the identity; the noise scale estimate starts at 1.
                let v = if name.ends_with("running_std") {
                    1.0
                } else {
                    0.0
                };
                vec![v; n]
            } else if name.ends_with("running_var") {
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

impl Classifier {
    /// The fused eval-mode op for `xs` (NCHW, checked) when this model and input allow
    /// it: CPU, f32, a network with a fused form. A student's noise seeds are drawn
    /// from the model's generator as the layer-by-layer pass would draw them; an OAT
    /// model runs at its λ.
    fn fused_eval(&self, xs: &Tensor) -> candle_core::Result<Option<FusedEval>> {
        if !xs.device().is_cpu() || xs.dtype() != candle_core::DType::F32 {
            return Ok(None);
        }
        let net = match &self.spec.oat {
            None => self.net.eval_program()?,
            Some(_) => {
                let lambda = self.lambda().unwrap_or(0.0);
                self.with_condition(&[lambda], || self.net.eval_program())?
            }
        };
        let Some(net) = net else {
            return Ok(None);
        };
        let as_vec = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        let program = Program::new(
            net,
            self.spec.input_shape,
            as_vec(&self.mean)?,
            as_vec(&self.inv_std)?,
        )?;
        Ok(Some(FusedEval::new(program, xs.track_op())))
    }

    /// The fused eval op of the GPU for `xs` when this model and input allow it: a
    /// CUDA f32 input, a network with the program's form, and the path turned on (`RAMPART_CUDA_FUSED_EVAL`, [`kernels::device_eval::enabled`]).
    fn device_eval(&self, xs: &Tensor) -> candle_core::Result<Option<DeviceEval>> {
        if !xs.device().is_cuda() || xs.dtype() != DType::F32 || !kernels::device_eval::usable() {
            return Ok(None);
        }
        self.device_eval_op(xs.track_op())
    }

    /// Eval-mode logits of `xs` (B, C, H, W) through the GPU's fused eval program
    /// (`kernels::device_eval`), whatever `RAMPART_CUDA_FUSED_EVAL` says, with the
    /// frozen view's gradients (the input's only); None for a network without that
    /// form (ResNet-20). A student draws its noise as the layer-by-layer pass would; an
    /// OAT model runs at its λ. On the CPU the program runs on its kernels' twins. For
    /// tests and benchmarks of the path.
    pub fn fused_gpu_eval(&self, xs: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.check_input(xs)?;
        match self.device_eval_op(xs.track_op())? {
            Some(op) => Ok(Some(xs.to_dtype(DType::F32)?.apply_op1(op)?)),
            None => Ok(None),
        }
    }

    /// Whether this model's passes on its GPU take the fused GPU programs now: the
    /// train program (`train`: training steps, an untracked input) or the eval program
    /// (attacks and predictions). False on the CPU (whose own fused paths are another
    /// matter) and where a program does not apply or is not switched on. For
    /// benchmarks, which report the path they measured.
    pub fn takes_fused_gpu_path(&self, train: bool) -> candle_core::Result<bool> {
        if !self.device.is_cuda() {
            return Ok(false);
        }
        Ok(if train {
            let has_program =
                || -> candle_core::Result<bool> { Ok(self.net.device_train_net()?.is_some()) };
            kernels::device_train::usable()
                && kernels::sync_bn::current().is_none()
                && self.ctx.keeping_noise_state(|| match &self.spec.oat {
                    None => has_program(),
                    Some(_) => self.with_condition(&[self.lambda().unwrap_or(0.0)], has_program),
                })?
        } else {
            // Building the program draws a student's noise seeds: put the generator
            // back, so that asking does not change the passes that follow.
            kernels::device_eval::usable()
                && self
                    .ctx
                    .keeping_noise_state(|| self.device_eval_net())?
                    .is_some()
        })
    }

    /// Train-mode logits of `xs` (B, C, H, W) through the GPU's fused train program
    /// (`kernels::device_train`), whatever `RAMPART_CUDA_FUSED_TRAIN` says: gradients
    /// reach every parameter, and the running statistics are updated, as by the
    /// layer-by-layer path (a student's noise drawn from the same seeds, its running
    /// noise scale updated; an OAT model at its λ). None for a network without that
    /// form (a post-activation student or OAT model), under synchronised BatchNorm,
    /// for an empty batch or a tracked input (whose gradient the program does not
    /// compute). On the CPU the program runs on its kernels' twins. For tests and
    /// benchmarks of the path.
    pub fn fused_gpu_train(&self, xs: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.fused_gpu_train_at(xs, None)
    }

    /// [`Classifier::fused_gpu_train`] of an OAT model at λ `lambdas` per row (what
    /// [`Classifier::forward_lambdas`] takes in train mode on a GPU when the path is
    /// on). For tests and benchmarks of the path.
    pub fn fused_gpu_train_lambdas(
        &self,
        xs: &Tensor,
        lambdas: &[f32],
    ) -> candle_core::Result<Option<Tensor>> {
        self.fused_gpu_train_at(xs, Some(lambdas))
    }

    /// [`Classifier::fused_gpu_train`] with an OAT model's λ per row (its λ when
    /// None). The program normalises each BatchNorm group over contiguous rows, so the
    /// rows with λ = 0 go first (a permutation of the untracked input) and the logits
    /// are put back in the batch's order.
    fn fused_gpu_train_at(
        &self,
        xs: &Tensor,
        lambdas: Option<&[f32]>,
    ) -> candle_core::Result<Option<Tensor>> {
        self.check_input(xs)?;
        let b = xs.dim(0)?;
        if xs.track_op() || b == 0 || kernels::sync_bn::current().is_some() {
            return Ok(None);
        }
        if self.spec.oat.is_none() {
            return self.device_train_on(xs, None);
        }
        let lambdas = match lambdas {
            Some(l) => l.to_vec(),
            None => vec![self.lambda().unwrap_or(0.0); b],
        };
        if lambdas.len() != b {
            candle_core::bail!("{} λ values for a batch of {b}", lambdas.len())
        }
        let rows = 0..b as u32;
        let order: Vec<u32> = rows
            .clone()
            .filter(|&i| lambdas[i as usize] == 0.0)
            .chain(rows.filter(|&i| lambdas[i as usize] != 0.0))
            .collect();
        let clean = lambdas.iter().filter(|&&l| l == 0.0).count();
        let sorted: Vec<f32> = order.iter().map(|&i| lambdas[i as usize]).collect();
        let identity = order.iter().zip(0u32..).all(|(&i, k)| i == k);
        let device = xs.device();
        let xs_sorted = if identity {
            xs.clone()
        } else {
            xs.index_select(&Tensor::new(order.as_slice(), device)?, 0)?
        };
        let logits =
            self.with_condition(&sorted, || self.device_train_on(&xs_sorted, Some(clean)))?;
        match logits {
            Some(l) if !identity => {
                let mut inverse = vec![0u32; b];
                for (k, &i) in order.iter().enumerate() {
                    inverse[i as usize] = k as u32;
                }
                Ok(Some(l.index_select(
                    &Tensor::new(inverse.as_slice(), device)?,
                    0,
                )?))
            }
            other => Ok(other),
        }
    }

    /// The fused train program of this network for `b` images (an OAT model's
    /// condition installed, its rows with λ = 0, `clean` of them, first), its
    /// parameter tensors in layout order and the BatchNorms whose statistics it
    /// reports; None when the network has no such form.
    #[allow(clippy::type_complexity)]
    fn device_train_program(
        &self,
        b: usize,
        clean: Option<usize>,
    ) -> candle_core::Result<
        Option<(
            kernels::device_train::TrainProgram,
            Vec<Tensor>,
            Vec<&variant::Norm>,
        )>,
    > {
        // A student's noise seeds are drawn as the network is laid out; put back when
        // the program does not apply (the layer-by-layer pass then draws them).
        let net = self.ctx.drawing_only_if_some(|| {
            Ok(self
                .net
                .device_train_net()?
                .filter(|(net, _)| net.dtype() == DType::F32))
        })?;
        let Some((net, norms)) = net else {
            return Ok(None);
        };
        let (program, tensors) = kernels::device_train::TrainProgram::new(
            &net,
            self.spec.input_shape,
            self.mean.clone(),
            self.inv_std.clone(),
        )?;
        let program = match clean {
            Some(c) => program.with_groups(b, c)?,
            None => program,
        };
        Ok(Some((program, tensors, norms)))
    }

    /// The fused train program on `xs` (an OAT model's condition installed, its rows
    /// with λ = 0, `clean` of them, first).
    fn device_train_on(
        &self,
        xs: &Tensor,
        clean: Option<usize>,
    ) -> candle_core::Result<Option<Tensor>> {
        let b = xs.dim(0)?;
        let Some((program, tensors, norms)) = self.device_train_program(b, clean)? else {
            return Ok(None);
        };
        let groups = clean.map(|c| (b, c));
        let rows = program.norm_rows(b)?;
        let flat = self.train_params(&tensors)?;
        let op = kernels::device_train::DeviceTrain::new(
            program,
            xs.to_dtype(DType::F32)?.contiguous()?,
        )?;
        let layout = op.output_layout()?;
        let out = flat.apply_op1(op)?;
        let (logits, stats) = layout.split(&out)?;
        let places = layout.stat_places();
        if stats.len() != norms.len() || rows.len() != norms.len() || places.len() != norms.len() {
            candle_core::bail!("fused train path: statistics of another network")
        }
        // Every running statistic in one update (one launch on a GPU); a layer whose
        // running tensors are not f32 updates its own, as the layer-by-layer path does.
        let mut entries = Vec::new();
        #[cfg(test)]
        let per_layer = tests::RUNNING_PER_LAYER.with(std::cell::Cell::get);
        #[cfg(not(test))]
        let per_layer = false;
        for (((norm, st), r), (at, len)) in norms.iter().zip(&stats).zip(rows).zip(places) {
            let one = if per_layer {
                None
            } else {
                norm.running_entries(at, len, r, groups)?
            };
            match one {
                Some(e) => entries.extend(e),
                None => norm.update_running_device(st, r, groups)?,
            }
        }
        kernels::running::update_all(&out.detach(), &entries)?;
        Ok(Some(logits))
    }

    /// The parameters `tensors` of a fused train program as the one tensor its op
    /// takes: this model's buffer of them with their current values ([`flat`]; the
    /// caller hands its gradient out to them after the backward pass), or, where one
    /// of them is computed (an OAT model's FiLM outputs), their concatenation, whose
    /// gradient autograd hands out.
    fn train_params(&self, tensors: &[Tensor]) -> candle_core::Result<Tensor> {
        let mut cached = self.flat.lock().unwrap_or_else(|p| p.into_inner());
        if !cached.as_ref().is_some_and(|f| f.holds(tensors)) {
            *cached = flat::FlatParams::new(tensors)?;
        }
        match cached.as_ref() {
            Some(f) => f.gathered(),
            None => {
                let flat = tensors
                    .iter()
                    .map(Tensor::flatten_all)
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&flat, 0)
            }
        }
    }

    /// The fused eval op of the GPU's program for this model's frozen network on its
    /// device (any device: on the CPU it runs the kernels' twins), or None when the
    /// network has no such form.
    pub(crate) fn device_eval_op(&self, keep: bool) -> candle_core::Result<Option<DeviceEval>> {
        // The programs compute in f32; other dtypes run layer by layer.
        let net = self.ctx.drawing_only_if_some(|| {
            Ok(self.device_eval_net()?.filter(|n| n.dtype() == DType::F32))
        })?;
        let Some(net) = net else {
            return Ok(None);
        };
        let program = kernels::device_eval::DeviceProgram::new(
            net,
            self.spec.input_shape,
            self.mean.to_dtype(DType::F32)?,
            self.inv_std.to_dtype(DType::F32)?,
        )?;
        Ok(Some(DeviceEval::new(program, keep)))
    }

    /// The frozen network's tensors for the GPU's eval program, an OAT model's at its
    /// λ; a student's noise seeds are drawn as the layer-by-layer pass would draw them.
    fn device_eval_net(&self) -> candle_core::Result<Option<kernels::device_eval::DeviceArch>> {
        match &self.spec.oat {
            None => self.frozen_net.device_net(),
            Some(_) => {
                let lambda = self.lambda().unwrap_or(0.0);
                self.with_condition(&[lambda], || self.frozen_net.device_net())
            }
        }
    }

    /// Logits of a train-mode forward pass through the fused train path, when this
    /// model and input allow it: CPU, f32, a network with a fused form, and an input
    /// that needs no gradient. Updates the running statistics. An OAT model runs at
    /// `lambdas` (one per row; its λ when None).
    fn fused_train(
        &self,
        xs: &Tensor,
        lambdas: Option<&[f32]>,
    ) -> candle_core::Result<Option<Tensor>> {
        if !xs.device().is_cpu() || xs.dtype() != candle_core::DType::F32 || xs.track_op() {
            return Ok(None);
        }
        if kernels::sync_bn::current().is_some() {
            // Synchronised BatchNorm runs layer by layer (its reductions cross workers).
            return Ok(None);
        }
        let b = xs.dim(0)?;
        if b == 0 {
            // The layer-by-layer path refuses an empty batch with a clear error.
            return Ok(None);
        }
        match &self.spec.oat {
            None => self.fused_train_on(xs, None),
            Some(_) => {
                let lambdas = match lambdas {
                    Some(l) => l.to_vec(),
                    None => vec![self.lambda().unwrap_or(0.0); b],
                };
                let second: Vec<bool> = lambdas.iter().map(|&l| l != 0.0).collect();
                self.with_condition(&lambdas, || self.fused_train_on(xs, Some(&second)))
            }
        }
    }

    /// [`Classifier::fused_train`] once the λ condition (if any) is installed.
    fn fused_train_on(
        &self,
        xs: &Tensor,
        second: Option<&[bool]>,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some((net, bns)) = self.net.train_net()? else {
            return Ok(None);
        };
        let (layout, tensors) = kernels::fused_train::layout(&net)?;
        if tensors.iter().any(|t| t.dtype() != candle_core::DType::F32) {
            return Ok(None);
        }
        let (b, c, h, w) = xs.dims4()?;
        let flat = Tensor::cat(&tensors, 0)?;
        let x = xs.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let as_vec = |t: &Tensor| {
            t.flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()
        };
        let (mean, inv_std) = (as_vec(&self.mean)?, as_vec(&self.inv_std)?);
        // A student's noise seeds, drawn in the order the layer-by-layer pass draws them.
        let noise = bns.iter().map(|n| n.draw_train_noise()).collect();
        let op = kernels::fused_train::FusedTrain::new(
            layout,
            &x,
            [b, c, h, w],
            &mean,
            &inv_std,
            noise,
            second,
        );
        let stats = op.stats.clone();
        let logits = flat.apply_op1(op)?;
        let stats = stats.lock().unwrap_or_else(|p| p.into_inner());
        for (bn, batch) in bns.iter().zip(stats.iter()) {
            bn.update_running_from(batch)?;
        }
        Ok(Some(logits))
    }

    /// Normalises NCHW inputs while turning them into the NHWC layout the layers use.
    fn normalise(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.permute((0, 2, 3, 1))?
            .broadcast_sub(&self.mean)?
            .broadcast_mul(&self.inv_std)
    }

    fn forward_conditioned(
        &self,
        net: &dyn Network,
        xs: &Tensor,
        lambdas: &[f32],
        train: bool,
    ) -> candle_core::Result<Tensor> {
        self.with_condition(lambdas, || net.forward_t(xs, train))
    }

    /// Runs `f` with the λ condition of rows `lambdas` installed for the variant
    /// layers (an OAT model only).
    fn with_condition<R>(
        &self,
        lambdas: &[f32],
        f: impl FnOnce() -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (Some(oat), Some(codes)) = (&self.spec.oat, &self.lambda_codes) else {
            candle_core::bail!("model {} is not λ-conditioned", self.spec.arch)
        };
        // Encoded on the codes' device: reading the table back would wait, on a GPU,
        // for everything queued before this pass.
        let codes = oat.encode_on_device(codes.as_tensor(), lambdas)?;
        let condition = variant::Condition::new(lambdas, codes)?;
        let _guard = self.forward_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.ctx.set_condition(Some(condition));
        let out = f();
        self.ctx.set_condition(None);
        out
    }

    /// Logits (B, K) of an OAT model with one λ per example: xs (B, C, H, W) in
    /// bounds, `lambdas` B values in [0, 1]. Errors for a model that is not λ-conditioned.
    pub fn forward_lambdas(
        &self,
        xs: &Tensor,
        lambdas: &[f32],
        train: bool,
    ) -> candle_core::Result<Tensor> {
        layers::ensure_float(xs)?;
        let b = xs.dim(0)?;
        if lambdas.len() != b {
            candle_core::bail!("{} λ values for a batch of {b}", lambdas.len())
        }
        if let Some(bad) = lambdas
            .iter()
            .find(|l| !(l.is_finite() && (0.0..=1.0).contains(*l)))
        {
            candle_core::bail!("λ must lie in [0, 1], got {bad}")
        }
        if train {
            if let Some(logits) = self.fused_train(xs, Some(lambdas))? {
                return Ok(logits);
            }
            if xs.device().is_cuda() && kernels::device_train::usable() {
                if let Some(logits) = self.fused_gpu_train_at(xs, Some(lambdas))? {
                    return Ok(logits);
                }
            }
        }
        let xs = self.normalise(xs)?;
        self.forward_conditioned(self.net.as_ref(), &xs, lambdas, train)
    }

    /// The λ `forward_t` uses, for a λ-conditioned (OAT) model; by default the largest
    /// training λ (the most robust setting).
    pub fn lambda(&self) -> Option<f32> {
        self.spec
            .oat
            .as_ref()
            .map(|_| *self.lambda.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sets the λ `forward_t` uses; errors for a model that is not λ-conditioned or a
    /// λ outside [0, 1].
    pub fn set_lambda(&self, lambda: f32) -> Result<()> {
        if self.spec.oat.is_none() {
            return Err(ModelError::InvalidSpec(format!(
                "λ applies only to once-for-all (OAT) models; this {} is not λ-conditioned",
                self.spec.arch
            )));
        }
        if !(lambda.is_finite() && (0.0..=1.0).contains(&lambda)) {
            return Err(ModelError::InvalidSpec(format!(
                "λ must lie in [0, 1], got {lambda}"
            )));
        }
        *self.lambda.lock().unwrap_or_else(|p| p.into_inner()) = lambda;
        Ok(())
    }

    /// Whether the model's output is random (a stochastic student with noise on).
    pub fn is_stochastic(&self) -> bool {
        self.spec.noise.is_some() && self.ctx.noise_scale() > 0.0
    }

    /// Multiplies every layer's injected noise by `scale` ≥ 0 (0 makes a stochastic
    /// student deterministic; 1, the default, is the trained noise level).
    pub fn set_noise_scale(&self, scale: f32) -> Result<()> {
        if self.spec.noise.is_none() {
            return Err(ModelError::InvalidSpec(
                "a noise scale applies only to stochastic students (models with noise injection)"
                    .into(),
            ));
        }
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(ModelError::InvalidSpec(format!(
                "the noise scale must be finite and ≥ 0, got {scale}"
            )));
        }
        self.ctx.set_noise_scale(scale);
        Ok(())
    }

    /// The current noise scale (1 unless changed; meaningless for deterministic models).
    pub fn noise_scale(&self) -> f32 {
        self.ctx.noise_scale()
    }

    /// Makes the batches this model sees rows `first..` of a larger global batch (a
    /// data-parallel worker's part of each step's batch): a stochastic student then
    /// draws the noise of its image i as that of image `first + i`, so that the
    /// workers' draws, taken together, are one process's on the whole batch. 0 (the
    /// default) in a single process; no effect on a deterministic model.
    pub fn set_batch_offset(&self, first: usize) {
        self.ctx.set_first_image(first);
    }

    /// The offset set by [`Classifier::set_batch_offset`] (0 unless changed).
    pub fn batch_offset(&self) -> usize {
        self.ctx.first_image()
    }

    /// Restarts the noise generator of a stochastic student from `seed`, so the
    /// sequence of noise draws of the following forward passes is reproducible.
    pub fn reseed_noise(&self, seed: u64) {
        self.ctx.reseed(seed);
    }

    /// The learnable noise factors α of a stochastic student's layers, by variable name.
    pub fn noise_alphas(&self) -> Result<Vec<(String, f32)>> {
        let mut out = Vec::new();
        for (name, var) in self.named_vars() {
            if name.ends_with("noise.alpha") {
                out.push((name, var.as_tensor().flatten_all()?.to_vec1::<f32>()?[0]));
            }
        }
        Ok(out)
    }

    /// Initialises this model from a teacher with the same architecture: every
    /// variable of the teacher is copied into the variable of the same name here
    /// (a stochastic student or an OAT model built on the teacher's architecture has
    /// all of them). Returns the names of this model's variables the teacher lacks
    /// (noise factors, FiLM, second BatchNorm), which keep their initial values.
    pub fn init_from(&self, teacher: &Classifier) -> Result<Vec<String>> {
        let strip = |s: &ModelSpec| ModelSpec {
            noise: None,
            oat: None,
            ..s.clone()
        };
        if strip(&teacher.spec) != strip(&self.spec) {
            return Err(ModelError::InvalidSpec(format!(
                "cannot initialise a {} model from a {} teacher: architecture, classes, input or normalisation differ",
                self.spec.arch, teacher.spec.arch
            )));
        }
        let mine: BTreeMap<String, Var> = self.named_vars().into_iter().collect();
        let mut copied = std::collections::BTreeSet::new();
        for (name, src) in teacher.named_vars() {
            let dst = mine.get(&name).ok_or_else(|| {
                ModelError::InvalidSpec(format!(
                    "the teacher's variable `{name}` has no counterpart in the student"
                ))
            })?;
            if dst.dims() != src.dims() {
                return Err(ModelError::InvalidSpec(format!(
                    "variable `{name}`: teacher {:?} vs student {:?}",
                    src.dims(),
                    dst.dims()
                )));
            }
            dst.set(&src.as_tensor().to_device(&self.device)?)?;
            copied.insert(name);
        }
        Ok(mine.into_keys().filter(|n| !copied.contains(n)).collect())
    }
}

/// A network Rampart did not build, evaluated through [`Classifier::from_external`]
/// (an ONNX graph, say). It computes logits (B, K) from NCHW inputs already
/// normalised by the classifier (most external models normalise inside the graph
/// and get mean 0, std 1). Gradients flow through whatever candle operations it runs;
/// it has no parameters of its own to train.
pub trait ExternalNetwork: Send + Sync {
    /// xs: (B, C, H, W) → logits (B, K).
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor>;
}

/// An [`ExternalNetwork`] in the place of a network proper: NHWC in, NCHW to it.
struct External(Arc<dyn ExternalNetwork>);

impl ModuleT for External {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.0.forward(&xs.permute((0, 3, 1, 2))?)
    }
}

impl Network for External {}

/// A network proper (NHWC, normalised input → logits), with its fused eval-mode
/// program where the architecture has one (see [`fused`]).
pub(crate) trait Network: ModuleT + Send + Sync {
    /// The network in the fused eval path's form, with the current weights; None
    /// when this network (or one of its layers) has no fused form.
    fn eval_program(&self) -> candle_core::Result<Option<EvalNet>> {
        Ok(None)
    }

    /// The network's tensors for the fused eval path on a GPU; None when this
    /// network (or one of its layers) has no such form.
    fn device_net(&self) -> candle_core::Result<Option<kernels::device_eval::DeviceArch>> {
        Ok(None)
    }

    /// The network's tensors for the fused train path on a GPU (its live parameters)
    /// and its BatchNorms in [`kernels::preact::PreAct::norms`] order; None when this
    /// network has no such form.
    #[allow(clippy::type_complexity)]
    fn device_train_net(
        &self,
    ) -> candle_core::Result<Option<(kernels::device_eval::DeviceArch, Vec<&variant::Norm>)>> {
        Ok(None)
    }

    /// The parameters for the fused train path, and the BatchNorms whose running
    /// statistics it reports (in [`kernels::preact::PreAct::norms`] order); None when
    /// this network has no fused form.
    fn train_net(&self) -> candle_core::Result<Option<(TrainNetwork<'_>, Vec<&variant::Norm>)>> {
        Ok(None)
    }
}

/// The input normalisation of `spec` on `device`: per-channel mean and 1/std, (C,).
fn normalisation(spec: &ModelSpec, device: &Device) -> Result<(Tensor, Tensor)> {
    let c = spec.input_shape[0];
    let mean = Tensor::from_vec(spec.mean.clone(), c, device)?;
    let inv_std = Tensor::from_vec(
        spec.std.iter().map(|s| 1.0 / s).collect::<Vec<f32>>(),
        c,
        device,
    )?;
    Ok((mean, inv_std))
}

/// The variables of `varmap` for a frozen network: parameters detached (they share
/// the variables' storage, so training updates are seen, but no operation tracks
/// them), buffers (running statistics, λ codes) as they are.
fn frozen_builder(varmap: &VarMap, device: &Device) -> candle_core::Result<VarBuilder<'static>> {
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    let tensors: std::collections::HashMap<String, Tensor> = data
        .iter()
        .map(|(name, var)| {
            let t = if is_buffer(name) {
                var.as_tensor().clone()
            } else {
                var.as_detached_tensor()
            };
            (name.clone(), t)
        })
        .collect();
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// A frozen view of a [`Classifier`]: the model as an attack sees it, built by
/// [`Classifier::frozen`].
///
/// It runs the classifier in eval mode (running BatchNorm statistics) on detached
/// parameters, so a backward pass through it yields gradients for the input and for
/// nothing else: the operations see untracked parameters and skip their parameter
/// gradients, which attacks never read and which cost as much as the input gradient.
/// On the CPU a plain pre-activation network (WRN, PreActResNet-18) runs as one fused
/// operation here (see `docs/performance.md`). Logits and input gradients equal the
/// classifier's own eval-mode ones, to float rounding. Which gradients are computed is
/// thus a property of the value an attack is given, not of ambient state.
///
/// `forward_t(xs, true)` is refused: a frozen model does not train.
#[derive(Clone, Copy, Debug)]
pub struct Frozen<'a> {
    model: &'a Classifier,
}

impl ModuleT for Frozen<'_> {
    /// xs: (B, C, H, W) in the model's bounds → logits (B, K), eval mode.
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train {
            candle_core::bail!(
                "a frozen view of a classifier runs in eval mode only (forward_t with train = false)"
            )
        }
        let m = self.model;
        m.check_input(xs)?;
        if let Some(op) = m.fused_eval(xs)? {
            return xs.apply_op1(op);
        }
        if let Some(op) = m.device_eval(xs)? {
            return xs.apply_op1(op);
        }
        m.forward_network(m.frozen_net.as_ref(), xs, false)
    }
}

/// Whether a variable name denotes a buffer, not trained by SGD: BatchNorm running
/// statistics, the running noise scale of a stochastic student, OAT's λ codes.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("running_std")
        || name == LAMBDA_CODES
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box–Muller; u1 in (0, 1] so the logarithm is finite.
    let u1: f32 = 1.0 - rng.gen::<f32>();
    let u2: f32 = rng.gen::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl Classifier {
    /// The frozen view attacks and predictions use: eval mode, gradients for the input
    /// only (see [`Frozen`]).
    pub fn frozen(&self) -> Frozen<'_> {
        Frozen { model: self }
    }

    /// Checks that xs is a float (B, C, H, W) batch of this model's input shape.
    fn check_input(&self, xs: &Tensor) -> candle_core::Result<()> {
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
        Ok(())
    }

    /// The layer-by-layer forward pass of `net` (this model's network or its frozen
    /// twin) at the model's λ; xs checked by [`Classifier::check_input`].
    fn forward_network(
        &self,
        net: &dyn Network,
        xs: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let xs = self.normalise(xs)?;
        match &self.spec.oat {
            None => net.forward_t(&xs, train),
            Some(_) => {
                let lambdas = vec![self.lambda().unwrap_or(0.0); xs.dim(0)?];
                self.forward_conditioned(net, &xs, &lambdas, train)
            }
        }
    }
}

impl ModuleT for Classifier {
    /// xs: (B, C, H, W) in the model's bounds → logits (B, K); gradients reach the
    /// input and every parameter (attacks use [`Classifier::frozen`] instead).
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.check_input(xs)?;
        if train {
            if let Some(logits) = self.fused_train(xs, None)? {
                return Ok(logits);
            }
            if xs.device().is_cuda() && kernels::device_train::usable() {
                if let Some(logits) = self.fused_gpu_train(xs)? {
                    return Ok(logits);
                }
            }
        }
        self.forward_network(self.net.as_ref(), xs, train)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod variant_tests;
