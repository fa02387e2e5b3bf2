//! Reader for the official CIFAR binary distribution, as a `.tar.gz` or extracted folder.
//!
//! Each record is `label_bytes` label bytes followed by 3,072 pixel bytes: the 1,024
//! red values, then green, then blue, each 32×32 row-major. That is already the
//! crate's C×H×W layout, so records are copied as they are. CIFAR-10 has one label
//! byte; CIFAR-100 has two (coarse, fine) and the fine label is used. Examples keep
//! the official order: `data_batch_1..5` then nothing else for train, `test_batch`
//! for test (CIFAR-100: `train.bin`, `test.bin`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::archive::read_member;
use crate::dataset::{ImageDataset, Splits};
use crate::error::{member_path, DataError, Result};
use crate::kind::{CifarLayout, DatasetKind};

/// Channels, height and width of every CIFAR image.
pub const CIFAR_SHAPE: (usize, usize, usize) = (3, 32, 32);
const PIXELS: usize = 3 * 32 * 32;

/// Loads both splits of `kind` from the official binary tarball (`path` is a file)
/// or from its extracted folder (`path` is that folder, or the folder holding it).
/// A `kind` that is not CIFAR gives [`DataError::InvalidDataset`].
pub fn load_cifar_binary(kind: DatasetKind, path: &Path) -> Result<Splits> {
    let layout = cifar_layout(kind)?;
    let splits = if path.is_file() {
        load_tarball(kind, layout, path)?
    } else {
        let nested = path.join(layout.binary_folder);
        load_folder(kind, layout, if nested.is_dir() { &nested } else { path })?
    };
    tracing::info!(
        dataset = %kind,
        source = %path.display(),
        train = splits.train.len(),
        test = splits.test.len(),
        "loaded CIFAR binary data"
    );
    Ok(splits)
}

/// Decodes one CIFAR batch file held in memory (`data_batch_1.bin` … `test_batch.bin`,
/// CIFAR-100's `train.bin` or `test.bin`): records of `kind`'s label bytes and 3,072
/// pixel bytes. `file` only names the source in errors.
pub fn decode_cifar_batch(kind: DatasetKind, bytes: &[u8], file: &Path) -> Result<ImageDataset> {
    let mut split = SplitBuilder::new(kind, cifar_layout(kind)?);
    split.push_batch(bytes, file)?;
    split.finish()
}

/// Decodes the official CIFAR binary `.tar.gz` held in memory, as
/// [`load_cifar_binary`] reads it from a file. `archive` only names the source in errors.
pub fn decode_cifar_archive(kind: DatasetKind, bytes: &[u8], archive: &Path) -> Result<Splits> {
    read_tarball(kind, cifar_layout(kind)?, bytes, archive)
}

/// The CIFAR layout of `kind`, or an error saying it is not a CIFAR data set.
pub(crate) fn cifar_layout(kind: DatasetKind) -> Result<&'static CifarLayout> {
    kind.cifar_layout().ok_or_else(|| {
        DataError::InvalidDataset(format!(
            "{} is not a CIFAR data set: it has no CIFAR binary files",
            kind.title()
        ))
    })
}

/// Accumulates records into one split.
struct SplitBuilder {
    kind: DatasetKind,
    layout: &'static CifarLayout,
    images: Vec<u8>,
    labels: Vec<u32>,
}

