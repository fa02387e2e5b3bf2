//! One table, every attack: each `impl Attack` of the crate, in every norm it supports,
//! runs through the same checks (foolbox's parametrised attack test is the model):
//! one result per ε in the order given, each holding the shared invariants of
//! [`assert_invariants`] (‖δ‖_p ≤ ε exactly, inputs within the bounds, the reported
//! norms, success and predictions that hold when the model is run again), the same
//! result again from the same seed, and an empty ε list refused.

use crate::pgd::{Restarts, StepSize};
use crate::testutil::{assert_invariants, trained};
use crate::{
    Apgd, Attack, AutoAttack, Bounds, Fab, Fgsm, Frames, Init, Norm, Objective, Pgd, Square, Stage,
};

/// Two budgets per norm for the synthetic problem (D = 32, inputs in [0, 1]).
fn budgets(norm: Norm) -> Vec<f64> {
    match norm {
        Norm::Linf => vec![0.03, 0.3],
        Norm::L2 => vec![0.3, 1.5],
        Norm::L1 { .. } => vec![1.0, 5.0],
        Norm::L0 => vec![2.0, 8.0],
    }
}

fn pgd(norm: Norm, objective: Objective) -> Pgd {
    Pgd {
        norm,
        objective,
        steps: 10,
        step_size: match norm {
            Norm::L0 => StepSize::Absolute(1.0),
            _ => StepSize::Relative(0.25),
        },
        momentum: 0.75,
        backtrack: Some(1.5),
        restarts: Restarts {
            count: 2,
            first: Init::Zero,
            rest: Init::Uniform,
        },
        ..Pgd::linf_pgd20()
    }
}

fn apgd(mut a: Apgd) -> Apgd {
    a.steps = 10;
    a.restarts = 1;
    a.target_classes = a.target_classes.min(3);
    a
}

fn fab(norm: Norm) -> Fab {
    Fab {
        steps: 10,
        restarts: 1,
        target_classes: 3,
        ..Fab::targeted(norm)
    }
}

fn square(norm: Norm) -> Square {
    Square {
        queries: 60,
        restarts: 1,
        ..Square::autoattack(norm)
    }
}

/// AutoAttack's standard ensemble with every stage cut to a test's budget.
fn autoattack(norm: Norm) -> AutoAttack {
    let mut aa = AutoAttack::standard(norm);
    for stage in &mut aa.stages {
        match stage {
            Stage::Apgd(a) => *a = apgd(*a),
            Stage::Fab(f) => *f = fab(f.norm),
            Stage::Square(s) => *s = square(s.norm),
        }
    }
    aa
}

/// Every attack of the crate, named, with the norm its results are measured in.
fn table() -> Vec<(String, Box<dyn Attack>, Norm)> {
    let mut rows: Vec<(String, Box<dyn Attack>, Norm)> = Vec::new();
    for norm in [Norm::Linf, Norm::L2, Norm::l1(), Norm::L0] {
        for objective in [
            Objective::CrossEntropy,
            Objective::CwMargin,
            Objective::Conf,
        ] {
            rows.push((
                format!("pgd {norm} {objective:?}"),
                Box::new(pgd(norm, objective)),
                norm,
            ));
        }
    }
    rows.push(("fgsm".into(), Box::new(Fgsm::goodfellow()), Norm::Linf));
    rows.push(("fgsm-rs".into(), Box::new(Fgsm::fast_at()), Norm::Linf));
    rows.push((
        "frames".into(),
        Box::new(Frames {
            width: 1,
            pgd: pgd(Norm::Linf, Objective::Conf),
        }),
        Norm::Linf,
    ));
    for norm in [Norm::Linf, Norm::L2, Norm::l1()] {
        rows.push((
            format!("apgd-ce {norm}"),
            Box::new(apgd(Apgd::ce(norm))),
            norm,
        ));
        rows.push((
            format!("apgd-t {norm}"),
            Box::new(apgd(Apgd::dlr_targeted(norm))),
            norm,
        ));
        rows.push((format!("fab-t {norm}"), Box::new(fab(norm)), norm));
        rows.push((
            format!("autoattack {norm}"),
            Box::new(autoattack(norm)),
            norm,
        ));
    }
    rows.push((
        "apgd-dlr linf".into(),
        Box::new(apgd(Apgd::dlr(Norm::Linf))),
        Norm::Linf,
    ));
    for norm in [Norm::Linf, Norm::L2] {
        rows.push((format!("square {norm}"), Box::new(square(norm)), norm));
    }
    rows
}

#[test]
fn every_attack_keeps_the_shared_invariants() -> crate::Result<()> {
    let t = trained();
    let (xs, ys) = (t.xs.narrow(0, 0, 16)?, t.ys.narrow(0, 0, 16)?);
    let table = table();
    assert!(table.len() >= 25, "the table lost rows: {}", table.len());
    for (name, attack, norm) in &table {
        let eps = budgets(*norm);
        let results = attack.run(&t.model, Bounds::UNIT, &xs, &ys, &eps, 7)?;
        assert_eq!(results.len(), eps.len(), "{name}: one result per ε");
        for (r, &e) in results.iter().zip(&eps) {
            assert_eq!(r.eps, e, "{name}: results in the order of ε");
            assert_invariants(&t.model, *norm, Bounds::UNIT, &xs, &ys, r)?;
        }
        let again = attack.run(&t.model, Bounds::UNIT, &xs, &ys, &eps, 7)?;
        for (a, b) in results.iter().zip(&again) {
            let d = (&a.clipped - &b.clipped)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{name}: the same seed gave another result");
            assert_eq!(a.success, b.success, "{name}");
        }
        assert!(
            attack
                .run(&t.model, Bounds::UNIT, &xs, &ys, &[], 7)
                .is_err(),
            "{name}: an empty ε list must be refused"
        );
    }
    Ok(())
}
