//! The training attack with its batch on the device ([`super::resident`]) against the
//! host path of [`Attack::perturb_with_classes`], on the CPU where the kernels' twins
//! run: the same points, distances, step counts and errors, bit for bit; and its CUDA
//! kernels, run on the CPU, against the twins.

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::device_tests::pgd;
use super::resident::{resident_perturbs, twin, VERDICT};
use crate::testutil::{trained, value_bits, By, Noisy, CLASSES};
use crate::{
    with_device_resident_pgd, Attack, Bounds, Criterion, Eot, Faults, Fgsm, Init, Norm, Objective,
    Perturbed, Pgd, Restarts, Result, StepSize,
};

type Outcome = std::result::Result<Perturbed, crate::Error>;

/// A model whose logits are all NaN.
struct NanLogits;

impl Module for NanLogits {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::full(f32::NAN, (xs.dim(0)?, CLASSES), xs.device())
    }
}

/// Batches the checks refuse: a NaN input, an input outside [0, 1], a label of K.
struct Refused {
    nan: Tensor,
    outside: Tensor,
    bad_label: Tensor,
}

fn refused(xs: &Tensor, ys: &Tensor) -> Result<Refused> {
    let mut x = xs.flatten_all()?.to_vec1::<f32>()?;
    let mut nan = x.clone();
    nan[70] = f32::NAN;
    x[45] = 1.5;
    let mut y = ys.to_vec1::<u32>()?;
    y[7] = CLASSES as u32;
    Ok(Refused {
        nan: Tensor::from_vec(nan, xs.dims(), &Device::Cpu)?,
        outside: Tensor::from_vec(x, xs.dims(), &Device::Cpu)?,
        bad_label: Tensor::new(y.as_slice(), &Device::Cpu)?,
    })
}

/// The attack's `perturb_with_classes` by the host path and by the resident one, which
/// must have run (`resident` = false: must not have run).
fn both<'a>(
    attack: &dyn Attack,
    model: &dyn Fn() -> Box<dyn ModuleT + 'a>,
    bounds: Bounds,
    (xs, ys): (&Tensor, &Tensor),
    (eps, classes): (f64, usize),
    resident: bool,
) -> (Outcome, Outcome) {
    let host = attack.perturb_with_classes(&*model(), bounds, xs, ys, eps, 5, classes);
    let before = resident_perturbs();
    let device = with_device_resident_pgd(|| {
        attack.perturb_with_classes(&*model(), bounds, xs, ys, eps, 5, classes)
    });
    assert_eq!(
        resident_perturbs() > before,
        resident,
        "the resident path ran (or not) against expectation: {:?}",
        device.as_ref().err()
    );
    (host, device)
}

fn assert_same(host: &Perturbed, device: &Perturbed, what: &str) -> Result<()> {
    assert_eq!(host.clipped.dims(), device.clipped.dims(), "{what}: shape");
    assert_eq!(
        host.clipped.dtype(),
        device.clipped.dtype(),
        "{what}: dtype"
    );
    assert_eq!(
        value_bits(&host.clipped)?,
        value_bits(&device.clipped)?,
        "{what}: points"
    );
    let nbits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    assert_eq!(nbits(&host.norm), nbits(&device.norm), "{what}: distances");
    assert_eq!(host.iterations, device.iterations, "{what}: steps");
    assert_eq!(host.eps, device.eps);
    Ok(())
}

