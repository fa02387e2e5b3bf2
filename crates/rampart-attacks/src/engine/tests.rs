//! Properties of the PGD loop on small random and trained models.

use super::{next_toward, retain};
use crate::testutil::{blobs, trained, Mlp, TinyConv, CLASSES, DIM, SHAPE};
use crate::{
    Attack, AttackResult, Bounds, Criterion, Eot, Error, Fgsm, Init, Norm, Objective, Pgd,
    Restarts, Result, StepSize,
};
use candle_core::{DType, Device, Module, ModuleT, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn config(norm: Norm, objective: Objective, steps: usize, step: StepSize) -> Pgd {
    Pgd {
        norm,
        objective,
        criterion: Criterion::Misclassified,
        steps,
        step_size: step,
        momentum: 0.0,
        backtrack: None,
        restarts: Restarts::same(1, Init::Zero),
        early_stop: false,
        eot: Eot::OFF,
        last_iterate: false,
    }
}

/// [`config`] with the cross-entropy objective.
fn ce_config(norm: Norm, steps: usize, step: StepSize) -> Pgd {
    config(norm, Objective::CrossEntropy, steps, step)
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.flatten_from(1)?.to_vec2::<f32>()?)
}

/// ‖δ‖ of every returned example, recomputed in f64 from the returned tensors.
fn measured(norm: Norm, res: &AttackResult, xs: &Tensor) -> Result<Vec<f64>> {
    Ok(rows(&res.clipped)?
        .iter()
        .zip(rows(xs)?)
        .map(|(a, x)| {
            let delta: Vec<f64> = a
                .iter()
                .zip(&x)
                .map(|(a, x)| *a as f64 - *x as f64)
                .collect();
            norm.measure(&delta)
        })
        .collect())
}

/// The invariants every result must satisfy, checked from the outside: feasibility,
/// consistent reported norms, and predictions/successes that hold when re-evaluated.
fn check_result(
    model: &dyn ModuleT,
    cfg: &Pgd,
    bounds: Bounds,
    xs: &Tensor,
    ys: &Tensor,
    res: &AttackResult,
) -> Result<()> {
    assert_eq!(res.clipped.dims(), xs.dims());
    assert!(res.unconstrained.is_none(), "PGD iterates are feasible");
    let b = xs.dim(0)?;
    for v in [
        res.success.len(),
        res.confidence.len(),
        res.predicted.len(),
        res.norm.len(),
    ] {
        assert_eq!(v, b);
    }
    let norms = measured(cfg.norm, res, xs)?;
    for (i, (&n, &reported)) in norms.iter().zip(&res.norm).enumerate() {
        // Exact: the engine rounds towards x, so no tolerance is needed (the spec
        // allows 1e-5).
        assert!(
            n <= res.eps,
            "{}: example {i}: ‖δ‖ = {n} > ε = {}",
            cfg.norm,
            res.eps
        );
        assert!(
            (n - reported as f64).abs() <= 1e-5 * (1.0 + n),
            "reported norm {reported} vs {n}"
        );
    }
    for row in rows(&res.clipped)? {
        assert!(
            row.iter().all(|v| (bounds.lo..=bounds.hi).contains(v)),
            "left the bounds"
        );
    }
    if res.eps == 0.0 {
        assert_eq!(
            rows(&res.clipped)?,
            rows(xs)?,
            "ε = 0 must return the input"
        );
    }
    let probs = candle_nn::ops::softmax(&model.forward_t(&res.clipped, false)?, D::Minus1)?
        .to_vec2::<f32>()?;
    let labels = ys.to_vec1::<u32>()?;
    for i in 0..b {
        let (pred, conf) = crate::base::argmax(&probs[i]);
        assert_eq!(pred, res.predicted[i]);
        assert!((conf - res.confidence[i]).abs() < 1e-6);
        assert_eq!(
            res.success[i],
            cfg.criterion.is_success(&probs[i], labels[i])
        );
        if res.success[i] && cfg.criterion == Criterion::Misclassified {
            assert_ne!(
                pred, labels[i],
                "a reported success is classified correctly"
            );
        }
        assert!(res.iterations[i] <= cfg.steps * cfg.restarts.count);
    }
    Ok(())
}

