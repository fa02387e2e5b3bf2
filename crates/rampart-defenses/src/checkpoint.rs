//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! A checkpoint is one safetensors file: the model's variables as `model/NAME`
//! (BatchNorm statistics included), the optimiser's momentum buffers as
//! `momentum/NAME`, the weight average (if the run keeps one) as `ema/NAME`, and the
//! JSON [`CheckpointMeta`] under the metadata key
//! `rampart.checkpoint`, which includes the method's learnt state, if it keeps one.
//! The randomness needs no state: the batch order, the augmentation and the method's
//! RNG of epoch e derive from (seed, e) alone.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rampart_models::{Classifier, ModelSpec};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::ema::Ema;
use crate::error::{DefenseError, Result};
use crate::sgd::Sgd;
use crate::trainer::EpochRecord;
use rampart_fs::write_atomic;

/// Metadata key of the checkpoint description.
pub const CHECKPOINT_KEY: &str = "rampart.checkpoint";
const MODEL_PREFIX: &str = "model/";
const MOMENTUM_PREFIX: &str = "momentum/";
const EMA_PREFIX: &str = "ema/";

/// What a checkpoint records besides tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Format version, 1.
    pub format: u32,
    /// Epochs completed.
    pub epochs_done: usize,
    /// The loop's configuration.
    pub config: TrainConfig,
    /// The method's short name.
    pub method: String,
    /// The method's settings.
    pub method_settings: serde_json::Value,
    /// The model's architecture.
    pub spec: ModelSpec,
    /// Size of the training set.
    pub train_examples: usize,
    /// One record per completed epoch.
    pub history: Vec<EpochRecord>,
    /// The method's state after the last completed epoch
    /// ([`TrainingMethod::state`](crate::TrainingMethod::state)); absent for stateless
    /// methods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_state: Option<serde_json::Value>,
}

const FORMAT: u32 = 1;

/// Writes a checkpoint atomically.
pub(crate) fn save(
    path: &Path,
    meta: &CheckpointMeta,
    model: &Classifier,
    sgd: &Sgd,
    ema: Option<&Ema>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    if let Some(ema) = ema {
        for (name, var) in ema.model().named_vars() {
            tensors.push((
                format!("{EMA_PREFIX}{name}"),
                var.as_tensor().to_device(&Device::Cpu)?,
            ));
        }
    }
    for (name, var) in model.named_vars() {
        tensors.push((
            format!("{MODEL_PREFIX}{name}"),
            var.as_tensor().to_device(&Device::Cpu)?,
        ));
    }
    for (name, buf) in sgd.state()? {
        tensors.push((
            format!("{MOMENTUM_PREFIX}{name}"),
            buf.to_device(&Device::Cpu)?,
        ));
    }
    let json = serde_json::to_string(meta)
        .map_err(|e| checkpoint_error(path, format!("cannot serialise: {e}")))?;
    let metadata: HashMap<String, String> = [(CHECKPOINT_KEY.to_string(), json)].into();
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| checkpoint_error(path, format!("cannot serialise: {e}")))?;
    Ok(write_atomic(path, &bytes)?)
}

fn checkpoint_error(path: &Path, message: String) -> DefenseError {
    DefenseError::Checkpoint {
        path: path.to_path_buf(),
        message,
    }
}

/// Reads only the description of a checkpoint.
pub fn read_meta(path: &Path) -> Result<CheckpointMeta> {
    let bytes = std::fs::read(path).map_err(|e| DefenseError::io(path, e))?;
    decode_meta(&bytes, path)
}

/// Reads the description of a checkpoint held in memory, as [`read_meta`] reads a
/// file; `path` only names the source in errors.
pub fn decode_meta(bytes: &[u8], path: &Path) -> Result<CheckpointMeta> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| checkpoint_error(path, format!("not a readable safetensors file: {e}")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CHECKPOINT_KEY))
        .ok_or_else(|| {
            checkpoint_error(
                path,
                "not a Rampart training checkpoint (no `rampart.checkpoint` metadata)".into(),
            )
        })?;
    let meta: CheckpointMeta = serde_json::from_str(json)
        .map_err(|e| checkpoint_error(path, format!("unreadable checkpoint description: {e}")))?;
    if meta.format != FORMAT {
        return Err(checkpoint_error(
            path,
            format!(
                "checkpoint format {} is not supported (this build reads {FORMAT})",
                meta.format
            ),
        ));
    }
    Ok(meta)
}

