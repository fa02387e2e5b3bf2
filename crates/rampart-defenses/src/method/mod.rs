//! Training methods: how a batch becomes a loss.
//!
//! A [`TrainingMethod`] sees a [`TrainBatch`] (the model, a batch and a seeded RNG) and
//! returns a [`BatchLoss`]. It decides in which mode it calls the model: a method that attacks
//! first (adversarial training, CCAT) runs its attack with `forward_t(x, false)` and
//! computes the loss with `forward_t(x', true)`. The training loop owns everything
//! else: batching, the optimiser step, the schedule, evaluation and checkpoints.
//!
//! Adversarial methods take one attack seed per batch from the method's RNG
//! ([`attack_seed`]), so the adversarial examples of epoch e depend only on
//! (seed, e) and the weights, and a resumed run repeats them exactly.
//!
//! A method that learns something while training besides the weights (AR-AdaLS's
//! per-group smoothing) exposes it through [`TrainingMethod::state`]; the loop saves it
//! in every checkpoint and hands it back through [`TrainingMethod::restore_state`] on
//! resume.

mod adversarial;
mod ar_adals;
mod ccat;
mod constants;
mod fast_at;
mod normal;
mod oat;
mod overrides;
mod regmixup;
mod sat;
mod trades;

pub use adversarial::AdversarialTraining;
pub use ar_adals::{
    adals_targets, calibration_gaps, robustness_group, robustness_groups, AdaLsState, ArAdaLs,
    ArAdaLsConfig, ADALS_GROUPS,
};
pub use ccat::{ccat_lambda, ccat_soft_targets, ccat_soft_targets_on_device, Ccat};
pub use fast_at::FastAt;
pub use normal::{cross_entropy, Normal};
pub use oat::Oat;
pub use overrides::{merge, MethodConfig, MethodKind, MethodSettings, Overrides, Setting};
pub use regmixup::{
    mixup_images, mixup_images_on_device, mixup_targets, mixup_targets_on_device, MixupDraw,
    RegMixup,
};
pub use sat::{entropic_ot, sinkhorn_divergence, Sat};
pub use trades::{kl_divergence, Trades};

use candle_core::{DType, Tensor};
use rampart_attacks::{Attack, Bounds, Perturbed};
use rampart_models::Classifier;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{DefenseError, Result};
use crate::parallel::Collective;

/// What a method made of one batch.
#[derive(Debug)]
pub struct BatchLoss {
    /// The scalar loss to minimise, differentiable with respect to the model's
    /// trainable variables.
    pub loss: Tensor,
    /// Logits (M, K) the running training accuracy is measured on: for normal training
    /// the batch's own logits, for adversarial methods those of the inputs trained on.
    pub logits: Tensor,
    /// Labels (M,) u32 matching `logits`.
    pub labels: Tensor,
    /// The checks of the batch's training attack left on the device, for the trainer
    /// to read with the loss (PGD's device-resident loop, [`rampart_attacks::Faults`]);
    /// None where they were made already.
    pub faults: Option<rampart_attacks::Faults>,
}

impl BatchLoss {
    /// The loss of a batch whose accuracy is measured on `logits` against the batch's
    /// own `labels`.
    pub(crate) fn of_batch(loss: Tensor, logits: Tensor, labels: &Tensor) -> BatchLoss {
        BatchLoss {
            loss,
            logits,
            labels: labels.clone(),
            faults: None,
        }
    }

    /// This loss with the checks `faults` of its training attack left to the trainer.
    pub(crate) fn with_faults(self, faults: Option<rampart_attacks::Faults>) -> BatchLoss {
        BatchLoss { faults, ..self }
    }
}

/// One batch as a [`TrainingMethod`] sees it: the model, the batch and the method's RNG.
#[derive(Debug)]
pub struct TrainBatch<'a> {
    /// The model being trained.
    pub model: &'a Classifier,
    /// Images (B, C, H, W) within the model's bounds.
    pub images: &'a Tensor,
    /// Labels (B,) u32.
    pub labels: &'a Tensor,
    /// The method's RNG, which the loop seeds from (seed, epoch).
    pub rng: &'a mut ChaCha8Rng,
    /// The data-parallel workers this batch is one part of (`None`: a single process).
    workers: Option<&'a dyn Collective>,
    /// The labels on the host, when the caller has them ([`TrainBatch::with_host_labels`]).
    host_labels: Option<&'a [u32]>,
}

