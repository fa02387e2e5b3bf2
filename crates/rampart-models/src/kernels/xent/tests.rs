use super::*;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

fn rand_tensor(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn labels(b: usize, k: u32, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<u32> = (0..b).map(|_| rng.gen_range(0..k)).collect();
    Tensor::from_vec(v, b, &Device::Cpu).unwrap()
}

/// Soft targets: rows of positive weights summing to 1.
fn soft(b: usize, k: usize, seed: u64) -> Tensor {
    let t = (rand_tensor(&[b, k], 1.0, seed).abs().unwrap() + 0.05).unwrap();
    t.broadcast_div(&t.sum_keepdim(1).unwrap()).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-6)
}

fn loss_and_grad(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> Result<(f32, Tensor)> {
    let v = Var::from_tensor(x)?;
    let loss = f(v.as_tensor())?;
    let grads = (&loss * 3.0)?.backward()?;
    Ok((
        loss.to_scalar::<f32>()?,
        grads.get(&v).expect("a gradient").clone(),
    ))
}

/// Hand-worked: logits (0, ln 3) give p = (1/4, 3/4). Against label 1 the loss is
/// −ln ¾; smoothed by ½ over two classes (targets ¼, ¾) it is ¼·ln 4 − ¾·ln ¾; the
/// gradient of the plain loss is p − one-hot = (¼, −¼).
#[test]
fn cross_entropy_matches_hand_computation() -> Result<()> {
    let x = Tensor::new(&[[0f32, 3f32.ln()]], &Device::Cpu)?;
    let y = Tensor::new(&[1u32], &Device::Cpu)?;
    let plain = |s| {
        cross_entropy(
            &x,
            Targets::Labels {
                labels: &y,
                smoothing: s,
            },
        )
    };
    let want = -(0.75f64.ln());
    assert!((f64::from(plain(0.0)?.to_scalar::<f32>()?) - want).abs() < 1e-7);
    let want = 0.25 * 4f64.ln() - 0.75 * 0.75f64.ln();
    assert!((f64::from(plain(0.5)?.to_scalar::<f32>()?) - want).abs() < 1e-7);
    let (_, g) = loss_and_grad(
        |x| {
            cross_entropy(
                x,
                Targets::Labels {
                    labels: &y,
                    smoothing: 0.0,
                },
            )
        },
        &x,
    )?;
    let g = g.to_vec2::<f32>()?;
    assert!(
        (g[0][0] - 0.75).abs() < 1e-6 && (g[0][1] + 0.75).abs() < 1e-6,
        "{g:?}"
    );
    Ok(())
}

/// The op's loss and gradient equal candle's log-softmax path (the reference) for
/// labels, smoothed labels and soft targets, with K = 10 and K = 100, and logits up
/// to ±30.
#[test]
fn cross_entropy_matches_the_reference() -> Result<()> {
    for (b, k, scale) in [(13, 10, 3.0), (4, 100, 30.0), (1, 2, 1.0)] {
        let x = rand_tensor(&[b, k], scale, b as u64);
        let y = labels(b, k as u32, 7);
        let t = soft(b, k, 8);
        let cases: Vec<Targets<'_>> = vec![
            Targets::Labels {
                labels: &y,
                smoothing: 0.0,
            },
            Targets::Labels {
                labels: &y,
                smoothing: 0.1,
            },
            Targets::Soft(&t),
        ];
        for targets in cases {
            let (got, g_got) = loss_and_grad(|x| cross_entropy(x, targets), &x)?;
            let (want, g_want) = loss_and_grad(|x| reference_cross_entropy(x, targets, false), &x)?;
            assert!(
                (got - want).abs() <= 2e-6 * want.abs().max(1.0),
                "{b}×{k}: {got} vs {want}"
            );
            assert!(max_rel(&g_got, &g_want) < 1e-5, "{b}×{k} gradient");
        }
    }
    Ok(())
}

