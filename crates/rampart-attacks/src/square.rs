//! The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): a
//! score-based black-box attack. It never asks for a gradient, only for logits, so
//! gradient masking does not stop it; AutoAttack runs it last as a sanity check of
//! the white-box attacks.

use candle_core::ModuleT;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::base::Attack;
use crate::batch::Batch;
use crate::engine::rows_per_task;
use crate::error::{Error, Result};
use crate::norm::Norm;
use crate::problem::{Outcome, Problem};
use crate::repeated::{repeat, Record, Rows, SingleRun, Start};

/// Square attack on images (B, C, H, W), untargeted, margin loss
/// f_y − max_{k≠y} f_k (minimised). Per example, from a start on the ε-sphere
/// (L∞: vertical stripes of ±ε; L2: a grid of ±η-shaped tiles), each query changes one
/// random square window of side s ≈ √(p·H·W) and keeps the change if the loss went
/// down or the example became misclassified. The fraction p of changed pixels follows
/// the published schedule: p_init, halved after 10, 50, 200, 500, 1000, 2000, 4000,
/// 6000 and 8000 iterations.
///
/// * L∞: the window is set to x ± ε, one random sign per channel (signs are redrawn,
///   up to 10 times, while the proposal would not change the window, as in the
///   original code).
/// * L2: the perturbation in a second random window is moved into the first window,
///   added to a ±η profile (two opposite "pyramids", randomly transposed), rescaled so
///   the image keeps its norm, then the whole perturbation is scaled to norm ε.
///
/// Random numbers are drawn per example (window positions, signs, profile
/// orientation), from ChaCha8 seeded with `seed + restart` on the example's stream, so
/// results do not depend on the batch. `iterations` counts the model queries (forward
/// passes of one example). Deterministic models only: each query is one forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Square {
    /// Threat model: L∞ or L2.
    pub norm: Norm,
    /// Queries per run after the initial one (≥ 1).
    pub queries: usize,
    /// Initial fraction p of pixels changed per query, in (0, 1].
    pub p_init: f64,
    /// Runs from fresh starts, each on the examples still robust (≥ 1).
    pub restarts: usize,
    /// Stretch the p schedule (written for 10 000 queries) over `queries`; AutoAttack
    /// uses the schedule as written (false).
    pub rescale_schedule: bool,
}

impl Square {
    /// The Square attack of AutoAttack's standard version: 5000 queries, p_init = 0.8,
    /// one run, schedule not rescaled.
    pub fn autoattack(norm: Norm) -> Square {
        Square {
            norm,
            queries: 5000,
            p_init: 0.8,
            restarts: 1,
            rescale_schedule: false,
        }
    }

    /// Refuses an inconsistent configuration.
    pub fn validate(&self) -> Result<()> {
        let refuse = |msg: String| Err(Error::Config(msg));
        if !matches!(self.norm, Norm::Linf | Norm::L2) {
            return refuse(format!(
                "the Square attack supports L∞ and L2, not {}",
                self.norm
            ));
        }
        if self.queries == 0 || self.restarts == 0 {
            return refuse(format!(
                "Square needs at least one query and one run, got {} and {}",
                self.queries, self.restarts
            ));
        }
        if !(self.p_init > 0.0 && self.p_init <= 1.0) {
            return refuse(format!("p_init must lie in (0, 1], got {}", self.p_init));
        }
        Ok(())
    }

    /// The fraction of pixels changed at iteration `it` (0-based).
    pub fn p_at(&self, it: usize) -> f64 {
        let it = if self.rescale_schedule {
            (it as f64 / self.queries as f64 * 10_000.0) as usize
        } else {
            it
        };
        let halvings = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]
            .iter()
            .filter(|&&t| it > t)
            .count();
        self.p_init / (1u32 << halvings) as f64
    }
}

impl Attack for Square {
    fn norm(&self) -> Norm {
        self.norm
    }

    fn validate(&self) -> Result<()> {
        Square::validate(self)
    }

    /// Refuses inputs that are not images (B, C, H, W).
    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        Shape::of(problem).map(|_| ())
    }

    /// `restarts` runs, each on the examples still robust.
    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        repeat(self, self.restarts, problem, eps, seed)
    }
}

impl SingleRun for Square {
    /// Judges the clean inputs: misclassified examples are not attacked.
    fn begin(&self, problem: &Problem<'_>) -> Result<Start> {
        let batch = &problem.batch;
        let b = batch.len();
        let (_, probs) = batch.forward(problem.model, &batch.x, b, 1)?;
        let fooled = batch.fooled_each(&probs, 0..b);
        Ok(Start::untargeted(fooled))
    }

