//! Model variants built around the normalisation layers: the **stochastic student**
//! (adaptive noise injection) and the **λ-conditioned once-for-all (OAT) model**
//! (FiLM layers and dual BatchNorm).
//!
//! Every architecture builds its BatchNorms through [`NormOptions::norm`]; a plain
//! model gets a [`Norm`] that is exactly the fused BatchNorm(+ReLU), a variant adds,
//! in this order, after the BatchNorm and before the ReLU:
//!
//! 1. **dual BatchNorm** (OAT): examples conditioned on λ = 0 are normalised by the
//!    layer's own BatchNorm (`bn…`), examples with λ > 0 by a second one
//!    (`bn….adv`), each with its own batch statistics and running estimates;
//! 2. **FiLM** (OAT): h ← h ⊙ (1 + γ) + β with (γ, β) = W₂·ReLU(W₁·e(λ) + b₁) + b₂,
//!    an MLP code_dim → 2C → 2C of the example's λ code e(λ). W₂ and b₂ start at zero,
//!    so an untrained FiLM is the identity;
//! 3. **adaptive noise** (stochastic student): h ← h + s·α·σ ⊙ z, z ~ N(0, I) drawn
//!    afresh for every element on every forward pass (training *and* evaluation: the
//!    student is a random function), α a learnable scalar per layer, σ the per-channel
//!    standard deviation of h: over the current mini-batch (B·H·W values per channel)
//!    in training, where it is treated as a constant in the backward pass, and its
//!    running average (momentum 0.1, like BatchNorm's) in evaluation, so a test
//!    prediction never depends on the other images of its batch. s is the test-time
//!    noise scale ([`crate::Classifier::set_noise_scale`], 1 by default).
//!
//! λ codes: one fixed random orthonormal vector of `code_dim` entries per training λ
//! (a saved buffer, `lambda_codes`); a λ between two training values gets the linear
//! interpolation of their codes, a λ outside their range is clamped to it.

use crate::kernels::device_eval::{DNoise, DNorm, DTrainNoise, DTrainOat};
use crate::kernels::fused_train::{BnBatch, NoiseSeed};
use crate::kernels::preact::NormParams;
use crate::kernels::{EvalNorm, NoiseDraw};
use crate::layers::{batch_norm_with, linear, BatchNorm, Linear};
use candle_core::{DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, RwLock};

/// Adaptive noise injection after every BatchNorm (a stochastic student).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseSpec {
    /// Initial value of every layer's learnable noise factor α (≥ 0).
    pub alpha: f32,
}

/// λ conditioning by FiLM and dual BatchNorm (once-for-all adversarial training).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OatSpec {
    /// The λ values seen in training, strictly increasing, within [0, 1].
    pub lambdas: Vec<f32>,
    /// Length of each λ code (≥ number of λ values, so the codes can be orthonormal).
    pub code_dim: usize,
}

