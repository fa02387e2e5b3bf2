//! Synchronised BatchNorm for data-parallel training: in train mode, every BatchNorm
//! layer normalises with the mean and variance of the whole global batch (every
//! worker's rows), and its backward pass reduces the two per-channel gradient sums
//! over the workers too, as PyTorch's `SyncBatchNorm` does. The forward pass then
//! equals that of one process on the global batch, and the workers' averaged
//! parameter gradients equal its gradients (tested in rampart-defenses).
//!
//! The workers' sums come through a [`ChannelSum`], which the training side
//! implements with its collectives. [`SyncScope`] installs one for the calling thread
//! (a worker trains on one thread; candle runs a backward pass on the thread that
//! calls it): while it lives, every train-mode BatchNorm of any model on that thread
//! is synchronised and the fused CPU train path steps aside for the layer-by-layer
//! one.
//!
//! Per layer and step: two reductions forward ([Σx | rows], then Σ(x − mean)²; two
//! passes, so no cancellation) and one backward ([Σdy | Σdy·x̂]), each of C or 2C
//! values, accumulated in f64. The normalisation itself is the eval-mode op
//! ([`BatchNormEval`]: one CPU pass or cuDNN, the ReLU folded in), given the global
//! statistics.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::bn::{bn_dims, BatchNormEval, BatchStats};

/// The element-wise sum over the workers of a one-dimensional f64 tensor, every worker
/// getting the same result (a collective all-reduce).
pub trait ChannelSum: Send + Sync + fmt::Debug {
    /// The sum over the workers of `values` (1-D, f64).
    fn sum(&self, values: &Tensor) -> Result<Tensor>;
}

thread_local! {
    static SCOPE: RefCell<Option<Arc<dyn ChannelSum>>> = const { RefCell::new(None) };
}

/// While alive, train-mode BatchNorm on this thread is synchronised through its
/// [`ChannelSum`]; dropping it restores the one before.
#[derive(Debug)]
#[must_use = "the scope ends when this value is dropped"]
pub struct SyncScope {
    previous: Option<Arc<dyn ChannelSum>>,
}

impl SyncScope {
    /// Synchronises this thread's train-mode BatchNorm layers through `sum`.
    pub fn new(sum: Arc<dyn ChannelSum>) -> Self {
        let previous = SCOPE.with(|s| s.borrow_mut().replace(sum));
        SyncScope { previous }
    }

    /// Whether a scope is alive on this thread (train-mode BatchNorm synchronised).
    pub fn active() -> bool {
        current().is_some()
    }
}

impl Drop for SyncScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SCOPE.with(|s| *s.borrow_mut() = previous);
    }
}

/// The [`ChannelSum`] of this thread's [`SyncScope`], if one is alive.
pub fn current() -> Option<Arc<dyn ChannelSum>> {
    SCOPE.with(|s| s.borrow().clone())
}

/// Per-channel sums (C,) in f64 of the rows of `rows` (N, C).
fn column_sums(rows: &Tensor) -> Result<Tensor> {
    rows.to_dtype(DType::F64)?.sum(0)
}

/// The per-channel standard deviation √(var + eps) (C,) in f64 of the rows (N, C) of
/// every worker together, summed through `sum`: the σ a stochastic student's noise
/// layer measures on the global batch (two passes, as [`train`]).
pub fn global_std(rows: &Tensor, eps: f64, sum: &Arc<dyn ChannelSum>) -> Result<Tensor> {
    match global_moments(rows, sum)? {
        Some((_, _, var)) => (var + eps)?.sqrt(),
        None => candle_core::bail!("synchronised noise scale over no row"),
    }
}

/// The row count, per-channel mean and biased variance (C,), in f64, of the rows
/// (N, C) of every worker together: [Σx | rows] summed through `sum`, then
/// Σ(x − mean)² (two passes, so no cancellation). `None` when no worker has a row
/// (every worker sees the same count).
fn global_moments(
    rows: &Tensor,
    sum: &Arc<dyn ChannelSum>,
) -> Result<Option<(f64, Tensor, Tensor)>> {
    let c = rows.dim(1)?;
    let local_rows = rows.dim(0)? as f64;
    let first = Tensor::cat(
        &[
            column_sums(rows)?,
            Tensor::new(&[local_rows], rows.device())?,
        ],
        0,
    )?;
    let first = sum.sum(&first)?;
    let count = first.narrow(0, c, 1)?.to_vec1::<f64>()?[0];
    if count.is_nan() || count < 0.0 {
        candle_core::bail!("synchronised statistics over {count} rows")
    }
    if count == 0.0 {
        return Ok(None);
    }
    let mean = (first.narrow(0, 0, c)? / count)?;
    let centred = rows.to_dtype(DType::F64)?.broadcast_sub(&mean)?;
    let var = (sum.sum(&centred.sqr()?.sum(0)?)? / count)?;
    Ok(Some((count, mean, var)))
}

