//! Fused BatchNorm (+ optional ReLU) for NHWC activations on the CPU.
//!
//! Built from candle's primitives a training-mode BatchNorm is about a dozen tensor
//! operations forward and as many backward, each a full pass over memory with a
//! fresh allocation. Here it is three passes in total: [`ChannelStats`] (mean and
//! variance per channel), the normalisation [`BnForward`], and one backward
//! [`BnBackward`] that yields the input, scale and shift gradients together. The
//! activations are viewed as a (N, C) matrix (N = B·H·W), rows split across threads.

use crate::im2col::f32_slice;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
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

/// Sums per channel of `f(row_value, channel)` over all rows, in parallel: f32 within
/// a chunk (at most `chunk_rows` terms, so it vectorises), f64 across chunks.
fn channel_sums(x: &[f32], c: usize, f: impl Fn(f32, usize) -> f32 + Sync) -> Vec<f64> {
    x.par_chunks(chunk_rows(c) * c)
        .map(|chunk| {
            let mut acc = vec![0f32; c];
            for row in chunk.chunks_exact(c) {
                for (j, (a, &v)) in acc.iter_mut().zip(row).enumerate() {
                    *a += f(v, j);
                }
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
        let mean: Vec<f32> = channel_sums(x, c, |v, _| v)
            .into_iter()
            .map(|s| (s / n as f64) as f32)
            .collect();
        let var = channel_sums(x, c, |v, j| {
            let d = v - mean[j];
            d * d
        });
        let mut out = mean;
        out.extend(var.iter().map(|&v| (v / n as f64) as f32));
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
    fn check(&self, c: usize, g: &[f32], b: &[f32]) -> Result<()> {
        if self.mean.len() != c || self.inv_std.len() != c || g.len() != c || b.len() != c {
            candle_core::bail!("batch norm: parameters do not match {c} channels")
        }
        Ok(())
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
        let scale: Vec<f32> = g.iter().zip(&self.inv_std).map(|(g, s)| g * s).collect();
        let shift: Vec<f32> = (0..c).map(|j| b[j] - self.mean[j] * scale[j]).collect();
        let mut y = vec![0f32; n * c];
        let relu = self.relu;
        y.par_chunks_mut(chunk_rows(c) * c)
            .zip(x.par_chunks(chunk_rows(c) * c))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                    for j in 0..c {
                        let v = xr[j] * scale[j] + shift[j];
                        yr[j] = if relu { v.max(0.0) } else { v };
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
        let param_grads = !crate::input_gradients_only_active();
        let op = BnBackward {
            forward: self.clone(),
            gamma: gamma.to_vec1()?,
            beta: beta.to_vec1()?,
            param_grads,
        };
        let packed = x.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, n * c)?.reshape((n, c))?;
        if !param_grads {
            return Ok((
                Some(dx),
                Some(gamma.zeros_like()?),
                Some(beta.zeros_like()?),
            ));
        }
        let dgamma = packed.narrow(0, n * c, c)?;
        let dbeta = packed.narrow(0, n * c + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The backward of [`BnForward`]: (x, dy) → [dx (N·C) | dγ (C) | dβ (C)] packed.
///
/// With `param_grads` false (inside [`crate::input_gradients_only`]) and statistics
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
        let (mean, inv_std) = (&f.mean[..c], &f.inv_std[..c]);
        // The ReLU is live where the pre-activation x·scale + shift is positive.
        let scale: Vec<f32> = self.gamma.iter().zip(inv_std).map(|(g, s)| g * s).collect();
        let shift: Vec<f32> = (0..c).map(|j| self.beta[j] - mean[j] * scale[j]).collect();
        let relu = f.relu;
        let rows = chunk_rows(c) * c;
        let need_sums = f.batch_stats || self.param_grads;
        let sums = if need_sums {
            x.par_chunks(rows)
                .zip(dy.par_chunks(rows))
                .map(|(xc, dc)| {
                    let mut acc = vec![0f32; 2 * c];
                    let (dg, db) = acc.split_at_mut(c);
                    for (xr, dr) in xc.chunks_exact(c).zip(dc.chunks_exact(c)) {
                        for (((((&xv, &dv), g), b), (&m, &s)), (&sc, &sh)) in xr
                            .iter()
                            .zip(dr)
                            .zip(dg.iter_mut())
                            .zip(db.iter_mut())
                            .zip(mean.iter().zip(inv_std))
                            .zip(scale.iter().zip(&shift))
                        {
                            let d = if !relu || xv * sc + sh > 0.0 { dv } else { 0.0 };
                            *g += d * (xv - m) * s;
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
        let inv_n = 1.0 / n as f64;
        let (mg, mb): (Vec<f32>, Vec<f32>) = if f.batch_stats {
            (
                dgamma.iter().map(|v| (v * inv_n) as f32).collect(),
                dbeta.iter().map(|v| (v * inv_n) as f32).collect(),
            )
        } else {
            (vec![0.0; c], vec![0.0; c])
        };
        let mut out = vec![0f32; n * c + 2 * c];
        out[..n * c]
            .par_chunks_mut(rows)
            .zip(x.par_chunks(rows).zip(dy.par_chunks(rows)))
            .for_each(|(oc, (xc, dc))| {
                for ((or, xr), dr) in oc
                    .chunks_exact_mut(c)
                    .zip(xc.chunks_exact(c))
                    .zip(dc.chunks_exact(c))
                {
                    for ((((o, &xv), &dv), (&m, &s)), ((&sc, &sh), (&g_mean, &b_mean))) in or
                        .iter_mut()
                        .zip(xr)
                        .zip(dr)
                        .zip(mean.iter().zip(inv_std))
                        .zip(scale.iter().zip(&shift).zip(mg.iter().zip(&mb)))
                    {
                        let d = if !relu || xv * sc + sh > 0.0 { dv } else { 0.0 };
                        *o = sc * (d - b_mean - (xv - m) * s * g_mean);
                    }
                }
            });
        for j in 0..c {
            out[n * c + j] = dgamma[j] as f32;
            out[n * c + c + j] = dbeta[j] as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(n * c + 2 * c)))
    }
}
