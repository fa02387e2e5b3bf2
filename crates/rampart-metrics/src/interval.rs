//! Confidence intervals and significance tests for the numbers the other modules
//! report: the Wilson score interval for an error or accuracy (a binomial
//! proportion), a seeded percentile bootstrap for any per-example statistic, and the
//! tests that say whether two measured numbers differ.

use serde::{Deserialize, Serialize};

use crate::check;
use crate::error::{MetricsError, Result};

/// The usual confidence level, 95 %.
pub const CONFIDENCE_95: f64 = 0.95;

/// The usual number of bootstrap resamples.
pub const BOOTSTRAP_RESAMPLES: usize = 1000;

/// A closed interval [lo, hi] of real numbers, lo ≤ hi as every function of this
/// module returns it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower end, included.
    pub lo: f64,
    /// Upper end, included.
    pub hi: f64,
}

impl Interval {
    /// Whether lo ≤ v ≤ hi (both ends included; false for a NaN v).
    pub fn contains(&self, v: f64) -> bool {
        self.lo <= v && v <= self.hi
    }

    /// Whether the two closed intervals share at least one point: lo ≤ other.hi and
    /// other.lo ≤ hi. Intervals that only touch at an end overlap.
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }

    /// hi − lo.
    pub fn width(&self) -> f64 {
        self.hi - self.lo
    }
}

/// Inverse of the standard normal CDF Φ: the z with Φ(z) = p, for p in (0, 1).
///
/// Wichura's algorithm AS 241 (PPND16, Applied Statistics 37(3), 1988, 477–484):
/// rational approximations of degree 7 in three ranges of p, with a relative
/// accuracy of about 1e−16. Φ⁻¹(0.5) = 0 exactly and Φ⁻¹(1 − p) = −Φ⁻¹(p) up to
/// the rounding of 1 − p.
pub fn normal_quantile(p: f64) -> Result<f64> {
    if !(p > 0.0 && p < 1.0) {
        return Err(MetricsError::InvalidParameter {
            what: "p",
            value: p,
            expected: "a probability in (0, 1)",
        });
    }
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        return Ok(q * polynomial(&AS241_A, r) / polynomial(&AS241_B, r));
    }
    let tail = if q < 0.0 { p } else { 1.0 - p };
    let r = (-tail.ln()).sqrt();
    let z = if r <= 5.0 {
        let r = r - 1.6;
        polynomial(&AS241_C, r) / polynomial(&AS241_D, r)
    } else {
        let r = r - 5.0;
        polynomial(&AS241_E, r) / polynomial(&AS241_F, r)
    };
    Ok(if q < 0.0 { -z } else { z })
}

// The coefficients of AS 241, lowest degree first, as published (hence more digits
// than an f64 holds).
#[allow(clippy::excessive_precision)]
const AS241_A: [f64; 8] = [
    3.3871328727963666080e0,
    1.3314166789178437745e+2,
    1.9715909503065514427e+3,
    1.3731693765509461125e+4,
    4.5921953931549871457e+4,
    6.7265770927008700853e+4,
    3.3430575583588128105e+4,
    2.5090809287301226727e+3,
];
#[allow(clippy::excessive_precision)]
const AS241_B: [f64; 8] = [
    1.0,
    4.2313330701600911252e+1,
    6.8718700749205790830e+2,
    5.3941960214247511077e+3,
    2.1213794301586595867e+4,
    3.9307895800092710610e+4,
    2.8729085735721942674e+4,
    5.2264952788528545610e+3,
];
#[allow(clippy::excessive_precision)]
const AS241_C: [f64; 8] = [
    1.42343711074968357734e0,
    4.63033784615654529590e0,
    5.76949722146069140550e0,
    3.64784832476320460504e0,
    1.27045825245236838258e0,
    2.41780725177450611770e-1,
    2.27238449892691845833e-2,
    7.74545014278341407640e-4,
];
#[allow(clippy::excessive_precision)]
const AS241_D: [f64; 8] = [
    1.0,
    2.05319162663775882187e0,
    1.67638483018380384940e0,
    6.89767334985100004550e-1,
    1.48103976427480074590e-1,
    1.51986665636164571966e-2,
    5.47593808499534494600e-4,
    1.05075007164441684324e-9,
];
#[allow(clippy::excessive_precision)]
const AS241_E: [f64; 8] = [
    6.65790464350110377720e0,
    5.46378491116411436990e0,
    1.78482653991729133580e0,
    2.96560571828504891230e-1,
    2.65321895265761230930e-2,
    1.24266094738807843860e-3,
    2.71155556874348757815e-5,
    2.01033439929228813265e-7,
];
#[allow(clippy::excessive_precision)]
const AS241_F: [f64; 8] = [
    1.0,
    5.99832206555887937690e-1,
    1.36929880922735805310e-1,
    1.48753612908506148525e-2,
    7.86869131145613259100e-4,
    1.84631831751005468180e-5,
    1.42151175831644588870e-7,
    2.04426310338993978564e-15,
];

