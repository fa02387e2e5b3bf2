//! The AutoAttack ensemble (Croce & Hein, ICML 2020): attacks run in order, each on
//! the points every earlier attack failed on; a point's result is the first attack
//! that fooled it. Resumable stage by stage, with the trust checks of [`crate::checks`].

use std::time::Instant;

use candle_core::{DType, ModuleT, Tensor};
use serde::{Deserialize, Serialize};

use crate::apgd::Apgd;
use crate::base::{argmax, Attack, AttackResult, Bounds};
use crate::batch::Batch;
use crate::checks::{check_batch, TrustReport};
use crate::eot::Eot;
use crate::error::{Error, Result};
use crate::fab::Fab;
use crate::norm::Norm;
use crate::objective::{labels_to_vec, Objective};
use crate::problem::{Outcome, Points, Problem};
use crate::square::Square;

/// One attack of an ensemble.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Stage {
    /// Auto-PGD with any objective.
    Apgd(Apgd),
    /// FAB-T.
    Fab(Fab),
    /// The Square attack (black-box).
    Square(Square),
}

impl Stage {
    /// The stage's name: `apgd-ce`, `apgd-dlr`, `apgd-t` (targeted DLR), `apgd-t-ce`,
    /// `apgd-cw`, `apgd-conf`, `fab-t`, `square`.
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Apgd(a) => match a.objective {
                Objective::CrossEntropy => "apgd-ce",
                Objective::Dlr => "apgd-dlr",
                Objective::DlrTargeted => "apgd-t",
                Objective::CrossEntropyTargeted => "apgd-t-ce",
                Objective::CwMargin => "apgd-cw",
                Objective::Conf => "apgd-conf",
                Objective::Distal => "apgd-distal",
            },
            Stage::Fab(_) => "fab-t",
            Stage::Square(_) => "square",
        }
    }

    /// Whether the attack only queries outputs (no gradients).
    pub fn is_black_box(&self) -> bool {
        matches!(self, Stage::Square(_))
    }

    /// The stage's threat model.
    pub fn norm(&self) -> Norm {
        match self {
            Stage::Apgd(a) => a.norm,
            Stage::Fab(f) => f.norm,
            Stage::Square(s) => s.norm,
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            Stage::Apgd(a) => a.validate(),
            Stage::Fab(f) => f.validate(),
            Stage::Square(s) => s.validate(),
        }
    }

    fn check_classes(&self, classes: usize) -> Result<()> {
        match self {
            Stage::Apgd(a) => a.check_classes(classes),
            _ => Objective::CwMargin.check_classes(classes, None),
        }
    }

    fn uses_eot(&self) -> bool {
        match self {
            Stage::Apgd(a) => a.eot.grad_samples > 1 || a.eot.eval_samples > 1,
            _ => false,
        }
    }

    /// The stage at one ε on a prepared problem, with the stage's own checks.
    pub(crate) fn attack(
        &self,
        problem: &Problem<'_>,
        eps: f64,
        seed: u64,
    ) -> Result<AttackResult> {
        match self {
            Stage::Apgd(a) => problem.attack(a, eps, seed),
            Stage::Fab(f) => problem.attack(f, eps, seed),
            Stage::Square(s) => problem.attack(s, eps, seed),
        }
    }
}

/// An ensemble of attacks run in order on the points still robust, AutoAttack-style.
///
/// Use [`AutoAttack::evaluate`] for one call, or [`AutoAttack::start`],
/// [`AutoAttack::run_stage`] and [`AutoAttack::finish`] to save the
/// [`EnsembleState`] after every stage and resume a long evaluation. Stage `s` is
/// seeded with `seed + s·2³²`, and every example draws from its own random stream
/// (its index in the batch), so a point's result does not depend on which other points
/// are attacked with it: an interrupted and resumed evaluation equals an uninterrupted
/// one, and the ensemble is never weaker, point by point, than any of its stages run
/// alone with the same seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoAttack {
    /// The version's name (`standard`, `rand`, or a custom name).
    pub version: String,
    /// Threat model of every stage.
    pub norm: Norm,
    /// The attacks, in order; names must be unique.
    pub stages: Vec<Stage>,
    /// Forward passes averaged to judge clean accuracy.
    pub eot: Eot,
}

