//! PGD's loop with its state on the model's device: the iterates, the momentum, the
//! step sizes, the objective and success at the current point and the best point so
//! far live in tensors beside the model, and a step is the model's passes plus three
//! launches (EOT accumulation, judgement, update) with nothing read back until the
//! run ends. The host loop ([`super::Run::run`]) reads the objective, probabilities and
//! gradient of every step and updates on its threads; on a GPU each of those reads
//! waits for the device and keeps the host from queueing the next pass.
//!
//! **Same result, bit for bit.** Every kernel does the host loop's f64 (and f32)
//! arithmetic in its order (`__dadd_rn`, `__dmul_rn`, … never contracted): the sign
//! step, the momentum, the box, ε-ball and box projections, the f32 rounding towards
//! the clean input, the EOT means, the first-arg-max judgement, the best-point rule
//! (a success beats a non-success, then a strictly higher objective; ties keep the
//! earlier point) and the backtracking. The run's best point is offered to the
//! [`Record`] once at the end; since the rule is a total preorder that keeps the earlier
//! point on ties, that equals offering every point in turn. NaN probabilities are
//! flagged on the device and refused when the run ends (the host loop refuses them at
//! once; the error is the same).
//!
//! **Where it runs.** L∞ and L2 configurations without early stopping (every training
//! attack, and the L∞ and L2 evaluations: PGD, FGSM, frames, distal examples, CCAT's
//! attacks); L1 and L0 need a sort per example and stay on the host. An L2 step's
//! norms are summed in coordinate order by one thread per example, as on the host.
//! On a GPU with the `cuda` feature it is taken when `RAMPART_CUDA_DEVICE_ATTACK` is
//! set (off by default until verified on a GPU). [`with_device_resident_pgd`] takes
//! it on any device, the CPU included, where the kernels' twins in this file run: the
//! loop's tests hold it to the host loop there, the CUDA kernels (`device.cu`, run on
//! the CPU by `rampart_models::kernels::emulate`) are held to the twins, and
//! `tests/cuda.rs` holds the loop on a GPU to the host loop.

use std::cell::Cell;

use candle_core::{DType, Device, ModuleT, Tensor, D};

use super::launch::{count, Launch, Val};
use super::Run;
use crate::base::{Bounds, Criterion};
use crate::error::Result;
use crate::norm::Norm;
use crate::objective::probe_with;
use crate::pgd::Pgd;
use crate::repeated::{Record, Rows};

/// Values per row of [`State::rows`].
pub(crate) const ROW: usize = 6;
/// The row's step size.
pub(crate) const LR: usize = 0;
/// Objective at the current iterate (−∞ for NaN).
pub(crate) const CUR_OBJ: usize = 1;
/// Whether the current iterate is a success (0 or 1).
pub(crate) const CUR_SUCCESS: usize = 2;
/// Objective at the best point of the run.
pub(crate) const BEST_OBJ: usize = 3;
/// Whether the best point is a success.
pub(crate) const BEST_SUCCESS: usize = 4;
/// Set when a judged point's mean probabilities held a NaN.
pub(crate) const NAN: usize = 5;

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
    static RUNS: Cell<usize> = const { Cell::new(0) };
}

/// How many PGD runs took the device-resident loop on this thread so far: a caller
/// that compares the count before and after an attack knows which loop ran (`rampart
/// bench` reports it; the tests check that the loop they mean to test ran).
pub fn device_resident_pgd_runs() -> usize {
    RUNS.with(Cell::get)
}

/// Runs `f` with the device-resident attack loops taken on this thread wherever they
/// apply (PGD's: L∞ or L2, no early stopping, and a training attack's batch with it;
/// APGD's: L∞ or L2), whatever the device and the environment: on the CPU the kernels'
/// twins run. For tests and benchmarks of the loops against the host loops; the results
/// are the same bit for bit.
pub fn with_device_resident_pgd<R>(f: impl FnOnce() -> R) -> R {
    crate::engine::with_switch(&FORCED, f)
}

/// Who runs the kernels of the device-resident loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Executor {
    /// The kernels' CPU twins (tensors read, updated on the host, written back).
    Twin,
    /// The CUDA kernels, in place on the GPU.
    #[cfg(feature = "cuda")]
    Cuda,
    /// The CUDA kernels' launches run on the CPU, in place (the tests).
    #[cfg(test)]
    Emulated,
}