/// Every L∞ training attack of the study and the configurations around them, at a
/// budget where about half the points are fooled, in [0, 1] and in [−1, 2].
#[test]
fn resident_perturb_equals_the_host_perturb_for_every_configuration() -> Result<()> {
    let t = trained();
    let model = || Box::new(By(&t.model)) as Box<dyn ModuleT>;
    let attacks: Vec<(&str, Box<dyn Attack>)> = vec![
        ("fast AT's FGSM-RS, best point", Box::new(Fgsm::fast_at())),
        (
            "fast AT's FGSM-RS, last iterate",
            Box::new(Fgsm {
                last_iterate: true,
                ..Fgsm::fast_at()
            }),
        ),
        ("FGSM from the input", Box::new(Fgsm::goodfellow())),
        (
            "PGD-7, last iterate (Madry et al.)",
            Box::new(Pgd {
                last_iterate: true,
                ..Pgd::madry_linf_cifar10()
            }),
        ),
        ("PGD-7, best point", Box::new(Pgd::madry_linf_cifar10())),
        (
            "PGD-10 CE, 3 restarts",
            Box::new(pgd(Objective::CrossEntropy, 10, 3)),
        ),
        (
            "CCAT's training attack (momentum, backtracking)",
            Box::new(Pgd {
                steps: 12,
                ..Pgd::ccat_train()
            }),
        ),
        (
            "CCAT's training attack, last iterate with backtracking",
            Box::new(Pgd {
                steps: 12,
                last_iterate: true,
                ..Pgd::ccat_train()
            }),
        ),
        (
            "CCAT's conf attack (zero, then uniform-norm starts)",
            Box::new(Pgd {
                steps: 15,
                step_size: StepSize::Absolute(0.01),
                restarts: Restarts {
                    count: 3,
                    ..Pgd::ccat_conf_eval().restarts
                },
                ..Pgd::ccat_conf_eval()
            }),
        ),
        ("CW margin, momentum", {
            let mut p = pgd(Objective::CwMargin, 8, 2);
            p.momentum = 0.75;
            Box::new(p)
        }),
        ("targeted", {
            let mut p = pgd(Objective::CrossEntropyTargeted, 10, 2);
            p.criterion = Criterion::Targeted(2);
            Box::new(p)
        }),
        (
            "last iterate, backtracking from an oversized step (rejected candidates)",
            Box::new(Pgd {
                steps: 6,
                step_size: StepSize::Relative(2.5),
                momentum: 0.0,
                backtrack: Some(2.0),
                last_iterate: true,
                ..pgd(Objective::CrossEntropy, 6, 1)
            }),
        ),
        (
            "uniform-norm starts, 2 restarts",
            Box::new(Pgd {
                restarts: Restarts::same(2, Init::UniformNorm),
                ..pgd(Objective::CrossEntropy, 4, 2)
            }),
        ),
    ];
    let wide = Bounds { lo: -1.0, hi: 2.0 };
    let wide_xs = t.xs.affine(3.0, -1.0)?.clamp(-1f32, 2f32)?;
    for (what, attack) in &attacks {
        for eps in [0.0, 0.03, 0.1] {
            let (host, device) = both(
                &**attack,
                &model,
                Bounds::UNIT,
                (&t.xs, &t.ys),
                (eps, CLASSES),
                true,
            );
            assert_same(&host?, &device?, &format!("{what}, ε = {eps}"))?;
        }
        let (host, device) = both(
            &**attack,
            &model,
            wide,
            (&wide_xs, &t.ys),
            (0.3, CLASSES),
            true,
        );
        assert_same(&host?, &device?, &format!("{what}, [−1, 2] box"))?;
    }
    // u8 labels, and a slice of a batch (a view with an offset).
    let (xs, ys) = (t.xs.narrow(0, 3, 20)?, t.ys.narrow(0, 3, 20)?);
    let ys8 = ys.to_dtype(DType::U8)?;
    let cfg = pgd(Objective::CrossEntropy, 5, 2);
    let (host, device) = both(
        &cfg,
        &model,
        Bounds::UNIT,
        (&xs, &ys8),
        (0.1, CLASSES),
        true,
    );
    assert_same(&host?, &device?, "u8 labels, a slice")?;
    // EOT over a stochastic model: a fresh noise source of the same seed for each.
    let eot = Pgd {
        eot: Eot {
            grad_samples: 3,
            eval_samples: 4,
        },
        momentum: 0.5,
        backtrack: Some(1.5),
        ..pgd(Objective::CrossEntropy, 6, 2)
    };
    let noisy = || Box::new(Noisy::new(&t.model, 0.5, 9)) as Box<dyn ModuleT + '_>;
    let (host, device) = both(
        &eot,
        &noisy,
        Bounds::UNIT,
        (&t.xs, &t.ys),
        (0.1, CLASSES),
        true,
    );
    assert_same(&host?, &device?, "EOT")
}

