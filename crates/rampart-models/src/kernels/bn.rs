//! Fused BatchNorm (+ optional ReLU) for NHWC activations on the CPU.
//!
//! Built from candle's primitives a training-mode BatchNorm is about a dozen tensor
//! operations forward and as many backward, each a full pass over memory with a
//! fresh allocation. Here it is three passes in total: [`ChannelStats`] (mean and
//! variance per channel), the normalisation [`BnForward`], and one backward
//! [`BnBackward`] that yields the input, scale and shift gradients together. The
//! activations are viewed as a (N, C) matrix (N = B·H·W), rows split across threads.

use super::common::f32_slice;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Rows per parallel work item, scaled so each item touches about 64 KiB.
fn chunk_rows(c: usize) -> usize {
    (16_384 / c.max(1)).max(1)
}

fn rows_cols(l: &Layout, op: &str) -> Result<(usize, usize)> {
    match l.shape().dims() {
        [n, c] => Ok((*n, *c)),
        d => candle_core::bail!("{op}: expected a (N, C) matrix, got {d:?}"),
    }
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

/// (N, C) → (2, C): per-channel mean and biased variance (two-pass, f64 accumulation).
#[derive(Clone, Copy, Debug)]
pub struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (n, c) = rows_cols(l, self.name())?;
        if n == 0 {
            candle_core::bail!("batch norm over an empty batch")
        }
        let (mut out, var) = mean_var(x, c);
        out.extend(var);
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
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
}

impl CustomOp3 for BnForward {
    fn name(&self) -> &'static str {
        "batch-norm-nhwc"
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
        let x = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let (n, c) = rows_cols(l1, self.name())?;
        self.check(c, g, b)?;
        let (scale, shift) = self.scale_shift(g, b);
        let mut y = vec![0f32; n * c];
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
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = x.dims2()?;
        // Untracked γ and β (a frozen model's detached parameters) need no gradient.
        let param_grads = gamma.track_op() || beta.track_op();
        let op = BnBackward {
            forward: self.clone(),
            gamma: gamma.to_vec1()?,
            beta: beta.to_vec1()?,
            param_grads,
        };
        let packed = x.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, n * c)?.reshape((n, c))?;
        if !param_grads {
            return Ok((Some(dx), None, None));
        }
        let dgamma = packed.narrow(0, n * c, c)?;
        let dbeta = packed.narrow(0, n * c + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The backward of [`BnForward`]: (x, dy) → [dx (N·C) | dγ (C) | dβ (C)] packed.
///
/// With `param_grads` false (γ and β untracked, as in a [`crate::Frozen`] model) and statistics
/// that are not the batch's own (eval mode, as in attacks), dγ and dβ are not needed
/// and the reduction pass is skipped: dx is then a single elementwise pass.
#[derive(Clone, Debug)]
pub struct BnBackward {
    forward: BnForward,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    param_grads: bool,
}

impl CustomOp2 for BnBackward {
    fn name(&self) -> &'static str {
        "batch-norm-nhwc-backward"
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
        let (n, c) = rows_cols(l1, self.name())?;
        if l2.shape().dims() != [n, c] {
            candle_core::bail!("batch norm backward: gradient shape {:?}", l2.shape())
        }
        let f = &self.forward;
        f.check(c, &self.gamma, &self.beta)?;
        let mut out = Vec::with_capacity(n * c + 2 * c);
        out.extend_from_slice(dy);
        let sums = f.backward_in_place(&mut out, x, &self.gamma, &self.beta, self.param_grads);
        out.extend(sums.iter().map(|&v| v as f32));
        Ok((CpuStorage::F32(out), Shape::from(n * c + 2 * c)))
    }
}

/// The batch statistics a train-mode BatchNorm normalised with, for the running
/// estimates: per-channel mean and biased variance, over `rows` rows.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// (C,) mean.
    pub mean: Tensor,
    /// (C,) biased variance.
    pub var: Tensor,
    /// Rows (B·H·W) the statistics are taken over.
    pub rows: usize,
}

fn channels(gamma: &Tensor) -> Result<usize> {
    gamma.dim(0)
}

fn relu_if(y: Tensor, relu: bool) -> Result<Tensor> {
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Train-mode BatchNorm of NHWC activations `xs` (…, C) with batch statistics, then
/// ReLU if `relu`: the fused CPU ops above for f32 on the CPU, cuDNN for f32 on CUDA
/// (feature `cudnn`), [`reference_train`] otherwise. Returns the output and the
/// statistics it used.
pub fn train(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        let dims = xs.dims().to_vec();
        let rows = xs.contiguous()?.reshape(((), channels(gamma)?))?;
        let stats = rows.apply_op1_no_bwd(&ChannelStats)?;
        let n = rows.dim(0)?;
        let (mean, var) = (stats.get(0)?, stats.get(1)?);
        let op = BnForward::from_stats(&mean, &var, eps, relu, true)?;
        let y = rows.apply_op3(gamma, beta, op)?.reshape(dims)?;
        return Ok((y, BatchStats { mean, var, rows: n }));
    }
    #[cfg(feature = "cudnn")]
    if super::cudnn::batch_norm_supported(xs, eps) {
        let (y, mean, var) = super::cudnn::batch_norm_train(xs, gamma, beta, eps)?;
        let rows = xs.elem_count() / mean.elem_count();
        return Ok((relu_if(y, relu)?, BatchStats { mean, var, rows }));
    }
    let (y, stats) = reference_train(xs, gamma, beta, eps)?;
    Ok((relu_if(y, relu)?, stats))
}

/// Eval-mode BatchNorm of NHWC activations `xs` (…, C) with the running `mean` and
/// `var`, then ReLU if `relu`; dispatched as [`train`] is, with [`reference_eval`]
/// as the fallback.
pub fn eval(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        let dims = xs.dims().to_vec();
        let rows = xs.contiguous()?.reshape(((), channels(gamma)?))?;
        let op = BnForward::from_stats(mean, var, eps, relu, false)?;
        return rows.apply_op3(gamma, beta, op)?.reshape(dims);
    }
    #[cfg(feature = "cudnn")]
    if super::cudnn::batch_norm_supported(xs, eps) {
        let y = super::cudnn::batch_norm_eval(xs, gamma, beta, mean, var, eps)?;
        return relu_if(y, relu);
    }
    relu_if(reference_eval(xs, gamma, beta, mean, var, eps)?, relu)
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
    let rows = xs.reshape(((), channels(gamma)?))?;
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
        mean: mean.flatten_all()?,
        var: var.flatten_all()?,
        rows: n,
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
