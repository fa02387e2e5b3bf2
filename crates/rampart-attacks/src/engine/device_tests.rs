//! PGD's device-resident loop ([`super::device`]) against the host loop, on the CPU
//! where the CUDA kernels' twins run: the same points, judgements and step counts,
//! bit for bit, for every L∞ configuration the study runs.

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::device::{twin, Step, LR, ROW};
use super::{Engine, Run};
use crate::batch::Batch;
use crate::problem::Problem;
use crate::testutil::{
    blobs, trained, value_bits, By, InfiniteGradient, Mlp, NanGradient, Noisy, TinyConv, CLASSES,
    DIM, SHAPE,
};
use crate::{
    device_resident_pgd_runs, with_device_resident_pgd, Attack, AttackResult, Bounds, Criterion,
    Distal, Eot, Error, Fgsm, Frames, Init, Norm, Objective, Pgd, Restarts, Result, StepSize,
};

/// The attack's results by the host loop and by the device-resident loop (which must
/// have run).
fn both<'a>(
    attack: &dyn Attack,
    model: &dyn Fn() -> Box<dyn ModuleT + 'a>,
    bounds: Bounds,
    (xs, ys): (&Tensor, &Tensor),
    eps: &[f64],
) -> Result<(Vec<AttackResult>, Vec<AttackResult>)> {
    let host = attack.run(&*model(), bounds, xs, ys, eps, 11)?;
    let before = device_resident_pgd_runs();
    let device = with_device_resident_pgd(|| attack.run(&*model(), bounds, xs, ys, eps, 11))?;
    assert!(
        device_resident_pgd_runs() > before,
        "the device-resident loop did not run"
    );
    Ok((host, device))
}

fn assert_same(host: &[AttackResult], device: &[AttackResult], what: &str) -> Result<()> {
    assert_eq!(host.len(), device.len());
    for (h, d) in host.iter().zip(device) {
        let eps = h.eps;
        assert_eq!(
            value_bits(&h.clipped)?,
            value_bits(&d.clipped)?,
            "{what}: points at ε = {eps}"
        );
        assert_eq!(h.success, d.success, "{what}: successes at ε = {eps}");
        assert_eq!(h.iterations, d.iterations, "{what}: steps at ε = {eps}");
        assert_eq!(h.predicted, d.predicted, "{what}: predictions at ε = {eps}");
    }
    Ok(())
}

/// A configuration of `steps` steps with `restarts` uniform starts (shared with the
/// resident batch's tests).
pub(super) fn pgd(objective: Objective, steps: usize, restarts: usize) -> Pgd {
    Pgd {
        objective,
        steps,
        step_size: StepSize::Relative(0.25),
        restarts: Restarts::same(restarts, Init::Uniform),
        ..Pgd::madry_linf_cifar10()
    }
}

