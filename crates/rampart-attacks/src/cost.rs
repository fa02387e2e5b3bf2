//! What an attack costs, counted in network passes per attacked image, so that a run's
//! time can be estimated from measured step times before it starts (`rampart train
//! --dry-run`, `rampart eval --dry-run`, `cargo xtask reproduce --estimate`).
//!
//! A *gradient pass* is one forward and backward pass to the input of one image (an
//! attack step; `rampart bench`'s `pgd-step` per image), a *forward pass* one
//! forward pass of one image in eval mode (`forward`). Every example is counted as
//! running every step of every run, so the counts are upper bounds (early stopping,
//! AutoAttack's skipping of the points an earlier stage broke, FAB's and Square's
//! stopping at success only make a run cheaper); the host work between passes is not
//! counted. Tested against the passes a model actually sees.

use std::ops::{Add, AddAssign, Mul};

use serde::{Deserialize, Serialize};

use crate::{Apgd, AutoAttack, Fab, Frames, Pgd, Square, Stage};

/// Network passes per image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Passes {
    /// Forward + backward passes to the input (attack steps).
    pub gradient: f64,
    /// Forward passes in eval mode (judgements, queries, clean predictions).
    pub forward: f64,
}

impl Passes {
    /// No work.
    pub const NONE: Passes = Passes {
        gradient: 0.0,
        forward: 0.0,
    };

    /// `n` forward passes.
    pub fn forward(n: f64) -> Passes {
        Passes {
            gradient: 0.0,
            forward: n,
        }
    }
}

impl Add for Passes {
    type Output = Passes;
    fn add(self, o: Passes) -> Passes {
        Passes {
            gradient: self.gradient + o.gradient,
            forward: self.forward + o.forward,
        }
    }
}

impl AddAssign for Passes {
    fn add_assign(&mut self, o: Passes) {
        *self = *self + o;
    }
}

impl Mul<f64> for Passes {
    type Output = Passes;
    fn mul(self, k: f64) -> Passes {
        Passes {
            gradient: self.gradient * k,
            forward: self.forward * k,
        }
    }
}

impl Pgd {
    /// Per image: every restart evaluates its start and each step's point, with the
    /// gradient at all but the last, each averaged over the EOT gradient draws (a
    /// last-iterate run without backtracking skips the last point); then the final
    /// judgement over the EOT evaluation draws.
    pub fn cost(&self) -> Passes {
        self.perturb_cost() + Passes::forward(self.eot.eval_samples.max(1) as f64)
    }
    /// The cost of [`crate::Attack::perturb`]: [`Pgd::cost`] without the final
    /// judgement's forward passes (what an adversarial training step pays).
    pub fn perturb_cost(&self) -> Passes {
        let runs = self.restarts.count.max(1) as f64;
        let draws = self.eot.grad_samples.max(1) as f64;
        let last_point = if self.last_iterate && self.backtrack.is_none() {
            0.0
        } else {
            1.0
        };
        Passes {
            gradient: runs * self.steps as f64 * draws,
            forward: runs * draws * last_point,
        }
    }
}

impl Frames {
    /// Its PGD loop's.
    pub fn cost(&self) -> Passes {
        self.pgd.cost()
    }
}

impl Apgd {
    /// Per image: one run per restart and target class (untargeted: one per restart),
    /// a gradient at each step averaged over the EOT draws, a judgement per run and of
    /// the clean and the final points.
    pub fn cost(&self) -> Passes {
        let targets = if self.objective.is_targeted() {
            self.target_classes.max(1)
        } else {
            1
        };
        let runs = (self.restarts.max(1) * targets) as f64;
        let draws = self.eot.grad_samples.max(1) as f64;
        Passes {
            gradient: runs * self.steps as f64 * draws,
            // A judgement per run, and of the clean and the final points.
            forward: (runs + 2.0) * self.eot.eval_samples.max(1) as f64,
        }
    }
}

impl Fab {
    /// Per image: one run per restart and target class, each step at most two
    /// linearisations with the gradient of the target's logit difference (the point's
    /// own, and the projected point's unless it crossed the boundary) and a forward
    /// pass (a crossed point's check).
    pub fn cost(&self) -> Passes {
        let runs = (self.restarts.max(1) * self.target_classes.max(1)) as f64;
        Passes {
            gradient: 2.0 * runs * self.steps as f64,
            forward: runs * (self.steps as f64 + 1.0),
        }
    }
}