/// The executor of `run`'s device-resident loop, if it takes one.
pub(super) fn resident(run: &Run<'_>) -> Option<Executor> {
    resident_on(run.cfg, &run.batch.device)
}

/// The executor of a run of `cfg` on `device`'s tensors, if it takes the loop.
pub(super) fn resident_on(cfg: &Pgd, device: &Device) -> Option<Executor> {
    if !matches!(cfg.norm, Norm::Linf | Norm::L2) || cfg.early_stop {
        return None;
    }
    executor_on(device)
}

/// Who runs a device-resident attack loop on `device`'s tensors: on a GPU with the
/// switch on, the CUDA kernels; on any device under [`with_device_resident_pgd`], the
/// CUDA kernels on a GPU and the twins elsewhere; otherwise nobody (the host loop).
pub(crate) fn executor_on(device: &Device) -> Option<Executor> {
    #[cfg(test)]
    if super::launch::emulated::on() {
        return Some(Executor::Emulated);
    }
    let on_gpu = matches!(device, Device::Cuda(_));
    if FORCED.with(Cell::get) {
        return Some(if on_gpu { gpu() } else { Executor::Twin });
    }
    #[cfg(feature = "cuda")]
    if on_gpu && switched_on() {
        return Some(Executor::Cuda);
    }
    None
}

#[cfg(feature = "cuda")]
fn gpu() -> Executor {
    Executor::Cuda
}

/// Without CUDA there is no GPU tensor to run on.
#[cfg(not(feature = "cuda"))]
fn gpu() -> Executor {
    Executor::Twin
}

#[cfg(feature = "cuda")]
fn switched_on() -> bool {
    std::env::var_os(rampart_models::kernels::DEVICE_ATTACK_ENV).is_some_and(|v| v != "0")
}

/// The loop's state, flat contiguous tensors on the batch's device: M rows (the run's
/// examples) of D values, K classes.
pub(super) struct State {
    pub m: usize,
    pub d: usize,
    pub k: usize,
    /// (M·D) f32 clean inputs.
    pub x: Tensor,
    /// (M·D) f32 current iterate.
    pub adv: Tensor,
    /// (M·D) f32 the point evaluated next: the start, then each step's candidate.
    pub cand: Tensor,
    /// (M·D) f32 mean gradient at the current iterate.
    pub grad: Tensor,
    /// (M·D) f32 best point of the run.
    pub best: Tensor,
    /// (M·D) f64 momentum.
    pub mom: Tensor,
    /// (M·ROW) f64 per-row scalars ([`LR`], [`CUR_OBJ`], …).
    pub rows: Tensor,
    /// (M) f64 EOT sum of the objective (each value divided by the draws).
    pub acc_obj: Tensor,
    /// (M·K) f64 EOT sum of the probabilities.
    pub acc_probs: Tensor,
    /// (M·D) f32 EOT sum of the gradient (each divided by the draws).
    pub acc_grad: Tensor,
    /// (M) u32 labels.
    pub labels: Tensor,
    /// (D) f64 mask of the perturbed coordinates.
    pub mask: Option<Tensor>,
    /// (M·D) f64 working rows of the L2 step on a GPU (made at its first step).
    pub scratch: Option<Tensor>,
}

impl State {
    /// The state of a run from the start `cand` (M·D f32) of clean inputs `x`
    /// (M·D f32) with `labels` (M u32) and K = `k`, every row at step size `lr`; the
    /// other buffers zero (the start's judgement makes it the current iterate and the
    /// best point).
    pub fn new(
        x: Tensor,
        cand: Tensor,
        labels: Tensor,
        mask: Option<Tensor>,
        k: usize,
        lr: f64,
    ) -> Result<State> {
        let m = labels.elem_count();
        let d = x.elem_count() / m.max(1);
        let dev = x.device().clone();
        let mut scalars = vec![0f64; m * ROW];
        for row in scalars.chunks_mut(ROW) {
            row[LR] = lr;
            row[CUR_OBJ] = f64::NEG_INFINITY;
            row[BEST_OBJ] = f64::NEG_INFINITY;
        }
        Ok(State {
            m,
            d,
            k,
            x,
            cand,
            adv: Tensor::zeros(m * d, DType::F32, &dev)?,
            grad: Tensor::zeros(m * d, DType::F32, &dev)?,
            best: Tensor::zeros(m * d, DType::F32, &dev)?,
            mom: Tensor::zeros(m * d, DType::F64, &dev)?,
            rows: Tensor::from_vec(scalars, m * ROW, &dev)?,
            acc_obj: Tensor::zeros(m, DType::F64, &dev)?,
            acc_probs: Tensor::zeros(m * k, DType::F64, &dev)?,
            acc_grad: Tensor::zeros(m * d, DType::F32, &dev)?,
            labels,
            mask,
            scratch: None,
        })
    }
}

