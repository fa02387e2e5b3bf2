//! Writers of small files in the real formats, for the tests.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::kind::DatasetKind;

pub type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// One CIFAR binary record: label byte(s) then 3,072 pixels `(7·index + p) % 251`.
/// CIFAR-100 records carry coarse label `index % 20` before the fine `label`.
pub fn record(kind: DatasetKind, index: usize, label: u8) -> Vec<u8> {
    let mut r = match kind {
        DatasetKind::Cifar10 => vec![label],
        DatasetKind::Cifar100 => vec![(index % 20) as u8, label],
    };
    r.extend((0..3072).map(|p| ((7 * index + p) % 251) as u8));
    r
}

/// Label of record `index` of a test file: `index % 10` for CIFAR-10, `97 + index % 3`
/// (fine) for CIFAR-100.
fn label(kind: DatasetKind, index: usize) -> u8 {
    match kind {
        DatasetKind::Cifar10 => (index % 10) as u8,
        DatasetKind::Cifar100 => (97 + index % 3) as u8,
    }
}

/// (member path, bytes) of every batch file, `per_file` records each; train records
/// are numbered across files, test records from 0.
fn batch_files(kind: DatasetKind, per_file: usize) -> Vec<(String, Vec<u8>)> {
    let folder = kind.binary_folder_name();
    let mut files = Vec::new();
    for (b, name) in kind.train_files().iter().enumerate() {
        let bytes = (0..per_file)
            .flat_map(|r| {
                let g = b * per_file + r;
                record(kind, g, label(kind, g))
            })
            .collect();
        files.push((format!("{folder}/{name}"), bytes));
    }
    let test = (0..per_file)
        .flat_map(|r| record(kind, r, label(kind, r)))
        .collect();
    files.push((format!("{folder}/{}", kind.test_file()), test));
    files
}

/// Writes the extracted official folder under `dir`; returns its path.
pub fn write_cifar_folder(
    kind: DatasetKind,
    dir: &Path,
    per_file: usize,
) -> std::io::Result<PathBuf> {
    for (member, bytes) in batch_files(kind, per_file) {
        let path = dir.join(member);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    Ok(dir.join(kind.binary_folder_name()))
}

/// Writes the official archive (with a `batches.meta.txt`-like extra member) under `dir`.
pub fn write_cifar_tarball(
    kind: DatasetKind,
    dir: &Path,
    per_file: usize,
) -> std::io::Result<PathBuf> {
    let mut members = vec![(
        format!("{}/readme.html", kind.binary_folder_name()),
        b"<html/>".to_vec(),
    )];
    members.extend(batch_files(kind, per_file));
    let path = dir.join(kind.archive_name());
    write_tar_gz(&path, &members)?;
    Ok(path)
}

/// Writes a gzip-compressed tar of regular files.
pub fn write_tar_gz(path: &Path, members: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let gz = GzEncoder::new(std::fs::File::create(path)?, Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes.as_slice())?;
    }
    tar.into_inner()?.finish()?.flush()
}

/// Pixels of a test image.
#[derive(Clone, Debug)]
enum Pixels {
    /// Smooth RGB pattern seeded by the file's path.
    Rgb,
    /// Uniform grey level.
    Gray(u8),
    /// Uniform RGBA colour.
    Rgba([u8; 4]),
}

/// An image file to write at `split/class/name` (format from the extension).
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub split: &'static str,
    pub class: String,
    pub name: String,
    width: u32,
    height: u32,
    pixels: Pixels,
}

impl ImageSpec {
    fn new(
        split: &'static str,
        class: &str,
        name: &str,
        width: u32,
        height: u32,
        pixels: Pixels,
    ) -> Self {
        Self {
            split,
            class: class.into(),
            name: name.into(),
            width,
            height,
            pixels,
        }
    }

    /// A smooth RGB image whose colours depend on its path.
    pub fn rgb(split: &'static str, class: &str, name: &str, width: u32, height: u32) -> Self {
        Self::new(split, class, name, width, height, Pixels::Rgb)
    }

    /// A uniform 8-bit grayscale image.
    pub fn gray(
        split: &'static str,
        class: &str,
        name: &str,
        width: u32,
        height: u32,
        level: u8,
    ) -> Self {
        Self::new(split, class, name, width, height, Pixels::Gray(level))
    }

    /// A uniform RGBA image.
    pub fn rgba(
        split: &'static str,
        class: &str,
        name: &str,
        width: u32,
        height: u32,
        rgba: [u8; 4],
    ) -> Self {
        Self::new(split, class, name, width, height, Pixels::Rgba(rgba))
    }

    /// `split/class/name`.
    pub fn rel(&self) -> PathBuf {
        Path::new(self.split).join(&self.class).join(&self.name)
    }

    fn seed(&self) -> u32 {
        self.rel()
            .to_string_lossy()
            .bytes()
            .map(u32::from)
            .sum::<u32>()
            % 97
    }

    /// Interleaved RGB bytes, H×W×3.
    fn rgb_bytes(&self) -> Vec<u8> {
        let s = self.seed();
        let mut v = Vec::new();
        for y in 0..self.height {
            for x in 0..self.width {
                v.extend([
                    (s + 6 * x) as u8,
                    (s + 20 + 5 * y) as u8,
                    (s + 40 + 2 * x + 2 * y) as u8,
                ]);
            }
        }
        v
    }

    /// The expected decoded image as RGB C×H×W bytes (exact for lossless formats).
    pub fn chw(&self) -> Vec<u8> {
        let hwc = self.rgb_bytes();
        (0..3)
            .flat_map(|c| hwc.iter().skip(c).step_by(3).copied().collect::<Vec<_>>())
            .collect()
    }

    fn write(&self, root: &Path) -> image::ImageResult<()> {
        let path = root.join(self.rel());
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let (w, h) = (self.width, self.height);
        let n = (w * h) as usize;
        match &self.pixels {
            Pixels::Rgb => image::save_buffer(
                &path,
                &self.rgb_bytes(),
                w,
                h,
                image::ExtendedColorType::Rgb8,
            ),
            Pixels::Gray(l) => {
                image::save_buffer(&path, &vec![*l; n], w, h, image::ExtendedColorType::L8)
            }
            Pixels::Rgba(c) => {
                let bytes: Vec<u8> = c.iter().copied().cycle().take(4 * n).collect();
                image::save_buffer(&path, &bytes, w, h, image::ExtendedColorType::Rgba8)
            }
        }
    }
}

/// Writes every spec under `root`.
pub fn write_image_folder(root: &Path, specs: &[ImageSpec]) -> image::ImageResult<()> {
    specs.iter().try_for_each(|s| s.write(root))
}
