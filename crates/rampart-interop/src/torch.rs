//! PyTorch weights in and out of Rampart's model files.
//!
//! [`import_state_dict`] builds a [`Classifier`] of a known architecture from a
//! PyTorch state dict under a public [`Convention`], strictly, like
//! `load_state_dict(strict=True)`: every parameter and running statistic must be
//! present with its exact shape, and a tensor the architecture has no place for is
//! an error. [`export_state_dict`] writes a model's weights as a safetensors state
//! dict that `model.load_state_dict(safetensors.torch.load_file(path))` accepts for
//! the matching public module. The normalisation (mean, std) and input bounds, which
//! the public modules keep outside the network, travel as flags on import and as
//! metadata on export.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{Device, Tensor};
use rampart_models::{Arch, Classifier, ModelSpec};

use crate::names::Convention;
use crate::state_dict::StateDict;
use crate::{InteropError, Result};

/// What an imported model is: everything a state dict does not say.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportOptions {
    /// The architecture (its depth and width must match the tensors).
    pub arch: Arch,
    /// Whose parameter names the file uses.
    pub convention: Convention,
    /// Per-channel mean subtracted inside the model (RobustBench: 0).
    pub mean: Vec<f32>,
    /// Per-channel std divided by inside the model (RobustBench: 1).
    pub std: Vec<f32>,
    /// Input side (H = W); the channels and classes come from the tensors.
    pub input_size: usize,
    /// Bounds of valid inputs (RobustBench: [0, 1]).
    pub bounds: [f32; 2],
}

impl ImportOptions {
    /// RobustBench's conventions for `arch`: inputs in [0, 1] of side 32, no
    /// normalisation in the model, the architecture's public parameter names.
    pub fn robustbench(arch: Arch) -> Self {
        ImportOptions {
            convention: Convention::default_for(&arch),
            arch,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            input_size: 32,
            bounds: [0.0, 1.0],
        }
    }
}

/// Refuses the model variants that no public implementation has.
fn plain(spec: &ModelSpec, what: &str) -> Result<()> {
    if spec.noise.is_some() || spec.oat.is_some() {
        return Err(InteropError::Unsupported(format!(
            "{what}: stochastic and λ-conditioned models have no public PyTorch counterpart"
        )));
    }
    Ok(())
}

fn check_convention(convention: Convention, arch: &Arch) -> Result<()> {
    if !convention.fits(arch) {
        return Err(InteropError::Unsupported(format!(
            "the `{convention}` names are not those of a {arch} (use `{}` or `rampart`)",
            Convention::default_for(arch)
        )));
    }
    Ok(())
}

/// Builds a model of `options.arch` from `dict`.
pub fn import_state_dict(dict: &StateDict, options: &ImportOptions) -> Result<Classifier> {
    check_convention(options.convention, &options.arch)?;
    let rename = |ours: &str| {
        options.convention.rename(ours).ok_or_else(|| {
            InteropError::Unsupported(format!("no `{}` name for {ours}", options.convention))
        })
    };
    let fc = rename("fc.weight")?;
    let stem = rename("stem.weight")?;
    let shape = |name: &str| -> Result<&[usize]> {
        dict.get(name)
            .map(|t| t.shape.as_slice())
            .ok_or_else(|| InteropError::Mismatch(format!("the file has no `{name}`")))
    };
    let (classes, channels) = match (shape(&fc)?, shape(&stem)?) {
        ([k, _], [_, c, _, _]) => (*k, *c),
        (a, b) => {
            return Err(InteropError::Mismatch(format!(
                "`{fc}` has shape {a:?} and `{stem}` {b:?}: not a linear layer and a convolution"
            )))
        }
    };
    let spec = ModelSpec {
        arch: options.arch,
        num_classes: classes,
        input_shape: [channels, options.input_size, options.input_size],
        mean: options.mean.clone(),
        std: options.std.clone(),
        bounds: options.bounds,
        noise: None,
        oat: None,
        batch_norm: rampart_models::BatchNormSpec::default(),
    };
    spec.validate()?;
    let model = Classifier::new(spec, 0, &Device::Cpu)?;
    let mut used = HashSet::new();
    let mut missing = Vec::new();
    for (ours, var) in model.named_vars() {
        let theirs = rename(&ours)?;
        let Some(t) = dict.get(&theirs) else {
            missing.push(theirs);
            continue;
        };
        if t.shape != var.dims() {
            return Err(InteropError::Mismatch(format!(
                "`{theirs}` has shape {:?}, a {} needs {:?} (is the architecture right?)",
                t.shape,
                options.arch,
                var.dims()
            )));
        }
        if let Some(bad) = t.values.iter().find(|v| !v.is_finite()) {
            return Err(InteropError::Mismatch(format!("`{theirs}` holds {bad}")));
        }
        var.set(&Tensor::from_vec(
            t.values.clone(),
            var.dims(),
            &Device::Cpu,
        )?)?;
        used.insert(theirs);
    }
    refuse_names(
        &missing,
        &format!("tensors of a {} are missing from the file", options.arch),
    )?;
    let unexpected: Vec<&str> = dict
        .tensors
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !used.contains(*n) && !n.ends_with("num_batches_tracked"))
        .collect();
    refuse_names(
        &unexpected,
        &format!("tensors of the file have no place in a {}", options.arch),
    )?;
    Ok(model)
}

