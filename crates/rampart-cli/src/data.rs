//! `rampart data`: fetch a data set's official files (`download`), or write a decoded
//! split for another pipeline (`export`).
//!
//! `export` writes exactly the pixels Rampart trains and evaluates on, in its order:
//! `images`, uint8 (N, C, H, W), and `labels`, int64 (N,), as safetensors or as a
//! NumPy `.npz` (a zip of stored `.npy` files, written here after the `.npy` format
//! description of NumPy's `numpy.lib.format`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use rampart_data::{DatasetKind, ImageDataset};

use crate::common::{load_data, DataDir, DataSource, DOWNLOAD_HINT};

/// `rampart data …`.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Download a data set's official files and verify their checksums. Built without
    /// the `download` feature (the default), or offline, prints which file to place
    /// where (URL, checksum, path) and exits with an error.
    Download(DownloadArgs),
    /// Write a decoded split (images uint8 N×C×H×W, labels int64, in Rampart's order)
    /// as .safetensors or NumPy .npz, to share the exact pixels with another pipeline.
    Export(ExportArgs),
}

impl DataCommand {
    /// Runs the command; `data_fallback` is the folder when none is named.
    pub fn run(&self, data_fallback: Option<DataDir>) -> Result<()> {
        match self {
            DataCommand::Download(args) => args.run(data_fallback),
            DataCommand::Export(args) => {
                let (path, n) = args.run(data_fallback)?;
                println!("{n} examples written to {}", path.display());
                Ok(())
            }
        }
    }
}

/// Flags of `rampart data download`.
#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// The data set: cifar10, cifar100, mnist or svhn.
    name: String,
    /// Folder to place the files in [default: $RAMPART_DATA_DIR, else the per-user
    /// cache folder (~/.cache/rampart/data) that commands use without --data-dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl DownloadArgs {
    fn run(&self, data_fallback: Option<DataDir>) -> Result<()> {
        let kind: DatasetKind = self.name.parse()?;
        let dir = DataDir::resolve(self.dir.clone(), data_fallback)?;
        if cfg!(feature = "download") {
            let paths = rampart_data::download(kind, &dir.path).with_context(|| {
                format!(
                    "cannot download {}\n{}",
                    kind.title(),
                    placement(kind, &dir.path)
                )
            })?;
            for p in &paths {
                println!("verified {}", p.display());
            }
            println!("{}", use_hint(kind, &dir));
            return Ok(());
        }
        let missing: Vec<_> = kind
            .official_files()
            .iter()
            .filter(|f| rampart_data::verify_file(&dir.path.join(f.name), f.checksum).is_err())
            .collect();
        if missing.is_empty() {
            println!(
                "every official file of {} is already in {} and verified",
                kind.title(),
                dir.path.display()
            );
            println!("{}", use_hint(kind, &dir));
            return Ok(());
        }
        bail!(
            "cannot download {}{DOWNLOAD_HINT}\n{}",
            kind.title(),
            placement(kind, &dir.path)
        )
    }
}

/// What to place where, file by file, for `kind` in `dir`: URL, checksum, path, and
/// whether it is there already.
pub fn placement(kind: DatasetKind, dir: &Path) -> String {
    let mut text = format!(
        "{} needs these files in {} (fetch each URL, check its digest, place it at the path):",
        kind.title(),
        dir.display()
    );
    for f in kind.official_files() {
        let dest = dir.join(f.name);
        let state = match rampart_data::verify_file(&dest, f.checksum) {
            Ok(()) => "present and verified",
            Err(_) if dest.exists() => "present but its checksum differs: replace it",
            Err(_) => "missing",
        };
        text += &format!(
            "\n  {}\n    url:      {}\n    {:<9} {}\n    status:   {state}",
            dest.display(),
            f.url,
            format!("{}:", f.checksum.algorithm()),
            f.checksum.hex(),
        );
    }
    if let Some(layout) = kind.cifar_layout() {
        text += &format!(
            "\n  (or the archive extracted there: {}/)",
            dir.join(layout.binary_folder).display()
        );
    }
    text += "\nSee datasets/README.md for the other layouts the loader accepts.";
    text
}

/// How to use a filled folder.
fn use_hint(kind: DatasetKind, dir: &DataDir) -> String {
    match dir.source {
        DataSource::Cache => {
            format!("rampart train/eval/attack --dataset {kind} find it without --data-dir")
        }
        DataSource::Env => {
            format!("rampart train/eval/attack --dataset {kind} find it through $RAMPART_DATA_DIR")
        }
        DataSource::Flag => format!(
            "use it with --dataset {kind} --data-dir {}",
            crate::common::shell_quote(&dir.path.display().to_string())
        ),
    }
}

/// Which split to export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Split {
    /// The training split.
    Train,
    /// The test split.
    Test,
}

