//! Threat models. A [`Norm`] supplies the three pieces the PGD loop needs and nothing
//! else: a random start inside the ε-ball, a normalisation of the gradient, and the
//! projection onto the ε-ball. All of them work on one example's flattened
//! perturbation, in `f64`.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default fraction of coordinates an L1 step moves (k ≈ 2.5 % of D), as in the
/// sparse L1 steps of Stutz's PGD and of SLIDE (Tramèr & Boneh 2019).
pub const L1_TOP_K: f64 = 0.025;

/// A threat model's norm.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Norm {
    /// ‖δ‖∞ ≤ ε. Step: sign(g). Projection: clamp to [−ε, ε].
    Linf,
    /// ‖δ‖₂ ≤ ε. Step: g / ‖g‖₂. Projection: rescale onto the ball.
    L2,
    /// ‖δ‖₁ ≤ ε. Step: keep the `top_k`·D largest |g| entries (at least one), then
    /// divide by their L1 norm; `top_k = 1` is the dense step g / ‖g‖₁.
    /// Projection: exact Euclidean projection onto the L1 ball ([`project_l1_ball`]).
    L1 {
        /// Fraction of coordinates a step moves, in (0, 1].
        top_k: f64,
    },
    /// ‖δ‖₀ ≤ ε (ε an integer; counts changed values, i.e. channel values, not
    /// pixels). Step: g / ‖g‖₁. Projection: keep the ε entries largest in |δ|.
    L0,
}

/// How a restart's perturbation is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Init {
    /// δ = 0.
    Zero,
    /// Uniform in the ε-ball (by volume): L∞ U(−ε, ε)^D; L2 and L1 exact uniform
    /// samples of the ball; L0 ⌈ε⌉ random coordinates set to U(−w, w) with w the
    /// width of the bounds (the box projection then clips them).
    Uniform,
    /// Uniform in norm and direction: a random direction on the unit sphere of the
    /// norm, scaled to radius ε·U(0, 1). L0: a uniform count in {0, …, ε} of random
    /// coordinates set to U(−w, w).
    UniformNorm,
}

impl Norm {
    /// The L1 norm with the default sparse step ([`L1_TOP_K`]).
    pub fn l1() -> Norm {
        Norm::L1 { top_k: L1_TOP_K }
    }

