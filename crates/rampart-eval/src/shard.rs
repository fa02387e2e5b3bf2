//! Sharded runs: one evaluation (or attack) cut into N shards that run anywhere, in
//! any order, and whose outputs merge into exactly what one unsharded run writes.
//!
//! **The split.** Shard `I/N` is 0-based (`0/N` … `N−1/N`, as a Slurm array's
//! `$SLURM_ARRAY_TASK_ID` with `--array=0-(N−1)`). The M attacked images are cut into
//! B = ⌈M / batch size⌉ batches, numbered from the first image; shard I takes batches
//! ⌊I·B/N⌋ … ⌊(I+1)·B/N⌋ − 1, i.e. the contiguous rows
//! [⌊I·B/N⌋·batch size, min(⌊(I+1)·B/N⌋·batch size, M)). Every shard therefore runs
//! exactly the batches the unsharded run would run, with the same images in each, and
//! every seed is a function of the batch's number (its first image's index), never of
//! the shard: results do not depend on N. At most B shards can be made.
//!
//! **What ties shards together.** Each shard writes [`MANIFEST`] (`shard.json`) beside
//! its outputs: the shard, its rows, the total, and a [`Fingerprint`] of the data, the
//! model and the settings. [`read_shards`] refuses a set of shards that is incomplete,
//! holds a shard twice, or mixes data, models or settings, and names the problem.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::io::read_json;

/// File name of a shard's manifest in its output folder.
pub const MANIFEST: &str = "shard.json";

/// Shard `index` of `count` (0-based: `0/N` … `N−1/N`). `0/1` is the whole run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Which shard, from 0.
    pub index: usize,
    /// How many shards the work is cut into (≥ 1).
    pub count: usize,
}

impl Shard {
    /// The whole run, unsharded.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`; refuses `count` = 0 and `index` ≥ `count`.
    pub fn new(index: usize, count: usize) -> Result<Shard> {
        if count == 0 {
            return Err(EvalError::Shard(
                "the number of shards must be at least 1".into(),
            ));
        }
        if index >= count {
            return Err(EvalError::Shard(format!(
                "shard {index}/{count} does not exist: shards are numbered from 0 to {} (0-based)",
                count - 1
            )));
        }
        Ok(Shard { index, count })
    }

    /// Whether this is the whole run (`0/1`).
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// The rows of `len` examples this shard runs, in batches of `batch_size` (see the
    /// module documentation); refuses more shards than batches.
    pub fn rows(&self, len: usize, batch_size: usize) -> Result<Rows> {
        Shard::new(self.index, self.count)?;
        if batch_size == 0 {
            return Err(EvalError::Config("batch size must be at least 1".into()));
        }
        if self.is_whole() {
            return Ok(Rows { start: 0, end: len });
        }
        let batches = len.div_ceil(batch_size);
        if self.count > batches {
            return Err(EvalError::Shard(format!(
                "{} shards of {len} images in batches of {batch_size}: there are only {batches} \
                 batches, and a shard runs whole batches; use at most {batches} shards or a smaller \
                 batch size",
                self.count
            )));
        }
        let edge = |i: usize| ((i as u128 * batches as u128) / self.count as u128) as usize;
        Ok(Rows {
            start: edge(self.index) * batch_size,
            end: (edge(self.index + 1) * batch_size).min(len),
        })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = EvalError;

    /// `I/N`, 0-based: `0/8` … `7/8`.
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || {
            EvalError::Shard(format!(
                "`{s}` is not a shard: expected I/N with 0 ≤ I < N, e.g. 0/8 … 7/8 (0-based)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse::<usize>().map_err(|_| bad())?;
        let n = n.trim().parse::<usize>().map_err(|_| bad())?;
        Shard::new(i, n)
    }
}

/// Rows `start..end` of the attacked images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rows {
    /// First row.
    pub start: usize,
    /// One past the last row.
    pub end: usize,
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// As a range.
    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }
}

/// What a shard's results were made from, as SHA-256 digests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The data: every image and label the run reads (attacked and held out).
    pub data: String,
    /// The model: the clean logits of every test image (`eval`) or the model file
    /// (`attack`).
    pub model: String,
    /// The settings ([`ShardManifest::settings`]), seeds included.
    pub settings: String,
}

/// `shard.json`: what one shard ran and what it was made from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardManifest {
    /// The command that wrote it: `eval`, `eval --suite autoattack` or `attack`.
    pub command: String,
    /// Which shard.
    pub shard: Shard,
    /// Its rows of the attacked images.
    pub rows: Rows,
    /// Attacked images of the whole run.
    pub total: usize,
    /// What the results were made from.
    pub fingerprint: Fingerprint,
    /// Every setting that shapes the results (seeds, budgets, batch size, …), as the
    /// command records them; their digest is `fingerprint.settings`.
    pub settings: serde_json::Value,
    /// What the merge needs besides the per-example files (the command's own form).
    #[serde(default)]
    pub details: serde_json::Value,
    /// Wall time of the shard.
    pub seconds: f64,
    /// Steps loaded from an earlier, interrupted run of the shard.
    #[serde(default)]
    pub resumed: Vec<String>,
}

