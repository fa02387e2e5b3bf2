//! The crate's error type: every variant says which file (or value) is at fault and why.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, DataError>;

/// Everything that can go wrong while finding, reading, checking or batching data.
///
/// File-related variants carry the path of the offending file. A file inside an
/// archive is named `ARCHIVE!/MEMBER`, e.g. `data/cifar-10-binary.tar.gz!/cifar-10-batches-bin/test_batch.bin`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A binary batch file whose length is not a whole, non-zero number of records.
    #[error(
        "{}: truncated record: {len} bytes is not a whole, non-zero number of {record_size}-byte records",
        .file.display()
    )]
    TruncatedRecord {
        /// The batch file.
        file: PathBuf,
        /// Its length in bytes.
        len: u64,
        /// The size of one record (label bytes + 3,072 pixel bytes).
        record_size: usize,
    },

    /// A record (or image-folder entry) whose label is not below the number of classes.
    #[error(
        "{}: record {record} has label {label}, out of range for {num_classes} classes",
        .file.display()
    )]
    LabelOutOfRange {
        /// The batch file.
        file: PathBuf,
        /// Index of the record inside the file.
        record: usize,
        /// The label read.
        label: u32,
        /// The number of classes of the data set.
        num_classes: usize,
    },

    /// An image whose width × height differs from the first image of the set.
    #[error(
        "{}: wrong image size: {}x{} (width x height), expected {}x{} like the first image of the set",
        .file.display(), .found.0, .found.1, .expected.0, .expected.1
    )]
    WrongImageSize {
        /// The image file.
        file: PathBuf,
        /// (width, height) that every image must have.
        expected: (u32, u32),
        /// (width, height) of this file.
        found: (u32, u32),
    },

    /// An image file that could not be decoded.
    #[error("{}: unreadable or corrupt image: {source}", .file.display())]
    Image {
        /// The image file.
        file: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },

    /// A file shorter than its own header or length fields say it must be.
    #[error(
        "{}: truncated {format} file: {what} needs {needed} bytes but only {available} remain",
        .file.display()
    )]
    Truncated {
        /// The file (a gzipped file is named as is; lengths count decompressed bytes).
        file: PathBuf,
        /// The file format, e.g. `"IDX"` or `"MAT v5"`.
        format: &'static str,
        /// The part being read, e.g. `"image data (10 images of 28x28)"`.
        what: String,
        /// Bytes that part needs.
        needed: u64,
        /// Bytes left in the file from where that part starts.
        available: u64,
    },

    /// A file that is not a valid file of its format, or not the data set expected in it
    /// (wrong magic number, wrong dimensions, missing variable, bad value).
    #[error("{}: malformed {format} file: {problem}", .file.display())]
    Malformed {
        /// The file at fault.
        file: PathBuf,
        /// The file format, e.g. `"IDX"` or `"MAT v5"`.
        format: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// An images file and a labels file (or variable) that disagree on the number of examples.
    #[error(
        "{} holds {images} images but {} holds {labels} labels; the two must come from the same split",
        .images_file.display(), .labels_file.display()
    )]
    CountMismatch {
        /// The file holding the images.
        images_file: PathBuf,
        /// Number of images it holds.
        images: usize,
        /// The file holding the labels (the same file for SVHN's `.mat`).
        labels_file: PathBuf,
        /// Number of labels it holds.
        labels: usize,
    },

    /// Expected data is not where it was looked for; `help` says what to place where.
    #[error("missing data at {}: {help}", .path.display())]
    Missing {
        /// The file or folder that was looked for (or searched).
        path: PathBuf,
        /// Which files may be placed where, which `--data-dir` to pass, where to download.
        help: String,
    },

    /// A folder of images that does not have the expected `{train,test}/{class}/` layout.
    #[error("{}: bad image-folder layout: {problem}", .path.display())]
    Layout {
        /// The folder (or archive) at fault.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// A file whose digest differs from the published one.
    #[error(
        "{}: {algorithm} checksum mismatch: expected {expected}, got {actual} (the file is corrupt or incomplete: delete it and download it again)",
        .file.display()
    )]
    Checksum {
        /// The file checked.
        file: PathBuf,
        /// `"sha256"` or `"md5"`.
        algorithm: &'static str,
        /// The published digest, lowercase hex.
        expected: String,
        /// The digest of the file, lowercase hex.
        actual: String,
    },

    /// A file checked against a data set's published digests whose name is none of that
    /// data set's official files, so no digest applies.
    #[error(
        "{}: not one of the official {dataset} files ({names}), so no published checksum applies",
        .file.display()
    )]
    NotOfficial {
        /// The file to check.
        file: PathBuf,
        /// The data set's title, e.g. `"MNIST"`.
        dataset: &'static str,
        /// The official file names, comma-separated.
        names: String,
    },

    /// A download that could not be done (no network, HTTP error, feature disabled).
    #[error("could not download {url} to {}: {reason}. {help}", .file.display())]
    Download {
        /// The URL fetched.
        url: String,
        /// The file it was to be saved as.
        file: PathBuf,
        /// What failed.
        reason: String,
        /// How to place the file by hand.
        help: String,
    },

    /// A filesystem error on a named file.
    #[error("{}: {source}", .file.display())]
    Io {
        /// The file or folder being read or written.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Image and label buffers that do not describe a valid data set.
    #[error("invalid dataset: {0}")]
    InvalidDataset(String),

    /// An example index past the end of a data set.
    #[error("example index {index} out of range for a dataset of {len} examples")]
    IndexOutOfRange {
        /// The index asked for.
        index: usize,
        /// The number of examples.
        len: usize,
    },

    /// A loader configuration that cannot be run (e.g. batch size 0).
    #[error("invalid loader config: {0}")]
    InvalidConfig(String),

    /// The loader's background thread could not start or died mid-epoch.
    #[error("loader background thread failed: {0}")]
    LoaderThread(String),

    /// A data-set name that is none of `cifar10`, `cifar100`, `mnist`, `svhn`.
    #[error("unknown dataset `{0}`: expected `cifar10`, `cifar100`, `mnist` or `svhn`")]
    UnknownDataset(String),

    /// An error from candle while building tensors.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    /// An [`DataError::Io`] for `file`.
    pub(crate) fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            file: file.into(),
            source,
        }
    }
}

/// Name of a member inside an archive, as used in error messages: `ARCHIVE!/MEMBER`.
pub(crate) fn member_path(archive: &std::path::Path, member: &str) -> PathBuf {
    PathBuf::from(format!("{}!/{}", archive.display(), member))
}
