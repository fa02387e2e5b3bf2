//! Auto-PGD (Croce & Hein, ICML 2020): PGD without a step-size parameter. The step
//! starts at 2ε (L∞, L2) and is halved at checkpoints when progress stalls; a
//! momentum term smooths the steps; every run returns its best point. L1-APGD follows
//! Croce & Hein (ICML 2021, "Mind the box"): sparse sign steps whose sparsity adapts,
//! the exact projection onto the L1 ball ∩ box, and an optional 3ε → 2ε → ε schedule.

use candle_core::ModuleT;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::base::Attack;
use crate::batch::{ranked, Batch, Loss};
use crate::engine::rows_per_task;
use crate::eot::Eot;
use crate::error::{Error, Result};
use crate::norm::{project_l1_box, sign, standard_normal, Norm};
use crate::objective::Objective;
use crate::problem::{Outcome, Problem};
use crate::repeated::{repeat, Record, Rows, SingleRun, Start};

/// Auto-PGD. Success is misclassification (first arg-max ≠ label), as in AutoAttack.
///
/// Per run and example: a random start on the ε-sphere (L1: a Gaussian projected onto
/// the ball ∩ box), then `steps` iterations of
///
/// ```text
/// z      = P(x_k + η·s(∇))                            s: sign (L∞), ∇/‖∇‖₂ (L2)
/// x_k+1  = P(x_k + α(z − x_k) + (1 − α)(x_k − x_k−1))  α = 1 at the first step
/// ```
///
/// with P the projection onto the ε-ball, then the box. Checkpoints fall after
/// 22 %, then shrinking intervals (−3 % each, at least 6 %) of the steps; at a
/// checkpoint η is halved and the iterate reset to the highest-objective point when
/// (1) at most ρ of the steps since the last checkpoint increased the objective, or
/// (2) η was not halved at the last checkpoint and the best objective has not improved
/// since. L1 steps move the top-k coordinates of the gradient by η/k each, with k and
/// η adapted at checkpoints every 4 % of the steps (Croce & Hein 2021).
///
/// Targeted objectives ([`Objective::DlrTargeted`], [`Objective::CrossEntropyTargeted`])
/// are run once per target class: the 2nd, 3rd, … most likely classes at the clean
/// input (`target_classes` of them, at most K − 1), each run only on the examples still
/// robust. Restarts likewise only attack examples still robust, and a run stops
/// attacking an example once it is fooled.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Apgd {
    /// Threat model: L∞, L2 or L1 (the L1 `top_k` is unused: APGD adapts its sparsity).
    pub norm: Norm,
    /// Objective maximised (any but `distal`).
    pub objective: Objective,
    /// Targeted objectives: number of target classes tried per example (clamped to
    /// K − 1). Ignored for untargeted objectives.
    pub target_classes: usize,
    /// Iterations per run (≥ 1).
    pub steps: usize,
    /// Runs from fresh random starts (per target class), each on the examples still
    /// robust (≥ 1).
    pub restarts: usize,
    /// ρ of checkpoint condition (1), in (0, 1]: the step is halved when at most this
    /// share of the steps since the last checkpoint increased the objective.
    pub rho: f64,
    /// α, the weight of the new step (1 − α weights the previous step, the momentum),
    /// in (0, 1]. Unused by L1 steps, which have no momentum.
    pub alpha: f64,
    /// L1 only: 30 % of the steps at 3ε, 30 % at 2ε and 40 % at ε, each phase starting
    /// from the best point of the last ("use_largereps" of the official code).
    pub large_eps_warmup: bool,
    /// Gradient and judgement samples for stochastic models.
    pub eot: Eot,
}

impl Apgd {
    fn autoattack(norm: Norm, objective: Objective) -> Apgd {
        Apgd {
            norm,
            objective,
            target_classes: 9,
            steps: 100,
            restarts: 1,
            rho: 0.75,
            alpha: 0.75,
            large_eps_warmup: false,
            eot: Eot::OFF,
        }
    }

