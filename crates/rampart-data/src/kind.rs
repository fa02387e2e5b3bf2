//! The data sets (CIFAR-10/100, MNIST, SVHN): names, classes, image shapes and where
//! their official files live.

use std::fmt;
use std::str::FromStr;

use crate::error::DataError;

/// CIFAR-10 names, in the official label order (which is also alphabetical).
const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// CIFAR-100 fine-label names, in the official label order (which is also alphabetical).
#[rustfmt::skip]
const CIFAR100_CLASSES: [&str; 100] = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
];

/// Digit names of MNIST and SVHN, in label order.
const DIGIT_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// Which data set. Parsed from `"cifar10"`, `"cifar100"`, `"mnist"`, `"svhn"` (case and
/// a `-` ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// CIFAR-10: 10 classes, 50,000 train + 10,000 test 32×32 RGB images.
    Cifar10,
    /// CIFAR-100: 100 fine classes, 50,000 train + 10,000 test 32×32 RGB images.
    Cifar100,
    /// MNIST: handwritten digits 0–9, 60,000 train + 10,000 test 28×28 grayscale images.
    Mnist,
    /// SVHN (cropped digits): house-number digits 0–9, 73,257 train + 26,032 test 32×32
    /// RGB images. The official label 10 stands for the digit 0 and is read as label 0.
    Svhn,
}

/// One file of an official distribution: its name, where to fetch it, its published digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfficialFile {
    /// File name, e.g. `train-images-idx3-ubyte.gz`.
    pub name: &'static str,
    /// Download URL.
    pub url: &'static str,
    /// The published digest of the file.
    pub checksum: Checksum,
}

/// How the official CIFAR binary distribution (and an image-folder rendition of it) is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CifarLayout {
    /// The official binary archive, e.g. `cifar-10-binary.tar.gz`.
    pub archive: OfficialFile,
    /// Folder the archive extracts to, e.g. `cifar-10-batches-bin`.
    pub binary_folder: &'static str,
    /// Batch files of the training split, in official order.
    pub train_files: &'static [&'static str],
    /// Batch file of the test split.
    pub test_file: &'static str,
    /// Label bytes before each record's pixels: 1 for CIFAR-10, 2 (coarse, fine) for CIFAR-100.
    pub label_bytes: usize,
    /// Folder name of an image-folder rendition, e.g. `cifar10-jpeg`.
    pub image_folder: &'static str,
}

const CIFAR10_LAYOUT: CifarLayout = CifarLayout {
    archive: OfficialFile {
        name: "cifar-10-binary.tar.gz",
        url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        checksum: Checksum::Sha256(
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        ),
    },
    binary_folder: "cifar-10-batches-bin",
    train_files: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ],
    test_file: "test_batch.bin",
    label_bytes: 1,
    image_folder: "cifar10-jpeg",
};

const CIFAR100_LAYOUT: CifarLayout = CifarLayout {
    archive: OfficialFile {
        name: "cifar-100-binary.tar.gz",
        url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        checksum: Checksum::Md5("03b5dce01913d631647c71ecec9e9cb8"),
    },
    binary_folder: "cifar-100-binary",
    train_files: &["train.bin"],
    test_file: "test.bin",
    label_bytes: 2,
    image_folder: "cifar100-jpeg",
};

