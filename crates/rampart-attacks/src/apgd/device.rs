//! APGD's loop with its state on the model's device (L∞ and L2): the iterates, the
//! previous iterates, the gradients, the best points and gradients, the per-row losses,
//! checkpoint state and step sizes, and the record of the run's examples live in
//! tensors beside the model. The host loop reads the objective, the probabilities and
//! the input gradient of every step (1.5 MB per step for 128 CIFAR-10 images), makes
//! the proposals on its threads and uploads them: on a GPU the device waits for all of
//! that in every step of APGD-CE and APGD-T, AutoAttack's main cost.
//!
//! Here a step reads only each example's record flags (three values per example, for
//! the examples still attacked: the host keeps choosing which rows the model sees, as
//! the host loop does, so that the model's passes are the same batches) and launches:
//! the proposal (`apgd_propose_linf`, element by element, or `apgd_propose_l2`, one
//! block per row with its norms summed in coordinate order by one thread, as on the
//! host), the model's passes on the gathered rows with their EOT sums
//! (`atk_accumulate`), the update of the state (`apgd_update`), the record's offers
//! (`apgd_offer`, one block per example taking its rows in the host's order) and, at
//! checkpoints, the step-size rule (`apgd_check`). The random starts' perturbations are
//! drawn on the host from the same streams (they need no input) and finished on the
//! device (`atk_start_linf`). The run's record is read back once, at its end.
//!
//! **The host loop's result, bit for bit**: the kernels do its f64 and f32 operations
//! in its order (`__dadd_rn`, …); the tests hold the loop with the kernels' CPU twins
//! to the host loop (`device_tests.rs`) and the kernels, run on the CPU, to the twins.
//! NaN probabilities are refused with the host loop's error (a step later). L1 (a sort
//! per example and step) and the 3ε → 2ε → ε schedule stay on the host. Taken where
//! PGD's device loop is ([`crate::engine::device`]): on a GPU with
//! `RAMPART_CUDA_DEVICE_ATTACK`, and under [`crate::with_device_resident_pgd`].

use std::cell::Cell;

use candle_core::{DType, Tensor, D};

use super::{checkpoints, start_delta, Run};
use crate::batch::nan_logits;
use crate::engine::device::{accumulate_launch, refilled, Executor};
use crate::engine::launch::{count, Launch, Val};
use crate::error::{Error, Result};
use crate::norm::Norm;
use crate::objective::probe_with;
use crate::repeated::Record;

/// Values per row of the state's scalars.
pub(crate) const AROW: usize = 8;
pub(crate) const LOSS: usize = 0;
pub(crate) const BEST_LOSS: usize = 1;
pub(crate) const LAST_CHECK: usize = 2;
pub(crate) const REDUCED: usize = 3;
pub(crate) const INCREASES: usize = 4;
pub(crate) const STEP: usize = 5;
pub(crate) const SUCCESS: usize = 6;
pub(crate) const NAN: usize = 7;
/// Values per example of the record's scalars: success, objective, a NaN seen.
pub(crate) const EROW: usize = 3;
/// `pos` of a row no longer attacked.
pub(crate) const NONE: u32 = u32::MAX;

thread_local! {
    static RUNS: Cell<usize> = const { Cell::new(0) };
}

/// How many APGD runs took the device-resident loop on this thread so far: a caller
/// that compares the count before and after an attack knows which loop ran (`rampart
/// bench` reports it; the tests check that the loop they mean to test ran).
pub fn device_resident_apgd_runs() -> usize {
    RUNS.with(Cell::get)
}

/// The executor of a run of `run`'s configuration, if it takes the device loop.
pub(super) fn resident(run: &Run<'_>) -> Option<Executor> {
    let cfg = run.cfg;
    if !matches!(cfg.norm, Norm::Linf | Norm::L2) || cfg.large_eps_warmup {
        return None;
    }
    crate::engine::device::executor_on(&run.batch.device)
}

