//! One attack at one or more budgets ε over the first images of a data set, batch by
//! batch (`rampart attack`): per ε, the attack's own result of every batch and the
//! model's logits on its clipped adversarial examples.

use std::time::Instant;

use candle_core::{Device, ModuleT, Tensor};
use rampart_attacks::{Attack, AttackResult, Bounds};
use rampart_data::ImageDataset;

use crate::error::{EvalError, Result};

/// What [`attack_at_eps`] returns.
#[derive(Clone, Debug)]
pub struct EpsResults {
    /// The budgets, in the order given.
    pub eps: Vec<f64>,
    /// Per ε: the attack's result of every batch, in order.
    pub results: Vec<Vec<AttackResult>>,
    /// Per ε: logits (batch, K) on the CPU of the clipped examples of every batch.
    pub logits: Vec<Vec<Tensor>>,
    /// Labels (batch,) of every batch, on the attack's device.
    pub labels: Vec<Tensor>,
    /// Wall time of the attack and the forward passes.
    pub seconds: f64,
}

impl EpsResults {
    /// Per example at ε number `i`: the attack's criterion holds.
    pub fn success(&self, i: usize) -> Vec<bool> {
        self.results[i]
            .iter()
            .flat_map(|r| r.success.iter().copied())
            .collect()
    }

    /// Per example at ε number `i`: the adversarial example's distance to the clean
    /// input in the attack's norm.
    pub fn norms(&self, i: usize) -> Vec<f32> {
        self.results[i]
            .iter()
            .flat_map(|r| r.norm.iter().copied())
            .collect()
    }

    /// The clipped adversarial examples at ε number `i`, (n, …) on the CPU.
    pub fn adversarial(&self, i: usize) -> Result<Tensor> {
        let parts: Vec<Tensor> = self.results[i].iter().map(|r| r.clipped.clone()).collect();
        Ok(Tensor::cat(&parts, 0)?.to_device(&Device::Cpu)?)
    }

    /// Their logits, (n, K) on the CPU.
    pub fn logits(&self, i: usize) -> Result<Tensor> {
        Ok(Tensor::cat(&self.logits[i], 0)?)
    }

    /// The labels of the attacked images, (n,) on the CPU.
    pub fn labels(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&self.labels, 0)?.to_device(&Device::Cpu)?)
    }
}

/// Runs `attack` at every budget of `eps` on the images `rows` of `data` in batches of
/// `batch_size` counted from `rows.start` (all of them: `0..n`; a shard's rows start on
/// a batch boundary, see [`crate::Shard::rows`]); the batch starting at image j uses
/// the seed `seed + j`, so a shard's batches are the unsharded run's.
#[allow(clippy::too_many_arguments)]
pub fn attack_at_eps(
    model: &dyn ModuleT,
    bounds: Bounds,
    data: &ImageDataset,
    rows: std::ops::Range<usize>,
    attack: &dyn Attack,
    eps: &[f64],
    batch_size: usize,
    seed: u64,
    device: &Device,
) -> Result<EpsResults> {
    if batch_size == 0 {
        return Err(EvalError::Config("batch size must be at least 1".into()));
    }
    let rows = rows.start.min(data.len())..rows.end.min(data.len());
    let started = Instant::now();
    let mut out = EpsResults {
        eps: eps.to_vec(),
        results: vec![Vec::new(); eps.len()],
        logits: vec![Vec::new(); eps.len()],
        labels: Vec::new(),
        seconds: 0.0,
    };
    let indices: Vec<usize> = rows.collect();
    for chunk in indices.chunks(batch_size) {
        crate::error::check_interrupt()?;
        let (xs, ys) = data.batch_tensors(chunk, device)?;
        out.labels.push(ys.clone());
        let batch_seed = seed.wrapping_add(chunk[0] as u64);
        let results = attack
            .run(model, bounds, &xs, &ys, eps, batch_seed)
            .map_err(EvalError::attack("attack"))?;
        for (i, r) in results.into_iter().enumerate() {
            let logits = model.forward_t(&r.clipped, false)?;
            out.logits[i].push(logits.to_device(&Device::Cpu)?);
            out.results[i].push(r);
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}
