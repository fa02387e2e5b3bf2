//! Small models and a synthetic separable problem for the tests. Weights are drawn
//! from a seeded ChaCha stream and trained deterministically, so every test sees the
//! same models on every run.

use std::sync::OnceLock;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// Input shape of the synthetic problem: (C, H, W) = (2, 4, 4), D = 32.
pub const SHAPE: [usize; 3] = [2, 4, 4];
/// Input dimension.
pub const DIM: usize = 32;
/// Classes of the synthetic problem (4, so that targeted DLR is defined).
pub const CLASSES: usize = 4;

fn uniform_var(rng: &mut ChaCha8Rng, shape: &[usize], bound: f64, dtype: DType) -> Result<Var> {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| bound * rng.gen_range(-1.0..1.0)).collect();
    let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?;
    Ok(Var::from_tensor(&t)?)
}

/// Fully connected ReLU network on flattened inputs.
pub struct Mlp {
    layers: Vec<(Var, Var)>,
}

impl Mlp {
    /// sizes: [D, hidden…, K]; PyTorch-style uniform initialisation from `seed`.
    pub fn random(sizes: &[usize], seed: u64, dtype: DType) -> Result<Mlp> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::new();
        for w in sizes.windows(2) {
            let bound = 1.0 / (w[0] as f64).sqrt();
            layers.push((
                uniform_var(&mut rng, &[w[1], w[0]], bound, dtype)?,
                uniform_var(&mut rng, &[w[1]], bound, dtype)?,
            ));
        }
        Ok(Mlp { layers })
    }

    /// All parameters.
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|(w, b)| [w.clone(), b.clone()])
            .collect()
    }
}

impl Module for Mlp {
    /// xs: (B, ...) → (B, K) logits.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = xs.flatten_from(1)?;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// conv3×3 (C → 4, padding 1) → ReLU → linear → K logits.
pub struct TinyConv {
    kernel: Var,
    bias: Var,
    head: Mlp,
}

impl TinyConv {
    /// A random convnet for inputs of shape (B, C, H, W).
    pub fn random(c: usize, h: usize, w: usize, classes: usize, seed: u64) -> Result<TinyConv> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / ((c * 9) as f64).sqrt();
        Ok(TinyConv {
            kernel: uniform_var(&mut rng, &[4, c, 3, 3], bound, DType::F32)?,
            bias: uniform_var(&mut rng, &[1, 4, 1, 1], bound, DType::F32)?,
            head: Mlp::random(&[4 * h * w, classes], seed + 1, DType::F32)?,
        })
    }
}

impl Module for TinyConv {
    /// xs: (B, C, H, W) → (B, K) logits.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = xs
            .conv2d(self.kernel.as_tensor(), 1, 1, 1, 1)?
            .broadcast_add(self.bias.as_tensor())?
            .relu()?;
        self.head.forward(&h)
    }
}

/// `n` points of a `CLASSES`-class Gaussian-blob problem in [0, 1]^D, shaped
/// (n, 2, 4, 4), with u32 labels. Centres are drawn from `seed` (shared by every split);
/// the points from `seed + split`.
pub fn blobs(n: usize, split: u64) -> Result<(Tensor, Tensor)> {
    let mut centre_rng = ChaCha8Rng::seed_from_u64(42);
    let centres: Vec<Vec<f64>> = (0..CLASSES)
        .map(|_| (0..DIM).map(|_| centre_rng.gen_range(0.3..0.7)).collect())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + split);
    let mut xs = Vec::with_capacity(n * DIM);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let y = i % CLASSES;
        for c in &centres[y] {
            let noise: f64 = (0..4).map(|_| rng.gen_range(-0.1..0.1)).sum();
            xs.push((c + noise).clamp(0.0, 1.0) as f32);
        }
        ys.push(y as u32);
    }
    let xs = Tensor::from_vec(xs, (n, SHAPE[0], SHAPE[1], SHAPE[2]), &Device::Cpu)?;
    Ok((xs, Tensor::from_vec(ys, n, &Device::Cpu)?))
}

/// A model trained on the blob problem and a held-out batch it classifies.
pub struct Trained {
    /// The model.
    pub model: Mlp,
    /// (64, 2, 4, 4) held-out inputs.
    pub xs: Tensor,
    /// (64,) labels.
    pub ys: Tensor,
}

/// MLP 32 → 32 → 4 trained for 300 full-batch AdamW steps (shared by all tests).
pub fn trained() -> &'static Trained {
    static MODEL: OnceLock<Trained> = OnceLock::new();
    MODEL.get_or_init(|| train().unwrap_or_else(|e| panic!("training the test model failed: {e}")))
}

fn train() -> Result<Trained> {
    let model = Mlp::random(&[DIM, 32, CLASSES], 3, DType::F32)?;
    let (xs, ys) = blobs(256, 0)?;
    let mut opt = AdamW::new(
        model.vars(),
        ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for _ in 0..300 {
        let loss = candle_nn::loss::cross_entropy(&model.forward(&xs)?, &ys)?;
        opt.backward_step(&loss)?;
    }
    let (xs, ys) = blobs(64, 1)?;
    Ok(Trained { model, xs, ys })
}

/// Fraction of `xs` the model classifies correctly.
pub fn accuracy(model: &dyn Module, xs: &Tensor, ys: &Tensor) -> Result<f64> {
    let pred = model.forward(xs)?.argmax(1)?.to_vec1::<u32>()?;
    let ys = ys.to_vec1::<u32>()?;
    Ok(pred.iter().zip(&ys).filter(|(p, y)| p == y).count() as f64 / ys.len() as f64)
}

#[test]
fn the_trained_model_separates_the_blobs() -> Result<()> {
    let t = trained();
    assert!(accuracy(&t.model, &t.xs, &t.ys)? >= 0.95);
    Ok(())
}
