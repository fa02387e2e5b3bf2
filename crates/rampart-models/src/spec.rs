//! Architecture descriptions: what is saved in a model file's metadata.

use crate::{ModelError, Result};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The architectures Rampart builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Arch {
    /// Wide-ResNet WRN-`depth`-`widen` (pre-activation blocks).
    Wrn {
        /// Total depth; (depth − 4) must be a positive multiple of 6.
        depth: usize,
        /// Widening factor k (stage widths 16k, 32k, 64k).
        widen: usize,
    },
    /// ResNet-20 with 64/128/256 channels, as in the CCAT paper.
    Resnet20,
    /// PreActResNet-18, the fast-AT model.
    PreactResnet18,
    /// A network Rampart did not build (an ONNX graph, see `rampart-interop`): it is
    /// evaluated and attacked like any model, never trained or saved.
    External,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::Wrn { depth, widen } => write!(f, "wrn-{depth}-{widen}"),
            Arch::Resnet20 => write!(f, "resnet20"),
            Arch::PreactResnet18 => write!(f, "preact-resnet18"),
            Arch::External => write!(f, "external"),
        }
    }
}

impl FromStr for Arch {
    type Err = ModelError;

    /// Parses `wrn-D-K`, `resnet20` or `preact-resnet18` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let bad = || {
            ModelError::InvalidSpec(format!(
                "unknown architecture `{s}` (expected wrn-D-K such as wrn-28-10, resnet20 or preact-resnet18)"
            ))
        };
        match lower.as_str() {
            "resnet20" | "resnet-20" => Ok(Arch::Resnet20),
            "preact-resnet18" | "preactresnet18" | "preact-resnet-18" => Ok(Arch::PreactResnet18),
            other => {
                let rest = other.strip_prefix("wrn-").ok_or_else(bad)?;
                let (d, k) = rest.split_once('-').ok_or_else(bad)?;
                let depth = d.parse().map_err(|_| bad())?;
                let widen = k.parse().map_err(|_| bad())?;
                let arch = Arch::Wrn { depth, widen };
                arch.validate()?;
                Ok(arch)
            }
        }
    }
}

impl Arch {
    fn validate(&self) -> Result<()> {
        if let Arch::Wrn { depth, widen } = *self {
            if depth < 10 || (depth - 4) % 6 != 0 {
                return Err(ModelError::InvalidSpec(format!(
                    "WRN depth {depth} invalid: (depth − 4) must be a positive multiple of 6 (10, 16, 22, 28, …)"
                )));
            }
            if widen == 0 {
                return Err(ModelError::InvalidSpec(
                    "WRN widen factor must be ≥ 1".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Everything needed to rebuild a model: architecture, classes, input shape,
/// normalisation and input bounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The architecture.
    pub arch: Arch,
    /// Number of classes K (≥ 2).
    pub num_classes: usize,
    /// Input shape (C, H, W).
    pub input_shape: [usize; 3],
    /// Per-channel mean subtracted inside the model.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by inside the model (> 0).
    pub std: Vec<f32>,
    /// Bounds [lo, hi] of valid inputs.
    pub bounds: [f32; 2],
    /// Adaptive noise injection after every BatchNorm: a stochastic student
    /// (absent in files of deterministic models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<crate::variant::NoiseSpec>,
    /// λ conditioning (FiLM + dual BatchNorm) of a once-for-all model (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oat: Option<crate::variant::OatSpec>,
    /// The ε and momentum of every BatchNorm layer. Always written; files written
    /// before it was recorded load with PyTorch's defaults (1e-5, 0.1), which is what
    /// those models were trained with.
    #[serde(default)]
    pub batch_norm: BatchNormSpec,
}

/// The constants of every BatchNorm layer of a model, as PyTorch's `nn.BatchNorm2d`
/// takes them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNormSpec {
    /// Added to the variance before the square root (> 0).
    pub eps: f64,
    /// Weight of a new batch's statistics in the running averages, in [0, 1]
    /// (PyTorch's convention: `running = (1 − momentum)·running + momentum·batch`).
    pub momentum: f64,
}

impl Default for BatchNormSpec {
    /// PyTorch's defaults: ε = 1e-5, momentum 0.1.
    fn default() -> Self {
        BatchNormSpec {
            eps: 1e-5,
            momentum: 0.1,
        }
    }
}

impl BatchNormSpec {
    /// Checks ε > 0 and momentum in [0, 1], both finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(ModelError::InvalidSpec(format!(
                "BatchNorm eps must be finite and > 0, got {}",
                self.eps
            )));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(ModelError::InvalidSpec(format!(
                "BatchNorm momentum must lie in [0, 1], got {}",
                self.momentum
            )));
        }
        Ok(())
    }
}

