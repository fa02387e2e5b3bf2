use super::*;
use clap::Parser;
use rampart_attacks::StepSize;
use rampart_defenses::{AdversarialTraining, ArAdaLsConfig, Ccat, FastAt, Normal, RegMixup, Sat};

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: TrainArgs,
}

/// The plan of `rampart train FLAGS`.
fn parse(flags: &str) -> Result<TrainPlan> {
    let argv = std::iter::once("train").chain(flags.split_whitespace());
    Wrapper::try_parse_from(argv)?.args.plan(None)
}

/// The plan of `rampart train BASE FLAGS`.
fn plan(flags: &str) -> Result<TrainPlan> {
    parse(&format!("{BASE} {flags}"))
}

fn error(flags: &str) -> String {
    parse(flags)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default()
}

const BASE: &str = "--data-dir d --out o";

#[test]
fn defaults_fill_what_flags_leave_open() -> Result<()> {
    let p = plan("--arch wrn-16-4 --epochs 3")?;
    assert_eq!(p.arch.to_string(), "wrn-16-4");
    assert_eq!(p.dataset, DatasetKind::Cifar10);
    let c = &p.config;
    assert_eq!((c.epochs, c.batch_size, c.lr, c.seed), (3, 128, 0.1, 0));
    assert_eq!(
        c.sgd,
        SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            decay_scope: DecayScope::All
        }
    );
    assert_eq!(c.schedule, ScheduleKind::Cosine);
    assert_eq!(
        c.augmentation,
        AugmentationConfig {
            crop_padding: 4,
            flip: true,
            cutout: None
        }
    );
    assert_eq!(p.method, MethodPlan::Normal(Normal::new()));
    Ok(())
}

#[test]
fn preset_values_are_overridden_by_flags() -> Result<()> {
    let p = plan("--preset normal-wrn28-10")?;
    assert_eq!(p.arch.to_string(), "wrn-28-10");
    assert_eq!(p.config.epochs, 200);
    assert_eq!(
        p.config.schedule,
        ScheduleKind::Multistep {
            milestones: vec![Milestone::Fraction(0.5), Milestone::Fraction(0.75)],
            gamma: 0.1
        }
    );
    // Fractions follow an overridden epoch count; other flags win over the preset.
    let p = plan(
        "--preset normal-wrn28-10 --epochs 10 --arch wrn-16-1 --lr 0.05 --no-nesterov --cutout 16",
    )?;
    assert_eq!(
        (p.config.epochs, p.config.lr, p.config.sgd.nesterov),
        (10, 0.05, false)
    );
    assert_eq!(p.arch.to_string(), "wrn-16-1");
    assert_eq!(p.config.augmentation.cutout, Some(16));
    assert!((p.config.lr_schedule()?.lr(5.5) - 0.005).abs() < 1e-12);
    // Switching the schedule drops the preset's multistep parameters.
    let p = plan("--preset normal-wrn28-10 --schedule exponential")?;
    assert_eq!(p.config.schedule, ScheduleKind::Exponential { gamma: 0.95 });
    let p = plan("--preset normal-preact-resnet18")?;
    assert_eq!(p.config.schedule, ScheduleKind::Cyclic { peak: 0.4 });
    assert_eq!(p.config.lr, 0.2);
    Ok(())
}

#[test]
fn schedules_take_their_parameters() -> Result<()> {
    let p = plan("--arch resnet20 --epochs 200 --schedule multistep --milestones 100,150 --gamma 0.2 --warmup-epochs 5")?;
    assert_eq!(
        p.config.schedule,
        ScheduleKind::Multistep {
            milestones: vec![Milestone::Epoch(100.0), Milestone::Epoch(150.0)],
            gamma: 0.2
        }
    );
    assert_eq!(p.config.warmup_epochs, 5.0);
    let p =
        plan("--arch resnet20 --epochs 200 --schedule exponential --lr 0.075 --batch-size 100")?;
    assert_eq!(p.config.schedule, ScheduleKind::Exponential { gamma: 0.95 });
    let p = plan("--arch resnet20 --epochs 4 --schedule cyclic --peak 0.25 --augment none --decay-scope weights-only --label-smoothing 0.1")?;
    assert_eq!(p.config.schedule, ScheduleKind::Cyclic { peak: 0.25 });
    assert_eq!(
        p.config.augmentation,
        AugmentationConfig {
            crop_padding: 0,
            flip: false,
            cutout: None
        }
    );
    assert_eq!(p.config.sgd.decay_scope, DecayScope::WeightsOnly);
    assert_eq!(
        p.method,
        MethodPlan::Normal(Normal {
            label_smoothing: 0.1
        })
    );
    Ok(())
}

