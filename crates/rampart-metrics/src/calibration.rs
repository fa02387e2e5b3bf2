//! Calibration: expected calibration error with its reliability diagram, Brier
//! score and negative log-likelihood.

use serde::{Deserialize, Serialize};

use crate::check;
use crate::error::{MetricsError, Result};

/// Smallest probability used inside the log of [`nll`]: p_y is clamped to at least
/// this, so one confidently wrong example costs at most −ln(1e−12) ≈ 27.6 nats
/// instead of +∞ (f32 softmax outputs underflow to exactly 0 for logit gaps above ~104).
pub const NLL_PROBABILITY_FLOOR: f64 = 1e-12;

/// The bin count of the usual ECE.
pub const ECE_BINS: usize = 15;

/// One bin of a reliability diagram.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower edge, exclusive (except the first bin, which also holds confidence 0).
    pub lo: f64,
    /// Upper edge, inclusive.
    pub hi: f64,
    /// Number of examples whose confidence falls in (lo, hi].
    pub count: usize,
    /// Fraction of them classified correctly, in [0, 1]; `None` for an empty bin.
    pub accuracy: Option<f64>,
    /// Their mean confidence, in [0, 1]; `None` for an empty bin.
    pub confidence: Option<f64>,
}

/// Expected calibration error and the reliability diagram it was computed from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)|, in [0, 1].
    pub ece: f64,
    /// Number of examples n.
    pub count: usize,
    /// Every bin, empty ones included, in increasing order of confidence.
    pub bins: Vec<ReliabilityBin>,
}

impl Calibration {
    /// Maximum calibration error: the largest |acc − conf| over non-empty bins, in [0, 1].
    pub fn mce(&self) -> f64 {
        self.bins
            .iter()
            .filter_map(|b| Some((b.accuracy? - b.confidence?).abs()))
            .fold(0.0, f64::max)
    }
}

/// Expected calibration error over `bins` equal-width bins of confidence.
///
/// Bin m (0-based) of M is (m/M, (m+1)/M]: a confidence on an edge belongs to the
/// bin below it, and a confidence of exactly 0 goes in the first bin. Edges are
/// computed as m as f64 / M as f64 and membership is decided against exactly those
/// numbers, so the reported edges never disagree with the binning.
///
/// confidences: (N,) in [0, 1] (max-softmax); correct: (N,); N ≥ 1; bins ≥ 1.
pub fn ece(confidences: &[f64], correct: &[bool], bins: usize) -> Result<Calibration> {
    check::non_empty("confidences", confidences)?;
    let mut acc = CalibrationAccumulator::new(bins)?;
    acc.push(confidences, correct)?;
    acc.finish()
}

/// [`ece`] with the usual 15 bins.
pub fn ece_15(confidences: &[f64], correct: &[bool]) -> Result<Calibration> {
    ece(confidences, correct, ECE_BINS)
}

/// Streams batches of confidences and correctness; [`CalibrationAccumulator::finish`]
/// equals [`ece`] over the concatenated batches (bit for bit: same summation order).
#[derive(Clone, Debug, PartialEq)]
pub struct CalibrationAccumulator {
    count: Vec<usize>,
    correct: Vec<usize>,
    confidence_sum: Vec<f64>,
}

impl CalibrationAccumulator {
    /// An empty accumulator with `bins` ≥ 1 equal-width bins.
    pub fn new(bins: usize) -> Result<Self> {
        if bins == 0 {
            return Err(MetricsError::ZeroBins);
        }
        Ok(Self {
            count: vec![0; bins],
            correct: vec![0; bins],
            confidence_sum: vec![0.0; bins],
        })
    }

    /// Adds a batch: confidences (B,) in [0, 1], correct (B,). An empty batch is a
    /// no-op. On error nothing is added.
    pub fn push(&mut self, confidences: &[f64], correct: &[bool]) -> Result<()> {
        check::same_len("confidences", confidences, "correct", correct)?;
        check::unit_interval("confidences", confidences)?;
        let bins = self.count.len();
        for (&c, &ok) in confidences.iter().zip(correct) {
            let m = bin_index(c, bins);
            self.count[m] += 1;
            self.correct[m] += usize::from(ok);
            self.confidence_sum[m] += c;
        }
        Ok(())
    }