/// Flags of `rampart data export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The data set: cifar10, cifar100, mnist or svhn.
    #[arg(long)]
    dataset: String,
    /// Which split.
    #[arg(long, value_enum)]
    split: Split,
    /// Folder holding the data set; defaults to $RAMPART_DATA_DIR, else the per-user
    /// cache folder (~/.cache/rampart/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Output file: NAME.safetensors (tensors `images` u8 and `labels` i64, the class
    /// names in the metadata) or NAME.npz (`images.npy`, `labels.npy`), read by
    /// `safetensors.numpy.load_file` or `numpy.load`.
    #[arg(long)]
    out: PathBuf,
}

/// The file formats `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Safetensors,
    Npz,
}

impl ExportArgs {
    /// Writes the split; returns the file and the number of examples.
    fn run(&self, data_fallback: Option<DataDir>) -> Result<(PathBuf, usize)> {
        let kind: DatasetKind = self.dataset.parse().context("--dataset")?;
        let format = match self.out.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("safetensors") => Format::Safetensors,
            Some(e) if e.eq_ignore_ascii_case("npz") => Format::Npz,
            _ => bail!(
                "--out {}: the file name must end in .safetensors or .npz",
                self.out.display()
            ),
        };
        let dir = DataDir::resolve(self.data_dir.clone(), data_fallback)?;
        let splits = load_data(kind, &dir)?;
        let data = match self.split {
            Split::Train => splits.train,
            Split::Test => splits.test,
        };
        let bytes = match format {
            Format::Safetensors => safetensors_bytes(kind, self.split, &data)?,
            Format::Npz => npz_bytes(&data)?,
        };
        if let Some(parent) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        rampart_fs::write_atomic(&self.out, &bytes)?;
        Ok((self.out.clone(), data.len()))
    }
}

/// The dimensions (N, C, H, W) of a data set's images.
fn image_dims(data: &ImageDataset) -> [usize; 4] {
    let (c, h, w) = data.shape();
    [data.len(), c, h, w]
}

/// Labels as little-endian int64 bytes.
fn label_bytes(data: &ImageDataset) -> Vec<u8> {
    data.labels()
        .iter()
        .flat_map(|&l| i64::from(l).to_le_bytes())
        .collect()
}

/// A safetensors file of `images` (U8) and `labels` (I64), with the data set, split
/// and class names (a JSON list) in the metadata.
fn safetensors_bytes(kind: DatasetKind, split: Split, data: &ImageDataset) -> Result<Vec<u8>> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let labels = label_bytes(data);
    let images = TensorView::new(Dtype::U8, image_dims(data).to_vec(), data.images())?;
    let labels = TensorView::new(Dtype::I64, vec![data.len()], &labels)?;
    let metadata = HashMap::from([
        ("dataset".to_string(), kind.to_string()),
        (
            "split".to_string(),
            format!("{split:?}").to_ascii_lowercase(),
        ),
        (
            "class_names".to_string(),
            serde_json::to_string(data.class_names())?,
        ),
        (
            "layout".to_string(),
            "images: (N, C, H, W) uint8".to_string(),
        ),
    ]);
    Ok(safetensors::serialize(
        [("images", images), ("labels", labels)],
        Some(metadata),
    )?)
}

/// A `.npz`: a zip of `images.npy` and `labels.npy`, stored uncompressed.
fn npz_bytes(data: &ImageDataset) -> Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(data.images().len() >= u32::MAX as usize);
    zip.start_file("images.npy", options)?;
    zip.write_all(&npy_header("|u1", &image_dims(data)))?;
    zip.write_all(data.images())?;
    zip.start_file("labels.npy", options)?;
    zip.write_all(&npy_header("<i8", &[data.len()]))?;
    zip.write_all(&label_bytes(data))?;
    Ok(zip.finish()?.into_inner())
}

/// The header of a version 1.0 `.npy` file of a C-order array: the magic `\x93NUMPY`,
/// version 1.0, the header length (u16, little-endian), then the dictionary literal
/// padded with spaces and ended by a newline so the data start at a multiple of 64.
pub fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("{one},"),
        _ => shape
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((dict.len() as u16).to_le_bytes());
    out.extend(dict.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_headers_follow_the_format() {
        // The dictionary as numpy.lib.format writes it for a (2, 1, 28, 28) uint8 array:
        // keys sorted, a trailing ", ", spaces up to a multiple of 64, then a newline.
        let h = npy_header("|u1", &[2, 1, 28, 28]);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(usize::from(u16::from_le_bytes([h[8], h[9]])), h.len() - 10);
        let dict = std::str::from_utf8(&h[10..]).unwrap_or_default();
        assert!(
            dict.starts_with("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 1, 28, 28), }")
                && dict.ends_with(" \n"),
            "{dict:?}"
        );
        let h = npy_header("<i8", &[5]);
        assert!(std::str::from_utf8(&h[10..])
            .unwrap_or_default()
            .contains("'shape': (5,)"));
    }
}
