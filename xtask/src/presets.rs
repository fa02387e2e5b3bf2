//! The study presets: the models each trains (rows and their recipes) and every
//! evaluation budget, in one place; `reproduce` runs them.

use clap::ValueEnum;

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

/// The model of the `smoke` preset, normally trained: WRN-10-1 for 1 epoch on the
/// first 10,240 training images, batch 64, one-cycle lr 0 → 0.2 → 0 — the budget of
/// every row the smoke preset trains from scratch, so that rows compare at one budget
/// (the calibration rows with the normal one, OAT with its fixed-λ model). The whole
/// study has 15 minutes on a 2-core CPU after the build, with the final clean
/// evaluation on all 10,000 test images.
pub const SMOKE_NORMAL: Recipe = Recipe {
    arch: "wrn-10-1",
    epochs: 1,
    batch_size: 64,
    lr: 0.2,
    schedule: "cyclic",
    train_limit: Some(10_240),
    per_epoch_test_limit: Some(1000),
};

/// The smoke preset's adversarial training, from scratch at the budget of
/// [`SMOKE_NORMAL`], every example adversarial from FGSM with a uniform random start
/// (ε = 8/255, α = 10/255, [`SMOKE_AT_FLAGS`]). Measured before (WRN-10-1, PGD-20 on
/// 1,000 test images): 1 epoch on 25,600 or 50,000 images, batch 128 or 64, FGSM-RS or
/// PGD-2, from scratch or fine-tuning the normal model all ended at 21–24 % robust
/// accuracy; from scratch with batch 64 was the best per second.
pub const SMOKE_AT: Recipe = SMOKE_NORMAL;

/// `rampart train` flags of the smoke AT row: PGD with one step of 10/255 from a
/// uniform random start at ε = 8/255, i.e. the FGSM-RS step of fast AT.
pub const SMOKE_AT_FLAGS: &[&str] = &["--attack-steps", "1", "--attack-step-size", "10/255"];

/// The smoke preset's CCAT: the budget of [`SMOKE_AT`], half of
/// each batch adversarial from the conf attack shortened to 3 steps of 0.03 (momentum
/// 0.9, backtracking 1.5, uniform-norm start) at ε = 0.03, ρ = 10
/// ([`SMOKE_CCAT_FLAGS`]); per image it costs about as much as the AT row.
pub const SMOKE_CCAT: Recipe = SMOKE_AT;

/// `rampart train` flags of the smoke CCAT row.
pub const SMOKE_CCAT_FLAGS: &[&str] = &["--attack-steps", "3", "--attack-step-size", "0.03"];

/// The smoke preset's calibration-oriented rows (label smoothing, RegMixup, AR-AdaLS):
/// the budget of [`SMOKE_NORMAL`], so their ECE compares with the normal row's.
pub const SMOKE_CALIBRATION: Recipe = SMOKE_AT;

