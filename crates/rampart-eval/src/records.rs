//! Per-example results saved after each step of an evaluation (`OUT/per_example/`), so
//! metrics can be recomputed without re-attacking and an interrupted run resumes.
//! Each record carries a `key`: a digest of the clean logits (hence model and data),
//! the batch size, the seed and the step's configuration. A record whose key differs
//! from the one the current run would write is stale and is recomputed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::io::Keyed;
use crate::outputs::Outcomes;
use crate::shard::Rows;
use crate::trust::TrustChecks;

/// One threat model's per-example outcome over all its attacks
/// (`per_example/<threat model>.worst.json`), for comparing a result image by image
/// with another tool. Derived from the attack records; rewritten on every run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThreatModelRecord {
    /// Threat model name.
    pub threat_model: String,
    /// Budget.
    pub eps: f64,
    /// The clean image is classified correctly.
    pub clean_correct: Vec<bool>,
    /// Correct clean and against every attack (the robust-accuracy numerator).
    pub robust: Vec<bool>,
    /// Per attack: the image was correct clean and its adversarial version is wrong.
    pub fooled: BTreeMap<String, Vec<bool>>,
    /// The attack whose adversarial example the worst case keeps (misclassified first,
    /// then the highest wrong-class confidence; ties keep the earlier attack).
    pub worst_attack: Vec<Option<String>>,
    /// That example is classified correctly.
    pub worst_correct: Vec<bool>,
    /// Its confidence max_k p_k.
    pub worst_confidence: Vec<f64>,
    /// Its wrong-class confidence max_{k≠y} p_k.
    pub worst_wrong_class_confidence: Vec<f64>,
}

/// The trust checks of an evaluation (`per_example/trust.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrustRecord {
    /// Fingerprint of what produced the record.
    pub key: String,
    /// The outcome.
    pub checks: TrustChecks,
}

impl Keyed for TrustRecord {
    fn key(&self) -> &str {
        &self.key
    }
}

/// One attack of one threat model, per attacked example (aligned with the test split).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackRecord {
    /// Fingerprint of what produced the record.
    pub key: String,
    /// A shard's rows of the attacked images (the vectors below hold these rows);
    /// absent for the whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Rows>,
    /// Threat model name.
    pub threat_model: String,
    /// Attack name.
    pub attack: String,
    /// Budget.
    pub eps: f64,
    /// Whether the adversarial example is classified correctly.
    pub correct: Vec<bool>,
    /// Its confidence max_k p_k.
    pub confidence: Vec<f64>,
    /// Its wrong-class confidence max_{k≠y} p_k.
    pub wrong_class_confidence: Vec<f64>,
    /// ‖x_adv − x‖ in the threat model's norm.
    pub norm: Vec<f64>,
    /// Wall time of the attack.
    pub seconds: f64,
}

/// Uniform noise and the distal adversarial examples made from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistalRecord {
    /// Fingerprint of what produced the record.
    pub key: String,
    /// A shard's rows of the attacked images (the vectors below hold these rows);
    /// absent for the whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Rows>,
    /// Confidence of the model on the uniform-noise anchors.
    pub noise_confidence: Vec<f64>,
    /// Confidence on the distal examples (empty when the suite has no distal attack).
    pub distal_confidence: Vec<f64>,
    /// Wall time.
    pub seconds: f64,
}

/// Per-example minimal L∞ ε (see the `search` module); `None` = not broken at ε_max.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchRecord {
    /// Fingerprint of what produced the record.
    pub key: String,
    /// A shard's rows of the attacked images (the vectors below hold these rows);
    /// absent for the whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Rows>,
    /// Largest ε tried.
    pub eps_max: f64,
    /// Bisection rounds.
    pub rounds: usize,
    /// Minimal ε per attacked example (0 for clean mistakes).
    pub min_eps: Vec<Option<f64>>,
    /// Wall time.
    pub seconds: f64,
}

impl Keyed for AttackRecord {
    fn key(&self) -> &str {
        &self.key
    }
}

impl Keyed for DistalRecord {
    fn key(&self) -> &str {
        &self.key
    }
}

impl Keyed for SearchRecord {
    fn key(&self) -> &str {
        &self.key
    }
}

/// The per-example worst case of one threat model over its attack records (aligned
/// with `clean`): which attacks fooled each example and the adversarial example the
/// worst case keeps (`WorstCase`'s rule: misclassified first, then the highest
/// wrong-class confidence; ties keep the earlier attack).
pub(crate) fn worst_case_record(
    threat_model: &str,
    eps: f64,
    clean: &Outcomes,
    recs: &[AttackRecord],
) -> ThreatModelRecord {
    let n = clean.correct.len();
    let mut worst_attack = Vec::with_capacity(n);
    let mut worst_correct = Vec::with_capacity(n);
    let mut worst_confidence = Vec::with_capacity(n);
    let mut worst_wrong = Vec::with_capacity(n);
    for i in 0..n {
        let outcome = |r: &AttackRecord| rampart_metrics::AdversarialOutcome {
            source: 0,
            correct: r.correct[i],
            confidence: r.confidence[i],
            wrong_class_confidence: r.wrong_class_confidence[i],
        };
        let mut best: Option<&AttackRecord> = None;
        for r in recs {
            if best.is_none_or(|b| outcome(r).is_worse_than(&outcome(b))) {
                best = Some(r);
            }
        }
        worst_attack.push(best.map(|b| b.attack.clone()));
        worst_correct.push(best.is_none_or(|b| b.correct[i]));
        worst_confidence.push(best.map_or(clean.confidence[i], |b| b.confidence[i]));
        worst_wrong.push(best.map_or(clean.wrong_class_confidence[i], |b| {
            b.wrong_class_confidence[i]
        }));
    }
    let fooled = recs
        .iter()
        .map(|r| {
            let f: Vec<bool> = (0..n).map(|i| clean.correct[i] && !r.correct[i]).collect();
            (r.attack.clone(), f)
        })
        .collect();
    let robust = (0..n)
        .map(|i| clean.correct[i] && recs.iter().all(|r| r.correct[i]))
        .collect();
    ThreatModelRecord {
        threat_model: threat_model.to_string(),
        eps,
        clean_correct: clean.correct.clone(),
        robust,
        fooled,
        worst_attack,
        worst_correct,
        worst_confidence,
        worst_wrong_class_confidence: worst_wrong,
    }
}