    /// APGD-CE as in AutoAttack's standard version: 100 steps, one run (L1: five runs
    /// with the 3ε → 2ε → ε schedule).
    pub fn ce(norm: Norm) -> Apgd {
        match norm {
            Norm::L1 { .. } => Apgd {
                restarts: 5,
                large_eps_warmup: true,
                ..Apgd::autoattack(norm, Objective::CrossEntropy)
            },
            _ => Apgd::autoattack(norm, Objective::CrossEntropy),
        }
    }

    /// APGD-DLR (untargeted DLR loss), 100 steps, one run: the second attack of
    /// AutoAttack's `rand` version. Needs K ≥ 3.
    pub fn dlr(norm: Norm) -> Apgd {
        Apgd::autoattack(norm, Objective::Dlr)
    }

    /// APGD-T as in AutoAttack's standard version: targeted DLR, 100 steps, one run per
    /// target class over the 9 most likely wrong classes (L1: 5 classes with the
    /// 3ε → 2ε → ε schedule). Needs K ≥ 4.
    pub fn dlr_targeted(norm: Norm) -> Apgd {
        match norm {
            Norm::L1 { .. } => Apgd {
                target_classes: 5,
                large_eps_warmup: true,
                ..Apgd::autoattack(norm, Objective::DlrTargeted)
            },
            _ => Apgd::autoattack(norm, Objective::DlrTargeted),
        }
    }

    /// Refuses an inconsistent configuration.
    pub fn validate(&self) -> Result<()> {
        let refuse = |msg: String| Err(Error::Config(msg));
        self.norm.validate()?;
        self.eot.validate()?;
        if matches!(self.norm, Norm::L0) {
            return refuse("APGD supports the L∞, L2 and L1 threat models, not L0".into());
        }
        if self.objective == Objective::Distal {
            return refuse("APGD attacks a label; the `distal` objective has none".into());
        }
        if self.steps == 0 || self.restarts == 0 {
            return refuse(format!(
                "APGD needs at least one step and one run, got {} steps and {} runs",
                self.steps, self.restarts
            ));
        }
        if self.objective.is_targeted() && self.target_classes == 0 {
            return refuse(format!(
                "objective `{}` is targeted and needs target_classes ≥ 1",
                self.objective
            ));
        }
        if !(self.rho > 0.0 && self.rho <= 1.0) {
            return refuse(format!("ρ must lie in (0, 1], got {}", self.rho));
        }
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return refuse(format!("α must lie in (0, 1], got {}", self.alpha));
        }
        if self.large_eps_warmup && !matches!(self.norm, Norm::L1 { .. }) {
            return refuse("the 3ε → 2ε → ε schedule is defined for L1 only".into());
        }
        if self.large_eps_warmup && self.steps < 3 {
            return refuse("the 3ε → 2ε → ε schedule needs at least 3 steps".into());
        }
        Ok(())
    }

    /// Refuses a model with too few classes for the objective.
    pub(crate) fn check_classes(&self, classes: usize) -> Result<()> {
        let target = self.objective.is_targeted().then_some(0);
        self.objective.check_classes(classes, target)
    }

    /// Number of target classes used with K classes (1 pass for untargeted objectives).
    fn passes(&self, classes: usize) -> usize {
        if self.objective.is_targeted() {
            self.target_classes.min(classes - 1)
        } else {
            1
        }
    }
}

impl Attack for Apgd {
    fn norm(&self) -> Norm {
        self.norm
    }

    fn eval_samples(&self) -> usize {
        self.eot.eval_samples
    }

    fn validate(&self) -> Result<()> {
        Apgd::validate(self)
    }

    /// Refuses a model with too few classes for the objective.
    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        self.check_classes(problem.classes())
    }

    /// `restarts` runs (per target class), each on the examples still robust.
    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        repeat(self, self.restarts, problem, eps, seed)
    }
}

impl SingleRun for Apgd {
    /// Judges the clean inputs; targeted objectives target each example's 2nd, 3rd, …
    /// most likely classes there.
    fn begin(&self, problem: &Problem<'_>) -> Result<Start> {
        let batch = &problem.batch;
        let (b, k) = (batch.len(), batch.classes);
        let (logits, probs) = batch.forward(problem.model, &batch.x, b, self.eot.eval_samples)?;
        let fooled = batch.fooled_each(&probs, 0..b);
        if !self.objective.is_targeted() {
            return Ok(Start::untargeted(fooled));
        }
        let ranks = (0..b)
            .map(|i| ranked(&logits[i * k..(i + 1) * k]))
            .collect();
        Ok(Start::targeted(fooled, ranks, self.passes(k)))
    }

