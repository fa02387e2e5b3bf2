//! BatchNorm (+ optional ReLU) of NHWC activations: the ops [`BatchNormTrain`] and
//! [`BatchNormEval`], each one type with its CPU forward (here) and its CUDA forward
//! (cuDNN, feature `cudnn`), the functions [`train`] and [`eval`] that pick the op or
//! the reference, and the reference itself ([`reference_train`], [`reference_eval`]).
//!
//! Built from candle's primitives a training-mode BatchNorm is about a dozen tensor
//! operations forward and as many backward, each a full pass over memory with a
//! fresh allocation. On the CPU it is three passes in total here: the statistics
//! (mean and variance per channel), the normalisation, and one backward pass that
//! yields the input, scale and shift gradients together. The activations are viewed
//! as a (N, C) matrix (N = B·H·W), rows split across threads.

use super::common::f32_slice;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, Var};
use rayon::prelude::*;

/// Rows per parallel work item, scaled so each item touches about 64 KiB.
fn chunk_rows(c: usize) -> usize {
    (16_384 / c.max(1)).max(1)
}

/// Per-channel sums over the rows of `x` (N × C), `add(row, acc)` adding one row's
/// terms: in parallel, f32 within a chunk (at most `chunk_rows` rows, so it
/// vectorises), f64 across chunks.
fn channel_sums(x: &[f32], c: usize, add: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f64> {
    x.par_chunks(chunk_rows(c) * c)
        .map(|chunk| {
            let mut acc = vec![0f32; c];
            for row in chunk.chunks_exact(c) {
                add(row, &mut acc);
            }
            acc.into_iter().map(f64::from).collect::<Vec<f64>>()
        })
        .reduce(
            || vec![0f64; c],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// Per-channel mean and biased variance of the rows of `x` (N × C, N > 0): two passes,
/// f64 accumulation across chunks.
pub(crate) fn mean_var(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (x.len() / c) as f64;
    let mean: Vec<f32> = channel_sums(x, c, |row, acc| {
        acc.iter_mut().zip(row).for_each(|(a, v)| *a += v)
    })
    .into_iter()
    .map(|s| (s / n) as f32)
    .collect();
    let var = channel_sums(x, c, |row, acc| {
        for ((a, v), m) in acc.iter_mut().zip(row).zip(&mean) {
            *a += (v - m) * (v - m);
        }
    })
    .into_iter()
    .map(|s| (s / n) as f32)
    .collect();
    (mean, var)
}

/// y = (x − mean)·inv_std·γ + β, then ReLU if `relu`; x: (N, C), γ, β: (C,).
///
/// `batch_stats` says whether mean and inv_std were computed from this very batch
/// (training), which adds their dependence on x to the input gradient.
#[derive(Clone, Debug)]
pub struct BnForward {
    /// Per-channel mean used for normalisation.
    pub mean: Vec<f32>,
    /// Per-channel 1/√(var + eps).
    pub inv_std: Vec<f32>,
    /// Apply ReLU after the affine map.
    pub relu: bool,
    /// Mean and variance are statistics of this batch.
    pub batch_stats: bool,
}

impl BnForward {
    /// The normalisation by per-channel `mean` and variance `var` (f32 tensors, (C,)).
    fn from_stats(
        mean: &Tensor,
        var: &Tensor,
        eps: f64,
        relu: bool,
        batch_stats: bool,
    ) -> Result<Self> {
        Ok(BnForward {
            mean: mean.to_vec1::<f32>()?,
            inv_std: var
                .to_vec1::<f32>()?
                .iter()
                .map(|v| 1.0 / (v + eps as f32).sqrt())
                .collect(),
            relu,
            batch_stats,
        })
    }

    fn check(&self, c: usize, g: &[f32], b: &[f32]) -> Result<()> {
        if self.mean.len() != c || self.inv_std.len() != c || g.len() != c || b.len() != c {
            candle_core::bail!("batch norm: parameters do not match {c} channels")
        }
        Ok(())
    }

    /// The per-channel affine map x·scale + shift of this normalisation with γ, β.
    pub(crate) fn scale_shift(&self, gamma: &[f32], beta: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let scale: Vec<f32> = gamma
            .iter()
            .zip(&self.inv_std)
            .map(|(g, s)| g * s)
            .collect();
        let shift = beta
            .iter()
            .zip(self.mean.iter().zip(&scale))
            .map(|(b, (m, s))| b - m * s)
            .collect();
        (scale, shift)
    }

    /// The backward pass over rows `x` (N × C): `g` holds dL/dy and becomes dL/dx, in
    /// place. Returns [dγ | dβ] (2·C, f64), computed when `sums` (zeros otherwise);
    /// they are needed for the parameter gradients and, with batch statistics, for dx.
    pub(crate) fn backward_in_place(
        &self,
        g: &mut [f32],
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        sums: bool,
    ) -> Vec<f64> {
        // One instance per ReLU setting, so that the inner loops carry no branch.
        if self.relu {
            self.backward_impl::<true>(g, x, gamma, beta, sums)
        } else {
            self.backward_impl::<false>(g, x, gamma, beta, sums)
        }
    }

    fn backward_impl<const RELU: bool>(
        &self,
        g: &mut [f32],
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        sums: bool,
    ) -> Vec<f64> {
        let c = gamma.len();
        let n = x.len() / c.max(1);
        let (mean, inv_std) = (&self.mean[..c], &self.inv_std[..c]);
        let (scale, shift) = self.scale_shift(gamma, beta);
        // dy where the ReLU is live (the pre-activation x·scale + shift is positive),
        // by multiplication so that the loops vectorise.
        let live = |xv: f32, sc: f32, sh: f32| {
            if RELU {
                f32::from(u8::from(xv * sc + sh > 0.0))
            } else {
                1.0
            }
        };
        let rows = chunk_rows(c) * c;
        let sums = if sums || self.batch_stats {
            g.par_chunks(rows)
                .zip(x.par_chunks(rows))
                .map(|(gc, xc)| {
                    let mut acc = vec![0f32; 2 * c];
                    let (dg, db) = acc.split_at_mut(c);
                    for (xr, gr) in xc.chunks_exact(c).zip(gc.chunks_exact(c)) {
                        for (((((&xv, &dv), a), b), (&m, &s)), (&sc, &sh)) in xr
                            .iter()
                            .zip(gr)
                            .zip(dg.iter_mut())
                            .zip(db.iter_mut())
                            .zip(mean.iter().zip(inv_std))
                            .zip(scale.iter().zip(&shift))
                        {
                            let d = dv * live(xv, sc, sh);
                            *a += d * (xv - m) * s;
                            *b += d;
                        }
                    }
                    acc.into_iter().map(f64::from).collect::<Vec<f64>>()
                })
                .reduce(
                    || vec![0f64; 2 * c],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                        a
                    },
                )
        } else {
            vec![0f64; 2 * c]
        };
        let (dgamma, dbeta) = sums.split_at(c);
        let inv_n = 1.0 / n.max(1) as f64;
        let (mg, mb): (Vec<f32>, Vec<f32>) = if self.batch_stats {
            (
                dgamma.iter().map(|v| (v * inv_n) as f32).collect(),
                dbeta.iter().map(|v| (v * inv_n) as f32).collect(),
            )
        } else {
            (vec![0.0; c], vec![0.0; c])
        };
        g.par_chunks_mut(rows)
            .zip(x.par_chunks(rows))
            .for_each(|(gc, xc)| {
                for (gr, xr) in gc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                    for (((gv, &xv), (&m, &s)), ((&sc, &sh), (&g_mean, &b_mean))) in gr
                        .iter_mut()
                        .zip(xr)
                        .zip(mean.iter().zip(inv_std))
                        .zip(scale.iter().zip(&shift).zip(mg.iter().zip(&mb)))
                    {
                        let d = *gv * live(xv, sc, sh);
                        *gv = sc * (d - b_mean - (xv - m) * s * g_mean);
                    }
                }
            });
        sums
    }
    /// y = relu?((x − mean)·inv_std·γ + β) over the rows of `x` (N × C).
    pub(crate) fn normalise(&self, x: &[f32], gamma: &[f32], beta: &[f32]) -> Result<Vec<f32>> {
        let c = gamma.len();
        self.check(c, gamma, beta)?;
        let (scale, shift) = self.scale_shift(gamma, beta);
        let mut y = vec![0f32; x.len()];
        let relu = self.relu;
        y.par_chunks_mut(chunk_rows(c) * c)
            .zip(x.par_chunks(chunk_rows(c) * c))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                    for ((y, x), (s, t)) in yr.iter_mut().zip(xr).zip(scale.iter().zip(&shift)) {
                        let v = x * s + t;
                        *y = if relu { v.max(0.0) } else { v };
                    }
                }
            });
        Ok(y)
    }
}

