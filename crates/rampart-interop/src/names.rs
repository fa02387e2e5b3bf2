//! Parameter names: how the public PyTorch implementations of Rampart's
//! architectures call each tensor of a state dict.
//!
//! | convention | architecture | implementation |
//! |---|---|---|
//! | `robustbench` | WRN-d-k | `WideResNet` of RobustBench (`robustbench.model_zoo.architectures.wide_resnet`, from the TRADES code), `sub_block1=False` |
//! | `preact-resnet` | PreActResNet-18 | `PreActResNet18` of Wong et al.'s fast adversarial training code (kuangliu's `pytorch-cifar` layout, shortcut as `nn.Sequential`) |
//! | `ccat` | ResNet-20 | `ResNet` of Stutz et al.'s CCAT code (`models/resnet.py`, `blocks=[3, 3, 3]`, 64 channels, without `whiten`) |
//! | `rampart` | any | Rampart's own names |
//!
//! Rampart's names follow its model tree (`stem`, `stage{s}.block{b}.{bn1,conv1,…}`,
//! `bn`, `fc`); [`Convention::rename`] maps each to the public one. BatchNorm's
//! `num_batches_tracked` counters exist only on the PyTorch side: they are ignored
//! on import and written as 0 on export.

use std::fmt;
use std::str::FromStr;

use rampart_models::Arch;

/// Whose parameter names a state dict uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    /// Rampart's own names.
    Rampart,
    /// RobustBench's / TRADES' `WideResNet`.
    Robustbench,
    /// Wong et al.'s (kuangliu-style) `PreActResNet18`.
    PreactResnet,
    /// Stutz et al.'s CCAT `ResNet`.
    Ccat,
}

impl Convention {
    /// Every convention, for help texts.
    pub const ALL: [Convention; 4] = [
        Convention::Rampart,
        Convention::Robustbench,
        Convention::PreactResnet,
        Convention::Ccat,
    ];

    /// The public convention of an architecture.
    pub fn default_for(arch: &Arch) -> Convention {
        match arch {
            Arch::Wrn { .. } => Convention::Robustbench,
            Arch::PreactResnet18 => Convention::PreactResnet,
            Arch::Resnet20 => Convention::Ccat,
            Arch::External => Convention::Rampart,
        }
    }

    /// Whether this convention names the tensors of `arch`.
    pub fn fits(self, arch: &Arch) -> bool {
        *arch != Arch::External
            && (self == Convention::Rampart || self == Convention::default_for(arch))
    }

    /// The name of Rampart's tensor `ours` under this convention (None for a name
    /// outside the architecture's tree).
    pub fn rename(self, ours: &str) -> Option<String> {
        let parts: Vec<&str> = ours.split('.').collect();
        let (head, rest) = parts.split_first()?;
        let rest = rest.join(".");
        let join = |prefix: String| -> String {
            if rest.is_empty() {
                prefix
            } else {
                format!("{prefix}.{rest}")
            }
        };
        match self {
            Convention::Rampart => Some(ours.to_string()),
            Convention::Robustbench => match *head {
                "stem" => Some(join("conv1".into())),
                "bn" => Some(join("bn1".into())),
                "fc" => Some(join("fc".into())),
                _ => {
                    let (s, b, layer, tail) = block(&parts)?;
                    let layer = if layer == "shortcut" {
                        "convShortcut"
                    } else {
                        layer
                    };
                    Some(format!("block{s}.layer.{b}.{layer}{tail}"))
                }
            },
            Convention::PreactResnet => match *head {
                "stem" => Some(join("conv1".into())),
                "bn" => Some(join("bn".into())),
                "fc" => Some(join("linear".into())),
                _ => {
                    let (s, b, layer, tail) = block(&parts)?;
                    let layer = if layer == "shortcut" {
                        "shortcut.0"
                    } else {
                        layer
                    };
                    Some(format!("layer{s}.{b}.{layer}{tail}"))
                }
            },
            Convention::Ccat => match *head {
                "stem" => Some(join("conv1".into())),
                "stem_bn" => Some(join("norm1".into())),
                "fc" => Some(join("logits".into())),
                _ => {
                    let (s, b, layer, tail) = block(&parts)?;
                    let layer = match layer {
                        "bn1" => "norm1",
                        "bn2" => "norm2",
                        "shortcut" => "downsample.0",
                        "shortcut_bn" => "downsample.1",
                        other => other,
                    };
                    Some(format!("block{}.{b}.{layer}{tail}", s.checked_sub(1)?))
                }
            },
        }
    }
}

/// `stage{s}.block{b}.{layer}.…` → (s, b, layer, ".…").
fn block<'a>(parts: &[&'a str]) -> Option<(usize, usize, &'a str, String)> {
    let [stage, blk, layer, tail @ ..] = parts else {
        return None;
    };
    let s = stage.strip_prefix("stage")?.parse().ok()?;
    let b = blk.strip_prefix("block")?.parse().ok()?;
    let tail: String = tail.iter().map(|t| format!(".{t}")).collect();
    Some((s, b, layer, tail))
}

impl fmt::Display for Convention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Convention::Rampart => "rampart",
            Convention::Robustbench => "robustbench",
            Convention::PreactResnet => "preact-resnet",
            Convention::Ccat => "ccat",
        })
    }
}

impl FromStr for Convention {
    type Err = String;

    /// `rampart`, `robustbench`, `preact-resnet` or `ccat`.
    fn from_str(s: &str) -> Result<Self, String> {
        Convention::ALL
            .into_iter()
            .find(|c| c.to_string() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                format!("unknown parameter-name convention `{s}` (expected rampart, robustbench, preact-resnet or ccat)")
            })
    }
}