/// Σ_i coefficients[i]·x^i by Horner's rule.
fn polynomial(coefficients: &[f64], x: f64) -> f64 {
    coefficients.iter().rev().fold(0.0, |acc, &c| acc * x + c)
}

/// A confidence level in (0, 1).
fn confidence_level(confidence: f64) -> Result<()> {
    if confidence > 0.0 && confidence < 1.0 {
        Ok(())
    } else {
        Err(MetricsError::InvalidParameter {
            what: "confidence",
            value: confidence,
            expected: "a level in (0, 1)",
        })
    }
}

/// z = Φ⁻¹(1 − α/2) with α = 1 − confidence, computed as −Φ⁻¹(α/2) so that levels
/// close to 1 keep their precision.
fn two_sided_z(confidence: f64) -> Result<f64> {
    confidence_level(confidence)?;
    Ok(-normal_quantile((1.0 - confidence) / 2.0)?)
}

/// Wilson score interval for a binomial proportion, without continuity correction.
///
/// With p̂ = successes / n, z = Φ⁻¹(1 − α/2) and α = 1 − confidence:
///
/// ```text
/// centre = (p̂ + z²/(2n)) / (1 + z²/n)
/// half   = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/(4n²))
/// [lo, hi] = [centre − half, centre + half] clamped to [0, 1]
/// ```
///
/// lo is exactly 0 when successes = 0 and hi exactly 1 when successes = n (the
/// formula gives these values up to rounding). n ≥ 1, successes ≤ n, confidence in
/// (0, 1). Use it for an error or accuracy over n test examples: the interval
/// for the error is 1 minus the interval for the accuracy.
pub fn wilson(successes: usize, n: usize, confidence: f64) -> Result<Interval> {
    wilson_named("successes", successes, "n", n, confidence)
}

/// [`wilson`], with the argument names to put in errors.
fn wilson_named(
    successes_what: &'static str,
    successes: usize,
    n_what: &'static str,
    n: usize,
    confidence: f64,
) -> Result<Interval> {
    if n == 0 {
        return Err(MetricsError::InvalidParameter {
            what: n_what,
            value: 0.0,
            expected: "at least 1 trial",
        });
    }
    if successes > n {
        return Err(MetricsError::CountExceedsTotal {
            what: successes_what,
            count: successes,
            total_what: n_what,
            total: n,
        });
    }
    let z = two_sided_z(confidence)?;
    let n_f = n as f64;
    let p = check::fraction(successes, n);
    let z2 = z * z;
    let denominator = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denominator;
    let half = z / denominator * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    let lo = if successes == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if successes == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    Ok(Interval { lo, hi })
}

/// Percentile bootstrap interval of a statistic over n examples, seeded.
///
/// Each of `resamples` resamples draws n indices uniformly from [0, n) with
/// replacement and passes them to `statistic`, which computes the statistic on
/// those examples (an index drawn twice counts twice). A resample is skipped when
/// the statistic is `None` (undefined on it, e.g. Err@τ when τ rejects every drawn
/// example) or not finite. With the m valid values sorted, x₀ ≤ … ≤ x_{m−1}, and
/// α = 1 − confidence, the interval is [Q(α/2), Q(1 − α/2)], where Q(q) linearly
/// interpolates between order statistics (numpy's default `linear` method,
/// Hyndman–Fan type 7): with h = (m − 1)·q, Q(q) = x_⌊h⌋ + (h − ⌊h⌋)·(x_{⌊h⌋+1} − x_⌊h⌋).
///
/// Returns `Ok(None)` when fewer than half of the resamples are valid (2m <
/// resamples): the statistic is then undefined too often for its interval to
/// mean anything. n ≥ 1, resamples ≥ 2 (see [`BOOTSTRAP_RESAMPLES`]), confidence in
/// (0, 1).
///
/// The indices come from splitmix64 (Steele, Lea and Flood 2014; Vigna's reference
/// constants) with its state initialised to `seed`, each index mapped into [0, n)
/// by Lemire's multiply-and-reject method, which is exactly uniform: the same seed
/// gives the same interval on every platform.
pub fn bootstrap<F>(
    n: usize,
    resamples: usize,
    confidence: f64,
    seed: u64,
    mut statistic: F,
) -> Result<Option<Interval>>
where
    F: FnMut(&[usize]) -> Option<f64>,
{
    if n == 0 {
        return Err(MetricsError::InvalidParameter {
            what: "n",
            value: 0.0,
            expected: "at least 1 example",
        });
    }
    if resamples < 2 {
        return Err(MetricsError::InvalidParameter {
            what: "resamples",
            value: resamples as f64,
            expected: "at least 2 resamples",
        });
    }
    confidence_level(confidence)?;
    let mut rng = SplitMix64::new(seed);
    let mut indices = vec![0usize; n];
    let mut values = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for index in indices.iter_mut() {
            *index = rng.below(n);
        }
        if let Some(v) = statistic(&indices) {
            if v.is_finite() {
                values.push(v);
            }
        }
    }
    if 2 * values.len() < resamples {
        return Ok(None);
    }
    values.sort_unstable_by(f64::total_cmp);
    let alpha = 1.0 - confidence;
    Ok(Some(Interval {
        lo: linear_quantile(&values, alpha / 2.0),
        hi: linear_quantile(&values, 1.0 - alpha / 2.0),
    }))
}

