//! PGD's device-resident loop on a GPU: its CUDA kernels compile (NVRTC, no GPU
//! needed), and on a GPU the loop returns the host loop's points, judgements and step
//! counts bit for bit (the kernels do the host's f64 and f32 operations in order; the
//! model's passes are the same launches either way), wherever two runs of the host
//! loop agree bit for bit (where they do not, the GPU's passes are not deterministic,
//! and the device loop is held to the ε-ball and the host loop's success rate).
//!
//! A training attack with its batch left on the device (`perturb_with_classes` of an
//! L∞ PGD or FGSM on the device loop) is held to the host path the same way, its
//! refusals word for word, and `perturb_unchecked` to it (the same points, its checks
//! on the device finding no fault).
//!
//! APGD's device-resident loop (CE and targeted DLR, L∞ and L2) is held to its host
//! loop likewise.
//!
//! PGD's device-resident runs with their middle steps replayed from CUDA graphs are
//! held to eager runs of the same loop (layer by layer and on the fused eval program),
//! and a stochastic student's runs are not replayed.
//!
//! Built only with `--features cuda`:
//! `cargo test --release -p rampart-attacks --features cuda --test cuda`. With the
//! feature on and no GPU the GPU test fails, on purpose: the build claims CUDA.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, ModuleT, Tensor};
use rampart_attacks::{
    cuda_graph_failure, cuda_graph_steps, with_cuda_graphs, with_device_resident_pgd, Apgd, Attack,
    AttackResult, Bounds, Eot, Faults, Fgsm, Norm, Objective, Pgd, Restarts, StepSize,
};
use rampart_models::{Arch, Classifier, ModelSpec, NoiseSpec};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn attack_kernels_compile_with_nvrtc() -> TestResult {
    let ptx = rampart_attacks::device_kernels_ptx()?;
    for kernel in [
        "atk_accumulate",
        "atk_judge",
        "atk_step_linf",
        "atk_step_l2",
        "atk_check",
        "atk_start_linf",
        "atk_offer",
        "atk_measure",
        "apgd_propose_linf",
        "apgd_propose_l2",
        "apgd_update",
        "apgd_offer",
        "apgd_check",
    ] {
        assert!(ptx.contains(kernel), "{kernel} missing from the PTX");
    }
    Ok(())
}

/// The GPU, and a lock that runs this binary's tests one at a time (one of them
/// switches the fused eval program on for a while).
fn gpu() -> (Device, std::sync::MutexGuard<'static, ()>) {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    let dev = Device::new_cuda(0)
        .expect("a CUDA device (this test binary was built with --features cuda)");
    rampart_models::cuda::prepare(&dev, rampart_models::Precision::F32).unwrap();
    (dev, serial)
}

/// Seeded uniform inputs in [0, 1] and labels.
fn batch(n: usize, dev: &Device) -> Result<(Tensor, Tensor), Box<dyn std::error::Error>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let x: Vec<f32> = (0..n * 3 * 32 * 32).map(|_| rng.gen()).collect();
    let y: Vec<u32> = (0..n).map(|_| rng.gen_range(0..10)).collect();
    Ok((
        Tensor::from_vec(x, (n, 3, 32, 32), dev)?,
        Tensor::from_vec(y, n, dev)?,
    ))
}

fn bits(t: &Tensor) -> Result<Vec<u32>, candle_core::Error> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

