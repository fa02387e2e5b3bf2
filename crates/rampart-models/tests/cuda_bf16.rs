//! bf16 convolutions on CUDA (`--device cuda+bf16`) against the CPU path: the
//! conversion kernels bit for bit against their CPU twins, each convolution pass
//! against the CPU convolution of the bf16-rounded operands, and whole networks
//! against full f32.
//!
//! Its own test binary, because the precision is process-wide: every test here runs
//! in bf16. Built only with `--features cudnn` and run on a machine with an NVIDIA
//! GPU: `cargo test --release -p rampart-models --features cudnn --test cuda_bf16`.
#![cfg(feature = "cudnn")]

mod common;
use common::{probe, rel_diff, rel_l2, tensor};

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use rampart_models::kernels::bf16::RoundBf16;
use rampart_models::{kernels::conv::conv2d_nhwc, Classifier, ModelSpec, Precision};

fn gpu() -> Device {
    std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    let dev = Device::new_cuda(0)
        .expect("a CUDA device (this test binary was built with --features cudnn)");
    rampart_models::cuda::prepare(&dev, Precision::Bf16).unwrap();
    dev
}

fn round(t: &Tensor) -> Tensor {
    t.apply_op1_no_bwd(&RoundBf16).unwrap()
}

/// The GPU's f32 → bf16 → f32 round trip is the CPU twin's, bit for bit, on random
/// bit patterns and the special values.
#[test]
fn conversions_match_the_cpu_twins() {
    let dev = gpu();
    let mut bits: Vec<u32> = vec![
        0,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
        0x3f80_8000,
        0x3f81_8000,
        0x0000_0001,
        0x7f7f_ffff,
    ];
    let mut s = 0x2545_f491u32;
    bits.extend((0..200_000).map(|_| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    }));
    let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let x = Tensor::from_vec(x, bits.len(), &Device::Cpu).unwrap();
    let want = round(&x).to_vec1::<f32>().unwrap();
    let got = round(&x.to_device(&dev).unwrap())
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let differ = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
        .count();
    assert_eq!(differ, 0, "{differ} of {} values differ", want.len());
}

