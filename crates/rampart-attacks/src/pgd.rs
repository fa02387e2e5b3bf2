//! Projected gradient descent (ascent on the objective): the configuration of the PGD
//! loop shared by FGSM, distal examples and frames, and the named settings of the
//! literature.

use serde::{Deserialize, Serialize};

use crate::base::{Attack, Criterion};
use crate::engine::Engine;
use crate::eot::Eot;
use crate::error::{Error, Result};
use crate::norm::{Init, Norm};
use crate::objective::Objective;
use crate::problem::{Outcome, Problem};
use crate::repeated::{Record, Rows, SingleRun, Start};

/// Step size of a gradient step (the multiplier of the normalised, momentum-averaged
/// gradient).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum StepSize {
    /// A fixed step, whatever ε.
    Absolute(f64),
    /// A fraction of ε (e.g. 0.25 is 2/255 at ε = 8/255); scales with the budget when
    /// one attack is run at several ε.
    Relative(f64),
}

impl StepSize {
    /// The step used at budget `eps`.
    pub fn at(&self, eps: f64) -> f64 {
        match *self {
            StepSize::Absolute(a) => a,
            StepSize::Relative(r) => r * eps,
        }
    }

    fn value(&self) -> f64 {
        match *self {
            StepSize::Absolute(v) | StepSize::Relative(v) => v,
        }
    }
}

/// Restarts ("attempts"): `count` runs of the loop from fresh starts; the first uses
/// `first`, the others `rest`. The per-example worst case over all of them is kept
/// (the runs are [`crate::Repeated`]'s: `Repeated { attack: pgd, restarts: n }` runs
/// `n` times with these initialisations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarts {
    /// Number of runs (≥ 1).
    pub count: usize,
    /// Initialisation of the first run.
    pub first: Init,
    /// Initialisation of the other runs.
    pub rest: Init,
}

impl Restarts {
    /// `count` runs, all initialised with `init`.
    pub fn same(count: usize, init: Init) -> Restarts {
        Restarts {
            count,
            first: init,
            rest: init,
        }
    }

    /// The initialisation of run `r` (0-based).
    pub fn init(&self, r: usize) -> Init {
        if r == 0 {
            self.first
        } else {
            self.rest
        }
    }
}

/// PGD with per-example momentum, backtracking, best-so-far tracking and restarts
/// (the variant of Stutz et al., ICML 2020). See the crate documentation and
/// `docs/attacks.md` for the loop.
///
/// Each gradient step, per example: g ← ∇_x objective (mean over EOT draws); entries
/// that would push a coordinate already at a bound further out are zeroed; g is
/// normalised by the [`Norm`]; ĝ ← β·ĝ + (1 − β)·g (ĝ starts at 0; β = 0 gives ĝ = g);
/// the candidate x + δ + lr·ĝ is projected onto the bounds, the ε-ball and the bounds
/// again. With backtracking the candidate replaces the iterate only if the objective did
/// not decrease, otherwise that example's lr is divided by the factor. Every evaluated
/// point (start included) competes for the returned worst case: a success beats a
/// non-success, then a higher objective wins.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pgd {
    /// Threat model.
    pub norm: Norm,
    /// Objective to maximise.
    pub objective: Objective,
    /// When an example counts as fooled.
    pub criterion: Criterion,
    /// Gradient steps per restart (≥ 1).
    pub steps: usize,
    /// Initial step size.
    pub step_size: StepSize,
    /// Momentum β in [0, 1).
    pub momentum: f64,
    /// Backtracking: the factor (> 1) a step size is divided by when a step would lower
    /// the objective; `None` takes every step.
    pub backtrack: Option<f64>,
    /// Restarts and their initialisations.
    pub restarts: Restarts,
    /// Stop attacking an example once it is fooled (also skips it in later restarts).
    /// Faster, but the returned point is then the first success, not the most confident
    /// one; refused with the `conf` and `distal` objectives, whose point is confidence.
    pub early_stop: bool,
    /// Forward passes averaged for stochastic models.
    pub eot: Eot,
    /// Return each example's last iterate instead of the best evaluated point, as the
    /// training code of Madry et al. (PGD-AT) and Wong et al. (fast AT) does; for
    /// training attacks only (an evaluation wants the worst case). Needs one run and
    /// no early stopping. Without backtracking, the last step's point is not
    /// evaluated (nothing compares it with another): one forward pass per image
    /// fewer. Off unless set (and in configurations written before it existed).
    #[serde(default)]
    pub last_iterate: bool,
}

impl Pgd {
    /// Madry et al. (ICLR 2018), CIFAR-10 training attack: L∞, ε = 8/255, 7 steps of
    /// 2/255, cross-entropy, uniform random start, one run.
    pub fn madry_linf_cifar10() -> Pgd {
        Pgd {
            norm: Norm::Linf,
            objective: Objective::CrossEntropy,
            criterion: Criterion::Misclassified,
            steps: 7,
            step_size: StepSize::Absolute(2.0 / 255.0),
            momentum: 0.0,
            backtrack: None,
            restarts: Restarts::same(1, Init::Uniform),
            early_stop: false,
            eot: Eot::OFF,
            last_iterate: false,
        }
    }

    /// PGD-10 at ε = 8/255, step 2/255 (the training attack of Rice et al. 2020 and
    /// most later L∞ adversarial training), otherwise as [`Pgd::madry_linf_cifar10`].
    pub fn linf_pgd10() -> Pgd {
        Pgd {
            steps: 10,
            ..Pgd::madry_linf_cifar10()
        }
    }