/// Train-mode BatchNorm (+ ReLU) of NHWC activations `xs` (…, C) with the statistics
/// of every worker's rows, summed through `sum`. Returns the output and the global
/// statistics (for the running estimates). Needs f32 activations on the CPU, or on
/// CUDA with cuDNN (the eval-mode op's devices); others are refused.
///
/// A worker may bring no row (`xs` empty: its part of a batch has none of the rows
/// this layer normalises, as an OAT model's λ groups may leave it): it still takes
/// part in every sum, forward and backward, so that the other workers' statistics
/// and gradients are those of the rows they have together. When no worker has a row,
/// the layer does nothing (no statistics: `None`, the running estimates untouched),
/// as a single process that never calls it.
pub fn train(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
    sum: &Arc<dyn ChannelSum>,
) -> Result<(Tensor, Option<BatchStats>)> {
    if !super::bn::native(xs, eps) {
        candle_core::bail!(
            "synchronised BatchNorm needs f32 activations on the CPU or on CUDA with cuDNN, \
             got {:?} on {:?}",
            xs.dtype(),
            xs.device().location()
        )
    }
    let dims = bn_dims(xs)?;
    let rows = xs.detach().reshape(((), dims[1]))?;
    let Some((count, mean, var)) = global_moments(&rows, sum)? else {
        // No worker has a row: every worker sees the same count and stops here.
        return Ok((xs.clone(), None));
    };
    let (mean, var) = (mean.to_dtype(DType::F32)?, var.to_dtype(DType::F32)?);
    let op = SyncBatchNorm {
        eval: BatchNormEval {
            dims,
            eps,
            relu,
            mean: mean.clone(),
            var: var.clone(),
        },
        count,
        sum: sum.clone(),
    };
    let y = xs
        .contiguous()?
        .flatten_all()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?
        .reshape(xs.shape())?;
    Ok((y, Some(BatchStats::new(mean, var, count as usize))))
}

/// (x, γ, β) → relu?((x − mean)·γ/√(var + ε) + β) with the global statistics; its
/// backward pass reduces [Σdy | Σdy·x̂] over the workers.
#[derive(Clone)]
struct SyncBatchNorm {
    /// The normalisation with the global mean and variance.
    eval: BatchNormEval,
    /// The global batch's rows (B·H·W over every worker).
    count: f64,
    sum: Arc<dyn ChannelSum>,
}

impl fmt::Debug for SyncBatchNorm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncBatchNorm")
            .field("dims", &self.eval.dims)
            .field("count", &self.count)
            .finish()
    }
}

impl CustomOp3 for SyncBatchNorm {
    fn name(&self) -> &'static str {
        "sync-batch-norm"
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
        if l1.shape().elem_count() == 0 {
            // This worker brings no row: nothing to normalise.
            return Ok((CpuStorage::F32(Vec::new()), l1.shape().clone()));
        }
        self.eval.cpu_fwd(s1, l1, s2, l2, s3, l3)
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
        if l1.shape().elem_count() == 0 {
            // This worker brings no row: nothing to normalise (an empty copy).
            use candle_core::backend::BackendStorage;
            return Ok((s1.try_clone(l1)?, l1.shape().clone()));
        }
        self.eval.cuda_fwd(s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.eval.dims[1];
        let g = if self.eval.relu {
            super::pointwise::relu_mask(grad, res)?
        } else {
            grad.contiguous()?
        };
        let g = g.reshape(((), c))?.to_dtype(DType::F64)?;
        let f64 = |t: &Tensor| t.to_dtype(DType::F64);
        let inv_std = (f64(&self.eval.var)? + self.eval.eps)?.sqrt()?.recip()?;
        let x_hat = f64(&x.reshape(((), c))?)?
            .broadcast_sub(&f64(&self.eval.mean)?)?
            .broadcast_mul(&inv_std)?;
        let sum_dy = g.sum(0)?;
        let sum_dy_xhat = (&g * &x_hat)?.sum(0)?;
        let global = self.sum.sum(&Tensor::cat(&[&sum_dy, &sum_dy_xhat], 0)?)?;
        let mean_dy = (global.narrow(0, 0, c)? / self.count)?;
        let mean_dy_xhat = (global.narrow(0, c, c)? / self.count)?;
        let scale = (f64(gamma)? * &inv_std)?;
        let dx = g
            .broadcast_sub(&mean_dy)?
            .sub(&x_hat.broadcast_mul(&mean_dy_xhat)?)?
            .broadcast_mul(&scale)?
            .to_dtype(x.dtype())?
            .flatten_all()?;
        if !(gamma.track_op() || beta.track_op()) {
            return Ok((Some(dx), None, None));
        }
        let as_param = |t: Tensor| t.to_dtype(gamma.dtype());
        Ok((
            Some(dx),
            Some(as_param(sum_dy_xhat)?),
            Some(as_param(sum_dy)?),
        ))
    }
}

#[cfg(test)]
mod tests;