/// How a judgement treats the point just evaluated ([`State::cand`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Judge {
    /// 0 misclassified, 1 targeted, 2 confidently misclassified, 3 confident.
    pub criterion: i32,
    pub target: u32,
    pub tau: f32,
    /// EOT draws per point.
    pub samples: usize,
    /// The run's start: the point becomes the best and the current iterate.
    pub first: bool,
    /// Whether the accumulated gradient is taken with the point.
    pub want_grad: bool,
    /// Backtracking factor, 0 for none (every candidate is accepted).
    pub backtrack: f64,
}

/// The constants of a step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    /// L2 (else L∞).
    pub l2: bool,
    pub eps: f64,
    pub beta: f64,
    pub lo: f32,
    pub hi: f32,
}

impl Executor {
    /// Adds one EOT draw (values (M) f64, probabilities (M·K) f32, gradient (M·D) f32)
    /// to the sums, starting them when `first`.
    fn accumulate(
        self,
        s: &mut State,
        values: &Tensor,
        probs: &Tensor,
        grad: Option<&Tensor>,
        samples: usize,
        first: bool,
    ) -> Result<()> {
        if self == Executor::Twin {
            let mut obj = s.acc_obj.to_vec1::<f64>()?;
            let mut sum = s.acc_probs.to_vec1::<f64>()?;
            let mut acc = s.acc_grad.to_vec1::<f32>()?;
            let g = grad.map(|g| g.to_vec1::<f32>()).transpose()?;
            twin::accumulate(
                &mut obj,
                &mut sum,
                &mut acc,
                &values.to_vec1::<f64>()?,
                &probs.to_vec1::<f32>()?,
                g.as_deref(),
                samples,
                first,
            );
            s.acc_obj = refilled(&s.acc_obj, obj)?;
            s.acc_probs = refilled(&s.acc_probs, sum)?;
            s.acc_grad = refilled(&s.acc_grad, acc)?;
            Ok(())
        } else {
            let (values, probs) = (values.contiguous()?, probs.contiguous()?);
            let grad = grad.map(Tensor::contiguous).transpose()?;
            let sums = [&s.acc_obj, &s.acc_probs, &s.acc_grad];
            let inputs = (&values, &probs, grad.as_ref());
            self.launch(&accumulate_launch(
                sums,
                (s.m, s.k, s.d),
                inputs,
                samples,
                first,
            )?)
        }
    }

    /// Queues (on a GPU) or runs (emulated) one launch.
    pub(crate) fn launch(self, l: &Launch<'_>) -> Result<()> {
        match self {
            Executor::Twin => Err(crate::Error::Input(format!(
                "{}: the kernels' twins queue no launch",
                l.what
            ))),
            #[cfg(feature = "cuda")]
            Executor::Cuda => Ok(super::device_cuda::run(l)?),
            #[cfg(test)]
            Executor::Emulated => super::launch::emulated::run(l),
        }
    }

    /// Judges the point [`State::cand`] from the sums: offers it to the run's best,
    /// accepts it as the current iterate (or shrinks the step size).
    fn judge(self, s: &mut State, j: Judge) -> Result<()> {
        if self == Executor::Twin {
            let mut rows = s.rows.to_vec1::<f64>()?;
            let mut best = s.best.to_vec1::<f32>()?;
            let mut adv = s.adv.to_vec1::<f32>()?;
            let mut grad = s.grad.to_vec1::<f32>()?;
            twin::judge(
                &mut rows,
                &mut best,
                &mut adv,
                &mut grad,
                &s.cand.to_vec1::<f32>()?,
                &s.acc_grad.to_vec1::<f32>()?,
                &s.acc_obj.to_vec1::<f64>()?,
                &s.acc_probs.to_vec1::<f64>()?,
                &s.labels.to_vec1::<u32>()?,
                (s.k, s.d),
                j,
            );
            s.rows = refilled(&s.rows, rows)?;
            s.best = refilled(&s.best, best)?;
            s.adv = refilled(&s.adv, adv)?;
            s.grad = refilled(&s.grad, grad)?;
            Ok(())
        } else {
            let (k, d) = (s.k, s.d);
            let what = "PGD on the device: judge";
            // Block j reads and writes row j of each tensor: ROW scalars, K sums of
            // the probabilities, D values of each (M·D) buffer, one label.
            let args = vec![
                Val::T(&s.rows),
                Val::T(&s.best),
                Val::T(&s.adv),
                Val::T(&s.grad),
                Val::T(&s.cand),
                Val::T(&s.acc_grad),
                Val::T(&s.acc_obj),
                Val::T(&s.acc_probs),
                Val::T(&s.labels),
                Val::U32(count(k, what)?),
                Val::U32(count(d, what)?),
                Val::U32(count(j.samples, what)?),
                Val::I32(j.criterion),
                Val::U32(j.target),
                Val::F32(j.tau),
                Val::I32(i32::from(j.first)),
                Val::I32(i32::from(j.want_grad)),
                Val::F64(j.backtrack),
            ];
            self.launch(&Launch::per_row("atk_judge", what, s.m, args)?)
        }
    }

