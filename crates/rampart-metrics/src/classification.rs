//! Clean and robust error, and the per-example worst case over attacks and restarts.

use serde::{Deserialize, Serialize};

use crate::check;
use crate::error::{MetricsError, Result};
use crate::probs;

/// Clean error: the fraction of examples whose prediction differs from the label, in [0, 1].
///
/// predictions, labels: (N,), N ≥ 1.
pub fn clean_error(predictions: &[u32], labels: &[u32]) -> Result<f64> {
    check::non_empty("predictions", predictions)?;
    check::same_len("predictions", predictions, "labels", labels)?;
    let wrong = predictions
        .iter()
        .zip(labels)
        .filter(|(p, l)| p != l)
        .count();
    Ok(check::fraction(wrong, predictions.len()))
}

/// Robust error, in [0, 1]: an example counts as broken if its clean version or
/// *any* adversarial version is misclassified (per-example worst case).
///
/// clean_correct: (N,), N ≥ 1; adversarial_correct: one (N,) slice per attack or
/// restart, at least one (a "robust" error without any attack is refused as a
/// likely mistake; use [`clean_error`] for that).
pub fn robust_error(clean_correct: &[bool], adversarial_correct: &[&[bool]]) -> Result<f64> {
    check::non_empty("clean_correct", clean_correct)?;
    check::non_empty("adversarial_correct", adversarial_correct)?;
    for adv in adversarial_correct {
        check::same_len(
            "clean_correct",
            clean_correct,
            "adversarial_correct[_]",
            adv,
        )?;
    }
    let broken = (0..clean_correct.len())
        .filter(|&i| !clean_correct[i] || adversarial_correct.iter().any(|adv| !adv[i]))
        .count();
    Ok(check::fraction(broken, clean_correct.len()))
}

/// Streams batches of predictions and labels; [`ErrorAccumulator::error`] equals
/// [`clean_error`] over the concatenated batches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorAccumulator {
    wrong: usize,
    total: usize,
}

impl ErrorAccumulator {
    /// An accumulator that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a batch; predictions, labels: (B,). An empty batch is a no-op. On error
    /// nothing is added.
    pub fn push(&mut self, predictions: &[u32], labels: &[u32]) -> Result<()> {
        check::same_len("predictions", predictions, "labels", labels)?;
        self.wrong += predictions
            .iter()
            .zip(labels)
            .filter(|(p, l)| p != l)
            .count();
        self.total += predictions.len();
        Ok(())
    }

    /// Number of examples seen.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Number of misclassified examples seen.
    pub fn wrong(&self) -> usize {
        self.wrong
    }

    /// Error so far, in [0, 1]; an error if nothing was pushed.
    pub fn error(&self) -> Result<f64> {
        if self.total == 0 {
            return Err(MetricsError::Empty {
                what: "ErrorAccumulator",
            });
        }
        Ok(check::fraction(self.wrong, self.total))
    }
}

/// The adversarial example kept for one test example by [`WorstCase`]: the one
/// with the highest wrong-class confidence max_{k≠y} p_k seen so far.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdversarialOutcome {
    /// Index of the push (attack or restart, counted from 0 in push order) that produced it.
    pub source: usize,
    /// Whether the model classified it correctly.
    pub correct: bool,
    /// Its confidence max_k p_k, the value compared with τ.
    pub confidence: f64,
    /// Its wrong-class confidence max_{k≠y} p_k, the value the worst case maximises.
    pub wrong_class_confidence: f64,
}

impl AdversarialOutcome {
    /// Whether this example is a worse case than `other` for the model: misclassified
    /// beats correctly classified, then the strictly higher wrong-class confidence.
    pub fn is_worse_than(&self, other: &AdversarialOutcome) -> bool {
        match (self.correct, other.correct) {
            (false, true) => true,
            (true, false) => false,
            _ => self.wrong_class_confidence > other.wrong_class_confidence,
        }
    }
}

