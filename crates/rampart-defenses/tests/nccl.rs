//! Data-parallel training through NCCL on a GPU machine: one worker trains like the
//! plain path, and the collectives add and broadcast across every visible GPU.
//!
//! Built only with `--features nccl` and run where NCCL and a GPU are present:
//! `cargo test --release -p rampart-defenses --features nccl --test nccl`. With the
//! feature on and no GPU these tests fail, on purpose: the build claims CUDA.
#![cfg(feature = "nccl")]

use std::sync::Arc;
use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::CudaContext;
use candle_core::{Device, Tensor};
use rampart_data::ImageDataset;
use rampart_defenses::parallel::{Collective, NcclGroup};
use rampart_defenses::{Normal, Progress, TrainConfig, Trainer, MODEL_FILE};
use rampart_models::{Arch, Classifier, ModelSpec};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const JOIN: Duration = Duration::from_secs(120);

/// `n` 3×8×8 images of two classes (dark and bright), deterministic.
fn toy(n: usize, salt: usize) -> Result<ImageDataset, Box<dyn std::error::Error>> {
    let mut images = Vec::with_capacity(n * 192);
    for i in 0..n {
        let base = if i % 2 == 0 { 40 } else { 140 };
        images.extend((0..192).map(|j| (base + (i * 31 + j * 17 + salt) % 61) as u8));
    }
    let labels = (0..n).map(|i| (i % 2) as u32).collect();
    let names = vec!["dark".into(), "bright".into()];
    Ok(ImageDataset::new(images, labels, (3, 8, 8), names)?)
}

/// WRN-10-1 for 3×8×8 images of two classes.
fn spec() -> ModelSpec {
    let wrn = Arch::Wrn {
        depth: 10,
        widen: 1,
    };
    let (mean, std) = (rampart_models::CIFAR10_MEAN, rampart_models::CIFAR10_STD);
    ModelSpec::for_input(wrn, 2, [3, 8, 8], &mean, &std)
}

fn gpu(ordinal: usize) -> Device {
    // Full f32, as `rampart` runs unless asked for TF32 (set before any CUDA call).
    std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    let dev = Device::new_cuda(ordinal).expect("a CUDA device (built with --features nccl)");
    rampart_models::cuda::prepare(&dev, rampart_models::Precision::F32).expect("CUDA set-up");
    dev
}

type Weights = Vec<Vec<f32>>;

/// Trains the toy model on `dev` into `out`, through `group` if given; the saved weights.
fn train(
    dev: &Device,
    out: &std::path::Path,
    group: Option<Arc<dyn Collective>>,
) -> Result<Weights, Box<dyn std::error::Error>> {
    let mut model = Classifier::new(spec(), 5, dev)?;
    let mut trainer = Trainer::new(TrainConfig::tiny(2), out)?.progress(Progress::Hidden);
    if let Some(group) = group {
        trainer = trainer.parallel(group);
    }
    trainer.run(
        &mut model,
        &Normal::new(),
        Arc::new(toy(48, 1)?),
        &toy(8, 2)?,
    )?;
    let saved = Classifier::load(out.join(MODEL_FILE), &Device::Cpu)?;
    Ok(saved
        .named_vars()
        .into_iter()
        .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?)
}

fn largest_gap(a: &Weights, b: &Weights) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// World size 1 through NCCL equals the plain path: bit for bit when the GPU path is
/// deterministic, and never further from it than two plain runs are from each other.
#[test]
fn nccl_with_one_worker_trains_like_the_plain_path() -> TestResult {
    let dev = gpu(0);
    let dir = tempfile::tempdir()?;
    let plain = train(&dev, &dir.path().join("plain"), None)?;
    let again = train(&dev, &dir.path().join("again"), None)?;
    let group = NcclGroup::join(&dev, 0, 1, &dir.path().join("rendezvous"), JOIN)?;
    let nccl = train(&dev, &dir.path().join("nccl"), Some(Arc::new(group)))?;
    let (noise, gap) = (largest_gap(&plain, &again), largest_gap(&plain, &nccl));
    println!("plain vs plain: {noise:e}; plain vs NCCL with one worker: {gap:e}");
    assert!(
        gap <= noise,
        "NCCL with one worker differs by {gap}, two plain runs by {noise}"
    );
    Ok(())
}

type Exchanged = Result<(Vec<f32>, Vec<f64>), String>;

/// Every visible GPU as one worker (threads here; `rampart train --workers` uses
/// processes): every worker gets the sum, and worker 0's values are broadcast.
#[test]
fn nccl_adds_and_broadcasts_across_the_visible_gpus() -> TestResult {
    let n = CudaContext::device_count()? as usize;
    println!("{n} visible GPU(s)");
    let dir = tempfile::tempdir()?;
    let rendezvous = dir.path().join("rendezvous");
    let results: Vec<Exchanged> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let rendezvous = &rendezvous;
                s.spawn(move || -> Exchanged {
                    let run = || -> Result<_, Box<dyn std::error::Error>> {
                        let dev = gpu(rank);
                        let g = NcclGroup::join(&dev, rank, n, rendezvous, JOIN)?;
                        let r = rank as f32;
                        let sum = g.all_reduce_sum(&Tensor::new(&[r, 1.0], &dev)?)?;
                        let root = g.broadcast(&Tensor::new(&[f64::from(r) + 0.5], &dev)?)?;
                        Ok((sum.to_vec1::<f32>()?, root.to_vec1::<f64>()?))
                    };
                    run().map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a worker panicked".into())))
            .collect()
    });
    let expected = vec![(n * (n - 1) / 2) as f32, n as f32];
    for r in results {
        let (sum, root) = r?;
        assert_eq!(sum, expected);
        assert_eq!(root, vec![0.5]);
    }
    Ok(())
}