    /// One L∞ or L2 step from the current iterate into [`State::cand`].
    fn step(self, s: &mut State, p: Step) -> Result<()> {
        if self == Executor::Twin {
            let mut cand = s.cand.to_vec1::<f32>()?;
            let mut mom = s.mom.to_vec1::<f64>()?;
            let mask = s.mask.as_ref().map(|m| m.to_vec1::<f64>()).transpose()?;
            let (adv, x) = (s.adv.to_vec1::<f32>()?, s.x.to_vec1::<f32>()?);
            let (grad, rows) = (s.grad.to_vec1::<f32>()?, s.rows.to_vec1::<f64>()?);
            let inputs = twin::StepInputs {
                adv: &adv,
                x: &x,
                grad: &grad,
                rows: &rows,
                mask: mask.as_deref(),
                d: s.d,
            };
            twin::step(&mut cand, &mut mom, &inputs, p);
            s.cand = refilled(&s.cand, cand)?;
            s.mom = refilled(&s.mom, mom)?;
            Ok(())
        } else {
            let (d, md) = (s.d, s.m * s.d);
            if p.l2 {
                let what = "PGD on the device: L2 step";
                if s.scratch.is_none() {
                    s.scratch = Some(Tensor::zeros(md, DType::F64, s.x.device())?);
                }
                // Block j reads and writes row j (D values) of each (M·D) buffer
                // and reads its row's scalars and the mask (D values).
                let args = vec![
                    Val::T(&s.cand),
                    Val::T(&s.mom),
                    s.scratch.as_ref().into(),
                    Val::T(&s.adv),
                    Val::T(&s.x),
                    Val::T(&s.grad),
                    Val::T(&s.rows),
                    s.mask.as_ref().into(),
                    Val::U32(count(d, what)?),
                    Val::F64(p.eps),
                    Val::F64(p.beta),
                    Val::F32(p.lo),
                    Val::F32(p.hi),
                ];
                return self.launch(&Launch::per_row("atk_step_l2", what, s.m, args)?);
            }
            let what = "PGD on the device: step";
            // Element i of each (M·D) buffer, its row's scalars and its coordinate's
            // mask entry; cand and mom are written.
            let args = vec![
                Val::T(&s.cand),
                Val::T(&s.mom),
                Val::T(&s.adv),
                Val::T(&s.x),
                Val::T(&s.grad),
                Val::T(&s.rows),
                s.mask.as_ref().into(),
                Val::U32(count(d, what)?),
                Val::U32(count(md, what)?),
                Val::F64(p.eps),
                Val::F64(p.beta),
                Val::F32(p.lo),
                Val::F32(p.hi),
            ];
            self.launch(&Launch::elementwise("atk_step_linf", what, md, args)?)
        }
    }
}

/// The values `v` (read from `t` by a twin and updated) as a tensor of `t`'s length on
/// its device: what the twins write back.
pub(crate) fn refilled<T: candle_core::WithDType>(t: &Tensor, v: Vec<T>) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, t.elem_count(), t.device())?)
}

