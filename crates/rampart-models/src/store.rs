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

/// The same safetensors bytes with the header's keys in sorted order. The format
/// crate writes the metadata in a hash map's order, which changes from run to run, so
/// equal models would give files of different digests (`model.json`'s SHA-256);
/// sorted, equal models give equal bytes. The header keeps its length (the same
/// entries, serialised alike), so every data offset stays valid.
fn with_sorted_header(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let broken = |message: String| ModelError::Format {
        path: PathBuf::from("<memory>"),
        message,
    };
    let len = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| u64::from_le_bytes(b) as usize)
        .filter(|&n| bytes.len() >= 8 + n)
        .ok_or_else(|| broken("serialised model without a header".into()))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len])
        .map_err(|e| broken(format!("unreadable header: {e}")))?;
    // serde_json's maps are sorted by key.
    let mut sorted =
        serde_json::to_vec(&header).map_err(|e| broken(format!("cannot write the header: {e}")))?;
    if sorted.len() > len {
        return Err(broken(
            "the sorted header is longer than the written one".into(),
        ));
    }
    sorted.resize(len, b' ');
    bytes[8..8 + len].copy_from_slice(&sorted);
    Ok(bytes)
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
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|e| ModelError::Format {
                    path: PathBuf::from("<memory>"),
                    message: e.to_string(),
                })?;
        with_sorted_header(bytes)
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
        let held: u64 = tensors
            .tensors()
            .iter()
            .map(|(_, view)| (view.data().len() / 4) as u64)
            .sum();
        let needed = spec.min_parameters();
        if held < needed {
            return Err(ModelError::Metadata {
                path: path.to_path_buf(),
                message: format!(
                    "the spec describes a {} network of at least {needed} parameters, but the file's tensors hold {held} values: the spec does not belong to these weights",
                    spec.arch
                ),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variant::{NoiseSpec, OatSpec};
    use crate::Arch;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn values(model: &Classifier) -> u64 {
        model
            .named_vars()
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum()
    }

    #[test]
    fn min_parameters_never_exceeds_the_built_model() -> TestResult {
        let mut specs = vec![
            ModelSpec::wrn(10, 1, 10),
            ModelSpec::wrn(16, 2, 100),
            ModelSpec::cifar(Arch::Resnet20, 10),
            ModelSpec::cifar(Arch::PreactResnet18, 10),
            ModelSpec::for_input(
                Arch::Wrn {
                    depth: 10,
                    widen: 1,
                },
                10,
                [1, 28, 28],
                &[0.1],
                &[0.3],
            ),
        ];
        for arch in [
            Arch::Wrn {
                depth: 10,
                widen: 1,
            },
            Arch::Resnet20,
            Arch::PreactResnet18,
        ] {
            let mut oat = ModelSpec::cifar(arch, 10);
            oat.oat = Some(OatSpec::standard());
            let mut noisy = ModelSpec::cifar(arch, 10);
            noisy.noise = Some(NoiseSpec { alpha: 0.1 });
            specs.extend([oat, noisy]);
        }
        for spec in specs {
            let model = Classifier::new(spec.clone(), 0, &Device::Cpu)?;
            let (bound, actual) = (spec.min_parameters(), values(&model));
            assert!(bound <= actual, "{spec:?}: bound {bound} > {actual}");
            assert!(
                2 * bound >= actual / 4,
                "{spec:?}: bound {bound} far below {actual}"
            );
        }
        Ok(())
    }

    /// A small file whose spec names an enormous network must not make the loader
    /// allocate and initialise that network before looking at the tensors.
    #[test]
    fn a_spec_larger_than_the_weights_is_refused_before_building() -> TestResult {
        let model = Classifier::new(ModelSpec::wrn(10, 1, 10), 0, &Device::Cpu)?;
        let huge = |edit: &dyn Fn(&mut ModelSpec)| -> Result<Vec<u8>> {
            let mut copy = Classifier::new(ModelSpec::wrn(10, 1, 10), 0, &Device::Cpu)?;
            copy.copy_weights_from(&model)?;
            let mut spec = copy.spec.clone();
            edit(&mut spec);
            copy.spec = spec;
            copy.to_bytes()
        };
        let edits: [&dyn Fn(&mut ModelSpec); 4] = [
            &|s| {
                s.arch = Arch::Wrn {
                    depth: 10,
                    widen: 1 << 40,
                }
            },
            &|s| {
                s.arch = Arch::Wrn {
                    depth: 6_000_000_004,
                    widen: 1,
                }
            },
            &|s| s.num_classes = 1 << 50,
            &|s| {
                s.oat = Some(OatSpec {
                    lambdas: vec![0.0],
                    code_dim: 1 << 45,
                })
            },
        ];
        for edit in edits {
            let bytes = huge(edit)?;
            let err =
                Classifier::from_bytes(&bytes, Path::new("m.safetensors"), &Device::Cpu).err();
            let msg = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                msg.contains("m.safetensors") && msg.contains("does not belong to these weights"),
                "{msg}"
            );
        }
        // The true spec still loads.
        let back = Classifier::from_bytes(&model.to_bytes()?, Path::new("m"), &Device::Cpu)?;
        assert_eq!(values(&back), values(&model));
        Ok(())
    }
}
