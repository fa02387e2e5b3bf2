//! Temperature scaling (Guo et al. 2017), the post-hoc calibration baseline:
//! p = softmax(f / T) with one scalar T > 0 fitted by minimising held-out NLL.

use crate::check;
use crate::error::{MetricsError, Result};

/// Lower end of the bracket searched by [`fit_temperature`].
pub const MIN_TEMPERATURE: f64 = 0.01;

/// Upper end of the bracket searched by [`fit_temperature`].
pub const MAX_TEMPERATURE: f64 = 100.0;

/// Golden-section search stops when the bracket on ln T is narrower than this.
const LOG_TEMPERATURE_TOLERANCE: f64 = 1e-9;

/// softmax(logits / T) of every row, computed stably (the row maximum is subtracted first).
///
/// logits: (N, K) row-major, finite; K ≥ 1; T finite and > 0. Returns (N, K) row-major.
pub fn softmax_with_temperature<L: Copy + Into<f64>>(
    logits: &[L],
    num_classes: usize,
    temperature: f64,
) -> Result<Vec<f64>> {
    let z = logit_rows(logits, num_classes)?;
    check_temperature(temperature)?;
    let mut out = Vec::with_capacity(z.len());
    for row in z.chunks_exact(num_classes) {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let start = out.len();
        out.extend(row.iter().map(|&v| ((v - max) / temperature).exp()));
        let sum: f64 = out[start..].iter().sum();
        out[start..].iter_mut().for_each(|p| *p /= sum);
    }
    Ok(out)
}

/// Mean NLL of softmax(logits / T) in nats, exact via log-sum-exp (no clamping needed).
///
/// logits: (N, K) row-major, finite; labels: (N,) below K; K ≥ 1; T finite and > 0.
pub fn nll_with_temperature<L: Copy + Into<f64>>(
    logits: &[L],
    labels: &[u32],
    num_classes: usize,
    temperature: f64,
) -> Result<f64> {
    check::rows_with_labels("logits", logits.len(), labels, num_classes, 1)?;
    let z = logit_rows(logits, num_classes)?;
    check_temperature(temperature)?;
    Ok(mean_nll(&z, labels, num_classes, temperature))
}

/// The temperature T > 0 minimising the mean NLL of softmax(logits / T).
///
/// Golden-section search on ln T over [[`MIN_TEMPERATURE`], [`MAX_TEMPERATURE`]],
/// until the bracket on ln T is narrower than 1e−9: deterministic, about 50 NLL
/// evaluations. The search is exact in the sense that matters: NLL is convex in
/// 1/T, hence unimodal in ln T. If the minimiser lies outside the bracket (e.g.
/// perfectly separable logits, whose NLL keeps falling as T → 0) the answer is the
/// nearest end of the bracket.
///
/// logits: (N, K) row-major, finite; labels: (N,) below K; K ≥ 2. Fit on held-out
/// data, never on the test split you report.
pub fn fit_temperature<L: Copy + Into<f64>>(
    logits: &[L],
    labels: &[u32],
    num_classes: usize,
) -> Result<f64> {
    check::rows_with_labels("logits", logits.len(), labels, num_classes, 2)?;
    let z = logit_rows(logits, num_classes)?;
    let f = |log_t: f64| mean_nll(&z, labels, num_classes, log_t.exp());
    let inv_phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (MIN_TEMPERATURE.ln(), MAX_TEMPERATURE.ln());
    let mut c = b - inv_phi * (b - a);
    let mut d = a + inv_phi * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > LOG_TEMPERATURE_TOLERANCE {
        if fc <= fd {
            b = d;
            d = c;
            fd = fc;
            c = b - inv_phi * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + inv_phi * (b - a);
            fd = f(d);
        }
    }
    Ok(((a + b) / 2.0).exp())
}

fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(MetricsError::InvalidParameter {
            what: "temperature",
            value: temperature,
            expected: "a finite number > 0",
        })
    }
}

/// Logits as f64, checked: K ≥ 1, non-empty, whole rows, finite.
fn logit_rows<L: Copy + Into<f64>>(logits: &[L], num_classes: usize) -> Result<Vec<f64>> {
    check::whole_rows("logits", logits.len(), num_classes, 1)?;
    let z: Vec<f64> = logits.iter().map(|&v| v.into()).collect();
    check::finite("logits", &z)?;
    Ok(z)
}

