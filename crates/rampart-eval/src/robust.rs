//! The per-example worst case of several attacks at one ε over the first images of a
//! data set, batch by batch: the robust figure of `rampart eval --suite pgd20`. Each
//! attack keeps its own per-example outcome, so a result can be
//! compared image by image with another tool.

use std::time::Instant;

use candle_core::{ModuleT, Tensor};
use rampart_attacks::{Attack, Bounds, Objective, Pgd};
use rampart_data::ImageDataset;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::journal::{fresh_batch, BatchJournal};
use crate::outputs::{batch_logits, Outcomes};

/// One finished batch of [`worst_case`] (its logits and adversarial images are saved
/// as matrices beside it).
#[derive(Serialize, Deserialize)]
struct WorstCaseBatch {
    /// Per attack: per example, the criterion holds.
    fooled: Vec<Vec<bool>>,
    /// Per attack: wall time.
    seconds: Vec<f64>,
    /// Classes K.
    classes: usize,
}

/// An attack with the name its per-example outcome is reported under.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NamedAttack {
    /// Name (`pgd20_ce`, `pgd20_margin`, `pgd20_conf`, …).
    pub name: String,
    /// The configuration.
    pub pgd: Pgd,
}

/// `base` once per objective, named `{prefix}_{ce|margin|conf|…}`: the worst case that
/// every robust figure is taken over (cross-entropy, the C&W margin on logits, and
/// conf for models that reject low confidence).
pub fn objective_variants(prefix: &str, base: &Pgd, objectives: &[Objective]) -> Vec<NamedAttack> {
    objectives
        .iter()
        .map(|&objective| NamedAttack {
            name: format!("{prefix}_{}", objective_label(objective)),
            pgd: Pgd { objective, ..*base },
        })
        .collect()
}

/// The short name of an objective in attack names (`cw` is called `margin`).
pub fn objective_label(objective: Objective) -> &'static str {
    match objective {
        Objective::CwMargin => "margin",
        o => o.name(),
    }
}

/// The objectives of every worst case: cross-entropy, C&W margin, conf.
pub const WORST_CASE_OBJECTIVES: [Objective; 3] = [
    Objective::CrossEntropy,
    Objective::CwMargin,
    Objective::Conf,
];

/// Per-example outcomes of several attacks on the first `n` images.
#[derive(Clone, Debug)]
pub struct WorstCase {
    /// The attacks, in order.
    pub attacks: Vec<String>,
    /// Per attack: per example, the attack's criterion holds (judged on fresh forward
    /// passes, the EOT rule for a stochastic model).
    pub fooled: Vec<Vec<bool>>,
    /// Per attack: wall time.
    pub seconds: Vec<f64>,
    /// Per example: clean correct and no attack succeeded.
    pub robust: Vec<bool>,
    /// Per example: the attack whose adversarial example the worst case keeps (a
    /// misclassified example first, then the highest wrong-class confidence; ties keep
    /// the earlier attack: `rampart_metrics::WorstCase`'s rule).
    pub worst_attack: Vec<usize>,
    /// That example is classified correctly (one forward pass).
    pub worst_correct: Vec<bool>,
    /// Its confidence max_k p_k.
    pub worst_confidence: Vec<f64>,
    /// Its wrong-class confidence.
    pub worst_wrong_class_confidence: Vec<f64>,
    /// Per attack: logits (n, K) row-major of the adversarial examples (one pass).
    pub logits: Vec<Vec<f32>>,
    /// Classes K.
    pub classes: usize,
    /// Per batch: the example indices and, per attack, the adversarial images (kept
    /// only when asked).
    pub adversarial: Vec<(Vec<usize>, Vec<Tensor>)>,
}

