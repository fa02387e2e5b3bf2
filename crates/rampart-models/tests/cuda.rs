//! The CUDA path against the CPU path: convolutions (forward, input and kernel
//! gradients) and whole networks (eval logits, attack input gradients, train-mode
//! logits, every parameter gradient and the running statistics).
//!
//! Built only with `--features cuda` and run on a machine with an NVIDIA GPU:
//! `cargo test --release -p rampart-models --features cuda --test cuda`. With the
//! feature on and no GPU these tests fail, on purpose: the build claims CUDA.
//!
//! The models run in full f32 (`NVIDIA_TF32_OVERRIDE=0`, as the `rampart` binary
//! sets it unless a device asks for TF32), so the tolerances are those of f32
//! rounding through a deep network.
#![cfg(feature = "cuda")]

mod common;
use common::{l2, max_abs, probe, rel_diff, rel_l2, tensor, values};

use candle_core::{Device, ModuleT, Tensor, Var};
use rampart_models::{kernels::conv::conv2d_nhwc, Arch, Classifier, ModelSpec, NoiseSpec, OatSpec};

fn gpu() -> Device {
    // Full f32, as `rampart` runs unless asked for TF32 (set before any CUDA call).
    std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    let dev = Device::new_cuda(0)
        .expect("a CUDA device (this test binary was built with --features cuda)");
    rampart_models::cuda::prepare(&dev, rampart_models::Precision::F32).unwrap();
    dev
}

