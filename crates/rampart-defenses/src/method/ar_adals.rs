//! AR-AdaLS (Qin et al., NeurIPS 2021): label smoothing whose amount adapts per group
//! of training examples ranked by adversarial robustness, to improve calibration.
//!
//! Simplification of the paper: the groups are computed on the fly for every batch
//! from a three-level FGSM probe with the current model, and the smoothing of each
//! group follows a running calibration gap measured on the training batches, instead
//! of the paper's grouping by a PGD robustness radius and its validation-set updates.
//! In data-parallel training the gaps are those of the global batch: the workers add
//! their per-group sums before the update, so every worker holds the same state.
//!
//! In one process the state lives on the model's device and each step updates it
//! there (the groups, the targets, the calibration sums and the update are device
//! operations): a step reads nothing back, so on a GPU the host never waits for it,
//! and the state is read only when a checkpoint saves it. The host's arithmetic in
//! its order, so the same state and loss as the host's rule on the CPU, bit for bit
//! (tested). Data-parallel workers add their sums on the host, as before.

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, ModuleT, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::overrides::{MethodSettings, Overrides, Setting};
use super::{
    check_eps, labels_vec, soft_cross_entropy, to_json, BatchLoss, TrainBatch, TrainingMethod,
};
use crate::error::{DefenseError, Result};

/// Number of robustness groups: 0 = broken at ε/4 (or misclassified clean), 1 =
/// broken first at ε/2, 2 = broken first at ε, 3 = not broken at ε.
pub const ADALS_GROUPS: usize = 4;

/// Settings of [`ArAdaLs`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArAdaLsConfig {
    /// Largest budget ε of the L∞ FGSM probe; it also probes at ε/4 and ε/2.
    pub eps: f64,
    /// Smoothing of every group before training, in [0, `max_smoothing`].
    pub initial_smoothing: f64,
    /// Upper clip of the smoothing, in [0, 1).
    pub max_smoothing: f64,
    /// Adaptation rate η > 0: s_g ← clip(s_g + η·gap_g, 0, `max_smoothing`).
    pub rate: f64,
    /// Momentum m ∈ [0, 1) of the running gap: gap_g ← m·gap_g + (1 − m)·batch gap.
    pub momentum: f64,
}

impl ArAdaLsConfig {
    /// The CIFAR-10 setting: probe at 8/255 (and 2/255, 4/255), initial smoothing 0.1,
    /// clip 0.5, η = 0.1, momentum 0.9.
    pub fn qin_cifar10() -> Self {
        Self {
            eps: 8.0 / 255.0,
            initial_smoothing: 0.1,
            max_smoothing: 0.5,
            rate: 0.1,
            momentum: 0.9,
        }
    }

    /// Refuses settings that cannot be run.
    pub fn validate(&self) -> Result<()> {
        check_eps(self.eps)?;
        let bad =
            |what: &str, v: f64| Err(DefenseError::Config(format!("AR-AdaLS {what}, got {v}")));
        if !(0.0..1.0).contains(&self.max_smoothing) {
            return bad("maximal smoothing must lie in [0, 1)", self.max_smoothing);
        }
        if !(0.0..=self.max_smoothing).contains(&self.initial_smoothing) {
            return bad(
                &format!("initial smoothing must lie in [0, {}]", self.max_smoothing),
                self.initial_smoothing,
            );
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return bad("adaptation rate must be finite and > 0", self.rate);
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum must lie in [0, 1)", self.momentum);
        }
        Ok(())
    }
}

/// What AR-AdaLS learns during training, saved in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaLsState {
    /// Current smoothing s_g of each group.
    pub smoothing: [f64; ADALS_GROUPS],
    /// Running calibration gap (mean confidence − accuracy) of each group.
    pub gap: [f64; ADALS_GROUPS],
    /// Training examples seen in each group so far.
    pub examples: [u64; ADALS_GROUPS],
}

impl AdaLsState {
    /// Every group at the initial smoothing, gaps 0.
    pub fn new(config: &ArAdaLsConfig) -> Self {
        Self {
            smoothing: [config.initial_smoothing; ADALS_GROUPS],
            gap: [0.0; ADALS_GROUPS],
            examples: [0; ADALS_GROUPS],
        }
    }

    /// One batch's update. For each group present in the batch (`stats[g]` = its
    /// number of examples and batch gap): gap_g ← m·gap_g + (1 − m)·batch gap, then
    /// s_g ← clip(s_g + η·gap_g, 0, max). Groups absent from the batch keep their
    /// values.
    pub fn update(&mut self, config: &ArAdaLsConfig, stats: &[Option<(u64, f64)>; ADALS_GROUPS]) {
        for (g, stat) in stats.iter().enumerate() {
            let Some((n, batch_gap)) = *stat else {
                continue;
            };
            self.examples[g] += n;
            self.gap[g] = config.momentum * self.gap[g] + (1.0 - config.momentum) * batch_gap;
            self.smoothing[g] =
                (self.smoothing[g] + config.rate * self.gap[g]).clamp(0.0, config.max_smoothing);
        }
    }