/// `atk_accumulate` of one EOT draw (values (M) f64, probabilities (M·K) f32,
/// gradient (M·D) f32 or none, each contiguous) into the first M, M·K and M·D values
/// of the sums `[objective, probabilities, gradient]` (f64, f64, f32).
pub(crate) fn accumulate_launch<'a>(
    sums: [&'a Tensor; 3],
    (m, k, d): (usize, usize, usize),
    (values, probs, grad): (&'a Tensor, &'a Tensor, Option<&'a Tensor>),
    samples: usize,
    first: bool,
) -> Result<Launch<'a>> {
    let what = "PGD on the device: accumulate";
    let (mk, md) = (m * k, m * d);
    let args = vec![
        Val::T(sums[0]),
        Val::T(sums[1]),
        Val::T(sums[2]),
        Val::T(values),
        Val::T(probs),
        grad.into(),
        Val::U32(count(m, what)?),
        Val::U32(count(mk, what)?),
        Val::U32(count(md, what)?),
        Val::U32(count(samples, what)?),
        Val::I32(i32::from(first)),
    ];
    Launch::elementwise("atk_accumulate", what, m.max(mk).max(md), args)
}

/// The run of [`Run::run`] with its state on the device (see the module documentation).
pub(super) fn run(exec: Executor, r: &Run<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
    let (cfg, batch) = (r.cfg, r.batch);
    let (m, d, k) = (rows.len(), batch.d, batch.classes);
    let dev = &batch.device;
    let active = rows.examples();
    let eps = rows.eps();
    let start = r.starts(rows);
    let mut x = Vec::with_capacity(m * d);
    for &i in active {
        x.extend_from_slice(batch.row(i));
    }
    let labels: Vec<u32> = active.iter().map(|&i| batch.ys[i]).collect();
    let mut s = State::new(
        super::upload(x, m * d, dev)?,
        super::upload(start, m * d, dev)?,
        Tensor::from_vec(labels, m, dev)?,
        r.mask.map(|v| Tensor::from_slice(v, d, dev)).transpose()?,
        k,
        cfg.step_size.at(eps),
    )?;
    let pass = Pass {
        cfg,
        model: r.problem.model,
        dims: &batch.dims,
        dtype: batch.dtype,
    };
    let ends_on_candidate = drive(exec, &pass, &mut s, eps, batch.bounds)?;
    for &i in active {
        for _ in 0..cfg.steps {
            record.count_step(i);
        }
    }
    // The run's one read of its state.
    let scalars = s.rows.to_vec1::<f64>()?;
    if scalars.chunks(ROW).any(|row| row[NAN] != 0.0) {
        return Err(crate::batch::nan_logits());
    }
    if cfg.last_iterate {
        let last = if ends_on_candidate { &s.cand } else { &s.adv };
        let points = last.to_vec1::<f32>()?;
        for (j, &i) in active.iter().enumerate() {
            record.set(i, &points[j * d..(j + 1) * d]);
        }
    } else {
        let best = s.best.to_vec1::<f32>()?;
        for ((j, &i), row) in active.iter().enumerate().zip(scalars.chunks(ROW)) {
            record.offer(
                i,
                &best[j * d..(j + 1) * d],
                row[BEST_SUCCESS] != 0.0,
                row[BEST_OBJ],
            );
        }
    }
    Ok(())
}

/// What a run's passes need: the configuration, the model, and the inputs' shape
/// (B, ...) (its first entry is replaced by the run's rows) and dtype.
pub(super) struct Pass<'a> {
    pub cfg: &'a Pgd,
    pub model: &'a dyn ModuleT,
    pub dims: &'a [usize],
    pub dtype: DType,
}

/// One run from the start in [`State::cand`]: the start's evaluation and judgement,
/// then `steps` steps, nothing read back. Returns whether the run ended on its last
/// candidate unevaluated (a last iterate without backtracking, as the host loop).
pub(super) fn drive(
    exec: Executor,
    pass: &Pass<'_>,
    s: &mut State,
    eps: f64,
    bounds: Bounds,
) -> Result<bool> {
    #[cfg(test)]
    if let Some(fake) = super::graph::tests::fake() {
        return drive_with(exec, pass, s, eps, bounds, Some(fake));
    }
    let rec = recorder(exec, s.x.device());
    drive_with(exec, pass, s, eps, bounds, rec)
}

/// The recorder of a run's steps as CUDA graphs: on a GPU with graphs asked for.
#[cfg(feature = "cuda")]
fn recorder(exec: Executor, device: &Device) -> Option<super::graph::cuda::Stream> {
    match (exec, device) {
        // Not inside another capture (a training step's): captures do not nest.
        (Executor::Cuda, Device::Cuda(d)) if super::graph::wanted() && !capturing(d) => {
            Some(super::graph::cuda::Stream(d.clone()))
        }
        _ => None,
    }
}