/// CIFAR-10 per-channel mean of the training set.
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10 per-channel standard deviation of the training set.
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// MNIST mean of the training set (the constant torchvision's examples use).
pub const MNIST_MEAN: [f32; 1] = [0.1307];
/// MNIST standard deviation of the training set (the constant torchvision's examples use).
pub const MNIST_STD: [f32; 1] = [0.3081];
/// SVHN per-channel mean of the training set (`train_32x32.mat`).
pub const SVHN_MEAN: [f32; 3] = [0.4377, 0.4438, 0.4728];
/// SVHN per-channel standard deviation of the training set (`train_32x32.mat`).
pub const SVHN_STD: [f32; 3] = [0.1980, 0.2010, 0.1970];

impl ModelSpec {
    /// A plain model of `arch` with `num_classes` outputs for inputs of `input_shape`
    /// (C, H, W) in [0, 1], normalised inside the model by the per-channel `mean` and
    /// `std` (one entry per channel), with default BatchNorm constants. Every
    /// architecture ends in global average pooling, so any H, W ≥ 1 works (MNIST's
    /// 28×28 goes 28 → 14 → 7 through a WRN). [`ModelSpec::validate`] checks the values.
    pub fn for_input(
        arch: Arch,
        num_classes: usize,
        input_shape: [usize; 3],
        mean: &[f32],
        std: &[f32],
    ) -> Self {
        ModelSpec {
            arch,
            num_classes,
            input_shape,
            mean: mean.to_vec(),
            std: std.to_vec(),
            bounds: [0.0, 1.0],
            noise: None,
            oat: None,
            batch_norm: BatchNormSpec::default(),
        }
    }

    /// A spec for 32×32 RGB inputs in [0, 1] with CIFAR-10 normalisation.
    pub fn cifar(arch: Arch, num_classes: usize) -> Self {
        Self::for_input(arch, num_classes, [3, 32, 32], &CIFAR10_MEAN, &CIFAR10_STD)
    }

    /// WRN-`depth`-`widen` for CIFAR-shaped inputs.
    pub fn wrn(depth: usize, widen: usize, num_classes: usize) -> Self {
        Self::cifar(Arch::Wrn { depth, widen }, num_classes)
    }

