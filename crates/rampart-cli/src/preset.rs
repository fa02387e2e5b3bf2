//! Named published training settings for `rampart train --preset`.
//!
//! A preset fills every training flag; flags given on the command line override it.

use clap::ValueEnum;
use rampart_defenses::{MethodKind, Overrides};

/// Training methods the command knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodName {
    /// Cross-entropy on clean, augmented images.
    Normal,
    /// Adversarial training (Madry et al. 2018): cross-entropy on PGD examples
    /// [default attack: L∞ 8/255, 7 steps of 2/255, uniform start, whole batch].
    At,
    /// Fast AT (Wong et al. 2020): FGSM from a uniform random start, step 1.25·ε
    /// [default ε 8/255]; pair with a short cyclic schedule.
    FastAt,
    /// TRADES (Zhang et al. 2019): CE(clean) + β·KL(clean ‖ adversarial) [default
    /// ε 0.031, 10 steps of 0.007, β 6].
    Trades,
    /// Confidence-calibrated AT (Stutz et al. 2020): half clean, half conf-attack
    /// examples with soft targets [default ε 0.03, 40 steps of 0.005, momentum 0.9,
    /// backtracking 1.5, ρ 10].
    Ccat,
    /// Once-for-all AT (Wang et al. 2020): a λ-conditioned model (FiLM + dual
    /// BatchNorm), loss (1−λ)·CE(clean) + λ·CE(adversarial) with λ per example from
    /// {0, 0.1, 0.2, 0.3, 0.4, 1} [default attack: L∞ 8/255, 7 steps of 2/255].
    Oat,
    /// RegMixup (Pinto et al. 2022): CE(clean) + CE(mixup of the batch), λ ~ Beta(α, α)
    /// [default α 20].
    #[value(name = "regmixup")]
    RegMixup,
    /// Sinkhorn AT: CE(adversarial) + β·Sinkhorn divergence between the clean and the
    /// adversarial logits [default ε 8/255, 10 steps of 2/255, β 1].
    Sat,
    /// AR-AdaLS (Qin et al. 2021): label smoothing adapted per robustness group
    /// (FGSM probe at ε/4, ε/2, ε) to the group's calibration gap [default ε 8/255,
    /// initial smoothing 0.1].
    #[value(name = "ar-adals")]
    ArAdaLs,
}

impl MethodName {
    /// The training method of this name.
    pub fn kind(self) -> MethodKind {
        match self {
            MethodName::Normal => MethodKind::Normal,
            MethodName::At => MethodKind::At,
            MethodName::FastAt => MethodKind::FastAt,
            MethodName::Trades => MethodKind::Trades,
            MethodName::Ccat => MethodKind::Ccat,
            MethodName::Oat => MethodKind::Oat,
            MethodName::RegMixup => MethodKind::RegMixup,
            MethodName::Sat => MethodKind::Sat,
            MethodName::ArAdaLs => MethodKind::ArAdaLs,
        }
    }
}

/// A preset's training attack where it differs from the method's defaults (`None`
/// fields keep the method's default).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct AttackSettings {
    /// Budget ε (L∞).
    pub eps: Option<f64>,
    /// Attack steps.
    pub steps: Option<usize>,
    /// Absolute step size.
    pub step_size: Option<f64>,
    /// Adversarial fraction of each batch.
    pub fraction: Option<f64>,
    /// The attack returns its last iterate (the paper's training code).
    pub last_iterate: Option<bool>,
}

impl AttackSettings {
    /// The values the method's settings fall back to when no flag gives them.
    pub fn overrides(self) -> Overrides {
        Overrides {
            eps: self.eps,
            attack_steps: self.steps,
            attack_step_size: self.step_size,
            adv_fraction: self.fraction,
            attack_last_iterate: self.last_iterate,
            ..Overrides::default()
        }
    }
}

/// Shapes of the learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScheduleName {
    /// The same rate throughout.
    Constant,
    /// Multiply by --gamma (default 0.1) at each of --milestones (default 50%,75%).
    Multistep,
    /// Cosine decay from --lr to 0 over the run.
    Cosine,
    /// One cycle: linear 0 → --lr at --peak (default 0.4) of the run → 0 (fast AT).
    Cyclic,
    /// Multiply by --gamma (default 0.95) after every epoch (CCAT).
    Exponential,
}