impl OatSpec {
    /// The published setting: λ ∈ {0, 0.1, 0.2, 0.3, 0.4, 1.0}, 128-d codes.
    pub fn standard() -> Self {
        OatSpec {
            lambdas: vec![0.0, 0.1, 0.2, 0.3, 0.4, 1.0],
            code_dim: 128,
        }
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.lambdas.is_empty() {
            return Err("OAT needs at least one λ value".into());
        }
        if self
            .lambdas
            .iter()
            .any(|l| !(l.is_finite() && (0.0..=1.0).contains(l)))
        {
            return Err(format!(
                "OAT λ values must lie in [0, 1], got {:?}",
                self.lambdas
            ));
        }
        if self.lambdas.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "OAT λ values must be strictly increasing, got {:?}",
                self.lambdas
            ));
        }
        if self.code_dim < self.lambdas.len() {
            return Err(format!(
                "OAT code_dim {} is smaller than the number of λ values {}",
                self.code_dim,
                self.lambdas.len()
            ));
        }
        Ok(())
    }

    /// The code of each λ (rows of `codes`: (L, D), one per training λ), interpolated
    /// linearly between neighbouring training values and clamped to their range.
    pub fn encode(&self, codes: &[Vec<f32>], lambdas: &[f32]) -> Vec<f32> {
        let d = self.code_dim;
        let mut out = Vec::with_capacity(lambdas.len() * d);
        for &lam in lambdas {
            match self.between(lam) {
                (i, None) => out.extend_from_slice(&codes[i]),
                (i, Some(w)) => out.extend(
                    codes[i]
                        .iter()
                        .zip(&codes[i + 1])
                        .map(|(a, b)| (1.0 - w) * a + w * b),
                ),
            }
        }
        out
    }

    /// Where λ falls among the training values (clamped to their range): the row i
    /// of its code, and the weight w of row i + 1 when it lies strictly between
    /// rows i and i + 1 (its code is (1 − w)·row i + w·row i + 1).
    fn between(&self, lam: f32) -> (usize, Option<f32>) {
        let ls = &self.lambdas;
        let lam = lam.clamp(ls[0], ls[ls.len() - 1]);
        let i = ls.iter().rposition(|&l| l <= lam).unwrap_or(0);
        if i + 1 >= ls.len() || ls[i] == lam {
            (i, None)
        } else {
            (i, Some((lam - ls[i]) / (ls[i + 1] - ls[i])))
        }
    }

    /// [`OatSpec::encode`] on the codes' device, (B, D), the same values: each
    /// distinct λ's row from the table's rows by tensor operations (the same f32
    /// operations), so that nothing is read back from a GPU.
    pub(crate) fn encode_on_device(&self, codes: &Tensor, lambdas: &[f32]) -> Result<Tensor> {
        if lambdas.is_empty() {
            // A data-parallel worker without rows of the batch.
            return Tensor::zeros((0, codes.dim(1)?), codes.dtype(), codes.device());
        }
        let mut distinct: Vec<u32> = Vec::new();
        let mut rows = Vec::new();
        let mut index = Vec::with_capacity(lambdas.len());
        for &lam in lambdas {
            let bits = lam.to_bits();
            let at = match distinct.iter().position(|&b| b == bits) {
                Some(at) => at,
                None => {
                    rows.push(match self.between(lam) {
                        (i, None) => codes.narrow(0, i, 1)?,
                        (i, Some(w)) => {
                            (codes.narrow(0, i, 1)?.affine(f64::from(1.0 - w), 0.0)?
                                + codes.narrow(0, i + 1, 1)?.affine(f64::from(w), 0.0)?)?
                        }
                    });
                    distinct.push(bits);
                    rows.len() - 1
                }
            };
            index.push(at as u32);
        }
        let table = Tensor::cat(&rows, 0)?;
        if rows.len() == 1 {
            return table
                .broadcast_as((lambdas.len(), codes.dim(1)?))?
                .contiguous();
        }
        table.index_select(&Tensor::new(index.as_slice(), codes.device())?, 0)
    }
}

/// The per-forward state the normalisation layers read: the λ condition of the
/// current batch and the noise generator.
#[derive(Debug)]
pub(crate) struct Context {
    condition: RwLock<Option<Condition>>,
    noise: Mutex<NoiseState>,
}

#[derive(Debug)]
struct NoiseState {
    rng: ChaCha8Rng,
    scale: f32,
    /// Index in the global batch of each batch's first image (a data-parallel
    /// worker's offset; 0 in a single process).
    first: usize,
}

/// The λ condition of one batch, as the layers need it.
#[derive(Clone, Debug)]
pub(crate) struct Condition {
    /// λ codes (B, code_dim).
    pub codes: Tensor,
    /// Rows with λ = 0 and rows with λ > 0 (u32 index tensors) and the permutation
    /// undoing their concatenation; `None` when all rows fall in one group.
    pub split: Option<Split>,
    /// Whether every row has λ = 0 (only meaningful when `split` is `None`).
    pub all_clean: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Split {
    clean: Tensor,
    adv: Tensor,
    inverse: Tensor,
}

thread_local! {
    /// Noise seeds drawn so far on this thread (see [`noise_seeds_drawn`]).
    static NOISE_SEEDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many layer noise seeds models have drawn on this thread so far: one per noisy
/// layer of a stochastic student in each forward pass, whichever path runs it. A pass
/// that leaves it unchanged drew no noise, so that replaying its launches (a CUDA
/// graph of an attack step, `rampart-attacks`) gives what running it again would; a
/// pass that draws noise would replay its first draw.
pub fn noise_seeds_drawn() -> usize {
    NOISE_SEEDS.with(std::cell::Cell::get)
}

impl Context {
    pub(crate) fn new(seed: u64) -> Self {
        Context {
            condition: RwLock::new(None),
            noise: Mutex::new(NoiseState {
                rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6e6f_6973_6521),
                scale: 1.0,
                first: 0,
            }),
        }
    }

    fn noise_state(&self) -> std::sync::MutexGuard<'_, NoiseState> {
        self.noise.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn reseed(&self, seed: u64) {
        self.noise_state().rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6e6f_6973_6521);
    }

