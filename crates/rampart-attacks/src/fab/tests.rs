//! FAB: exact projections, minimal norms on a linear model, invariants.

use candle_core::{DType, Module};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{project_hyperplane_box, Fab};
use crate::testutil::{assert_invariants, count, trained, Masked, Mlp, CLASSES, DIM};
use crate::{Attack, Bounds, Norm, Result};

const NORMS: [Norm; 3] = [Norm::Linf, Norm::L2, Norm::L1 { top_k: 1.0 }];

/// Reference: bisection on the one parameter of each norm's solution family.
fn by_bisection(norm: Norm, w: &[f64], c: f64, lower: &[f64], upper: &[f64]) -> Vec<f64> {
    let at = |p: f64| -> Vec<f64> {
        w.iter()
            .enumerate()
            .map(|(i, &wi)| {
                let v = match norm {
                    Norm::L2 => p * wi * c.signum(),
                    _ => p * (wi * c).signum() * (wi != 0.0) as u8 as f64,
                };
                v.clamp(lower[i], upper[i])
            })
            .collect()
    };
    let reach = |p: f64| at(p).iter().zip(w).map(|(d, w)| d * w).sum::<f64>().abs();
    let (mut lo, mut hi) = (0.0, 1e6);
    for _ in 0..300 {
        let mid = 0.5 * (lo + hi);
        if reach(mid) < c.abs() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    at(hi)
}

#[test]
fn hyperplane_projections_are_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for trial in 0..400 {
        let n = [1, 2, 5, 17, 300][trial % 5];
        let w: Vec<f64> = (0..n)
            .map(|_| {
                if rng.gen_bool(0.1) {
                    0.0
                } else {
                    rng.gen_range(-1.0..1.0)
                }
            })
            .collect();
        let x: Vec<f64> = (0..n).map(|_| rng.gen_range(0.0..1.0)).collect();
        let lower: Vec<f64> = x.iter().map(|x| -x).collect();
        let upper: Vec<f64> = x.iter().map(|x| 1.0 - x).collect();
        let sign = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
        // The largest |w·d| the box allows in the direction of c.
        let max_reach: f64 = w
            .iter()
            .zip(&x)
            .map(|(w, x)| w.abs() * if w * sign > 0.0 { 1.0 - x } else { *x })
            .sum();
        // Mostly reachable hyperplanes, some beyond the box.
        let c = sign * rng.gen_range(0.0..1.2) * max_reach;
        for norm in NORMS {
            let mut d = vec![0.0; n];
            project_hyperplane_box(norm, &w, c, &lower, &upper, &mut d);
            for i in 0..n {
                assert!(d[i] >= lower[i] - 1e-12 && d[i] <= upper[i] + 1e-12);
            }
            let reach: f64 = d.iter().zip(&w).map(|(d, w)| d * w).sum();
            if c.abs() < 0.999 * max_reach {
                assert!(
                    (reach - c).abs() < 1e-9 * (1.0 + c.abs()),
                    "{norm}: w·d = {reach}, c = {c}"
                );
            } else {
                assert!(reach.abs() <= c.abs() + 1e-9);
            }
            match norm {
                Norm::L1 { .. } => {
                    // Greedy optimality: a coordinate is only used when every coordinate
                    // with a larger |w| is at its room.
                    let used = |i: usize| d[i] != 0.0;
                    for i in 0..n {
                        for j in 0..n {
                            if used(i) && w[j].abs() > w[i].abs() && (w[j] * c) != 0.0 {
                                let room = if w[j] * c > 0.0 { upper[j] } else { -lower[j] };
                                assert!((d[j].abs() - room).abs() < 1e-12, "L1: not greedy");
                            }
                        }
                    }
                }
                _ => {
                    let want = by_bisection(norm, &w, c, &lower, &upper);
                    let (got, want) = (norm.measure(&d), norm.measure(&want));
                    assert!(
                        (got - want).abs() < 1e-7 * (1.0 + want),
                        "{norm}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// On a linear model the decision regions are half-spaces, and the smallest
/// adversarial perturbation is the projection of x onto the nearest boundary f_t = f_y
/// within the box, for some t. FAB-T, trying every class, must get close to it and can
/// never go below it.
#[test]
fn fab_finds_minimal_perturbations_of_a_linear_model() -> Result<()> {
    let model = Mlp::random(&[DIM, CLASSES], 5, DType::F32)?;
    let (xs, _) = crate::testutil::blobs(24, 4)?;
    let ys = model.forward(&xs)?.argmax(1)?;
    let weights = model.vars()[0]
        .as_tensor()
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let logits = model.forward(&xs)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let x = xs.flatten_from(1)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let labels = ys.to_vec1::<u32>()?;
    for norm in NORMS {
        let fab = Fab {
            target_classes: CLASSES - 1,
            ..Fab::targeted(norm)
        };
        let res = fab.run(&model, Bounds::UNIT, &xs, &ys, &[1e9], 0)?;
        let found = res[0]
            .unconstrained
            .as_ref()
            .ok_or_else(|| crate::Error::Input("FAB returns its unconstrained point".into()))?
            .flatten_from(1)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        for i in 0..24 {
            let y = labels[i] as usize;
            let lower: Vec<f64> = x[i].iter().map(|v| -v).collect();
            let upper: Vec<f64> = x[i].iter().map(|v| 1.0 - v).collect();
            let mut exact = f64::INFINITY;
            for t in (0..CLASSES).filter(|&t| t != y) {
                let w: Vec<f64> = (0..DIM).map(|c| weights[t][c] - weights[y][c]).collect();
                let mut d = vec![0.0; DIM];
                project_hyperplane_box(
                    norm,
                    &w,
                    logits[i][y] - logits[i][t],
                    &lower,
                    &upper,
                    &mut d,
                );
                let reach: f64 = d.iter().zip(&w).map(|(d, w)| d * w).sum();
                if (reach - (logits[i][y] - logits[i][t])).abs() < 1e-9 {
                    exact = exact.min(norm.measure(&d));
                }
            }
            let delta: Vec<f64> = found[i].iter().zip(&x[i]).map(|(a, b)| a - b).collect();
            let got = norm.measure(&delta);
            assert!(
                res[0].success[i] == exact.is_finite(),
                "{norm}: example {i}"
            );
            if exact.is_finite() {
                assert!(
                    got >= exact * (1.0 - 1e-4),
                    "{norm}: {got} below the minimum {exact}"
                );
                assert!(
                    got <= exact * 1.05,
                    "{norm}: example {i}: {got} vs minimum {exact}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn results_are_feasible_and_successes_hold() -> Result<()> {
    let t = trained();
    for (norm, eps) in [(Norm::Linf, 0.06), (Norm::L2, 0.4), (Norm::l1(), 1.5)] {
        let fab = Fab {
            steps: 30,
            ..Fab::targeted(norm)
        };
        let res = fab.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps, eps / 3.0], 2)?;
        for r in &res {
            assert_invariants(&t.model, norm, Bounds::UNIT, &t.xs, &t.ys, r)?;
        }
        assert!(count(&res[0].success) > count(&res[1].success));
        // The raw output is adversarial wherever the clipped one is.
        let unconstrained = res[0]
            .unconstrained
            .as_ref()
            .ok_or_else(|| crate::Error::Input("FAB returns its unconstrained point".into()))?;
        let raw = crate::testutil::misclassified(&t.model, unconstrained, &t.ys)?;
        assert!(res[0].success.iter().zip(&raw).all(|(s, r)| !s || *r));
    }
    Ok(())
}

#[test]
fn masked_gradients_leave_the_input_unchanged() -> Result<()> {
    let t = trained();
    let fab = Fab {
        steps: 5,
        restarts: 2,
        ..Fab::targeted(Norm::L2)
    };
    let masked = Masked(&t.model);
    let res = fab.run(&masked, Bounds::UNIT, &t.xs, &t.ys, &[0.5], 0)?;
    assert_invariants(&masked, Norm::L2, Bounds::UNIT, &t.xs, &t.ys, &res[0])?;
    Ok(())
}

#[test]
fn bad_configs_are_refused() {
    for bad in [
        Fab {
            steps: 0,
            ..Fab::targeted(Norm::Linf)
        },
        Fab {
            restarts: 0,
            ..Fab::targeted(Norm::Linf)
        },
        Fab {
            target_classes: 0,
            ..Fab::targeted(Norm::Linf)
        },
        Fab {
            alpha_max: 1.5,
            ..Fab::targeted(Norm::Linf)
        },
        Fab {
            eta: 0.5,
            ..Fab::targeted(Norm::Linf)
        },
        Fab {
            beta: 0.0,
            ..Fab::targeted(Norm::Linf)
        },
        Fab::targeted(Norm::L0),
    ] {
        assert!(bad.validate().is_err(), "{bad:?} accepted");
    }
}

/// FAB's steps run examples in parallel (tasks of about 32,768 coordinates): with
/// inputs of 3,072 values and 40 examples, four tasks; the outcome is the same bits on
/// one thread as on four, in L∞, L2 and L1.
#[test]
fn outcome_does_not_depend_on_the_threads() -> Result<()> {
    use crate::Attack;
    let (model, xs, ys) = crate::testutil::wide_batch(40)?;
    for (norm, eps) in [
        (Norm::Linf, 8.0 / 255.0),
        (Norm::L2, 0.5),
        (Norm::l1(), 12.0),
    ] {
        let fab = Fab {
            steps: 8,
            target_classes: 2,
            ..Fab::targeted(norm)
        };
        crate::testutil::assert_thread_independent(&format!("{norm:?}"), || {
            fab.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 5)
        })?;
    }
    Ok(())
}
