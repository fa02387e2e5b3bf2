//! The attack engine's own work per step, without a network's cost: PGD on a linear
//! classifier of CIFAR-10-shaped inputs (batch 128, 10 steps), in image·steps per
//! second for each norm. What remains is what the engine does on the host around the
//! model's passes (starts, directions, momentum, projections, records, transfers),
//! which on a GPU runs while the device waits.

use std::time::Duration;

use candle_core::{DType, Device, ModuleT, Result, Tensor};
use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use rampart_attacks::{
    Attack, Bounds, Criterion as Goal, Eot, Init, Norm, Objective, Pgd, Restarts, StepSize,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// logits = flatten(x)·Wᵀ, W: (10, 3072).
struct Linear(Tensor);

impl ModuleT for Linear {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor> {
        xs.flatten_from(1)?.matmul(&self.0.t()?)
    }
}

fn engine_throughput(c: &mut Criterion) {
    let (batch, steps) = (128, 10);
    let device = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen::<f32>()).collect() };
    let weights = Tensor::from_vec(values(10 * 3072), (10, 3072), &device)
        .and_then(|w| w.affine(0.02, -0.01))
        .unwrap_or_else(|e| panic!("weights: {e}"));
    let xs = Tensor::from_vec(values(batch * 3072), (batch, 3, 32, 32), &device)
        .and_then(|x| x.to_dtype(DType::F32))
        .unwrap_or_else(|e| panic!("inputs: {e}"));
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let ys = Tensor::from_vec(labels, batch, &device).unwrap_or_else(|e| panic!("labels: {e}"));
    let model = Linear(weights);

    let mut group = c.benchmark_group(format!("engine/linear/batch{batch}/steps{steps}"));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements((batch * steps) as u64));
    let norms = [
        ("linf", Norm::Linf, 8.0 / 255.0, StepSize::Relative(0.25)),
        ("l2", Norm::L2, 0.5, StepSize::Relative(0.25)),
        ("l1", Norm::l1(), 12.0, StepSize::Relative(0.25)),
        ("l0", Norm::L0, 10.0, StepSize::Absolute(1.0)),
    ];
    for (name, norm, eps, step_size) in norms {
        let pgd = Pgd {
            norm,
            objective: Objective::CrossEntropy,
            criterion: Goal::Misclassified,
            steps,
            step_size,
            momentum: 0.9,
            backtrack: Some(1.5),
            restarts: Restarts::same(1, Init::Uniform),
            early_stop: false,
            eot: Eot::OFF,
        };
        group.bench_function(name, |b| {
            b.iter(
                || match pgd.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 0) {
                    Ok(r) => r,
                    Err(e) => panic!("attack failed: {e}"),
                },
            )
        });
    }
    group.finish();
}

criterion_group!(benches, engine_throughput);