impl<'a> TrainBatch<'a> {
    /// The batch `images`, `labels` of `model`, drawing from `rng`.
    pub fn new(
        model: &'a Classifier,
        images: &'a Tensor,
        labels: &'a Tensor,
        rng: &'a mut ChaCha8Rng,
    ) -> Self {
        Self {
            model,
            images,
            labels,
            rng,
            workers: None,
            host_labels: None,
        }
    }

    /// The same batch with its labels' host copy (the values of `labels`; the data
    /// loader has both), so that a method that needs the labels on the host does not
    /// read them back from a GPU, a wait for everything queued before.
    pub fn with_host_labels(mut self, labels: &'a [u32]) -> Self {
        self.host_labels = Some(labels);
        self
    }

    /// The labels (B,) on the host: the copy given with
    /// [`TrainBatch::with_host_labels`], else read from the labels tensor.
    pub fn host_labels(&self) -> Result<std::borrow::Cow<'a, [u32]>> {
        match self.host_labels {
            Some(l) => {
                let b = self.labels.dim(0)?;
                if l.len() != b {
                    return Err(DefenseError::Config(format!(
                        "{} host labels for a batch of {b}",
                        l.len()
                    )));
                }
                Ok(std::borrow::Cow::Borrowed(l))
            }
            None => Ok(std::borrow::Cow::Owned(labels_vec(self.labels)?)),
        }
    }

    /// The same batch as one worker's part of the global batch of `workers`
    /// (data-parallel training): [`TrainBatch::sum_over_workers`] then sums over them.
    pub fn across(mut self, workers: &'a dyn Collective) -> Self {
        self.workers = Some(workers);
        self
    }

    /// The sum over the data-parallel workers of a few per-batch numbers (in f64, in
    /// rank order on the CPU), so that a method whose state follows its batches learns
    /// it from the global batch, identically on every worker; the numbers themselves
    /// in a single process.
    pub fn sum_over_workers(&self, values: &[f64]) -> Result<Vec<f64>> {
        match self.workers {
            Some(group) if group.workers() > 1 => {
                crate::parallel::sum_scalars(group, values, self.images.device())
            }
            _ => Ok(values.to_vec()),
        }
    }

    /// Soft targets (B, K), K the model's classes, on the batch's device from their
    /// rows, row-major (B·K).
    pub(crate) fn targets(&self, rows: Vec<f32>) -> Result<Tensor> {
        let shape = (self.images.dim(0)?, self.model.spec().num_classes);
        Ok(Tensor::from_vec(rows, shape, self.images.device())?)
    }
}

/// Turns a batch into a loss; one implementation per training method.
///
/// **Invariant:** everything random a method does draws from the batch's `rng`, which
/// the loop seeds from (seed, epoch), so a run resumed at an epoch boundary repeats
/// exactly.
pub trait TrainingMethod {
    /// Short name used in files and results (`"normal"`, `"at"`, `"ccat"`, …).
    fn name(&self) -> &'static str;

    /// The method's settings as JSON, recorded in checkpoints (a resumed run must use
    /// the same settings) and in the run's `config.json`.
    fn settings(&self) -> serde_json::Value;

    /// The loss of one batch: images (B, C, H, W) within the model's bounds, labels (B,)
    /// u32. Leaves the model's train/eval choice to each `forward_t` call.
    fn loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss>;

    /// What the method has learnt so far besides the model's weights, as JSON, saved
    /// in every checkpoint and in the final model's metadata; `None` (the default) for
    /// a stateless method. The state after epoch e must depend only on the run's
    /// settings, seed and the batches of epochs 0..=e, like the weights.
    fn state(&self) -> Option<serde_json::Value> {
        None
    }

    /// What one training example of a model `spec` costs per step, in network passes
    /// ([`StepCost`]); the default is one train-mode pass of the clean example.
    fn step_cost(&self, _spec: &rampart_models::ModelSpec) -> StepCost {
        StepCost::CLEAN
    }