    /// The L1 norm with the dense step g / ‖g‖₁.
    pub fn l1_dense() -> Norm {
        Norm::L1 { top_k: 1.0 }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            Norm::L1 { top_k } if !(top_k > 0.0 && top_k <= 1.0) => Err(Error::Config(format!(
                "L1 top_k must lie in (0, 1], got {top_k}"
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses an ε the threat model cannot use: negative, NaN or infinite, and for
    /// L0 anything but an integer.
    pub fn check_eps(&self, eps: f64) -> Result<()> {
        let refuse = |reason: &str| {
            Err(Error::Eps {
                eps: eps.to_string(),
                reason: reason.to_string(),
            })
        };
        if !eps.is_finite() {
            return refuse("must be finite");
        }
        if eps < 0.0 {
            return refuse("must be non-negative");
        }
        if *self == Norm::L0 && eps.fract() != 0.0 {
            return refuse("the L0 budget counts values and must be an integer");
        }
        Ok(())
    }

    /// ‖δ‖_p of one flattened perturbation (L0: number of non-zero entries).
    pub fn measure(&self, delta: &[f64]) -> f64 {
        match self {
            Norm::Linf => delta.iter().fold(0.0, |m, v| m.max(v.abs())),
            Norm::L2 => delta.iter().map(|v| v * v).sum::<f64>().sqrt(),
            Norm::L1 { .. } => delta.iter().map(|v| v.abs()).sum(),
            Norm::L0 => delta.iter().filter(|v| **v != 0.0).count() as f64,
        }
    }

    /// Projects one flattened perturbation onto the ε-ball, in place.
    pub fn project(&self, delta: &mut [f64], eps: f64) {
        match self {
            Norm::Linf => delta.iter_mut().for_each(|v| *v = v.clamp(-eps, eps)),
            Norm::L2 => {
                let norm = self.measure(delta);
                if norm > eps {
                    let scale = eps / norm;
                    delta.iter_mut().for_each(|v| *v *= scale);
                    shrink_into(*self, delta, eps);
                }
            }
            Norm::L1 { .. } => project_l1_ball(delta, eps),
            Norm::L0 => keep_largest(delta, eps as usize),
        }
    }

    /// Normalises one flattened gradient into the norm's steepest-ascent direction,
    /// in place. A zero gradient stays zero.
    pub fn normalize(&self, grad: &mut [f64]) {
        match *self {
            Norm::Linf => grad.iter_mut().for_each(|v| *v = sign(*v)),
            Norm::L2 => {
                let norm = Norm::L2.measure(grad);
                if norm > 0.0 {
                    grad.iter_mut().for_each(|v| *v /= norm);
                }
            }
            Norm::L1 { top_k } => {
                let k = ((top_k * grad.len() as f64).ceil() as usize).clamp(1, grad.len().max(1));
                keep_largest(grad, k);
                unit_l1(grad);
            }
            Norm::L0 => unit_l1(grad),
        }
    }

    /// Draws one flattened perturbation for `init` into `out` (length D).
    /// `width` is the width of the input bounds (used by L0, whose ball does not bound
    /// values).
    pub fn sample<R: Rng + ?Sized>(
        &self,
        init: Init,
        eps: f64,
        width: f64,
        rng: &mut R,
        out: &mut [f64],
    ) {
        let n = out.len();
        match (init, self) {
            (Init::Zero, _) => out.fill(0.0),
            (Init::Uniform, Norm::Linf) => out
                .iter_mut()
                .for_each(|v| *v = eps * rng.gen_range(-1.0..=1.0)),
            (Init::Uniform, Norm::L2) => {
                gaussian_direction(rng, out);
                // Radius of a uniform point in the n-ball: ε·U^(1/n).
                let radius = eps * (uniform_open(rng).ln() / n as f64).exp();
                out.iter_mut().for_each(|v| *v *= radius);
            }
            (Init::Uniform, Norm::L1 { .. }) => {
                // (E_1, …, E_n) / Σ_{j ≤ n+1} E_j with E_j ~ Exp(1) is uniform on the solid
                // simplex; random signs make it uniform in the L1 ball.
                let mut total = 0.0;
                for v in out.iter_mut() {
                    let e = -uniform_open(rng).ln();
                    total += e;
                    *v = if rng.gen::<bool>() { e } else { -e };
                }
                total += -uniform_open(rng).ln();
                out.iter_mut().for_each(|v| *v *= eps / total);
            }
            (Init::UniformNorm, Norm::Linf) => {
                out.iter_mut().for_each(|v| *v = rng.gen_range(-1.0..=1.0));
                scale_to(out, Norm::Linf.measure(out), eps * rng.gen::<f64>());
            }
            (Init::UniformNorm, Norm::L2) => {
                gaussian_direction(rng, out);
                let radius = eps * rng.gen::<f64>();
                out.iter_mut().for_each(|v| *v *= radius);
            }
            (Init::UniformNorm, Norm::L1 { .. }) => {
                // Laplace samples normalised to unit L1 norm are uniform on the L1 sphere.
                for v in out.iter_mut() {
                    let e = -uniform_open(rng).ln();
                    *v = if rng.gen::<bool>() { e } else { -e };
                }
                let norm = Norm::l1().measure(out);
                scale_to(out, norm, eps * rng.gen::<f64>());
            }
            (Init::Uniform, Norm::L0) | (Init::UniformNorm, Norm::L0) => {
                out.fill(0.0);
                let k = (eps as usize).min(n);
                let count = match init {
                    Init::UniformNorm => rng.gen_range(0..=k),
                    _ => k,
                };
                for i in rand::seq::index::sample(rng, n, count) {
                    out[i] = width * rng.gen_range(-1.0..=1.0);
                }
            }
        }
    }
}

/// Exact Euclidean projection of `v` onto the L1 ball of radius `eps`, in place
/// (Duchi, Shalev-Shwartz, Singer & Chandra 2008, sort-based, O(D log D)):
/// soft-thresholding by the θ ≥ 0 for which the result has L1 norm exactly ε.
pub fn project_l1_ball(v: &mut [f64], eps: f64) {
    let l1: f64 = v.iter().map(|a| a.abs()).sum();
    if l1 <= eps {
        return;
    }
    if eps <= 0.0 {
        v.fill(0.0);
        return;
    }
    let mut u: Vec<f64> = v.iter().map(|a| a.abs()).collect();
    u.sort_unstable_by(|a, b| b.total_cmp(a));
    // ρ = max{j : u_j > (Σ_{r≤j} u_r − ε)/j}; the condition holds exactly on a prefix.
    let mut cumsum = 0.0;
    let mut theta = 0.0;
    for (j, &uj) in u.iter().enumerate() {
        cumsum += uj;
        let t = (cumsum - eps) / (j + 1) as f64;
        if uj > t {
            theta = t;
        } else {
            break;
        }
    }
    for a in v.iter_mut() {
        let magnitude = (a.abs() - theta).max(0.0);
        *a = if *a < 0.0 { -magnitude } else { magnitude };
    }
    shrink_into(Norm::l1(), v, eps);
}

/// Exact Euclidean projection of `v` onto the intersection of the L1 ball of radius
/// `eps` with the box `[lower, upper]` (each `lower_i ≤ 0 ≤ upper_i`), in place.
///
/// The solution is v_i ↦ sign(v_i)·min(max(|v_i| − θ, 0), c_i), with c_i the room the
/// box leaves in the direction of v_i and θ ≥ 0 the smallest threshold giving an L1
/// norm of at most ε; θ is found exactly by sweeping the sorted breakpoints of this
/// piecewise-linear function (O(D log D)). This is the projection L1-APGD needs
/// (Croce & Hein, ICML 2021): for the L1 ball, projecting onto the ball and then
/// clipping to the box can waste most of the budget on clipped coordinates.
pub fn project_l1_box(v: &mut [f64], eps: f64, lower: &[f64], upper: &[f64]) {
    let cap = |i: usize, a: f64| if a > 0.0 { upper[i] } else { -lower[i] };
    let clipped = |v: &[f64], theta: f64, i: usize| -> f64 {
        let a = v[i];
        let m = (a.abs() - theta).max(0.0).min(cap(i, a));
        if a < 0.0 {
            -m
        } else {
            m
        }
    };
    let l1_at =
        |v: &[f64], theta: f64| -> f64 { (0..v.len()).map(|i| clipped(v, theta, i).abs()).sum() };
    if l1_at(v, 0.0) <= eps || eps <= 0.0 {
        let theta = if eps <= 0.0 { f64::INFINITY } else { 0.0 };
        for i in 0..v.len() {
            v[i] = clipped(v, theta, i);
        }
        return;
    }
    // g(θ) = Σ min(max(|v_i| − θ, 0), c_i) falls from g(0) > ε to 0. Going down in θ,
    // coordinate i starts to grow at θ = |v_i| and stops (saturates) at |v_i| − c_i:
    // between breakpoints g is linear with slope −(number of growing coordinates).
    let mut events: Vec<(f64, i32)> = Vec::with_capacity(2 * v.len());
    for (i, &a) in v.iter().enumerate() {
        let c = cap(i, a);
        if a != 0.0 && c > 0.0 {
            events.push((a.abs(), 1));
            events.push((a.abs() - c, -1));
        }
    }
    events.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let (mut g, mut growing, mut prev) = (0.0f64, 0i64, events.first().map_or(0.0, |e| e.0));
    let mut theta = 0.0;
    for &(t, step) in &events {
        let t = t.max(0.0);
        let next = g + growing as f64 * (prev - t);
        if next >= eps && growing > 0 {
            theta = prev - (eps - g) / growing as f64;
            break;
        }
        g = next;
        prev = t;
        growing += step as i64;
        if t <= 0.0 {
            break;
        }
    }
    for i in 0..v.len() {
        v[i] = clipped(v, theta.max(0.0), i);
    }
    shrink_into(Norm::l1(), v, eps);
}

/// A standard normal draw (Box–Muller on 1 − U and U, U uniform on [0, 1)): the draw
/// of every Gaussian random start, here and in training methods with their own ascent
/// (TRADES), so that one seed gives one stream everywhere.
pub fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let r = (-2.0 * uniform_open(rng).ln()).sqrt();
    r * (std::f64::consts::TAU * rng.gen::<f64>()).cos()
}

/// Removes the rounding excess of a projection: shrinks `v` by a few ulps until its
/// norm is at most `eps` in floating point, so that projections are exact and
/// idempotent.
fn shrink_into(norm: Norm, v: &mut [f64], eps: f64) {
    let mut factor = 1.0 - f64::EPSILON;
    while norm.measure(v) > eps {
        v.iter_mut().for_each(|a| *a *= factor);
        factor *= 1.0 - f64::EPSILON;
    }
}

/// Zeroes all but the `k` entries largest in absolute value.
fn keep_largest(v: &mut [f64], k: usize) {
    let mut nonzero: Vec<usize> = (0..v.len()).filter(|&i| v[i] != 0.0).collect();
    if nonzero.len() <= k {
        return;
    }
    if k > 0 {
        nonzero.select_nth_unstable_by(k, |&a, &b| v[b].abs().total_cmp(&v[a].abs()));
    }
    for &i in &nonzero[k..] {
        v[i] = 0.0;
    }
}

fn unit_l1(v: &mut [f64]) {
    let norm: f64 = v.iter().map(|a| a.abs()).sum();
    if norm > 0.0 {
        v.iter_mut().for_each(|a| *a /= norm);
    }
}

/// The sign of `v`: −1, 0 or 1 (0 at ±0, unlike `f64::signum`).
pub(crate) fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn scale_to(v: &mut [f64], norm: f64, radius: f64) {
    if norm > 0.0 {
        let s = radius / norm;
        v.iter_mut().for_each(|a| *a *= s);
    }
}

/// U(0, 1], never 0 (safe under `ln`).
fn uniform_open<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    1.0 - rng.gen::<f64>()
}

/// A uniformly random direction on the unit L2 sphere (normalised Gaussian, Box–Muller).
fn gaussian_direction<R: Rng + ?Sized>(rng: &mut R, out: &mut [f64]) {
    for v in out.iter_mut() {
        *v = standard_normal(rng);
    }
    let norm = Norm::L2.measure(out);
    scale_to(out, norm, 1.0);
}

impl fmt::Display for Norm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Norm::Linf => write!(f, "linf"),
            Norm::L2 => write!(f, "l2"),
            Norm::L1 { top_k } if *top_k == L1_TOP_K => write!(f, "l1"),
            Norm::L1 { top_k } => write!(f, "l1:{top_k}"),
            Norm::L0 => write!(f, "l0"),
        }
    }
}