/// The shape of BatchNorm activations as (n, c, h, w): NHWC (B, H, W, C) as
/// (B, C, H, W), a (rows, C) matrix as (rows, C, 1, 1).
pub(crate) fn bn_dims(xs: &Tensor) -> Result<[usize; 4]> {
    Ok(match xs.dims() {
        [b, h, w, c] => [*b, *c, *h, *w],
        [rows, c] => [*rows, *c, 1, 1],
        other => candle_core::bail!("BatchNorm: expected (B, H, W, C) or (rows, C), got {other:?}"),
    })
}

/// The flat operands of a BatchNorm op, checked: x (n·h·w·c), γ and β (c).
fn operands<'a>(
    name: &str,
    dims: [usize; 4],
    [(s1, l1), (s2, l2), (s3, l3)]: [(&'a CpuStorage, &Layout); 3],
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    let [n, c, h, w] = dims;
    let (x, g, b) = (
        f32_slice(s1, l1, name)?,
        f32_slice(s2, l2, name)?,
        f32_slice(s3, l3, name)?,
    );
    if x.len() != n * c * h * w || g.len() != c || b.len() != c {
        candle_core::bail!("{name}: parameters do not match {c} channels")
    }
    Ok((x, g, b))
}

/// Train-mode BatchNorm (+ ReLU) with the batch's own statistics, as one op:
/// (x, γ, β) → [y | mean | 1/√(var + ε)] in one flat buffer (the statistics are what
/// the backward pass and the running estimates read). x is flat, `dims` its
/// (n, c, h, w) shape (NHWC memory).
///
/// CPU forward: one statistics pass and one normalisation pass (this module); CUDA
/// forward: cuDNN's persistent NHWC kernel (feature `cudnn`), then the ReLU in place
/// on its output (one more kernel, no tensor operation of its own).
#[derive(Clone, Copy, Debug)]
pub struct BatchNormTrain {
    /// (n, c, h, w) of the activations.
    pub dims: [usize; 4],
    /// ε added to the variance.
    pub eps: f64,
    /// ReLU after the affine map.
    pub relu: bool,
}

impl BatchNormTrain {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g, b) = operands(self.name(), self.dims, [(s1, l1), (s2, l2), (s3, l3)])?;
        let c = self.dims[1];
        if x.is_empty() {
            candle_core::bail!("batch norm over an empty batch")
        }
        let (mean, var) = mean_var(x, c);
        let eps = self.eps as f32;
        let f = BnForward {
            inv_std: var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
            mean,
            relu: self.relu,
            batch_stats: true,
        };
        let mut out = f.normalise(x, g, b)?;
        out.extend_from_slice(&f.mean);
        out.extend_from_slice(&f.inv_std);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (mut out, shape) = super::cudnn::batch_norm_train(self, s1, l1, s2, l2, s3, l3)?;
        if self.relu {
            super::pointwise::relu_in_place(&mut out, self.len())?;
        }
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (len, c) = (self.len(), self.dims[1]);
        // Untracked γ and β (a frozen model's detached parameters) need no gradient.
        let param_grads = gamma.track_op() || beta.track_op();
        let op = BatchNormTrainBackward {
            forward: *self,
            gamma: gamma.detach(),
            beta: beta.detach(),
            param_grads,
        };
        let out = x.apply_op3_no_bwd(&grad.contiguous()?, res, &op)?;
        unpack_grads(&out, len, c, param_grads)
    }
}