impl Square {
    /// Per image: every query is a forward pass, in every restart (plus its start),
    /// and the clean and final judgements.
    pub fn cost(&self) -> Passes {
        Passes::forward((self.restarts.max(1) * (self.queries + 1) + 2) as f64)
    }
}

impl Stage {
    /// The stage's attack's.
    pub fn cost(&self) -> Passes {
        match self {
            Stage::Apgd(a) => a.cost(),
            Stage::Fab(f) => f.cost(),
            Stage::Square(s) => s.cost(),
        }
    }
}

/// What an AutoAttack ensemble costs per image, by the images each part runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EnsembleCost {
    /// On every image: the clean judgement.
    pub every: Passes,
    /// On the correctly classified images: the first stage.
    pub correct: Passes,
    /// On the images every earlier stage left robust: the later stages.
    pub robust: Passes,
}

impl EnsembleCost {
    /// Every part on every image: the upper bound.
    pub fn total(&self) -> Passes {
        self.every + self.correct + self.robust
    }
}

impl AutoAttack {
    /// Every stage on every image (the upper bound: the ensemble runs a stage only on
    /// the points the earlier ones left robust), plus the clean judgement.
    pub fn cost(&self) -> Passes {
        self.cost_by_images().total()
    }

    /// The cost split by the images each part runs on: the clean judgement on every
    /// image, the first stage on the correctly classified ones, the later stages on
    /// those still robust.
    pub fn cost_by_images(&self) -> EnsembleCost {
        let mut stages = self.stages.iter().map(Stage::cost);
        EnsembleCost {
            every: Passes::forward(self.eot.eval_samples.max(1) as f64),
            correct: stages.next().unwrap_or_default(),
            robust: stages.fold(Passes::NONE, |sum, s| sum + s),
        }
    }
}

/// A model that counts the images it is given, as forward passes or (when the input
/// tracks a gradient) gradient passes: what an attack or evaluation makes a model do,
/// to check a [`Passes`] count against.
pub struct PassCounter<'a> {
    model: &'a dyn candle_core::Module,
    seen: std::sync::Mutex<Passes>,
}

impl<'a> PassCounter<'a> {
    /// Counts what passes through `model`.
    pub fn new(model: &'a dyn candle_core::Module) -> Self {
        Self {
            model,
            seen: std::sync::Mutex::new(Passes::NONE),
        }
    }

