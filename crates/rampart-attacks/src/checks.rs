//! Trust checks: signs that an evaluation under-estimates the attacker (gradient
//! masking, randomness without EOT, probabilities in place of logits, a black-box
//! attack beating the white-box ones). Each check is a number in the [`TrustReport`];
//! a check that fails also adds a [`TrustWarning`]. The checks never change a result.

use std::fmt;

use candle_core::{ModuleT, Tensor};
use serde::{Deserialize, Serialize};

use crate::base::{argmax, Bounds};
use crate::batch::{Batch, Loss};
use crate::eot::Eot;
use crate::error::Result;
use crate::objective::Objective;

/// Forward passes compared by the randomness check.
pub const RANDOMNESS_PASSES: usize = 3;
/// Largest change of an L2-normalised output row between identical forward passes
/// that still counts as deterministic (AutoAttack's threshold).
pub const OUTPUT_CHANGE_TOLERANCE: f64 = 1e-4;
/// Tolerance of the softmax check: outputs in [−τ, 1 + τ] whose rows sum to 1 ± τ.
pub const SOFTMAX_TOLERANCE: f64 = 1e-5;
/// Share of all points a black-box attack may fool after the white-box attacks failed
/// before it is reported (AutoAttack's threshold, 0.2 %).
pub const BLACK_BOX_TOLERANCE: f64 = 0.002;

/// The outcome of the trust checks of one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrustReport {
    /// Points checked.
    pub points: usize,
    /// Share of points whose cross-entropy input gradient is exactly zero.
    pub zero_gradient_ce: f64,
    /// Share of points whose margin (max_{k≠y} f_k − f_y) input gradient is exactly
    /// zero. Unlike cross-entropy it cannot vanish through a saturated softmax: a zero
    /// here means the logits do not depend on the input locally.
    pub zero_gradient_margin: f64,
    /// Share of points with a NaN entry in either input gradient.
    pub nan_gradient: f64,
    /// Share of points with an infinite entry in either input gradient.
    pub infinite_gradient: f64,
    /// Largest L2 distance between the L2-normalised output rows of
    /// [`RANDOMNESS_PASSES`] identical forward passes (0 for a deterministic model).
    pub output_change: f64,
    /// Points whose predicted class changed between those passes.
    pub prediction_changes: usize,
    /// Whether the evaluation averages several forward passes (EOT).
    pub eot_in_use: bool,
    /// The outputs look like probabilities: every value in [0, 1] and rows summing to 1.
    pub softmax_outputs: bool,
    /// Points fooled only by a black-box attack after every white-box attack failed
    /// (`None` when no black-box attack ran).
    pub black_box_only: Option<usize>,
    /// The checks that failed, with what they mean.
    pub warnings: Vec<TrustWarning>,
}

/// A failed trust check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TrustWarning {
    /// Points whose input gradient is exactly zero.
    ZeroGradients {
        /// `ce` or `margin`.
        objective: String,
        /// Share of points.
        share: f64,
    },
    /// Points with NaN input gradients.
    NanGradients {
        /// Share of points.
        share: f64,
    },
    /// Points with infinite input gradients.
    InfiniteGradients {
        /// Share of points.
        share: f64,
    },
    /// The model's output changes between identical forward passes and no EOT is used.
    RandomOutputs {
        /// Largest change of a normalised output row.
        max_change: f64,
        /// Points whose prediction changed.
        prediction_changes: usize,
    },
    /// The model seems to return probabilities where logits are expected.
    SoftmaxOutputs,
    /// A black-box attack fooled points on which every white-box attack failed.
    BlackBoxBeatsWhiteBox {
        /// Points fooled only by the black-box attack.
        points: usize,
        /// Their share of all points.
        share: f64,
    },
}

impl fmt::Display for TrustWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustWarning::ZeroGradients { objective, share } => write!(
                f,
                "{:.1} % of the points have an exactly zero {objective} input gradient: \
                 gradient-based attacks cannot move them (gradient masking?)",
                100.0 * share
            ),
            TrustWarning::NanGradients { share } => write!(
                f,
                "{:.1} % of the points have NaN input gradients: gradient-based attacks \
                 are blind there",
                100.0 * share
            ),
            TrustWarning::InfiniteGradients { share } => write!(
                f,
                "{:.1} % of the points have infinite input gradients: gradient-based \
                 attacks are unreliable there",
                100.0 * share
            ),
            TrustWarning::RandomOutputs {
                max_change,
                prediction_changes,
            } => write!(
                f,
                "the model's output changes between identical forward passes (change \
                 {max_change:.2e}, {prediction_changes} predictions changed) and no EOT is \
                 used: evaluate a randomised model with the `rand` version"
            ),
            TrustWarning::SoftmaxOutputs => write!(
                f,
                "the model's outputs are non-negative and sum to 1: pass logits, not \
                 probabilities (losses on probabilities have vanishing gradients)"
            ),
            TrustWarning::BlackBoxBeatsWhiteBox { points, share } => write!(
                f,
                "the black-box attack fooled {points} points ({:.1} %) on which every \
                 white-box attack failed: the gradients mislead the white-box attacks",
                100.0 * share
            ),
        }
    }
}