/// Where it does not apply, the host path runs: L2, early stopping, an f64 batch, i64
/// labels.
#[test]
fn resident_perturb_leaves_other_problems_to_the_host_path() -> Result<()> {
    let t = trained();
    let model = || Box::new(By(&t.model)) as Box<dyn ModuleT>;
    let base = pgd(Objective::CrossEntropy, 5, 1);
    let l2 = Pgd {
        norm: Norm::L2,
        ..base
    };
    let early = Pgd {
        early_stop: true,
        ..base
    };
    let batch = (&t.xs, &t.ys);
    for (what, cfg) in [("L2", l2), ("early stopping", early)] {
        let (host, device) = both(&cfg, &model, Bounds::UNIT, batch, (0.3, CLASSES), false);
        assert_same(&host?, &device?, what)?;
    }
    let ys64 = t.ys.to_dtype(DType::I64)?;
    let (host, device) = both(
        &base,
        &model,
        Bounds::UNIT,
        (&t.xs, &ys64),
        (0.1, CLASSES),
        false,
    );
    assert_same(&host?, &device?, "i64 labels")?;
    Ok(())
}

/// Bad inputs, labels, class counts and NaN logits give the host path's errors, word
/// for word.
#[test]
fn resident_perturb_refuses_what_the_host_path_refuses() -> Result<()> {
    let t = trained();
    let model = || Box::new(By(&t.model)) as Box<dyn ModuleT>;
    let cfg = pgd(Objective::CrossEntropy, 3, 2);
    let Refused {
        nan,
        outside,
        bad_label,
    } = refused(&t.xs, &t.ys)?;
    let nan_model = || Box::new(NanLogits) as Box<dyn ModuleT>;
    let cases: Vec<(&str, (&Tensor, &Tensor), usize, bool)> = vec![
        ("a NaN input", (&nan, &t.ys), CLASSES, false),
        (
            "an input outside the bounds",
            (&outside, &t.ys),
            CLASSES,
            false,
        ),
        ("a label of K", (&t.xs, &bad_label), CLASSES, false),
        ("too few classes given", (&t.xs, &t.ys), CLASSES - 2, false),
        ("too many classes given", (&t.xs, &t.ys), CLASSES + 1, false),
        ("NaN logits", (&t.xs, &t.ys), CLASSES, true),
    ];
    for (what, batch, classes, nan_logits) in cases {
        let m: &dyn Fn() -> Box<dyn ModuleT> = if nan_logits { &nan_model } else { &model };
        let (host, device) = both(&cfg, m, Bounds::UNIT, batch, (0.1, classes), true);
        let (Err(h), Err(d)) = (host, device) else {
            panic!("{what}: not refused by both paths")
        };
        assert_eq!(h.to_string(), d.to_string(), "{what}");
    }
    Ok(())
}

