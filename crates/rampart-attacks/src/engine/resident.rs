//! A training attack with its batch left on the device: [`crate::Attack::perturb_with_classes`]
//! of an L∞ PGD (or FGSM) configuration on the device-resident loop
//! ([`super::device`]) reads nothing from the device before its result is ready, and
//! then only a few values per example.
//!
//! The host path validates the batch on the host (it reads the inputs and labels:
//! on a GPU a wait for the device, which at that point is still running the previous
//! training step), draws the random starts beside the clean inputs, and after the run
//! reads the points back into its record and uploads them again. Here:
//!
//! - the checks run on the device (`atk_check`: NaN or out-of-bounds inputs, labels
//!   of K or more) into a per-example verdict, read with the result;
//! - the random starts' perturbations are drawn on the device (`atk_draw_linf`: the
//!   host path's ChaCha8 streams, one per example, and its uniform draws, bit for bit;
//!   the kernels' twins draw them on the host's threads); the start itself, x + δ
//!   through the box, the ε-ball and the box, rounded towards x, is made on the device
//!   too (`atk_start_linf`): nothing is copied to the device for a start;
//! - each restart's result is offered to a record on the device (`atk_offer`, the
//!   record's rule: a success beats a non-success, then a strictly higher objective,
//!   ties keep the earlier point; a last iterate replaces it), and the L∞ distances
//!   are measured there (`atk_measure`);
//! - the one read is the verdict: M × 6 values. The points stay where they are and
//!   are returned as they lie.
//!
//! **The same result as the host path, bit for bit,** and the same errors: when the
//! verdict (or a pass) finds a fault, the host's checks run on the batch and their
//! error is returned, so a bad input gives the host path's message, in its order. It
//! is taken wherever the device-resident loop is (see [`super::device`]) for L∞
//! configurations on f32 inputs with u8 or u32 labels of the expected shape; anything
//! else takes the host path.

use std::cell::{Cell, RefCell};

use candle_core::{DType, ModuleT, Tensor};
use rayon::prelude::*;

use super::device::{drive, refilled, resident_on, Executor, Pass, State};
use super::launch::{count, Launch, Val};
use super::{rows_per_task, Engine};
use crate::base::{Bounds, Faults, Perturbed, Unchecked};
use crate::batch::example_rng;
use crate::error::{Error, Result};
use crate::norm::{Init, Norm};
use crate::pgd::Pgd;
use crate::problem::Problem;

/// Values per example of the verdict.
pub(crate) const VERDICT: usize = 6;
/// An input value of the example is NaN or outside the bounds.
pub(crate) const BAD_INPUT: usize = 0;
/// The example's label is K or more.
pub(crate) const BAD_LABEL: usize = 1;
/// A judged point of a run held NaN probabilities.
pub(crate) const SAW_NAN: usize = 2;
/// The record's objective (−∞ for the clean input and for a last iterate).
pub(crate) const RECORD_OBJ: usize = 3;
/// Whether the record is a success (0 or 1).
pub(crate) const RECORD_SUCCESS: usize = 4;
/// The record's L∞ distance from the clean input.
pub(crate) const DISTANCE: usize = 5;

thread_local! {
    static PERTURBS: Cell<usize> = const { Cell::new(0) };
    /// The training step's seed on the device and its value on the host.
    static SEED_SLOT: RefCell<Option<(Tensor, u64)>> = const { RefCell::new(None) };
}

/// Runs `f` with the random starts of training attacks on the device-resident path
/// drawn from the seed in `slot` (two u32 words on the device, low first) instead of
/// the seed they are given, which must be `seed`, the slot's value (an attack given
/// another fails): a CUDA graph of a training step captured under it draws the
/// starts of whatever seed the step writes into the slot before each replay. The
/// twins of the kernels (off a GPU) draw from the seed they are given.
pub fn with_seed_on_device<R>(slot: &Tensor, seed: u64, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<(Tensor, u64)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SEED_SLOT.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = SEED_SLOT.with(|s| s.borrow_mut().replace((slot.clone(), seed)));
    let _restore = Restore(previous);
    f()
}

/// How many attacks took this path on this thread so far (for the tests).
#[cfg(test)]
pub(crate) fn resident_perturbs() -> usize {
    PERTURBS.with(Cell::get)
}

