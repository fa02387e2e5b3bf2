//! The PGD loop — the only iterative loop of the crate. Every attack is a [`Pgd`]
//! configuration, optionally with a mask confining the perturbation.
//!
//! State lives on the host, per example: the current adversarial input (f32, exactly
//! what the model sees), the momentum buffer, the step size, the cached objective and
//! gradient at the current point, and the best point so far. The model is only used
//! for forward/backward passes on the (compacted) batch of examples still attacked.

use candle_core::{DType, Device, ModuleT, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::base::{argmax, AttackResult, Bounds};
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::objective::probe;
use crate::pgd::Pgd;

/// Runs `cfg` once per ε. `mask` (length D, entries 0 or 1) confines the perturbation
/// to the coordinates where it is 1; it is the same for every example.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    cfg: &Pgd,
    mask: Option<&[f64]>,
    model: &dyn ModuleT,
    bounds: Bounds,
    xs: &Tensor,
    ys: &Tensor,
    eps: &[f64],
    seed: u64,
) -> Result<Vec<AttackResult>> {
    cfg.validate()?;
    bounds.validate()?;
    if eps.is_empty() {
        return Err(Error::Config("no ε given".into()));
    }
    for &e in eps {
        cfg.norm.check_eps(e)?;
    }
    let problem = Problem::new(cfg, mask, model, bounds, xs, ys)?;
    eps.iter().map(|&e| problem.attack(e, seed)).collect()
}

struct Problem<'a> {
    cfg: &'a Pgd,
    mask: Option<&'a [f64]>,
    model: &'a dyn ModuleT,
    lo: f32,
    hi: f32,
    /// Clean inputs, (B·D) row-major.
    x: Vec<f32>,
    ys: Vec<u32>,
    dims: Vec<usize>,
    d: usize,
    dtype: DType,
    device: Device,
    classes: usize,
}

/// Objective, success and (optionally) gradient at a batch of points, averaged over
/// the EOT draws.
struct Eval {
    objective: Vec<f64>,
    success: Vec<bool>,
    grad: Vec<f32>,
}

/// Per-example best point over everything evaluated.
struct Best {
    adv: Vec<f32>,
    success: Vec<bool>,
    objective: Vec<f64>,
}

impl Best {
    /// Keeps each point of `evaluated` that beats the example's best: a success beats a
    /// non-success; between equals a strictly higher objective wins (ties keep the
    /// earlier point). NaN objectives never win.
    fn record(&mut self, active: &[usize], adv: &[f32], evaluated: &Eval, d: usize) {
        for (j, &i) in active.iter().enumerate() {
            let (s, o) = (evaluated.success[j], evaluated.objective[j]);
            let better = (s && !self.success[i]) || (s == self.success[i] && o > self.objective[i]);
            if better {
                self.success[i] = s;
                self.objective[i] = o;
                self.adv[i * d..(i + 1) * d].copy_from_slice(&adv[j * d..(j + 1) * d]);
            }
        }
    }
}

impl<'a> Problem<'a> {
    fn new(
        cfg: &'a Pgd,
        mask: Option<&'a [f64]>,
        model: &'a dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
    ) -> Result<Self> {
        let batch = Batch::new(model, bounds, xs, ys)?;
        let d = batch.d;
        if let Some(m) = mask {
            if m.len() != d {
                return Err(Error::Input(format!(
                    "mask has {} entries for inputs of dimension {d}",
                    m.len()
                )));
            }
        }
        let classes = batch.classes;
        cfg.objective
            .check_classes(classes, cfg.criterion.target())?;
        if let Some(t) = cfg.criterion.target() {
            if t as usize >= classes {
                return Err(Error::Input(format!(
                    "target class {t} is out of range for {classes} classes"
                )));
            }
        }
        Ok(Problem {
            cfg,
            mask,
            model,
            lo: bounds.lo,
            hi: bounds.hi,
            x: batch.x,
            ys: batch.ys,
            dims: batch.dims,
            d,
            dtype: batch.dtype,
            device: batch.device,
            classes,
        })
    }

