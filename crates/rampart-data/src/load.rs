//! [`load`]: finds a data set in a folder, whatever form it was placed in.

use std::path::Path;

use crate::cifar::{cifar_layout, load_cifar_binary};
use crate::dataset::{ImageDataset, Splits};
use crate::error::{DataError, Result};
use crate::folder::{load_image_archive, load_image_folder, load_image_folder_test};
use crate::kind::{CifarLayout, DatasetKind};
use crate::mnist::load_mnist;
use crate::svhn::load_svhn;

/// Loads `kind` from `dir`.
///
/// **MNIST**: the four IDX files `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each gzipped (with `.gz`, as
/// downloaded) or not, in `dir`, in torchvision's `dir/MNIST/raw/`, or in `dir/mnist/`
/// (see [`load_mnist`]).
///
/// **SVHN**: `train_32x32.mat` and `test_32x32.mat` in `dir` or `dir/svhn/` (see
/// [`load_svhn`]).
///
/// **CIFAR**, trying in this order:
///
/// 1. the extracted official folder, `dir/cifar-10-batches-bin/` (CIFAR-100:
///    `dir/cifar-100-binary/`), or `dir` itself when it holds `data_batch_1.bin`
///    (CIFAR-100: `train.bin`);
/// 2. the official archive `dir/cifar-10-binary.tar.gz` (`dir/cifar-100-binary.tar.gz`);
/// 3. an image folder `ROOT/{train,test}/{class}/*.{png,jpg,jpeg}` with ROOT
///    `dir/cifar10-jpeg` (`dir/cifar100-jpeg`) or `dir` itself;
/// 4. that image folder packed as `dir/cifar10-jpeg.tar.gz` (`dir/cifar100-jpeg.tar.gz`).
///
/// Binary data keep the official order; image folders are ordered class-balanced
/// (see [`load_image_folder`]) and must have exactly `kind.num_classes()` class folders.
/// Nothing found gives [`DataError::Missing`] saying what to place where, the
/// `--data-dir` to pass, and the download URL with its checksum.
pub fn load(kind: DatasetKind, dir: &Path) -> Result<Splits> {
    match kind {
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => load_cifar(kind, dir),
        DatasetKind::Mnist => load_mnist(dir),
        DatasetKind::Svhn => load_svhn(dir),
    }
}

/// The test split of `kind` in `dir`, found as [`load`] finds the data set. An image
/// folder decodes its test images only; every other form is read whole (its files hold
/// both splits, or the training split is cheap to read) and its test split returned.
pub fn load_test(kind: DatasetKind, dir: &Path) -> Result<ImageDataset> {
    if matches!(kind, DatasetKind::Cifar10 | DatasetKind::Cifar100) {
        if let Some(root) = cifar_image_folder(kind, dir)? {
            let test = load_image_folder_test(&root)?;
            check_class_names(kind, &root, &test)?;
            return Ok(test);
        }
    }
    Ok(load(kind, dir)?.test)
}

/// The unpacked CIFAR image folder [`load`] would read from `dir`, if that is the form
/// it finds first.
fn cifar_image_folder(kind: DatasetKind, dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let layout = cifar_layout(kind)?;
    let binary = dir.join(layout.binary_folder).is_dir()
        || layout
            .train_files
            .first()
            .is_some_and(|f| dir.join(f).is_file())
        || dir.join(layout.archive.name).is_file();
    if binary {
        return Ok(None);
    }
    let nested = dir.join(layout.image_folder);
    let found = [nested.as_path(), dir]
        .into_iter()
        .find(|root| root.join("train").is_dir() || root.join("test").is_dir())
        .map(Path::to_path_buf);
    Ok(found)
}

