//! Files written so that nothing already written is lost.
//!
//! Every file Rampart writes — models, checkpoints, per-example records, results,
//! reports, plots — goes through [`write_atomic`]: the bytes go to a temporary sibling
//! `PATH.tmp`, which is flushed to disk and renamed over `PATH`. A reader (or a run
//! killed half-way) sees the old file or the new one, never a mix, and a failed write
//! (a full disk, an unwritable folder) leaves the previous file as it was. Errors name
//! the path that failed.
//!
//! A long run also holds an [`OutputLock`] on its output folder, so that a second
//! process writing into the same folder is refused instead of interleaving its files
//! with the first one's. The lock is the operating system's (an exclusive `flock` on
//! `OUT/.rampart.lock`): it is released when the process ends, however it ends, so a
//! crashed or killed run never leaves a stale lock behind.
//!
//! A long run stops cleanly when asked to ([`interrupt`]): the `rampart` binary turns
//! Ctrl-C and SIGTERM into a request the training and evaluation loops read between
//! batches, so they finish the batch at hand, keep what is written and say how to
//! resume.
//!
//! A long command also records the settings it runs with ([`RunSettings`]), so that
//! the same command started again in the folder of an interrupted run continues it,
//! and other settings are refused with the differences named.
//!
//! This crate knows nothing of models, data or formats: callers serialise, this crate
//! puts bytes on disk. Every other crate uses it instead of writing files by hand.
#![warn(missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};

mod settings;

pub use settings::{finish_run, RunSettings, SettingsError, SETTINGS_FILE};

/// A process-wide request to stop long work at the next batch boundary (Ctrl-C or
/// SIGTERM, as the `rampart` binary installs them). Loops call [`interrupt::requested`]
/// between batches and return their own "interrupted" error, leaving every file they
/// wrote valid; nothing here touches signals itself.
pub mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    static REQUESTED: AtomicBool = AtomicBool::new(false);

    /// Asks every loop to stop at its next batch boundary.
    pub fn request() {
        REQUESTED.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }

    /// Withdraws the request (for tests and for a caller that handled it).
    pub fn clear() {
        REQUESTED.store(false, Ordering::SeqCst);
    }
}

/// Quotes `arg` for a POSIX shell when it holds anything but plain characters, so
/// that a recorded command line (`command.txt`, a report) can be pasted back.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,%+@".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Whether an error's text (with its causes, e.g. `format!("{e:#}")`) says that a
/// device ran out of memory: CUDA's driver and runtime errors, cuDNN's and cuBLAS's
/// allocation failures, and the plain "out of memory" of allocators.
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "out of memory",
        "out_of_memory",
        "outofmemory",
        "cudaerrormemoryallocation",
        "cudnn_status_alloc_failed",
        "cublas_status_alloc_failed",
    ]
    .iter()
    .any(|p| m.contains(p))
}

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

/// Every file under `root` (links included, not followed), relative to it, sorted.
pub fn files_under(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
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

/// The lock file inside a locked output folder.
pub const LOCK_FILE: &str = ".rampart.lock";

/// Why an output folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the folder.
    #[error(
        "{} is in use by another running process ({holder}); wait for it to finish or choose another output folder",
        dir.display()
    )]
    Busy {
        /// The output folder.
        dir: PathBuf,
        /// What the holder wrote into the lock file (its process id and command), or
        /// "unknown".
        holder: String,
    },
    /// The folder or its lock file could not be created or locked.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The folder or lock file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive hold on an output folder for the life of this value (see the crate
/// documentation). Dropping it, or the process ending in any way, releases it.
#[derive(Debug)]
pub struct OutputLock {
    dir: PathBuf,
    _file: std::fs::File,
}

