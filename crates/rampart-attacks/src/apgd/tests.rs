//! APGD: schedule, invariants, strength and failure modes on small models.

use candle_core::{DType, Device, Tensor};

use super::{checkpoints, Apgd};
use crate::testutil::{
    assert_invariants, count, trained, Masked, Mlp, NanGradient, Noisy, CLASSES,
};
use crate::{
    Attack, Bounds, Criterion, Eot, Error, Init, Norm, Objective, Pgd, Restarts, Result, StepSize,
};

fn quick(norm: Norm, objective: Objective) -> Apgd {
    Apgd {
        steps: 30,
        ..match objective {
            Objective::DlrTargeted => Apgd::dlr_targeted(norm),
            Objective::Dlr => Apgd::dlr(norm),
            _ => Apgd::ce(norm),
        }
    }
}

/// The published checkpoints of a 100-step run: 0.22, 0.41, 0.57, 0.70, 0.80, 0.87,
/// 0.93, 0.99 (Croce & Hein 2020, Sec. 3.1).
#[test]
fn checkpoints_are_the_published_fractions() {
    assert_eq!(checkpoints(100), vec![22, 41, 57, 70, 80, 87, 93, 99]);
    assert_eq!(checkpoints(1), vec![1]);
}

#[test]
fn results_are_feasible_and_successes_hold() -> Result<()> {
    let t = trained();
    for (norm, eps) in [(Norm::Linf, 0.08), (Norm::L2, 0.5), (Norm::l1(), 2.0)] {
        for objective in [Objective::CrossEntropy, Objective::DlrTargeted] {
            let apgd = quick(norm, objective);
            let res = apgd.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps, eps / 4.0], 0)?;
            for r in &res {
                assert_invariants(&t.model, norm, Bounds::UNIT, &t.xs, &t.ys, r)?;
            }
            assert!(
                count(&res[0].success) > count(&res[1].success),
                "{norm} {objective}: {} at ε vs {} at ε/4",
                count(&res[0].success),
                count(&res[1].success)
            );
        }
    }
    Ok(())
}

/// With the 3ε → 2ε → ε schedule the returned points still lie in the ε-ball.
#[test]
fn l1_schedule_returns_points_inside_the_final_ball() -> Result<()> {
    let t = trained();
    let apgd = Apgd {
        steps: 20,
        restarts: 2,
        ..Apgd::ce(Norm::l1())
    };
    assert!(apgd.large_eps_warmup);
    let res = apgd.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[1.0], 3)?;
    assert_invariants(&t.model, Norm::l1(), Bounds::UNIT, &t.xs, &t.ys, &res[0])?;
    Ok(())
}

/// APGD without a step size is at least as strong as a tuned PGD-20 and as PGD with
/// 10 restarts, on the same model and budget.
#[test]
fn apgd_is_at_least_as_strong_as_pgd() -> Result<()> {
    let t = trained();
    let eps = 0.06;
    let pgd = Pgd {
        restarts: Restarts::same(5, Init::Uniform),
        step_size: StepSize::Relative(0.25),
        ..Pgd::linf_pgd20()
    };
    let pgd = count(&pgd.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 0)?[0].success);
    let ce = count(
        &Apgd::ce(Norm::Linf).run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 0)?[0].success,
    );
    let tg = count(
        &Apgd::dlr_targeted(Norm::Linf).run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 0)?[0]
            .success,
    );
    assert!(pgd > 0 && pgd < 64, "PGD fooled {pgd}/64: pick another ε");
    assert!(
        ce >= pgd && tg >= pgd,
        "APGD-CE {ce}, APGD-T {tg}, PGD {pgd}"
    );
    Ok(())
}

#[test]
fn same_seed_same_result() -> Result<()> {
    let t = trained();
    let apgd = quick(Norm::L2, Objective::DlrTargeted);
    let a = apgd.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.4], 9)?;
    let b = apgd.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.4], 9)?;
    let rows = |r: &crate::AttackResult| r.clipped.flatten_all()?.to_vec1::<f32>();
    assert_eq!(rows(&a[0])?, rows(&b[0])?);
    assert_eq!(a[0].iterations, b[0].iterations);
    Ok(())
}

/// An example is attacked on its own random numbers: attacking a subset gives the
/// same points for the examples in it.
#[test]
fn examples_do_not_depend_on_the_batch() -> Result<()> {
    let t = trained();
    let apgd = quick(Norm::Linf, Objective::CrossEntropy);
    let all = apgd.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[0.05], 1)?;
    let all = all[0].clipped.flatten_from(1)?.to_vec2::<f32>()?;
    let batch = crate::batch::Batch::new(&t.model, Bounds::UNIT, &t.xs, &t.ys)?;
    let idx = [3usize, 10, 41];
    let sub = crate::Problem::from_batch(&t.model, batch.subset(&idx)).attack(&apgd, 0.05, 1)?;
    let sub = sub.clipped.flatten_from(1)?.to_vec2::<f32>()?;
    for (r, &i) in idx.iter().enumerate() {
        assert_eq!(sub[r], all[i]);
    }
    Ok(())
}