    fn validate(&self, config: &ArAdaLsConfig) -> Result<()> {
        let ok = self
            .smoothing
            .iter()
            .all(|s| (0.0..=config.max_smoothing).contains(s))
            && self.gap.iter().all(|g| g.is_finite() && g.abs() <= 1.0);
        if !ok {
            return Err(DefenseError::Config(format!(
                "AR-AdaLS state out of range: smoothing {:?}, gaps {:?}",
                self.smoothing, self.gap
            )));
        }
        Ok(())
    }
}

/// AR-AdaLS: cross-entropy on the clean batch (train mode) against per-example
/// smoothed targets (1 − s_g)·onehot(y) + s_g·uniform, g the example's robustness
/// group ([`robustness_groups`]). After each batch, each group's calibration gap
/// (mean max-softmax confidence − accuracy of the batch's train-mode predictions on
/// its examples) updates its smoothing ([`AdaLsState::update`]): over-confident
/// groups get more smoothing, under-confident ones less.
///
/// The state sits behind a mutex because [`TrainingMethod::loss`] takes `&self`; it is
/// saved in every checkpoint ([`TrainingMethod::state`]) and restored on resume, so a
/// resumed run repeats the uninterrupted one exactly. One value belongs to one run.
#[derive(Debug)]
pub struct ArAdaLs {
    config: ArAdaLsConfig,
    state: Mutex<AdaLsState>,
    /// The state on the device while a single process trains: then the truth, and
    /// `state` is refreshed from it when read.
    on_device: Mutex<Option<DeviceState>>,
}

/// [`AdaLsState`] as three f64 tensors (4,) on the device, updated in place.
#[derive(Debug)]
struct DeviceState {
    smoothing: Tensor,
    gap: Tensor,
    examples: Tensor,
}

impl DeviceState {
    fn new(state: &AdaLsState, device: &candle_core::Device) -> Result<Self> {
        let examples: Vec<f64> = state.examples.iter().map(|&n| n as f64).collect();
        Ok(Self {
            smoothing: Tensor::new(&state.smoothing, device)?,
            gap: Tensor::new(&state.gap, device)?,
            examples: Tensor::new(examples.as_slice(), device)?,
        })
    }

    /// The state read back.
    fn read(&self) -> Result<AdaLsState> {
        let four = |t: &Tensor| -> Result<[f64; ADALS_GROUPS]> {
            let v = t.to_vec1::<f64>()?;
            v.try_into()
                .map_err(|_| DefenseError::Config("AR-AdaLS state of another size".into()))
        };
        Ok(AdaLsState {
            smoothing: four(&self.smoothing)?,
            gap: four(&self.gap)?,
            examples: four(&self.examples)?.map(|n| n as u64),
        })
    }

    /// [`AdaLsState::update`] on the device from a batch's per-group example counts
    /// `n` and sums of confidence − correctness `sum` (4,) f64: the same operations in
    /// the same order, each group absent from the batch (n = 0) kept.
    fn update(&self, config: &ArAdaLsConfig, n: &Tensor, sum: &Tensor) -> Result<()> {
        let present = n.broadcast_gt(&super::constants::scalar(0.0, DType::F64, n.device())?)?;
        let batch_gap = sum.div(n)?;
        let gap = (self.gap.affine(config.momentum, 0.0)?
            + batch_gap.affine(1.0 - config.momentum, 0.0)?)?;
        let smoothing = super::constants::clamp(
            &(&self.smoothing + gap.affine(config.rate, 0.0)?)?,
            0.0,
            config.max_smoothing,
        )?;
        let examples = (&self.examples + n)?;
        for (kept, new) in [
            (&self.gap, gap),
            (&self.smoothing, smoothing),
            (&self.examples, examples),
        ] {
            kept.slice_set(&present.where_cond(&new, kept)?, 0, 0)?;
        }
        Ok(())
    }
}