    /// What a step of the method draws from the batch's RNG ([`StepDraws`]): a
    /// training step captured into a CUDA graph replays only for a method that says
    /// ([`StepDraws::Other`], the default, runs eagerly).
    fn step_draws(&self) -> StepDraws {
        StepDraws::Other
    }

    /// The values a [`StepDraws::OneSeed`] step of `elems` input values draws on the
    /// host from its seed and copies to the device (TRADES's Gaussian start), if any:
    /// a CUDA graph of the step is given them in a device buffer before each replay
    /// ([`with_step_noise`]). None (the default): the step draws nothing from the seed
    /// on the host.
    fn step_noise(&self, _seed: u64, _elems: usize) -> Option<Vec<f32>> {
        None
    }

    /// What a [`StepDraws::Values`] step of a batch of `batch` draws from the batch's
    /// RNG, drawn here exactly as the step draws it (advancing `rng` as the step
    /// would): a CUDA graph of the step is given them in device buffers before each
    /// replay ([`with_step_values`]). None (the default): the step draws no such values.
    fn step_values(&self, _rng: &mut ChaCha8Rng, _batch: usize) -> Result<Option<StepValues>> {
        Ok(None)
    }

    /// Whether the state stays the same on every data-parallel worker: the method
    /// learns it from sums over the workers ([`TrainBatch::sum_over_workers`]), so that
    /// it is the state of the global batch. Data-parallel training refuses a stateful
    /// method that answers `false` (the default), whose workers would drift apart.
    fn synchronises_state(&self) -> bool {
        false
    }

    /// Sets the state from a value [`TrainingMethod::state`] returned (on resume).
    /// The default refuses: a stateless method has nothing to restore.
    fn restore_state(&self, state: &serde_json::Value) -> Result<()> {
        Err(DefenseError::Config(format!(
            "method {} keeps no state, but a state was given: {state}",
            self.name()
        )))
    }
}

/// What one step of a [`TrainingMethod`] draws on the host, beyond its batch: what a
/// CUDA graph of the step must be given before each replay (the trainer's graphs,
/// `step_graph`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepDraws {
    /// Nothing: the step is a function of its batch and the model.
    Nothing,
    /// One [`attack_seed`] from the batch's RNG, first and only, for a training attack
    /// whose random starts come from it alone.
    OneSeed,
    /// Values drawn from the batch's RNG on the host that the step takes from the
    /// device ([`TrainingMethod::step_values`], e.g. RegMixup's mixing weight and
    /// partners): a graph of the step reads them from buffers written before each
    /// replay.
    Values,
    /// Anything else (or not declared): the step runs eagerly.
    Other,
}

/// What one training example costs a method in one step, in network passes of that
/// example: `train` train-mode passes of the loss (forward, backward and the update's
/// share: `rampart bench`'s `train-step` per image) and the `attack` passes around it
/// (the attacks' input gradients and eval-mode forward passes, counted as
/// [`rampart_attacks::Passes`]). What `rampart train --dry-run` reports and `cargo
/// xtask reproduce --estimate` turns into time.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepCost {
    /// Train-mode forward + backward passes of the loss.
    pub train: f64,
    /// Passes of the attacks (and probes) that make the batch.
    pub attack: rampart_attacks::Passes,
}

impl StepCost {
    /// One train-mode pass of the clean example.
    pub const CLEAN: StepCost = StepCost {
        train: 1.0,
        attack: rampart_attacks::Passes::NONE,
    };

    /// One train-mode pass after an attack of cost `attack` on a `fraction` of the
    /// batch.
    pub fn adversarial(attack: rampart_attacks::Passes, fraction: f64) -> StepCost {
        StepCost {
            train: 1.0,
            attack: attack * fraction,
        }
    }
}

/// A stateless method whose settings value is the method itself: it writes only its
/// loss, and is a [`TrainingMethod`] named [`MethodSettings::NAME`] whose settings are
/// its own serialisation.
pub trait StatelessMethod: MethodSettings + serde::Serialize {
    /// The loss of one batch ([`TrainingMethod::loss`]).
    fn batch_loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss>;

