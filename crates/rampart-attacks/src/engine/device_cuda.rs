//! The CUDA kernels of PGD's device-resident loop ([`super::device`]), one module
//! compiled once per process by NVRTC. Each does its CPU twin's
//! ([`super::device::twin`]) operations in the same order, with `__dadd_rn`,
//! `__dmul_rn`, `__fadd_rn`, … so that nothing is contracted into a multiply-add.
//! The kernels update the state's tensors in place through their device addresses,
//! on the device's one stream, after every operation queued before them.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::{DType, Device, Result, Storage, Tensor};
use rampart_models::cuda::{elementwise, launch_error, Module};

use super::device::{Judge, State, Step, ROW};

const SOURCE: &str = include_str!("device.cu");

pub(crate) static ATTACK: Module = Module::new("rampart_attack", SOURCE);

/// The PTX of the loop's kernels, compiled by NVRTC (no GPU needed): a check that the
/// source compiles.
pub fn ptx() -> Result<&'static str> {
    ATTACK.ptx()
}

const _: () = assert!(ROW == 6, "the kernels index 6 values per row");
const _: () = assert!(
    super::resident::VERDICT == 6,
    "the kernels index 6 values per verdict row"
);

/// Threads per block of `atk_judge` and `atk_step_l2`.
const ROW_THREADS: u32 = 256;

/// Runs `launch` with the device addresses of `tensors` (contiguous, on one GPU; None
/// gives 0), their storages held until the launch is queued.
pub(crate) fn with_addresses<R>(
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

pub(crate) fn count(n: usize) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("PGD on the device: {n} values are too many")))
}

/// `atk_accumulate` (see [`super::device::twin::accumulate`]).
pub(super) fn accumulate(
    s: &mut State,
    values: &Tensor,
    probs: &Tensor,
    grad: Option<&Tensor>,
    samples: usize,
    first: bool,
) -> Result<()> {
    let sums = [&s.acc_obj, &s.acc_probs, &s.acc_grad];
    accumulate_into(sums, (s.m, s.k, s.d), values, probs, grad, samples, first)
}

/// `atk_accumulate` into the first M, M·K and M·D values of the sums `[objective,
/// probabilities, gradient]` (f64, f64, f32; longer buffers keep their other values).
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate_into(
    sums: [&Tensor; 3],
    (m, k, d): (usize, usize, usize),
    values: &Tensor,
    probs: &Tensor,
    grad: Option<&Tensor>,
    samples: usize,
    first: bool,
) -> Result<()> {
    let (mk, md) = (m * k, m * d);
    let values = values.contiguous()?;
    let probs = probs.contiguous()?;
    let grad = grad.map(Tensor::contiguous).transpose()?;
    let tensors = [
        Some(sums[0]),
        Some(sums[1]),
        Some(sums[2]),
        Some(&values),
        Some(&probs),
        grad.as_ref(),
    ];
    with_addresses(&tensors, |dev, a| {
        let func = ATTACK.func(dev, "atk_accumulate")?;
        let (cfg, _) = elementwise(m.max(mk).max(md), "PGD on the device: accumulate")?;
        let (m, mk, md, n) = (count(m)?, count(mk)?, count(md)?, count(samples)?);
        let first = i32::from(first);
        let mut b = func.builder();
        for p in a {
            b.arg(p);
        }
        b.arg(&m).arg(&mk).arg(&md).arg(&n).arg(&first);
        // SAFETY: every address is a contiguous run of its tensor's dtype at least as
        // long as the kernel indexes (M, M·K, M·D; the gradient's only when present).
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("PGD on the device: accumulate", e))?;
        Ok(())
    })
}

