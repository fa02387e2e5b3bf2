//! The kernels of `ops.cu` run on the CPU ([`super::emulate`]) against their CPU
//! twins: bit for bit where the kernel's contract is the twin's exact float result,
//! within 1e-5 for the cross-entropy (f32 with the host's `expf`/`logf` in the kernels,
//! f64 in the twin). Odd sizes over more than one block, NaN and ±0 inputs. Every
//! launch is built by the definition the CUDA ops launch through
//! (`relu_mask_launch`, `xent::forward_launch`, ...), so the argument order and the
//! grid are the ones a GPU gets.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::bf16::{to_bf16_launch, to_f32_launch, widen_into_launch};
use super::emulate::{awkward, bits};
use super::launch::emulated::{EmuArg, EmuExec};
use super::launch::Launcher;
use super::noise::noise_launch;
use super::pointwise::{
    bn_eval_backward_launch, permute_launch, relu_in_place_launch, relu_mask_launch,
    running_launch, BnEvalBackward, ReluMask, RunningUpdate, Stat,
};
use super::xent::{
    backward_launch, cross_entropy, cross_entropy_rows, forward_launch, TargetArg, Targets,
};

use EmuArg::{Read as R, Write as W};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn pointwise_kernels_equal_their_twins() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // 7 channels, 1,099 values: two blocks of the element-wise launches.
    let (c, n) = (7usize, 7 * 157);
    let (dy, y) = (awkward(&mut rng, n), awkward(&mut rng, n));
    let gamma: Vec<f32> = (0..c).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
    let var: Vec<f32> = (0..c).map(|_| rng.gen_range(0.0f32..3.0)).collect();
    let stats: Vec<f32> = (0..2 * c).map(|_| rng.gen_range(0.1f32..2.0)).collect();
    let run: Vec<f32> = (0..c).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let eps = 1e-5f32;
    let emu = EmuExec;
    let dev = Device::Cpu;

    let mut relu = y.clone();
    emu.run(relu_in_place_launch(W(&mut relu), n)?)?;
    let want_relu: Vec<f32> = y.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect();
    assert_eq!(bits(&relu), bits(&want_relu), "relu_inplace");

    let mut mask = vec![f32::NAN; n];
    emu.run(relu_mask_launch(
        W(&mut mask),
        R(dy.clone()),
        R(y.clone()),
        n,
    )?)?;
    let (dyt, yt) = (
        Tensor::new(dy.as_slice(), &dev)?,
        Tensor::new(y.as_slice(), &dev)?,
    );
    let want = dyt.apply_op2_no_bwd(&yt, &ReluMask)?.to_vec1::<f32>()?;
    assert_eq!(bits(&mask), bits(&want), "relu_mask");

    for relu in [false, true] {
        let mut dx = vec![f32::NAN; n];
        emu.run(bn_eval_backward_launch(
            W(&mut dx),
            R(dy.clone()),
            R(y.clone()),
            R(gamma.clone()),
            R(var.clone()),
            eps,
            relu,
            c,
            n,
        )?)?;
        let op = BnEvalBackward {
            var: Tensor::new(var.as_slice(), &dev)?,
            eps,
            relu,
            c,
        };
        let g = Tensor::new(gamma.as_slice(), &dev)?;
        let want = dyt.apply_op3_no_bwd(&yt, &g, &op)?.to_vec1::<f32>()?;
        assert_eq!(bits(&dx), bits(&want), "bn_eval_backward, relu {relu}");
    }

    let (keep, take) = (0.9f32, 0.1f32 * 64.0 / 63.0);
    for (stat, from) in [(Stat::Mean, &stats[..c]), (Stat::Var, &stats[c..])] {
        let op = RunningUpdate {
            stat,
            keep,
            take,
            neg_eps: -eps,
        };
        // The CUDA op passes the statistic's C values, from its place in the saved 2C.
        let mut got = run.clone();
        emu.run(running_launch(&op, W(&mut got), R(from.to_vec()), c)?)?;
        let r = Tensor::new(run.as_slice(), &dev)?;
        r.inplace_op2(&Tensor::new(stats.as_slice(), &dev)?, &op)?;
        assert_eq!(
            bits(&got),
            bits(&r.to_vec1::<f32>()?),
            "bn_running {stat:?}"
        );
    }
    Ok(())
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * w.abs().max(1.0);
        assert!(
            (g - w).abs() <= tol,
            "{what}: value {i} is {g}, its twin's {w}"
        );
    }
}

