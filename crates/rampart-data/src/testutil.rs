//! Writers of small files in the real formats, for the tests.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::kind::{CifarLayout, DatasetKind};

pub type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Asserts that `value` matches `pattern` (with an optional `if` guard), printing
/// `value` when it does not.
macro_rules! assert_matches {
    ($value:expr, $pattern:pat $(if $guard:expr)? $(,)?) => {{
        let value = $value;
        assert!(matches!(value, $pattern $(if $guard)?), "{value:?}");
    }};
}
pub(crate) use assert_matches;

/// The text of the error `err`; empty when there is none.
pub fn error_text<E: std::fmt::Display>(err: Option<E>) -> String {
    err.map(|e| e.to_string()).unwrap_or_default()
}

/// Asserts that the message `msg` contains every one of `needles`.
#[track_caller]
pub fn assert_mentions(msg: &str, needles: &[&str]) {
    for needle in needles {
        assert!(msg.contains(needle), "message lacks {needle}: {msg}");
    }
}

/// One CIFAR binary record: label byte(s) then 3,072 pixels `(7·index + p) % 251`.
/// CIFAR-100 records carry coarse label `index % 20` before the fine `label`.
pub fn record(kind: DatasetKind, index: usize, label: u8) -> Vec<u8> {
    let mut r = match kind {
        DatasetKind::Cifar10 => vec![label],
        DatasetKind::Cifar100 => vec![(index % 20) as u8, label],
        DatasetKind::Mnist | DatasetKind::Svhn => panic!("{kind} has no CIFAR records"),
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
        DatasetKind::Mnist | DatasetKind::Svhn => panic!("{kind} has no CIFAR records"),
    }
}

/// The CIFAR layout of `kind`, which the CIFAR writers below are only called with.
fn layout(kind: DatasetKind) -> &'static CifarLayout {
    kind.cifar_layout()
        .unwrap_or_else(|| panic!("{kind} is not CIFAR"))
}

/// (member path, bytes) of every batch file, `per_file` records each; train records
/// are numbered across files, test records from 0.
fn batch_files(kind: DatasetKind, per_file: usize) -> Vec<(String, Vec<u8>)> {
    let layout = layout(kind);
    let folder = layout.binary_folder;
    let mut files = Vec::new();
    for (b, name) in layout.train_files.iter().enumerate() {
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
    files.push((format!("{folder}/{}", layout.test_file), test));
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
    Ok(dir.join(layout(kind).binary_folder))
}

/// Writes the official archive (with a `batches.meta.txt`-like extra member) under `dir`.
pub fn write_cifar_tarball(
    kind: DatasetKind,
    dir: &Path,
    per_file: usize,
) -> std::io::Result<PathBuf> {
    let mut members = vec![(
        format!("{}/readme.html", layout(kind).binary_folder),
        b"<html/>".to_vec(),
    )];
    members.extend(batch_files(kind, per_file));
    let path = dir.join(layout(kind).archive.name);
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

/// A gzipped tar with one member `name` whose header claims `claimed` bytes but which
/// holds only `data` before the archive ends.
pub fn tar_gz_claiming(name: &str, claimed: u64, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut header = tar::Header::new_gnu();
    header.set_path(name)?;
    header.set_size(claimed);
    header.set_mode(0o644);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(data);
    gzip(&tar)
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

/// `bytes` gzip-compressed, as the official MNIST files are.
pub fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(bytes)?;
    gz.finish()
}

/// Pixel (row `r`, column `c`) of test MNIST image `i`; differs when r and c swap.
pub fn mnist_pixel(i: usize, r: usize, c: usize) -> u8 {
    ((31 * i + 5 * r + 11 * c) % 256) as u8
}

/// An IDX images file (magic 0x00000803, big-endian dims N×28×28) of `n` images,
/// image k holding `mnist_pixel(first + k, r, c)` row-major.
pub fn idx_images(n: usize, first: usize) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, 3];
    for d in [n as u32, 28, 28] {
        v.extend(d.to_be_bytes());
    }
    for i in first..first + n {
        for r in 0..28 {
            v.extend((0..28).map(|c| mnist_pixel(i, r, c)));
        }
    }
    v
}

