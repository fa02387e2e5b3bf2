//! Softmax cross-entropy, averaged over the batch, as one op each way: [`cross_entropy`]
//! against class labels (with label smoothing) or soft targets (CCAT's, RegMixup's).
//!
//! For row i with logits x and targets t (t_j = (1 − s)·[j = y] + s/K for a label y
//! smoothed by s), lse = log Σ_j exp(x_j), the loss is mean_i Σ_j t_j·(lse − x_j)
//! and its gradient (g/B)·(softmax(x)_j·Σ_k t_k − t_j). The targets are constants:
//! no gradient flows into them.
//!
//! Built from candle's operations this is log-softmax (six kernels), a gather, a
//! negation and a mean forward, and about twenty kernels backward; here it is one
//! kernel each way on CUDA (source: `ops.cu`; the forward pass is one block that adds
//! the rows' losses in a fixed order, so it is deterministic) and one pass on the CPU
//! (in f64 within a row). [`reference_cross_entropy`] is the candle version, the path
//! for other dtypes and devices and the reference the op is tested against.

use super::common::f32_slice;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

#[cfg(feature = "cuda")]
use super::cuda::{f32_view, uninit};
#[cfg(feature = "cuda")]
use super::launch::cuda::{run, CudaArg};
use super::launch::{KArg, KLaunch, Source};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// What a cross-entropy is taken against.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class labels (B,) u32, smoothed to (1 − s)·one-hot + s/K; s in [0, 1].
    Labels {
        /// The labels.
        labels: &'a Tensor,
        /// The label smoothing s.
        smoothing: f64,
    },
    /// Target weights (B, K), rows usually summing to 1.
    Soft(&'a Tensor),
}

/// The mean softmax cross-entropy of `logits` (B, K) against `targets`: the fused op
/// for f32 logits on the CPU and (feature `cuda`) on CUDA, [`reference_cross_entropy`]
/// otherwise. A label outside 0..K is an error on the CPU; on CUDA, where checking
/// would wait for the device, it makes the loss NaN.
pub fn cross_entropy(logits: &Tensor, targets: Targets<'_>) -> Result<Tensor> {
    apply(logits, targets, false)
}

/// Each row's softmax cross-entropy, (B,), as [`cross_entropy`] without the mean (an
/// attack's per-example objective).
pub fn cross_entropy_rows(logits: &Tensor, targets: Targets<'_>) -> Result<Tensor> {
    apply(logits, targets, true)
}

fn apply(logits: &Tensor, targets: Targets<'_>, per_row: bool) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    if b == 0 || k == 0 {
        candle_core::bail!("cross-entropy of {b} rows of {k} logits")
    }
    let (targets, op) = match targets {
        Targets::Labels { labels, smoothing } => {
            if !(0.0..=1.0).contains(&smoothing) {
                candle_core::bail!("label smoothing must lie in [0, 1], got {smoothing}")
            }
            if labels.dims() != [b] {
                candle_core::bail!("cross-entropy: {:?} labels for {b} rows", labels.dims())
            }
            let op = Xent {
                on: (1.0 - smoothing) as f32,
                off: (smoothing / k as f64) as f32,
                soft: false,
                per_row,
            };
            (labels.to_dtype(DType::U32)?, op)
        }
        Targets::Soft(t) => {
            if t.dims() != [b, k] {
                candle_core::bail!(
                    "cross-entropy: {:?} targets for ({b}, {k}) logits",
                    t.dims()
                )
            }
            let op = Xent {
                on: 1.0,
                off: 0.0,
                soft: true,
                per_row,
            };
            (t.detach().to_dtype(DType::F32)?, op)
        }
    };
    if !native(logits) {
        return reference(logits, &targets, op);
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?.detach(), op)
}

/// Whether the op runs these logits: f32 on the CPU, or on CUDA with the feature.
fn native(logits: &Tensor) -> bool {
    logits.dtype() == DType::F32
        && (logits.device().is_cpu() || (logits.device().is_cuda() && cfg!(feature = "cuda")))
}

/// The same loss from candle's operations (log-softmax, then the targets' weighted
/// sum): the path for other dtypes and devices, and the reference of the tests.
/// With `per_row`, each row's loss (B,) instead of the mean.
pub fn reference_cross_entropy(
    logits: &Tensor,
    targets: Targets<'_>,
    per_row: bool,
) -> Result<Tensor> {
    let k = logits.dim(D::Minus1)?;
    let (targets, on, off, soft) = match targets {
        Targets::Labels { labels, smoothing } => (
            labels.clone(),
            (1.0 - smoothing) as f32,
            (smoothing / k as f64) as f32,
            false,
        ),
        Targets::Soft(t) => (t.detach(), 1.0, 0.0, true),
    };
    let op = Xent {
        on,
        off,
        soft,
        per_row,
    };
    reference(logits, &targets, op)
}

