//! The PGD loop: one run of [`Pgd`] (and of its configurations FGSM, distal
//! examples and frames) from fresh starts, optionally with a mask confining the
//! perturbation. [`crate::Repeated`]'s loop gives it its restarts, and
//! [`crate::Attack::run`] its ε loop and final judgement.
//!
//! The per-example arithmetic of a start and of a step runs on the host's threads,
//! examples in parallel (each on its own rows and streams, so the result does not
//! depend on the threads). State lives on the host, per example: the current adversarial input (f32, exactly
//! what the model sees), the momentum buffer, the step size, the cached objective and
//! gradient at the current point; the best point so far is the run's [`Record`]. The
//! model is only used for forward/backward passes on the (compacted) batch of examples
//! still attacked.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::objective::probe_with;
use crate::pgd::Pgd;
use crate::problem::{Outcome, Problem};
use crate::repeated::{repeat, Record, Rows, SingleRun, Start};

/// A [`Pgd`] configuration with an optional mask (length D, entries 0 or 1) that
/// confines the perturbation to the coordinates where it is 1, the same for every
/// example.
#[derive(Clone, Copy)]
pub(crate) struct Engine<'a> {
    pub cfg: &'a Pgd,
    pub mask: Option<&'a [f64]>,
}

/// Objective, success and (optionally) gradient at a batch of points, averaged over
/// the EOT draws.
struct Eval {
    objective: Vec<f64>,
    success: Vec<bool>,
    grad: Vec<f32>,
}

impl Engine<'_> {
    /// Refuses a problem the configuration cannot attack: a mask of another length,
    /// too few classes for the objective, a target class out of range.
    pub fn check(&self, problem: &Problem<'_>) -> Result<()> {
        self.check_shape(problem.dim(), problem.classes())
    }

    /// [`Engine::check`] for inputs of dimension `d` and `classes` classes.
    pub fn check_shape(&self, d: usize, classes: usize) -> Result<()> {
        if let Some(m) = self.mask {
            if m.len() != d {
                return Err(Error::Input(format!(
                    "mask has {} entries for inputs of dimension {d}",
                    m.len()
                )));
            }
        }
        let cfg = self.cfg;
        cfg.objective
            .check_classes(classes, cfg.criterion.target())?;
        if let Some(t) = cfg.criterion.target() {
            if t as usize >= classes {
                return Err(Error::Input(format!(
                    "target class {t} is out of range for {classes} classes"
                )));
            }
        }
        Ok(())
    }

    /// The attack at one ε with the configuration's restarts.
    pub fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        repeat(self, self.cfg.restarts.count, problem, eps, seed)
    }
}

impl SingleRun for Engine<'_> {
    /// Nothing is judged before the first start: every evaluated point competes.
    fn begin(&self, problem: &Problem<'_>) -> Result<Start> {
        Ok(Start::untargeted(vec![false; problem.len()]))
    }

    fn skips_fooled(&self) -> bool {
        self.cfg.early_stop
    }

    /// One run: the start of `cfg.restarts.init(restart)`, then `steps` steps.
    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
        let run = Run {
            cfg: self.cfg,
            mask: self.mask,
            problem,
            batch: &problem.batch,
        };
        run.run(rows, record)
    }
}

/// One run of the loop on a problem.
struct Run<'a> {
    cfg: &'a Pgd,
    mask: Option<&'a [f64]>,
    problem: &'a Problem<'a>,
    batch: &'a Batch,
}