#[test]
fn methods_take_their_defaults_presets_and_flags() -> Result<()> {
    let p = plan("--arch wrn-16-4 --epochs 3 --method at")?;
    assert_eq!(
        p.method,
        MethodPlan::At(AdversarialTraining::madry_cifar10())
    );
    let p = plan("--arch wrn-16-4 --epochs 3 --method at --eps 16/255 --attack-steps 3 --attack-step-size 4/255 --adv-fraction 0.5")?;
    let MethodPlan::At(at) = p.method else {
        bail!("expected at, got {:?}", p.method)
    };
    assert_eq!(
        (at.eps, at.attack.steps, at.fraction),
        (16.0 / 255.0, 3, 0.5)
    );
    assert_eq!(at.attack.step_size, StepSize::Absolute(4.0 / 255.0));

    // The preset trains on the attack's last iterate, as Madry et al.'s code does.
    let p = plan("--preset at-wrn28-10")?;
    let pgd10 = AdversarialTraining::pgd10_cifar10();
    assert_eq!(
        p.method,
        MethodPlan::At(AdversarialTraining {
            attack: rampart_attacks::Pgd {
                last_iterate: true,
                ..pgd10.attack
            },
            ..pgd10
        })
    );
    let q = plan("--arch wrn-16-4 --epochs 3 --method at --attack-last-iterate")?;
    let MethodPlan::At(at) = q.method else {
        bail!("expected at")
    };
    assert!(at.attack.last_iterate);
    let err = error(&format!(
        "{BASE} --arch wrn-16-4 --epochs 3 --method trades --attack-last-iterate"
    ));
    assert!(err.contains("--attack-last-iterate"), "{err}");
    assert_eq!(
        (p.config.epochs, p.arch.to_string().as_str()),
        (150, "wrn-28-10")
    );
    // A flag overrides the preset's attack, the rest of it stays.
    let p = plan("--preset at-wrn28-10 --attack-steps 3")?;
    let MethodPlan::At(at) = p.method else {
        bail!("expected at")
    };
    assert_eq!((at.attack.steps, at.eps), (3, 0.03));

    let p = plan("--preset ccat-resnet20")?;
    assert_eq!(p.method, MethodPlan::Ccat(Ccat::stutz_cifar10()));
    let c = &p.config;
    assert_eq!((c.epochs, c.batch_size, c.lr), (200, 100, 0.075));
    assert_eq!(c.schedule, ScheduleKind::Exponential { gamma: 0.95 });
    let p = plan("--preset ccat-resnet20 --rho 4 --adv-fraction 1")?;
    let MethodPlan::Ccat(ccat) = p.method else {
        bail!("expected ccat")
    };
    assert_eq!((ccat.rho, ccat.fraction, ccat.eps), (4.0, 1.0, 0.03));

    // Fast AT's preset trains on the stepped point (the last iterate), PGD-7 too.
    let last = |mut m: MethodPlan| {
        match &mut m {
            MethodPlan::FastAt(f) => f.attack.last_iterate = true,
            MethodPlan::At(a) => a.attack.last_iterate = true,
            _ => {}
        }
        m
    };
    let p = plan("--preset fast-at-preact-resnet18")?;
    assert_eq!(p.method, last(MethodPlan::FastAt(FastAt::wong_cifar10())));
    assert_eq!(p.config.schedule, ScheduleKind::Cyclic { peak: 0.4 });
    assert!(!p.config.sgd.nesterov);
    let p = plan("--preset fast-at-preact-resnet18 --method at")?;
    assert_eq!(
        p.method,
        last(MethodPlan::At(AdversarialTraining::madry_cifar10()))
    );

    let p = plan("--preset trades-wrn34-10 --beta 1")?;
    let MethodPlan::Trades(t) = p.method else {
        bail!("expected trades")
    };
    assert_eq!((t.beta, t.eps, t.steps), (1.0, 0.031, 10));
    assert_eq!(p.config.sgd.weight_decay, 2e-4);
    assert!((p.config.lr_schedule()?.lr(74.5) - 0.01).abs() < 1e-12);
    assert!((p.config.lr_schedule()?.lr(73.5) - 0.1).abs() < 1e-12);

    let p = plan("--arch wrn-16-4 --epochs 3 --ema 0.999 --threshold-held-out 0")?;
    assert_eq!(p.config.ema, Some(0.999));
    assert_eq!(p.threshold_held_out, 0);
    Ok(())
}

