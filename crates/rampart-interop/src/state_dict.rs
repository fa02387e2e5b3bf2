//! Reading a PyTorch `state_dict` from disk: a `torch.save` zip archive (its pickle
//! read by [`crate::pickle`], which runs no code) or a safetensors file.
//!
//! The state dict may be the saved object itself or sit under one of the usual keys
//! of a training checkpoint ([`CHECKPOINT_KEYS`]); a `module.` prefix on every name (a
//! model saved from `nn.DataParallel`) is removed. Tensors are read into f32 with
//! their shape; every size, offset and stride is checked against the bytes in the
//! archive before anything is read.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use crate::pickle::{self, StorageType, TensorRef, Value};
use crate::{InteropError, Result};

/// Keys under which training checkpoints keep the model's state dict, tried in
/// this order when the saved object is not a state dict itself.
pub const CHECKPOINT_KEYS: [&str; 5] = ["state_dict", "model_state_dict", "model", "net", "state"];

/// Largest archive member read into memory (a WRN-70-16 state dict is 1.1 GB).
const MAX_MEMBER_BYTES: u64 = 8 << 30;

/// Most bytes reserved up front for one member; beyond this the buffer grows with the
/// bytes actually read, so a size field cannot make the reader allocate what the
/// archive does not hold.
const MAX_RESERVE: u64 = 64 << 20;

/// One tensor of a state dict, as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values in row-major order.
    pub values: Vec<f32>,
}

/// A state dict: tensors by name, in the file's order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    /// (name, tensor) pairs.
    pub tensors: Vec<(String, TensorData)>,
}

impl StateDict {
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorData> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// Reads the state dict in `path`: a `torch.save` archive (`.pt`, `.pth`, `.bin`)
/// or a safetensors file, told apart by their first bytes.
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    let bytes = std::fs::read(path).map_err(|source| InteropError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_state_dict(&bytes, path)
}

/// Reads a state dict held in memory, as [`read_state_dict`] reads a file; `path`
/// only names the source in errors.
pub fn decode_state_dict(bytes: &[u8], path: &Path) -> Result<StateDict> {
    let fail = |message: String| InteropError::File {
        path: path.to_path_buf(),
        message,
    };
    let dict = if bytes.starts_with(b"PK\x03\x04") {
        read_archive(bytes).map_err(fail)?
    } else if bytes.starts_with(&[0x80]) {
        return Err(fail(
            "a legacy torch.save file (PyTorch < 1.6, not a zip archive); load it in PyTorch and save it again with a current version".into(),
        ));
    } else {
        read_safetensors(bytes).map_err(|e| {
            fail(format!(
                "neither a torch.save zip archive nor a safetensors file ({e})"
            ))
        })?
    };
    if dict.tensors.is_empty() {
        return Err(fail("holds no tensors".into()));
    }
    Ok(strip_data_parallel(dict))
}

/// Removes a `module.` prefix shared by every name.
fn strip_data_parallel(mut dict: StateDict) -> StateDict {
    if dict.tensors.iter().all(|(n, _)| n.starts_with("module.")) {
        for (n, _) in &mut dict.tensors {
            n.drain(.."module.".len());
        }
    }
    dict
}

fn read_safetensors(bytes: &[u8]) -> std::result::Result<StateDict, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut tensors = Vec::new();
    let mut names = st.names();
    names.sort();
    for name in names {
        let view = st.tensor(name).map_err(|e| e.to_string())?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F64 => StorageType::F64,
            safetensors::Dtype::F32 => StorageType::F32,
            safetensors::Dtype::F16 => StorageType::F16,
            safetensors::Dtype::BF16 => StorageType::BF16,
            safetensors::Dtype::I64 => StorageType::I64,
            safetensors::Dtype::I32 => StorageType::I32,
            safetensors::Dtype::I16 => StorageType::I16,
            safetensors::Dtype::I8 => StorageType::I8,
            safetensors::Dtype::U8 => StorageType::U8,
            safetensors::Dtype::BOOL => StorageType::Bool,
            other => return Err(format!("tensor {name}: unsupported dtype {other:?}")),
        };
        let shape = view.shape().to_vec();
        let values = to_f32(view.data(), dtype);
        if values.len() != shape.iter().product::<usize>() {
            return Err(format!("tensor {name}: data do not match shape {shape:?}"));
        }
        tensors.push((name.to_string(), TensorData { shape, values }));
    }
    Ok(StateDict { tensors })
}

