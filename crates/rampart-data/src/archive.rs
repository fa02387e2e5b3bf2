//! Reading members of the `.tar.gz` archives data come in.

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};

/// Most bytes reserved up front for one member (a CIFAR batch file is 30 MiB); a larger
/// member grows its buffer as its bytes arrive.
const MAX_RESERVE: u64 = 64 << 20;

/// Reads the tar member `entry` (named `shown` in errors) into memory.
///
/// The size in the member's header is a claim of the file: memory is reserved for at
/// most [`MAX_RESERVE`] bytes of it and grows only with the bytes actually read, and a
/// member that ends before its claimed size is [`DataError::Truncated`].
pub(crate) fn read_member<R: Read>(entry: &mut tar::Entry<'_, R>, shown: &Path) -> Result<Vec<u8>> {
    let claimed = entry.size();
    let reserve = usize::try_from(claimed.min(MAX_RESERVE)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(reserve);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| DataError::io(shown, e))?;
    if (bytes.len() as u64) < claimed {
        return Err(DataError::Truncated {
            file: shown.to_path_buf(),
            format: "tar",
            what: "the archive member".into(),
            needed: claimed,
            available: bytes.len() as u64,
        });
    }
    Ok(bytes)
}
