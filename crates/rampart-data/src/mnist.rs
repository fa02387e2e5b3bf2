//! Reader for MNIST's IDX files, gzipped or plain, and finding them in a data folder.
//!
//! An IDX file is a 4-byte magic number `00 00 TYPE NDIMS`, NDIMS big-endian u32
//! dimensions, then the elements in row-major order. MNIST uses TYPE `0x08` (unsigned
//! byte) for both files: images have magic `0x00000803` and dimensions N×28×28 (one
//! row-major 28×28 grayscale image after another, which is already the crate's C×H×W
//! layout with C = 1); labels have magic `0x00000801`, dimension N, one byte 0–9 each.
//! A file is gunzipped first when it starts with the gzip magic `1f 8b`, whatever its
//! name. Examples keep the order of the files.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::dataset::{ImageDataset, Splits};
use crate::error::{DataError, Result};
use crate::kind::DatasetKind;
use crate::load::absent_note;

/// Channels, height and width of every MNIST image.
pub const MNIST_SHAPE: (usize, usize, usize) = (1, 28, 28);
const PIXELS: usize = 28 * 28;
const FORMAT: &str = "IDX";

/// The two files of each split without `.gz`: (images, labels).
const TRAIN_FILES: [&str; 2] = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"];
const TEST_FILES: [&str; 2] = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// Folders under the data folder searched for the files, after the data folder itself:
/// torchvision's `MNIST/raw/`, then `mnist/`.
const SUBFOLDERS: [&str; 2] = ["MNIST/raw", "mnist"];

/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Deflate cannot expand data by more than about 1032:1, so no valid gzip stream
/// decompresses past this multiple of its own size (plus room for tiny inputs); reading
/// stops there instead of following a corrupt stream.
const MAX_INFLATE_RATIO: usize = 1032;

/// The two IDX files MNIST uses, with the magic number and dimensions each must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IdxFile {
    /// `0x00000803`, N×28×28.
    Images,
    /// `0x00000801`, N.
    Labels,
}

impl IdxFile {
    fn ndims(self) -> u8 {
        match self {
            Self::Images => 3,
            Self::Labels => 1,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Images => {
                "an images file (magic 0x00000803: unsigned bytes, 3 dimensions N×28×28)"
            }
            Self::Labels => "a labels file (magic 0x00000801: unsigned bytes, 1 dimension N)",
        }
    }
}

/// Loads both MNIST splits from `dir`, from torchvision's `dir/MNIST/raw/`, or from
/// `dir/mnist/` (the first of these holding any MNIST file), reading each of
/// `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
/// `t10k-labels-idx1-ubyte` as it is or, when absent, with `.gz` appended.
///
/// No such file in any of those folders, or one of the four missing, gives
/// [`DataError::Missing`] naming the file to place and where to download it.
pub fn load_mnist(dir: &Path) -> Result<Splits> {
    let Some(folder) = find_folder(dir) else {
        return Err(DataError::Missing {
            path: dir.to_path_buf(),
            help: missing_help(dir),
        });
    };
    let file = |name: &str| -> Result<PathBuf> {
        let plain = folder.join(name);
        let gz = folder.join(format!("{name}.gz"));
        if plain.is_file() {
            Ok(plain)
        } else if gz.is_file() {
            Ok(gz)
        } else {
            Err(DataError::Missing {
                path: gz,
                help: one_file_help(&folder, name),
            })
        }
    };
    let [train_images, train_labels] = TRAIN_FILES.map(file);
    let [test_images, test_labels] = TEST_FILES.map(file);
    let splits = Splits {
        train: load_mnist_idx(&train_images?, &train_labels?)?,
        test: load_mnist_idx(&test_images?, &test_labels?)?,
    };
    tracing::info!(
        source = %folder.display(),
        train = splits.train.len(),
        test = splits.test.len(),
        "loaded MNIST IDX files"
    );
    Ok(splits)
}