/// Q(q) of non-empty ascending `sorted` by linear interpolation between order
/// statistics (numpy's default), q in [0, 1].
fn linear_quantile(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len() - 1;
    let h = last as f64 * q;
    let below = (h.floor() as usize).min(last);
    let fraction = h - below as f64;
    match sorted.get(below + 1) {
        Some(&above) if fraction > 0.0 => sorted[below] + fraction * (above - sorted[below]),
        _ => sorted[below],
    }
}

/// splitmix64: a 64-bit state advanced by the golden-ratio increment, each output a
/// bijective mix of the state.
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, bound), bound ≥ 1 (Lemire 2019: the high word of x·bound,
    /// rejecting the low words below 2⁶⁴ mod bound).
    pub(crate) fn below(&mut self, bound: usize) -> usize {
        let bound = bound as u64;
        let mut product = u128::from(self.next_u64()) * u128::from(bound);
        if (product as u64) < bound {
            let threshold = bound.wrapping_neg() % bound;
            while (product as u64) < threshold {
                product = u128::from(self.next_u64()) * u128::from(bound);
            }
        }
        (product >> 64) as usize
    }
}

/// Whether two proportions differ: true when their Wilson intervals at
/// `confidence` ([`wilson`]) do not overlap ([`Interval::overlaps`]).
///
/// A conservative test for independent samples (two models on different test sets,
/// or one model before and after a change of data): non-overlapping 95 % intervals
/// imply that the difference is significant at p < 0.05, but overlapping intervals
/// do not imply that it is not. For two models on the *same* examples use
/// [`paired_differs`], which is both valid and far more powerful there. Counts and
/// confidence as in [`wilson`].
pub fn proportion_differs(
    a_successes: usize,
    a_n: usize,
    b_successes: usize,
    b_n: usize,
    confidence: f64,
) -> Result<bool> {
    let a = wilson_named("a_successes", a_successes, "a_n", a_n, confidence)?;
    let b = wilson_named("b_successes", b_successes, "b_n", b_n, confidence)?;
    Ok(!a.overlaps(&b))
}

/// An interval for the difference a − b of two independently estimated numbers, from
/// each one's estimate and interval: the MOVER method (method of variance estimates
/// recovery; Newcombe's hybrid score interval when the two intervals are Wilson's),
///
/// ```text
/// lo = (a − b) − √((a − a.lo)² + (b.hi − b)²)
/// hi = (a − b) + √((a.hi − a)² + (b − b.lo)²)
/// ```
///
/// It inherits the asymmetry of the intervals it combines, so two Wilson intervals
/// of rates near 0 or 1 give a sensible interval where the normal approximation of
/// the difference does not. The samples must be independent (two models on different
/// test images, or figures whose intervals come from separate bootstraps); for two
/// models on the same images it is conservative. Each estimate must lie in its
/// interval.
pub fn difference_interval(a: f64, a_ci: Interval, b: f64, b_ci: Interval) -> Result<Interval> {
    for (what, v, ci) in [("a", a, a_ci), ("b", b, b_ci)] {
        if !(v.is_finite() && ci.lo.is_finite() && ci.hi.is_finite() && ci.contains(v)) {
            return Err(MetricsError::InvalidParameter {
                what,
                value: v,
                expected: "a finite estimate inside its finite interval",
            });
        }
    }
    let d = a - b;
    Ok(Interval {
        lo: d - ((a - a_ci.lo).powi(2) + (b_ci.hi - b).powi(2)).sqrt(),
        hi: d + ((a_ci.hi - a).powi(2) + (b - b_ci.lo).powi(2)).sqrt(),
    })
}

