//! The ensemble: strength relative to its members, invariants, resume, versions,
//! and the trust checks it reports.

use candle_core::{DType, Device, Tensor};

use super::{AutoAttack, EnsembleState, Stage};
use crate::testutil::{assert_invariants, count, trained, Masked, Mlp, Noisy};
use crate::Problem;
use crate::{Apgd, Attack, Bounds, Error, Fab, Norm, Pgd, Result, Square, TrustWarning};

/// The standard ensemble with every budget cut, for fast tests.
fn small(norm: Norm) -> AutoAttack {
    let mut aa = AutoAttack::standard(norm);
    for stage in &mut aa.stages {
        match stage {
            Stage::Apgd(a) => a.steps = 20,
            Stage::Fab(f) => f.steps = 20,
            Stage::Square(s) => s.queries = 300,
        }
    }
    aa
}

fn json_error(e: serde_json::Error) -> Error {
    Error::Config(e.to_string())
}

/// Point by point, the ensemble fools everything any of its stages fools when run
/// alone (with the seed the ensemble gives that stage), and never less than PGD.
#[test]
fn the_standard_ensemble_is_never_weaker_than_a_member() -> Result<()> {
    let t = trained();
    let eps = 0.06;
    let aa = AutoAttack::standard(Norm::Linf);
    let eval = aa.evaluate(&t.model, Bounds::UNIT, &t.xs, &t.ys, eps, 7)?;
    assert_invariants(
        &t.model,
        Norm::Linf,
        Bounds::UNIT,
        &t.xs,
        &t.ys,
        &eval.result,
    )?;
    let robust: Vec<bool> = eval.result.success.iter().map(|s| !s).collect();
    let problem = Problem::new(&t.model, Bounds::UNIT, &t.xs, &t.ys)?;
    for (s, stage) in aa.stages.iter().enumerate() {
        let alone = stage.attack(&problem, eps, AutoAttack::stage_seed(7, s))?;
        for (i, (&fooled, &kept)) in alone.success.iter().zip(&robust).enumerate() {
            assert!(!(fooled && kept), "{}: point {i}", stage.name());
        }
    }
    let pgd = Pgd::linf_pgd20().run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 0)?;
    assert!(count(&robust) <= 64 - count(&pgd[0].success));
    // Stage reports: robust accuracy never rises, each stage attacks what is left.
    let r = &eval.report;
    assert_eq!(r.stages.len(), 4);
    assert_eq!(r.stages[0].attacked, count(&eval.clean_correct));
    for w in r.stages.windows(2) {
        assert!(w[1].robust_accuracy <= w[0].robust_accuracy);
        assert_eq!(w[1].attacked, w[0].attacked - w[0].broken);
    }
    assert_eq!(r.robust_accuracy, count(&robust) as f64 / 64.0);
    assert!(
        r.seconds > 0.0 && r.trust.passed(),
        "{:?}",
        r.trust.warnings
    );
    assert_eq!(r.trust.black_box_only, Some(r.stages[3].broken));
    for (i, by) in eval.broken_by.iter().enumerate() {
        assert_eq!(by.is_some(), eval.clean_correct[i] && !robust[i]);
    }
    Ok(())
}