/// Every L∞ configuration of the study's training and evaluation, on the trained MLP
/// (half fooled at the larger ε, so that judgements, restarts and the best point all
/// matter), in [0, 1] and in [−1, 2].
#[test]
fn device_resident_loop_equals_the_host_loop_for_every_configuration() -> Result<()> {
    let t = trained();
    let model = || Box::new(By(&t.model)) as Box<dyn ModuleT>;
    let configs: Vec<(&str, Pgd)> = vec![
        ("PGD-10 CE, 3 restarts", pgd(Objective::CrossEntropy, 10, 3)),
        (
            "CCAT's conf attack (momentum, backtracking, zero then uniform-norm starts)",
            Pgd {
                steps: 25,
                step_size: StepSize::Absolute(0.01),
                restarts: Restarts {
                    count: 3,
                    ..Pgd::ccat_conf_eval().restarts
                },
                ..Pgd::ccat_conf_eval()
            },
        ),
        (
            "CCAT's training attack, last iterate with backtracking",
            Pgd {
                steps: 12,
                last_iterate: true,
                ..Pgd::ccat_train()
            },
        ),
        ("FGSM", Fgsm::goodfellow().as_pgd()),
        (
            "fast AT's FGSM, last iterate",
            Fgsm {
                last_iterate: true,
                ..Fgsm::fast_at()
            }
            .as_pgd(),
        ),
        (
            "PGD-7 last iterate (Madry et al.)",
            Pgd {
                last_iterate: true,
                ..Pgd::madry_linf_cifar10()
            },
        ),
        ("CW margin, momentum", {
            let mut p = pgd(Objective::CwMargin, 8, 2);
            p.momentum = 0.75;
            p
        }),
        ("DLR", pgd(Objective::Dlr, 8, 1)),
        ("targeted", {
            let mut p = pgd(Objective::CrossEntropyTargeted, 10, 2);
            p.criterion = Criterion::Targeted(2);
            p
        }),
        ("confidently misclassified", {
            let mut p = pgd(Objective::Conf, 10, 2);
            p.criterion = Criterion::ConfidentlyMisclassified(0.8);
            p
        }),
    ];
    let eps = [0.0, 0.03, 0.1];
    for (what, cfg) in &configs {
        let (host, device) = both(cfg, &model, Bounds::UNIT, (&t.xs, &t.ys), &eps)?;
        assert_same(&host, &device, what)?;
    }
    // The same configurations in L2 (the last-iterate ones too), at L2 budgets.
    for (what, cfg) in &configs {
        let cfg = Pgd {
            norm: Norm::L2,
            restarts: Restarts::same(cfg.restarts.count, Init::Uniform),
            ..*cfg
        };
        let (host, device) = both(&cfg, &model, Bounds::UNIT, (&t.xs, &t.ys), &[0.25, 1.0])?;
        assert_same(&host, &device, &format!("{what}, L2"))?;
    }
    // Inputs on the bounds of a wider box.
    let wide = Bounds { lo: -1.0, hi: 2.0 };
    let xs = t.xs.affine(3.0, -1.0)?.clamp(-1f32, 2f32)?;
    let (host, device) = both(
        &pgd(Objective::CrossEntropy, 10, 2),
        &model,
        wide,
        (&xs, &t.ys),
        &[0.1, 0.5],
    )?;
    assert_same(&host, &device, "[−1, 2] box")?;
    let l2 = Pgd {
        norm: Norm::L2,
        ..pgd(Objective::CrossEntropy, 10, 2)
    };
    let (host, device) = both(&l2, &model, wide, (&xs, &t.ys), &[0.5, 2.0])?;
    assert_same(&host, &device, "[−1, 2] box, L2")
}

/// Gradients that are NaN or infinite (zeroed by the step), an f64 model, a
/// convolutional model with frames (a mask), distal examples on noise and EOT over a
/// stochastic model.
#[test]
fn device_resident_loop_equals_the_host_loop_on_unusual_models() -> Result<()> {
    let t = trained();
    let eps = [0.05, 0.2];
    let cfg = pgd(Objective::CrossEntropy, 8, 2);
    let nan = || Box::new(NanGradient(&t.model)) as Box<dyn ModuleT + '_>;
    let (host, device) = both(&cfg, &nan, Bounds::UNIT, (&t.xs, &t.ys), &eps)?;
    assert_same(&host, &device, "NaN gradients")?;
    let inf = || Box::new(InfiniteGradient(&t.model)) as Box<dyn ModuleT + '_>;
    let (host, device) = both(&cfg, &inf, Bounds::UNIT, (&t.xs, &t.ys), &eps)?;
    assert_same(&host, &device, "infinite gradients")?;

    let m64 = Mlp::random(&[DIM, 16, CLASSES], 4, DType::F64)?;
    let f64_model = || Box::new(By(&m64)) as Box<dyn ModuleT + '_>;
    let xs64 = t.xs.to_dtype(DType::F64)?;
    let (host, device) = both(&cfg, &f64_model, Bounds::UNIT, (&xs64, &t.ys), &eps)?;
    assert_same(&host, &device, "f64 model")?;

    let conv = TinyConv::random(SHAPE[0], SHAPE[1], SHAPE[2], CLASSES, 5)?;
    let conv_model = || Box::new(By(&conv)) as Box<dyn ModuleT + '_>;
    let frames = Frames {
        width: 1,
        pgd: Pgd {
            steps: 15,
            restarts: Restarts {
                count: 2,
                ..Pgd::ccat_conf_eval().restarts
            },
            ..Pgd::ccat_conf_eval()
        },
    };
    let (host, device) = both(&frames, &conv_model, Bounds::UNIT, (&t.xs, &t.ys), &[1.0])?;
    assert_same(&host, &device, "frames")?;

    let distal = Distal {
        pgd: Pgd {
            steps: 15,
            restarts: Restarts {
                count: 2,
                ..Pgd::ccat_conf_eval().restarts
            },
            ..Distal::ccat(0.9).pgd
        },
    };
    let noise = Distal::noise(
        (16, SHAPE[0], SHAPE[1], SHAPE[2]),
        Bounds::UNIT,
        3,
        &Device::Cpu,
    )?;
    let zeros = Tensor::zeros(16, DType::U32, &Device::Cpu)?;
    let (host, device) = both(
        &distal,
        &conv_model,
        Bounds::UNIT,
        (&noise, &zeros),
        &[0.05],
    )?;
    assert_same(&host, &device, "distal examples")?;

    // EOT: each run gets a fresh noise source with the same seed, so both loops see
    // the same draws in the same order.
    let eot = Pgd {
        eot: Eot {
            grad_samples: 3,
            eval_samples: 4,
        },
        ..pgd(Objective::CrossEntropy, 6, 2)
    };
    let noisy = || Box::new(Noisy::new(&t.model, 0.5, 9)) as Box<dyn ModuleT + '_>;
    let (host, device) = both(&eot, &noisy, Bounds::UNIT, (&t.xs, &t.ys), &eps)?;
    assert_same(&host, &device, "EOT")?;
    // EOT judged on the mean probabilities' confidence, with backtracking.
    let eot_conf = Pgd {
        criterion: Criterion::ConfidentlyMisclassified(0.95),
        momentum: 0.5,
        backtrack: Some(1.5),
        ..pgd(Objective::CrossEntropy, 6, 2)
    };
    let eot_conf = Pgd {
        eot: eot.eot,
        ..eot_conf
    };
    let (host, device) = both(&eot_conf, &noisy, Bounds::UNIT, (&t.xs, &t.ys), &eps)?;
    assert!(host.iter().any(|r| r.success.iter().any(|s| *s)));
    assert_same(&host, &device, "EOT, confidently misclassified")
}

