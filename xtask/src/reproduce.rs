//! `cargo xtask reproduce`: the study presets and the runs that reproduce them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::report::{self, Study};

/// The models one preset trains: one row per training method, keyed by the method's
/// short name in `results.json`.
#[derive(Clone, Copy, Debug)]
pub struct ModelRow {
    /// The row's key in `results.json` and its folder: the method's short name, or a
    /// variant of it (`ls` = normal training with label smoothing, `student` = a
    /// stochastic student).
    pub method: &'static str,
    /// The `rampart train --method` of the row.
    pub train_method: &'static str,
    /// How `rampart train` is configured for this row.
    pub training: Training,
    /// Further `rampart train` flags of this row (the method's attack settings, or
    /// overrides of a preset), in order.
    pub extra_flags: &'static [&'static str],
    /// The row whose trained model this one starts from (`--init-from`), if any.
    pub teacher: Option<&'static str>,
    /// The row's model is stochastic (a noise-injecting student): its evaluations take
    /// the preset's stochastic budgets ([`EvalBudgets`]: EOT, noise draws).
    pub stochastic: bool,
    /// Whether the row belongs to the core study (normal, AT, CCAT) that
    /// `--rows core` runs.
    pub core: bool,
}

/// A core row trained with `--method method`.
pub const fn row(
    method: &'static str,
    training: Training,
    extra_flags: &'static [&'static str],
) -> ModelRow {
    ModelRow {
        method,
        train_method: method,
        training,
        extra_flags,
        teacher: None,
        stochastic: false,
        core: true,
    }
}

/// A row beyond the core study: the calibration-oriented methods, OAT and the
/// stochastic student.
pub const fn extended(
    method: &'static str,
    train_method: &'static str,
    training: Training,
    extra_flags: &'static [&'static str],
) -> ModelRow {
    ModelRow {
        method,
        train_method,
        training,
        extra_flags,
        teacher: None,
        stochastic: false,
        core: false,
    }
}

/// The training settings of a row.
#[derive(Clone, Copy, Debug)]
pub enum Training {
    /// A `rampart train --preset` (published settings).
    Preset(&'static str),
    /// Explicit settings.
    Recipe(Recipe),
}

/// Explicit `rampart train` settings; the rest are the command's defaults (Nesterov
/// momentum 0.9, weight decay 5e-4, crop + flip).
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    /// `--arch`.
    pub arch: &'static str,
    /// `--epochs`.
    pub epochs: usize,
    /// `--batch-size`.
    pub batch_size: usize,
    /// `--lr` (the peak of a cyclic schedule).
    pub lr: f64,
    /// `--schedule`.
    pub schedule: &'static str,
    /// `--train-limit`: train on the first N images (`None`: all 50,000).
    pub train_limit: Option<usize>,
    /// `--test-limit` of the per-epoch evaluation (the final evaluation always uses
    /// the whole test set).
    pub per_epoch_test_limit: Option<usize>,
}

/// The model of the `smoke` preset: the one setting tuned to its budget, which is
/// 15 minutes of wall time on a 2-core CPU after the build, on real CIFAR-10 with the
/// final evaluation on all 10,000 test images.
pub const SMOKE_NORMAL: Recipe = Recipe {
    arch: "wrn-10-1",
    epochs: 3,
    batch_size: 128,
    lr: 0.2,
    schedule: "cyclic",
    train_limit: None,
    per_epoch_test_limit: Some(1000),
};

/// The smoke preset's adversarial training, from scratch: 1 epoch on the first 25,600
/// training images, batch 64, one-cycle lr 0 → 0.2 → 0, every example adversarial from
/// FGSM with a uniform random start (ε = 8/255, α = 10/255, [`SMOKE_AT_FLAGS`]).
/// Measured on this budget (WRN-10-1, PGD-20 on 1,000 test images): 1 epoch on 25,600
/// or 50,000 images, batch 128 or 64, FGSM-RS or PGD-2, from scratch or fine-tuning the
/// normal model all ended at 21–24 % robust accuracy; from scratch with batch 64 was
/// the best per second.
pub const SMOKE_AT: Recipe = Recipe {
    arch: SMOKE_NORMAL.arch,
    epochs: 1,
    batch_size: 64,
    lr: 0.2,
    schedule: "cyclic",
    train_limit: Some(25_600),
    per_epoch_test_limit: Some(1000),
};

/// `rampart train` flags of the smoke AT row: PGD with one step of 10/255 from a
/// uniform random start at ε = 8/255, i.e. the FGSM-RS step of fast AT.
pub const SMOKE_AT_FLAGS: &[&str] = &["--attack-steps", "1", "--attack-step-size", "10/255"];

/// The smoke preset's CCAT: the images, batch and schedule of [`SMOKE_AT`], half of
/// each batch adversarial from the conf attack shortened to 3 steps of 0.03 (momentum
/// 0.9, backtracking 1.5, uniform-norm start) at ε = 0.03, ρ = 10
/// ([`SMOKE_CCAT_FLAGS`]); per image it costs about as much as the AT row.
pub const SMOKE_CCAT: Recipe = SMOKE_AT;

/// `rampart train` flags of the smoke CCAT row.
pub const SMOKE_CCAT_FLAGS: &[&str] = &["--attack-steps", "3", "--attack-step-size", "0.03"];

/// The smoke preset's calibration-oriented rows (label smoothing, RegMixup, AR-AdaLS):
/// the images, batch and schedule of [`SMOKE_AT`] (1 epoch on 25,600 images), so they
/// compare with each other at one budget — not with the normal row, which trains 3
/// epochs on all 50,000.
pub const SMOKE_CALIBRATION: Recipe = SMOKE_AT;