impl FromStr for Norm {
    type Err = Error;

    /// `linf`, `l2`, `l1` (sparse step, k = 2.5 % of D), `l1:<fraction>` (k = fraction
    /// of D; `l1:1` is the dense step), `l0`. Case-insensitive.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let unknown = || Error::UnknownName {
            kind: "norm",
            name: s.to_string(),
            expected: "linf, l2, l1, l1:<fraction>, l0",
        };
        let norm = match lower.as_str() {
            "linf" => Norm::Linf,
            "l2" => Norm::L2,
            "l1" => Norm::l1(),
            "l0" => Norm::L0,
            other => match other.strip_prefix("l1:") {
                Some(fraction) => Norm::L1 {
                    top_k: fraction.parse().map_err(|_| unknown())?,
                },
                None => return Err(unknown()),
            },
        };
        norm.validate()?;
        Ok(norm)
    }
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Init::Zero => "zero",
            Init::Uniform => "uniform",
            Init::UniformNorm => "uniform-norm",
        })
    }
}

impl FromStr for Init {
    type Err = Error;

    /// `zero`, `uniform`, `uniform-norm`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "zero" => Ok(Init::Zero),
            "uniform" => Ok(Init::Uniform),
            "uniform-norm" => Ok(Init::UniformNorm),
            _ => Err(Error::UnknownName {
                kind: "initialisation",
                name: s.to_string(),
                expected: "zero, uniform, uniform-norm",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const NORMS: [Norm; 5] = [
        Norm::Linf,
        Norm::L2,
        Norm::L1 { top_k: L1_TOP_K },
        Norm::L1 { top_k: 1.0 },
        Norm::L0,
    ];

    fn random_vec(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| scale * rng.gen_range(-1.0..1.0)).collect()
    }

    /// Reference projection: bisection on the soft-threshold θ of
    /// min ½‖z − v‖² s.t. ‖z‖₁ ≤ ε, whose solution is z = sign(v)·max(|v| − θ, 0).
    fn l1_projection_by_bisection(v: &[f64], eps: f64) -> Vec<f64> {
        let soft = |theta: f64| -> Vec<f64> {
            v.iter()
                .map(|a| a.signum() * (a.abs() - theta).max(0.0))
                .collect()
        };
        if v.iter().map(|a| a.abs()).sum::<f64>() <= eps {
            return v.to_vec();
        }
        let (mut lo, mut hi) = (0.0, v.iter().fold(0.0f64, |m, a| m.max(a.abs())));
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if soft(mid).iter().map(|a| a.abs()).sum::<f64>() > eps {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        soft(hi)
    }

    /// Reference for the L1 ball ∩ box: bisection on θ of
    /// sign(v)·min(max(|v| − θ, 0), room in the box).
    fn l1_box_by_bisection(v: &[f64], eps: f64, lower: &[f64], upper: &[f64]) -> Vec<f64> {
        let at = |theta: f64| -> Vec<f64> {
            v.iter()
                .enumerate()
                .map(|(i, a)| (a.signum() * (a.abs() - theta).max(0.0)).clamp(lower[i], upper[i]))
                .collect()
        };
        let l1 = |z: &[f64]| z.iter().map(|a| a.abs()).sum::<f64>();
        if l1(&at(0.0)) <= eps {
            return at(0.0);
        }
        let (mut lo, mut hi) = (0.0, v.iter().fold(0.0f64, |m, a| m.max(a.abs())));
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if l1(&at(mid)) > eps {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        at(hi)
    }

    #[test]
    fn l1_box_projection_matches_bisection_and_is_feasible() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for trial in 0..300 {
            let n = [1, 2, 3, 7, 50, 500, 3072][trial % 7];
            let scale = rng.gen_range(0.01..2.0);
            let v = random_vec(&mut rng, n, scale);
            let x: Vec<f64> = (0..n).map(|_| rng.gen_range(0.0..1.0)).collect();
            let lower: Vec<f64> = x.iter().map(|x| -x).collect();
            let upper: Vec<f64> = x.iter().map(|x| 1.0 - x).collect();
            let eps = rng.gen_range(0.0..(n as f64).sqrt());
            let mut got = v.clone();
            project_l1_box(&mut got, eps, &lower, &upper);
            let want = l1_box_by_bisection(&v, eps, &lower, &upper);
            assert!(
                Norm::l1().measure(&got) <= eps,
                "trial {trial}: outside the ball"
            );
            for i in 0..n {
                assert!(
                    got[i] >= lower[i] && got[i] <= upper[i],
                    "trial {trial}: outside the box"
                );
                assert!(
                    (got[i] - want[i]).abs() < 1e-9,
                    "trial {trial}, {i}: {} vs {}",
                    got[i],
                    want[i]
                );
            }
            // Never farther from v than another feasible point: the box-clipped plain
            // L1 projection.
            let mut other: Vec<f64> = v.clone();
            project_l1_ball(&mut other, eps);
            for i in 0..n {
                other[i] = other[i].clamp(lower[i], upper[i]);
            }
            let dist = |z: &[f64]| z.iter().zip(&v).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            assert!(dist(&got) <= dist(&other) + 1e-12);
        }
    }

    #[test]
    fn l1_projection_matches_bisection_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for trial in 0..300 {
            let n = [1, 2, 3, 7, 50, 500, 3072][trial % 7];
            let scale = rng.gen_range(0.01..3.0);
            let v = random_vec(&mut rng, n, scale);
            let eps = rng.gen_range(0.0..(n as f64));
            let mut p = v.clone();
            project_l1_ball(&mut p, eps);
            let reference = l1_projection_by_bisection(&v, eps);
            for (a, b) in p.iter().zip(&reference) {
                assert!((a - b).abs() < 1e-9, "n={n} eps={eps}: {a} vs {b}");
            }
            assert!(Norm::l1().measure(&p) <= eps + 1e-9);
        }
    }

    #[test]
    fn l1_projection_is_the_nearest_point_of_the_ball() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let dist = |a: &[f64], b: &[f64]| -> f64 {
            a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>()
        };
        for _ in 0..50 {
            let v = random_vec(&mut rng, 20, 1.0);
            let eps = 2.0;
            let mut p = v.clone();
            project_l1_ball(&mut p, eps);
            for _ in 0..200 {
                let mut z = vec![0.0; 20];
                Norm::l1().sample(Init::Uniform, eps, 1.0, &mut rng, &mut z);
                assert!(dist(&v, &p) <= dist(&v, &z) + 1e-12);
            }
        }
    }