/// Merges per-example results of several attacks and restarts, incrementally.
///
/// Keeps two things per example, independently:
/// - **robust correctness**: the AND of clean correctness and every adversarial
///   correctness pushed (what [`robust_error`] counts);
/// - **the worst adversarial example** for the confidence-thresholded protocol: a
///   misclassified example beats a correctly classified one, and among equals the
///   highest max_{k≠y} p_k wins (ties keep the earlier push) — the engine's own
///   best-point rule. CCAT's literal rule (the highest max_{k≠y} p_k alone) can keep
///   a correctly classified example over a misclassified one (with K ≥ 3 its
///   wrong-class confidence can be higher), so that adding an attack lowers RErr@τ and
///   RErr@τ at τ = −∞ falls below the robust error; the two rules keep the same
///   misclassified example whenever one with confidence ≥ ½ exists, so RErr@τ's
///   numerator agrees for every τ ≥ ½ (docs/metrics.md).
#[derive(Clone, Debug, PartialEq)]
pub struct WorstCase {
    clean_correct: Vec<bool>,
    robust_correct: Vec<bool>,
    worst: Vec<Option<AdversarialOutcome>>,
    pushes: usize,
}

impl WorstCase {
    /// Starts from the clean results; clean_correct: (N,), N ≥ 1.
    pub fn new(clean_correct: &[bool]) -> Result<Self> {
        check::non_empty("clean_correct", clean_correct)?;
        Ok(Self {
            clean_correct: clean_correct.to_vec(),
            robust_correct: clean_correct.to_vec(),
            worst: vec![None; clean_correct.len()],
            pushes: 0,
        })
    }

    /// Number of examples N.
    pub fn len(&self) -> usize {
        self.clean_correct.len()
    }

    /// Always false: [`WorstCase::new`] refuses zero examples.
    pub fn is_empty(&self) -> bool {
        self.clean_correct.is_empty()
    }

    /// Number of attack results pushed so far (the next push's `source`).
    pub fn pushes(&self) -> usize {
        self.pushes
    }

    /// Refuses a per-example array `name` whose length is not N.
    fn check_len<T>(&self, name: &'static str, values: &[T]) -> Result<()> {
        check::same_len("clean_correct", &self.clean_correct, name, values)
    }

    /// Merges an attack that reports correctness only (no confidences).
    /// adversarial_correct: (N,). On error nothing changes.
    pub fn push_correct(&mut self, adversarial_correct: &[bool]) -> Result<()> {
        self.check_len("adversarial_correct", adversarial_correct)?;
        for (r, &a) in self.robust_correct.iter_mut().zip(adversarial_correct) {
            *r &= a;
        }
        self.pushes += 1;
        Ok(())
    }

    /// Merges an attack with confidences; all (N,): correctness, max_k p_k in [0, 1],
    /// max_{k≠y} p_k in [0, 1]. On error nothing changes.
    pub fn push(
        &mut self,
        adversarial_correct: &[bool],
        confidence: &[f64],
        wrong_class_confidence: &[f64],
    ) -> Result<()> {
        self.check_len("adversarial_correct", adversarial_correct)?;
        self.check_len("confidence", confidence)?;
        self.check_len("wrong_class_confidence", wrong_class_confidence)?;
        check::unit_interval("confidence", confidence)?;
        check::unit_interval("wrong_class_confidence", wrong_class_confidence)?;
        let source = self.pushes;
        for i in 0..self.len() {
            self.robust_correct[i] &= adversarial_correct[i];
            let candidate = AdversarialOutcome {
                source,
                correct: adversarial_correct[i],
                confidence: confidence[i],
                wrong_class_confidence: wrong_class_confidence[i],
            };
            if self.worst[i].is_none_or(|kept| candidate.is_worse_than(&kept)) {
                self.worst[i] = Some(candidate);
            }
        }
        self.pushes += 1;
        Ok(())
    }

    /// Merges an attack given the model's probabilities on its adversarial examples.
    /// probs: (N, K) row-major probability rows; labels: (N,); K ≥ 2.
    pub fn push_probabilities<P: Copy + Into<f64>>(
        &mut self,
        probs: &[P],
        labels: &[u32],
        num_classes: usize,
    ) -> Result<()> {
        check::same_len("clean_correct", &self.clean_correct, "labels", labels)?;
        let wrong = probs::wrong_class_confidences(probs, labels, num_classes)?;
        let (predictions, confidence) = probs::predictions_and_confidences(probs, num_classes)?;
        let correct: Vec<bool> = predictions
            .iter()
            .zip(labels)
            .map(|(p, l)| p == l)
            .collect();
        self.push(&correct, &confidence, &wrong)
    }

