//! FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), in its targeted
//! form FAB-T as used by AutoAttack: a minimum-norm attack that repeatedly projects
//! onto the linearised decision boundary towards one target class, biased towards the
//! clean input.

use candle_core::ModuleT;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::base::Attack;
use crate::batch::{ranked, Batch, Loss};
use crate::engine::rows_per_task;
use crate::error::{Error, Result};
use crate::norm::{standard_normal, Norm};
use crate::problem::{Outcome, Problem};
use crate::repeated::{repeat, Record, Rows, SingleRun, Start};

/// FAB-T: per example and target class t (the 2nd, 3rd, … most likely classes at the
/// clean input x₀), `steps` iterations of
///
/// ```text
/// linearise g(z) = f_t(z) − f_y(z) at x_k:  g(x_k) + ∇g(x_k)·(z − x_k) = 0      (hyperplane π)
/// d₁ = minimal-norm step from x_k onto π within the box, d₂ = the same from x₀
/// α  = min(‖d₁‖ / (‖d₁‖ + ‖d₂‖), α_max)
/// x_k+1 = clip((1 − α)(x_k + η·d₁) + α(x₀ + η·d₂))
/// if x_k+1 is misclassified: keep it if it is the smallest adversarial so far, then
///     x_k+1 ← x₀ + β(x_k+1 − x₀)                                      (backward step)
/// ```
///
/// The projections onto π ∩ box are exact for L∞, L2 and L1 (sorting-based, O(D log D);
/// see `project_hyperplane_box`). As in AutoAttack, each target class is run only on the
/// examples without an adversarial of norm ≤ ε yet, restarts after the first start at a
/// random point at distance ε/2, and only correctly classified examples are attacked.
///
/// The result for ε: `unconstrained` is the smallest adversarial input found (of any
/// norm; the clean input if none was found), `clipped` is that point if its norm is
/// at most ε, otherwise its projection onto the ε-ball ∩ box; `success` is judged on
/// `clipped`. Deterministic models only: FAB takes no EOT samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fab {
    /// Threat model: L∞, L2 or L1.
    pub norm: Norm,
    /// Target classes tried per example, most likely first (clamped to K − 1).
    pub target_classes: usize,
    /// Iterations per run (≥ 1).
    pub steps: usize,
    /// Runs per target class (≥ 1); runs after the first start at random points.
    pub restarts: usize,
    /// Largest weight α_max of the step from the clean input, in [0, 1].
    pub alpha_max: f64,
    /// Overshoot η ≥ 1 of the projection steps.
    pub eta: f64,
    /// Backward step β in (0, 1] after an adversarial point is found.
    pub beta: f64,
}

impl Fab {
    /// FAB-T as in AutoAttack's standard version: 9 target classes, 100 steps, one run
    /// each, α_max = 0.1, η = 1.05, β = 0.9.
    pub fn targeted(norm: Norm) -> Fab {
        Fab {
            norm,
            target_classes: 9,
            steps: 100,
            restarts: 1,
            alpha_max: 0.1,
            eta: 1.05,
            beta: 0.9,
        }
    }

    /// Refuses an inconsistent configuration.
    pub fn validate(&self) -> Result<()> {
        let refuse = |msg: String| Err(Error::Config(msg));
        self.norm.validate()?;
        if matches!(self.norm, Norm::L0) {
            return refuse("FAB supports the L∞, L2 and L1 threat models, not L0".into());
        }
        if self.steps == 0 || self.restarts == 0 || self.target_classes == 0 {
            return refuse(format!(
                "FAB needs at least one step, run and target class, got {}, {} and {}",
                self.steps, self.restarts, self.target_classes
            ));
        }
        if !(0.0..=1.0).contains(&self.alpha_max) {
            return refuse(format!("α_max must lie in [0, 1], got {}", self.alpha_max));
        }
        if !(self.eta.is_finite() && self.eta >= 1.0) {
            return refuse(format!("η must be finite and ≥ 1, got {}", self.eta));
        }
        if !(self.beta > 0.0 && self.beta <= 1.0) {
            return refuse(format!("β must lie in (0, 1], got {}", self.beta));
        }
        Ok(())
    }