    /// What one example costs per step ([`TrainingMethod::step_cost`]).
    fn cost(&self, _spec: &rampart_models::ModelSpec) -> StepCost {
        StepCost::CLEAN
    }

    /// What a step draws ([`TrainingMethod::step_draws`]).
    fn draws(&self) -> StepDraws {
        StepDraws::Other
    }

    /// What a step draws on the host from its seed ([`TrainingMethod::step_noise`]).
    fn noise(&self, _seed: u64, _elems: usize) -> Option<Vec<f32>> {
        None
    }

    /// What a step draws from the batch's RNG ([`TrainingMethod::step_values`]).
    fn values(&self, _rng: &mut ChaCha8Rng, _batch: usize) -> Result<Option<StepValues>> {
        Ok(None)
    }
}

/// What a [`StepDraws::Values`] step draws on the host, as its graph's device buffers
/// hold them: real numbers (f64) and indices (u32).
#[derive(Clone, Debug, PartialEq)]
pub struct StepValues {
    /// Real numbers, kept in f64 on the device.
    pub reals: Vec<f64>,
    /// Indices, kept in u32 on the device.
    pub indices: Vec<u32>,
}

impl<M: StatelessMethod> TrainingMethod for M {
    fn name(&self) -> &'static str {
        M::NAME
    }

    fn settings(&self) -> serde_json::Value {
        to_json(self)
    }

    fn loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        self.batch_loss(batch)
    }

    fn step_cost(&self, spec: &rampart_models::ModelSpec) -> StepCost {
        self.cost(spec)
    }

    fn step_draws(&self) -> StepDraws {
        self.draws()
    }

    fn step_noise(&self, seed: u64, elems: usize) -> Option<Vec<f32>> {
        self.noise(seed, elems)
    }

    fn step_values(&self, rng: &mut ChaCha8Rng, batch: usize) -> Result<Option<StepValues>> {
        self.values(rng, batch)
    }
}