    /// The passes counted so far.
    pub fn passes(&self) -> Passes {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl candle_core::Module for PassCounter<'_> {
    fn forward(&self, xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        let n = xs.dim(0)? as f64;
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if xs.track_op() || xs.is_variable() {
                seen.gradient += n;
            } else {
                seen.forward += n;
            }
        }
        self.model.forward(xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Eot, Norm};

    #[test]
    fn pgd_counts_steps_restarts_and_eot_draws() {
        let pgd = Pgd::linf_pgd20();
        assert_eq!(pgd.restarts.count, 1);
        assert_eq!(
            pgd.cost(),
            Passes {
                gradient: 20.0,
                forward: 2.0
            }
        );
        let eot = Pgd {
            restarts: crate::Restarts::same(10, crate::Init::Uniform),
            eot: Eot::new(3, 5).unwrap(),
            ..pgd
        };
        // 10 runs × 20 steps × 3 draws; 10 × 3 start evaluations + 5 judgements.
        assert_eq!(
            eot.cost(),
            Passes {
                gradient: 600.0,
                forward: 35.0
            }
        );
    }

    /// `perturb` returns `run`'s points, distances and steps bit for bit, and saves
    /// exactly the judgement: the model sees `perturb_cost` passes per image (plus
    /// the single-row probe), one forward pass per image (per evaluation draw) fewer
    /// than `run`.
    #[test]
    fn perturb_returns_the_points_of_run_without_the_judgement() -> crate::Result<()> {
        use crate::{Attack, Bounds, Fgsm, Init, Restarts};
        let t = crate::testutil::trained();
        let b = t.xs.dim(0)? as f64;
        let bounds = Bounds::new(0.0, 1.0)?;
        let pgd = Pgd {
            steps: 3,
            restarts: Restarts::same(2, Init::Uniform),
            momentum: 0.5,
            backtrack: Some(1.5),
            ..Pgd::linf_pgd20()
        };
        for (name, pgd) in [
            ("pgd", pgd),
            ("fast-at fgsm", Fgsm::fast_at().as_pgd()),
            (
                "fast-at fgsm, last iterate",
                Fgsm {
                    last_iterate: true,
                    ..Fgsm::fast_at()
                }
                .as_pgd(),
            ),
            (
                "pgd, last iterate",
                Pgd {
                    restarts: Restarts::same(1, Init::Uniform),
                    backtrack: None,
                    last_iterate: true,
                    ..pgd
                },
            ),
            (
                "backtracking pgd, last iterate",
                Pgd {
                    restarts: Restarts::same(1, Init::Uniform),
                    last_iterate: true,
                    ..pgd
                },
            ),
            (
                "eot",
                Pgd {
                    eot: Eot::new(2, 3)?,
                    ..pgd
                },
            ),
            (
                "l2",
                Pgd {
                    norm: Norm::L2,
                    ..pgd
                },
            ),
        ] {
            let eps = if pgd.norm == Norm::L2 {
                0.5
            } else {
                8.0 / 255.0
            };
            let run = PassCounter::new(&t.model);
            let judged = pgd.run(&run, bounds, &t.xs, &t.ys, &[eps], 3)?.remove(0);
            let perturbing = PassCounter::new(&t.model);
            let points = pgd.perturb(&perturbing, bounds, &t.xs, &t.ys, eps, 3)?;
            let flat = |x: &candle_core::Tensor| -> crate::Result<Vec<f32>> {
                Ok(x.flatten_all()?.to_vec1::<f32>()?)
            };
            assert_eq!(flat(&points.clipped)?, flat(&judged.clipped)?, "{name}");
            assert_eq!(points.norm, judged.norm, "{name}");
            assert_eq!(points.iterations, judged.iterations, "{name}");
            assert_eq!(points.eps, eps);
            let (seen, judged_seen) = (perturbing.passes(), run.passes());
            let want = pgd.perturb_cost() * b;
            assert_eq!(seen.gradient, want.gradient, "{name}");
            assert!(
                (0.0..=1.0).contains(&(seen.forward - want.forward)),
                "{name}: {seen:?} against {want:?}"
            );
            assert_eq!(
                judged_seen.forward - seen.forward,
                pgd.eot.eval_samples.max(1) as f64 * b,
                "{name}: the judgement's passes"
            );
            assert_eq!(
                pgd.cost().forward - pgd.perturb_cost().forward,
                pgd.eot.eval_samples.max(1) as f64
            );
            // Given the classes, the same points without the one-image pass that
            // learns them.
            let known = PassCounter::new(&t.model);
            let k = crate::testutil::CLASSES;
            let given = pgd.perturb_with_classes(&known, bounds, &t.xs, &t.ys, eps, 3, k)?;
            assert_eq!(flat(&given.clipped)?, flat(&points.clipped)?, "{name}");
            assert_eq!(given.iterations, points.iterations, "{name}");
            let fewer = known.passes();
            assert_eq!(seen.forward - fewer.forward, 1.0, "{name}: {fewer:?}");
            assert_eq!(seen.gradient, fewer.gradient, "{name}");
        }
        // Wrong classes are refused (by the labels' check or the first pass's shape).
        for k in [0, 2, crate::testutil::CLASSES + 1] {
            let r = pgd.perturb_with_classes(&t.model, bounds, &t.xs, &t.ys, 0.1, 0, k);
            assert!(
                matches!(r, Err(crate::Error::Input(_))),
                "{k} classes: {r:?}"
            );
        }
        // The same refusals as `run`.
        let bad = Pgd { steps: 0, ..pgd };
        assert!(bad.perturb(&t.model, bounds, &t.xs, &t.ys, 0.1, 0).is_err());
        assert!(pgd
            .perturb(&t.model, bounds, &t.xs, &t.ys, -0.1, 0)
            .is_err());
        Ok(())
    }

    /// The count is what the engine does: every pass the model sees, on a problem
    /// where no example is fooled early, equals the cost times the images.
    #[test]
    fn the_count_is_the_passes_the_model_sees() -> crate::Result<()> {
        use crate::{Attack, Bounds, Init, Restarts};
        let t = crate::testutil::trained();
        let b = t.xs.dim(0)? as f64;
        for (restarts, eot) in [(1, Eot::OFF), (3, Eot::new(2, 3)?)] {
            let counting = PassCounter::new(&t.model);
            let pgd = Pgd {
                steps: 7,
                restarts: Restarts::same(restarts, Init::Uniform),
                early_stop: false,
                eot,
                ..Pgd::linf_pgd20()
            };
            pgd.run(&counting, Bounds::new(0.0, 1.0)?, &t.xs, &t.ys, &[1e-3], 0)?;
            let seen = counting.passes();
            let want = pgd.cost() * b;
            // Every pass runs the forward pass; those with a gradient also go back.
            // Exactly the counted gradient passes; one more forward pass of a single
            // row (the engine's probe of the class count).
            assert_eq!(seen.gradient, want.gradient, "{pgd:?}");
            assert!(
                (0.0..=1.0).contains(&(seen.forward - want.forward)),
                "{seen:?} against {want:?}"
            );
        }
        for apgd in [Apgd::ce(Norm::Linf), Apgd::dlr_targeted(Norm::Linf)] {
            let apgd = Apgd {
                steps: 12,
                target_classes: 3,
                ..apgd
            };
            let counting = PassCounter::new(&t.model);
            apgd.run(&counting, Bounds::new(0.0, 1.0)?, &t.xs, &t.ys, &[1e-3], 0)?;
            let seen = counting.passes();
            let want = apgd.cost() * b;
            assert_eq!(seen.gradient, want.gradient, "{apgd:?}");
            assert!(
                (0.0..=1.0).contains(&(seen.forward - want.forward)),
                "{seen:?} against {want:?}"
            );
        }
        // FAB and Square stop where they succeed: their counts are upper bounds.
        let stages = [
            Stage::Fab(Fab {
                steps: 10,
                target_classes: 3,
                ..Fab::targeted(Norm::Linf)
            }),
            Stage::Square(Square {
                queries: 50,
                ..Square::autoattack(Norm::Linf)
            }),
        ];
        for stage in stages {
            let counting = PassCounter::new(&t.model);
            let bounds = Bounds::new(0.0, 1.0)?;
            match &stage {
                Stage::Fab(f) => f.run(&counting, bounds, &t.xs, &t.ys, &[0.05], 0)?,
                Stage::Square(q) => q.run(&counting, bounds, &t.xs, &t.ys, &[0.05], 0)?,
                Stage::Apgd(a) => a.run(&counting, bounds, &t.xs, &t.ys, &[0.05], 0)?,
            };
            let seen = counting.passes();
            let want = stage.cost() * b;
            assert!(
                seen.gradient <= want.gradient && seen.forward <= want.forward + 1.0,
                "{}: {seen:?} against {want:?}",
                stage.name()
            );
            assert!(seen.gradient + seen.forward > 0.0);
        }
        Ok(())
    }

    #[test]
    fn autoattack_standard_adds_its_stages() {
        let aa = AutoAttack::standard(Norm::Linf);
        let p = aa.cost();
        // APGD-CE 100 steps; APGD-T 9 targets × 100; FAB-T 9 targets × 100 (two each); Square
        // 5000 queries.
        assert_eq!(p.gradient, 100.0 + 900.0 + 1800.0);
        assert_eq!(p.forward, 3.0 + 11.0 + 9.0 * 101.0 + 5003.0 + 1.0);
        let split = aa.cost_by_images();
        assert_eq!(split.total(), p);
        assert_eq!(
            split.correct,
            Stage::Apgd(crate::Apgd::ce(Norm::Linf)).cost()
        );
        assert_eq!(split.every, Passes::forward(1.0));
        let rand = AutoAttack::rand(Norm::Linf);
        // APGD-CE and APGD-DLR, 100 steps, 20 gradient draws each.
        assert_eq!(rand.cost().gradient, 2.0 * 100.0 * 20.0);
    }
}