    pub(crate) fn set_noise_scale(&self, scale: f32) {
        self.noise_state().scale = scale;
    }

    pub(crate) fn noise_scale(&self) -> f32 {
        self.noise_state().scale
    }

    /// Runs `f` and puts the noise generator back as it was before (for a check that
    /// builds a program without running it).
    pub(crate) fn keeping_noise_state<R>(&self, f: impl FnOnce() -> R) -> R {
        let rng = self.noise_state().rng.clone();
        let out = f();
        self.noise_state().rng = rng;
        out
    }

    /// Runs `f`, which may draw noise seeds for a program; when it yields no program
    /// (None or an error), puts the noise generator back, so that the layer-by-layer
    /// pass run instead draws the seeds it would have drawn.
    pub(crate) fn drawing_only_if_some<R>(
        &self,
        f: impl FnOnce() -> Result<Option<R>>,
    ) -> Result<Option<R>> {
        let rng = self.noise_state().rng.clone();
        let out = f();
        if !matches!(out, Ok(Some(_))) {
            self.noise_state().rng = rng;
        }
        out
    }

    pub(crate) fn set_first_image(&self, first: usize) {
        self.noise_state().first = first;
    }

    pub(crate) fn first_image(&self) -> usize {
        self.noise_state().first
    }

    /// A fresh seed for one layer's noise, from the model's generator, with the scale
    /// and the batch's place in the global batch.
    fn next_noise_seed(&self) -> NoiseSeed {
        NOISE_SEEDS.with(|n| n.set(n.get() + 1));
        let mut st = self.noise_state();
        let seed = st.rng.gen();
        NoiseSeed {
            seed,
            first: st.first,
            scale: st.scale,
        }
    }

    pub(crate) fn set_condition(&self, c: Option<Condition>) {
        *self.condition.write().unwrap_or_else(|p| p.into_inner()) = c;
    }