/// Training augmentations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AugmentName {
    /// Random crop with 4-pixel zero padding and random horizontal flip.
    Standard,
    /// Random crop with 4-pixel zero padding, no flip (digits must not be mirrored).
    Crop,
    /// No augmentation.
    None,
}

/// Names of the presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PresetName {
    /// Normal WRN-28-10, 200 epochs, batch 128, lr 0.1 ×0.1 at 50 % and 75 %, Nesterov
    /// 0.9, weight decay 5e-4, crop + flip (the published CIFAR schedule).
    #[value(name = "normal-wrn28-10")]
    NormalWrn28_10,
    /// Normal PreActResNet-18, 30 epochs, batch 128, one-cycle lr 0 → 0.2 → 0 (peak at
    /// 40 %), Nesterov 0.9, weight decay 5e-4, crop + flip (single GPU, minutes).
    #[value(name = "normal-preact-resnet18")]
    NormalPreactResnet18,
    /// Adversarial training of WRN-28-10: PGD-10 with step 0.007 at L∞ ε = 0.03 on the
    /// whole batch, 150 epochs, batch 128, lr 0.1 ×0.1 at 50 % and 75 %, Nesterov 0.9,
    /// weight decay 5e-4, crop + flip.
    #[value(name = "at-wrn28-10")]
    AtWrn28_10,
    /// Fast AT of PreActResNet-18 (Wong et al. 2020): FGSM-RS at 8/255 with step 10/255,
    /// 15 epochs, batch 128, one-cycle lr 0 → 0.2 → 0 (peak at 40 %), momentum 0.9,
    /// weight decay 5e-4, crop + flip.
    #[value(name = "fast-at-preact-resnet18")]
    FastAtPreactResnet18,
    /// TRADES of WRN-34-10 (the official code's defaults): ε 0.031, 10 steps of 0.007,
    /// β 6, 76 epochs, batch 128, lr 0.1 ×0.1 from epoch 75, momentum 0.9, weight decay
    /// 2e-4, crop + flip.
    #[value(name = "trades-wrn34-10")]
    TradesWrn34_10,
    /// CCAT of ResNet-20 (Stutz et al. 2020): half the batch adversarial from the conf
    /// attack (ε 0.03, 40 steps of 0.005, momentum 0.9, backtracking 1.5), ρ 10, 200
    /// epochs, batch 100, lr 0.075 ×0.95 per epoch, momentum 0.9, weight decay 5e-4,
    /// crop + flip.
    #[value(name = "ccat-resnet20")]
    CcatResnet20,
}

/// Every training setting a preset fixes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preset {
    /// The name given to `--preset`.
    pub name: &'static str,
    /// What it approximates.
    pub about: &'static str,
    /// The method.
    pub method: MethodName,
    /// The architecture, as `--arch` takes it.
    pub arch: &'static str,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Base (peak) learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay.
    pub weight_decay: f64,
    /// Schedule shape.
    pub schedule: ScheduleName,
    /// Multistep milestones, as `--milestones` takes them.
    pub milestones: &'static [&'static str],
    /// Multistep / exponential factor.
    pub gamma: Option<f64>,
    /// Cyclic peak position.
    pub peak: Option<f64>,
    /// Augmentation.
    pub augment: AugmentName,
    /// Cutout hole side.
    pub cutout: Option<usize>,
    /// The training attack, where it differs from the method's defaults.
    pub attack: AttackSettings,
}

