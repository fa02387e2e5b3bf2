//! Building blocks shared by the architectures: convolutions, BatchNorm, linear.
//!
//! Inside a network activations are NHWC, (B, H, W, C): the layout in which a
//! convolution is one GEMM (see [`crate::kernels::conv`]) and BatchNorm reduces over
//! rows. The layers hold parameters and buffers; the computing is done by
//! [`crate::kernels`].

use crate::kernels::bn;
use candle_core::{DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::VarBuilder;

/// A bias-free 2-D convolution (every architecture here follows it with BatchNorm).
#[derive(Clone, Debug)]
pub struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// xs: (B, H, W, C_in) → (B, H', W', C_out).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::kernels::conv::conv2d_nhwc(xs, &self.weight, self.stride, self.padding)
    }

    /// Kernel (OIHW), stride and padding.
    pub(crate) fn parts(&self) -> (&Tensor, usize, usize) {
        (&self.weight, self.stride, self.padding)
    }

    /// This convolution for the fused eval path on a GPU (its kernel tensor, shared).
    pub(crate) fn device(&self) -> crate::kernels::device_eval::DConv {
        crate::kernels::device_eval::DConv {
            weight: self.weight.clone(),
            stride: self.stride,
            padding: self.padding,
        }
    }

    /// This convolution's current kernel for the fused eval path.
    pub(crate) fn fused(&self) -> Result<crate::kernels::fused::ConvLayer> {
        crate::kernels::fused::ConvLayer::new(&self.weight, self.stride, self.padding)
    }
}