#[test]
fn calibration_methods_take_their_defaults_and_flags() -> Result<()> {
    let base = "--arch wrn-16-4 --epochs 3";
    let p = plan(&format!("{base} --method regmixup"))?;
    assert_eq!(p.method, MethodPlan::RegMixup(RegMixup::pinto_cifar10()));
    assert_eq!(RegMixup::pinto_cifar10().alpha, 20.0);
    let p = plan(&format!("{base} --method regmixup --mixup-alpha 0.5"))?;
    assert_eq!(p.method, MethodPlan::RegMixup(RegMixup { alpha: 0.5 }));

    let p = plan(&format!("{base} --method sat"))?;
    assert_eq!(p.method, MethodPlan::Sat(Sat::cifar10()));
    let MethodPlan::Sat(sat) = p.method else {
        bail!("expected sat")
    };
    assert_eq!(
        (sat.eps, sat.beta, sat.attack.steps),
        (8.0 / 255.0, 1.0, 10)
    );
    assert_eq!(sat.attack.step_size, StepSize::Absolute(2.0 / 255.0));
    assert_eq!((sat.sinkhorn_eps, sat.sinkhorn_iters), (1.0, 50));
    let p = plan(&format!(
        "{base} --method sat --eps 4/255 --attack-steps 5 --attack-step-size 1/255 --beta 0.5"
    ))?;
    let MethodPlan::Sat(sat) = p.method else {
        bail!("expected sat")
    };
    assert_eq!((sat.eps, sat.beta, sat.attack.steps), (4.0 / 255.0, 0.5, 5));
    assert_eq!(sat.attack.step_size, StepSize::Absolute(1.0 / 255.0));
    // A preset's attack carries over to sat like to at.
    let p = plan("--preset at-wrn28-10 --method sat")?;
    let MethodPlan::Sat(sat) = p.method else {
        bail!("expected sat")
    };
    assert_eq!((sat.eps, sat.attack.steps), (0.03, 10));
    assert_eq!(sat.attack.step_size, StepSize::Absolute(0.007));

    let p = plan(&format!("{base} --method ar-adals"))?;
    assert_eq!(p.method, MethodPlan::ArAdaLs(ArAdaLsConfig::qin_cifar10()));
    let p = plan(&format!(
        "{base} --method ar-adals --eps 4/255 --label-smoothing 0.2"
    ))?;
    let MethodPlan::ArAdaLs(c) = p.method else {
        bail!("expected ar-adals")
    };
    assert_eq!((c.eps, c.initial_smoothing), (4.0 / 255.0, 0.2));
    assert_eq!((c.max_smoothing, c.rate, c.momentum), (0.5, 0.1, 0.9));
    // The plan's method is built fresh, with the names used in files.
    assert_eq!(p.method.method()?.name(), "ar-adals");
    assert!(p.method.method()?.state().is_some());
    let json = p.to_json("rampart train")?;
    assert_eq!(json["method"], "ar-adals");
    assert_eq!(json["method_settings"]["initial_smoothing"], 0.2);
    Ok(())
}

