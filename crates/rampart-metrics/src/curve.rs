//! Accuracy as a function of the perturbation budget ε, and the area under it (AUAC).

use serde::{Deserialize, Serialize};

use crate::check;
use crate::error::{MetricsError, Result};

/// Area under the accuracy–perturbation curve, normalised by the range of ε:
///
/// AUAC = (1/ε_max) ∫₀^{ε_max} Acc(ε) dε, by the trapezoid rule over the grid.
///
/// Unit-agnostic: the result has the unit of `accuracy` (give percentages, get a
/// percentage; give fractions, get a fraction); the unit of ε cancels.
///
/// eps: (G,), G ≥ 2, finite, `eps[0] == 0.0` exactly, strictly increasing.
/// accuracy: (G,), finite.
pub fn auac(eps: &[f64], accuracy: &[f64]) -> Result<f64> {
    check_grid("eps", eps)?;
    if eps.len() < 2 {
        return Err(MetricsError::TooFew {
            what: "eps",
            needed: 2,
            got: eps.len(),
        });
    }
    if eps[0] != 0.0 {
        return Err(MetricsError::GridNotFromZero { first: eps[0] });
    }
    check::same_len("eps", eps, "accuracy", accuracy)?;
    check::finite("accuracy", accuracy)?;
    let area: f64 = eps
        .windows(2)
        .zip(accuracy.windows(2))
        .map(|(e, a)| (e[1] - e[0]) * (a[0] + a[1]) / 2.0)
        .sum();
    Ok(area / eps[eps.len() - 1])
}

/// Accuracy at each ε of `eps_grid`, from per-example minimal adversarial norms.
///
/// `min_norms[i]` is the smallest perturbation norm found that makes example i
/// misclassified: 0 if it is misclassified clean, +∞ if no adversarial example was
/// found. Accuracy(ε) = #(min_norm > ε) / N, a fraction in [0, 1].
///
/// The comparison is **strict**: an example whose minimal adversarial norm is
/// exactly ε counts as broken at ε, because the threat model at ε is the closed
/// ball ‖δ‖ ≤ ε and the adversarial example found lies in it. So a clean
/// misclassification (norm 0) is wrong at ε = 0, and Accuracy(0) is clean accuracy.
///
/// min_norms: (N,), N ≥ 1, in [0, +∞] (no NaN). eps_grid: (G,), G ≥ 1, finite,
/// non-negative, strictly increasing (it need not start at 0; [`auac`] requires it).
/// O((N + G) log N).
pub fn accuracy_curve(min_norms: &[f64], eps_grid: &[f64]) -> Result<Vec<f64>> {
    check::non_empty("min_norms", min_norms)?;
    check::no_nan("min_norms", min_norms)?;
    if let Some(index) = min_norms.iter().position(|&v| v < 0.0) {
        return Err(MetricsError::OutOfRange {
            what: "min_norms",
            index,
            value: min_norms[index],
            expected: "[0, +∞]",
        });
    }
    check_grid("eps_grid", eps_grid)?;
    if let Some(index) = eps_grid.iter().position(|&e| e < 0.0) {
        return Err(MetricsError::OutOfRange {
            what: "eps_grid",
            index,
            value: eps_grid[index],
            expected: "[0, +∞)",
        });
    }
    let mut sorted = min_norms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    Ok(eps_grid
        .iter()
        .map(|&e| check::fraction(n - sorted.partition_point(|&v| v <= e), n))
        .collect())
}

/// An accuracy–perturbation curve, ready to be written as JSON and plotted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccuracyCurve {
    /// The ε grid, strictly increasing (in the unit of the norms given).
    pub eps: Vec<f64>,
    /// Accuracy at each ε, a fraction in [0, 1].
    pub accuracy: Vec<f64>,
}

impl AccuracyCurve {
    /// The curve of [`accuracy_curve`] on `eps_grid`.
    pub fn from_min_norms(min_norms: &[f64], eps_grid: &[f64]) -> Result<Self> {
        Ok(Self {
            eps: eps_grid.to_vec(),
            accuracy: accuracy_curve(min_norms, eps_grid)?,
        })
    }

    /// [`auac`] of this curve, a fraction in [0, 1]; the grid must start at 0.
    pub fn auac(&self) -> Result<f64> {
        auac(&self.eps, &self.accuracy)
    }
}

