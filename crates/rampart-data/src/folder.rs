//! Reader for folders of images laid out as `ROOT/{train,test}/{class}/*.{png,jpg,jpeg}`,
//! on disk or inside a `.tar.gz`.
//!
//! Class labels are the positions of the class folder names in byte-wise alphabetical
//! order (for CIFAR-10 this is the official label order). Every image must have the
//! same width and height; grayscale, RGBA and 16-bit images are converted to 8-bit RGB.
//! Decoding runs in parallel with rayon.
//!
//! **Example order.** Within a class, files are sorted by name, numbers compared by
//! value (`2.png` before `10.png`); classes are then interleaved round-robin (the first
//! file of every class, then the second of every class, …). With equally many images
//! per class, every prefix and suffix is therefore class-balanced: the last 1,000 test
//! images of CIFAR-10 are 100 per class. A class with fewer files simply drops out of
//! the rotation once it runs out.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use image::RgbImage;
use rayon::prelude::*;

use crate::archive::read_member;
use crate::dataset::{ImageDataset, Splits};
use crate::error::{member_path, DataError, Result};

/// The two split folder names.
const SPLITS: [&str; 2] = ["train", "test"];

/// Whether `name` has an image extension this reader decodes.
fn is_image_name(name: &str) -> bool {
    if name.starts_with('.') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    [".png", ".jpg", ".jpeg"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

/// Where an image's bytes are.
enum Source {
    /// A file on disk, read when decoded.
    File(PathBuf),
    /// An archive member already read; `shown` is `ARCHIVE!/MEMBER`.
    Memory { shown: PathBuf, bytes: Vec<u8> },
}

impl Source {
    fn shown(&self) -> &Path {
        match self {
            Self::File(p) => p,
            Self::Memory { shown, .. } => shown,
        }
    }

    fn decode(&self) -> Result<RgbImage> {
        let owned;
        let bytes: &[u8] = match self {
            Self::File(path) => {
                owned = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
                &owned
            }
            Self::Memory { bytes, .. } => bytes,
        };
        let image = image::load_from_memory(bytes).map_err(|source| DataError::Image {
            file: self.shown().to_path_buf(),
            source,
        })?;
        Ok(image.into_rgb8())
    }
}

/// One image file: its name (for ordering) and where its bytes are.
struct Item {
    name: String,
    source: Source,
}

/// Class folder name → its images, for one split.
type ClassFiles = BTreeMap<String, Vec<Item>>;

/// Loads `root/train` and `root/test` (see the module docs for layout and order).
pub fn load_image_folder(root: &Path) -> Result<Splits> {
    let (train, test) = scan_image_folder(root)?;
    let loaded = assemble(root, train, test)?;
    log_loaded(&loaded, root, "image folder");
    Ok(loaded)
}

/// Logs the sizes of the splits `loaded` from `source`, an image folder or archive
/// (`what`).
fn log_loaded(loaded: &Splits, source: &Path, what: &str) {
    tracing::info!(
        source = %source.display(),
        train = loaded.train.len(),
        test = loaded.test.len(),
        classes = loaded.train.num_classes(),
        "loaded {what}"
    );
}

/// The test split of the image folder `root`, as [`load_image_folder`] gives it (the
/// same checks of both splits' layout, labels and order), without decoding the
/// training images: what an evaluation needs, in a sixth of the time for CIFAR.
pub fn load_image_folder_test(root: &Path) -> Result<ImageDataset> {
    let (train, test) = scan_image_folder(root)?;
    let plan = Plan::new(root, train, test)?;
    let test = decode_split(plan.test, plan.size, &plan.class_names)?;
    tracing::info!(
        source = %root.display(),
        test = test.len(),
        classes = test.num_classes(),
        "loaded image folder (test split)"
    );
    Ok(test)
}

/// Lists `root/train` and `root/test`.
fn scan_image_folder(root: &Path) -> Result<(ClassFiles, ClassFiles)> {
    let scan = |split: &str| {
        let dir = root.join(split);
        if !dir.is_dir() {
            return Err(DataError::Missing {
                path: dir,
                help: format!(
                    "an image folder needs {0}/train/<class>/*.png|jpg|jpeg and {0}/test/<class>/*.png|jpg|jpeg",
                    root.display()
                ),
            });
        }
        scan_split_dir(&dir)
    };
    Ok((scan("train")?, scan("test")?))
}

/// Loads an image folder packed as a `.tar.gz`: members `PREFIX/{train,test}/{class}/FILE`
/// under one common `PREFIX` (e.g. `cifar10-jpeg`, or none); members elsewhere are skipped.
pub fn load_image_archive(archive: &Path) -> Result<Splits> {
    let file = File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let loaded = read_image_archive(BufReader::new(file), archive)?;
    log_loaded(&loaded, archive, "image archive");
    Ok(loaded)
}

/// Decodes an image folder packed as a `.tar.gz` held in memory, as
/// [`load_image_archive`] reads it from a file. `archive` only names the source in errors.
pub fn decode_image_archive(bytes: &[u8], archive: &Path) -> Result<Splits> {
    read_image_archive(bytes, archive)
}

/// Reads the gzipped tar stream `gz` of an image archive; `archive` names it in errors.
fn read_image_archive(gz: impl Read, archive: &Path) -> Result<Splits> {
    let mut tar = tar::Archive::new(GzDecoder::new(gz));
    let mut train = ClassFiles::new();
    let mut test = ClassFiles::new();
    let mut prefix: Option<PathBuf> = None;
    for entry in tar.entries().map_err(|e| DataError::io(archive, e))? {
        let mut entry = entry.map_err(|e| DataError::io(archive, e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry
            .path()
            .map_err(|e| DataError::io(archive, e))?
            .into_owned();
        let parts: Vec<&str> = member
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => s.to_str(),
                _ => None,
            })
            .collect();
        let [head @ .., split, class, name] = parts.as_slice() else {
            continue;
        };
        if !is_image_name(name) || class.starts_with('.') {
            continue;
        }
        let classes = match *split {
            "train" => &mut train,
            "test" => &mut test,
            _ => continue,
        };
        let here: PathBuf = head.iter().collect();
        match &prefix {
            None => prefix = Some(here),
            Some(p) if *p != here => {
                tracing::warn!(member = %member.display(), "skipping image outside the first image folder of the archive");
                continue;
            }
            Some(_) => {}
        }
        let shown = member_path(archive, &member.to_string_lossy());
        let bytes = read_member(&mut entry, &shown)?;
        classes.entry((*class).to_owned()).or_default().push(Item {
            name: (*name).to_owned(),
            source: Source::Memory { shown, bytes },
        });
    }
    for (split, classes) in SPLITS.iter().zip([&train, &test]) {
        if classes.is_empty() {
            return Err(DataError::Missing {
                path: archive.to_path_buf(),
                help: format!(
                    "the archive has no {split}/<class>/*.png|jpg|jpeg images; it must hold [PREFIX/]train/<class>/… and [PREFIX/]test/<class>/…"
                ),
            });
        }
    }
    assemble(archive, train, test)
}

/// Lists `dir/{class}/*.{png,jpg,jpeg}`.
fn scan_split_dir(dir: &Path) -> Result<ClassFiles> {
    let mut classes = ClassFiles::new();
    for (name, path, is_dir) in read_dir_entries(dir)? {
        if name.starts_with('.') || !is_dir {
            continue;
        }
        let items = read_dir_entries(&path)?
            .into_iter()
            .filter(|(file, _, is_dir)| !is_dir && is_image_name(file))
            .map(|(file, p, _)| Item {
                name: file,
                source: Source::File(p),
            })
            .collect();
        classes.insert(name, items);
    }
    Ok(classes)
}

/// (file name, path, is a directory) of the entries of `dir` whose names are valid
/// UTF-8. Symbolic links are followed.
fn read_dir_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        // The entry's own type needs no extra system call; only links are resolved.
        let kind = entry.file_type().map_err(|e| DataError::io(&path, e))?;
        let is_dir = if kind.is_symlink() {
            path.is_dir()
        } else {
            kind.is_dir()
        };
        out.push((name, path, is_dir));
    }
    Ok(out)
}