impl ArAdaLs {
    /// Checks the settings; every group starts at the initial smoothing.
    pub fn new(config: ArAdaLsConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            state: Mutex::new(AdaLsState::new(&config)),
            on_device: Mutex::new(None),
        })
    }

    /// The settings.
    pub fn config(&self) -> ArAdaLsConfig {
        self.config
    }

    /// A copy of the current state (read from the device where it is kept there).
    pub fn snapshot(&self) -> Result<AdaLsState> {
        Ok(self.settled()?.clone())
    }

    fn lock(&self) -> MutexGuard<'_, AdaLsState> {
        // The state is plain numbers, valid whatever a panicking holder left behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_device(&self) -> MutexGuard<'_, Option<DeviceState>> {
        self.on_device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host's state, brought up to date from the device's where it is kept there.
    fn settled(&self) -> Result<MutexGuard<'_, AdaLsState>> {
        let on_device = self.lock_device();
        let mut state = self.lock();
        if let Some(d) = on_device.as_ref() {
            *state = d.read()?;
        }
        Ok(state)
    }

    /// One step on the device (a single process): the groups, the targets from the
    /// state there, the loss, and the state's update, nothing read back.
    fn loss_on_device(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let (model, images, labels) = (batch.model, batch.images, batch.labels);
        let device = images.device();
        let mut on_device = self.lock_device();
        if !on_device
            .as_ref()
            .is_some_and(|d| d.smoothing.device().same_device(device))
        {
            // First step here: the host's state (which a state kept on another device
            // brings up to date first) goes to the device.
            let host = match on_device.as_ref() {
                Some(d) => d.read()?,
                None => self.lock().clone(),
            };
            *on_device = Some(DeviceState::new(&host, device)?);
        }
        let state = on_device
            .as_ref()
            .ok_or_else(|| DefenseError::Config("AR-AdaLS state missing".into()))?;
        let groups = robustness_groups_on_device(
            &model.frozen(),
            model.bounds(),
            images,
            labels,
            self.config.eps,
        )?;
        let k = model.spec().num_classes;
        let targets = adals_targets_on_device(labels, &groups, &state.smoothing, k)?;
        let logits = model.forward_t(images, true)?;
        let loss = soft_cross_entropy(&logits, &targets)?;
        let (n, sum) = calibration_sums_on_device(&logits, labels, &groups)?;
        state.update(&self.config, &n, &sum)?;
        Ok(BatchLoss::of_batch(loss, logits, labels))
    }

    /// One step with the state on the host: data-parallel workers add their
    /// calibration sums ([`TrainBatch::sum_over_workers`]) before the update.
    fn loss_on_host(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        // A state kept on the device so far comes back first.
        if let Some(d) = self.lock_device().take() {
            *self.lock() = d.read()?;
        }
        let (model, images, labels) = (batch.model, batch.images, batch.labels);
        let groups = robustness_groups(
            &model.frozen(),
            model.bounds(),
            images,
            labels,
            self.config.eps,
        )?;
        let smoothing = self.lock().smoothing;
        let k = model.spec().num_classes;
        let targets =
            batch.targets(adals_targets(&batch.host_labels()?, &groups, &smoothing, k))?;
        let logits = model.forward_t(images, true)?;
        let loss = soft_cross_entropy(&logits, &targets)?;
        // Summed over data-parallel workers, so that every worker learns the state of
        // the global batch.
        let sums = batch.sum_over_workers(&calibration_sums(&logits, labels, &groups)?)?;
        self.lock().update(&self.config, &gaps_of_sums(&sums));
        Ok(BatchLoss::of_batch(loss, logits, labels))
    }
}

/// The group of one example from its correctness clean and at the probe budgets
/// ε/4, ε/2 and ε: the index of the first budget that breaks it (0 when it is
/// already misclassified clean), 3 when none does.
pub fn robustness_group(clean_correct: bool, correct_at: [bool; 3]) -> usize {
    if !clean_correct {
        return 0;
    }
    correct_at.iter().position(|c| !c).unwrap_or(3)
}

/// The logits (B, K) of the clean batch and (3B, K) of its three probes, the model in
/// eval mode: one FGSM direction sign(∇_x CE(f(x), y)), then clip(x + t·direction, lo,
/// hi) for t ∈ {ε/4, ε/2, ε} (the bounds kept on the device).
fn probe<M: ModuleT>(
    model: &M,
    bounds: (f32, f32),
    images: &Tensor,
    labels: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    check_eps(eps)?;
    let (lo, hi) = (f64::from(bounds.0), f64::from(bounds.1));
    let x = images.detach();
    let var = Var::from_tensor(&x)?;
    let logits = model.forward_t(var.as_tensor(), false)?;
    let loss = super::normal::cross_entropy(&logits, labels, 0.0)?;
    let grads = loss.backward()?;
    let direction = match grads.get(var.as_tensor()) {
        Some(g) => g.sign()?,
        None => x.zeros_like()?,
    };
    let probes = [eps / 4.0, eps / 2.0, eps]
        .iter()
        .map(|&t| super::constants::clamp(&(&x + (&direction * t)?)?, lo, hi))
        .collect::<Result<Vec<Tensor>>>()?;
    let probe_logits = model.forward_t(&Tensor::cat(&probes, 0)?, false)?;
    Ok((logits, probe_logits))
}