/// The smoke preset's stochastic student: fine-tunes the AT row's model with adaptive
/// noise (α starting at 0.1) by the AT row's FGSM-RS adversarial training for 1 epoch
/// on the first 12,800 images at a lower one-cycle peak (0.05).
pub const SMOKE_STUDENT: Recipe = Recipe {
    lr: 0.05,
    train_limit: Some(12_800),
    ..SMOKE_AT
};

/// `rampart train` flags of the smoke student row.
pub const SMOKE_STUDENT_FLAGS: &[&str] = &[
    "--attack-steps",
    "1",
    "--attack-step-size",
    "10/255",
    "--noise",
    "0.1",
];

/// `rampart train` flags of the smoke preset's normally trained student (fine-tuned
/// from the normal row with clean cross-entropy, same recipe as [`SMOKE_STUDENT`]).
pub const SMOKE_PLAIN_STUDENT_FLAGS: &[&str] = &["--noise", "0.1"];

/// `rampart train` flags of the smoke preset's dedicated fixed-λ model (`oat-fixed`:
/// the OAT architecture and loss with λ = 0.3 for every example), the reference OAT's
/// λ = 0.3 point is compared with.
pub const SMOKE_OAT_FIXED_FLAGS: &[&str] = &[
    "--attack-steps",
    "1",
    "--attack-step-size",
    "10/255",
    "--lambdas",
    "0.3",
];

/// `rampart train` flags of the fast and paper presets' fixed-λ model.
pub const OAT_FIXED_FLAGS: &[&str] = &["--lambdas", "0.3"];

/// `rampart train` flags of label smoothing.
pub const LS_FLAGS: &[&str] = &["--label-smoothing", "0.1"];

/// The rows beyond the core study, for a preset whose adversarial rows use
/// `adversarial` and whose calibration rows use `calibration` (flags `attack_flags`
/// give the adversarial rows' attack), and whose student fine-tunes the `at` row with
/// `student`.
macro_rules! extended_rows {
    ($calibration:expr, $adversarial:expr, $attack_flags:expr, $fixed_flags:expr, $student:expr, $student_flags:expr, $plain_student:expr, $plain_student_flags:expr) => {
        [
            extended("ls", "normal", $calibration, LS_FLAGS),
            extended("regmixup", "regmixup", $calibration, &[]),
            extended("ar-adals", "ar-adals", $calibration, &[]),
            extended("sat", "sat", $adversarial, $attack_flags),
            extended("oat", "oat", $adversarial, $attack_flags),
            extended("oat-fixed", "oat", $adversarial, $fixed_flags),
            ModelRow {
                teacher: Some("at"),
                stochastic: true,
                ..extended("student", "at", $student, $student_flags)
            },
            ModelRow {
                teacher: Some("normal"),
                stochastic: true,
                ..extended(
                    "student-normal",
                    "normal",
                    $plain_student,
                    $plain_student_flags,
                )
            },
        ]
    };
}

const SMOKE_ROWS: [ModelRow; 11] = {
    let [ls, regmixup, adals, sat, oat, fixed, student, plain_student] = extended_rows!(
        Training::Recipe(SMOKE_CALIBRATION),
        Training::Recipe(SMOKE_AT),
        SMOKE_AT_FLAGS,
        SMOKE_OAT_FIXED_FLAGS,
        Training::Recipe(SMOKE_STUDENT),
        SMOKE_STUDENT_FLAGS,
        Training::Recipe(SMOKE_STUDENT),
        SMOKE_PLAIN_STUDENT_FLAGS
    );
    [
        row("normal", Training::Recipe(SMOKE_NORMAL), &[]),
        row("at", Training::Recipe(SMOKE_AT), SMOKE_AT_FLAGS),
        row("ccat", Training::Recipe(SMOKE_CCAT), SMOKE_CCAT_FLAGS),
        ls,
        regmixup,
        adals,
        sat,
        oat,
        fixed,
        student,
        plain_student,
    ]
};

const FAST_ROWS: [ModelRow; 11] = {
    let [ls, regmixup, adals, sat, oat, fixed, student, plain_student] = extended_rows!(
        Training::Preset("normal-preact-resnet18"),
        Training::Preset("fast-at-preact-resnet18"),
        &[],
        OAT_FIXED_FLAGS,
        Training::Preset("fast-at-preact-resnet18"),
        &["--epochs", "5", "--noise", "0.1"],
        Training::Preset("normal-preact-resnet18"),
        &["--epochs", "5", "--noise", "0.1"]
    );
    [
        row("normal", Training::Preset("normal-preact-resnet18"), &[]),
        // PGD-7 adversarial training on the one-cycle schedule of fast AT.
        row("at", Training::Preset("fast-at-preact-resnet18"), &[]),
        // CCAT of ResNet-20 for 30 epochs with a 10-step conf attack.
        row(
            "ccat",
            Training::Preset("ccat-resnet20"),
            &[
                "--epochs",
                "30",
                "--attack-steps",
                "10",
                "--attack-step-size",
                "0.01",
            ],
        ),
        ls,
        regmixup,
        adals,
        sat,
        oat,
        fixed,
        student,
        plain_student,
    ]
};

const PAPER_ROWS: [ModelRow; 11] = {
    let [ls, regmixup, adals, sat, oat, fixed, student, plain_student] = extended_rows!(
        Training::Preset("normal-wrn28-10"),
        Training::Preset("at-wrn28-10"),
        &[],
        OAT_FIXED_FLAGS,
        Training::Preset("at-wrn28-10"),
        &["--epochs", "10", "--lr", "0.01", "--noise", "0.1"],
        Training::Preset("normal-wrn28-10"),
        &["--epochs", "10", "--lr", "0.01", "--noise", "0.1"]
    );
    [
        row("normal", Training::Preset("normal-wrn28-10"), &[]),
        row("at", Training::Preset("at-wrn28-10"), &[]),
        row("ccat", Training::Preset("ccat-resnet20"), &[]),
        ls,
        regmixup,
        adals,
        sat,
        oat,
        fixed,
        student,
        plain_student,
    ]
};

