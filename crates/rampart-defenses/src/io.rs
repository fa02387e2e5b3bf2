//! Atomic file writes.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{DefenseError, Result};

/// Writes `bytes` to `path` atomically: a temporary sibling `PATH.tmp`, fsync, rename.
/// Creates the parent folder. A reader never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DefenseError::io(dir, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| DefenseError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| DefenseError::io(&tmp, e))?;
        f.sync_all().map_err(|e| DefenseError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| DefenseError::io(path, e))
}