    /// Clean correctness, as given to [`WorstCase::new`].
    pub fn clean_correct(&self) -> &[bool] {
        &self.clean_correct
    }

    /// Per example: clean correct AND every pushed adversarial version correct.
    pub fn robust_correct(&self) -> &[bool] {
        &self.robust_correct
    }

    /// Robust error over everything pushed, in [0, 1]; equals [`robust_error`] over
    /// the same inputs. With nothing pushed it is the clean error.
    pub fn robust_error(&self) -> f64 {
        let broken = self.robust_correct.iter().filter(|&&c| !c).count();
        check::fraction(broken, self.len())
    }

    /// Per example, the kept adversarial example; `None` where only
    /// [`WorstCase::push_correct`] (or nothing) was pushed.
    pub fn worst(&self) -> &[Option<AdversarialOutcome>] {
        &self.worst
    }

    /// Correctness and confidence of the kept adversarial examples, (N,) each, ready
    /// for [`crate::rerr_at_threshold`]. An error if some example has none.
    pub fn worst_correct_and_confidence(&self) -> Result<(Vec<bool>, Vec<f64>)> {
        if self.worst.iter().any(Option::is_none) {
            return Err(MetricsError::Undefined {
                what: "the worst-case adversarial confidences",
                reason: "some example has no attack result with confidences",
            });
        }
        Ok(self
            .worst
            .iter()
            .flatten()
            .map(|o| (o.correct, o.confidence))
            .unzip())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_error_counts_mismatches() -> Result<()> {
        // 2 of 5 predictions differ from the label → 0.4.
        assert_eq!(clean_error(&[0, 1, 2, 3, 4], &[0, 1, 0, 3, 0])?, 0.4);
        Ok(())
    }

    #[test]
    fn robust_error_is_the_per_example_worst_case() -> Result<()> {
        // Example 0 survives everything; 1 is broken by attack A only; 2 by attack
        // B only; 3 is wrong on clean although both attacks "fail" → 3 of 4 broken.
        let clean = [true, true, true, false];
        let a = [true, false, true, true];
        let b = [true, true, false, true];
        assert_eq!(robust_error(&clean, &[&a, &b])?, 0.75);
        // A single attack breaks only example 1, plus the clean mistake → 0.5.
        assert_eq!(robust_error(&clean, &[&a])?, 0.5);
        Ok(())
    }

    #[test]
    fn robust_error_bad_input() {
        let empty: [&[bool]; 0] = [];
        assert!(matches!(
            robust_error(&[true], &empty),
            Err(MetricsError::Empty {
                what: "adversarial_correct"
            })
        ));
        assert!(matches!(
            robust_error(&[], &[&[]]),
            Err(MetricsError::Empty {
                what: "clean_correct"
            })
        ));
        assert!(matches!(
            robust_error(&[true, true], &[&[true, true], &[true]]),
            Err(MetricsError::LengthMismatch {
                left_len: 2,
                right_len: 1,
                ..
            })
        ));
    }

    #[test]
    fn clean_error_bad_input() {
        assert!(matches!(
            clean_error(&[], &[]),
            Err(MetricsError::Empty {
                what: "predictions"
            })
        ));
        assert!(matches!(
            clean_error(&[1, 2], &[1]),
            Err(MetricsError::LengthMismatch {
                left_len: 2,
                right_len: 1,
                ..
            })
        ));
    }

    #[test]
    fn error_accumulator_matches_clean_error() -> Result<()> {
        let predictions = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1];
        let labels = [0, 1, 1, 3, 4, 4, 6, 7, 0, 9, 2];
        let mut acc = ErrorAccumulator::new();
        assert!(matches!(acc.error(), Err(MetricsError::Empty { .. })));
        for (p, l) in predictions.chunks(3).zip(labels.chunks(3)) {
            acc.push(p, l)?;
        }
        acc.push(&[], &[])?;
        assert_eq!(acc.total(), 11);
        assert_eq!(acc.wrong(), 4);
        assert_eq!(acc.error()?, clean_error(&predictions, &labels)?);
        // A bad batch is refused and changes nothing.
        assert!(acc.push(&[1], &[]).is_err());
        assert_eq!(acc.total(), 11);
        Ok(())
    }