/// Where a training attack ran: on the device (its verdict unread) or the host.
enum Path {
    Device(Resident),
    Host(Perturbed),
}

/// `attack`'s points, where `pgd` is its configuration as a PGD: the settings checked,
/// then the batch on the device where that applies, else the host path.
fn on_device_or_host<A: crate::Attack + ?Sized>(
    attack: &A,
    pgd: &Pgd,
    model: &dyn ModuleT,
    bounds: Bounds,
    batch: (&Tensor, &Tensor),
    (eps, seed, classes): (f64, u64, usize),
) -> Result<Path> {
    crate::base::check_settings(attack, bounds, &[eps])?;
    Ok(
        match resident(pgd, model, bounds, batch, eps, seed, classes)? {
            Some(run) => Path::Device(run),
            None => Path::Host(crate::base::perturbed(
                attack,
                model,
                bounds,
                batch,
                eps,
                seed,
                Some(classes),
            )?),
        },
    )
}

/// `attack`'s [`crate::Attack::perturb_with_classes`] ([`on_device_or_host`], the
/// device's verdict read).
pub(crate) fn perturb_on_device_or_host<A: crate::Attack + ?Sized>(
    attack: &A,
    pgd: &Pgd,
    model: &dyn ModuleT,
    bounds: Bounds,
    batch: (&Tensor, &Tensor),
    (eps, seed, classes): (f64, u64, usize),
) -> Result<Perturbed> {
    match on_device_or_host(attack, pgd, model, bounds, batch, (eps, seed, classes))? {
        Path::Device(run) => run.read(pgd, model, bounds, batch, eps, classes),
        Path::Host(done) => Ok(done),
    }
}

/// `attack`'s [`crate::Attack::perturb_unchecked`] ([`on_device_or_host`], the
/// device's checks left unread).
pub(crate) fn unchecked_on_device_or_host<A: crate::Attack + ?Sized>(
    attack: &A,
    pgd: &Pgd,
    model: &dyn ModuleT,
    bounds: Bounds,
    batch: (&Tensor, &Tensor),
    (eps, seed, classes): (f64, u64, usize),
) -> Result<Unchecked> {
    Ok(
        match on_device_or_host(attack, pgd, model, bounds, batch, (eps, seed, classes))? {
            Path::Device(run) => Unchecked {
                faults: Some(run.faults(eps)?),
                clipped: run.points,
            },
            Path::Host(done) => Unchecked {
                clipped: done.clipped,
                faults: None,
            },
        },
    )
}

/// A training attack run on the device, its verdict not read.
struct Resident {
    /// (B, ...) the record's points.
    points: Tensor,
    /// (B·VERDICT) f64 the verdict.
    verdict: Tensor,
}

impl Resident {
    /// The verdict reduced on the device to the batch's [`Faults`]: the largest of each
    /// check over the examples, the distance as its excess over ε.
    fn faults(&self, eps: f64) -> Result<Faults> {
        let rows = self.verdict.elem_count() / VERDICT;
        let most = self.verdict.reshape((rows, VERDICT))?.max(0)?;
        let checks = most.narrow(0, BAD_INPUT, SAW_NAN + 1 - BAD_INPUT)?;
        let excess = most.narrow(0, DISTANCE, 1)?.affine(1.0, -eps)?;
        Ok(Faults::new(Tensor::cat(&[&checks, &excess], 0)?))
    }
}