    /// One run of `queries` queries; `iterations` counts the queries.
    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
        let run = Run {
            cfg: self,
            model: problem.model,
            batch: &problem.batch,
            idx: rows.examples(),
            runs: rows.runs(),
            shape: Shape::of(problem)?,
            eps: rows.eps(),
        };
        run.run(rows.seed(), record)
    }
}

#[derive(Clone, Copy)]
struct Shape {
    c: usize,
    h: usize,
    w: usize,
}

impl Shape {
    fn of(problem: &Problem<'_>) -> Result<Shape> {
        match *problem.dims() {
            [_, c, h, w] => Ok(Shape { c, h, w }),
            ref other => Err(Error::Input(format!(
                "the Square attack needs images (B, C, H, W), got shape {other:?}"
            ))),
        }
    }

    fn at(&self, c: usize, y: usize, x: usize) -> usize {
        (c * self.h + y) * self.w + x
    }

    /// Side of the square window for a fraction `p` of the pixels, at least `min`,
    /// at most the image side.
    fn side(&self, p: f64, min: usize) -> usize {
        let s = ((p * (self.h * self.w) as f64).sqrt().round() as usize).max(min);
        s.min(self.h.min(self.w)).max(1)
    }
}

struct Run<'a> {
    cfg: &'a Square,
    model: &'a dyn ModuleT,
    batch: &'a Batch,
    idx: &'a [usize],
    /// Per attacked example: the run number its random numbers are drawn for.
    runs: &'a [u64],
    shape: Shape,
    eps: f64,
}

impl Run<'_> {
    fn run(&self, seed: u64, record: &mut Record) -> Result<()> {
        let (batch, d) = (self.batch, self.batch.d);
        let m = self.idx.len();
        let steps = Steps {
            cfg: self.cfg,
            batch,
            shape: self.shape,
            eps: self.eps,
        };
        let mut rngs: Vec<ChaCha8Rng> = self
            .idx
            .iter()
            .zip(self.runs)
            .map(|(&i, &run)| batch.rng(seed, run, i))
            .collect();
        let mut current = vec![0f32; m * d];
        for (j, &i) in self.idx.iter().enumerate() {
            steps.start(i, &mut rngs[j], &mut current[j * d..(j + 1) * d]);
        }
        let all: Vec<usize> = (0..m).collect();
        let (mut margin, mut fooled) = self.query(&all, &current)?;
        for (j, &i) in self.idx.iter().enumerate() {
            record.count_step(i);
            record.offer(i, &current[j * d..(j + 1) * d], fooled[j], -margin[j]);
        }
        let mut proposal = vec![0f32; m * d];
        for it in 0..self.cfg.queries {
            let live: Vec<usize> = (0..m).filter(|&j| !fooled[j]).collect();
            if live.is_empty() {
                break;
            }
            let p = self.cfg.p_at(it);
            // Each live example's proposal from its current point and its own stream,
            // examples in parallel (the same draws and values whatever the threads).
            let mut live_rngs: Vec<&mut ChaCha8Rng> = rngs
                .iter_mut()
                .zip(&fooled)
                .filter(|(_, f)| !**f)
                .map(|(r, _)| r)
                .collect();
            let (from, idx) = (&current, self.idx);
            proposal[..live.len() * d]
                .par_chunks_mut(d)
                .zip(live_rngs.par_iter_mut())
                .zip(live.par_iter())
                .with_min_len(rows_per_task(d))
                .for_each_init(Scratch::default, |scratch, ((row, rng), &j)| {
                    row.copy_from_slice(&from[j * d..(j + 1) * d]);
                    let i = idx[j];
                    match steps.cfg.norm {
                        Norm::Linf => steps.step_linf(i, p, rng, row),
                        _ => steps.step_l2(i, p, rng, row, scratch),
                    }
                });
            let proposal = &proposal[..live.len() * d];
            let (new_margin, new_fooled) = self.query(&live, proposal)?;
            for (r, &j) in live.iter().enumerate() {
                let i = self.idx[j];
                record.count_step(i);
                if new_margin[r] < margin[j] || new_fooled[r] {
                    margin[j] = new_margin[r];
                    fooled[j] = new_fooled[r];
                    current[j * d..(j + 1) * d].copy_from_slice(&proposal[r * d..(r + 1) * d]);
                    record.offer(i, &current[j * d..(j + 1) * d], fooled[j], -margin[j]);
                }
            }
        }
        Ok(())
    }

    /// Margin f_y − max_{k≠y} f_k and misclassification of the rows `points` (one per
    /// entry of `which`, positions in `idx`): one forward pass each.
    fn query(&self, which: &[usize], points: &[f32]) -> Result<(Vec<f64>, Vec<bool>)> {
        let k = self.batch.classes;
        let (logits, probs) = self.batch.forward(self.model, points, which.len(), 1)?;
        let mut margin = Vec::with_capacity(which.len());
        let mut fooled = Vec::with_capacity(which.len());
        for (r, &j) in which.iter().enumerate() {
            let i = self.idx[j];
            let f = &logits[r * k..(r + 1) * k];
            let y = self.batch.ys[i] as usize;
            let other = f
                .iter()
                .enumerate()
                .filter(|(c, _)| *c != y)
                .map(|(_, v)| *v as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            margin.push(f[y] as f64 - other);
            fooled.push(self.batch.fooled(&probs[r * k..(r + 1) * k], i));
        }
        Ok((margin, fooled))
    }
}