#[test]
fn cross_entropy_kernels_equal_their_twins() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let dev = Device::Cpu;
    let emu = EmuExec;
    // 37 rows: no multiple of the eight warps of a block; 45 classes: more than a warp.
    for (b, k) in [(37usize, 10usize), (11, 45)] {
        let x: Vec<f32> = (0..b * k).map(|_| rng.gen_range(-6.0f32..6.0)).collect();
        let labels: Vec<u32> = (0..b).map(|_| rng.gen_range(0..k as u32)).collect();
        let soft: Vec<f32> = (0..b * k).map(|_| rng.gen_range(0.0f32..0.3)).collect();
        let g_rows: Vec<f32> = (0..b).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let smoothing = 0.1f64;
        let (on, off) = ((1.0 - smoothing) as f32, (smoothing / k as f64) as f32);
        let logits = Tensor::from_vec(x.clone(), (b, k), &dev)?;
        let lt = Tensor::new(labels.as_slice(), &dev)?;
        let st = Tensor::from_vec(soft.clone(), (b, k), &dev)?;
        let target = |name: &str| match name {
            "labels" => TargetArg::Labels(EmuArg::ReadU32(labels.clone())),
            _ => TargetArg::Soft(R(soft.clone())),
        };
        let cases: [(&str, Targets<'_>, f32, f32); 2] = [
            (
                "labels",
                Targets::Labels {
                    labels: &lt,
                    smoothing,
                },
                on,
                off,
            ),
            ("soft", Targets::Soft(&st), 1.0, 0.0),
        ];
        for (name, targets, on, off) in cases {
            let what = format!("{b}×{k}, {name}");
            let mut mean = vec![f32::NAN];
            emu.run(forward_launch(
                false,
                W(&mut mean),
                R(x.clone()),
                target(name),
                on,
                off,
                b,
                k,
            )?)?;
            let want = cross_entropy(&logits, targets)?.to_vec0::<f32>()?;
            close(&mean, &[want], &format!("xent_forward {what}"));
            let mut rows = vec![f32::NAN; b];
            emu.run(forward_launch(
                true,
                W(&mut rows),
                R(x.clone()),
                target(name),
                on,
                off,
                b,
                k,
            )?)?;
            let want = cross_entropy_rows(&logits, targets)?.to_vec1::<f32>()?;
            close(&rows, &want, &format!("xent_rows {what}"));
            let v = Var::from_tensor(&logits)?;
            let gr = Tensor::new(g_rows.as_slice(), &dev)?;
            let losses = [
                (
                    false,
                    vec![0.75f32],
                    (cross_entropy(v.as_tensor(), targets)? * 0.75)?,
                ),
                (
                    true,
                    g_rows.clone(),
                    (cross_entropy_rows(v.as_tensor(), targets)? * gr)?.sum_all()?,
                ),
            ];
            for (per_row, g, loss) in losses {
                let mut dx = vec![f32::NAN; b * k];
                emu.run(backward_launch(
                    per_row,
                    W(&mut dx),
                    R(x.clone()),
                    target(name),
                    R(g),
                    on,
                    off,
                    b,
                    k,
                )?)?;
                let d = loss.backward()?;
                let d = d.get(v.as_tensor()).ok_or("no gradient")?;
                let want = d.flatten_all()?.to_vec1::<f32>()?;
                close(
                    &dx,
                    &want,
                    &format!("xent_backward per row {per_row} {what}"),
                );
            }
        }
    }
    // A label out of range makes the kernels' results NaN (the GPU does not check).
    let (x, labels) = (vec![0.5f32, -1.0, 2.0, 0.0], vec![1u32, 2]);
    let target = || TargetArg::Labels(EmuArg::ReadU32(labels.clone()));
    let (mut mean, mut rows, mut dx) = (vec![0f32], vec![0f32; 2], vec![0f32; 4]);
    emu.run(forward_launch(
        false,
        W(&mut mean),
        R(x.clone()),
        target(),
        1.0,
        0.0,
        2,
        2,
    )?)?;
    emu.run(forward_launch(
        true,
        W(&mut rows),
        R(x.clone()),
        target(),
        1.0,
        0.0,
        2,
        2,
    )?)?;
    emu.run(backward_launch(
        false,
        W(&mut dx),
        R(x),
        target(),
        R(vec![1.0]),
        1.0,
        0.0,
        2,
        2,
    )?)?;
    assert!(mean[0].is_nan());
    assert!(rows[0].is_finite() && rows[1].is_nan(), "{rows:?}");
    assert!(dx[..2].iter().all(|v| v.is_finite()) && dx[2..].iter().all(|v| v.is_nan()));
    Ok(())
}