fn budgets(norm: Norm) -> Vec<f64> {
    match norm {
        Norm::Linf => vec![0.0, 0.03, 0.1],
        Norm::L2 => vec![0.25, 1.0],
        Norm::L1 { .. } => vec![1.0, 4.0],
        Norm::L0 => vec![0.0, 3.0, 10.0],
    }
}

/// Every norm, on the trained MLP in [0, 1] and on a random convnet in [−1, 2] (with
/// inputs sitting exactly on the bounds), with momentum, backtracking, restarts and
/// several objectives: ‖δ‖_p ≤ ε, inputs within bounds, successes that re-evaluate.
#[test]
fn invariants_hold_for_every_norm_and_model() -> Result<()> {
    let t = trained();
    let conv = TinyConv::random(SHAPE[0], SHAPE[1], SHAPE[2], CLASSES, 5)?;
    let bounds = Bounds::new(-1.0, 2.0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let n = 24;
    let x: Vec<f32> = (0..n * DIM)
        .map(|i| match i % 7 {
            0 => -1.0,
            1 => 2.0,
            _ => rng.gen_range(-1.0..2.0),
        })
        .collect();
    let conv_xs = Tensor::from_vec(x, (n, SHAPE[0], SHAPE[1], SHAPE[2]), &Device::Cpu)?;
    let conv_ys = Tensor::from_vec(
        (0..n as u32).map(|i| i % 4).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    let cases: [(&dyn ModuleT, Bounds, &Tensor, &Tensor); 2] = [
        (&t.model, Bounds::UNIT, &t.xs, &t.ys),
        (&conv, bounds, &conv_xs, &conv_ys),
    ];
    let objectives = [
        Objective::CrossEntropy,
        Objective::CwMargin,
        Objective::Dlr,
        Objective::Conf,
    ];
    for (m, (model, bounds, xs, ys)) in cases.into_iter().enumerate() {
        for (k, norm) in [Norm::Linf, Norm::L2, Norm::l1(), Norm::l1_dense(), Norm::L0]
            .into_iter()
            .enumerate()
        {
            let step = match norm {
                Norm::L0 => StepSize::Absolute(2.0),
                _ => StepSize::Relative(0.3),
            };
            let mut cfg = config(norm, objectives[(k + m) % 4], 8, step);
            cfg.momentum = 0.5;
            cfg.backtrack = if k % 2 == 0 { Some(1.5) } else { None };
            cfg.restarts = Restarts {
                count: 2,
                first: Init::Zero,
                rest: if k % 2 == 0 {
                    Init::Uniform
                } else {
                    Init::UniformNorm
                },
            };
            let results = cfg.run(model, bounds, xs, ys, &budgets(norm), 1)?;
            assert_eq!(results.len(), budgets(norm).len());
            for (res, eps) in results.iter().zip(budgets(norm)) {
                assert_eq!(res.eps, eps);
                check_result(model, &cfg, bounds, xs, ys, res)?;
            }
            let last = results
                .last()
                .map(|r| r.success.iter().filter(|&&s| s).count());
            assert!(
                last > Some(0),
                "{norm} never succeeded on model {m}: the test is vacuous"
            );
        }
    }
    Ok(())
}

/// Results per ε do not depend on which other ε are in the call.
#[test]
fn each_eps_is_attacked_independently() -> Result<()> {
    let t = trained();
    let mut cfg = ce_config(Norm::L2, 5, StepSize::Relative(0.3));
    cfg.restarts = Restarts::same(2, Init::Uniform);
    let both = cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.5, 1.5], 4)?;
    let alone = cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[1.5], 4)?;
    assert_eq!(rows(&both[1].clipped)?, rows(&alone[0].clipped)?);
    assert_eq!(both[1].success, alone[0].success);
    Ok(())
}