impl Run<'_> {
    fn run(&self, rows: &Rows, record: &mut Record) -> Result<()> {
        if let Some(exec) = device::resident(self) {
            return device::run(exec, self, rows, record);
        }
        let (eps, cfg, d) = (rows.eps(), self.cfg, self.batch.d);
        let mut active: Vec<usize> = rows.examples().to_vec();
        let mut adv = self.starts(rows);
        let update = self.update();
        let per_task = rows_per_task(d);
        let batch = self.batch;
        let mut cur = self.evaluate(&active, &adv, true)?;
        offer(record, &active, &adv, &cur, d);
        let mut lr = vec![cfg.step_size.at(eps); active.len()];
        let mut momentum = vec![0f64; active.len() * d];
        for t in 0..cfg.steps {
            if cfg.early_stop {
                let keep: Vec<bool> = active.iter().map(|&i| !record.is_fooled(i)).collect();
                if keep.iter().any(|k| !k) {
                    retain(&mut active, 1, &keep);
                    retain(&mut adv, d, &keep);
                    retain(&mut momentum, d, &keep);
                    retain(&mut lr, 1, &keep);
                    retain(&mut cur.objective, 1, &keep);
                    retain(&mut cur.success, 1, &keep);
                    retain(&mut cur.grad, d, &keep);
                }
            }
            if active.is_empty() {
                break;
            }
            let mut candidate = vec![0f32; active.len() * d];
            // Each example's step (direction, momentum, projection) on its own rows,
            // examples in parallel: the same arithmetic whatever the threads.
            let beta = cfg.momentum;
            candidate
                .par_chunks_mut(d)
                .zip(momentum.par_chunks_mut(d))
                .zip(cur.grad.par_chunks(d).zip(adv.par_chunks(d)))
                .zip(active.par_iter().zip(lr.par_iter()))
                .with_min_len(per_task)
                .for_each_init(
                    || (vec![0f64; d], vec![0f64; d]),
                    |(delta, g), (((out, m), (grad, a)), (&i, &lr))| {
                        update.direction(grad, a, g);
                        for (mc, gc) in m.iter_mut().zip(g.iter()) {
                            *mc = beta * *mc + (1.0 - beta) * gc;
                        }
                        let x = batch.row(i);
                        for c in 0..d {
                            delta[c] = (a[c] as f64 - x[c] as f64) + lr * m[c];
                        }
                        update.finish(i, delta, eps, out);
                    },
                );
            let last = t + 1 == cfg.steps;
            if last && cfg.last_iterate && cfg.backtrack.is_none() {
                // The last iterate is the result whatever its objective: nothing
                // compares it with another point, so it is not evaluated.
                for &i in &active {
                    record.count_step(i);
                }
                adv = candidate;
                break;
            }
            let want_grad = !last;
            let next = self.evaluate(&active, &candidate, want_grad)?;
            offer(record, &active, &candidate, &next, d);
            for (j, &i) in active.iter().enumerate() {
                record.count_step(i);
                let accept = match cfg.backtrack {
                    None => true,
                    Some(_) => next.objective[j] >= cur.objective[j],
                };
                if accept {
                    let rows = j * d..(j + 1) * d;
                    adv[rows.clone()].copy_from_slice(&candidate[rows.clone()]);
                    cur.objective[j] = next.objective[j];
                    cur.success[j] = next.success[j];
                    if want_grad {
                        cur.grad[rows.clone()].copy_from_slice(&next.grad[rows]);
                    }
                } else if let Some(factor) = cfg.backtrack {
                    lr[j] /= factor;
                }
            }
        }
        if cfg.last_iterate {
            // The current iterate of every example, better than the best or not.
            for (j, &i) in active.iter().enumerate() {
                record.set(i, &adv[j * d..(j + 1) * d]);
            }
        }
        Ok(())
    }

    /// The start of every row of `rows`, each from its example's stream, examples in
    /// parallel: (rows × D) f32.
    fn starts(&self, rows: &Rows) -> Vec<f32> {
        let (eps, seed) = (rows.eps(), rows.seed());
        let (cfg, batch) = (self.cfg, self.batch);
        let d = batch.d;
        let width = batch.bounds.width() as f64;
        let init = cfg.restarts.init(rows.restart());
        let update = self.update();
        let mut adv = vec![0f32; rows.len() * d];
        adv.par_chunks_mut(d)
            .zip(rows.examples().par_iter().zip(rows.runs().par_iter()))
            .with_min_len(rows_per_task(d))
            .for_each_init(
                || vec![0f64; d],
                |delta, (out, (&i, &run))| {
                    let mut rng = batch.rng(seed, run, i);
                    cfg.norm.sample(init, eps, width, &mut rng, delta);
                    update.finish(i, delta, eps, out);
                },
            );
        adv
    }

    /// The per-example arithmetic of this run, for the worker threads.
    fn update(&self) -> Update<'_> {
        Update {
            cfg: self.cfg,
            mask: self.mask,
            batch: self.batch,
        }
    }

    /// Forward (and backward) passes at the points `adv` of the examples `active`,
    /// averaged over `eot.grad_samples` draws.
    fn evaluate(&self, active: &[usize], adv: &[f32], want_grad: bool) -> Result<Eval> {
        let batch = self.batch;
        let (m, d, k) = (active.len(), batch.d, batch.classes);
        let input = batch.tensor(adv, m)?;
        let labels: Vec<u32> = active.iter().map(|&i| batch.ys[i]).collect();
        let ys = Tensor::from_slice(&labels, m, &batch.device)?;
        let samples = self.cfg.eot.grad_samples;
        let mut objective = vec![0f64; m];
        let mut probs = vec![0f64; m * k];
        let mut grad = if want_grad {
            vec![0f32; m * d]
        } else {
            Vec::new()
        };
        let (objective_fn, target) = (self.cfg.objective, self.cfg.criterion.target());
        for _ in 0..samples {
            // The labels are the checked problem's: checking them again would read them
            // back from the device, a wait in the middle of every step.
            let p = probe_with(self.problem.model, &input, want_grad, |logits| {
                objective_values(objective_fn, target, logits, &ys, (m, k))
            })?;
            accumulate(&mut probs, &crate::batch::probabilities(&p.logits)?);
            let values = p.values.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for (o, v) in objective.iter_mut().zip(values) {
                *o += v / samples as f64;
            }
            if let Some(gr) = p.grad {
                let gr = gr.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                for (a, v) in grad.iter_mut().zip(gr) {
                    *a += v / samples as f32;
                }
            }
        }
        let probs: Vec<f32> = probs.iter().map(|p| (p / samples as f64) as f32).collect();
        let success = (0..m)
            .map(|j| {
                self.cfg
                    .criterion
                    .is_success(&probs[j * k..(j + 1) * k], labels[j])
            })
            .collect();
        let objective = objective
            .into_iter()
            .map(|o| if o.is_nan() { f64::NEG_INFINITY } else { o })
            .collect();
        Ok(Eval {
            objective,
            success,
            grad,
        })
    }
}