/// What a start and a proposal need besides the example's stream: shared by the
/// worker threads (the model is not).
#[derive(Clone, Copy)]
struct Steps<'a> {
    cfg: &'a Square,
    batch: &'a Batch,
    shape: Shape,
    eps: f64,
}

impl Steps<'_> {
    /// The starting point of example `i` into `out`.
    fn start(&self, i: usize, rng: &mut ChaCha8Rng, out: &mut [f32]) {
        let (batch, s, eps) = (self.batch, self.shape, self.eps);
        let x = batch.row(i);
        match self.cfg.norm {
            Norm::Linf => {
                for c in 0..s.c {
                    for col in 0..s.w {
                        let d = eps * random_sign(rng);
                        for y in 0..s.h {
                            let at = s.at(c, y, col);
                            out[at] = batch.store_value(x[at], d);
                        }
                    }
                }
            }
            _ => {
                let side = (s.h / 5).max(1);
                let (tiles_h, tiles_w) = (s.h / side, s.w / side);
                let (off_h, off_w) = ((s.h - tiles_h * side) / 2, (s.w - tiles_w * side) / 2);
                let mut delta = vec![0f64; batch.d];
                for th in 0..tiles_h {
                    for tw in 0..tiles_w {
                        let profile = eta(side, rng);
                        for c in 0..s.c {
                            let sign = random_sign(rng);
                            for a in 0..side {
                                for b in 0..side {
                                    let at = s.at(c, off_h + th * side + a, off_w + tw * side + b);
                                    delta[at] += sign * profile[a * side + b];
                                }
                            }
                        }
                    }
                }
                self.finish_l2(i, &mut delta, out);
            }
        }
    }

    /// Scales δ to norm ε, clips it to the box and the ball, and stores x + δ.
    fn finish_l2(&self, i: usize, delta: &mut [f64], out: &mut [f32]) {
        let norm = Norm::L2.measure(delta);
        let scale = self.eps / (norm + 1e-12);
        delta.iter_mut().for_each(|v| *v *= scale);
        self.batch.clamp_box(i, delta);
        Norm::L2.project(delta, self.eps);
        self.batch.store(i, delta, out);
    }

    /// L∞ proposal: one window of side √(p·H·W) set to x ± ε (a sign per channel).
    fn step_linf(&self, i: usize, p: f64, rng: &mut ChaCha8Rng, row: &mut [f32]) {
        let (batch, s, eps) = (self.batch, self.shape, self.eps);
        let x = batch.row(i);
        let side = s.side(p, 1);
        let vh = rng.gen_range(0..=s.h - side);
        let vw = rng.gen_range(0..=s.w - side);
        let mut signs = vec![0f64; s.c];
        for _ in 0..10 {
            signs.iter_mut().for_each(|v| *v = random_sign(rng));
            let changes = (0..s.c).any(|c| {
                (vh..vh + side).any(|y| {
                    (vw..vw + side).any(|col| {
                        let at = s.at(c, y, col);
                        batch.store_value(x[at], eps * signs[c]) != row[at]
                    })
                })
            });
            if changes {
                break;
            }
        }
        for (c, &sign) in signs.iter().enumerate() {
            for y in vh..vh + side {
                for col in vw..vw + side {
                    let at = s.at(c, y, col);
                    row[at] = batch.store_value(x[at], eps * sign);
                }
            }
        }
    }

    /// L2 proposal: the mass of a second window moves into the first, on top of a
    /// ±η profile; the image keeps (at most) norm ε.
    fn step_l2(&self, i: usize, p: f64, rng: &mut ChaCha8Rng, row: &mut [f32], sc: &mut Scratch) {
        let (batch, s, eps) = (self.batch, self.shape, self.eps);
        let mut side = s.side(p, 3);
        if side % 2 == 0 && side < s.h.min(s.w) {
            side += 1;
        }
        let vh = rng.gen_range(0..=s.h - side);
        let vw = rng.gen_range(0..=s.w - side);
        let vh2 = rng.gen_range(0..=s.h - side);
        let vw2 = rng.gen_range(0..=s.w - side);
        sc.delta.resize(batch.d, 0.0);
        batch.delta(i, row, &mut sc.delta);
        let delta = &mut sc.delta;
        let inside = |y: usize, col: usize, oh: usize, ow: usize| {
            y >= oh && y < oh + side && col >= ow && col < ow + side
        };
        let image_norm = Norm::L2.measure(delta);
        let mut windows_sq = 0.0;
        for c in 0..s.c {
            for y in 0..s.h {
                for col in 0..s.w {
                    if inside(y, col, vh, vw) || inside(y, col, vh2, vw2) {
                        windows_sq += delta[s.at(c, y, col)].powi(2);
                    }
                }
            }
        }
        let budget =
            ((eps * eps - image_norm * image_norm).max(0.0) / s.c as f64 + windows_sq).sqrt();
        let profile = eta(side, rng);
        let mut fresh = vec![vec![0f64; side * side]; s.c];
        for (c, new) in fresh.iter_mut().enumerate() {
            let old_norm = (0..side * side)
                .map(|a| delta[s.at(c, vh + a / side, vw + a % side)].powi(2))
                .sum::<f64>()
                .sqrt();
            let sign = random_sign(rng);
            for a in 0..side * side {
                let old = delta[s.at(c, vh + a / side, vw + a % side)];
                new[a] = profile[a] * sign + old / (old_norm + 1e-12);
            }
            let n = new.iter().map(|v| v * v).sum::<f64>().sqrt();
            new.iter_mut().for_each(|v| *v *= budget / (n + 1e-12));
        }
        for c in 0..s.c {
            for a in 0..side * side {
                delta[s.at(c, vh2 + a / side, vw2 + a % side)] = 0.0;
            }
            for a in 0..side * side {
                delta[s.at(c, vh + a / side, vw + a % side)] = fresh[c][a];
            }
        }
        let mut delta = std::mem::take(&mut sc.delta);
        self.finish_l2(i, &mut delta, row);
        sc.delta = delta;
    }
}

