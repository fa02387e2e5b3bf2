//! Data for Rampart: CIFAR-10/100, MNIST, SVHN and image folders in memory, seeded
//! batching and augmentation.
//!
//! This crate owns everything between files on disk and `(B, C, H, W)` tensors:
//!
//! - **Finding and reading data.** [`load`] finds a [`DatasetKind`] in a data folder,
//!   whatever form it was placed in. CIFAR: the official binary `.tar.gz`, its
//!   extracted folder, an image folder or its `.tar.gz`, read with
//!   [`load_cifar_binary`], [`load_image_folder`] or [`load_image_archive`]. MNIST: the
//!   four IDX files, gzipped or not ([`load_mnist`], [`load_mnist_idx`]). SVHN: the
//!   cropped-digit MATLAB files `train_32x32.mat` / `test_32x32.mat` ([`load_svhn`],
//!   [`load_svhn_mat`]), read by a level-5 MAT-file reader written here (plain and
//!   zlib-compressed elements, either byte order). [`download`] fetches the official
//!   files ([`DatasetKind::official_files`]) and verifies their checksums. Every
//!   failure is a typed [`DataError`] naming the file and the problem (a truncated or
//!   inconsistent file is an error, never a panic, and a length field is checked
//!   against the bytes present before anything is allocated for it), and missing data
//!   come with instructions on what to place where. [`user_data_dir`] is the per-user
//!   folder data go to when none is named.
//! - **Holding data.** [`ImageDataset`] keeps uint8 images C×H×W in memory with their
//!   labels and class names; [`ImageDataset::batch_tensors`] makes f32 tensors in [0, 1].
//! - **Feeding training.** [`Loader`] yields seeded, augmented ([`Augmentation`])
//!   mini-batches prepared ahead on a background thread, and copies them to a GPU
//!   without waiting for it ([`upload`]: page-locked staging buffers).
//!
//! **Invariants.** Binary data (CIFAR, MNIST, SVHN) keep the official example order;
//! MNIST and SVHN labels are the digits 0–9 (SVHN's label 10 is read as 0); image
//! folders are ordered so every prefix and suffix is class-balanced. The order of an epoch depends
//! only on (seed, epoch) and the augmentation of example i only on (seed, epoch, i).
//! Pixels leave this crate in [0, 1]; normalisation belongs to the model.
//!
//! This crate knows nothing of models, attacks or metrics.
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//!
//! use candle_core::Device;
//! use rampart_data::{load, DatasetKind, Loader, LoaderConfig};
//!
//! # fn main() -> rampart_data::Result<()> {
//! let splits = load(DatasetKind::Cifar10, Path::new("data"))?;
//! let loader = Loader::new(Arc::new(splits.train), LoaderConfig::train(128, 0), Device::Cpu)?;
//! for batch in loader.epoch(0) {
//!     let batch = batch?; // batch.images: (128, 3, 32, 32) f32 in [0, 1]
//! #   let _ = batch;
//! }
//! let (x, y) = splits.test.batch_tensors(&[0, 1, 2], &Device::Cpu)?; // (3, 3, 32, 32), (3,)
//! # let _ = (x, y);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod archive;
mod augment;
mod cache;
mod cifar;
pub mod corrupt;
mod dataset;
mod download;
mod error;
mod folder;
mod kind;
mod load;
mod loader;
mod mat;
mod mnist;
mod svhn;
#[cfg(test)]
mod testutil;
pub mod upload;

pub use augment::{AugmentDraw, Augmentation, Cutout};
pub use cache::{user_data_dir, user_data_dir_from};
pub use cifar::{decode_cifar_archive, decode_cifar_batch, load_cifar_binary, CIFAR_SHAPE};
pub use corrupt::{corrupt, corrupt_with_parameter, CorruptError, Corruption};
pub use dataset::{ImageDataset, Splits};
pub use download::{download, verify_archive, verify_file};
pub use error::{DataError, Result};
pub use folder::{
    decode_image_archive, load_image_archive, load_image_folder, load_image_folder_test,
};
pub use kind::{Checksum, CifarLayout, DatasetKind, OfficialFile};
pub use load::{load, load_test};
pub use loader::{Batch, EpochIter, Loader, LoaderConfig, PREFETCH};
pub use mnist::{decode_mnist_idx, load_mnist, load_mnist_idx, MNIST_SHAPE};
pub use svhn::{decode_svhn_mat, load_svhn, load_svhn_mat, SVHN_SHAPE};
