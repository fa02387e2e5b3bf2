//! Summaries of repeated runs of a stochastic model (seeds, noise draws).

use crate::check;
use crate::error::{MetricsError, Result};

/// Mean and **sample** standard deviation (divisor n − 1, Bessel's correction) of
/// repeated measurements, in the unit of the values.
///
/// values: (n,), n ≥ 2 (one value has no sample spread: use it directly), finite.
/// Two-pass computation, so a large common offset does not cost precision.
pub fn mean_std(values: &[f64]) -> Result<(f64, f64)> {
    if values.len() < 2 {
        return Err(MetricsError::TooFew {
            what: "values",
            needed: 2,
            got: values.len(),
        });
    }
    check::finite("values", values)?;
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let squares: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    Ok((mean, (squares / (n - 1.0)).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_by_hand() -> Result<()> {
        // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, squared deviations 9+1+1+1+0+0+4+16 = 32,
        // sample variance 32/7, std √(32/7) ≈ 2.138 (the population std would be 2).
        let (mean, std) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])?;
        assert_eq!(mean, 5.0);
        assert!((std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        // A big offset does not destroy the spread.
        let (m, s) = mean_std(&[1e9 + 1.0, 1e9 + 3.0])?;
        assert_eq!((m, s), (1e9 + 2.0, 2f64.sqrt()));
        Ok(())
    }

    #[test]
    fn mean_std_bad_input() {
        assert!(matches!(
            mean_std(&[1.0]),
            Err(MetricsError::TooFew {
                needed: 2,
                got: 1,
                ..
            })
        ));
        assert!(matches!(
            mean_std(&[]),
            Err(MetricsError::TooFew { got: 0, .. })
        ));
        assert!(matches!(
            mean_std(&[1.0, f64::NAN]),
            Err(MetricsError::NaN { index: 1, .. })
        ));
        assert!(matches!(
            mean_std(&[1.0, f64::INFINITY]),
            Err(MetricsError::OutOfRange { index: 1, .. })
        ));
    }
}
