//! The eval program's kernels (`device_eval.cu`) run on the CPU
//! ([`crate::kernels::emulate`]) against the CPU executor's twins, bit for bit, with
//! the arguments in the order of the CUDA executor's launches: every BatchNorm form
//! (into and in place, with a student's noise or without), the post-activation
//! block's end and its backward pass (identity and projected shortcut), the
//! BatchNorm + ReLU backward pass (with and without a residual), the input
//! normalisation both ways, the pooling, the linear layer and its input gradient.
//! Odd sizes, NaN and ±0 in the activations. Then the whole program with its
//! launches built by the CUDA executor's code and emulated, against the CPU executor.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{avg_pool, denormalise, linear, linear_pool_input_grad, normalise};
use super::{CpuExec, DNoise, DNorm, Exec};
use crate::kernels::emulate::{awkward, bits, Arg, Emulator, Session};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A BatchNorm of `c` channels with non-trivial parameters and running statistics,
/// and its buffers in the session under `name_*`.
fn norm(
    rng: &mut ChaCha8Rng,
    s: &mut Session,
    name: &str,
    c: usize,
) -> Result<DNorm, candle_core::Error> {
    let dev = Device::Cpu;
    let mut v = |lo: f32, hi: f32| -> Vec<f32> { (0..c).map(|_| rng.gen_range(lo..hi)).collect() };
    let (g, b, m, var) = (v(-1.5, 1.5), v(-1.0, 1.0), v(-1.0, 1.0), v(0.0, 3.0));
    s.put(&format!("{name}_g"), &g)
        .put(&format!("{name}_b"), &b)
        .put(&format!("{name}_m"), &m)
        .put(&format!("{name}_v"), &var);
    Ok(DNorm {
        gamma: Tensor::new(g.as_slice(), &dev)?,
        beta: Tensor::new(b.as_slice(), &dev)?,
        mean: Tensor::new(m.as_slice(), &dev)?,
        var: Tensor::new(var.as_slice(), &dev)?,
        eps: 1e-5,
        noise: None,
        train_noise: None,
        train_oat: None,
    })
}

/// The arguments γ, β, mean, var, ε of BatchNorm `name`.
fn bn_args(names: &[String; 4], eps: f32) -> Vec<Arg<'_>> {
    let mut a: Vec<Arg<'_>> = names.iter().map(|n| Arg::B(n)).collect();
    a.push(Arg::F32(eps));
    a
}

fn names(name: &str) -> [String; 4] {
    ["g", "b", "m", "v"].map(|p| format!("{name}_{p}"))
}

