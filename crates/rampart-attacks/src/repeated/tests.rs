//! `Repeated`: one run equals the bare attack, the attacks' own restarts are
//! `Repeated`'s, and more runs never lose a success.

use crate::pgd::{Restarts, StepSize};
use crate::repeated::SingleRun;
use crate::testutil::{assert_invariants, trained};
use crate::{
    Apgd, Attack, AttackResult, Bounds, Fab, Init, Norm, Objective, Pgd, Repeated, Result, Square,
};

fn bits(r: &AttackResult) -> Result<Vec<u32>> {
    Ok(r.clipped
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// Same points to the bit, same successes, steps and unconstrained points.
fn assert_same(name: &str, a: &AttackResult, b: &AttackResult) -> Result<()> {
    assert_eq!(bits(a)?, bits(b)?, "{name}: points differ");
    assert_eq!(a.success, b.success, "{name}");
    assert_eq!(a.iterations, b.iterations, "{name}");
    assert_eq!(a.confidence, b.confidence, "{name}");
    assert_eq!(
        a.unconstrained.is_some(),
        b.unconstrained.is_some(),
        "{name}"
    );
    if let (Some(x), Some(y)) = (&a.unconstrained, &b.unconstrained) {
        let d = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{name}: unconstrained points differ");
    }
    Ok(())
}

/// A run of an attack on a fixed batch: the attack and its ε.
type RunOn<'a> = dyn Fn(&dyn Attack, &[f64]) -> Result<Vec<AttackResult>> + 'a;

/// `run` of `attack` alone, then of `Repeated { attack, restarts }`.
fn bare_and_repeated<A: Attack + SingleRun + Copy>(
    run: &RunOn<'_>,
    attack: A,
    restarts: usize,
    eps: &[f64],
) -> Result<(Vec<AttackResult>, Vec<AttackResult>)> {
    Ok((
        run(&attack, eps)?,
        run(&Repeated { attack, restarts }, eps)?,
    ))
}

fn pgd(restarts: usize) -> Pgd {
    Pgd {
        steps: 5,
        step_size: StepSize::Relative(0.25),
        restarts: Restarts {
            count: restarts,
            first: Init::Zero,
            rest: Init::Uniform,
        },
        ..Pgd::linf_pgd20()
    }
}

fn apgd(objective: Objective, restarts: usize) -> Apgd {
    Apgd {
        objective,
        steps: 10,
        restarts,
        target_classes: 3,
        ..Apgd::ce(Norm::Linf)
    }
}

/// `Repeated { attack, restarts: n }` is the attack with n restarts, bit for bit:
/// with n = 1 the bare single run, and the attacks' own restart counts are
/// `Repeated`'s loop.
#[test]
fn one_run_is_the_bare_attack() -> Result<()> {
    let t = trained();
    let (xs, ys) = (t.xs.narrow(0, 0, 32)?, t.ys.narrow(0, 0, 32)?);
    let run = |a: &dyn Attack, eps: &[f64]| a.run(&t.model, Bounds::UNIT, &xs, &ys, eps, 3);
    let linf = [0.03, 0.08];
    for n in [1, 3] {
        let (bare, rep) = bare_and_repeated(&run, pgd(n), n, &linf)?;
        for (a, b) in bare.iter().zip(&rep) {
            assert_same(&format!("pgd ×{n}"), a, b)?;
        }
        for objective in [Objective::CrossEntropy, Objective::DlrTargeted] {
            let (bare, rep) = bare_and_repeated(&run, apgd(objective, n), n, &linf)?;
            for (x, y) in bare.iter().zip(&rep) {
                assert_same(&format!("apgd {objective} ×{n}"), x, y)?;
            }
        }
    }
    let fab = Fab {
        steps: 10,
        target_classes: 3,
        ..Fab::targeted(Norm::L2)
    };
    let square = Square {
        queries: 40,
        ..Square::autoattack(Norm::Linf)
    };
    let (bare, rep) = bare_and_repeated(&run, fab, 1, &[0.3, 1.0])?;
    for (a, b) in bare.iter().zip(&rep) {
        assert_same("fab", a, b)?;
        assert!(a.unconstrained.is_some());
    }
    let (bare, rep) = bare_and_repeated(&run, square, 1, &linf)?;
    for (a, b) in bare.iter().zip(&rep) {
        assert_same("square", a, b)?;
    }
    assert!(run(
        &Repeated {
            attack: square,
            restarts: 0
        },
        &linf
    )
    .is_err());
    Ok(())
}

/// With several runs every example keeps its worst case: an example fooled after n
/// runs stays fooled after n + 1, and an example fooled by the single run that run r
/// repeats (seed + r) is fooled by the combination, which fools exactly the union.
#[test]
fn later_runs_never_lose_a_success() -> Result<()> {
    let t = trained();
    let eps = [0.05];
    let single = apgd(Objective::CrossEntropy, 1);
    let runs = 4;
    let mut previous: Option<Vec<bool>> = None;
    for n in 1..=runs {
        let res = Repeated {
            attack: single,
            restarts: n,
        }
        .run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 10)?;
        assert_invariants(&t.model, Norm::Linf, Bounds::UNIT, &t.xs, &t.ys, &res[0])?;
        if let Some(prev) = &previous {
            for (i, (&before, &now)) in prev.iter().zip(&res[0].success).enumerate() {
                assert!(!before || now, "{n} runs lost example {i}");
            }
        }
        previous = Some(res[0].success.clone());
    }
    let combined = previous.unwrap_or_default();
    let mut union = vec![false; combined.len()];
    for r in 0..runs as u64 {
        let alone = single.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 10 + r)?;
        for (i, &s) in alone[0].success.iter().enumerate() {
            assert!(
                !s || combined[i],
                "run {r} fooled example {i}, the combination not"
            );
            union[i] |= s;
        }
    }
    assert_eq!(combined, union);
    let fooled = union.iter().filter(|&&s| s).count();
    assert!(
        fooled > 0 && fooled < union.len(),
        "ε should split the batch ({fooled} fooled)"
    );
    Ok(())
}
