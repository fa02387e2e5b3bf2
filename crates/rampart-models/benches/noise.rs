//! A stochastic student's noise on the CPU: one layer's z for a batch of 128 images of
//! 32×32×16 values (2.1 M values), drawn by `LayerNoise` (the counter-based generator
//! that a GPU runs too), against the sequential Xoshiro256++ ziggurat stream per image
//! that it replaced, on the same threads.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, Criterion, Throughput};
use rampart_models::kernels::noise::LayerNoise;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;

const SHAPE: (usize, usize, usize, usize) = (128, 32, 32, 16);

fn layer_noise(c: &mut Criterion) {
    let x = Tensor::zeros(SHAPE, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("allocating the activations failed: {e}"));
    let n = x.elem_count();
    let per = n / SHAPE.0;
    let mut group = c.benchmark_group("layer_noise_128x32x32x16");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(20);
    let mut seed = 0u64;
    group.bench_function("counter_box_muller", |b| {
        b.iter(|| {
            seed += 1;
            x.apply_op1_no_bwd(&LayerNoise { seed, first: 0 })
                .unwrap_or_else(|e| panic!("{e}"))
        })
    });
    group.bench_function("xoshiro_ziggurat", |b| {
        b.iter(|| {
            // As the replaced code did: a fresh buffer, filled per image, moved into a tensor.
            seed += 1;
            let mut out = vec![0f32; n];
            out.par_chunks_mut(per).enumerate().for_each(|(i, image)| {
                let mut rng = Xoshiro256PlusPlus::seed_from_u64(
                    seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                image
                    .iter_mut()
                    .for_each(|v| *v = rng.sample(StandardNormal));
            });
            Tensor::from_vec(out, SHAPE, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
        })
    });
    group.finish();
}

criterion_group!(benches, layer_noise);