    fn condition(&self) -> Option<Condition> {
        self.condition
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Split {
    /// The split of `b` rows that all fall in one group (the clean one if `clean`),
    /// the other group empty.
    fn one_group(b: usize, clean: bool, device: &candle_core::Device) -> Result<Split> {
        let all: Vec<u32> = (0..b as u32).collect();
        let all = Tensor::new(all.as_slice(), device)?;
        let none = Tensor::new(&[] as &[u32], device)?;
        let (clean, adv) = if clean {
            (all.clone(), none)
        } else {
            (none, all.clone())
        };
        Ok(Split {
            clean,
            adv,
            inverse: all,
        })
    }
}

impl Condition {
    /// The condition of a batch with per-row λ (host values) and their codes (B, D).
    pub(crate) fn new(lambdas: &[f32], codes: Tensor) -> Result<Self> {
        let device = codes.device().clone();
        let clean: Vec<u32> = (0..lambdas.len() as u32)
            .filter(|&i| lambdas[i as usize] == 0.0)
            .collect();
        let adv: Vec<u32> = (0..lambdas.len() as u32)
            .filter(|&i| lambdas[i as usize] != 0.0)
            .collect();
        let split = if clean.is_empty() || adv.is_empty() {
            None
        } else {
            let mut inverse = vec![0u32; lambdas.len()];
            for (pos, &row) in clean.iter().chain(&adv).enumerate() {
                inverse[row as usize] = pos as u32;
            }
            Some(Split {
                clean: Tensor::new(clean.as_slice(), &device)?,
                adv: Tensor::new(adv.as_slice(), &device)?,
                inverse: Tensor::new(inverse.as_slice(), &device)?,
            })
        };
        Ok(Condition {
            codes,
            split,
            all_clean: adv.is_empty(),
        })
    }
}

/// How the architectures build their normalisation layers.
#[derive(Clone, Debug)]
pub struct NormOptions {
    pub(crate) noise: bool,
    pub(crate) oat: Option<usize>,
    pub(crate) batch_norm: crate::BatchNormSpec,
    pub(crate) ctx: Arc<Context>,
}

impl NormOptions {
    /// Plain BatchNorm layers.
    pub fn plain() -> Self {
        NormOptions {
            noise: false,
            oat: None,
            batch_norm: crate::BatchNormSpec::default(),
            ctx: Arc::new(Context::new(0)),
        }
    }

    /// A normalisation layer over `c` channels, its variables under `vb`.
    pub fn norm(&self, c: usize, vb: VarBuilder) -> Result<Norm> {
        let bn = batch_norm_with(c, self.batch_norm, vb.clone())?;
        let (bn_adv, film) = match self.oat {
            Some(code_dim) => (
                Some(batch_norm_with(c, self.batch_norm, vb.pp("adv"))?),
                Some(Film {
                    fc1: linear(code_dim, 2 * c, vb.pp("film").pp("fc1"))?,
                    fc2: linear(2 * c, 2 * c, vb.pp("film").pp("fc2"))?,
                    c,
                }),
            ),
            None => (None, None),
        };
        let noise = if self.noise {
            let vb = vb.pp("noise");
            let running = vb.get_with_hints(c, "running_std", candle_nn::Init::Const(1.0))?;
            Some(Noise {
                alpha: vb.get_with_hints(1, "alpha", candle_nn::Init::Const(0.0))?,
                running_std: Var::from_tensor(&running)?,
            })
        } else {
            None
        };
        Ok(Norm {
            bn,
            bn_adv,
            film,
            noise,
            ctx: self.ctx.clone(),
        })
    }
}

/// A BatchNorm with the optional dual BatchNorm, FiLM and noise of the variants.
#[derive(Clone, Debug)]
pub struct Norm {
    bn: BatchNorm,
    bn_adv: Option<BatchNorm>,
    film: Option<Film>,
    noise: Option<Noise>,
    ctx: Arc<Context>,
}

#[derive(Clone, Debug)]
struct Film {
    fc1: Linear,
    fc2: Linear,
    c: usize,
}

#[derive(Clone, Debug)]
struct Noise {
    alpha: Tensor,
    running_std: Var,
}

impl Norm {
    pub(crate) fn is_plain(&self) -> bool {
        self.bn_adv.is_none() && self.film.is_none() && self.noise.is_none()
    }

    /// The layer's parameters for the fused train path: a plain BatchNorm, a student's
    /// noisy one, or an OAT layer with the FiLM outputs of the installed condition's
    /// rows (None for a layer with both noise and λ conditioning, or an OAT layer
    /// called without a condition).
    pub(crate) fn train_params(&self) -> Result<Option<NormParams<'_>>> {
        let oat = self.bn_adv.is_some() || self.film.is_some();
        if oat && self.noise.is_some() {
            return Ok(None);
        }
        let film = match (&self.film, self.ctx.condition()) {
            (Some(film), Some(c)) => Some(film.params(&c.codes)?),
            (Some(_), None) => return Ok(None),
            (None, _) => None,
        };
        let (gamma, beta, eps) = self.bn.parts();
        Ok(Some(NormParams {
            gamma,
            beta,
            eps,
            alpha: self.noise.as_ref().map(|n| &n.alpha),
            adv: self.bn_adv.as_ref().map(|a| {
                let (g, b, _) = a.parts();
                (g, b)
            }),
            film,
        }))
    }

    /// A noisy layer's seed and scale for one train-mode forward pass of the fused
    /// path, drawn from the model's generator as [`Noise::apply`] draws it.
    pub(crate) fn draw_train_noise(&self) -> Option<NoiseSeed> {
        self.noise.as_ref().map(|_| self.ctx.next_noise_seed())
    }

    /// Updates the running estimates after a fused train-mode forward pass.
    pub(crate) fn update_running_from(&self, batch: &BnBatch) -> Result<()> {
        if let Some(own) = &batch.own {
            self.bn.update_running_from(&own.mean, &own.var, own.rows)?;
        }
        if let (Some(adv), Some(bn)) = (&batch.adv, &self.bn_adv) {
            bn.update_running_from(&adv.mean, &adv.var, adv.rows)?;
        }
        if let (Some(noise), Some(sigma)) = (&self.noise, &batch.sigma) {
            let sigma = Tensor::from_slice(sigma, sigma.len(), noise.running_std.device())?
                .to_dtype(noise.running_std.dtype())?;
            noise.update_running(&sigma)?;
        }
        Ok(())
    }

    /// This layer for the fused train path on a GPU: a plain BatchNorm, a student's
    /// noisy one with its α and this pass's seed (drawn here, in the order the
    /// layer-by-layer pass draws it), or an OAT layer (dual BatchNorm and FiLM) with
    /// the FiLM outputs of the installed condition's rows.
    pub(crate) fn device_train(&self) -> Result<Option<DNorm>> {
        let mut d = self.bn.device();
        match (&self.bn_adv, &self.film) {
            (None, None) => {}
            (Some(adv), Some(film)) => {
                // The batch's rows in the program's order (λ = 0 first), installed by
                // the classifier; FiLM's outputs are tensor operations on the live
                // MLP, so their gradients reach it.
                let Some(c) = self.ctx.condition() else {
                    return Ok(None);
                };
                if self.noise.is_some() {
                    return Ok(None);
                }
                let (g, b, _) = adv.parts();
                d.train_oat = Some(DTrainOat {
                    adv: (g.clone(), b.clone()),
                    film: film.params(&c.codes)?,
                });
                return Ok(Some(d));
            }
            _ => return Ok(None),
        }
        if let Some(n) = &self.noise {
            let NoiseSeed { seed, first, scale } = self.ctx.next_noise_seed();
            d.train_noise = Some(DTrainNoise {
                alpha: n.alpha.clone(),
                seed,
                first: first as u64,
                scale,
            });
        }
        Ok(Some(d))
    }

    /// The layer's channels.
    pub(crate) fn channels(&self) -> Result<usize> {
        self.bn.channels()
    }

    /// Updates the running estimates after a train-mode pass of the GPU's fused
    /// program, from this layer's part `st` of its output: [mean | 1/√(var + ε)] over
    /// `rows` rows, a student's batch σ after it; an OAT layer's per group of an OAT
    /// pass (`groups`: the batch's images and its clean ones, first), the clean
    /// images' for its own BatchNorm, the others' for the second.
    pub(crate) fn update_running_device(
        &self,
        st: &Tensor,
        rows: usize,
        groups: Option<(usize, usize)>,
    ) -> Result<()> {
        let c = self.channels()?;
        match (&self.bn_adv, groups) {
            (Some(adv), Some((b, clean))) => {
                let per = rows / b.max(1);
                let mut at = 0;
                if clean > 0 {
                    self.bn
                        .update_running_saved(&st.narrow(0, at, 2 * c)?, clean * per)?;
                    at += 2 * c;
                }
                if b > clean {
                    adv.update_running_saved(&st.narrow(0, at, 2 * c)?, (b - clean) * per)?;
                }
                Ok(())
            }
            _ => {
                self.bn
                    .update_running_saved(&st.narrow(0, 0, 2 * c)?, rows)?;
                if st.dim(0)? == 3 * c {
                    self.update_noise_running(&st.narrow(0, 2 * c, c)?)?;
                }
                Ok(())
            }
        }
    }

    /// The updates [`Norm::update_running_device`] makes from this layer's statistics
    /// at `at` of a pass's output, as entries of one multi-statistic update (the same
    /// float operations: a student's running noise scale too), or None when a running
    /// tensor is not f32.
    pub(crate) fn running_entries(
        &self,
        at: usize,
        len: usize,
        rows: usize,
        groups: Option<(usize, usize)>,
    ) -> Result<Option<Vec<crate::kernels::running::RunningEntry>>> {
        use crate::kernels::pointwise::{RunningUpdate, Stat};
        use crate::kernels::running::RunningEntry;
        let c = self.channels()?;
        let mut entries = Vec::new();
        match (&self.bn_adv, groups) {
            (Some(adv), Some((b, clean))) => {
                let per = rows / b.max(1);
                let mut at = at;
                if clean > 0 {
                    let Some(e) = self.bn.running_entries(at, clean * per)? else {
                        return Ok(None);
                    };
                    entries.extend(e);
                    at += 2 * c;
                }
                if b > clean {
                    let Some(e) = adv.running_entries(at, (b - clean) * per)? else {
                        return Ok(None);
                    };
                    entries.extend(e);
                }
            }
            _ => {
                let Some(e) = self.bn.running_entries(at, rows)? else {
                    return Ok(None);
                };
                entries.extend(e);
                if len == 3 * c {
                    if let Some(n) = &self.noise {
                        if n.running_std.dtype() != DType::F32 {
                            return Ok(None);
                        }
                        entries.push(RunningEntry {
                            run: n.running_std.as_tensor().clone(),
                            at: at + 2 * c,
                            update: RunningUpdate {
                                stat: Stat::Mean,
                                keep: (1.0 - NOISE_MOMENTUM) as f32,
                                take: NOISE_MOMENTUM as f32,
                                neg_eps: 0.0,
                            },
                        });
                    }
                }
            }
        }
        Ok(Some(entries))
    }

    /// Updates a student's running noise scale from a fused train-mode pass's batch
    /// σ (C); nothing for a layer without noise.
    pub(crate) fn update_noise_running(&self, sigma: &Tensor) -> Result<()> {
        match &self.noise {
            Some(n) => n.update_running(&sigma.to_dtype(n.running_std.dtype())?),
            None => Ok(()),
        }
    }

    /// This layer for the fused eval path on a GPU: its eval-mode BatchNorm (the one
    /// of the pass's λ group for an OAT model) with FiLM folded into γ and β, and a
    /// student's noise with this forward pass's seed (drawn here, as its
    /// layer-by-layer forward pass would draw it). Everything stays on the device:
    /// FiLM's outputs are tensor operations, the noise's scale is computed in the
    /// kernel, nothing is read back. None for an OAT layer without a condition of one
    /// row (the program needs one affine map per layer; [`crate::Classifier`] installs
    /// the model's λ).
    pub(crate) fn device(&self) -> Result<Option<DNorm>> {
        let cond = self.ctx.condition();
        let Some(bn) = self.batch_norm_of(cond.as_ref()) else {
            return Ok(None);
        };
        let mut d = bn.device();
        if let Some(film) = &self.film {
            let Some(c) = cond
                .as_ref()
                .filter(|c| c.codes.dim(0).is_ok_and(|r| r == 1))
            else {
                return Ok(None);
            };
            // (h·s + t)·(1 + γ_f) + β_f folds into γ·(1 + γ_f) and β·(1 + γ_f) + β_f.
            let p = film.params(&c.codes)?.flatten_all()?;
            let g = (p.narrow(0, 0, film.c)? + 1.0)?;
            let b = p.narrow(0, film.c, film.c)?;
            d.gamma = (&d.gamma * &g)?;
            d.beta = ((&d.beta * &g)? + b)?;
        }
        if let Some(n) = &self.noise {
            let NoiseSeed { seed, first, scale } = self.ctx.next_noise_seed();
            if scale != 0.0 {
                d.noise = Some(DNoise {
                    seed,
                    first: first as u64,
                    alpha: n.alpha.detach(),
                    sigma: n.running_std.as_detached_tensor(),
                    scale,
                });
            }
        }
        Ok(Some(d))
    }

    /// The BatchNorm the rows of condition `cond` go through when they all fall in one
    /// λ group: the layer's own one (λ = 0, or a layer without a second), else the
    /// second; None for rows of both groups, or an OAT layer without a condition.
    fn batch_norm_of(&self, cond: Option<&Condition>) -> Option<&BatchNorm> {
        match (&self.bn_adv, cond) {
            (None, _) => Some(&self.bn),
            (Some(_), None) => None,
            (Some(adv), Some(c)) => match (&c.split, c.all_clean) {
                (Some(_), _) => None,
                (None, true) => Some(&self.bn),
                (None, false) => Some(adv),
            },
        }
    }

    /// The layer in the fused eval path's form: its eval-mode BatchNorm (the one of
    /// the batch's λ group for an OAT model) with FiLM folded in, and a student's noise
    /// with this forward pass's seed. None when the installed λ condition differs
    /// between rows (the fused path needs one affine map per layer) or is missing.
    /// A noisy layer draws its seed here, as its layer-by-layer forward pass would.
    pub(crate) fn fused(&self) -> Result<Option<EvalNorm>> {
        let cond = self.ctx.condition();
        let Some(bn) = self.batch_norm_of(cond.as_ref()) else {
            return Ok(None);
        };
        let mut affine = bn.eval_affine()?;
        if let Some(film) = &self.film {
            let Some(c) = &cond else {
                return Ok(None);
            };
            let Some((gamma, beta)) = film.uniform_params(&c.codes)? else {
                return Ok(None);
            };
            // (h·s + t)·(1 + γ) + β.
            for (((s, t), g), b) in affine
                .scale
                .iter_mut()
                .zip(affine.shift.iter_mut())
                .zip(&gamma)
                .zip(&beta)
            {
                *s *= g;
                *t = *t * g + b;
            }
        }
        let noise = match &self.noise {
            None => None,
            Some(n) => {
                let NoiseSeed { seed, first, scale } = self.ctx.next_noise_seed();
                let alpha = n.alpha.flatten_all()?.to_vec1::<f32>()?[0];
                let sigma = n.running_std.as_tensor().to_vec1::<f32>()?;
                (scale != 0.0).then(|| NoiseDraw {
                    seed,
                    first,
                    std: sigma.iter().map(|s| alpha * s * scale).collect(),
                })
            }
        };
        Ok(Some(EvalNorm { affine, noise }))
    }

    /// Normalisation (and variant extras) followed by ReLU; xs: (B, H, W, C).
    pub fn forward_relu(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if self.is_plain() {
            self.bn.forward_relu(xs, train)
        } else {
            self.forward_full(xs, train)?.relu()
        }
    }

    fn forward_full(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let cond = self.ctx.condition();
        // Synchronised BatchNorm: every worker calls both BatchNorms of a dual layer
        // (one with no row where its part has none of a group), so that all take part
        // in both layers' sums.
        let synchronised = train && crate::kernels::sync_bn::current().is_some();
        let h = match (&self.bn_adv, &cond) {
            (Some(adv), Some(c)) => match (&c.split, synchronised) {
                (Some(split), _) => Self::dual(&self.bn, adv, xs, split, train)?,
                (None, true) => {
                    let split = Split::one_group(xs.dim(0)?, c.all_clean, xs.device())?;
                    Self::dual(&self.bn, adv, xs, &split, train)?
                }
                (None, false) if c.all_clean => self.bn.forward_t(xs, train)?,
                (None, false) => adv.forward_t(xs, train)?,
            },
            (Some(_), None) => candle_core::bail!(
                "a λ-conditioned layer was called without a λ (use Classifier::forward_t or forward_lambdas)"
            ),
            (None, _) => self.bn.forward_t(xs, train)?,
        };
        let h = match (&self.film, &cond) {
            (Some(film), Some(c)) => film.apply(&h, &c.codes)?,
            _ => h,
        };
        match &self.noise {
            Some(noise) => noise.apply(&h, train, &self.ctx),
            None => Ok(h),
        }
    }

    /// Dual BatchNorm: the rows of `split.clean` through `bn`, those of `split.adv`
    /// through `adv`, back in the batch's order.
    fn dual(
        bn: &BatchNorm,
        adv: &BatchNorm,
        xs: &Tensor,
        split: &Split,
        train: bool,
    ) -> Result<Tensor> {
        let clean = bn.forward_t(&xs.index_select(&split.clean, 0)?, train)?;
        let robust = adv.forward_t(&xs.index_select(&split.adv, 0)?, train)?;
        Tensor::cat(&[&clean, &robust], 0)?.index_select(&split.inverse, 0)
    }

    /// Whether the layer injects noise (a stochastic student).
    pub(crate) fn has_noise(&self) -> bool {
        self.noise.is_some()
    }

    /// The layer's noise factor α, if it injects noise.
    pub fn noise_alpha(&self) -> Result<Option<f32>> {
        match &self.noise {
            Some(n) => Ok(Some(n.alpha.flatten_all()?.to_vec1::<f32>()?[0])),
            None => Ok(None),
        }
    }
}

impl ModuleT for Norm {
    /// xs: (B, H, W, C) → (B, H, W, C), no ReLU.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if self.is_plain() {
            self.bn.forward_t(xs, train)
        } else {
            self.forward_full(xs, train)
        }
    }
}