/// Loads one split from an IDX images file (magic `0x00000803`, N×28×28 unsigned bytes)
/// and its IDX labels file (magic `0x00000801`, N unsigned bytes 0–9), either of them
/// gzipped or plain. The result has shape (1, 28, 28), classes `"0"` … `"9"`.
///
/// Truncated files, a wrong magic number or dimensions, trailing bytes, a label ≥ 10 or
/// different numbers of images and labels give an error naming the file.
pub fn load_mnist_idx(images: &Path, labels: &Path) -> Result<ImageDataset> {
    let read = |path: &Path| std::fs::read(path).map_err(|e| DataError::io(path, e));
    decode_mnist_idx(&read(images)?, images, &read(labels)?, labels)
}

/// Decodes one split from the contents of its IDX images and labels files held in
/// memory, either gzipped or plain, as [`load_mnist_idx`] reads them; the paths only
/// name the sources in errors.
pub fn decode_mnist_idx(
    images_raw: &[u8],
    images_file: &Path,
    labels_raw: &[u8],
    labels_file: &Path,
) -> Result<ImageDataset> {
    let images_bytes = gunzip_if_needed(images_raw, images_file)?;
    let labels_bytes = gunzip_if_needed(labels_raw, labels_file)?;
    let (n_images, pixels) = parse_idx(&images_bytes, images_file, IdxFile::Images)?;
    let (n_labels, label_bytes) = parse_idx(&labels_bytes, labels_file, IdxFile::Labels)?;
    if n_images != n_labels {
        return Err(DataError::CountMismatch {
            images_file: images_file.to_path_buf(),
            images: n_images,
            labels_file: labels_file.to_path_buf(),
            labels: n_labels,
        });
    }
    let num_classes = DatasetKind::Mnist.num_classes();
    let mut labels = Vec::with_capacity(n_labels);
    for (record, &label) in label_bytes.iter().enumerate() {
        if usize::from(label) >= num_classes {
            return Err(DataError::LabelOutOfRange {
                file: labels_file.to_path_buf(),
                record,
                label: u32::from(label),
                num_classes,
            });
        }
        labels.push(u32::from(label));
    }
    ImageDataset::new(pixels.to_vec(), labels, MNIST_SHAPE, digit_names())
}

/// `"0"` … `"9"`.
fn digit_names() -> Vec<String> {
    DatasetKind::Mnist
        .class_names()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// `raw` itself, or its decompressed contents when it starts with the gzip magic.
fn gunzip_if_needed<'a>(raw: &'a [u8], file: &Path) -> Result<std::borrow::Cow<'a, [u8]>> {
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(std::borrow::Cow::Borrowed(raw));
    }
    let cap = raw
        .len()
        .saturating_mul(MAX_INFLATE_RATIO)
        .saturating_add(1 << 16);
    let mut out = Vec::new();
    GzDecoder::new(raw)
        .take(cap as u64)
        .read_to_end(&mut out)
        .map_err(|e| DataError::Malformed {
            file: file.to_path_buf(),
            format: "gzip",
            problem: format!("corrupt or truncated gzip stream: {e}"),
        })?;
    if out.len() >= cap {
        return Err(DataError::Malformed {
            file: file.to_path_buf(),
            format: "gzip",
            problem: format!(
                "decompresses to more than {cap} bytes, beyond what deflate can produce from {} bytes",
                raw.len()
            ),
        });
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Checks the header of an IDX file of kind `want` and returns (N, element bytes).
fn parse_idx<'a>(bytes: &'a [u8], file: &Path, want: IdxFile) -> Result<(usize, &'a [u8])> {
    let truncated = |what: String, needed: u64, available: usize| DataError::Truncated {
        file: file.to_path_buf(),
        format: FORMAT,
        what,
        needed,
        available: available as u64,
    };
    let malformed = |problem: String| DataError::Malformed {
        file: file.to_path_buf(),
        format: FORMAT,
        problem,
    };
    let Some(magic) = bytes.first_chunk::<4>() else {
        return Err(truncated("the magic number".into(), 4, bytes.len()));
    };
    let magic_value = u32::from_be_bytes(*magic);
    if magic[0] != 0 || magic[1] != 0 {
        return Err(malformed(format!(
            "magic number 0x{magic_value:08x} does not start with two zero bytes, so this is not an IDX file; expected {}",
            want.describe()
        )));
    }
    if magic[2] != 0x08 {
        return Err(malformed(format!(
            "magic number 0x{magic_value:08x} has element type 0x{:02x}, not 0x08 (unsigned byte); expected {}",
            magic[2],
            want.describe()
        )));
    }
    if magic[3] != want.ndims() {
        return Err(malformed(format!(
            "magic number 0x{magic_value:08x} gives {} dimensions; expected {}",
            magic[3],
            want.describe()
        )));
    }
    let ndims = usize::from(want.ndims());
    let header = 4 + 4 * ndims;
    let Some(dims_bytes) = bytes.get(4..header) else {
        return Err(truncated(
            format!("the header ({ndims} dimensions)"),
            header as u64,
            bytes.len(),
        ));
    };
    let dims: Vec<u64> = dims_bytes
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let count = dims[0];
    let per_item = match want {
        IdxFile::Images => {
            if dims[1..] != [28, 28] {
                return Err(malformed(format!(
                    "images are {}x{}, expected 28x28",
                    dims[1], dims[2]
                )));
            }
            PIXELS as u64
        }
        IdxFile::Labels => 1,
    };
    if count == 0 {
        return Err(malformed("the file holds no examples (N = 0)".into()));
    }
    // count < 2^32 and per_item ≤ 784, so this cannot overflow.
    let needed = count * per_item;
    let body = &bytes[header..];
    let what = match want {
        IdxFile::Images => format!("the pixels of {count} images of 28x28"),
        IdxFile::Labels => format!("{count} labels"),
    };
    if (body.len() as u64) < needed {
        return Err(truncated(what, needed, body.len()));
    }
    if body.len() as u64 > needed {
        return Err(malformed(format!(
            "{} bytes after {what} (the header says N = {count})",
            body.len() as u64 - needed
        )));
    }
    // `needed == body.len()`, so it fits in usize.
    Ok((count as usize, body))
}

