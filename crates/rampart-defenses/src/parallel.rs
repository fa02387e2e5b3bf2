//! Data-parallel training: several workers (one process per GPU, or CPU processes)
//! train one model together. Each takes its part of every batch
//! ([`rampart_data::Loader::shard`]), computes the method's loss and gradients on it,
//! and the workers' gradients are averaged before every optimiser step, so that every
//! worker applies the same update and holds the same weights.
//!
//! **Semantics** (those of PyTorch's `DistributedDataParallel`):
//! - `batch_size` is the *global* batch; each of W workers trains on batch/W examples
//!   and the learning rate schedule is the single-process one.
//! - The averaged gradient equals the gradient of the mean loss over the global batch
//!   whenever a model's forward treats examples independently. BatchNorm in training
//!   mode normalises each worker's part with that part's statistics (DDP's default);
//!   the running statistics are worker 0's, broadcast to every worker before each step
//!   (DDP's `broadcast_buffers`).
//!   With `--sync-bn` ([`crate::Trainer::sync_batch_norm`]) every BatchNorm uses the
//!   global batch's statistics instead (PyTorch's `SyncBatchNorm`), and so do a
//!   stochastic student's noise σ and each of an OAT model's dual BatchNorms (a worker
//!   without rows of one λ group takes part in that group's sums with none).
//! - A method's random draws (attack starts, mixup, λ) come from a per-worker stream,
//!   worker 0's being the single-process stream ([`worker_rng`]). A stochastic
//!   student's noise is indexed by the image's row in the global batch
//!   ([`rampart_models::Classifier::set_batch_offset`]): worker r's row j draws the
//!   noise of row r·B/W + j, so no two workers inject the same noise.
//! - Worker 0 evaluates, writes the checkpoint, the history and the model; a
//!   checkpoint resumes on any number of workers.
//!
//! The [`Collective`] moves the numbers: [`TcpGroup`] between CPU processes of one
//! machine, and NCCL between GPUs (`NcclGroup`, feature `nccl`).

mod tcp;

#[cfg(feature = "nccl")]
mod nccl;

use std::fmt;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{DefenseError, Result};

#[cfg(feature = "nccl")]
pub use nccl::NcclGroup;
pub use tcp::TcpGroup;

/// The collective operations data-parallel training needs. Every worker must call
/// the same operations in the same order with tensors of the same shape.
pub trait Collective: Send + Sync + fmt::Debug {
    /// This worker's rank, in `0..workers`, and the number of workers.
    fn place(&self) -> (usize, usize);
    /// This worker's rank, in `0..workers()`.
    fn rank(&self) -> usize {
        self.place().0
    }
    /// The number of workers.
    fn workers(&self) -> usize {
        self.place().1
    }
    /// What carries the numbers (`tcp`, `nccl`), for logs and records.
    fn backend(&self) -> &'static str;
    /// The element-wise sum over the workers of a one-dimensional f32 or f64 tensor,
    /// added in rank order; every worker gets the same result.
    fn all_reduce_sum(&self, values: &Tensor) -> Result<Tensor>;
    /// Worker 0's one-dimensional f32 or f64 tensor on every worker (`values` gives
    /// the length and dtype elsewhere).
    fn broadcast(&self, values: &Tensor) -> Result<Tensor>;
}

/// The stream a method draws from during `epoch` on worker `rank`: worker 0's is
/// [`crate::method_rng`], so one worker trains exactly like a single process.
pub fn worker_rng(seed: u64, epoch: usize, rank: usize) -> ChaCha8Rng {
    let mut rng = crate::trainer::method_rng(seed, epoch);
    if rank > 0 {
        let mut key = rng.get_seed();
        key[24..].copy_from_slice(&(rank as u64).to_le_bytes());
        rng = ChaCha8Rng::from_seed(key);
    }
    rng
}

