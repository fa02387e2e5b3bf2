//! Settings of a CUDA device for Rampart's workloads (feature `cuda`), and the
//! [`Module`]s of Rampart's own kernels (CUDA C compiled by NVRTC at first use).
//!
//! candle allocates every tensor with `cuMemAllocAsync` from the device's default
//! memory pool, whose release threshold is 0: each synchronisation (reading a loss
//! or a prediction back) hands the pool's memory back to the driver, and the next
//! step maps it again. Measured on an H100, that made a synchronised WRN-16-4 forward
//! pass 3–4× slower than a pipelined one. [`prepare`] keeps freed memory in the pool,
//! as PyTorch's caching allocator does.
#![allow(unsafe_code)]

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, CudaView, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{CudaStorage, Device, Layout, Result};

/// A module of CUDA kernels written in CUDA C: compiled to PTX by NVRTC (which
/// candle's CUDA stack links) once per process, on first use, and loaded once per
/// device. No GPU is needed to compile ([`Module::ptx`]), so the sources are checked
/// on any machine with the CUDA libraries.
///
/// Each kernel's function handle is looked up once per device and kept: candle's
/// lookup asks the driver by name (a C string built and `cuModuleGetFunction`) on
/// every launch.
pub struct Module {
    name: &'static str,
    source: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
    funcs: Mutex<Vec<(DeviceId, &'static str, CudaFunction)>>,
}

impl Module {
    /// The module `name` (unique in the process) of CUDA C `source`.
    pub const fn new(name: &'static str, source: &'static str) -> Self {
        Module {
            name,
            source,
            ptx: OnceLock::new(),
            funcs: Mutex::new(Vec::new()),
        }
    }

    /// The module's PTX, compiled on first use (default NVRTC options: IEEE division
    /// and square root, multiply-adds contracted only where the source allows it).
    pub fn ptx(&self) -> Result<&str> {
        self.ptx
            .get_or_init(|| {
                nvrtc::compile_ptx(self.source)
                    .map(|p| p.to_src())
                    .map_err(|e| format!("{e:?}"))
            })
            .as_deref()
            .map_err(|e| candle_core::Error::Msg(format!("{}: NVRTC: {e}", self.name)))
    }

    /// The kernel `kernel` of this module on `dev`, loading the module there first.
    pub fn func(&self, dev: &CudaDevice, kernel: &'static str) -> Result<Kernel> {
        let stream = dev.cuda_stream();
        let id = dev.id();
        let known = |funcs: &[(DeviceId, &str, CudaFunction)]| {
            funcs
                .iter()
                .find(|(d, k, _)| *d == id && *k == kernel)
                .map(|(_, _, f)| f.clone())
        };
        // A poisoned lock only means another thread panicked while pushing a handle:
        // the list itself is still valid.
        let funcs = self.funcs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(func) = known(&funcs) {
            return Ok(Kernel { func, stream });
        }
        drop(funcs);
        let func = dev
            .get_or_load_custom_func(kernel, self.name, self.ptx()?)?
            .into_cuda_function();
        let mut funcs = self.funcs.lock().unwrap_or_else(|e| e.into_inner());
        if known(&funcs).is_none() {
            funcs.push((id, kernel, func.clone()));
        }
        Ok(Kernel { func, stream })
    }

    /// Compiles and loads `kernels` on `dev` (nothing on the CPU), so that a GPU whose
    /// driver cannot take them is known before they are needed.
    pub fn ready(&self, dev: &Device, kernels: &[&'static str]) -> Result<()> {
        if let Device::Cuda(cuda) = dev {
            for k in kernels {
                self.func(cuda, k)?;
            }
        }
        Ok(())
    }
}

/// A loaded kernel and the device's stream it runs on.
pub struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// A launch of this kernel on the device's stream, arguments to be pushed.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// The launch shape of one thread per element over `n` elements, `n` checked to fit
/// a kernel's `unsigned int` count.
pub fn elementwise(n: usize, what: &str) -> Result<(LaunchConfig, u32)> {
    let count = u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{what}: {n} values are too many")))?;
    Ok((LaunchConfig::for_num_elems(count.max(1)), count))
}

/// A launch's error, named after the kernel.
pub fn launch_error(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: launch: {e:?}"))
}

/// The `n` f32 values of a contiguous operand (its layout's offset applied), or an
/// error naming `what`.
pub fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    n: usize,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    let a = contiguous(l, n, what)?;
    Ok(s.as_cuda_slice::<f32>()?.slice(a..a + n))
}

/// The offset of a contiguous run of `n` values described by `l`, or an error naming
/// `what`.
pub fn contiguous(l: &Layout, n: usize, what: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == n => Ok(a),
        _ => candle_core::bail!("{what}: not a contiguous tensor of {n} values"),
    }
}

/// A fresh f32 buffer of `n` values on `dev`, every one of which the caller's kernel
/// writes before anything reads it.
pub(crate) fn uninit(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: the callers' kernels write all `n` values before any is read.
    unsafe { dev.alloc::<f32>(n) }
}

/// Keeps freed memory in `dev`'s pool, stops the per-buffer event bookkeeping of
/// candle's CUDA stack, and sets the arithmetic of the convolutions and matrix
/// products (`precision`: full f32, TF32 tensor cores, or bf16 convolutions; see
/// `docs/performance.md`). A no-op on the CPU. Call it before the device holds
/// anything but its handles.
///
/// cudarc gives every buffer it allocates two CUDA events (created with the buffer,
/// destroyed with it: four driver calls per tensor), which only order work between
/// several streams. Everything here runs on the device's one stream (candle's, which
/// cuDNN, cuBLAS and NCCL are also given), so the events never order anything;
/// buffers allocated after this call have none.
pub fn prepare(dev: &Device, precision: crate::Precision) -> Result<()> {
    let Some(pool) = default_pool(dev)? else {
        return Ok(());
    };
    if let Device::Cuda(cuda) = dev {
        if std::env::var_os(EVENTS_ENV).is_none() {
            // SAFETY: one stream (see above): no buffer is used on a stream other
            // than the one that allocates and frees it.
            unsafe { cuda.disable_event_tracking() };
        }
    }
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
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(precision == crate::Precision::Tf32);
    #[cfg(feature = "cudnn")]
    super::cudnn::set_precision(precision);
    #[cfg(not(feature = "cudnn"))]
    if precision == crate::Precision::Bf16 {
        candle_core::bail!("bf16 convolutions need a build with the `cudnn` feature")
    }
    Ok(())
}

/// Set (to anything), this environment variable keeps cudarc's per-buffer events
/// ([`prepare`]): a diagnostic, for measuring what they cost.
pub const EVENTS_ENV: &str = super::CUDA_EVENTS_ENV;

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