    /// One run (all phases) on `rows`. Targeted passes run side by side: each
    /// still-robust example is copied once per target of a group, so the model sees
    /// batches of up to `MERGED_ROWS` rows instead of a few examples per pass (small
    /// batches are several times slower per example on a CPU); an example fooled by
    /// any target stops all its copies.
    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
        let run = Run {
            cfg: self,
            model: problem.model,
            batch: &problem.batch,
            idx: rows.examples(),
            targets: rows.targets(),
            runs: rows.runs(),
        };
        run.run(rows.eps(), rows.seed(), record)
    }
}

/// An L∞ or L2 run's random start before the box: a uniform (L∞) or Gaussian (L2)
/// draw from `rng`, scaled to norm `eps` and projected onto the ε-ball.
pub(crate) fn start_delta(norm: Norm, eps: f64, rng: &mut impl Rng, delta: &mut [f64]) {
    match norm {
        Norm::Linf => delta
            .iter_mut()
            .for_each(|v| *v = rng.gen_range(-1.0..=1.0)),
        _ => delta.iter_mut().for_each(|v| *v = standard_normal(rng)),
    }
    let scale = eps / (norm.measure(delta) + 1e-12);
    delta.iter_mut().for_each(|v| *v *= scale);
    norm.project(delta, eps);
}

/// Lengths of the checkpoint intervals of an `n`-step run (L∞, L2): the first
/// interval, its decrement and its minimum (22 %, 3 %, 6 % of `n`, each at least one
/// step), as in the official implementation.
pub(crate) fn checkpoint_intervals(n: usize) -> (usize, usize, usize) {
    let part = |f: f64| ((f * n as f64) as usize).max(1);
    (part(0.22), part(0.03), part(0.06))
}

/// The iterations (1-based counts of steps taken) after which an `n`-step L∞/L2 run
/// checks its step size: p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06).
pub(crate) fn checkpoints(n: usize) -> Vec<usize> {
    let (mut k, decrement, min) = checkpoint_intervals(n);
    let mut at = Vec::new();
    let mut t = k;
    while t <= n {
        at.push(t);
        k = k.saturating_sub(decrement).max(min);
        t += k;
    }
    at
}

/// One run of APGD (all phases) on the examples `idx` of a batch.
struct Run<'a> {
    cfg: &'a Apgd,
    model: &'a dyn ModuleT,
    batch: &'a Batch,
    /// Batch indices of the examples attacked.
    idx: &'a [usize],
    /// Per attacked example: the target class of a targeted objective.
    targets: Option<&'a [u32]>,
    /// Per attacked example: the run number its random start is drawn for.
    runs: &'a [u64],
}

/// The per-example state of one phase.
struct State {
    adv: Vec<f32>,
    old: Vec<f32>,
    grad: Vec<f32>,
    loss: Vec<f64>,
    best_point: Vec<f32>,
    best_grad: Vec<f32>,
    best_loss: Vec<f64>,
    best_loss_last_check: Vec<f64>,
    reduced_last_check: Vec<bool>,
    increases: Vec<usize>,
    step: Vec<f64>,
    topk: Vec<f64>,
    sparsity_old: Vec<f64>,
}

