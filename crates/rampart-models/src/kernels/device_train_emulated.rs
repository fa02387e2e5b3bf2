//! The train program's kernels (the second half of `device_eval.cu`) run on the CPU
//! ([`crate::kernels::emulate`]) against the CPU executor's twins, bit for bit, with
//! the arguments in the order of the CUDA executor's launches: the ReLU mask, the
//! block's sum and ReLU, the gradient sum, the linear layer's parameter gradients, a
//! student's σ, noise and α gradient (the two-kernel sum over several blocks), and
//! FiLM forward and backward.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{dot_blocks, noise_dot, noise_relu, noise_sigma, TFc, TrainExec, DOT_THREADS};
use crate::kernels::device_eval::CpuExec;
use crate::kernels::emulate::{awkward, bits, finite, Arg, Emulator};

type TestResult = Result<(), Box<dyn std::error::Error>>;

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
