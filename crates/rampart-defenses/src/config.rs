//! The configuration of the training loop, recorded in every checkpoint.

use rampart_data::Augmentation;
use serde::{Deserialize, Serialize};

use crate::error::{DefenseError, Result};
use crate::schedule::{LrSchedule, ScheduleKind};
use crate::sgd::SgdConfig;

/// Per-example training augmentation (a serialisable mirror of
/// [`rampart_data::Augmentation`]): random crop, horizontal flip, Cutout, in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AugmentationConfig {
    /// Zero padding of the random crop in pixels; 0 = no crop.
    pub crop_padding: usize,
    /// Random horizontal flip with probability ½.
    pub flip: bool,
    /// Side of one Cutout hole in pixels; `None` = no Cutout.
    pub cutout: Option<usize>,
}

impl AugmentationConfig {
    /// The data crate's augmentation.
    pub fn to_augmentation(self) -> Augmentation {
        Augmentation {
            crop_padding: self.crop_padding,
            flip: self.flip,
            cutout: self.cutout,
        }
    }
}

impl From<Augmentation> for AugmentationConfig {
    fn from(a: Augmentation) -> Self {
        Self {
            crop_padding: a.crop_padding,
            flip: a.flip,
            cutout: a.cutout,
        }
    }
}

/// Everything the training loop needs besides the model, the method and the data.
///
/// A resumed run must have exactly the configuration saved in its checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Number of epochs, ≥ 1.
    pub epochs: usize,
    /// Training batch size, ≥ 1. Every epoch drops its last, incomplete batch, so a
    /// BatchNorm never sees a batch of one example.
    pub batch_size: usize,
    /// Base (peak) learning rate, > 0.
    pub lr: f64,
    /// Shape of the learning-rate schedule.
    pub schedule: ScheduleKind,
    /// Linear warm-up in epochs (0 = none).
    pub warmup_epochs: f64,
    /// Momentum, Nesterov and weight decay.
    pub sgd: SgdConfig,
    /// Training augmentation.
    pub augmentation: AugmentationConfig,
    /// Seed of the batch order, the augmentation and the method's randomness.
    /// (The model's initialisation is seeded by whoever builds the model.)
    pub seed: u64,
    /// Batch size of the per-epoch evaluation, ≥ 1.
    pub eval_batch_size: usize,
    /// Exponential moving average of the weights with this decay in [0, 1), updated
    /// after every optimiser step; when set, the per-epoch evaluation and the final
    /// model use the averaged weights. `None`: no averaging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
}

impl TrainConfig {
    /// A short run on tiny images, for tests and examples: `epochs` epochs of batch 16
    /// at lr 0.05 (cosine, no warm-up), the CIFAR SGD recipe, crop padding 1, flips and
    /// cutout 2, seed 7, evaluation in batches of 32, no averaging.
    pub fn tiny(epochs: usize) -> Self {
        Self {
            epochs,
            batch_size: 16,
            lr: 0.05,
            schedule: ScheduleKind::Cosine,
            warmup_epochs: 0.0,
            sgd: SgdConfig::cifar(),
            augmentation: AugmentationConfig {
                crop_padding: 1,
                flip: true,
                cutout: Some(2),
            },
            seed: 7,
            eval_batch_size: 32,
            ema: None,
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(DefenseError::Config("batch size must be at least 1".into()));
        }
        if self.eval_batch_size == 0 {
            return Err(DefenseError::Config(
                "evaluation batch size must be at least 1".into(),
            ));
        }
        if self.augmentation.cutout == Some(0) {
            return Err(DefenseError::Config(
                "a Cutout hole needs a side of at least 1 pixel".into(),
            ));
        }
        if let Some(decay) = self.ema {
            crate::ema::Ema::check_decay(decay)?;
        }
        self.sgd.validate()?;
        self.lr_schedule().map(|_| ())
    }

    /// The learning-rate schedule over the whole run.
    pub fn lr_schedule(&self) -> Result<LrSchedule> {
        LrSchedule::new(
            self.lr,
            self.epochs,
            self.schedule.clone(),
            self.warmup_epochs,
        )
    }
}