    /// Checks every field; called by `Classifier::new` and on load.
    pub fn validate(&self) -> Result<()> {
        self.arch.validate()?;
        if self.num_classes < 2 {
            return Err(ModelError::InvalidSpec(format!(
                "num_classes must be ≥ 2, got {}",
                self.num_classes
            )));
        }
        let [c, h, w] = self.input_shape;
        if c == 0 || h == 0 || w == 0 {
            return Err(ModelError::InvalidSpec(format!(
                "input shape {:?} has a zero dimension",
                self.input_shape
            )));
        }
        if self.mean.len() != c || self.std.len() != c {
            return Err(ModelError::InvalidSpec(format!(
                "mean and std need {c} entries (one per channel), got {} and {}",
                self.mean.len(),
                self.std.len()
            )));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return Err(ModelError::InvalidSpec(
                "std must be finite and > 0, mean finite".into(),
            ));
        }
        let [lo, hi] = self.bounds;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(ModelError::InvalidSpec(format!(
                "bounds [{lo}, {hi}] must be finite with lo < hi"
            )));
        }
        if let Some(noise) = &self.noise {
            if !(noise.alpha.is_finite() && noise.alpha >= 0.0) {
                return Err(ModelError::InvalidSpec(format!(
                    "the noise factor α must be finite and ≥ 0, got {}",
                    noise.alpha
                )));
            }
        }
        if let Some(oat) = &self.oat {
            oat.validate().map_err(ModelError::InvalidSpec)?;
        }
        self.batch_norm.validate()
    }

    /// A lower bound on the number of f32 values the model's variables hold, computed
    /// from the spec alone (saturating; no model is built): the 3×3 convolutions of every
    /// block at its output width, the stem, the classifier, and a λ-conditioned model's
    /// codes and FiLM inputs. A file whose tensors hold fewer values cannot belong to
    /// this spec, so loading refuses it before allocating the model: a small file cannot
    /// make the loader build an enormous network.
    pub fn min_parameters(&self) -> u64 {
        let [c, _, _] = self.input_shape;
        let k = self.num_classes as u64;
        let c = c as u64;
        // (stem width, block widths, blocks per stage); External has no variables here.
        let (stem, widths, per_stage): (u64, Vec<u64>, u64) = match self.arch {
            Arch::Wrn { depth, widen } => {
                let w = widen as u64;
                let widths = [16, 32, 64].map(|m: u64| m.saturating_mul(w)).to_vec();
                (16, widths, (depth.saturating_sub(4) / 6) as u64)
            }
            Arch::Resnet20 => (64, vec![64, 128, 256], 3),
            Arch::PreactResnet18 => (64, vec![64, 128, 256, 512], 2),
            Arch::External => return 0,
        };
        let last = widths.last().copied().unwrap_or(0);
        let convs = widths.iter().fold(0u64, |acc, &w| {
            acc.saturating_add(
                per_stage
                    .saturating_mul(9)
                    .saturating_mul(w.saturating_mul(w)),
            )
        });
        let mut total = c
            .saturating_mul(stem)
            .saturating_mul(9)
            .saturating_add(convs)
            .saturating_add(k.saturating_mul(last));
        if let Some(oat) = &self.oat {
            // Every block's second BatchNorm (width w) has FiLM fc1: code_dim → 2w.
            let film_in = widths.iter().fold(0u64, |acc, &w| {
                acc.saturating_add(per_stage.saturating_mul(2).saturating_mul(w))
            });
            let code_dim = oat.code_dim as u64;
            total = total
                .saturating_add(code_dim.saturating_mul(oat.lambdas.len() as u64))
                .saturating_add(code_dim.saturating_mul(film_in));
        }
        total
    }

    pub(crate) fn build(
        &self,
        vb: VarBuilder,
        opts: &crate::variant::NormOptions,
    ) -> Result<Box<dyn crate::Network>> {
        let c = self.input_shape[0];
        let k = self.num_classes;
        if let Some(oat) = &self.oat {
            vb.get_with_hints(
                (oat.lambdas.len(), oat.code_dim),
                crate::LAMBDA_CODES,
                candle_nn::Init::Const(0.0),
            )?;
        }
        Ok(match self.arch {
            Arch::Wrn { depth, widen } => {
                Box::new(crate::wrn::wide_resnet(depth, widen, c, k, vb, opts)?)
            }
            Arch::Resnet20 => Box::new(crate::resnet::resnet20(c, k, vb, opts)?),
            Arch::PreactResnet18 => Box::new(crate::resnet::preact_resnet18(c, k, vb, opts)?),
            Arch::External => {
                return Err(ModelError::InvalidSpec(
                    "an external network is built by its loader (Classifier::from_external), not from a spec".into(),
                ))
            }
        })
    }
}