/// The backward pass of [`BatchNormTrain`]: (x, ∂/∂[y | stats], [y | mean | inv_std])
/// → [dx | dγ | dβ] in one buffer. CPU: one reduction pass and one elementwise pass
/// (the reduction is needed for dx with batch statistics); CUDA: cuDNN.
#[derive(Clone, Debug)]
pub struct BatchNormTrainBackward {
    forward: BatchNormTrain,
    gamma: Tensor,
    beta: Tensor,
    param_grads: bool,
}

#[cfg(feature = "cudnn")]
impl BatchNormTrainBackward {
    /// The forward op this is the backward pass of.
    pub(crate) fn forward(&self) -> &BatchNormTrain {
        &self.forward
    }

    /// The scale γ.
    pub(crate) fn gamma(&self) -> &Tensor {
        &self.gamma
    }
}

impl CustomOp3 for BatchNormTrainBackward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (len, c) = (self.forward.len(), self.forward.dims[1]);
        let x = f32_slice(s1, l1, self.name())?;
        let dy = f32_slice(s2, l2, self.name())?;
        let saved = f32_slice(s3, l3, self.name())?;
        if x.len() != len || dy.len() != len + 2 * c || saved.len() != len + 2 * c {
            candle_core::bail!(
                "{}: operands do not match {:?}",
                self.name(),
                self.forward.dims
            )
        }
        let gamma = self.gamma.to_vec1::<f32>()?;
        let beta = self.beta.to_vec1::<f32>()?;
        let f = BnForward {
            mean: saved[len..len + c].to_vec(),
            inv_std: saved[len + c..].to_vec(),
            relu: self.forward.relu,
            batch_stats: true,
        };
        f.check(c, &gamma, &beta)?;
        let mut out = Vec::with_capacity(len + 2 * c);
        out.extend_from_slice(&dy[..len]);
        let sums = f.backward_in_place(&mut out, x, &gamma, &beta, self.param_grads);
        out.extend(sums.iter().map(|&v| v as f32));
        Ok((CpuStorage::F32(out), Shape::from(len + 2 * c)))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (len, c) = (self.forward.len(), self.forward.dims[1]);
        let grad = super::cuda::f32_view(s2, l2, len + 2 * c, "BatchNorm: output gradient")?;
        if !self.forward.relu {
            return super::cudnn::batch_norm_backward(self, s1, l1, &grad.slice(..len), s3, l3);
        }
        // The gradient through the ReLU (whose output is the saved y), then cuDNN's.
        let y = super::cuda::f32_view(s3, l3, len + 2 * c, "BatchNorm: saved output")?;
        let masked =
            super::pointwise::relu_mask_cuda(&s1.device, &grad.slice(..len), &y.slice(..len))?;
        super::cudnn::batch_norm_backward(self, s1, l1, &masked.slice(..), s3, l3)
    }
}