fn reference(logits: &Tensor, targets: &Tensor, op: Xent) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let rows = if op.soft {
        let t = targets.to_dtype(log_p.dtype())?;
        (log_p * t)?.sum(D::Minus1)?.neg()?
    } else {
        let nll = log_p.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        if op.off == 0.0 {
            nll
        } else {
            let uniform = log_p.sum(D::Minus1)?.neg()?;
            ((nll * f64::from(op.on))? + (uniform * f64::from(op.off))?)?
        }
    };
    if op.per_row {
        Ok(rows)
    } else {
        rows.mean_all()
    }
}

/// The fused op: (logits (B, K) f32, targets: labels (B,) u32 or weights (B, K) f32)
/// → the mean loss, shape (), or each row's loss (B,).
#[derive(Clone, Copy, Debug)]
struct Xent {
    /// A label's weight beyond `off` (1 − s), or 1 for soft targets.
    on: f32,
    /// Every class's weight s/K (0 for soft targets).
    off: f32,
    /// The targets are weights (B, K), not labels.
    soft: bool,
    /// Each row's loss, not their mean.
    per_row: bool,
}

/// The CPU operands: the logits' rows and each row's targets.
struct Rows<'a> {
    x: &'a [f32],
    labels: &'a [u32],
    soft: &'a [f32],
    k: usize,
}

impl Xent {
    fn rows<'a>(
        &self,
        s1: &'a CpuStorage,
        l1: &Layout,
        s2: &'a CpuStorage,
        l2: &Layout,
    ) -> Result<Rows<'a>> {
        let x = f32_slice(s1, l1, "cross-entropy")?;
        let (b, k) = l1.shape().dims2()?;
        let mut rows = Rows {
            x,
            labels: &[],
            soft: &[],
            k,
        };
        if self.soft {
            rows.soft = f32_slice(s2, l2, "cross-entropy")?;
            if rows.soft.len() != b * k {
                candle_core::bail!("cross-entropy: {} targets for {b} rows", rows.soft.len())
            }
            return Ok(rows);
        }
        let (CpuStorage::U32(labels), Some((a, e))) = (s2, l2.contiguous_offsets()) else {
            candle_core::bail!("cross-entropy: labels must be contiguous u32")
        };
        rows.labels = &labels[a..e];
        if rows.labels.len() != b {
            candle_core::bail!("cross-entropy: {} labels for {b} rows", rows.labels.len())
        }
        if let Some((i, y)) = rows
            .labels
            .iter()
            .enumerate()
            .find(|(_, &y)| y as usize >= k)
        {
            candle_core::bail!("cross-entropy: label {y} of row {i} is not one of {k} classes")
        }
        Ok(rows)
    }

    /// t_j of row i, as the CUDA kernel computes it.
    #[inline(always)]
    fn target(&self, rows: &Rows<'_>, i: usize, j: usize) -> f32 {
        if self.soft {
            rows.soft[i * rows.k + j]
        } else {
            (if rows.labels[i] as usize == j {
                self.on
            } else {
                0.0
            }) + self.off
        }
    }
}

/// log Σ exp(r_j), in f64.
fn lse(r: &[f32]) -> f64 {
    let m = r.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
    m + r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

impl CustomOp2 for Xent {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = self.rows(s1, l1, s2, l2)?;
        let k = rows.k;
        let b = rows.x.len() / k;
        let losses = rows.x.chunks_exact(k).enumerate().map(|(i, r)| {
            let lse = lse(r);
            r.iter()
                .enumerate()
                .map(|(j, &v)| f64::from(self.target(&rows, i, j)) * (lse - f64::from(v)))
                .sum::<f64>()
        });
        if self.per_row {
            let v: Vec<f32> = losses.map(|l| l as f32).collect();
            return Ok((CpuStorage::F32(v), Shape::from(b)));
        }
        let total: f64 = losses.sum();
        Ok((
            CpuStorage::F32(vec![(total / b as f64) as f32]),
            Shape::from(()),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, k) = l1.shape().dims2()?;
        let x = f32_view(s1, l1, b * k, "cross-entropy: logits")?;
        let dev = &s1.device;
        let (outputs, shape) = match self.per_row {
            false => (1, Shape::from(())),
            true => (b, Shape::from(b)),
        };
        let mut loss = uninit(dev, outputs)?;
        let launch = forward_launch(
            self.per_row,
            CudaArg::Mut(loss.slice_mut(..)),
            CudaArg::View(x),
            target_arg(self, s2, l2, b, k)?,
            self.on,
            self.off,
            b,
            k,
        )?;
        run(dev, launch)?;
        Ok((CudaStorage::wrap_cuda_slice(loss, dev.clone()), shape))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &XentBackward(*self))?;
        Ok((Some(dx), None))
    }
}

/// The backward pass of [`Xent`]: (logits, targets, ∂L/∂loss (shape (), or (B,) per
/// row)) → ∂L/∂logits.
#[derive(Clone, Copy, Debug)]
struct XentBackward(Xent);