/// A WRN-10-2 and a student of it (noise α = 0.1), untrained.
fn wrn_and_student(
    dev: &Device,
) -> Result<[(&'static str, Classifier); 2], Box<dyn std::error::Error>> {
    let mut student = ModelSpec::wrn(10, 2, 10);
    student.noise = Some(NoiseSpec { alpha: 0.1 });
    Ok([
        (
            "WRN-10-2",
            Classifier::new(ModelSpec::wrn(10, 2, 10), 3, dev)?,
        ),
        ("student", Classifier::new(student, 3, dev)?),
    ])
}

/// The device-resident loop's configurations: PGD-10 with restarts, CCAT's attack,
/// fast AT's FGSM, L2 with momentum and backtracking, EOT.
fn pgd_configs() -> [(&'static str, Pgd); 5] {
    let pgd = Pgd {
        steps: 10,
        step_size: StepSize::Relative(0.25),
        restarts: Restarts::same(2, rampart_attacks::Init::Uniform),
        ..Pgd::madry_linf_cifar10()
    };
    [
        ("PGD-10, 2 restarts", pgd),
        (
            "CCAT's conf attack",
            Pgd {
                steps: 20,
                ..Pgd::ccat_train()
            },
        ),
        (
            "fast AT's FGSM",
            Fgsm {
                last_iterate: true,
                ..Fgsm::fast_at()
            }
            .as_pgd(),
        ),
        (
            "PGD-10 L2, momentum, backtracking",
            Pgd {
                norm: Norm::L2,
                momentum: 0.9,
                backtrack: Some(1.5),
                ..pgd
            },
        ),
        (
            "EOT-3 CW",
            Pgd {
                objective: Objective::CwMargin,
                eot: Eot {
                    grad_samples: 3,
                    eval_samples: 3,
                },
                ..pgd
            },
        ),
    ]
}

/// The ε of a configuration's runs.
fn eps_of(cfg: &Pgd) -> [f64; 2] {
    match cfg.norm {
        Norm::L2 => [0.25, 0.5],
        _ => [4.0 / 255.0, 8.0 / 255.0],
    }
}

/// `other`'s results held to `reference`'s: bit for bit where a second run of the
/// reference (`again`) repeated it (the GPU's passes are deterministic), else (a cuDNN
/// algorithm with atomics) to the ε-ball and the reference's success rate.
fn assert_same_or_sound(
    at: &str,
    reference: &[AttackResult],
    again: &[AttackResult],
    other: &[AttackResult],
) -> TestResult {
    let deterministic = reference
        .iter()
        .zip(again)
        .all(|(r, a)| bits(&r.clipped).ok() == bits(&a.clipped).ok());
    assert_eq!(reference.len(), other.len(), "{at}");
    for (r, o) in reference.iter().zip(other) {
        assert_eq!(r.iterations, o.iterations, "{at}: steps");
        if deterministic {
            assert_eq!(bits(&r.clipped)?, bits(&o.clipped)?, "{at}: points");
            assert_eq!(r.success, o.success, "{at}: successes");
        } else {
            eprintln!("{at}: the GPU's passes are not deterministic");
            let count = |v: &[bool]| v.iter().filter(|s| **s).count() as i64;
            let (a, b) = (count(&r.success), count(&o.success));
            assert!((a - b).abs() <= 3, "{at}: {a} against {b} fooled");
            for n in &o.norm {
                assert!(f64::from(*n) <= o.eps * (1.0 + 1e-6), "{at}: ‖δ‖ {n}");
            }
        }
    }
    Ok(())
}

#[test]
fn device_resident_pgd_on_the_gpu_equals_the_host_loop() -> TestResult {
    let (dev, _serial) = gpu();
    let models = wrn_and_student(&dev)?;
    let (xs, ys) = batch(24, &dev)?;
    for (name, model) in &models {
        for (what, cfg) in &pgd_configs() {
            let eps = eps_of(cfg);
            // A student's noise restarts from one seed for each run, whose passes
            // come in the same order.
            let run = |device: bool| {
                model.reseed_noise(17);
                let attack = || cfg.run(model, Bounds::UNIT, &xs, &ys, &eps, 5);
                if device {
                    with_device_resident_pgd(attack)
                } else {
                    attack()
                }
            };
            // The host loop twice: if the GPU's passes are not deterministic here,
            // no run equals another.
            let (host, again, device) = (run(false)?, run(false)?, run(true)?);
            assert_same_or_sound(&format!("{name}, {what}"), &host, &again, &device)?;
        }
    }
    Ok(())
}

#[test]
fn resident_training_attack_on_the_gpu_equals_the_host_path() -> TestResult {
    let (dev, _serial) = gpu();
    let model = Classifier::new(ModelSpec::wrn(10, 2, 10), 3, &dev)?;
    let (xs, ys) = batch(24, &dev)?;
    let eps = 8.0 / 255.0;
    let attacks: Vec<(&str, Box<dyn Attack>)> = vec![
        (
            "fast AT's FGSM-RS, last iterate",
            Box::new(Fgsm {
                last_iterate: true,
                ..Fgsm::fast_at()
            }),
        ),
        ("fast AT's FGSM-RS, best point", Box::new(Fgsm::fast_at())),
        (
            "PGD-7, last iterate",
            Box::new(Pgd {
                last_iterate: true,
                ..Pgd::madry_linf_cifar10()
            }),
        ),
        (
            "PGD-10, 2 restarts",
            Box::new(Pgd {
                steps: 10,
                restarts: Restarts::same(2, rampart_attacks::Init::Uniform),
                ..Pgd::madry_linf_cifar10()
            }),
        ),
        (
            "CCAT's training attack",
            Box::new(Pgd {
                steps: 20,
                ..Pgd::ccat_train()
            }),
        ),
    ];
    let frozen = model.frozen();
    for (what, attack) in &attacks {
        let run = |device: bool| {
            let go = || attack.perturb_with_classes(&frozen, Bounds::UNIT, &xs, &ys, eps, 5, 10);
            if device {
                with_device_resident_pgd(go)
            } else {
                go()
            }
        };
        let (host, again, device) = (run(false)?, run(false)?, run(true)?);
        assert!(
            device.clipped.device().is_cuda(),
            "{what}: points left the GPU"
        );
        // With its checks left on the device: the same points, no fault.
        let unchecked = with_device_resident_pgd(|| {
            attack.perturb_unchecked(&frozen, Bounds::UNIT, &xs, &ys, eps, 5, 10)
        })?;
        if bits(&device.clipped)? == bits(&run(true)?.clipped)? {
            assert_eq!(
                bits(&device.clipped)?,
                bits(&unchecked.clipped)?,
                "{what}: unchecked points"
            );
        }
        let faults = unchecked.faults.ok_or("no faults from the device path")?;
        let values = faults.tensor().to_vec1::<f64>()?;
        assert!(Faults::error(&values).is_none(), "{what}: {values:?}");
        assert_eq!(host.iterations, device.iterations, "{what}: steps");
        // As above: two host runs that differ mean non-deterministic passes.
        if bits(&host.clipped)? == bits(&again.clipped)? {
            assert_eq!(
                bits(&host.clipped)?,
                bits(&device.clipped)?,
                "{what}: points"
            );
            assert_eq!(host.norm, device.norm, "{what}: distances");
        } else {
            eprintln!("{what}: the GPU's passes are not deterministic");
            for n in &device.norm {
                assert!(f64::from(*n) <= eps, "{what}: ‖δ‖ {n}");
            }
            let delta = (device.clipped.to_dtype(DType::F64)? - xs.to_dtype(DType::F64)?)?;
            let most = delta.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(most <= eps, "{what}: ‖δ‖ {most}");
        }
    }
    // A NaN input and a label of K are refused as the host path refuses them.
    let mut x = xs.flatten_all()?.to_vec1::<f32>()?;
    x[5000] = f32::NAN;
    let nan = Tensor::from_vec(x, xs.dims(), &dev)?;
    let mut y = ys.to_vec1::<u32>()?;
    y[3] = 10;
    let bad = Tensor::from_vec(y, ys.dims(), &dev)?;
    let fgsm = Fgsm::fast_at();
    for (what, (x, y)) in [("NaN input", (&nan, &ys)), ("label of K", (&xs, &bad))] {
        let go = || fgsm.perturb_with_classes(&frozen, Bounds::UNIT, x, y, eps, 5, 10);
        let (host, device) = (go(), with_device_resident_pgd(go));
        let (Err(h), Err(d)) = (host, device) else {
            panic!("{what}: not refused by both paths")
        };
        assert_eq!(h.to_string(), d.to_string(), "{what}");
    }
    Ok(())
}

#[test]
fn device_resident_apgd_on_the_gpu_equals_the_host_loop() -> TestResult {
    let (dev, _serial) = gpu();
    let model = Classifier::new(ModelSpec::wrn(10, 2, 10), 3, &dev)?;
    let (xs, ys) = batch(24, &dev)?;
    // Labels the model's predictions, so that every example is attacked.
    let ys = model
        .forward_t(&xs, false)?
        .argmax(1)?
        .to_dtype(ys.dtype())?;
    let frozen = model.frozen();
    let configs = [
        (
            "APGD-CE L∞",
            Apgd {
                steps: 20,
                ..Apgd::ce(Norm::Linf)
            },
            4.0 / 255.0,
        ),
        (
            "APGD-T L∞, 3 targets",
            Apgd {
                steps: 20,
                target_classes: 3,
                ..Apgd::dlr_targeted(Norm::Linf)
            },
            4.0 / 255.0,
        ),
        (
            "APGD-CE L2",
            Apgd {
                steps: 20,
                ..Apgd::ce(Norm::L2)
            },
            0.25,
        ),
    ];
    for (what, cfg, eps) in &configs {
        let run = |device: bool| {
            let go = || cfg.run(&frozen, Bounds::UNIT, &xs, &ys, &[*eps], 5);
            if device {
                with_device_resident_pgd(go)
            } else {
                go()
            }
        };
        let (host, again, device) = (run(false)?, run(false)?, run(true)?);
        let (h, a, d) = (&host[0], &again[0], &device[0]);
        if bits(&h.clipped)? == bits(&a.clipped)? {
            assert_eq!(bits(&h.clipped)?, bits(&d.clipped)?, "{what}: points");
            assert_eq!(h.success, d.success, "{what}: successes");
            assert_eq!(h.iterations, d.iterations, "{what}: steps");
        } else {
            eprintln!("{what}: the GPU's passes are not deterministic");
            let count = |v: &[bool]| v.iter().filter(|s| **s).count() as i64;
            let (a, b) = (count(&h.success), count(&d.success));
            assert!((a - b).abs() <= 3, "{what}: {a} against {b} fooled");
            for n in &d.norm {
                assert!(f64::from(*n) <= eps * (1.0 + 1e-6), "{what}: ‖δ‖ {n}");
            }
        }
    }
    Ok(())
}

#[test]
fn pgd_steps_replayed_from_cuda_graphs_equal_eager_steps() -> TestResult {
    let (dev, _serial) = gpu();
    let [wrn, student] = wrn_and_student(&dev)?;
    let preact = (
        "PreActResNet-18",
        Classifier::new(ModelSpec::cifar(Arch::PreactResnet18, 10), 3, &dev)?,
    );
    let models = [wrn, preact, student];
    let (xs, ys) = batch(24, &dev)?;
    let fused = rampart_models::kernels::device_eval::ENABLE_ENV;
    // The switch as it was, put back however the test ends (the next tests of the
    // binary run with it).
    struct Restore(&'static str, Option<std::ffi::OsString>);
    impl Drop for Restore {
        fn drop(&mut self) {
            match &self.1 {
                Some(v) => std::env::set_var(self.0, v),
                None => std::env::remove_var(self.0),
            }
        }
    }
    let _restore = Restore(fused, std::env::var_os(fused));
    for program in ["layer by layer", "fused eval program"] {
        match program {
            "layer by layer" => std::env::remove_var(fused),
            _ => std::env::set_var(fused, "1"),
        }
        for (name, model) in &models {
            for (what, cfg) in &pgd_configs() {
                // The larger network on the main configuration only (the test's time).
                if *name == "PreActResNet-18" && *what != "PGD-10, 2 restarts" {
                    continue;
                }
                let eps = eps_of(cfg);
                let run = |graphs: bool| {
                    model.reseed_noise(17);
                    let attack = || {
                        with_device_resident_pgd(|| cfg.run(model, Bounds::UNIT, &xs, &ys, &eps, 5))
                    };
                    if graphs {
                        with_cuda_graphs(attack)
                    } else {
                        attack()
                    }
                };
                let (eager, again) = (run(false)?, run(false)?);
                let (captures, launches) = cuda_graph_steps();
                let graphed = run(true)?;
                let (captures, launches) = (
                    cuda_graph_steps().0 - captures,
                    cuda_graph_steps().1 - launches,
                );
                let at = format!("{name}, {what}, {program}");
                if *name == "student" || cfg.steps < 4 {
                    // Its passes draw noise, or the run is too short: no step is
                    // replayed.
                    assert_eq!((captures, launches), (0, 0), "{at}");
                } else {
                    assert!(
                        captures > 0 && launches >= captures * (cfg.steps - 2),
                        "{at}: {captures} captures, {launches} launches; last failure: {:?}",
                        cuda_graph_failure()
                    );
                }
                assert_same_or_sound(&at, &eager, &again, &graphed)?;
            }
        }
    }
    Ok(())
}