/// Mean of logsumexp(z/T) − z_y/T over rows; inputs already checked.
fn mean_nll(z: &[f64], labels: &[u32], num_classes: usize, temperature: f64) -> f64 {
    let total: f64 = z
        .chunks_exact(num_classes)
        .zip(labels)
        .map(|(row, &y)| {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|&v| ((v - max) / temperature).exp()).sum();
            sum.ln() + (max - row[y as usize]) / temperature
        })
        .sum();
    total / labels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a fixed, dependency-free stream of uniforms in [0, 1).
    struct SplitMix(u64);

    impl SplitMix {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Logits uniform in [−3, 3], labels drawn from softmax(logits / t_true).
    fn synthetic(t_true: f64, n: usize, k: usize, seed: u64) -> Result<(Vec<f64>, Vec<u32>)> {
        let mut rng = SplitMix(seed);
        let logits: Vec<f64> = (0..n * k).map(|_| 6.0 * rng.uniform() - 3.0).collect();
        let probs = softmax_with_temperature(&logits, k, t_true)?;
        let labels = probs
            .chunks_exact(k)
            .map(|row| {
                let u = rng.uniform();
                let mut cumulative = 0.0;
                let mut label = k - 1;
                for (c, &p) in row.iter().enumerate() {
                    cumulative += p;
                    if u < cumulative {
                        label = c;
                        break;
                    }
                }
                label as u32
            })
            .collect();
        Ok((logits, labels))
    }

    #[test]
    fn fit_recovers_a_known_temperature() -> Result<()> {
        // 20,000 examples of 5 classes; the MLE is within a few percent of the truth.
        for (t_true, seed) in [(2.0, 1), (0.5, 2)] {
            let (logits, labels) = synthetic(t_true, 20_000, 5, seed)?;
            let t = fit_temperature(&logits, &labels, 5)?;
            assert!((t / t_true - 1.0).abs() < 0.05, "fitted {t}, true {t_true}");
            // It is a minimum: nudging T either way does not lower the NLL.
            let at = |temp| nll_with_temperature(&logits, &labels, 5, temp);
            assert!(at(t)? <= at(t * 1.01)? && at(t)? <= at(t / 1.01)?);
            assert!(at(t)? < at(1.0)?);
        }
        Ok(())
    }

    #[test]
    fn separable_logits_hit_the_bracket() -> Result<()> {
        // The label always has the larger logit: NLL falls as T → 0.
        let t = fit_temperature(&[1.0f32, 0.0, 0.0, 1.0], &[0, 1], 2)?;
        assert!((t - MIN_TEMPERATURE).abs() < 1e-6, "{t}");
        Ok(())
    }

    #[test]
    fn softmax_by_hand() -> Result<()> {
        // softmax(0, ln 3) = (1/4, 3/4); with T = 2 the logits (0, 2 ln 3) give the same.
        let ln3 = 3f64.ln();
        let p = softmax_with_temperature(&[0.0, ln3, 0.0, 2.0 * ln3], 2, 1.0)?;
        assert!((p[0] - 0.25).abs() < 1e-12 && (p[1] - 0.75).abs() < 1e-12);
        let p2 = softmax_with_temperature(&[0.0, 2.0 * ln3], 2, 2.0)?;
        assert!((p2[0] - 0.25).abs() < 1e-12 && (p2[1] - 0.75).abs() < 1e-12);
        // Huge logits neither overflow nor produce NaN.
        let big = softmax_with_temperature(&[1000.0f32, 0.0], 2, 1.0)?;
        assert_eq!(big, vec![1.0, 0.0]);
        // NLL from logits equals −ln p_y from the probabilities: −ln(3/4).
        let nll = nll_with_temperature(&[0.0, ln3], &[1], 2, 1.0)?;
        assert!((nll + 0.75f64.ln()).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn temperature_bad_input() {
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                softmax_with_temperature(&[0.0, 1.0], 2, t),
                Err(MetricsError::InvalidParameter {
                    what: "temperature",
                    ..
                })
            ));
        }
        assert!(matches!(
            softmax_with_temperature(&[0.0, f64::NAN], 2, 1.0),
            Err(MetricsError::NaN {
                what: "logits",
                index: 1
            })
        ));
        assert!(matches!(
            softmax_with_temperature(&[0.0, f64::INFINITY], 2, 1.0),
            Err(MetricsError::OutOfRange {
                what: "logits",
                index: 1,
                ..
            })
        ));
        assert!(matches!(
            softmax_with_temperature(&[0.0, 1.0, 2.0], 2, 1.0),
            Err(MetricsError::RaggedRows { .. })
        ));
        assert!(matches!(
            fit_temperature(&[0.0, 1.0], &[0], 1),
            Err(MetricsError::TooFewClasses { needed: 2, got: 1 })
        ));
        assert!(matches!(
            fit_temperature(&[0.0, 1.0], &[2], 2),
            Err(MetricsError::LabelOutOfRange { label: 2, .. })
        ));
        assert!(matches!(
            fit_temperature::<f64>(&[], &[], 2),
            Err(MetricsError::Empty { what: "logits" })
        ));
        assert!(matches!(
            nll_with_temperature(&[0.0, 1.0], &[0, 1], 2, 1.0),
            Err(MetricsError::LengthMismatch { .. })
        ));
    }
}