/// The loop's tensors, on the batch's device: M rows of D values, E examples.
pub(crate) struct State {
    pub m: usize,
    pub d: usize,
    pub k: usize,
    /// (M·D) f32 clean inputs of the rows.
    pub x: Tensor,
    /// (M·D) f32 current and previous iterates.
    pub adv: Tensor,
    pub old: Tensor,
    /// (M·D) f32 gradient at the current iterate.
    pub grad: Tensor,
    /// (M·D) f32 highest-loss point and its gradient.
    pub best_point: Tensor,
    pub best_grad: Tensor,
    /// (M·AROW) f64 per-row scalars.
    pub rows: Tensor,
    /// (M) u32 labels and, for a targeted objective, targets.
    pub labels: Tensor,
    pub targets: Option<Tensor>,
    /// (M) u32 each row's place among this step's evaluated rows, or [`NONE`].
    pub pos: Tensor,
    /// EOT sums of the evaluated rows: (M) f64, (M·K) f64, (M·D) f32.
    pub acc_obj: Tensor,
    pub acc_probs: Tensor,
    pub acc_grad: Tensor,
    /// (E·D) f32 record points and (E·EROW) f64 record scalars of the run's examples.
    pub rec_points: Tensor,
    pub rec: Tensor,
    /// (E + 1) u32 offsets into `row_list` (M u32): each example's rows in order.
    pub row_start: Tensor,
    pub row_list: Tensor,
    /// (M·D) f64 working rows of the L2 proposal.
    pub scratch: Option<Tensor>,
}

