//! Restarts written once (foolbox's `Repeated`): [`Repeated`] runs an attack's single
//! run ([`SingleRun`]) again from fresh starts, and targeted attacks once per target
//! class, keeping the per-example worst case in a [`Record`]. PGD, APGD, FAB and Square
//! take their restarts from [`repeat`], the loop behind `Repeated`.

use serde::{Deserialize, Serialize};

use crate::base::Attack;
use crate::batch::Best;
use crate::error::{Error, Result};
use crate::norm::Norm;
use crate::problem::{Outcome, Points, Problem};
use crate::Criterion;

/// Rows (example × target copies) a targeted attack runs together.
pub(crate) const MERGED_ROWS: usize = 256;

/// One run of an attack from fresh starts on some rows of a problem: what
/// [`Repeated`] repeats. A run draws the random numbers of row `j` from
/// `problem`'s stream of example `rows.examples()[j]` for run `rows.runs()[j]`, offers
/// every point it evaluates to the [`Record`] and counts its steps there.
pub trait SingleRun {
    /// The record and targets the runs start from (one clean judgement at most).
    fn begin(&self, problem: &Problem<'_>) -> Result<Start>;

    /// One run on `rows` at their budget ([`Rows::eps`]).
    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()>;

    /// Whether a restart attacks only the examples not yet fooled (true unless
    /// overridden; PGD without early stopping goes on raising the objective of fooled
    /// examples).
    fn skips_fooled(&self) -> bool {
        true
    }

    /// Whether the recorded points may lie outside the ε-ball (minimum-norm attacks:
    /// FAB). False unless overridden.
    fn unconstrained(&self) -> bool {
        false
    }
}

/// Where the runs of an attack start: which examples already count as fooled, and for
/// targeted attacks the target classes.
#[derive(Clone, Debug, PartialEq)]
pub struct Start {
    fooled: Vec<bool>,
    /// Per example its classes by decreasing clean logit; pass p targets `ranks[i][p + 1]`.
    ranks: Option<Vec<Vec<u32>>>,
    passes: usize,
}

impl Start {
    /// One pass per restart, no target; `fooled` marks the examples that count as
    /// fooled before any run (all `false` for an attack that judges only its own points).
    pub fn untargeted(fooled: Vec<bool>) -> Start {
        Start {
            fooled,
            ranks: None,
            passes: 1,
        }
    }

    /// `passes` passes per restart, pass p targeting each example's (p + 2)-th most
    /// likely class. `ranks[i]` is example i's classes by decreasing clean logit
    /// (at least `passes + 1` of them).
    pub fn targeted(fooled: Vec<bool>, ranks: Vec<Vec<u32>>, passes: usize) -> Start {
        Start {
            fooled,
            ranks: Some(ranks),
            passes,
        }
    }
}

/// The rows of one run: live examples, copied once per target class of a group of
/// targeted passes that run side by side, with the run's budget ε and seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    idx: Vec<usize>,
    targets: Option<Vec<u32>>,
    runs: Vec<u64>,
    restart: usize,
    passes: usize,
    eps: f64,
    seed: u64,
}

impl Rows {
    /// The group of passes starting at `pass` (of `start.passes`) for the examples
    /// `live`: as many passes as fit in [`MERGED_ROWS`] rows, at least one. Row
    /// (p, i) draws its random start for run p·restarts + restart, the run the
    /// sequential order (one pass per target class) gives it. The run is at budget
    /// `eps`, its random numbers drawn from `seed`.
    fn group(
        live: &[usize],
        start: &Start,
        pass: usize,
        restart: usize,
        restarts: usize,
        eps: f64,
        seed: u64,
    ) -> Rows {
        let group = (MERGED_ROWS / live.len().max(1)).clamp(1, start.passes - pass);
        let n = group * live.len();
        let mut rows = Rows {
            idx: Vec::with_capacity(n),
            targets: start.ranks.as_ref().map(|_| Vec::with_capacity(n)),
            runs: Vec::with_capacity(n),
            restart,
            passes: group,
            eps,
            seed,
        };
        for p in pass..pass + group {
            for &i in live {
                rows.idx.push(i);
                if let (Some(t), Some(ranks)) = (rows.targets.as_mut(), start.ranks.as_ref()) {
                    t.push(ranks[i][p + 1]);
                }
                rows.runs.push((p * restarts + restart) as u64);
            }
        }
        rows
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.idx.len()
    }

