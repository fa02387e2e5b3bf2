//! Stochastic gradient descent with momentum, Nesterov momentum and weight decay,
//! with PyTorch's semantics, and its state for checkpoints.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rampart_models::is_buffer;
use serde::{Deserialize, Serialize};

use crate::error::{DefenseError, Result};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod emulated;
mod fused;
#[cfg(any(test, feature = "cuda"))]
mod multi;

/// The PTX of the fused SGD kernels, compiled by NVRTC (no GPU needed).
#[cfg(feature = "cuda")]
pub use cuda::ptx as sgd_kernels_ptx;

use fused::{Factors, Kernel, SgdUpdate};

/// Which trainable parameters weight decay applies to. BatchNorm running statistics
/// are never parameters of the optimiser, so they are never decayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecayScope {
    /// Every trainable parameter, BatchNorm scale/shift and biases included: the
    /// common CIFAR recipe (`torch.optim.SGD(model.parameters(), weight_decay=…)`).
    All,
    /// Only tensors of rank ≥ 2 (convolution and linear weights); BatchNorm
    /// scale/shift and biases are not decayed.
    WeightsOnly,
}

/// SGD hyper-parameters other than the learning rate, which the schedule gives each step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Momentum μ ∈ [0, 1); 0 disables the momentum buffer.
    pub momentum: f64,
    /// Nesterov momentum (needs μ > 0).
    pub nesterov: bool,
    /// L2 weight decay λ ≥ 0, added to the gradient as λ·w.
    pub weight_decay: f64,
    /// Which parameters λ applies to.
    pub decay_scope: DecayScope,
}

impl SgdConfig {
    /// Momentum 0.9, Nesterov, weight decay 5e-4 on all parameters: the CIFAR recipe.
    pub fn cifar() -> Self {
        Self {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            decay_scope: DecayScope::All,
        }
    }

