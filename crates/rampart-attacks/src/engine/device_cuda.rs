//! The CUDA kernels of the attacks' device loops (PGD's, its resident training batch,
//! APGD's), one module compiled once per process by NVRTC, and the one function that
//! queues a [`Launch`] of them. Each kernel does its CPU twin's operations in the same
//! order, with `__dadd_rn`, `__dmul_rn`, `__fadd_rn`, … so that nothing is contracted
//! into a multiply-add. The kernels update the loops' tensors in place through their
//! device addresses, on the device's one stream, after every operation queued before
//! them. What each launch passes is built in the loops' code (a [`Launch`]), where the
//! tests' emulated executor runs the same launches on the CPU.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::{DType, Device, Result, Storage, Tensor};
use rampart_models::cuda::{launch_error, Module};

use super::launch::{Launch, Val};

const SOURCE: &str = include_str!("device.cu");

static ATTACK: Module = Module::new("rampart_attack", SOURCE);

/// The PTX of the loop's kernels, compiled by NVRTC (no GPU needed): a check that the
/// source compiles.
pub fn ptx() -> Result<&'static str> {
    ATTACK.ptx()
}

/// Runs `launch` with the device addresses of `tensors` (contiguous, on one GPU; None
/// gives 0), their storages held until the launch is queued.
fn with_addresses<R>(
    tensors: &[Option<&Tensor>],
    launch: impl FnOnce(&candle_core::cuda_backend::CudaDevice, &[u64]) -> Result<R>,
) -> Result<R> {
    let Some(Device::Cuda(dev)) = tensors.iter().flatten().next().map(|t| t.device()) else {
        candle_core::bail!("PGD on the device: the loop's state is not on a GPU")
    };
    let stream = dev.cuda_stream();
    let guards: Vec<_> = tensors
        .iter()
        .map(|t| t.map(|t| (t, t.storage_and_layout())))
        .collect();
    let mut addresses = Vec::with_capacity(guards.len());
    let mut syncs = Vec::new();
    for g in &guards {
        let Some((t, (storage, layout))) = g else {
            addresses.push(0u64);
            continue;
        };
        let Storage::Cuda(s) = &**storage else {
            candle_core::bail!("PGD on the device: a tensor of the loop is not on the GPU")
        };
        let Some((start, _)) = layout.contiguous_offsets() else {
            candle_core::bail!("PGD on the device: a tensor of the loop is not contiguous")
        };
        let (ptr, size) = match t.dtype() {
            DType::F32 => {
                let (p, sync) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
                syncs.push(sync);
                (p, 4)
            }
            DType::F64 => {
                let (p, sync) = s.as_cuda_slice::<f64>()?.device_ptr(&stream);
                syncs.push(sync);
                (p, 8)
            }
            DType::U32 => {
                let (p, sync) = s.as_cuda_slice::<u32>()?.device_ptr(&stream);
                syncs.push(sync);
                (p, 4)
            }
            other => candle_core::bail!("PGD on the device: unexpected {other:?} state"),
        };
        addresses.push(ptr + (start * size) as u64);
    }
    launch(dev, &addresses)
}

/// Queues `l` on the GPU of its tensors: their device addresses and the scalars, in the
/// launch's order, on its grid.
pub(crate) fn run(l: &Launch<'_>) -> Result<()> {
    let tensors: Vec<Option<&Tensor>> = l
        .args
        .iter()
        .filter_map(|v| match *v {
            Val::T(t) => Some(Some(t)),
            Val::Null => Some(None),
            _ => None,
        })
        .collect();
    with_addresses(&tensors, |dev, addresses| {
        let func = ATTACK.func(dev, l.kernel)?;
        let mut b = func.builder();
        let mut next = addresses.iter();
        for v in &l.args {
            match v {
                Val::T(_) | Val::Null => {
                    let Some(a) = next.next() else {
                        candle_core::bail!("{}: an address short", l.what)
                    };
                    b.arg(a);
                }
                Val::U32(x) => {
                    b.arg(x);
                }
                Val::I32(x) => {
                    b.arg(x);
                }
                Val::U64(x) => {
                    b.arg(x);
                }
                Val::F32(x) => {
                    b.arg(x);
                }
                Val::F64(x) => {
                    b.arg(x);
                }
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (l.grid, 1, 1),
            block_dim: (l.block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's, in its order (the emulated executor
        // runs the same launches against the kernels' source in the tests); every
        // address is a contiguous run of its tensor's dtype at least as long as the
        // kernel indexes on this grid (each launch's construction says how much).
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(l.what, e))?;
        Ok(())
    })
}
