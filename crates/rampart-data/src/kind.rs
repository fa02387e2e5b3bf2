//! The two CIFAR data sets: names, classes and where their official files live.

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

/// Which CIFAR data set. Parsed from `"cifar10"` / `"cifar100"` (case and a `-` ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// CIFAR-10: 10 classes, 50,000 train + 10,000 test 32×32 RGB images.
    Cifar10,
    /// CIFAR-100: 100 fine classes, 50,000 train + 10,000 test 32×32 RGB images.
    Cifar100,
}

impl DatasetKind {
    /// Number of classes (fine labels for CIFAR-100).
    pub fn num_classes(self) -> usize {
        self.class_names().len()
    }

    /// Class names in label order.
    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            Self::Cifar10 => &CIFAR10_CLASSES,
            Self::Cifar100 => &CIFAR100_CLASSES,
        }
    }

    /// Human-readable name, e.g. `"CIFAR-10"`.
    pub fn title(self) -> &'static str {
        match self {
            Self::Cifar10 => "CIFAR-10",
            Self::Cifar100 => "CIFAR-100",
        }
    }

    /// File name of the official binary archive, e.g. `cifar-10-binary.tar.gz`.
    pub fn archive_name(self) -> &'static str {
        match self {
            Self::Cifar10 => "cifar-10-binary.tar.gz",
            Self::Cifar100 => "cifar-100-binary.tar.gz",
        }
    }

    /// URL of the official binary archive.
    pub fn archive_url(self) -> &'static str {
        match self {
            Self::Cifar10 => "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            Self::Cifar100 => "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        }
    }

    /// The published digest of the official binary archive.
    pub fn archive_checksum(self) -> Checksum {
        match self {
            Self::Cifar10 => {
                Checksum::Sha256("c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")
            }
            Self::Cifar100 => Checksum::Md5("03b5dce01913d631647c71ecec9e9cb8"),
        }
    }

    /// Folder the official archive extracts to, e.g. `cifar-10-batches-bin`.
    pub fn binary_folder_name(self) -> &'static str {
        match self {
            Self::Cifar10 => "cifar-10-batches-bin",
            Self::Cifar100 => "cifar-100-binary",
        }
    }

    /// Batch files of the training split, in official order.
    pub fn train_files(self) -> &'static [&'static str] {
        match self {
            Self::Cifar10 => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            Self::Cifar100 => &["train.bin"],
        }
    }

    /// Batch file of the test split.
    pub fn test_file(self) -> &'static str {
        match self {
            Self::Cifar10 => "test_batch.bin",
            Self::Cifar100 => "test.bin",
        }
    }

    /// Label bytes before each record's pixels: 1 for CIFAR-10, 2 (coarse, fine) for CIFAR-100.
    pub fn label_bytes(self) -> usize {
        match self {
            Self::Cifar10 => 1,
            Self::Cifar100 => 2,
        }
    }

    /// Folder name of an image-folder rendition, e.g. `cifar10-jpeg`.
    pub fn image_folder_name(self) -> &'static str {
        match self {
            Self::Cifar10 => "cifar10-jpeg",
            Self::Cifar100 => "cifar100-jpeg",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
        })
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('-', "").as_str() {
            "cifar10" => Ok(Self::Cifar10),
            "cifar100" => Ok(Self::Cifar100),
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
        for kind in [DatasetKind::Cifar10, DatasetKind::Cifar100] {
            assert_eq!(kind.to_string().parse::<DatasetKind>()?, kind);
        }
        assert_eq!("CIFAR-100".parse::<DatasetKind>()?, DatasetKind::Cifar100);
        assert!(matches!(
            "mnist".parse::<DatasetKind>(),
            Err(DataError::UnknownDataset(s)) if s == "mnist"
        ));
        Ok(())
    }

    #[test]
    fn class_lists_are_complete_sorted_and_unique() {
        for (kind, n) in [(DatasetKind::Cifar10, 10), (DatasetKind::Cifar100, 100)] {
            let names = kind.class_names();
            assert_eq!(kind.num_classes(), n);
            // Official label order is alphabetical, which the image-folder reader relies on.
            assert!(
                names.windows(2).all(|w| w[0] < w[1]),
                "{kind}: not strictly sorted"
            );
        }
    }
}