/// The first of `dir` and its [`SUBFOLDERS`] holding any of the four files, gzipped or not.
fn find_folder(dir: &Path) -> Option<PathBuf> {
    std::iter::once(dir.to_path_buf())
        .chain(SUBFOLDERS.iter().map(|s| dir.join(s)))
        .find(|folder| {
            TRAIN_FILES.iter().chain(&TEST_FILES).any(|name| {
                folder.join(name).is_file() || folder.join(format!("{name}.gz")).is_file()
            })
        })
}

/// Where to fetch the official `.gz` of `name` (given without `.gz`) and its digest.
fn official(name: &str) -> String {
    DatasetKind::Mnist.official_source(|f| f.strip_suffix(".gz") == Some(name))
}

/// What to place where when `name` is missing from `folder`, which holds some of the others.
fn one_file_help(folder: &Path, name: &str) -> String {
    format!(
        "{folder} holds some MNIST files but not {name} (nor {name}.gz). Place it there: \
         fetch {official}; it may stay gzipped. All four files must be in the same folder: {all}",
        folder = folder.display(),
        official = official(name),
        all = all_names(),
    )
}

/// The four file names, `.gz` shown as optional.
fn all_names() -> String {
    TRAIN_FILES
        .iter()
        .chain(&TEST_FILES)
        .map(|n| format!("{n}[.gz]"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What to place where when no MNIST file was found under `dir`.
pub(crate) fn missing_help(dir: &Path) -> String {
    let (d, exists) = (dir.display(), absent_note(dir));
    let files = DatasetKind::Mnist.placement_lines(dir);
    format!(
        "no MNIST data found{exists}. Place the four IDX files, gzipped as downloaded or \
         gunzipped, in {d} (or in {d}/MNIST/raw or {d}/mnist), or pass --data-dir with the \
         folder that holds them:{files}\n\
         With network access, rampart_data::download(DatasetKind::Mnist, dir) fetches and verifies them."
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::{
        assert_matches, assert_mentions, error_text, gzip, idx_images, idx_labels, mnist_pixel,
        TestResult,
    };
    use rand::{Rng, SeedableRng};

    /// Writes the four files of a small MNIST (3 train, 2 test examples) into `folder`,
    /// gzipped when `gz`.
    fn write_mnist(folder: &Path, gz: bool) -> std::io::Result<()> {
        std::fs::create_dir_all(folder)?;
        let files = [
            (TRAIN_FILES[0], idx_images(3, 0)),
            (TRAIN_FILES[1], idx_labels(&[5, 0, 9])),
            (TEST_FILES[0], idx_images(2, 100)),
            (TEST_FILES[1], idx_labels(&[7, 1])),
        ];
        for (name, bytes) in files {
            if gz {
                std::fs::write(folder.join(format!("{name}.gz")), gzip(&bytes)?)?;
            } else {
                std::fs::write(folder.join(name), bytes)?;
            }
        }
        Ok(())
    }

    #[test]
    fn reads_plain_and_gzipped_files_exactly() -> TestResult {
        for gz in [false, true] {
            let dir = tempfile::tempdir()?;
            write_mnist(dir.path(), gz)?;
            let s = load_mnist(dir.path())?;
            assert_eq!(s.train.len(), 3);
            assert_eq!(s.test.len(), 2);
            assert_eq!(s.train.shape(), (1, 28, 28));
            assert_eq!(s.train.class_names()[3], "3");
            assert_eq!(s.train.labels(), &[5, 0, 9]);
            assert_eq!(s.test.labels(), &[7, 1]);
            // Image i, row r, column c of a file written from `first` holds
            // mnist_pixel(first + i, r, c): row-major, one image after another.
            for (ds, first) in [(&s.train, 0), (&s.test, 100)] {
                for i in 0..ds.len() {
                    let expected: Vec<u8> = (0..28)
                        .flat_map(|r| (0..28).map(move |c| mnist_pixel(first + i, r, c)))
                        .collect();
                    assert_eq!(ds.image(i), expected.as_slice(), "gz={gz} image {i}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn finds_torchvision_layout_and_mixed_compression() -> TestResult {
        let dir = tempfile::tempdir()?;
        let raw = dir.path().join("MNIST/raw");
        write_mnist(&raw, true)?;
        // torchvision keeps the .gz next to the extracted file; the plain one is read.
        std::fs::write(raw.join(TEST_FILES[1]), idx_labels(&[3, 4]))?;
        let s = load_mnist(dir.path())?;
        assert_eq!(s.test.labels(), &[3, 4]);
        assert_eq!(crate::load(DatasetKind::Mnist, dir.path())?.train.len(), 3);
        Ok(())
    }

    #[test]
    fn missing_files_say_what_to_place_where() -> TestResult {
        let dir = tempfile::tempdir()?;
        assert_mentions(
            &error_text(load_mnist(dir.path()).err()),
            &[
                "no MNIST data found",
                "train-images-idx3-ubyte.gz",
                "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
                "ec29112dd5afa0611ce80d1b7f02629c",
                "--data-dir",
            ],
        );
        write_mnist(dir.path(), true)?;
        std::fs::remove_file(dir.path().join("t10k-images-idx3-ubyte.gz"))?;
        let err = load_mnist(dir.path()).err();
        let expected = dir.path().join("t10k-images-idx3-ubyte.gz");
        assert_matches!(
            &err,
            Some(DataError::Missing { path, help })
                if *path == expected && help.contains("9fb629c4189551a2d022fa330f9573f3")
        );
        Ok(())
    }

    /// Runs `decode_mnist_idx` on modified images / labels bytes.
    fn decode(images: &[u8], labels: &[u8]) -> Result<ImageDataset> {
        decode_mnist_idx(
            images,
            Path::new("imgs-idx3-ubyte"),
            labels,
            Path::new("lbls-idx1-ubyte"),
        )
    }

    fn message(r: Result<ImageDataset>) -> String {
        error_text(r.err())
    }

    #[test]
    fn malformed_files_get_errors_naming_the_file() -> TestResult {
        let images = idx_images(2, 0);
        let labels = idx_labels(&[1, 2]);
        decode(&images, &labels)?;

        let mut truncated = images.clone();
        truncated.truncate(images.len() - 1);
        let err = decode(&truncated, &labels).err();
        assert_matches!(
            &err,
            Some(DataError::Truncated {
                needed: 1568,
                available: 1567,
                ..
            })
        );
        assert!(message(decode(&truncated, &labels)).contains("imgs-idx3-ubyte"));
        assert!(message(decode(&images[..10], &labels)).contains("header"));
        assert!(message(decode(&images[..2], &labels)).contains("magic number"));

        // Images and labels swapped: the magic number says which is which.
        assert_mentions(
            &message(decode(&labels, &images)),
            &["imgs-idx3-ubyte", "0x00000801", "images file"],
        );
        let mut bad_magic = images.clone();
        bad_magic[0] = 0x50; // e.g. a PNG or text file
        assert!(message(decode(&bad_magic, &labels)).contains("not an IDX file"));
        let mut bad_type = images.clone();
        bad_type[2] = 0x0d; // float
        assert!(message(decode(&bad_type, &labels)).contains("element type 0x0d"));

        let mut bad_dims = images.clone();
        bad_dims[11] = 32; // 32 rows
        assert!(message(decode(&bad_dims, &labels)).contains("32x28"));

        // A huge N is refused by length, before anything is allocated for it.
        let mut huge = images.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = decode(&huge, &labels).err();
        assert_matches!(
            &err,
            Some(DataError::Truncated { needed, .. }) if *needed == u64::from(u32::MAX) * 784
        );

        let mut trailing = images.clone();
        trailing.push(0);
        assert!(message(decode(&trailing, &labels)).contains("1 bytes after"));

        let err = decode(&images, &idx_labels(&[1, 2, 3])).err();
        assert_matches!(
            &err,
            Some(DataError::CountMismatch {
                images: 2,
                labels: 3,
                ..
            })
        );
        let err = decode(&images, &idx_labels(&[1, 10])).err();
        assert_matches!(
            &err,
            Some(DataError::LabelOutOfRange { record: 1, label: 10, file, .. })
                if file == Path::new("lbls-idx1-ubyte")
        );

        let gz = gzip(&images)?;
        assert_mentions(
            &message(decode(&gz[..gz.len() / 2], &labels)),
            &["imgs-idx3-ubyte", "gzip"],
        );
        Ok(())
    }

    #[test]
    fn corrupt_file_on_disk_names_its_path() -> TestResult {
        let dir = tempfile::tempdir()?;
        write_mnist(dir.path(), false)?;
        let bad = dir.path().join(TRAIN_FILES[1]);
        std::fs::write(&bad, idx_labels(&[1, 2]))?;
        let err = load_mnist(dir.path()).err();
        assert_matches!(
            &err,
            Some(DataError::CountMismatch { labels_file, images: 3, labels: 2, .. })
                if *labels_file == bad
        );
        Ok(())
    }

    /// Fuzz-style: truncations, byte flips and random bytes derived from valid files
    /// (plain and gzipped) give `Ok` or `Err`, never a panic.
    #[test]
    fn random_corruptions_never_panic() -> TestResult {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        let images = idx_images(3, 0);
        let labels = idx_labels(&[1, 2, 3]);
        let gz_images = gzip(&images)?;
        let gz_labels = gzip(&labels)?;
        let (mut ok, mut err) = (0, 0);
        for round in 0..400 {
            let (base_i, base_l) = if round % 2 == 0 {
                (&images, &labels)
            } else {
                (&gz_images, &gz_labels)
            };
            let mut i = base_i.clone();
            let mut l = base_l.clone();
            let target = if rng.gen_bool(0.5) { &mut i } else { &mut l };
            match rng.gen_range(0..4) {
                0 => {
                    let n = rng.gen_range(0..=target.len());
                    target.truncate(n);
                }
                1 => {
                    for _ in 0..rng.gen_range(1..4) {
                        let at = rng.gen_range(0..target.len());
                        target[at] = rng.gen();
                    }
                }
                2 => {
                    // Corrupt the header, where lengths live.
                    let at = rng.gen_range(0..target.len().min(16));
                    target[at] = rng.gen();
                }
                _ => {
                    let n = rng.gen_range(0..64);
                    *target = (0..n).map(|_| rng.gen()).collect();
                }
            }
            match decode(&i, &l) {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
        }
        assert!(err > 100, "{ok} ok, {err} errors");
        Ok(())
    }
}