/// Eval-mode BatchNorm (+ ReLU) with the running statistics, as one op:
/// (x, γ, β) → y, x and y flat with (n, c, h, w) shape `dims` (NHWC memory).
///
/// CPU forward: one pass (this module); CUDA forward: cuDNN (feature `cudnn`), then
/// the ReLU in place, as for [`BatchNormTrain`]. The backward pass is a per-channel
/// scaling of the output gradient (and, for tracked γ and β, the two parameter
/// gradients): one CPU op; on CUDA one kernel ([`BnEvalBackward`]) for frozen γ and
/// β (an attack's case), else the ReLU's mask and candle's operations.
///
/// [`BnEvalBackward`]: super::pointwise::BnEvalBackward
#[derive(Clone, Debug)]
pub struct BatchNormEval {
    /// (n, c, h, w) of the activations.
    pub dims: [usize; 4],
    /// ε added to the variance.
    pub eps: f64,
    /// ReLU after the affine map.
    pub relu: bool,
    /// Running mean (C,), detached.
    pub mean: Tensor,
    /// Running variance (C,), detached.
    pub var: Tensor,
}

impl BatchNormEval {
    /// The CPU normalisation of this op.
    fn cpu(&self) -> Result<BnForward> {
        BnForward::from_stats(&self.mean, &self.var, self.eps, self.relu, false)
    }
}