#[test]
fn method_flags_the_method_does_not_use_are_refused() {
    let base = format!("{BASE} --arch wrn-16-4 --epochs 3");
    for (flags, needle) in [
        ("--eps 8/255", "--eps does not apply to --method normal"),
        (
            "--method at --beta 6",
            "--beta does not apply to --method at",
        ),
        (
            "--method at --rho 10",
            "--rho does not apply to --method at",
        ),
        (
            "--method trades --adv-fraction 0.5",
            "--adv-fraction does not apply",
        ),
        (
            "--method fast-at --attack-steps 3",
            "--attack-steps does not apply",
        ),
        (
            "--method ccat --label-smoothing 0.1",
            "--label-smoothing does not apply",
        ),
        ("--method at --adv-fraction 0", "adversarial fraction"),
        ("--method at --adv-fraction 1.5", "adversarial fraction"),
        ("--method ccat --rho 0", "ρ must be"),
        ("--method at --attack-steps 0", "at least one step"),
        (
            "--method at --attack-step-size 0",
            "--attack-step-size must be > 0",
        ),
        ("--method at --eps -1", "--eps"),
        ("--method at --eps x", "--eps"),
        ("--method trades --beta -1", "β"),
        (
            "--method at --label-smoothing 0",
            "--label-smoothing does not apply",
        ),
        (
            "--method normal --mixup-alpha 20",
            "--mixup-alpha does not apply to --method normal",
        ),
        (
            "--method sat --mixup-alpha 20",
            "--mixup-alpha does not apply",
        ),
        ("--method regmixup --eps 8/255", "--eps does not apply"),
        ("--method regmixup --beta 1", "--beta does not apply"),
        (
            "--method regmixup --label-smoothing 0.1",
            "--label-smoothing does not apply",
        ),
        ("--method regmixup --mixup-alpha 0", "α must be"),
        ("--method regmixup --mixup-alpha -2", "α must be"),
        (
            "--method sat --adv-fraction 0.5",
            "--adv-fraction does not apply",
        ),
        ("--method sat --rho 10", "--rho does not apply"),
        (
            "--method sat --label-smoothing 0.1",
            "--label-smoothing does not apply",
        ),
        ("--method sat --beta -1", "β must be"),
        ("--method sat --eps -1", "--eps"),
        (
            "--method sat --attack-step-size 0",
            "--attack-step-size must be > 0",
        ),
        ("--method sat --attack-steps 0", "at least one step"),
        (
            "--method ar-adals --attack-steps 3",
            "--attack-steps does not apply",
        ),
        ("--method ar-adals --beta 1", "--beta does not apply"),
        (
            "--method ar-adals --adv-fraction 1",
            "--adv-fraction does not apply",
        ),
        (
            "--method ar-adals --label-smoothing 0.6",
            "initial smoothing",
        ),
        (
            "--method ar-adals --label-smoothing -0.1",
            "initial smoothing",
        ),
        ("--method ar-adals --eps -1", "--eps"),
        ("--ema 1", "EMA decay"),
    ] {
        let err = error(&format!("{base} {flags}"));
        assert!(
            err.contains(needle),
            "`{flags}`: expected `{needle}` in `{err}`"
        );
    }
}

