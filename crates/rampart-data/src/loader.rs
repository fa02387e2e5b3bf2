//! Seeded, prefetching mini-batch loader.
//!
//! **Determinism.** The example order of an epoch depends only on (seed, epoch), and
//! the augmentation of example `i` in epoch `e` only on (seed, e, i): each draws from
//! its own ChaCha8 stream keyed by those numbers. Batches are therefore the same
//! whatever the thread scheduling, and a run resumed at epoch `e` sees exactly the
//! batches it would have seen.
//!
//! **Prefetch.** [`Loader::epoch`] starts a background thread that gathers, augments
//! and converts batches (u8 → f32 in [0, 1], examples in parallel with rayon) into a
//! bounded queue of [`PREFETCH`] batches. The consumer only wraps the ready buffer in
//! a tensor on its device, so CUDA tensors are created on the consumer's thread; a
//! copy to a GPU goes through [`crate::upload::tensor`] (page-locked staging, which
//! does not wait for the device's earlier work, where switched on).

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augment::Augmentation;
use crate::dataset::ImageDataset;
use crate::error::{DataError, Result};

/// Batches prepared ahead of the consumer.
pub const PREFETCH: usize = 3;

/// How a [`Loader`] batches a data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoaderConfig {
    /// Examples per batch; must be > 0.
    pub batch_size: usize,
    /// Shuffle the order every epoch (seeded by `seed` and the epoch number).
    pub shuffle: bool,
    /// Drop a final batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Per-example augmentation.
    pub augmentation: Augmentation,
    /// Seed of the shuffling and augmentation randomness.
    pub seed: u64,
}

impl LoaderConfig {
    /// Training: shuffled, standard augmentation (pad 4 + flip), partial last batch kept.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            shuffle: true,
            drop_last: false,
            augmentation: Augmentation::standard(),
            seed,
        }
    }

    /// Evaluation: data-set order, no augmentation, partial last batch kept.
    pub fn eval(batch_size: usize) -> Self {
        Self {
            batch_size,
            shuffle: false,
            drop_last: false,
            augmentation: Augmentation::none(),
            seed: 0,
        }
    }
}

/// One mini-batch.
#[derive(Debug)]
pub struct Batch {
    /// (B, C, H, W) f32 in [0, 1].
    pub images: Tensor,
    /// (B,) u32 class labels.
    pub labels: Tensor,
    /// The same labels on the host, for whoever needs them there: reading `labels`
    /// back from a GPU would wait for every operation queued before it.
    pub host_labels: Vec<u32>,
    /// Data-set index of each example, (B,).
    pub indices: Vec<usize>,
}

/// Iterates a data set in seeded, augmented mini-batches.
pub struct Loader {
    dataset: Arc<ImageDataset>,
    config: LoaderConfig,
    device: Device,
    /// (rank, workers): this worker's part of every batch, see [`Loader::shard`].
    shard: (usize, usize),
}

