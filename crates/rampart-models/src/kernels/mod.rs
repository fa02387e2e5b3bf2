//! The kernels layer: how the networks of this crate are computed, below the
//! architectures that describe them.
//!
//! An architecture file (`wrn.rs`, `resnet.rs`) says which layers a network has and
//! in which order; the layers (`layers.rs`, `variant.rs`) hold parameters and call
//! the operations here. Nothing in this module imports an architecture or a layer:
//! the dependency runs one way, from the networks down to the kernels.
//!
//! * [`conv`]: the [`conv::Conv2d`] op, one type for a convolution's forward,
//!   input-gradient and kernel-gradient passes, each with a CPU forward (blocked
//!   im2col + GEMM) and a CUDA forward (cuDNN, feature `cudnn`), and the generic
//!   fallback for other dtypes and devices.
//! * [`bn`]: BatchNorm (+ ReLU) of NHWC activations in train and eval mode, as fused
//!   CPU ops and cuDNN calls behind one pair of functions.
//! * `preact`: the shape of a pre-activation network (stem, blocks, head), generic
//!   over what stands for a convolution, a BatchNorm and the linear layer. The
//!   architectures instantiate it with their layers; the fused paths below run it.
//! * `postact`: the shape of a post-activation ResNet (ResNet-20), generic like
//!   `preact`, and its body on the fused eval path (BatchNorms folded into the
//!   kernels).
//! * [`device_eval`]: a whole pre-activation network as one op on a GPU in eval
//!   mode (forward and input gradient), written once over an executor: cuDNN and
//!   CUDA kernels (`device_eval.cu`), or those kernels' CPU twins, which test it.
//!   `launch`: the programs' launches of their own kernels as data, built once for
//!   the CUDA executor and the tests' emulated one (which runs them on the CPU).
//! * `fused` and `fused_train`: a whole pre-activation network as one CPU op, in
//!   eval mode (forward and input gradient: attacks) and in train mode (forward and
//!   every parameter gradient: training); `train_norm`: the train-mode normalisation
//!   layers of the latter (plain, a student's noise, OAT's dual BatchNorm and FiLM).
//! * `gather`: a model's parameters copied into its one buffer of them for the
//!   GPU's fused train program (`crate::flat`), one launch for all of them;
//!   `running`: every running statistic of that program's pass updated in one
//!   launch.
//! * `winograd`, `gemm` and `common`: Winograd F(2×2, 3×3) convolutions, the GEMM
//!   entry point and the small pieces the kernels share.
//! * [`xent`]: softmax cross-entropy (labels with smoothing, or soft targets) as one
//!   op each way; [`pointwise`]: the small operations around cuDNN's BatchNorm (the
//!   ReLU's mask, the eval-mode input gradient, the running statistics), each one
//!   CUDA kernel with its CPU twin. Their CUDA source is `ops.cu`.
//! * [`bf16`]: the f32 ↔ bf16 conversions of the bf16 convolutions
//!   (`--device cuda+bf16`), kernels with their CPU twins.
//! * [`sync_bn`]: synchronised BatchNorm for data-parallel training (statistics and
//!   gradient sums over every worker, through a [`sync_bn::ChannelSum`] installed
//!   for the thread by a [`sync_bn::SyncScope`]).
//! * [`cuda`] (feature `cuda`): device preparation and the NVRTC-compiled kernel
//!   modules; `cudnn` (feature `cudnn`): the
//!   cuDNN calls. Unsafe code is
//!   there, in `cuda`, and in the kernel launches of `pointwise` and `xent` (each
//!   marked, with its safety argument).

pub mod bf16;
pub mod bn;
mod common;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cudnn")]
mod cudnn;
pub mod device_eval;
pub mod device_train;
pub mod emulate;
pub(crate) mod fused;
pub(crate) mod fused_train;
pub(crate) mod gather;
mod gemm;
pub(crate) mod launch;
pub mod noise;
#[cfg(test)]
mod ops_emulated;
pub mod pointwise;
pub(crate) mod postact;
pub(crate) mod preact;
pub(crate) mod running;
pub mod sync_bn;
mod train_norm;
pub mod weights;
mod winograd;
pub mod xent;

pub(crate) use common::{Affine, EvalNorm, NoiseDraw};

/// The environment variable that keeps cudarc's per-buffer CUDA events (see
/// `cuda::prepare`; a diagnostic).
pub const CUDA_EVENTS_ENV: &str = "RAMPART_CUDA_EVENTS";

/// The environment variable that asks for cuDNN's measured choice of convolution
/// algorithms (PyTorch's `cudnn.benchmark = True`; any value but `0`): each geometry
/// and precision is measured once per process and thread, the first time it runs,
/// and only deterministic algorithms are taken.
pub const CUDNN_BENCHMARK_ENV: &str = "RAMPART_CUDNN_BENCHMARK";

/// The environment variable that keeps the state of PGD's loop (iterates, momentum,
/// best points, step sizes) on the GPU, updated by one kernel per step, for the
/// L∞ and L2 configurations without early stopping (`rampart-attacks`, feature `cuda`; any
/// value but `0`). Off by default until verified on a GPU.
pub const DEVICE_ATTACK_ENV: &str = "RAMPART_CUDA_DEVICE_ATTACK";

/// The environment variable that replays the middle steps of PGD's device-resident
/// runs from a CUDA graph captured once per run (`rampart-attacks`, feature `cuda`;
/// any value but `0`; with [`DEVICE_ATTACK_ENV`]). Off by default until verified on a
/// GPU.
pub const CUDA_GRAPHS_ENV: &str = "RAMPART_CUDA_GRAPHS";

/// The switch of the trainer's CUDA graphs: full-batch training steps of normal
/// training, fast AT, PGD-AT, CCAT and TRADES captured once per run and replayed
/// (`rampart-defenses`, `step_graph`; any value but `0`).
pub const TRAIN_GRAPHS_ENV: &str = "RAMPART_CUDA_TRAIN_GRAPHS";

/// The environment switches of the GPU paths (the fused eval and train programs,
/// PGD's device-resident loop and its CUDA graphs, cudarc's per-buffer events,
/// cuDNN's measured algorithms), which a run on a GPU records in its `config.json`
/// (with rampart-data's staged uploads, `RAMPART_CUDA_PINNED_UPLOADS`).
pub const GPU_SWITCHES: [&str; 7] = [
    device_eval::ENABLE_ENV,
    device_train::ENABLE_ENV,
    DEVICE_ATTACK_ENV,
    CUDA_GRAPHS_ENV,
    TRAIN_GRAPHS_ENV,
    CUDA_EVENTS_ENV,
    CUDNN_BENCHMARK_ENV,
];