impl PresetName {
    /// The settings of this preset.
    pub fn preset(self) -> Preset {
        match self {
            PresetName::NormalWrn28_10 => Preset {
                name: "normal-wrn28-10",
                about: "WRN-28-10 (Zagoruyko & Komodakis 2016) trained normally for 200 epochs with \
                        the step schedule of the robustness baselines (lr 0.1, ×0.1 after 100 and 150 \
                        epochs, as in Rice et al. 2020); the WRN paper itself used ×0.2 at 60/120/160",
                method: MethodName::Normal,
                arch: "wrn-28-10",
                epochs: 200,
                batch_size: 128,
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
                schedule: ScheduleName::Multistep,
                milestones: &["50%", "75%"],
                gamma: Some(0.1),
                peak: None,
                augment: AugmentName::Standard,
                cutout: None,
                attack: AttackSettings::default(),
            },
            PresetName::NormalPreactResnet18 => Preset {
                name: "normal-preact-resnet18",
                about: "PreActResNet-18 trained normally for 30 epochs with the one-cycle learning \
                        rate of fast adversarial training (Wong et al. 2020): a single-GPU baseline",
                method: MethodName::Normal,
                arch: "preact-resnet18",
                epochs: 30,
                batch_size: 128,
                lr: 0.2,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
                schedule: ScheduleName::Cyclic,
                milestones: &[],
                gamma: None,
                peak: Some(0.4),
                augment: AugmentName::Standard,
                cutout: None,
                attack: AttackSettings::default(),
            },
            PresetName::AtWrn28_10 => Preset {
                name: "at-wrn28-10",
                about: "Adversarial training (Madry et al. 2018) of WRN-28-10 with the setting of \
                        REFERENCE §3 (PGD-10, step 0.007, L∞ ε = 0.03, whole batch adversarial, \
                        150 epochs, training on the attack's last iterate as the paper's code \
                        does); the step schedule (×0.1 at 50 % and 75 %) is this preset's \
                        choice",
                method: MethodName::At,
                arch: "wrn-28-10",
                epochs: 150,
                batch_size: 128,
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
                schedule: ScheduleName::Multistep,
                milestones: &["50%", "75%"],
                gamma: Some(0.1),
                peak: None,
                augment: AugmentName::Standard,
                cutout: None,
                attack: AttackSettings {
                    eps: Some(0.03),
                    steps: Some(10),
                    step_size: Some(0.007),
                    fraction: Some(1.0),
                    last_iterate: Some(true),
                },
            },
            PresetName::FastAtPreactResnet18 => Preset {
                name: "fast-at-preact-resnet18",
                about: "Fast adversarial training (Wong, Rice & Kolter 2020) of PreActResNet-18: \
                        FGSM with a uniform random start at ε = 8/255, step 10/255, training on \
                        the stepped point as the paper's code does, 15 epochs, one-cycle lr \
                        0 → 0.2 → 0; the paper's mixed precision and early stopping are not \
                        reproduced",
                method: MethodName::FastAt,
                arch: "preact-resnet18",
                epochs: 15,
                batch_size: 128,
                lr: 0.2,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 5e-4,
                schedule: ScheduleName::Cyclic,
                milestones: &[],
                gamma: None,
                peak: Some(0.4),
                augment: AugmentName::Standard,
                cutout: None,
                attack: AttackSettings {
                    last_iterate: Some(true),
                    ..AttackSettings::default()
                },
            },
            PresetName::TradesWrn34_10 => Preset {
                name: "trades-wrn34-10",
                about: "TRADES (Zhang et al. 2019) of WRN-34-10 with the defaults of the official \
                        CIFAR-10 script: ε 0.031, 10 steps of 0.007, β = 6, 76 epochs, lr 0.1 \
                        ×0.1 from epoch 75, momentum 0.9, weight decay 2e-4",
                method: MethodName::Trades,
                arch: "wrn-34-10",
                epochs: 76,
                batch_size: 128,
                lr: 0.1,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 2e-4,
                schedule: ScheduleName::Multistep,
                milestones: &["74"],
                gamma: Some(0.1),
                peak: None,
                augment: AugmentName::Standard,
                cutout: None,
                attack: AttackSettings::default(),
            },
            PresetName::CcatResnet20 => Preset {
                name: "ccat-resnet20",
                about: "Confidence-calibrated adversarial training (Stutz, Hein & Schiele 2020) of \
                        ResNet-20: half of each batch from the conf attack (ε 0.03, 40 steps of \
                        0.005, momentum 0.9, backtracking 1.5), ρ = 10, 200 epochs, batch 100, \
                        lr 0.075 ×0.95 per epoch, momentum 0.9, weight decay 5e-4",
                method: MethodName::Ccat,
                arch: "resnet20",
                epochs: 200,
                batch_size: 100,
                lr: 0.075,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 5e-4,
                schedule: ScheduleName::Exponential,
                milestones: &[],
                gamma: Some(0.95),
                peak: None,
                augment: AugmentName::Standard,
                cutout: None,
                attack: AttackSettings::default(),
            },
        }
    }
}