/// Whether `d`'s stream is being captured into a CUDA graph.
#[cfg(feature = "cuda")]
pub(crate) fn capturing(d: &candle_core::cuda_backend::CudaDevice) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    !matches!(
        d.cuda_stream().capture_status(),
        Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    )
}

/// Without CUDA, no graphs.
#[cfg(not(feature = "cuda"))]
fn recorder(_: Executor, _: &Device) -> Option<super::graph::Never> {
    None
}

/// [`drive`], its middle steps through `rec` (see [`super::graph`]).
fn drive_with<R: super::graph::Recorder>(
    exec: Executor,
    pass: &Pass<'_>,
    s: &mut State,
    eps: f64,
    bounds: Bounds,
    rec: Option<R>,
) -> Result<bool> {
    RUNS.with(|c| c.set(c.get() + 1));
    let cfg = pass.cfg;
    let (criterion, target, tau) = match cfg.criterion {
        Criterion::Misclassified => (0, 0, 0.0),
        Criterion::Targeted(t) => (1, t, 0.0),
        Criterion::ConfidentlyMisclassified(tau) => (2, 0, tau),
        Criterion::Confident(tau) => (3, 0, tau),
    };
    let judge = Judge {
        criterion,
        target,
        tau,
        samples: cfg.eot.grad_samples,
        first: true,
        want_grad: true,
        backtrack: cfg.backtrack.unwrap_or(0.0),
    };
    let mut steps = super::graph::Steps::new(rec, cfg.steps);
    steps.start(&mut || {
        evaluate(exec, pass, s, true)?;
        exec.judge(s, judge)
    })?;
    let step = Step {
        l2: matches!(cfg.norm, Norm::L2),
        eps,
        beta: cfg.momentum,
        lo: bounds.lo,
        hi: bounds.hi,
    };
    // Every step but the last: the same work on the same buffers (a graph's replay).
    let middle = Judge {
        first: false,
        ..judge
    };
    for t in 0..cfg.steps.saturating_sub(1) {
        steps.step(t, &mut || {
            exec.step(s, step)?;
            evaluate(exec, pass, s, true)?;
            exec.judge(s, middle)
        })?;
    }
    if cfg.steps == 0 {
        return Ok(false);
    }
    exec.step(s, step)?;
    if cfg.last_iterate && cfg.backtrack.is_none() {
        // As the host loop: the last iterate is the result, not evaluated.
        return Ok(true);
    }
    evaluate(exec, pass, s, false)?;
    exec.judge(
        s,
        Judge {
            first: false,
            want_grad: false,
            ..judge
        },
    )?;
    Ok(false)
}

/// The model's passes at [`State::cand`], added into the EOT sums: as the host loop's
/// evaluation, with nothing read back.
fn evaluate(exec: Executor, pass: &Pass<'_>, s: &mut State, want_grad: bool) -> Result<()> {
    let (m, k) = (s.m, s.k);
    let mut dims = pass.dims.to_vec();
    dims[0] = m;
    // A view of the candidate: on a GPU it is updated in place only after this pass
    // (one stream), and a gradient pass copies it into a variable.
    let input = s.cand.reshape(dims.as_slice())?.to_dtype(pass.dtype)?;
    let samples = pass.cfg.eot.grad_samples;
    let (objective, target) = (pass.cfg.objective, pass.cfg.criterion.target());
    let labels = s.labels.clone();
    for sample in 0..samples {
        let p = probe_with(pass.model, &input, want_grad, |logits| {
            super::objective_values(objective, target, logits, &labels, (m, k))
        })?;
        let probs = candle_nn::ops::softmax(&p.logits, D::Minus1)?.flatten_all()?;
        let values = p.values.to_dtype(DType::F64)?;
        let grad = p
            .grad
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .transpose()?;
        exec.accumulate(s, &values, &probs, grad.as_ref(), samples, sample == 0)?;
    }
    Ok(())
}

/// The kernels' CPU twins: per element (or per row) what the CUDA kernels of
/// `device_cuda.rs` do, in the same f64 and f32 operations.
pub(crate) mod twin {
    use super::{Judge, Step, BEST_OBJ, BEST_SUCCESS, CUR_OBJ, CUR_SUCCESS, LR, NAN, ROW};
    use crate::engine::next_toward;

