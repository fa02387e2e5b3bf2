//! PGD throughput in image·steps per second for each norm, on WRN-16-4 (CIFAR-10
//! shape), batch 128, CPU, random weights (speed does not depend on training).
//!
//! One sample is one attack call: `STEPS` forward/backward passes, one forward pass at
//! the last iterate and one to judge the result, so the figure includes the loop's
//! fixed costs. `RAMPART_BENCH_BATCH` and `RAMPART_BENCH_STEPS` override the defaults
//! for a quicker run.
//!
//! `training-attack/…`: fast AT's FGSM step with a random start as a training step
//! makes it, `perturb` (the points only), against `run` (the points judged by one more
//! forward pass), in images per second.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use rampart_attacks::{Attack, Bounds};
use rampart_models::{Classifier, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pgd_throughput(c: &mut Criterion) {
    let batch = env_or("RAMPART_BENCH_BATCH", 128);
    let steps = env_or("RAMPART_BENCH_STEPS", 2);
    let device = Device::Cpu;
    let model = match Classifier::new(ModelSpec::wrn(16, 4, 10), 0, &device) {
        Ok(m) => m,
        Err(e) => panic!("building WRN-16-4 failed: {e}"),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let pixels: Vec<f32> = (0..batch * 3 * 32 * 32).map(|_| rng.gen()).collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.gen_range(0..10)).collect();
    let xs =
        Tensor::from_vec(pixels, (batch, 3, 32, 32), &device).and_then(|x| x.to_dtype(DType::F32));
    let ys = Tensor::from_vec(labels, batch, &device);
    let (xs, ys) = match (xs, ys) {
        (Ok(xs), Ok(ys)) => (xs, ys),
        _ => panic!("building the batch failed"),
    };

    let mut group = c.benchmark_group(format!("pgd/wrn-16-4/batch{batch}/steps{steps}"));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements((batch * steps) as u64));
    for (name, norm, eps, step_size) in crate::common::threat_models() {
        let pgd = crate::common::pgd(norm, steps, step_size);
        group.bench_function(name, |b| {
            b.iter(
                || match pgd.run(&model.frozen(), Bounds::UNIT, &xs, &ys, &[eps], 0) {
                    Ok(r) => r,
                    Err(e) => panic!("attack failed: {e}"),
                },
            )
        });
    }
    group.finish();

    let fgsm = rampart_attacks::Fgsm::fast_at().as_pgd();
    let eps = 8.0 / 255.0;
    let mut group = c.benchmark_group(format!("training-attack/wrn-16-4/batch{batch}/fgsm-rs"));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(batch as u64));
    group.bench_function("run", |b| {
        b.iter(
            || match fgsm.run(&model.frozen(), Bounds::UNIT, &xs, &ys, &[eps], 0) {
                Ok(r) => r.len(),
                Err(e) => panic!("attack failed: {e}"),
            },
        )
    });
    group.bench_function("perturb", |b| {
        b.iter(
            || match fgsm.perturb(&model.frozen(), Bounds::UNIT, &xs, &ys, eps, 0) {
                Ok(r) => r.norm.len(),
                Err(e) => panic!("attack failed: {e}"),
            },
        )
    });
    group.finish();
}

criterion_group!(benches, pgd_throughput);