impl AutoAttack {
    /// The standard version for deterministic models (Croce & Hein 2020):
    /// APGD-CE, APGD-T (targeted DLR, 9 target classes), FAB-T (9 target classes) and
    /// Square (5000 queries) for L∞ and L2. For L1: APGD-CE (5 runs) and APGD-T
    /// (5 target classes), both with the 3ε → 2ε → ε schedule, and FAB-T; the Square
    /// attack has no L1 version here. Needs K ≥ 4 (targeted DLR).
    pub fn standard(norm: Norm) -> AutoAttack {
        let mut stages = vec![
            Stage::Apgd(Apgd::ce(norm)),
            Stage::Apgd(Apgd::dlr_targeted(norm)),
            Stage::Fab(Fab::targeted(norm)),
        ];
        if matches!(norm, Norm::Linf | Norm::L2) {
            stages.push(Stage::Square(Square::autoattack(norm)));
        }
        AutoAttack {
            version: "standard".into(),
            norm,
            stages,
            eot: Eot::OFF,
        }
    }

    /// The `rand` version for randomised models: APGD-CE and APGD-DLR, one run each,
    /// every gradient the mean of 20 draws and every judgement the mean probability of
    /// 20 draws ([`Eot::autoattack_rand`]). Needs K ≥ 3 (DLR).
    pub fn rand(norm: Norm) -> AutoAttack {
        let eot = Eot::autoattack_rand();
        let single = |apgd: Apgd| Apgd {
            restarts: 1,
            large_eps_warmup: false,
            eot,
            ..apgd
        };
        AutoAttack {
            version: "rand".into(),
            norm,
            stages: vec![
                Stage::Apgd(single(Apgd::ce(norm))),
                Stage::Apgd(single(Apgd::dlr(norm))),
            ],
            eot,
        }
    }

    /// Refuses an inconsistent ensemble.
    pub fn validate(&self) -> Result<()> {
        self.eot.validate()?;
        if self.stages.is_empty() {
            return Err(Error::Config("the ensemble has no attack".into()));
        }
        for (s, stage) in self.stages.iter().enumerate() {
            stage.validate()?;
            if stage.norm() != self.norm {
                return Err(Error::Config(format!(
                    "stage `{}` attacks in {}, the ensemble in {}",
                    stage.name(),
                    stage.norm(),
                    self.norm
                )));
            }
            if self.stages[..s].iter().any(|o| o.name() == stage.name()) {
                return Err(Error::Config(format!(
                    "stage name `{}` appears twice",
                    stage.name()
                )));
            }
        }
        Ok(())
    }

    /// The seed of stage `s`.
    pub(crate) fn stage_seed(seed: u64, s: usize) -> u64 {
        seed.wrapping_add((s as u64) << 32)
    }

