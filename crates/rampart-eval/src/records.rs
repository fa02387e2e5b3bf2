//! Per-example results saved after each step of an evaluation (`OUT/per_example/`), so
//! metrics can be recomputed without re-attacking and an interrupted run resumes.
//! Each record carries a `key`: a digest of the clean logits (hence model and data),
//! the batch size, the seed and the step's configuration. A record whose key differs
//! from the one the current run would write is stale and is recomputed.

use serde::{Deserialize, Serialize};

use crate::io::Keyed;

/// One attack of one threat model, per attacked example (aligned with the test split).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackRecord {
    /// Fingerprint of what produced the record.
    pub key: String,
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