impl CustomOp3 for BatchNormEval {
    fn name(&self) -> &'static str {
        "batch-norm-eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g, b) = operands(self.name(), self.dims, [(s1, l1), (s2, l2), (s3, l3)])?;
        let y = self.cpu()?.normalise(x, g, b)?;
        let len = y.len();
        Ok((CpuStorage::F32(y), Shape::from(len)))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (mut y, shape) = super::cudnn::batch_norm_eval(self, s1, l1, s2, l2, s3, l3)?;
        if self.relu {
            super::pointwise::relu_in_place(&mut y, self.dims.iter().product())?;
        }
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.dims[1];
        // Untracked γ and β (a frozen model's detached parameters) need no gradient.
        let param_grads = gamma.track_op() || beta.track_op();
        if x.device().is_cpu() {
            let op = BnBackward {
                forward: self.cpu()?,
                gamma: gamma.to_vec1()?,
                beta: beta.to_vec1()?,
                param_grads,
            };
            let packed = x.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
            return unpack_grads(&packed, x.elem_count(), c, param_grads);
        }
        if !param_grads {
            let op = super::pointwise::BnEvalBackward {
                var: self.var.clone(),
                eps: self.eps as f32,
                relu: self.relu,
                c,
            };
            let dx = grad.contiguous()?.apply_op3_no_bwd(res, gamma, &op)?;
            return Ok((Some(dx), None, None));
        }
        let grad = if self.relu {
            super::pointwise::relu_mask(grad, res)?
        } else {
            grad.clone()
        };
        let inv_std = (&self.var + self.eps)?.sqrt()?.recip()?;
        let rows = grad.reshape(((), c))?;
        let dx = rows.broadcast_mul(&(gamma * &inv_std)?)?.flatten_all()?;
        let x_hat = x
            .reshape(((), c))?
            .broadcast_sub(&self.mean)?
            .broadcast_mul(&inv_std)?;
        Ok((
            Some(dx),
            Some((rows.clone() * x_hat)?.sum(0)?),
            Some(rows.sum(0)?),
        ))
    }
}

/// (dx, dγ, dβ) from a packed [dx (len) | dγ (c) | dβ (c)] buffer; the parameter
/// gradients only when they are wanted.
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

fn unpack_grads(packed: &Tensor, len: usize, c: usize, param_grads: bool) -> Result<Grads3> {
    let dx = packed.narrow(0, 0, len)?;
    if !param_grads {
        return Ok((Some(dx), None, None));
    }
    Ok((
        Some(dx),
        Some(packed.narrow(0, len, c)?),
        Some(packed.narrow(0, len + c, c)?),
    ))
}

/// The CPU backward pass of [`BatchNormEval`]: (x, dy) → [dx | dγ | dβ] packed.
///
/// With `param_grads` false (γ and β untracked, as in a [`crate::Frozen`] model) the
/// reduction pass is skipped: dx is then a single elementwise pass.
#[derive(Clone, Debug)]
struct BnBackward {
    forward: BnForward,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    param_grads: bool,
}