#[test]
fn bad_values_get_clear_errors() {
    let arch = "--arch wrn-16-4";
    for (flags, needle) in [
        (
            format!("--out o {arch} --epochs 1"),
            "--data-dir is required",
        ),
        (format!("{BASE} --epochs 1"), "--arch is required"),
        (format!("{BASE} {arch}"), "--epochs is required"),
        (
            format!("{BASE} {arch} --epochs 0"),
            "--epochs must be at least 1",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --batch-size 0"),
            "--batch-size must be at least 1",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --lr 0"),
            "--lr must be a finite number > 0",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --lr -0.1"),
            "--lr must be a finite number > 0",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --lr nan"),
            "--lr must be a finite number > 0",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --momentum 1"),
            "--momentum must lie in [0, 1)",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --momentum 0 --nesterov"),
            "--nesterov needs",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --weight-decay -1"),
            "--weight-decay",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --gamma 0.5"),
            "--gamma does not apply to the cosine schedule",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --schedule cyclic --milestones 50%"),
            "--milestones does not apply",
        ),
        (
            format!("{BASE} {arch} --epochs 10 --schedule multistep --milestones soon"),
            "milestone `soon`",
        ),
        (
            format!("{BASE} {arch} --epochs 10 --schedule multistep --milestones 12"),
            "outside the run",
        ),
        (
            format!("{BASE} {arch} --epochs 10 --schedule multistep --gamma 2"),
            "gamma must lie in (0, 1]",
        ),
        (
            format!("{BASE} {arch} --epochs 10 --schedule cyclic --peak 1"),
            "peak must lie in (0, 1)",
        ),
        (
            format!("{BASE} {arch} --epochs 2 --warmup-epochs 3"),
            "--warmup-epochs",
        ),
        (format!("{BASE} {arch} --epochs 1 --cutout 0"), "--cutout"),
        (
            format!("{BASE} {arch} --epochs 1 --train-limit 0"),
            "--train-limit",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --eval-batch-size 0"),
            "--eval-batch-size",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --label-smoothing 1"),
            "label smoothing",
        ),
        (
            format!("{BASE} --arch wrn-15-4 --epochs 1"),
            "WRN depth 15 invalid",
        ),
        (
            format!("{BASE} --arch vgg --epochs 1"),
            "unknown architecture",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --dataset imagenet"),
            "unknown dataset",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --device tpu"),
            "unknown device",
        ),
        (
            format!("{BASE} {arch} --epochs 1 --nesterov --no-nesterov"),
            "cannot be used with",
        ),
    ] {
        let err = error(&flags);
        assert!(
            err.contains(needle),
            "`{flags}`: expected `{needle}` in `{err}`"
        );
    }
}

#[test]
fn oat_lambdas_and_student_noise_shape_the_model() -> Result<()> {
    let p = plan("--arch wrn-10-1 --epochs 1 --method oat")?;
    assert_eq!(p.model_spec().oat, Some(OatSpec::standard()));
    assert!(p.model_spec().noise.is_none());
    let p = plan("--arch wrn-10-1 --epochs 1 --method oat --lambdas 0.3")?;
    assert_eq!(p.model_spec().oat.map(|o| o.lambdas), Some(vec![0.3]));
    let err = error(&format!(
        "{BASE} --arch wrn-10-1 --epochs 1 --method oat --lambdas 0.5,0.2"
    ));
    assert!(err.contains("strictly increasing"), "{err}");
    let err = error(&format!(
        "{BASE} --arch wrn-10-1 --epochs 1 --method at --lambdas 0.3"
    ));
    assert!(err.contains("--method oat only"), "{err}");
    let p = plan("--arch wrn-10-1 --epochs 1 --method at --noise 0.1")?;
    assert_eq!(p.model_spec().noise, Some(NoiseSpec { alpha: 0.1 }));
    assert!(p.model_spec().oat.is_none());
    Ok(())
}

/// The fast reproduce preset's rows on fast AT's schedule: PGD-7 AT, fast AT as
/// published and TRADES each keep their own method's attack; the preset trains on the
/// attack's last iterate (the stepped point), as Wong et al.'s code does, where the
/// method accepts it.
#[test]
fn fast_at_schedule_takes_each_methods_attack() -> Result<()> {
    let p = plan("--preset fast-at-preact-resnet18 --method fast-at")?;
    let wong = FastAt::wong_cifar10();
    let stepped = FastAt {
        attack: rampart_attacks::Fgsm {
            last_iterate: true,
            ..wong.attack
        },
        ..wong
    };
    assert_eq!(p.method, MethodPlan::FastAt(stepped));
    let p = plan("--preset fast-at-preact-resnet18 --method at")?;
    let MethodPlan::At(at) = p.method else {
        panic!("not at: {:?}", p.method)
    };
    assert!(at.attack.last_iterate);
    let p = plan("--preset fast-at-preact-resnet18 --method trades")?;
    assert_eq!(
        p.method,
        MethodPlan::Trades(rampart_defenses::Trades::zhang_cifar10())
    );
    assert_eq!(p.config.epochs, 15);
    Ok(())
}
