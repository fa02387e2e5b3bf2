//! Fetching and verifying the official files of each data set.
//!
//! The CIFAR-10 archive is checked against its SHA-256. For the CIFAR-100 archive the
//! authors publish only an MD5 (`03b5dce01913d631647c71ecec9e9cb8`), and MNIST's four
//! `.gz` files and SVHN's two `.mat` files are checked against the MD5s torchvision
//! uses: these guard against truncated or corrupted downloads, not against tampering.
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
use crate::kind::{Checksum, DatasetKind, OfficialFile};

/// Downloads the official files of `kind` ([`DatasetKind::official_files`]: the CIFAR
/// archive, MNIST's four `.gz` IDX files, SVHN's two `.mat` files) into `dir` under
/// their official names and returns their paths, in that order. Each body is written
/// to `<name>.part`, verified, then renamed into place, so the final name only ever
/// holds a verified file. A file already there that verifies is kept without
/// downloading. [`load`](crate::load) finds the files where this puts them.
pub fn download(kind: DatasetKind, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::with_capacity(kind.official_files().len());
    for file in kind.official_files() {
        let dest = dir.join(file.name);
        paths.push(dest.clone());
        if dest.is_file() {
            match verify_file(&dest, file.checksum) {
                Ok(()) => {
                    tracing::info!(file = %dest.display(), "already present and verified");
                    continue;
                }
                Err(DataError::Checksum { .. }) => {
                    tracing::warn!(file = %dest.display(), "present but fails its checksum; downloading it again");
                }
                Err(e) => return Err(e),
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        fetch_verified(
            file.url,
            &dest,
            file.checksum,
            &manual_help(kind, dir, file),
        )?;
    }
    Ok(paths)
}

/// Checks the official file of `kind` at `path` against its published digest: the one
/// whose name is `path`'s file name, or for CIFAR the archive whatever its name.
/// A name that is none of `kind`'s official files gives [`DataError::NotOfficial`].
pub fn verify_archive(kind: DatasetKind, path: &Path) -> Result<()> {
    let files = kind.official_files();
    let name = path.file_name().and_then(|n| n.to_str());
    let official = match files {
        [only] if kind.cifar_layout().is_some() => Some(only),
        _ => files.iter().find(|f| Some(f.name) == name),
    };
    match official {
        Some(file) => verify_file(path, file.checksum),
        None => Err(DataError::NotOfficial {
            file: path.to_path_buf(),
            dataset: kind.title(),
            names: files.iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
        }),
    }
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

/// How to place `file` of `kind` (and the others it comes with) in `dir` by hand.
fn manual_help(kind: DatasetKind, dir: &Path, file: &OfficialFile) -> String {
    let mut help = format!(
        "Without network access, fetch {url} on another machine, check its {checksum}, and place it at {dest}",
        url = file.url,
        checksum = file.checksum,
        dest = dir.join(file.name).display(),
    );
    if let Some(layout) = kind.cifar_layout() {
        help += &format!(
            " (or its extracted {}/ folder next to it)",
            layout.binary_folder
        );
    }
    let others: Vec<String> = kind
        .official_files()
        .iter()
        .filter(|f| f.name != file.name)
        .map(|f| {
            format!(
                "{} from {} ({})",
                dir.join(f.name).display(),
                f.url,
                f.checksum
            )
        })
        .collect();
    if !others.is_empty() {
        help += &format!("; {} also needs {}", kind.title(), others.join(", "));
    }
    help + &format!(", then pass --data-dir {}", dir.display())
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
    use crate::testutil::{assert_matches, assert_mentions, error_text, TestResult};

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
        assert_matches!(
            &err,
            Some(DataError::Checksum { algorithm: "md5", actual, .. }) if actual == ABC_MD5
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
            assert_matches!(
                &err,
                Some(DataError::Checksum {
                    algorithm: "md5",
                    ..
                })
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
            let official = &DatasetKind::Cifar10.official_files()[0];
            let dest = dir.path().join(official.name);
            let help = manual_help(DatasetKind::Cifar10, dir.path(), official);
            let err = fetch_verified(&url, &dest, official.checksum, &help).err();
            assert_matches!(&err, Some(DataError::Download { .. }));
            let msg = error_text(err);
            assert_mentions(&msg, &[&dest.display().to_string(), "--data-dir"]);
            assert!(msg.contains(official.checksum.hex()), "{msg}");
            assert!(!dest.exists());
            Ok(())
        }
    }

    #[cfg(not(feature = "download"))]
    #[test]
    fn without_the_feature_download_says_where_to_place_the_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let err = download(DatasetKind::Cifar10, dir.path()).err();
        assert_matches!(&err, Some(DataError::Download { .. }));
        let dest = dir.path().join("cifar-10-binary.tar.gz");
        assert_mentions(
            &error_text(err),
            &[
                "`download` feature",
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                &dest.display().to_string(),
                "cifar-10-batches-bin/",
                "--data-dir",
            ],
        );
        assert!(!dest.exists());

        // MNIST: the first missing file is named, and every other file it needs is listed.
        let err = download(DatasetKind::Mnist, dir.path()).err();
        let msg = error_text(err);
        for file in DatasetKind::Mnist.official_files() {
            assert_mentions(
                &msg,
                &[
                    file.url,
                    file.checksum.hex(),
                    &dir.path().join(file.name).display().to_string(),
                ],
            );
        }
        Ok(())
    }

    #[test]
    fn verify_archive_picks_the_official_file_by_name() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("t10k-labels-idx1-ubyte.gz");
        std::fs::write(&f, b"abc")?;
        let err = verify_archive(DatasetKind::Mnist, &f).err();
        assert_matches!(
            &err,
            Some(DataError::Checksum { expected, .. })
                if expected == "ec29112dd5afa0611ce80d1b7f02629c"
        );
        let other = dir.path().join("labels.gz");
        std::fs::write(&other, b"abc")?;
        assert_mentions(
            &error_text(verify_archive(DatasetKind::Mnist, &other).err()),
            &["labels.gz", "t10k-labels-idx1-ubyte.gz"],
        );
        Ok(())
    }

    #[test]
    fn verify_archive_rejects_a_wrong_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("cifar-100-binary.tar.gz");
        std::fs::write(&f, b"not the archive")?;
        let err = verify_archive(DatasetKind::Cifar100, &f).err();
        assert_matches!(
            &err,
            Some(DataError::Checksum {
                algorithm: "md5",
                ..
            })
        );
        Ok(())
    }
}