#[derive(Default)]
struct Scratch {
    delta: Vec<f64>,
}

fn random_sign(rng: &mut ChaCha8Rng) -> f64 {
    if rng.gen::<bool>() {
        1.0
    } else {
        -1.0
    }
}

/// Nested rectangles of weight 1/(n+1)² around the centre of an `x`×`y` block,
/// normalised to unit L2 norm (row-major).
fn eta_rectangles(x: usize, y: usize) -> Vec<f64> {
    let mut delta = vec![0f64; x * y];
    if x == 0 || y == 0 {
        return delta;
    }
    let (xc, yc) = (x / 2 + 1, y / 2 + 1);
    let (mut c0, mut c1) = (xc as isize - 1, yc as isize - 1);
    for n in 0..xc.max(yc) {
        let span = 2 * n as isize + 1;
        let (r0, r1) = (
            c0.max(0) as usize,
            ((c0 + span).min(x as isize)).max(0) as usize,
        );
        let (q0, q1) = (
            c1.max(0) as usize,
            ((c1 + span).min(y as isize)).max(0) as usize,
        );
        let weight = 1.0 / ((n + 1) * (n + 1)) as f64;
        for a in r0..r1 {
            for b in q0..q1 {
                delta[a * y + b] += weight;
            }
        }
        c0 -= 1;
        c1 -= 1;
    }
    normalise(&mut delta);
    delta
}

/// The L2 proposal profile of side `s`: a positive pyramid over the top half, a
/// negative one over the bottom half, unit norm, transposed with probability ½.
fn eta(s: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let half = s / 2;
    let mut delta = eta_rectangles(half, s);
    delta.extend(eta_rectangles(s - half, s).into_iter().map(|v| -v));
    normalise(&mut delta);
    if rng.gen::<f64>() > 0.5 {
        let mut t = vec![0f64; s * s];
        for a in 0..s {
            for b in 0..s {
                t[b * s + a] = delta[a * s + b];
            }
        }
        delta = t;
    }
    delta
}

fn normalise(v: &mut [f64]) {
    let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|a| *a /= n);
    }
}

#[cfg(test)]
mod tests;