/// NaN logits at an attacked point are refused with the host loop's error.
#[test]
fn device_resident_loop_refuses_nan_logits() -> Result<()> {
    struct NanLogits;
    impl Module for NanLogits {
        fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
            let b = xs.dim(0)?;
            Tensor::full(f32::NAN, (b, CLASSES), xs.device())
        }
    }
    let t = trained();
    let cfg = pgd(Objective::CrossEntropy, 3, 1);
    let host = cfg.run(&NanLogits, Bounds::UNIT, &t.xs, &t.ys, &[0.1], 1);
    let device =
        with_device_resident_pgd(|| cfg.run(&NanLogits, Bounds::UNIT, &t.xs, &t.ys, &[0.1], 1));
    let (Err(Error::Input(h)), Err(Error::Input(d))) = (host, device) else {
        panic!("NaN logits were not refused by both loops")
    };
    assert_eq!(h, d);
    assert!(d.contains("NaN logits"), "{d}");
    Ok(())
}

/// Current iterates near the clean inputs `x` in [0, 1], inside any ε ≥ 0.04: some on
/// the bounds, some at x, the others within 0.04 of it.
fn iterates(rng: &mut ChaCha8Rng, x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&xc| match rng.gen_range(0..5) {
            0 => 0.0f32.max(xc - 0.02),
            1 => 1.0f32.min(xc + 0.02),
            2 => xc,
            _ => (xc + rng.gen_range(-0.04f32..0.04)).clamp(0.0, 1.0),
        })
        .collect()
}

/// Input gradients as a model may return them: NaN, ±∞ and ±0 among values in [−1, 1).
fn raw_gradients(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.gen_range(0..10) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            _ => rng.gen_range(-1.0f32..1.0),
        })
        .collect()
}

/// The per-row scalars of `m` rows, row j stepping by 0.01·(j + 1).
fn step_rows(m: usize) -> Vec<f64> {
    let mut rows = vec![0f64; m * ROW];
    for (j, r) in rows.chunks_mut(ROW).enumerate() {
        r[LR] = 0.01 * (j + 1) as f64;
    }
    rows
}