thread_local! {
    /// A training step's host-drawn values on the device and the seed they are of.
    static STEP_NOISE: std::cell::RefCell<Option<(Tensor, u64)>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the values [`TrainingMethod::step_noise`] gives for `seed` already on
/// the device in `noise`: a method's step of that seed takes them from there instead
/// of drawing and copying them (what a CUDA graph of the step replays with the values
/// written before each replay).
pub fn with_step_noise<R>(noise: &Tensor, seed: u64, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<(Tensor, u64)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            STEP_NOISE.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = STEP_NOISE.with(|s| s.borrow_mut().replace((noise.clone(), seed)));
    let _restore = Restore(previous);
    f()
}

/// The values [`with_step_noise`] put on the device for `seed`, if any.
pub(crate) fn step_noise_of(seed: u64) -> Option<Tensor> {
    STEP_NOISE.with(|s| {
        s.borrow()
            .as_ref()
            .filter(|(_, of)| *of == seed)
            .map(|(t, _)| t.clone())
    })
}

thread_local! {
    /// A training step's [`StepValues`] on the device: (reals f64, indices u32).
    static STEP_VALUES: std::cell::RefCell<Option<(Tensor, Tensor)>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the values of the step's [`TrainingMethod::step_values`] already on
/// the device (`reals` f64, `indices` u32): the method's step takes them from there
/// instead of copying its own draws (what a CUDA graph of the step replays with the
/// values written before each replay).
pub fn with_step_values<R>(reals: &Tensor, indices: &Tensor, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<(Tensor, Tensor)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            STEP_VALUES.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = STEP_VALUES.with(|s| s.borrow_mut().replace((reals.clone(), indices.clone())));
    let _restore = Restore(previous);
    f()
}

/// The step's values on the device: those [`with_step_values`] put there, checked
/// against the step's own draws' lengths, else `values` copied to `device`.
pub(crate) fn step_values_on(
    values: &StepValues,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    match STEP_VALUES.with(|s| s.borrow().clone()) {
        Some((reals, indices)) => {
            if reals.dims() != [values.reals.len()] || indices.dims() != [values.indices.len()] {
                return Err(DefenseError::Config(format!(
                    "the step's values on the device have shapes {:?} and {:?}, its draws                      {} and {} values",
                    reals.dims(),
                    indices.dims(),
                    values.reals.len(),
                    values.indices.len()
                )));
            }
            Ok((reals, indices))
        }
        None => Ok((
            Tensor::new(values.reals.as_slice(), device)?,
            Tensor::new(values.indices.as_slice(), device)?,
        )),
    }
}

/// The seed of one batch's attack, drawn from the method's RNG.
pub fn attack_seed(rng: &mut ChaCha8Rng) -> u64 {
    rng.gen()
}

/// Number of examples of a batch of `batch` that are attacked when a fraction
/// `fraction` ∈ (0, 1] of it is adversarial: round(fraction·B), at least 1.
pub fn adversarial_count(batch: usize, fraction: f64) -> usize {
    ((fraction * batch as f64).round() as usize).clamp(1, batch.max(1))
}

/// Runs `attack` at budget `eps` on the model (which the attack calls in eval mode),
/// computing input gradients only (the weights' gradients are neither needed nor
/// computed), and returns its points without judging them
/// ([`Attack::perturb_with_classes`]: a training step needs the points, not a last
/// forward pass to classify them, nor one to learn the model's classes, which its
/// spec gives). images: (M, C, H, W) in the model's bounds; labels: (M,).
pub(crate) fn run_attack(
    attack: &dyn Attack,
    model: &Classifier,
    images: &Tensor,
    labels: &Tensor,
    eps: f64,
    seed: u64,
) -> Result<Perturbed> {
    on_model(model, |frozen, bounds, classes| {
        attack.perturb_with_classes(frozen, bounds, images, labels, eps, seed, classes)
    })
}

/// [`run_attack`] with its checks of the batch left on the device where the attack
/// runs on PGD's device-resident loop ([`Attack::perturb_unchecked`]): the same points.
pub(crate) fn run_attack_unchecked(
    attack: &dyn Attack,
    model: &Classifier,
    images: &Tensor,
    labels: &Tensor,
    eps: f64,
    seed: u64,
) -> Result<rampart_attacks::Unchecked> {
    on_model(model, |frozen, bounds, classes| {
        attack.perturb_unchecked(frozen, bounds, images, labels, eps, seed, classes)
    })
}

/// `run` on the model's frozen view, its bounds and its number of classes.
fn on_model<R>(
    model: &Classifier,
    run: impl FnOnce(&dyn candle_core::ModuleT, Bounds, usize) -> rampart_attacks::Result<R>,
) -> Result<R> {
    let (lo, hi) = model.bounds();
    let bounds = Bounds::new(lo, hi)?;
    Ok(run(&model.frozen(), bounds, model.spec().num_classes)?)
}

/// Runs `attack` at budget `eps` on the first `m` examples of the batch, with one seed
/// drawn from the batch's RNG ([`attack_seed`]); m ≤ B.
pub(crate) fn attack_first(
    attack: &dyn Attack,
    batch: &mut TrainBatch<'_>,
    m: usize,
    eps: f64,
) -> Result<Perturbed> {
    on_first(batch, m, |model, images, labels, seed| {
        run_attack(attack, model, images, labels, eps, seed)
    })
}

/// [`attack_first`] with the checks left on the device ([`run_attack_unchecked`]).
pub(crate) fn attack_first_unchecked(
    attack: &dyn Attack,
    batch: &mut TrainBatch<'_>,
    m: usize,
    eps: f64,
) -> Result<rampart_attacks::Unchecked> {
    on_first(batch, m, |model, images, labels, seed| {
        run_attack_unchecked(attack, model, images, labels, eps, seed)
    })
}

/// `run` on the model, the first `m` images and labels of the batch and one seed
/// drawn from the batch's RNG ([`attack_seed`]).
fn on_first<R>(
    batch: &mut TrainBatch<'_>,
    m: usize,
    run: impl FnOnce(&Classifier, &Tensor, &Tensor, u64) -> Result<R>,
) -> Result<R> {
    let seed = attack_seed(batch.rng);
    run(
        batch.model,
        &batch.images.narrow(0, 0, m)?,
        &batch.labels.narrow(0, 0, m)?,
        seed,
    )
}

/// The batch an adversarial method trains on: the first `adversarial.dim(0)` examples
/// replaced by their adversarial versions, the rest clean. images: (B, C, H, W);
/// adversarial: (M, C, H, W) with M ≤ B.
pub(crate) fn mixed_batch(images: &Tensor, adversarial: &Tensor) -> Result<Tensor> {
    let (b, m) = (images.dim(0)?, adversarial.dim(0)?);
    if m >= b {
        return Ok(adversarial.clone());
    }
    Ok(Tensor::cat(
        &[adversarial, &images.narrow(0, m, b - m)?],
        0,
    )?)
}

/// Mean cross-entropy against soft targets: mean_i −Σ_k t_ik·log softmax(f_i)_k.
/// logits: (B, K); targets: (B, K), rows summing to 1.
/// One fused op each way for f32 logits ([`rampart_models::kernels::xent`]); the
/// targets are constants.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    use rampart_models::kernels::xent;
    Ok(xent::cross_entropy(logits, xent::Targets::Soft(targets))?)
}

/// One-hot rows (B, K) f32 of labels (B,) u32.
pub(crate) fn one_hot(labels: &[u32], classes: usize) -> Vec<f32> {
    let mut out = vec![0f32; labels.len() * classes];
    for (i, &y) in labels.iter().enumerate() {
        if (y as usize) < classes {
            out[i * classes + y as usize] = 1.0;
        }
    }
    out
}

/// Refuses an ε that is negative, NaN or infinite.
pub(crate) fn check_eps(eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(DefenseError::Config(format!(
            "ε must be finite and ≥ 0, got {eps}"
        )));
    }
    Ok(())
}