/// Checks the class lists, orders the files and decodes both splits.
fn assemble(root: &Path, train: ClassFiles, test: ClassFiles) -> Result<Splits> {
    let plan = Plan::new(root, train, test)?;
    Ok(Splits {
        train: decode_split(plan.train, plan.size, &plan.class_names)?,
        test: decode_split(plan.test, plan.size, &plan.class_names)?,
    })
}

/// Both splits checked and put in order, before decoding: the class names, the image
/// size (of the first training image) and each split's (label, file) list.
struct Plan {
    class_names: Vec<String>,
    size: (u32, u32),
    train: Vec<(u32, Item)>,
    test: Vec<(u32, Item)>,
}

impl Plan {
    fn new(root: &Path, train: ClassFiles, test: ClassFiles) -> Result<Plan> {
        let class_names: Vec<String> = train.keys().cloned().collect();
        let test_names: Vec<String> = test.keys().cloned().collect();
        if class_names.is_empty() {
            return Err(DataError::Layout {
                path: root.join("train"),
                problem: "no class folders".into(),
            });
        }
        if class_names != test_names {
            let only = |a: &ClassFiles, b: &ClassFiles| -> Vec<String> {
                a.keys().filter(|k| !b.contains_key(*k)).cloned().collect()
            };
            return Err(DataError::Layout {
            path: root.to_path_buf(),
            problem: format!(
                "train and test have different class folders: only in train {:?}, only in test {:?}",
                only(&train, &test),
                only(&test, &train)
            ),
        });
        }
        for (split, classes) in SPLITS.iter().zip([&train, &test]) {
            if let Some((class, _)) = classes.iter().find(|(_, items)| items.is_empty()) {
                return Err(DataError::Layout {
                    path: root.join(split).join(class),
                    problem: "class folder holds no .png, .jpg or .jpeg images".into(),
                });
            }
        }
        let train = interleave(train);
        let test = interleave(test);
        // The first training image fixes the size every other image must have.
        let Some((_, first)) = train.first() else {
            return Err(DataError::Layout {
                path: root.join("train"),
                problem: "no images".into(),
            });
        };
        let size = first.source.decode()?.dimensions();
        Ok(Plan {
            class_names,
            size,
            train,
            test,
        })
    }
}