/// The four gzipped IDX files of MNIST (train images, train labels, test images, test
/// labels), from the mirror torchvision uses, with torchvision's MD5s (the original
/// `yann.lecun.com` host no longer serves them reliably).
const MNIST_FILES: [OfficialFile; 4] = [
    OfficialFile {
        name: "train-images-idx3-ubyte.gz",
        url: "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
        checksum: Checksum::Md5("f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    },
    OfficialFile {
        name: "train-labels-idx1-ubyte.gz",
        url: "https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz",
        checksum: Checksum::Md5("d53e105ee54ea40749a09fcbcd1e9432"),
    },
    OfficialFile {
        name: "t10k-images-idx3-ubyte.gz",
        url: "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
        checksum: Checksum::Md5("9fb629c4189551a2d022fa330f9573f3"),
    },
    OfficialFile {
        name: "t10k-labels-idx1-ubyte.gz",
        url: "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
        checksum: Checksum::Md5("ec29112dd5afa0611ce80d1b7f02629c"),
    },
];

/// SVHN's cropped-digit files (train, test), with the MD5s torchvision checks.
const SVHN_FILES: [OfficialFile; 2] = [
    OfficialFile {
        name: "train_32x32.mat",
        url: "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
        checksum: Checksum::Md5("e26dedcc434d2e4c54c9b2d4a06d8373"),
    },
    OfficialFile {
        name: "test_32x32.mat",
        url: "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
        checksum: Checksum::Md5("eb5a983be6a315427106f1b164d9cef3"),
    },
];

impl DatasetKind {
    /// The official split sizes (train, test): 50,000 + 10,000 for CIFAR-10 and
    /// CIFAR-100, 60,000 + 10,000 for MNIST, 73,257 + 26,032 for SVHN.
    pub fn split_sizes(self) -> (usize, usize) {
        match self {
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => (50_000, 10_000),
            DatasetKind::Mnist => (60_000, 10_000),
            DatasetKind::Svhn => (73_257, 26_032),
        }
    }

    /// Every data set, in the order they are listed in messages.
    pub const ALL: [DatasetKind; 4] = [Self::Cifar10, Self::Cifar100, Self::Mnist, Self::Svhn];

    /// Number of classes (fine labels for CIFAR-100).
    pub fn num_classes(self) -> usize {
        self.class_names().len()
    }

    /// Class names in label order (MNIST and SVHN: the digits `"0"` … `"9"`).
    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            Self::Cifar10 => &CIFAR10_CLASSES,
            Self::Cifar100 => &CIFAR100_CLASSES,
            Self::Mnist | Self::Svhn => &DIGIT_CLASSES,
        }
    }

    /// Human-readable name, e.g. `"CIFAR-10"`.
    pub fn title(self) -> &'static str {
        match self {
            Self::Cifar10 => "CIFAR-10",
            Self::Cifar100 => "CIFAR-100",
            Self::Mnist => "MNIST",
            Self::Svhn => "SVHN",
        }
    }

    /// Shape (C, H, W) of every image: (3, 32, 32), or (1, 28, 28) for MNIST.
    pub fn image_shape(self) -> (usize, usize, usize) {
        match self {
            Self::Cifar10 | Self::Cifar100 | Self::Svhn => (3, 32, 32),
            Self::Mnist => (1, 28, 28),
        }
    }

    /// The official files [`download`](crate::download) fetches into a data folder, with
    /// their URLs and published digests: one archive for CIFAR, four `.gz` IDX files for
    /// MNIST, two `.mat` files for SVHN.
    pub fn official_files(self) -> &'static [OfficialFile] {
        match self {
            Self::Cifar10 => std::slice::from_ref(&CIFAR10_LAYOUT.archive),
            Self::Cifar100 => std::slice::from_ref(&CIFAR100_LAYOUT.archive),
            Self::Mnist => &MNIST_FILES,
            Self::Svhn => &SVHN_FILES,
        }
    }

    /// Where to fetch the official file whose name satisfies `is` and its digest,
    /// `URL (digest)`; empty when there is none.
    pub(crate) fn official_source(self, is: impl Fn(&str) -> bool) -> String {
        self.official_files()
            .iter()
            .find(|f| is(f.name))
            .map(|f| format!("{} ({})", f.url, f.checksum))
            .unwrap_or_default()
    }

    /// One line per official file for a "no data found" message: where in `dir` to
    /// place it, where to fetch it and its digest.
    pub(crate) fn placement_lines(self, dir: &std::path::Path) -> String {
        let d = dir.display();
        self.official_files()
            .iter()
            .map(|f| format!("\n  {d}/{}  from {} ({})", f.name, f.url, f.checksum))
            .collect()
    }

    /// The CIFAR binary layout, or `None` for data sets that are not CIFAR.
    pub fn cifar_layout(self) -> Option<&'static CifarLayout> {
        match self {
            Self::Cifar10 => Some(&CIFAR10_LAYOUT),
            Self::Cifar100 => Some(&CIFAR100_LAYOUT),
            Self::Mnist | Self::Svhn => None,
        }
    }

    /// The name of the variant in Rust, e.g. `"DatasetKind::Cifar10"`, for messages.
    pub(crate) fn rust_name(self) -> &'static str {
        match self {
            Self::Cifar10 => "DatasetKind::Cifar10",
            Self::Cifar100 => "DatasetKind::Cifar100",
            Self::Mnist => "DatasetKind::Mnist",
            Self::Svhn => "DatasetKind::Svhn",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
            Self::Mnist => "mnist",
            Self::Svhn => "svhn",
        })
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('-', "").as_str() {
            "cifar10" => Ok(Self::Cifar10),
            "cifar100" => Ok(Self::Cifar100),
            "mnist" => Ok(Self::Mnist),
            "svhn" => Ok(Self::Svhn),
            _ => Err(DataError::UnknownDataset(s.to_owned())),
        }
    }
}

