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

/// Three steps of SGD with `config` on `dev` (fused, or the reference operations),
/// the gradients as candle gives them or (`views`) as views into one buffer at their
/// offsets, as a fused train pass hands them out (`rampart_models::backward`); the
/// weights and momentum buffers, flattened.
fn train(
    dev: &Device,
    config: SgdConfig,
    fused: bool,
    views: bool,
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
        let mut grads = loss.backward()?;
        if views {
            let parts = vars
                .iter()
                .map(|(_, v)| {
                    grads
                        .get(v.as_tensor())
                        .ok_or("no gradient")?
                        .flatten_all()
                        .map_err(Into::into)
                })
                .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
            let flat = Tensor::cat(&parts, 0)?;
            let mut at = 0;
            for (_, v) in &vars {
                let n = v.elem_count();
                grads.insert(v.as_tensor(), flat.narrow(0, at, n)?.reshape(v.dims())?);
                at += n;
            }
        }
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
        let cpu = train(&Device::Cpu, config, true, false)?;
        let on_gpu = train(&gpu, config, true, false)?;
        let reference = train(&gpu, config, false, false)?;
        // Gradients as views into one buffer: the same update, bit for bit.
        let viewed = train(&gpu, config, true, true)?;
        for (k, (a, b)) in on_gpu.iter().zip(&viewed).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "tensor {k}: gradients as views update differently ({config:?})"
            );
        }
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

/// Two epochs of normal training, fast AT (FGSM-RS on the device-resident loop, its
/// starts drawn on the GPU from the seed the step writes there), CCAT (its soft targets
/// made on the GPU), TRADES (its Gaussian start drawn by the trainer), RegMixup (its
/// mixing weight and partners drawn by the trainer, the mixing made on the GPU), SAT (its
/// Sinkhorn annealing made on the GPU) and AR-AdaLS (its state kept and updated on the
/// GPU) on WRN-10-1 and
/// 96 random 32×32 images, batch 32 (3 full batches per epoch): with the trainer's CUDA
/// graphs, one capture and a launch for every later full batch (5) per run, and the
/// weights of the eager run to within what the GPU's own run-to-run differences allow
/// (cuDNN's kernels may add in another order; the bound is far below what a wrong
/// batch, seed or update gives). Prints the last capture failure when graphs did not
/// replay.
#[test]
fn training_steps_replayed_from_cuda_graphs_equal_eager_steps() -> TestResult {
    use rampart_defenses::{
        train_graph_failure, train_graph_steps, with_train_graphs, ArAdaLs, ArAdaLsConfig, Ccat,
        FastAt, Normal, Progress, RegMixup, Sat, Trades, TrainConfig, Trainer, TrainingMethod,
    };
    use rampart_models::{Arch, Classifier, ModelSpec};
    use std::sync::Arc;
    let dev = Device::new_cuda(0)?;
    let pixels: Vec<u8> = values(96 * 3072, 7)
        .iter()
        .map(|v| ((v + 1.0) * 127.0) as u8)
        .collect();
    let labels: Vec<u32> = (0..96).map(|i| i % 10).collect();
    let names = (0..10).map(|c| format!("c{c}")).collect();
    let train = Arc::new(rampart_data::ImageDataset::new(
        pixels,
        labels,
        (3, 32, 32),
        names,
    )?);
    let test = train.take(32);
    let config = TrainConfig {
        batch_size: 32,
        ..TrainConfig::tiny(2)
    };
    // A new method for each run: AR-AdaLS learns its state from the run's batches.
    type Make = fn() -> Box<dyn TrainingMethod>;
    let methods: [(&str, Make); 7] = [
        ("normal", || Box::new(Normal::new())),
        ("fast AT", || Box::new(FastAt::wong_cifar10())),
        ("CCAT", || {
            Box::new(Ccat {
                attack: rampart_attacks::Pgd {
                    steps: 5,
                    ..rampart_attacks::Pgd::ccat_train()
                },
                ..Ccat::stutz_cifar10()
            })
        }),
        ("TRADES", || {
            Box::new(Trades {
                steps: 3,
                ..Trades::zhang_cifar10()
            })
        }),
        ("RegMixup", || Box::new(RegMixup::pinto_cifar10())),
        ("SAT", || {
            Box::new(Sat {
                attack: rampart_attacks::Pgd {
                    steps: 3,
                    ..rampart_attacks::Pgd::linf_pgd10()
                },
                sinkhorn_iters: 10,
                ..Sat::cifar10()
            })
        }),
        ("AR-AdaLS", || {
            Box::new(ArAdaLs::new(ArAdaLsConfig::qin_cifar10()).expect("AR-AdaLS's settings"))
        }),
    ];
    let run = |method: &dyn TrainingMethod,
               graphs: bool|
     -> Result<Vec<f32>, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut model = Classifier::new(
            ModelSpec::cifar(
                Arch::Wrn {
                    depth: 10,
                    widen: 1,
                },
                10,
            ),
            3,
            &dev,
        )?;
        let mut go = || {
            Trainer::new(config.clone(), dir.path())?
                .progress(Progress::Hidden)
                .run(&mut model, method, Arc::clone(&train), &test)
        };
        rampart_attacks::with_device_resident_pgd(|| {
            if graphs {
                with_train_graphs(go)
            } else {
                go()
            }
        })?;
        let mut all = Vec::new();
        for (_, v) in model.named_vars() {
            all.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(all)
    };
    let worst = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    for (what, make) in methods {
        let eager = run(make().as_ref(), false)?;
        let again = run(make().as_ref(), false)?;
        let before = train_graph_steps();
        let graphed = run(make().as_ref(), true)?;
        let after = train_graph_steps();
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, 5),
            "{what}: captures and launches (last failure: {:?})",
            train_graph_failure()
        );
        let (noise, diff) = (worst(&eager, &again), worst(&eager, &graphed));
        eprintln!(
            "{what}, 6 steps: eager runs differ by {noise:.1e}, graphed and eager by {diff:.1e}"
        );
        assert!(
            diff <= 1e-4f32.max(10.0 * noise),
            "{what}: graphed weights differ by {diff}"
        );
    }
    Ok(())
}