/// Restart r of a run with seed s starts where a single run with seed s + r starts;
/// the combined result is never weaker than any single run, example by example
/// (success first, then objective), and is as strong as the best of them.
#[test]
fn restarts_keep_the_per_example_worst_case() -> Result<()> {
    let t = trained();
    let eps = [0.06];
    let mut cfg = ce_config(Norm::Linf, 5, StepSize::Relative(0.25));
    cfg.restarts = Restarts {
        count: 4,
        first: Init::Zero,
        rest: Init::Uniform,
    };
    let combined = &cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 10)?[0];
    let objective = |res: &AttackResult| -> Result<Vec<f32>> {
        Ok(
            crate::input_gradient(&t.model, cfg.objective, &res.clipped, &t.ys, None)?
                .0
                .to_vec1::<f32>()?,
        )
    };
    let best = objective(combined)?;
    let mut union = vec![false; best.len()];
    for r in 0..4 {
        let single_cfg = Pgd {
            restarts: Restarts::same(1, cfg.restarts.init(r)),
            ..cfg
        };
        let single = &single_cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 10 + r as u64)?[0];
        let obj = objective(single)?;
        for i in 0..best.len() {
            union[i] |= single.success[i];
            assert!(
                !single.success[i] || combined.success[i],
                "restart {r} fooled example {i}"
            );
            if single.success[i] == combined.success[i] {
                assert!(
                    best[i] >= obj[i] - 1e-6,
                    "restart {r}, example {i}: {} < {}",
                    best[i],
                    obj[i]
                );
            }
        }
    }
    assert_eq!(combined.success, union);
    let fooled = union.iter().filter(|&&s| s).count();
    assert!(
        fooled > 0 && fooled < union.len(),
        "ε should split the batch ({fooled} fooled)"
    );
    Ok(())
}

/// With best-so-far tracking and the same seed, a longer run contains the shorter
/// one's trajectory: every example fooled in k steps stays fooled with more steps.
#[test]
fn more_steps_never_lower_the_success_rate() -> Result<()> {
    let t = trained();
    let mut previous: Option<Vec<bool>> = None;
    let mut counts = Vec::new();
    for steps in [1, 3, 10, 30] {
        let mut cfg = ce_config(Norm::Linf, steps, StepSize::Absolute(0.01));
        cfg.momentum = 0.75;
        cfg.backtrack = Some(1.5);
        cfg.restarts = Restarts::same(1, Init::Uniform);
        let res = &cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.06], 3)?[0];
        if let Some(prev) = &previous {
            for (i, (p, s)) in prev.iter().zip(&res.success).enumerate() {
                assert!(
                    !p || *s,
                    "example {i} fooled in fewer steps but not in {steps}"
                );
            }
        }
        counts.push(res.success.iter().filter(|&&s| s).count());
        previous = Some(res.success.clone());
    }
    assert!(
        counts[3] > counts[0],
        "more steps should find more: {counts:?}"
    );
    Ok(())
}

/// On the trained model PGD fools examples FGSM misses (and never fewer). At ε = 0.08
/// FGSM fools 38 of 64 held-out points and PGD-20 42.
#[test]
fn pgd_finds_adversarial_examples_fgsm_misses() -> Result<()> {
    let t = trained();
    let eps = [0.08];
    let fgsm = &Fgsm::goodfellow().run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 0)?[0];
    let mut pgd = Pgd::linf_pgd20();
    pgd.step_size = StepSize::Relative(0.1);
    let pgd = &pgd.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 0)?[0];
    let count = |v: &[bool]| v.iter().filter(|&&s| s).count();
    let only_pgd = pgd
        .success
        .iter()
        .zip(&fgsm.success)
        .filter(|(p, f)| **p && !**f)
        .count();
    assert!(
        only_pgd > 0,
        "PGD {} vs FGSM {}",
        count(&pgd.success),
        count(&fgsm.success)
    );
    assert!(count(&pgd.success) >= count(&fgsm.success));
    Ok(())
}