/// The per-example arithmetic of a step, without the model: what the worker threads
/// share.
#[derive(Clone, Copy)]
struct Update<'a> {
    cfg: &'a Pgd,
    mask: Option<&'a [f64]>,
    batch: &'a Batch,
}

impl Update<'_> {
    /// The normalised ascent direction at `adv` from the raw gradient `grad` (one
    /// example): non-finite entries and masked coordinates are zeroed, as are entries
    /// pushing a coordinate that sits on a bound further out (their step would be
    /// clipped away, and for sparse L1 steps would waste the step's budget).
    fn direction(&self, grad: &[f32], adv: &[f32], out: &mut [f64]) {
        let (lo, hi) = (self.batch.bounds.lo, self.batch.bounds.hi);
        for (c, o) in out.iter_mut().enumerate() {
            let mut v = grad[c] as f64;
            if !v.is_finite() {
                v = 0.0;
            }
            if let Some(mask) = self.mask {
                v *= mask[c];
            }
            if (adv[c] >= hi && v > 0.0) || (adv[c] <= lo && v < 0.0) {
                v = 0.0;
            }
            *o = v;
        }
        self.cfg.norm.normalize(out);
    }

    /// Makes `delta` feasible for example `i` and writes x + δ into `out`: mask, box,
    /// ε-ball, box; then rounds each coordinate to f32 *towards* x, so that the stored
    /// point satisfies |x_adv − x| ≤ |δ| coordinate-wise and every norm bound holds
    /// exactly for the f32 values.
    fn finish(&self, i: usize, delta: &mut [f64], eps: f64, out: &mut [f32]) {
        if let Some(mask) = self.mask {
            delta.iter_mut().zip(mask).for_each(|(v, m)| *v *= m);
        }
        self.batch.clamp_box(i, delta);
        self.cfg.norm.project(delta, eps);
        self.batch.clamp_box(i, delta);
        self.batch.store(i, delta, out);
    }
}