/// [`load`] for CIFAR-10 and CIFAR-100.
fn load_cifar(kind: DatasetKind, dir: &Path) -> Result<Splits> {
    let layout = cifar_layout(kind)?;
    let binary_folder = dir.join(layout.binary_folder);
    if binary_folder.is_dir() {
        return load_cifar_binary(kind, &binary_folder);
    }
    if layout
        .train_files
        .first()
        .is_some_and(|f| dir.join(f).is_file())
    {
        return load_cifar_binary(kind, dir);
    }
    let archive = dir.join(layout.archive.name);
    if archive.is_file() {
        return load_cifar_binary(kind, &archive);
    }
    let nested = dir.join(layout.image_folder);
    for root in [nested.as_path(), dir] {
        if root.join("train").is_dir() || root.join("test").is_dir() {
            return check_classes(kind, root, load_image_folder(root)?);
        }
    }
    let image_archive = dir.join(format!("{}.tar.gz", layout.image_folder));
    if image_archive.is_file() {
        return check_classes(kind, &image_archive, load_image_archive(&image_archive)?);
    }
    Err(DataError::Missing {
        path: dir.to_path_buf(),
        help: missing_help(kind, layout, dir),
    })
}

/// An image folder must have as many classes as the data set it stands for.
fn check_classes(kind: DatasetKind, source: &Path, splits: Splits) -> Result<Splits> {
    check_class_names(kind, source, &splits.train)?;
    Ok(splits)
}

/// The class folders of an image folder (seen in `split`, either) against `kind`.
fn check_class_names(kind: DatasetKind, source: &Path, split: &ImageDataset) -> Result<()> {
    let found = split.num_classes();
    if found != kind.num_classes() {
        return Err(DataError::Layout {
            path: source.to_path_buf(),
            problem: format!(
                "{found} class folders, but {} has {} classes",
                kind.title(),
                kind.num_classes()
            ),
        });
    }
    if split
        .class_names()
        .iter()
        .map(String::as_str)
        .ne(kind.class_names().iter().copied())
    {
        tracing::warn!(
            source = %source.display(),
            "class folder names differ from the official {} names; labels follow their alphabetical order",
            kind.title()
        );
    }
    Ok(())
}

/// The note a "no data found" message adds when the folder `dir` does not exist.
pub(crate) fn absent_note(dir: &Path) -> &'static str {
    if dir.is_dir() {
        ""
    } else {
        " (the folder does not exist)"
    }
}

