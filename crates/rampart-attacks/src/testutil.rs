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

/// A model behind a gradient-blocking op: the logits of `base` on a detached input.
/// Its outputs are meaningful, its input gradients are exactly zero.
pub struct Masked<'a>(pub &'a dyn Module);

impl Module for Masked<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(&xs.detach())
    }
}

/// √(x − stop_gradient(x)) summed per example: the value 0 with an infinite
/// derivative, (B, 1).
fn infinite_slope(xs: &Tensor) -> candle_core::Result<Tensor> {
    (xs - xs.detach())?.flatten_from(1)?.sqrt()?.sum_keepdim(1)
}

/// Exact logits of `base`, NaN input gradients: 0·√(x − stop_gradient(x)) is added
/// to every logit (0 · ∞ in the backward pass).
pub struct NanGradient<'a>(pub &'a dyn Module);

impl Module for NanGradient<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // A product with a zero tensor, not `* 0.0`: candle prunes affine maps by 0
        // from the backward graph.
        let slope = infinite_slope(xs)?;
        self.0
            .forward(xs)?
            .broadcast_add(&(&slope * slope.zeros_like()?)?)
    }
}

/// Exact logits of `base`, infinite input gradients: √(x − stop_gradient(x)) is
/// added to the logit of class 0.
pub struct InfiniteGradient<'a>(pub &'a dyn Module);

impl Module for InfiniteGradient<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.0.forward(xs)?;
        let k = logits.dim(1)?;
        let first = logits
            .narrow(1, 0, 1)?
            .broadcast_add(&infinite_slope(xs)?)?;
        Tensor::cat(&[&first, &logits.narrow(1, 1, k - 1)?], 1)
    }
}

/// The logits of `base` plus N(0, σ²) noise drawn on every forward pass.
pub struct Noisy<'a> {
    /// The deterministic model.
    pub base: &'a dyn Module,
    /// Noise standard deviation σ.
    pub sigma: f64,
    /// Noise source.
    pub rng: std::sync::Mutex<ChaCha8Rng>,
}

impl<'a> Noisy<'a> {
    /// Noise of standard deviation `sigma` from `seed`.
    pub fn new(base: &'a dyn Module, sigma: f64, seed: u64) -> Noisy<'a> {
        Noisy {
            base,
            sigma,
            rng: std::sync::Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }
}

impl Module for Noisy<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.base.forward(xs)?;
        let n = logits.elem_count();
        let noise: Vec<f32> = {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
            (0..n)
                .map(|_| {
                    let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
                    (self.sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos())
                        as f32
                })
                .collect()
        };
        let noise = Tensor::from_vec(noise, logits.dims(), logits.device())?;
        logits + noise
    }
}

/// The softmax of `base`: probabilities returned where logits are expected.
pub struct SoftmaxOutput<'a>(pub &'a dyn Module);

impl Module for SoftmaxOutput<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::softmax(&self.0.forward(xs)?, 1)
    }
}

/// Fraction of examples whose first arg-max of `model(rows)` differs from the label,
/// per example.
pub fn misclassified(model: &dyn Module, xs: &Tensor, ys: &Tensor) -> Result<Vec<bool>> {
    let pred = model.forward(xs)?.argmax(1)?.to_vec1::<u32>()?;
    let ys = ys.to_vec1::<u32>()?;
    Ok(pred.iter().zip(&ys).map(|(p, y)| p != y).collect())
}