/// Sorts each class's files by name (numbers by value) and interleaves classes
/// round-robin; returns (label, item) in that order.
fn interleave(classes: ClassFiles) -> Vec<(u32, Item)> {
    let mut queues: Vec<std::vec::IntoIter<Item>> = classes
        .into_values()
        .map(|mut items| {
            items.sort_by(|a, b| natural_cmp(&a.name, &b.name));
            items.into_iter()
        })
        .collect();
    let total = queues.iter().map(|q| q.len()).sum();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        for (label, queue) in queues.iter_mut().enumerate() {
            if let Some(item) = queue.next() {
                out.push((label as u32, item));
            }
        }
    }
    out
}

/// Decodes `items` in parallel into one C×H×W buffer; every image must be `size` = (w, h).
fn decode_split(
    items: Vec<(u32, Item)>,
    size: (u32, u32),
    class_names: &[String],
) -> Result<ImageDataset> {
    let (w, h) = (size.0 as usize, size.1 as usize);
    let image_len = 3 * h * w;
    let mut images = vec![0u8; items.len() * image_len];
    images
        .par_chunks_mut(image_len)
        .zip(items.par_iter())
        .try_for_each(|(out, (_, item))| {
            let rgb = item.source.decode()?;
            if rgb.dimensions() != size {
                return Err(DataError::WrongImageSize {
                    file: item.source.shown().to_path_buf(),
                    expected: size,
                    found: rgb.dimensions(),
                });
            }
            hwc_to_chw(rgb.as_raw(), out);
            Ok(())
        })?;
    let labels = items.iter().map(|(label, _)| *label).collect();
    ImageDataset::new(images, labels, (3, h, w), class_names.to_vec())
}

/// Interleaved RGB (H×W×3) to channel-major (3×H×W); both slices hold 3·H·W bytes.
fn hwc_to_chw(hwc: &[u8], chw: &mut [u8]) {
    let plane = chw.len() / 3;
    let (r, gb) = chw.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        r[i] = px[0];
        g[i] = px[1];
        b[i] = px[2];
    }
}