    /// `atk_accumulate`: obj += v / n, probs += p, grad += g / n (f32), each sum
    /// starting at 0 when `first`.
    #[allow(clippy::too_many_arguments)]
    pub fn accumulate(
        obj: &mut [f64],
        probs: &mut [f64],
        grad: &mut [f32],
        values: &[f64],
        p: &[f32],
        g: Option<&[f32]>,
        samples: usize,
        first: bool,
    ) {
        let (nd, nf) = (samples as f64, samples as f32);
        for (o, v) in obj.iter_mut().zip(values) {
            *o = if first { 0.0 } else { *o } + v / nd;
        }
        for (s, v) in probs.iter_mut().zip(p) {
            *s = if first { 0.0 } else { *s } + *v as f64;
        }
        if let Some(g) = g {
            for (a, v) in grad.iter_mut().zip(g) {
                *a = if first { 0.0 } else { *a } + v / nf;
            }
        }
    }

    /// `atk_judge`, row by row: the mean probabilities' first arg-max and maximum
    /// judge the point; it becomes the run's best if better (or first), the current
    /// iterate if accepted (or first), else the row's step size is divided by the
    /// backtracking factor.
    #[allow(clippy::too_many_arguments)]
    pub fn judge(
        rows: &mut [f64],
        best: &mut [f32],
        adv: &mut [f32],
        grad: &mut [f32],
        cand: &[f32],
        acc_grad: &[f32],
        obj: &[f64],
        probs: &[f64],
        labels: &[u32],
        (k, d): (usize, usize),
        j: Judge,
    ) {
        let n = j.samples as f64;
        for (row, r) in rows.chunks_mut(ROW).enumerate() {
            let mut pred = 0u32;
            let mut conf = f32::NEG_INFINITY;
            let mut nan = false;
            for (c, &sum) in probs[row * k..(row + 1) * k].iter().enumerate() {
                let p = (sum / n) as f32;
                nan |= p.is_nan();
                if p > conf {
                    pred = c as u32;
                    conf = p;
                }
            }
            let label = labels[row];
            let success = match j.criterion {
                0 => pred != label,
                1 => pred == j.target,
                2 => pred != label && conf >= j.tau,
                _ => conf >= j.tau,
            };
            let o = if obj[row].is_nan() {
                f64::NEG_INFINITY
            } else {
                obj[row]
            };
            let best_success = r[BEST_SUCCESS] != 0.0;
            let better = j.first
                || (success && !best_success)
                || (success == best_success && o > r[BEST_OBJ]);
            if better {
                r[BEST_OBJ] = o;
                r[BEST_SUCCESS] = f64::from(u8::from(success));
            }
            let accept = j.first || j.backtrack == 0.0 || o >= r[CUR_OBJ];
            if accept {
                r[CUR_OBJ] = o;
                r[CUR_SUCCESS] = f64::from(u8::from(success));
            } else {
                r[LR] /= j.backtrack;
            }
            if nan {
                r[NAN] = 1.0;
            }
            let span = row * d..(row + 1) * d;
            if better {
                best[span.clone()].copy_from_slice(&cand[span.clone()]);
            }
            if accept {
                adv[span.clone()].copy_from_slice(&cand[span.clone()]);
                if j.want_grad {
                    grad[span.clone()].copy_from_slice(&acc_grad[span]);
                }
            }
        }
    }