/// Robustness groups of a batch: one FGSM direction sign(∇_x CE(f(x), y)) with the
/// model in eval mode (pass a frozen view, `Classifier::frozen`, for input gradients
/// only), then eval-mode predictions at
/// clip(x + t·direction, lo, hi) for t ∈ {ε/4, ε/2, ε}, grouped by
/// [`robustness_group`]. images: (B, C, H, W) within `bounds`; labels: (B,) u32.
pub fn robustness_groups<M: ModuleT>(
    model: &M,
    bounds: (f32, f32),
    images: &Tensor,
    labels: &Tensor,
    eps: f64,
) -> Result<Vec<usize>> {
    let b = images.dim(0)?;
    let (logits, probe_logits) = probe(model, bounds, images, labels, eps)?;
    let ys = labels_vec(labels)?;
    let clean = labels_vec(&logits.argmax(D::Minus1)?)?;
    let probed = labels_vec(&probe_logits.argmax(D::Minus1)?)?;
    Ok((0..b)
        .map(|i| {
            let at = |level: usize| probed[level * b + i] == ys[i];
            robustness_group(clean[i] == ys[i], [at(0), at(1), at(2)])
        })
        .collect())
}

/// [`robustness_groups`] on the device: the groups (B,) u32, the same probes and
/// predictions, nothing read back. The group is c₀·p₁·(1 + p₂·(1 + p₃)) for the
/// correctness c₀ clean and p₁, p₂, p₃ at ε/4, ε/2, ε (each 0 or 1), which is
/// [`robustness_group`].
pub fn robustness_groups_on_device<M: ModuleT>(
    model: &M,
    bounds: (f32, f32),
    images: &Tensor,
    labels: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let b = images.dim(0)?;
    let (logits, probe_logits) = probe(model, bounds, images, labels, eps)?;
    let ys = labels.to_dtype(DType::U32)?;
    let correct = |logits: &Tensor| -> Result<Tensor> {
        Ok(logits.argmax(D::Minus1)?.eq(&ys)?.to_dtype(DType::F64)?)
    };
    let clean = correct(&logits)?;
    let predicted = probe_logits.argmax(D::Minus1)?;
    let at = |level: usize| -> Result<Tensor> {
        Ok(predicted
            .narrow(0, level * b, b)?
            .eq(&ys)?
            .to_dtype(DType::F64)?)
    };
    let inner = (at(2)?.affine(1.0, 1.0)? * at(1)?)?.affine(1.0, 1.0)?;
    let group = ((clean * at(0)?)? * inner)?;
    Ok(group.to_dtype(DType::U32)?)
}

/// [`adals_targets`] on the device from the labels (B,), the groups (B,) u32 and the
/// smoothing (4,) f64 there: (B, K) f32, bit for bit the host's (the same f64
/// operations, a division by K).
pub fn adals_targets_on_device(
    labels: &Tensor,
    groups: &Tensor,
    smoothing: &Tensor,
    classes: usize,
) -> Result<Tensor> {
    let b = labels.dim(0)?;
    let s = smoothing.index_select(groups, 0)?.reshape((b, 1))?;
    let hot = labels
        .to_dtype(DType::U32)?
        .reshape((b, 1))?
        .broadcast_eq(&super::constants::class_row(classes, labels.device())?)?
        .to_dtype(DType::F64)?
        // (1 − s) where the label is, 0 elsewhere; s·(−1) + 1 is 1 − s rounded once.
        .broadcast_mul(&s.affine(-1.0, 1.0)?)?;
    let uniform = s.div(&super::constants::column(
        classes as f64,
        b,
        labels.device(),
    )?)?;
    Ok(hot.broadcast_add(&uniform)?.to_dtype(DType::F32)?)
}

/// [`calibration_sums`] on the device: per group (4,) f64, the number of examples and
/// the sum of their max-softmax confidence − correctness, each added in the batch's
/// order (the other groups' examples add zeros).
fn calibration_sums_on_device(
    logits: &Tensor,
    labels: &Tensor,
    groups: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let b = labels.dim(0)?;
    let probs = candle_nn::ops::softmax(&logits.detach().to_dtype(DType::F32)?, D::Minus1)?;
    let confidence = probs.max(D::Minus1)?.to_dtype(DType::F64)?;
    let correct = probs
        .argmax(D::Minus1)?
        .eq(&labels.to_dtype(DType::U32)?)?
        .to_dtype(DType::F64)?;
    let gap = (confidence - correct)?.reshape((b, 1))?;
    let member = groups
        .reshape((b, 1))?
        .broadcast_eq(&super::constants::class_row(ADALS_GROUPS, groups.device())?)?
        .to_dtype(DType::F64)?;
    let n = member.sum(0)?;
    let sum = member.broadcast_mul(&gap)?.sum(0)?;
    Ok((n, sum))
}