#[test]
fn targeted_attack_reaches_the_target() -> Result<()> {
    let t = trained();
    let target = 2;
    for objective in [Objective::CrossEntropyTargeted, Objective::DlrTargeted] {
        let mut cfg = config(Norm::Linf, objective, 30, StepSize::Relative(0.1));
        cfg.criterion = Criterion::Targeted(target);
        let res = &cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.15], 0)?[0];
        check_result(&t.model, &cfg, Bounds::UNIT, &t.xs, &t.ys, res)?;
        for (s, p) in res.success.iter().zip(&res.predicted) {
            assert_eq!(*s, *p == target);
        }
        let hits = res.success.iter().filter(|&&s| s).count();
        assert!(
            hits > res.success.len() / 2,
            "{objective}: target reached on {hits} examples"
        );
    }
    Ok(())
}

#[test]
fn same_seed_same_result_other_seed_other_start() -> Result<()> {
    let t = trained();
    let mut cfg = config(Norm::L2, Objective::Dlr, 4, StepSize::Relative(0.2));
    cfg.restarts = Restarts::same(2, Init::Uniform);
    cfg.momentum = 0.9;
    let run = |seed| cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.7], seed);
    let (a, b, c) = (run(7)?, run(7)?, run(8)?);
    assert_eq!(rows(&a[0].clipped)?, rows(&b[0].clipped)?);
    assert_eq!(a[0].success, b[0].success);
    assert_eq!(a[0].norm, b[0].norm);
    assert_ne!(rows(&a[0].clipped)?, rows(&c[0].clipped)?);
    Ok(())
}

#[test]
fn attacks_leave_the_weights_untouched() -> Result<()> {
    let t = trained();
    let snapshot = |m: &Mlp| -> Result<Vec<Vec<f32>>> {
        m.vars()
            .iter()
            .map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
            .collect()
    };
    let before = snapshot(&t.model)?;
    let mut cfg = Pgd::ccat_train();
    cfg.steps = 5;
    cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.03], 0)?;
    Fgsm::fast_at().run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.03], 0)?;
    assert_eq!(before, snapshot(&t.model)?);
    Ok(())
}

#[test]
fn early_stop_saves_steps_without_losing_successes() -> Result<()> {
    let t = trained();
    let mut cfg = ce_config(Norm::Linf, 20, StepSize::Relative(0.1));
    let full = &cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.1], 0)?[0];
    cfg.early_stop = true;
    let early = &cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.1], 0)?[0];
    check_result(&t.model, &cfg, Bounds::UNIT, &t.xs, &t.ys, early)?;
    assert_eq!(full.success, early.success);
    let (n_full, n_early): (usize, usize) =
        (full.iterations.iter().sum(), early.iterations.iter().sum());
    assert!(
        n_early < n_full,
        "early stop took {n_early} steps vs {n_full}"
    );
    for (i, s) in early.success.iter().enumerate() {
        if !s {
            assert_eq!(early.iterations[i], 20);
        }
    }
    Ok(())
}

