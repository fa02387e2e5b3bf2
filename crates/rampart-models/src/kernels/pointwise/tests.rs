use super::*;
use crate::kernels::bn;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect()
}

fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(rand_vec(shape.iter().product(), seed), shape, &Device::Cpu).unwrap()
}

/// The values' bits, −0 counted as +0 (the same number; which one a product with a
/// cut gradient gives depends on how it was summed).
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| (v + 0.0).to_bits())
        .collect()
}

/// The ReLU's mask equals candle's own ReLU backward pass bit for bit (no input is
/// exactly 0, where candle passes the gradient and the mask, like the CPU's fused
/// BatchNorm+ReLU, does not).
#[test]
fn relu_mask_equals_candle_relu_backward() -> Result<()> {
    let x = Var::from_tensor(&rand_tensor(&[4, 5, 5, 6], 1))?;
    let probe = rand_tensor(&[4, 5, 5, 6], 2);
    let y = x.relu()?;
    let grads = (&y * &probe)?.sum_all()?.backward()?;
    let want = grads.get(&x).expect("a gradient");
    let got = relu_mask(&probe, &y)?;
    assert_eq!(bits(&got), bits(want));
    // At y = 0 the gradient is cut, and NaN passes where the ReLU is live.
    let dy = Tensor::new(&[1f32, 2.0, f32::NAN, 4.0], &Device::Cpu)?;
    let y = Tensor::new(&[0f32, 0.5, 1.0, -0.0], &Device::Cpu)?;
    let got = relu_mask(&dy, &y)?.to_vec1::<f32>()?;
    assert_eq!(&got[..2], &[0.0, 2.0]);
    assert!(got[2].is_nan());
    assert_eq!(got[3], 0.0);
    assert!(relu_mask(&dy, &y.narrow(0, 0, 3)?).is_err());
    Ok(())
}

/// The one-op input gradient of an eval-mode BatchNorm (+ ReLU) with frozen γ and β
/// equals the CPU op's backward pass bit for bit, with and without the ReLU.
#[test]
fn eval_backward_equals_the_cpu_batch_norm_backward() -> Result<()> {
    let (c, eps) = (6, 1e-5);
    let x = Var::from_tensor(&rand_tensor(&[3, 4, 4, c], 3))?;
    let gamma = (rand_tensor(&[c], 4) + 1.5)?;
    let beta = rand_tensor(&[c], 5);
    let mean = (rand_tensor(&[c], 6) * 0.2)?;
    let var = (rand_tensor(&[c], 7).abs()? + 0.3)?;
    let probe = rand_tensor(&[3, 4, 4, c], 8);
    for relu in [false, true] {
        let y = bn::eval(&x, &gamma, &beta, &mean, &var, eps, relu)?;
        let grads = (&y * &probe)?.sum_all()?.backward()?;
        let want = grads.get(&x).expect("a gradient");
        let op = BnEvalBackward {
            var: var.clone(),
            eps: eps as f32,
            relu,
            c,
        };
        let got = probe
            .flatten_all()?
            .apply_op3_no_bwd(&y.flatten_all()?, &gamma, &op)?;
        assert_eq!(bits(&got), bits(want), "relu {relu}");
    }
    let op = BnEvalBackward {
        var: var.clone(),
        eps: 1e-5,
        relu: true,
        c: 5,
    };
    let err = probe
        .flatten_all()?
        .apply_op3_no_bwd(&probe.flatten_all()?, &gamma, &op)
        .unwrap_err();
    assert!(err.to_string().contains("5 channels"), "{err}");
    Ok(())
}

/// The running statistics updated by the one-pass op from the op's saved [mean |
/// 1/√(var + ε)] equal, bit for bit, those of the tensor operations it replaces, over
/// several steps and momenta, with the unbiased variance.
#[test]
fn running_update_equals_the_tensor_operations() -> Result<()> {
    let c = 7;
    let gamma = (rand_tensor(&[c], 9) + 1.0)?;
    let beta = rand_tensor(&[c], 10);
    let start_mean = rand_tensor(&[c], 11);
    let start_var = (rand_tensor(&[c], 12).abs()? + 0.5)?;
    for (momentum, eps) in [(0.1, 1e-5), (0.01, 1e-3), (1.0, 1e-5)] {
        let fused = (
            Var::from_tensor(&start_mean)?,
            Var::from_tensor(&start_var)?,
        );
        let plain = (
            Var::from_tensor(&start_mean)?,
            Var::from_tensor(&start_var)?,
        );
        for step in 0..3 {
            let x = (rand_tensor(&[2, 3, 3, c], 20 + step) * 3.0)?;
            let (_, stats) = bn::train(&x, &gamma, &beta, eps, true)?;
            stats.update_running(&fused.0, &fused.1, momentum)?;
            let (mean, var) = stats.mean_var()?;
            bn::BatchStats::new(mean, var, stats.rows)
                .update_running(&plain.0, &plain.1, momentum)?;
        }
        assert_eq!(bits(fused.0.as_tensor()), bits(plain.0.as_tensor()));
        assert_eq!(bits(fused.1.as_tensor()), bits(plain.1.as_tensor()));
        assert_ne!(bits(fused.1.as_tensor()), bits(&start_var));
    }
    Ok(())
}

/// The running statistics are PyTorch's: after one step with momentum m, mean =
/// (1 − m)·old + m·batch mean and var = (1 − m)·old + m·unbiased batch variance
/// (a hand-worked channel: values 1, 2, 3, 6 → mean 3, unbiased variance 14/3).
#[test]
fn running_update_is_pytorchs_rule() -> Result<()> {
    let x = Tensor::new(&[[1f32], [2.0], [3.0], [6.0]], &Device::Cpu)?;
    let one = Tensor::new(&[1f32], &Device::Cpu)?;
    let zero = Tensor::new(&[0f32], &Device::Cpu)?;
    let (_, stats) = bn::train(&x, &one, &zero, 1e-5, false)?;
    let (mean, var) = (
        Var::new(&[0.5f32], &Device::Cpu)?,
        Var::new(&[2f32], &Device::Cpu)?,
    );
    stats.update_running(&mean, &var, 0.25)?;
    let m = mean.as_tensor().to_vec1::<f32>()?[0];
    let v = var.as_tensor().to_vec1::<f32>()?[0];
    assert!((m - (0.75 * 0.5 + 0.25 * 3.0)).abs() < 1e-6, "{m}");
    assert!((v - (0.75 * 2.0 + 0.25 * 14.0 / 3.0)).abs() < 1e-4, "{v}");
    Ok(())
}