impl Resident {
    /// [`crate::Attack::perturb_with_classes`]'s result from this run of `pgd` on the
    /// batch: the verdict read (the attack's one read) and its faults refused with the
    /// host path's errors.
    fn read(
        self,
        pgd: &Pgd,
        model: &dyn ModuleT,
        bounds: Bounds,
        (xs, ys): (&Tensor, &Tensor),
        eps: f64,
        classes: usize,
    ) -> Result<Perturbed> {
        let verdict = self.verdict.to_vec1::<f64>()?;
        let rows = verdict.chunks(VERDICT);
        if rows
            .clone()
            .any(|r| r[BAD_INPUT] != 0.0 || r[BAD_LABEL] != 0.0)
        {
            return Err(host_error(
                model,
                bounds,
                (xs, ys),
                classes,
                Error::Input(
                    "the device found an input or label out of range that the host's checks accept"
                        .into(),
                ),
            ));
        }
        if rows.clone().any(|r| r[SAW_NAN] != 0.0) {
            return Err(crate::batch::nan_logits());
        }
        // Never taken: every start and step keeps |x_adv − x| ≤ |δ| ≤ ε exactly.
        if let Some((i, r)) = rows.clone().enumerate().find(|(_, r)| r[DISTANCE] > eps) {
            return Err(Error::Input(format!(
                "example {i}'s point lies {} from its input, outside ε = {eps}",
                r[DISTANCE]
            )));
        }
        let norm: Vec<f32> = rows.map(|r| r[DISTANCE] as f32).collect();
        let b = xs.dim(0)?;
        Ok(Perturbed {
            clipped: self.points,
            norm,
            iterations: vec![pgd.steps * pgd.restarts.count; b],
            eps,
        })
    }
}

/// The host path's checks, in its order, for a fault the device found: their error
/// wins, as it would have been raised before the attack.
fn host_error(
    model: &dyn ModuleT,
    bounds: Bounds,
    (xs, ys): (&Tensor, &Tensor),
    classes: usize,
    fault: Error,
) -> Error {
    match Problem::with_classes(model, bounds, xs, ys, classes) {
        Err(e) => e,
        Ok(_) => fault,
    }
}

/// `pgd`'s restarts with the batch on the device, the verdict unread, or `None` where
/// the path does not apply.
#[allow(clippy::too_many_arguments)]
fn resident(
    pgd: &Pgd,
    model: &dyn ModuleT,
    bounds: Bounds,
    (xs, ys): (&Tensor, &Tensor),
    eps: f64,
    seed: u64,
    classes: usize,
) -> Result<Option<Resident>> {
    let Some(exec) = resident_on(pgd, xs.device()) else {
        return Ok(None);
    };
    // The model's weights cannot change during an attack: the fused GPU program keeps
    // its reordered kernels for the run (`rampart_models::frozen_weights`).
    #[cfg(feature = "cuda")]
    let _weights = rampart_models::frozen_weights();
    let dims = xs.dims();
    let shaped = dims.len() >= 2
        && !dims.contains(&0)
        && ys.dims() == [dims[0]]
        && xs.dtype() == DType::F32
        && matches!(ys.dtype(), DType::U32 | DType::U8)
        && ys.device().same_device(xs.device());
    if pgd.norm != Norm::Linf || !shaped || classes == 0 {
        return Ok(None);
    }
    let d = dims[1..].iter().product();
    let engine = Engine {
        cfg: pgd,
        mask: None,
    };
    if engine.check_shape(d, classes).is_err() {
        return Ok(None);
    }
    PERTURBS.with(|c| c.set(c.get() + 1));
    match attack(exec, pgd, model, bounds, (xs, ys), eps, seed, classes) {
        Ok((points, verdict)) => Ok(Some(Resident {
            points: points.reshape(dims)?,
            verdict,
        })),
        Err(e) => Err(host_error(model, bounds, (xs, ys), classes, e)),
    }
}