/// The objective's per-example values at `logits`, which must be (M, K) for `mk`.
fn objective_values(
    objective: crate::objective::Objective,
    target: Option<u32>,
    logits: &Tensor,
    ys: &Tensor,
    (m, k): (usize, usize),
) -> Result<Tensor> {
    if logits.dims() != [m, k] {
        return Err(Error::Input(format!(
            "the model returned logits of shape {:?} for a batch of {m} ({k} classes expected)",
            logits.dims()
        )));
    }
    objective.values(logits, ys, target)
}

/// Examples per parallel task: about 32,768 coordinates each, so that a small problem
/// (few examples, small inputs) stays on one thread.
pub(crate) fn rows_per_task(d: usize) -> usize {
    ((1usize << 15) / d.max(1)).max(1)
}

/// Offers each point of `evaluated` to the record (NaN objectives arrive as −∞).
fn offer(record: &mut Record, active: &[usize], adv: &[f32], evaluated: &Eval, d: usize) {
    for (j, &i) in active.iter().enumerate() {
        record.offer(
            i,
            &adv[j * d..(j + 1) * d],
            evaluated.success[j],
            evaluated.objective[j],
        );
    }
}

fn accumulate(sum: &mut [f64], values: &[f32]) {
    for (s, v) in sum.iter_mut().zip(values) {
        *s += *v as f64;
    }
}

/// Keeps the rows (of `width` entries) whose `keep` flag is set.
fn retain<T: Copy>(v: &mut Vec<T>, width: usize, keep: &[bool]) {
    if v.is_empty() {
        return;
    }
    let mut out = Vec::with_capacity(v.len());
    for (row, &k) in v.chunks(width).zip(keep) {
        if k {
            out.extend_from_slice(row);
        }
    }
    *v = out;
}

/// The f32 next to `a` in the direction of `x` (`a` itself when equal).
pub(crate) fn next_toward(a: f32, x: f32) -> f32 {
    if a == x || a.is_nan() {
        return a;
    }
    let up = x > a;
    if a == 0.0 {
        let tiny = f32::from_bits(1);
        return if up { tiny } else { -tiny };
    }
    let bits = a.to_bits();
    let away_from_zero = (a > 0.0) == up;
    f32::from_bits(if away_from_zero { bits + 1 } else { bits - 1 })
}

pub(crate) mod device;

/// Runs `f` with the thread-local switch `flag` on, and puts it back as it was however
/// `f` ends (the `with_…` functions of the loops and of the tests).
pub(crate) fn with_switch<R>(
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(&'static std::thread::LocalKey<std::cell::Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|c| c.replace(true)));
    f()
}

/// `values` (row-major) as a tensor of `shape` on `dev`: the random starts and rows
/// the device loops upload, through page-locked staging on a GPU where it is switched
/// on (`rampart_data::upload`), which does not wait for the device's earlier work.
#[cfg(feature = "cuda")]
pub(crate) fn upload<T: rampart_data::upload::Element>(
    values: Vec<T>,
    shape: impl Into<candle_core::Shape>,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    Ok(rampart_data::upload::tensor(values, shape, dev)?)
}

/// `values` (row-major) as a tensor of `shape` on `dev` (a build without CUDA).
#[cfg(not(feature = "cuda"))]
pub(crate) fn upload<T: candle_core::WithDType>(
    values: Vec<T>,
    shape: impl Into<candle_core::Shape>,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, dev)?)
}

#[cfg(feature = "cuda")]
mod device_cuda;
pub(crate) mod graph;
pub(crate) mod launch;
pub(crate) mod resident;

pub use resident::with_seed_on_device;
pub(crate) use resident::{perturb_on_device_or_host, unchecked_on_device_or_host};

pub use device::{device_resident_pgd_runs, with_device_resident_pgd};
#[cfg(feature = "cuda")]
pub use device_cuda::ptx as device_kernels_ptx;
pub use graph::{cuda_graph_failure, cuda_graph_steps, with_cuda_graphs};
#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod emulated_tests;
#[cfg(test)]
mod resident_tests;
#[cfg(test)]
mod tests;