    /// Number of examples pushed.
    pub fn len(&self) -> usize {
        self.count.iter().sum()
    }

    /// Whether nothing was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ECE and reliability diagram of everything pushed; an error if nothing was.
    pub fn finish(&self) -> Result<Calibration> {
        let n = self.len();
        if n == 0 {
            return Err(MetricsError::Empty {
                what: "CalibrationAccumulator",
            });
        }
        let bins_total = self.count.len();
        let mut ece = 0.0;
        let mut bins = Vec::with_capacity(bins_total);
        for m in 0..bins_total {
            let count = self.count[m];
            let (accuracy, confidence) = if count == 0 {
                (None, None)
            } else {
                let acc = check::fraction(self.correct[m], count);
                let conf = self.confidence_sum[m] / count as f64;
                ece += check::fraction(count, n) * (acc - conf).abs();
                (Some(acc), Some(conf))
            };
            bins.push(ReliabilityBin {
                lo: edge(m, bins_total),
                hi: edge(m + 1, bins_total),
                count,
                accuracy,
                confidence,
            });
        }
        Ok(Calibration {
            ece,
            count: n,
            bins,
        })
    }
}

/// Edge m of M equal-width bins; edge(0) = 0 and edge(M) = 1 exactly.
fn edge(m: usize, bins: usize) -> f64 {
    m as f64 / bins as f64
}

/// The bin (edge(m), edge(m+1)] holding c ∈ [0, 1]; 0 goes in bin 0.
fn bin_index(c: f64, bins: usize) -> usize {
    let mut m = ((c * bins as f64).ceil() as usize)
        .saturating_sub(1)
        .min(bins - 1);
    // c·M may round across an edge; settle against the edges reported.
    while m + 1 < bins && c > edge(m + 1, bins) {
        m += 1;
    }
    while m > 0 && c <= edge(m, bins) {
        m -= 1;
    }
    m
}

/// Brier score: mean over examples of ‖p − onehot(y)‖² = Σ_k (p_k − 1[k = y])².
///
/// This is the multi-class form summed over classes (range [0, 2]), not divided by K.
/// probs: (N, K) row-major probability rows (entries in [0, 1], rows summing to 1
/// within [`crate::PROBABILITY_SUM_TOLERANCE`]); labels: (N,) below K; K ≥ 1.
pub fn brier<P: Copy + Into<f64>>(probs: &[P], labels: &[u32], num_classes: usize) -> Result<f64> {
    let n = check::rows_with_labels("probs", probs.len(), labels, num_classes, 1)?;
    let p = check::probabilities("probs", probs, num_classes)?;
    let total: f64 = p
        .chunks_exact(num_classes)
        .zip(labels)
        .map(|(row, &y)| {
            row.iter()
                .enumerate()
                .map(|(k, &pk)| {
                    let d = pk - if k == y as usize { 1.0 } else { 0.0 };
                    d * d
                })
                .sum::<f64>()
        })
        .sum();
    Ok(total / n as f64)
}