    #[test]
    fn worst_case_ands_correctness_and_keeps_highest_wrong_class_confidence() -> Result<()> {
        let clean = [true, true, true, false];
        let mut wc = WorstCase::new(&clean)?;
        // Restart 0.
        wc.push(
            &[true, false, true, false],
            &[0.9, 0.6, 0.5, 0.7],
            &[0.1, 0.6, 0.45, 0.7],
        )?;
        // Restart 1: example 0 gets a higher wrong-class confidence while still
        // correct (replaces); example 1 a lower one (kept from restart 0); example 2
        // is broken with a lower wrong-class confidence than restart 0's correct
        // example (K ≥ 3): a misclassified example beats a correct one, so restart 1's
        // replaces it; example 3 ties (earlier kept).
        wc.push(
            &[true, false, false, false],
            &[0.5, 0.5, 0.4, 0.7],
            &[0.4, 0.5, 0.4, 0.7],
        )?;
        assert_eq!(wc.pushes(), 2);
        assert_eq!(wc.robust_correct(), &[true, false, false, false]);
        assert_eq!(wc.robust_error(), 0.75);
        let sources: Vec<usize> = wc.worst().iter().flatten().map(|o| o.source).collect();
        assert_eq!(sources, vec![1, 0, 1, 0]);
        let (correct, confidence) = wc.worst_correct_and_confidence()?;
        assert_eq!(correct, vec![true, false, false, false]);
        assert_eq!(confidence, vec![0.5, 0.6, 0.4, 0.7]);
        // So RErr@τ at a τ below every confidence is the robust error.
        let clean_conf = [0.95, 0.9, 0.8, 0.6];
        assert_eq!(
            crate::rerr_at_threshold(&clean, &clean_conf, &correct, &confidence, 0.0)?,
            wc.robust_error()
        );
        // Same answer as the pure function.
        let r0 = [true, false, true, false];
        let r1 = [true, false, false, false];
        assert_eq!(wc.robust_error(), robust_error(&clean, &[&r0, &r1])?);
        Ok(())
    }

    #[test]
    fn worst_case_from_probabilities_and_correctness_only_pushes() -> Result<()> {
        let mut wc = WorstCase::new(&[true, true])?;
        wc.push_correct(&[true, false])?;
        assert!(matches!(
            wc.worst_correct_and_confidence(),
            Err(MetricsError::Undefined { .. })
        ));
        // Example 0 (label 0): p = (0.3, 0.7, 0.0) → wrong, conf 0.7, wrong-class 0.7.
        // Example 1 (label 2): p = (0.1, 0.1, 0.8) → correct, conf 0.8, wrong-class 0.1.
        wc.push_probabilities(&[0.3f32, 0.7, 0.0, 0.1, 0.1, 0.8], &[0, 2], 3)?;
        assert_eq!(wc.robust_correct(), &[false, false]);
        let kept: Vec<AdversarialOutcome> = wc.worst().iter().flatten().copied().collect();
        assert_eq!(kept.len(), 2);
        assert_eq!((kept[0].source, kept[0].correct), (1, false));
        assert!((kept[0].wrong_class_confidence - 0.7).abs() < 1e-6);
        assert!(kept[1].correct && (kept[1].confidence - 0.8).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn worst_case_bad_input_changes_nothing() -> Result<()> {
        assert!(matches!(
            WorstCase::new(&[]),
            Err(MetricsError::Empty { .. })
        ));
        let mut wc = WorstCase::new(&[true, true])?;
        let before = wc.clone();
        assert!(matches!(
            wc.push(&[true, true], &[0.5, f64::NAN], &[0.1, 0.1]),
            Err(MetricsError::NaN {
                what: "confidence",
                index: 1
            })
        ));
        assert!(matches!(
            wc.push(&[true, true], &[0.5, 0.5], &[0.1, 1.1]),
            Err(MetricsError::OutOfRange {
                what: "wrong_class_confidence",
                index: 1,
                ..
            })
        ));
        assert!(matches!(
            wc.push(&[true], &[0.5], &[0.1]),
            Err(MetricsError::LengthMismatch { .. })
        ));
        assert!(matches!(
            wc.push_correct(&[false]),
            Err(MetricsError::LengthMismatch { .. })
        ));
        assert_eq!(wc, before);
        Ok(())
    }
}
