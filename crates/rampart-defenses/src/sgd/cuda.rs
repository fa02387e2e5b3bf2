//! The CUDA kernels of the fused SGD update ([`super::fused`]), a [`Module`] compiled
//! once per process with NVRTC and loaded once per device.
//! `__fmul_rn` and `__fadd_rn` are never contracted into an FMA, so a kernel does the
//! CPU kernel's float operations exactly.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Layout, Result};
use rampart_models::cuda::{contiguous, elementwise, f32_view, launch_error, Module};

use super::fused::{Factors, Kernel};

const MODULE: &str = "rampart_sgd";

const SOURCE: &str = r#"
extern "C" __global__ void sgd_momentum(float* b, const float* g, const float* w,
                                        float mu, float wd, int decay, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    if (decay) gi = __fadd_rn(gi, __fadd_rn(__fmul_rn(w[i], wd), 0.0f));
    b[i] = __fadd_rn(__fadd_rn(__fmul_rn(b[i], mu), 0.0f), gi);
}

extern "C" __global__ void sgd_weight(float* w, const float* g, const float* b,
                                      float mu, float wd, int decay, int nesterov,
                                      float lr, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float wi = w[i];
    float gi = g[i];
    if (decay) gi = __fadd_rn(gi, __fadd_rn(__fmul_rn(wi, wd), 0.0f));
    float d;
    if (mu == 0.0f) d = gi;
    else if (nesterov) d = __fadd_rn(gi, __fadd_rn(__fmul_rn(b[i], mu), 0.0f));
    else d = b[i];
    w[i] = __fsub_rn(wi, __fadd_rn(__fmul_rn(d, lr), 0.0f));
}
"#;

/// The module of both kernels.
static SGD: Module = Module::new(MODULE, SOURCE);

/// Compiles and loads both kernels on `dev` (nothing on the CPU), so that a GPU whose
/// driver cannot take them is known before the first update.
pub(crate) fn ready(dev: &candle_core::Device) -> Result<()> {
    SGD.ready(dev, &["sgd_momentum", "sgd_weight"])
}

/// The PTX of the fused SGD kernels, compiled by NVRTC (no GPU needed): a check that
/// the source compiles.
pub fn ptx() -> Result<&'static str> {
    SGD.ptx()
}

/// Launches `kernel` in place on `dst` from the two sources (see [`Kernel`]).
pub(crate) fn launch(
    kernel: Kernel,
    f: Factors,
    dst: &mut CudaStorage,
    dst_l: &Layout,
    [(s1, l1), (s2, l2)]: [(&CudaStorage, &Layout); 2],
) -> Result<()> {
    let n = dst_l.shape().elem_count();
    let a = f32_view(s1, l1, n, "fused SGD: gradient")?;
    let b = f32_view(s2, l2, n, "fused SGD: second source")?;
    let d0 = contiguous(dst_l, n, "fused SGD: destination")?;
    let dev = dst.device.clone();
    let name = match kernel {
        Kernel::Momentum => "sgd_momentum",
        Kernel::Weight => "sgd_weight",
    };
    let func = SGD.func(&dev, name)?;
    let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d0 + n);
    let (decay, wd) = (i32::from(f.decay.is_some()), f.decay.unwrap_or(0.0));
    let (cfg, count) = elementwise(n, "fused SGD")?;
    let mut builder = func.builder();
    builder
        .arg(&mut out)
        .arg(&a)
        .arg(&b)
        .arg(&f.mu)
        .arg(&wd)
        .arg(&decay);
    let nesterov = i32::from(f.nesterov);
    if let Kernel::Weight = kernel {
        builder.arg(&nesterov).arg(&f.lr);
    }
    builder.arg(&count);
    // SAFETY: the kernel reads `n` values of each source and writes `n` of the
    // destination, all checked above to be contiguous f32 runs of that length.
    unsafe { builder.launch(cfg) }.map_err(|e| launch_error("fused SGD", e))?;
    Ok(())
}