/// An IDX labels file (magic 0x00000801, big-endian dim N) holding `labels`.
pub fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, 1];
    v.extend((labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

/// Byte order of a test MAT-file.
#[derive(Clone, Copy, Debug)]
pub enum MatEndian {
    /// Indicator bytes `IM`, as written on x86.
    Little,
    /// Indicator bytes `MI`.
    Big,
}

/// The real part of a test MAT variable, with the storage type it is written as.
#[derive(Clone, Debug)]
pub enum MatValues {
    /// miUINT8 (2).
    U8(Vec<u8>),
    /// miUINT16 (4).
    U16(Vec<u16>),
    /// miINT32 (5).
    I32(Vec<i32>),
    /// miDOUBLE (9).
    F64(Vec<f64>),
}

/// A variable of a test MAT-file: name, MATLAB class code (6 double, 9 uint8, 4 char, …),
/// dimensions and column-major values. The class and the storage type may differ, as
/// MATLAB writes them (a double holding small integers stored as miUINT8).
#[derive(Clone, Debug)]
pub struct MatVar {
    name: String,
    class: u8,
    dims: Vec<u32>,
    values: MatValues,
}

impl MatVar {
    pub fn new(name: &str, class: u8, dims: Vec<u32>, values: MatValues) -> Self {
        Self {
            name: name.into(),
            class,
            dims,
            values,
        }
    }
}

/// A tiny MATLAB level-5 MAT-file writer, after MathWorks' "MAT-File Format" (level 5):
/// a 128-byte header (116 bytes of text, 8 bytes of subsystem offset, version 0x0100,
/// the endianness indicator 'MI' written as a u16 so little-endian files hold `IM`),
/// then one `miMATRIX` (14) element per variable holding array flags (miUINT32: class
/// code in the low byte), dimensions (miINT32), the name (miINT8, in the small data
/// element format when it is at most 4 bytes, as MATLAB does) and the real part, every
/// element padded to 8 bytes. With `compressed`, each `miMATRIX` element is wrapped
/// in an unpadded `miCOMPRESSED` (15) element holding its zlib stream, as `save -v7` does.
pub fn mat_v5(vars: &[MatVar], endian: MatEndian, compressed: bool) -> std::io::Result<Vec<u8>> {
    let u16b = |v: u16| match endian {
        MatEndian::Little => v.to_le_bytes(),
        MatEndian::Big => v.to_be_bytes(),
    };
    let mut out = b"MATLAB 5.0 MAT-file, Platform: test, written by rampart-data's tests".to_vec();
    out.resize(116, b' ');
    out.extend([0u8; 8]);
    out.extend(u16b(0x0100));
    out.extend(u16b(u16::from_be_bytes(*b"MI")));
    for var in vars {
        let matrix = mat_matrix(var, endian);
        if compressed {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
            z.write_all(&matrix)?;
            let z = z.finish()?;
            out.extend(mat_u32(15, endian));
            out.extend(mat_u32(z.len() as u32, endian));
            out.extend(z);
        } else {
            out.extend(matrix);
        }
    }
    Ok(out)
}

fn mat_u32(v: u32, endian: MatEndian) -> [u8; 4] {
    match endian {
        MatEndian::Little => v.to_le_bytes(),
        MatEndian::Big => v.to_be_bytes(),
    }
}

/// A normal data element: tag (type, byte count), data, zero padding to 8 bytes.
fn mat_element(data_type: u32, data: &[u8], endian: MatEndian) -> Vec<u8> {
    let mut v = mat_u32(data_type, endian).to_vec();
    v.extend(mat_u32(data.len() as u32, endian));
    v.extend_from_slice(data);
    v.resize(v.len().next_multiple_of(8), 0);
    v
}

/// The `miMATRIX` element of one variable.
fn mat_matrix(var: &MatVar, endian: MatEndian) -> Vec<u8> {
    let mut flags = mat_u32(u32::from(var.class), endian).to_vec();
    flags.extend([0; 4]);
    let mut body = mat_element(6, &flags, endian);
    let dims: Vec<u8> = var.dims.iter().flat_map(|&d| mat_u32(d, endian)).collect();
    body.extend(mat_element(5, &dims, endian));
    let name = var.name.as_bytes();
    if name.len() <= 4 {
        // Small data element: byte count in the upper 16 bits, type in the lower.
        body.extend(mat_u32(((name.len() as u32) << 16) | 1, endian));
        body.extend_from_slice(name);
        body.resize(body.len().next_multiple_of(8), 0);
    } else {
        body.extend(mat_element(1, name, endian));
    }
    let big = matches!(endian, MatEndian::Big);
    let (data_type, data): (u32, Vec<u8>) = match &var.values {
        MatValues::U8(v) => (2, v.clone()),
        MatValues::U16(v) => (4, mat_bytes(v, big, u16::to_be_bytes, u16::to_le_bytes)),
        MatValues::I32(v) => (5, mat_bytes(v, big, i32::to_be_bytes, i32::to_le_bytes)),
        MatValues::F64(v) => (9, mat_bytes(v, big, f64::to_be_bytes, f64::to_le_bytes)),
    };
    body.extend(mat_element(data_type, &data, endian));
    let mut m = mat_u32(14, endian).to_vec();
    m.extend(mat_u32(body.len() as u32, endian));
    m.extend(body);
    m
}

/// The bytes of `values`, each encoded by `be` when `big`, else by `le`.
fn mat_bytes<T: Copy, const N: usize>(
    values: &[T],
    big: bool,
    be: fn(T) -> [u8; N],
    le: fn(T) -> [u8; N],
) -> Vec<u8> {
    let encode = if big { be } else { le };
    values.iter().flat_map(|&x| encode(x)).collect()
}

/// Pixel X(r, c, ch, n) of a test SVHN file; differs when r and c swap.
pub fn svhn_pixel(r: usize, c: usize, ch: usize, n: usize) -> u8 {
    ((7 * r + 3 * c + 50 * ch + 101 * n) % 256) as u8
}

/// An SVHN-like MAT-file: a char variable `__note`, then `X` uint8 32×32×3×N (stored as
/// 32×32×3 when N = 1, as MATLAB drops trailing singletons) with pixels `svhn_pixel`
/// in column-major order, then `y` class double N×1 holding `labels` (stored as
/// miUINT8 when `labels_as_u8`, else miDOUBLE).
pub fn svhn_mat(
    labels: &[u8],
    endian: MatEndian,
    compressed: bool,
    labels_as_u8: bool,
) -> std::io::Result<Vec<u8>> {
    let n = labels.len();
    let mut x = Vec::with_capacity(n * 3072);
    for img in 0..n {
        for ch in 0..3 {
            for c in 0..32 {
                for r in 0..32 {
                    x.push(svhn_pixel(r, c, ch, img));
                }
            }
        }
    }
    let dims = if n == 1 {
        vec![32, 32, 3]
    } else {
        vec![32, 32, 3, n as u32]
    };
    let y = if labels_as_u8 {
        MatValues::U8(labels.to_vec())
    } else {
        MatValues::F64(labels.iter().map(|&l| f64::from(l)).collect())
    };
    mat_v5(
        &[
            MatVar::new("__note", 4, vec![1, 2], MatValues::U16(vec![104, 105])),
            MatVar::new("X", 9, dims, MatValues::U8(x)),
            MatVar::new("y", 6, vec![n as u32, 1], y),
        ],
        endian,
        compressed,
    )
}