/// EOT samples of every attack on a stochastic model: `rampart`'s default (AutoAttack's
/// rand version, 20).
pub const STOCHASTIC_EOT: usize = 20;

/// Every evaluation budget of a preset, in one place ([`Preset::budgets`]); the
/// study's `report.md` states them. Robust figures are always the per-example worst
/// case of PGD with cross-entropy, C&W margin and conf (`rampart eval --suite pgd20`)
/// at L∞ 8/255, with the trust checks; a stochastic model is attacked with EOT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalBudgets {
    /// PGD-20 worst case on deterministic rows: attacked images (the first N), or all.
    pub robust_examples: Option<usize>,
    /// The evaluation protocol run on every row: the suite and its attacked images
    /// (the first N before the last 1,000, which pick τ), or all.
    pub protocol: (&'static str, Option<usize>),
    /// Stochastic rows: EOT samples of every PGD-20 attack (gradients averaged per step
    /// and draws judging success).
    pub stochastic_eot: usize,
    /// Stochastic rows: independent noise draws of the mean ± std figures.
    pub stochastic_draws: usize,
    /// Stochastic rows: images attacked by PGD-20, or all.
    pub stochastic_robust_examples: Option<usize>,
    /// Stochastic rows: EOT samples, attacked images and trust-checked images of the
    /// protocol and of the noise sweeps (their cost is the EOT times the attack steps).
    pub stochastic_protocol: (usize, Option<usize>, usize),
    /// Stochastic rows: images the trust checks of their PGD-20 evaluation run on (the
    /// checks cost about three times PGD-20's worst case per image).
    pub stochastic_trust_examples: usize,
    /// Stochastic rows: images attacked per value of their noise sweep, or all.
    pub stochastic_sweep_examples: Option<usize>,
    /// Sweeps (λ of OAT, noise of the students): test images for the clean figures and
    /// images attacked per value, or all.
    pub sweep_limits: Option<(usize, usize)>,
    /// AutoAttack (standard; `rand` for a stochastic row) at L∞ 8/255: the rows and the
    /// images (the first N), or all.
    pub autoattack: (&'static [&'static str], Option<usize>),
}

impl EvalBudgets {
    /// A Markdown table of the budgets, for the report.
    pub fn markdown(&self) -> String {
        let n = |v: Option<usize>| v.map_or("all".to_string(), |n| n.to_string());
        let (eot_p, n_p, trust_p) = self.stochastic_protocol;
        let draws = self.stochastic_draws;
        let rows = [
            (
                "clean accuracy".to_string(),
                "all".to_string(),
                format!("one forward pass (mean of {draws} noise draws for a stochastic row)"),
            ),
            (
                "PGD-20 worst case (CE, margin, conf), L∞ 8/255, step 2/255".to_string(),
                n(self.robust_examples),
                "uniform start; trust checks on the first 100".to_string(),
            ),
            (
                "the same on stochastic rows".to_string(),
                n(self.stochastic_robust_examples),
                format!(
                    "EOT {} (gradients and success), {draws} noise draws, trust checks on the first {}",
                    self.stochastic_eot, self.stochastic_trust_examples
                ),
            ),
            (
                format!("protocol `--suite {}`", self.protocol.0),
                n(self.protocol.1),
                "the suite's budgets (docs/evaluation.md), last 1,000 images pick τ".to_string(),
            ),
            (
                "protocol / sweeps on stochastic rows".to_string(),
                format!("{} / {} per value", n(n_p), n(self.stochastic_sweep_examples)),
                format!("EOT {eot_p}, trust checks on the first {trust_p}"),
            ),
            (
                "sweeps (clean / attacked per value)".to_string(),
                self.sweep_limits
                    .map_or("all".to_string(), |(c, a)| format!("{c} / {a}")),
                "PGD-20 worst case".to_string(),
            ),
            (
                format!("AutoAttack on {}", self.autoattack.0.join(", ")),
                n(self.autoattack.1),
                "standard (rand with EOT 20 for stochastic rows)".to_string(),
            ),
        ];
        let mut md = String::from("| evaluation | images | budget |\n|---|---:|---|\n");
        for (what, images, budget) in rows {
            md.push_str(&format!("| {what} | {images} | {budget} |\n"));
        }
        md
    }
}

/// The study presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Minutes on a 2-core CPU: a small WRN, a few epochs (default device: cpu).
    Smoke,
    /// One GPU, minutes to an hour: PreActResNet-18, 30 epochs, one-cycle lr
    /// (default device: cuda).
    Fast,
    /// The published schedules: WRN-28-10, 200 epochs (default device: cuda).
    Paper,
}

