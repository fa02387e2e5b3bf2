//! The kernels of `ops.cu` run on the CPU ([`super::emulate`]) against their CPU
//! twins: bit for bit where the kernel's contract is the twin's exact float result,
//! within 1e-5 for the cross-entropy (f32 with the host's `expf`/`logf` in the kernels,
//! f64 in the twin). Odd sizes, NaN and ±0 inputs, the launches' block sizes.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::emulate::{awkward, bits, Arg, Emulator};
use super::pointwise::{BnEvalBackward, ReluMask, RunningUpdate, Stat};
use super::xent::{cross_entropy, cross_entropy_rows, Targets};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn emulator() -> &'static Emulator {
    Emulator::of(include_str!("ops.cu"))
}

#[test]
fn pointwise_kernels_equal_their_twins() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (c, n) = (7usize, 7 * 37);
    let (dy, y) = (awkward(&mut rng, n), awkward(&mut rng, n));
    let gamma: Vec<f32> = (0..c).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
    let var: Vec<f32> = (0..c).map(|_| rng.gen_range(0.0f32..3.0)).collect();
    let stats: Vec<f32> = (0..2 * c).map(|_| rng.gen_range(0.1f32..2.0)).collect();
    let run: Vec<f32> = (0..c).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let (eps, nu, cu) = (1e-5f32, n as u32, c as u32);
    let mut s = emulator().session();
    s.put("y", &y)
        .put("dy", &dy)
        .put("gamma", &gamma)
        .put("var", &var)
        .put("relu", &y)
        .put("mask", &vec![f32::NAN; n])
        .put("dx0", &vec![f32::NAN; n])
        .put("dx1", &vec![f32::NAN; n])
        .put("run_mean", &run)
        .put("run_var", &run)
        .launch_n("relu_inplace", n, 64, &[Arg::B("relu"), Arg::U32(nu)])
        .launch_n(
            "relu_mask",
            n,
            64,
            &[Arg::B("mask"), Arg::B("dy"), Arg::B("y"), Arg::U32(nu)],
        );
    for relu in [0, 1] {
        let dx = format!("dx{relu}");
        s.launch_n(
            "bn_eval_backward",
            n,
            64,
            &[
                Arg::B(&dx),
                Arg::B("dy"),
                Arg::B("y"),
                Arg::B("gamma"),
                Arg::B("var"),
                Arg::F32(eps),
                Arg::I32(relu),
                Arg::U32(cu),
                Arg::U32(nu),
            ],
        );
    }
    let (keep, take) = (0.9f32, 0.1f32 * 64.0 / 63.0);
    // The launch passes the statistic's C values, from its offset in the saved 2C.
    s.put("stats0", &stats[..c]).put("stats1", &stats[c..]);
    for (name, var) in [("run_mean", 0), ("run_var", 1)] {
        s.launch_n(
            "bn_running",
            c,
            64,
            &[
                Arg::B(name),
                Arg::B(&format!("stats{var}")),
                Arg::F32(keep),
                Arg::F32(take),
                Arg::F32(-eps),
                Arg::I32(var),
                Arg::U32(cu),
            ],
        );
    }
    let out = s.run();

    let dev = Device::Cpu;
    let want_relu: Vec<f32> = y.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect();
    assert_eq!(bits(&out.get("relu")), bits(&want_relu), "relu_inplace");
    let (dyt, yt) = (
        Tensor::new(dy.as_slice(), &dev)?,
        Tensor::new(y.as_slice(), &dev)?,
    );
    let mask = dyt.apply_op2_no_bwd(&yt, &ReluMask)?.to_vec1::<f32>()?;
    assert_eq!(bits(&out.get("mask")), bits(&mask), "relu_mask");
    for relu in [false, true] {
        let op = BnEvalBackward {
            var: Tensor::new(var.as_slice(), &dev)?,
            eps,
            relu,
            c,
        };
        let g = Tensor::new(gamma.as_slice(), &dev)?;
        let dx = dyt.apply_op3_no_bwd(&yt, &g, &op)?.to_vec1::<f32>()?;
        let got = out.get::<f32>(&format!("dx{}", u8::from(relu)));
        assert_eq!(bits(&got), bits(&dx), "bn_eval_backward, relu {relu}");
    }
    for (name, stat) in [("run_mean", Stat::Mean), ("run_var", Stat::Var)] {
        let r = Tensor::new(run.as_slice(), &dev)?;
        r.inplace_op2(
            &Tensor::new(stats.as_slice(), &dev)?,
            &RunningUpdate {
                stat,
                keep,
                take,
                neg_eps: -eps,
            },
        )?;
        assert_eq!(
            bits(&out.get(name)),
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
    // 37 rows: no multiple of the eight warps of a block; 45 classes: more than a warp.
    for (b, k) in [(37usize, 10usize), (11, 45)] {
        let x: Vec<f32> = (0..b * k).map(|_| rng.gen_range(-6.0f32..6.0)).collect();
        let labels: Vec<u32> = (0..b).map(|_| rng.gen_range(0..k as u32)).collect();
        let soft: Vec<f32> = (0..b * k).map(|_| rng.gen_range(0.0f32..0.3)).collect();
        let g_rows: Vec<f32> = (0..b).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let (bu, ku) = (b as u32, k as u32);
        let smoothing = 0.1f64;
        let (on, off) = ((1.0 - smoothing) as f32, (smoothing / k as f64) as f32);
        let logits = Tensor::from_vec(x.clone(), (b, k), &dev)?;
        let lt = Tensor::new(labels.as_slice(), &dev)?;
        let st = Tensor::from_vec(soft.clone(), (b, k), &dev)?;
        let mut s = emulator().session();
        s.put("x", &x)
            .put("y", &labels)
            .put("soft", &soft)
            .put("g1", &[0.75f32])
            .put("grows", &g_rows);
        let cases: [(&str, Targets<'_>, Arg<'_>, Arg<'_>, f32, f32); 2] = [
            (
                "labels",
                Targets::Labels {
                    labels: &lt,
                    smoothing,
                },
                Arg::B("y"),
                Arg::Null,
                on,
                off,
            ),
            (
                "soft",
                Targets::Soft(&st),
                Arg::Null,
                Arg::B("soft"),
                1.0,
                0.0,
            ),
        ];
        for (name, _, y, soft, on, off) in &cases {
            let blocks = bu.div_ceil(8);
            s.put(&format!("mean_{name}"), &[f32::NAN])
                .put(&format!("rows_{name}"), &vec![f32::NAN; b])
                .put(&format!("dmean_{name}"), &vec![f32::NAN; b * k])
                .put(&format!("drows_{name}"), &vec![f32::NAN; b * k]);
            let tail = [*on, *off].map(Arg::F32);
            let name_mean = format!("mean_{name}");
            let mut mean = vec![Arg::B(&name_mean), Arg::B("x"), *y, *soft];
            mean.extend(tail);
            mean.extend([Arg::U32(bu), Arg::U32(ku)]);
            s.launch("xent_forward", [1, 1, 1], [256, 1, 1], &mean);
            let name_rows = format!("rows_{name}");
            let mut rows = vec![Arg::B(&name_rows), Arg::B("x"), *y, *soft];
            rows.extend(tail);
            rows.extend([Arg::U32(bu), Arg::U32(ku)]);
            s.launch("xent_rows", [blocks, 1, 1], [256, 1, 1], &rows);
            for per_row in [0, 1] {
                let dname = format!("{}_{name}", ["dmean", "drows"][per_row as usize]);
                let g = ["g1", "grows"][per_row as usize];
                let mut args = vec![Arg::B(&dname), Arg::B("x"), *y, *soft, Arg::B(g)];
                args.push(Arg::I32(per_row));
                args.extend(tail);
                args.extend([Arg::U32(bu), Arg::U32(ku)]);
                s.launch("xent_backward", [blocks, 1, 1], [256, 1, 1], &args);
            }
        }
        let out = s.run();
        for (name, targets, ..) in cases {
            let what = format!("{b}×{k}, {name}");
            let mean = cross_entropy(&logits, targets)?.to_vec0::<f32>()?;
            close(
                &out.get(&format!("mean_{name}")),
                &[mean],
                &format!("xent_forward {what}"),
            );
            let rows = cross_entropy_rows(&logits, targets)?.to_vec1::<f32>()?;
            close(
                &out.get(&format!("rows_{name}")),
                &rows,
                &format!("xent_rows {what}"),
            );
            let v = Var::from_tensor(&logits)?;
            let gr = Tensor::new(g_rows.as_slice(), &dev)?;
            let losses = [
                ("dmean", (cross_entropy(v.as_tensor(), targets)? * 0.75)?),
                (
                    "drows",
                    (cross_entropy_rows(v.as_tensor(), targets)? * gr)?.sum_all()?,
                ),
            ];
            for (grad, loss) in losses {
                let d = loss.backward()?;
                let d = d.get(v.as_tensor()).ok_or("no gradient")?;
                let want = d.flatten_all()?.to_vec1::<f32>()?;
                let got = out.get(&format!("{grad}_{name}"));
                close(&got, &want, &format!("xent_backward {grad} {what}"));
            }
        }
    }
    // A label out of range makes the kernels' results NaN (the GPU does not check).
    let mut s = emulator().session();
    s.put("x", &[0.5f32, -1.0, 2.0, 0.0])
        .put("y", &[1u32, 2])
        .put("mean", &[0f32])
        .put("rows", &[0f32; 2])
        .put("g", &[1f32])
        .put("dx", &[0f32; 4]);
    let common = [
        Arg::B("x"),
        Arg::B("y"),
        Arg::Null,
        Arg::F32(1.0),
        Arg::F32(0.0),
    ];
    let mut mean = vec![Arg::B("mean")];
    mean.extend(common);
    mean.extend([Arg::U32(2), Arg::U32(2)]);
    let mut rows = vec![Arg::B("rows")];
    rows.extend(common);
    rows.extend([Arg::U32(2), Arg::U32(2)]);
    let back = [
        Arg::B("dx"),
        Arg::B("x"),
        Arg::B("y"),
        Arg::Null,
        Arg::B("g"),
        Arg::I32(0),
        Arg::F32(1.0),
        Arg::F32(0.0),
        Arg::U32(2),
        Arg::U32(2),
    ];
    s.launch("xent_forward", [1, 1, 1], [256, 1, 1], &mean)
        .launch("xent_rows", [1, 1, 1], [256, 1, 1], &rows)
        .launch("xent_backward", [1, 1, 1], [256, 1, 1], &back);
    let out = s.run();
    assert!(out.get::<f32>("mean")[0].is_nan());
    let r = out.get::<f32>("rows");
    assert!(r[0].is_finite() && r[1].is_nan(), "{r:?}");
    let dx = out.get::<f32>("dx");
    assert!(dx[..2].iter().all(|v| v.is_finite()) && dx[2..].iter().all(|v| v.is_nan()));
    Ok(())
}

#[test]
fn noise_conversion_and_permutation_kernels_equal_their_twins() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut s = emulator().session();
    // A student's noise: an odd count per image, three images from image 5.
    let (per, images, first, seed) = (37usize, 3usize, 5u64, 0x1234_5678_9abc_def0u64);
    let pairs = per.div_ceil(2) * images;
    s.put("noise", &vec![f32::NAN; per * images]).launch_n(
        "layer_noise",
        pairs,
        64,
        &[
            Arg::B("noise"),
            Arg::U64(seed),
            Arg::U64(first),
            Arg::U64(per as u64),
            Arg::U64(per.div_ceil(2) as u64),
            Arg::U32(pairs as u32),
        ],
    );
    // bf16 conversions on every kind of value.
    let mut x: Vec<f32> = (0..300).map(|_| f32::from_bits(rng.gen())).collect();
    x.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0 + f32::EPSILON,
    ]);
    let n = x.len() as u32;
    let half: Vec<u16> = x.iter().map(|&v| super::bf16::to_bf16_bits(v)).collect();
    let base: Vec<f32> = (0..x.len()).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    s.put("x", &x)
        .put("half", &half)
        .put("to16", &vec![0u16; x.len()])
        .put("to32", &vec![f32::NAN; x.len()])
        .put("into", &vec![f32::NAN; x.len()])
        .put("acc", &base)
        .launch_n(
            "f32_to_bf16",
            x.len(),
            64,
            &[Arg::B("to16"), Arg::B("x"), Arg::U32(n)],
        )
        .launch_n(
            "bf16_to_f32",
            x.len(),
            64,
            &[Arg::B("to32"), Arg::B("half"), Arg::U32(n)],
        )
        .launch_n(
            "bf16_widen_into",
            x.len(),
            64,
            &[Arg::B("into"), Arg::B("half"), Arg::I32(0), Arg::U32(n)],
        )
        .launch_n(
            "bf16_widen_into",
            x.len(),
            64,
            &[Arg::B("acc"), Arg::B("half"), Arg::I32(1), Arg::U32(n)],
        );
    // Kernel layouts: 5 outputs, 3 inputs, 3×3.
    let (o, ci, kk) = (5usize, 3usize, 9usize);
    let w: Vec<f32> = (0..o * ci * kk).map(|i| i as f32).collect();
    let len = w.len() as u32;
    s.put("w", &w)
        .put("ohwi", &vec![f32::NAN; w.len()])
        .put("back", &vec![f32::NAN; w.len()])
        .launch_n(
            "oihw_to_ohwi",
            w.len(),
            64,
            &[
                Arg::B("ohwi"),
                Arg::B("w"),
                Arg::U32(ci as u32),
                Arg::U32(kk as u32),
                Arg::U32(len),
            ],
        )
        .launch_n(
            "ohwi_to_oihw",
            w.len(),
            64,
            &[
                Arg::B("back"),
                Arg::B("ohwi"),
                Arg::U32(ci as u32),
                Arg::U32(kk as u32),
                Arg::U32(len),
            ],
        );
    let out = s.run();

    let mut want = vec![0f32; per * images];
    for (i, img) in want.chunks_exact_mut(per).enumerate() {
        super::noise::fill_image(seed, first as usize + i, img);
    }
    assert_eq!(bits(&out.get("noise")), bits(&want), "layer_noise");
    assert_eq!(out.get::<u16>("to16"), half, "f32_to_bf16");
    let widened: Vec<f32> = half
        .iter()
        .map(|&h| super::bf16::from_bf16_bits(h))
        .collect();
    assert_eq!(bits(&out.get("to32")), bits(&widened), "bf16_to_f32");
    assert_eq!(bits(&out.get("into")), bits(&widened), "bf16_widen_into");
    let summed: Vec<f32> = base.iter().zip(&widened).map(|(a, b)| a + b).collect();
    assert_eq!(
        bits(&out.get("acc")),
        bits(&summed),
        "bf16_widen_into, accumulating"
    );
    let ohwi = super::conv::oihw_to_ohwi(&w, ci, kk);
    assert_eq!(out.get::<f32>("ohwi"), ohwi, "oihw_to_ohwi");
    assert_eq!(
        out.get::<f32>("back"),
        super::conv::ohwi_to_oihw(&ohwi, ci, kk),
        "ohwi_to_oihw"
    );
    assert_eq!(out.get::<f32>("back"), w);
    Ok(())
}