/// Non-empty, finite, strictly increasing.
fn check_grid(what: &'static str, eps: &[f64]) -> Result<()> {
    check::non_empty(what, eps)?;
    check::finite(what, eps)?;
    for (index, w) in eps.windows(2).enumerate() {
        if w[1] <= w[0] {
            return Err(MetricsError::GridNotIncreasing {
                index: index + 1,
                previous: w[0],
                value: w[1],
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auac_matches_the_reference_check() -> Result<()> {
        // REFERENCE.md §4: ε = 0..5 (in /255), accuracy in % → 34.775.
        // By hand: (96/2 + 64.95 + 34.52 + 16.73 + 7.81 + 3.73/2) · 1 / 5
        //        = (48 + 124.01 + 1.865) / 5 = 173.875 / 5 = 34.775.
        let eps = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let acc = [96.0, 64.95, 34.52, 16.73, 7.81, 3.73];
        assert!((auac(&eps, &acc)? - 34.775).abs() < 1e-9);
        // The unit of ε cancels: the same grid in [0, 1] units gives the same number.
        let eps_unit: Vec<f64> = eps.iter().map(|e| e / 255.0).collect();
        assert!((auac(&eps_unit, &acc)? - 34.775).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn auac_uneven_grid() -> Result<()> {
        // ε = 0, 1, 3 with accuracy 1, 0.5, 0: (1·0.75 + 2·0.25) / 3 = 1.25 / 3.
        assert!((auac(&[0.0, 1.0, 3.0], &[1.0, 0.5, 0.0])? - 1.25 / 3.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn accuracy_curve_tiny_case() -> Result<()> {
        // Norms 0 (clean mistake), 0.5, 1, 2, never broken.
        // ε = 0   → > 0:   0.5, 1, 2, ∞ → 4/5
        // ε = 0.5 → > 0.5: 1, 2, ∞      → 3/5 (the 0.5 example is broken at 0.5)
        // ε = 1   → > 1:   2, ∞         → 2/5
        // ε = 1.5 → > 1.5: 2, ∞         → 2/5
        let norms = [1.0, f64::INFINITY, 0.0, 2.0, 0.5];
        let grid = [0.0, 0.5, 1.0, 1.5];
        let curve = AccuracyCurve::from_min_norms(&norms, &grid)?;
        assert_eq!(curve.accuracy, vec![0.8, 0.6, 0.4, 0.4]);
        // AUAC: (0.5·0.7 + 0.5·0.5 + 0.5·0.4) / 1.5 = 0.8 / 1.5.
        assert!((curve.auac()? - 0.8 / 1.5).abs() < 1e-12);
        // A grid not starting at 0 is fine for the curve.
        assert_eq!(accuracy_curve(&norms, &[10.0])?, vec![0.2]);
        Ok(())
    }

    #[test]
    fn auac_bad_input() {
        assert!(matches!(
            auac(&[0.5, 1.0], &[1.0, 0.5]),
            Err(MetricsError::GridNotFromZero { first }) if first == 0.5
        ));
        assert!(matches!(
            auac(&[0.0, 2.0, 1.0], &[1.0, 0.5, 0.2]),
            Err(MetricsError::GridNotIncreasing { index: 2, .. })
        ));
        assert!(matches!(
            auac(&[0.0, 1.0, 1.0], &[1.0, 0.5, 0.2]),
            Err(MetricsError::GridNotIncreasing { index: 2, .. })
        ));
        assert!(matches!(
            auac(&[0.0], &[1.0]),
            Err(MetricsError::TooFew {
                needed: 2,
                got: 1,
                ..
            })
        ));
        assert!(matches!(
            auac(&[], &[]),
            Err(MetricsError::Empty { what: "eps" })
        ));
        assert!(matches!(
            auac(&[0.0, 1.0], &[1.0]),
            Err(MetricsError::LengthMismatch { .. })
        ));
        assert!(matches!(
            auac(&[0.0, 1.0], &[1.0, f64::NAN]),
            Err(MetricsError::NaN {
                what: "accuracy",
                index: 1
            })
        ));
        assert!(matches!(
            auac(&[0.0, f64::INFINITY], &[1.0, 0.0]),
            Err(MetricsError::OutOfRange { what: "eps", .. })
        ));
    }

    #[test]
    fn accuracy_curve_bad_input() {
        assert!(matches!(
            accuracy_curve(&[], &[0.0]),
            Err(MetricsError::Empty { what: "min_norms" })
        ));
        assert!(matches!(
            accuracy_curve(&[1.0], &[]),
            Err(MetricsError::Empty { what: "eps_grid" })
        ));
        assert!(matches!(
            accuracy_curve(&[f64::NAN], &[0.0]),
            Err(MetricsError::NaN {
                what: "min_norms",
                index: 0
            })
        ));
        assert!(matches!(
            accuracy_curve(&[-1.0], &[0.0]),
            Err(MetricsError::OutOfRange {
                what: "min_norms",
                ..
            })
        ));
        assert!(matches!(
            accuracy_curve(&[1.0], &[-1.0, 0.0]),
            Err(MetricsError::OutOfRange {
                what: "eps_grid",
                index: 0,
                ..
            })
        ));
        assert!(matches!(
            accuracy_curve(&[1.0], &[0.0, 0.0]),
            Err(MetricsError::GridNotIncreasing { index: 1, .. })
        ));
    }
}