impl Preset {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Smoke => "smoke",
            Preset::Fast => "fast",
            Preset::Paper => "paper",
        }
    }

    /// What the preset approximates, for the report.
    pub fn about(self) -> &'static str {
        match self {
            Preset::Smoke => {
                "A check that the whole pipeline works on real data on a 2-core CPU: a small \
                 Wide-ResNet (WRN-10-1) trained normally for 3 epochs with a one-cycle learning \
                 rate; adversarially trained (FGSM with a random start at 8/255) and CCAT-trained \
                 (a 3-step conf attack, half of each batch) for one epoch on half of the training \
                 images — these three core rows (`--rows core`) take about 5 minutes; then, at \
                 the one-epoch budget of the AT row, label smoothing, RegMixup and AR-AdaLS \
                 (clean training), Sinkhorn AT, once-for-all AT and a dedicated OAT model at \
                 λ = 0.3 (FGSM-RS attacks), and two stochastic students fine-tuned for half an \
                 epoch: adversarially from the AT model, and with clean cross-entropy from \
                 the normal model. PGD-20 at 8/255 on the first 1,000 test images. It \
                 approximates no published model; expect errors far above the published \
                 figures (a normally trained WRN-28-10 reaches about 4 % clean error, \
                 adversarial training about 48 % robust error)."
            }
            Preset::Fast => {
                "The single-GPU configuration (minutes to hours): PreActResNet-18 for 30 \
                 epochs with the one-cycle learning rate of fast adversarial training \
                 (Wong et al. 2020), batch 128, Nesterov momentum 0.9, weight decay 5e-4, \
                 crop + flip; adversarial training with PGD-7 (2/255, ε = 8/255) on the \
                 15-epoch schedule of fast AT; CCAT of ResNet-20 for 30 epochs with a \
                 10-step conf attack. PGD-20 at 8/255 on the whole test set."
            }
            Preset::Paper => {
                "The published schedule: WRN-28-10 for 200 epochs, batch 128, lr 0.1 multiplied \
                 by 0.1 after 50 % and 75 % of the epochs (as the robustness baselines of Rice \
                 et al. 2020; the WRN paper used ×0.2 at 30/60/80 %), Nesterov momentum 0.9, \
                 weight decay 5e-4, crop + flip. Normal training this way reaches about 4 % \
                 clean error on the original CIFAR-10 pixels. Adversarial training: WRN-28-10, \
                 PGD-10 (0.007, ε = 0.03), 150 epochs (REFERENCE: 47.9 % robust error); CCAT: \
                 ResNet-20 with the paper's settings (200 epochs, lr 0.075 ×0.95 per epoch, \
                 batch 100). PGD-20 at 8/255 on the whole test set."
            }
        }
    }

    /// The models trained, in order (a student after its teacher).
    pub fn models(self) -> &'static [ModelRow] {
        match self {
            Preset::Smoke => &SMOKE_ROWS,
            Preset::Fast => &FAST_ROWS,
            Preset::Paper => &PAPER_ROWS,
        }
    }

    /// Every evaluation budget of the preset.
    ///
    /// Smoke (2-core CPU): every row's quick protocol runs on 1,000 images (the
    /// calibration and curve metrics need that many) and deterministic rows get PGD-20
    /// on 1,000; the stochastic students keep the layer-by-layer path, where an EOT-20
    /// attack costs 20 forward-backward passes per step, so their EOT-20 PGD-20 runs on
    /// the first 100 images (trust checks on 20), their protocol at EOT 3 (about 11
    /// minutes per student) and their noise sweeps at EOT 3 on 100 per value. On the smoke student EOT 3 and EOT 20
    /// found the same PGD-20 robust accuracy (23 of 100 images, one image differing
    /// each way). AutoAttack (a minute per 100 images of WRN-10-1) runs on the AT
    /// model only.
    pub fn budgets(self) -> EvalBudgets {
        match self {
            Preset::Smoke => EvalBudgets {
                robust_examples: Some(1000),
                protocol: ("quick", Some(1000)),
                stochastic_eot: STOCHASTIC_EOT,
                stochastic_draws: 5,
                stochastic_robust_examples: Some(100),
                stochastic_protocol: (3, Some(1000), 20),
                stochastic_trust_examples: 20,
                stochastic_sweep_examples: Some(100),
                sweep_limits: Some((1000, 200)),
                autoattack: (&["at"], Some(100)),
            },
            Preset::Fast => EvalBudgets {
                robust_examples: None,
                protocol: ("quick", None),
                stochastic_eot: STOCHASTIC_EOT,
                stochastic_draws: 5,
                stochastic_robust_examples: Some(1000),
                stochastic_protocol: (STOCHASTIC_EOT, Some(1000), 100),
                stochastic_trust_examples: 100,
                stochastic_sweep_examples: Some(1000),
                sweep_limits: Some((10_000, 1000)),
                autoattack: (&["at", "ccat", "sat", "oat", "student"], Some(1000)),
            },
            Preset::Paper => EvalBudgets {
                robust_examples: None,
                protocol: ("ccat", None),
                stochastic_eot: STOCHASTIC_EOT,
                stochastic_draws: 5,
                stochastic_robust_examples: None,
                stochastic_protocol: (STOCHASTIC_EOT, None, 100),
                stochastic_trust_examples: 100,
                stochastic_sweep_examples: None,
                sweep_limits: None,
                autoattack: (&["at", "ccat", "sat", "oat", "student"], None),
            },
        }
    }

    /// The evaluation protocol run on every model after training (see
    /// docs/evaluation.md) and how many test images it attacks.
    pub fn protocol(self) -> (&'static str, Option<usize>) {
        self.budgets().protocol
    }

    /// Sweeps (λ of OAT, noise of the student): test images for the clean figures and
    /// images attacked per value (the first N), or all.
    pub fn sweep_limits(self) -> Option<(usize, usize)> {
        self.budgets().sweep_limits
    }

    /// AutoAttack after the protocol: the rows attacked and the test images (the first
    /// N, or all).
    pub fn autoattack(self) -> (&'static [&'static str], Option<usize>) {
        self.budgets().autoattack
    }

    fn default_device(self) -> &'static str {
        match self {
            Preset::Smoke => "cpu",
            Preset::Fast | Preset::Paper => "cuda",
        }
    }
}

impl ModelRow {
    /// The `rampart train` flags that select this row's settings.
    pub fn train_flags(&self) -> Vec<String> {
        let mut flags = vec!["--method".to_string(), self.train_method.to_string()];
        match self.training {
            Training::Preset(name) => flags.extend(["--preset".to_string(), name.to_string()]),
            Training::Recipe(r) => {
                flags.extend([
                    "--arch".to_string(),
                    r.arch.to_string(),
                    "--epochs".to_string(),
                    r.epochs.to_string(),
                    "--batch-size".to_string(),
                    r.batch_size.to_string(),
                    "--lr".to_string(),
                    r.lr.to_string(),
                    "--schedule".to_string(),
                    r.schedule.to_string(),
                ]);
                if let Some(n) = r.train_limit {
                    flags.extend(["--train-limit".to_string(), n.to_string()]);
                }
                if let Some(n) = r.per_epoch_test_limit {
                    flags.extend(["--test-limit".to_string(), n.to_string()]);
                }
            }
        }
        flags.extend(self.extra_flags.iter().map(|f| f.to_string()));
        flags
    }