impl TrustReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.warnings.is_empty()
    }

    /// Records that a black-box attack fooled `points` points the white-box attacks had
    /// failed on; warns when they are more than [`BLACK_BOX_TOLERANCE`] of all points.
    pub fn record_black_box(&mut self, points: usize) {
        self.warnings
            .retain(|w| !matches!(w, TrustWarning::BlackBoxBeatsWhiteBox { .. }));
        self.black_box_only = Some(points);
        let share = points as f64 / self.points.max(1) as f64;
        if share > BLACK_BOX_TOLERANCE {
            self.warnings
                .push(TrustWarning::BlackBoxBeatsWhiteBox { points, share });
        }
    }
}

/// What [`check_model`] costs per image: the input gradients of cross-entropy and
/// the C&W margin, and the repeated forward passes of the randomness check.
pub fn check_model_cost() -> crate::Passes {
    crate::Passes {
        gradient: 2.0,
        forward: RANDOMNESS_PASSES as f64,
    }
}

/// Runs the checks that need only the model and the clean batch: input gradients of
/// cross-entropy and of the margin at every point (zero, NaN, infinite),
/// [`RANDOMNESS_PASSES`] identical forward passes (randomness matters only when
/// `eot` averages a single pass) and the softmax test.
///
/// xs: (B, ...) in `bounds`; ys: (B,) labels. The model is called as
/// `forward_t(x, false)`; its weights are untouched.
pub fn check_model(
    model: &dyn ModuleT,
    bounds: Bounds,
    xs: &Tensor,
    ys: &Tensor,
    eot: Eot,
) -> Result<TrustReport> {
    eot.validate()?;
    let batch = Batch::new(model, bounds, xs, ys)?;
    check_batch(model, &batch, eot.grad_samples > 1 || eot.eval_samples > 1)
}

pub(crate) fn check_batch(
    model: &dyn ModuleT,
    batch: &Batch,
    eot_in_use: bool,
) -> Result<TrustReport> {
    let (b, d, k) = (batch.len(), batch.d, batch.classes);
    let all: Vec<usize> = (0..b).collect();
    let mut zero = [0usize; 2];
    let mut nan = vec![false; b];
    let mut inf = vec![false; b];
    for (o, objective) in [Objective::CrossEntropy, Objective::CwMargin]
        .into_iter()
        .enumerate()
    {
        let p = batch.probe(
            model,
            &all,
            &batch.x,
            Loss::Objective(objective, None),
            1,
            true,
        )?;
        for i in 0..b {
            let g = &p.grad[i * d..(i + 1) * d];
            if g.iter().all(|v| *v == 0.0) {
                zero[o] += 1;
            }
            nan[i] |= g.iter().any(|v| v.is_nan());
            inf[i] |= g.iter().any(|v| v.is_infinite());
        }
    }
    let share = |n: usize| n as f64 / b as f64;
    let mut passes = Vec::with_capacity(RANDOMNESS_PASSES);
    for _ in 0..RANDOMNESS_PASSES {
        passes.push(batch.forward(model, &batch.x, b, 1)?.0);
    }
    let mut output_change = 0f64;
    let mut prediction_changes = 0;
    for i in 0..b {
        let row = |p: &Vec<f32>| -> Vec<f64> {
            let r: Vec<f64> = p[i * k..(i + 1) * k].iter().map(|v| *v as f64).collect();
            let n = r.iter().map(|v| v * v).sum::<f64>().sqrt() + 1e-10;
            r.into_iter().map(|v| v / n).collect()
        };
        let first = row(&passes[0]);
        let pred = argmax(&passes[0][i * k..(i + 1) * k]).0;
        let mut changed = false;
        for p in &passes[1..] {
            let other = row(p);
            let dist = first
                .iter()
                .zip(&other)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            output_change = output_change.max(dist);
            changed |= argmax(&p[i * k..(i + 1) * k]).0 != pred;
        }
        prediction_changes += changed as usize;
    }
    let tol = SOFTMAX_TOLERANCE;
    let softmax_outputs = passes[0]
        .iter()
        .all(|v| (*v as f64) >= -tol && (*v as f64) <= 1.0 + tol)
        && passes[0]
            .chunks(k)
            .all(|r| (r.iter().map(|v| *v as f64).sum::<f64>() - 1.0).abs() < tol);
    let mut report = TrustReport {
        points: b,
        zero_gradient_ce: share(zero[0]),
        zero_gradient_margin: share(zero[1]),
        nan_gradient: share(count(&nan)),
        infinite_gradient: share(count(&inf)),
        output_change,
        prediction_changes,
        eot_in_use,
        softmax_outputs,
        black_box_only: None,
        warnings: Vec::new(),
    };
    for (objective, s) in [
        ("ce", report.zero_gradient_ce),
        ("margin", report.zero_gradient_margin),
    ] {
        if s > 0.0 {
            report.warnings.push(TrustWarning::ZeroGradients {
                objective: objective.into(),
                share: s,
            });
        }
    }
    if report.nan_gradient > 0.0 {
        report.warnings.push(TrustWarning::NanGradients {
            share: report.nan_gradient,
        });
    }
    if report.infinite_gradient > 0.0 {
        report.warnings.push(TrustWarning::InfiniteGradients {
            share: report.infinite_gradient,
        });
    }
    if (output_change > OUTPUT_CHANGE_TOLERANCE || prediction_changes > 0) && !eot_in_use {
        report.warnings.push(TrustWarning::RandomOutputs {
            max_change: output_change,
            prediction_changes,
        });
    }
    if softmax_outputs {
        report.warnings.push(TrustWarning::SoftmaxOutputs);
    }
    Ok(report)
}

fn count(flags: &[bool]) -> usize {
    flags.iter().filter(|f| **f).count()
}

#[cfg(test)]
mod tests;
