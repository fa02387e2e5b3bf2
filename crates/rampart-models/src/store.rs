//! Saving and loading models as safetensors with the spec in the metadata.
//!
//! File layout: one F32 tensor per variable (parameters and BatchNorm statistics,
//! named by the model tree, e.g. `stage1.block0.conv1.weight`), and the metadata
//! entries `rampart.format` = "1", `rampart.spec` = the [`ModelSpec`] as JSON, plus any
//! free-form entries set with [`Classifier::set_metadata`]. Files are written to a
//! temporary sibling and renamed into place, so an interrupted save never leaves a
//! truncated model behind.

use crate::{Classifier, ModelError, ModelSpec, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device};
use safetensors::SafeTensors;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Metadata key holding the JSON [`ModelSpec`].
pub const METADATA_SPEC_KEY: &str = "rampart.spec";
const METADATA_FORMAT_KEY: &str = "rampart.format";
const FORMAT_VERSION: &str = "1";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Classifier {
    /// Serialises the model (weights, statistics, spec and metadata) to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if self.spec.arch == crate::Arch::External {
            return Err(ModelError::InvalidSpec(
                "an external (ONNX) model is not saved as a Rampart model file: evaluate or attack its own file".into(),
            ));
        }
        let mut metadata: HashMap<String, String> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metadata.insert(METADATA_FORMAT_KEY.into(), FORMAT_VERSION.into());
        let spec = serde_json::to_string(&self.spec)
            .map_err(|e| ModelError::InvalidSpec(format!("cannot serialise spec: {e}")))?;
        metadata.insert(METADATA_SPEC_KEY.into(), spec);
        let vars = self.named_vars();
        let tensors: Vec<(String, candle_core::Tensor)> = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| ModelError::Format {
                path: PathBuf::from("<memory>"),
                message: e.to_string(),
            })
    }

    /// Saves the model to `path` atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_bytes()?;
        rampart_fs::write_atomic(path.as_ref(), &bytes).map_err(|e| ModelError::Io {
            path: e.path,
            source: e.source,
        })
    }

    /// Loads a model saved by [`Classifier::save`], rebuilding its architecture from the
    /// metadata. Every tensor must be present with the right shape and dtype, and no
    /// unknown tensor may be present.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Reads only the spec of a model file (cheap: the header).
    pub fn read_spec(path: impl AsRef<Path>) -> Result<ModelSpec> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let (spec, _) = parse_metadata(&bytes, path)?;
        Ok(spec)
    }

    /// Like [`Classifier::load`] from bytes; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let (spec, metadata) = parse_metadata(bytes, path)?;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut model = Classifier::new(spec, 0, device)?;
        let arch = model.spec.arch.to_string();
        let expected: BTreeSet<String> = model.named_vars().into_iter().map(|(n, _)| n).collect();
        for name in tensors.names() {
            if !expected.contains(name) {
                return Err(ModelError::UnexpectedTensor {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    arch,
                });
            }
        }
        for (name, var) in model.named_vars() {
            let view = tensors
                .tensor(&name)
                .map_err(|_| ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    arch: arch.clone(),
                })?;
            let mismatch = |found: String| ModelError::TensorMismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: format!("F32 {:?}", var.dims()),
                found,
                arch: arch.clone(),
            };
            if view.shape() != var.dims() || view.dtype() != safetensors::Dtype::F32 {
                return Err(mismatch(format!("{:?} {:?}", view.dtype(), view.shape())));
            }
            let t = view.load(device)?;
            if t.dtype() != DType::F32 {
                return Err(mismatch(format!("{:?}", t.dtype())));
            }
            if t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|v| !v.is_finite())
            {
                return Err(mismatch("non-finite values".into()));
            }
            var.set(&t)?;
        }
        model.metadata = metadata;
        Ok(model)
    }
}

fn parse_metadata(
    bytes: &[u8],
    path: &Path,
) -> Result<(ModelSpec, std::collections::BTreeMap<String, String>)> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let bad = |message: String| ModelError::Metadata {
        path: path.to_path_buf(),
        message,
    };
    match meta.get(METADATA_FORMAT_KEY).map(String::as_str) {
        Some(FORMAT_VERSION) => {}
        Some(other) => {
            return Err(bad(format!(
                "model file format version {other} is not supported (this build reads {FORMAT_VERSION})"
            )))
        }
        None => {
            return Err(bad(
                "no `rampart.format` metadata: not a model saved by Rampart (the architecture is unknown)".into(),
            ))
        }
    }
    let spec_json = meta
        .get(METADATA_SPEC_KEY)
        .ok_or_else(|| bad("metadata lacks `rampart.spec` (the architecture)".into()))?;
    let spec: ModelSpec = serde_json::from_str(spec_json).map_err(|e| {
        bad(format!(
            "metadata `rampart.spec` is not a valid model spec: {e}"
        ))
    })?;
    spec.validate().map_err(|e| bad(e.to_string()))?;
    let extra = meta
        .into_iter()
        .filter(|(k, _)| !k.starts_with("rampart."))
        .collect();
    Ok((spec, extra))
}