#[test]
fn convolution_matches_cpu() {
    let dev = gpu();
    // (batch, size, c_in, c_out, kernel, stride, padding): WRN's 3×3 stride 1 and 2,
    // the 1×1 projection, an odd size (output padding in the backward pass).
    for (b, hw, ci, co, k, s, p) in [
        (2, 8, 4, 6, 3, 1, 1),
        (2, 8, 4, 6, 3, 2, 1),
        (3, 7, 5, 3, 3, 2, 1),
        (2, 8, 6, 4, 1, 2, 0),
        (1, 9, 3, 5, 3, 1, 0),
    ] {
        let name = format!("b{b} {hw}² {ci}→{co} k{k} s{s} p{p}");
        let x_cpu = Var::from_tensor(&tensor(&[b, hw, hw, ci], 1)).unwrap();
        let w_cpu = Var::from_tensor(&tensor(&[co, ci, k, k], 2)).unwrap();
        let y_cpu = conv2d_nhwc(x_cpu.as_tensor(), w_cpu.as_tensor(), s, p).unwrap();
        let g_cpu = rampart_models::backward(&probe(&y_cpu, 3)).unwrap();

        let x_gpu = Var::from_tensor(&x_cpu.as_tensor().to_device(&dev).unwrap()).unwrap();
        let w_gpu = Var::from_tensor(&w_cpu.as_tensor().to_device(&dev).unwrap()).unwrap();
        let y_gpu = conv2d_nhwc(x_gpu.as_tensor(), w_gpu.as_tensor(), s, p).unwrap();
        let g_gpu = rampart_models::backward(&probe(&y_gpu, 3)).unwrap();

        let tol = 1e-4;
        let d = rel_diff(&y_cpu, &y_gpu, 1e-3);
        assert!(d < tol, "{name}: outputs differ by {d}");
        for (what, a, b) in [("input", &x_cpu, &x_gpu), ("kernel", &w_cpu, &w_gpu)] {
            let ga = g_cpu.get(a.as_tensor()).unwrap();
            let gb = g_gpu
                .get(b.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no {what} gradient on CUDA"));
            let d = rel_diff(ga, gb, 1e-3);
            assert!(d < tol, "{name}: {what} gradients differ by {d}");
        }
        // Attack mode (a detached kernel, as in a frozen model): the input gradient
        // alone, the same as before, and none for the kernel.
        let g_in = {
            let y = conv2d_nhwc(x_gpu.as_tensor(), &w_gpu.as_tensor().detach(), s, p).unwrap();
            rampart_models::backward(&probe(&y, 3)).unwrap()
        };
        assert!(
            g_in.get(w_gpu.as_tensor()).is_none(),
            "{name}: kernel gradient in attack mode"
        );
        let d = rel_diff(
            g_cpu.get(x_cpu.as_tensor()).unwrap(),
            g_in.get(x_gpu.as_tensor()).unwrap(),
            1e-3,
        );
        assert!(d < tol, "{name}: input-only gradient differs by {d}");
    }
}

/// A CPU model whose BatchNorms have non-trivial scale, shift and running statistics,
/// and the same model on the GPU (through the safetensors bytes, as a user loads one).
fn model_pair(spec: ModelSpec) -> (Classifier, Classifier) {
    let cpu = Classifier::new(spec, 3, &Device::Cpu).unwrap();
    for (seed, (name, var)) in (10..).zip(cpu.named_vars()) {
        let n = var.elem_count();
        let v = values(n, seed);
        let t = if name.ends_with("bn1.weight")
            || name.ends_with("bn2.weight")
            || name == "bn.weight"
        {
            v.iter().map(|x| 1.0 + x).collect::<Vec<_>>()
        } else if name.ends_with(".bias") && !name.starts_with("fc") {
            v
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(t, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    for s in 0..2 {
        cpu.forward_t(&(tensor(&[8, 3, 32, 32], 100 + s) + 0.5).unwrap(), true)
            .unwrap();
    }
    let bytes = cpu.to_bytes().unwrap();
    let gpu =
        Classifier::from_bytes(&bytes, std::path::Path::new("model.safetensors"), &gpu()).unwrap();
    (cpu, gpu)
}

/// A stochastic student (its noise drawn on the host from the same seed on both
/// devices, see [`fwd`]) and a λ-conditioned OAT model at λ = 0.3: the variants'
/// noise, BatchNorm and FiLM plumbing on CUDA.
fn variants() -> Vec<ModelSpec> {
    let mut student = ModelSpec::wrn(10, 2, 10);
    student.noise = Some(NoiseSpec { alpha: 0.1 });
    let mut oat = ModelSpec::wrn(10, 2, 10);
    oat.oat = Some(OatSpec::standard());
    vec![student, oat]
}

/// Every architecture (a WRN with identity and projected shortcuts, PreAct
/// ResNet-18, ResNet-20) and the two variants.
fn every_network() -> Vec<ModelSpec> {
    let mut specs = vec![
        ModelSpec::wrn(16, 2, 10),
        ModelSpec::cifar(Arch::PreactResnet18, 10),
        ModelSpec::cifar(Arch::Resnet20, 10),
    ];
    specs.extend(variants());
    specs
}

/// The architecture, and the variant if any.
fn label(spec: &ModelSpec) -> String {
    let variant = match (&spec.noise, &spec.oat) {
        (Some(_), _) => " student",
        (_, Some(_)) => " oat",
        _ => "",
    };
    format!("{}{variant}", spec.arch)
}

/// Sets the OAT models' λ on both devices.
fn settle(models: [&Classifier; 2]) {
    for m in models {
        if m.spec().oat.is_some() {
            m.set_lambda(0.3).unwrap();
        }
    }
}

/// A forward pass; a stochastic student first restarts its noise generator, so the
/// two devices draw the same noise.
fn fwd(m: &Classifier, x: &Tensor, train: bool) -> Tensor {
    if m.is_stochastic() {
        m.reseed_noise(11);
    }
    m.forward_t(x, train).unwrap()
}

/// The frozen view's forward pass (what attacks run), noise reseeded as in [`fwd`].
fn fwd_frozen(m: &Classifier, x: &Tensor) -> Tensor {
    if m.is_stochastic() {
        m.reseed_noise(11);
    }
    m.frozen().forward_t(x, false).unwrap()
}

/// The logits of the CPU and GPU models `[cpu, gpu]` on `x` (a CPU tensor) in train
/// or eval mode, asserted to agree to 1e-4 (relative L2).
fn logits_agree(
    name: &str,
    [cpu, gpu]: [&Classifier; 2],
    x: &Tensor,
    dev: &Device,
    train: bool,
) -> (Tensor, Tensor) {
    let mode = if train { "train" } else { "eval" };
    let logits_cpu = fwd(cpu, x, train);
    let logits_gpu = fwd(gpu, &x.to_device(dev).unwrap(), train);
    let d = rel_l2(&logits_cpu, &logits_gpu, 1.0);
    eprintln!("{name}: {mode} logits differ by {d}");
    assert!(d < 1e-4, "{name}: {mode} logits differ by {d}");
    (logits_cpu, logits_gpu)
}

fn images(b: usize, seed: u64) -> Tensor {
    (tensor(&[b, 3, 32, 32], seed) + 0.5).unwrap()
}

#[test]
fn networks_match_cpu_in_eval_and_attack_mode() {
    let dev = gpu();
    for spec in every_network() {
        let name = label(&spec);
        let (cpu, gpu) = model_pair(spec);
        settle([&cpu, &gpu]);
        let x = images(6, 7);
        let (_, logits_gpu) = logits_agree(&name, [&cpu, &gpu], &x, &dev, false);

        // The attack step: the input gradient through the frozen view.
        let xc = Var::from_tensor(&x).unwrap();
        let xg = Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
        let gc = probe(&fwd_frozen(&cpu, xc.as_tensor()), 5)
            .backward()
            .unwrap();
        let gg = probe(&fwd_frozen(&gpu, xg.as_tensor()), 5)
            .backward()
            .unwrap();
        let (a, b) = (
            gc.get(xc.as_tensor()).unwrap(),
            gg.get(xg.as_tensor()).unwrap(),
        );
        assert!(max_abs(a) > 0.0, "{name}: zero reference gradient");
        let d = rel_l2(a, b, 0.0);
        eprintln!("{name}: input gradients differ by {d}");
        assert!(d < 2e-3, "{name}: input gradients differ by {d}");

        // The classifier itself in eval mode gives parameter gradients too.
        let gc = rampart_models::backward(&probe(&fwd(&cpu, &x, false), 6)).unwrap();
        let gg = rampart_models::backward(&probe(&logits_gpu, 6)).unwrap();
        let gpu_vars: std::collections::HashMap<String, Var> =
            gpu.named_vars().into_iter().collect();
        for (var_name, vc) in cpu.named_vars() {
            if rampart_models::is_buffer(&var_name) {
                continue;
            }
            let vg = gpu_vars[&var_name].as_tensor();
            // Parameters off the path (the clean BatchNorms of an OAT model at λ > 0)
            // have no gradient, on either device.
            let Some(a) = gc.get(vc.as_tensor()) else {
                assert!(
                    gg.get(vg).is_none(),
                    "{name} {var_name}: gradient on CUDA only"
                );
                continue;
            };
            let b = gg
                .get(vg)
                .unwrap_or_else(|| panic!("{name} {var_name}: no eval-mode CUDA gradient"));
            let d = rel_l2(a, b, 1e-3);
            assert!(
                d < 2e-3,
                "{name} {var_name}: eval-mode gradients differ by {d}"
            );
        }
    }
}

/// The GPU's fused eval program (the network as one op: `kernels::device_eval`,
/// taken by frozen views under `RAMPART_CUDA_FUSED_EVAL`) against the CPU's frozen
/// view and the GPU's layer-by-layer one: logits and the attack's input gradient, for
/// a WRN (identity and projected shortcuts), PreAct ResNet-18, ResNet-20
/// (post-activation), a stochastic student (its noise drawn from the same seed on both
/// devices) and an OAT model at λ = 0.3.
#[test]
fn fused_eval_program_matches_cpu() {
    let dev = gpu();
    for spec in every_network() {
        let name = label(&spec);
        let (cpu, gpu) = model_pair(spec);
        settle([&cpu, &gpu]);
        let x = images(6, 7);
        let xc = Var::from_tensor(&x).unwrap();
        let xg = Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
        let lc = fwd_frozen(&cpu, xc.as_tensor());
        let fused = |x: &Tensor| {
            if gpu.is_stochastic() {
                gpu.reseed_noise(11);
            }
            gpu.fused_gpu_eval(x)
                .unwrap()
                .expect("every network here has the program")
        };
        let lg = fused(xg.as_tensor());
        let d = rel_l2(&lc, &lg, 1.0);
        eprintln!("{name}: fused GPU logits differ from the CPU's by {d}");
        assert!(d < 1e-4, "{name}: fused GPU logits differ by {d}");
        let layers = fwd_frozen(&gpu, xg.as_tensor());
        let d = rel_l2(&layers, &lg, 1.0);
        assert!(
            d < 1e-4,
            "{name}: fused and layer-by-layer GPU logits differ by {d}"
        );
        let gc = rampart_models::backward(&probe(&lc, 5)).unwrap();
        let gg = rampart_models::backward(&probe(&lg, 5)).unwrap();
        let (a, b) = (
            gc.get(xc.as_tensor()).unwrap(),
            gg.get(xg.as_tensor()).unwrap(),
        );
        assert!(max_abs(a) > 0.0, "{name}: zero reference gradient");
        let d = rel_l2(a, b, 0.0);
        eprintln!("{name}: fused GPU input gradients differ from the CPU's by {d}");
        assert!(d < 2e-3, "{name}: fused GPU input gradients differ by {d}");
        // An untracked input (a prediction) gives the same logits.
        let plain = fused(&x.to_device(&dev).unwrap());
        let d = rel_l2(&lg, &plain, 1.0);
        assert!(d < 1e-6, "{name}: untracked fused logits differ by {d}");
    }
}

#[test]
fn training_step_matches_cpu() {
    let dev = gpu();
    let mut specs = vec![
        ModelSpec::wrn(10, 2, 10),
        ModelSpec::cifar(Arch::Resnet20, 10),
    ];
    specs.extend(variants());
    for spec in specs {
        let name = label(&spec);
        let (cpu, gpu) = model_pair(spec);
        settle([&cpu, &gpu]);
        let x = images(8, 21);
        let (logits_cpu, logits_gpu) = logits_agree(&name, [&cpu, &gpu], &x, &dev, true);
        train_step_agrees(&name, [&cpu, &gpu], [&logits_cpu, &logits_gpu]);
    }
}

/// The GPU's fused train program (the network in train mode as one op on its flat
/// parameters: `kernels::device_train`, taken under `RAMPART_CUDA_FUSED_TRAIN`)
/// against the CPU's layer-by-layer training step: logits, every parameter gradient
/// and the running statistics, for a WRN (identity and projected shortcuts),
/// PreAct ResNet-18, ResNet-20 (post-activation), a stochastic student (its noise
/// from the same seed on both devices, α's gradient, the running noise scale) and an
/// OAT model at λ = 0.3 (then at per-row λ, mixed, in `oat_fused_train_matches_cpu`).
#[test]
fn fused_train_program_matches_cpu() {
    let dev = gpu();
    for spec in every_network() {
        let name = label(&spec);
        let (cpu, gpu) = model_pair(spec);
        settle([&cpu, &gpu]);
        let x = images(8, 21);
        let logits_cpu = fwd(&cpu, &x, true);
        if gpu.is_stochastic() {
            gpu.reseed_noise(11);
        }
        let logits_gpu = gpu
            .fused_gpu_train(&x.to_device(&dev).unwrap())
            .unwrap()
            .expect("every network here has the program");
        let d = rel_l2(&logits_cpu, &logits_gpu, 1.0);
        eprintln!("{name}: fused GPU train logits differ from the CPU's by {d}");
        assert!(d < 1e-4, "{name}: fused GPU train logits differ by {d}");
        train_step_agrees(
            &format!("{name} fused"),
            [&cpu, &gpu],
            [&logits_cpu, &logits_gpu],
        );
    }
}

/// The GPU's fused train program of an OAT model at per-row λ (λ = 0 and λ > 0 rows
/// mixed and out of order: both BatchNorm groups, the rows sorted and the logits put
/// back) against the CPU's train pass at the same λ: logits, every parameter gradient,
/// both BatchNorms' running statistics.
#[test]
fn oat_fused_train_matches_cpu() {
    let dev = gpu();
    let mut spec = ModelSpec::wrn(10, 2, 10);
    spec.oat = Some(OatSpec::standard());
    let (cpu, gpu) = model_pair(spec);
    let x = images(8, 21);
    let lambdas = [0.3, 0.0, 1.0, 0.0, 0.5, 0.0, 0.1, 1.0];
    let logits_cpu = cpu.forward_lambdas(&x, &lambdas, true).unwrap();
    let logits_gpu = gpu
        .fused_gpu_train_lambdas(&x.to_device(&dev).unwrap(), &lambdas)
        .unwrap()
        .expect("an OAT pre-activation network has the program");
    let d = rel_l2(&logits_cpu, &logits_gpu, 1.0);
    eprintln!("oat: fused GPU train logits at mixed λ differ from the CPU's by {d}");
    assert!(d < 1e-4, "oat: fused GPU train logits differ by {d}");
    train_step_agrees(
        "oat fused, mixed λ",
        [&cpu, &gpu],
        [&logits_cpu, &logits_gpu],
    );
}

/// After a train-mode forward pass of the CPU and GPU models `[cpu, gpu]` with logits
/// `[logits_cpu, logits_gpu]`: their running statistics agree to 1e-4 and every
/// parameter gradient (of the same probe of the logits) to 2e-3 (relative L2); a
/// parameter off the path has a gradient on neither device.
fn train_step_agrees(
    name: &str,
    [cpu, gpu]: [&Classifier; 2],
    [logits_cpu, logits_gpu]: [&Tensor; 2],
) {
    let gc = rampart_models::backward(&probe(logits_cpu, 9)).unwrap();
    let gg = rampart_models::backward(&probe(logits_gpu, 9)).unwrap();
    let gpu_vars: std::collections::HashMap<String, Var> = gpu.named_vars().into_iter().collect();
    let mut checked = 0;
    for (var_name, vc) in cpu.named_vars() {
        let vg = &gpu_vars[&var_name];
        if rampart_models::is_buffer(&var_name) {
            let d = rel_l2(vc.as_tensor(), vg.as_tensor(), 1e-2);
            assert!(
                d < 1e-4,
                "{name} {var_name}: running statistics differ by {d}"
            );
            continue;
        }
        let Some(a) = gc.get(vc.as_tensor()) else {
            assert!(
                gg.get(vg.as_tensor()).is_none(),
                "{name} {var_name}: gradient on CUDA only"
            );
            continue;
        };
        let b = gg
            .get(vg.as_tensor())
            .unwrap_or_else(|| panic!("{name} {var_name}: no CUDA gradient"));
        let d = rel_l2(a, b, 1e-3);
        assert!(
            d < 2e-3,
            "{name} {var_name}: gradients differ by {d} (norm {})",
            l2(a)
        );
        checked += 1;
    }
    assert!(checked > 10, "{name}: only {checked} parameters checked");
    eprintln!("{name}: {checked} parameter gradients agree");
}

/// Every kernel of `ops.cu` compiles with NVRTC. Needs the CUDA libraries, not a GPU:
/// `cargo test --release -p rampart-models --features cuda --test cuda compile`.
#[test]
fn kernels_compile_with_nvrtc() {
    let ptx = rampart_models::kernels::pointwise::ops_ptx().expect("NVRTC compiles ops.cu");
    for k in rampart_models::kernels::pointwise::KERNELS {
        assert!(
            ptx.contains(&format!(".entry {k}")),
            "no kernel {k} in the PTX"
        );
    }
    #[cfg(feature = "cudnn")]
    {
        let ptx =
            rampart_models::kernels::device_eval::ptx().expect("NVRTC compiles device_eval.cu");
        for k in rampart_models::kernels::device_eval::KERNELS {
            assert!(
                ptx.contains(&format!(".entry {k}")),
                "no kernel {k} in the PTX"
            );
        }
    }
}

/// A stochastic student's noise drawn on the GPU is the CPU's, bit for bit (the same
/// f32 operations in the same order on both), for an even and an odd image size, and
/// for a batch that starts at image 5 of a global batch.
#[test]
fn student_noise_is_drawn_on_the_gpu_as_on_the_cpu() {
    use rampart_models::kernels::noise::LayerNoise;
    for dims in [[4usize, 8, 8, 16], [3, 5, 5, 3]] {
        let cpu = Tensor::zeros(&dims[..], candle_core::DType::F32, &Device::Cpu).unwrap();
        let gpu_x = cpu.to_device(&gpu()).unwrap();
        for (seed, first) in [(0u64, 0u64), (7, 0), (u64::MAX, 0), (7, 5)] {
            let op = LayerNoise { seed, first };
            let want = cpu.apply_op1_no_bwd(&op).unwrap();
            let got = gpu_x.apply_op1_no_bwd(&op).unwrap();
            let (want, got) = (
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                got.to_device(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            let differ = want
                .iter()
                .zip(&got)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "{dims:?}, seed {seed}: {differ} of {} values differ",
                want.len()
            );
        }
    }
}

/// The kernels between the convolutions against their CPU twins: the ReLU's mask, the
/// eval-mode input gradient and the running-statistics update bit for bit; the
/// cross-entropy (labels, smoothed labels, soft targets; K = 10 and 1000) to f32
/// rounding, loss and gradient.
#[test]
fn pointwise_and_cross_entropy_kernels_match_cpu() {
    use candle_core::{CustomOp2, InplaceOp2};
    use rampart_models::kernels::pointwise::{BnEvalBackward, ReluMask, RunningUpdate, Stat};
    use rampart_models::kernels::xent::{cross_entropy, Targets};
    let dev = gpu();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
        v.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| (x + 0.0).to_bits())
            .collect()
    };
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let _ = ReluMask.name();

    // ReLU mask and the eval-mode input gradient (c = 24 channels).
    let c = 24;
    let dy = tensor(&[4096 * c], 1);
    let y = tensor(&[4096 * c], 2).relu().unwrap();
    let mask = |d: &Tensor, y: &Tensor| d.apply_op2_no_bwd(y, &ReluMask).unwrap();
    assert_eq!(bits(&mask(&dy, &y)), bits(&mask(&on(&dy), &on(&y))));
    let gamma = (tensor(&[c], 3) + 1.0).unwrap();
    let var = (tensor(&[c], 4).abs().unwrap() + 0.2).unwrap();
    for relu in [false, true] {
        let op = |var: Tensor| BnEvalBackward {
            var,
            eps: 1e-5,
            relu,
            c,
        };
        let cpu = dy.apply_op3_no_bwd(&y, &gamma, &op(var.clone())).unwrap();
        let gpu = on(&dy)
            .apply_op3_no_bwd(&on(&y), &on(&gamma), &op(on(&var)))
            .unwrap();
        assert_eq!(bits(&cpu), bits(&gpu), "eval backward, relu {relu}");
    }

    // Running statistics from saved [mean | inv_std].
    let saved = (tensor(&[2 * c], 5).abs().unwrap() + 0.5).unwrap();
    for stat in [Stat::Mean, Stat::Var] {
        let op = RunningUpdate {
            stat,
            keep: 0.9,
            take: 0.1 * 1.0001,
            neg_eps: -1e-5,
        };
        let start = tensor(&[c], 6);
        let (cpu, gpu) = (start.copy().unwrap(), on(&start));
        cpu.inplace_op2(&saved, &op).unwrap();
        gpu.inplace_op2(&on(&saved), &op).unwrap();
        assert_eq!(bits(&cpu), bits(&gpu), "running {stat:?}");
        let _ = InplaceOp2::name(&op);
    }

    // Cross-entropy.
    for (b, k) in [(128, 10), (37, 1000)] {
        let x = (tensor(&[b, k], 7) * 8.0).unwrap();
        let labels: Vec<u32> = (0..b as u32).map(|i| (i * 7 + 3) % k as u32).collect();
        let labels = Tensor::from_vec(labels, b, &Device::Cpu).unwrap();
        let soft = tensor(&[b, k], 8).abs().unwrap();
        let soft = soft.broadcast_div(&soft.sum_keepdim(1).unwrap()).unwrap();
        for (name, smoothing, use_soft) in [
            ("labels", 0.0, false),
            ("smoothed", 0.1, false),
            ("soft", 0.0, true),
        ] {
            let run = |x: &Tensor, labels: &Tensor, soft: &Tensor| {
                let v = Var::from_tensor(x).unwrap();
                let t = if use_soft {
                    Targets::Soft(soft)
                } else {
                    Targets::Labels { labels, smoothing }
                };
                let loss = cross_entropy(v.as_tensor(), t).unwrap();
                let g = (&loss * 2.0).unwrap().backward().unwrap();
                let g = g
                    .get(v.as_tensor())
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap();
                (
                    loss.to_device(&Device::Cpu)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    g,
                )
            };
            let (lc, gc) = run(&x, &labels, &soft);
            let (lg, gg) = run(&on(&x), &on(&labels), &on(&soft));
            assert!(
                (lc - lg).abs() <= 1e-5 * lc.abs().max(1.0),
                "{name} {b}×{k}: loss {lc} vs {lg}"
            );
            let d = rel_diff(&gc, &gg, 1e-6);
            assert!(d < 1e-5, "{name} {b}×{k}: gradient differs by {d}");
        }
    }
}