/// `perturb_unchecked` on the device-resident path: the points of
/// `perturb_with_classes` bit for bit, the checks left in a tensor whose values stand
/// for the host path's refusals (NaN or out-of-bounds inputs, labels of K, NaN logits),
/// merged over batches by their maximum; off the path, no faults and the same points.
#[test]
fn unchecked_perturb_leaves_the_checks_on_the_device() -> Result<()> {
    let t = trained();
    let model = By(&t.model);
    let attacks: Vec<(&str, Box<dyn Attack>)> = vec![
        (
            "fast AT's FGSM-RS",
            Box::new(Fgsm {
                last_iterate: true,
                ..Fgsm::fast_at()
            }),
        ),
        (
            "PGD-7, 2 restarts",
            Box::new(pgd(Objective::CrossEntropy, 7, 2)),
        ),
    ];
    let read = |f: &Faults| f.tensor().to_vec1::<f64>();
    for (what, attack) in &attacks {
        let checked =
            attack.perturb_with_classes(&model, Bounds::UNIT, &t.xs, &t.ys, 0.1, 5, CLASSES)?;
        let before = resident_perturbs();
        let device = with_device_resident_pgd(|| {
            attack.perturb_unchecked(&model, Bounds::UNIT, &t.xs, &t.ys, 0.1, 5, CLASSES)
        })?;
        assert!(
            resident_perturbs() > before,
            "{what}: the resident path did not run"
        );
        assert_eq!(
            value_bits(&checked.clipped)?,
            value_bits(&device.clipped)?,
            "{what}"
        );
        let faults = device.faults.expect("the device path's checks");
        let values = read(&faults)?;
        assert_eq!(values.len(), Faults::LEN);
        assert_eq!(&values[..3], &[0.0, 0.0, 0.0], "{what}");
        assert!(values[3] <= 0.0, "{what}: {values:?}");
        assert!(Faults::error(&values).is_none(), "{what}");
        // Off the device path: the host's checks, no faults.
        let host = attack.perturb_unchecked(&model, Bounds::UNIT, &t.xs, &t.ys, 0.1, 5, CLASSES)?;
        assert!(host.faults.is_none());
        assert_eq!(
            value_bits(&checked.clipped)?,
            value_bits(&host.clipped)?,
            "{what}"
        );
    }
    let cfg = pgd(Objective::CrossEntropy, 3, 2);
    let Refused {
        nan,
        outside,
        bad_label,
    } = refused(&t.xs, &t.ys)?;
    let good = with_device_resident_pgd(|| {
        cfg.perturb_unchecked(&model, Bounds::UNIT, &t.xs, &t.ys, 0.1, 5, CLASSES)
    })?
    .faults
    .expect("faults");
    // (what, model, batch, the fault's flag, its message, whether a pass may refuse
    // it at once: a label of K fails the objective's gather on the CPU, where the
    // host path's error is returned, while a GPU's kernels only flag it).
    type Case<'a> = (
        &'a str,
        &'a dyn ModuleT,
        (&'a Tensor, &'a Tensor),
        usize,
        &'a str,
        bool,
    );
    let cases: Vec<Case> = vec![
        (
            "a NaN input",
            &model,
            (&nan, &t.ys),
            0,
            "NaN or outside",
            false,
        ),
        (
            "an input outside the bounds",
            &model,
            (&outside, &t.ys),
            0,
            "NaN or outside",
            false,
        ),
        (
            "a label of K",
            &model,
            (&t.xs, &bad_label),
            1,
            "label",
            true,
        ),
        (
            "NaN logits",
            &NanLogits,
            (&t.xs, &t.ys),
            2,
            "NaN logits",
            false,
        ),
    ];
    for (what, m, (xs, ys), flag, says, at_once) in cases {
        let out = with_device_resident_pgd(|| {
            cfg.perturb_unchecked(m, Bounds::UNIT, xs, ys, 0.1, 5, CLASSES)
        });
        let out = match out {
            Err(e) if at_once => {
                let checked = cfg.perturb_with_classes(m, Bounds::UNIT, xs, ys, 0.1, 5, CLASSES);
                let checked = checked.err().map(|e| e.to_string());
                assert_eq!(Some(e.to_string()), checked, "{what}");
                continue;
            }
            out => out?,
        };
        let faults = out.faults.expect("faults");
        let values = read(&faults)?;
        assert!(values[flag] > 0.0, "{what}: {values:?}");
        let e = Faults::error(&values).expect("a fault").to_string();
        assert!(e.contains(says), "{what}: {e}");
        // Merged with a good batch's checks (either order), the fault remains.
        for merged in [good.merge(&faults)?, faults.merge(&good)?] {
            let e = Faults::error(&read(&merged)?).expect("a fault").to_string();
            assert!(e.contains(says), "{what}, merged: {e}");
        }
    }
    // The host's check of the logits' shape is made at once, as the checked path makes it.
    let few = with_device_resident_pgd(|| {
        cfg.perturb_unchecked(&model, Bounds::UNIT, &t.xs, &t.ys, 0.1, 5, CLASSES - 2)
    });
    let checked = cfg.perturb_with_classes(&model, Bounds::UNIT, &t.xs, &t.ys, 0.1, 5, CLASSES - 2);
    assert_eq!(
        few.err().map(|e| e.to_string()),
        checked.err().map(|e| e.to_string())
    );
    assert!(
        Faults::error(&[0.0; 3]).is_some(),
        "a short read is an error"
    );
    assert!(Faults::error(&[0.0, 0.0, 0.0, f64::NAN]).is_some());
    Ok(())
}

