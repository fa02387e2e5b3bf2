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
        // (Rampart's top-level layers, layers inside a block) → the public names.
        let (heads, layers): (Table, Table) = match self {
            Convention::Rampart => return Some(ours.to_string()),
            Convention::Robustbench => (
                &[("stem", "conv1"), ("bn", "bn1"), ("fc", "fc")],
                &[("shortcut", "convShortcut")],
            ),
            Convention::PreactResnet => (
                &[("stem", "conv1"), ("bn", "bn"), ("fc", "linear")],
                &[("shortcut", "shortcut.0")],
            ),
            Convention::Ccat => (
                &[("stem", "conv1"), ("stem_bn", "norm1"), ("fc", "logits")],
                &[
                    ("bn1", "norm1"),
                    ("bn2", "norm2"),
                    ("shortcut", "downsample.0"),
                    ("shortcut_bn", "downsample.1"),
                ],
            ),
        };
        let lookup = |table: &[(&str, &str)], key: &str| {
            table
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        };
        let parts: Vec<&str> = ours.split('.').collect();
        let (head, rest) = parts.split_first()?;
        if let Some(mapped) = lookup(heads, head) {
            return Some(
                [mapped.as_str()]
                    .into_iter()
                    .chain(rest.iter().copied())
                    .collect::<Vec<_>>()
                    .join("."),
            );
        }
        let (s, b, layer, tail) = block(&parts)?;
        let layer = lookup(layers, layer).unwrap_or_else(|| layer.to_string());
        let prefix = match self {
            Convention::Robustbench => format!("block{s}.layer.{b}"),
            Convention::PreactResnet => format!("layer{s}.{b}"),
            _ => format!("block{}.{b}", s.checked_sub(1)?),
        };
        Some(format!("{prefix}.{layer}{tail}"))
    }
}

/// Rampart's names → public names.
type Table = &'static [(&'static str, &'static str)];

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