/// The run of [`Run::run`] (one phase at `eps`) with its state on the device.
pub(super) fn run(
    exec: Executor,
    r: &Run<'_>,
    eps: f64,
    seed: u64,
    record: &mut Record,
) -> Result<()> {
    RUNS.with(|c| c.set(c.get() + 1));
    let (cfg, batch) = (r.cfg, r.batch);
    let (m, d, k) = (r.idx.len(), batch.d, batch.classes);
    let dev = &batch.device;
    // The starts' perturbations, drawn as the host loop draws them (everything but the
    // box, which needs the input).
    let mut delta = vec![0f64; m * d];
    for (j, &i) in r.idx.iter().enumerate() {
        let mut rng = batch.rng(seed, r.runs[j], i);
        start_delta(cfg.norm, eps, &mut rng, &mut delta[j * d..(j + 1) * d]);
    }
    let mut x = Vec::with_capacity(m * d);
    for &i in r.idx {
        x.extend_from_slice(batch.row(i));
    }
    let x = crate::engine::upload(x, m * d, dev)?;
    let delta = crate::engine::upload(delta, m * d, dev)?;
    let start = exec.start_linf(&x, Some(&delta), f64::INFINITY, batch.bounds)?;
    // The run's examples in order of first appearance, and each one's rows in order.
    let mut examples: Vec<usize> = Vec::new();
    let mut rows_of: Vec<Vec<u32>> = Vec::new();
    let mut slot = std::collections::HashMap::new();
    let mut example_of_row = Vec::with_capacity(m);
    for (j, &i) in r.idx.iter().enumerate() {
        let e = *slot.entry(i).or_insert_with(|| {
            examples.push(i);
            rows_of.push(Vec::new());
            examples.len() - 1
        });
        rows_of[e].push(j as u32);
        example_of_row.push(e);
    }
    let mut row_start = vec![0u32];
    let mut row_list = Vec::with_capacity(m);
    for rows in &rows_of {
        row_list.extend_from_slice(rows);
        row_start.push(row_list.len() as u32);
    }
    let n_examples = examples.len();
    let mut rec_points = Vec::with_capacity(n_examples * d);
    let mut rec = Vec::with_capacity(n_examples * EROW);
    for &i in &examples {
        rec_points.extend_from_slice(&record.best.adv[i * d..(i + 1) * d]);
        rec.extend([
            f64::from(u8::from(record.best.success[i])),
            record.best.objective[i],
            0.0,
        ]);
    }
    let labels: Vec<u32> = r.idx.iter().map(|&i| batch.ys[i]).collect();
    let mut s = State {
        m,
        d,
        k,
        adv: start.copy()?,
        old: start,
        x,
        grad: Tensor::zeros(m * d, DType::F32, dev)?,
        best_point: Tensor::zeros(m * d, DType::F32, dev)?,
        best_grad: Tensor::zeros(m * d, DType::F32, dev)?,
        rows: Tensor::zeros(m * AROW, DType::F64, dev)?,
        labels: Tensor::from_vec(labels, m, dev)?,
        targets: r
            .targets
            .map(|t| Tensor::from_slice(t, m, dev))
            .transpose()?,
        pos: Tensor::zeros(m, DType::U32, dev)?,
        acc_obj: Tensor::zeros(m, DType::F64, dev)?,
        acc_probs: Tensor::zeros(m * k, DType::F64, dev)?,
        acc_grad: Tensor::zeros(m * d, DType::F32, dev)?,
        rec_points: Tensor::from_vec(rec_points, n_examples * d, dev)?,
        rec: Tensor::from_vec(rec, n_examples * EROW, dev)?,
        row_start: Tensor::from_vec(row_start, n_examples + 1, dev)?,
        row_list: Tensor::from_vec(row_list, m, dev)?,
        scratch: None,
    };
    // The phase (the last and only one): the start, evaluated on the rows whose
    // example the record does not yet hold as fooled.
    let mut live: Vec<usize> = (0..m).filter(|&j| !record.is_fooled(r.idx[j])).collect();
    let step0 = 2.0 * eps;
    let update = Update {
        first: true,
        want_grad: true,
        samples: cfg.eot.grad_samples,
        step0,
    };
    set_pos(&mut s, &live)?;
    evaluate(exec, r, &mut s, &live, true)?;
    exec.apgd_update(&mut s, update)?;
    exec.apgd_offer(&mut s)?;
    let marks = checkpoints(cfg.steps);
    let (mut next_mark, mut last_mark) = (0, 0);
    for t in 0..cfg.steps {
        // The step's one read: which examples the record holds as fooled.
        let flags = s.rec.to_vec1::<f64>()?;
        if flags.chunks(EROW).any(|f| f[2] != 0.0) {
            return Err(nan_logits());
        }
        live.retain(|&j| flags[example_of_row[j] * EROW] == 0.0);
        if live.is_empty() {
            break;
        }
        let a = if t == 0 { 1.0 } else { cfg.alpha };
        set_pos(&mut s, &live)?;
        exec.apgd_propose(&mut s, cfg.norm, eps, a, batch.bounds)?;
        let want_grad = t + 1 < cfg.steps;
        evaluate(exec, r, &mut s, &live, want_grad)?;
        exec.apgd_update(
            &mut s,
            Update {
                first: false,
                want_grad,
                ..update
            },
        )?;
        exec.apgd_offer(&mut s)?;
        for &j in &live {
            record.count_step(r.idx[j]);
        }
        if marks.get(next_mark) == Some(&(t + 1)) {
            exec.apgd_check(&mut s, cfg.rho, t + 1 - last_mark)?;
            last_mark = t + 1;
            next_mark += 1;
        }
    }
    // The run's record, read back once.
    let flags = s.rec.to_vec1::<f64>()?;
    if flags.chunks(EROW).any(|f| f[2] != 0.0) {
        return Err(nan_logits());
    }
    let points = s.rec_points.to_vec1::<f32>()?;
    for (e, &i) in examples.iter().enumerate() {
        let f = &flags[e * EROW..(e + 1) * EROW];
        record
            .best
            .set(i, &points[e * d..(e + 1) * d], f[0] != 0.0, f[1]);
    }
    Ok(())
}

/// Uploads each row's place among the rows `live` (increasing), [`NONE`] elsewhere.
fn set_pos(s: &mut State, live: &[usize]) -> Result<()> {
    let mut pos = vec![NONE; s.m];
    for (r, &j) in live.iter().enumerate() {
        pos[j] = r as u32;
    }
    s.pos = refilled(&s.pos, pos)?;
    Ok(())
}