/// What to place where when no CIFAR data were found in `dir`.
fn missing_help(kind: DatasetKind, layout: &CifarLayout, dir: &Path) -> String {
    let (d, exists) = (dir.display(), absent_note(dir));
    let mut batches: Vec<&str> = layout.train_files.to_vec();
    batches.push(layout.test_file);
    format!(
        "no {title} data found{exists}. Place one of these in {d}, or pass --data-dir with the folder that holds one:\n  \
         1. {d}/{archive}, the official archive: {url} ({checksum})\n  \
         2. that archive extracted: {d}/{folder}/{{{batches}}}\n  \
         3. an image folder {d}/{images}/{{train,test}}/<class>/*.png|jpg|jpeg (class folders in alphabetical = label order), or it packed as {d}/{images}.tar.gz\n\
         With network access, rampart_data::download({kind}, dir) fetches and verifies archive 1.",
        title = kind.title(),
        archive = layout.archive.name,
        url = layout.archive.url,
        checksum = layout.archive.checksum,
        folder = layout.binary_folder,
        batches = batches.join(","),
        images = layout.image_folder,
        kind = kind.rust_name(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        assert_matches, assert_mentions, error_text, write_cifar_folder, write_cifar_tarball,
        write_image_folder, ImageSpec, TestResult,
    };

    #[test]
    fn missing_data_says_what_to_place_where() -> TestResult {
        let dir = tempfile::tempdir()?;
        let err = load(DatasetKind::Cifar10, dir.path()).err();
        assert_matches!(&err, Some(DataError::Missing { path, .. }) if path == dir.path());
        let msg = error_text(err);
        assert_mentions(
            &msg,
            &[
                "cifar-10-binary.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                "cifar-10-batches-bin",
                "data_batch_5.bin",
                "cifar10-jpeg",
                "--data-dir",
            ],
        );
        assert!(msg.contains(&dir.path().display().to_string()));
        assert_mentions(
            &error_text(load(DatasetKind::Cifar100, &dir.path().join("nope")).err()),
            &["does not exist", "03b5dce01913d631647c71ecec9e9cb8"],
        );
        Ok(())
    }

    #[test]
    fn finds_each_layout() -> TestResult {
        // Extracted folder inside dir, and dir being that folder.
        let dir = tempfile::tempdir()?;
        let folder = write_cifar_folder(DatasetKind::Cifar10, dir.path(), 1)?;
        assert_eq!(load(DatasetKind::Cifar10, dir.path())?.train.len(), 5);
        assert_eq!(load(DatasetKind::Cifar10, &folder)?.test.len(), 1);

        // Tarball inside dir.
        let dir = tempfile::tempdir()?;
        write_cifar_tarball(DatasetKind::Cifar100, dir.path(), 2)?;
        assert_eq!(
            load(DatasetKind::Cifar100, dir.path())?.train.num_classes(),
            100
        );

        // Image folder at dir/cifar10-jpeg with the ten official classes.
        let dir = tempfile::tempdir()?;
        let specs: Vec<ImageSpec> = DatasetKind::Cifar10
            .class_names()
            .iter()
            .flat_map(|c| ["train", "test"].map(|s| ImageSpec::rgb(s, c, "0000.png", 2, 2)))
            .collect();
        write_image_folder(&dir.path().join("cifar10-jpeg"), &specs)?;
        let s = load(DatasetKind::Cifar10, dir.path())?;
        assert_eq!(s.train.len(), 10);
        assert_eq!(s.test.labels(), &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        // The same folder is not CIFAR-100.
        let err = load(DatasetKind::Cifar100, &dir.path().join("cifar10-jpeg")).err();
        assert_matches!(
            &err,
            Some(DataError::Layout { problem, .. }) if problem.contains("10 class folders")
        );
        Ok(())
    }

    #[test]
    fn the_test_split_alone_equals_the_full_loads() -> TestResult {
        // Image folder, two images per class and split, distinct pixels: the test split
        // decoded alone is the one `load` gives, in its order.
        let dir = tempfile::tempdir()?;
        let specs: Vec<ImageSpec> = DatasetKind::Cifar10
            .class_names()
            .iter()
            .flat_map(|c| {
                ["train", "test"].into_iter().flat_map(move |s| {
                    ["0001.png", "0010.png"].map(|f| ImageSpec::rgb(s, c, f, 3, 2))
                })
            })
            .collect();
        write_image_folder(&dir.path().join("cifar10-jpeg"), &specs)?;
        let full = load(DatasetKind::Cifar10, dir.path())?.test;
        let test = load_test(DatasetKind::Cifar10, dir.path())?;
        assert_eq!(test.len(), 20);
        assert_eq!(test.labels(), full.labels());
        assert_eq!(test.images(), full.images());
        assert_eq!(test.class_names(), full.class_names());
        // The layout checks still cover both splits: a class missing from train.
        std::fs::remove_dir_all(dir.path().join("cifar10-jpeg/train/ship"))?;
        let err = load_test(DatasetKind::Cifar10, dir.path()).err();
        assert_matches!(
            &err,
            Some(DataError::Layout { problem, .. }) if problem.contains("different class folders")
        );
        // Not CIFAR-100: the class count is checked as `load` checks it.
        std::fs::remove_dir_all(dir.path().join("cifar10-jpeg/test/ship"))?;
        let err = load_test(DatasetKind::Cifar100, &dir.path().join("cifar10-jpeg")).err();
        assert_matches!(
            &err,
            Some(DataError::Layout { problem, .. }) if problem.contains("9 class folders")
        );
        // Binary forms: the test split of the whole load.
        let dir = tempfile::tempdir()?;
        write_cifar_folder(DatasetKind::Cifar10, dir.path(), 1)?;
        let full = load(DatasetKind::Cifar10, dir.path())?.test;
        let test = load_test(DatasetKind::Cifar10, dir.path())?;
        assert_eq!(test.images(), full.images());
        assert_eq!(test.labels(), full.labels());
        Ok(())
    }
}
