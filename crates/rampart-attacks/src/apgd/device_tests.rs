//! APGD's device-resident loop ([`super::device`]) against the host loop, on the CPU
//! where the CUDA kernels' twins run: the same points, judgements and step counts, bit
//! for bit, for AutoAttack's APGD configurations; and its kernels, run on the CPU,
//! against the twins.

use candle_core::{Module, ModuleT, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::device::{
    device_resident_apgd_runs, twin, Update, AROW, BEST_LOSS, EROW, INCREASES, LAST_CHECK, LOSS,
    NAN, NONE, REDUCED, STEP, SUCCESS,
};
use super::Apgd;
use crate::testutil::{trained, value_bits, wide_batch, By, NanGradient, Noisy};
use crate::{with_device_resident_pgd, Attack, AttackResult, Bounds, Eot, Norm, Result};

/// The attack by the host loop and by the device loop (which must have run), each
/// with a fresh model from `model`.
fn both<'a>(
    attack: &dyn Attack,
    model: &dyn Fn() -> Box<dyn ModuleT + 'a>,
    bounds: Bounds,
    (xs, ys): (&Tensor, &Tensor),
    eps: &[f64],
) -> Result<(Vec<AttackResult>, Vec<AttackResult>)> {
    let host = attack.run(&*model(), bounds, xs, ys, eps, 7)?;
    let before = device_resident_apgd_runs();
    let device = with_device_resident_pgd(|| attack.run(&*model(), bounds, xs, ys, eps, 7))?;
    assert!(
        device_resident_apgd_runs() > before,
        "the device loop did not run: {:?}",
        attack.norm()
    );
    Ok((host, device))
}

fn assert_same(host: &[AttackResult], device: &[AttackResult], what: &str) -> Result<()> {
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

/// AutoAttack's APGD configurations (CE, DLR, targeted DLR over every wrong class, side
/// by side) with restarts, in L∞ and L2, on the trained MLP at budgets where part of
/// the batch is fooled early and part never, in [0, 1] and [−1, 2]; NaN gradients; EOT
/// over a stochastic model.
#[test]
fn device_apgd_equals_the_host_loop() -> Result<()> {
    let t = trained();
    let model = || Box::new(By(&t.model)) as Box<dyn ModuleT>;
    let with = |apgd: Apgd| Apgd {
        steps: 25,
        restarts: 2,
        ..apgd
    };
    for norm in [Norm::Linf, Norm::L2] {
        let eps: &[f64] = match norm {
            Norm::Linf => &[0.02, 0.06, 0.15],
            _ => &[0.2, 0.6, 1.5],
        };
        let configs = [
            ("APGD-CE", with(Apgd::ce(norm))),
            ("APGD-DLR", with(Apgd::dlr(norm))),
            ("APGD-T", with(Apgd::dlr_targeted(norm))),
            (
                "APGD-T, 2 targets, α = 0.5, ρ = 0.5",
                Apgd {
                    target_classes: 2,
                    alpha: 0.5,
                    rho: 0.5,
                    ..with(Apgd::dlr_targeted(norm))
                },
            ),
        ];
        for (what, cfg) in &configs {
            let (host, device) = both(cfg, &model, Bounds::UNIT, (&t.xs, &t.ys), eps)?;
            assert!(
                host.iter().any(|r| r.success.iter().any(|s| *s))
                    && host.iter().any(|r| r.success.iter().any(|s| !*s)),
                "{what}: the budgets must fool some examples and not others"
            );
            assert_same(&host, &device, &format!("{what}, {norm}"))?;
        }
        let wide = Bounds { lo: -1.0, hi: 2.0 };
        let xs = t.xs.affine(3.0, -1.0)?.clamp(-1f32, 2f32)?;
        let cfg = with(Apgd::ce(norm));
        let big: Vec<f64> = eps.iter().map(|e| 3.0 * e).collect();
        let (host, device) = both(&cfg, &model, wide, (&xs, &t.ys), &big)?;
        assert_same(&host, &device, &format!("[−1, 2] box, {norm}"))?;
        let nan = || Box::new(NanGradient(&t.model)) as Box<dyn ModuleT + '_>;
        let (host, device) = both(&cfg, &nan, Bounds::UNIT, (&t.xs, &t.ys), eps)?;
        assert_same(&host, &device, &format!("NaN gradients, {norm}"))?;
        let eot = Apgd {
            steps: 10,
            eot: Eot {
                grad_samples: 3,
                eval_samples: 4,
            },
            ..Apgd::dlr(norm)
        };
        let noisy = || Box::new(Noisy::new(&t.model, 0.5, 9)) as Box<dyn ModuleT + '_>;
        let (host, device) = both(&eot, &noisy, Bounds::UNIT, (&t.xs, &t.ys), eps)?;
        assert_same(&host, &device, &format!("EOT, {norm}"))?;
    }
    // Wide inputs: 3,072 values per example, a 100-step run with every checkpoint.
    let (wide_model, xs, _) = wide_batch(12)?;
    // Labels the model's own predictions: every example attacked from the start.
    let ys = wide_model.forward(&xs)?.argmax(1)?;
    let wide_model = || Box::new(By(&wide_model)) as Box<dyn ModuleT + '_>;
    for (norm, eps) in [(Norm::Linf, 4.0 / 255.0), (Norm::L2, 0.3)] {
        let cfg = Apgd::ce(norm);
        let (host, device) = both(&cfg, &wide_model, Bounds::UNIT, (&xs, &ys), &[eps])?;
        assert_same(&host, &device, &format!("3,072 values, 100 steps, {norm}"))?;
    }
    Ok(())
}

/// NaN logits at an attacked point are refused with the host loop's error; L1 and the
/// large-ε schedule stay on the host.
#[test]
fn device_apgd_refuses_nan_logits_and_leaves_l1_to_the_host() -> Result<()> {
    struct NanLogits;
    impl Module for NanLogits {
        fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
            let b = xs.dim(0)?;
            // Finite at the clean inputs (the clean judgement passes), NaN elsewhere.
            let z = (xs.flatten_from(1)?.sum_keepdim(1)? * 0.0)?;
            let nan = (z.clone() / z)?;
            nan.broadcast_as((b, 4))?.contiguous()
        }
    }
    let t = trained();
    let cfg = Apgd {
        steps: 5,
        ..Apgd::ce(Norm::Linf)
    };
    let host = cfg.run(&NanLogits, Bounds::UNIT, &t.xs, &t.ys, &[0.1], 1);
    let device =
        with_device_resident_pgd(|| cfg.run(&NanLogits, Bounds::UNIT, &t.xs, &t.ys, &[0.1], 1));
    let (Err(h), Err(d)) = (host, device) else {
        panic!("NaN logits were not refused by both loops")
    };
    assert_eq!(h.to_string(), d.to_string());
    let before = device_resident_apgd_runs();
    let l1 = Apgd {
        steps: 5,
        ..Apgd::ce(Norm::l1())
    };
    let eps = [2.0];
    let host = l1.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 1)?;
    let device =
        with_device_resident_pgd(|| l1.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &eps, 1))?;
    assert_eq!(
        device_resident_apgd_runs(),
        before,
        "L1 took the device loop"
    );
    assert_same(&host, &device, "L1")
}

