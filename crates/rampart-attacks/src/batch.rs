//! A validated batch of clean inputs held on the host, and the model calls shared by
//! the attacks: objective values and input gradients averaged over EOT draws, mean
//! logits and probabilities, exact feasible storage of adversarial points, and the
//! per-example best point.

use candle_core::{DType, Device, ModuleT, Tensor, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::base::{Bounds, Criterion};
use crate::engine::next_toward;
use crate::error::{Error, Result};
use crate::norm::Norm;
use crate::objective::{check_label_values, labels_to_vec, probe_with, Objective};

/// Clean inputs (B, ...) and labels, checked once: float inputs without NaN inside the
/// bounds, labels below K, a model that returns (B, K) logits.
#[derive(Clone, Debug)]
pub(crate) struct Batch {
    /// Clean inputs, (B·D) row-major, f32.
    pub x: Vec<f32>,
    /// Labels.
    pub ys: Vec<u32>,
    /// RNG stream of each example: its index in the caller's batch, so that an
    /// example draws the same random numbers whatever subset it is attacked in.
    pub streams: Vec<u64>,
    /// Shape of the input tensor (B, ...).
    pub dims: Vec<usize>,
    /// Values per example.
    pub d: usize,
    /// Input dtype.
    pub dtype: DType,
    /// Device of the inputs.
    pub device: Device,
    /// Number of classes K.
    pub classes: usize,
    /// Input bounds.
    pub bounds: Bounds,
}

/// What a probe differentiates.
#[derive(Clone, Copy)]
pub(crate) enum Loss<'a> {
    /// An objective; targeted objectives take one target class per example.
    Objective(Objective, Option<&'a [u32]>),
    /// f_t − f_y, one target t per example: FAB's linearised decision boundary.
    TargetMargin(&'a [u32]),
}

/// Objective values, probabilities and gradients of a batch of points, each a mean
/// over the EOT draws.
pub(crate) struct Probed {
    /// (M,) objective values; NaN becomes −∞.
    pub values: Vec<f64>,
    /// (M·K) mean class probabilities.
    pub probs: Vec<f32>,
    /// (M·D) mean input gradient; empty unless asked for.
    pub grad: Vec<f32>,
}

impl Batch {
    /// Validates the inputs and learns K from one forward pass of the first example.
    pub fn new(model: &dyn ModuleT, bounds: Bounds, xs: &Tensor, ys: &Tensor) -> Result<Batch> {
        Batch::with_classes(model, bounds, xs, ys, None)
    }

    /// As [`Batch::new`]; with `classes` given, K is taken from the caller instead of a
    /// forward pass (every pass of the attack still checks the logits' shape).
    pub fn with_classes(
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        classes: Option<usize>,
    ) -> Result<Batch> {
        bounds.validate()?;
        let dims = xs.dims().to_vec();
        if dims.len() < 2 || dims.contains(&0) {
            return Err(Error::Input(format!(
                "inputs must have shape (B, ...) with B ≥ 1 and no empty dimension, got {dims:?}"
            )));
        }
        let dtype = xs.dtype();
        if !dtype.is_float() {
            return Err(Error::Input(format!(
                "inputs must be floating point, got {dtype:?}"
            )));
        }
        let b = dims[0];
        let d = dims[1..].iter().product();
        let x = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = x.iter().position(|v| v.is_nan()) {
            return Err(Error::Input(format!(
                "input value {i} (example {}) is NaN",
                i / d
            )));
        }
        if let Some(i) = x.iter().position(|v| *v < bounds.lo || *v > bounds.hi) {
            return Err(Error::Input(format!(
                "input value {} (example {}) lies outside the bounds [{}, {}]",
                x[i],
                i / d,
                bounds.lo,
                bounds.hi
            )));
        }
        let labels = labels_to_vec(ys)?;
        if labels.len() != b {
            return Err(Error::Input(format!(
                "{} labels for a batch of {b} inputs",
                labels.len()
            )));
        }
        let classes = match classes {
            Some(0) => {
                return Err(Error::Input(
                    "a model of zero classes cannot be attacked".into(),
                ))
            }
            Some(k) => k,
            None => match model.forward_t(&xs.narrow(0, 0, 1)?, false)?.dims() {
                [1, k] => *k,
                other => {
                    return Err(Error::Input(format!(
                        "the model must return (B, K) logits, got {other:?} for one input"
                    )))
                }
            },
        };
        check_label_values(&labels, b, classes)?;
        Ok(Batch {
            x,
            ys: labels,
            streams: (0..b as u64).collect(),
            dims,
            d,
            dtype,
            device: xs.device().clone(),
            classes,
            bounds,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.ys.len()
    }

    /// Clean input of example `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }

    /// The examples `idx`, in that order, keeping their RNG streams.
    pub fn subset(&self, idx: &[usize]) -> Batch {
        let mut x = Vec::with_capacity(idx.len() * self.d);
        for &i in idx {
            x.extend_from_slice(self.row(i));
        }
        let mut dims = self.dims.clone();
        dims[0] = idx.len();
        Batch {
            x,
            ys: idx.iter().map(|&i| self.ys[i]).collect(),
            streams: idx.iter().map(|&i| self.streams[i]).collect(),
            dims,
            d: self.d,
            dtype: self.dtype,
            device: self.device.clone(),
            classes: self.classes,
            bounds: self.bounds,
        }
    }

    /// The random number generator of example `i` for run `run` of an attack seeded
    /// with `seed`: ChaCha8 seeded with `seed + run`, on the example's stream.
    pub fn rng(&self, seed: u64, run: u64, i: usize) -> ChaCha8Rng {
        example_rng(seed, run, self.streams[i])
    }

    /// (M, ...) tensor in the input dtype from M flattened rows.
    pub fn tensor(&self, rows: &[f32], m: usize) -> Result<Tensor> {
        let mut dims = self.dims.clone();
        dims[0] = m;
        Ok(Tensor::from_slice(rows, dims.as_slice(), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Values, probabilities and (if `want_grad`) input gradients at the
    /// points `rows` of the examples `idx`, each the mean over `samples` passes.
    pub fn probe(
        &self,
        model: &dyn ModuleT,
        idx: &[usize],
        rows: &[f32],
        loss: Loss<'_>,
        samples: usize,
        want_grad: bool,
    ) -> Result<Probed> {
        let (m, k, d) = (idx.len(), self.classes, self.d);
        let input = self.tensor(rows, m)?;
        let labels: Vec<u32> = idx.iter().map(|&i| self.ys[i]).collect();
        let ys = Tensor::from_slice(&labels, m, &self.device)?;
        let targets = match loss {
            Loss::Objective(_, Some(t)) | Loss::TargetMargin(t) => {
                Some(Tensor::from_slice(t, m, &self.device)?)
            }
            Loss::Objective(_, None) => None,
        };
        let mut values = vec![0f64; m];
        let mut probs = vec![0f64; m * k];
        let mut grad = if want_grad {
            vec![0f32; m * d]
        } else {
            Vec::new()
        };
        let n = samples as f64;
        for _ in 0..samples {
            let p = probe_with(model, &input, want_grad, |l| {
                if l.dims() != [m, k] {
                    return Err(Error::Input(format!(
                        "the model returned logits of shape {:?} for a batch of {m} \
                         ({k} classes expected)",
                        l.dims()
                    )));
                }
                match (loss, &targets) {
                    (Loss::Objective(o, _), Some(t)) => o.values_per_example(l, &ys, t),
                    (Loss::Objective(o, _), None) => o.values(l, &ys, None),
                    (Loss::TargetMargin(_), Some(t)) => target_margin(l, &ys, t),
                    (Loss::TargetMargin(_), None) => unreachable_targets(),
                }
            })?;
            accumulate(&mut probs, &probabilities(&p.logits)?);
            let v = p.values.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for (a, b) in values.iter_mut().zip(v) {
                *a += b / n;
            }
            if let Some(g) = p.grad {
                let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                for (a, b) in grad.iter_mut().zip(g) {
                    *a += b / samples as f32;
                }
            }
        }
        Ok(Probed {
            values: values
                .into_iter()
                .map(|v| if v.is_nan() { f64::NEG_INFINITY } else { v })
                .collect(),
            probs: probs.iter().map(|v| (v / n) as f32).collect(),
            grad,
        })
    }

    /// Mean logits and mean probabilities (each M·K) of the points `rows` over
    /// `samples` forward passes.
    pub fn forward(
        &self,
        model: &dyn ModuleT,
        rows: &[f32],
        m: usize,
        samples: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let k = self.classes;
        let input = self.tensor(rows, m)?;
        let mut logits = vec![0f64; m * k];
        let mut probs = vec![0f64; m * k];
        for _ in 0..samples {
            let l = model.forward_t(&input, false)?;
            if l.dims() != [m, k] {
                return Err(Error::Input(format!(
                    "the model returned logits of shape {:?} for a batch of {m}",
                    l.dims()
                )));
            }
            let l = l.to_dtype(DType::F32)?;
            accumulate(&mut logits, &l.flatten_all()?.to_vec1::<f32>()?);
            accumulate(&mut probs, &probabilities(&l)?);
        }
        let n = samples as f64;
        Ok((
            logits.iter().map(|v| (v / n) as f32).collect(),
            probs.iter().map(|v| (v / n) as f32).collect(),
        ))
    }

    /// Whether class probabilities `probs` (K,) misclassify example `i`.
    pub fn fooled(&self, probs: &[f32], i: usize) -> bool {
        Criterion::Misclassified.is_success(probs, self.ys[i])
    }

    /// Whether each of `examples` is misclassified, given `probs` with one row of K
    /// class probabilities per listed example, in order.
    pub fn fooled_each(
        &self,
        probs: &[f32],
        examples: impl IntoIterator<Item = usize>,
    ) -> Vec<bool> {
        examples
            .into_iter()
            .zip(probs.chunks_exact(self.classes))
            .map(|(i, row)| self.fooled(row, i))
            .collect()
    }

    /// Writes x_i + δ into `out`, each coordinate clamped to the bounds and rounded to
    /// f32 *towards* x_i, so that |out − x_i| ≤ |δ| coordinate-wise: a δ feasible in
    /// f64 stays feasible, exactly, in f32.
    pub fn store(&self, i: usize, delta: &[f64], out: &mut [f32]) {
        // The value of `store_value` per coordinate, written without branches so
        // that the loop vectorises: x + δ rounded to the nearest f32 and clamped, and
        // where that rounding went past |δ| (about half the coordinates of a step),
        // the f32 next to it towards x (`next_toward` as bit arithmetic).
        let (lo, hi) = (self.bounds.lo, self.bounds.hi);
        for ((o, &xc), &dc) in out.iter_mut().zip(self.row(i)).zip(delta) {
            let a = clamp_f32((xc as f64 + dc) as f32, lo, hi);
            let past = (a as f64 - xc as f64).abs() > dc.abs();
            *o = if past { step_toward(a, xc) } else { a };
        }
    }

    /// One coordinate of [`Self::store`]: x + δ clamped and rounded towards x.
    pub fn store_value(&self, x: f32, delta: f64) -> f32 {
        let mut a = ((x as f64 + delta) as f32).clamp(self.bounds.lo, self.bounds.hi);
        if (a as f64 - x as f64).abs() > delta.abs() {
            a = next_toward(a, x);
        }
        a
    }

    /// δ = point − x_i in f64.
    pub fn delta(&self, i: usize, point: &[f32], out: &mut [f64]) {
        for ((o, &a), &xc) in out.iter_mut().zip(point).zip(self.row(i)) {
            *o = a as f64 - xc as f64;
        }
    }

    /// Clamps δ to the box [lo − x_i, hi − x_i].
    pub fn clamp_box(&self, i: usize, delta: &mut [f64]) {
        let (lo, hi) = (self.bounds.lo as f64, self.bounds.hi as f64);
        for (v, &xc) in delta.iter_mut().zip(self.row(i)) {
            let (l, h) = (lo - xc as f64, hi - xc as f64);
            // `f64::clamp` (NaN stays NaN), without its per-call check that l ≤ h
            // (x lies in the bounds), so that the loop vectorises.
            *v = if *v < l {
                l
            } else if *v > h {
                h
            } else {
                *v
            };
        }
    }

    /// Room the box leaves around example `i`: [lo − x_i, hi − x_i].
    pub fn box_room(&self, i: usize, lower: &mut [f64], upper: &mut [f64]) {
        let (lo, hi) = (self.bounds.lo as f64, self.bounds.hi as f64);
        for ((l, u), &x) in lower.iter_mut().zip(upper.iter_mut()).zip(self.row(i)) {
            *l = lo - x as f64;
            *u = hi - x as f64;
        }
    }

    /// ‖point − x_i‖ in `norm`.
    pub fn distance(&self, norm: Norm, i: usize, point: &[f32]) -> f64 {
        let mut delta = vec![0f64; self.d];
        self.delta(i, point, &mut delta);
        norm.measure(&delta)
    }
}

/// The random number generator of run `run` of an attack seeded with `seed`, on
/// stream `stream` (an example's index in the caller's batch): ChaCha8 seeded with
/// `seed + run`.
pub(crate) fn example_rng(seed: u64, run: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(run));
    rng.set_stream(stream);
    rng
}

/// [`next_toward`] for a ≠ x and a not NaN (where [`Batch::store`] calls it), as
/// selects rather than branches: the bits one step from a towards x, or the smallest
/// subnormal of x's side from zero.
#[inline(always)]
fn step_toward(a: f32, x: f32) -> f32 {
    let up = x > a;
    let away_from_zero = (a > 0.0) == up;
    let bits = a.to_bits();
    let moved = if away_from_zero {
        bits.wrapping_add(1)
    } else {
        bits.wrapping_sub(1)
    };
    let tiny = if up { 1u32 } else { 0x8000_0001 };
    f32::from_bits(if a == 0.0 { tiny } else { moved })
}

/// `f32::clamp(a, lo, hi)` for lo ≤ hi (NaN stays NaN), branch-free.
#[inline(always)]
fn clamp_f32(a: f32, lo: f32, hi: f32) -> f32 {
    if a < lo {
        lo
    } else if a > hi {
        hi
    } else {
        a
    }
}

/// The point each example returns: a success beats a non-success; between two
/// points of equal success the strictly higher objective wins (ties keep the earlier).
pub(crate) struct Best {
    /// (B·D) the best point of each example (starts at the clean input).
    pub adv: Vec<f32>,
    /// Whether the best point is a success.
    pub success: Vec<bool>,
    /// Objective at the best point (−∞ before any point was recorded).
    pub objective: Vec<f64>,
}

impl Best {
    /// Starts every example at its clean input; `success` marks examples that already
    /// count as fooled there.
    pub fn new(batch: &Batch, success: Vec<bool>) -> Best {
        Best {
            adv: batch.x.clone(),
            success,
            objective: vec![f64::NEG_INFINITY; batch.len()],
        }
    }

    /// Makes `point` example `i`'s result, whatever it was.
    pub fn set(&mut self, i: usize, point: &[f32], success: bool, objective: f64) {
        let d = point.len();
        self.success[i] = success;
        self.objective[i] = objective;
        self.adv[i * d..(i + 1) * d].copy_from_slice(point);
    }

    /// Offers `point` as example `i`'s result.
    pub fn offer(&mut self, i: usize, point: &[f32], success: bool, objective: f64) {
        let better = (success && !self.success[i])
            || (success == self.success[i] && objective > self.objective[i]);
        if better {
            let d = point.len();
            self.success[i] = success;
            self.objective[i] = objective;
            self.adv[i * d..(i + 1) * d].copy_from_slice(point);
        }
    }
}

/// f_t − f_y per example (logits (B, K), ys and targets (B,) u32).
fn target_margin(logits: &Tensor, ys: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = match logits.dtype() {
        DType::F64 => logits.clone(),
        _ => logits.to_dtype(DType::F32)?,
    };
    let f_t = logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let f_y = logits.gather(&ys.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok((f_t - f_y)?)
}

fn unreachable_targets() -> Result<Tensor> {
    Err(Error::Config(
        "the target margin needs target classes".into(),
    ))
}

/// Softmax of (M, K) logits as a flat vector; NaN outputs are an error.
pub(crate) fn probabilities(logits: &Tensor) -> Result<Vec<f32>> {
    let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if probs.iter().any(|p| p.is_nan()) {
        return Err(nan_logits());
    }
    Ok(probs)
}

/// The error of NaN logits at an attacked point.
pub(crate) fn nan_logits() -> Error {
    Error::Input("the model produced NaN logits on a point inside the threat model".into())
}

fn accumulate(sum: &mut [f64], values: &[f32]) {
    for (s, v) in sum.iter_mut().zip(values) {
        *s += *v as f64;
    }
}

/// Class indices sorted by decreasing value of `row` (ties: lower index first).
pub(crate) fn ranked(row: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{trained, Mlp, CLASSES};

    #[test]
    fn batch_refuses_bad_inputs() -> Result<()> {
        let t = trained();
        let dev = Device::Cpu;
        assert!(Batch::new(&t.model, Bounds::UNIT, &t.xs, &t.ys).is_ok());
        let outside = (t.xs.clone() + 2.0)?;
        assert!(Batch::new(&t.model, Bounds::UNIT, &outside, &t.ys).is_err());
        let bad_labels = Tensor::full(CLASSES as u32, 64, &dev)?;
        assert!(Batch::new(&t.model, Bounds::UNIT, &t.xs, &bad_labels).is_err());
        let short = t.ys.narrow(0, 0, 3)?;
        assert!(Batch::new(&t.model, Bounds::UNIT, &t.xs, &short).is_err());
        let wrong_model = Mlp::random(&[5, CLASSES], 0, DType::F32)?;
        assert!(Batch::new(&wrong_model, Bounds::UNIT, &t.xs, &t.ys).is_err());
        Ok(())
    }

    #[test]
    fn store_rounds_towards_the_clean_input() -> Result<()> {
        let t = trained();
        let batch = Batch::new(&t.model, Bounds::UNIT, &t.xs, &t.ys)?;
        let mut out = vec![0f32; batch.d];
        let delta: Vec<f64> = (0..batch.d).map(|c| 1e-3 / (c as f64 + 3.0)).collect();
        batch.store(5, &delta, &mut out);
        for ((&o, &x), &dc) in out.iter().zip(batch.row(5)).zip(&delta) {
            assert!((o as f64 - x as f64).abs() <= dc.abs());
            assert!((0.0..=1.0).contains(&o));
        }
        Ok(())
    }

    /// The two-pass `store` equals `store_value` coordinate by coordinate, bit for bit,
    /// and the vectorised `clamp_box` equals `f64::clamp`, on deltas that push past
    /// the box, round past |δ|, are tiny, zero, negative zero and NaN.
    #[test]
    fn fast_store_and_clamp_equal_the_per_coordinate_rule() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let t = trained();
        let batch = Batch::new(&t.model, Bounds::UNIT, &t.xs, &t.ys)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let specials = [0.0, -0.0, f64::NAN, 1e-12, -1e-12, 2.0, -2.0, 1e-8];
        for i in [0, 5, 17] {
            let delta: Vec<f64> = (0..batch.d)
                .map(|c| match c % 11 {
                    0..=7 => specials[c % 8],
                    8 => rng.gen_range(-0.05..0.05),
                    9 => rng.gen_range(-1.5..1.5),
                    _ => rng.gen_range(-1e-7..1e-7),
                })
                .collect();
            let mut out = vec![0f32; batch.d];
            batch.store(i, &delta, &mut out);
            for ((&o, &x), &dc) in out.iter().zip(batch.row(i)).zip(&delta) {
                assert_eq!(
                    o.to_bits(),
                    batch.store_value(x, dc).to_bits(),
                    "x {x}, δ {dc}"
                );
            }
            let values = [
                0.0f32,
                -0.0,
                1.0,
                -1.0,
                0.5,
                1e-40,
                -1e-40,
                f32::MIN_POSITIVE,
                3e38,
            ];
            for &a in &values {
                for &x in &values {
                    if a != x {
                        assert_eq!(step_toward(a, x).to_bits(), next_toward(a, x).to_bits());
                    }
                }
            }
            let mut clamped = delta.clone();
            batch.clamp_box(i, &mut clamped);
            for ((&v, &x), &dc) in clamped.iter().zip(batch.row(i)).zip(&delta) {
                let want = dc.clamp(0.0 - x as f64, 1.0 - x as f64);
                assert_eq!(v.to_bits(), want.to_bits(), "x {x}, δ {dc}");
            }
        }
        Ok(())
    }

    #[test]
    fn ranking_is_by_decreasing_value() {
        assert_eq!(ranked(&[0.1, 3.0, -1.0, 3.0]), vec![1, 3, 0, 2]);
    }
}