/// `atk_judge` (see [`super::device::twin::judge`]).
pub(super) fn judge(s: &mut State, j: Judge) -> Result<()> {
    let tensors = [
        Some(&s.rows),
        Some(&s.best),
        Some(&s.adv),
        Some(&s.grad),
        Some(&s.cand),
        Some(&s.acc_grad),
        Some(&s.acc_obj),
        Some(&s.acc_probs),
        Some(&s.labels),
    ];
    let (m, k, d) = (count(s.m)?, count(s.k)?, count(s.d)?);
    with_addresses(&tensors, |dev, a| {
        let func = ATTACK.func(dev, "atk_judge")?;
        let cfg = LaunchConfig {
            grid_dim: (m, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = count(j.samples)?;
        let (first, want_grad) = (i32::from(j.first), i32::from(j.want_grad));
        let mut b = func.builder();
        for p in a {
            b.arg(p);
        }
        b.arg(&k)
            .arg(&d)
            .arg(&n)
            .arg(&j.criterion)
            .arg(&j.target)
            .arg(&j.tau)
            .arg(&first)
            .arg(&want_grad)
            .arg(&j.backtrack);
        // SAFETY: block j reads and writes row j of each tensor: ROW values of the
        // scalars, K of the probabilities, D of each (M·D) buffer, one label.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("PGD on the device: judge", e))?;
        Ok(())
    })
}

/// `atk_step_l2` (see [`super::device::twin::step_l2`]), one block per row, or
/// `atk_step_linf`.
pub(super) fn step(s: &mut State, p: Step) -> Result<()> {
    if !p.l2 {
        return step_linf(s, p);
    }
    if s.scratch.is_none() {
        s.scratch = Some(Tensor::zeros(s.m * s.d, DType::F64, s.x.device())?);
    }
    let tensors = [
        Some(&s.cand),
        Some(&s.mom),
        s.scratch.as_ref(),
        Some(&s.adv),
        Some(&s.x),
        Some(&s.grad),
        Some(&s.rows),
        s.mask.as_ref(),
    ];
    let (m, d) = (count(s.m)?, count(s.d)?);
    with_addresses(&tensors, |dev, a| {
        let func = ATTACK.func(dev, "atk_step_l2")?;
        let cfg = LaunchConfig {
            grid_dim: (m, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        for ptr in a {
            b.arg(ptr);
        }
        b.arg(&d).arg(&p.eps).arg(&p.beta).arg(&p.lo).arg(&p.hi);
        // SAFETY: block j reads and writes row j (D values) of each (M·D) buffer and
        // reads its row's scalars and the mask (D values).
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("PGD on the device: L2 step", e))?;
        Ok(())
    })
}

/// `atk_step_linf` (see [`super::device::twin::step_linf`]).
fn step_linf(s: &mut State, p: Step) -> Result<()> {
    let tensors = [
        Some(&s.cand),
        Some(&s.mom),
        Some(&s.adv),
        Some(&s.x),
        Some(&s.grad),
        Some(&s.rows),
        s.mask.as_ref(),
    ];
    let (d, md) = (count(s.d)?, s.m * s.d);
    with_addresses(&tensors, |dev, a| {
        let func = ATTACK.func(dev, "atk_step_linf")?;
        let (cfg, md) = elementwise(md, "PGD on the device: step")?;
        let mut b = func.builder();
        for ptr in a {
            b.arg(ptr);
        }
        b.arg(&d)
            .arg(&md)
            .arg(&p.eps)
            .arg(&p.beta)
            .arg(&p.lo)
            .arg(&p.hi);
        // SAFETY: element i of each (M·D) buffer, its row's scalars and its
        // coordinate's mask entry (D values) are read; cand and mom are written.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("PGD on the device: step", e))?;
        Ok(())
    })
}

/// Threads per block of the per-row kernels of the resident batch (at most the 256
/// their shared arrays hold).
const CHECK_THREADS: u32 = 256;

pub(crate) fn per_row(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (count(rows)?, 1, 1),
        block_dim: (CHECK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `atk_check` (see [`super::resident::twin::check`]).
pub(super) fn check(
    verdict: &Tensor,
    x: &Tensor,
    labels: &Tensor,
    (d, k): (usize, usize),
    bounds: crate::base::Bounds,
) -> Result<()> {
    let m = labels.elem_count();
    with_addresses(&[Some(verdict), Some(x), Some(labels)], |dev, a| {
        let func = ATTACK.func(dev, "atk_check")?;
        let (d, k) = (count(d)?, count(k)?);
        let mut b = func.builder();
        for p in a {
            b.arg(p);
        }
        b.arg(&d).arg(&k).arg(&bounds.lo).arg(&bounds.hi);
        // SAFETY: block j reads row j of x (D values) and label j, and writes the
        // six values of its verdict row.
        unsafe { b.launch(per_row(m)?) }
            .map_err(|e| launch_error("PGD on the device: input checks", e))?;
        Ok(())
    })
}

/// `atk_start_linf` (see [`super::resident::twin::start_linf`]): a new (M·D) tensor.
pub(super) fn start_linf(
    x: &Tensor,
    delta: Option<&Tensor>,
    eps: f64,
    bounds: crate::base::Bounds,
) -> Result<Tensor> {
    let md = x.elem_count();
    let cand = Tensor::zeros(md, DType::F32, x.device())?;
    with_addresses(&[Some(&cand), Some(x), delta], |dev, a| {
        let func = ATTACK.func(dev, "atk_start_linf")?;
        let (cfg, md) = elementwise(md, "PGD on the device: starts")?;
        let mut b = func.builder();
        for p in a {
            b.arg(p);
        }
        b.arg(&md).arg(&eps).arg(&bounds.lo).arg(&bounds.hi);
        // SAFETY: element i of cand, x and delta (all M·D long) is read or written.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("PGD on the device: starts", e))?;
        Ok(())
    })?;
    Ok(cand)
}

/// `atk_offer` (see [`super::resident::twin::offer`]).
pub(super) fn offer(
    verdict: &Tensor,
    record: &Tensor,
    point: &Tensor,
    rows: &Tensor,
    d: usize,
    take: bool,
) -> Result<()> {
    let m = verdict.elem_count() / super::resident::VERDICT;
    let tensors = [Some(verdict), Some(record), Some(point), Some(rows)];
    with_addresses(&tensors, |dev, a| {
        let func = ATTACK.func(dev, "atk_offer")?;
        let (d, take) = (count(d)?, i32::from(take));
        let mut b = func.builder();
        for p in a {
            b.arg(p);
        }
        b.arg(&d).arg(&take);
        // SAFETY: block j reads row j of the run's scalars (ROW values) and point (D
        // values) and writes its verdict row and record row.
        unsafe { b.launch(per_row(m)?) }
            .map_err(|e| launch_error("PGD on the device: record", e))?;
        Ok(())
    })
}

/// `atk_measure` (see [`super::resident::twin::measure`]).
pub(super) fn measure(verdict: &Tensor, record: &Tensor, x: &Tensor, d: usize) -> Result<()> {
    let m = verdict.elem_count() / super::resident::VERDICT;
    with_addresses(&[Some(verdict), Some(record), Some(x)], |dev, a| {
        let func = ATTACK.func(dev, "atk_measure")?;
        let d = count(d)?;
        let mut b = func.builder();
        for p in a {
            b.arg(p);
        }
        b.arg(&d);
        // SAFETY: block j reads row j of the record and x (D values each) and writes
        // one value of its verdict row.
        unsafe { b.launch(per_row(m)?) }
            .map_err(|e| launch_error("PGD on the device: distances", e))?;
        Ok(())
    })
}