impl Loader {
    /// A loader over `dataset` producing tensors on `device`. Refuses batch size 0.
    pub fn new(dataset: Arc<ImageDataset>, config: LoaderConfig, device: Device) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(DataError::InvalidConfig(
                "batch_size must be at least 1".into(),
            ));
        }
        Ok(Self {
            dataset,
            config,
            device,
            shard: (0, 1),
        })
    }

    /// Data-parallel training: this loader yields only worker `rank`'s part of every
    /// batch of `workers` (the examples `rank·b/workers .. (rank+1)·b/workers` of a
    /// batch of b), so the parts of one step, taken together, are exactly the batch a
    /// single loader yields: the order depends only on (seed, epoch) and an example's
    /// augmentation only on (seed, epoch, index). Refuses a batch size that does not
    /// split evenly, since the workers' mean gradients are averaged with equal weights.
    pub fn shard(mut self, rank: usize, workers: usize) -> Result<Self> {
        if workers == 0 || rank >= workers {
            return Err(DataError::InvalidConfig(format!(
                "worker {rank} of {workers} does not exist"
            )));
        }
        if !self.config.batch_size.is_multiple_of(workers) {
            return Err(DataError::InvalidConfig(format!(
                "the batch of {} examples does not split evenly over {workers} workers; \
                 choose a batch size that is a multiple of {workers}",
                self.config.batch_size
            )));
        }
        self.shard = (rank, workers);
        Ok(self)
    }

    /// The data set.
    pub fn dataset(&self) -> &Arc<ImageDataset> {
        &self.dataset
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches in one epoch (`len / batch_size`, rounded up unless `drop_last`).
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The example order of `epoch`: a permutation of `0..len` (identity without shuffle).
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            order.shuffle(&mut stream_rng(self.config.seed, epoch, 0, Stream::Shuffle));
        }
        order
    }

    /// The batches of `epoch`, prepared ahead on a background thread (see the module docs).
    /// Dropping the iterator early stops that thread.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        let mut order = self.order(epoch);
        order.truncate(self.batches_per_epoch() * self.config.batch_size);
        let total = self.batches_per_epoch();
        let (tx, rx) = sync_channel(PREFETCH);
        let dataset = Arc::clone(&self.dataset);
        let config = self.config;
        let (rank, workers) = self.shard;
        let worker = std::thread::Builder::new()
            .name(format!("rampart-loader-epoch-{epoch}"))
            .spawn(move || {
                for indices in order.chunks(config.batch_size) {
                    let n = indices.len();
                    let part = &indices[rank * n / workers..(rank + 1) * n / workers];
                    let batch = prepare(&dataset, &config, epoch, part.to_vec());
                    if tx.send(batch).is_err() {
                        break; // the consumer hung up
                    }
                }
            });
        let (rx, worker, spawn_error) = match worker {
            Ok(handle) => (Some(rx), Some(handle), None),
            Err(e) => (None, None, Some(e)),
        };
        EpochIter {
            rx,
            worker,
            spawn_error,
            device: self.device.clone(),
            shape: self.dataset.shape(),
            remaining: total,
        }
    }
}

/// A batch gathered and converted on the worker thread, not yet a tensor.
struct Prepared {
    pixels: Vec<f32>,
    labels: Vec<u32>,
    indices: Vec<usize>,
}

/// Gathers `indices`, augments each example with its own (seed, epoch, index) stream
/// and converts to f32 in [0, 1], examples in parallel.
fn prepare(
    dataset: &ImageDataset,
    config: &LoaderConfig,
    epoch: usize,
    indices: Vec<usize>,
) -> Prepared {
    let (_, h, w) = dataset.shape();
    let n = dataset.image_len();
    let mut pixels = vec![0f32; indices.len() * n];
    let aug = config.augmentation;
    pixels
        .par_chunks_mut(n)
        .zip(indices.par_iter())
        .for_each_init(
            || vec![0u8; n],
            |scratch, (out, &i)| {
                let src = dataset.image(i);
                let img: &[u8] = if aug.is_identity() {
                    src
                } else {
                    let mut rng = stream_rng(config.seed, epoch, i, Stream::Augment);
                    aug.sample(h, w, &mut rng)
                        .apply(src, dataset.shape(), scratch);
                    scratch
                };
                for (o, &b) in out.iter_mut().zip(img) {
                    *o = f32::from(b) / 255.0;
                }
            },
        );
    let labels = indices.iter().map(|&i| dataset.labels()[i]).collect();
    Prepared {
        pixels,
        labels,
        indices,
    }
}

/// Independent random streams.
#[derive(Clone, Copy)]
enum Stream {
    Shuffle = 1,
    Augment = 2,
}