/// The restarts of `pgd` on the device: the record's points (B·D f32) and the
/// verdict (B·VERDICT f64), on the device.
#[allow(clippy::too_many_arguments)]
fn attack(
    exec: Executor,
    pgd: &Pgd,
    model: &dyn ModuleT,
    bounds: Bounds,
    (xs, ys): (&Tensor, &Tensor),
    eps: f64,
    seed: u64,
    classes: usize,
) -> Result<(Tensor, Tensor)> {
    let dev = xs.device();
    let (b, d) = (xs.dim(0)?, xs.elem_count() / xs.dim(0)?);
    let x = xs.flatten_all()?.contiguous()?;
    let labels = ys.to_dtype(DType::U32)?.contiguous()?;
    let mut verdict = Tensor::zeros(b * VERDICT, DType::F64, dev)?;
    exec.check(&mut verdict, &x, &labels, (d, classes), bounds)?;
    let mut record = x.copy()?;
    let pass = Pass {
        cfg: pgd,
        model,
        dims: xs.dims(),
        dtype: DType::F32,
    };
    let width = bounds.width() as f64;
    for restart in 0..pgd.restarts.count {
        let init = pgd.restarts.init(restart);
        let delta = match init {
            Init::Zero => None,
            // The same draws made on the device by its kernel: no host work, no copy;
            // the seed read there where a training step put it (`with_seed_on_device`).
            Init::Uniform if exec != Executor::Twin => {
                let slot = SEED_SLOT.with(|s| s.borrow().clone());
                if let Some((_, host)) = &slot {
                    if *host != seed {
                        return Err(Error::Input(format!(
                            "a training attack drew its start from seed {seed}, but the \
                             step put seed {host} on the device"
                        )));
                    }
                }
                let (at, offset) = match &slot {
                    Some((t, _)) => (Some(t), restart as u64),
                    None => (None, seed.wrapping_add(restart as u64)),
                };
                Some(exec.draw_linf((b, d), at, offset, eps, dev)?)
            }
            _ => {
                // The host path's draws: example i on stream i of ChaCha8 seeded with
                // seed + restart (one pass per restart, every example a row).
                let mut delta = vec![0f64; b * d];
                delta
                    .par_chunks_mut(d)
                    .enumerate()
                    .with_min_len(rows_per_task(d))
                    .for_each(|(i, out)| {
                        let mut rng = example_rng(seed, restart as u64, i as u64);
                        pgd.norm.sample(init, eps, width, &mut rng, out);
                    });
                Some(super::upload(delta, b * d, dev)?)
            }
        };
        let start = exec.start_linf(&x, delta.as_ref(), eps, bounds)?;
        let mut s = State::new(
            x.clone(),
            start,
            labels.clone(),
            None,
            classes,
            pgd.step_size.at(eps),
        )?;
        let ends_on_candidate = drive(exec, &pass, &mut s, eps, bounds)?;
        let (point, take) = match (pgd.last_iterate, ends_on_candidate) {
            (true, true) => (&s.cand, true),
            (true, false) => (&s.adv, true),
            (false, _) => (&s.best, false),
        };
        exec.offer(&mut verdict, &mut record, point, &s.rows, d, take)?;
    }
    exec.measure(&mut verdict, &record, &x, d)?;
    Ok((record, verdict))
}

impl Executor {
    /// `atk_check`: flags each example's bad inputs and label, and starts its record.
    fn check(
        self,
        verdict: &mut Tensor,
        x: &Tensor,
        labels: &Tensor,
        dk: (usize, usize),
        bounds: Bounds,
    ) -> Result<()> {
        if self == Executor::Twin {
            let mut v = verdict.to_vec1::<f64>()?;
            let (xv, lv) = (x.to_vec1::<f32>()?, labels.to_vec1::<u32>()?);
            twin::check(&mut v, &xv, &lv, dk, bounds);
            *verdict = refilled(verdict, v)?;
            Ok(())
        } else {
            let what = "PGD on the device: input checks";
            // Block j reads row j of x (D values) and label j, and writes the six
            // values of its verdict row.
            let args = vec![
                Val::T(verdict),
                Val::T(x),
                Val::T(labels),
                Val::U32(count(dk.0, what)?),
                Val::U32(count(dk.1, what)?),
                Val::F32(bounds.lo),
                Val::F32(bounds.hi),
            ];
            let m = labels.elem_count();
            self.launch(&Launch::per_row("atk_check", what, m, args)?)
        }
    }

    /// `atk_draw_linf`: the perturbations of L∞ uniform starts of `rows` rows of `d`
    /// values drawn on the device, those the host draws for restart r with
    /// `example_rng(seed, r, i)` when the run's seed, `offset` plus the seed in
    /// `seed_at` (two u32 words on the device, low first) if given, is seed + r
    /// (`Norm::sample`, `Init::Uniform`), bit for bit: ChaCha8 on the GPU's threads,
    /// eight values per thread.
    pub(super) fn draw_linf(
        self,
        (rows, d): (usize, usize),
        seed_at: Option<&Tensor>,
        offset: u64,
        eps: f64,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let what = "PGD on the device: random starts";
        let delta = Tensor::zeros(rows * d, DType::F64, dev)?;
        let (low, scale) = unit_uniform();
        let threads = rows
            .checked_mul(d.div_ceil(8))
            .ok_or_else(|| Error::Input(format!("{what}: too many values")))?;
        // Thread t draws values 8·(t mod ⌈D/8⌉)… of row ⌊t / ⌈D/8⌉⌋.
        let args = vec![
            Val::T(&delta),
            seed_at.into(),
            Val::U64(offset),
            Val::U32(count(rows, what)?),
            Val::U32(count(d, what)?),
            Val::F64(eps),
            Val::F64(scale),
            Val::F64(low),
        ];
        self.launch(&Launch::elementwise("atk_draw_linf", what, threads, args)?)?;
        Ok(delta)
    }