impl CustomOp2 for BnBackward {
    fn name(&self) -> &'static str {
        "batch-norm-eval-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let dy = f32_slice(s2, l2, self.name())?;
        if dy.len() != x.len() {
            candle_core::bail!("batch norm backward: gradient shape {:?}", l2.shape())
        }
        let c = self.gamma.len();
        let f = &self.forward;
        f.check(c, &self.gamma, &self.beta)?;
        let mut out = Vec::with_capacity(x.len() + 2 * c);
        out.extend_from_slice(dy);
        let sums = f.backward_in_place(&mut out, x, &self.gamma, &self.beta, self.param_grads);
        out.extend(sums.iter().map(|&v| v as f32));
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// The batch statistics a train-mode BatchNorm normalised with, for the running
/// estimates, over `rows` rows: per-channel mean and biased variance, either as
/// tensors or as the op's saved [mean | 1/√(var + ε)].
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// Rows (B·H·W) the statistics are taken over.
    pub rows: usize,
    kind: StatsKind,
}

#[derive(Clone, Debug)]
enum StatsKind {
    /// Mean and biased variance, (C,) each.
    Plain { mean: Tensor, var: Tensor },
    /// The [`BatchNormTrain`] op's saved [mean | 1/√(var + ε)] (2C, f32).
    Saved { stats: Tensor, eps: f64 },
}

impl BatchStats {
    /// Statistics given as a mean and a biased variance ((C,) each) over `rows` rows.
    pub fn new(mean: Tensor, var: Tensor, rows: usize) -> Self {
        BatchStats {
            rows,
            kind: StatsKind::Plain { mean, var },
        }
    }

    /// Statistics given as a train-mode op's saved [mean | 1/√(var + ε)] (2C, f32)
    /// over `rows` rows.
    pub(crate) fn saved(stats: Tensor, eps: f64, rows: usize) -> Self {
        BatchStats {
            rows,
            kind: StatsKind::Saved { stats, eps },
        }
    }

    /// The per-channel mean and biased variance, (C,) each (for the saved form, the
    /// variance is 1/s² − ε from s = 1/√(var + ε), by tensor operations).
    pub fn mean_var(&self) -> Result<(Tensor, Tensor)> {
        match &self.kind {
            StatsKind::Plain { mean, var } => Ok((mean.clone(), var.clone())),
            StatsKind::Saved { stats, eps } => {
                let c = stats.dim(0)? / 2;
                let var = (stats.narrow(0, c, c)?.sqr()?.recip()? - *eps)?;
                Ok((stats.narrow(0, 0, c)?, var))
            }
        }
    }

    /// Updates `running_mean` and `running_var` (f32 or other dtypes, (C,)) in place
    /// with PyTorch's rule: running = (1 − momentum)·running + momentum·batch, the
    /// variance unbiased (·n/(n − 1)). From saved f32 statistics into f32 running
    /// statistics this is one [`RunningUpdate`] kernel each; otherwise tensor
    /// operations. The two give the same bits.
    ///
    /// [`RunningUpdate`]: super::pointwise::RunningUpdate
    pub fn update_running(
        &self,
        running_mean: &Var,
        running_var: &Var,
        momentum: f64,
    ) -> Result<()> {
        let n = self.rows as f64;
        let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        if let StatsKind::Saved { stats, eps } = &self.kind {
            let f32s = [running_mean.as_tensor(), running_var.as_tensor(), stats]
                .iter()
                .all(|t| t.dtype() == DType::F32);
            if f32s && (stats.device().is_cpu() || cfg!(feature = "cuda")) {
                use super::pointwise::{RunningUpdate, Stat};
                let update = |stat, take: f64| RunningUpdate {
                    stat,
                    keep: (1.0 - momentum) as f32,
                    take: take as f32,
                    neg_eps: (-eps) as f32,
                };
                let stats = stats.contiguous()?;
                running_mean.inplace_op2(&stats, &update(Stat::Mean, momentum))?;
                return running_var.inplace_op2(&stats, &update(Stat::Var, momentum * unbiased));
            }
        }
        let (mean, var) = self.mean_var()?;
        let new_mean = ((running_mean.as_tensor() * (1.0 - momentum))?
            + (mean.detach().flatten_all()? * momentum)?)?;
        let new_var = ((running_var.as_tensor() * (1.0 - momentum))?
            + (var.detach().flatten_all()? * (momentum * unbiased))?)?;
        running_mean.set(&new_mean)?;
        running_var.set(&new_var)
    }
}

