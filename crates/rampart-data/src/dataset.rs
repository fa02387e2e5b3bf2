//! [`ImageDataset`]: labelled uint8 images in memory, and conversion of a batch to tensors.

use std::fmt;

use candle_core::{Device, Tensor};

use crate::error::{DataError, Result};

/// In-memory labelled image set, uint8, each image stored C×H×W (channel-major) contiguously.
///
/// Invariants, checked by [`ImageDataset::new`]: `images.len() == len × C × H × W`,
/// C, H, W > 0, at least one class, and every label below the number of classes.
#[derive(Clone)]
pub struct ImageDataset {
    images: Vec<u8>,
    labels: Vec<u32>,
    shape: (usize, usize, usize),
    class_names: Vec<String>,
}

/// The two official splits of a data set.
#[derive(Clone, Debug)]
pub struct Splits {
    /// Training split (50,000 images for CIFAR).
    pub train: ImageDataset,
    /// Test split (10,000 images for CIFAR).
    pub test: ImageDataset,
}

impl ImageDataset {
    /// Wraps `images` (`labels.len()` images of `shape` = (C, H, W), each C×H×W
    /// channel-major) and their `labels`, which must be below `class_names.len()`.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u32>,
        shape: (usize, usize, usize),
        class_names: Vec<String>,
    ) -> Result<Self> {
        let (c, h, w) = shape;
        if c == 0 || h == 0 || w == 0 {
            return Err(DataError::InvalidDataset(format!(
                "image shape (C, H, W) = {shape:?} has a zero dimension"
            )));
        }
        if class_names.is_empty() {
            return Err(DataError::InvalidDataset("no class names".into()));
        }
        let expected = labels.len().checked_mul(c * h * w);
        if expected != Some(images.len()) {
            return Err(DataError::InvalidDataset(format!(
                "{} image bytes do not hold {} images of shape {shape:?}",
                images.len(),
                labels.len()
            )));
        }
        if let Some((i, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= class_names.len())
        {
            return Err(DataError::InvalidDataset(format!(
                "label {label} of example {i} is out of range for {} classes",
                class_names.len()
            )));
        }
        Ok(Self {
            images,
            labels,
            shape,
            class_names,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image shape (C, H, W).
    pub fn shape(&self) -> (usize, usize, usize) {
        self.shape
    }

    /// Bytes per image, C × H × W.
    pub fn image_len(&self) -> usize {
        let (c, h, w) = self.shape;
        c * h * w
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Class names in label order.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Labels, one per example.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Number of examples of each class, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// Image `i`: C×H×W bytes, channel-major. Panics if `i >= len()` (like slice indexing).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// All images, concatenated: (N, C, H, W) uint8, row-major.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// The first `n` examples (all of them if `n > len()`).
    pub fn take(&self, n: usize) -> ImageDataset {
        let n = n.min(self.len());
        self.range(0, n)
    }

    /// The last `n` examples (all of them if `n > len()`).
    pub fn tail(&self, n: usize) -> ImageDataset {
        let n = n.min(self.len());
        self.range(self.len() - n, self.len())
    }

    fn range(&self, start: usize, end: usize) -> ImageDataset {
        let n = self.image_len();
        ImageDataset {
            images: self.images[start * n..end * n].to_vec(),
            labels: self.labels[start..end].to_vec(),
            shape: self.shape,
            class_names: self.class_names.clone(),
        }
    }

    /// The examples at `indices`, in that order (repeats allowed).
    pub fn select(&self, indices: &[usize]) -> Result<ImageDataset> {
        self.check_indices(indices)?;
        let mut images = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Ok(ImageDataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            shape: self.shape,
            class_names: self.class_names.clone(),
        })
    }

    /// The examples at `indices` as tensors on `device`: images (B, C, H, W) f32 in
    /// [0, 1] (byte / 255) and labels (B,) u32.
    pub fn batch_tensors(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        self.check_indices(indices)?;
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            pixels.extend(self.image(i).iter().map(|&b| f32::from(b) / 255.0));
        }
        let labels: Vec<u32> = indices.iter().map(|&i| self.labels[i]).collect();
        let (c, h, w) = self.shape;
        let images = crate::upload::tensor(pixels, (indices.len(), c, h, w), device)?;
        let labels = Tensor::from_vec(labels, indices.len(), device)?;
        Ok((images, labels))
    }

    pub(crate) fn check_indices(&self, indices: &[usize]) -> Result<()> {
        match indices.iter().find(|&&i| i >= self.len()) {
            Some(&index) => Err(DataError::IndexOutOfRange {
                index,
                len: self.len(),
            }),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for ImageDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageDataset")
            .field("len", &self.len())
            .field("shape", &self.shape)
            .field("num_classes", &self.num_classes())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    /// Five 1×2×2 images; image i is filled with byte 10·i, label i % 3.
    fn tiny() -> Result<ImageDataset> {
        let images = (0..5u8).flat_map(|i| [10 * i; 4]).collect();
        ImageDataset::new(images, vec![0, 1, 2, 0, 1], (1, 2, 2), names(3))
    }

    #[test]
    fn new_rejects_inconsistent_buffers() {
        let bad_len = ImageDataset::new(vec![0; 7], vec![0, 0], (1, 2, 2), names(2));
        assert!(matches!(bad_len, Err(DataError::InvalidDataset(_))));
        let bad_label = ImageDataset::new(vec![0; 8], vec![0, 2], (1, 2, 2), names(2));
        assert!(matches!(bad_label, Err(DataError::InvalidDataset(m)) if m.contains("label 2")));
        let zero_dim = ImageDataset::new(vec![], vec![], (3, 0, 2), names(2));
        assert!(matches!(zero_dim, Err(DataError::InvalidDataset(_))));
    }

    #[test]
    fn take_tail_select_pick_the_right_examples() -> TestResult {
        let ds = tiny()?;
        assert_eq!(ds.len(), 5);
        assert_eq!(ds.take(2).labels(), &[0, 1]);
        assert_eq!(ds.take(2).image(1), &[10; 4]);
        assert_eq!(ds.tail(2).labels(), &[0, 1]);
        assert_eq!(ds.tail(2).image(0), &[30; 4]);
        assert_eq!(ds.take(99).len(), 5);
        assert_eq!(ds.tail(99).len(), 5);
        assert!(ds.take(0).is_empty());
        let sel = ds.select(&[4, 2, 2])?;
        assert_eq!(sel.labels(), &[1, 2, 2]);
        assert_eq!(sel.image(0), &[40; 4]);
        assert_eq!(sel.image(2), &[20; 4]);
        assert_eq!(ds.class_counts(), vec![2, 2, 1]);
        assert!(matches!(
            ds.select(&[0, 5]),
            Err(DataError::IndexOutOfRange { index: 5, len: 5 })
        ));
        Ok(())
    }

    #[test]
    fn batch_tensors_scale_bytes_to_unit_interval() -> TestResult {
        let images = vec![0, 51, 255, 128, 1, 2, 3, 4];
        let ds = ImageDataset::new(images, vec![1, 0], (1, 2, 2), names(2))?;
        let (x, y) = ds.batch_tensors(&[1, 0], &Device::Cpu)?;
        assert_eq!(x.dims(), &[2, 1, 2, 2]);
        assert_eq!(y.to_vec1::<u32>()?, vec![0, 1]);
        let flat = x.flatten_all()?.to_vec1::<f32>()?;
        let expected = [1.0, 2.0, 3.0, 4.0, 0.0, 51.0, 255.0, 128.0].map(|b: f32| b / 255.0);
        for (got, want) in flat.iter().zip(expected) {
            assert!((got - want).abs() < 1e-7, "{got} != {want}");
        }
        assert_eq!(flat[6], 1.0);
        assert!(ds.batch_tensors(&[2], &Device::Cpu).is_err());
        Ok(())
    }
}