    /// PGD-20 at ε = 8/255, step 2/255: the evaluation attack of Madry et al. (2018),
    /// CIFAR-10.
    pub fn linf_pgd20() -> Pgd {
        Pgd {
            steps: 20,
            ..Pgd::madry_linf_cifar10()
        }
    }

    /// CCAT evaluation with the conf objective (Stutz, Hein & Schiele, ICML 2020):
    /// L∞ (ε = 0.03 in the paper), max_{k≠y} p_k, 1000 steps of 0.001, momentum 0.9,
    /// backtracking 1.1, 11 runs: one zero initialisation and ten uniform-norm starts.
    pub fn ccat_conf_eval() -> Pgd {
        Pgd {
            norm: Norm::Linf,
            objective: Objective::Conf,
            criterion: Criterion::Misclassified,
            steps: 1000,
            step_size: StepSize::Absolute(0.001),
            momentum: 0.9,
            backtrack: Some(1.1),
            restarts: Restarts {
                count: 11,
                first: Init::Zero,
                rest: Init::UniformNorm,
            },
            early_stop: false,
            eot: Eot::OFF,
            last_iterate: false,
        }
    }

    /// CCAT evaluation with cross-entropy: L∞ (ε = 0.03), 200 steps of 0.005, 50
    /// uniform-norm restarts, momentum 0.9 and no backtracking (momentum and
    /// initialisation as in the official code's CE evaluation).
    pub fn ccat_ce_eval() -> Pgd {
        Pgd {
            norm: Norm::Linf,
            objective: Objective::CrossEntropy,
            criterion: Criterion::Misclassified,
            steps: 200,
            step_size: StepSize::Absolute(0.005),
            momentum: 0.9,
            backtrack: None,
            restarts: Restarts::same(50, Init::UniformNorm),
            early_stop: false,
            eot: Eot::OFF,
            last_iterate: false,
        }
    }

    /// CCAT training attack: L∞ ε = 0.03, conf objective, 40 steps of 0.005, momentum
    /// 0.9, backtracking 1.5, one uniform-norm random start.
    pub fn ccat_train() -> Pgd {
        Pgd {
            norm: Norm::Linf,
            objective: Objective::Conf,
            criterion: Criterion::Misclassified,
            steps: 40,
            step_size: StepSize::Absolute(0.005),
            momentum: 0.9,
            backtrack: Some(1.5),
            restarts: Restarts::same(1, Init::UniformNorm),
            early_stop: false,
            eot: Eot::OFF,
            last_iterate: false,
        }
    }

    /// Refuses an inconsistent configuration (before any forward pass).
    pub fn validate(&self) -> Result<()> {
        let refuse = |msg: String| Err(Error::Config(msg));
        self.norm.validate()?;
        self.criterion.validate()?;
        self.eot.validate()?;
        if self.steps == 0 {
            return refuse("PGD needs at least one step".into());
        }
        let step = self.step_size.value();
        if !(step.is_finite() && step > 0.0) {
            return refuse(format!("step size must be finite and positive, got {step}"));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return refuse(format!(
                "momentum must lie in [0, 1), got {}",
                self.momentum
            ));
        }
        if let Some(f) = self.backtrack {
            if !(f.is_finite() && f > 1.0) {
                return refuse(format!(
                    "backtracking factor must be finite and > 1, got {f}"
                ));
            }
        }
        if self.restarts.count == 0 {
            return refuse("at least one run (restarts.count ≥ 1) is needed".into());
        }
        if self.last_iterate && self.restarts.count > 1 {
            return refuse(format!(
                "the last iterate is one run's; {} restarts have several (use one run)",
                self.restarts.count
            ));
        }
        if self.last_iterate && self.early_stop {
            return refuse(
                "early stopping returns the first success, not the last iterate; use one \
                 or the other"
                    .into(),
            );
        }
        if self.early_stop && matches!(self.objective, Objective::Conf | Objective::Distal) {
            return refuse(format!(
                "early stopping is refused with the `{}` objective: it would return the \
                 first, least confident success",
                self.objective
            ));
        }
        if self.objective.is_targeted() && self.criterion.target().is_none() {
            return refuse(format!(
                "objective `{}` is targeted and needs Criterion::Targeted",
                self.objective
            ));
        }
        Ok(())
    }
}

impl Attack for Pgd {
    fn norm(&self) -> Norm {
        self.norm
    }

    fn criterion(&self) -> Criterion {
        self.criterion
    }

    fn eval_samples(&self) -> usize {
        self.eot.eval_samples
    }

    fn validate(&self) -> Result<()> {
        Pgd::validate(self)
    }

    /// Refuses too few classes for the objective and a target class out of range.
    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        self.engine().check(problem)
    }

    /// PGD's device-resident loop takes it where it applies (an L∞ configuration,
    /// f32 inputs): the batch checked there, its starts made there, nothing read before
    /// the result but a few values per example, or nothing with
    /// [`Attack::perturb_unchecked`] (the same points and errors, bit for bit).
    fn resident_pgd(&self) -> Option<Pgd> {
        Some(*self)
    }

    /// `restarts.count` runs of the loop ([`crate::Repeated`]'s restarts).
    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        self.engine().attack_eps(problem, eps, seed)
    }
}

impl SingleRun for Pgd {
    fn begin(&self, problem: &Problem<'_>) -> Result<Start> {
        self.engine().begin(problem)
    }

    /// One run of the loop, started with `restarts.init(rows.restart())`.
    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
        self.engine().run_once(problem, rows, record)
    }

    /// Only with early stopping.
    fn skips_fooled(&self) -> bool {
        self.early_stop
    }
}

impl Pgd {
    fn engine(&self) -> Engine<'_> {
        Engine {
            cfg: self,
            mask: None,
        }
    }
}