/// A published digest of a file, lowercase hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// SHA-256.
    Sha256(&'static str),
    /// MD5 (used where only an MD5 is published).
    Md5(&'static str),
}

impl Checksum {
    /// `"sha256"` or `"md5"`.
    pub fn algorithm(self) -> &'static str {
        match self {
            Self::Sha256(_) => "sha256",
            Self::Md5(_) => "md5",
        }
    }

    /// The expected digest, lowercase hex.
    pub fn hex(self) -> &'static str {
        match self {
            Self::Sha256(h) | Self::Md5(h) => h,
        }
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.algorithm(), self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_round_trip() -> Result<(), DataError> {
        for kind in DatasetKind::ALL {
            assert_eq!(kind.to_string().parse::<DatasetKind>()?, kind);
        }
        assert_eq!("CIFAR-100".parse::<DatasetKind>()?, DatasetKind::Cifar100);
        assert_eq!("MNIST".parse::<DatasetKind>()?, DatasetKind::Mnist);
        assert_eq!("SVHN".parse::<DatasetKind>()?, DatasetKind::Svhn);
        assert!(matches!(
            "imagenet".parse::<DatasetKind>(),
            Err(DataError::UnknownDataset(s)) if s == "imagenet"
        ));
        Ok(())
    }

    #[test]
    fn class_lists_are_complete_sorted_and_unique() {
        for (kind, n) in [
            (DatasetKind::Cifar10, 10),
            (DatasetKind::Cifar100, 100),
            (DatasetKind::Mnist, 10),
            (DatasetKind::Svhn, 10),
        ] {
            let names = kind.class_names();
            assert_eq!(kind.num_classes(), n);
            // Official label order is alphabetical, which the image-folder reader relies on.
            assert!(
                names.windows(2).all(|w| w[0] < w[1]),
                "{kind}: not strictly sorted"
            );
        }
        assert_eq!(DatasetKind::Svhn.class_names()[0], "0");
    }

    #[test]
    fn official_files_have_urls_ending_in_their_names_and_hex_digests() {
        for kind in DatasetKind::ALL {
            let files = kind.official_files();
            assert!(!files.is_empty(), "{kind}");
            for f in files {
                assert!(f.url.ends_with(&format!("/{}", f.name)), "{kind}: {f:?}");
                let len = match f.checksum {
                    Checksum::Sha256(_) => 64,
                    Checksum::Md5(_) => 32,
                };
                let hex = f.checksum.hex();
                assert!(
                    hex.len() == len
                        && hex
                            .bytes()
                            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                    "{kind}: {f:?}"
                );
            }
            assert_eq!(
                kind.cifar_layout().is_some(),
                kind.title().starts_with("CIFAR")
            );
        }
        assert_eq!(DatasetKind::Mnist.official_files().len(), 4);
        assert_eq!(DatasetKind::Svhn.official_files().len(), 2);
    }
}
