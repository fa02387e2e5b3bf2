//! One SGD step (Nesterov momentum 0.9, weight decay 5e-4) over every trainable
//! parameter of WRN-16-4 (2.75 M values in 44 tensors), CPU: the fused in-place kernels
//! (`Sgd::step`) against the plain tensor operations (`Sgd::step_reference`).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, Criterion, Throughput};
use rampart_defenses::{Sgd, SgdConfig};
use rampart_models::{Classifier, ModelSpec};

/// Σ (w²/2 + w) over the variables.
fn quadratic(vars: &[(String, candle_core::Var)]) -> candle_core::Result<Tensor> {
    let mut total = Tensor::new(0f32, &Device::Cpu)?;
    for (_, v) in vars {
        let w = v.as_tensor();
        total = (total + ((w.sqr()? * 0.5)? + w)?.sum_all()?)?;
    }
    Ok(total)
}

fn sgd_step(c: &mut Criterion) {
    let model = match Classifier::new(ModelSpec::wrn(16, 4, 10), 0, &Device::Cpu) {
        Ok(m) => m,
        Err(e) => panic!("building WRN-16-4 failed: {e}"),
    };
    let vars = model.trainable_vars();
    let values: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    // A loss whose gradient is every weight plus 1: one backward pass gives a full store.
    let loss = quadratic(&vars).unwrap_or_else(|e| panic!("building the loss failed: {e}"));
    let grads = match loss.backward() {
        Ok(g) => g,
        Err(e) => panic!("backward failed: {e}"),
    };
    let mut group = c.benchmark_group("sgd_step_wrn16_4");
    group.throughput(Throughput::Elements(values as u64));
    group.sample_size(20);
    let mut fused = Sgd::new(vars.clone(), SgdConfig::cifar()).unwrap_or_else(|e| panic!("{e}"));
    group.bench_function("fused", |b| {
        b.iter(|| fused.step(&grads, 1e-6).unwrap_or_else(|e| panic!("{e}")))
    });
    let mut reference = Sgd::new(vars, SgdConfig::cifar()).unwrap_or_else(|e| panic!("{e}"));
    group.bench_function("reference", |b| {
        b.iter(|| {
            reference
                .step_reference(&grads, 1e-6)
                .unwrap_or_else(|e| panic!("{e}"))
        })
    });
    group.finish();
}

criterion_group!(benches, sgd_step);