/// Stopping after two stages, saving the state as JSON and resuming gives exactly the
/// uninterrupted result.
#[test]
fn a_resumed_evaluation_equals_the_uninterrupted_one() -> Result<()> {
    let t = trained();
    let aa = small(Norm::L2);
    let full = aa.evaluate(&t.model, Bounds::UNIT, &t.xs, &t.ys, 0.3, 11)?;

    let mut state = aa.start(&t.model, Bounds::UNIT, &t.xs, &t.ys, 0.3, 11)?;
    for _ in 0..2 {
        assert!(aa
            .run_stage(&t.model, Bounds::UNIT, &t.xs, &t.ys, &mut state)?
            .is_some());
    }
    assert!(
        aa.finish(&t.xs, &t.ys, &state).is_err(),
        "an incomplete state was finished"
    );
    let saved = serde_json::to_string(&state).map_err(json_error)?;
    let mut resumed: EnsembleState = serde_json::from_str(&saved).map_err(json_error)?;
    assert_eq!(resumed, state);
    let fresh = small(Norm::L2);
    while fresh
        .run_stage(&t.model, Bounds::UNIT, &t.xs, &t.ys, &mut resumed)?
        .is_some()
    {}
    let again = fresh.finish(&t.xs, &t.ys, &resumed)?;
    let rows = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    assert_eq!(rows(&again.result.clipped)?, rows(&full.result.clipped)?);
    assert_eq!(again.broken_by, full.broken_by);
    assert_eq!(again.result.iterations, full.result.iterations);
    let accuracies = |e: &super::Evaluation| -> Vec<f64> {
        e.report.stages.iter().map(|s| s.robust_accuracy).collect()
    };
    assert_eq!(accuracies(&again), accuracies(&full));

    // A state belongs to its inputs and its ensemble.
    let other_xs = (t.xs.clone() * 0.5)?;
    assert!(fresh.finish(&other_xs, &t.ys, &resumed).is_err());
    assert!(small(Norm::Linf).finish(&t.xs, &t.ys, &resumed).is_err());
    Ok(())
}

#[test]
fn same_seed_same_evaluation() -> Result<()> {
    let t = trained();
    let aa = small(Norm::l1());
    let a = aa.evaluate(&t.model, Bounds::UNIT, &t.xs, &t.ys, 1.0, 3)?;
    let b = aa.evaluate(&t.model, Bounds::UNIT, &t.xs, &t.ys, 1.0, 3)?;
    assert_eq!(
        a.result.clipped.flatten_all()?.to_vec1::<f32>()?,
        b.result.clipped.flatten_all()?.to_vec1::<f32>()?
    );
    assert_invariants(&t.model, Norm::l1(), Bounds::UNIT, &t.xs, &t.ys, &a.result)?;
    assert_eq!(a.report.stages.len(), 3, "L1 has no Square stage");
    Ok(())
}

/// Behind a gradient-blocking op, the white-box stages fail, Square succeeds, and the
/// report says why the evaluation cannot be trusted.
#[test]
fn a_masked_model_is_flagged_and_still_broken() -> Result<()> {
    let t = trained();
    let masked = Masked(&t.model);
    let aa = small(Norm::Linf);
    let eval = aa.evaluate(&masked, Bounds::UNIT, &t.xs, &t.ys, 0.08, 0)?;
    let square = eval.report.stages[3].broken;
    assert!(square >= 10, "Square fooled only {square}");
    let warnings = &eval.report.trust.warnings;
    assert!(warnings
        .iter()
        .any(|w| matches!(w, TrustWarning::ZeroGradients { .. })));
    assert!(warnings.iter().any(
        |w| matches!(w, TrustWarning::BlackBoxBeatsWhiteBox { points, .. } if *points == square)
    ));
    Ok(())
}

/// The `rand` version averages 20 draws: on a noisy model it runs, does not warn about
/// randomness, and the standard version does.
#[test]
fn the_rand_version_handles_randomised_models() -> Result<()> {
    let t = trained();
    let noisy = Noisy::new(&t.model, 0.3, 1);
    let mut rand = AutoAttack::rand(Norm::Linf);
    assert_eq!(rand.stages.len(), 2);
    for stage in &mut rand.stages {
        if let Stage::Apgd(a) = stage {
            assert_eq!(a.eot.grad_samples, 20);
            a.steps = 5;
        }
    }
    let eval = rand.evaluate(&noisy, Bounds::UNIT, &t.xs, &t.ys, 0.08, 0)?;
    assert!(eval.report.trust.eot_in_use);
    assert!(!eval
        .report
        .trust
        .warnings
        .iter()
        .any(|w| matches!(w, TrustWarning::RandomOutputs { .. })));
    assert!(eval.report.robust_accuracy < eval.report.clean_accuracy);
    let state = small(Norm::Linf).start(&noisy, Bounds::UNIT, &t.xs, &t.ys, 0.08, 0)?;
    assert!(state
        .trust
        .warnings
        .iter()
        .any(|w| matches!(w, TrustWarning::RandomOutputs { .. })));
    Ok(())
}