    /// The `rampart eval` flags of this row's evaluation: clean accuracy on the whole
    /// test set and the PGD-20 worst case (L∞, ε = 8/255, step 2/255) on the first
    /// `robust_examples`; a stochastic row with its EOT, draws and images.
    pub fn eval_flags(&self, budgets: &EvalBudgets) -> Vec<String> {
        let mut flags = vec!["--suite".to_string(), "pgd20".to_string()];
        let limit = if self.stochastic {
            flags.extend([
                "--eot".to_string(),
                budgets.stochastic_eot.to_string(),
                "--draws".to_string(),
                budgets.stochastic_draws.to_string(),
                "--trust-examples".to_string(),
                budgets.stochastic_trust_examples.to_string(),
            ]);
            budgets.stochastic_robust_examples
        } else {
            budgets.robust_examples
        };
        if let Some(n) = limit {
            flags.extend(["--attack-limit".to_string(), n.to_string()]);
        }
        flags
    }

    /// The `rampart eval`/`sweep` flags that give a stochastic row the preset's
    /// protocol and sweep budget (none for a deterministic row).
    pub fn stochastic_protocol_flags(&self, budgets: &EvalBudgets) -> Vec<String> {
        if !self.stochastic {
            return Vec::new();
        }
        let (eot, _, trust) = budgets.stochastic_protocol;
        vec![
            "--eot".to_string(),
            eot.to_string(),
            "--draws".to_string(),
            budgets.stochastic_draws.to_string(),
            "--trust-examples".to_string(),
            trust.to_string(),
        ]
    }
}

/// Flags of `cargo xtask reproduce`.
#[derive(Args, Debug, Clone)]
pub struct ReproduceArgs {
    /// Data set: cifar10 (the presets are tuned for it) or cifar100.
    #[arg(value_parser = ["cifar10", "cifar100"])]
    pub dataset: String,

    /// Which study to run.
    #[arg(long, value_enum, default_value = "smoke")]
    pub preset: Preset,

    /// Folder holding the data set (e.g. the unpacked cifar10-jpeg, or the folder with
    /// cifar-10-binary.tar.gz); defaults to $RAMPART_DATA_DIR. See datasets/README.md.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Output folder [default: runs/DATASET-PRESET in the repository].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Skip models already trained and evaluated, and resume interrupted trainings.
    #[arg(long)]
    pub resume: bool,

    /// Worker threads given to `rampart --threads` [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Which models to train: `all` (the default), `core` (normal, at, ccat: the
    /// 15-minute smoke check) or a comma-separated list of row names (normal, at, ccat,
    /// ls, regmixup, ar-adals, sat, oat, student; a student needs its teacher `at`).
    #[arg(long, default_value = "all")]
    pub rows: String,

    /// Device given to `rampart --device` (cpu, cuda, cuda:N, cuda+tf32) [default:
    /// cpu for smoke, cuda for fast and paper]. A CUDA device builds `rampart` with
    /// `--features cudnn` (CUDA and cuDNN).
    #[arg(long)]
    pub device: Option<String>,
}

/// The repository root (the xtask's parent folder).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or(manifest.clone(), Path::to_path_buf)
}

/// Where the evaluation protocol of one model writes (inside its run folder).
pub fn protocol_dir(out: &Path, method: &str) -> PathBuf {
    model_dir(out, method).join("protocol")
}

/// The folder of one model's run inside the study folder.
pub fn model_dir(out: &Path, method: &str) -> PathBuf {
    out.join(method)
}

/// The folder of one model's evaluation.
pub fn eval_dir(out: &Path, method: &str) -> PathBuf {
    model_dir(out, method).join("eval")
}

/// Whether a model was trained to the end and evaluated.
pub fn is_finished(out: &Path, method: &str) -> bool {
    model_dir(out, method).join("summary.json").is_file()
        && model_dir(out, method).join("model.safetensors").is_file()
        && eval_dir(out, method).join("results.json").is_file()
}

/// The rows `--rows` selects from a preset, in the preset's order.
pub fn select_rows(preset: Preset, selection: &str) -> Result<Vec<ModelRow>> {
    let all = preset.models();
    let rows: Vec<ModelRow> = match selection.trim() {
        "all" => all.to_vec(),
        "core" => all.iter().filter(|r| r.core).copied().collect(),
        list => {
            let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &wanted {
                if !all.iter().any(|r| r.method == *w) {
                    let names: Vec<&str> = all.iter().map(|r| r.method).collect();
                    bail!(
                        "--rows: unknown row `{w}` (the {} preset has {})",
                        preset.name(),
                        names.join(", ")
                    );
                }
            }
            all.iter()
                .filter(|r| wanted.contains(&r.method))
                .copied()
                .collect()
        }
    };
    for r in &rows {
        if let Some(t) = r.teacher {
            if !rows.iter().any(|o| o.method == t) {
                bail!(
                    "--rows: `{}` starts from the `{t}` model; select `{t}` too",
                    r.method
                );
            }
        }
    }
    if rows.is_empty() {
        bail!("--rows selects no model");
    }
    Ok(rows)
}