#[test]
fn too_few_classes_and_bad_configs_are_refused() -> Result<()> {
    let dev = Device::Cpu;
    let three = Mlp::random(&[32, 3], 0, DType::F32)?;
    let two = Mlp::random(&[32, 2], 0, DType::F32)?;
    let xs = Tensor::full(0.5f32, (2, 2, 4, 4), &dev)?;
    let ys = Tensor::new(&[0u32, 1], &dev)?;
    let run = |apgd: Apgd, model: &Mlp| apgd.run(model, Bounds::UNIT, &xs, &ys, &[0.1], 0);
    assert!(matches!(
        run(Apgd::dlr_targeted(Norm::Linf), &three),
        Err(Error::TooFewClasses {
            needed: 4,
            classes: 3,
            ..
        })
    ));
    assert!(matches!(
        run(Apgd::dlr(Norm::Linf), &two),
        Err(Error::TooFewClasses {
            needed: 3,
            classes: 2,
            ..
        })
    ));
    assert!(run(Apgd::dlr(Norm::Linf), &three).is_ok());
    for bad in [
        Apgd {
            steps: 0,
            ..Apgd::ce(Norm::Linf)
        },
        Apgd {
            restarts: 0,
            ..Apgd::ce(Norm::Linf)
        },
        Apgd {
            rho: 0.0,
            ..Apgd::ce(Norm::Linf)
        },
        Apgd {
            alpha: 1.5,
            ..Apgd::ce(Norm::Linf)
        },
        Apgd {
            norm: Norm::L0,
            ..Apgd::ce(Norm::Linf)
        },
        Apgd {
            large_eps_warmup: true,
            ..Apgd::ce(Norm::L2)
        },
        Apgd {
            objective: Objective::Distal,
            ..Apgd::ce(Norm::L2)
        },
        Apgd {
            target_classes: 0,
            ..Apgd::dlr_targeted(Norm::L2)
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?} accepted");
    }
    let _ = Criterion::Misclassified;
    Ok(())
}

/// Zero and NaN gradients neither crash the attack nor leak NaN into its output.
#[test]
fn masked_and_nan_gradients_are_survived() -> Result<()> {
    let t = trained();
    fn check<M: candle_core::Module>(model: &M) -> Result<()> {
        let t = trained();
        let apgd = quick(Norm::L2, Objective::CrossEntropy);
        let res = apgd.run(model, Bounds::UNIT, &t.xs, &t.ys, &[0.3], 0)?;
        assert_invariants(model, Norm::L2, Bounds::UNIT, &t.xs, &t.ys, &res[0])
    }
    check(&Masked(&t.model))?;
    check(&NanGradient(&t.model))
}

/// With EOT, success is judged on the mean probabilities of fresh draws: the noisy
/// model fools no more points than its deterministic core allows.
#[test]
fn eot_runs_on_stochastic_models() -> Result<()> {
    let t = trained();
    let noisy = Noisy::new(&t.model, 0.5, 0);
    let apgd = Apgd {
        steps: 10,
        eot: Eot::new(8, 32)?,
        ..Apgd::dlr(Norm::Linf)
    };
    let res = apgd.run(&noisy, Bounds::UNIT, &t.xs, &t.ys, &[0.08], 0)?;
    let core = crate::testutil::misclassified(&t.model, &res[0].clipped, &t.ys)?;
    let agree = res[0]
        .success
        .iter()
        .zip(&core)
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        agree >= 60,
        "only {agree}/64 judgements agree with the noise-free model"
    );
    let _ = CLASSES;
    Ok(())
}

/// Records the largest batch a model is called with.
struct BatchSizes<'a> {
    base: &'a dyn candle_core::Module,
    largest: std::sync::atomic::AtomicUsize,
}

impl candle_core::Module for BatchSizes<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.largest
            .fetch_max(xs.dim(0)?, std::sync::atomic::Ordering::Relaxed);
        self.base.forward(xs)
    }
}