fn relu_if(y: Tensor, relu: bool) -> Result<Tensor> {
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Whether the [`BatchNormTrain`]/[`BatchNormEval`] ops run `xs` with this ε: f32 on
/// the CPU, and f32 on CUDA with the `cudnn` feature (ε at least cuDNN's minimum, a
/// non-empty batch).
pub(crate) fn native(xs: &Tensor, eps: f64) -> bool {
    if xs.dtype() != DType::F32 {
        return false;
    }
    if xs.device().is_cpu() {
        return true;
    }
    #[cfg(feature = "cudnn")]
    if super::cudnn::batch_norm_supported(xs, eps) {
        return true;
    }
    let _ = eps;
    false
}

/// Train-mode BatchNorm of NHWC activations `xs` (…, C) with batch statistics, then
/// ReLU if `relu`: the [`BatchNormTrain`] op where [`native`], [`reference_train`]
/// otherwise. Returns the output and the statistics it used.
pub fn train(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    if !native(xs, eps) {
        let (y, stats) = reference_train(xs, gamma, beta, eps)?;
        return Ok((relu_if(y, relu)?, stats));
    }
    let dims = bn_dims(xs)?;
    let [n, c, h, w] = dims;
    let len = n * c * h * w;
    let op = BatchNormTrain { dims, eps, relu };
    let out =
        xs.contiguous()?
            .flatten_all()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let y = out.narrow(0, 0, len)?.reshape(xs.shape())?;
    let stats = BatchStats {
        rows: n * h * w,
        kind: StatsKind::Saved {
            stats: out.narrow(0, len, 2 * c)?.detach(),
            eps,
        },
    };
    Ok((y, stats))
}

/// Eval-mode BatchNorm of NHWC activations `xs` (…, C) with the running `mean` and
/// `var`, then ReLU if `relu`: the [`BatchNormEval`] op where [`native`],
/// [`reference_eval`] otherwise.
pub fn eval(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    if !native(xs, eps) {
        return relu_if(reference_eval(xs, gamma, beta, mean, var, eps)?, relu);
    }
    let op = BatchNormEval {
        dims: bn_dims(xs)?,
        eps,
        relu,
        mean: mean.detach().contiguous()?,
        var: var.detach().contiguous()?,
    };
    xs.contiguous()?
        .flatten_all()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?
        .reshape(xs.shape())
}

/// Train-mode BatchNorm from candle's generic tensor operations (no ReLU): the path
/// for other devices and dtypes, and the reference the fused ops are tested against.
pub fn reference_train(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let dims = xs.dims().to_vec();
    let rows = xs.reshape(((), gamma.dim(0)?))?;
    let n = rows.dim(0)?;
    let mean = rows.mean_keepdim(0)?;
    let centred = rows.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(0)?;
    let inv_std = (&var + eps)?.sqrt()?.recip()?;
    let scale = inv_std.broadcast_mul(gamma)?;
    let out = centred
        .broadcast_mul(&scale)?
        .broadcast_add(beta)?
        .reshape(dims)?;
    let stats = BatchStats {
        rows: n,
        kind: StatsKind::Plain {
            mean: mean.flatten_all()?,
            var: var.flatten_all()?,
        },
    };
    Ok((out, stats))
}

/// Eval-mode BatchNorm from candle's generic tensor operations (no ReLU), the
/// running statistics taken as constants.
pub fn reference_eval(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let inv_std = (var.detach() + eps)?.sqrt()?.recip()?;
    let scale = (gamma * &inv_std)?;
    let shift = (beta - (mean.detach() * &scale)?)?;
    xs.broadcast_mul(&scale)?.broadcast_add(&shift)
}