/// The model's passes at the current iterates of the rows `live` (gathered in order,
/// the places [`State::pos`] gives them), their EOT sums at places 0..L: as the host
/// loop's `batch.probe`.
fn evaluate(
    exec: Executor,
    r: &Run<'_>,
    s: &mut State,
    live: &[usize],
    want_grad: bool,
) -> Result<()> {
    let batch = r.batch;
    let (l, k, d) = (live.len(), s.k, s.d);
    let index: Vec<u32> = live.iter().map(|&j| j as u32).collect();
    let index = Tensor::from_vec(index, l, s.x.device())?;
    let mut dims = batch.dims.clone();
    dims[0] = l;
    let input = s
        .adv
        .reshape((s.m, d))?
        .index_select(&index, 0)?
        .reshape(dims.as_slice())?
        .to_dtype(batch.dtype)?;
    let ys = s.labels.index_select(&index, 0)?;
    let targets = s
        .targets
        .as_ref()
        .map(|t| t.index_select(&index, 0))
        .transpose()?;
    let (objective, samples) = (r.cfg.objective, r.cfg.eot.grad_samples);
    for sample in 0..samples {
        let p = probe_with(r.model, &input, want_grad, |logits| {
            if logits.dims() != [l, k] {
                return Err(Error::Input(format!(
                    "the model returned logits of shape {:?} for a batch of {l} \
                     ({k} classes expected)",
                    logits.dims()
                )));
            }
            match &targets {
                Some(t) => objective.values_per_example(logits, &ys, t),
                None => objective.values(logits, &ys, None),
            }
        })?;
        let probs = candle_nn::ops::softmax(&p.logits, D::Minus1)?.flatten_all()?;
        let values = p.values.to_dtype(DType::F64)?;
        let grad = p
            .grad
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .transpose()?;
        exec.apgd_sums(s, l, (&values, &probs, grad.as_ref()), samples, sample == 0)?;
    }
    Ok(())
}

/// How [`Executor::update`] takes an evaluation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Update {
    /// The start: every row set up.
    pub first: bool,
    pub want_grad: bool,
    /// EOT draws per point.
    pub samples: usize,
    /// The first step size (2ε).
    pub step0: f64,
}