/// The five kernels of APGD's device loop, run on the CPU
/// (`rampart_models::kernels::emulate`), equal their twins bit for bit, with rows not
/// attacked, NaN and infinite gradients, points on the bounds, ties and −∞ losses,
/// examples with several rows.
#[test]
fn apgd_kernels_run_on_the_cpu_equal_their_twins() {
    use rampart_models::kernels::emulate::{Arg, Emulator};
    let mut s = Emulator::of(include_str!("../engine/device.cu")).session();
    let (m, d, k) = (8usize, 130usize, 4usize);
    let (mu, du) = (m as u32, d as u32);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let bounds = Bounds { lo: 0.0, hi: 1.0 };
    let x: Vec<f32> = (0..m * d)
        .map(|_| match rng.gen_range(0..6) {
            0 => 0.0,
            1 => 1.0,
            _ => rng.gen_range(0.0f32..1.0),
        })
        .collect();
    let near = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        x.iter()
            .map(|&v| match rng.gen_range(0..5) {
                0 => v,
                1 => 0.0,
                2 => 1.0,
                _ => (v + rng.gen_range(-0.05f32..0.05)).clamp(0.0, 1.0),
            })
            .collect()
    };
    let (adv, old) = (near(&mut rng), near(&mut rng));
    let grad: Vec<f32> = (0..m * d)
        .map(|_| match rng.gen_range(0..12) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => -0.0,
            _ => rng.gen_range(-1.0f32..1.0),
        })
        .collect();
    // Row 7: a gradient of norm about 1e-12, where the L2 step's + 1e-12 matters.
    let mut grad = grad;
    for g in &mut grad[7 * d..8 * d] {
        *g = rng.gen_range(-1e-13f32..1e-13);
    }
    let mut rows = vec![0f64; m * AROW];
    for (j, r) in rows.chunks_mut(AROW).enumerate() {
        r[LOSS] = rng.gen_range(-1.0..1.0);
        r[BEST_LOSS] = if j == 2 {
            r[LOSS]
        } else {
            rng.gen_range(-1.0..1.0)
        };
        r[LAST_CHECK] = if j == 3 {
            r[BEST_LOSS]
        } else {
            rng.gen_range(-1.0..1.0)
        };
        r[REDUCED] = f64::from(u8::from(j % 2 == 0));
        r[INCREASES] = f64::from(rng.gen_range(0..6u8));
        r[STEP] = [0.0, 0.01, 0.05, 0.3, 2.0][j % 5];
        r[SUCCESS] = f64::from(u8::from(j % 3 == 0));
        r[NAN] = f64::from(u8::from(j == 6));
    }
    // Rows 1 and 5 not attacked; the others at shuffled places.
    let pos: Vec<u32> = vec![2, NONE, 0, 5, 1, NONE, 4, 3];
    s.put("x", &x)
        .put("adv", &adv)
        .put("old", &old)
        .put("grad", &grad)
        .put("rows", &rows)
        .put("pos", &pos);
    let mut expected_f32: Vec<(String, Vec<f32>)> = Vec::new();
    let mut expected_f64: Vec<(String, Vec<f64>)> = Vec::new();

    // Proposals.
    for (c, (l2, eps, a)) in [
        (false, 0.03, 1.0),
        (false, 0.1, 0.75),
        (true, 0.5, 0.75),
        (true, 3.0, 1.0),
    ]
    .into_iter()
    .enumerate()
    {
        let (na, no, ns) = (
            format!("padv{c}"),
            format!("pold{c}"),
            format!("pscratch{c}"),
        );
        s.put(&na, &adv)
            .put(&no, &old)
            .put(&ns, &vec![f64::NAN; m * d]);
        let tail = [
            Arg::F64(eps),
            Arg::F64(a),
            Arg::F32(bounds.lo),
            Arg::F32(bounds.hi),
        ];
        let mut args = vec![Arg::B(&na), Arg::B(&no)];
        if l2 {
            args.push(Arg::B(&ns));
        }
        args.extend([
            Arg::B("x"),
            Arg::B("grad"),
            Arg::B("rows"),
            Arg::B("pos"),
            Arg::U32(du),
        ]);
        if l2 {
            args.extend(tail);
            s.launch("apgd_propose_l2", [mu, 1, 1], [256, 1, 1], &args);
        } else {
            args.push(Arg::U32(mu * du));
            args.extend(tail);
            s.launch_n("apgd_propose_linf", m * d, 128, &args);
        }
        let (mut wa, mut wo) = (adv.clone(), old.clone());
        let inputs = twin::ProposeInputs {
            x: &x,
            grad: &grad,
            rows: &rows,
            pos: &pos,
            d,
            eps,
            a,
            bounds,
        };
        twin::propose(&mut wa, &mut wo, &inputs, l2);
        expected_f32.extend([(na, wa), (no, wo)]);
    }

    // Updates: the start, a step with and one without gradients.
    let mut obj: Vec<f64> = (0..m).map(|_| rng.gen_range(-1.0..1.0)).collect();
    obj[1] = f64::NAN;
    obj[4] = rows[3 * AROW + LOSS];
    let mut probs: Vec<f64> = (0..m * k).map(|_| rng.gen_range(0.0..2.0)).collect();
    probs[2 * k + 1] = probs[2 * k + 3];
    probs[5 * k] = f64::NAN;
    let acc_grad: Vec<f32> = (0..m * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let labels: Vec<u32> = (0..m as u32).map(|j| j % k as u32).collect();
    let (best_point, best_grad) = (near(&mut rng), near(&mut rng));
    s.put("obj", &obj)
        .put("probs", &probs)
        .put("agrad", &acc_grad)
        .put("labels", &labels);
    for (c, (first, want_grad)) in [(true, true), (false, true), (false, false)]
        .into_iter()
        .enumerate()
    {
        let names = ["urows", "ugrad", "ubp", "ubg"].map(|n| format!("{n}{c}"));
        s.put(&names[0], &rows)
            .put(&names[1], &grad)
            .put(&names[2], &best_point)
            .put(&names[3], &best_grad);
        let u = Update {
            first,
            want_grad,
            samples: 3,
            step0: 0.0625,
        };
        s.launch(
            "apgd_update",
            [mu, 1, 1],
            [256, 1, 1],
            &[
                Arg::B(&names[0]),
                Arg::B(&names[1]),
                Arg::B(&names[2]),
                Arg::B(&names[3]),
                Arg::B("adv"),
                Arg::B("obj"),
                Arg::B("probs"),
                Arg::B("agrad"),
                Arg::B("labels"),
                Arg::B("pos"),
                Arg::U32(k as u32),
                Arg::U32(du),
                Arg::U32(3),
                Arg::I32(i32::from(first)),
                Arg::I32(i32::from(want_grad)),
                Arg::F64(u.step0),
            ],
        );
        let (mut r, mut g, mut bp, mut bg) = (
            rows.clone(),
            grad.clone(),
            best_point.clone(),
            best_grad.clone(),
        );
        let inputs = twin::UpdateInputs {
            adv: &adv,
            obj: &obj,
            probs: &probs,
            acc_grad: &acc_grad,
            labels: &labels,
            pos: &pos,
            k,
            d,
        };
        twin::update(&mut r, &mut g, &mut bp, &mut bg, &inputs, u);
        let [nr, ng, nbp, nbg] = names;
        expected_f64.push((nr, r));
        expected_f32.extend([(ng, g), (nbp, bp), (nbg, bg)]);
    }

    // Offers: three examples, one with rows 0, 3 and 6 (6 NaN), one with rows 1 and 7
    // (1 not attacked), one with rows 2, 4 and 5 (5 not attacked).
    let row_start: Vec<u32> = vec![0, 3, 5, 8];
    let row_list: Vec<u32> = vec![0, 3, 6, 1, 7, 2, 4, 5];
    let mut orows = rows.clone();
    orows[3 * AROW + LOSS] = orows[0];
    orows[3 * AROW + SUCCESS] = orows[SUCCESS];
    let rec: Vec<f64> = vec![0.0, 0.1, 0.0, 1.0, -0.5, 0.0, 0.0, f64::NEG_INFINITY, 0.0];
    let rec_points: Vec<f32> = (0..3 * d).map(|_| rng.gen_range(0.0f32..1.0)).collect();
    s.put("orows", &orows)
        .put("rec", &rec)
        .put("recp", &rec_points)
        .put("rstart", &row_start)
        .put("rlist", &row_list);
    s.launch(
        "apgd_offer",
        [3, 1, 1],
        [256, 1, 1],
        &[
            Arg::B("rec"),
            Arg::B("recp"),
            Arg::B("orows"),
            Arg::B("adv"),
            Arg::B("pos"),
            Arg::B("rstart"),
            Arg::B("rlist"),
            Arg::U32(du),
        ],
    );
    let (mut wr, mut wp) = (rec.clone(), rec_points.clone());
    twin::offer(
        &mut wr,
        &mut wp,
        &orows,
        &adv,
        &pos,
        (&row_start, &row_list),
        d,
    );
    assert_eq!(wr.len(), 3 * EROW);
    expected_f64.push(("rec".into(), wr));
    expected_f32.push(("recp".into(), wp));

    // Checkpoints.
    for (c, (rho, interval)) in [(0.75, 5u32), (0.0, 3), (1.0, 1)].into_iter().enumerate() {
        let names = ["crows", "cadv", "cgrad"].map(|n| format!("{n}{c}"));
        s.put(&names[0], &rows)
            .put(&names[1], &adv)
            .put(&names[2], &grad);
        s.put("cbp", &best_point).put("cbg", &best_grad);
        s.launch(
            "apgd_check",
            [mu, 1, 1],
            [256, 1, 1],
            &[
                Arg::B(&names[0]),
                Arg::B(&names[1]),
                Arg::B(&names[2]),
                Arg::B("cbp"),
                Arg::B("cbg"),
                Arg::B("pos"),
                Arg::U32(du),
                Arg::F64(rho),
                Arg::U32(interval),
            ],
        );
        let (mut r, mut a, mut g) = (rows.clone(), adv.clone(), grad.clone());
        twin::check(
            &mut r,
            &mut a,
            &mut g,
            (&best_point, &best_grad),
            &pos,
            d,
            (rho, interval as usize),
        );
        let [nr, na, ng] = names;
        expected_f64.push((nr, r));
        expected_f32.extend([(na, a), (ng, g)]);
    }

    let out = s.run();
    crate::testutil::assert_emulated(&out, &expected_f32, &expected_f64);
}