/// Runs every attack on the images `rows` of `data` (the first n: `0..n`; a shard's:
/// a run of whole batches, `rows.start` a multiple of `batch_size`) in batches of
/// `batch_size`; `clean_correct[i]` is the clean outcome of image i (length ≥
/// `rows.end`). Batch b (counted from image 0) uses the seed `seed + first index of
/// the batch` (every attack the same starts), so a shard's batches are the whole
/// run's. With a `journal`, every finished batch is saved there as batch b and batches
/// already saved are loaded instead of attacked again (see [`BatchJournal`]).
#[allow(clippy::too_many_arguments)]
pub fn worst_case(
    model: &dyn ModuleT,
    bounds: Bounds,
    data: &ImageDataset,
    rows: std::ops::Range<usize>,
    attacks: &[NamedAttack],
    eps: f64,
    clean_correct: &[bool],
    batch_size: usize,
    seed: u64,
    device: &candle_core::Device,
    keep_adversarial: bool,
    journal: Option<&BatchJournal<'_>>,
) -> Result<WorstCase> {
    let end = rows.end.min(data.len());
    let start = rows.start.min(end);
    let n = end - start;
    let batch_size = batch_size.max(1);
    if clean_correct.len() < end {
        return Err(EvalError::Config(format!(
            "{} clean outcomes for images up to {end}",
            clean_correct.len()
        )));
    }
    if !start.is_multiple_of(batch_size) {
        return Err(EvalError::Config(format!(
            "attacked rows start at image {start}, inside a batch of {batch_size}"
        )));
    }
    if attacks.is_empty() {
        return Err(EvalError::Config("no attack to run".into()));
    }
    let m = attacks.len();
    let mut out = WorstCase {
        attacks: attacks.iter().map(|a| a.name.clone()).collect(),
        fooled: vec![Vec::with_capacity(n); m],
        seconds: vec![0.0; m],
        robust: Vec::with_capacity(n),
        worst_attack: Vec::with_capacity(n),
        worst_correct: Vec::with_capacity(n),
        worst_confidence: Vec::with_capacity(n),
        worst_wrong_class_confidence: Vec::with_capacity(n),
        logits: vec![Vec::new(); m],
        classes: 0,
        adversarial: Vec::new(),
    };
    let started = Instant::now();
    let indices: Vec<usize> = (start..end).collect();
    let (c, h, w) = data.shape();
    let matrices = if keep_adversarial { 2 * m } else { m };
    for (local, chunk) in indices.chunks(batch_size).enumerate() {
        let b = start / batch_size + local;
        let labels: Vec<u32> = chunk.iter().map(|&i| data.labels()[i]).collect();
        let saved = journal.and_then(|j| j.load::<WorstCaseBatch>(b, matrices));
        let (batch, values) = match saved {
            Some(s) => s,
            None => {
                let (xs, ys, batch_seed) = fresh_batch(data, chunk, device, seed, journal)?;
                let mut batch = WorstCaseBatch {
                    fooled: Vec::with_capacity(m),
                    seconds: Vec::with_capacity(m),
                    classes: 0,
                };
                let mut logits = Vec::with_capacity(m);
                let mut images = Vec::new();
                for attack in attacks {
                    let t = Instant::now();
                    let mut res = attack
                        .pgd
                        .run(model, bounds, &xs, &ys, &[eps], batch_seed)
                        .map_err(EvalError::attack(&attack.name))?;
                    let r = res
                        .pop()
                        .ok_or_else(|| EvalError::Config("the attack returned no result".into()))?;
                    let (l, k) = batch_logits(model, &r.clipped)?;
                    batch.classes = k;
                    logits.push(l);
                    batch.fooled.push(r.success);
                    if keep_adversarial {
                        images.push(r.clipped.flatten_all()?.to_vec1::<f32>()?);
                    }
                    batch.seconds.push(t.elapsed().as_secs_f64());
                }
                logits.extend(images);
                if let Some(j) = journal {
                    let parts: Vec<(usize, &[f32])> =
                        logits.iter().map(|v| (chunk.len(), v.as_slice())).collect();
                    j.save(b, &batch, &parts)?;
                }
                (batch, logits)
            }
        };
        if batch.fooled.len() != m || batch.seconds.len() != m {
            return Err(EvalError::Config(format!(
                "batch {b} holds {} attacks, not {m}",
                batch.fooled.len()
            )));
        }
        let k = batch.classes;
        out.classes = k;
        let mut outcomes = Vec::with_capacity(m);
        for (a, logits) in values.iter().take(m).enumerate() {
            outcomes.push(Outcomes::from_logits(logits, &labels, k)?);
            out.logits[a].extend_from_slice(logits);
            out.fooled[a].extend_from_slice(&batch.fooled[a]);
            out.seconds[a] += batch.seconds[a];
        }
        let mut kept = Vec::new();
        for v in values.iter().skip(m) {
            kept.push(Tensor::from_slice(v, (chunk.len(), c, h, w), device)?);
        }
        for (j, &i) in chunk.iter().enumerate() {
            let base = out.fooled[0].len() - chunk.len();
            out.robust
                .push(clean_correct[i] && (0..m).all(|a| !out.fooled[a][base + j]));
            let outcome = |a: usize| rampart_metrics::AdversarialOutcome {
                source: a,
                correct: outcomes[a].correct[j],
                confidence: outcomes[a].confidence[j],
                wrong_class_confidence: outcomes[a].wrong_class_confidence[j],
            };
            let mut best = 0;
            for a in 1..m {
                if outcome(a).is_worse_than(&outcome(best)) {
                    best = a;
                }
            }
            out.worst_attack.push(best);
            out.worst_correct.push(outcomes[best].correct[j]);
            out.worst_confidence.push(outcomes[best].confidence[j]);
            out.worst_wrong_class_confidence
                .push(outcomes[best].wrong_class_confidence[j]);
        }
        if keep_adversarial {
            out.adversarial.push((chunk.to_vec(), kept));
        }
        tracing::info!(
            attacked = chunk[chunk.len() - 1] + 1,
            of = end,
            robust = out.robust.iter().filter(|&&r| r).count(),
            seconds = format!("{:.0}", started.elapsed().as_secs_f64()),
            "worst case over {}",
            out.attacks.join(", ")
        );
    }
    Ok(out)
}