/// Compares names with runs of ASCII digits compared by numeric value
/// (`img2` < `img10`), everything else character by character.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                let (ta, tb) = (trim_zeros(na), trim_zeros(nb));
                let ord = ta
                    .len()
                    .cmp(&tb.len())
                    .then_with(|| ta.cmp(tb))
                    .then_with(|| na.len().cmp(&nb.len()));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        assert_matches, assert_mentions, error_text, write_image_folder, write_tar_gz, ImageSpec,
        TestResult,
    };

    #[test]
    fn natural_order_compares_numbers_by_value() {
        let mut names = vec![
            "10.png", "2.png", "1.png", "a10", "a9", "b", "002.png", "0002.png",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["1.png", "2.png", "002.png", "0002.png", "10.png", "a9", "a10", "b"]
        );
    }

    /// Three classes (alphabetically: ant, bee, cat) with 3/3/2 train and 1/1/1 test images.
    fn specs() -> Vec<ImageSpec> {
        let mut v = Vec::new();
        for (class, n) in [("cat", 2), ("ant", 3), ("bee", 3)] {
            // Numerically 9 < 10 < 11; as plain strings "10" < "11" < "9".
            for name in ["10", "9", "11"].into_iter().take(n) {
                v.push(ImageSpec::rgb("train", class, &format!("{name}.png"), 4, 3));
            }
            v.push(ImageSpec::rgb("test", class, "0.jpg", 4, 3));
        }
        v
    }

    fn check_loaded(s: &Splits) {
        assert_eq!(s.train.class_names(), &["ant", "bee", "cat"]);
        assert_eq!(s.train.shape(), (3, 3, 4));
        // Round-robin: ant, bee, cat, ant, bee, cat, ant, bee (cat ran out).
        assert_eq!(s.train.labels(), &[0, 1, 2, 0, 1, 2, 0, 1]);
        assert_eq!(s.test.labels(), &[0, 1, 2]);
    }

    #[test]
    fn reads_png_and_jpeg_folder_in_balanced_order() -> TestResult {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("imgs");
        write_image_folder(&root, &specs())?;
        // A stray non-image file and hidden file are ignored.
        std::fs::write(root.join("train/ant/notes.txt"), b"x")?;
        std::fs::write(root.join("train/ant/.hidden.png"), b"x")?;
        let s = load_image_folder(&root)?;
        check_loaded(&s);
        // Numeric order: ant's 9.png comes first, 10.png one rotation later.
        let ant9 = ImageSpec::rgb("train", "ant", "9.png", 4, 3).chw();
        let ant10 = ImageSpec::rgb("train", "ant", "10.png", 4, 3).chw();
        assert_eq!(s.train.image(0), ant9.as_slice());
        assert_eq!(s.train.image(3), ant10.as_slice());
        // JPEG is lossy; the test images are smooth enough to stay within a few levels.
        let want = ImageSpec::rgb("test", "cat", "0.jpg", 4, 3).chw();
        let max_diff = s
            .test
            .image(2)
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(
            max_diff.unwrap_or(255) <= 12,
            "jpeg differs by {max_diff:?}"
        );
        Ok(())
    }

    #[test]
    fn converts_grayscale_and_rgba_to_rgb() -> TestResult {
        let dir = tempfile::tempdir()?;
        let specs = [
            ImageSpec::gray("train", "a", "0.png", 2, 2, 77),
            ImageSpec::rgba("train", "b", "0.png", 2, 2, [1, 2, 3, 0]),
            ImageSpec::gray("test", "a", "0.png", 2, 2, 5),
            ImageSpec::rgba("test", "b", "0.png", 2, 2, [9, 8, 7, 255]),
        ];
        write_image_folder(dir.path(), &specs)?;
        let s = load_image_folder(dir.path())?;
        assert_eq!(s.train.shape(), (3, 2, 2));
        assert_eq!(s.train.image(0), &[77; 12]);
        assert_eq!(s.train.image(1), &[1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
        assert_eq!(s.test.image(1), &[9, 9, 9, 9, 8, 8, 8, 8, 7, 7, 7, 7]);
        Ok(())
    }

    #[test]
    fn reads_archive_like_the_folder() -> TestResult {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("cifar10-jpeg");
        let specs = specs();
        write_image_folder(&root, &specs)?;
        let members = specs
            .iter()
            .map(|s| {
                Ok((
                    format!("cifar10-jpeg/{}/{}/{}", s.split, s.class, s.name),
                    std::fs::read(root.join(s.rel()))?,
                ))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let archive = dir.path().join("cifar10-jpeg.tar.gz");
        write_tar_gz(&archive, &members)?;
        let a = load_image_folder(&root)?;
        let b = load_image_archive(&archive)?;
        check_loaded(&b);
        assert_eq!(a.train.images(), b.train.images());
        assert_eq!(a.test.images(), b.test.images());
        Ok(())
    }

    #[test]
    fn wrong_image_size_names_the_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut specs = specs();
        specs.push(ImageSpec::rgb("test", "bee", "7.png", 5, 3));
        write_image_folder(dir.path(), &specs)?;
        let err = load_image_folder(dir.path()).err();
        let bad = dir.path().join("test/bee/7.png");
        assert_matches!(
            &err,
            Some(DataError::WrongImageSize { file, expected: (4, 3), found: (5, 3) })
                if *file == bad
        );
        assert!(error_text(err).contains("7.png"));
        Ok(())
    }

    #[test]
    fn corrupt_image_names_the_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        write_image_folder(dir.path(), &specs())?;
        let bad = dir.path().join("train/cat/9.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not a png")?;
        let err = load_image_folder(dir.path()).err();
        assert_matches!(&err, Some(DataError::Image { file, .. }) if *file == bad);
        assert_mentions(&error_text(err), &["9.png", "corrupt"]);
        Ok(())
    }

    #[test]
    fn missing_split_and_mismatched_classes_are_reported() -> TestResult {
        let dir = tempfile::tempdir()?;
        let only_train: Vec<_> = specs().into_iter().filter(|s| s.split == "train").collect();
        write_image_folder(dir.path(), &only_train)?;
        assert_mentions(
            &error_text(load_image_folder(dir.path()).err()),
            &["missing data", "test"],
        );

        write_image_folder(dir.path(), &[ImageSpec::rgb("test", "dog", "0.png", 4, 3)])?;
        let err = load_image_folder(dir.path()).err();
        assert_matches!(&err, Some(DataError::Layout { problem, .. }) if problem.contains("dog"));
        Ok(())
    }
}