#[test]
fn bad_configurations_are_refused() -> Result<()> {
    let t = trained();
    let run = |cfg: Pgd, eps: &[f64]| cfg.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, eps, 0);
    let base = ce_config(Norm::Linf, 3, StepSize::Relative(0.25));
    assert!(run(base, &[0.03]).is_ok());
    let bad = [
        Pgd { steps: 0, ..base },
        Pgd {
            step_size: StepSize::Absolute(0.0),
            ..base
        },
        Pgd {
            step_size: StepSize::Relative(f64::NAN),
            ..base
        },
        Pgd {
            momentum: 1.0,
            ..base
        },
        Pgd {
            momentum: -0.1,
            ..base
        },
        Pgd {
            backtrack: Some(1.0),
            ..base
        },
        Pgd {
            restarts: Restarts::same(0, Init::Zero),
            ..base
        },
        Pgd {
            objective: Objective::Conf,
            early_stop: true,
            ..base
        },
        Pgd {
            objective: Objective::CrossEntropyTargeted,
            ..base
        },
        Pgd {
            norm: Norm::L1 { top_k: 0.0 },
            ..base
        },
        Pgd {
            criterion: Criterion::ConfidentlyMisclassified(1.5),
            ..base
        },
        Pgd {
            eot: Eot {
                grad_samples: 0,
                eval_samples: 1,
            },
            ..base
        },
        Pgd {
            criterion: Criterion::Targeted(9),
            ..base
        },
    ];
    for cfg in bad {
        assert!(run(cfg, &[0.03]).is_err(), "accepted {cfg:?}");
    }
    for eps in [
        &[][..],
        &[-0.1],
        &[f64::NAN],
        &[f64::INFINITY],
        &[0.03, -1.0],
    ] {
        assert!(run(base, eps).is_err(), "accepted ε {eps:?}");
    }
    let l0 = Pgd {
        norm: Norm::L0,
        ..base
    };
    assert!(matches!(run(l0, &[2.5]), Err(Error::Eps { .. })));
    assert!(run(l0, &[3.0]).is_ok());
    Ok(())
}

#[test]
fn bad_inputs_are_refused() -> Result<()> {
    let t = trained();
    let cfg = ce_config(Norm::Linf, 2, StepSize::Relative(0.25));
    let dev = Device::Cpu;
    let run = |model: &dyn ModuleT, xs: &Tensor, ys: &Tensor| {
        cfg.run(model, Bounds::UNIT, xs, ys, &[0.03], 0)
    };
    let (xs, ys) = (&t.xs, &t.ys);
    // NaN input.
    let mut x = rows(xs)?.concat();
    x[5] = f32::NAN;
    let nan = Tensor::from_vec(x.clone(), xs.dims(), &dev)?;
    assert!(matches!(run(&t.model, &nan, ys), Err(Error::Input(_))));
    // Input outside the bounds.
    x[5] = 1.5;
    let outside = Tensor::from_vec(x, xs.dims(), &dev)?;
    assert!(matches!(run(&t.model, &outside, ys), Err(Error::Input(_))));
    assert!(cfg
        .run(
            &t.model,
            Bounds { lo: 0.0, hi: 2.0 },
            &outside,
            ys,
            &[0.03],
            0
        )
        .is_ok());
    // Label out of range, too few or too many labels, wrong rank or dtype.
    let mut y = ys.to_vec1::<u32>()?;
    y[3] = CLASSES as u32;
    assert!(matches!(
        run(&t.model, xs, &Tensor::new(y.as_slice(), &dev)?),
        Err(Error::Input(_))
    ));
    assert!(run(&t.model, xs, &ys.narrow(0, 0, 10)?).is_err());
    assert!(run(&t.model, xs, &ys.unsqueeze(1)?).is_err());
    assert!(run(&t.model, xs, &ys.to_dtype(DType::F32)?).is_err());
    assert!(run(&t.model, xs, &ys.to_dtype(DType::I64)?).is_ok());
    // Empty batch, non-float inputs.
    assert!(run(&t.model, &xs.narrow(0, 0, 0)?, &ys.narrow(0, 0, 0)?).is_err());
    assert!(run(&t.model, &xs.to_dtype(DType::U8)?, ys).is_err());
    // Too few classes for DLR (2) and targeted DLR (3).
    let two = Mlp::random(&[DIM, 2], 0, DType::F32)?;
    let three = Mlp::random(&[DIM, 3], 0, DType::F32)?;
    let zeros = Tensor::zeros(xs.dim(0)?, DType::U32, &dev)?;
    let dlr = Pgd {
        objective: Objective::Dlr,
        ..cfg
    };
    let dlr_t = Pgd {
        objective: Objective::DlrTargeted,
        criterion: Criterion::Targeted(1),
        ..cfg
    };
    let go = |c: Pgd, m: &Mlp| c.run(m, Bounds::UNIT, xs, &zeros, &[0.03], 0);
    assert!(matches!(
        go(dlr, &two),
        Err(Error::TooFewClasses {
            needed: 3,
            classes: 2,
            ..
        })
    ));
    assert!(go(dlr, &three).is_ok());
    assert!(matches!(
        go(dlr_t, &three),
        Err(Error::TooFewClasses {
            needed: 4,
            classes: 3,
            ..
        })
    ));
    // A model that does not return (B, K) logits.
    struct Flat;
    impl Module for Flat {
        fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
            xs.flatten_all()
        }
    }
    assert!(matches!(run(&Flat, xs, ys), Err(Error::Input(_))));
    Ok(())
}