/// Per group: (number of examples, mean max-softmax confidence − accuracy) of the
/// predictions `logits` (B, K) for the examples of that group; `None` for a group
/// absent from the batch.
pub fn calibration_gaps(
    logits: &Tensor,
    labels: &Tensor,
    groups: &[usize],
) -> Result<[Option<(u64, f64)>; ADALS_GROUPS]> {
    Ok(gaps_of_sums(&calibration_sums(logits, labels, groups)?))
}

/// Per group, the number of examples and the sum of their max-softmax confidence −
/// correctness, flattened as [n₀, sum₀, n₁, sum₁, …] so that data-parallel workers can
/// add theirs ([`TrainBatch::sum_over_workers`]).
fn calibration_sums(logits: &Tensor, labels: &Tensor, groups: &[usize]) -> Result<Vec<f64>> {
    let probs = candle_nn::ops::softmax(&logits.detach().to_dtype(DType::F32)?, D::Minus1)?;
    let confidence = probs.max(D::Minus1)?.to_vec1::<f32>()?;
    let predicted = labels_vec(&probs.argmax(D::Minus1)?)?;
    let ys = labels_vec(labels)?;
    let mut sums = vec![0.0f64; 2 * ADALS_GROUPS];
    for (i, &g) in groups.iter().enumerate() {
        if g >= ADALS_GROUPS {
            return Err(DefenseError::Config(format!(
                "robustness group {g} out of range"
            )));
        }
        let correct = if predicted[i] == ys[i] { 1.0 } else { 0.0 };
        sums[2 * g] += 1.0;
        sums[2 * g + 1] += f64::from(confidence[i]) - correct;
    }
    Ok(sums)
}

/// The groups' (examples, mean gap) from [`calibration_sums`]' values.
fn gaps_of_sums(sums: &[f64]) -> [Option<(u64, f64)>; ADALS_GROUPS] {
    std::array::from_fn(|g| {
        let (n, sum) = (sums[2 * g], sums[2 * g + 1]);
        (n > 0.0).then(|| (n as u64, sum / n))
    })
}

/// Soft targets (1 − s_g)·onehot(y_i) + s_g/K, g = group of example i, row-major (B·K).
pub fn adals_targets(
    labels: &[u32],
    groups: &[usize],
    smoothing: &[f64; ADALS_GROUPS],
    classes: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(labels.len() * classes);
    for (&y, &g) in labels.iter().zip(groups) {
        let s = smoothing[g.min(ADALS_GROUPS - 1)];
        out.extend((0..classes).map(|k| {
            let hot = if k == y as usize { 1.0 - s } else { 0.0 };
            (hot + s / classes as f64) as f32
        }));
    }
    out
}

impl MethodSettings for ArAdaLsConfig {
    const NAME: &'static str = "ar-adals";
    const ACCEPTS: &'static [Setting] = &[Setting::LabelSmoothing, Setting::Eps];

    /// [`ArAdaLsConfig::qin_cifar10`].
    fn defaults() -> Self {
        Self::qin_cifar10()
    }

    fn with_overrides(self, values: &Overrides) -> Result<Self> {
        let config = Self {
            eps: values.eps.unwrap_or(self.eps),
            initial_smoothing: values.label_smoothing.unwrap_or(self.initial_smoothing),
            ..self
        };
        config.validate()?;
        Ok(config)
    }
}