/// The step kernel's twin equals the host loop's update (direction, momentum, the
/// projections, the rounding) element for element, on gradients that are NaN,
/// infinite, ±0, and on coordinates sitting on the bounds, with a mask.
#[test]
fn step_twin_equals_the_host_update() -> Result<()> {
    let t = trained();
    let (xs, ys) = blobs(8, 7)?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // Clean inputs with coordinates on either bound.
    let mut x = xs.flatten_all()?.to_vec1::<f32>()?;
    for v in x.iter_mut() {
        match rng.gen_range(0..6) {
            0 => *v = 0.0,
            1 => *v = 1.0,
            _ => *v = v.clamp(0.0, 1.0),
        }
    }
    let xs = Tensor::from_vec(x.clone(), xs.dims(), &Device::Cpu)?;
    let batch = Batch::new(&t.model, Bounds::UNIT, &xs, &ys)?;
    let (m, d) = (batch.len(), batch.d);
    let mask: Vec<f64> = (0..d).map(|c| f64::from(u8::from(c % 3 != 0))).collect();
    let cases = [
        (Norm::Linf, false, 0.0),
        (Norm::Linf, true, 0.9),
        (Norm::Linf, false, 0.75),
        (Norm::L2, false, 0.0),
        (Norm::L2, true, 0.9),
    ];
    for (norm, masked, beta) in cases {
        let cfg = Pgd {
            norm,
            momentum: beta,
            ..Pgd::madry_linf_cifar10()
        };
        let problem = Problem::from_batch(&t.model, batch.clone());
        let run = Run {
            cfg: &cfg,
            mask: masked.then_some(mask.as_slice()),
            problem: &problem,
            batch: &batch,
        };
        let engine = Engine {
            cfg: &cfg,
            mask: run.mask,
        };
        assert!(engine.mask.is_some() == masked);
        let eps = 0.05;
        let (adv, grad) = (iterates(&mut rng, &x), raw_gradients(&mut rng, m * d));
        let mom0: Vec<f64> = (0..m * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let rows = step_rows(m);
        let lrs: Vec<f64> = rows.chunks(ROW).map(|r| r[LR]).collect();
        let mut cand = vec![0f32; m * d];
        let mut mom = mom0.clone();
        let step = Step {
            l2: norm == Norm::L2,
            eps,
            beta,
            lo: 0.0,
            hi: 1.0,
        };
        let inputs = twin::StepInputs {
            adv: &adv,
            x: &x,
            grad: &grad,
            rows: &rows,
            mask: run.mask,
            d,
        };
        twin::step(&mut cand, &mut mom, &inputs, step);
        // The host loop's arithmetic, example by example.
        let update = run.update();
        for j in 0..m {
            let span = j * d..(j + 1) * d;
            let mut g = vec![0f64; d];
            update.direction(&grad[span.clone()], &adv[span.clone()], &mut g);
            let mut m_ref = mom0[span.clone()].to_vec();
            for (mc, gc) in m_ref.iter_mut().zip(&g) {
                *mc = beta * *mc + (1.0 - beta) * gc;
            }
            let mut delta: Vec<f64> = (0..d)
                .map(|c| (adv[j * d + c] as f64 - x[j * d + c] as f64) + lrs[j] * m_ref[c])
                .collect();
            let mut out = vec![0f32; d];
            update.finish(j, &mut delta, eps, &mut out);
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&cand[span.clone()]),
                bits(&out),
                "{norm}: points of row {j}"
            );
            let bits64 = |v: &[f64]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits64(&mom[span]),
                bits64(&m_ref),
                "{norm}: momentum of row {j}"
            );
        }
    }
    Ok(())
}