/// A ChaCha8 generator keyed by (seed, epoch, index, stream): distinct keys give
/// independent streams, and the same key always gives the same stream.
fn stream_rng(seed: u64, epoch: usize, index: usize, stream: Stream) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(epoch as u64).to_le_bytes());
    key[16..24].copy_from_slice(&(index as u64).to_le_bytes());
    key[24..].copy_from_slice(&(stream as u64).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// The batches of one epoch; see [`Loader::epoch`].
pub struct EpochIter {
    rx: Option<Receiver<Prepared>>,
    worker: Option<JoinHandle<()>>,
    spawn_error: Option<std::io::Error>,
    device: Device,
    shape: (usize, usize, usize),
    remaining: usize,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(e) = self.spawn_error.take() {
            self.remaining = 0;
            return Some(Err(DataError::LoaderThread(format!(
                "could not start it: {e}"
            ))));
        }
        if self.remaining == 0 {
            return None;
        }
        let Ok(prepared) = self.rx.as_ref()?.recv() else {
            // The worker sends every batch unless it died (a panic while preparing).
            let missing = std::mem::take(&mut self.remaining);
            return Some(Err(DataError::LoaderThread(format!(
                "it stopped with {missing} batches of the epoch not delivered"
            ))));
        };
        self.remaining -= 1;
        let (c, h, w) = self.shape;
        let b = prepared.indices.len();
        let host_labels = prepared.labels;
        let batch = crate::upload::tensor(prepared.pixels, (b, c, h, w), &self.device)
            .and_then(|images| {
                Tensor::new(host_labels.as_slice(), &self.device).map(|labels| (images, labels))
            })
            .map(|(images, labels)| Batch {
                images,
                labels,
                host_labels,
                indices: prepared.indices,
            })
            .map_err(DataError::from);
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for EpochIter {}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Hang up first so a worker blocked on a full queue wakes and exits.
        self.rx.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestResult;

    /// `n` 3×4×4 images; image i is filled with byte i, label i % 3.
    fn dataset(n: usize) -> Result<Arc<ImageDataset>> {
        let images = (0..n).flat_map(|i| vec![i as u8; 48]).collect();
        let labels = (0..n).map(|i| (i % 3) as u32).collect();
        let names = vec!["a".into(), "b".into(), "c".into()];
        Ok(Arc::new(ImageDataset::new(
            images,
            labels,
            (3, 4, 4),
            names,
        )?))
    }

    /// (indices, flattened pixels, labels) of one batch.
    type Plain = (Vec<usize>, Vec<f32>, Vec<u32>);

    fn collect(loader: &Loader, epoch: usize) -> Result<Vec<Plain>> {
        loader
            .epoch(epoch)
            .map(|b| {
                let b = b?;
                // The host's copy of the labels is the tensor's.
                assert_eq!(b.host_labels, b.labels.to_vec1::<u32>()?);
                Ok((b.indices, b.images.flatten_all()?.to_vec1()?, b.host_labels))
            })
            .collect()
    }

    #[test]
    fn rejects_batch_size_zero() -> TestResult {
        let cfg = LoaderConfig {
            batch_size: 0,
            ..LoaderConfig::eval(1)
        };
        assert!(matches!(
            Loader::new(dataset(4)?, cfg, Device::Cpu),
            Err(DataError::InvalidConfig(_))
        ));
        Ok(())
    }

    #[test]
    fn eval_order_covers_everything_with_partial_last_batch() -> TestResult {
        let loader = Loader::new(dataset(10)?, LoaderConfig::eval(4), Device::Cpu)?;
        assert_eq!(loader.batches_per_epoch(), 3);
        assert_eq!(loader.epoch(0).len(), 3);
        let batches = collect(&loader, 0)?;
        let idx: Vec<Vec<usize>> = batches.iter().map(|b| b.0.clone()).collect();
        assert_eq!(idx, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        // Pixels are byte / 255 of the right images, labels match.
        assert_eq!(batches[2].1[0], 8.0 / 255.0);
        assert_eq!(batches[2].1[48], 9.0 / 255.0);
        assert_eq!(batches[2].2, vec![2, 0]);
        let first = loader.epoch(0).next().ok_or("no batch")??;
        assert_eq!(first.images.dims(), &[4, 3, 4, 4]);
        assert_eq!(first.labels.dims(), &[4]);
        Ok(())
    }

    #[test]
    fn drop_last_drops_the_partial_batch() -> TestResult {
        let cfg = LoaderConfig {
            drop_last: true,
            ..LoaderConfig::train(4, 9)
        };
        let loader = Loader::new(dataset(10)?, cfg, Device::Cpu)?;
        assert_eq!(loader.batches_per_epoch(), 2);
        let batches = collect(&loader, 0)?;
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.0.len() == 4));
        Ok(())
    }

    #[test]
    fn same_seed_and_epoch_give_identical_batches() -> TestResult {
        let train = LoaderConfig::train(7, 42);
        let cfg = LoaderConfig {
            augmentation: train.augmentation.with_cutout(2),
            ..train
        };
        let a = Loader::new(dataset(40)?, cfg, Device::Cpu)?;
        let b = Loader::new(dataset(40)?, cfg, Device::Cpu)?;
        let (a3, b3) = (collect(&a, 3)?, collect(&b, 3)?);
        assert_eq!(a3, b3);
        // Each epoch is a permutation.
        let mut seen: Vec<usize> = a3.iter().flat_map(|b| b.0.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        // Different epoch or seed: different order.
        assert_ne!(a.order(3), a.order(4));
        let other = Loader::new(dataset(40)?, LoaderConfig { seed: 43, ..cfg }, Device::Cpu)?;
        assert_ne!(a.order(3), other.order(3));
        Ok(())
    }

    /// The workers' parts of a step, joined in rank order, are the single loader's
    /// batch, pixels (augmentation) included; an uneven split is refused.
    #[test]
    fn shards_of_a_batch_join_into_the_unsharded_batch() -> TestResult {
        let train = LoaderConfig::train(8, 9);
        let cfg = LoaderConfig {
            drop_last: true,
            augmentation: train.augmentation.with_cutout(2),
            ..train
        };
        let whole = collect(&Loader::new(dataset(40)?, cfg, Device::Cpu)?, 2)?;
        let parts = (0..4)
            .map(|rank| {
                collect(
                    &Loader::new(dataset(40)?, cfg, Device::Cpu)?.shard(rank, 4)?,
                    2,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(whole.len(), 5);
        for (step, batch) in whole.iter().enumerate() {
            let mut joined: Plain = (Vec::new(), Vec::new(), Vec::new());
            for part in &parts {
                assert_eq!(part[step].0.len(), 2);
                joined.0.extend(&part[step].0);
                joined.1.extend(&part[step].1);
                joined.2.extend(&part[step].2);
            }
            assert_eq!(&joined, batch);
        }
        let err = Loader::new(dataset(40)?, cfg, Device::Cpu)?
            .shard(0, 3)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("does not split evenly over 3 workers"),
            "{err}"
        );
        assert!(Loader::new(dataset(40)?, cfg, Device::Cpu)?
            .shard(4, 4)
            .is_err());
        Ok(())
    }

    #[test]
    fn augmentation_of_an_example_does_not_depend_on_batching() -> TestResult {
        // Same seed, different batch sizes and no shuffle: example i must get the same
        // augmented pixels, since its randomness depends only on (seed, epoch, i).
        let aug = Augmentation::standard().with_cutout(2);
        let cfg = |bs| LoaderConfig {
            batch_size: bs,
            shuffle: false,
            drop_last: false,
            augmentation: aug,
            seed: 5,
        };
        let per_example = |bs| -> Result<Vec<Vec<f32>>> {
            let loader = Loader::new(dataset(12)?, cfg(bs), Device::Cpu)?;
            Ok(collect(&loader, 1)?
                .into_iter()
                .flat_map(|b| b.1.chunks(48).map(<[f32]>::to_vec).collect::<Vec<_>>())
                .collect())
        };
        let (one, five) = (per_example(1)?, per_example(5)?);
        assert_eq!(one, five);
        // Augmentation really happened somewhere (flat images only change by zeroing).
        assert!(one
            .iter()
            .enumerate()
            .any(|(i, img)| img.iter().any(|&v| v != i as f32 / 255.0)));
        // And differs between epochs.
        let loader = Loader::new(dataset(12)?, cfg(4), Device::Cpu)?;
        assert_ne!(collect(&loader, 1)?, collect(&loader, 2)?);
        Ok(())
    }

    #[test]
    fn dropping_an_epoch_early_stops_the_worker() -> TestResult {
        let loader = Loader::new(dataset(64)?, LoaderConfig::train(1, 0), Device::Cpu)?;
        let mut it = loader.epoch(0);
        assert!(it.next().is_some());
        drop(it); // joins the worker; would hang if the worker ignored the hang-up
        Ok(())
    }
}