impl OutputLock {
    /// Creates `dir` if needed and locks it, recording `holder` (e.g. the process id
    /// and command line) in the lock file for the message another process gets.
    /// Fails at once with [`LockError::Busy`] when another process holds it.
    pub fn acquire(dir: &Path, holder: &str) -> Result<Self, LockError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "unknown".into());
                return Err(LockError::Busy {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        // Ours now: replace what a previous holder wrote.
        file.set_len(0).map_err(io(&path))?;
        file.write_all(holder.as_bytes()).map_err(io(&path))?;
        Ok(OutputLock {
            dir: dir.to_path_buf(),
            _file: file,
        })
    }

    /// [`OutputLock::acquire`] for this process running `command`: the holder recorded
    /// is `pid N: command`.
    pub fn acquire_for(dir: &Path, command: &str) -> Result<Self, LockError> {
        Self::acquire(dir, &format!("pid {}: {command}", std::process::id()))
    }

    /// The locked folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::{files_under, is_out_of_memory};
    use std::path::PathBuf;

    #[test]
    fn files_under_lists_every_file_relative_and_sorted() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("b/c"))?;
        std::fs::create_dir_all(dir.path().join("empty"))?;
        for f in ["z.txt", "b/a.json", "b/c/d.md"] {
            std::fs::write(dir.path().join(f), f)?;
        }
        let want: Vec<PathBuf> = ["b/a.json", "b/c/d.md", "z.txt"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(files_under(dir.path())?, want);
        Ok(())
    }

    #[test]
    fn out_of_memory_is_recognised_in_the_forms_devices_report_it() {
        for m in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "cuda error: CUDA_ERROR_OUT_OF_MEMORY",
            "cudnn error: CUDNN_STATUS_ALLOC_FAILED",
            "cublas: CUBLAS_STATUS_ALLOC_FAILED",
            "runtime: cudaErrorMemoryAllocation",
            "memory allocation of 1 bytes failed: Out of memory",
        ] {
            assert!(is_out_of_memory(m), "{m}");
        }
        for m in [
            "shape mismatch in matmul",
            "cannot write out/x: No space left on device",
        ] {
            assert!(!is_out_of_memory(m), "{m}");
        }
    }

    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("run");
        let first = OutputLock::acquire(&out, "pid 1: rampart train")?;
        assert_eq!(first.dir(), out.as_path());
        // A second open file description conflicts as another process's would.
        match OutputLock::acquire(&out, "pid 2: rampart eval") {
            Err(LockError::Busy { holder, .. }) => assert_eq!(holder, "pid 1: rampart train"),
            other => panic!("expected Busy, got {other:?}"),
        }
        let msg = OutputLock::acquire(&out, "x").unwrap_err().to_string();
        assert!(msg.contains("in use by another running process"), "{msg}");
        drop(first);
        // Released with the file: nothing stale is left to clear by hand.
        let again = OutputLock::acquire(&out, "pid 3: rampart eval")?;
        assert_eq!(
            std::fs::read_to_string(out.join(LOCK_FILE))?,
            "pid 3: rampart eval"
        );
        drop(again);
        Ok(())
    }

    /// Another process holds the lock (util-linux `flock`, the same kind of lock), is
    /// killed with SIGKILL, and the folder is free again at once.
    #[cfg(unix)]
    #[test]
    fn a_killed_holder_leaves_no_stale_lock() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("run");
        std::fs::create_dir_all(&out)?;
        // `-o`: the lock is held by `flock` itself, not by the `sleep` it runs.
        let mut child = std::process::Command::new("flock")
            .arg("-o")
            .arg(out.join(LOCK_FILE))
            .args(["sleep", "20"])
            .spawn()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match OutputLock::acquire(&out, "test") {
                Err(LockError::Busy { .. }) => break,
                Ok(lock) => drop(lock),
                Err(e) => return Err(e.into()),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the child never took the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let lock = loop {
            match OutputLock::acquire(&out, "after the kill") {
                Ok(lock) => break lock,
                Err(LockError::Busy { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => return Err(e.into()),
            }
        };
        drop(lock);
        Ok(())
    }

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