#[test]
fn noise_conversion_and_permutation_kernels_equal_their_twins() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let emu = EmuExec;
    // A student's noise: an odd count per image, 60 images from image 5 (1,140 pairs:
    // two blocks).
    let (per, images, first, seed) = (37usize, 60usize, 5u64, 0x1234_5678_9abc_def0u64);
    let mut noise = vec![f32::NAN; per * images];
    emu.run(noise_launch(W(&mut noise), seed, first, per, images)?)?;
    let mut want = vec![0f32; per * images];
    for (i, img) in want.chunks_exact_mut(per).enumerate() {
        super::noise::fill_image(seed, first as usize + i, img);
    }
    assert_eq!(bits(&noise), bits(&want), "layer_noise");

    // bf16 conversions on every kind of value, over two blocks.
    let mut x: Vec<f32> = (0..1100).map(|_| f32::from_bits(rng.gen())).collect();
    x.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0 + f32::EPSILON,
    ]);
    let n = x.len();
    let half: Vec<u16> = x.iter().map(|&v| super::bf16::to_bf16_bits(v)).collect();
    let base: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut to16 = vec![0u16; n];
    emu.run(to_bf16_launch(
        EmuArg::WriteU16(&mut to16),
        R(x.clone()),
        n,
    )?)?;
    assert_eq!(to16, half, "f32_to_bf16");
    let widened: Vec<f32> = half
        .iter()
        .map(|&h| super::bf16::from_bf16_bits(h))
        .collect();
    let mut to32 = vec![f32::NAN; n];
    emu.run(to_f32_launch(
        W(&mut to32),
        EmuArg::ReadU16(half.clone()),
        n,
    )?)?;
    assert_eq!(bits(&to32), bits(&widened), "bf16_to_f32");
    let mut into = vec![f32::NAN; n];
    emu.run(widen_into_launch(
        W(&mut into),
        EmuArg::ReadU16(half.clone()),
        false,
        n,
    )?)?;
    assert_eq!(bits(&into), bits(&widened), "bf16_widen_into");
    let mut acc = base.clone();
    emu.run(widen_into_launch(
        W(&mut acc),
        EmuArg::ReadU16(half),
        true,
        n,
    )?)?;
    let summed: Vec<f32> = base.iter().zip(&widened).map(|(a, b)| a + b).collect();
    assert_eq!(bits(&acc), bits(&summed), "bf16_widen_into, accumulating");

    // Kernel layouts: 41 outputs, 3 inputs, 3×3 (1,107 values: two blocks).
    let (o, ci, kk) = (41usize, 3usize, 9usize);
    let w: Vec<f32> = (0..o * ci * kk).map(|i| i as f32).collect();
    let len = w.len();
    let mut ohwi = vec![f32::NAN; len];
    emu.run(permute_launch(
        W(&mut ohwi),
        R(w.clone()),
        ci,
        kk,
        len,
        true,
    )?)?;
    assert_eq!(ohwi, super::conv::oihw_to_ohwi(&w, ci, kk), "oihw_to_ohwi");
    let mut back = vec![f32::NAN; len];
    emu.run(permute_launch(
        W(&mut back),
        R(ohwi.clone()),
        ci,
        kk,
        len,
        false,
    )?)?;
    assert_eq!(
        back,
        super::conv::ohwi_to_oihw(&ohwi, ci, kk),
        "ohwi_to_oihw"
    );
    assert_eq!(back, w);
    Ok(())
}
