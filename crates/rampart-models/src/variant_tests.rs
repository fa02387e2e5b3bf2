//! Tests of the stochastic-student and OAT variants.

use super::*;
use crate::variant::{NormOptions, OatSpec};
use candle_core::{Device, ModuleT, Tensor};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn tiny(noise: Option<f32>, oat: bool) -> ModelSpec {
    ModelSpec {
        input_shape: [3, 8, 8],
        noise: noise.map(|alpha| NoiseSpec { alpha }),
        oat: oat.then(OatSpec::standard),
        ..ModelSpec::wrn(10, 1, 4)
    }
}

fn images(b: usize, seed: u64) -> candle_core::Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..b * 192).map(|_| rng.gen::<f32>()).collect();
    Tensor::from_vec(v, (b, 3, 8, 8), &Device::Cpu)
}

fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn var(model: &Classifier, name: &str) -> Var {
    model
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no variable {name}"))
}

/// Per-channel standard deviation of an NHWC tensor.
fn channel_std(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    let c = t.dim(3)?;
    let rows = t.reshape(((), c))?;
    let mean = rows.mean_keepdim(0)?;
    rows.broadcast_sub(&mean)?
        .sqr()?
        .mean(0)?
        .sqrt()?
        .to_vec1::<f32>()
}

#[test]
fn noise_scale_follows_the_batch_statistics() -> TestResult {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let opts = NormOptions {
        noise: true,
        oat: None,
        batch_norm: crate::BatchNormSpec::default(),
        ctx: Arc::new(variant::Context::new(7)),
    };
    let norm = opts.norm(2, vb)?;
    let vars = varmap.data().lock().map_err(|e| e.to_string())?.clone();
    vars["weight"].set(&Tensor::new(&[3.0f32, 0.5], &dev)?)?;
    vars["noise.alpha"].set(&Tensor::new(&[0.2f32], &dev)?)?;
    // After BatchNorm with batch statistics channel c has standard deviation |γ_c|,
    // so the injected noise must have standard deviation α·|γ_c| = (0.6, 0.1).
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..256 * 16 * 2).map(|_| rng.gen::<f32>() * 5.0).collect();
    let x = Tensor::from_vec(x, (256, 4, 4, 2), &dev)?;
    let noisy = norm.forward_t(&x, true)?;
    let bn = crate::layers::batch_norm(2, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let clean = bn.forward_t(&x, true)?;
    let std = channel_std(&(noisy - &clean)?)?;
    assert!((std[0] - 0.6).abs() < 0.02, "{std:?}");
    assert!((std[1] - 0.1).abs() < 0.004, "{std:?}");
    // The running estimate moved 10 % of the way from 1 towards (3, 0.5).
    let running = vars["noise.running_std"].as_tensor().to_vec1::<f32>()?;
    assert!((running[0] - 1.2).abs() < 1e-3, "{running:?}");
    assert!((running[1] - 0.95).abs() < 1e-3, "{running:?}");
    // Evaluation uses the running estimate, not the batch: scale the channel-0
    // estimate and the noise follows it.
    vars["noise.running_std"].set(&Tensor::new(&[2.0f32, 0.25], &dev)?)?;
    let noisy = norm.forward_t(&x, false)?;
    let clean = bn.forward_t(&x, false)?;
    let std = channel_std(&(noisy - &clean)?)?;
    assert!((std[0] - 0.4).abs() < 0.015, "{std:?}");
    assert!((std[1] - 0.05).abs() < 0.002, "{std:?}");
    Ok(())
}

#[test]
fn student_starts_from_its_teacher_and_is_random_but_reseedable() -> TestResult {
    let dev = Device::Cpu;
    let teacher = Classifier::new(tiny(None, false), 3, &dev)?;
    let student = Classifier::new(tiny(Some(0.3), false), 9, &dev)?;
    let fresh = student.init_from(&teacher)?;
    assert!(fresh.iter().all(|n| n.contains("noise.")), "{fresh:?}");
    assert!(!fresh.is_empty());
    assert!(student.is_stochastic());
    let alphas = student.noise_alphas()?;
    assert_eq!(alphas.len(), 7, "WRN-10-1 has seven BatchNorms");
    assert!(alphas.iter().all(|(_, a)| (*a - 0.3).abs() < 1e-7));
    let x = images(4, 0)?;
    let want = teacher.forward_t(&x, false)?;
    let drawn = noise_seeds_drawn();
    let a = student.forward_t(&x, false)?;
    // One seed per noisy layer and pass (what tells an attack's CUDA graphs that a
    // pass cannot be replayed); a teacher draws none.
    assert_eq!(noise_seeds_drawn() - drawn, 7);
    teacher.forward_t(&x, false)?;
    teacher.forward_t(&x, true)?;
    assert_eq!(noise_seeds_drawn() - drawn, 7);
    let b = student.forward_t(&x, false)?;
    assert_eq!(noise_seeds_drawn() - drawn, 14);
    assert!(max_diff(&a, &b)? > 1e-3, "two draws must differ");
    student.reseed_noise(5);
    let c = student.forward_t(&x, false)?;
    student.reseed_noise(5);
    let d = student.forward_t(&x, false)?;
    assert_eq!(max_diff(&c, &d)?, 0.0, "same seed, same noise");
    // With the noise switched off the student is its teacher.
    student.set_noise_scale(0.0)?;
    assert!(!student.is_stochastic());
    assert!(max_diff(&student.forward_t(&x, false)?, &want)? < 1e-5);
    assert!(student.set_noise_scale(-1.0).is_err());
    assert!(teacher.set_noise_scale(1.0).is_err());
    // Teachers of another architecture are refused.
    let other = Classifier::new(ModelSpec::wrn(16, 1, 4), 0, &dev)?;
    assert!(student.init_from(&other).is_err());
    Ok(())
}

