//! Staged uploads on a GPU (`rampart_data::upload`): uploads queued behind a busy
//! stream, more of each length than there are page-locked buffers, deliver exactly
//! their values (a buffer rewritten before its copy ran would deliver later values);
//! the loader's batches and `batch_tensors` on the GPU equal the CPU's.
//!
//! Built only with `--features cuda` and run on a GPU machine:
//! `cargo test --release -p rampart-data --features cuda --test cuda`. With the feature
//! on and no GPU these tests fail, on purpose: the build claims CUDA.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rampart_data::upload::{staged_uploads, tensor, with_pinned_uploads, SLOTS, STAGED_MIN_BYTES};
use rampart_data::{ImageDataset, Loader, LoaderConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Some hundred milliseconds of work queued on `dev`'s stream (8192² matrix products
/// of ones, scaled to stay ones), not waited for.
fn keep_busy(dev: &Device) -> candle_core::Result<Tensor> {
    let a = Tensor::ones((8192, 8192), DType::F32, dev)?;
    let mut c = a.clone();
    for _ in 0..12 {
        c = (a.matmul(&c)? * (1.0 / 8192.0))?;
    }
    Ok(c)
}

/// Upload `i`'s values: distinct for every upload and position.
fn values(i: usize, len: usize) -> Vec<f32> {
    (0..len).map(|j| (i * 7919 + j % 100_003) as f32).collect()
}

#[test]
fn staged_uploads_behind_a_busy_stream_deliver_their_own_values() -> TestResult {
    let dev = Device::new_cuda(0)?;
    let lengths = [128 * 3072, 100 * 3072, 128 * 3072];
    let uploads = 6 * SLOTS;
    let before = staged_uploads();
    let busy = keep_busy(&dev)?;
    let (mut sent, mut wide) = (Vec::new(), Vec::new());
    with_pinned_uploads(|| -> candle_core::Result<()> {
        for i in 0..uploads {
            let len = lengths[i % lengths.len()];
            let v = values(i, len);
            if i % 3 == 2 {
                // f64 rows, as a random start's perturbations are drawn.
                let v: Vec<f64> = v.iter().map(|&x| f64::from(x) + 0.5).collect();
                wide.push((tensor(v.clone(), len, &dev)?, v));
            } else {
                sent.push((tensor(v.clone(), (len / 3072, 3, 32, 32), &dev)?, v));
            }
        }
        Ok(())
    })?;
    assert_eq!(staged_uploads() - before, uploads);
    for (t, v) in &sent {
        assert_eq!(&t.flatten_all()?.to_vec1::<f32>()?, v);
    }
    for (t, v) in &wide {
        assert_eq!(&t.to_vec1::<f64>()?, v);
    }
    // The busy work itself is untouched.
    assert_eq!(busy.max_all()?.to_scalar::<f32>()?, 1.0);
    // Too small to stage, or not asked for: the ordinary copy.
    let small = values(1, STAGED_MIN_BYTES / 4 - 1);
    let t = with_pinned_uploads(|| tensor(small.clone(), small.len(), &dev))?;
    assert_eq!(t.to_vec1::<f32>()?, small);
    let big = values(2, 128 * 3072);
    let t = tensor(big.clone(), big.len(), &dev)?;
    assert_eq!(t.to_vec1::<f32>()?, big);
    assert_eq!(staged_uploads() - before, uploads);
    Ok(())
}

#[test]
fn loader_batches_on_the_gpu_equal_the_cpus() -> TestResult {
    let dev = Device::new_cuda(0)?;
    let n = 300;
    let images = (0..n * 3072).map(|i| (i * 31 % 251) as u8).collect();
    let labels = (0..n).map(|i| (i % 10) as u32).collect();
    let names = (0..10).map(|c| format!("c{c}")).collect();
    let data = Arc::new(ImageDataset::new(images, labels, (3, 32, 32), names)?);
    let config = LoaderConfig::train(64, 7);
    let cpu = Loader::new(Arc::clone(&data), config, Device::Cpu)?;
    let gpu = Loader::new(Arc::clone(&data), config, dev.clone())?;
    let before = staged_uploads();
    let _busy = keep_busy(&dev)?;
    let on_gpu: Vec<_> = with_pinned_uploads(|| gpu.epoch(1).collect::<Result<_, _>>())?;
    assert_eq!(staged_uploads() - before, on_gpu.len());
    let on_cpu: Vec<_> = cpu.epoch(1).collect::<Result<_, _>>()?;
    assert_eq!(on_gpu.len(), on_cpu.len());
    for (g, c) in on_gpu.iter().zip(&on_cpu) {
        assert_eq!(g.images.dims(), c.images.dims());
        assert_eq!(
            g.images.flatten_all()?.to_vec1::<f32>()?,
            c.images.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(g.labels.to_vec1::<u32>()?, c.labels.to_vec1::<u32>()?);
    }
    let rows: Vec<usize> = (0..n).rev().step_by(2).collect();
    let (gx, gy) = with_pinned_uploads(|| data.batch_tensors(&rows, &dev))?;
    let (cx, cy) = data.batch_tensors(&rows, &Device::Cpu)?;
    assert_eq!(
        gx.flatten_all()?.to_vec1::<f32>()?,
        cx.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(gy.to_vec1::<u32>()?, cy.to_vec1::<u32>()?);
    Ok(())
}
