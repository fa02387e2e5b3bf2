//! The attack engine's own work per step, without a network's cost: PGD on a linear
//! classifier of CIFAR-10-shaped inputs (batch 128, 10 steps, no example fooled), in
//! image·steps per second for each norm, and APGD-CE, FAB-T (one target class) and
//! Square (L∞, L2) with the same steps (queries).
//! What remains is what the engine does on the host around the model's passes
//! (starts, directions, momentum, projections, records, transfers), which on a GPU
//! runs while the device waits.

use std::time::Duration;

use candle_core::{DType, Device, ModuleT, Result, Tensor};
use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use rampart_attacks::{Apgd, Attack, Bounds, Fab, Norm, Square};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// logits = flatten(x)·Wᵀ + b, W: (10, 3072) small, b = (8, 0, …, 0): class 0 wins
/// by a margin no ε of the bench can overturn, so every example stays attacked for
/// every step (APGD stops attacking fooled examples) and its gradient stays non-zero.
struct Linear {
    w: Tensor,
    b: Tensor,
}

impl ModuleT for Linear {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor> {
        xs.flatten_from(1)?
            .matmul(&self.w.t()?)?
            .broadcast_add(&self.b)
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
    let ys = Tensor::zeros(batch, DType::U32, &device).unwrap_or_else(|e| panic!("labels: {e}"));
    let mut bias = vec![0f32; 10];
    bias[0] = 8.0;
    let b = Tensor::new(bias.as_slice(), &device).unwrap_or_else(|e| panic!("bias: {e}"));
    let model = Linear { w: weights, b };

    let mut group = c.benchmark_group(format!("engine/linear/batch{batch}/steps{steps}"));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements((batch * steps) as u64));
    for (name, norm, eps, step_size) in crate::common::threat_models() {
        let pgd = crate::common::pgd(norm, steps, step_size);
        group.bench_function(name, |b| {
            b.iter(
                || match pgd.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 0) {
                    Ok(r) => r,
                    Err(e) => panic!("attack failed: {e}"),
                },
            )
        });
    }
    // APGD-CE (AutoAttack's first attack) with the same budget of steps.
    for (name, norm, eps) in [
        ("apgd-ce-linf", Norm::Linf, 8.0 / 255.0),
        ("apgd-ce-l2", Norm::L2, 0.5),
    ] {
        let apgd = Apgd {
            steps,
            ..Apgd::ce(norm)
        };
        group.bench_function(name, |b| {
            b.iter(
                || match apgd.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 0) {
                    Ok(r) => r,
                    Err(e) => panic!("attack failed: {e}"),
                },
            )
        });
    }
    // FAB-T (AutoAttack's third attack) towards one target class with the same steps:
    // two projections onto the linearised boundary per example and step.
    for (name, norm, eps) in [
        ("fab-t-linf", Norm::Linf, 8.0 / 255.0),
        ("fab-t-l2", Norm::L2, 0.5),
    ] {
        let fab = Fab {
            steps,
            target_classes: 1,
            ..Fab::targeted(norm)
        };
        group.bench_function(name, |b| {
            b.iter(
                || match fab.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 0) {
                    Ok(r) => r,
                    Err(e) => panic!("attack failed: {e}"),
                },
            )
        });
    }
    // Square (AutoAttack's last, black-box attack): `steps` queries, a proposal per
    // example and query.
    for (name, norm, eps) in [
        ("square-linf", Norm::Linf, 8.0 / 255.0),
        ("square-l2", Norm::L2, 0.5),
    ] {
        let square = Square {
            queries: steps,
            ..Square::autoattack(norm)
        };
        group.bench_function(name, |b| {
            b.iter(
                || match square.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 0) {
                    Ok(r) => r,
                    Err(e) => panic!("attack failed: {e}"),
                },
            )
        });
    }
    group.finish();
}

criterion_group!(benches, engine_throughput);