#[test]
fn noise_factor_receives_gradients() -> TestResult {
    let dev = Device::Cpu;
    let student = Classifier::new(tiny(Some(0.1), false), 0, &dev)?;
    let loss = student.forward_t(&images(8, 1)?, true)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    let alpha = var(&student, "stage2.block0.bn1.noise.alpha");
    let g = grads.get(alpha.as_tensor()).ok_or("no gradient for α")?;
    assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn lambda_codes_are_orthonormal_and_interpolate() -> TestResult {
    let model = Classifier::new(tiny(None, true), 0, &Device::Cpu)?;
    let codes = var(&model, LAMBDA_CODES).as_tensor().to_vec2::<f32>()?;
    assert_eq!(codes.len(), 6);
    for (i, a) in codes.iter().enumerate() {
        for (j, b) in codes.iter().enumerate() {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((dot - want).abs() < 1e-5, "codes {i}, {j}: {dot}");
        }
    }
    let oat = OatSpec::standard();
    let mid = oat.encode(&codes, &[0.15]);
    for (k, v) in mid.iter().enumerate() {
        assert!((v - 0.5 * (codes[1][k] + codes[2][k])).abs() < 1e-6);
    }
    assert_eq!(oat.encode(&codes, &[0.4]), codes[4]);
    assert_eq!(oat.encode(&codes, &[1.0]), codes[5]);
    Ok(())
}

/// The codes encoded on the device (what every pass of an OAT model uses, so that
/// nothing is read back from a GPU) are the host encoding's values: one λ for the
/// batch, λ on and between training values, clamped below and above, mixed rows, and
/// no rows (a data-parallel worker's empty part of a batch).
#[test]
fn lambda_codes_encoded_on_the_device_equal_the_host_encoding() -> TestResult {
    let model = Classifier::new(tiny(None, true), 0, &Device::Cpu)?;
    let table = var(&model, LAMBDA_CODES).as_tensor().clone();
    let codes = table.to_vec2::<f32>()?;
    let oat = OatSpec::standard();
    for lambdas in [
        vec![0.15f32; 3],
        vec![0.0],
        vec![1.0, 1.0],
        vec![0.37],
        vec![-0.5, 2.0],
        vec![0.0, 0.25, 0.0, 1.0, 0.25, 0.333],
        vec![],
    ] {
        let want = oat.encode(&codes, &lambdas);
        let got = oat.encode_on_device(&table, &lambdas)?;
        assert_eq!(got.dims(), &[lambdas.len(), oat.code_dim]);
        assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want, "{lambdas:?}");
    }
    Ok(())
}

