//! The attacks' device loops with their CUDA launches run on the CPU
//! ([`super::launch::emulated`]): the same [`super::launch::Launch`]es the GPU gets (the
//! argument order and the grid of each included), the kernels' source compiled for the
//! CPU, the loops' tensors written in place. Held to the host loops bit for bit: PGD
//! (L∞ and L2, restarts, momentum, backtracking, EOT, a mask), the training attack with
//! its batch on the device (and its refusals), and APGD (CE and targeted DLR, L∞ and
//! L2).

use candle_core::Tensor;

use super::launch::emulated::{launches, with_emulated_kernels};
use crate::testutil::{trained, value_bits, By, Noisy, TinyConv, CLASSES, SHAPE};
use crate::{
    Apgd, Attack, AttackResult, Bounds, Eot, Fgsm, Frames, Init, Norm, Perturbed, Pgd, Restarts,
    Result, StepSize,
};

/// `f` on the host loops, then with the device loops' launches emulated (which must
/// launch something).
fn both<T>(f: impl Fn() -> Result<T>) -> Result<(T, T)> {
    let host = f()?;
    let before = launches();
    let device = with_emulated_kernels(&f)?;
    assert!(launches() > before, "no launch was emulated");
    Ok((host, device))
}

fn assert_same(host: &[AttackResult], device: &[AttackResult], what: &str) -> Result<()> {
    for (h, d) in host.iter().zip(device) {
        assert_eq!(
            value_bits(&h.clipped)?,
            value_bits(&d.clipped)?,
            "{what}: points"
        );
        assert_eq!(h.success, d.success, "{what}: successes");
        assert_eq!(h.iterations, d.iterations, "{what}: steps");
    }
    Ok(())
}

/// Twelve examples of the trained problem: small grids, so that the emulated launches
/// stay quick.
fn problem() -> Result<(Tensor, Tensor)> {
    let t = trained();
    Ok((t.xs.narrow(0, 0, 12)?, t.ys.narrow(0, 0, 12)?))
}

#[test]
fn pgd_launches_run_on_the_cpu_equal_the_host_loop() -> Result<()> {
    let t = trained();
    let (xs, ys) = problem()?;
    let model = By(&t.model);
    let base = Pgd {
        steps: 6,
        step_size: StepSize::Relative(0.25),
        restarts: Restarts::same(2, Init::Uniform),
        momentum: 0.5,
        backtrack: Some(1.5),
        ..Pgd::madry_linf_cifar10()
    };
    // And an oversized step without backtracking: every candidate becomes the iterate,
    // only the better ones the best point, so the two differ.
    let oversized = Pgd {
        step_size: StepSize::Relative(2.5),
        momentum: 0.0,
        backtrack: None,
        ..base
    };
    for (norm, eps) in [(Norm::Linf, 0.08), (Norm::L2, 0.6)] {
        for (what, cfg) in [("PGD", base), ("oversized PGD", oversized)] {
            let cfg = Pgd { norm, ..cfg };
            let (host, device) = both(|| cfg.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 3))?;
            assert_same(&host, &device, &format!("{what} {norm}"))?;
        }
    }
    // EOT over a stochastic model, and frames (a mask) on a convolutional one.
    let eot = Pgd {
        eot: Eot {
            grad_samples: 2,
            eval_samples: 2,
        },
        ..base
    };
    let (host, device) = both(|| {
        eot.run(
            &Noisy::new(&t.model, 0.5, 9),
            Bounds::UNIT,
            &xs,
            &ys,
            &[0.08],
            3,
        )
    })?;
    assert_same(&host, &device, "EOT")?;
    let conv = TinyConv::random(SHAPE[0], SHAPE[1], SHAPE[2], CLASSES, 5)?;
    let frames = Frames {
        width: 1,
        pgd: Pgd {
            steps: 5,
            ..Pgd::ccat_conf_eval()
        },
    };
    let (host, device) = both(|| frames.run(&conv, Bounds::UNIT, &xs, &ys, &[1.0], 3))?;
    assert_same(&host, &device, "frames")
}