/// SHA-256 of the settings' JSON form (lowercase hex).
pub fn settings_digest(settings: &serde_json::Value) -> String {
    crate::io::digest([settings.to_string().as_bytes()])
}

/// SHA-256 of byte strings (each length-prefixed), lowercase hex: the digest behind
/// every [`Fingerprint`].
pub fn fingerprint_digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    crate::io::digest(parts)
}

/// Reads the manifest of every folder of `dirs` and checks that together they are one
/// whole run: the same command, data, model and settings, every shard `0/N` … `N−1/N`
/// exactly once, rows that tile the attacked images. Returns them ordered by shard.
pub fn read_shards(dirs: &[PathBuf]) -> Result<Vec<(PathBuf, ShardManifest)>> {
    if dirs.is_empty() {
        return Err(EvalError::Shard("no shard folders to merge".into()));
    }
    let mut shards = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Err(EvalError::Shard(format!(
                "{} is not the output of a shard: it has no {MANIFEST} (was it run with --shard I/N?)",
                dir.display()
            )));
        }
        shards.push((dir.clone(), read_json::<ShardManifest>(&path)?));
    }
    check_shards(&shards)?;
    shards.sort_by_key(|(_, m)| m.shard.index);
    Ok(shards)
}

/// See [`read_shards`].
fn check_shards(shards: &[(PathBuf, ShardManifest)]) -> Result<()> {
    let Some((first_dir, first)) = shards.first() else {
        return Err(EvalError::Shard("no shard folders to merge".into()));
    };
    let name = |d: &Path| d.display().to_string();
    for (dir, m) in shards {
        Shard::new(m.shard.index, m.shard.count)
            .map_err(|e| EvalError::Shard(format!("{}: {e}", name(dir))))?;
        if m.command != first.command {
            return Err(EvalError::Shard(format!(
                "{} holds a shard of `rampart {}` but {} one of `rampart {}`",
                name(first_dir),
                first.command,
                name(dir),
                m.command
            )));
        }
        if m.shard.count != first.shard.count {
            return Err(EvalError::Shard(format!(
                "{} is shard {} but {} is shard {}: they were cut into different numbers of shards",
                name(first_dir),
                first.shard,
                name(dir),
                m.shard
            )));
        }
        if m.fingerprint.data != first.fingerprint.data || m.total != first.total {
            return Err(EvalError::Shard(format!(
                "{} and {} were run on different data (different images, labels or number of \
                 attacked images)",
                name(first_dir),
                name(dir)
            )));
        }
        if m.fingerprint.settings != first.fingerprint.settings || m.settings != first.settings {
            return Err(EvalError::Shard(format!(
                "{} and {} were run with different settings: {}",
                name(first_dir),
                name(dir),
                differences(&first.settings, &m.settings)
            )));
        }
        if m.fingerprint.model != first.fingerprint.model {
            return Err(EvalError::Shard(format!(
                "{} and {} were run on different models (or the same model on devices that \
                 compute different logits)",
                name(first_dir),
                name(dir)
            )));
        }
    }
    let mut seen: Vec<Option<&PathBuf>> = vec![None; first.shard.count];
    for (dir, m) in shards {
        if let Some(other) = seen[m.shard.index] {
            return Err(EvalError::Shard(format!(
                "shard {} is given twice: {} and {}",
                m.shard,
                name(other),
                name(dir)
            )));
        }
        seen[m.shard.index] = Some(dir);
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, d)| d.is_none())
        .map(|(i, _)| format!("{i}/{}", first.shard.count))
        .collect();
    if !missing.is_empty() {
        return Err(EvalError::Shard(format!(
            "shard{} {} missing: a merge needs all {} shards",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", "),
            first.shard.count
        )));
    }
    let mut ordered: Vec<&(PathBuf, ShardManifest)> = shards.iter().collect();
    ordered.sort_by_key(|(_, m)| m.shard.index);
    let mut next = 0;
    for (dir, m) in ordered {
        if m.rows.start != next || m.rows.end < m.rows.start {
            return Err(EvalError::Shard(format!(
                "{} (shard {}) holds rows {}..{}, expected rows from {next}: the shards overlap \
                 or leave a gap",
                name(dir),
                m.shard,
                m.rows.start,
                m.rows.end
            )));
        }
        next = m.rows.end;
    }
    if next != first.total {
        return Err(EvalError::Shard(format!(
            "the shards hold rows 0..{next} of {} attacked images",
            first.total
        )));
    }
    Ok(())
}