    /// What a step reads: the current iterates, clean inputs and gradients (M·D), the
    /// rows' scalars (M·ROW), the mask (D) and D.
    #[derive(Clone, Copy)]
    pub struct StepInputs<'a> {
        pub adv: &'a [f32],
        pub x: &'a [f32],
        pub grad: &'a [f32],
        pub rows: &'a [f64],
        pub mask: Option<&'a [f64]>,
        pub d: usize,
    }

    /// The twin of the step kernel of `p`'s norm: new candidates into `cand`, the
    /// momentum updated in `mom`.
    pub fn step(cand: &mut [f32], mom: &mut [f64], inputs: &StepInputs<'_>, p: Step) {
        if p.l2 {
            step_l2(cand, mom, inputs, p)
        } else {
            step_linf(cand, mom, inputs, p)
        }
    }

    /// `atk_step_linf`, element by element: the gradient's sign (zero where not
    /// finite, masked, or pushing a coordinate on a bound outwards), the momentum, the
    /// step, the mask, the box, the ε-ball, the box, and x + δ rounded to f32 towards x.
    fn step_linf(cand: &mut [f32], mom: &mut [f64], inputs: &StepInputs<'_>, p: Step) {
        let StepInputs {
            adv,
            x,
            grad,
            rows,
            mask,
            d,
        } = *inputs;
        for i in 0..cand.len() {
            let (row, c) = (i / d, i % d);
            let v = raw_direction(grad[i], adv[i], mask.map(|m| m[c]), &p);
            let v = if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            };
            let delta = momentum_step(
                &mut mom[i],
                v,
                adv[i],
                x[i],
                rows[row * ROW + LR],
                mask.map(|m| m[c]),
                &p,
            );
            let delta = clamp(delta, -p.eps, p.eps);
            cand[i] = stored(x[i], delta, &p);
        }
    }

    /// `atk_step_l2`, row by row: as [`step_linf`] with the L2 direction (the gradient
    /// divided by its norm, when not zero) and the L2 projection (scaled onto the
    /// sphere, then shrunk by ulps until its norm, summed in coordinate order, is at
    /// most ε), each norm a sum in coordinate order.
    fn step_l2(cand: &mut [f32], mom: &mut [f64], inputs: &StepInputs<'_>, p: Step) {
        let StepInputs {
            adv,
            x,
            grad,
            rows,
            mask,
            d,
        } = *inputs;
        let mut v = vec![0f64; d];
        for row in 0..cand.len() / d {
            let span = row * d..(row + 1) * d;
            for (c, i) in span.clone().enumerate() {
                v[c] = raw_direction(grad[i], adv[i], mask.map(|m| m[c]), &p);
            }
            let norm = norm2(&v);
            for (c, i) in span.clone().enumerate() {
                let g = if norm > 0.0 { v[c] / norm } else { v[c] };
                let lr = rows[row * ROW + LR];
                v[c] = momentum_step(&mut mom[i], g, adv[i], x[i], lr, mask.map(|m| m[c]), &p);
            }
            let norm = norm2(&v);
            if norm > p.eps {
                let scale = p.eps / norm;
                v.iter_mut().for_each(|a| *a *= scale);
                let mut factor = 1.0 - f64::EPSILON;
                while norm2(&v) > p.eps {
                    v.iter_mut().for_each(|a| *a *= factor);
                    factor *= 1.0 - f64::EPSILON;
                }
            }
            for (c, i) in span.enumerate() {
                cand[i] = stored(x[i], v[c], &p);
            }
        }
    }

    /// One coordinate's raw ascent direction: the gradient `g` in f64, zero where not
    /// finite, times the mask, zero where it pushes a coordinate `a` on a bound out.
    fn raw_direction(g: f32, a: f32, mask: Option<f64>, p: &Step) -> f64 {
        let mut v = g as f64;
        if !v.is_finite() {
            v = 0.0;
        }
        if let Some(m) = mask {
            v *= m;
        }
        if (a >= p.hi && v > 0.0) || (a <= p.lo && v < 0.0) {
            v = 0.0;
        }
        v
    }

    /// One coordinate's momentum update from the normalised direction `g` (written to
    /// `m`) and its step from `a` by `lr`: δ = (a − x) + lr·m, masked, in the box.
    fn momentum_step(
        m: &mut f64,
        g: f64,
        a: f32,
        x: f32,
        lr: f64,
        mask: Option<f64>,
        p: &Step,
    ) -> f64 {
        *m = p.beta * *m + (1.0 - p.beta) * g;
        let xc = x as f64;
        let mut delta = (a as f64 - xc) + lr * *m;
        if let Some(mask) = mask {
            delta *= mask;
        }
        clamp(delta, p.lo as f64 - xc, p.hi as f64 - xc)
    }

    /// x + δ for δ inside the box after the norm's projection (clamped to it once
    /// more), rounded to f32 and, where that went past |δ|, the next f32 towards x.
    fn stored(x: f32, delta: f64, p: &Step) -> f32 {
        let xc = x as f64;
        let delta = clamp(delta, p.lo as f64 - xc, p.hi as f64 - xc);
        let s = clamp_f32((xc + delta) as f32, p.lo, p.hi);
        if (s as f64 - xc).abs() > delta.abs() {
            next_toward(s, x)
        } else {
            s
        }
    }

    /// ‖v‖₂, the squares summed in coordinate order.
    fn norm2(v: &[f64]) -> f64 {
        let mut sum = 0.0;
        for a in v {
            sum += a * a;
        }
        sum.sqrt()
    }

    fn clamp(v: f64, lo: f64, hi: f64) -> f64 {
        if v < lo {
            lo
        } else if v > hi {
            hi
        } else {
            v
        }
    }

    fn clamp_f32(v: f32, lo: f32, hi: f32) -> f32 {
        if v < lo {
            lo
        } else if v > hi {
            hi
        } else {
            v
        }
    }
}