/// Negative log-likelihood: mean over examples of −ln max(p_y, [`NLL_PROBABILITY_FLOOR`]), in nats.
///
/// probs: (N, K) row-major probability rows (checked as in [`brier`]); labels: (N,)
/// below K. For logits prefer [`crate::nll_with_temperature`], which is exact.
pub fn nll<P: Copy + Into<f64>>(probs: &[P], labels: &[u32], num_classes: usize) -> Result<f64> {
    let n = check::rows_with_labels("probs", probs.len(), labels, num_classes, 1)?;
    let p = check::probabilities("probs", probs, num_classes)?;
    let total: f64 = p
        .chunks_exact(num_classes)
        .zip(labels)
        .map(|(row, &y)| -row[y as usize].max(NLL_PROBABILITY_FLOOR).ln())
        .sum();
    Ok(total / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ece_by_hand() -> Result<()> {
        // Two bins: (0, 0.5] and (0.5, 1].
        //   bin 0: conf 0.2 (wrong), 0.5 (right; on the edge → lower bin)
        //          acc 1/2, conf 0.35, |gap| 0.15, weight 2/5
        //   bin 1: conf 0.6 (right), 0.8 (wrong), 1.0 (right)
        //          acc 2/3, conf 0.8, |gap| 2/15, weight 3/5
        // ECE = 2/5 · 0.15 + 3/5 · 2/15 = 0.06 + 0.08 = 0.14.
        let conf = [0.2, 0.5, 0.6, 0.8, 1.0];
        let ok = [false, true, true, false, true];
        let cal = ece(&conf, &ok, 2)?;
        assert!((cal.ece - 0.14).abs() < 1e-12, "ece = {}", cal.ece);
        assert_eq!(cal.count, 5);
        assert_eq!(cal.bins.len(), 2);
        assert_eq!(
            (cal.bins[0].lo, cal.bins[0].hi, cal.bins[0].count),
            (0.0, 0.5, 2)
        );
        assert_eq!(
            (cal.bins[1].lo, cal.bins[1].hi, cal.bins[1].count),
            (0.5, 1.0, 3)
        );
        assert_eq!(cal.bins[0].accuracy, Some(0.5));
        assert!((cal.bins[0].confidence.unwrap_or(f64::NAN) - 0.35).abs() < 1e-12);
        assert!((cal.bins[1].accuracy.unwrap_or(f64::NAN) - 2.0 / 3.0).abs() < 1e-12);
        // MCE = max(0.15, 2/15) = 0.15.
        assert!((cal.mce() - 0.15).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn ece_bin_edges_and_empty_bins() -> Result<()> {
        // 15 bins: 0 → bin 0; exactly 2/15 → bin 1, (1/15, 2/15]; just above → bin 2;
        // 1 → bin 14. Every other bin is empty and says so.
        let conf = [0.0, 2.0 / 15.0, 2.0 / 15.0 + 1e-12, 1.0];
        let cal = ece_15(&conf, &[true; 4])?;
        let counts: Vec<usize> = cal.bins.iter().map(|b| b.count).collect();
        let mut expected = vec![0; 15];
        expected[0] = 1;
        expected[1] = 1;
        expected[2] = 1;
        expected[14] = 1;
        assert_eq!(counts, expected);
        assert_eq!(cal.bins[5].accuracy, None);
        assert_eq!(cal.bins[5].confidence, None);
        assert_eq!(cal.bins[14].hi, 1.0);
        // A perfectly calibrated case: confidence 1 and always right.
        assert_eq!(ece(&[1.0, 1.0], &[true, true], 10)?.ece, 0.0);
        // One bin: ECE = |accuracy − mean confidence| = |0.5 − 0.7|.
        assert!((ece(&[0.6, 0.8], &[true, false], 1)?.ece - 0.2).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn every_edge_lands_in_the_bin_below() {
        for bins in [1, 3, 7, 10, 15, 100] {
            for m in 1..=bins {
                let c = edge(m, bins);
                assert_eq!(bin_index(c, bins), m - 1, "edge {m}/{bins}");
            }
            assert_eq!(bin_index(0.0, bins), 0);
        }
    }

    #[test]
    fn calibration_accumulator_matches_ece() -> Result<()> {
        let conf: Vec<f64> = (0..97).map(|i| f64::from((i * 31) % 101) / 100.0).collect();
        let ok: Vec<bool> = (0..97).map(|i| (i * 7) % 3 != 0).collect();
        let mut acc = CalibrationAccumulator::new(15)?;
        assert!(acc.is_empty());
        assert!(matches!(acc.finish(), Err(MetricsError::Empty { .. })));
        for (c, k) in conf.chunks(10).zip(ok.chunks(10)) {
            acc.push(c, k)?;
        }
        acc.push(&[], &[])?;
        assert_eq!(acc.len(), 97);
        assert_eq!(acc.finish()?, ece_15(&conf, &ok)?);
        // A bad batch is refused and leaves the accumulator as it was.
        let before = acc.clone();
        assert!(acc.push(&[0.5, 1.5], &[true, true]).is_err());
        assert_eq!(acc, before);
        Ok(())
    }

    #[test]
    fn calibration_serialises_empty_bins_as_null(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let cal = ece(&[0.9], &[true], 2)?;
        let json = serde_json::to_string(&cal)?;
        assert!(json.contains(r#""accuracy":null"#), "{json}");
        Ok(())
    }

    #[test]
    fn ece_bad_input() {
        assert!(matches!(
            ece(&[0.5], &[true], 0),
            Err(MetricsError::ZeroBins)
        ));
        assert!(matches!(ece(&[], &[], 15), Err(MetricsError::Empty { .. })));
        assert!(matches!(
            ece(&[0.5, 0.6], &[true], 15),
            Err(MetricsError::LengthMismatch { .. })
        ));
        assert!(matches!(
            ece(&[0.5, f64::NAN], &[true, true], 15),
            Err(MetricsError::NaN {
                what: "confidences",
                index: 1
            })
        ));
        assert!(matches!(
            ece(&[-0.1], &[true], 15),
            Err(MetricsError::OutOfRange {
                what: "confidences",
                index: 0,
                ..
            })
        ));
        assert!(matches!(
            ece(&[1.1], &[true], 15),
            Err(MetricsError::OutOfRange { .. })
        ));
    }

    // Two examples, K = 3:
    //   p = (0.7, 0.2, 0.1), y = 0: ‖p − e₀‖² = 0.3² + 0.2² + 0.1² = 0.14
    //   p = (0.1, 0.3, 0.6), y = 1: ‖p − e₁‖² = 0.1² + 0.7² + 0.6² = 0.86
    // Brier = (0.14 + 0.86) / 2 = 0.5.
    // NLL = (−ln 0.7 − ln 0.3) / 2 = (0.3566749 + 1.2039728) / 2 = 0.7803239.
    const PROBS: [f64; 6] = [0.7, 0.2, 0.1, 0.1, 0.3, 0.6];

    #[test]
    fn brier_and_nll_by_hand() -> Result<()> {
        assert!((brier(&PROBS, &[0, 1], 3)? - 0.5).abs() < 1e-12);
        assert!((nll(&PROBS, &[0, 1], 3)? - 0.780_323_9).abs() < 1e-7);
        // f32 input gives the same answer up to f32 rounding.
        let p32: Vec<f32> = PROBS.iter().map(|&p| p as f32).collect();
        assert!((brier(&p32, &[0, 1], 3)? - 0.5).abs() < 1e-6);
        // p_y = 0 is clamped: −ln(1e−12).
        let nll_zero = nll(&[1.0, 0.0], &[1], 2)?;
        assert!((nll_zero - 1e12f64.ln()).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn brier_and_nll_bad_input() {
        assert!(matches!(
            brier(&PROBS, &[0, 3], 3),
            Err(MetricsError::LabelOutOfRange {
                index: 1,
                label: 3,
                num_classes: 3
            })
        ));
        assert!(matches!(
            nll(&PROBS, &[0], 3),
            Err(MetricsError::LengthMismatch {
                left_len: 2,
                right_len: 1,
                ..
            })
        ));
        assert!(matches!(
            brier(&PROBS, &[0, 1], 4),
            Err(MetricsError::RaggedRows {
                len: 6,
                num_classes: 4,
                ..
            })
        ));
        assert!(matches!(
            nll(&PROBS, &[0, 1], 0),
            Err(MetricsError::TooFewClasses { got: 0, .. })
        ));
        assert!(matches!(
            nll::<f64>(&[], &[], 3),
            Err(MetricsError::Empty { .. })
        ));
        assert!(matches!(
            brier(&[0.7, 0.2, 0.2], &[0], 3),
            Err(MetricsError::NotNormalised { row: 0, .. })
        ));
        assert!(matches!(
            nll(&[0.5, f64::NAN], &[0], 2),
            Err(MetricsError::NaN { index: 1, .. })
        ));
    }
}