/// The four kernels of the resident batch, run on the CPU (`rampart_models::kernels::
/// emulate`), equal their twins bit for bit: the checks on NaN, out-of-bounds and
/// on-bound inputs and labels of K; the starts with and without δ, with δ past the
/// box and the ball; the record's rule on ties, successes, −∞ and `take`; the
/// distances.
#[test]
fn resident_kernels_run_on_the_cpu_equal_their_twins() {
    use super::device::{BEST_OBJ, BEST_SUCCESS, NAN, ROW};
    use rampart_models::kernels::emulate::{Arg, Emulator};
    let mut s = Emulator::of(include_str!("device.cu")).session();
    let (m, d, k) = (9usize, 300usize, 5usize);
    let (mu, du) = (m as u32, d as u32);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let bounds = Bounds { lo: -0.5, hi: 1.5 };
    let mut x: Vec<f32> = (0..m * d)
        .map(|_| match rng.gen_range(0..8) {
            0 => bounds.lo,
            1 => bounds.hi,
            _ => rng.gen_range(-0.5f32..1.5),
        })
        .collect();
    // Row 1: a NaN; row 2: above the box; row 3: below it, at its last value.
    x[d + 17] = f32::NAN;
    x[2 * d + 299] = 1.5001;
    x[4 * d - 1] = -0.75;
    let labels: Vec<u32> = (0..m as u32)
        .map(|j| if j == 5 { k as u32 } else { j % 4 })
        .collect();
    let mut expected_f32: Vec<(String, Vec<f32>)> = Vec::new();
    let mut expected_f64: Vec<(String, Vec<f64>)> = Vec::new();
    s.put("x", &x).put("labels", &labels);

    let unset = vec![f64::NAN; m * VERDICT];
    s.put("checked", &unset);
    s.launch(
        "atk_check",
        [mu, 1, 1],
        [256, 1, 1],
        &[
            Arg::B("checked"),
            Arg::B("x"),
            Arg::B("labels"),
            Arg::U32(du),
            Arg::U32(k as u32),
            Arg::F32(bounds.lo),
            Arg::F32(bounds.hi),
        ],
    );
    let mut checked = unset.clone();
    twin::check(&mut checked, &x, &labels, (d, k), bounds);
    assert_eq!(
        checked
            .chunks(VERDICT)
            .map(|r| (r[0], r[1]))
            .collect::<Vec<_>>()[..6],
        [
            (0.0, 0.0),
            (1.0, 0.0),
            (1.0, 0.0),
            (1.0, 0.0),
            (0.0, 0.0),
            (0.0, 1.0)
        ]
    );
    expected_f64.push(("checked".into(), checked));

    // Starts from x without NaN.
    let x: Vec<f32> = x
        .iter()
        .map(|v| if v.is_nan() { 0.25 } else { v.clamp(-0.5, 1.5) })
        .collect();
    s.put("xs", &x);
    let mut delta: Vec<f64> = (0..m * d).map(|_| rng.gen_range(-0.3..0.3)).collect();
    delta[0] = 5.0;
    delta[1] = -5.0;
    delta[2] = -0.0;
    delta[3] = 1e-9;
    s.put("delta", &delta);
    for (c, (with_delta, eps)) in [(true, 0.1), (true, 0.5), (false, 0.1), (true, 0.0)]
        .into_iter()
        .enumerate()
    {
        let name = format!("start{c}");
        s.put(&name, &vec![f32::NAN; m * d]);
        s.launch_n(
            "atk_start_linf",
            m * d,
            128,
            &[
                Arg::B(&name),
                Arg::B("xs"),
                if with_delta {
                    Arg::B("delta")
                } else {
                    Arg::Null
                },
                Arg::U32(mu * du),
                Arg::F64(eps),
                Arg::F32(bounds.lo),
                Arg::F32(bounds.hi),
            ],
        );
        let mut want = vec![f32::NAN; m * d];
        twin::start_linf(&mut want, &x, with_delta.then_some(&delta[..]), eps, bounds);
        expected_f32.push((name, want));
    }

    // The record's rule: per row a run's (success, objective) against the record's.
    let mut rows = vec![0f64; m * ROW];
    let mut verdict = vec![0f64; m * VERDICT];
    let cases = [
        // (run success, run obj, record success, record obj, nan)
        (false, 0.5, false, 0.25, false),
        (false, 0.25, false, 0.25, false),
        (true, -1.0, false, 3.0, false),
        (false, 3.0, true, -1.0, true),
        (true, 0.5, true, 0.5, false),
        (true, 0.75, true, 0.5, false),
        (false, f64::NEG_INFINITY, false, f64::NEG_INFINITY, false),
        (false, 0.0, false, f64::NEG_INFINITY, true),
        (true, f64::NEG_INFINITY, false, f64::NEG_INFINITY, false),
    ];
    for (j, &(rs, ro, cs, co, n)) in cases.iter().enumerate() {
        let r = &mut rows[j * ROW..(j + 1) * ROW];
        r[BEST_SUCCESS] = f64::from(u8::from(rs));
        r[BEST_OBJ] = ro;
        r[NAN] = f64::from(u8::from(n));
        let v = &mut verdict[j * VERDICT..(j + 1) * VERDICT];
        v[super::resident::RECORD_SUCCESS] = f64::from(u8::from(cs));
        v[super::resident::RECORD_OBJ] = co;
        v[super::resident::DISTANCE] = 0.125;
    }
    let record: Vec<f32> = (0..m * d).map(|_| rng.gen_range(0.0f32..1.0)).collect();
    let point: Vec<f32> = (0..m * d).map(|_| rng.gen_range(0.0f32..1.0)).collect();
    s.put("rows", &rows).put("point", &point);
    for take in [false, true] {
        let (v, r) = (format!("verdict{take}"), format!("record{take}"));
        s.put(&v, &verdict).put(&r, &record);
        s.launch(
            "atk_offer",
            [mu, 1, 1],
            [256, 1, 1],
            &[
                Arg::B(&v),
                Arg::B(&r),
                Arg::B("point"),
                Arg::B("rows"),
                Arg::U32(du),
                Arg::I32(i32::from(take)),
            ],
        );
        let (mut wv, mut wr) = (verdict.clone(), record.clone());
        twin::offer(&mut wv, &mut wr, &point, &rows, d, take);
        if !take {
            let taken: Vec<bool> = (0..m).map(|j| wr[j * d] == point[j * d]).collect();
            let want = [true, false, true, false, false, true, false, true, true];
            assert_eq!(taken, want, "the record's rule");
        }
        expected_f64.push((v, wv));
        expected_f32.push((r, wr));
    }

    // The distances, of the record taken.
    s.put("measured", &verdict);
    s.launch(
        "atk_measure",
        [mu, 1, 1],
        [256, 1, 1],
        &[
            Arg::B("measured"),
            Arg::B("point"),
            Arg::B("xs"),
            Arg::U32(du),
        ],
    );
    let mut measured = verdict.clone();
    twin::measure(&mut measured, &point, &x, d);
    expected_f64.push(("measured".into(), measured));

    let out = s.run();
    crate::testutil::assert_emulated(&out, &expected_f32, &expected_f64);
}