/// Exact two-sided McNemar p-value for paired per-example outcomes (e.g. two
/// models' correctness on the same test examples).
///
/// With b₀₁ = #(a true ∧ b false), b₁₀ = #(a false ∧ b true), m = b₀₁ + b₁₀ and
/// k = min(b₀₁, b₁₀), p = min(1, 2·P(X ≤ k)) for X ~ Binomial(m, ½): the exact
/// two-sided binomial (sign) test of the discordant pairs, the concordant ones
/// carrying no information. P(X ≤ k) = Σ_{i≤k} C(m, i)·2⁻ᵐ is summed in log space,
/// so m in the millions neither overflows nor underflows. p = 1 exactly when
/// 2k + 1 ≥ m (then P(X ≤ k) ≥ ½), in particular when there are no discordant
/// pairs. a and b: (N,), N ≥ 1, aligned.
pub fn mcnemar_p(a: &[bool], b: &[bool]) -> Result<f64> {
    check::non_empty("a", a)?;
    check::same_len("a", a, "b", b)?;
    let a_only = a.iter().zip(b).filter(|&(&x, &y)| x && !y).count();
    let b_only = a.iter().zip(b).filter(|&(&x, &y)| !x && y).count();
    Ok(sign_test_p(a_only, b_only))
}

/// min(1, 2·P(X ≤ min(b01, b10))) for X ~ Binomial(b01 + b10, ½), in base-2 logs.
fn sign_test_p(b01: usize, b10: usize) -> f64 {
    let m = b01 + b10;
    let k = b01.min(b10);
    if 2 * k + 1 >= m {
        return 1.0;
    }
    // log2 C(m, i) for i = 0..=k; they increase with i since k < m/2.
    let mut log_choose = Vec::with_capacity(k + 1);
    let mut current = 0.0f64;
    log_choose.push(current);
    for i in 1..=k {
        current += ((m - i + 1) as f64).log2() - (i as f64).log2();
        log_choose.push(current);
    }
    let largest = current;
    let log_sum = largest
        + log_choose
            .iter()
            .map(|&l| (l - largest).exp2())
            .sum::<f64>()
            .log2();
    (1.0 + log_sum - m as f64).exp2().min(1.0)
}

/// Whether two classifiers' paired outcomes differ: [`mcnemar_p`]`(a, b)` < 1 −
/// confidence. False when no example is discordant. a and b: (N,), N ≥ 1,
/// aligned; confidence in (0, 1).
pub fn paired_differs(a: &[bool], b: &[bool], confidence: f64) -> Result<bool> {
    confidence_level(confidence)?;
    Ok(mcnemar_p(a, b)? < 1.0 - confidence)
}

#[cfg(test)]
mod tests {

    /// Newcombe (1998, Statistics in Medicine 17, 873–890), example (b): 56/70 vs
    /// 48/80, whose hybrid score interval (method 10) is printed as
    /// (0.0524, 0.3339).
    #[test]
    fn difference_interval_reproduces_newcombes_example() {
        let a = wilson(56, 70, CONFIDENCE_95).unwrap();
        let b = wilson(48, 80, CONFIDENCE_95).unwrap();
        let d = difference_interval(0.8, a, 0.6, b).unwrap();
        assert!((d.lo - 0.0524).abs() < 5e-4, "{d:?}");
        assert!((d.hi - 0.3339).abs() < 5e-4, "{d:?}");
        // Swapping the arguments mirrors the interval.
        let m = difference_interval(0.6, b, 0.8, a).unwrap();
        assert!((m.lo + d.hi).abs() < 1e-12 && (m.hi + d.lo).abs() < 1e-12);
        // An estimate outside its interval is refused.
        assert!(difference_interval(0.95, a, 0.6, b).is_err());
        assert!(difference_interval(f64::NAN, a, 0.6, b).is_err());
    }

    use super::*;

    fn close(actual: f64, expected: f64, tolerance: f64) -> bool {
        (actual - expected).abs() <= tolerance
    }