/// Attacks work on an f64 model with f64 inputs, returning f64 tensors.
#[test]
fn f64_models_are_attacked_in_their_dtype() -> Result<()> {
    let model = Mlp::random(&[DIM, 8, CLASSES], 1, DType::F64)?;
    let (xs, _) = blobs(16, 3)?;
    let xs = xs.to_dtype(DType::F64)?;
    let ys = model.forward(&xs)?.argmax(1)?;
    let cfg = config(Norm::L2, Objective::CwMargin, 5, StepSize::Relative(0.3));
    let res = &cfg.run(&model, Bounds::UNIT, &xs, &ys, &[2.0], 0)?[0];
    assert_eq!(res.clipped.dtype(), DType::F64);
    assert!(res.success.iter().any(|&s| s));
    Ok(())
}

#[test]
fn rounding_helpers() {
    for (a, x) in [
        (1.0f32, 0.0f32),
        (1.0, 2.0),
        (-1.0, 0.0),
        (-1.0, -2.0),
        (0.3, 0.2),
        (0.0, 1.0),
        (0.0, -1.0),
    ] {
        let n = next_toward(a, x);
        let (a64, n64, x64) = (a as f64, n as f64, x as f64);
        assert!(
            n != a && (n64 - a64).signum() == (x64 - a64).signum(),
            "{a} → {x}: {n}"
        );
        if a != 0.0 {
            assert_eq!(
                n.to_bits().abs_diff(a.to_bits()),
                1,
                "{a} → {x}: not adjacent"
            );
        } else {
            assert_eq!(n.abs(), f32::from_bits(1));
        }
    }
    assert_eq!(next_toward(0.5, 0.5), 0.5);
    let mut v = vec![1, 2, 3, 4, 5, 6];
    retain(&mut v, 2, &[true, false, true]);
    assert_eq!(v, vec![1, 2, 5, 6]);
}

/// Starts and steps run examples in parallel (tasks of about 32,768 coordinates):
/// with inputs of 3,072 values and 40 examples the work is cut into four tasks, and
/// the outcome is the same bits on one thread as on four, for every norm.
#[test]
fn outcome_does_not_depend_on_the_threads() -> Result<()> {
    let (model, xs, ys) = crate::testutil::wide_batch(40)?;
    for (norm, eps) in [
        (Norm::Linf, 8.0 / 255.0),
        (Norm::L2, 0.5),
        (Norm::l1(), 12.0),
        (Norm::L0, 10.0),
    ] {
        let cfg = Pgd {
            momentum: 0.75,
            backtrack: Some(1.5),
            restarts: Restarts::same(2, Init::Uniform),
            ..ce_config(norm, 4, StepSize::Relative(0.25))
        };
        crate::testutil::assert_thread_independent(&format!("{norm:?}"), || {
            cfg.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 9)
        })?;
    }
    Ok(())
}

