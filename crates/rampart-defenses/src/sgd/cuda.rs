//! The CUDA kernels of the fused SGD update ([`super::fused`]), compiled once per
//! process with NVRTC (which candle's CUDA stack links) and loaded once per device.
//! `__fmul_rn` and `__fadd_rn` are never contracted into an FMA, so a kernel does the
//! CPU kernel's float operations exactly.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::{CudaStorage, Layout, Result};

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

/// The PTX of [`SOURCE`], compiled on first use.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("fused SGD: NVRTC: {e}")))
}

fn contiguous(l: &Layout, n: usize, what: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == n => Ok(a),
        _ => candle_core::bail!("fused SGD: the {what} is not a contiguous tensor of {n} values"),
    }
}

/// Compiles and loads both kernels on `dev` (nothing on the CPU), so that a GPU whose
/// driver cannot take them is known before the first update.
pub(crate) fn ready(dev: &candle_core::Device) -> Result<()> {
    if let candle_core::Device::Cuda(cuda) = dev {
        for name in ["sgd_momentum", "sgd_weight"] {
            cuda.get_or_load_custom_func(name, MODULE, ptx()?)?;
        }
    }
    Ok(())
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
    let (d0, a0, b0) = (
        contiguous(dst_l, n, "destination")?,
        contiguous(l1, n, "gradient")?,
        contiguous(l2, n, "second source")?,
    );
    let dev = dst.device.clone();
    let name = match kernel {
        Kernel::Momentum => "sgd_momentum",
        Kernel::Weight => "sgd_weight",
    };
    let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
    let a = s1.as_cuda_slice::<f32>()?.slice(a0..a0 + n);
    let b = s2.as_cuda_slice::<f32>()?.slice(b0..b0 + n);
    let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d0 + n);
    let (decay, wd) = (i32::from(f.decay.is_some()), f.decay.unwrap_or(0.0));
    let count = u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("fused SGD: {n} values are too many")))?;
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
    unsafe { builder.launch(LaunchConfig::for_num_elems(count)) }
        .map_err(|e| candle_core::Error::Msg(format!("fused SGD: launch: {e:?}")))?;
    Ok(())
}