/// The invariants of every result of an untargeted attack, checked from the outside:
/// ‖clipped − x‖_p ≤ ε (exactly, in f64 from the returned f32 values), clipped inside
/// the bounds, the reported norms match, and success / prediction hold when the model
/// is run again on `clipped` (deterministic models).
pub fn assert_invariants(
    model: &dyn Module,
    norm: crate::Norm,
    bounds: crate::Bounds,
    xs: &Tensor,
    ys: &Tensor,
    res: &crate::AttackResult,
) -> Result<()> {
    assert_eq!(res.clipped.dims(), xs.dims());
    let adv = res.clipped.flatten_from(1)?.to_vec2::<f32>()?;
    let clean = xs.flatten_from(1)?.to_vec2::<f32>()?;
    for (i, (a, x)) in adv.iter().zip(&clean).enumerate() {
        let delta: Vec<f64> = a
            .iter()
            .zip(x)
            .map(|(a, x)| *a as f64 - *x as f64)
            .collect();
        let n = norm.measure(&delta);
        assert!(
            n <= res.eps,
            "{norm}: example {i}: ‖δ‖ = {n} > ε = {}",
            res.eps
        );
        assert!(
            (n - res.norm[i] as f64).abs() <= 1e-5 * (1.0 + n),
            "example {i}: reported norm {} vs measured {n}",
            res.norm[i]
        );
        assert!(a.iter().all(|v| *v >= bounds.lo && *v <= bounds.hi));
    }
    let fooled = misclassified(model, &res.clipped, ys)?;
    assert_eq!(
        fooled, res.success,
        "success does not hold on re-evaluation"
    );
    let pred = model.forward(&res.clipped)?.argmax(1)?.to_vec1::<u32>()?;
    assert_eq!(pred, res.predicted);
    Ok(())
}

/// Number of `true` entries.
pub fn count(flags: &[bool]) -> usize {
    flags.iter().filter(|f| **f).count()
}

/// `b` CIFAR-shaped inputs (3×32×32 in [0, 1), seed 4), labels i mod 10, and an MLP
/// (3,072 → 8 → 10, seed 3) on them: with 40 examples the engines' parallel tasks of
/// about 32,768 coordinates split the work four ways.
pub fn wide_batch(b: usize) -> Result<(Mlp, Tensor, Tensor)> {
    let d = 3 * 32 * 32;
    let model = Mlp::random(&[d, 8, 10], 3, DType::F32)?;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x: Vec<f32> = (0..b * d).map(|_| rng.gen()).collect();
    let xs = Tensor::from_vec(x, (b, 3, 32, 32), &Device::Cpu)?;
    let labels: Vec<u32> = (0..b as u32).map(|i| i % 10).collect();
    let ys = Tensor::from_vec(labels, b, &Device::Cpu)?;
    Ok((model, xs, ys))
}

/// Runs `attack` on one thread and on four; asserts the same adversarial inputs (bit
/// for bit), successes and step counts, and that something was fooled.
pub fn assert_thread_independent(
    what: &str,
    attack: impl Fn() -> Result<Vec<crate::AttackResult>> + Send + Sync,
) -> Result<()> {
    let pool = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| crate::Error::Input(e.to_string()))
    };
    let (a, b) = (pool(1)?.install(&attack)?, pool(4)?.install(&attack)?);
    let bits = |r: &[crate::AttackResult]| -> Result<Vec<u32>> {
        let v = r[0].clipped.flatten_all()?.to_vec1::<f32>()?;
        Ok(v.iter().map(|v| v.to_bits()).collect())
    };
    assert_eq!(bits(&a)?, bits(&b)?, "{what}: adversarial inputs");
    assert_eq!(a[0].success, b[0].success, "{what}");
    assert_eq!(a[0].iterations, b[0].iterations, "{what}");
    assert!(
        a[0].success.iter().any(|s| *s),
        "{what}: nothing fooled, a weak check"
    );
    Ok(())
}

/// A model by reference, for tests that box a fresh model per run.
pub struct By<'a>(pub &'a dyn Module);

impl Module for By<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(xs)
    }
}

/// The bits of a float tensor's values, each widened to f64 (exactly).
pub fn value_bits(t: &Tensor) -> Result<Vec<u64>> {
    Ok(t.to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .into_iter()
        .map(f64::to_bits)
        .collect())
}

/// Asserts that the emulated kernels left each named buffer as its twin expects, bit
/// for bit.
pub fn assert_emulated(
    out: &rampart_models::kernels::emulate::Buffers,
    f32s: &[(String, Vec<f32>)],
    f64s: &[(String, Vec<f64>)],
) {
    for (name, want) in f32s {
        let got: Vec<f32> = out.get(name);
        let b = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            b(&got),
            b(want),
            "kernel output {name} differs from its twin's"
        );
    }
    for (name, want) in f64s {
        let got: Vec<f64> = out.get(name);
        let b = |v: &[f64]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            b(&got),
            b(want),
            "kernel output {name} differs from its twin's"
        );
    }
}