/// With `last_iterate` FGSM from the clean input returns the stepped point for every
/// example: each coordinate moved by ε (to within one f32 step, rounded towards x) in
/// the gradient's sign direction, or held at a bound, or left where the gradient is
/// zero. The best-point rule may return the clean input instead.
#[test]
fn last_iterate_fgsm_returns_the_stepped_point() -> Result<()> {
    let t = trained();
    let eps = 0.05;
    let fgsm = Fgsm {
        last_iterate: true,
        ..Fgsm::goodfellow()
    };
    let got = &fgsm.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 0)?[0];
    let (_, grad) = crate::input_gradient(&t.model, Objective::CrossEntropy, &t.xs, &t.ys, None)?;
    let (x, g, a) = (rows(&t.xs)?, rows(&grad)?, rows(&got.clipped)?);
    let mut moved = 0;
    for ((xr, gr), ar) in x.iter().zip(&g).zip(&a) {
        for ((&xc, &gc), &ac) in xr.iter().zip(gr).zip(ar) {
            let dir = if gc > 0.0 && xc < 1.0 {
                1.0
            } else if gc < 0.0 && xc > 0.0 {
                -1.0
            } else {
                0.0
            };
            let want = (f64::from(xc) + dir * eps).clamp(0.0, 1.0);
            let step = f64::from(f32::EPSILON) * want.abs().max(1e-30);
            assert!(
                (f64::from(ac) - want).abs() <= step,
                "x {xc}, gradient {gc}: got {ac}, want {want}"
            );
            assert!((f64::from(ac) - f64::from(xc)).abs() <= eps);
            moved += usize::from(dir != 0.0);
        }
    }
    assert!(moved > 0);
    Ok(())
}

/// With `last_iterate` a PGD run with an oversized step returns where it ended: the
/// objective at its points is never above the best-point rule's (which returns the
/// best point evaluated), and below it for some examples.
#[test]
fn last_iterate_returns_the_last_point_not_the_best() -> Result<()> {
    let t = trained();
    let eps = [0.1];
    let best = Pgd {
        steps: 5,
        step_size: StepSize::Relative(1.5),
        restarts: Restarts::same(1, Init::Uniform),
        ..ce_config(Norm::Linf, 5, StepSize::Relative(1.5))
    };
    let last = Pgd {
        last_iterate: true,
        ..best
    };
    let ce = |res: &AttackResult| -> Result<Vec<f32>> {
        let (values, _) =
            crate::input_gradient(&t.model, Objective::CrossEntropy, &res.clipped, &t.ys, None)?;
        Ok(values.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    };
    let b = &best.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 3)?[0];
    let l = &last.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 3)?[0];
    let (cb, cl) = (ce(b)?, ce(l)?);
    let mut lower = 0;
    for (i, (vb, vl)) in cb.iter().zip(&cl).enumerate() {
        // The best rule puts successes first, so compare where both agree on success.
        if b.success[i] == l.success[i] {
            assert!(vl <= &(vb + 1e-5), "example {i}: last {vl} above best {vb}");
            lower += usize::from(vl < &(vb - 1e-4));
        }
    }
    assert!(lower > 0, "the last iterate was the best point everywhere");
    check_result(&t.model, &last, Bounds::UNIT, &t.xs, &t.ys, l)?;
    Ok(())
}

/// The last iterate of several runs, or with early stopping, is refused.
#[test]
fn last_iterate_needs_one_run_without_early_stopping() {
    let base = Pgd {
        last_iterate: true,
        ..Pgd::linf_pgd20()
    };
    assert!(base.validate().is_ok());
    let restarts = Pgd {
        restarts: Restarts::same(2, Init::Uniform),
        ..base
    };
    assert!(restarts.validate().is_err());
    let early = Pgd {
        early_stop: true,
        ..base
    };
    assert!(early.validate().is_err());
}