impl Run<'_> {
    fn run(&self, eps: f64, seed: u64, record: &mut Record) -> Result<()> {
        if let Some(exec) = device::resident(self) {
            return device::run(exec, self, eps, seed, record);
        }
        let (cfg, batch) = (self.cfg, self.batch);
        let (m, d) = (self.idx.len(), batch.d);
        let phases: Vec<(f64, usize)> = if cfg.large_eps_warmup {
            let n = cfg.steps;
            let mut early = (0.3 * n as f64).ceil() as usize;
            if n < 2 * early + 1 {
                early = (n - 1) / 2;
            }
            vec![(3.0 * eps, early), (2.0 * eps, early), (eps, n - 2 * early)]
        } else {
            vec![(eps, cfg.steps)]
        };
        let mut start = vec![0f32; m * d];
        let mut delta = vec![0f64; d];
        let (mut lower, mut upper) = (vec![0f64; d], vec![0f64; d]);
        for (j, &i) in self.idx.iter().enumerate() {
            let mut rng = batch.rng(seed, self.runs[j], i);
            let e0 = phases[0].0;
            match cfg.norm {
                Norm::Linf | Norm::L2 => {
                    start_delta(cfg.norm, e0, &mut rng, &mut delta);
                    batch.clamp_box(i, &mut delta);
                }
                _ => {
                    delta
                        .iter_mut()
                        .for_each(|v| *v = standard_normal(&mut rng));
                    batch.box_room(i, &mut lower, &mut upper);
                    project_l1_box(&mut delta, e0, &lower, &upper);
                }
            }
            batch.store(i, &delta, &mut start[j * d..(j + 1) * d]);
        }
        let last = phases.len() - 1;
        for (p, &(e, steps)) in phases.iter().enumerate() {
            if p > 0 {
                // Start from the previous phase's best point, projected onto the smaller ball.
                for (j, &i) in self.idx.iter().enumerate() {
                    let row = j * d..(j + 1) * d;
                    batch.delta(i, &start[row.clone()], &mut delta);
                    batch.box_room(i, &mut lower, &mut upper);
                    project_l1_box(&mut delta, e, &lower, &upper);
                    batch.store(i, &delta, &mut start[row]);
                }
            }
            start = self.phase(start, e, steps, cfg.large_eps_warmup, p == last, record)?;
        }
        Ok(())
    }

    /// Objective, success and gradient at the rows `points` of the attacked examples
    /// `live` (positions in `idx`).
    fn evaluate(
        &self,
        live: &[usize],
        points: &[f32],
        want_grad: bool,
    ) -> Result<(Vec<f64>, Vec<bool>, Vec<f32>)> {
        let batch = self.batch;
        let d = batch.d;
        let idx: Vec<usize> = live.iter().map(|&j| self.idx[j]).collect();
        // Every row live (`live` is increasing): the points as they are.
        let gathered: Vec<f32>;
        let rows = if live.len() == self.idx.len() {
            points
        } else {
            gathered = live
                .iter()
                .flat_map(|&j| &points[j * d..(j + 1) * d])
                .copied()
                .collect();
            &gathered
        };
        let targets: Option<Vec<u32>> = self.targets.map(|t| live.iter().map(|&j| t[j]).collect());
        let p = batch.probe(
            self.model,
            &idx,
            rows,
            Loss::Objective(self.cfg.objective, targets.as_deref()),
            self.cfg.eot.grad_samples,
            want_grad,
        )?;
        let success = batch.fooled_each(&p.probs, idx.iter().copied());
        Ok((p.values, success, p.grad))
    }

    /// One phase at budget `eps` from the feasible points `start` (rows of the attacked
    /// examples); returns each example's highest-objective point. Steps are counted in
    /// `record`; in the `last` phase it also receives every evaluated point and stops
    /// the examples it holds as fooled.
    fn phase(
        &self,
        start: Vec<f32>,
        eps: f64,
        steps: usize,
        warm_start: bool,
        last: bool,
        record: &mut Record,
    ) -> Result<Vec<f32>> {
        let (cfg, batch) = (self.cfg, self.batch);
        let (m, d) = (self.idx.len(), batch.d);
        let l1 = matches!(cfg.norm, Norm::L1 { .. });
        let step0 = if l1 { eps } else { 2.0 * eps };
        let mut live: Vec<usize> = (0..m)
            .filter(|&j| !(last && record.is_fooled(self.idx[j])))
            .collect();
        let (loss0, success0, grad0) = self.evaluate(&live, &start, true)?;
        let mut s = State {
            adv: start.clone(),
            old: start,
            grad: vec![0f32; m * d],
            loss: vec![f64::NEG_INFINITY; m],
            best_point: Vec::new(),
            best_grad: Vec::new(),
            best_loss: Vec::new(),
            best_loss_last_check: Vec::new(),
            reduced_last_check: vec![true; m],
            increases: vec![0; m],
            step: vec![step0; m],
            topk: vec![0.2; m],
            sparsity_old: vec![d as f64; m],
        };
        for (r, &j) in live.iter().enumerate() {
            s.loss[j] = loss0[r];
            s.grad[j * d..(j + 1) * d].copy_from_slice(&grad0[r * d..(r + 1) * d]);
            if last {
                record.offer(
                    self.idx[j],
                    &s.adv[j * d..(j + 1) * d],
                    success0[r],
                    loss0[r],
                );
            }
            if warm_start && l1 {
                let l0 = self.sparsity(j, &s.adv);
                s.topk[j] = l0 / d as f64 / 1.5;
                s.sparsity_old[j] = l0;
            }
        }
        s.best_point = s.adv.clone();
        s.best_grad = s.grad.clone();
        s.best_loss = s.loss.clone();
        s.best_loss_last_check = s.loss.clone();
        let marks = if l1 {
            let every = ((0.04 * steps as f64) as usize).max(1);
            (1..=steps).filter(|c| c % every == 0).collect()
        } else {
            checkpoints(steps)
        };
        let mut next_mark = 0;
        let mut last_mark = 0;
        let proposer = Proposer {
            cfg,
            batch,
            idx: self.idx,
            reference: false,
        };
        let mut next = vec![0f32; m * d];
        let mut is_live = vec![false; m];
        for t in 0..steps {
            if last {
                live.retain(|&j| !record.is_fooled(self.idx[j]));
            }
            if live.is_empty() {
                break;
            }
            let a = if t == 0 { 1.0 } else { cfg.alpha };
            // Every live example's proposal from the current state, examples in
            // parallel (each reads and writes its own rows only); then the current
            // points become the old ones and the proposals the current ones.
            is_live.iter_mut().for_each(|l| *l = false);
            live.iter().for_each(|&j| is_live[j] = true);
            next.par_chunks_mut(d)
                .enumerate()
                .with_min_len(rows_per_task(d))
                .for_each_init(
                    || (Scratch::new(d), vec![0f64; d]),
                    |(scratch, delta), (j, out)| {
                        if is_live[j] {
                            proposer.propose(j, &s, eps, a, scratch, delta);
                            batch.store(self.idx[j], delta, out);
                        }
                    },
                );
            // The current points become the old ones and the proposals the current
            // ones: the buffers change places. Rows of examples no longer live then
            // hold stale values, which nothing reads again (an example stops for the
            // rest of the phase).
            std::mem::swap(&mut s.old, &mut s.adv);
            std::mem::swap(&mut s.adv, &mut next);
            let want_grad = t + 1 < steps;
            let (loss, success, mut grad) = self.evaluate(&live, &s.adv, want_grad)?;
            // With every row live the new gradients are the state's, moved in.
            let moved = want_grad && live.len() == m;
            if moved {
                std::mem::swap(&mut s.grad, &mut grad);
            }
            for (r, &j) in live.iter().enumerate() {
                let row = j * d..(j + 1) * d;
                let i = self.idx[j];
                record.count_step(i);
                if last {
                    record.offer(i, &s.adv[row.clone()], success[r], loss[r]);
                }
                if loss[r] > s.loss[j] {
                    s.increases[j] += 1;
                }
                s.loss[j] = loss[r];
                if want_grad && !moved {
                    s.grad[row.clone()].copy_from_slice(&grad[r * d..(r + 1) * d]);
                }
                if loss[r] > s.best_loss[j] {
                    s.best_loss[j] = loss[r];
                    s.best_point[row.clone()].copy_from_slice(&s.adv[row.clone()]);
                    if want_grad {
                        // The row's new gradient, copied or moved in above.
                        s.best_grad[row.clone()].copy_from_slice(&s.grad[row.clone()]);
                    }
                }
            }
            if marks.get(next_mark) == Some(&(t + 1)) {
                let interval = t + 1 - last_mark;
                for &j in &live {
                    if l1 {
                        self.check_l1(j, &mut s, eps);
                    } else {
                        self.check(j, &mut s, interval);
                    }
                    s.increases[j] = 0;
                }
                last_mark = t + 1;
                next_mark += 1;
            }
        }
        Ok(s.best_point)
    }

    /// L∞/L2 checkpoint of example `j` after an interval of `interval` steps.
    fn check(&self, j: usize, s: &mut State, interval: usize) {
        let oscillating = s.increases[j] as f64 <= self.cfg.rho * interval as f64;
        let stalled = !s.reduced_last_check[j] && s.best_loss_last_check[j] >= s.best_loss[j];
        let reduce = oscillating || stalled;
        s.reduced_last_check[j] = reduce;
        s.best_loss_last_check[j] = s.best_loss[j];
        if reduce {
            s.step[j] /= 2.0;
            self.reset_to_best(j, s);
        }
    }

    /// L1 checkpoint: adapt the sparsity k of the steps to that of the best point; if it
    /// shrank by more than 5 %, restart from the best point at the full step size,
    /// otherwise shrink the step by 1.5 (within [ε/10, ε]).
    fn check_l1(&self, j: usize, s: &mut State, eps: f64) {
        let d = self.batch.d as f64;
        let sparsity = self.sparsity(j, &s.best_point);
        let reduced = sparsity / s.sparsity_old[j] < 0.95;
        s.topk[j] = sparsity / d / 1.5;
        s.step[j] = if reduced { eps } else { s.step[j] / 1.5 };
        s.step[j] = s.step[j].clamp(eps / 10.0, eps);
        s.sparsity_old[j] = sparsity;
        if reduced {
            self.reset_to_best(j, s);
        }
    }

    fn reset_to_best(&self, j: usize, s: &mut State) {
        let d = self.batch.d;
        let row = j * d..(j + 1) * d;
        s.adv[row.clone()].copy_from_slice(&s.best_point[row.clone()]);
        s.grad[row.clone()].copy_from_slice(&s.best_grad[row]);
    }

    /// Number of coordinates of `points` row `j` that differ from the clean input.
    fn sparsity(&self, j: usize, points: &[f32]) -> f64 {
        let d = self.batch.d;
        points[j * d..(j + 1) * d]
            .iter()
            .zip(self.batch.row(self.idx[j]))
            .filter(|(a, x)| a != x)
            .count() as f64
    }
}