/// Each pass of a bf16 convolution equals the CPU convolution of the bf16-rounded
/// operands up to the rounding of its output to bf16 (2⁻⁹ relative) and f32
/// accumulation order.
#[test]
fn convolutions_compute_on_bf16_operands() {
    let dev = gpu();
    for (b, hw, ci, co, k, s, p) in [
        (2, 8, 16, 16, 3, 1, 1),
        (2, 8, 16, 32, 3, 2, 1),
        (4, 32, 3, 16, 3, 1, 1),
        (2, 8, 16, 32, 1, 2, 0),
        (3, 7, 8, 8, 3, 2, 1),
    ] {
        let name = format!("b{b} {hw}² {ci}→{co} k{k} s{s} p{p}");
        let x = tensor(&[b, hw, hw, ci], 1);
        let w = tensor(&[co, ci, k, k], 2);
        // Reference: f32 on the CPU of the rounded operands; the probe's gradient
        // (dy) is rounded by the GPU too, so round it here alike.
        let (xr, wr) = (
            Var::from_tensor(&round(&x)).unwrap(),
            Var::from_tensor(&round(&w)).unwrap(),
        );
        let y_ref = conv2d_nhwc(xr.as_tensor(), wr.as_tensor(), s, p).unwrap();
        let dy = round(&tensor(y_ref.dims(), 3));
        let g_ref = (&y_ref * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let xg = Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
        let wg = Var::from_tensor(&w.to_device(&dev).unwrap()).unwrap();
        let y = conv2d_nhwc(xg.as_tensor(), wg.as_tensor(), s, p).unwrap();
        assert_eq!(y.dtype(), DType::F32, "{name}: the op returns f32");
        let g = (&y * &dy.to_device(&dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let tol = 1e-2;
        let d = rel_diff(&y_ref, &y, 1e-3);
        eprintln!("{name}: output {d:.1e}");
        assert!(d < tol, "{name}: outputs differ by {d}");
        for (what, a, bv) in [("input", &xr, &xg), ("kernel", &wr, &wg)] {
            let d = rel_diff(
                g_ref.get(a.as_tensor()).unwrap(),
                g.get(bv.as_tensor()).unwrap(),
                1e-3,
            );
            eprintln!("{name}: {what} gradient {d:.1e}");
            assert!(d < tol, "{name}: {what} gradients differ by {d}");
        }
        // Not the f32 result: the operands really were rounded.
        let y32 = conv2d_nhwc(&x, &w, s, p).unwrap();
        assert!(rel_diff(&y32, &y, 1e-3) > 1e-5, "{name}: no rounding seen");
    }
}

/// A WRN-16-2 in bf16 against the same model in f32 on the CPU: logits, the attack's
/// input gradient and a training step's parameter gradients within bf16's
/// precision through a network (relative L2).
#[test]
fn networks_in_bf16_stay_close_to_f32() {
    let dev = gpu();
    let cpu_model = Classifier::new(ModelSpec::wrn(16, 2, 10), 3, &Device::Cpu).unwrap();
    for s in 0..2 {
        cpu_model
            .forward_t(&(tensor(&[8, 3, 32, 32], 100 + s) + 0.5).unwrap(), true)
            .unwrap();
    }
    let bytes = cpu_model.to_bytes().unwrap();
    let gpu_model =
        Classifier::from_bytes(&bytes, std::path::Path::new("model.safetensors"), &dev).unwrap();
    let x = (tensor(&[16, 3, 32, 32], 7) + 0.5).unwrap();
    // Eval mode, through the frozen view (what attacks run), with the input gradient.
    let xc = Var::from_tensor(&x).unwrap();
    let xg = Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
    let lc = cpu_model.frozen().forward_t(xc.as_tensor(), false).unwrap();
    let lg = gpu_model.frozen().forward_t(xg.as_tensor(), false).unwrap();
    let d = rel_l2(&lc, &lg, 1e-6);
    eprintln!("WRN-16-2 bf16: eval logits {d:.1e}");
    assert!(d < 3e-2, "eval logits differ by {d}");
    let (gc, gg) = (
        rampart_models::backward(&probe(&lc, 5)).unwrap(),
        rampart_models::backward(&probe(&lg, 5)).unwrap(),
    );
    let d = rel_l2(
        gc.get(xc.as_tensor()).unwrap(),
        gg.get(xg.as_tensor()).unwrap(),
        1e-6,
    );
    eprintln!("WRN-16-2 bf16: input gradient {d:.1e}");
    assert!(d < 1e-1, "input gradients differ by {d}");
    // Train mode: every parameter gradient.
    let lc = cpu_model.forward_t(&x, true).unwrap();
    let lg = gpu_model
        .forward_t(&x.to_device(&dev).unwrap(), true)
        .unwrap();
    let (gc, gg) = (
        rampart_models::backward(&probe(&lc, 6)).unwrap(),
        rampart_models::backward(&probe(&lg, 6)).unwrap(),
    );
    let (vc, vg) = (cpu_model.trainable_vars(), gpu_model.trainable_vars());
    let mut worst = 0f32;
    for ((name, a), (_, b)) in vc.iter().zip(&vg) {
        let d = rel_l2(
            gc.get(a.as_tensor()).unwrap(),
            gg.get(b.as_tensor()).unwrap(),
            1e-6,
        );
        assert!(d < 2e-1, "{name}: gradients differ by {d}");
        worst = worst.max(d);
    }
    eprintln!("WRN-16-2 bf16: parameter gradients within {worst:.1e}");
    // The weights and the BatchNorm statistics stay f32.
    for (name, v) in gpu_model.named_vars() {
        assert_eq!(v.dtype(), DType::F32, "{name}");
    }
}

/// The fused GPU programs (eval and train) under bf16 against the layer-by-layer
/// path under bf16, on the same GPU: the same operands are rounded to bf16 in both,
/// so logits, the input gradient and every parameter gradient agree far more closely
/// than either does with f32 (a WRN-16-2 and ResNet-20). Exercises the bf16
/// convolution passes into the programs' f32 buffers (`bf16_widen_into`, plain and
/// accumulating).
#[test]
fn fused_programs_in_bf16_match_the_layer_by_layer_path() {
    let dev = gpu();
    for spec in [
        ModelSpec::wrn(16, 2, 10),
        ModelSpec::cifar(rampart_models::Arch::Resnet20, 10),
    ] {
        let name = spec.arch.to_string();
        let cpu_model = Classifier::new(spec, 3, &Device::Cpu).unwrap();
        for s in 0..2 {
            cpu_model
                .forward_t(&(tensor(&[8, 3, 32, 32], 100 + s) + 0.5).unwrap(), true)
                .unwrap();
        }
        let bytes = cpu_model.to_bytes().unwrap();
        let load = || {
            Classifier::from_bytes(&bytes, std::path::Path::new("model.safetensors"), &dev).unwrap()
        };
        let (layers, fused) = (load(), load());
        let x = (tensor(&[16, 3, 32, 32], 7) + 0.5)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        // Eval mode with the input gradient.
        let (xl, xf) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&x).unwrap());
        let ll = layers.frozen().forward_t(xl.as_tensor(), false).unwrap();
        let lf = fused
            .fused_gpu_eval(xf.as_tensor())
            .unwrap()
            .expect("the network has the eval program");
        let d = rel_l2(&ll, &lf, 1e-6);
        eprintln!("{name} bf16: fused eval logits {d:.1e} from the layer-by-layer path");
        assert!(d < 1e-2, "{name}: eval logits differ by {d}");
        let (gl, gf) = (
            rampart_models::backward(&probe(&ll, 5)).unwrap(),
            rampart_models::backward(&probe(&lf, 5)).unwrap(),
        );
        let d = rel_l2(
            gl.get(xl.as_tensor()).unwrap(),
            gf.get(xf.as_tensor()).unwrap(),
            1e-6,
        );
        eprintln!("{name} bf16: fused input gradient {d:.1e}");
        assert!(d < 2e-2, "{name}: input gradients differ by {d}");
        // Train mode: every parameter gradient.
        let ll = layers.forward_t(&x, true).unwrap();
        let lf = fused
            .fused_gpu_train(&x)
            .unwrap()
            .expect("the network has the train program");
        let d = rel_l2(&ll, &lf, 1e-6);
        assert!(d < 1e-2, "{name}: train logits differ by {d}");
        let (gl, gf) = (
            rampart_models::backward(&probe(&ll, 6)).unwrap(),
            rampart_models::backward(&probe(&lf, 6)).unwrap(),
        );
        let mut worst = 0f32;
        for ((var, a), (_, b)) in layers.trainable_vars().iter().zip(&fused.trainable_vars()) {
            let d = rel_l2(
                gl.get(a.as_tensor()).unwrap(),
                gf.get(b.as_tensor()).unwrap(),
                1e-6,
            );
            assert!(d < 5e-2, "{name} {var}: gradients differ by {d}");
            worst = worst.max(d);
        }
        eprintln!("{name} bf16: fused parameter gradients within {worst:.1e}");
    }
}