    /// Judges the clean points (mean probabilities of `eot.eval_samples` passes) and runs
    /// the trust checks; no attack yet. Refuses a model with too few classes for a stage
    /// ([`Error::TooFewClasses`]) before any attack step.
    ///
    /// xs: (B, ...) in `bounds`; ys: (B,) labels; eps: the budget in the ensemble's norm.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        eps: f64,
        seed: u64,
    ) -> Result<EnsembleState> {
        // The model's weights cannot change during an attack: the fused GPU program keeps
        // its reordered kernels for the run (`rampart_models::frozen_weights`).
        #[cfg(feature = "cuda")]
        let _weights = rampart_models::frozen_weights();
        self.validate()?;
        self.norm.check_eps(eps)?;
        let clock = Instant::now();
        let batch = Batch::new(model, bounds, xs, ys)?;
        for stage in &self.stages {
            stage.check_classes(batch.classes)?;
        }
        let (b, k) = (batch.len(), batch.classes);
        let (_, probs) = batch.forward(model, &batch.x, b, self.eot.eval_samples)?;
        let mut predicted = Vec::with_capacity(b);
        let mut confidence = Vec::with_capacity(b);
        let mut clean_correct = Vec::with_capacity(b);
        for i in 0..b {
            let row = &probs[i * k..(i + 1) * k];
            let (p, c) = argmax(row);
            predicted.push(p);
            confidence.push(c);
            clean_correct.push(!batch.fooled(row, i));
        }
        let eot_in_use = self.eot.grad_samples > 1
            || self.eot.eval_samples > 1
            || self.stages.iter().any(Stage::uses_eot);
        let trust = check_batch(model, &batch, eot_in_use)?;
        Ok(EnsembleState {
            version: self.version.clone(),
            norm: self.norm,
            stages: self.stages.iter().map(|s| s.name().to_string()).collect(),
            eps,
            seed,
            points: b,
            fingerprint: fingerprint(xs, ys)?,
            robust: clean_correct.clone(),
            clean_correct,
            broken_by: vec![None; b],
            adversarial: vec![None; b],
            predicted,
            confidence,
            iterations: vec![0; b],
            completed: Vec::new(),
            trust,
            clean_seconds: clock.elapsed().as_secs_f64(),
        })
    }

    /// Runs the first stage `state` has not completed, on the points still robust, and
    /// records it in `state`; `None` when every stage is done. `model`, `bounds`, `xs`
    /// and `ys` must be those the state was started with (checked by a fingerprint of
    /// the inputs and labels).
    pub fn run_stage(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        state: &mut EnsembleState,
    ) -> Result<Option<StageReport>> {
        // The model's weights cannot change during an attack: the fused GPU program keeps
        // its reordered kernels for the run (`rampart_models::frozen_weights`).
        #[cfg(feature = "cuda")]
        let _weights = rampart_models::frozen_weights();
        self.validate()?;
        self.check_state(xs, ys, state)?;
        let s = state.completed.len();
        let Some(stage) = self.stages.get(s) else {
            return Ok(None);
        };
        let clock = Instant::now();
        let batch = Batch::new(model, bounds, xs, ys)?;
        let idx: Vec<usize> = (0..state.points).filter(|&i| state.robust[i]).collect();
        let mut broken = 0;
        if !idx.is_empty() {
            let sub = Problem::from_batch(model, batch.subset(&idx));
            let res = stage.attack(&sub, state.eps, Self::stage_seed(state.seed, s))?;
            let rows = res
                .clipped
                .to_dtype(DType::F32)?
                .flatten_from(1)?
                .to_vec2::<f32>()?;
            for (r, &i) in idx.iter().enumerate() {
                state.iterations[i] += res.iterations[r];
                if res.success[r] {
                    broken += 1;
                    state.robust[i] = false;
                    state.broken_by[i] = Some(stage.name().to_string());
                    state.adversarial[i] = Some(rows[r].clone());
                    state.predicted[i] = res.predicted[r];
                    state.confidence[i] = res.confidence[r];
                }
            }
        }
        let report = StageReport {
            name: stage.name().to_string(),
            attacked: idx.len(),
            broken,
            robust_accuracy: state.robust_accuracy(),
            seconds: clock.elapsed().as_secs_f64(),
        };
        state.completed.push(report.clone());
        Ok(Some(report))
    }

    /// The evaluation of a completed state: per point the first successful attack's
    /// adversarial input (the clean input where every attack failed), per-stage robust
    /// accuracy and runtime, and the trust report including the black-box check.
    pub fn finish(&self, xs: &Tensor, ys: &Tensor, state: &EnsembleState) -> Result<Evaluation> {
        self.check_state(xs, ys, state)?;
        if !state.is_complete() {
            return Err(Error::Config(format!(
                "the evaluation has {} of {} stages left",
                state.stages.len() - state.completed.len(),
                state.stages.len()
            )));
        }
        let clean = xs.to_dtype(DType::F32)?.flatten_from(1)?.to_vec2::<f32>()?;
        let mut rows = Vec::with_capacity(clean.len() * clean.first().map_or(0, Vec::len));
        let mut norm = Vec::with_capacity(state.points);
        for (i, x) in clean.iter().enumerate() {
            let point = state.adversarial[i].as_ref().unwrap_or(x);
            let delta: Vec<f64> = point
                .iter()
                .zip(x)
                .map(|(a, b)| *a as f64 - *b as f64)
                .collect();
            norm.push(self.norm.measure(&delta) as f32);
            rows.extend_from_slice(point);
        }
        let clipped = Tensor::from_vec(rows, xs.dims(), xs.device())?.to_dtype(xs.dtype())?;
        let black_box: Vec<&str> = self
            .stages
            .iter()
            .filter(|s| s.is_black_box())
            .map(Stage::name)
            .collect();
        let mut trust = state.trust.clone();
        if !black_box.is_empty() {
            let only = state
                .broken_by
                .iter()
                .filter(|b| b.as_deref().is_some_and(|n| black_box.contains(&n)))
                .count();
            trust.record_black_box(only);
        }
        let points = state.points as f64;
        let report = EvaluationReport {
            version: state.version.clone(),
            norm: state.norm,
            eps: state.eps,
            seed: state.seed,
            points: state.points,
            clean_accuracy: state.clean_correct.iter().filter(|c| **c).count() as f64 / points,
            robust_accuracy: state.robust_accuracy(),
            stages: state.completed.clone(),
            seconds: state.clean_seconds + state.completed.iter().map(|s| s.seconds).sum::<f64>(),
            trust,
        };
        Ok(Evaluation {
            result: AttackResult {
                unconstrained: None,
                clipped,
                success: state.robust.iter().map(|r| !r).collect(),
                confidence: state.confidence.clone(),
                predicted: state.predicted.clone(),
                norm,
                iterations: state.iterations.clone(),
                eps: state.eps,
            },
            clean_correct: state.clean_correct.clone(),
            broken_by: state.broken_by.clone(),
            report,
        })
    }

    /// Runs the whole ensemble at budget `eps`: [`Self::start`], every
    /// [`Self::run_stage`], [`Self::finish`].
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        eps: f64,
        seed: u64,
    ) -> Result<Evaluation> {
        // The model's weights cannot change during an attack: the fused GPU program keeps
        // its reordered kernels for the run (`rampart_models::frozen_weights`).
        #[cfg(feature = "cuda")]
        let _weights = rampart_models::frozen_weights();
        let mut state = self.start(model, bounds, xs, ys, eps, seed)?;
        while self.run_stage(model, bounds, xs, ys, &mut state)?.is_some() {}
        self.finish(xs, ys, &state)
    }

    fn check_state(&self, xs: &Tensor, ys: &Tensor, state: &EnsembleState) -> Result<()> {
        let names: Vec<String> = self.stages.iter().map(|s| s.name().to_string()).collect();
        if state.version != self.version || state.norm != self.norm || state.stages != names {
            return Err(Error::Config(format!(
                "the saved state belongs to the `{}` ensemble in {} ({}), not to `{}` in {} ({})",
                state.version,
                state.norm,
                state.stages.join(", "),
                self.version,
                self.norm,
                names.join(", ")
            )));
        }
        let b = state.points;
        let lengths = [
            state.clean_correct.len(),
            state.robust.len(),
            state.broken_by.len(),
            state.adversarial.len(),
            state.predicted.len(),
            state.confidence.len(),
            state.iterations.len(),
        ];
        if lengths.iter().any(|&l| l != b) || state.completed.len() > state.stages.len() {
            return Err(Error::Input("the saved state is inconsistent".into()));
        }
        if fingerprint(xs, ys)? != state.fingerprint {
            return Err(Error::Input(
                "the saved state was made on other inputs or labels".into(),
            ));
        }
        Ok(())
    }
}

