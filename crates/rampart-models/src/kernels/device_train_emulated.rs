//! The train program's kernels (the second half of `device_eval.cu`) run on the CPU
//! ([`crate::kernels::emulate`]) against the CPU executor's twins, bit for bit, with
//! the arguments in the order of the CUDA executor's launches: the ReLU mask, the
//! block's sum and ReLU, the gradient sum, the linear layer's parameter gradients, a
//! student's σ, noise and α gradient (the two-kernel sum over several blocks), and
//! FiLM forward and backward. Then the whole program with its launches built by the
//! CUDA executor's code and emulated, against the CPU executor.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{dot_blocks, noise_dot, noise_relu, noise_sigma, TFc, TrainExec, DOT_THREADS};
use crate::kernels::device_eval::CpuExec;
use crate::kernels::emulate::{awkward, bits, finite, Arg, Emulator};

use crate::kernels::launch::emulated::{launches as emulated, same_bits, EmuExec};
use candle_core::Tensor;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

#[test]
fn train_program_kernels_equal_their_twins() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut s = Emulator::of(include_str!("device_eval.cu")).session();
    let e = CpuExec;
    // Four images of 5×5 pixels and 6 channels.
    let (b, hw, c) = (4usize, 25usize, 6usize);
    let (per, n) = (hw * c, b * hw * c);
    let (nu, cu, peru) = (n as u32, c as u32, per as u32);
    let (d, y, r) = (
        awkward(&mut rng, n),
        awkward(&mut rng, n),
        awkward(&mut rng, n),
    );
    s.put("y", &y)
        .put("r", &r)
        .put("mask", &d)
        .put("sum", &d)
        .put("addrelu", &y);
    s.launch_n(
        "de_relu_mask_inplace",
        n,
        128,
        &[Arg::B("mask"), Arg::B("y"), Arg::U32(nu)],
    )
    .launch_n(
        "de_add_inplace",
        n,
        128,
        &[Arg::B("sum"), Arg::B("r"), Arg::U32(nu)],
    )
    .launch_n(
        "dt_add_relu_inplace",
        n,
        128,
        &[Arg::B("addrelu"), Arg::B("r"), Arg::U32(nu)],
    );

    // The linear layer's parameter gradients: weight (K, C) then bias at fc.w.
    let k = 10usize;
    let dl: Vec<f32> = (0..b * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let pooled: Vec<f32> = (0..b * c).map(|_| rng.gen_range(-1.0f32..2.0)).collect();
    s.put("dl", &dl)
        .put("pooled", &pooled)
        .put("dwb", &vec![f32::NAN; k * c + k])
        .launch_n(
            "de_linear_param_grads",
            k * c + k,
            128,
            &[
                Arg::B("dwb"),
                Arg::B("dl"),
                Arg::B("pooled"),
                Arg::U32(b as u32),
                Arg::U32(cu),
                Arg::U32(k as u32),
                Arg::U32((k * c + k) as u32),
            ],
        );

    // A student's noisy BatchNorm: σ, the noise, α's gradient over several blocks.
    let gamma: Vec<f32> = (0..c).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
    let mut stats: Vec<f32> = (0..c).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    stats.extend((0..c).map(|_| rng.gen_range(0.05f32..400.0)));
    let eps = 1e-5f32;
    let z: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let sigma = noise_sigma(&gamma, &stats[c..], eps);
    let (alpha, scale) = (0.2f32, 1.5f32);
    let dot_n = 1900usize;
    let (dd, dz) = (finite(&mut rng, dot_n), finite(&mut rng, dot_n));
    let blocks = dot_blocks(dot_n);
    assert!(blocks > 1);
    s.put("gamma", &gamma)
        .put("stats", &stats)
        .put("sigma_out", &vec![f32::NAN; c])
        .put("sigma", &sigma)
        .put("alpha", &[alpha])
        .put("z", &z)
        .put("noisy", &y)
        .put("dd", &dd)
        .put("dz", &dz)
        .put("partial", &vec![f32::NAN; blocks])
        .put("agrad", &[f32::NAN])
        .launch_n(
            "dt_noise_sigma",
            c,
            128,
            &[
                Arg::B("sigma_out"),
                Arg::B("gamma"),
                Arg::B("stats"),
                Arg::F32(eps),
                Arg::U32(cu),
            ],
        )
        .launch_n(
            "dt_noise_relu_inplace",
            n,
            128,
            &[
                Arg::B("noisy"),
                Arg::B("z"),
                Arg::B("sigma"),
                Arg::B("alpha"),
                Arg::F32(scale),
                Arg::U32(cu),
                Arg::U32(nu),
            ],
        )
        .launch(
            "dt_noise_dot",
            [blocks as u32, 1, 1],
            [DOT_THREADS as u32, 1, 1],
            &[
                Arg::B("partial"),
                Arg::B("dd"),
                Arg::B("dz"),
                Arg::B("sigma"),
                Arg::U32(cu),
                Arg::U32(dot_n as u32),
            ],
        )
        .launch(
            "dt_noise_alpha_grad",
            [1, 1, 1],
            [1, 1, 1],
            &[
                Arg::B("agrad"),
                Arg::B("partial"),
                Arg::U32(blocks as u32),
                Arg::F32(scale),
            ],
        );

    // FiLM: each image's [γ_f | β_f] at `film` of the parameters.
    let film = 3usize;
    let mut p: Vec<f32> = (0..film).map(|_| f32::NAN).collect();
    p.extend((0..b * 2 * c).map(|_| rng.gen_range(-1.0f32..1.0)));
    let (h, fd) = (finite(&mut rng, n), finite(&mut rng, n));
    let f = &p[film..];
    s.put("h", &h)
        .put("f", f)
        .put("film_y", &vec![f32::NAN; n])
        .put("film_df", &vec![f32::NAN; b * 2 * c])
        .put("film_d", &fd)
        .launch_n(
            "dt_film_relu",
            n,
            128,
            &[
                Arg::B("film_y"),
                Arg::B("h"),
                Arg::B("f"),
                Arg::U32(cu),
                Arg::U32(peru),
                Arg::U32(nu),
            ],
        )
        .launch_n(
            "dt_film_grads",
            b * 2 * c,
            128,
            &[
                Arg::B("film_df"),
                Arg::B("film_d"),
                Arg::B("h"),
                Arg::U32(cu),
                Arg::U32(peru),
                Arg::U32((b * 2 * c) as u32),
            ],
        )
        .launch_n(
            "dt_film_scale",
            n,
            128,
            &[
                Arg::B("film_d"),
                Arg::B("f"),
                Arg::U32(cu),
                Arg::U32(peru),
                Arg::U32(nu),
            ],
        );
    let out = s.run();

    let check = |name: &str, want: &[f32]| {
        assert_eq!(bits(&out.get(name)), bits(want), "{name}");
    };
    let mut want = d.clone();
    e.relu_mask(&mut want, &y)?;
    check("mask", &want);
    let mut want = d.clone();
    e.add_in_place(&mut want, &r)?;
    check("sum", &want);
    let mut want = y.clone();
    e.add_relu_in_place(&mut want, &r)?;
    check("addrelu", &want);

    let fc = TFc {
        w: 2,
        b: 2 + k * c,
        k,
        c,
    };
    let mut params = vec![0f32; 2];
    params.extend((0..k * c + k).map(|_| rng.gen_range(-1.0f32..1.0)));
    let mut grad = vec![f32::NAN; params.len()];
    e.linear_pool_backward_at(&dl, &pooled, &params, &fc, 1, &mut grad)?;
    assert!(grad[fc.w..].iter().all(|v| v.is_finite()));
    check("dwb", &grad[fc.w..]);

    check("sigma_out", &sigma);
    let mut want = y.clone();
    noise_relu(&mut want, &z, &sigma, alpha, scale, c);
    check("noisy", &want);
    let agrad = noise_dot(&dd, &dz, &sigma, c) * scale;
    assert!(agrad.is_finite());
    check("agrad", &[agrad]);

    check("film_y", &e.film_relu(&h, &p, film, c, per)?);
    let (mut dfilm, mut g) = (fd.clone(), vec![f32::NAN; p.len()]);
    e.film_backward(&mut dfilm, &h, &p, film, c, per, &mut g)?;
    assert!(g[film..].iter().all(|v| v.is_finite()));
    check("film_df", &g[film..]);
    check("film_d", &dfilm);
    Ok(())
}