    #[test]
    fn projections_land_in_the_ball_and_keep_interior_points() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for norm in NORMS {
            for _ in 0..50 {
                let v = random_vec(&mut rng, 64, 2.0);
                let eps = if norm == Norm::L0 {
                    5.0
                } else {
                    rng.gen_range(0.0..3.0)
                };
                let mut p = v.clone();
                norm.project(&mut p, eps);
                assert!(
                    norm.measure(&p) <= eps + 1e-12,
                    "{norm}: {} > {eps}",
                    norm.measure(&p)
                );
                if norm.measure(&v) <= eps {
                    assert_eq!(p, v, "{norm} moved an interior point");
                }
                let mut again = p.clone();
                norm.project(&mut again, eps);
                assert_eq!(again, p, "{norm} projection is not idempotent");
            }
        }
    }

    #[test]
    fn l0_projection_keeps_the_largest_entries() {
        let mut v = vec![0.1, -3.0, 0.0, 2.0, -0.5, 1.0];
        Norm::L0.project(&mut v, 2.0);
        assert_eq!(v, vec![0.0, -3.0, 0.0, 2.0, 0.0, 0.0]);
        Norm::L0.project(&mut v, 0.0);
        assert_eq!(v, vec![0.0; 6]);
    }

    #[test]
    fn linf_and_l2_projections_on_known_points() {
        let mut v = vec![0.5, -0.2, 0.05];
        Norm::Linf.project(&mut v, 0.1);
        assert_eq!(v, vec![0.1, -0.1, 0.05]);
        let mut v = vec![3.0, 4.0];
        Norm::L2.project(&mut v, 1.0);
        assert!((v[0] - 0.6).abs() < 1e-15 && (v[1] - 0.8).abs() < 1e-15);
    }

    #[test]
    fn normalised_gradients_have_unit_size_and_the_right_support() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let g = random_vec(&mut rng, 400, 1.0);

        let mut s = g.clone();
        Norm::Linf.normalize(&mut s);
        assert!(s.iter().zip(&g).all(|(a, b)| *a == b.signum()));

        let mut s = g.clone();
        Norm::L2.normalize(&mut s);
        assert!((Norm::L2.measure(&s) - 1.0).abs() < 1e-12);
        assert!(s.iter().zip(&g).all(|(a, b)| a * b > 0.0));

        let mut s = g.clone();
        Norm::l1().normalize(&mut s);
        assert_eq!(Norm::L0.measure(&s), 10.0, "k = ceil(0.025 * 400)");
        assert!((Norm::l1().measure(&s) - 1.0).abs() < 1e-12);
        let smallest_kept = s
            .iter()
            .zip(&g)
            .filter(|(a, _)| **a != 0.0)
            .fold(f64::INFINITY, |m, (_, b)| m.min(b.abs()));
        let largest_dropped = s
            .iter()
            .zip(&g)
            .filter(|(a, _)| **a == 0.0)
            .fold(0.0f64, |m, (_, b)| m.max(b.abs()));
        assert!(smallest_kept >= largest_dropped);

        let mut s = g.clone();
        Norm::l1_dense().normalize(&mut s);
        assert_eq!(Norm::L0.measure(&s), 400.0);
        assert!((Norm::l1().measure(&s) - 1.0).abs() < 1e-12);

        let mut zero = vec![0.0; 5];
        for norm in NORMS {
            norm.normalize(&mut zero);
            assert_eq!(zero, vec![0.0; 5], "{norm}");
        }
    }

    #[test]
    fn samples_lie_in_the_ball() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for norm in NORMS {
            for init in [Init::Zero, Init::Uniform, Init::UniformNorm] {
                for _ in 0..20 {
                    let eps = if norm == Norm::L0 { 7.0 } else { 0.7 };
                    let mut v = vec![0.0; 100];
                    norm.sample(init, eps, 1.0, &mut rng, &mut v);
                    assert!(norm.measure(&v) <= eps + 1e-12, "{norm} {init}");
                    if init == Init::Zero {
                        assert_eq!(norm.measure(&v), 0.0);
                    }
                }
            }
        }
    }

    /// For a uniform sample of the n-dimensional ball, P(‖δ‖ ≤ rε) = r^n, so
    /// E‖δ‖ = ε·n/(n+1); uniform-norm samples have E‖δ‖ = ε/2. With n = 3 the two
    /// differ (0.75 vs 0.5) far beyond the Monte-Carlo error of 4000 draws (≈0.005).
    #[test]
    fn uniform_samples_have_the_radius_law_of_the_ball() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 3;
        for norm in [Norm::Linf, Norm::L2, Norm::l1()] {
            for (init, expected) in [(Init::Uniform, 0.75), (Init::UniformNorm, 0.5)] {
                let draws = 4000;
                let mut mean = 0.0;
                let mut v = vec![0.0; n];
                for _ in 0..draws {
                    norm.sample(init, 1.0, 1.0, &mut rng, &mut v);
                    mean += norm.measure(&v) / draws as f64;
                }
                assert!(
                    (mean - expected).abs() < 0.02,
                    "{norm} {init}: mean radius {mean}"
                );
            }
        }
    }

    #[test]
    fn names_parse_and_print() -> Result<()> {
        for norm in [Norm::Linf, Norm::L2, Norm::l1(), Norm::l1_dense(), Norm::L0] {
            assert_eq!(norm.to_string().parse::<Norm>()?, norm);
        }
        assert_eq!("LINF".parse::<Norm>()?, Norm::Linf);
        assert_eq!("l1".parse::<Norm>()?, Norm::L1 { top_k: 0.025 });
        assert!("l3".parse::<Norm>().is_err());
        assert!("l1:0".parse::<Norm>().is_err());
        assert!("l1:2".parse::<Norm>().is_err());
        for init in [Init::Zero, Init::Uniform, Init::UniformNorm] {
            assert_eq!(init.to_string().parse::<Init>()?, init);
        }
        assert!("gaussian".parse::<Init>().is_err());
        Ok(())
    }

    #[test]
    fn eps_checks() {
        assert!(Norm::L0.check_eps(10.0).is_ok());
        assert!(Norm::L0.check_eps(0.0).is_ok());
        assert!(Norm::L0.check_eps(2.5).is_err());
        for norm in NORMS {
            assert!(norm.check_eps(-0.1).is_err());
            assert!(norm.check_eps(f64::NAN).is_err());
            assert!(norm.check_eps(f64::INFINITY).is_err());
        }
        assert!(Norm::L2.check_eps(0.5).is_ok());
    }
}