impl Film {
    /// (1 + γ, β) of every row of `codes` (B, D), when all rows have the same code.
    fn uniform_params(&self, codes: &Tensor) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let rows = codes.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        if rows.iter().any(|r| r != first) {
            return Ok(None);
        }
        let p = self.params(&codes.narrow(0, 0, 1)?)?;
        let p = p.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let gamma = p[..self.c].iter().map(|g| 1.0 + g).collect();
        Ok(Some((gamma, p[self.c..2 * self.c].to_vec())))
    }

    /// The FiLM outputs [γ | β] (B, 2C) of codes (B, D).
    fn params(&self, codes: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(codes)?.relu()?)
    }

    /// h: (B, H, W, C); codes: (B, D).
    fn apply(&self, h: &Tensor, codes: &Tensor) -> Result<Tensor> {
        let b = h.dim(0)?;
        let p = self.params(codes)?;
        let gamma = (p.narrow(1, 0, self.c)? + 1.0)?.reshape((b, 1, 1, self.c))?;
        let beta = p.narrow(1, self.c, self.c)?.reshape((b, 1, 1, self.c))?;
        h.broadcast_mul(&gamma)?.broadcast_add(&beta)
    }
}

/// Momentum of the running noise-scale estimate.
const NOISE_MOMENTUM: f64 = 0.1;