impl Attack for AutoAttack {
    fn norm(&self) -> Norm {
        self.norm
    }

    fn eval_samples(&self) -> usize {
        self.eot.eval_samples
    }

    fn validate(&self) -> Result<()> {
        AutoAttack::validate(self)
    }

    /// Refuses a model with too few classes for a stage.
    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        self.stages
            .iter()
            .try_for_each(|stage| stage.check_classes(problem.classes()))
    }

    /// [`AutoAttack::evaluate`] on the problem's inputs: per point the first stage's
    /// adversarial input that fooled it.
    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        let batch = &problem.batch;
        let xs = batch.tensor(&batch.x, batch.len())?;
        let ys = Tensor::from_slice(&batch.ys, batch.len(), &batch.device)?;
        let result = self
            .evaluate(problem.model, batch.bounds, &xs, &ys, eps, seed)?
            .result;
        let points = result
            .clipped
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Outcome {
            points: Points::Feasible(points),
            iterations: result.iterations,
        })
    }

    /// Runs [`AutoAttack::evaluate`] once per ε (the ensemble's trust report and stage
    /// statistics are dropped; call `evaluate` to keep them). Overrides the provided
    /// ε loop because the ensemble judges its points itself, stage by stage on the
    /// points still robust (the first success is kept, whatever later passes say;
    /// `rand` versions average their own draws), and prepares its own batches so that
    /// a run can be resumed from an [`EnsembleState`].
    fn run(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        eps: &[f64],
        seed: u64,
    ) -> Result<Vec<AttackResult>> {
        if eps.is_empty() {
            return Err(Error::Config("no ε given".into()));
        }
        eps.iter()
            .map(|&e| Ok(self.evaluate(model, bounds, xs, ys, e, seed)?.result))
            .collect()
    }
}