// ---------------------------------------------------------------------------------
// The whole train program on the emulated executor.

/// The train program with every launch of its own kernels built by the CUDA
/// executor's launch code (`device_train_launch.rs`, and `device_eval_launch.rs` for
/// the input, the pooling and the linear layer) and run by the emulator equals the
/// program on the CPU executor, bit for bit: the logits and batch statistics, and
/// every parameter gradient; on a pre-activation WRN, ResNet-20 (post-activation,
/// projection shortcuts), a stochastic student (σ, the noise, α's gradient over
/// several blocks) and an OAT network at per-row λ (two BatchNorm groups, FiLM).
#[test]
fn train_program_launches_equal_the_cpu_executor() -> TestResult {
    use crate::{Arch, ModelSpec, NoiseSpec, OatSpec};
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut student = ModelSpec::wrn(10, 1, 10);
    student.noise = Some(NoiseSpec { alpha: 0.3 });
    let mut oat = ModelSpec::wrn(10, 1, 10);
    oat.oat = Some(OatSpec::standard());
    // The λ of each row of an OAT batch: the λ = 0 rows first (the program's groups).
    let lambdas = [0.0f32, 0.0, 0.3, 1.0];
    for (name, spec) in [
        ("wrn-10-2", ModelSpec::wrn(10, 2, 7)),
        ("resnet20", ModelSpec::cifar(Arch::Resnet20, 10)),
        ("student", student),
        ("oat", oat),
    ] {
        let is_oat = spec.oat.is_some();
        let m = crate::tests::trained_looking(spec, 5);
        crate::tests::randomise(&m, &["film.fc2", "adv.weight", "noise.alpha"], 0.2, 9);
        crate::tests::randomise(&m, &["adv.running_var"], 1.0, 10);
        let b = if is_oat { lambdas.len() } else { 3 };
        let x = crate::tests::input(b, 13);
        let parts = if is_oat {
            m.with_condition(&lambdas, || m.device_train_program(b, Some(2)))?
        } else {
            m.device_train_program(b, None)?
        };
        let (program, tensors, _) = parts.ok_or("no program")?;
        let flat = tensors
            .iter()
            .map(Tensor::flatten_all)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let params = Tensor::cat(&flat, 0)?.to_vec1::<f32>()?;
        let before = emulated();
        let (out, st) = super::forward(&CpuExec, &program, params.clone(), &x)?;
        let (out_emu, st_emu) = super::forward(&EmuExec, &program, params, &x)?;
        same_bits(&out, &out_emu, &format!("{name}: logits and statistics"));
        assert!(out.iter().all(|v| v.is_finite()), "{name}");
        let k = program.net.fc().k;
        let dl: Vec<f32> = (0..b * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let grad = super::backward(&CpuExec, &program, &st, &dl)?;
        let grad_emu = super::backward(&EmuExec, &program, &st_emu, &dl)?;
        same_bits(&grad, &grad_emu, &format!("{name}: parameter gradients"));
        assert!(
            emulated() - before >= 10,
            "{name}: {} launches",
            emulated() - before
        );
    }
    Ok(())
}