#[test]
fn resident_training_attack_launches_run_on_the_cpu_equal_the_host_path() -> Result<()> {
    let t = trained();
    let (xs, ys) = problem()?;
    let model = By(&t.model);
    let fast = Fgsm {
        last_iterate: true,
        ..Fgsm::fast_at()
    };
    let pgd = Pgd {
        steps: 5,
        restarts: Restarts::same(2, Init::Uniform),
        ..Pgd::madry_linf_cifar10()
    };
    let attacks: [(&str, &dyn Attack); 3] = [
        ("fast AT's FGSM-RS", &fast),
        ("PGD-5, 2 restarts", &pgd),
        ("CCAT's training attack", &Pgd::ccat_train()),
    ];
    let same = |h: &Perturbed, d: &Perturbed, what: &str| -> Result<()> {
        assert_eq!(
            value_bits(&h.clipped)?,
            value_bits(&d.clipped)?,
            "{what}: points"
        );
        assert_eq!(h.norm, d.norm, "{what}: distances");
        assert_eq!(h.iterations, d.iterations, "{what}: steps");
        Ok(())
    };
    for (what, attack) in attacks {
        let (host, device) = both(|| {
            attack.perturb_with_classes(&model, Bounds::UNIT, &xs, &ys, 8.0 / 255.0, 4, CLASSES)
        })?;
        same(&host, &device, what)?;
    }
    // The seed read from the device (a training step's graph): the same points; an
    // attack given another seed than the step's is refused.
    let seed = 4u64;
    let slot = Tensor::new(&[seed as u32, (seed >> 32) as u32], xs.device())?;
    let go = |s: u64| {
        with_emulated_kernels(|| {
            crate::with_seed_on_device(&slot, s, || {
                pgd.perturb_with_classes(&model, Bounds::UNIT, &xs, &ys, 8.0 / 255.0, seed, CLASSES)
            })
        })
    };
    let plain = with_emulated_kernels(|| {
        pgd.perturb_with_classes(&model, Bounds::UNIT, &xs, &ys, 8.0 / 255.0, seed, CLASSES)
    })?;
    same(&plain, &go(seed)?, "PGD-5 with the seed on the device")?;
    let Err(e) = go(seed + 1) else {
        panic!("an attack given another seed than the step's was not refused")
    };
    assert!(e.to_string().contains("seed"), "{e}");
    // A label of K: refused with the host path's words.
    let mut y = ys.to_vec1::<u32>()?;
    y[5] = CLASSES as u32;
    let bad = Tensor::new(y.as_slice(), xs.device())?;
    let go = || fast.perturb_with_classes(&model, Bounds::UNIT, &xs, &bad, 0.03, 4, CLASSES);
    let (host, device) = (go(), with_emulated_kernels(go));
    let (Err(h), Err(d)) = (host, device) else {
        panic!("a label of K was not refused by both paths")
    };
    assert_eq!(h.to_string(), d.to_string());
    Ok(())
}

#[test]
fn apgd_launches_run_on_the_cpu_equal_the_host_loop() -> Result<()> {
    let t = trained();
    let (xs, ys) = problem()?;
    let model = By(&t.model);
    for (norm, eps) in [(Norm::Linf, 0.06), (Norm::L2, 0.5)] {
        for (what, cfg) in [
            ("APGD-CE", Apgd::ce(norm)),
            (
                "APGD-T, 2 targets",
                Apgd {
                    target_classes: 2,
                    ..Apgd::dlr_targeted(norm)
                },
            ),
        ] {
            let cfg = Apgd { steps: 12, ..cfg };
            let (host, device) = both(|| cfg.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 3))?;
            assert_same(&host, &device, &format!("{what} {norm}"))?;
        }
    }
    Ok(())
}