impl Executor {
    /// `atk_accumulate` of one EOT draw of the L evaluated rows into the sums.
    fn apgd_sums(
        self,
        s: &mut State,
        l: usize,
        (values, probs, grad): (&Tensor, &Tensor, Option<&Tensor>),
        samples: usize,
        first: bool,
    ) -> Result<()> {
        if self == Executor::Twin {
            let (k, d) = (s.k, s.d);
            let mut obj = s.acc_obj.to_vec1::<f64>()?;
            let mut sum = s.acc_probs.to_vec1::<f64>()?;
            let mut acc = s.acc_grad.to_vec1::<f32>()?;
            let g = grad.map(|g| g.to_vec1::<f32>()).transpose()?;
            crate::engine::device::twin::accumulate(
                &mut obj[..l],
                &mut sum[..l * k],
                &mut acc[..l * d],
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
                (l, s.k, s.d),
                inputs,
                samples,
                first,
            )?)
        }
    }

    /// `apgd_propose_linf` or `apgd_propose_l2`: the attacked rows step.
    fn apgd_propose(
        self,
        s: &mut State,
        norm: Norm,
        eps: f64,
        a: f64,
        bounds: crate::Bounds,
    ) -> Result<()> {
        if self == Executor::Twin {
            let mut adv = s.adv.to_vec1::<f32>()?;
            let mut old = s.old.to_vec1::<f32>()?;
            let inputs = twin::ProposeInputs {
                x: &s.x.to_vec1::<f32>()?,
                grad: &s.grad.to_vec1::<f32>()?,
                rows: &s.rows.to_vec1::<f64>()?,
                pos: &s.pos.to_vec1::<u32>()?,
                d: s.d,
                eps,
                a,
                bounds,
            };
            twin::propose(&mut adv, &mut old, &inputs, norm == Norm::L2);
            s.adv = refilled(&s.adv, adv)?;
            s.old = refilled(&s.old, old)?;
            Ok(())
        } else {
            let (d, md) = (s.d, s.m * s.d);
            if norm == Norm::L2 {
                let what = "APGD on the device: L2 proposal";
                if s.scratch.is_none() {
                    s.scratch = Some(Tensor::zeros(md, DType::F64, s.x.device())?);
                }
                // Block j reads and writes row j (D values) of each (M·D) buffer,
                // its row's scalars and place.
                let args = vec![
                    Val::T(&s.adv),
                    Val::T(&s.old),
                    s.scratch.as_ref().into(),
                    Val::T(&s.x),
                    Val::T(&s.grad),
                    Val::T(&s.rows),
                    Val::T(&s.pos),
                    Val::U32(count(d, what)?),
                    Val::F64(eps),
                    Val::F64(a),
                    Val::F32(bounds.lo),
                    Val::F32(bounds.hi),
                ];
                return self.launch(&Launch::per_row("apgd_propose_l2", what, s.m, args)?);
            }
            let what = "APGD on the device: proposal";
            // Element i of each (M·D) buffer, its row's scalars and place.
            let args = vec![
                Val::T(&s.adv),
                Val::T(&s.old),
                Val::T(&s.x),
                Val::T(&s.grad),
                Val::T(&s.rows),
                Val::T(&s.pos),
                Val::U32(count(d, what)?),
                Val::U32(count(md, what)?),
                Val::F64(eps),
                Val::F64(a),
                Val::F32(bounds.lo),
                Val::F32(bounds.hi),
            ];
            self.launch(&Launch::elementwise("apgd_propose_linf", what, md, args)?)
        }
    }

    /// `apgd_update`: the evaluation taken into the state.
    fn apgd_update(self, s: &mut State, u: Update) -> Result<()> {
        if self == Executor::Twin {
            let mut rows = s.rows.to_vec1::<f64>()?;
            let mut grad = s.grad.to_vec1::<f32>()?;
            let mut best_point = s.best_point.to_vec1::<f32>()?;
            let mut best_grad = s.best_grad.to_vec1::<f32>()?;
            let inputs = twin::UpdateInputs {
                adv: &s.adv.to_vec1::<f32>()?,
                obj: &s.acc_obj.to_vec1::<f64>()?,
                probs: &s.acc_probs.to_vec1::<f64>()?,
                acc_grad: &s.acc_grad.to_vec1::<f32>()?,
                labels: &s.labels.to_vec1::<u32>()?,
                pos: &s.pos.to_vec1::<u32>()?,
                k: s.k,
                d: s.d,
            };
            twin::update(
                &mut rows,
                &mut grad,
                &mut best_point,
                &mut best_grad,
                &inputs,
                u,
            );
            s.rows = refilled(&s.rows, rows)?;
            s.grad = refilled(&s.grad, grad)?;
            s.best_point = refilled(&s.best_point, best_point)?;
            s.best_grad = refilled(&s.best_grad, best_grad)?;
            Ok(())
        } else {
            let what = "APGD on the device: update";
            // Block j writes row j of the scalars and of each (M·D) buffer, and
            // reads the sums at its place r < M (K and D values).
            let args = vec![
                Val::T(&s.rows),
                Val::T(&s.grad),
                Val::T(&s.best_point),
                Val::T(&s.best_grad),
                Val::T(&s.adv),
                Val::T(&s.acc_obj),
                Val::T(&s.acc_probs),
                Val::T(&s.acc_grad),
                Val::T(&s.labels),
                Val::T(&s.pos),
                Val::U32(count(s.k, what)?),
                Val::U32(count(s.d, what)?),
                Val::U32(count(u.samples, what)?),
                Val::I32(i32::from(u.first)),
                Val::I32(i32::from(u.want_grad)),
                Val::F64(u.step0),
            ];
            self.launch(&Launch::per_row("apgd_update", what, s.m, args)?)
        }
    }

    /// `apgd_offer`: the attacked rows' points offered to their examples' records.
    fn apgd_offer(self, s: &mut State) -> Result<()> {
        if self == Executor::Twin {
            let mut rec = s.rec.to_vec1::<f64>()?;
            let mut rec_points = s.rec_points.to_vec1::<f32>()?;
            twin::offer(
                &mut rec,
                &mut rec_points,
                &s.rows.to_vec1::<f64>()?,
                &s.adv.to_vec1::<f32>()?,
                &s.pos.to_vec1::<u32>()?,
                (
                    &s.row_start.to_vec1::<u32>()?,
                    &s.row_list.to_vec1::<u32>()?,
                ),
                s.d,
            );
            s.rec = refilled(&s.rec, rec)?;
            s.rec_points = refilled(&s.rec_points, rec_points)?;
            Ok(())
        } else {
            let what = "APGD on the device: record";
            // Block e writes its record (EROW scalars, D values) and reads the rows
            // its offsets list (each < M).
            let args = vec![
                Val::T(&s.rec),
                Val::T(&s.rec_points),
                Val::T(&s.rows),
                Val::T(&s.adv),
                Val::T(&s.pos),
                Val::T(&s.row_start),
                Val::T(&s.row_list),
                Val::U32(count(s.d, what)?),
            ];
            let examples = s.rec.elem_count() / EROW;
            self.launch(&Launch::per_row("apgd_offer", what, examples, args)?)
        }
    }

    /// `apgd_check`: the checkpoint rule after `interval` steps.
    fn apgd_check(self, s: &mut State, rho: f64, interval: usize) -> Result<()> {
        if self == Executor::Twin {
            let mut rows = s.rows.to_vec1::<f64>()?;
            let mut adv = s.adv.to_vec1::<f32>()?;
            let mut grad = s.grad.to_vec1::<f32>()?;
            twin::check(
                &mut rows,
                &mut adv,
                &mut grad,
                (
                    &s.best_point.to_vec1::<f32>()?,
                    &s.best_grad.to_vec1::<f32>()?,
                ),
                &s.pos.to_vec1::<u32>()?,
                s.d,
                (rho, interval),
            );
            s.rows = refilled(&s.rows, rows)?;
            s.adv = refilled(&s.adv, adv)?;
            s.grad = refilled(&s.grad, grad)?;
            Ok(())
        } else {
            let what = "APGD on the device: checkpoint";
            // Block j reads and writes row j of the scalars and (M·D) buffers.
            let args = vec![
                Val::T(&s.rows),
                Val::T(&s.adv),
                Val::T(&s.grad),
                Val::T(&s.best_point),
                Val::T(&s.best_grad),
                Val::T(&s.pos),
                Val::U32(count(s.d, what)?),
                Val::F64(rho),
                Val::U32(count(interval, what)?),
            ];
            self.launch(&Launch::per_row("apgd_check", what, s.m, args)?)
        }
    }
}