/// The state dict of a `torch.save` zip archive.
fn read_archive(bytes: &[u8]) -> std::result::Result<StateDict, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a readable zip archive: {e}"))?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.ends_with("data.pkl"))
        .map(|n| n.to_string())
        .collect();
    let [pkl] = pickles.as_slice() else {
        return Err(format!(
            "expected one data.pkl in the archive (a torch.save file), found {}",
            pickles.len()
        ));
    };
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    if let Ok(order) = member(&mut zip, &format!("{prefix}byteorder")) {
        if order.trim_ascii() != b"little" {
            return Err("saved on a big-endian machine; not supported".into());
        }
    }
    let object = pickle::read(&member(&mut zip, pkl)?).map_err(|e| e.to_string())?;
    let entries = find_state_dict(object)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, t) in entries {
        if !storages.contains_key(&t.key) {
            let data = member(&mut zip, &format!("{prefix}data/{}", t.key))?;
            storages.insert(t.key.clone(), data);
        }
        let data = &storages[&t.key];
        let values = tensor_values(&t, data).map_err(|e| format!("tensor {name}: {e}"))?;
        tensors.push((
            name,
            TensorData {
                shape: t.shape,
                values,
            },
        ));
    }
    Ok(StateDict { tensors })
}

fn member<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
) -> std::result::Result<Vec<u8>, String> {
    let mut f = zip
        .by_name(name)
        .map_err(|e| format!("archive member {name}: {e}"))?;
    if f.size() > MAX_MEMBER_BYTES {
        return Err(format!(
            "archive member {name} is {} bytes, too large",
            f.size()
        ));
    }
    let claimed = f.size();
    let mut out = Vec::with_capacity(usize::try_from(claimed.min(MAX_RESERVE)).unwrap_or(0));
    f.read_to_end(&mut out)
        .map_err(|e| format!("archive member {name}: {e}"))?;
    if out.len() as u64 != claimed {
        return Err(format!(
            "archive member {name} holds {} bytes, its header says {claimed}",
            out.len()
        ));
    }
    Ok(out)
}

/// The (name, tensor) entries of the saved object's state dict.
fn find_state_dict(object: Value) -> std::result::Result<Vec<(String, TensorRef)>, String> {
    let Value::Dict(items) = object else {
        return Err(
            "the saved object is not a dict (save `model.state_dict()`, not the model)".into(),
        );
    };
    let tensors = |items: &[(Value, Value)]| -> Vec<(String, TensorRef)> {
        items
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
                _ => None,
            })
            .collect()
    };
    let direct = tensors(&items);
    if !direct.is_empty() {
        return Ok(direct);
    }
    for key in CHECKPOINT_KEYS {
        let nested = items.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Dict(d)) if k == key => Some(tensors(d)),
            _ => None,
        });
        if let Some(found) = nested.filter(|t| !t.is_empty()) {
            return Ok(found);
        }
    }
    let keys: Vec<String> = items
        .iter()
        .filter_map(|(k, _)| match k {
            Value::Str(s) => Some(s.clone()),
            _ => None,
        })
        .take(12)
        .collect();
    Err(format!(
        "no tensors at the top level or under {CHECKPOINT_KEYS:?}; top-level keys: {keys:?}"
    ))
}

/// The values of `t` from its storage's bytes, in row-major order.
fn tensor_values(t: &TensorRef, data: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let size = t.dtype.size();
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    let needed = t
        .storage_len
        .checked_mul(size)
        .ok_or("storage size overflows")?;
    if data.len() != needed {
        return Err(format!(
            "storage {} holds {} bytes, its header says {} elements of {size} bytes",
            t.key,
            data.len(),
            t.storage_len
        ));
    }
    if numel == 0 {
        return Ok(Vec::new());
    }
    // Row-major strides (dimensions of size 1 may carry any stride).
    let mut expected = 1usize;
    for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
        if d != 1 && s != expected {
            return Err(format!(
                "strides {:?} for shape {:?}: not a contiguous tensor (call .contiguous() before saving)",
                t.stride, t.shape
            ));
        }
        expected = expected.saturating_mul(d);
    }
    let end = t.offset.checked_add(numel).ok_or("offset overflows")?;
    if end > t.storage_len {
        return Err(format!(
            "elements {}..{end} lie outside a storage of {}",
            t.offset, t.storage_len
        ));
    }
    Ok(to_f32(&data[t.offset * size..end * size], t.dtype))
}

/// Little-endian elements of `dtype` as f32.
fn to_f32(bytes: &[u8], dtype: StorageType) -> Vec<f32> {
    match dtype {
        StorageType::F64 => le_elements(bytes, |b| f64::from_le_bytes(b) as f32),
        StorageType::F32 => le_elements(bytes, f32::from_le_bytes),
        StorageType::F16 => le_elements(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        StorageType::BF16 => le_elements(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
        StorageType::I64 => le_elements(bytes, |b| i64::from_le_bytes(b) as f32),
        StorageType::I32 => le_elements(bytes, |b| i32::from_le_bytes(b) as f32),
        StorageType::I16 => le_elements(bytes, |b| f32::from(i16::from_le_bytes(b))),
        StorageType::I8 => le_elements(bytes, |b: [u8; 1]| f32::from(b[0] as i8)),
        StorageType::U8 | StorageType::Bool => le_elements(bytes, |b: [u8; 1]| f32::from(b[0])),
    }
}

/// The little-endian elements of `N` bytes in `bytes` (a trailing partial element is
/// ignored; callers check lengths), each read by `f`.
pub(crate) fn le_elements<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}