impl CustomOp3 for XentBackward {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy-backward"
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
        let op = &self.0;
        let rows = op.rows(s1, l1, s2, l2)?;
        let k = rows.k;
        let b = rows.x.len() / k;
        let g = f32_slice(s3, l3, self.name())?;
        let scale = |i: usize| match (op.per_row, g) {
            (false, [g]) => Ok(f64::from(*g) / b as f64),
            (true, g) if g.len() == b => Ok(f64::from(g[i])),
            _ => Err(candle_core::Error::Msg(format!(
                "{}: a gradient of {} values for {b} rows",
                self.name(),
                g.len()
            ))),
        };
        let mut dx = Vec::with_capacity(rows.x.len());
        for (i, r) in rows.x.chunks_exact(k).enumerate() {
            let scale = scale(i)?;
            let lse = lse(r);
            let total: f64 = (0..k).map(|j| f64::from(op.target(&rows, i, j))).sum();
            dx.extend(r.iter().enumerate().map(|(j, &v)| {
                let p = (f64::from(v) - lse).exp();
                (scale * (p * total - f64::from(op.target(&rows, i, j)))) as f32
            }));
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = &self.0;
        let (b, k) = l1.shape().dims2()?;
        let x = f32_view(s1, l1, b * k, "cross-entropy backward: logits")?;
        let g = f32_view(
            s3,
            l3,
            if op.per_row { b } else { 1 },
            "cross-entropy backward: gradient",
        )?;
        let dev = &s1.device;
        let mut dx = uninit(dev, b * k)?;
        let launch = backward_launch(
            op.per_row,
            CudaArg::Mut(dx.slice_mut(..)),
            CudaArg::View(x),
            target_arg(op, s2, l2, b, k)?,
            CudaArg::View(g),
            op.on,
            op.off,
            b,
            k,
        )?;
        run(dev, launch)?;
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            l1.shape().clone(),
        ))
    }
}

/// The targets operand of the kernels: labels (u32) or soft targets (f32).
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) enum TargetArg<A> {
    Labels(A),
    Soft(A),
}

#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
impl<A> TargetArg<A> {
    /// The kernels' (labels, soft) pair of arguments, the absent one null.
    fn pair(self) -> [KArg<A>; 2] {
        match self {
            TargetArg::Labels(a) => [KArg::B(a), KArg::Null],
            TargetArg::Soft(a) => [KArg::Null, KArg::B(a)],
        }
    }
}

/// The forward launch: the mean loss (`xent_forward`, one block of eight warps) or
/// each row's (`xent_rows`, one warp per row) of the `b`×`k` logits `x` into `loss`,
/// a label weighing `on` beyond every class's `off`. The CUDA op and the tests'
/// emulated kernels are launched through this one definition.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_launch<A>(
    per_row: bool,
    loss: A,
    x: A,
    targets: TargetArg<A>,
    on: f32,
    off: f32,
    b: usize,
    k: usize,
) -> Result<KLaunch<A>> {
    let (rows, classes) = (count(b)?, count(k)?);
    let mut args = vec![KArg::B(loss), KArg::B(x)];
    args.extend(targets.pair());
    args.extend([
        KArg::F32(on),
        KArg::F32(off),
        KArg::U32(rows),
        KArg::U32(classes),
    ]);
    let (kernel, blocks) = match per_row {
        false => ("xent_forward", 1),
        true => ("xent_rows", rows.div_ceil(8) as usize),
    };
    KLaunch::blocks(Source::Ops, kernel, blocks, 256, args)
}

/// The backward launch (`xent_backward`, one warp per row, eight rows per block):
/// `dx` from the logits, the targets and `g`, the gradient of the mean (one value) or
/// of each row's loss (`per_row`, b values).
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_launch<A>(
    per_row: bool,
    dx: A,
    x: A,
    targets: TargetArg<A>,
    g: A,
    on: f32,
    off: f32,
    b: usize,
    k: usize,
) -> Result<KLaunch<A>> {
    let (rows, classes) = (count(b)?, count(k)?);
    let mut args = vec![KArg::B(dx), KArg::B(x)];
    args.extend(targets.pair());
    args.extend([
        KArg::B(g),
        KArg::I32(i32::from(per_row)),
        KArg::F32(on),
        KArg::F32(off),
        KArg::U32(rows),
        KArg::U32(classes),
    ]);
    KLaunch::blocks(
        Source::Ops,
        "xent_backward",
        rows.div_ceil(8) as usize,
        256,
        args,
    )
}

/// `n` as a kernel's `unsigned int`.
fn count(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("cross-entropy: {n} is too many")))
}

/// The `b` labels or `b`·`k` soft targets of `op` on the GPU, checked contiguous.
#[cfg(feature = "cuda")]
fn target_arg<'a>(
    op: &Xent,
    s: &'a CudaStorage,
    l: &Layout,
    b: usize,
    k: usize,
) -> Result<TargetArg<CudaArg<'a>>> {
    if op.soft {
        let v = f32_view(s, l, b * k, "cross-entropy: targets")?;
        return Ok(TargetArg::Soft(CudaArg::View(v)));
    }
    let a = super::cuda::contiguous(l, b, "cross-entropy: labels")?;
    let v = s.as_cuda_slice::<u32>()?.slice(a..a + b);
    Ok(TargetArg::Labels(CudaArg::ViewU32(v)))
}

#[cfg(test)]
mod tests;