/// The targeted passes run side by side: 3 correctly classified examples attacked
/// towards all K − 1 = 3 other classes reach the model as one batch of 9 rows.
#[test]
fn target_classes_are_attacked_side_by_side() -> Result<()> {
    let t = trained();
    // Three examples the model classifies correctly.
    let predicted = candle_core::Module::forward(&t.model, &t.xs)?
        .argmax(1)?
        .to_vec1::<u32>()?;
    let labels = t.ys.to_vec1::<u32>()?;
    let rows: Vec<u32> = (0..labels.len() as u32)
        .filter(|&i| predicted[i as usize] == labels[i as usize])
        .take(3)
        .collect();
    assert_eq!(rows.len(), 3);
    let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
    let xs = t.xs.index_select(&rows, 0)?;
    let ys = t.ys.index_select(&rows, 0)?;
    let model = BatchSizes {
        base: &t.model,
        largest: std::sync::atomic::AtomicUsize::new(0),
    };
    let apgd = Apgd {
        steps: 10,
        target_classes: 9,
        ..Apgd::dlr_targeted(Norm::Linf)
    };
    let res = apgd.run(&model, Bounds::UNIT, &xs, &ys, &[0.02], 0)?;
    assert_invariants(&t.model, Norm::Linf, Bounds::UNIT, &xs, &ys, &res[0])?;
    let largest = model.largest.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        largest,
        3 * (CLASSES - 1),
        "the {} targets of 3 examples must form one batch",
        CLASSES - 1
    );
    Ok(())
}

/// Proposals run examples in parallel (tasks of about 32,768 coordinates): with inputs
/// of 3,072 values and 40 examples, four tasks; the outcome is the same bits on one
/// thread as on four, for L∞, L2 and L1 (the last with its warm-up phases).
#[test]
fn outcome_does_not_depend_on_the_threads() -> Result<()> {
    let (model, xs, ys) = crate::testutil::wide_batch(40)?;
    for (norm, eps) in [
        (Norm::Linf, 8.0 / 255.0),
        (Norm::L2, 0.5),
        (Norm::l1(), 12.0),
    ] {
        let apgd = Apgd {
            steps: 12,
            ..Apgd::ce(norm)
        };
        crate::testutil::assert_thread_independent(&format!("{norm:?}"), || {
            apgd.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 5)
        })?;
    }
    Ok(())
}

/// The fused L∞ proposal equals the general arm it replaces, bit for bit: points on
/// the bounds and at the clean input, NaN, infinite and signed-zero gradients, steps
/// past the ball and the box, ε = 0, α = 1 and 0.75.
#[test]
fn fused_linf_proposal_equals_the_reference_arm() -> Result<()> {
    use super::{Proposer, Scratch, State};
    use crate::batch::Batch;
    use rand::{Rng, SeedableRng};
    let (m, d) = (6usize, 257usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let bounds = Bounds { lo: -0.5, hi: 1.5 };
    let x: Vec<f32> = (0..m * d)
        .map(|_| match rng.gen_range(0..6) {
            0 => -0.5,
            1 => 1.5,
            _ => rng.gen_range(-0.5f32..1.5),
        })
        .collect();
    let near = |rng: &mut rand_chacha::ChaCha8Rng, x: &[f32]| -> Vec<f32> {
        x.iter()
            .map(|&v| match rng.gen_range(0..5) {
                0 => v,
                1 => -0.5,
                2 => 1.5,
                _ => (v + rng.gen_range(-0.2f32..0.2)).clamp(-0.5, 1.5),
            })
            .collect()
    };
    let (adv, old) = (near(&mut rng, &x), near(&mut rng, &x));
    let grad: Vec<f32> = (0..m * d)
        .map(|_| match rng.gen_range(0..10) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            _ => rng.gen_range(-1.0f32..1.0),
        })
        .collect();
    let xs = Tensor::from_vec(x, (m, d), &Device::Cpu)?;
    let ys = Tensor::zeros(m, DType::U32, &Device::Cpu)?;
    let model = Mlp::random(&[d, CLASSES], 1, DType::F32)?;
    let batch = Batch::with_classes(&model, bounds, &xs, &ys, Some(CLASSES))?;
    let idx: Vec<usize> = (0..m).collect();
    let state = State {
        adv,
        old,
        grad,
        loss: vec![0.0; m],
        best_point: Vec::new(),
        best_grad: Vec::new(),
        best_loss: Vec::new(),
        best_loss_last_check: Vec::new(),
        reduced_last_check: vec![true; m],
        increases: vec![0; m],
        step: vec![0.0, 1e-3, 0.01, 0.1, 0.5, 4.0],
        topk: vec![0.2; m],
        sparsity_old: vec![d as f64; m],
    };
    let cfg = Apgd::ce(Norm::Linf);
    for (eps, a) in [
        (0.0, 1.0),
        (0.03, 1.0),
        (0.03, 0.75),
        (0.3, 0.75),
        (2.0, 0.5),
    ] {
        for j in 0..m {
            let mut outs = [vec![f64::NAN; d], vec![f64::NAN; d]];
            for (out, reference) in outs.iter_mut().zip([false, true]) {
                let proposer = Proposer {
                    cfg: &cfg,
                    batch: &batch,
                    idx: &idx,
                    reference,
                };
                proposer.propose(j, &state, eps, a, &mut Scratch::new(d), out);
            }
            let bits = |v: &[f64]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&outs[0]), bits(&outs[1]), "ε {eps}, α {a}, row {j}");
        }
    }
    Ok(())
}