    /// Whether there is no row (never for a run [`Repeated`] starts).
    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }

    /// Batch index of each row's example.
    pub fn examples(&self) -> &[usize] {
        &self.idx
    }

    /// Target class of each row (targeted attacks only).
    pub fn targets(&self) -> Option<&[u32]> {
        self.targets.as_deref()
    }

    /// Run number of each row: the offset added to the seed for its random numbers.
    pub fn runs(&self) -> &[u64] {
        &self.runs
    }

    /// The restart (0-based) this run belongs to.
    pub fn restart(&self) -> usize {
        self.restart
    }

    /// The budget ε of the run.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The seed of the attack at this ε; each row adds its run number ([`Rows::runs`]).
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

/// The per-example worst case over every run, and the steps spent. A point offered
/// for an example replaces its best when it is a success and the best is not, or
/// when both agree and its objective is strictly higher (ties keep the earlier
/// point; NaN never wins). Every example starts at its clean input.
pub struct Record {
    pub(crate) best: Best,
    pub(crate) iterations: Vec<usize>,
}

impl Record {
    /// Offers `point` (D values) as example `i`'s result.
    pub fn offer(&mut self, i: usize, point: &[f32], success: bool, objective: f64) {
        self.best.offer(i, point, success, objective);
    }

    /// Makes `point` example `i`'s result, better or not (a run that returns its last
    /// iterate, [`crate::Pgd::last_iterate`]). Its success and objective count as
    /// unknown: such a run is the only one (no restarts, no early stop), so nothing
    /// compares them with another point, and [`crate::Attack::run`] judges the point
    /// afresh.
    pub fn set(&mut self, i: usize, point: &[f32]) {
        self.best.set(i, point, false, f64::NEG_INFINITY);
    }

    /// Whether example `i`'s best point is a success.
    pub fn is_fooled(&self, i: usize) -> bool {
        self.best.success[i]
    }

    /// Counts one step (or query) spent on example `i`.
    pub fn count_step(&mut self, i: usize) {
        self.iterations[i] += 1;
    }
}

/// Any [`SingleRun`] attack with `restarts` runs: foolbox's `Repeated`.
///
/// Restart r runs on the examples not yet fooled (all examples when the attack does
/// not [skip fooled examples](SingleRun::skips_fooled)), drawing example i's random
/// numbers from ChaCha8 seeded with `seed + r` on stream i; a targeted attack runs one
/// pass per target class in each restart (pass p draws for run p·restarts + r), passes
/// side by side where they fit in one batch. The result is the per-example worst case
/// over all runs, so a success is never lost by a later run. The attack's own
/// restart count is replaced by `restarts`; its other settings (e.g. the
/// initialisation of [`crate::Restarts`] for run r) are kept.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Repeated<A> {
    /// The attack repeated.
    pub attack: A,
    /// Runs (≥ 1).
    pub restarts: usize,
}

impl<A: Attack + SingleRun> Attack for Repeated<A> {
    fn norm(&self) -> Norm {
        self.attack.norm()
    }

    fn criterion(&self) -> Criterion {
        self.attack.criterion()
    }

    fn eval_samples(&self) -> usize {
        self.attack.eval_samples()
    }

    fn validate(&self) -> Result<()> {
        if self.restarts == 0 {
            return Err(Error::Config(
                "Repeated needs at least one run (restarts ≥ 1)".into(),
            ));
        }
        self.attack.validate()
    }

    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        self.attack.check(problem)
    }

    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        repeat(&self.attack, self.restarts, problem, eps, seed)
    }
}

/// The loop over restarts and target passes of `attack` at one ε (see [`Repeated`]).
pub(crate) fn repeat<A: SingleRun + ?Sized>(
    attack: &A,
    restarts: usize,
    problem: &Problem<'_>,
    eps: f64,
    seed: u64,
) -> Result<Outcome> {
    let b = problem.len();
    let start = attack.begin(problem)?;
    let mut record = Record {
        best: Best::new(&problem.batch, start.fooled.clone()),
        iterations: vec![0; b],
    };
    let skips = attack.skips_fooled();
    'restarts: for restart in 0..restarts {
        let mut pass = 0;
        while pass < start.passes {
            let live: Vec<usize> = (0..b)
                .filter(|&i| !(skips && record.is_fooled(i)))
                .collect();
            // Successes are never lost: no later pass or restart has work left.
            if live.is_empty() {
                break 'restarts;
            }
            let rows = Rows::group(&live, &start, pass, restart, restarts, eps, seed);
            attack.run_once(problem, &rows, &mut record)?;
            pass += rows.passes;
        }
    }
    let points = if attack.unconstrained() {
        Points::Unconstrained(record.best.adv)
    } else {
        Points::Feasible(record.best.adv)
    };
    Ok(Outcome {
        points,
        iterations: record.iterations,
    })
}

#[cfg(test)]
mod tests;