impl SplitBuilder {
    fn new(kind: DatasetKind, layout: &'static CifarLayout) -> Self {
        Self {
            kind,
            layout,
            images: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Appends the records of one batch file; `file` names it in errors.
    fn push_batch(&mut self, bytes: &[u8], file: &Path) -> Result<()> {
        let label_bytes = self.layout.label_bytes;
        let record_size = label_bytes + PIXELS;
        if bytes.is_empty() || !bytes.len().is_multiple_of(record_size) {
            return Err(DataError::TruncatedRecord {
                file: file.to_path_buf(),
                len: bytes.len() as u64,
                record_size,
            });
        }
        let num_classes = self.kind.num_classes();
        self.images.reserve(bytes.len() / record_size * PIXELS);
        for (record, chunk) in bytes.chunks_exact(record_size).enumerate() {
            // The last label byte is CIFAR-10's label or CIFAR-100's fine label.
            let label = u32::from(chunk[label_bytes - 1]);
            if label as usize >= num_classes {
                return Err(DataError::LabelOutOfRange {
                    file: file.to_path_buf(),
                    record,
                    label,
                    num_classes,
                });
            }
            self.labels.push(label);
            self.images.extend_from_slice(&chunk[label_bytes..]);
        }
        Ok(())
    }

    fn finish(self) -> Result<ImageDataset> {
        let names = self
            .kind
            .class_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        ImageDataset::new(self.images, self.labels, CIFAR_SHAPE, names)
    }
}

/// The train and test splits of `layout`, `add(name, split)` adding the batch file
/// `name` to its split: the train files in their official order, then the test file.
fn build_splits(
    kind: DatasetKind,
    layout: &'static CifarLayout,
    mut add: impl FnMut(&str, &mut SplitBuilder) -> Result<()>,
) -> Result<Splits> {
    let mut train = SplitBuilder::new(kind, layout);
    for name in layout.train_files {
        add(name, &mut train)?;
    }
    let mut test = SplitBuilder::new(kind, layout);
    add(layout.test_file, &mut test)?;
    Ok(Splits {
        train: train.finish()?,
        test: test.finish()?,
    })
}

fn load_folder(kind: DatasetKind, layout: &'static CifarLayout, folder: &Path) -> Result<Splits> {
    let read = |name: &str, split: &mut SplitBuilder| -> Result<()> {
        let file = folder.join(name);
        if !file.is_file() {
            return Err(DataError::Missing {
                path: file,
                help: format!(
                    "the extracted {} folder must hold {} and {}; extract {} ({}) there again",
                    layout.binary_folder,
                    layout.train_files.join(", "),
                    layout.test_file,
                    layout.archive.name,
                    layout.archive.url,
                ),
            });
        }
        let bytes = std::fs::read(&file).map_err(|e| DataError::io(&file, e))?;
        split.push_batch(&bytes, &file)
    };
    build_splits(kind, layout, read)
}

fn load_tarball(kind: DatasetKind, layout: &'static CifarLayout, archive: &Path) -> Result<Splits> {
    let file = File::open(archive).map_err(|e| DataError::io(archive, e))?;
    read_tarball(kind, layout, BufReader::new(file), archive)
}

/// Reads the gzipped tar stream `gz` of the official archive; `archive` names it in errors.
fn read_tarball(
    kind: DatasetKind,
    layout: &'static CifarLayout,
    gz: impl Read,
    archive: &Path,
) -> Result<Splits> {
    let mut tar = tar::Archive::new(GzDecoder::new(gz));
    let wanted: Vec<&str> = layout
        .train_files
        .iter()
        .chain([&layout.test_file])
        .copied()
        .collect();
    // File name → (member path, contents).
    let mut found: HashMap<&str, (PathBuf, Vec<u8>)> = HashMap::new();
    let entries = tar.entries().map_err(|e| DataError::io(archive, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| DataError::io(archive, e))?;
        let member = entry
            .path()
            .map_err(|e| DataError::io(archive, e))?
            .into_owned();
        let Some(name) = member.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(&key) = wanted.iter().find(|&&w| w == name) else {
            continue;
        };
        let shown = member_path(archive, &member.to_string_lossy());
        let bytes = read_member(&mut entry, &shown)?;
        found.insert(key, (shown, bytes));
    }
    let take = |name: &str, split: &mut SplitBuilder| -> Result<()> {
        let (shown, bytes) = found.remove(name).ok_or_else(|| DataError::Missing {
            path: member_path(
                archive,
                &format!("{}/{name}", layout.binary_folder),
            ),
            help: format!(
                "the archive lacks this member, so it is not the official {}: download it again from {} ({})",
                layout.archive.name,
                layout.archive.url,
                layout.archive.checksum,
            ),
        })?;
        split.push_batch(&bytes, &shown)
    };
    build_splits(kind, layout, take)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::{
        assert_matches, assert_mentions, error_text, record, tar_gz_claiming, write_cifar_folder,
        write_cifar_tarball, TestResult,
    };

    #[test]
    fn refuses_a_kind_that_is_not_cifar() -> TestResult {
        let dir = tempfile::tempdir()?;
        let err = load_cifar_binary(DatasetKind::Mnist, dir.path()).err();
        assert_matches!(&err, Some(DataError::InvalidDataset(m)) if m.contains("MNIST"));
        Ok(())
    }

    #[test]
    fn reads_cifar10_folder_in_official_order() -> TestResult {
        let dir = tempfile::tempdir()?;
        let folder = write_cifar_folder(DatasetKind::Cifar10, dir.path(), 2)?;
        // Both the folder itself and its parent are accepted.
        for path in [folder.as_path(), dir.path()] {
            let s = load_cifar_binary(DatasetKind::Cifar10, path)?;
            assert_eq!(s.train.len(), 10);
            assert_eq!(s.test.len(), 2);
            assert_eq!(s.train.shape(), (3, 32, 32));
            assert_eq!(s.train.num_classes(), 10);
            // Batch b record r has label (b * 2 + r) % 10 and pixels p -> (label + p) % 251.
            assert_eq!(s.train.labels(), &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
            assert_eq!(
                s.train.image(3),
                record(DatasetKind::Cifar10, 3, 3)[1..].to_vec()
            );
            assert_eq!(s.test.labels(), &[0, 1]);
        }
        Ok(())
    }

    #[test]
    fn reads_cifar100_tarball_with_fine_labels() -> TestResult {
        let dir = tempfile::tempdir()?;
        let archive = write_cifar_tarball(DatasetKind::Cifar100, dir.path(), 3)?;
        let s = load_cifar_binary(DatasetKind::Cifar100, &archive)?;
        assert_eq!(s.train.len(), 3);
        assert_eq!(s.test.len(), 3);
        assert_eq!(s.train.num_classes(), 100);
        // Fine labels are 97 + r, coarse labels r: reading the coarse byte would give 0, 1, 2.
        assert_eq!(s.train.labels(), &[97, 98, 99]);
        assert_eq!(s.train.class_names()[99], "worm");
        assert_eq!(s.test.image(2), &record(DatasetKind::Cifar100, 2, 99)[2..]);
        Ok(())
    }

    #[test]
    fn reads_cifar10_tarball_like_the_folder() -> TestResult {
        let dir = tempfile::tempdir()?;
        let folder = write_cifar_folder(DatasetKind::Cifar10, dir.path(), 3)?;
        let archive = write_cifar_tarball(DatasetKind::Cifar10, dir.path(), 3)?;
        let a = load_cifar_binary(DatasetKind::Cifar10, &folder)?;
        let b = load_cifar_binary(DatasetKind::Cifar10, &archive)?;
        assert_eq!(a.train.images(), b.train.images());
        assert_eq!(a.train.labels(), b.train.labels());
        assert_eq!(a.test.images(), b.test.images());
        Ok(())
    }

    #[test]
    fn truncated_record_names_the_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let folder = write_cifar_folder(DatasetKind::Cifar10, dir.path(), 2)?;
        let bad = folder.join("data_batch_3.bin");
        let mut bytes = std::fs::read(&bad)?;
        bytes.truncate(bytes.len() - 100);
        std::fs::write(&bad, bytes)?;
        let err = load_cifar_binary(DatasetKind::Cifar10, &folder).err();
        assert_matches!(
            &err,
            Some(DataError::TruncatedRecord { file, record_size: 3073, .. }) if *file == bad
        );
        assert_mentions(&error_text(err), &["data_batch_3.bin", "truncated"]);
        Ok(())
    }

    #[test]
    fn label_out_of_range_names_the_file_and_record() -> TestResult {
        let dir = tempfile::tempdir()?;
        let folder = write_cifar_folder(DatasetKind::Cifar10, dir.path(), 2)?;
        let bad = folder.join("test_batch.bin");
        let mut bytes = std::fs::read(&bad)?;
        bytes[3073] = 10; // label of record 1
        std::fs::write(&bad, bytes)?;
        let err = load_cifar_binary(DatasetKind::Cifar10, &folder).err();
        assert_matches!(
            &err,
            Some(DataError::LabelOutOfRange { file, record: 1, label: 10, num_classes: 10 })
                if *file == bad
        );
        assert!(error_text(err).contains("test_batch.bin"));
        Ok(())
    }

    #[test]
    fn missing_batch_file_names_it() -> TestResult {
        let dir = tempfile::tempdir()?;
        let folder = write_cifar_folder(DatasetKind::Cifar10, dir.path(), 1)?;
        std::fs::remove_file(folder.join("data_batch_5.bin"))?;
        let err = load_cifar_binary(DatasetKind::Cifar10, &folder).err();
        assert_mentions(&error_text(err), &["data_batch_5.bin", "missing"]);
        Ok(())
    }

    #[test]
    fn truncated_member_in_tarball_names_archive_and_member() -> TestResult {
        let dir = tempfile::tempdir()?;
        let archive = dir.path().join("cifar-100-binary.tar.gz");
        crate::testutil::write_tar_gz(
            &archive,
            &[
                ("cifar-100-binary/train.bin".into(), vec![0; 3074 * 2]),
                ("cifar-100-binary/test.bin".into(), vec![0; 3074 + 5]),
            ],
        )?;
        let msg = error_text(load_cifar_binary(DatasetKind::Cifar100, &archive).err());
        assert_mentions(
            &msg,
            &[
                "cifar-100-binary.tar.gz!/cifar-100-binary/test.bin",
                "3079 bytes",
            ],
        );
        Ok(())
    }

    /// A member whose tar header claims 2^62 bytes must not make the reader reserve that
    /// much memory up front (which aborts the process).
    #[test]
    fn a_member_claiming_more_bytes_than_the_archive_holds_is_truncated() -> TestResult {
        let archive = Path::new("cifar-10-binary.tar.gz");
        for claimed in [1u64 << 62, 8 << 30, 3073 * 2] {
            let bytes =
                tar_gz_claiming("cifar-10-batches-bin/test_batch.bin", claimed, &[0; 3073])?;
            let err = decode_cifar_archive(DatasetKind::Cifar10, &bytes, archive).err();
            assert!(
                matches!(&err, Some(DataError::Truncated { needed, available: 3073, .. }) if *needed == claimed),
                "{claimed}: {err:?}"
            );
            assert_mentions(
                &error_text(err),
                &["cifar-10-binary.tar.gz!/cifar-10-batches-bin/test_batch.bin"],
            );
        }
        Ok(())
    }

    #[test]
    fn decodes_a_batch_held_in_memory() -> TestResult {
        let bytes: Vec<u8> = (0..3)
            .flat_map(|i| record(DatasetKind::Cifar10, i, i as u8 + 4))
            .collect();
        let ds = decode_cifar_batch(DatasetKind::Cifar10, &bytes, Path::new("mem.bin"))?;
        assert_eq!(ds.labels(), &[4, 5, 6]);
        assert_eq!(ds.image(2), &record(DatasetKind::Cifar10, 2, 6)[1..]);
        Ok(())
    }
}