    /// One run towards `targets` (per attacked example) on the examples `idx`.
    #[allow(clippy::too_many_arguments)]
    fn single_run(
        &self,
        model: &dyn ModuleT,
        batch: &Batch,
        idx: &[usize],
        targets: &[u32],
        runs: &[u64],
        random_start: Option<(u64, f64)>,
        eps: f64,
        record: &mut Record,
    ) -> Result<()> {
        let (m, d) = (idx.len(), batch.d);
        let norm = self.norm;
        let mut x1 = vec![0f32; m * d];
        let mut delta = vec![0f64; d];
        for (j, &i) in idx.iter().enumerate() {
            let row = j * d..(j + 1) * d;
            match random_start {
                None => x1[row].copy_from_slice(batch.row(i)),
                Some((seed, eps)) => {
                    let mut rng = batch.rng(seed, runs[j], i);
                    for v in delta.iter_mut() {
                        *v = match norm {
                            Norm::Linf => rng.gen_range(-1.0..=1.0),
                            _ => standard_normal(&mut rng),
                        };
                    }
                    let scale = 0.5 * eps / norm.measure(&delta).max(1e-12);
                    delta.iter_mut().for_each(|v| *v *= scale);
                    batch.clamp_box(i, &mut delta);
                    batch.store(i, &delta, &mut x1[row]);
                }
            }
        }
        let mut df = vec![0f64; m];
        let mut dg = vec![0f32; m * d];
        let mut valid = vec![false; m];
        let mut expect_adversarial = vec![false; m];
        for step in 0..self.steps {
            let stale: Vec<usize> = (0..m).filter(|&j| !valid[j]).collect();
            if !stale.is_empty() {
                let (values, grad, _) =
                    self.linearise(model, batch, idx, targets, &stale, &x1, true)?;
                for (r, &j) in stale.iter().enumerate() {
                    df[j] = values[r];
                    dg[j * d..(j + 1) * d].copy_from_slice(&grad[r * d..(r + 1) * d]);
                }
            }
            // Every example's step on its own rows, examples in parallel (the same
            // arithmetic whatever the threads).
            x1.par_chunks_mut(d)
                .zip(dg.par_chunks(d).zip(df.par_iter()))
                .zip(idx.par_iter())
                .with_min_len(rows_per_task(d))
                .for_each_init(
                    || Scratch::new(d),
                    |sc, ((x1, (dg, &df)), &i)| self.step(batch, i, (x1, dg, df), sc),
                );
            for &i in idx {
                record.count_step(i);
            }
            // Misclassified yet? An example whose last step ended adversarial will likely
            // be moved back again, so a forward pass suffices; the others also get the
            // gradient they need for the next step if they stay on the correct side.
            let last = step + 1 == self.steps;
            for with_grad in [true, false] {
                let which: Vec<usize> = (0..m)
                    .filter(|&j| (!expect_adversarial[j] && !last) == with_grad)
                    .collect();
                if which.is_empty() {
                    continue;
                }
                let (values, grad, adversarial) =
                    self.linearise(model, batch, idx, targets, &which, &x1, with_grad)?;
                for (r, &j) in which.iter().enumerate() {
                    let i = idx[j];
                    let row = j * d..(j + 1) * d;
                    expect_adversarial[j] = adversarial[r];
                    valid[j] = false;
                    if adversarial[r] {
                        // The smallest adversarial point wins: one within ε beats
                        // any outside, then the smaller norm (−norm is the objective).
                        let dist = batch.distance(norm, i, &x1[row.clone()]);
                        record.offer(i, &x1[row.clone()], dist <= eps, -dist);
                        batch.delta(i, &x1[row.clone()], &mut delta);
                        delta.iter_mut().for_each(|v| *v *= self.beta);
                        batch.store(i, &delta, &mut x1[row]);
                    } else if with_grad {
                        df[j] = values[r];
                        dg[row].copy_from_slice(&grad[r * d..(r + 1) * d]);
                        valid[j] = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// One step of example `i` from its point `x1` (D values, rewritten) with the
    /// linearisation g(x_k) = `df`, ∇g(x_k) = `dg`: the minimal steps onto the hyperplane
    /// ∩ box from x_k and from x₀, their combination biased towards x₀, clipped to the
    /// box and stored rounded towards x₀.
    fn step(
        &self,
        batch: &Batch,
        i: usize,
        (x1, dg, df): (&mut [f32], &[f32], f64),
        sc: &mut Scratch,
    ) {
        let norm = self.norm;
        let x0 = batch.row(i);
        for (wc, &g) in sc.w.iter_mut().zip(dg) {
            *wc = if g.is_finite() { g as f64 } else { 0.0 };
        }
        let (lo, hi) = (batch.bounds.lo as f64, batch.bounds.hi as f64);
        // From x_k: w·d₁ = −g(x_k).
        for ((l, u), &xk) in sc.lower.iter_mut().zip(sc.upper.iter_mut()).zip(x1.iter()) {
            *l = lo - xk as f64;
            *u = hi - xk as f64;
        }
        project_hyperplane_box(norm, &sc.w, -df, &sc.lower, &sc.upper, &mut sc.d1);
        // From x₀: w·(x₀ + d₂ − x_k) = −g(x_k).
        let mut shift = 0.0;
        for ((&w, &a), &xk) in sc.w.iter().zip(x0).zip(x1.iter()) {
            shift += w * (a as f64 - xk as f64);
        }
        batch.box_room(i, &mut sc.lower, &mut sc.upper);
        project_hyperplane_box(norm, &sc.w, -df - shift, &sc.lower, &sc.upper, &mut sc.d2);
        let a1 = norm.measure(&sc.d1).max(1e-8);
        let a2 = norm.measure(&sc.d2).max(1e-8);
        let alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max);
        let steps = sc.d1.iter().zip(&sc.d2);
        for ((dc, (&d1, &d2)), (&xk, &a)) in sc.delta.iter_mut().zip(steps).zip(x1.iter().zip(x0)) {
            let from_k = xk as f64 + self.eta * d1;
            let from_0 = a as f64 + self.eta * d2;
            let next = ((1.0 - alpha) * from_k + alpha * from_0).clamp(lo, hi);
            *dc = next - a as f64;
        }
        batch.store(i, &sc.delta, x1);
    }

    /// g = f_t − f_y, its input gradient (if `want_grad`) and misclassification at the
    /// rows `points` of the attacked examples `which` (positions in `idx`).
    #[allow(clippy::too_many_arguments)]
    fn linearise(
        &self,
        model: &dyn ModuleT,
        batch: &Batch,
        idx: &[usize],
        targets: &[u32],
        which: &[usize],
        points: &[f32],
        want_grad: bool,
    ) -> Result<(Vec<f64>, Vec<f32>, Vec<bool>)> {
        let d = batch.d;
        let sub: Vec<usize> = which.iter().map(|&j| idx[j]).collect();
        let t: Vec<u32> = which.iter().map(|&j| targets[j]).collect();
        let mut rows = Vec::with_capacity(which.len() * d);
        for &j in which {
            rows.extend_from_slice(&points[j * d..(j + 1) * d]);
        }
        let p = batch.probe(model, &sub, &rows, Loss::TargetMargin(&t), 1, want_grad)?;
        let adversarial = batch.fooled_each(&p.probs, sub.iter().copied());
        Ok((p.values, p.grad, adversarial))
    }
}

/// Reused per-example buffers of [`Fab::step`].
struct Scratch {
    w: Vec<f64>,
    d1: Vec<f64>,
    d2: Vec<f64>,
    lower: Vec<f64>,
    upper: Vec<f64>,
    delta: Vec<f64>,
}

impl Scratch {
    fn new(d: usize) -> Scratch {
        Scratch {
            w: vec![0.0; d],
            d1: vec![0.0; d],
            d2: vec![0.0; d],
            lower: vec![0.0; d],
            upper: vec![0.0; d],
            delta: vec![0.0; d],
        }
    }
}

impl Attack for Fab {
    fn norm(&self) -> Norm {
        self.norm
    }

    fn validate(&self) -> Result<()> {
        Fab::validate(self)
    }

    /// `restarts` runs per target class, each on the examples without an adversarial
    /// point within ε yet.
    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        repeat(self, self.restarts, problem, eps, seed)
    }
}

impl SingleRun for Fab {
    /// Judges the clean inputs (only correctly classified examples are attacked) and
    /// targets each example's 2nd, 3rd, … most likely classes there.
    fn begin(&self, problem: &Problem<'_>) -> Result<Start> {
        let batch = &problem.batch;
        let (b, k) = (batch.len(), batch.classes);
        let (logits, probs) = batch.forward(problem.model, &batch.x, b, 1)?;
        let fooled = batch.fooled_each(&probs, 0..b);
        let ranks = (0..b)
            .map(|i| ranked(&logits[i * k..(i + 1) * k]))
            .collect();
        Ok(Start::targeted(
            fooled,
            ranks,
            self.target_classes.min(k - 1),
        ))
    }

    /// One run per row towards its target class; runs after the first restart start
    /// at a random point at distance ε/2. Target classes run side by side (each
    /// example copied once per target of a group, up to `MERGED_ROWS` rows): the model
    /// sees larger batches, which a CPU processes several times faster per example.
    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
        let targets = rows.targets().ok_or_else(|| {
            Error::Config("FAB-T runs towards target classes, none were given".into())
        })?;
        let eps = rows.eps();
        let random_start = (rows.restart() > 0).then_some((rows.seed(), eps));
        self.single_run(
            problem.model,
            &problem.batch,
            rows.examples(),
            targets,
            rows.runs(),
            random_start,
            eps,
            record,
        )
    }

    /// The smallest adversarial point found, of any norm.
    fn unconstrained(&self) -> bool {
        true
    }
}

/// The minimal-norm δ with w·δ = c and lower ≤ δ ≤ upper (lower ≤ 0 ≤ upper), into
/// `out`. When the box cannot reach the hyperplane, the box corner that gets closest
/// (largest w·δ in the direction of c). Exact, by sorting (FAB's projection step):
///
/// * L2: δ_i = clip(λ·w_i), the λ ≥ 0 found between the sorted saturation points;
/// * L∞: δ_i = sign(c·w_i)·min(τ, room_i), τ found between the sorted rooms;
/// * L1: coordinates filled to their room in decreasing |w_i| (a fractional knapsack).
pub(crate) fn project_hyperplane_box(
    norm: Norm,
    w: &[f64],
    c: f64,
    lower: &[f64],
    upper: &[f64],
    out: &mut [f64],
) {
    out.fill(0.0);
    if c == 0.0 || !c.is_finite() {
        return;
    }
    let target = c.abs();
    // Coordinates that can move towards the hyperplane: direction, |w_i| and room.
    let mut coords: Vec<(usize, f64, f64, f64)> = Vec::new();
    for i in 0..w.len() {
        if w[i] == 0.0 || !w[i].is_finite() {
            continue;
        }
        let dir = (w[i] * c).signum();
        let room = if dir > 0.0 { upper[i] } else { -lower[i] };
        if room > 0.0 {
            coords.push((i, dir, w[i].abs(), room));
        }
    }
    match norm {
        Norm::L1 { .. } => {
            coords.sort_unstable_by(|a, b| b.2.total_cmp(&a.2));
            let mut left = target;
            for &(i, dir, a, room) in &coords {
                if a * room >= left {
                    out[i] = dir * (left / a).min(room);
                    break;
                }
                out[i] = dir * room;
                left -= a * room;
            }
        }
        Norm::Linf | Norm::L2 => {
            // Breakpoint of coordinate i: the parameter at which it reaches its room.
            let key = |&(_, _, a, room): &(usize, f64, f64, f64)| match norm {
                Norm::L2 => room / a,
                _ => room,
            };
            coords.sort_unstable_by(|p, q| key(p).total_cmp(&key(q)));
            // rate[j]: Σ_{l ≥ j} a_l² (L2) or a_l (L∞), the slope while j.. are free.
            let mut rate = vec![0f64; coords.len() + 1];
            for j in (0..coords.len()).rev() {
                let a = coords[j].2;
                rate[j] = rate[j + 1] + if norm == Norm::L2 { a * a } else { a };
            }
            let mut saturated = 0.0;
            let mut param = f64::INFINITY;
            for (j, p) in coords.iter().enumerate() {
                let reach = saturated + key(p) * rate[j];
                if reach >= target {
                    param = (target - saturated) / rate[j];
                    break;
                }
                saturated += p.2 * p.3;
            }
            for &(i, dir, a, room) in &coords {
                let amount = match norm {
                    Norm::L2 => (param * a).min(room),
                    _ => param.min(room),
                };
                out[i] = dir * amount;
            }
        }
        Norm::L0 => {}
    }
}

#[cfg(test)]
mod tests;