/// The smoke preset's stochastic student: fine-tunes the AT row's model with adaptive
/// noise (α starting at 0.1) by the AT row's FGSM-RS adversarial training for 1 epoch
/// on the first 5,120 images at a lower one-cycle peak (0.05).
pub const SMOKE_STUDENT: Recipe = Recipe {
    lr: 0.05,
    train_limit: Some(5_120),
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

/// A preset's eleven rows: the core study (`normal`, `at`, `ccat`) and the rows beyond
/// it, for a preset whose adversarial rows use `adversarial` and whose calibration rows
/// use `calibration` (flags `attack_flags` give the adversarial rows' attack), and
/// whose student fine-tunes the `at` row with `student`.
macro_rules! study_rows {
    ([$normal:expr, $at:expr, $ccat:expr $(,)?], $calibration:expr, $adversarial:expr, $attack_flags:expr, $fixed_flags:expr, $student:expr, $student_flags:expr, $plain_student:expr, $plain_student_flags:expr) => {
        [
            $normal,
            $at,
            $ccat,
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

const SMOKE_ROWS: [ModelRow; 11] = study_rows!(
    [
        row("normal", Training::Recipe(SMOKE_NORMAL), &[]),
        row("at", Training::Recipe(SMOKE_AT), SMOKE_AT_FLAGS),
        row("ccat", Training::Recipe(SMOKE_CCAT), SMOKE_CCAT_FLAGS),
    ],
    Training::Recipe(SMOKE_CALIBRATION),
    Training::Recipe(SMOKE_AT),
    SMOKE_AT_FLAGS,
    SMOKE_OAT_FIXED_FLAGS,
    Training::Recipe(SMOKE_STUDENT),
    SMOKE_STUDENT_FLAGS,
    Training::Recipe(SMOKE_STUDENT),
    SMOKE_PLAIN_STUDENT_FLAGS
);

const FAST_STUDY: [ModelRow; 11] = study_rows!(
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
    ],
    Training::Preset("normal-preact-resnet18"),
    Training::Preset("fast-at-preact-resnet18"),
    &[],
    OAT_FIXED_FLAGS,
    Training::Preset("fast-at-preact-resnet18"),
    &["--epochs", "5", "--noise", "0.1"],
    Training::Preset("normal-preact-resnet18"),
    &["--epochs", "5", "--noise", "0.1"]
);

/// The fast preset's rows that AutoAttack runs on: all of [`FAST_ROWS`].
const FAST_AUTOATTACK: [&str; 13] = [
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
    "student-normal",
    "fast-at",
    "trades",
];

/// The fast preset's rows: the study's eleven, then the two published on fast AT's
/// schedule: fast AT itself (FGSM with a uniform random start, Wong et al. 2020) and
/// TRADES (its own 10-step KL attack, β = 6).
const FAST_ROWS: [ModelRow; 13] = {
    let [normal, at, ccat, ls, regmixup, adals, sat, oat, fixed, student, plain_student] =
        FAST_STUDY;
    [
        normal,
        at,
        ccat,
        ls,
        regmixup,
        adals,
        sat,
        oat,
        fixed,
        student,
        plain_student,
        extended(
            "fast-at",
            "fast-at",
            Training::Preset("fast-at-preact-resnet18"),
            &[],
        ),
        extended(
            "trades",
            "trades",
            Training::Preset("fast-at-preact-resnet18"),
            &[],
        ),
    ]
};

const PAPER_ROWS: [ModelRow; 11] = study_rows!(
    [
        row("normal", Training::Preset("normal-wrn28-10"), &[]),
        row("at", Training::Preset("at-wrn28-10"), &[]),
        row("ccat", Training::Preset("ccat-resnet20"), &[]),
    ],
    Training::Preset("normal-wrn28-10"),
    Training::Preset("at-wrn28-10"),
    &[],
    OAT_FIXED_FLAGS,
    Training::Preset("at-wrn28-10"),
    &["--epochs", "10", "--lr", "0.01", "--noise", "0.1"],
    Training::Preset("normal-wrn28-10"),
    &["--epochs", "10", "--lr", "0.01", "--noise", "0.1"]
);

/// The `tiny` preset's training: WRN-10-1 for one epoch on the first 16 images.
pub const TINY: Recipe = Recipe {
    arch: "wrn-10-1",
    // Two, so that a schedule can be shortened (--epochs, --fit-minutes).
    epochs: 2,
    batch_size: 8,
    lr: 0.05,
    schedule: "cyclic",
    train_limit: Some(16),
    per_epoch_test_limit: Some(8),
};

const TINY_ROWS: [ModelRow; 2] = [
    row("normal", Training::Recipe(TINY), &[]),
    row("at", Training::Recipe(TINY), SMOKE_AT_FLAGS),
];

/// The noise scales of a student's sweep in the fast and paper presets.
pub const NOISE_VALUES: &str = "0,0.5,1,2,4";

/// EOT samples of every attack on a stochastic model: `rampart`'s default (AutoAttack's
/// rand version, 20).
pub const STOCHASTIC_EOT: usize = 20;

/// Every evaluation budget of a preset, in one place ([`Preset::budgets`]); the
/// study's `report.md` states them. Robust figures are always the per-example worst
/// case of PGD with cross-entropy, C&W margin and conf (`rampart eval --suite pgd20`)
/// at L∞ 8/255, with the trust checks; a stochastic model is attacked with EOT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalBudgets {
    /// PGD-20 worst case on deterministic rows: attacked images (the first N), or all;
    /// unused where the protocol holds that figure ([`EvalBudgets::pgd20_in_protocol`]).
    pub robust_examples: Option<usize>,
    /// The evaluation protocol run on every row: the suite and its attacked images
    /// (the first N before the last 1,000, which pick τ), or all.
    pub protocol: (&'static str, Option<usize>),
    /// Deterministic rows: images the protocol's trust checks run on (the first N).
    pub trust_examples: usize,
    /// The protocol's batch size (`None`: `rampart eval`'s 128); the tiny preset's
    /// small one gives its few images several batches, so they can be sharded.
    pub protocol_batch_size: Option<usize>,
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
    /// Stochastic rows: the noise scales of their sweep (`rampart sweep --values`).
    pub noise_values: &'static str,
    /// Sweeps (λ of OAT, noise of the students): test images for the clean figures and
    /// images attacked per value, or all.
    pub sweep_limits: Option<(usize, usize)>,
    /// Deterministic rows' sweeps: images the trust checks run on at every value.
    pub sweep_trust_examples: usize,
    /// AutoAttack (standard; `rand` for a stochastic row) at L∞ 8/255: the rows and the
    /// images (the first N), or all.
    pub autoattack: (&'static [&'static str], Option<usize>),
    /// Wong et al.'s PGD-50-10 (cross-entropy, 50 steps of 2/255, 10 restarts, L∞
    /// 8/255) on every deterministic row: the images (the first N); `None`: not run.
    pub pgd50_10: Option<usize>,
}

impl EvalBudgets {
    /// Whether the protocol holds the deterministic rows' PGD-20 figure: the `quick`
    /// suite's L∞ 8/255 block is the PGD-20 worst case of cross-entropy, margin and conf
    /// (step 2/255, uniform start) with the trust checks, on
    /// the first N images of the test set — the evaluation `--suite pgd20` would repeat
    /// on the same images. Such a row is not attacked twice: its figure is the
    /// protocol's, on the protocol's attacked images, and `robust_examples` is unused.
    pub fn pgd20_in_protocol(&self) -> bool {
        self.protocol.0 == "quick"
    }

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
            if self.pgd20_in_protocol() {
                (
                    "PGD-20 worst case (CE, margin, conf), L∞ 8/255, step 2/255".to_string(),
                    n(self.protocol.1),
                    format!(
                        "uniform start; trust checks on the first {}; the protocol's L∞ 8/255 \
                         block (the same attacks on the same images, run once)",
                        self.trust_examples
                    ),
                )
            } else {
                (
                    "PGD-20 worst case (CE, margin, conf), L∞ 8/255, step 2/255".to_string(),
                    n(self.robust_examples),
                    "uniform start; trust checks on the first 100".to_string(),
                )
            },
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
                format!(
                    "EOT {eot_p}, trust checks on the first {trust_p}; noise scales {}",
                    self.noise_values
                ),
            ),
            (
                "sweeps (clean / attacked per value)".to_string(),
                self.sweep_limits
                    .map_or("all".to_string(), |(c, a)| format!("{c} / {a}")),
                format!(
                    "PGD-20 worst case, trust checks on the first {}",
                    self.sweep_trust_examples
                ),
            ),
            (
                format!("AutoAttack on {}", self.autoattack.0.join(", ")),
                n(self.autoattack.1),
                "standard (rand with EOT 20 for stochastic rows)".to_string(),
            ),
        ];
        let wong = self.pgd50_10.map(|images| {
            (
                "PGD-50-10 (CE), L∞ 8/255, step 2/255, on deterministic rows".to_string(),
                images.to_string(),
                "10 runs from fresh uniform starts (Wong et al. 2020)".to_string(),
            )
        });
        let mut md = String::from("| evaluation | images | budget |\n|---|---:|---|\n");
        for (what, images, budget) in rows.into_iter().chain(wong) {
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
    /// Seconds: the whole pipeline on a handful of images (tests of the study itself).
    #[value(hide = true)]
    Tiny,
}

impl Preset {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Smoke => "smoke",
            Preset::Fast => "fast",
            Preset::Paper => "paper",
            Preset::Tiny => "tiny",
        }
    }

    /// What the preset approximates, for the report.
    pub fn about(self) -> &'static str {
        match self {
            Preset::Smoke => {
                "A check that the whole pipeline works on real data on a 2-core CPU, in about \
                 15 minutes: a small Wide-ResNet (WRN-10-1) trained for one epoch on the first \
                 10,240 training images (batch 64, one-cycle learning rate) — normally; \
                 adversarially (FGSM with a random start at 8/255); with CCAT (a 3-step conf \
                 attack, half of each batch); with label smoothing, RegMixup and AR-AdaLS; with \
                 Sinkhorn AT, once-for-all AT and a dedicated OAT model at λ = 0.3 (FGSM-RS \
                 attacks) — and two stochastic students fine-tuned on 5,120 images: \
                 adversarially from the AT model, and with clean cross-entropy from the normal \
                 model. Every row is evaluated clean on all 10,000 test images and by the quick \
                 protocol, whose PGD-20 worst case at 8/255 attacks the first 500. It \
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
                 10-step conf attack; fast AT as published (FGSM with a random start) and \
                 TRADES on the same schedule. PGD-20 at 8/255 on the whole test set, and Wong \
                 et al.'s PGD-50-10 on the first 1,000 images of every deterministic row."
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
            Preset::Tiny => {
                "The whole pipeline in seconds on a handful of images (normal and FGSM-RS \
                 adversarial training of WRN-10-1 on 16 images, every evaluation on 8), to \
                 test the study itself; its numbers mean nothing."
            }
        }
    }

    /// The models trained, in order (a student after its teacher).
    pub fn models(self) -> &'static [ModelRow] {
        match self {
            Preset::Smoke => &SMOKE_ROWS,
            Preset::Fast => &FAST_ROWS,
            Preset::Paper => &PAPER_ROWS,
            Preset::Tiny => &TINY_ROWS,
        }
    }

    /// Every evaluation budget of the preset.
    ///
    /// Smoke (2-core CPU, the whole study in about 15 minutes): the deterministic rows'
    /// quick protocol, which holds their PGD-20 worst case, attacks the first 500 test
    /// images (a rate's 95 % interval is then at most ±4.4 points; trust checks on the
    /// first 25). An EOT-k attack of a stochastic student costs k forward-backward
    /// passes per step, so a student's PGD-20 runs at EOT 3 on the first 100 images
    /// (trust checks on 10, 2 noise draws), its protocol at EOT 2 on 200 and its noise
    /// sweep (scales 0, 1, 4) at EOT 2 on 50 per value; on the smoke student EOT 3 and
    /// EOT 20 found the same PGD-20 robust accuracy (23 of 100 images, one image
    /// differing each way). The OAT sweep attacks 100 images per λ (trust checks on 10).
    /// AutoAttack (about a minute and a half per 100 images of WRN-10-1 on one core)
    /// runs on the AT model only. Fast: every row, on the first 1,000 test images.
    pub fn budgets(self) -> EvalBudgets {
        match self {
            Preset::Smoke => EvalBudgets {
                robust_examples: Some(500),
                protocol: ("quick", Some(500)),
                trust_examples: 25,
                protocol_batch_size: None,
                stochastic_eot: 3,
                stochastic_draws: 2,
                stochastic_robust_examples: Some(100),
                stochastic_protocol: (2, Some(200), 10),
                stochastic_trust_examples: 10,
                stochastic_sweep_examples: Some(50),
                noise_values: "0,1,4",
                sweep_limits: Some((1000, 100)),
                sweep_trust_examples: 10,
                autoattack: (&["at"], Some(100)),
                pgd50_10: None,
            },
            Preset::Fast => EvalBudgets {
                robust_examples: None,
                protocol: ("quick", None),
                trust_examples: 100,
                protocol_batch_size: None,
                stochastic_eot: STOCHASTIC_EOT,
                stochastic_draws: 5,
                stochastic_robust_examples: Some(1000),
                stochastic_protocol: (STOCHASTIC_EOT, Some(1000), 100),
                stochastic_trust_examples: 100,
                stochastic_sweep_examples: Some(1000),
                noise_values: NOISE_VALUES,
                sweep_limits: Some((10_000, 1000)),
                sweep_trust_examples: 100,
                // Every row, as the published protocol asks: AutoAttack runs each
                // attack on the images still robust, so on the rows trained without
                // adversaries (normal, the calibration rows, the student of normal
                // training) it ends after APGD-CE's first pass on almost every image.
                autoattack: (&FAST_AUTOATTACK, Some(1000)),
                pgd50_10: Some(1000),
            },
            Preset::Paper => EvalBudgets {
                robust_examples: None,
                protocol: ("ccat", None),
                trust_examples: 100,
                protocol_batch_size: None,
                stochastic_eot: STOCHASTIC_EOT,
                stochastic_draws: 5,
                stochastic_robust_examples: None,
                stochastic_protocol: (STOCHASTIC_EOT, None, 100),
                stochastic_trust_examples: 100,
                stochastic_sweep_examples: None,
                noise_values: NOISE_VALUES,
                sweep_limits: None,
                sweep_trust_examples: 100,
                autoattack: (&["at", "ccat", "sat", "oat", "student"], None),
                pgd50_10: None,
            },
            Preset::Tiny => EvalBudgets {
                robust_examples: Some(8),
                protocol: ("quick", Some(8)),
                trust_examples: 4,
                protocol_batch_size: Some(4),
                stochastic_eot: 1,
                stochastic_draws: 1,
                stochastic_robust_examples: Some(8),
                stochastic_protocol: (1, Some(8), 4),
                stochastic_trust_examples: 4,
                stochastic_sweep_examples: Some(8),
                noise_values: "0,1",
                sweep_limits: Some((16, 8)),
                sweep_trust_examples: 4,
                autoattack: (&[], None),
                pgd50_10: Some(8),
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

    pub(crate) fn default_device(self) -> &'static str {
        match self {
            Preset::Smoke | Preset::Tiny => "cpu",
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

    /// Whether this row's PGD-20 figure is the protocol's ([`EvalBudgets::pgd20_in_protocol`]
    /// and a deterministic model); its evaluation then is the clean pass alone.
    pub fn robust_from_protocol(&self, budgets: &EvalBudgets) -> bool {
        !self.stochastic && budgets.pgd20_in_protocol()
    }

    /// The `rampart eval` flags of this row's evaluation: clean accuracy on the whole
    /// test set and the PGD-20 worst case (L∞, ε = 8/255, step 2/255) on the first
    /// `robust_examples`; a stochastic row with its EOT, draws and images. A row whose
    /// PGD-20 figure the protocol gives ([`ModelRow::robust_from_protocol`]) gets the
    /// clean suite alone.
    pub fn eval_flags(&self, budgets: &EvalBudgets) -> Vec<String> {
        if self.robust_from_protocol(budgets) {
            return vec!["--suite".to_string(), "clean".to_string()];
        }
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
