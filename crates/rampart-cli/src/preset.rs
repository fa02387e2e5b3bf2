//! Named published training settings for `rampart train --preset`.
//!
//! A preset fills every training flag; flags given on the command line override it.

use clap::ValueEnum;

/// Training methods the command knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodName {
    /// Cross-entropy on clean, augmented images.
    Normal,
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
            },
        }
    }
}