    /// Refuses values PyTorch would refuse, and NaN.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(DefenseError::Config(format!(
                "momentum must lie in [0, 1), got {}",
                self.momentum
            )));
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err(DefenseError::Config(
                "Nesterov momentum needs a momentum > 0".into(),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(DefenseError::Config(format!(
                "weight decay must be finite and ≥ 0, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// Momentum buffer; starts at zero, which equals PyTorch's first-step
    /// initialisation `buf = g` because dampening is 0.
    momentum: Tensor,
}

/// SGD over named variables. Per step, for each parameter w with gradient g
/// (parameters without a gradient are skipped, as in PyTorch):
///
/// ```text
/// g ← g + λ·w            (if decayed)
/// b ← μ·b + g
/// d ← g + μ·b  (Nesterov)   or   d ← b
/// w ← w − lr·d
/// ```
pub struct Sgd {
    params: Vec<Param>,
    config: SgdConfig,
    /// Whether the fused kernels run on the parameters' device; checked at the first
    /// step (on a GPU: their NVRTC compilation and loading).
    fused: Option<bool>,
    /// The last multi-tensor update's table on the GPU.
    #[cfg(feature = "cuda")]
    table: cuda::TableCache,
    /// Gradients kept by [`Sgd::keep_gradients`], one buffer per parameter that had one.
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    kept: Vec<Option<Tensor>>,
}

impl std::fmt::Debug for Sgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sgd")
            .field("config", &self.config)
            .field("params", &self.params.len())
            .finish()
    }
}

impl Sgd {
    /// An optimiser over `vars` (e.g. `Classifier::trainable_vars()`). Refuses
    /// BatchNorm running statistics and an invalid config.
    pub fn new(vars: Vec<(String, Var)>, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                if is_buffer(&name) {
                    return Err(DefenseError::Config(format!(
                        "`{name}` is a BatchNorm running statistic, not a trainable parameter"
                    )));
                }
                let decay = match config.decay_scope {
                    DecayScope::All => true,
                    DecayScope::WeightsOnly => var.rank() >= 2,
                };
                let momentum = var.as_detached_tensor().zeros_like()?;
                Ok(Param {
                    name,
                    var,
                    decay,
                    momentum,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            config,
            fused: None,
            #[cfg(feature = "cuda")]
            table: None,
            kept: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// One update with learning rate `lr` from the gradients of the last backward pass:
    /// two in-place kernels per f32 parameter on the CPU and (built with `cuda`) on a
    /// GPU, equal bit for bit to [`Sgd::step_reference`] (see `sgd/fused.rs`); other
    /// parameters take the reference path, and so does every parameter when the GPU
    /// kernels cannot be compiled or loaded (logged once).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        check_handed_out(grads)?;
        let config = self.config;
        let fused = *self.fused.get_or_insert_with(|| {
            self.params
                .first()
                .is_none_or(|p| fused_ready(p.var.device()))
        });
        // Parameters on a GPU: updated together, in one launch, after the loop.
        #[cfg(feature = "cuda")]
        let mut on_gpu: Vec<(usize, Tensor)> = Vec::new();
        // (The index names a parameter for the GPU's update only.)
        #[cfg_attr(not(feature = "cuda"), allow(clippy::unused_enumerate_index))]
        for (_i, p) in self.params.iter_mut().enumerate() {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            if !fused || !fused_applies(p, grad) {
                reference_update(p, grad, &config, lr)?;
                continue;
            }
            #[cfg(feature = "cuda")]
            if p.var.device().is_cuda() {
                on_gpu.push((_i, grad.detach().contiguous()?));
                continue;
            }
            let f = Factors {
                mu: config.momentum as f32,
                decay: (p.decay && config.weight_decay != 0.0)
                    .then_some(config.weight_decay as f32),
                nesterov: config.nesterov,
                lr: lr as f32,
            };
            let grad = grad.detach().contiguous()?;
            let w = p.var.as_tensor();
            if config.momentum != 0.0 {
                p.momentum
                    .inplace_op3(&grad, w, &SgdUpdate(Kernel::Momentum, f))?;
            }
            w.inplace_op3(&grad, &p.momentum, &SgdUpdate(Kernel::Weight, f))?;
        }
        #[cfg(feature = "cuda")]
        if !on_gpu.is_empty() {
            let decays = config.weight_decay != 0.0;
            let entries: Vec<cuda::Entry<'_>> = on_gpu
                .iter()
                .map(|(i, g)| {
                    let p = &self.params[*i];
                    cuda::Entry {
                        w: p.var.as_tensor(),
                        g,
                        b: &p.momentum,
                        decay: p.decay && decays,
                    }
                })
                .collect();
            cuda::launch_multi(
                &mut self.table,
                &entries,
                config.momentum as f32,
                config.weight_decay as f32,
                config.nesterov,
                lr as f32,
            )?;
        }
        Ok(())
    }

    /// Copies the gradients of a backward pass into buffers of this optimiser, in
    /// place after the first call (which makes them), for [`Sgd::step_kept`]: a CUDA
    /// graph of a training step ends with its gradients there, at addresses that
    /// outlive the graph. A parameter must have a gradient at every call or at none.
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    pub(crate) fn keep_gradients(&mut self, grads: &GradStore) -> Result<()> {
        check_handed_out(grads)?;
        if self.kept.len() != self.params.len() {
            self.kept = vec![None; self.params.len()];
        }
        for (p, kept) in self.params.iter().zip(&mut self.kept) {
            match (grads.get(p.var.as_tensor()), kept.as_ref()) {
                (Some(g), Some(k)) => k.slice_set(&g.detach().contiguous()?, 0, 0)?,
                (Some(g), None) => *kept = Some(g.detach().copy()?),
                (None, Some(_)) => {
                    return Err(DefenseError::Config(format!(
                        "`{}` had a gradient in an earlier step and has none now",
                        p.name
                    )))
                }
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// [`Sgd::step`] with the gradients kept by the last [`Sgd::keep_gradients`].
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    pub(crate) fn step_kept(&mut self, lr: f64) -> Result<()> {
        let mut grads = GradStore::default();
        for (p, kept) in self.params.iter().zip(&self.kept) {
            if let Some(k) = kept {
                grads.insert(p.var.as_tensor(), k.clone());
            }
        }
        self.step(&grads, lr)
    }

    /// [`Sgd::step`] as plain tensor operations, parameter by parameter: the reference
    /// the fused kernels are tested against.
    pub fn step_reference(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        check_handed_out(grads)?;
        let config = self.config;
        for p in &mut self.params {
            if let Some(grad) = grads.get(p.var.as_tensor()) {
                reference_update(p, grad, &config, lr)?;
            }
        }
        Ok(())
    }

    /// The momentum buffers by parameter name, for a checkpoint.
    /// (Copies: the live buffers are updated in place.)
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.params
            .iter()
            .map(|p| Ok((p.name.clone(), p.momentum.copy()?)))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::state`]: every parameter must have one
    /// of its shape, and no unknown name may appear.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(unknown) = state
            .keys()
            .find(|k| !self.params.iter().any(|p| &p.name == *k))
        {
            return Err(DefenseError::Config(format!(
                "optimiser state has a buffer for `{unknown}`, which is not a parameter of this model"
            )));
        }
        for p in &mut self.params {
            let buf = state.get(&p.name).ok_or_else(|| {
                DefenseError::Config(format!("optimiser state lacks the buffer of `{}`", p.name))
            })?;
            if buf.dims() != p.var.dims() {
                return Err(DefenseError::Config(format!(
                    "optimiser buffer of `{}` has shape {:?}, the parameter {:?}",
                    p.name,
                    buf.dims(),
                    p.var.dims()
                )));
            }
            // A copy: the buffer is updated in place, the caller's tensor must not be.
            p.momentum = buf
                .to_device(p.var.device())?
                .to_dtype(p.var.dtype())?
                .copy()?;
        }
        Ok(())
    }
}

/// One parameter's update as plain tensor operations (see [`Sgd`]).
fn reference_update(p: &mut Param, grad: &Tensor, config: &SgdConfig, lr: f64) -> Result<()> {
    let SgdConfig {
        momentum: mu,
        nesterov,
        weight_decay,
        ..
    } = *config;
    let w = p.var.as_detached_tensor();
    let mut g = grad.detach();
    if p.decay && weight_decay != 0.0 {
        g = (g + w.affine(weight_decay, 0.0)?)?;
    }
    let direction = if mu != 0.0 {
        p.momentum = (p.momentum.affine(mu, 0.0)? + &g)?;
        if nesterov {
            (g + p.momentum.affine(mu, 0.0)?)?
        } else {
            p.momentum.clone()
        }
    } else {
        g
    };
    p.var.set(&(w - direction.affine(lr, 0.0)?)?)?;
    Ok(())
}

/// Refuses gradients of which a fused train pass's parameter buffer still holds some
/// (`rampart_models::flat_gradients_pending`): the parameters would have none, and
/// an update would silently skip them.
pub(crate) fn check_handed_out(grads: &GradStore) -> Result<()> {
    if rampart_models::flat_gradients_pending(grads) {
        return Err(DefenseError::Config(
            "the gradients of a fused train pass were not handed to the parameters: \
             take a training loss's gradients with `rampart_models::backward`"
                .into(),
        ));
    }
    Ok(())
}

/// Whether the fused kernels can run on `device`: always on the CPU; on a GPU when
/// their kernels compile and load (otherwise a warning says the reference operations
/// run instead).
fn fused_ready(device: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Err(e) = cuda::ready(device) {
        tracing::warn!(
            "the fused SGD kernels are unavailable ({e}); SGD runs as plain tensor operations"
        );
        return false;
    }
    let _ = device;
    true
}

/// Whether the fused kernels take this parameter: f32 weights, gradient and buffer of
/// one shape, on the CPU or (built with `cuda`) a GPU.
fn fused_applies(p: &Param, grad: &Tensor) -> bool {
    let w = p.var.as_tensor();
    let on = w.device().is_cpu() || (cfg!(feature = "cuda") && w.device().is_cuda());
    on && w.is_contiguous()
        && p.momentum.is_contiguous()
        && [w.dtype(), grad.dtype(), p.momentum.dtype()]
            .iter()
            .all(|&d| d == candle_core::DType::F32)
        && grad.shape() == w.shape()
        && p.momentum.shape() == w.shape()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestResult;
    use candle_core::Device;

    /// Runs two steps on loss = 0.5·w + (b − b) (gradient 0.5 for the rank-2 `w`, a
    /// zero gradient for the rank-1 `b`), both starting at 1; returns (w, b) after each.
    fn two_steps(
        config: SgdConfig,
    ) -> std::result::Result<Vec<(f32, f32)>, Box<dyn std::error::Error>> {
        let w = Var::new(&[[1.0f32]], &Device::Cpu)?;
        let b = Var::new(&[1.0f32], &Device::Cpu)?;
        let mut sgd = Sgd::new(
            vec![("w".into(), w.clone()), ("b".into(), b.clone())],
            config,
        )?;
        let mut out = Vec::new();
        for _ in 0..2 {
            let zero = (b.as_tensor().sum_all()? - b.as_tensor().sum_all()?)?;
            let loss = ((w.as_tensor().sum_all()? * 0.5)? + zero)?;
            sgd.step(&loss.backward()?, 0.1)?;
            out.push((
                w.as_tensor().flatten_all()?.to_vec1::<f32>()?[0],
                b.as_tensor().to_vec1::<f32>()?[0],
            ));
        }
        Ok(out)
    }

    /// The fused kernels equal the reference operations bit for bit: every momentum
    /// kind, decay scope and weight decay, over several steps, on tensors small and
    /// large enough for the parallel chunks.
    #[test]
    fn fused_step_equals_the_reference_bit_for_bit() -> TestResult {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let shapes: [&[usize]; 3] = [&[7], &[5, 3, 3, 3], &[3, 40_000]];
        let values = |rng: &mut rand_chacha::ChaCha8Rng, n: usize| -> Vec<f32> {
            (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
        };
        let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        for (momentum, nesterov) in [(0.9, true), (0.9, false), (0.0, false)] {
            for (weight_decay, decay_scope) in [
                (5e-4, DecayScope::All),
                (5e-4, DecayScope::WeightsOnly),
                (0.0, DecayScope::All),
            ] {
                let config = SgdConfig {
                    momentum,
                    nesterov,
                    weight_decay,
                    decay_scope,
                };
                let start: Vec<Vec<f32>> = shapes
                    .iter()
                    .map(|s| values(&mut rng, s.iter().product()))
                    .collect();
                let vars = || -> candle_core::Result<Vec<(String, Var)>> {
                    shapes
                        .iter()
                        .zip(&start)
                        .enumerate()
                        .map(|(i, (s, v))| {
                            Ok((format!("p{i}"), Var::from_vec(v.clone(), *s, &Device::Cpu)?))
                        })
                        .collect()
                };
                let (fused_vars, reference_vars) = (vars()?, vars()?);
                let mut fused = Sgd::new(fused_vars.clone(), config)?;
                let mut reference = Sgd::new(reference_vars.clone(), config)?;
                for step in 0..3 {
                    let targets: Vec<Tensor> = shapes
                        .iter()
                        .map(|s| {
                            Tensor::from_vec(values(&mut rng, s.iter().product()), *s, &Device::Cpu)
                        })
                        .collect::<candle_core::Result<_>>()?;
                    // loss = Σ (w·t + w²/2): gradient t + w, a function of the weights.
                    let loss = |vars: &[(String, Var)]| -> candle_core::Result<Tensor> {
                        let mut total = Tensor::new(0f32, &Device::Cpu)?;
                        for ((_, v), t) in vars.iter().zip(&targets) {
                            let w = v.as_tensor();
                            total = (total + ((w * t)? + (w.sqr()? * 0.5)?)?.sum_all()?)?;
                        }
                        Ok(total)
                    };
                    let lr = 0.1 / (step + 1) as f64;
                    fused.step(&loss(&fused_vars)?.backward()?, lr)?;
                    reference.step_reference(&loss(&reference_vars)?.backward()?, lr)?;
                }
                for ((name, a), (_, b)) in fused_vars.iter().zip(&reference_vars) {
                    assert!(
                        bits(a.as_tensor())? == bits(b.as_tensor())?,
                        "{name} differs ({config:?})"
                    );
                }
                for ((name, a), (_, b)) in fused.state()?.iter().zip(&reference.state()?) {
                    assert!(bits(a)? == bits(b)?, "buffer {name} differs ({config:?})");
                }
            }
        }
        Ok(())
    }

    /// Momentum μ = 0.9 and weight decay λ = 0.1 on every parameter, the setting of the
    /// hand computations below.
    fn momentum_and_decay(nesterov: bool) -> SgdConfig {
        SgdConfig {
            momentum: 0.9,
            nesterov,
            weight_decay: 0.1,
            decay_scope: DecayScope::All,
        }
    }

    fn close(got: f32, want: f64) -> bool {
        (f64::from(got) - want).abs() < 1e-6
    }

    #[test]
    fn nesterov_with_weight_decay_matches_hand_computation() -> TestResult {
        // lr 0.1, μ 0.9, λ 0.1, gradient 0.5, w₀ = 1:
        // step 1: g = 0.5 + 0.1 = 0.6, b = 0.6, d = 0.6 + 0.54 = 1.14, w = 0.886
        // step 2: g = 0.5 + 0.0886 = 0.5886, b = 0.54 + 0.5886 = 1.1286,
        //         d = 0.5886 + 1.01574 = 1.60434, w = 0.886 − 0.160434 = 0.725566
        // The bias (gradient 0) only decays: g = 0.1, b = 0.1, d = 0.19, w = 0.981;
        // g = 0.0981, b = 0.09 + 0.0981 = 0.1881, d = 0.0981 + 0.16929 = 0.26739, w = 0.954261
        let steps = two_steps(momentum_and_decay(true))?;
        assert!(
            close(steps[0].0, 0.886) && close(steps[1].0, 0.725566),
            "{steps:?}"
        );
        assert!(
            close(steps[0].1, 0.981) && close(steps[1].1, 0.954261),
            "{steps:?}"
        );
        Ok(())
    }

    #[test]
    fn heavy_ball_momentum_matches_hand_computation() -> TestResult {
        // step 1: g = 0.6, b = 0.6, w = 0.94; step 2: g = 0.594, b = 1.134, w = 0.8266
        let steps = two_steps(momentum_and_decay(false))?;
        assert!(
            close(steps[0].0, 0.94) && close(steps[1].0, 0.8266),
            "{steps:?}"
        );
        // Plain SGD without decay: w = 1 − 0.05·t.
        let plain = SgdConfig {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            decay_scope: DecayScope::All,
        };
        let steps = two_steps(plain)?;
        assert!(
            close(steps[0].0, 0.95) && close(steps[1].0, 0.9) && steps[1].1 == 1.0,
            "{steps:?}"
        );
        Ok(())
    }

    #[test]
    fn weights_only_scope_leaves_rank_one_parameters_undecayed() -> TestResult {
        let config = SgdConfig {
            decay_scope: DecayScope::WeightsOnly,
            ..momentum_and_decay(true)
        };
        let steps = two_steps(config)?;
        assert!(close(steps[1].0, 0.725566), "{steps:?}");
        assert_eq!(steps[1].1, 1.0);
        Ok(())
    }

    /// Gradients of a GPU fused train pass (here on its kernels' twins) left in the
    /// model's parameter buffer by a plain `backward` are refused by every update and
    /// by the all-reduce, with a message that says what to do; handed out
    /// (`rampart_models::backward`), they are views into that buffer, and two steps
    /// (the fused kernels read each at its offset) move the weights as two steps on
    /// the layer-by-layer pass's gradients do.
    #[test]
    fn fused_pass_gradients_must_be_handed_out_and_then_update_like_the_reference() -> TestResult {
        use candle_core::ModuleT;
        use rampart_models::{Classifier, ModelSpec};
        use rand::{Rng, SeedableRng};
        let spec = ModelSpec::wrn(10, 1, 10);
        let (fused, reference) = (
            Classifier::new(spec.clone(), 4, &Device::Cpu)?,
            Classifier::new(spec, 4, &Device::Cpu)?,
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let pixels: Vec<f32> = (0..2 * 3 * 32 * 32).map(|_| rng.gen()).collect();
        let x = Tensor::from_vec(pixels, (2, 3, 32, 32), &Device::Cpu)?;
        let config = SgdConfig::cifar();
        let mut sgd = Sgd::new(fused.trainable_vars(), config)?;
        let mut sgd_ref = Sgd::new(reference.trainable_vars(), config)?;

        let loss = fused
            .fused_gpu_train(&x)?
            .ok_or("no program")?
            .sqr()?
            .mean_all()?;
        let pending = loss.backward()?;
        for err in [
            sgd.step(&pending, 0.1).err(),
            sgd.step_reference(&pending, 0.1).err(),
            sgd.keep_gradients(&pending).err(),
        ] {
            let err = err.ok_or("a store with pending gradients was taken")?;
            assert!(
                err.to_string().contains("rampart_models::backward"),
                "{err}"
            );
        }
        /// One worker, its own sums.
        #[derive(Debug)]
        struct Alone;
        impl crate::parallel::Collective for Alone {
            fn place(&self) -> (usize, usize) {
                (0, 1)
            }
            fn backend(&self) -> &'static str {
                "alone"
            }
            fn all_reduce_sum(&self, values: &Tensor) -> Result<Tensor> {
                Ok(values.clone())
            }
            fn broadcast(&self, values: &Tensor) -> Result<Tensor> {
                Ok(values.clone())
            }
        }
        let one = Alone;
        let mut store = pending;
        let err = crate::parallel::average_gradients(&one, &fused.trainable_vars(), &mut store)
            .err()
            .ok_or("the all-reduce took pending gradients")?;
        assert!(
            err.to_string().contains("rampart_models::backward"),
            "{err}"
        );

        for step in 0..2 {
            let loss = fused
                .fused_gpu_train(&x)?
                .ok_or("no program")?
                .sqr()?
                .mean_all()?;
            sgd.step(&rampart_models::backward(&loss)?, 0.1)?;
            let loss = reference.forward_t(&x, true)?.sqr()?.mean_all()?;
            sgd_ref.step(&loss.backward()?, 0.1)?;
            for ((name, a), (_, b)) in fused
                .trainable_vars()
                .iter()
                .zip(reference.trainable_vars())
            {
                let d = (a.as_tensor() - b.as_tensor())?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-5, "step {step}, {name}: weights differ by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_buffers_and_bad_values() -> TestResult {
        let v = Var::new(&[1.0f32], &Device::Cpu)?;
        let ok = SgdConfig::cifar();
        assert!(Sgd::new(vec![("bn.running_mean".into(), v.clone())], ok).is_err());
        for bad in [
            SgdConfig {
                momentum: 1.0,
                ..ok
            },
            SgdConfig {
                momentum: 0.0,
                nesterov: true,
                ..ok
            },
            SgdConfig {
                weight_decay: -1.0,
                ..ok
            },
            SgdConfig {
                weight_decay: f64::NAN,
                ..ok
            },
        ] {
            assert!(
                Sgd::new(vec![("w".into(), v.clone())], bad).is_err(),
                "{bad:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn state_round_trips_and_is_checked() -> TestResult {
        let w = Var::new(&[[1.0f32, 2.0]], &Device::Cpu)?;
        let mut sgd = Sgd::new(vec![("w".into(), w.clone())], SgdConfig::cifar())?;
        let loss = w.as_tensor().sum_all()?;
        sgd.step(&loss.backward()?, 0.1)?;
        let state: HashMap<String, Tensor> = sgd.state()?.into_iter().collect();
        let mut fresh = Sgd::new(vec![("w".into(), w.clone())], SgdConfig::cifar())?;
        fresh.load_state(&state)?;
        assert_eq!(
            fresh.state()?[0].1.flatten_all()?.to_vec1::<f32>()?,
            state["w"].flatten_all()?.to_vec1::<f32>()?
        );
        let wrong: HashMap<String, Tensor> = [(
            "w".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?,
        )]
        .into();
        assert!(fresh.load_state(&wrong).is_err());
        assert!(fresh.load_state(&HashMap::new()).is_err());
        Ok(())
    }
}