/// A new description for `epochs_done` completed epochs.
pub(crate) fn meta(
    epochs_done: usize,
    config: &TrainConfig,
    method: &dyn crate::TrainingMethod,
    spec: &ModelSpec,
    train_examples: usize,
    history: &[EpochRecord],
) -> CheckpointMeta {
    CheckpointMeta {
        format: FORMAT,
        epochs_done,
        config: config.clone(),
        method: method.name().to_string(),
        method_settings: method.settings(),
        spec: spec.clone(),
        train_examples,
        history: history.to_vec(),
        method_state: method.state(),
    }
}

/// Loads a checkpoint into `model`, `sgd` and `method`'s state after checking that it
/// belongs to the same run: `expected` must match it in everything but progress,
/// history and the method's state.
pub(crate) fn restore(
    path: &Path,
    expected: &CheckpointMeta,
    model: &Classifier,
    sgd: &mut Sgd,
    ema: Option<&Ema>,
    method: &dyn crate::TrainingMethod,
) -> Result<CheckpointMeta> {
    let bytes = std::fs::read(path).map_err(|e| DefenseError::io(path, e))?;
    let meta = decode_meta(&bytes, path)?;
    let differs = |what: &str, saved: String, now: String| {
        checkpoint_error(
            path,
            format!(
                "cannot resume: the checkpoint was written with {what} {saved}, this run has {now}; \
                 resume with the same settings, or start afresh in another output folder"
            ),
        )
    };
    if meta.method != expected.method || meta.method_settings != expected.method_settings {
        return Err(differs(
            "method",
            format!("{} {}", meta.method, meta.method_settings),
            format!("{} {}", expected.method, expected.method_settings),
        ));
    }
    if meta.spec != expected.spec {
        return Err(differs("model", json(&meta.spec), json(&expected.spec)));
    }
    if meta.config != expected.config {
        return Err(differs(
            "training configuration",
            json(&meta.config),
            json(&expected.config),
        ));
    }
    if meta.train_examples != expected.train_examples {
        return Err(differs(
            "a training set of",
            format!("{} examples", meta.train_examples),
            format!("{} examples", expected.train_examples),
        ));
    }
    if meta.history.len() != meta.epochs_done || meta.epochs_done > meta.config.epochs {
        return Err(checkpoint_error(
            path,
            "inconsistent checkpoint: history and progress disagree".into(),
        ));
    }
    match (&meta.method_state, expected.method_state.is_some()) {
        (Some(state), _) => method
            .restore_state(state)
            .map_err(|e| checkpoint_error(path, format!("method state: {e}")))?,
        (None, true) => {
            return Err(checkpoint_error(
                path,
                format!("the state of method {} is missing", meta.method),
            ))
        }
        (None, _) => {}
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    load_vars(path, &tensors, MODEL_PREFIX, "model variable", model)?;
    if let Some(ema) = ema {
        load_vars(
            path,
            &tensors,
            EMA_PREFIX,
            "averaged (EMA) variable",
            ema.model(),
        )?;
    }
    let momentum: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix(MOMENTUM_PREFIX)
                .map(|n| (n.to_string(), t.clone()))
        })
        .collect();
    sgd.load_state(&momentum)
        .map_err(|e| checkpoint_error(path, format!("optimiser state: {e}")))?;
    Ok(meta)
}

/// Sets every variable of `model` from the tensor `PREFIX NAME` of a checkpoint.
fn load_vars(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    what: &str,
    model: &Classifier,
) -> Result<()> {
    for (name, var) in model.named_vars() {
        let t = tensors
            .get(&format!("{prefix}{name}"))
            .ok_or_else(|| checkpoint_error(path, format!("{what} `{name}` is missing")))?;
        if t.dims() != var.dims() {
            return Err(checkpoint_error(
                path,
                format!(
                    "{what} `{name}` has shape {:?}, the model {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_device(model.device())?)?;
    }
    Ok(())
}

/// Compact JSON of a value, for error messages.
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<{e}>"))
}