/// Robust accuracy after one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// The stage's name.
    pub name: String,
    /// Points it attacked (those still robust).
    pub attacked: usize,
    /// Points it fooled.
    pub broken: usize,
    /// Robust accuracy over all points after the stage.
    pub robust_accuracy: f64,
    /// Wall-clock time of the stage.
    pub seconds: f64,
}

/// Everything the ensemble knows after some stages: enough to resume. Serialisable
/// (serde); adversarial inputs are kept as f32 rows for the points already fooled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnsembleState {
    /// The ensemble's version name.
    pub version: String,
    /// Threat model.
    pub norm: Norm,
    /// Names of all stages, in order.
    pub stages: Vec<String>,
    /// Budget.
    pub eps: f64,
    /// Seed of the evaluation.
    pub seed: u64,
    /// Number of points.
    pub points: usize,
    /// FNV-1a hash of the input shape, input values and labels.
    pub fingerprint: u64,
    /// Per point: classified correctly without attack.
    pub clean_correct: Vec<bool>,
    /// Per point: no attack has fooled it (and it was classified correctly).
    pub robust: Vec<bool>,
    /// Per point: the stage that fooled it.
    pub broken_by: Vec<Option<String>>,
    /// Per point: the adversarial input that fooled it, flattened.
    pub adversarial: Vec<Option<Vec<f32>>>,
    /// Per point: predicted class at the returned input.
    pub predicted: Vec<u32>,
    /// Per point: confidence at the returned input.
    pub confidence: Vec<f32>,
    /// Per point: gradient steps (queries for Square) spent on it.
    pub iterations: Vec<usize>,
    /// The completed stages, in order.
    pub completed: Vec<StageReport>,
    /// Trust checks made at the start (the black-box check is added by `finish`).
    pub trust: TrustReport,
    /// Time of the clean judgement and the checks.
    pub clean_seconds: f64,
}

impl EnsembleState {
    /// Whether every stage has run.
    pub fn is_complete(&self) -> bool {
        self.completed.len() == self.stages.len()
    }

    /// Share of points still robust.
    pub fn robust_accuracy(&self) -> f64 {
        self.robust.iter().filter(|r| **r).count() as f64 / self.points.max(1) as f64
    }
}

/// The serialisable summary of an ensemble evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    /// The ensemble's version name.
    pub version: String,
    /// Threat model.
    pub norm: Norm,
    /// Budget.
    pub eps: f64,
    /// Seed.
    pub seed: u64,
    /// Number of points.
    pub points: usize,
    /// Share of points classified correctly.
    pub clean_accuracy: f64,
    /// Share of points classified correctly under every attack.
    pub robust_accuracy: f64,
    /// Robust accuracy and runtime after each stage.
    pub stages: Vec<StageReport>,
    /// Total wall-clock time (clean judgement, checks and stages).
    pub seconds: f64,
    /// The trust checks.
    pub trust: TrustReport,
}

/// The outcome of an ensemble evaluation at one ε.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Per point the worst case: the first attack's adversarial input that fooled it,
    /// the clean input where all failed. `success` is "not robust" (clean
    /// misclassification included).
    pub result: AttackResult,
    /// Per point: classified correctly without attack.
    pub clean_correct: Vec<bool>,
    /// Per point: the stage that fooled it.
    pub broken_by: Vec<Option<String>>,
    /// Accuracies, stages, runtime and trust checks.
    pub report: EvaluationReport,
}

/// FNV-1a over the input shape, the f32 bits of the inputs and the labels.
fn fingerprint(xs: &Tensor, ys: &Tensor) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for &d in xs.dims() {
        eat(&(d as u64).to_le_bytes());
    }
    for v in xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
        eat(&v.to_bits().to_le_bytes());
    }
    for y in labels_to_vec(ys)? {
        eat(&y.to_le_bytes());
    }
    Ok(h)
}

#[cfg(test)]
mod tests;