/// The gradient equals central finite differences of the loss itself, for smoothed
/// labels and for soft targets whose rows do not sum to 1.
#[test]
fn cross_entropy_gradient_matches_finite_differences() -> Result<()> {
    let (b, k) = (3, 5);
    let x = rand_tensor(&[b, k], 2.0, 11);
    let y = labels(b, k as u32, 12);
    let t = (soft(b, k, 13) * 1.5)?;
    for targets in [
        Targets::Labels {
            labels: &y,
            smoothing: 0.2,
        },
        Targets::Soft(&t),
    ] {
        let (_, g) = loss_and_grad(|x| cross_entropy(x, targets), &x)?;
        let g = (g / 3.0)?.flatten_all()?.to_vec1::<f32>()?;
        let flat = x.flatten_all()?.to_vec1::<f32>()?;
        let h = 1e-2f32;
        for i in 0..flat.len() {
            let at = |d: f32| -> Result<f64> {
                let mut v = flat.clone();
                v[i] += d;
                let x = Tensor::from_vec(v, (b, k), &Device::Cpu)?;
                Ok(f64::from(cross_entropy(&x, targets)?.to_scalar::<f32>()?))
            };
            let fd = (at(h)? - at(-h)?) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(g[i])).abs() < 2e-4,
                "element {i}: {fd} vs {}",
                g[i]
            );
        }
    }
    Ok(())
}

/// Bad input is refused with the reason: a label outside the classes, mismatched
/// shapes, a smoothing outside [0, 1], an empty batch.
#[test]
fn cross_entropy_refuses_bad_input() -> Result<()> {
    let x = rand_tensor(&[2, 3], 1.0, 1);
    let bad = Tensor::new(&[0u32, 3], &Device::Cpu)?;
    let err = cross_entropy(
        &x,
        Targets::Labels {
            labels: &bad,
            smoothing: 0.0,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("label 3 of row 1"), "{err}");
    let short = Tensor::new(&[0u32], &Device::Cpu)?;
    assert!(cross_entropy(
        &x,
        Targets::Labels {
            labels: &short,
            smoothing: 0.0
        }
    )
    .is_err());
    let y = Tensor::new(&[0u32, 2], &Device::Cpu)?;
    assert!(cross_entropy(
        &x,
        Targets::Labels {
            labels: &y,
            smoothing: 1.5
        }
    )
    .is_err());
    assert!(cross_entropy(&x, Targets::Soft(&rand_tensor(&[2, 4], 1.0, 2))).is_err());
    let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu)?;
    let none = Tensor::zeros(0, DType::U32, &Device::Cpu)?;
    assert!(cross_entropy(
        &empty,
        Targets::Labels {
            labels: &none,
            smoothing: 0.0
        }
    )
    .is_err());
    Ok(())
}

/// f64 logits take the reference path and agree with the f32 op.
#[test]
fn other_dtypes_take_the_reference_path() -> Result<()> {
    let x = rand_tensor(&[4, 10], 2.0, 3);
    let y = labels(4, 10, 4);
    let targets = Targets::Labels {
        labels: &y,
        smoothing: 0.1,
    };
    let a = cross_entropy(&x, targets)?.to_scalar::<f32>()?;
    let b = cross_entropy(&x.to_dtype(DType::F64)?, targets)?.to_scalar::<f64>()?;
    assert!((f64::from(a) - b).abs() < 1e-6, "{a} vs {b}");
    Ok(())
}

/// Each row's loss, and the gradient of a weighted sum of them, equal the reference's.
#[test]
fn per_row_losses_match_the_reference() -> Result<()> {
    let (b, k) = (9, 10);
    let x = rand_tensor(&[b, k], 4.0, 21);
    let y = labels(b, k as u32, 22);
    let t = soft(b, k, 23);
    let w = rand_tensor(&[b], 1.0, 24);
    for targets in [
        Targets::Labels {
            labels: &y,
            smoothing: 0.1,
        },
        Targets::Soft(&t),
    ] {
        let run = |per_row: bool| -> Result<(Tensor, Tensor)> {
            let v = Var::from_tensor(&x)?;
            let rows = if per_row {
                cross_entropy_rows(v.as_tensor(), targets)?
            } else {
                reference_cross_entropy(v.as_tensor(), targets, true)?
            };
            let g = (&rows * &w)?.sum_all()?.backward()?;
            Ok((rows, g.get(&v).expect("a gradient").clone()))
        };
        let (got, g_got) = run(true)?;
        let (want, g_want) = run(false)?;
        assert_eq!(got.dims(), &[b]);
        assert!(max_rel(&got, &want) < 2e-6);
        assert!(max_rel(&g_got, &g_want) < 1e-5);
        let mean = cross_entropy(&x, targets)?.to_scalar::<f32>()?;
        let from_rows = got.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - from_rows).abs() < 1e-6);
    }
    Ok(())
}
