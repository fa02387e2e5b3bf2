//! Adversarial attacks on image classifiers: one projected-gradient engine for the
//! L∞, L2, L1 and L0 threat models, plus FGSM, distal adversarial examples,
//! adversarial frames and expectation over transformation (EOT) for stochastic models;
//! and the AutoAttack-grade evaluation: [`Apgd`] (CE, DLR, targeted DLR), [`Fab`]
//! (FAB-T), [`Square`] (black-box), the [`AutoAttack`] ensemble (standard and `rand`
//! versions, resumable through [`EnsembleState`]) and the trust checks of
//! [`TrustReport`] (see `docs/autoattack.md`).
//!
//! The crate owns the attacks and nothing else. A model is any
//! [`candle_core::ModuleT`], always called as `forward_t(x, false)`: the attack never
//! changes a train/eval state and never updates a weight (input gradients come from a
//! [`candle_core::Var`] wrapped around the input; the gradient store is dropped).
//! Attacks do not evaluate data sets, compute metrics or write files: they return an
//! [`AttackResult`] per ε and the caller decides what to do with it.
//!
//! # Design
//!
//! * **One attack contract.** Like foolbox's `FixedEpsilonAttack`, an attack
//!   implements [`Attack::attack_eps`], the work of *one* ε on a prepared [`Problem`],
//!   returning one point per example ([`Outcome`]), and names its [`Norm`],
//!   [`Criterion`] and EOT judgement samples. The provided [`Attack::run`] is written
//!   once for all of them: it validates the configuration, the bounds and every ε,
//!   checks inputs, labels and model output, loops over ε, projects any point outside
//!   the ε-ball onto the ε-ball ∩ box (FAB's minimum-norm points, see [`Points`]) and
//!   judges the points on fresh forward passes. Only the [`AutoAttack`] ensemble,
//!   which judges stage by stage and resumes from a saved state, overrides `run`.
//! * **One restarts loop.** [`Repeated`] (foolbox's `Repeated`) runs any
//!   [`SingleRun`] attack from fresh starts: restart r attacks only the examples not
//!   yet fooled, a targeted attack runs one pass per target class (passes side by
//!   side in one batch where they fit), and the per-example worst case over every
//!   run is kept in a [`Record`] (a success beats a non-success, then a higher
//!   objective wins), so a later run never loses a success. [`Pgd`], [`Apgd`],
//!   [`Fab`] and [`Square`] take their restarts from that loop.
//! * **One PGD loop.** [`Pgd`] is the single run of every PGD-family attack. A
//!   [`Norm`] contributes the three norm-specific pieces (random start, gradient
//!   normalisation, projection onto the ε-ball); every iterate is then projected onto
//!   the input [`Bounds`], a value given with each call. [`Fgsm`], [`Distal`] and
//!   [`Frames`] are configurations of that loop (a single step; a confidence
//!   objective around noise; a border mask). The AutoAttack members [`Apgd`], [`Fab`]
//!   and [`Square`] keep the single runs their papers define (step-size schedule with
//!   checkpoints, the minimum-norm projection step, random square search), on the
//!   same norms, projections, objectives, restarts and prepared problem.
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
//! * **Seeded.** Every attack takes a seed; run `r` of example `i` draws its random
//!   numbers from ChaCha8 seeded with `seed + r` on stream `i` (run r = pass·restarts +
//!   restart for targeted passes), so results do not depend on the batch composition
//!   and are reproducible on a deterministic model.
#![warn(missing_docs)]

mod apgd;
mod base;
mod batch;
mod checks;
mod cost;
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
mod problem;
#[cfg(test)]
mod prop_tests;
mod repeated;
mod square;
#[cfg(test)]
mod table_tests;
#[cfg(test)]
mod testutil;

pub use apgd::{device_resident_apgd_runs, Apgd};
pub use base::{parse_eps, Attack, AttackResult, Bounds, Criterion, Faults, Perturbed, Unchecked};
pub use checks::{check_model, check_model_cost, TrustReport, TrustWarning, BLACK_BOX_TOLERANCE};
pub use cost::{EnsembleCost, PassCounter, Passes};
pub use distal::Distal;
#[cfg(feature = "cuda")]
pub use engine::device_kernels_ptx;
#[cfg(feature = "cuda")]
pub use engine::graph::cuda::Stream as CudaGraphRecorder;
pub use engine::graph::Recorder as GraphRecorder;
pub use engine::{
    cuda_graph_failure, cuda_graph_steps, device_resident_pgd_runs, with_cuda_graphs,
    with_device_resident_pgd, with_seed_on_device,
};
pub use ensemble::{AutoAttack, EnsembleState, Evaluation, EvaluationReport, Stage, StageReport};
pub use eot::Eot;
pub use error::{Error, Result};
pub use fab::Fab;
pub use fgsm::Fgsm;
pub use frames::Frames;
pub use norm::{project_l1_ball, project_l1_box, standard_normal, Init, Norm, L1_TOP_K};
pub use objective::{input_gradient, Objective};
pub use pgd::{Pgd, Restarts, StepSize};
pub use problem::{Outcome, Points, Problem};
pub use repeated::{Record, Repeated, Rows, SingleRun, Start};
pub use square::Square;