#[test]
fn too_few_classes_are_a_clear_error() -> Result<()> {
    let dev = Device::Cpu;
    let xs = Tensor::full(0.5f32, (2, 2, 4, 4), &dev)?;
    let ys = Tensor::new(&[0u32, 1], &dev)?;
    let three = Mlp::random(&[32, 3], 0, DType::F32)?;
    let two = Mlp::random(&[32, 2], 0, DType::F32)?;
    assert!(matches!(
        AutoAttack::standard(Norm::Linf).evaluate(&three, Bounds::UNIT, &xs, &ys, 0.1, 0),
        Err(Error::TooFewClasses {
            needed: 4,
            classes: 3,
            ..
        })
    ));
    assert!(matches!(
        AutoAttack::rand(Norm::Linf).evaluate(&two, Bounds::UNIT, &xs, &ys, 0.1, 0),
        Err(Error::TooFewClasses {
            needed: 3,
            classes: 2,
            ..
        })
    ));
    Ok(())
}

#[test]
fn inconsistent_ensembles_are_refused() {
    let mut twice = AutoAttack::standard(Norm::Linf);
    twice.stages.push(Stage::Apgd(Apgd::ce(Norm::Linf)));
    let mut mixed = AutoAttack::standard(Norm::Linf);
    mixed.stages.push(Stage::Fab(Fab {
        target_classes: 3,
        ..Fab::targeted(Norm::L2)
    }));
    let mut empty = AutoAttack::standard(Norm::Linf);
    empty.stages.clear();
    let mut l1_square = AutoAttack::standard(Norm::l1());
    l1_square
        .stages
        .push(Stage::Square(Square::autoattack(Norm::l1())));
    for bad in [twice, mixed, empty, l1_square] {
        assert!(bad.validate().is_err(), "{bad:?} accepted");
    }
    assert!(AutoAttack::standard(Norm::L0).validate().is_err());
    assert!(AutoAttack::standard(Norm::L2).validate().is_ok());
}

/// Through the `Attack` trait: one result per ε, robust accuracy falling with ε.
#[test]
fn the_ensemble_is_an_attack() -> Result<()> {
    let t = trained();
    let res = small(Norm::Linf).run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.02, 0.08], 0)?;
    assert_eq!(res.len(), 2);
    for r in &res {
        assert_invariants(&t.model, Norm::Linf, Bounds::UNIT, &t.xs, &t.ys, r)?;
    }
    assert!(count(&res[0].success) < count(&res[1].success));
    Ok(())
}