/// What a proposal needs besides the state, shared by the worker threads (the model
/// is not).
struct Proposer<'a> {
    cfg: &'a Apgd,
    batch: &'a Batch,
    /// Batch indices of the examples attacked.
    idx: &'a [usize],
    /// L∞ steps by the general arm of [`Proposer::propose`] instead of the fused loop
    /// (for the tests).
    reference: bool,
}

impl Proposer<'_> {
    /// The next feasible perturbation of example `j` into `out`.
    fn propose(&self, j: usize, s: &State, eps: f64, a: f64, sc: &mut Scratch, out: &mut [f64]) {
        let batch = self.batch;
        let d = batch.d;
        let i = self.idx[j];
        let row = j * d..(j + 1) * d;
        let step = s.step[j];
        if self.cfg.norm == Norm::Linf && !self.reference {
            // Coordinate by coordinate, in one pass: the operations of the arm below
            // (the reference, which the tests hold it to), whose L∞ sign step and
            // projection need no norm of the row; written with selects rather than
            // branches, so that the loop vectorises.
            let (lo, hi) = (batch.bounds.lo as f64, batch.bounds.hi as f64);
            let coordinates = out
                .iter_mut()
                .zip(batch.row(i))
                .zip(s.adv[row.clone()].iter().zip(&s.old[row.clone()]))
                .zip(&s.grad[row]);
            for (((o, &x), (&adv, &old)), &g) in coordinates {
                let xc = x as f64;
                let (l, h) = (lo - xc, hi - xc);
                let cur = adv as f64 - xc;
                let g = if g.is_finite() { g as f64 } else { 0.0 };
                let sign = if g > 0.0 { 1.0 } else { 0.0 };
                let sign = if g < 0.0 { -1.0 } else { sign };
                let z = clamp_to(clamp_to(cur + step * sign, -eps, eps), l, h);
                let prev = old as f64 - xc;
                let next = cur + a * (z - cur) + (1.0 - a) * (cur - prev);
                *o = clamp_to(clamp_to(next, -eps, eps), l, h);
            }
            return;
        }
        batch.delta(i, &s.adv[row.clone()], &mut sc.current);
        for (g, &v) in sc.grad.iter_mut().zip(&s.grad[row.clone()]) {
            *g = if v.is_finite() { v as f64 } else { 0.0 };
        }
        match self.cfg.norm {
            Norm::Linf | Norm::L2 => {
                let norm = self.cfg.norm;
                batch.delta(i, &s.old[row], &mut sc.previous);
                let scale = match norm {
                    Norm::L2 => 1.0 / (Norm::L2.measure(&sc.grad) + 1e-12),
                    _ => 1.0,
                };
                for ((o, &cur), &g) in out.iter_mut().zip(&sc.current).zip(&sc.grad) {
                    let g = match norm {
                        Norm::Linf => sign(g),
                        _ => g * scale,
                    };
                    *o = cur + step * g;
                }
                norm.project(out, eps);
                batch.clamp_box(i, out);
                for ((o, &cur), &prev) in out.iter_mut().zip(&sc.current).zip(&sc.previous) {
                    *o = cur + a * (*o - cur) + (1.0 - a) * (cur - prev);
                }
                norm.project(out, eps);
                batch.clamp_box(i, out);
            }
            _ => {
                // Coordinates already on a bound in the gradient's direction cannot move:
                // they are left out of the top-k selection.
                batch.box_room(i, &mut sc.lower, &mut sc.upper);
                for (((g, &cur), &lo), &hi) in sc
                    .grad
                    .iter_mut()
                    .zip(&sc.current)
                    .zip(&sc.lower)
                    .zip(&sc.upper)
                {
                    if (*g > 0.0 && cur >= hi) || (*g < 0.0 && cur <= lo) {
                        *g = 0.0;
                    }
                }
                sc.sorted.clear();
                sc.sorted.extend(sc.grad.iter().map(|g| g.abs()));
                let pos = (((1.0 - s.topk[j]) * d as f64) as isize).clamp(0, d as isize - 1);
                let (_, threshold, _) = sc
                    .sorted
                    .select_nth_unstable_by(pos as usize, |x, y| x.total_cmp(y));
                let threshold = *threshold;
                let count = sc
                    .grad
                    .iter()
                    .filter(|g| **g != 0.0 && g.abs() >= threshold)
                    .count();
                let per_coordinate = step / (count as f64 + 1e-10);
                for ((o, &cur), &g) in out.iter_mut().zip(&sc.current).zip(&sc.grad) {
                    let moved = g != 0.0 && g.abs() >= threshold;
                    *o = cur + if moved { per_coordinate * sign(g) } else { 0.0 };
                }
                project_l1_box(out, eps, &sc.lower, &sc.upper);
            }
        }
    }
}

/// v clamped to [lo, hi] as `Batch::clamp_box` and `f64::clamp` do (NaN stays NaN).
#[inline(always)]
fn clamp_to(v: f64, lo: f64, hi: f64) -> f64 {
    let v = if v < lo { lo } else { v };
    if v > hi {
        hi
    } else {
        v
    }
}

/// Reused per-example buffers of `propose`.
struct Scratch {
    current: Vec<f64>,
    previous: Vec<f64>,
    grad: Vec<f64>,
    lower: Vec<f64>,
    upper: Vec<f64>,
    sorted: Vec<f64>,
}

impl Scratch {
    fn new(d: usize) -> Scratch {
        Scratch {
            current: vec![0.0; d],
            previous: vec![0.0; d],
            grad: vec![0.0; d],
            lower: vec![0.0; d],
            upper: vec![0.0; d],
            sorted: Vec::with_capacity(d),
        }
    }
}

pub(crate) mod device;

pub use device::device_resident_apgd_runs;
#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod tests;