    fn attack(&self, eps: f64, seed: u64) -> Result<AttackResult> {
        let (cfg, d) = (self.cfg, self.d);
        let b = self.ys.len();
        let mut best = Best {
            adv: self.x.clone(),
            success: vec![false; b],
            objective: vec![f64::NEG_INFINITY; b],
        };
        let mut iterations = vec![0usize; b];
        let width = (self.hi - self.lo) as f64;
        let mut delta = vec![0f64; d];
        let mut g = vec![0f64; d];
        for r in 0..cfg.restarts.count {
            let mut active: Vec<usize> = (0..b)
                .filter(|&i| !(cfg.early_stop && best.success[i]))
                .collect();
            if active.is_empty() {
                break;
            }
            let mut adv = vec![0f32; active.len() * d];
            for (j, &i) in active.iter().enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(r as u64));
                rng.set_stream(i as u64);
                cfg.norm
                    .sample(cfg.restarts.init(r), eps, width, &mut rng, &mut delta);
                self.finish(i, &mut delta, eps, &mut adv[j * d..(j + 1) * d]);
            }
            let mut cur = self.evaluate(&active, &adv, true)?;
            best.record(&active, &adv, &cur, d);
            let mut lr = vec![cfg.step_size.at(eps); active.len()];
            let mut momentum = vec![0f64; active.len() * d];
            for t in 0..cfg.steps {
                if cfg.early_stop {
                    let keep: Vec<bool> = active.iter().map(|&i| !best.success[i]).collect();
                    if keep.iter().any(|k| !k) {
                        retain(&mut active, 1, &keep);
                        retain(&mut adv, d, &keep);
                        retain(&mut momentum, d, &keep);
                        retain(&mut lr, 1, &keep);
                        retain(&mut cur.objective, 1, &keep);
                        retain(&mut cur.grad, d, &keep);
                    }
                }
                if active.is_empty() {
                    break;
                }
                let mut candidate = vec![0f32; active.len() * d];
                for (j, &i) in active.iter().enumerate() {
                    let rows = j * d..(j + 1) * d;
                    self.direction(&cur.grad[rows.clone()], &adv[rows.clone()], &mut g);
                    let m = &mut momentum[rows.clone()];
                    for (mc, gc) in m.iter_mut().zip(&g) {
                        *mc = cfg.momentum * *mc + (1.0 - cfg.momentum) * gc;
                    }
                    let x = &self.x[i * d..(i + 1) * d];
                    for c in 0..d {
                        delta[c] = (adv[j * d + c] as f64 - x[c] as f64) + lr[j] * m[c];
                    }
                    self.finish(i, &mut delta, eps, &mut candidate[rows]);
                }
                let want_grad = t + 1 < cfg.steps;
                let next = self.evaluate(&active, &candidate, want_grad)?;
                best.record(&active, &candidate, &next, d);
                for (j, &i) in active.iter().enumerate() {
                    iterations[i] += 1;
                    let accept = match cfg.backtrack {
                        None => true,
                        Some(_) => next.objective[j] >= cur.objective[j],
                    };
                    if accept {
                        let rows = j * d..(j + 1) * d;
                        adv[rows.clone()].copy_from_slice(&candidate[rows.clone()]);
                        cur.objective[j] = next.objective[j];
                        if want_grad {
                            cur.grad[rows.clone()].copy_from_slice(&next.grad[rows]);
                        }
                    } else if let Some(factor) = cfg.backtrack {
                        lr[j] /= factor;
                    }
                }
            }
        }
        let (predicted, confidence, success) = self.judge(&best.adv)?;
        let norm = (0..b)
            .map(|i| {
                let rows = i * d..(i + 1) * d;
                for ((dc, a), x) in delta
                    .iter_mut()
                    .zip(&best.adv[rows.clone()])
                    .zip(&self.x[rows])
                {
                    *dc = *a as f64 - *x as f64;
                }
                cfg.norm.measure(&delta) as f32
            })
            .collect();
        let clipped =
            Tensor::from_vec(best.adv, self.dims.as_slice(), &self.device)?.to_dtype(self.dtype)?;
        Ok(AttackResult {
            unconstrained: None,
            clipped,
            success,
            confidence,
            predicted,
            norm,
            iterations,
            eps,
        })
    }

    /// The normalised ascent direction at `adv` from the raw gradient `grad` (one
    /// example): non-finite entries and masked coordinates are zeroed, as are entries
    /// pushing a coordinate that sits on a bound further out (their step would be
    /// clipped away, and for sparse L1 steps would waste the step's budget).
    fn direction(&self, grad: &[f32], adv: &[f32], out: &mut [f64]) {
        for (c, o) in out.iter_mut().enumerate() {
            let mut v = grad[c] as f64;
            if !v.is_finite() {
                v = 0.0;
            }
            if let Some(mask) = self.mask {
                v *= mask[c];
            }
            if (adv[c] >= self.hi && v > 0.0) || (adv[c] <= self.lo && v < 0.0) {
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
        let x = &self.x[i * self.d..(i + 1) * self.d];
        if let Some(mask) = self.mask {
            delta.iter_mut().zip(mask).for_each(|(v, m)| *v *= m);
        }
        let (lo, hi) = (self.lo as f64, self.hi as f64);
        let clamp_box = |delta: &mut [f64]| {
            for (v, &xc) in delta.iter_mut().zip(x) {
                *v = v.clamp(lo - xc as f64, hi - xc as f64);
            }
        };
        clamp_box(delta);
        self.cfg.norm.project(delta, eps);
        clamp_box(delta);
        for ((o, &xc), &dc) in out.iter_mut().zip(x).zip(delta.iter()) {
            let mut a = ((xc as f64 + dc) as f32).clamp(self.lo, self.hi);
            if (a as f64 - xc as f64).abs() > dc.abs() {
                a = next_toward(a, xc);
            }
            *o = a;
        }
    }

    /// Forward (and backward) passes at the points `adv` of the examples `active`,
    /// averaged over `eot.grad_samples` draws.
    fn evaluate(&self, active: &[usize], adv: &[f32], want_grad: bool) -> Result<Eval> {
        let (m, d, k) = (active.len(), self.d, self.classes);
        let input = self.tensor(adv, m)?;
        let labels: Vec<u32> = active.iter().map(|&i| self.ys[i]).collect();
        let ys = Tensor::from_slice(&labels, m, &self.device)?;
        let samples = self.cfg.eot.grad_samples;
        let mut objective = vec![0f64; m];
        let mut probs = vec![0f64; m * k];
        let mut grad = if want_grad {
            vec![0f32; m * d]
        } else {
            Vec::new()
        };
        for _ in 0..samples {
            let p = probe(
                self.model,
                self.cfg.objective,
                &input,
                &ys,
                self.cfg.criterion.target(),
                want_grad,
            )?;
            accumulate(&mut probs, &self.probabilities(&p.logits)?);
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

    /// Prediction, confidence and success of the final points on the whole batch,
    /// from the mean probabilities over `eot.eval_samples` fresh forward passes.
    fn judge(&self, adv: &[f32]) -> Result<(Vec<u32>, Vec<f32>, Vec<bool>)> {
        let (b, k) = (self.ys.len(), self.classes);
        let input = self.tensor(adv, b)?;
        let samples = self.cfg.eot.eval_samples;
        let mut probs = vec![0f64; b * k];
        for _ in 0..samples {
            let logits = self.model.forward_t(&input, false)?;
            if logits.dims() != [b, k] {
                return Err(Error::Input(format!(
                    "the model returned logits of shape {:?} for a batch of {b}",
                    logits.dims()
                )));
            }
            accumulate(&mut probs, &self.probabilities(&logits)?);
        }
        let mut predicted = Vec::with_capacity(b);
        let mut confidence = Vec::with_capacity(b);
        let mut success = Vec::with_capacity(b);
        for (i, row) in probs.chunks(k).enumerate() {
            let row: Vec<f32> = row.iter().map(|p| (p / samples as f64) as f32).collect();
            let (pred, conf) = argmax(&row);
            predicted.push(pred);
            confidence.push(conf);
            success.push(self.cfg.criterion.is_success(&row, self.ys[i]));
        }
        Ok((predicted, confidence, success))
    }

    /// Softmax of (M, K) logits as a flat vector; NaN outputs are an error.
    fn probabilities(&self, logits: &Tensor) -> Result<Vec<f32>> {
        crate::batch::probabilities(logits)
    }

    /// (M, ...) tensor in the input dtype from M flattened rows.
    fn tensor(&self, rows: &[f32], m: usize) -> Result<Tensor> {
        let mut dims = self.dims.clone();
        dims[0] = m;
        Ok(Tensor::from_slice(rows, dims.as_slice(), &self.device)?.to_dtype(self.dtype)?)
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

#[cfg(test)]
mod tests;