#[test]
fn eval_program_kernels_equal_their_twins() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let emu = Emulator::of(include_str!("device_eval.cu"));
    let mut s = emu.session();
    let (c, n) = (6usize, 6 * 41);
    let (cu, nu) = (c as u32, n as u32);
    let e = CpuExec;
    let bn = norm(&mut rng, &mut s, "bn", c)?;
    let sn = norm(&mut rng, &mut s, "sn", c)?;
    let (bnn, snn) = (names("bn"), names("sn"));
    let (x, y, d, r) = (
        awkward(&mut rng, n),
        awkward(&mut rng, n),
        awkward(&mut rng, n),
        awkward(&mut rng, n),
    );
    let z: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let (alpha, sigma) = (
        [0.3f32],
        (0..c)
            .map(|_| rng.gen_range(0.1f32..2.0))
            .collect::<Vec<_>>(),
    );
    let scale = 1.5f32;
    s.put("x", &x)
        .put("y", &y)
        .put("r", &r)
        .put("z", &z)
        .put("alpha", &alpha)
        .put("sigma", &sigma);
    let mut student = norm(&mut rng, &mut s, "st", c)?;
    student.noise = Some(DNoise {
        seed: 3,
        first: 0,
        alpha: Tensor::new(&alpha, &Device::Cpu)?,
        sigma: Tensor::new(sigma.as_slice(), &Device::Cpu)?,
        scale,
    });
    let stn = names("st");
    let nan = vec![f32::NAN; n];

    // The BatchNorm + ReLU forms.
    let lead = |out: &'static str, with_x: bool| -> Vec<Arg<'static>> {
        if with_x {
            vec![Arg::B(out), Arg::B("x")]
        } else {
            vec![Arg::B(out)]
        }
    };
    s.put("into", &nan).put("inplace", &x);
    s.put("noise_into", &nan).put("noise_inplace", &x);
    let tail = [Arg::U32(cu), Arg::U32(nu)];
    let mut a = lead("into", true);
    a.extend(bn_args(&bnn, bn.eps));
    a.extend(tail);
    s.launch_n("de_bn_relu_into", n, 128, &a);
    let mut a = lead("inplace", false);
    a.extend(bn_args(&bnn, bn.eps));
    a.extend(tail);
    s.launch_n("de_bn_relu_inplace", n, 128, &a);
    let noise = [
        Arg::B("z"),
        Arg::B("alpha"),
        Arg::B("sigma"),
        Arg::F32(scale),
    ];
    let mut a = lead("noise_into", true);
    a.extend(noise);
    a.extend(bn_args(&stn, student.eps));
    a.extend(tail);
    s.launch_n("de_bn_noise_relu_into", n, 128, &a);
    let mut a = lead("noise_inplace", false);
    a.extend(noise);
    a.extend(bn_args(&stn, student.eps));
    a.extend(tail);
    s.launch_n("de_bn_noise_relu_inplace", n, 128, &a);

    // The post-activation block's end and its backward pass, both shortcuts; the
    // BatchNorm + ReLU backward pass with and without a residual.
    for has_sn in [0, 1] {
        let (out, d2, dd) = (
            format!("add{has_sn}"),
            format!("d2_{has_sn}"),
            format!("dd{has_sn}"),
        );
        s.put(&out, &y).put(&d2, &nan).put(&dd, &d);
        let mut a = vec![Arg::B(&out), Arg::B("x")];
        a.extend(bn_args(&bnn, bn.eps));
        if has_sn == 1 {
            a.extend(bn_args(&snn, sn.eps));
        } else {
            a.extend([Arg::Null, Arg::Null, Arg::Null, Arg::Null, Arg::F32(0.0)]);
        }
        a.extend([Arg::I32(has_sn), Arg::U32(cu), Arg::U32(nu)]);
        s.launch_n("de_bn_add_relu", n, 128, &a);
        let mut a = vec![
            Arg::B(&d2),
            Arg::B(&dd),
            Arg::B("y"),
            Arg::B(&bnn[0]),
            Arg::B(&bnn[3]),
        ];
        a.push(Arg::F32(bn.eps));
        if has_sn == 1 {
            a.extend([Arg::B(&snn[0]), Arg::B(&snn[3]), Arg::F32(sn.eps)]);
        } else {
            a.extend([Arg::Null, Arg::Null, Arg::F32(0.0)]);
        }
        a.extend([Arg::I32(has_sn), Arg::U32(cu), Arg::U32(nu)]);
        s.launch_n("de_add_relu_backward", n, 128, &a);
    }
    for has_r in [0, 1] {
        let dn = format!("bnd{has_r}");
        s.put(&dn, &d);
        let mut a = vec![
            Arg::B(&dn),
            Arg::B("y"),
            Arg::B(&bnn[0]),
            Arg::B(&bnn[3]),
            Arg::F32(bn.eps),
        ];
        a.push(if has_r == 1 { Arg::B("r") } else { Arg::Null });
        a.extend([Arg::I32(has_r), Arg::U32(cu), Arg::U32(nu)]);
        s.launch_n("de_bn_relu_backward", n, 128, &a);
    }

    // Input normalisation both ways (3 channels of 5×7), pooling and the linear layer.
    let (ci, h, w, b) = (3usize, 5usize, 7usize, 4usize);
    let img: Vec<f32> = (0..b * ci * h * w)
        .map(|_| rng.gen_range(0.0f32..1.0))
        .collect();
    let mean = [0.49f32, 0.48, 0.45];
    let inv_std = [1.0f32 / 0.247, 1.0 / 0.243, 1.0 / 0.261];
    let dn: Vec<f32> = (0..img.len())
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let ni = img.len() as u32;
    s.put("img", &img)
        .put("mean", &mean)
        .put("inv_std", &inv_std)
        .put("dn", &dn)
        .put("normal", &vec![f32::NAN; img.len()])
        .put("denormal", &vec![f32::NAN; img.len()])
        .launch_n(
            "de_normalise",
            img.len(),
            128,
            &[
                Arg::B("normal"),
                Arg::B("img"),
                Arg::B("mean"),
                Arg::B("inv_std"),
                Arg::U32(ci as u32),
                Arg::U32((h * w) as u32),
                Arg::U32(ni),
            ],
        )
        .launch_n(
            "de_denormalise",
            img.len(),
            128,
            &[
                Arg::B("denormal"),
                Arg::B("dn"),
                Arg::B("inv_std"),
                Arg::U32(ci as u32),
                Arg::U32((h * w) as u32),
                Arg::U32(ni),
            ],
        );
    let (hw, k) = (n / (b * c), 10usize);
    let feats: Vec<f32> = (0..b * hw * c)
        .map(|_| rng.gen_range(-1.0f32..2.0))
        .collect();
    let wt: Vec<f32> = (0..k * c).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let bias: Vec<f32> = (0..k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let dl: Vec<f32> = (0..b * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let (hu, ku, bcu) = (hw as u32, k as u32, (b * c) as u32);
    s.put("feats", &feats)
        .put("w", &wt)
        .put("bias", &bias)
        .put("dl", &dl)
        .put("pooled", &vec![f32::NAN; b * c])
        .put("logits", &vec![f32::NAN; b * k])
        .put("dfeats", &vec![f32::NAN; feats.len()])
        .launch_n(
            "de_avg_pool",
            b * c,
            128,
            &[
                Arg::B("pooled"),
                Arg::B("feats"),
                Arg::U32(hu),
                Arg::U32(cu),
                Arg::U32(bcu),
            ],
        )
        .launch_n(
            "de_linear",
            b * k,
            128,
            &[
                Arg::B("logits"),
                Arg::B("pooled"),
                Arg::B("w"),
                Arg::B("bias"),
                Arg::U32(cu),
                Arg::U32(ku),
                Arg::U32((b * k) as u32),
            ],
        )
        .launch_n(
            "de_linear_pool_backward",
            feats.len(),
            128,
            &[
                Arg::B("dfeats"),
                Arg::B("dl"),
                Arg::B("w"),
                Arg::U32(cu),
                Arg::U32(ku),
                Arg::U32(hu),
                Arg::U32(feats.len() as u32),
            ],
        );
    let out = s.run();

    let check = |name: &str, want: &[f32]| {
        assert_eq!(bits(&out.get(name)), bits(want), "{name}");
    };
    let mut want = nan.clone();
    e.bn_relu(&bn, &x, &mut want, c, None)?;
    check("into", &want);
    let mut want = x.clone();
    e.bn_relu_in_place(&bn, &mut want, c, None)?;
    check("inplace", &want);
    let mut want = nan.clone();
    e.bn_relu(&student, &x, &mut want, c, Some(&z))?;
    check("noise_into", &want);
    let mut want = x.clone();
    e.bn_relu_in_place(&student, &mut want, c, Some(&z))?;
    check("noise_inplace", &want);
    for has_sn in [0, 1] {
        let skip_norm = (has_sn == 1).then_some(&sn);
        let mut want = y.clone();
        e.bn_add_relu(&bn, &mut want, &x, skip_norm, c)?;
        check(&format!("add{has_sn}"), &want);
        let mut dd = d.clone();
        let d2 = e.add_relu_backward(&bn, &mut dd, &y, skip_norm, c)?;
        check(&format!("d2_{has_sn}"), &d2);
        check(&format!("dd{has_sn}"), &dd);
    }
    for has_r in [0, 1] {
        let mut want = d.clone();
        e.bn_relu_backward(&bn, &mut want, &y, (has_r == 1).then_some(&r), c)?;
        check(&format!("bnd{has_r}"), &want);
    }
    check("normal", &normalise(&img, &mean, &inv_std, [ci, h, w]));
    check("denormal", &denormalise(&dn, &inv_std, [ci, h, w]));
    let pooled = avg_pool(&feats, hw, c);
    check("pooled", &pooled);
    check("logits", &linear(&pooled, &wt, &bias, b, c, k));
    check("dfeats", &linear_pool_input_grad(&dl, &wt, b, hw, c, k));
    Ok(())
}

/// The eval program with every launch of its own kernels built by the CUDA
/// executor's launch code (`device_eval_launch.rs`) and run by the emulator equals
/// the program on the CPU executor, bit for bit: the normalised input, the logits,
/// the input gradient and its NCHW form, on every network form (pre- and
/// post-activation, a student, OAT models at their λ).
#[test]
fn eval_program_launches_equal_the_cpu_executor() -> TestResult {
    use super::{backward, forward, launches};
    use crate::kernels::launch::emulated::{launches as emulated, same_bits, EmuExec};
    use crate::kernels::launch::Launcher;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (e, emu) = (CpuExec, EmuExec);
    let mut cases = 0;
    let models = crate::tests::fused_cases();
    for (name, m, _) in &models {
        let b = 2;
        m.reseed_noise(21);
        let op = m.device_eval_op(true)?.ok_or("no program")?;
        let p = &op.program;
        let x = crate::tests::input(b, 7);
        let n = x.elem_count();
        let a = normalise(
            &x.flatten_all()?.to_vec1::<f32>()?,
            &e.values(&p.mean)?,
            &e.values(&p.inv_std)?,
            p.input,
        );
        let mut a_emu = emu.buffer(n)?;
        launches::normalise(
            &emu,
            &mut a_emu,
            emu.tensor(&x, n, "images")?,
            p.input,
            &p.mean,
            &p.inv_std,
        )?;
        same_bits(&a, &a_emu, &format!("{name}: normalised input"));
        let before = emulated();
        let (logits, saved) = forward(&e, p, a, b, true)?;
        let (logits_emu, saved_emu) = forward(&emu, p, a_emu, b, true)?;
        same_bits(&logits, &logits_emu, &format!("{name}: logits"));
        assert!(logits.iter().all(|v| v.is_finite()), "{name}");
        let dl: Vec<f32> = (0..logits.len())
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let dn = backward(&e, p, &saved.ok_or("nothing kept")?, &dl)?;
        let dn_emu = backward(&emu, p, &saved_emu.ok_or("nothing kept")?, &dl)?;
        same_bits(&dn, &dn_emu, &format!("{name}: input gradient"));
        let dx = denormalise(&dn, &e.values(&p.inv_std)?, p.input);
        let mut dx_emu = emu.buffer(n)?;
        launches::denormalise(&emu, &mut dx_emu, &dn_emu, p.input, &p.inv_std)?;
        same_bits(&dx, &dx_emu, &format!("{name}: NCHW input gradient"));
        // Every BatchNorm, the pooling and the linear layer each way were launches.
        assert!(
            emulated() - before >= 8,
            "{name}: {} launches",
            emulated() - before
        );
        cases += 1;
    }
    assert_eq!(cases, models.len());
    Ok(())
}

/// Within a scope of frozen weights the eval program puts each kernel in KRSC order
/// once for all its passes, with the same logits; outside one, every pass does; the
/// scope's end forgets the kernels, so a weight changed afterwards is seen.
#[test]
fn kernels_are_reordered_once_per_scope_of_frozen_weights() -> TestResult {
    use super::{forward, launches};
    use crate::kernels::launch::emulated::{reorders, same_bits, EmuExec};
    use crate::kernels::launch::Launcher;
    use crate::kernels::weights::{frozen_weights, weights_frozen};
    let m = crate::tests::trained_looking(crate::ModelSpec::wrn(10, 1, 10), 3);
    let b = 2;
    let x = crate::tests::input(b, 7);
    let emu = EmuExec;
    let logits = || -> candle_core::Result<(Vec<f32>, usize)> {
        let op = m.device_eval_op(false)?.expect("a program");
        let p = &op.program;
        let n = x.elem_count();
        let mut a = emu.alloc(n)?;
        let images = emu.tensor(&x, n, "images")?;
        launches::normalise(&emu, &mut a, images, p.input, &p.mean, &p.inv_std)?;
        let before = reorders();
        let (l, _) = forward(&emu, p, a, b, false)?;
        Ok((l, reorders() - before))
    };
    assert!(!weights_frozen());
    let (plain, per_pass) = logits()?;
    assert!(per_pass >= 7, "{per_pass} kernels reordered in a pass");
    assert_eq!(logits()?.1, per_pass, "outside a scope every pass reorders");
    {
        let _outer = frozen_weights();
        let (first, n1) = logits()?;
        same_bits(&first, &plain, "the first pass in a scope");
        assert_eq!(n1, per_pass);
        {
            let _inner = frozen_weights();
            assert_eq!(logits()?.1, 0, "a nested scope keeps the kernels");
        }
        assert!(weights_frozen());
        let (again, n2) = logits()?;
        same_bits(&again, &plain, "a later pass in the scope");
        assert_eq!(n2, 0, "the kernels are kept in the scope");
    }
    assert!(!weights_frozen());
    crate::tests::randomise(&m, &["conv1.weight"], 0.0, 99);
    let _scope = frozen_weights();
    let (changed, n3) = logits()?;
    assert_eq!(n3, per_pass, "a new scope reorders again");
    assert!(
        changed.iter().zip(&plain).any(|(a, b)| a != b),
        "the changed weights are seen"
    );
    Ok(())
}