/// Added to the variance under the root of a noise layer's σ.
const NOISE_STD_EPS: f64 = 1e-5;

impl Noise {
    /// running σ ← (1 − momentum)·running σ + momentum·σ.
    fn update_running(&self, sigma: &Tensor) -> Result<()> {
        let updated =
            ((self.running_std.as_tensor() * (1.0 - NOISE_MOMENTUM))? + (sigma * NOISE_MOMENTUM)?)?;
        self.running_std.set(&updated)
    }

    /// h + scale·α·σ ⊙ z; h: (B, H, W, C).
    fn apply(&self, h: &Tensor, train: bool, ctx: &Context) -> Result<Tensor> {
        let c = self.running_std.dim(0)?;
        let sigma = if train {
            let rows = h.detach().reshape(((), c))?;
            let sigma = match crate::kernels::sync_bn::current() {
                // Synchronised BatchNorm: σ over every worker's rows, as one process
                // measures it on the global batch.
                Some(sum) => crate::kernels::sync_bn::global_std(&rows, NOISE_STD_EPS, &sum)?
                    .to_dtype(rows.dtype())?,
                None => {
                    let mean = rows.mean_keepdim(0)?;
                    let var = rows.broadcast_sub(&mean)?.sqr()?.mean(0)?;
                    (var + NOISE_STD_EPS)?.sqrt()?
                }
            };
            self.update_running(&sigma)?;
            sigma
        } else {
            self.running_std.as_detached_tensor()
        };
        let NoiseSeed { seed, first, scale } = ctx.next_noise_seed();
        if scale == 0.0 {
            return Ok(h.clone());
        }
        // Drawn where the activations are (one kernel on a GPU), no gradient; image i
        // of the batch is image first + i of the global batch.
        let z = h
            .detach()
            .apply_op1_no_bwd(&crate::kernels::noise::LayerNoise {
                seed,
                first: first as u64,
            })?;
        let std = (self.alpha.broadcast_mul(&sigma)? * f64::from(scale))?;
        h + z.broadcast_mul(&std)?
    }
}

/// `rows` orthonormal vectors of length `dim` (rows ≤ dim): Gram–Schmidt on Gaussian
/// draws from `rng`.
pub(crate) fn orthonormal_rows(rows: usize, dim: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(rows);
    while basis.len() < rows {
        let mut v: Vec<f64> = (0..dim).map(|_| rng.sample(StandardNormal)).collect();
        for u in &basis {
            let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-6 {
            basis.push(v.into_iter().map(|a| a / norm).collect());
        }
    }
    basis.into_iter().flatten().map(|a| a as f32).collect()
}
