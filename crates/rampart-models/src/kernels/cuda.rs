//! Settings of a CUDA device for Rampart's workloads (feature `cuda`).
//!
//! candle allocates every tensor with `cuMemAllocAsync` from the device's default
//! memory pool, whose release threshold is 0: each synchronisation (reading a loss
//! or a prediction back) hands the pool's memory back to the driver, and the next
//! step maps it again. Measured on an H100, that made a synchronised WRN-16-4 forward
//! pass 3–4× slower than a pipelined one. [`prepare`] keeps freed memory in the pool,
//! as PyTorch's caching allocator does.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::{Device, Result};

/// Keeps freed memory in `dev`'s pool, and sets whether f32 convolutions and matrix
/// products may use TF32 tensor cores (`tf32`; see `docs/performance.md`). A no-op on
/// the CPU.
pub fn prepare(dev: &Device, tf32: bool) -> Result<()> {
    let Some(pool) = default_pool(dev)? else {
        return Ok(());
    };
    let mut threshold = u64::MAX;
    // SAFETY: a valid pool; the attribute takes a u64.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(candle_core::Error::wrap)?;
    }
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(tf32);
    #[cfg(feature = "cudnn")]
    super::cudnn::set_tf32(tf32);
    Ok(())
}

/// The device's default memory pool, from which candle allocates every tensor.
fn default_pool(dev: &Device) -> Result<Option<sys::CUmemoryPool>> {
    let Device::Cuda(cuda) = dev else {
        return Ok(None);
    };
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: a valid device of a bound context.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(candle_core::Error::wrap)?;
    }
    Ok(Some(pool))
}

/// The most memory `dev`'s tensors held at once since the last
/// [`reset_peak_memory`] (the pool's high-water mark of memory in use, as PyTorch's
/// `max_memory_allocated`; libraries' own workspaces, cuBLAS's, are not in it), in
/// bytes; `None` on the CPU.
pub fn peak_memory(dev: &Device) -> Result<Option<u64>> {
    used_memory_high(dev, None)
}

/// Starts a new high-water mark for [`peak_memory`] (a no-op on the CPU).
pub fn reset_peak_memory(dev: &Device) -> Result<()> {
    used_memory_high(dev, Some(0)).map(|_| ())
}

/// Reads the pool's high-water mark of memory in use, or sets it (to zero: the only
/// value the driver accepts), after the device's queued work.
fn used_memory_high(dev: &Device, set: Option<u64>) -> Result<Option<u64>> {
    let Some(pool) = default_pool(dev)? else {
        return Ok(None);
    };
    dev.synchronize()?;
    let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    let mut bytes = set.unwrap_or(0);
    let value = (&mut bytes as *mut u64).cast();
    // SAFETY: the attribute is a u64 (cuuint64_t) of a valid pool.
    unsafe {
        match set {
            Some(_) => sys::cuMemPoolSetAttribute(pool, attribute, value),
            None => sys::cuMemPoolGetAttribute(pool, attribute, value),
        }
        .result()
        .map_err(candle_core::Error::wrap)?;
    }
    Ok(Some(bytes))
}