    /// `atk_start_linf`: the starts x + δ (δ = 0 where `delta` is `None`).
    pub(crate) fn start_linf(
        self,
        x: &Tensor,
        delta: Option<&Tensor>,
        eps: f64,
        bounds: Bounds,
    ) -> Result<Tensor> {
        if self == Executor::Twin {
            let xv = x.to_vec1::<f32>()?;
            let dv = delta.map(|t| t.to_vec1::<f64>()).transpose()?;
            let mut cand = vec![0f32; xv.len()];
            twin::start_linf(&mut cand, &xv, dv.as_deref(), eps, bounds);
            Ok(Tensor::from_vec(cand, xv.len(), x.device())?)
        } else {
            let what = "PGD on the device: starts";
            let md = x.elem_count();
            let cand = Tensor::zeros(md, DType::F32, x.device())?;
            // Element i of cand, x and delta (all M·D long).
            let args = vec![
                Val::T(&cand),
                Val::T(x),
                delta.into(),
                Val::U32(count(md, what)?),
                Val::F64(eps),
                Val::F32(bounds.lo),
                Val::F32(bounds.hi),
            ];
            self.launch(&Launch::elementwise("atk_start_linf", what, md, args)?)?;
            Ok(cand)
        }
    }

    /// `atk_offer`: a run's `point` (its best, or with `take` its last iterate)
    /// offered to the record.
    fn offer(
        self,
        verdict: &mut Tensor,
        record: &mut Tensor,
        point: &Tensor,
        rows: &Tensor,
        d: usize,
        take: bool,
    ) -> Result<()> {
        if self == Executor::Twin {
            let mut v = verdict.to_vec1::<f64>()?;
            let mut r = record.to_vec1::<f32>()?;
            let (p, s) = (point.to_vec1::<f32>()?, rows.to_vec1::<f64>()?);
            twin::offer(&mut v, &mut r, &p, &s, d, take);
            *verdict = refilled(verdict, v)?;
            *record = refilled(record, r)?;
            Ok(())
        } else {
            let what = "PGD on the device: record";
            // Block j reads row j of the run's scalars (ROW values) and point (D
            // values), and writes its verdict row and record row.
            let args = vec![
                Val::T(verdict),
                Val::T(record),
                Val::T(point),
                Val::T(rows),
                Val::U32(count(d, what)?),
                Val::I32(i32::from(take)),
            ];
            let m = verdict.elem_count() / VERDICT;
            self.launch(&Launch::per_row("atk_offer", what, m, args)?)
        }
    }

    /// `atk_measure`: each record's L∞ distance from its clean input.
    fn measure(self, verdict: &mut Tensor, record: &Tensor, x: &Tensor, d: usize) -> Result<()> {
        if self == Executor::Twin {
            let mut v = verdict.to_vec1::<f64>()?;
            let (r, xv) = (record.to_vec1::<f32>()?, x.to_vec1::<f32>()?);
            twin::measure(&mut v, &r, &xv, d);
            *verdict = refilled(verdict, v)?;
            Ok(())
        } else {
            let what = "PGD on the device: distances";
            // Block j reads row j of the record and x (D values each) and writes
            // one value of its verdict row.
            let args = vec![
                Val::T(verdict),
                Val::T(record),
                Val::T(x),
                Val::U32(count(d, what)?),
            ];
            let m = verdict.elem_count() / VERDICT;
            self.launch(&Launch::per_row("atk_measure", what, m, args)?)
        }
    }
}

/// The CPU twins of the kernels, as their CUDA versions in `device.cu` compute them.
pub(crate) mod twin {
    use super::{BAD_INPUT, BAD_LABEL, DISTANCE, RECORD_OBJ, RECORD_SUCCESS, SAW_NAN, VERDICT};
    use crate::base::Bounds;
    use crate::engine::device::{BEST_OBJ, BEST_SUCCESS, NAN, ROW};
    use crate::engine::next_toward;