/// Refuses a non-empty list of tensor names: how many, `what`, and the first few.
fn refuse_names(names: &[impl AsRef<str>], what: &str) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let first: Vec<&str> = names.iter().take(4).map(AsRef::as_ref).collect();
    Err(InteropError::Mismatch(format!(
        "{} {what}, e.g. {first:?} (wrong architecture or `--names`?)",
        names.len()
    )))
}

/// Metadata keys of an exported state dict.
pub mod metadata {
    /// The architecture, as `rampart train --arch` spells it.
    pub const ARCH: &str = "rampart.arch";
    /// The parameter-name convention.
    pub const NAMES: &str = "rampart.names";
    /// The input normalisation mean, JSON array.
    pub const MEAN: &str = "rampart.mean";
    /// The input normalisation std, JSON array.
    pub const STD: &str = "rampart.std";
    /// The input bounds, JSON array [lo, hi].
    pub const BOUNDS: &str = "rampart.bounds";
    /// The classes.
    pub const CLASSES: &str = "rampart.num_classes";
}

/// A model's weights as a safetensors state dict under `convention`, with
/// `num_batches_tracked` = 0 beside every BatchNorm and the normalisation, bounds and
/// architecture in the metadata (see [`metadata`]).
pub fn export_state_dict(model: &Classifier, convention: Convention) -> Result<Vec<u8>> {
    let spec = model.spec();
    plain(spec, "export")?;
    check_convention(convention, &spec.arch)?;
    let mut entries: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (ours, var) in model.named_vars() {
        let theirs = convention.rename(&ours).ok_or_else(|| {
            InteropError::Unsupported(format!("no `{convention}` name for {ours}"))
        })?;
        let t = var
            .as_tensor()
            .to_device(&Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?;
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        if let Some(prefix) = theirs.strip_suffix(".running_var") {
            entries.insert(
                format!("{prefix}.num_batches_tracked"),
                (
                    safetensors::Dtype::I64,
                    Vec::new(),
                    0i64.to_le_bytes().to_vec(),
                ),
            );
        }
        entries.insert(theirs, (safetensors::Dtype::F32, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|(name, (dtype, shape, bytes))| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| InteropError::Unsupported(format!("{name}: {e}")))
        })
        .collect::<Result<_>>()?;
    let json = |v: &[f32]| serde_json::to_string(v).unwrap_or_default();
    let meta: HashMap<String, String> = [
        ("format", "pt".to_string()),
        (metadata::ARCH, spec.arch.to_string()),
        (metadata::NAMES, convention.to_string()),
        (metadata::MEAN, json(&spec.mean)),
        (metadata::STD, json(&spec.std)),
        (metadata::BOUNDS, json(&spec.bounds)),
        (metadata::CLASSES, spec.num_classes.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| InteropError::Unsupported(format!("safetensors: {e}")))
}