/// A `k`×`k` convolution without bias; "same" padding for odd `k`.
pub fn conv(c_in: usize, c_out: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv> {
    let weight = vb.get((c_out, c_in, k, k), "weight")?;
    Ok(Conv {
        weight,
        stride,
        padding: k / 2,
    })
}

/// Spatial BatchNorm over NHWC activations with learnable scale and shift.
///
/// Written here rather than taken from candle-nn to cut the number of tensor copies
/// in training (statistics are reduced over the rows of a (B·H·W, C) view) and to fold the
/// normalisation into one scale-and-shift in eval mode. Running statistics use
/// PyTorch's convention: `running = (1 − momentum)·running + momentum·batch`, unbiased
/// variance for the running estimate; ε and momentum come from the model's
/// [`BatchNormSpec`](crate::BatchNormSpec) (by default 1e-5 and 0.1).
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

/// A BatchNorm over `c` channels with the default constants (ε 1e-5, momentum 0.1);
/// parameters `weight`, `bias`, buffers `running_mean`, `running_var` under `vb`.
pub fn batch_norm(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    batch_norm_with(c, crate::BatchNormSpec::default(), vb)
}

/// A BatchNorm over `c` channels with ε and momentum from `spec`; variables as
/// [`batch_norm`].
pub fn batch_norm_with(c: usize, spec: crate::BatchNormSpec, vb: VarBuilder) -> Result<BatchNorm> {
    let weight = vb.get_with_hints(c, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?;
    let running_mean = vb.get_with_hints(c, "running_mean", candle_nn::Init::Const(0.0))?;
    let running_var = vb.get_with_hints(c, "running_var", candle_nn::Init::Const(1.0))?;
    Ok(BatchNorm {
        weight,
        bias,
        running_mean: Var::from_tensor(&running_mean)?,
        running_var: Var::from_tensor(&running_var)?,
        eps: spec.eps,
        momentum: spec.momentum,
    })
}

impl BatchNorm {
    /// BatchNorm followed by ReLU; xs: (B, H, W, C) → (B, H, W, C).
    pub fn forward_relu(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(xs, train, true)
    }

    fn forward_impl(&self, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if train {
            let (y, stats) = match crate::kernels::sync_bn::current() {
                Some(sum) => crate::kernels::sync_bn::train(
                    xs,
                    &self.weight,
                    &self.bias,
                    self.eps,
                    relu,
                    &sum,
                )?,
                None => {
                    let (y, stats) = bn::train(xs, &self.weight, &self.bias, self.eps, relu)?;
                    (y, Some(stats))
                }
            };
            if let Some(stats) = stats {
                stats.update_running(&self.running_mean, &self.running_var, self.momentum)?;
            }
            Ok(y)
        } else {
            let (mean, var) = self.running();
            bn::eval(xs, &self.weight, &self.bias, mean, var, self.eps, relu)
        }
    }

    /// The running mean and variance.
    fn running(&self) -> (&Tensor, &Tensor) {
        (self.running_mean.as_tensor(), self.running_var.as_tensor())
    }

    /// γ, β and eps.
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor, f32) {
        (&self.weight, &self.bias, self.eps as f32)
    }

    /// Updates the running statistics from a batch's mean and biased variance over
    /// `n` rows (as the layer-by-layer path does).
    pub(crate) fn update_running_from(&self, mean: &[f32], var: &[f32], n: usize) -> Result<()> {
        let dev = self.running_mean.device();
        let dt = self.running_mean.dtype();
        let mean = Tensor::from_slice(mean, mean.len(), dev)?.to_dtype(dt)?;
        let var = Tensor::from_slice(var, var.len(), dev)?.to_dtype(dt)?;
        bn::BatchStats::new(mean, var, n).update_running(
            &self.running_mean,
            &self.running_var,
            self.momentum,
        )
    }

    /// Updates the running statistics from a train-mode op's saved [mean |
    /// 1/√(var + ε)] (2C) over `rows` rows (as the layer-by-layer path does).
    pub(crate) fn update_running_saved(&self, stats: &Tensor, rows: usize) -> Result<()> {
        bn::BatchStats::saved(stats.clone(), self.eps, rows).update_running(
            &self.running_mean,
            &self.running_var,
            self.momentum,
        )
    }

    /// The updates [`BatchNorm::update_running_saved`] makes from saved statistics at
    /// `at` of a pass's output over `rows` rows, as entries of one multi-statistic
    /// update (the same float operations), or None when the running statistics are
    /// not f32.
    pub(crate) fn running_entries(
        &self,
        at: usize,
        rows: usize,
    ) -> Result<Option<[crate::kernels::running::RunningEntry; 2]>> {
        use crate::kernels::pointwise::{RunningUpdate, Stat};
        use crate::kernels::running::RunningEntry;
        let (mean, var) = self.running();
        if mean.dtype() != DType::F32 || var.dtype() != DType::F32 {
            return Ok(None);
        }
        let n = rows as f64;
        let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let update = |stat, take: f64| RunningUpdate {
            stat,
            keep: (1.0 - self.momentum) as f32,
            take: take as f32,
            neg_eps: (-self.eps) as f32,
        };
        Ok(Some([
            RunningEntry {
                run: mean.clone(),
                at,
                update: update(Stat::Mean, self.momentum),
            },
            RunningEntry {
                run: var.clone(),
                at: at + self.channels()?,
                update: update(Stat::Var, self.momentum * unbiased),
            },
        ]))
    }

    /// The channels C.
    pub(crate) fn channels(&self) -> Result<usize> {
        self.weight.dim(0)
    }

    /// This layer in eval mode for the fused eval path on a GPU (its tensors, shared).
    pub(crate) fn device(&self) -> crate::kernels::device_eval::DNorm {
        crate::kernels::device_eval::DNorm {
            gamma: self.weight.clone(),
            beta: self.bias.clone(),
            mean: self.running_mean.as_tensor().clone(),
            var: self.running_var.as_tensor().clone(),
            eps: self.eps as f32,
            noise: None,
            train_noise: None,
            train_oat: None,
        }
    }

    /// The eval-mode map of this layer (from its running statistics) for the fused path.
    pub(crate) fn eval_affine(&self) -> Result<crate::kernels::Affine> {
        let v = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok(crate::kernels::Affine::from_batch_norm(
            &v(&self.weight)?,
            &v(&self.bias)?,
            &v(self.running_mean.as_tensor())?,
            &v(self.running_var.as_tensor())?,
            self.eps as f32,
        ))
    }

    /// BatchNorm from candle's generic tensor operations ([`bn::reference_train`],
    /// [`bn::reference_eval`]): the reference the kernels are tested against.
    pub fn forward_reference(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let (y, stats) = bn::reference_train(xs, &self.weight, &self.bias, self.eps)?;
            stats.update_running(&self.running_mean, &self.running_var, self.momentum)?;
            Ok(y)
        } else {
            let (mean, var) = self.running();
            bn::reference_eval(xs, &self.weight, &self.bias, mean, var, self.eps)
        }
    }
}

impl ModuleT for BatchNorm {
    /// xs: (B, H, W, C) → (B, H, W, C).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(xs, train, false)
    }
}

/// A fully connected layer `y = x Wᵀ + b`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

/// A linear layer from `d_in` to `d_out` features (`weight`, `bias` under `vb`).
pub fn linear(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((d_out, d_in), "weight")?,
        bias: vb.get(d_out, "bias")?,
    })
}

impl Linear {
    /// Weight (d_out, d_in) and bias.
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// Weight (d_out, d_in) and bias (d_out,) for the fused eval path on a GPU.
    pub(crate) fn device(&self) -> (Tensor, Tensor) {
        (self.weight.clone(), self.bias.clone())
    }

    /// Weight (d_out × d_in, row-major) and bias for the fused eval path.
    pub(crate) fn fused(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            self.weight
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            self.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        ))
    }
}

impl Module for Linear {
    /// xs: (B, d_in) → (B, d_out).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Global average pooling: (B, H, W, C) → (B, C).
pub fn global_avg_pool(xs: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = xs.dims4()?;
    xs.reshape((b, h * w, c))?.mean(1)
}

/// Checks that a tensor is floating point before it enters a model.
pub fn ensure_float(xs: &Tensor) -> Result<()> {
    match xs.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(()),
        other => candle_core::bail!("model input must be floating point in bounds, got {other:?}"),
    }
}
