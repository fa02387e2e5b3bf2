//! Helpers shared by the CUDA test binaries (`cuda.rs`, `cuda_bf16.rs`): deterministic
//! inputs and the distances between a CPU reference and a GPU result.
#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{DType, Device, Tensor};

/// Deterministic pseudo-random values in [−½, ½) (a 64-bit LCG; no RNG crate needed).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32) / ((1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// A CPU tensor of [`values`].
pub fn tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap()
}

/// `t` on the CPU in f32.
pub fn host(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

pub fn max_abs(t: &Tensor) -> f32 {
    host(t)
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a − b| / max(max |a|, floor), with `a` the reference.
pub fn rel_diff(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    let (a, b) = (host(a), host(b));
    assert_eq!(a.dims(), b.dims());
    max_abs(&(&a - &b).unwrap()) / max_abs(&a).max(floor)
}

/// ‖a − b‖₂ / max(‖a‖₂, floor), with `a` the reference. Whole networks are
/// compared in this norm: a pre-activation within rounding of zero may take the
/// other side of a ReLU on the GPU, which moves a few entries of a gradient by a lot
/// and leaves the rest alone.
pub fn rel_l2(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    let (a, b) = (host(a), host(b));
    assert_eq!(a.dims(), b.dims());
    l2(&(&a - &b).unwrap()) / l2(&a).max(floor)
}

pub fn l2(t: &Tensor) -> f32 {
    host(t)
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

/// ⟨t, p⟩ for a fixed probe p: a scalar whose gradient reaches every input.
pub fn probe(t: &Tensor, seed: u64) -> Tensor {
    let p = tensor(t.dims(), seed).to_device(t.device()).unwrap();
    (t * &p).unwrap().sum_all().unwrap()
}