/// The L∞ uniform starts drawn by `atk_draw_linf` (run on the CPU) are the host's
/// draws bit for bit: row i of restart r is `Norm::sample(Init::Uniform)` on
/// `example_rng(seed, r, i)`, for rows of 1 to 3072 values (a block of eight values
/// cut short, several blocks, a CIFAR-10 image), seeds whose sum with r wraps, and
/// radii of 8/255 and 1.
#[test]
fn starts_drawn_on_the_device_are_the_hosts_draws() -> Result<()> {
    use super::device::Executor;
    use crate::batch::example_rng;
    let dev = Device::Cpu;
    for (rows, d) in [(1usize, 1usize), (3, 7), (2, 8), (5, 9), (4, 61), (2, 3072)] {
        for (seed, restart, eps) in [(0u64, 0u64, 8.0 / 255.0), (17, 3, 1.0), (u64::MAX, 2, 0.03)] {
            let run_seed = seed.wrapping_add(restart);
            let drawn = Executor::Emulated
                .draw_linf((rows, d), None, run_seed, eps, &dev)?
                .to_vec1::<f64>()?;
            // The seed read from the device, the restart added there.
            let slot = Tensor::new(&[seed as u32, (seed >> 32) as u32], &dev)?;
            let from_slot = Executor::Emulated
                .draw_linf((rows, d), Some(&slot), restart, eps, &dev)?
                .to_vec1::<f64>()?;
            assert_eq!(
                from_slot.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                drawn.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{rows}×{d}, seed {seed} from the device"
            );
            let mut host = vec![0f64; rows * d];
            for (i, out) in host.chunks_mut(d).enumerate() {
                let mut rng = example_rng(seed, restart, i as u64);
                Norm::Linf.sample(Init::Uniform, eps, 1.0, &mut rng, out);
            }
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&drawn),
                bits(&host),
                "{rows}×{d}, seed {seed}, restart {restart}, ε {eps}"
            );
            assert!(drawn.iter().all(|v| v.abs() <= eps));
        }
    }
    Ok(())
}

/// `unit_uniform` is rand's `Uniform::new_inclusive(-1.0, 1.0)`: the draws it makes
/// from a generator's u64s are the ones `gen_range(-1.0..=1.0)` makes, at the ends of
/// the interval too (the u64s 0 and u64::MAX give −1 and a value ≤ 1).
#[test]
fn the_unit_interval_of_the_device_draws_is_rands() {
    use rand::distributions::{Distribution, Uniform};
    let (low, scale) = super::resident::unit_uniform();
    let uniform = Uniform::new_inclusive(-1.0f64, 1.0);
    let draw =
        |bits: u64| (f64::from_bits((bits >> 12) | 0x3FF0_0000_0000_0000) - 1.0) * scale + low;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..1000 {
        let mut a = rng.clone();
        let bits = a.gen::<u64>();
        assert_eq!(draw(bits).to_bits(), uniform.sample(&mut rng).to_bits());
    }
    assert_eq!(draw(0), -1.0);
    assert!(draw(u64::MAX) <= 1.0 && draw(u64::MAX) > 1.0 - 1e-15);
}
