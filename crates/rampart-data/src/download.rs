//! Fetching and verifying the official CIFAR binary archives.
//!
//! The CIFAR-10 archive is checked against its SHA-256. For the CIFAR-100 archive the
//! authors publish only an MD5 (`03b5dce01913d631647c71ecec9e9cb8`), so that is what is
//! checked: it guards against truncated or corrupted downloads, not against tampering.
//!
//! The HTTP client sits behind the cargo feature `download`, **off by default** because
//! its TLS stack (ureq, rustls, ring) adds about 90 s of compile time on two cores;
//! enable it with `--features rampart-data/download`. Built without it, [`download`]
//! returns [`DataError::Download`] saying which file to place where by hand.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use md5::Md5;
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::kind::{Checksum, DatasetKind};

/// Downloads the official binary archive of `kind` to `dir/<archive name>` and returns
/// its path. The body is written to `<archive name>.part`, verified, then renamed into
/// place, so the final name only ever holds a verified file. An archive already there
/// that verifies is kept without downloading.
pub fn download(kind: DatasetKind, dir: &Path) -> Result<PathBuf> {
    let dest = dir.join(kind.archive_name());
    let checksum = kind.archive_checksum();
    if dest.is_file() {
        match verify_file(&dest, checksum) {
            Ok(()) => {
                tracing::info!(file = %dest.display(), "archive already present and verified");
                return Ok(dest);
            }
            Err(DataError::Checksum { .. }) => {
                tracing::warn!(file = %dest.display(), "archive present but fails its checksum; downloading it again");
            }
            Err(e) => return Err(e),
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    fetch_verified(
        kind.archive_url(),
        &dest,
        checksum,
        &manual_help(kind, &dest),
    )?;
    Ok(dest)
}

/// Checks the official archive of `kind` at `path` against its published digest.
pub fn verify_archive(kind: DatasetKind, path: &Path) -> Result<()> {
    verify_file(path, kind.archive_checksum())
}

/// Checks `path` against `checksum`, reading it in full.
pub fn verify_file(path: &Path, checksum: Checksum) -> Result<()> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Hasher::new(checksum);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.check(path, checksum)
}

/// How to place the archive by hand.
fn manual_help(kind: DatasetKind, dest: &Path) -> String {
    format!(
        "Without network access, fetch {url} on another machine, check its {checksum}, and place it at {dest} \
         (or its extracted {folder}/ folder next to it), then pass --data-dir {dir}",
        url = kind.archive_url(),
        checksum = kind.archive_checksum(),
        dest = dest.display(),
        folder = kind.binary_folder_name(),
        dir = dest.parent().map(|p| p.display().to_string()).unwrap_or_default(),
    )
}

/// A running digest of the kind named by a [`Checksum`].
enum Hasher {
    Sha256(Sha256),
    Md5(Md5),
}

impl Hasher {
    fn new(checksum: Checksum) -> Self {
        match checksum {
            Checksum::Sha256(_) => Self::Sha256(Sha256::new()),
            Checksum::Md5(_) => Self::Md5(Md5::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Md5(h) => h.update(bytes),
        }
    }

    /// Compares the digest with `checksum`; `file` names the data in the error.
    fn check(self, file: &Path, checksum: Checksum) -> Result<()> {
        let actual = match self {
            Self::Sha256(h) => hex(&h.finalize()),
            Self::Md5(h) => hex(&h.finalize()),
        };
        if actual == checksum.hex() {
            Ok(())
        } else {
            Err(DataError::Checksum {
                file: file.to_path_buf(),
                algorithm: checksum.algorithm(),
                expected: checksum.hex().to_owned(),
                actual,
            })
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads `url` to `dest` through `dest.part`, verifying `checksum` before the rename.
#[cfg(feature = "download")]
fn fetch_verified(url: &str, dest: &Path, checksum: Checksum, help: &str) -> Result<()> {
    use std::io::Write;
    use std::time::Duration;

    let fail = |reason: String| DataError::Download {
        url: url.to_owned(),
        file: dest.to_path_buf(),
        reason,
        help: help.to_owned(),
    };
    let part = part_path(dest);
    tracing::info!(%url, file = %dest.display(), "downloading");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = response.into_body().into_reader();
    let mut out = File::create(&part).map_err(|e| DataError::io(&part, e))?;
    let mut hasher = Hasher::new(checksum);
    let mut buf = vec![0u8; 1 << 16];
    let (mut done, mut next_report) = (0u64, 0u64);
    let copied: Result<()> = loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(fail(format!("connection failed after {done} bytes: {e}"))),
        };
        hasher.update(&buf[..n]);
        if let Err(e) = out.write_all(&buf[..n]) {
            break Err(DataError::io(&part, e));
        }
        done += n as u64;
        if done >= next_report {
            match total {
                Some(t) if t > 0 => tracing::info!("{done} / {t} bytes ({}%)", done * 100 / t),
                _ => tracing::info!("{done} bytes"),
            }
            next_report = done + (16 << 20);
        }
    };
    let finished = copied
        .and_then(|()| out.sync_all().map_err(|e| DataError::io(&part, e)))
        .and_then(|()| hasher.check(&part, checksum));
    drop(out);
    if let Err(e) = finished {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, dest).map_err(|e| DataError::io(dest, e))?;
    tracing::info!(file = %dest.display(), "downloaded and verified ({checksum})");
    Ok(())
}

/// Without the `download` feature there is no HTTP client: say what to do instead.
#[cfg(not(feature = "download"))]
fn fetch_verified(url: &str, dest: &Path, _checksum: Checksum, help: &str) -> Result<()> {
    Err(DataError::Download {
        url: url.to_owned(),
        file: dest.to_path_buf(),
        reason: "rampart-data was built without its `download` feature".into(),
        help: help.to_owned(),
    })
}

/// `dest` with `.part` appended to its file name.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestResult;

    /// Digests of b"abc" from FIPS 180-2 (SHA-256) and RFC 1321 (MD5).
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const ABC_MD5: &str = "900150983cd24fb0d6963f7d28e17f72";

    #[test]
    fn verify_file_checks_sha256_and_md5() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("abc");
        std::fs::write(&f, b"abc")?;
        verify_file(&f, Checksum::Sha256(ABC_SHA256))?;
        verify_file(&f, Checksum::Md5(ABC_MD5))?;
        let err = verify_file(&f, Checksum::Md5(ABC_SHA256)).err();
        assert!(
            matches!(&err, Some(DataError::Checksum { algorithm: "md5", actual, .. }) if actual == ABC_MD5),
            "{err:?}"
        );
        Ok(())
    }

    #[cfg(feature = "download")]
    mod http {
        use super::*;
        use std::io::Write;
        use std::net::TcpListener;

        /// Serves `body` once on a loopback port; returns its URL.
        fn serve_once(
            body: &'static [u8],
        ) -> std::io::Result<(String, std::thread::JoinHandle<()>)> {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let url = format!("http://{}/archive.tar.gz", listener.local_addr()?);
            let handle = std::thread::spawn(move || {
                if let Ok((mut stream, _)) = listener.accept() {
                    let mut request = Vec::new();
                    let mut byte = [0u8; 1];
                    while !request.ends_with(b"\r\n\r\n")
                        && stream.read(&mut byte).unwrap_or(0) == 1
                    {
                        request.push(byte[0]);
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body);
                }
            });
            Ok((url, handle))
        }

        #[test]
        fn downloads_verifies_and_renames() -> TestResult {
            let dir = tempfile::tempdir()?;
            let dest = dir.path().join("a.tar.gz");
            let (url, server) = serve_once(b"abc")?;
            fetch_verified(&url, &dest, Checksum::Sha256(ABC_SHA256), "help")?;
            let _ = server.join();
            assert_eq!(std::fs::read(&dest)?, b"abc");
            assert!(!part_path(&dest).exists());
            Ok(())
        }

        #[test]
        fn checksum_mismatch_leaves_no_file() -> TestResult {
            let dir = tempfile::tempdir()?;
            let dest = dir.path().join("a.tar.gz");
            let (url, server) = serve_once(b"abd")?;
            let err = fetch_verified(&url, &dest, Checksum::Md5(ABC_MD5), "help").err();
            let _ = server.join();
            assert!(
                matches!(
                    err,
                    Some(DataError::Checksum {
                        algorithm: "md5",
                        ..
                    })
                ),
                "{err:?}"
            );
            assert!(!dest.exists() && !part_path(&dest).exists());
            Ok(())
        }

        #[test]
        fn unreachable_server_says_where_to_place_the_file() -> TestResult {
            let dir = tempfile::tempdir()?;
            // A loopback port with nothing listening.
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let url = format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz");
            let dest = dir.path().join(DatasetKind::Cifar10.archive_name());
            let help = manual_help(DatasetKind::Cifar10, &dest);
            let err =
                fetch_verified(&url, &dest, DatasetKind::Cifar10.archive_checksum(), &help).err();
            assert!(matches!(err, Some(DataError::Download { .. })), "{err:?}");
            let msg = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                msg.contains(&dest.display().to_string()) && msg.contains("--data-dir"),
                "{msg}"
            );
            assert!(
                msg.contains(DatasetKind::Cifar10.archive_checksum().hex()),
                "{msg}"
            );
            assert!(!dest.exists());
            Ok(())
        }
    }

    #[cfg(not(feature = "download"))]
    #[test]
    fn without_the_feature_download_says_where_to_place_the_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let err = download(DatasetKind::Cifar10, dir.path()).err();
        assert!(matches!(&err, Some(DataError::Download { .. })), "{err:?}");
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        let dest = dir.path().join("cifar-10-binary.tar.gz");
        for needle in [
            "`download` feature",
            DatasetKind::Cifar10.archive_url(),
            DatasetKind::Cifar10.archive_checksum().hex(),
            &dest.display().to_string(),
            "--data-dir",
        ] {
            assert!(msg.contains(needle), "message lacks {needle}: {msg}");
        }
        assert!(!dest.exists());
        Ok(())
    }

    #[test]
    fn verify_archive_rejects_a_wrong_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join(DatasetKind::Cifar100.archive_name());
        std::fs::write(&f, b"not the archive")?;
        let err = verify_archive(DatasetKind::Cifar100, &f).err();
        assert!(
            matches!(
                err,
                Some(DataError::Checksum {
                    algorithm: "md5",
                    ..
                })
            ),
            "{err:?}"
        );
        Ok(())
    }
}
