//! Files written so that nothing already written is lost.
//!
//! Every file Rampart writes — models, checkpoints, per-example records, results,
//! reports, plots — goes through [`write_atomic`]: the bytes go to a temporary sibling
//! `PATH.tmp`, which is flushed to disk and renamed over `PATH`. A reader (or a run
//! killed half-way) sees the old file or the new one, never a mix, and a failed write
//! (a full disk, an unwritable folder) leaves the previous file as it was. Errors name
//! the path that failed.
//!
//! This crate knows nothing of models, data or formats: callers serialise, this crate
//! puts bytes on disk. Every other crate uses it instead of writing files by hand.
#![warn(missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};

/// A file could not be written: the path and what the system said.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct WriteError {
    /// The file (or folder) the operation failed on.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError {
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary sibling [`write_atomic`] writes first: `PATH.tmp`.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Writes `bytes` to `path` atomically: creates the parent folder, writes the
/// temporary sibling `PATH.tmp`, flushes it to disk and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// As [`write_atomic`], with the contents written by `fill` into the open temporary
/// file (for writers that stream, such as a safetensors or image encoder).
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), WriteError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(at(dir))?;
    }
    let tmp = temporary_sibling(path);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        fill(&mut file)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        // The temporary file is incomplete: remove it (best effort) and report.
        let _ = std::fs::remove_file(&tmp);
        return Err(at(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_creates_folders_and_replaces() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a/b/results.json");
        write_atomic(&path, b"first")?;
        assert_eq!(std::fs::read(&path)?, b"first");
        write_atomic(&path, b"second")?;
        assert_eq!(std::fs::read(&path)?, b"second");
        assert!(!temporary_sibling(&path).exists());
        Ok(())
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_names_the_path(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model.safetensors");
        write_atomic(&path, b"good")?;
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.path, temporary_sibling(&path));
        assert!(err.to_string().contains("model.safetensors.tmp"), "{err}");
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&path)?, b"good");
        assert!(!temporary_sibling(&path).exists());
        Ok(())
    }

    #[test]
    fn an_unwritable_destination_is_an_error_naming_it() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        // A file where a folder should be.
        let blocker = dir.path().join("out");
        std::fs::write(&blocker, b"")?;
        let err = write_atomic(&blocker.join("results.json"), b"x").unwrap_err();
        assert_eq!(err.path, blocker);
        Ok(())
    }
}
