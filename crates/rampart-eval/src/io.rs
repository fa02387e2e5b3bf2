//! Files: atomic writes, JSON records and logits matrices keyed by what produced them.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{EvalError, Result};
use crate::shard::Rows;

/// Writes `bytes` to `path` atomically (see `rampart_fs`), creating the parent
/// folder. A reader never sees a half-written file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    rampart_fs::write_atomic(path, bytes).map_err(|e| EvalError::io(&e.path, e.source))
}

/// Pretty JSON, atomically.
pub(crate) fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| EvalError::format(path, e))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Reads JSON written by [`write_json`].
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| EvalError::format(path, e))
}

/// SHA-256 of a sequence of byte strings, lowercase hex (each part length-prefixed).
pub(crate) fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A record saved for resumption: `key` fingerprints everything that produced it.
pub(crate) trait Keyed {
    fn key(&self) -> &str;
}

/// The record at `path` if it exists, parses and carries `key`; `None` otherwise (a
/// stale or unreadable file is logged and will be overwritten).
pub(crate) fn load_keyed<T: DeserializeOwned + Keyed>(path: &Path, key: &str) -> Option<T> {
    if !path.exists() {
        return None;
    }
    match read_json::<T>(path) {
        Ok(r) if r.key() == key => Some(r),
        Ok(_) => {
            tracing::warn!(file = %path.display(), "saved result was made with another model, data or config; recomputing");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "unreadable saved result; recomputing");
            None
        }
    }
}

/// A row-major (rows × cols) f32 matrix with a key, saved as safetensors
/// (`logits`, metadata `key`, and `rows` = `start..end` for a shard's part).
pub(crate) struct Logits {
    pub key: String,
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
    /// The shard's rows of the whole matrix; `None` for the whole matrix.
    pub part: Option<Rows>,
}

fn part_text(part: Option<Rows>) -> Option<String> {
    part.map(|r| format!("{}..{}", r.start, r.end))
}

impl Logits {
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<u8> = self.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![self.rows, self.cols],
            &bytes,
        )
        .map_err(|e| EvalError::format(path, e))?;
        let mut metadata: HashMap<String, String> = [("key".to_string(), self.key.clone())].into();
        if let Some(part) = part_text(self.part) {
            metadata.insert("rows".to_string(), part);
        }
        let out = safetensors::serialize([("logits", view)], Some(metadata))
            .map_err(|e| EvalError::format(path, e))?;
        write_atomic(path, &out)
    }

    /// The matrix at `path`.
    pub(crate) fn load(path: &Path) -> Result<Logits> {
        let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| EvalError::format(path, e))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let file_key = meta.get("key").cloned().unwrap_or_default();
        let part = match meta.get("rows") {
            None => None,
            Some(text) => {
                let parsed = text
                    .split_once("..")
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                match parsed {
                    Some((start, end)) => Some(Rows { start, end }),
                    None => {
                        return Err(EvalError::format(
                            path,
                            format!("metadata `rows` = `{text}` is not start..end"),
                        ))
                    }
                }
            }
        };
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| EvalError::format(path, e))?;
        let t = st
            .tensor("logits")
            .map_err(|e| EvalError::format(path, e))?;
        let shape = t.shape().to_vec();
        if t.dtype() != safetensors::Dtype::F32 || shape.len() != 2 {
            return Err(EvalError::format(path, "`logits` is not a 2-D f32 tensor"));
        }
        let values = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Logits {
            key: file_key,
            rows: shape[0],
            cols: shape[1],
            values,
            part,
        })
    }

    /// The matrix at `path` if it exists and carries `key` and covers `part`.
    pub(crate) fn load_keyed(path: &Path, key: &str, part: Option<Rows>) -> Option<Logits> {
        if !path.exists() {
            return None;
        }
        match Logits::load(path) {
            Ok(l) if l.key == key && l.part == part => Some(l),
            Ok(_) => {
                tracing::warn!(file = %path.display(), "saved logits were made with another model, data, config or shard; recomputing");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "unreadable saved logits; recomputing");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_round_trip_and_keys() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io(Path::new("tempdir"), e))?;
        let path = dir.path().join("sub/l.safetensors");
        let l = Logits {
            key: "abc".into(),
            rows: 2,
            cols: 3,
            values: vec![1.0, -2.5, 3.0, 0.0, 1e-7, f32::MAX],
            part: None,
        };
        l.save(&path)?;
        let back = Logits::load_keyed(&path, "abc", None)
            .ok_or_else(|| EvalError::Config("not loaded".into()))?;
        assert_eq!(
            (back.rows, back.cols, back.values),
            (2, 3, l.values.clone())
        );
        assert!(Logits::load_keyed(&path, "other", None).is_none());
        assert!(Logits::load_keyed(&dir.path().join("missing"), "abc", None).is_none());
        let part = Some(Rows { start: 4, end: 6 });
        Logits { part, ..l }.save(&path)?;
        assert!(Logits::load_keyed(&path, "abc", None).is_none());
        assert_eq!(Logits::load(&path)?.part, part);
        assert_ne!(
            digest([b"a".as_slice(), b"bc"]),
            digest([b"ab".as_slice(), b"c"])
        );
        Ok(())
    }
}
