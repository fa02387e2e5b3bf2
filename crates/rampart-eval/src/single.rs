//! One attack at one or more budgets ε over the first images of a data set, batch by
//! batch (`rampart attack`): per ε, the attack's own result of every batch and the
//! model's logits on its clipped adversarial examples.

use std::time::Instant;

use candle_core::{Device, ModuleT, Tensor};
use rampart_attacks::{Attack, AttackResult, Bounds};
use rampart_data::ImageDataset;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::journal::{fresh_batch, BatchJournal};

/// One ε of one finished batch of [`attack_at_eps`] (its adversarial images, logits
/// and unconstrained outputs are saved as matrices beside it).
#[derive(Serialize, Deserialize)]
struct EpsBatch {
    success: Vec<bool>,
    confidence: Vec<f32>,
    predicted: Vec<u32>,
    norm: Vec<f32>,
    iterations: Vec<usize>,
    eps: f64,
}

impl EpsBatch {
    /// The per-example figures of `r`, without its tensors.
    fn of(r: AttackResult) -> Self {
        Self {
            success: r.success,
            confidence: r.confidence,
            predicted: r.predicted,
            norm: r.norm,
            iterations: r.iterations,
            eps: r.eps,
        }
    }

    /// The attack's result again, with its tensors.
    fn into_result(self, clipped: Tensor, unconstrained: Option<Tensor>) -> AttackResult {
        AttackResult {
            unconstrained,
            clipped,
            success: self.success,
            confidence: self.confidence,
            predicted: self.predicted,
            norm: self.norm,
            iterations: self.iterations,
            eps: self.eps,
        }
    }
}

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
/// the seed `seed + j`, so a shard's batches are the unsharded run's. With a
/// `journal`, every finished batch is saved there and batches already saved are loaded
/// instead of attacked again (see [`BatchJournal`]).
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
    journal: Option<&BatchJournal<'_>>,
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
    let (c, h, w) = data.shape();
    for (b, chunk) in indices.chunks(batch_size).enumerate() {
        let labels: Vec<u32> = chunk.iter().map(|&i| data.labels()[i]).collect();
        out.labels
            .push(Tensor::from_slice(&labels, chunk.len(), device)?);
        let saved = journal.and_then(|j| {
            let (batch, values) = j.load::<Vec<EpsBatch>>(b, 3 * eps.len())?;
            (batch.len() == eps.len()).then_some((batch, values))
        });
        let (batch, values) = match saved {
            Some(s) => s,
            None => {
                let (xs, ys, batch_seed) = fresh_batch(data, chunk, device, seed, journal)?;
                let results = attack
                    .run(model, bounds, &xs, &ys, eps, batch_seed)
                    .map_err(EvalError::attack("attack"))?;
                let mut batch = Vec::with_capacity(eps.len());
                let mut values = Vec::with_capacity(3 * eps.len());
                for r in results {
                    let logits = model.forward_t(&r.clipped, false)?;
                    values.push(r.clipped.flatten_all()?.to_vec1::<f32>()?);
                    values.push(logits.flatten_all()?.to_vec1::<f32>()?);
                    values.push(match &r.unconstrained {
                        Some(u) => u.flatten_all()?.to_vec1::<f32>()?,
                        None => Vec::new(),
                    });
                    batch.push(EpsBatch::of(r));
                }
                if let Some(j) = journal {
                    let parts: Vec<(usize, &[f32])> =
                        values.iter().map(|v| (chunk.len(), v.as_slice())).collect();
                    j.save(b, &batch, &parts)?;
                }
                (batch, values)
            }
        };
        let image = (chunk.len(), c, h, w);
        for (i, (r, v)) in batch.into_iter().zip(values.chunks(3)).enumerate() {
            let k = v[1].len() / chunk.len().max(1);
            out.logits[i].push(Tensor::from_slice(&v[1], (chunk.len(), k), &Device::Cpu)?);
            let unconstrained = if v[2].is_empty() {
                None
            } else {
                Some(Tensor::from_slice(&v[2], image, device)?)
            };
            let clipped = Tensor::from_slice(&v[0], image, device)?;
            out.results[i].push(r.into_result(clipped, unconstrained));
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}