#[test]
fn oat_routes_each_example_by_its_lambda() -> TestResult {
    let dev = Device::Cpu;
    let teacher = Classifier::new(tiny(None, false), 1, &dev)?;
    let model = Classifier::new(tiny(None, true), 2, &dev)?;
    model.init_from(&teacher)?;
    let x = images(4, 2)?;
    // Untrained FiLM is the identity and both BatchNorms start from the teacher's
    // clean one only for λ = 0; the λ > 0 BatchNorm has its own (fresh) statistics.
    let at0 = model.forward_lambdas(&x, &[0.0; 4], false)?;
    assert!(max_diff(&at0, &teacher.forward_t(&x, false)?)? < 1e-5);
    // Perturb the second BatchNorm and the FiLM of one layer.
    var(&model, "stage1.block0.bn1.adv.weight").set(&Tensor::new(&[2f32; 16], &dev)?)?;
    let w = Tensor::randn(0f32, 0.5, (32, 32), &dev)?;
    var(&model, "stage1.block0.bn2.film.fc2.weight").set(&w)?;
    let lambdas = [0.0, 0.3, 1.0, 0.0];
    let mixed = model.forward_lambdas(&x, &lambdas, false)?;
    for (i, &lam) in lambdas.iter().enumerate() {
        let alone = model.forward_lambdas(&x.narrow(0, i, 1)?, &[lam], false)?;
        assert!(
            max_diff(&mixed.narrow(0, i, 1)?, &alone)? < 1e-5,
            "row {i} (λ = {lam}) depends on the other rows"
        );
    }
    // λ = 0 rows ignore the second BatchNorm; λ > 0 rows see it, and λ itself matters.
    let at0_after = model.forward_lambdas(&x, &[0.0; 4], false)?;
    assert!(
        max_diff(&at0_after, &at0)? > 1e-3,
        "FiLM also conditions λ = 0"
    );
    var(&model, "stage1.block0.bn2.film.fc2.weight").set(&Tensor::zeros(
        (32, 32),
        DType::F32,
        &dev,
    )?)?;
    let clean_again = model.forward_lambdas(&x, &[0.0; 4], false)?;
    assert!(
        max_diff(&clean_again, &at0)? < 1e-5,
        "λ = 0 must not use the adv BN"
    );
    let robust = model.forward_lambdas(&x, &[0.3; 4], false)?;
    assert!(max_diff(&robust, &at0)? > 1e-3, "λ > 0 must use the adv BN");
    // forward_t uses the model's λ, by default the largest.
    assert_eq!(model.lambda(), Some(1.0));
    model.set_lambda(0.3)?;
    assert!(max_diff(&model.forward_t(&x, false)?, &robust)? < 1e-6);
    assert!(model.set_lambda(1.5).is_err());
    assert!(teacher.set_lambda(0.3).is_err());
    assert!(model.forward_lambdas(&x, &[0.1; 3], false).is_err());
    Ok(())
}

#[test]
fn oat_training_forward_updates_both_batchnorms_and_trains_film() -> TestResult {
    let dev = Device::Cpu;
    let model = Classifier::new(tiny(None, true), 0, &dev)?;
    let before_clean = var(&model, "bn.running_mean")
        .as_tensor()
        .to_vec1::<f32>()?;
    let before_adv = var(&model, "bn.adv.running_mean")
        .as_tensor()
        .to_vec1::<f32>()?;
    let loss = model
        .forward_lambdas(&images(6, 3)?, &[0.0, 0.0, 0.1, 0.2, 0.4, 1.0], true)?
        .sqr()?
        .mean_all()?;
    let grads = loss.backward()?;
    assert_ne!(
        var(&model, "bn.running_mean")
            .as_tensor()
            .to_vec1::<f32>()?,
        before_clean
    );
    assert_ne!(
        var(&model, "bn.adv.running_mean")
            .as_tensor()
            .to_vec1::<f32>()?,
        before_adv
    );
    for name in ["bn.weight", "bn.adv.weight", "bn.film.fc2.weight"] {
        let g = grads
            .get(var(&model, name).as_tensor())
            .ok_or_else(|| format!("no gradient for {name}"))?;
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
    }
    assert!(!is_buffer("bn.film.fc1.weight"));
    assert!(is_buffer(LAMBDA_CODES) && is_buffer("bn.noise.running_std"));
    Ok(())
}

#[test]
fn variants_survive_saving_and_loading() -> TestResult {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    for spec in [tiny(Some(0.2), false), tiny(None, true)] {
        let model = Classifier::new(spec.clone(), 4, &dev)?;
        let path = dir.path().join("m.safetensors");
        model.save(&path)?;
        let loaded = Classifier::load(&path, &dev)?;
        assert_eq!(loaded.spec(), &spec);
        for ((n, a), (_, b)) in model.named_vars().iter().zip(loaded.named_vars()) {
            assert_eq!(max_diff(a.as_tensor(), b.as_tensor())?, 0.0, "{n}");
        }
        if spec.noise.is_some() {
            model.set_noise_scale(0.0)?;
            loaded.set_noise_scale(0.0)?;
        }
        let x = images(2, 5)?;
        assert_eq!(
            max_diff(&model.forward_t(&x, false)?, &loaded.forward_t(&x, false)?)?,
            0.0
        );
    }
    // A plain model's file does not mention the variants (old files stay readable).
    let plain = serde_json::to_string(&tiny(None, false))?;
    assert!(
        !plain.contains("noise") && !plain.contains("oat"),
        "{plain}"
    );
    let bad = ModelSpec {
        noise: Some(NoiseSpec { alpha: -1.0 }),
        ..tiny(None, false)
    };
    assert!(Classifier::new(bad, 0, &dev).is_err());
    let bad = ModelSpec {
        oat: Some(OatSpec {
            lambdas: vec![0.0, 0.5, 0.2],
            code_dim: 8,
        }),
        ..tiny(None, false)
    };
    assert!(Classifier::new(bad, 0, &dev).is_err());
    Ok(())
}