/// The ensemble with PGD's and APGD's device loops (their CPU twins here) gives the
/// host loops' evaluation: the same worst-case points, successes and per-stage robust
/// accuracies, in L∞ and L2, standard and `rand` versions.
#[test]
fn the_ensemble_on_the_device_loops_equals_the_host_loops() -> Result<()> {
    let t = trained();
    for (norm, eps) in [(Norm::Linf, 0.05), (Norm::L2, 0.5)] {
        let mut rand = AutoAttack::rand(norm);
        for stage in &mut rand.stages {
            if let Stage::Apgd(a) = stage {
                a.steps = 10;
                a.eot = crate::Eot::new(3, 3)?;
            }
        }
        rand.eot = crate::Eot::new(3, 3)?;
        for aa in [small(norm), rand] {
            let noisy = || Noisy::new(&t.model, 0.3, 4);
            let run = || -> Result<_> {
                if aa.version == "rand" {
                    aa.evaluate(&noisy(), Bounds::UNIT, &t.xs, &t.ys, eps, 3)
                } else {
                    aa.evaluate(&t.model, Bounds::UNIT, &t.xs, &t.ys, eps, 3)
                }
            };
            let host = run()?;
            let before = crate::device_resident_apgd_runs();
            let device = crate::with_device_resident_pgd(run)?;
            assert!(crate::device_resident_apgd_runs() > before);
            let what = format!("{} {norm}", aa.version);
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(f32::to_bits)
                    .collect())
            };
            assert_eq!(
                bits(&host.result.clipped)?,
                bits(&device.result.clipped)?,
                "{what}: points"
            );
            assert_eq!(host.result.success, device.result.success, "{what}");
            let robust = |e: &super::Evaluation| -> Vec<f64> {
                e.report.stages.iter().map(|s| s.robust_accuracy).collect()
            };
            assert_eq!(robust(&host), robust(&device), "{what}: stages");
            assert!(
                host.report.robust_accuracy > 0.0 && host.report.robust_accuracy < 1.0,
                "{what}: the budget must leave some points robust"
            );
        }
    }
    Ok(())
}

/// A model that counts its passes, and those run outside a scope of frozen weights
/// (`rampart_models::frozen_weights`, in which the fused GPU program keeps its
/// reordered kernels; the attacks open it in builds with the `cuda` feature, where
/// the GPU programs are).
#[cfg(feature = "cuda")]
struct Watch<'a> {
    base: &'a dyn candle_core::Module,
    passes: std::sync::atomic::AtomicUsize,
    outside: std::sync::atomic::AtomicUsize,
}

#[cfg(feature = "cuda")]
impl candle_core::Module for Watch<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        use std::sync::atomic::Ordering::Relaxed;
        self.passes.fetch_add(1, Relaxed);
        if !rampart_models::weights_frozen() {
            self.outside.fetch_add(1, Relaxed);
        }
        self.base.forward(xs)
    }
}

/// Every pass of an attack run (run, perturb, the training attacks' perturb with
/// classes, the ensemble whole or started and run stage by stage) happens with the weights frozen, and
/// the scope closes with the run.
#[cfg(feature = "cuda")]
#[test]
fn attacks_run_with_the_weights_frozen() -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let t = trained();
    let watch = Watch {
        base: &t.model,
        passes: 0.into(),
        outside: 0.into(),
    };
    let pgd = Pgd {
        steps: 5,
        ..Pgd::madry_linf_cifar10()
    };
    let (xs, ys) = (t.xs.narrow(0, 0, 8)?, t.ys.narrow(0, 0, 8)?);
    pgd.run(&watch, Bounds::UNIT, &xs, &ys, &[0.05], 0)?;
    pgd.perturb(&watch, Bounds::UNIT, &xs, &ys, 0.05, 0)?;
    pgd.perturb_with_classes(&watch, Bounds::UNIT, &xs, &ys, 0.05, 0, 4)?;
    crate::Fgsm::fast_at().perturb_with_classes(&watch, Bounds::UNIT, &xs, &ys, 0.05, 0, 4)?;
    small(Norm::Linf).evaluate(&watch, Bounds::UNIT, &xs, &ys, 0.05, 0)?;
    let aa = small(Norm::L2);
    let mut state = aa.start(&watch, Bounds::UNIT, &xs, &ys, 0.5, 0)?;
    while aa
        .run_stage(&watch, Bounds::UNIT, &xs, &ys, &mut state)?
        .is_some()
    {}
    assert!(watch.passes.load(Relaxed) > 20);
    assert_eq!(watch.outside.load(Relaxed), 0, "passes outside the scope");
    assert!(
        !rampart_models::weights_frozen(),
        "the scope outlived the runs"
    );
    Ok(())
}