/// Refuses an adversarial fraction outside (0, 1].
pub(crate) fn check_fraction(fraction: f64) -> Result<()> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(DefenseError::Config(format!(
            "the adversarial fraction of a batch must lie in (0, 1], got {fraction}"
        )));
    }
    Ok(())
}

/// Labels (B,) as a host vector of u32 (a read from the device).
pub(crate) fn labels_vec(labels: &Tensor) -> Result<Vec<u32>> {
    #[cfg(test)]
    LABEL_READS.with(|c| c.set(c.get() + 1));
    Ok(labels.to_dtype(DType::U32)?.to_vec1::<u32>()?)
}

#[cfg(test)]
thread_local! {
    /// [`labels_vec`] calls on this thread (the tests count reads of labels).
    pub(crate) static LABEL_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Settings of a serialisable method as JSON.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A tiny classifier and batch shared by the methods' tests.

    use candle_core::{Device, Tensor};
    use rampart_models::{Arch, Classifier, ModelSpec};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// WRN-10-1 on 3×8×8 inputs with `classes` outputs.
    pub fn tiny_model(classes: usize, seed: u64) -> Classifier {
        let spec = ModelSpec {
            input_shape: [3, 8, 8],
            ..ModelSpec::cifar(
                Arch::Wrn {
                    depth: 10,
                    widen: 1,
                },
                classes,
            )
        };
        Classifier::new(spec, seed, &Device::Cpu).unwrap_or_else(|e| panic!("tiny model: {e}"))
    }

    /// `b` random images in [0, 1] and labels below `classes`.
    pub fn batch(b: usize, classes: u32, seed: u64) -> (Tensor, Tensor) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let pixels: Vec<f32> = (0..b * 192).map(|_| rng.gen::<f32>()).collect();
        let labels: Vec<u32> = (0..b).map(|i| i as u32 % classes).collect();
        let images = Tensor::from_vec(pixels, (b, 3, 8, 8), &Device::Cpu)
            .unwrap_or_else(|e| panic!("images: {e}"));
        let labels =
            Tensor::from_vec(labels, b, &Device::Cpu).unwrap_or_else(|e| panic!("labels: {e}"));
        (images, labels)
    }

    /// A tiny model with `classes` outputs (seed `seed`) and a batch of `b` examples of
    /// those classes (seed `seed + 1`).
    pub fn tiny_problem(classes: usize, b: usize, seed: u64) -> (Classifier, Tensor, Tensor) {
        let model = tiny_model(classes, seed);
        let (images, labels) = batch(b, classes as u32, seed + 1);
        (model, images, labels)
    }

    /// Rows of a (B, K) tensor as f64.
    pub fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_dtype(candle_core::DType::F64)
            .and_then(|t| t.to_vec2::<f64>())
            .unwrap_or_else(|e| panic!("rows: {e}"))
    }

    /// −log softmax(row)[k] in f64.
    pub fn neg_log_softmax(row: &[f64], k: usize) -> f64 {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        lse - row[k]
    }

    /// −Σ_k t_k·log softmax(row)_k against the smoothed target
    /// t = (1 − s)·onehot(label) + s/K, K = row.len().
    pub fn smoothed_nll(row: &[f64], label: usize, s: f64) -> f64 {
        let classes = row.len();
        (0..classes)
            .map(|k| {
                let t = if k == label { 1.0 - s } else { 0.0 } + s / classes as f64;
                t * neg_log_softmax(row, k)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Each method's step cost, worked by hand from its settings.
    #[test]
    fn step_costs_count_the_attacks_and_the_train_passes() -> Result<()> {
        use rampart_attacks::{Passes, Pgd};
        use rampart_models::{Arch, ModelSpec, OatSpec};
        let spec = ModelSpec::cifar(
            Arch::Wrn {
                depth: 10,
                widen: 1,
            },
            10,
        );
        let pgd10 = Pgd {
            steps: 10,
            ..Pgd::madry_linf_cifar10()
        };
        let cost = |m: &dyn TrainingMethod, spec: &ModelSpec| m.step_cost(spec);
        assert_eq!(cost(&Normal::new(), &spec), StepCost::CLEAN);
        // PGD-10 on half the batch: 10 gradients (the start's and nine steps') and one
        // forward pass (the last step's point; no judgement), halved, per example.
        let at = AdversarialTraining::new(pgd10, 8.0 / 255.0, 0.5)?;
        let want = Passes {
            gradient: 5.0,
            forward: 0.5,
        };
        assert_eq!(
            cost(&at, &spec),
            StepCost {
                train: 1.0,
                attack: want
            }
        );
        // FGSM: the start's gradient and the stepped point's forward pass.
        assert_eq!(
            cost(&FastAt::wong_cifar10(), &spec).attack,
            Passes {
                gradient: 1.0,
                forward: 1.0
            }
        );
        let trades = Trades::new(8.0 / 255.0, 10, 2.0 / 255.0, 6.0)?;
        assert_eq!(cost(&trades, &spec).train, 2.0);
        assert_eq!(cost(&trades, &spec).attack.gradient, 10.0);
        assert_eq!(cost(&RegMixup::new(1.0)?, &spec).train, 2.0);
        // OAT's standard λ values: five of six are > 0.
        let oat_spec = ModelSpec {
            oat: Some(OatSpec::standard()),
            ..spec.clone()
        };
        let oat = cost(&Oat::new(pgd10, 8.0 / 255.0)?, &oat_spec);
        assert!((oat.train - 11.0 / 6.0).abs() < 1e-12);
        assert!((oat.attack.gradient - 50.0 / 6.0).abs() < 1e-12);
        let adals = cost(&ArAdaLs::new(ArAdaLsConfig::qin_cifar10())?, &spec);
        assert_eq!(
            (adals.train, adals.attack.gradient, adals.attack.forward),
            (1.0, 1.0, 3.0)
        );
        Ok(())
    }

    #[test]
    fn adversarial_count_rounds_and_keeps_one() {
        assert_eq!(adversarial_count(128, 1.0), 128);
        assert_eq!(adversarial_count(128, 0.5), 64);
        assert_eq!(adversarial_count(100, 0.5), 50);
        assert_eq!(adversarial_count(8, 0.25), 2);
        assert_eq!(adversarial_count(3, 0.01), 1);
    }

    #[test]
    fn soft_cross_entropy_matches_hand_computation(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        // Logits (0, ln 3, 0, 0): p = (1/6, 1/2, 1/6, 1/6).
        let l3 = 3f32.ln();
        let logits = Tensor::new(&[[0.0f32, l3, 0.0, 0.0]], &Device::Cpu)?;
        let targets = Tensor::new(&[[0.125f32, 0.625, 0.125, 0.125]], &Device::Cpu)?;
        let got = soft_cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        let want = -(0.375 * (1.0f64 / 6.0).ln() + 0.625 * 0.5f64.ln());
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
        // One-hot targets give the ordinary cross-entropy.
        let hot = Tensor::from_vec(one_hot(&[1], 4), (1, 4), &Device::Cpu)?;
        let got = soft_cross_entropy(&logits, &hot)?.to_scalar::<f32>()?;
        assert!((f64::from(got) - 2f64.ln()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn fractions_and_eps_are_checked() {
        assert!(check_fraction(0.0).is_err());
        assert!(check_fraction(1.5).is_err());
        assert!(check_fraction(f64::NAN).is_err());
        assert!(check_fraction(0.5).is_ok());
        assert!(check_eps(-0.1).is_err());
        assert!(check_eps(f64::INFINITY).is_err());
        assert!(check_eps(0.0).is_ok());
    }
}

#[cfg(test)]
mod host_label_tests {
    use super::testutil::tiny_problem;
    use super::*;
    use rand::SeedableRng;

    /// The methods that need the labels on the host (CCAT's soft targets under an L2
    /// attack) take the trainer's copy (no read of the labels tensor, a wait on a GPU)
    /// and compute the same loss as from the tensor; a copy of another length is
    /// refused. CCAT (L∞), RegMixup and AR-AdaLS (one process) need none: their soft
    /// targets are made on the device.
    #[test]
    fn methods_take_the_host_labels_instead_of_reading_them() -> Result<()> {
        let ccat = Ccat {
            attack: rampart_attacks::Pgd {
                steps: 3,
                ..rampart_attacks::Pgd::ccat_train()
            },
            ..Ccat::stutz_cifar10()
        };
        let none: Vec<(&str, Box<dyn TrainingMethod>)> = vec![
            ("ccat", Box::new(ccat)),
            ("regmixup", Box::new(RegMixup::pinto_cifar10())),
            (
                "ar-adals",
                Box::new(ArAdaLs::new(ArAdaLsConfig::qin_cifar10())?),
            ),
        ];
        for (name, method) in none {
            let (model, x, y) = tiny_problem(4, 6, 3);
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let before = LABEL_READS.with(std::cell::Cell::get);
            method.loss(&mut TrainBatch::new(&model, &x, &y, &mut rng))?;
            assert_eq!(
                LABEL_READS.with(std::cell::Cell::get),
                before,
                "{name} read the labels"
            );
        }
        type Make = fn() -> Result<Box<dyn TrainingMethod>>;
        let methods: Vec<(&str, Make)> = vec![("ccat (L2)", || {
            Ok(Box::new(Ccat {
                attack: rampart_attacks::Pgd {
                    steps: 3,
                    norm: rampart_attacks::Norm::L2,
                    ..rampart_attacks::Pgd::ccat_train()
                },
                eps: 0.5,
                ..Ccat::stutz_cifar10()
            }))
        })];
        for (name, make) in methods {
            let loss = |host: bool| -> Result<(f32, usize)> {
                let method = make()?;
                let (model, x, y) = tiny_problem(4, 6, 3);
                let labels = y.to_vec1::<u32>()?;
                let mut rng = ChaCha8Rng::seed_from_u64(9);
                let mut batch = TrainBatch::new(&model, &x, &y, &mut rng);
                if host {
                    batch = batch.with_host_labels(&labels);
                }
                let before = LABEL_READS.with(std::cell::Cell::get);
                let out = method.loss(&mut batch)?;
                let reads = LABEL_READS.with(std::cell::Cell::get) - before;
                Ok((out.loss.to_scalar::<f32>()?, reads))
            };
            let (read, reads) = loss(false)?;
            let (given, none) = loss(true)?;
            assert_eq!(read.to_bits(), given.to_bits(), "{name}");
            assert!(
                reads > 0,
                "{name}: the labels were read without a host copy"
            );
            assert_eq!(
                none, 0,
                "{name}: the labels were read despite the host copy"
            );
        }
        let (model, x, y) = tiny_problem(4, 6, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let short = [0u32; 5];
        let batch = TrainBatch::new(&model, &x, &y, &mut rng).with_host_labels(&short);
        assert!(batch.host_labels().is_err());
        Ok(())
    }
}
