//! The fused SGD kernels on a GPU (every parameter in one multi-tensor launch,
//! `sgd_multi`: tensors of one, several and many 4,096-element blocks, decayed and not)
//! against the CPU: the kernels do the same float
//! operations (no FMA), so weights and momentum buffers agree to within what the
//! gradients (candle's, on each device) differ by; and with candle's own operations on
//! the GPU (which may fuse a multiply and an add) to 1e-6.
//!
//! Built only with `--features cuda` and run on a GPU machine:
//! `cargo test --release -p rampart-defenses --features cuda --test cuda`. With the
//! feature on and no GPU these tests fail, on purpose: the build claims CUDA.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use rampart_defenses::{DecayScope, Sgd, SgdConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Seeded values in [−1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

const SHAPES: [&[usize]; 3] = [&[7], &[16, 3, 3, 3], &[3, 50_000]];

/// Three steps of SGD with `config` on `dev` (fused, or the reference operations);
/// the weights and momentum buffers, flattened.
fn train(
    dev: &Device,
    config: SgdConfig,
    fused: bool,
) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    let vars: Vec<(String, Var)> = SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v = values(s.iter().product(), i as u64);
            Ok((format!("p{i}"), Var::from_vec(v, *s, dev)?))
        })
        .collect::<candle_core::Result<_>>()?;
    let mut sgd = Sgd::new(vars.clone(), config)?;
    for step in 0..3u64 {
        let mut loss = Tensor::new(0f32, dev)?;
        for (i, ((_, v), s)) in vars.iter().zip(SHAPES).enumerate() {
            let t = Tensor::from_vec(
                values(s.iter().product(), 100 + 10 * step + i as u64),
                s,
                dev,
            )?;
            let w = v.as_tensor();
            loss = (loss + ((w * t)? + (w.sqr()? * 0.5)?)?.sum_all()?)?;
        }
        let grads = loss.backward()?;
        let lr = 0.1 / (step + 1) as f64;
        if fused {
            sgd.step(&grads, lr)?;
        } else {
            sgd.step_reference(&grads, lr)?;
        }
    }
    let mut out: Vec<Vec<f32>> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    for (_, b) in sgd.state()? {
        out.push(b.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

#[test]
fn fused_sgd_on_the_gpu_equals_the_cpu() -> TestResult {
    std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    let gpu = Device::new_cuda(0)?;
    for (momentum, nesterov) in [(0.9, true), (0.9, false), (0.0, false)] {
        let config = SgdConfig {
            momentum,
            nesterov,
            weight_decay: 5e-4,
            decay_scope: DecayScope::WeightsOnly,
        };
        let cpu = train(&Device::Cpu, config, true)?;
        let on_gpu = train(&gpu, config, true)?;
        let reference = train(&gpu, config, false)?;
        for (k, ((a, b), r)) in cpu.iter().zip(&on_gpu).zip(&reference).enumerate() {
            // The gradients themselves come from candle's kernels on each device.
            let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-6,
                "tensor {k}: GPU differs from CPU by {worst} ({config:?})"
            );
            let same = b
                .iter()
                .zip(r)
                .all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()));
            assert!(
                same,
                "tensor {k}: fused differs from candle's operations ({config:?})"
            );
        }
    }
    Ok(())
}

/// The fused SGD kernels compile with NVRTC. Needs the CUDA libraries, not a GPU.
#[test]
fn sgd_kernels_compile_with_nvrtc() {
    let ptx = rampart_defenses::sgd_kernels_ptx().expect("NVRTC compiles the SGD kernels");
    for k in ["sgd_momentum", "sgd_weight", "sgd_multi"] {
        assert!(
            ptx.contains(&format!(".entry {k}")),
            "no kernel {k} in the PTX"
        );
    }
}