/// Runs the study.
pub fn run(args: &ReproduceArgs) -> Result<()> {
    let started_at = crate::timestamp::now_utc();
    let root = workspace_root();
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("RAMPART_DATA_DIR").map(PathBuf::from))
        .filter(|d| !d.as_os_str().is_empty())
        .context(
            "--data-dir is required (or set RAMPART_DATA_DIR): the folder that holds the data \
             set, e.g. the unpacked cifar10-jpeg folder (see datasets/README.md)",
        )?;
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let preset = args.preset;
    let out = args.out.clone().unwrap_or_else(|| {
        root.join("runs")
            .join(format!("{}-{}", args.dataset, preset.name()))
    });
    let device = args
        .device
        .clone()
        .unwrap_or_else(|| preset.default_device().to_string());
    let rows = select_rows(preset, &args.rows)?;
    let rows = rows.as_slice();
    // One study per folder at a time; released when this process ends, however it ends.
    let holder = format!(
        "pid {}: {}",
        std::process::id(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let _lock = rampart_fs::OutputLock::acquire(&out, &holder)?;
    if !args.resume {
        for row in rows {
            let dir = model_dir(&out, row.method);
            if dir.join("checkpoint.safetensors").exists() || dir.join("model.safetensors").exists()
            {
                bail!(
                    "{} already holds a run: pass --resume to skip finished models and continue \
                     interrupted ones, or choose another --out",
                    dir.display()
                );
            }
        }
    }
    let rampart = build_rampart(&root, device.starts_with("cuda"))?;
    let setup = EvalSetup {
        rampart: &rampart,
        threads: args.threads,
        dataset: &args.dataset,
        device: &device,
        data_dir: &data_dir,
    };
    let clock = Instant::now();
    let budgets = preset.budgets();
    for (i, row) in rows.iter().enumerate() {
        let step = format!("[{}/{}] {}", i + 1, rows.len(), row.method);
        if args.resume && is_finished(&out, row.method) {
            eprintln!("==> {step}: already trained and evaluated, skipped (--resume)");
            continue;
        }
        let dir = model_dir(&out, row.method);
        let mut train = rampart_command(&rampart, args.threads);
        train.arg("train").args(row.train_flags()).args([
            "--dataset",
            &args.dataset,
            "--seed",
            "0",
            "--device",
            &device,
        ]);
        train
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--out")
            .arg(&dir);
        if let Some(teacher) = row.teacher {
            train
                .arg("--init-from")
                .arg(model_dir(&out, teacher).join("model.safetensors"));
        }
        if args.resume {
            train.arg("--resume");
        }
        eprintln!("==> {step}: training ({})", describe(row));
        run_child(train, "rampart train")?;

        let mut eval = setup.command(&dir.join("model.safetensors"), &eval_dir(&out, row.method));
        eval.args(row.eval_flags(&budgets));
        eprintln!(
            "==> {step}: evaluating (clean: the whole test set; PGD-20 worst case L∞ 8/255: {})",
            if row.stochastic {
                budgets.stochastic_robust_examples
            } else {
                budgets.robust_examples
            }
            .map_or("the whole test set".to_string(), |n| format!(
                "the first {n} images"
            ))
        );
        run_child(eval, "rampart eval")?;
    }

    // The evaluation protocol on every model, then one comparison (tables + plots).
    let (suite, limit) = preset.protocol();
    let mut compare = rampart_command(&rampart, args.threads);
    compare.arg("compare").arg("--out").arg(&out);
    for (i, row) in rows.iter().enumerate() {
        let dir = protocol_dir(&out, row.method);
        compare.arg(format!(
            "{}={}",
            row.method,
            dir.join("results.json").display()
        ));
        if dir.join("results.json").exists() {
            continue;
        }
        let model = model_dir(&out, row.method).join("model.safetensors");
        let mut eval = setup.command(&model, &dir);
        eval.args(["--suite", suite]);
        eval.args(row.stochastic_protocol_flags(&budgets));
        let limit = if row.stochastic {
            budgets.stochastic_protocol.1
        } else {
            limit
        };
        if let Some(n) = limit {
            eval.args(["--attack-limit", &n.to_string()]);
        }
        eprintln!(
            "==> [{}/{}] {}: evaluation protocol (--suite {suite})",
            i + 1,
            rows.len(),
            row.method
        );
        run_child(eval, "rampart eval --suite")?;
    }
    eprintln!("==> comparing the models");
    run_child(compare, "rampart compare")?;

    // The test-time trade-offs: OAT over λ beside the dedicated λ = 0 (normal) and
    // λ = 1 (at) models, and the student over noise levels.
    let mut sweeps = Vec::new();
    let sweep_limits = preset.sweep_limits();
    for row in rows {
        let (over, extra): (&str, Vec<String>) = match row.method {
            "oat" => {
                let mut refs = Vec::new();
                for (name, key) in [
                    ("normal (lambda 0)", "normal"),
                    ("oat-fixed (lambda 0.3)", "oat-fixed"),
                    ("at (lambda 1)", "at"),
                ] {
                    if rows.iter().any(|r| r.method == key) {
                        refs.push("--reference".to_string());
                        refs.push(format!(
                            "{name}={}",
                            eval_dir(&out, key).join("results.json").display()
                        ));
                    }
                }
                ("lambda", refs)
            }
            _ if row.stochastic => (
                "noise-scale",
                ["--values", "0,0.5,1,2,4"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain(row.stochastic_protocol_flags(&budgets))
                    .collect(),
            ),
            _ => continue,
        };
        let dir = report::sweep_dir(&out, row.method);
        sweeps.push((row.method, over, dir.clone()));
        if dir.join("sweep.json").exists() {
            continue;
        }
        let mut sweep = rampart_command(&rampart, args.threads);
        sweep
            .arg("sweep")
            .args(["--over", over])
            .arg("--model")
            .arg(model_dir(&out, row.method).join("model.safetensors"))
            .args([
                "--dataset",
                &args.dataset,
                "--device",
                &device,
                "--suite",
                "pgd20",
            ])
            .args(extra);
        if let Some((test, attacked)) = sweep_limits {
            let attacked = match (row.stochastic, budgets.stochastic_sweep_examples) {
                (true, Some(n)) => n,
                _ => attacked,
            };
            sweep.args([
                "--test-limit",
                &test.to_string(),
                "--attack-limit",
                &attacked.to_string(),
            ]);
        }
        sweep
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--out")
            .arg(&dir);
        eprintln!("==> {}: sweep over {over}", row.method);
        run_child(sweep, "rampart sweep")?;
    }

    let study = Study {
        dataset: args.dataset.clone(),
        preset: preset.name().to_string(),
        preset_about: preset.about().to_string(),
        created: started_at,
        command: xtask_command_line(),
        wall_seconds: clock.elapsed().as_secs_f64(),
        build_command: build_command_line(device.starts_with("cuda")),
        budgets: budgets.markdown(),
    };
    // AutoAttack on the preset's robust rows, with PGD-20 on the very same images.
    let (aa_rows, aa_limit) = preset.autoattack();
    let mut autoattacked = Vec::new();
    for row in rows.iter().filter(|r| aa_rows.contains(&r.method)) {
        let model = model_dir(&out, row.method).join("model.safetensors");
        for (suite, dir) in [
            ("autoattack", report::autoattack_dir(&out, row.method)),
            ("pgd20", report::autoattack_pgd_dir(&out, row.method)),
        ] {
            if dir.join("results.json").exists() {
                continue;
            }
            let mut eval = setup.command(&model, &dir);
            eval.args(["--suite", suite]);
            if let Some(n) = aa_limit {
                let n = n.to_string();
                eval.args(["--attack-limit", &n]);
                if suite == "pgd20" {
                    eval.args(["--test-limit", &n]);
                }
            }
            eprintln!(
                "==> {}: {suite} on {}",
                row.method,
                aa_limit.map_or("the whole test set".into(), |n| format!(
                    "the first {n} test images"
                ))
            );
            run_child(eval, "rampart eval")?;
        }
        autoattacked.push(row.method);
    }

    let models = report::collect(&out, rows)?;
    report::write(&out, &study, &models)?;
    report::add_protocol(&out, rows, suite)?;
    report::add_sweeps(&out, &sweeps)?;
    report::add_autoattack(&out, &autoattacked)?;
    eprintln!("==> report: {}", out.join("report.md").display());
    for m in &models {
        let robust = match (m.robust_accuracy, m.robust_examples) {
            (Some(a), Some(n)) => format!(", PGD-20 robust accuracy {:.2} % on {n}", 100.0 * a),
            _ => String::new(),
        };
        println!(
            "{}: {} {} epochs, clean accuracy {:.2} % (error {:.2} %) on {} test images{robust}, trained in {}",
            m.key,
            m.arch,
            m.epochs,
            100.0 * m.clean_accuracy,
            100.0 * m.clean_error,
            m.test_examples,
            report::duration(m.train_seconds)
        );
    }
    Ok(())
}

fn describe(row: &ModelRow) -> String {
    let mut text = match row.training {
        Training::Preset(name) => format!("preset {name}"),
        Training::Recipe(r) => format!(
            "{}, {} epochs, {} schedule, lr {}",
            r.arch, r.epochs, r.schedule, r.lr
        ),
    };
    if !row.extra_flags.is_empty() {
        text.push_str(&format!(", {}", row.extra_flags.join(" ")));
    }
    text
}

fn build_command_line(cuda: bool) -> String {
    let mut line = "cargo build --release -p rampart-cli".to_string();
    if cuda {
        line.push_str(" --features cudnn");
    }
    line
}

/// Builds the `rampart` binary and returns its path.
pub(crate) fn build_rampart(root: &Path, cuda: bool) -> Result<PathBuf> {
    eprintln!("==> {}", build_command_line(cuda));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(root)
        .args(["build", "--release", "-p", "rampart-cli"]);
    if cuda {
        // CUDA with cuDNN: the fast path (docs/performance.md).
        build.args(["--features", "cudnn"]);
    }
    run_child(build, "cargo build")?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    let bin = target
        .join("release")
        .join(format!("rampart{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Where `rampart eval` runs and what it reads: shared by every evaluation of a study.
struct EvalSetup<'a> {
    rampart: &'a Path,
    threads: Option<usize>,
    dataset: &'a str,
    device: &'a str,
    data_dir: &'a Path,
}

impl EvalSetup<'_> {
    /// `rampart eval` of `model` (a row's) into `out`; the caller adds the suite, the
    /// limits and a stochastic row's budget.
    fn command(&self, model: &Path, out: &Path) -> Command {
        let mut eval = rampart_command(self.rampart, self.threads);
        eval.arg("eval")
            .arg("--model")
            .arg(model)
            .args(["--dataset", self.dataset, "--device", self.device])
            .arg("--data-dir")
            .arg(self.data_dir)
            .arg("--out")
            .arg(out);
        eval
    }
}

fn rampart_command(bin: &Path, threads: Option<usize>) -> Command {
    let mut cmd = Command::new(bin);
    if let Some(n) = threads {
        cmd.args(["--threads", &n.to_string()]);
    }
    cmd
}

/// Runs a child with the terminal (its progress shows), failing on a non-zero exit.
fn run_child(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {what} ({:?})", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status}); its message is above");
    }
    Ok(())
}

/// `cargo xtask` and this process's arguments, shell-quoted.
fn xtask_command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| report::shell_quote(&a))
        .collect();
    format!("cargo xtask {}", args.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_has_normal_at_and_ccat_rows() {
        for preset in [Preset::Smoke, Preset::Fast, Preset::Paper] {
            let rows = preset.models();
            let names: Vec<&str> = rows.iter().map(|r| r.method).collect();
            assert_eq!(
                names,
                [
                    "normal",
                    "at",
                    "ccat",
                    "ls",
                    "regmixup",
                    "ar-adals",
                    "sat",
                    "oat",
                    "oat-fixed",
                    "student",
                    "student-normal"
                ]
            );
            assert!(!preset.about().is_empty());
            // Every teacher is trained before its student.
            for (i, r) in rows.iter().enumerate() {
                if let Some(t) = r.teacher {
                    assert!(rows[..i].iter().any(|o| o.method == t), "{}", r.method);
                }
            }
        }
    }

    #[test]
    fn rows_are_selected_by_name_or_group() -> Result<()> {
        let core: Vec<&str> = select_rows(Preset::Smoke, "core")?
            .iter()
            .map(|r| r.method)
            .collect();
        assert_eq!(core, ["normal", "at", "ccat"]);
        assert_eq!(select_rows(Preset::Smoke, "all")?.len(), 11);
        let plain = Preset::Smoke
            .models()
            .iter()
            .find(|r| r.method == "student-normal");
        assert_eq!(plain.and_then(|r| r.teacher), Some("normal"));
        let plain = plain
            .map(ModelRow::train_flags)
            .unwrap_or_default()
            .join(" ");
        assert!(plain.starts_with("--method normal "), "{plain}");
        assert!(plain.ends_with("--noise 0.1"), "{plain}");
        let fixed = Preset::Smoke
            .models()
            .iter()
            .find(|r| r.method == "oat-fixed");
        let fixed = fixed
            .map(ModelRow::train_flags)
            .unwrap_or_default()
            .join(" ");
        assert!(fixed.starts_with("--method oat "), "{fixed}");
        assert!(fixed.ends_with("--lambdas 0.3"), "{fixed}");
        let some: Vec<&str> = select_rows(Preset::Smoke, "oat, at")?
            .iter()
            .map(|r| r.method)
            .collect();
        assert_eq!(some, ["at", "oat"], "the preset's order is kept");
        let err = select_rows(Preset::Smoke, "student")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("select `at` too"), "{err}");
        assert!(select_rows(Preset::Smoke, "nope").is_err());
        // Rows that vary a method train with the method's own name.
        let smoke = Preset::Smoke.models();
        let ls = smoke
            .iter()
            .find(|r| r.method == "ls")
            .map(ModelRow::train_flags);
        let ls = ls.unwrap_or_default().join(" ");
        assert!(ls.starts_with("--method normal "), "{ls}");
        assert!(ls.ends_with("--label-smoothing 0.1"), "{ls}");
        let student = smoke
            .iter()
            .find(|r| r.method == "student")
            .map(ModelRow::train_flags);
        let student = student.unwrap_or_default().join(" ");
        assert!(student.starts_with("--method at "), "{student}");
        assert!(student.contains("--noise 0.1"), "{student}");
        Ok(())
    }

    #[test]
    fn smoke_rows_train_on_a_subset_and_attack_a_subset() {
        let at = Preset::Smoke.models()[1].train_flags().join(" ");
        assert!(
            at.starts_with("--method at --arch wrn-10-1 --epochs 1 --batch-size 64"),
            "{at}"
        );
        assert!(at.contains("--train-limit 25600"), "{at}");
        assert!(
            at.ends_with("--attack-steps 1 --attack-step-size 10/255"),
            "{at}"
        );
        let ccat = Preset::Smoke.models()[2].train_flags().join(" ");
        assert!(ccat.starts_with("--method ccat --arch wrn-10-1"), "{ccat}");
        assert!(
            ccat.ends_with("--attack-steps 3 --attack-step-size 0.03"),
            "{ccat}"
        );
        let smoke = Preset::Smoke.budgets();
        let eval = Preset::Smoke.models()[0].eval_flags(&smoke).join(" ");
        assert_eq!(eval, "--suite pgd20 --attack-limit 1000");
        let student = Preset::Smoke
            .models()
            .iter()
            .find(|r| r.method == "student");
        let eval = student.map(|r| r.eval_flags(&smoke).join(" "));
        assert_eq!(
            eval.as_deref(),
            Some("--suite pgd20 --eot 20 --draws 5 --trust-examples 20 --attack-limit 100")
        );
        let eval = Preset::Paper.models()[0]
            .eval_flags(&Preset::Paper.budgets())
            .join(" ");
        assert_eq!(eval, "--suite pgd20");
        // The protocol and calibration metrics see at least 1,000 images in every preset.
        for p in [Preset::Smoke, Preset::Fast, Preset::Paper] {
            assert!(p.budgets().protocol.1.is_none_or(|n| n >= 1000), "{p:?}");
        }
        let ccat = Preset::Fast.models()[2].train_flags().join(" ");
        assert_eq!(
            ccat,
            "--method ccat --preset ccat-resnet20 --epochs 30 --attack-steps 10 --attack-step-size 0.01"
        );
    }

    #[test]
    fn rows_become_train_flags() {
        let smoke = Preset::Smoke.models()[0].train_flags().join(" ");
        assert!(smoke.starts_with("--method normal --arch "), "{smoke}");
        assert!(smoke.contains(&format!("--epochs {}", SMOKE_NORMAL.epochs)));
        assert!(smoke.contains(&format!("--schedule {}", SMOKE_NORMAL.schedule)));
        let paper = Preset::Paper.models()[0].train_flags();
        assert_eq!(paper, ["--method", "normal", "--preset", "normal-wrn28-10"]);
    }

    #[test]
    fn finished_means_model_summary_and_results() -> Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(!is_finished(dir.path(), "normal"));
        std::fs::create_dir_all(eval_dir(dir.path(), "normal"))?;
        std::fs::write(
            model_dir(dir.path(), "normal").join("model.safetensors"),
            b"x",
        )?;
        std::fs::write(model_dir(dir.path(), "normal").join("summary.json"), b"{}")?;
        assert!(!is_finished(dir.path(), "normal"));
        std::fs::write(eval_dir(dir.path(), "normal").join("results.json"), b"{}")?;
        assert!(is_finished(dir.path(), "normal"));
        Ok(())
    }
}
