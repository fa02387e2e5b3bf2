//! Adversarial attacks on image classifiers: one projected-gradient engine for the
//! L∞, L2, L1 and L0 threat models, plus FGSM, distal adversarial examples,
//! adversarial frames and expectation over transformation (EOT) for stochastic models;
//! and the AutoAttack-grade evaluation: [`Apgd`] (CE, DLR, targeted DLR), [`Fab`]
//! (FAB-T), [`Square`] (black-box), the [`AutoAttack`] ensemble (standard and `rand`
//! versions, resumable through [`EnsembleState`]) and the trust checks of
//! [`TrustReport`] (see `docs/autoattack.md`).
//!
//! The crate owns the attack loop and nothing else. A model is any
//! [`candle_core::ModuleT`], always called as `forward_t(x, false)`: the attack never
//! changes a train/eval state and never updates a weight (input gradients come from a
//! [`candle_core::Var`] wrapped around the input; the gradient store is dropped).
//! Attacks do not evaluate data sets, compute metrics or write files: they return an
//! [`AttackResult`] per ε and the caller decides what to do with it.
//!
//! # Design
//!
//! * **One PGD engine.** [`Pgd`] is the loop of every PGD-family attack. A [`Norm`]
//!   contributes the three norm-specific pieces (random start, gradient normalisation,
//!   projection onto the ε-ball); every iterate is then projected onto the input
//!   [`Bounds`], a value given with each call. [`Fgsm`], [`Distal`] and [`Frames`] are
//!   configurations of that loop (a single step; a confidence objective around noise;
//!   a border mask). The AutoAttack members [`Apgd`], [`Fab`] and [`Square`] keep the
//!   loops their papers define (step-size schedule with checkpoints, the minimum-norm
//!   projection step, random square search), on the same norms, projections, objectives
//!   and prepared batch.
//! * **Per-example state.** Momentum, step size with backtracking, best-so-far
//!   tracking (the start point included) and restarts are all per example; the result
//!   is the per-example worst case over every evaluated point of every restart.
//! * **Honest success.** A [`Criterion`] decides success from the class probabilities;
//!   the returned points are re-evaluated at the end (averaging `eval_samples` forward
//!   passes for stochastic models, see [`Eot`]), so a reported success is never a
//!   single lucky draw.
//! * **Exact feasibility.** Projections are computed in `f64` and the adversarial input
//!   is rounded *towards* the clean input, so ‖x_adv − x‖_p ≤ ε and x_adv ∈ bounds hold
//!   exactly for the returned `f32` values, not just up to rounding.
//! * **Seeded.** Every attack takes a seed; restart `r` of example `i` draws its start
//!   from ChaCha8 seeded with `seed + r` on stream `i`, so results do not depend on the
//!   batch composition and are reproducible on a deterministic model.
#![warn(missing_docs)]

mod apgd;
mod base;
mod batch;
mod checks;
mod distal;
mod engine;
mod ensemble;
mod eot;
mod error;
mod fab;
mod fgsm;
mod frames;
mod norm;
mod objective;
mod pgd;
mod square;
#[cfg(test)]
mod table_tests;
#[cfg(test)]
mod testutil;

pub use apgd::Apgd;
pub use base::{parse_eps, Attack, AttackResult, Bounds, Criterion};
pub use checks::{check_model, TrustReport, TrustWarning, BLACK_BOX_TOLERANCE};
pub use distal::Distal;
pub use ensemble::{AutoAttack, EnsembleState, Evaluation, EvaluationReport, Stage, StageReport};
pub use eot::Eot;
pub use error::{Error, Result};
pub use fab::Fab;
pub use fgsm::Fgsm;
pub use frames::Frames;
pub use norm::{project_l1_ball, project_l1_box, standard_normal, Init, Norm, L1_TOP_K};
pub use objective::{input_gradient, Objective};
pub use pgd::{Pgd, Restarts, StepSize};
pub use square::Square;
