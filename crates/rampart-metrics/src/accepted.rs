//! The fraction of inputs a confidence threshold accepts: CCAT's number for inputs
//! that belong to no class (distal adversarial examples, noise), where every accepted
//! input is a mistake.

use crate::check;
use crate::error::Result;
use crate::roc::accepted_fraction;

/// #(score ≥ τ) / N, in [0, 1]: with out-of-distribution scores and τ picked on
/// held-out test data (e.g. at 99 % TPR), the false-positive rate at that τ.
///
/// scores: (N,), N ≥ 1, no NaN; τ not NaN (±∞ allowed).
pub fn fraction_accepted(scores: &[f64], tau: f64) -> Result<f64> {
    check::non_empty("scores", scores)?;
    check::no_nan("scores", scores)?;
    check::threshold("tau", tau)?;
    Ok(accepted_fraction(scores, tau))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MetricsError;

    #[test]
    fn counts_scores_at_or_above_tau() -> Result<()> {
        // 0.95 and the tie 0.9 are accepted at τ = 0.9; 0.2 and 0.89 are not → 2/4.
        assert_eq!(fraction_accepted(&[0.2, 0.95, 0.9, 0.89], 0.9)?, 0.5);
        assert_eq!(fraction_accepted(&[0.2, 0.3], f64::NEG_INFINITY)?, 1.0);
        assert_eq!(fraction_accepted(&[0.2, 0.3], 0.31)?, 0.0);
        Ok(())
    }

    #[test]
    fn bad_input() {
        assert!(matches!(
            fraction_accepted(&[], 0.5),
            Err(MetricsError::Empty { .. })
        ));
        assert!(matches!(
            fraction_accepted(&[f64::NAN], 0.5),
            Err(MetricsError::NaN { .. })
        ));
        assert!(fraction_accepted(&[0.5], f64::NAN).is_err());
    }
}
