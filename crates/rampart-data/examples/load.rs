//! Loads a data set with auto-detection, reports what was found and how long it took,
//! then times one augmented training epoch through the loader.
//!
//! `cargo run --release -p rampart-data --example load -- cifar10 DATA_DIR` (or `cifar100`, `mnist`, `svhn`)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use rampart_data::{load, DatasetKind, Loader, LoaderConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: load <cifar10|cifar100|mnist|svhn> <DATA_DIR>";
    let kind: DatasetKind = args.next().ok_or(usage)?.parse()?;
    let dir = PathBuf::from(args.next().ok_or(usage)?);

    let start = Instant::now();
    let splits = load(kind, &dir)?;
    let elapsed = start.elapsed();

    println!(
        "{kind}: {} train + {} test images of shape {:?}, {} classes, loaded in {:.2} s",
        splits.train.len(),
        splits.test.len(),
        splits.train.shape(),
        splits.train.num_classes(),
        elapsed.as_secs_f64()
    );
    println!("train class counts: {:?}", splits.train.class_counts());
    println!(
        "last 1,000 test images per class: {:?}",
        splits.test.tail(1000).class_counts()
    );

    let config = LoaderConfig::train(128, 0);
    let loader = Loader::new(Arc::new(splits.train), config, Device::Cpu)?;
    let start = Instant::now();
    let mut examples = 0;
    for batch in loader.epoch(0) {
        examples += batch?.indices.len();
    }
    println!(
        "one epoch of {examples} examples ({} batches of {}, {:?}) in {:.2} s",
        loader.batches_per_epoch(),
        config.batch_size,
        config.augmentation,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