/// The kernels' CPU twins: per element, row or example what the CUDA kernels of
/// `engine/device.cu` do, in the same f64 and f32 operations.
pub(crate) mod twin {
    use super::{
        Update, AROW, BEST_LOSS, EROW, INCREASES, LAST_CHECK, LOSS, NAN, NONE, REDUCED, STEP,
        SUCCESS,
    };
    use crate::base::Bounds;
    use crate::engine::next_toward;

    /// What a proposal reads besides the iterates.
    pub struct ProposeInputs<'a> {
        pub x: &'a [f32],
        pub grad: &'a [f32],
        pub rows: &'a [f64],
        pub pos: &'a [u32],
        pub d: usize,
        pub eps: f64,
        pub a: f64,
        pub bounds: Bounds,
    }

    /// `apgd_propose_linf` (element by element) or `apgd_propose_l2` (row by row): the
    /// attacked rows' proposals; the current point becomes the old one.
    pub fn propose(adv: &mut [f32], old: &mut [f32], p: &ProposeInputs<'_>, l2: bool) {
        let (d, eps, a) = (p.d, p.eps, p.a);
        let (lo, hi) = (p.bounds.lo as f64, p.bounds.hi as f64);
        let mut v = vec![0f64; d];
        for row in 0..adv.len() / d {
            if p.pos[row] == NONE {
                continue;
            }
            let span = row * d..(row + 1) * d;
            let step = p.rows[row * AROW + STEP];
            let finite = |g: f32| if g.is_finite() { g as f64 } else { 0.0 };
            if l2 {
                for (c, i) in span.clone().enumerate() {
                    v[c] = finite(p.grad[i]);
                }
                let scale = 1.0 / (norm2(&v) + 1e-12);
                for (c, i) in span.clone().enumerate() {
                    let cur = adv[i] as f64 - p.x[i] as f64;
                    v[c] = cur + step * (v[c] * scale);
                }
                project_l2(&mut v, eps);
                for (c, i) in span.clone().enumerate() {
                    let xc = p.x[i] as f64;
                    let z = clamp(v[c], lo - xc, hi - xc);
                    let (cur, prev) = (adv[i] as f64 - xc, old[i] as f64 - xc);
                    v[c] = cur + a * (z - cur) + (1.0 - a) * (cur - prev);
                }
                project_l2(&mut v, eps);
                for (c, i) in span.enumerate() {
                    let xc = p.x[i] as f64;
                    let delta = clamp(v[c], lo - xc, hi - xc);
                    old[i] = adv[i];
                    adv[i] = stored(p.x[i], delta, p.bounds);
                }
            } else {
                for i in span {
                    let xc = p.x[i] as f64;
                    let (l, h) = (lo - xc, hi - xc);
                    let cur = adv[i] as f64 - xc;
                    let g = finite(p.grad[i]);
                    let sign = if g > 0.0 {
                        1.0
                    } else if g < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    let z = clamp(clamp(cur + step * sign, -eps, eps), l, h);
                    let prev = old[i] as f64 - xc;
                    let next = cur + a * (z - cur) + (1.0 - a) * (cur - prev);
                    let next = clamp(clamp(next, -eps, eps), l, h);
                    old[i] = adv[i];
                    adv[i] = stored(p.x[i], next, p.bounds);
                }
            }
        }
    }

    /// What an update reads: the iterates, the EOT sums at the rows' places, the labels
    /// and places.
    pub struct UpdateInputs<'a> {
        pub adv: &'a [f32],
        pub obj: &'a [f64],
        pub probs: &'a [f64],
        pub acc_grad: &'a [f32],
        pub labels: &'a [u32],
        pub pos: &'a [u32],
        pub k: usize,
        pub d: usize,
    }

    /// `apgd_update`, row by row.
    pub fn update(
        rows: &mut [f64],
        grad: &mut [f32],
        best_point: &mut [f32],
        best_grad: &mut [f32],
        p: &UpdateInputs<'_>,
        u: Update,
    ) {
        let (k, d, n) = (p.k, p.d, u.samples as f64);
        for (j, s) in rows.chunks_mut(AROW).enumerate() {
            let r = p.pos[j];
            let live = r != NONE;
            let r = r as usize;
            let mut o = f64::NEG_INFINITY;
            if live {
                o = if p.obj[r].is_nan() {
                    f64::NEG_INFINITY
                } else {
                    p.obj[r]
                };
                let (mut pred, mut conf, mut nan) = (0u32, f32::NEG_INFINITY, false);
                for (c, &sum) in p.probs[r * k..(r + 1) * k].iter().enumerate() {
                    let q = (sum / n) as f32;
                    nan |= q.is_nan();
                    if q > conf {
                        pred = c as u32;
                        conf = q;
                    }
                }
                s[SUCCESS] = f64::from(u8::from(pred != p.labels[j]));
                s[NAN] = f64::from(u8::from(nan));
            }
            let (copy_grad, take_best, copy_best_grad);
            if u.first {
                s[LOSS] = o;
                s[BEST_LOSS] = o;
                s[LAST_CHECK] = o;
                s[REDUCED] = 1.0;
                s[INCREASES] = 0.0;
                s[STEP] = u.step0;
                (copy_grad, take_best, copy_best_grad) = (true, true, true);
            } else if live {
                if o > s[LOSS] {
                    s[INCREASES] += 1.0;
                }
                s[LOSS] = o;
                copy_grad = u.want_grad;
                take_best = o > s[BEST_LOSS];
                if take_best {
                    s[BEST_LOSS] = o;
                }
                copy_best_grad = take_best && u.want_grad;
            } else {
                (copy_grad, take_best, copy_best_grad) = (false, false, false);
            }
            let span = j * d..(j + 1) * d;
            if copy_grad {
                if live {
                    grad[span.clone()].copy_from_slice(&p.acc_grad[r * d..(r + 1) * d]);
                } else {
                    grad[span.clone()].fill(0.0);
                }
            }
            if take_best {
                best_point[span.clone()].copy_from_slice(&p.adv[span.clone()]);
            }
            if copy_best_grad {
                best_grad[span.clone()].copy_from_slice(&grad[span]);
            }
        }
    }

    /// `apgd_offer`, example by example: its attacked rows in order.
    pub fn offer(
        rec: &mut [f64],
        rec_points: &mut [f32],
        rows: &[f64],
        adv: &[f32],
        pos: &[u32],
        (row_start, row_list): (&[u32], &[u32]),
        d: usize,
    ) {
        for (e, re) in rec.chunks_mut(EROW).enumerate() {
            let (mut rs, mut ro) = (re[0] != 0.0, re[1]);
            let mut winner = None;
            for &j in &row_list[row_start[e] as usize..row_start[e + 1] as usize] {
                let j = j as usize;
                if pos[j] == NONE {
                    continue;
                }
                let s = &rows[j * AROW..(j + 1) * AROW];
                let (success, o) = (s[SUCCESS] != 0.0, s[LOSS]);
                if s[NAN] != 0.0 {
                    re[2] = 1.0;
                }
                if (success && !rs) || (success == rs && o > ro) {
                    (rs, ro, winner) = (success, o, Some(j));
                }
            }
            re[0] = f64::from(u8::from(rs));
            re[1] = ro;
            if let Some(j) = winner {
                rec_points[e * d..(e + 1) * d].copy_from_slice(&adv[j * d..(j + 1) * d]);
            }
        }
    }

    /// `apgd_check`, row by row.
    pub fn check(
        rows: &mut [f64],
        adv: &mut [f32],
        grad: &mut [f32],
        (best_point, best_grad): (&[f32], &[f32]),
        pos: &[u32],
        d: usize,
        (rho, interval): (f64, usize),
    ) {
        for (j, s) in rows.chunks_mut(AROW).enumerate() {
            if pos[j] == NONE {
                continue;
            }
            let oscillating = s[INCREASES] <= rho * interval as f64;
            let stalled = s[REDUCED] == 0.0 && s[LAST_CHECK] >= s[BEST_LOSS];
            let reduce = oscillating || stalled;
            s[REDUCED] = f64::from(u8::from(reduce));
            s[LAST_CHECK] = s[BEST_LOSS];
            if reduce {
                s[STEP] /= 2.0;
            }
            s[INCREASES] = 0.0;
            if reduce {
                let span = j * d..(j + 1) * d;
                adv[span.clone()].copy_from_slice(&best_point[span.clone()]);
                grad[span.clone()].copy_from_slice(&best_grad[span]);
            }
        }
    }

    /// x + δ rounded to f32, clamped, and where that went past |δ| the next f32
    /// towards x (the host's `Batch::store`).
    fn stored(x: f32, delta: f64, b: Bounds) -> f32 {
        let xc = x as f64;
        let s = ((xc + delta) as f32).clamp(b.lo, b.hi);
        if (s as f64 - xc).abs() > delta.abs() {
            next_toward(s, x)
        } else {
            s
        }
    }

    /// The host's L2 `Norm::project`: onto the sphere, then shrunk by ulps.
    fn project_l2(v: &mut [f64], eps: f64) {
        let norm = norm2(v);
        if norm > eps {
            let scale = eps / norm;
            v.iter_mut().for_each(|a| *a *= scale);
            let mut factor = 1.0 - f64::EPSILON;
            while norm2(v) > eps {
                v.iter_mut().for_each(|a| *a *= factor);
                factor *= 1.0 - f64::EPSILON;
            }
        }
    }

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
}
