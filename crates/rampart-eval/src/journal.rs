//! The finished batches of a long loop, one file per batch, so that a run killed at any
//! point and started again continues from the last finished batch and ends with the
//! numbers of an uninterrupted run (every batch's randomness depends only on the seed
//! and the batch).
//!
//! Batch `b` is `DIR/batch-00000b.json` (a record keyed like every saved result, see
//! `io.rs`) and, for loops that keep tensors, `DIR/batch-00000b.M.safetensors` (f32
//! matrices with the same key), written before the record: a record on disk means the
//! whole batch is. A batch saved under another key (another model, data or setting) is
//! recomputed. The caller removes the journal once the loop's result is saved.

use std::path::{Path, PathBuf};

use candle_core::ModuleT;
use rampart_data::ImageDataset;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::io::{digest, load_keyed, write_json, Keyed, Logits};
use crate::outputs::batch_logits;

/// Where a loop saves its finished batches, the key they must carry, and how a batch
/// is made independent of the ones before it.
#[derive(Clone)]
pub struct BatchJournal<'a> {
    dir: PathBuf,
    key: String,
    reseed: Option<&'a dyn Fn(u64)>,
}

#[derive(Serialize, Deserialize)]
struct Saved<T> {
    key: String,
    batch: usize,
    record: T,
}

impl<T> Keyed for Saved<T> {
    fn key(&self) -> &str {
        &self.key
    }
}

impl<'a> BatchJournal<'a> {
    /// The journal in `dir` of work fingerprinted by `key` (see [`fingerprint`]).
    pub fn new(dir: impl Into<PathBuf>, key: impl Into<String>) -> Self {
        BatchJournal {
            dir: dir.into(),
            key: key.into(),
            reseed: None,
        }
    }

    /// Calls `reseed` with a batch's seed before the batch is computed: a stochastic
    /// model's noise restarts there (`Classifier::reseed_noise`), so a batch computed
    /// after a resume draws the noise it drew in the uninterrupted run.
    pub fn reseeding(mut self, reseed: &'a dyn Fn(u64)) -> Self {
        self.reseed = Some(reseed);
        self
    }

    /// Prepares the computation of a batch whose seed is `seed` (see
    /// [`BatchJournal::reseeding`]).
    pub(crate) fn start(&self, seed: u64) {
        if let Some(reseed) = self.reseed {
            reseed(seed);
        }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, b: usize) -> PathBuf {
        self.dir.join(format!("batch-{b:06}.json"))
    }

    fn matrix_path(&self, b: usize, m: usize) -> PathBuf {
        self.dir.join(format!("batch-{b:06}.{m}.safetensors"))
    }

    /// Batch `b`'s record and its `matrices` saved matrices (row-major f32), if batch
    /// `b` was saved under this journal's key.
    pub(crate) fn load<T: DeserializeOwned>(
        &self,
        b: usize,
        matrices: usize,
    ) -> Option<(T, Vec<Vec<f32>>)> {
        let saved = load_keyed::<Saved<T>>(&self.record_path(b), &self.key)?;
        if saved.batch != b {
            return None;
        }
        let mut values = Vec::with_capacity(matrices);
        for m in 0..matrices {
            values.push(Logits::load_keyed(&self.matrix_path(b, m), &self.key, None)?.values);
        }
        tracing::debug!(batch = b, dir = %self.dir.display(), "batch loaded");
        Some((saved.record, values))
    }

    /// Saves batch `b`: its matrices (rows × the rest) first, then its record.
    pub(crate) fn save<T: Serialize>(
        &self,
        b: usize,
        record: T,
        matrices: &[(usize, &[f32])],
    ) -> Result<()> {
        for (m, &(rows, values)) in matrices.iter().enumerate() {
            Logits {
                key: self.key.clone(),
                rows,
                cols: values.len() / rows.max(1),
                values: values.to_vec(),
                part: None,
            }
            .save(&self.matrix_path(b, m))?;
        }
        write_json(
            &self.record_path(b),
            &Saved {
                key: self.key.clone(),
                batch: b,
                record,
            },
        )?;
        tracing::debug!(batch = b, dir = %self.dir.display(), "batch saved");
        Ok(())
    }

    /// Removes the journal (once the loop's result is saved elsewhere).
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EvalError::io(&self.dir, e)),
            _ => Ok(()),
        }
    }
}

/// The fingerprint of a run over the first `n` images of `data`: a digest of
/// `settings`, of the model's logits on the first batch (so another model, or the same
/// file retrained, is another run) and of the labels of the `n` images.
pub fn fingerprint(
    model: &dyn ModuleT,
    data: &ImageDataset,
    n: usize,
    batch_size: usize,
    settings: &str,
    device: &candle_core::Device,
) -> Result<String> {
    let n = n.min(data.len());
    let first: Vec<usize> = (0..n.min(batch_size.max(1))).collect();
    if first.is_empty() {
        return Err(EvalError::Config("no image to attack".into()));
    }
    let (x0, _) = data.batch_tensors(&first, device)?;
    let (logits, _) = batch_logits(model, &x0)?;
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let label_bytes: Vec<u8> = data.labels()[..n]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    Ok(digest([settings.as_bytes(), &logit_bytes, &label_bytes]))
}

/// The images and labels of a batch that is computed afresh (not loaded from
/// `journal`), with its seed: `seed` plus the index of its first image, so that a
/// resumed run or a shard draws what an uninterrupted whole run draws. Stops first
/// when an interrupt was requested, and tells the journal the batch starts (see
/// [`BatchJournal::reseeding`]).
pub(crate) fn fresh_batch(
    data: &ImageDataset,
    chunk: &[usize],
    device: &candle_core::Device,
    seed: u64,
    journal: Option<&BatchJournal<'_>>,
) -> Result<(candle_core::Tensor, candle_core::Tensor, u64)> {
    crate::error::check_interrupt()?;
    let (xs, ys) = data.batch_tensors(chunk, device)?;
    let batch_seed = seed.wrapping_add(chunk.first().copied().unwrap_or(0) as u64);
    if let Some(j) = journal {
        j.start(batch_seed);
    }
    Ok((xs, ys, batch_seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_load_only_under_their_key_and_whole() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io(Path::new("tempdir"), e))?;
        let j = BatchJournal::new(dir.path().join("progress"), "k1");
        assert!(j.load::<Vec<bool>>(0, 1).is_none());
        j.save(0, vec![true, false], &[(2, &[1.0, 2.0, 3.0, 4.0])])?;
        let (rec, m) = j
            .load::<Vec<bool>>(0, 1)
            .ok_or_else(|| EvalError::Config("batch 0 not loaded".into()))?;
        assert_eq!(
            (rec, m),
            (vec![true, false], vec![vec![1.0, 2.0, 3.0, 4.0]])
        );
        // Another key, another batch index, or a missing matrix: not loaded.
        assert!(BatchJournal::new(j.dir(), "k2")
            .load::<Vec<bool>>(0, 1)
            .is_none());
        assert!(j.load::<Vec<bool>>(1, 0).is_none());
        assert!(j.load::<Vec<bool>>(0, 2).is_none());
        j.remove()?;
        assert!(!j.dir().exists());
        j.remove()?;
        Ok(())
    }
}