/// The CUDA kernels themselves (`device.cu`), compiled for the CPU and run with one
/// host thread per CUDA thread (`rampart_models::kernels::emulate`), give their CPU
/// twins' results bit for bit: both steps (L∞ and L2, masked or not, with momentum, an
/// ε that binds and one that does not) on gradients that are NaN, infinite and ±0 and
/// on coordinates on the bounds; the judgement under every criterion, at the start,
/// with and without backtracking, on a NaN objective, NaN probabilities, a tied
/// objective and tied probabilities; the EOT sums, first and not, with and without a
/// gradient. Sizes that are no multiple of a block, the launches' block sizes. This
/// checks the kernels' code, not the Rust side of their launches (argument order,
/// grid): the GPU test of `tests/cuda.rs` does.
#[test]
fn cuda_kernels_run_on_the_cpu_equal_their_twins() {
    use super::device::{Judge, BEST_OBJ, BEST_SUCCESS, CUR_OBJ, CUR_SUCCESS};
    use rampart_models::kernels::emulate::{Arg, Emulator};
    let mut s = Emulator::of(include_str!("device.cu")).session();
    let mut expected_f32: Vec<(String, Vec<f32>)> = Vec::new();
    let mut expected_f64: Vec<(String, Vec<f64>)> = Vec::new();
    let (m, d, k) = (7usize, 45usize, 5usize);
    let (mu, du) = (m as u32, d as u32);
    let mut rng = ChaCha8Rng::seed_from_u64(42);

    // The steps.
    let x: Vec<f32> = (0..m * d)
        .map(|_| match rng.gen_range(0..6) {
            0 => 0.0,
            1 => 1.0,
            _ => rng.gen_range(0.0f32..1.0),
        })
        .collect();
    let (adv, grad) = (iterates(&mut rng, &x), raw_gradients(&mut rng, m * d));
    let mom: Vec<f64> = (0..m * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let rows = step_rows(m);
    let mask: Vec<f64> = (0..d).map(|c| f64::from(u8::from(c % 3 != 0))).collect();
    s.put("x", &x)
        .put("adv", &adv)
        .put("grad", &grad)
        .put("rows", &rows)
        .put("mask", &mask);
    let steps = [
        (false, false, 0.0, 0.05),
        (false, true, 0.9, 0.03),
        (true, false, 0.0, 0.05),
        (true, true, 0.75, 0.02),
        (true, false, 0.5, 10.0),
    ];
    let nan = vec![f32::NAN; m * d];
    for (c, &(l2, masked, beta, eps)) in steps.iter().enumerate() {
        let (cand, mo, scratch) = (format!("cand{c}"), format!("mom{c}"), format!("scratch{c}"));
        s.put(&cand, &nan)
            .put(&mo, &mom)
            .put(&scratch, &vec![f64::NAN; m * d]);
        let mask_arg = if masked { Arg::B("mask") } else { Arg::Null };
        let tail = [Arg::F64(eps), Arg::F64(beta), Arg::F32(0.0), Arg::F32(1.0)];
        // (cand, mom[, scratch], adv, x, grad, rows, mask, d[, m·d], ε, β, lo, hi)
        let mut args = vec![Arg::B(&cand), Arg::B(&mo)];
        if l2 {
            args.push(Arg::B(&scratch));
        }
        args.extend([
            Arg::B("adv"),
            Arg::B("x"),
            Arg::B("grad"),
            Arg::B("rows"),
            mask_arg,
        ]);
        args.push(Arg::U32(du));
        if l2 {
            args.extend(tail);
            s.launch("atk_step_l2", [mu, 1, 1], [256, 1, 1], &args);
        } else {
            args.push(Arg::U32(mu * du));
            args.extend(tail);
            s.launch_n("atk_step_linf", m * d, 128, &args);
        }
        let (mut want_cand, mut want_mom) = (nan.clone(), mom.clone());
        let step = Step {
            l2,
            eps,
            beta,
            lo: 0.0,
            hi: 1.0,
        };
        let inputs = twin::StepInputs {
            adv: &adv,
            x: &x,
            grad: &grad,
            rows: &rows,
            mask: masked.then_some(&mask[..]),
            d,
        };
        twin::step(&mut want_cand, &mut want_mom, &inputs, step);
        expected_f32.push((cand, want_cand));
        expected_f64.push((mo, want_mom));
    }

    // The judgements.
    let mut jrows = vec![0f64; m * ROW];
    for r in jrows.chunks_mut(ROW) {
        r[LR] = rng.gen_range(0.001..0.1);
        r[CUR_OBJ] = rng.gen_range(-1.0..1.0);
        r[BEST_OBJ] = rng.gen_range(-1.0..1.0);
        r[BEST_SUCCESS] = f64::from(rng.gen_range(0..2u8));
        r[CUR_SUCCESS] = f64::from(rng.gen_range(0..2u8));
    }
    let mut uniform =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(0.0f32..1.0)).collect() };
    let [jbest, jadv, jgrad, jcand, jacc] = [0; 5].map(|_| uniform(m * d));
    let mut obj: Vec<f64> = (0..m).map(|_| rng.gen_range(-1.0..1.0)).collect();
    obj[1] = f64::NAN;
    obj[2] = jrows[2 * ROW + BEST_OBJ];
    obj[3] = jrows[3 * ROW + CUR_OBJ];
    let mut probs: Vec<f64> = (0..m * k).map(|_| rng.gen_range(0.0..3.0)).collect();
    probs[4 * k + 1] = f64::NAN;
    probs[5 * k] = probs[5 * k + 2];
    let labels: Vec<u32> = (0..m).map(|_| rng.gen_range(0..k as u32)).collect();
    s.put("jcand", &jcand)
        .put("jacc", &jacc)
        .put("obj", &obj)
        .put("probs", &probs)
        .put("labels", &labels);
    let judges = [
        (0, 0, 0.0f32, 3usize, false, true, 0.0),
        (1, 2, 0.0, 3, false, false, 1.5),
        (2, 0, 0.4, 3, true, true, 0.0),
        (3, 0, 0.5, 1, false, true, 1.1),
        (0, 0, 0.0, 2, false, true, 2.0),
    ];
    for (c, &(criterion, target, tau, samples, first, want_grad, backtrack)) in
        judges.iter().enumerate()
    {
        let names = ["jrows", "jbest", "jadv", "jgrad"].map(|n| format!("{n}{c}"));
        s.put(&names[0], &jrows)
            .put(&names[1], &jbest)
            .put(&names[2], &jadv)
            .put(&names[3], &jgrad);
        s.launch(
            "atk_judge",
            [mu, 1, 1],
            [256, 1, 1],
            &[
                Arg::B(&names[0]),
                Arg::B(&names[1]),
                Arg::B(&names[2]),
                Arg::B(&names[3]),
                Arg::B("jcand"),
                Arg::B("jacc"),
                Arg::B("obj"),
                Arg::B("probs"),
                Arg::B("labels"),
                Arg::U32(k as u32),
                Arg::U32(du),
                Arg::U32(samples as u32),
                Arg::I32(criterion),
                Arg::U32(target),
                Arg::F32(tau),
                Arg::I32(i32::from(first)),
                Arg::I32(i32::from(want_grad)),
                Arg::F64(backtrack),
            ],
        );
        let (mut r, mut b, mut a, mut g) =
            (jrows.clone(), jbest.clone(), jadv.clone(), jgrad.clone());
        let judge = Judge {
            criterion,
            target,
            tau,
            samples,
            first,
            want_grad,
            backtrack,
        };
        twin::judge(
            &mut r,
            &mut b,
            &mut a,
            &mut g,
            &jcand,
            &jacc,
            &obj,
            &probs,
            &labels,
            (k, d),
            judge,
        );
        let [nr, nb, na, ng] = names;
        expected_f64.push((nr, r));
        expected_f32.extend([(nb, b), (na, a), (ng, g)]);
    }

    // The EOT sums.
    let aobj: Vec<f64> = (0..m).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let aprobs: Vec<f64> = (0..m * k).map(|_| rng.gen_range(0.0..2.0)).collect();
    let agrad: Vec<f32> = (0..m * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut values: Vec<f64> = (0..m).map(|_| rng.gen_range(-1.0..1.0)).collect();
    values[0] = -0.0;
    let p: Vec<f32> = (0..m * k).map(|_| rng.gen_range(0.0f32..1.0)).collect();
    let g: Vec<f32> = (0..m * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    s.put("values", &values).put("p", &p).put("g", &g);
    for c in 0..4 {
        let (first, with_grad) = (c & 1 != 0, c & 2 != 0);
        let names = ["aobj", "aprobs", "agrad"].map(|n| format!("{n}{c}"));
        s.put(&names[0], &aobj)
            .put(&names[1], &aprobs)
            .put(&names[2], &agrad);
        s.launch_n(
            "atk_accumulate",
            m * d,
            128,
            &[
                Arg::B(&names[0]),
                Arg::B(&names[1]),
                Arg::B(&names[2]),
                Arg::B("values"),
                Arg::B("p"),
                if with_grad { Arg::B("g") } else { Arg::Null },
                Arg::U32(mu),
                Arg::U32((m * k) as u32),
                Arg::U32(mu * du),
                Arg::U32(3),
                Arg::I32(i32::from(first)),
            ],
        );
        let (mut o, mut pr, mut gr) = (aobj.clone(), aprobs.clone(), agrad.clone());
        let g = with_grad.then_some(&g[..]);
        twin::accumulate(&mut o, &mut pr, &mut gr, &values, &p, g, 3, first);
        let [no, np, ng] = names;
        expected_f64.extend([(no, o), (np, pr)]);
        expected_f32.push((ng, gr));
    }

    let out = s.run();
    crate::testutil::assert_emulated(&out, &expected_f32, &expected_f64);
    assert_eq!(expected_f32.len() + expected_f64.len(), 42);
}