/// The per-example record of a [`WorstCase`] (`per_example/<name>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorstCaseRecord {
    /// The budget.
    pub eps: f64,
    /// The attacks, in order.
    pub attacks: Vec<String>,
    /// Test labels of the attacked images.
    pub labels: Vec<u32>,
    /// Clean outcome of the attacked images.
    pub clean_correct: Vec<bool>,
    /// Per attack (same order): the attack's criterion holds.
    pub fooled: Vec<Vec<bool>>,
    /// Correct clean and against every attack.
    pub robust: Vec<bool>,
    /// Name of the attack whose example the worst case keeps.
    pub worst_attack: Vec<String>,
    /// Its adversarial example is classified correctly.
    pub worst_correct: Vec<bool>,
    /// Its confidence.
    pub worst_confidence: Vec<f64>,
    /// Its wrong-class confidence.
    pub worst_wrong_class_confidence: Vec<f64>,
}

impl WorstCase {
    /// The serialisable per-example record.
    pub fn record(&self, eps: f64, labels: &[u32], clean_correct: &[bool]) -> WorstCaseRecord {
        let n = self.robust.len();
        WorstCaseRecord {
            eps,
            attacks: self.attacks.clone(),
            labels: labels[..n.min(labels.len())].to_vec(),
            clean_correct: clean_correct[..n.min(clean_correct.len())].to_vec(),
            fooled: self.fooled.clone(),
            robust: self.robust.clone(),
            worst_attack: self
                .worst_attack
                .iter()
                .map(|&a| self.attacks[a].clone())
                .collect(),
            worst_correct: self.worst_correct.clone(),
            worst_confidence: self.worst_confidence.clone(),
            worst_wrong_class_confidence: self.worst_wrong_class_confidence.clone(),
        }
    }

    /// Robust accuracy against attack `a` alone (clean correct and not fooled by it).
    pub fn robust_accuracy_of(&self, a: usize, clean_correct: &[bool]) -> f64 {
        let n = self.robust.len();
        let ok = (0..n)
            .filter(|&i| clean_correct[i] && !self.fooled[a][i])
            .count();
        ok as f64 / n.max(1) as f64
    }
}