    /// Uniform in [0, 1) from the top 53 bits.
    fn uniform(rng: &mut SplitMix64) -> f64 {
        (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Binomial(n, p) as a sum of n Bernoulli draws.
    fn binomial(rng: &mut SplitMix64, n: usize, p: f64) -> usize {
        (0..n).filter(|_| uniform(rng) < p).count()
    }

    #[test]
    fn interval_methods() {
        let i = Interval { lo: 0.2, hi: 0.5 };
        assert!(i.contains(0.2) && i.contains(0.5) && i.contains(0.3));
        assert!(!i.contains(0.1) && !i.contains(0.6) && !i.contains(f64::NAN));
        assert!(i.overlaps(&Interval { lo: 0.5, hi: 0.9 }));
        assert!(i.overlaps(&Interval { lo: 0.0, hi: 1.0 }));
        assert!(!i.overlaps(&Interval { lo: 0.51, hi: 0.9 }));
        assert!(!Interval { lo: 0.0, hi: 0.1 }.overlaps(&i));
        assert!(close(i.width(), 0.3, 1e-15));
    }

    #[test]
    fn interval_serde_round_trip() {
        let i = Interval { lo: 0.25, hi: 0.75 };
        let json = serde_json::to_string(&i).unwrap_or_default();
        assert_eq!(json, r#"{"lo":0.25,"hi":0.75}"#);
        assert_eq!(serde_json::from_str::<Interval>(&json).ok(), Some(i));
    }

    #[test]
    fn normal_quantile_known_values() -> Result<()> {
        // References: mpmath at 60 digits, −√2·erfinv(1 − 2p) at the f64 value of p.
        assert_eq!(normal_quantile(0.5)?, 0.0);
        let cases = [
            (0.975, 1.959963984540054),
            (0.995, 2.5758293035489),
            (0.025, -1.959963984540054),
            (0.9, 1.2815515655446006),
            (0.3, -0.5244005127080408),
            (0.001, -3.090232306167813),
            (1e-10, -6.361340902404056),
            (1e-20, -9.262340089798408),
        ];
        for (p, z) in cases {
            let got = normal_quantile(p)?;
            assert!(
                close(got, z, 1e-12 * z.abs().max(1.0)),
                "Φ⁻¹({p}) = {got}, not {z}"
            );
        }
        // 0.995 to the 13 digits given above, and symmetry.
        assert!(close(normal_quantile(0.995)?, 2.5758293035489004, 1e-14));
        for p in [0.01, 0.2, 0.4, 0.49] {
            assert!(close(
                normal_quantile(p)?,
                -normal_quantile(1.0 - p)?,
                1e-13
            ));
        }
        Ok(())
    }

    #[test]
    fn normal_quantile_bad_input() {
        for p in [0.0, 1.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                normal_quantile(p),
                Err(MetricsError::InvalidParameter { what: "p", .. })
            ));
        }
    }

    #[test]
    fn wilson_by_hand() -> Result<()> {
        // z = 1.959964, z² = 3.841459, n = 10, 1 + z²/n = 1.384146.
        // 0/10: centre = (z²/20)/1.384146 = 0.138766 = half → [0, 0.277533].
        let i = wilson(0, 10, CONFIDENCE_95)?;
        assert_eq!(i.lo, 0.0);
        assert!(close(i.hi, 0.2775327998628892, 1e-12));
        // 5/10: centre 0.5, half = z/1.384146 · √(0.025 + 0.009604) = 0.263407.
        let i = wilson(5, 10, CONFIDENCE_95)?;
        assert!(close(i.lo, 0.23659309051256405, 1e-12));
        assert!(close(i.hi, 0.763406909487436, 1e-12));
        // 10/10 mirrors 0/10.
        let i = wilson(10, 10, CONFIDENCE_95)?;
        assert!(close(i.lo, 0.7224672001371109, 1e-12));
        assert_eq!(i.hi, 1.0);
        // Mirror symmetry k ↔ n − k, and a higher level gives a wider interval.
        for k in 0..=20 {
            let (i, j) = (wilson(k, 20, 0.9)?, wilson(20 - k, 20, 0.9)?);
            assert!(close(i.lo, 1.0 - j.hi, 1e-12) && close(i.hi, 1.0 - j.lo, 1e-12));
            assert!(i.contains(k as f64 / 20.0));
            let wider = wilson(k, 20, 0.99)?;
            assert!(wider.lo <= i.lo && wider.hi >= i.hi);
        }
        Ok(())
    }

    #[test]
    fn wilson_bad_input() {
        assert!(matches!(
            wilson(0, 0, CONFIDENCE_95),
            Err(MetricsError::InvalidParameter { what: "n", .. })
        ));
        assert!(matches!(
            wilson(11, 10, CONFIDENCE_95),
            Err(MetricsError::CountExceedsTotal {
                what: "successes",
                count: 11,
                total_what: "n",
                total: 10,
            })
        ));
        for c in [0.0, 1.0, -0.5, 95.0, f64::NAN] {
            assert!(matches!(
                wilson(3, 10, c),
                Err(MetricsError::InvalidParameter {
                    what: "confidence",
                    ..
                })
            ));
        }
    }

    /// P(p ∈ wilson(X, n)) for X ~ Binomial(n, p), summing the pmf in log space.
    fn exact_wilson_coverage(p: f64, n: usize) -> Result<f64> {
        let mut coverage = 0.0;
        let mut log_choose = 0.0f64;
        for x in 0..=n {
            if x > 0 {
                log_choose += ((n - x + 1) as f64).ln() - (x as f64).ln();
            }
            if wilson(x, n, CONFIDENCE_95)?.contains(p) {
                let log_pmf = log_choose + x as f64 * p.ln() + (n - x) as f64 * (1.0 - p).ln();
                coverage += log_pmf.exp();
            }
        }
        Ok(coverage)
    }

    #[test]
    fn wilson_coverage_is_near_nominal() -> Result<()> {
        // Exact coverage of the 95 % interval lies in [0.92, 0.975] on this grid
        // (it ranges from 0.9216 at p = 0.02, n = 50 to 0.9703 at p = 0.1, n = 50;
        // Wilson oscillates around the nominal level, dipping for np ≈ 1).
        // The simulated coverage of 2,000 seeded draws must agree with it within
        // 4 standard errors, √(c(1 − c)/2000) ≈ 0.005.
        let mut rng = SplitMix64::new(20_240_601);
        for p in [0.02, 0.1, 0.3, 0.5] {
            for n in [50, 200, 1000] {
                let exact = exact_wilson_coverage(p, n)?;
                assert!(
                    (0.92..=0.975).contains(&exact),
                    "p {p}, n {n}: exact {exact}"
                );
                let draws = 2000;
                let mut covered = 0;
                for _ in 0..draws {
                    if wilson(binomial(&mut rng, n, p), n, CONFIDENCE_95)?.contains(p) {
                        covered += 1;
                    }
                }
                let simulated = covered as f64 / draws as f64;
                let standard_error = (exact * (1.0 - exact) / draws as f64).sqrt();
                assert!(
                    (simulated - exact).abs() <= 4.0 * standard_error,
                    "p {p}, n {n}: simulated {simulated}, exact {exact}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn splitmix64_reference_outputs() {
        // splitmix64.c (Vigna) from state 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 7_960_286_522_194_355_700);
        assert_eq!(rng.next_u64(), 487_617_019_471_545_679);
        // below() stays in range and hits every value.
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            seen[rng.below(7)] += 1;
        }
        assert!(seen.iter().all(|&c| (850..1150).contains(&c)), "{seen:?}");
        assert_eq!(rng.below(1), 0);
    }

    #[test]
    fn bootstrap_quantile_rule_by_hand() -> Result<()> {
        // A statistic that ignores the draw and returns 0, 1, …, R − 1 in turn: the
        // sorted values are 0..R − 1, so Q(q) = (R − 1)·q.
        let counter = |mut next: f64| {
            move |_: &[usize]| {
                next += 1.0;
                Some(next - 1.0)
            }
        };
        // R = 5, 50 %: Q(0.25) = 1, Q(0.75) = 3.
        let i = bootstrap(4, 5, 0.5, 1, counter(0.0))?;
        assert_eq!(i, Some(Interval { lo: 1.0, hi: 3.0 }));
        // R = 11, 90 %: Q(0.05) = 0.5, Q(0.95) = 9.5 (between order statistics).
        let Some(i) = bootstrap(4, 11, 0.9, 1, counter(0.0))? else {
            panic!("every resample is valid");
        };
        assert!(close(i.lo, 0.5, 1e-12) && close(i.hi, 9.5, 1e-12));
        // R = 4, 95 %: Q(0.025) = 0.075, Q(0.975) = 2.925.
        let Some(i) = bootstrap(4, 4, CONFIDENCE_95, 1, counter(0.0))? else {
            panic!("every resample is valid");
        };
        assert!(close(i.lo, 0.075, 1e-12) && close(i.hi, 2.925, 1e-12));
        Ok(())
    }

    #[test]
    fn bootstrap_degenerate_statistics() -> Result<()> {
        // A constant statistic: a zero-width interval at the constant.
        let i = bootstrap(10, 100, CONFIDENCE_95, 7, |_| Some(0.25))?;
        assert_eq!(i, Some(Interval { lo: 0.25, hi: 0.25 }));
        assert_eq!(i.map(|i| i.width()), Some(0.0));
        // Never defined: no interval.
        assert_eq!(bootstrap(10, 100, CONFIDENCE_95, 7, |_| None)?, None);
        // Non-finite values are skipped like None.
        assert_eq!(
            bootstrap(10, 100, CONFIDENCE_95, 7, |_| Some(f64::NAN))?,
            None
        );
        // Exactly half valid is enough; one fewer is not.
        let alternate = |valid_every: usize| {
            let mut r = 0usize;
            move |_: &[usize]| {
                r += 1;
                if r.is_multiple_of(valid_every) {
                    Some(1.0)
                } else {
                    Some(f64::INFINITY)
                }
            }
        };
        assert_eq!(
            bootstrap(3, 10, CONFIDENCE_95, 7, alternate(2))?,
            Some(Interval { lo: 1.0, hi: 1.0 })
        );
        assert_eq!(bootstrap(3, 11, CONFIDENCE_95, 7, alternate(2))?, None);
        Ok(())
    }

    #[test]
    fn bootstrap_draws_indices_in_range_with_replacement() -> Result<()> {
        let n = 5;
        let mut repeated = false;
        let mut in_range = true;
        bootstrap(n, 50, CONFIDENCE_95, 3, |indices| {
            in_range &= indices.len() == n && indices.iter().all(|&i| i < n);
            let mut sorted = indices.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            repeated |= sorted.len() < n;
            Some(0.0)
        })?;
        assert!(in_range && repeated);
        // One example: every draw is index 0.
        let i = bootstrap(1, 10, CONFIDENCE_95, 3, |idx| Some(idx[0] as f64))?;
        assert_eq!(i, Some(Interval { lo: 0.0, hi: 0.0 }));
        Ok(())
    }

    #[test]
    fn bootstrap_is_deterministic_per_seed() -> Result<()> {
        let data: Vec<f64> = (0..40).map(|i| ((i * 37) % 11) as f64).collect();
        let mean =
            |idx: &[usize]| Some(idx.iter().map(|&i| data[i]).sum::<f64>() / idx.len() as f64);
        let a = bootstrap(data.len(), 200, CONFIDENCE_95, 42, mean)?;
        let b = bootstrap(data.len(), 200, CONFIDENCE_95, 42, mean)?;
        let c = bootstrap(data.len(), 200, CONFIDENCE_95, 43, mean)?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        Ok(())
    }

    #[test]
    fn bootstrap_mean_coverage() -> Result<()> {
        // 300 seeded data sets of 300 Bernoulli(0.3) draws; the 95 % percentile
        // bootstrap of the mean should cover 0.3 in about 95 % of them (slightly less:
        // the percentile interval is a little narrow at this n). Accept 90–98 %;
        // the standard error of the measured fraction is √(0.95·0.05/300) ≈ 0.013.
        let (p, n, datasets) = (0.3, 300, 300);
        let mut rng = SplitMix64::new(99);
        let mut covered = 0;
        let mut data = vec![0.0f64; n];
        for d in 0..datasets {
            for x in data.iter_mut() {
                *x = if uniform(&mut rng) < p { 1.0 } else { 0.0 };
            }
            let mean = |idx: &[usize]| Some(idx.iter().map(|&i| data[i]).sum::<f64>() / n as f64);
            let Some(interval) = bootstrap(n, BOOTSTRAP_RESAMPLES, CONFIDENCE_95, d, mean)? else {
                panic!("the mean is defined on every resample");
            };
            if interval.contains(p) {
                covered += 1;
            }
        }
        let coverage = covered as f64 / datasets as f64;
        assert!((0.90..=0.98).contains(&coverage), "coverage {coverage}");
        Ok(())
    }

    #[test]
    fn bootstrap_bad_input() {
        let s = |_: &[usize]| Some(1.0);
        assert!(matches!(
            bootstrap(0, 100, CONFIDENCE_95, 0, s),
            Err(MetricsError::InvalidParameter { what: "n", .. })
        ));
        for r in [0, 1] {
            assert!(matches!(
                bootstrap(10, r, CONFIDENCE_95, 0, s),
                Err(MetricsError::InvalidParameter {
                    what: "resamples",
                    ..
                })
            ));
        }
        for c in [0.0, 1.0, f64::NAN] {
            assert!(matches!(
                bootstrap(10, 100, c, 0, s),
                Err(MetricsError::InvalidParameter {
                    what: "confidence",
                    ..
                })
            ));
        }
    }

    #[test]
    fn proportion_differs_by_hand() -> Result<()> {
        // 90/100 → [0.8256, 0.9448]; 50/100 → [0.4038, 0.5962]: disjoint.
        assert!(proportion_differs(90, 100, 50, 100, CONFIDENCE_95)?);
        assert!(proportion_differs(50, 100, 90, 100, CONFIDENCE_95)?);
        // 50/100 vs 55/100 overlap; equal counts always overlap.
        assert!(!proportion_differs(50, 100, 55, 100, CONFIDENCE_95)?);
        assert!(!proportion_differs(7, 10, 7, 10, CONFIDENCE_95)?);
        // 60/100 → [0.5020, 0.6906] vs 45/100 → [0.3561, 0.5475]: they overlap, even
        // though a two-proportion z-test gives p ≈ 0.034.
        assert!(!proportion_differs(60, 100, 45, 100, CONFIDENCE_95)?);
        assert!(matches!(
            proportion_differs(5, 10, 11, 10, CONFIDENCE_95),
            Err(MetricsError::CountExceedsTotal {
                what: "b_successes",
                total_what: "b_n",
                ..
            })
        ));
        assert!(matches!(
            proportion_differs(0, 0, 1, 10, CONFIDENCE_95),
            Err(MetricsError::InvalidParameter { what: "a_n", .. })
        ));
        assert!(matches!(
            proportion_differs(1, 10, 1, 10, 1.0),
            Err(MetricsError::InvalidParameter {
                what: "confidence",
                ..
            })
        ));
        Ok(())
    }

    /// Paired outcomes with the given discordant counts plus some concordant pairs.
    fn pairs(b01: usize, b10: usize) -> (Vec<bool>, Vec<bool>) {
        let mut a = vec![true, false, true];
        let mut b = vec![true, false, true];
        a.extend(std::iter::repeat_n(true, b01));
        b.extend(std::iter::repeat_n(false, b01));
        a.extend(std::iter::repeat_n(false, b10));
        b.extend(std::iter::repeat_n(true, b10));
        (a, b)
    }

    #[test]
    fn mcnemar_by_hand() -> Result<()> {
        // b01 = 10, b10 = 0: 2 · 0.5^10.
        let (a, b) = pairs(10, 0);
        assert_eq!(mcnemar_p(&a, &b)?, 0.001953125);
        assert_eq!(mcnemar_p(&b, &a)?, 0.001953125);
        assert!(paired_differs(&a, &b, CONFIDENCE_95)?);
        assert!(paired_differs(&a, &b, 0.99)?);
        // b01 = 3, b10 = 2: 2 · (1 + 5 + 10)/32 = 1.
        let (a, b) = pairs(3, 2);
        assert_eq!(mcnemar_p(&a, &b)?, 1.0);
        assert!(!paired_differs(&a, &b, CONFIDENCE_95)?);
        // b01 = 6, b10 = 1: 2 · (1 + 7)/128 = 0.125.
        let (a, b) = pairs(6, 1);
        assert!(close(mcnemar_p(&a, &b)?, 0.125, 1e-15));
        // b01 = 2, b10 = 8: 2 · (1 + 10 + 45)/1024 = 0.109375.
        let (a, b) = pairs(2, 8);
        assert!(close(mcnemar_p(&a, &b)?, 0.109375, 1e-15));
        // b01 = 4, b10 = 4: 1 (2·P(X ≤ 4) > 1 for m = 8).
        let (a, b) = pairs(4, 4);
        assert_eq!(mcnemar_p(&a, &b)?, 1.0);
        // b01 = 9, b10 = 1: 2 · 11/1024 = 0.021484375, significant at 95 % not 99 %.
        let (a, b) = pairs(9, 1);
        assert!(close(mcnemar_p(&a, &b)?, 0.021484375, 1e-15));
        assert!(paired_differs(&a, &b, CONFIDENCE_95)?);
        assert!(!paired_differs(&a, &b, 0.99)?);
        // No discordant pair: p = 1, never different.
        let (a, b) = pairs(0, 0);
        assert_eq!(mcnemar_p(&a, &b)?, 1.0);
        assert!(!paired_differs(&a, &b, 0.5)?);
        Ok(())
    }

    #[test]
    fn mcnemar_large_counts_stay_finite() -> Result<()> {
        // m = 20,000 and 200,000: 2⁻ᵐ and C(m, k) are far outside the f64 range.
        // References: Python, 2·Σ_{i≤9700} comb(20000, i) / 2**20000 in exact integers,
        // and for m = 200,000 a log-sum of math.lgamma terms.
        let (a, b) = pairs(10_300, 9_700);
        let p = mcnemar_p(&a, &b)?;
        assert!(close(p / 2.2766981381795824e-05, 1.0, 1e-9), "p = {p}");
        let (a, b) = pairs(101_000, 99_000);
        let p = mcnemar_p(&a, &b)?;
        assert!(close(p / 7.824328517924063e-06, 1.0, 1e-6), "p = {p}");
        // Balanced: 1.
        let (a, b) = pairs(100_000, 100_000);
        assert_eq!(mcnemar_p(&a, &b)?, 1.0);
        Ok(())
    }

    #[test]
    fn mcnemar_bad_input() {
        assert!(matches!(
            mcnemar_p(&[true, false], &[true]),
            Err(MetricsError::LengthMismatch {
                left_len: 2,
                right_len: 1,
                ..
            })
        ));
        assert!(matches!(
            mcnemar_p(&[], &[]),
            Err(MetricsError::Empty { what: "a" })
        ));
        assert!(matches!(
            paired_differs(&[true], &[false], 1.0),
            Err(MetricsError::InvalidParameter {
                what: "confidence",
                ..
            })
        ));
        assert!(matches!(
            paired_differs(&[true], &[false, true], CONFIDENCE_95),
            Err(MetricsError::LengthMismatch { .. })
        ));
    }
}