impl TrainingMethod for ArAdaLs {
    fn name(&self) -> &'static str {
        ArAdaLsConfig::NAME
    }

    fn settings(&self) -> serde_json::Value {
        to_json(&self.config)
    }

    fn state(&self) -> Option<serde_json::Value> {
        // Read from the device where it is kept there; a failed read (a device error,
        // which the next step would meet too) leaves the host's last copy.
        let state = match self.settled() {
            Ok(s) => s.clone(),
            Err(e) => {
                tracing::warn!("AR-AdaLS: cannot read the state from the device: {e}");
                self.lock().clone()
            }
        };
        Some(to_json(&state))
    }

    /// The probe (one input gradient, then the three budgets' predictions), then one
    /// train-mode pass.
    fn step_cost(&self, _spec: &rampart_models::ModelSpec) -> super::StepCost {
        super::StepCost {
            train: 1.0,
            attack: rampart_attacks::Passes {
                gradient: 1.0,
                forward: 3.0,
            },
        }
    }

    /// The calibration sums go through [`TrainBatch::sum_over_workers`].
    fn synchronises_state(&self) -> bool {
        true
    }

    /// Nothing from the RNG, and in one process nothing read back: the state's
    /// buffers on the device are updated in place, so a CUDA graph of the step can be
    /// replayed.
    fn step_draws(&self) -> super::StepDraws {
        super::StepDraws::Nothing
    }

    fn restore_state(&self, state: &serde_json::Value) -> Result<()> {
        let restored: AdaLsState = serde_json::from_value(state.clone())
            .map_err(|e| DefenseError::Config(format!("unreadable AR-AdaLS state: {e}")))?;
        restored.validate(&self.config)?;
        // The device's copy goes: the next step takes the restored state there.
        *self.lock_device() = None;
        *self.lock() = restored;
        Ok(())
    }

    fn loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        if batch.workers.is_some_and(|w| w.workers() > 1) {
            self.loss_on_host(batch)
        } else {
            self.loss_on_device(batch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::testutil::{rows, smoothed_nll, tiny_problem};
    use crate::method::TrainingMethod;
    use crate::TestResult;
    use candle_core::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Two classes, logits (0, Σ_d x_d − 2) of a 4-value input: the margin of an
    /// example at x = 0.5 + t (every value) is 4|t|, and an L∞ step of size r along
    /// the FGSM direction lowers it by 4r.
    struct Linear;

    impl ModuleT for Linear {
        fn forward_t(&self, xs: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
            let score = (xs.flatten_from(1)?.sum_keepdim(1)? - 2.0)?;
            Tensor::cat(&[&score.zeros_like()?, &score], 1)
        }
    }

    #[test]
    fn group_rule() {
        assert_eq!(robustness_group(false, [true, true, true]), 0);
        assert_eq!(robustness_group(true, [false, false, false]), 0);
        assert_eq!(robustness_group(true, [true, false, false]), 1);
        assert_eq!(robustness_group(true, [true, true, false]), 2);
        assert_eq!(robustness_group(true, [true, true, true]), 3);
    }

    /// With ε = 0.4 (probes at 0.1, 0.2, 0.4) an example with margin 4|t| breaks at the
    /// first probe r ≥ |t|.
    #[test]
    fn groups_follow_the_probe_budgets() -> TestResult {
        // (t, label, expected group): t > 0 favours class 1.
        let cases = [
            (0.05f32, 1u32, 0usize),
            (0.15, 1, 1),
            (0.3, 1, 2),
            (0.45, 1, 3),
            (-0.1, 1, 0), // misclassified clean
            (-0.15, 0, 1),
            (-0.45, 0, 3),
            (0.3, 0, 0), // misclassified clean
        ];
        let pixels: Vec<f32> = cases.iter().flat_map(|(t, _, _)| [0.5 + t; 4]).collect();
        let images = Tensor::from_vec(pixels, (cases.len(), 1, 2, 2), &Device::Cpu)?;
        let labels = Tensor::new(cases.map(|c| c.1).as_slice(), &Device::Cpu)?;
        let groups = robustness_groups(&Linear, (0.0, 1.0), &images, &labels, 0.4)?;
        assert_eq!(groups, cases.map(|c| c.2));
        // ε = 0: only the clean prediction counts.
        let groups = robustness_groups(&Linear, (0.0, 1.0), &images, &labels, 0.0)?;
        assert_eq!(groups, [3, 3, 3, 3, 0, 3, 3, 0]);
        // The bounds clip the probe: with bounds (0.7, 1) no input can be pushed below
        // 0.7, where class 1 still wins by 0.8, so the first four examples (inputs
        // clipped to ≥ 0.7) all stay correct although unclipped steps would break them.
        let inside = images.narrow(0, 0, 4)?.clamp(0.7, 1.0)?;
        let groups =
            robustness_groups(&Linear, (0.7, 1.0), &inside, &labels.narrow(0, 0, 4)?, 0.4)?;
        assert_eq!(groups, [3, 3, 3, 3]);
        Ok(())
    }

    #[test]
    fn smoothing_follows_the_calibration_gap_and_is_clipped() {
        let config = ArAdaLsConfig::qin_cifar10();
        let mut state = AdaLsState::new(&config);
        // Group 0 over-confident (+0.5), group 1 under-confident (−0.4), group 2
        // calibrated, group 3 absent.
        let stats = [Some((8, 0.5)), Some((4, -0.4)), Some((2, 0.0)), None];
        state.update(&config, &stats);
        // gap = 0.1·batch gap; s = 0.1 + 0.1·gap.
        assert!((state.gap[0] - 0.05).abs() < 1e-12);
        assert!((state.smoothing[0] - 0.105).abs() < 1e-12);
        assert!((state.smoothing[1] - 0.096).abs() < 1e-12);
        assert_eq!(state.smoothing[2], 0.1);
        assert_eq!(
            (state.smoothing[3], state.gap[3], state.examples[3]),
            (0.1, 0.0, 0)
        );
        assert_eq!(state.examples[..3], [8, 4, 2]);
        // Persistently: up to the clip 0.5, down to 0.
        for _ in 0..2000 {
            state.update(&config, &stats);
        }
        assert_eq!(state.smoothing[0], 0.5);
        assert_eq!(state.smoothing[1], 0.0);
        assert_eq!(state.smoothing[2], 0.1);
        // The running gap moves with the momentum: one opposite batch does not undo it.
        let before = state.gap[0];
        state.update(&config, &[Some((1, -0.5)), None, None, None]);
        assert!((state.gap[0] - (0.9 * before - 0.05)).abs() < 1e-12);
        assert_eq!(state.smoothing[0], 0.5);
    }

    #[test]
    fn gaps_are_confidence_minus_accuracy_per_group() -> TestResult {
        // Softmax of (0, ln 3) = (¼, ¾): confidence ¾, predicted class 1.
        let l3 = 3f32.ln();
        let logits = Tensor::new(
            &[[0.0f32, l3], [0.0, l3], [l3, 0.0], [0.0, l3]],
            &Device::Cpu,
        )?;
        let labels = Tensor::new(&[1u32, 0, 0, 1], &Device::Cpu)?;
        let gaps = calibration_gaps(&logits, &labels, &[0, 0, 2, 3])?;
        let close = |a: Option<(u64, f64)>, n: u64, g: f64| {
            a.is_some_and(|(m, v)| m == n && (v - g).abs() < 1e-6)
        };
        assert!(close(gaps[0], 2, 0.75 - 0.5), "{gaps:?}");
        assert!(gaps[1].is_none());
        assert!(close(gaps[2], 1, 0.75 - 1.0), "{gaps:?}");
        assert!(close(gaps[3], 1, -0.25), "{gaps:?}");
        assert!(calibration_gaps(&logits, &labels, &[0, 0, 4, 0]).is_err());
        Ok(())
    }

    /// The loss is the soft cross-entropy against the current per-group smoothing, and
    /// the state moves after the batch.
    #[test]
    fn loss_uses_the_group_smoothing_and_updates_it() -> TestResult {
        let (model, x, y) = tiny_problem(3, 8, 5);
        let method = ArAdaLs::new(ArAdaLsConfig::qin_cifar10())?;
        let smoothing = [0.05, 0.2, 0.3, 0.45];
        method.restore_state(&serde_json::to_value(AdaLsState {
            smoothing,
            ..AdaLsState::new(&method.config())
        })?)?;
        // Groups first: the method's train-mode forward updates the BatchNorm
        // statistics the eval-mode probe uses.
        let groups = robustness_groups(&model.frozen(), model.bounds(), &x, &y, 8.0 / 255.0)?;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let out = method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng))?;
        let logits = rows(&model.forward_t(&x, true)?);
        let labels = y.to_vec1::<u32>()?;
        let mut want = 0.0;
        for i in 0..8 {
            let s = smoothing[groups[i]];
            want += smoothed_nll(&logits[i], labels[i] as usize, s) / 8.0;
        }
        let got = f64::from(out.loss.to_scalar::<f32>()?);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let after = method.snapshot()?;
        assert_eq!(after.examples.iter().sum::<u64>(), 8);
        for (g, &before) in smoothing.iter().enumerate() {
            let present = groups.contains(&g);
            assert_eq!(after.examples[g] > 0, present);
            assert_eq!(after.smoothing[g] != before, present && after.gap[g] != 0.0);
        }
        Ok(())
    }

    /// In one process the state lives on the device; its steps give the host rule's
    /// losses and states bit for bit over batches that move it (a fast rate), its
    /// groups and targets are the host's, and the state read back for a checkpoint
    /// restores into a method that goes on like the original.
    #[test]
    fn the_state_on_the_device_follows_the_hosts_rule_bit_for_bit() -> TestResult {
        use crate::method::testutil::{batch, tiny_model};
        let config = ArAdaLsConfig {
            rate: 2.0,
            momentum: 0.7,
            ..ArAdaLsConfig::qin_cifar10()
        };
        let (device, host) = (ArAdaLs::new(config)?, ArAdaLs::new(config)?);
        let (model_d, model_h) = (tiny_model(5, 3), tiny_model(5, 3));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for step in 0..6u64 {
            let (x, y) = batch(12, 5, 40 + step);
            if step == 0 {
                let groups = robustness_groups(&model_d.frozen(), model_d.bounds(), &x, &y, 0.1)?;
                let on_device =
                    robustness_groups_on_device(&model_d.frozen(), model_d.bounds(), &x, &y, 0.1)?
                        .to_vec1::<u32>()?;
                let on_device: Vec<usize> = on_device.iter().map(|&g| g as usize).collect();
                assert_eq!(groups, on_device);
                let smoothing = [0.05, 0.2, 0.3, 0.45];
                let want = adals_targets(&y.to_vec1::<u32>()?, &groups, &smoothing, 5);
                let got = adals_targets_on_device(
                    &y,
                    &Tensor::new(
                        on_device
                            .iter()
                            .map(|&g| g as u32)
                            .collect::<Vec<_>>()
                            .as_slice(),
                        &Device::Cpu,
                    )?,
                    &Tensor::new(&smoothing, &Device::Cpu)?,
                    5,
                )?
                .flatten_all()?
                .to_vec1::<f32>()?;
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
            let a = device.loss_on_device(&mut TrainBatch::new(&model_d, &x, &y, &mut rng))?;
            let b = host.loss_on_host(&mut TrainBatch::new(&model_h, &x, &y, &mut rng))?;
            assert_eq!(
                a.loss.to_scalar::<f32>()?.to_bits(),
                b.loss.to_scalar::<f32>()?.to_bits(),
                "step {step}"
            );
            assert!(host.lock_device().is_none());
            assert!(device.lock_device().is_some());
            assert_eq!(device.snapshot()?, host.snapshot()?, "step {step}");
        }
        let moved = device.snapshot()?;
        assert!(
            moved.smoothing != [config.initial_smoothing; ADALS_GROUPS],
            "{moved:?}"
        );
        // The state a checkpoint saves, restored: the next step goes on alike.
        let resumed = ArAdaLs::new(config)?;
        resumed.restore_state(&device.state().ok_or("no state")?)?;
        let (x, y) = batch(12, 5, 99);
        let model_r = tiny_model(5, 3);
        let mut rng_a = ChaCha8Rng::seed_from_u64(2);
        let mut rng_b = ChaCha8Rng::seed_from_u64(2);
        let model_d2 = tiny_model(5, 3);
        device.loss(&mut TrainBatch::new(&model_d2, &x, &y, &mut rng_a))?;
        resumed.loss(&mut TrainBatch::new(&model_r, &x, &y, &mut rng_b))?;
        assert_eq!(device.snapshot()?, resumed.snapshot()?);
        Ok(())
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() -> TestResult {
        let config = ArAdaLsConfig::qin_cifar10();
        let a = ArAdaLs::new(config)?;
        a.lock().update(
            &config,
            &[Some((3, 0.3)), Some((1, -0.2)), None, Some((2, 0.1))],
        );
        let saved = a.state().ok_or("AR-AdaLS has a state")?;
        let text = serde_json::to_string(&saved)?;
        let b = ArAdaLs::new(config)?;
        assert_ne!(b.snapshot()?, a.snapshot()?);
        b.restore_state(&serde_json::from_str(&text)?)?;
        assert_eq!(b.snapshot()?, a.snapshot()?);
        // Out of range or unreadable states are refused and leave the state alone.
        let mut bad = a.snapshot()?;
        bad.smoothing[2] = 0.7;
        assert!(b.restore_state(&serde_json::to_value(&bad)?).is_err());
        assert!(b
            .restore_state(&serde_json::json!({ "smoothing": [0.1] }))
            .is_err());
        assert_eq!(b.snapshot()?, a.snapshot()?);
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused() {
        let base = ArAdaLsConfig::qin_cifar10();
        for bad in [
            ArAdaLsConfig { eps: -0.1, ..base },
            ArAdaLsConfig {
                initial_smoothing: 0.6,
                ..base
            },
            ArAdaLsConfig {
                initial_smoothing: -0.1,
                ..base
            },
            ArAdaLsConfig {
                max_smoothing: 1.0,
                ..base
            },
            ArAdaLsConfig { rate: 0.0, ..base },
            ArAdaLsConfig {
                momentum: 1.0,
                ..base
            },
            ArAdaLsConfig {
                momentum: f64::NAN,
                ..base
            },
        ] {
            assert!(ArAdaLs::new(bad).is_err(), "{bad:?}");
        }
        assert!(ArAdaLs::new(base).is_ok());
    }
}
