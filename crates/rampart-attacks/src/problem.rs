//! What an attack is given and what it hands back for one ε: the [`Problem`] (the
//! model and the validated batch, prepared once per [`crate::Attack::run`]) and the
//! [`Outcome`] (one point per example), and the step every attack shares after it:
//! clipping the points to the threat model and judging them on fresh forward passes.

use candle_core::{ModuleT, Tensor};

use crate::base::{argmax, Attack, AttackResult, Bounds, Perturbed};
use crate::batch::Batch;
use crate::error::Result;
use crate::norm::{project_l1_box, Norm};

/// The model and the clean batch an attack works on, checked once before the first ε:
/// float inputs without NaN inside the bounds, labels below K, a model that returns
/// (B, K) logits. Inputs are held on the host as f32 rows; an example's random
/// numbers come from its own stream (its index in the caller's batch).
pub struct Problem<'a> {
    pub(crate) model: &'a dyn ModuleT,
    pub(crate) batch: Batch,
}

impl<'a> Problem<'a> {
    /// Validates the inputs (xs: (B, ...) in `bounds`, ys: (B,) labels) and learns K
    /// from one forward pass of the first example.
    pub fn new(
        model: &'a dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
    ) -> Result<Problem<'a>> {
        Ok(Problem {
            model,
            batch: Batch::new(model, bounds, xs, ys)?,
        })
    }

    /// As [`Problem::new`] for a model known to return `classes` logits per example:
    /// no forward pass learns K (the attack's passes check the logits' shape).
    pub fn with_classes(
        model: &'a dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        classes: usize,
    ) -> Result<Problem<'a>> {
        Ok(Problem {
            model,
            batch: Batch::with_classes(model, bounds, xs, ys, Some(classes))?,
        })
    }

    /// A problem on an already validated batch (a subset keeps its RNG streams).
    pub(crate) fn from_batch(model: &'a dyn ModuleT, batch: Batch) -> Problem<'a> {
        Problem { model, batch }
    }

    /// The model, always called as `forward_t(x, false)`, returning (B, K) logits.
    pub fn model(&self) -> &'a dyn ModuleT {
        self.model
    }

    /// Number of examples B.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether the batch is empty (never: an empty batch is refused).
    pub fn is_empty(&self) -> bool {
        self.batch.len() == 0
    }

    /// Number of classes K.
    pub fn classes(&self) -> usize {
        self.batch.classes
    }

    /// Shape of the inputs (B, ...).
    pub fn dims(&self) -> &[usize] {
        &self.batch.dims
    }

    /// Values per example D.
    pub fn dim(&self) -> usize {
        self.batch.d
    }

    /// The input bounds.
    pub fn bounds(&self) -> Bounds {
        self.batch.bounds
    }

    /// Clean inputs, (B·D) row-major.
    pub fn inputs(&self) -> &[f32] {
        &self.batch.x
    }

    /// Labels, (B,).
    pub fn labels(&self) -> &[u32] {
        &self.batch.ys
    }

    /// One ε of `attack` on this problem, with the checks [`Attack::run`] makes before
    /// its first ε: the attack's configuration, the ε, and [`Attack::check`].
    pub(crate) fn attack<A: Attack + ?Sized>(
        &self,
        attack: &A,
        eps: f64,
        seed: u64,
    ) -> Result<AttackResult> {
        attack.validate()?;
        attack.norm().check_eps(eps)?;
        attack.check(self)?;
        let outcome = attack.attack_eps(self, eps, seed)?;
        self.judge(attack, outcome, eps)
    }

    /// The result of `outcome` at budget `eps`: points outside the ε-ball are
    /// projected onto the ε-ball ∩ box (`clipped`); success, prediction and confidence
    /// come from the mean probabilities of `attack.eval_samples()` fresh passes at
    /// `clipped`, judged by `attack.criterion()`.
    pub(crate) fn judge<A: Attack + ?Sized>(
        &self,
        attack: &A,
        outcome: Outcome,
        eps: f64,
    ) -> Result<AttackResult> {
        let batch = &self.batch;
        let (b, k, d) = (batch.len(), batch.classes, batch.d);
        let (norm, criterion) = (attack.norm(), attack.criterion());
        let (raw, clipped) = self.clipped(norm, outcome.points, eps);
        let (_, probs) = batch.forward(self.model, &clipped, b, attack.eval_samples())?;
        let mut predicted = Vec::with_capacity(b);
        let mut confidence = Vec::with_capacity(b);
        let mut success = Vec::with_capacity(b);
        for i in 0..b {
            let row = &probs[i * k..(i + 1) * k];
            let (p, c) = argmax(row);
            predicted.push(p);
            confidence.push(c);
            success.push(criterion.is_success(row, batch.ys[i]));
        }
        let measured = (0..b)
            .map(|i| batch.distance(norm, i, &clipped[i * d..(i + 1) * d]) as f32)
            .collect();
        let unconstrained = raw.map(|r| batch.tensor(&r, b)).transpose()?;
        let clipped = batch.tensor(&clipped, b)?;
        Ok(AttackResult {
            unconstrained,
            clipped,
            success,
            confidence,
            predicted,
            norm: measured,
            iterations: outcome.iterations,
            eps,
        })
    }

    /// The points of `outcome` at budget `eps` as [`Problem::judge`] clips and
    /// measures them, without judging them (no forward pass).
    pub(crate) fn points(&self, norm: Norm, outcome: Outcome, eps: f64) -> Result<Perturbed> {
        let batch = &self.batch;
        let (b, d) = (batch.len(), batch.d);
        let (_, clipped) = self.clipped(norm, outcome.points, eps);
        let measured = (0..b)
            .map(|i| batch.distance(norm, i, &clipped[i * d..(i + 1) * d]) as f32)
            .collect();
        Ok(Perturbed {
            clipped: batch.tensor(&clipped, b)?,
            norm: measured,
            iterations: outcome.iterations,
            eps,
        })
    }

    /// The unconstrained points (FAB's; `None` for feasible ones) and the clipped
    /// points of an outcome.
    fn clipped(&self, norm: Norm, points: Points, eps: f64) -> (Option<Vec<f32>>, Vec<f32>) {
        match points {
            Points::Feasible(points) => (None, self.clip(norm, &points, eps)),
            Points::Unconstrained(points) => {
                let clipped = self.clip(norm, &points, eps);
                (Some(points), clipped)
            }
        }
    }

    /// `points` with every example farther than ε from its clean input projected onto
    /// the ε-ball ∩ box (exactly for L1, ball then box otherwise) and stored rounded
    /// towards the clean input; examples within ε are kept bit for bit.
    fn clip(&self, norm: Norm, points: &[f32], eps: f64) -> Vec<f32> {
        let batch = &self.batch;
        let d = batch.d;
        let mut clipped = points.to_vec();
        let mut delta = vec![0f64; d];
        let (mut lower, mut upper) = (vec![0f64; d], vec![0f64; d]);
        for i in 0..batch.len() {
            let row = i * d..(i + 1) * d;
            batch.delta(i, &points[row.clone()], &mut delta);
            if norm.measure(&delta) <= eps {
                continue;
            }
            match norm {
                Norm::L1 { .. } => {
                    batch.box_room(i, &mut lower, &mut upper);
                    project_l1_box(&mut delta, eps, &lower, &upper);
                }
                _ => {
                    norm.project(&mut delta, eps);
                    batch.clamp_box(i, &mut delta);
                }
            }
            batch.store(i, &delta, &mut clipped[row]);
        }
        clipped
    }
}

/// The points an attack returns for one ε, one per example (the clean input where it
/// found nothing better), (B·D) row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub enum Points {
    /// Every point lies in the ε-ball and the bounds (PGD, APGD, Square): they are
    /// the result's `clipped` as they are.
    Feasible(Vec<f32>),
    /// Points of any norm (minimum-norm attacks such as FAB): reported as the
    /// result's `unconstrained`, and projected onto the ε-ball ∩ box for `clipped`.
    Unconstrained(Vec<f32>),
}

/// What an attack finds at one ε, before the shared clipping and judgement of
/// [`crate::Attack::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The point of each example.
    pub points: Points,
    /// Per example: gradient steps (queries for black-box attacks), summed over runs.
    pub iterations: Vec<usize>,
}