    /// `atk_check`, row by row.
    pub fn check(
        verdict: &mut [f64],
        x: &[f32],
        labels: &[u32],
        (d, k): (usize, usize),
        b: Bounds,
    ) {
        for (j, v) in verdict.chunks_mut(VERDICT).enumerate() {
            let bad = x[j * d..(j + 1) * d]
                .iter()
                .any(|a| a.is_nan() || *a < b.lo || *a > b.hi);
            v[BAD_INPUT] = f64::from(u8::from(bad));
            v[BAD_LABEL] = f64::from(u8::from(labels[j] as usize >= k));
            v[SAW_NAN] = 0.0;
            v[RECORD_OBJ] = f64::NEG_INFINITY;
            v[RECORD_SUCCESS] = 0.0;
            v[DISTANCE] = 0.0;
        }
    }

    /// `atk_start_linf`, element by element: the host's `finish` without a mask.
    pub fn start_linf(cand: &mut [f32], x: &[f32], delta: Option<&[f64]>, eps: f64, b: Bounds) {
        for (i, (c, &xc)) in cand.iter_mut().zip(x).enumerate() {
            let xd = xc as f64;
            let (l, h) = (b.lo as f64 - xd, b.hi as f64 - xd);
            let v = delta.map_or(0.0, |dv| dv[i]);
            let v = clamp(clamp(clamp(v, l, h), -eps, eps), l, h);
            let s = ((xd + v) as f32).clamp(b.lo, b.hi);
            *c = if (s as f64 - xd).abs() > v.abs() {
                next_toward(s, xc)
            } else {
                s
            };
        }
    }

    /// `atk_offer`, row by row.
    pub fn offer(
        verdict: &mut [f64],
        record: &mut [f32],
        point: &[f32],
        rows: &[f64],
        d: usize,
        take: bool,
    ) {
        for (j, (v, r)) in verdict
            .chunks_mut(VERDICT)
            .zip(rows.chunks(ROW))
            .enumerate()
        {
            if r[NAN] != 0.0 {
                v[SAW_NAN] = 1.0;
            }
            let success = r[BEST_SUCCESS] != 0.0;
            let record_success = v[RECORD_SUCCESS] != 0.0;
            let better = take
                || (success && !record_success)
                || (success == record_success && r[BEST_OBJ] > v[RECORD_OBJ]);
            if better {
                v[RECORD_OBJ] = if take { f64::NEG_INFINITY } else { r[BEST_OBJ] };
                v[RECORD_SUCCESS] = f64::from(u8::from(!take && success));
                let span = j * d..(j + 1) * d;
                record[span.clone()].copy_from_slice(&point[span]);
            }
        }
    }

    /// `atk_measure`, row by row: max |record − x| in f64.
    pub fn measure(verdict: &mut [f64], record: &[f32], x: &[f32], d: usize) {
        for (j, v) in verdict.chunks_mut(VERDICT).enumerate() {
            let span = j * d..(j + 1) * d;
            v[DISTANCE] = record[span.clone()]
                .iter()
                .zip(&x[span])
                .fold(0.0, |m: f64, (&a, &xc)| m.max((a as f64 - xc as f64).abs()));
        }
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

/// The `low` and `scale` of rand 0.8's `Uniform::new_inclusive(-1.0, 1.0)` for f64,
/// computed as it computes them: a draw is `(v − 1)·scale + low` for v in [1, 2) from
/// the top 52 bits of a u64, and `scale` is the largest with `(1 − 2⁻⁵²)·scale + low ≤ 1`.
/// (`atk_draw_linf` makes `rng.gen_range(-1.0..=1.0)` from them.)
pub(crate) fn unit_uniform() -> (f64, f64) {
    let (low, high) = (-1.0f64, 1.0f64);
    let max_rand = f64::from_bits((u64::MAX >> 12) | 0x3FF0_0000_0000_0000) - 1.0;
    let mut scale = (high - low) / max_rand;
    while scale * max_rand + low > high {
        scale = f64::from_bits(scale.to_bits() - 1);
    }
    (low, scale)
}
