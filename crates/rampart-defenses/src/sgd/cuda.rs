//! The CUDA kernels of the fused SGD update ([`super::fused`]), a [`Module`] compiled
//! once per process with NVRTC and loaded once per device: per parameter
//! (`sgd_momentum`, `sgd_weight`) and for all of them in one launch (`sgd_multi`,
//! what [`crate::Sgd::step`] runs on a GPU).
//! `__fmul_rn` and `__fadd_rn` are never contracted into an FMA, so a kernel does the
//! CPU kernel's float operations exactly.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaStorage, Layout, Result, Storage, Tensor};
use rampart_models::cuda::{contiguous, elementwise, f32_view, launch_error, Module};

use super::fused::{Factors, Kernel, Scalar};
use super::multi::{self, Slot, MULTI_THREADS};

const MODULE: &str = "rampart_sgd";

const SOURCE: &str = include_str!("sgd.cu");

/// The module of both kernels.
static SGD: Module = Module::new(MODULE, SOURCE);

/// Compiles and loads both kernels on `dev` (nothing on the CPU), so that a GPU whose
/// driver cannot take them is known before the first update.
pub(crate) fn ready(dev: &candle_core::Device) -> Result<()> {
    SGD.ready(dev, &["sgd_momentum", "sgd_weight", "sgd_multi"])
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
    let func = SGD.func(&dev, kernel.name())?;
    let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d0 + n);
    let (cfg, count) = elementwise(n, "fused SGD")?;
    let scalars = kernel.scalars(&f, count);
    let mut builder = func.builder();
    builder.arg(&mut out).arg(&a).arg(&b);
    for s in &scalars {
        match s {
            Scalar::F32(x) => builder.arg(x),
            Scalar::I32(x) => builder.arg(x),
            Scalar::U32(x) => builder.arg(x),
        };
    }
    // SAFETY: the kernel reads `n` values of each source and writes `n` of the
    // destination, all checked above to be contiguous f32 runs of that length.
    unsafe { builder.launch(cfg) }.map_err(|e| launch_error("fused SGD", e))?;
    Ok(())
}

/// One parameter of a multi-tensor update: its weights, gradient and momentum buffer
/// (f32, contiguous, one shape, on one GPU) and whether it is decayed.
pub(crate) struct Entry<'a> {
    pub w: &'a Tensor,
    pub g: &'a Tensor,
    pub b: &'a Tensor,
    pub decay: bool,
}

/// The table of the last multi-tensor update and its copy on the GPU: a step whose
/// table is the same (the same gradient addresses, which the stream-ordered allocator
/// tends to hand out again step after step) launches on it without copying it again.
/// The kernel only reads it.
pub(crate) type TableCache = Option<(Vec<u64>, CudaSlice<u64>)>;

/// Every parameter of `entries` updated in one launch (`sgd_multi`): the factors of
/// the step (momentum μ, weight decay λ, Nesterov, learning rate) and a table of the
/// tensors' device addresses (six values per parameter, `multi.rs`), copied to the
/// GPU unless `cache` holds the same table. The same float operations as
/// [`launch`]'s two kernels per parameter.
pub(crate) fn launch_multi(
    cache: &mut TableCache,
    entries: &[Entry<'_>],
    mu: f32,
    wd: f32,
    nesterov: bool,
    lr: f32,
) -> Result<()> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    let candle_core::Device::Cuda(dev) = first.w.device() else {
        candle_core::bail!("fused SGD: a multi-tensor update off the GPU")
    };
    let stream = dev.cuda_stream();
    // The storages' read guards keep every buffer (and its address) alive until the
    // launch is queued; the kernel writes the weights and momentum buffers in place on
    // the device's one stream, after every operation queued before it.
    let guards: Vec<_> = entries
        .iter()
        .flat_map(|e| [e.w, e.g, e.b])
        .map(|t| t.storage_and_layout())
        .collect();
    let mut operands: Vec<[u64; 3]> = Vec::with_capacity(entries.len());
    let mut syncs = Vec::with_capacity(guards.len());
    for (e, g) in entries.iter().zip(guards.chunks_exact(3)) {
        let n = e.w.elem_count();
        let mut ptrs = [0u64; 3];
        for (k, (storage, layout)) in g.iter().enumerate() {
            let Storage::Cuda(s) = &**storage else {
                candle_core::bail!("fused SGD: a tensor of the update is not on the GPU")
            };
            let offset = contiguous(layout, n, "fused SGD: multi-tensor operand")?;
            let (ptr, sync) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
            syncs.push(sync);
            ptrs[k] = ptr + (offset * std::mem::size_of::<f32>()) as u64;
        }
        operands.push(ptrs);
    }
    let params: Vec<(usize, bool)> = entries
        .iter()
        .map(|e| (e.w.elem_count(), e.decay))
        .collect();
    let plan = multi::plan(&params);
    if plan.blocks == 0 {
        return Ok(());
    }
    let table: Vec<u64> = plan
        .table
        .iter()
        .map(|slot| match *slot {
            Slot::Address { param, operand } => operands[param][operand],
            Slot::Value(v) => v,
        })
        .collect();
    if cache.as_ref().is_none_or(|(last, _)| *last != table) {
        let copied = dev.clone_htod(&table)?;
        *cache = Some((table, copied));
    }
    let Some((_, meta)) = cache.as_ref() else {
        candle_core::bail!("fused SGD: the multi-tensor table was not copied")
    };
    let func = SGD.func(dev, "sgd_multi")?;
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(plan.blocks).map_err(candle_core::Error::wrap)?,
            1,
            1,
        ),
        block_dim: (MULTI_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let params = u32::try_from(entries.len()).map_err(candle_core::Error::wrap)?;
    let (tensors, mu, wd, nest, lr, chunk) = multi::scalars(params, mu, wd, nesterov, lr);
    let mut builder = func.builder();
    builder
        .arg(meta)
        .arg(&tensors)
        .arg(&mu)
        .arg(&wd)
        .arg(&nest)
        .arg(&lr)
        .arg(&chunk);
    // SAFETY: the table holds 6 values per tensor, as the kernel reads them, and is
    // this step's (copied now or equal to the cached copy); each address is that of a
    // live, contiguous f32 run of n values (checked above), and block k touches
    // elements (k − first)·chunk … min(that + chunk, n) of its tensor only (one block
    // per chunk of each tensor, `multi::plan`).
    unsafe { builder.launch(cfg) }.map_err(|e| launch_error("fused SGD (multi-tensor)", e))?;
    drop(syncs);
    drop(guards);
    Ok(())
}
