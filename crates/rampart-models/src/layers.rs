//! Building blocks shared by the architectures: convolutions, BatchNorm, linear.

use candle_core::{DType, Module, ModuleT, Result, Tensor, Var, D};
use candle_nn::VarBuilder;

/// A bias-free 2-D convolution (every architecture here follows it with BatchNorm).
#[derive(Clone, Debug)]
pub struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// xs: (B, C_in, H, W) → (B, C_out, H', W').
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)
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

/// Spatial BatchNorm over (B, C, H, W) with learnable scale and shift.
///
/// Written here rather than taken from candle-nn to cut the number of tensor copies
/// in training (statistics are reduced over dims 0, 2, 3 directly) and to fold the
/// normalisation into one scale-and-shift in eval mode. Running statistics use
/// PyTorch's convention: momentum 0.1, unbiased variance for the running estimate.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

/// A BatchNorm over `c` channels; parameters `weight`, `bias`, buffers
/// `running_mean`, `running_var` under `vb`.
pub fn batch_norm(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    let weight = vb.get_with_hints(c, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?;
    let running_mean = vb.get_with_hints(c, "running_mean", candle_nn::Init::Const(0.0))?;
    let running_var = vb.get_with_hints(c, "running_var", candle_nn::Init::Const(1.0))?;
    Ok(BatchNorm {
        weight,
        bias,
        running_mean: Var::from_tensor(&running_mean)?,
        running_var: Var::from_tensor(&running_var)?,
        eps: 1e-5,
        momentum: 0.1,
    })
}

impl BatchNorm {
    fn channel_shape(&self) -> Result<(usize, usize, usize, usize)> {
        Ok((1, self.weight.dim(0)?, 1, 1))
    }
}

impl ModuleT for BatchNorm {
    /// xs: (B, C, H, W) → (B, C, H, W).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let shape = self.channel_shape()?;
        if train {
            let (b, _, h, w) = xs.dims4()?;
            let n = (b * h * w) as f64;
            let mean = xs.mean_keepdim((0, 2, 3))?;
            let centred = xs.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
            let inv_std = (&var + self.eps)?.sqrt()?.recip()?;
            let scale = inv_std.broadcast_mul(&self.weight.reshape(shape)?)?;
            let out = centred
                .broadcast_mul(&scale)?
                .broadcast_add(&self.bias.reshape(shape)?)?;
            let m = self.momentum;
            let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
            let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))?
                + (mean.detach().flatten_all()? * m)?)?;
            let new_var = ((self.running_var.as_tensor() * (1.0 - m))?
                + (var.detach().flatten_all()? * (m * unbiased))?)?;
            self.running_mean.set(&new_mean)?;
            self.running_var.set(&new_var)?;
            Ok(out)
        } else {
            let inv_std = (self.running_var.as_detached_tensor() + self.eps)?
                .sqrt()?
                .recip()?;
            let scale = (&self.weight * &inv_std)?;
            let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
            xs.broadcast_mul(&scale.reshape(shape)?)?
                .broadcast_add(&shift.reshape(shape)?)
        }
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

impl Module for Linear {
    /// xs: (B, d_in) → (B, d_out).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Global average pooling: (B, C, H, W) → (B, C).
pub fn global_avg_pool(xs: &Tensor) -> Result<Tensor> {
    xs.mean(D::Minus1)?.mean(D::Minus1)
}

/// Checks that a tensor is floating point before it enters a model.
pub fn ensure_float(xs: &Tensor) -> Result<()> {
    match xs.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(()),
        other => candle_core::bail!("model input must be floating point in bounds, got {other:?}"),
    }
}