/// Replaces every gradient of `vars` in `grads` by its mean over the workers, in one
/// collective call (also with one worker, whose mean is its own gradient, bit for bit:
/// the collective path is then exercised as it is with several). A variable without a gradient on some worker (a branch its part
/// of the batch did not reach) counts as a zero gradient there; one without a
/// gradient on every worker stays without one.
pub fn average_gradients(
    collective: &dyn Collective,
    vars: &[(String, Var)],
    grads: &mut GradStore,
) -> Result<()> {
    crate::sgd::check_handed_out(grads)?;
    let workers = collective.workers();
    let mut parts = Vec::with_capacity(vars.len() + 1);
    let mut present = Vec::with_capacity(vars.len());
    let device = match vars.first() {
        Some((_, v)) => v.device().clone(),
        None => return Ok(()),
    };
    for (_, var) in vars {
        let grad = grads.get(var.as_tensor());
        present.push(if grad.is_some() { 1f32 } else { 0.0 });
        parts.push(match grad {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(var.elem_count(), DType::F32, &device)?,
        });
    }
    parts.push(Tensor::new(present.as_slice(), &device)?);
    let summed = collective.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
    let mask = summed
        .narrow(0, summed.dim(0)? - vars.len(), vars.len())?
        .to_vec1::<f32>()?;
    let scale = 1.0 / workers as f64;
    let mut offset = 0;
    for ((_, var), reached) in vars.iter().zip(mask) {
        let n = var.elem_count();
        if reached > 0.0 {
            let mut mean = summed.narrow(0, offset, n)?;
            if workers > 1 {
                mean = mean.affine(scale, 0.0)?;
            }
            let mean = mean.reshape(var.shape())?.to_dtype(var.dtype())?;
            grads.insert(var.as_tensor(), mean);
        }
        offset += n;
    }
    Ok(())
}

/// Sets every variable of `vars` to worker 0's value, in one collective call: the
/// weights at the start, the running statistics before every step.
pub fn broadcast_vars(collective: &dyn Collective, vars: &[(String, Var)]) -> Result<()> {
    if vars.is_empty() {
        return Ok(());
    }
    let parts = vars
        .iter()
        .map(|(_, v)| v.as_tensor().to_dtype(DType::F32)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let rooted = collective.broadcast(&Tensor::cat(&parts, 0)?)?;
    let mut offset = 0;
    for (_, var) in vars {
        let n = var.elem_count();
        let value = rooted
            .narrow(0, offset, n)?
            .reshape(var.shape())?
            .to_dtype(var.dtype())?;
        var.set(&value)?;
        offset += n;
    }
    Ok(())
}

/// The sum over the workers of a few host numbers (loss sums, counts), in f64.
pub fn sum_scalars(
    collective: &dyn Collective,
    values: &[f64],
    on: &candle_core::Device,
) -> Result<Vec<f64>> {
    Ok(collective
        .all_reduce_sum(&Tensor::new(values, on)?)?
        .to_vec1::<f64>()?)
}

/// A [`Collective`] as the per-channel sum of synchronised BatchNorm
/// ([`rampart_models::ChannelSum`]).
#[derive(Debug)]
pub struct CollectiveSum(pub Arc<dyn Collective>);

impl rampart_models::ChannelSum for CollectiveSum {
    fn sum(&self, values: &Tensor) -> candle_core::Result<Tensor> {
        self.0
            .all_reduce_sum(values)
            .map_err(|e| candle_core::Error::Msg(format!("synchronised BatchNorm: {e}")))
    }
}

/// Refuses a method that learns state from its batches without summing what it
/// learns over the workers ([`crate::TrainingMethod::synchronises_state`]): each worker
/// would learn it from its own part, and the workers' states would drift apart.
pub(crate) fn check_method(
    collective: &dyn Collective,
    method: &dyn crate::TrainingMethod,
) -> Result<()> {
    if collective.workers() > 1 && method.state().is_some() && !method.synchronises_state() {
        return Err(DefenseError::Config(format!(
            "--method {} learns a state from every batch without synchronising it over \
             data-parallel workers; train it with one worker",
            method.name()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