/// The top-level keys whose values differ, with both values (`seed (0 vs 1)`).
fn differences(a: &serde_json::Value, b: &serde_json::Value) -> String {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return format!("{a} vs {b}");
    };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let null = serde_json::Value::Null;
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k} ({} vs {})",
                a.get(k).unwrap_or(&null),
                b.get(k).unwrap_or(&null)
            )
        })
        .collect();
    if diffs.is_empty() {
        "their settings digests differ".into()
    } else {
        diffs.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_and_are_checked() {
        assert_eq!(
            "0/8".parse::<Shard>().ok(),
            Some(Shard { index: 0, count: 8 })
        );
        assert_eq!(
            " 7 / 8 ".parse::<Shard>().ok(),
            Some(Shard { index: 7, count: 8 })
        );
        for bad in ["8/8", "1/0", "0/0", "3", "a/4", "-1/4", "1/2/3", ""] {
            let err = bad.parse::<Shard>().err().map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains("shard")), "{bad}");
        }
        assert_eq!(Shard::WHOLE.to_string(), "0/1");
    }

    /// Shards tile the rows, start on batch boundaries, and the whole run is one shard.
    #[test]
    fn shards_tile_whole_batches() -> Result<()> {
        for (len, bs) in [(10, 1), (10, 3), (1000, 128), (7, 7), (129, 128)] {
            let batches = usize::div_ceil(len, bs);
            for count in 1..=batches {
                let mut next = 0;
                for index in 0..count {
                    let r = Shard::new(index, count)?.rows(len, bs)?;
                    assert_eq!(r.start, next, "{len} {bs} {index}/{count}");
                    assert_eq!(r.start % bs, 0);
                    assert!(!r.is_empty());
                    next = r.end;
                }
                assert_eq!(next, len);
            }
            assert!(Shard::new(0, batches + 1)?.rows(len, bs).is_err());
            assert_eq!(Shard::WHOLE.rows(len, bs)?, Rows { start: 0, end: len });
        }
        assert_eq!(
            Shard::new(1, 3)?.rows(10, 2)?,
            Rows { start: 2, end: 6 },
            "5 batches into 3: ⌊5/3⌋ = 1, ⌊10/3⌋ = 3"
        );
        Ok(())
    }

    fn manifest(index: usize, count: usize, rows: (usize, usize)) -> ShardManifest {
        let settings = serde_json::json!({"seed": 0, "batch_size": 2});
        ShardManifest {
            command: "eval".into(),
            shard: Shard { index, count },
            rows: Rows {
                start: rows.0,
                end: rows.1,
            },
            total: 6,
            fingerprint: Fingerprint {
                data: "d".into(),
                model: "m".into(),
                settings: settings_digest(&settings),
            },
            settings,
            details: serde_json::Value::Null,
            seconds: 1.0,
            resumed: Vec::new(),
        }
    }

    fn set(ms: Vec<ShardManifest>) -> Vec<(PathBuf, ShardManifest)> {
        ms.into_iter()
            .map(|m| (PathBuf::from(format!("shard-{}", m.shard.index)), m))
            .collect()
    }

    fn refusal(ms: Vec<ShardManifest>) -> String {
        check_shards(&set(ms))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn incomplete_mixed_and_overlapping_shards_are_refused() {
        let good = || {
            vec![
                manifest(0, 3, (0, 2)),
                manifest(1, 3, (2, 4)),
                manifest(2, 3, (4, 6)),
            ]
        };
        assert!(check_shards(&set(good())).is_ok());
        let mut ms = good();
        ms.remove(1);
        assert!(refusal(ms).contains("shard 1/3 missing"));
        let mut ms = good();
        ms.push(manifest(2, 3, (4, 6)));
        assert!(refusal(ms).contains("shard 2/3 is given twice"));
        let mut ms = good();
        ms[1].shard.count = 4;
        assert!(refusal(ms).contains("different numbers of shards"));
        let mut ms = good();
        ms[2].fingerprint.data = "other".into();
        assert!(refusal(ms).contains("different data"));
        let mut ms = good();
        ms[2].fingerprint.model = "other".into();
        assert!(refusal(ms).contains("different models"));
        let mut ms = good();
        ms[1].settings = serde_json::json!({"seed": 1, "batch_size": 2});
        ms[1].fingerprint.settings = settings_digest(&ms[1].settings);
        assert!(refusal(ms).contains("different settings: seed (0 vs 1)"));
        let mut ms = good();
        ms[1].rows = Rows { start: 1, end: 4 };
        assert!(refusal(ms).contains("overlap"));
        let mut ms = good();
        ms[1].command = "attack".into();
        assert!(refusal(ms).contains("rampart attack"));
    }
}
