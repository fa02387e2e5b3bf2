//! CUDA graphs of the trainer's steps: a full-batch training step of normal training,
//! fast AT, PGD-AT, CCAT (L∞), TRADES, RegMixup, SAT or AR-AdaLS (its state kept on
//! the device and updated in place) is the same device work on the same buffers every time (the
//! training attack, the method's loss, the backward pass), so it is captured once per
//! run and replayed: one launch where the host queued some thousands, each with its
//! host-side cost.
//!
//! **What a replay is given.** Before each step the trainer writes what changes into
//! buffers the graph reads: the batch's images and labels, and for fast AT, PGD-AT, CCAT
//! and SAT the attack's seed, which the trainer draws from the method's RNG exactly as the
//! method would ([`StepDraws::OneSeed`]: the method's step draws that one value and
//! nothing else), and which the attack's start kernel reads on the device
//! ([`rampart_attacks::with_seed_on_device`]; the starts themselves are drawn there);
//! for TRADES, whose Gaussian start is drawn on the host from the seed, the trainer
//! draws those values and copies them into a buffer the step reads
//! ([`TrainingMethod::step_noise`], [`crate::with_step_noise`]); for RegMixup, whose
//! mixing weight and partners come from the method's RNG ([`StepDraws::Values`]), the
//! trainer draws them as the step would and copies them into buffers the step reads
//! ([`TrainingMethod::step_values`], [`crate::with_step_values`]), from which its
//! mixed batch and soft targets are made on the device.
//! The graph leaves the step's loss, correct count and attack checks, and its
//! gradients, in buffers that outlive it; the trainer adds the first to its sums and
//! runs SGD on the second outside the graph (one launch), at the step's learning rate.
//! So the seeds, the starts, the gradients and the update are those of eager training.
//!
//! **Which steps.** The first full batch of a run runs eagerly (it loads the kernels,
//! fills cuDNN's plan cache and candle's cache of uploaded layouts and makes the
//! buffers); the second is captured and launched; every later full batch replays it,
//! across epochs. A last, smaller batch runs eagerly (`train_step`).
//!
//! **When not.** A method that draws anything else on the host per step
//! ([`StepDraws::Other`]: OAT's λ), data-parallel training, and a model whose passes draw noise (a
//! stochastic student, seen in the first step) train eagerly. A capture that fails (a
//! read back to the host, an upload the first step did not cache, a training attack
//! on the host path, an operation the driver cannot capture) or a replay the driver
//! refuses falls back to eager steps from that step on, logged once per process:
//! capture runs nothing, so the step then runs eagerly, with the same result.
//!
//! On a GPU with the `cuda` feature, graphs are used when `RAMPART_CUDA_TRAIN_GRAPHS`
//! is set (any value but `0`), or under [`with_train_graphs`]; off by default until
//! verified on a GPU.

// Without CUDA, only the tests' stand-in records graphs.
#![cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]

use std::cell::{Cell, RefCell};

use candle_core::{DType, Tensor};
use rampart_attacks::{Faults, GraphRecorder};
use rampart_models::Classifier;
use rand_chacha::ChaCha8Rng;

use crate::error::{DefenseError, Result};
use crate::method::{attack_seed, StepDraws, TrainBatch, TrainingMethod};
use crate::sgd::Sgd;
use crate::trainer::{step_stats, StepSums};

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
    static CAPTURES: Cell<usize> = const { Cell::new(0) };
    static LAUNCHES: Cell<usize> = const { Cell::new(0) };
    static FAILURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Training steps captured into CUDA graphs and launched (a launch is one step) on
/// this thread so far: a caller that compares the counts before and after a run knows
/// whether its steps were replayed.
pub fn train_graph_steps() -> (usize, usize) {
    (CAPTURES.with(Cell::get), LAUNCHES.with(Cell::get))
}

/// Why the last capture or replay of a training step on this thread failed (the run
/// went on eagerly), if one did.
pub fn train_graph_failure() -> Option<String> {
    FAILURE.with(|f| f.borrow().clone())
}

/// Runs `f` with the trainer's CUDA graphs taken on this thread wherever a run trains
/// on a GPU, whatever the environment (tests and benchmarks).
pub fn with_train_graphs<R>(f: impl FnOnce() -> R) -> R {
    let previous = FORCED.with(|c| c.replace(true));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(previous);
    f()
}

/// Whether graphs are asked for on this thread.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn wanted() -> bool {
    FORCED.with(Cell::get)
        || std::env::var_os(rampart_models::kernels::TRAIN_GRAPHS_ENV).is_some_and(|v| v != "0")
}

/// A run's training steps through graphs, whatever records them.
pub(crate) trait StepRunner {
    /// One training step on a full batch through the graph (see [`StepGraph::step`]);
    /// `None` when graphs are off for the run (the caller runs `train_step`).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        method: &dyn TrainingMethod,
        model: &Classifier,
        batch: (&Tensor, &Tensor),
        rng: &mut ChaCha8Rng,
        sgd: &mut Sgd,
        lr: f64,
        sums: &mut StepSums,
    ) -> Result<Option<usize>>;
}

/// The graphs of a run training `method` on `model`, where they apply: asked for, on a
/// GPU, one process, a method whose draws a replay can be given.
pub(crate) fn for_run(
    model: &Classifier,
    method: &dyn TrainingMethod,
    workers: usize,
) -> Option<Box<dyn StepRunner>> {
    if workers > 1 || method.step_draws() == StepDraws::Other {
        return None;
    }
    #[cfg(test)]
    if let Some(fake) = tests::fake() {
        return Some(Box::new(StepGraph::new(fake, method.step_draws())));
    }
    #[cfg(feature = "cuda")]
    if let (candle_core::Device::Cuda(d), true) = (model.device(), wanted()) {
        return Some(Box::new(StepGraph::new(
            rampart_attacks::CudaGraphRecorder(d.clone()),
            method.step_draws(),
        )));
    }
    let _ = model;
    None
}

/// The trainer's graph of full-batch training steps, for a caller that runs the steps
/// itself (`rampart bench`'s method steps): [`TrainGraph::step`] is what
/// [`crate::Trainer::run`] runs for each full batch where graphs apply.
pub struct TrainGraph(Box<dyn StepRunner>);

impl std::fmt::Debug for TrainGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrainGraph")
    }
}

impl TrainGraph {
    /// The graph of steps of `method` on `model` in one process, where graphs apply:
    /// asked for (`RAMPART_CUDA_TRAIN_GRAPHS`, [`with_train_graphs`]), on a GPU, a
    /// method whose draws a replay can be given ([`TrainingMethod::step_draws`]).
    pub fn for_run(model: &Classifier, method: &dyn TrainingMethod) -> Option<TrainGraph> {
        for_run(model, method, 1).map(TrainGraph)
    }

    /// One step on the full batch `(images, labels)`: the batch (and the attack's seed,
    /// drawn from `rng` as the method's step draws it) written into the graph's
    /// buffers, the step run (eagerly the first time, captured the second, replayed
    /// after), its loss, correct count and checks added to `sums`, and SGD at `lr`.
    /// `None` (nothing done) when graphs are off for the run, after a failed capture
    /// or replay, or for a batch of another shape than the first: the caller then runs
    /// [`crate::train_step`].
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        method: &dyn TrainingMethod,
        model: &Classifier,
        batch: (&Tensor, &Tensor),
        rng: &mut ChaCha8Rng,
        sgd: &mut Sgd,
        lr: f64,
        sums: &mut StepSums,
    ) -> Result<Option<usize>> {
        self.0.step(method, model, batch, rng, sgd, lr, sums)
    }
}

/// The buffers a step's graph reads and writes, made by the first step.
struct Fixed {
    images: Tensor,
    labels: Tensor,
    /// The attack's seed, two u32 words, low first.
    seed: Tensor,
    /// The step's (loss, correct count).
    stats: Tensor,
    /// The step's attack checks, where its attack leaves them.
    faults: RefCell<Option<Tensor>>,
    /// The values the step draws on the host from its seed, where it draws any
    /// ([`TrainingMethod::step_noise`]).
    noise: RefCell<Option<Tensor>>,
    /// The values the step draws from the batch's RNG, where it draws any
    /// ([`TrainingMethod::step_values`]): reals (f64) and indices (u32).
    values: RefCell<Option<(Tensor, Tensor)>>,
    /// The examples the method trained on (TRADES: the clean and the adversarial
    /// batch), as the step's eager run counted them.
    examples: Cell<usize>,
}

enum Phase<G> {
    /// The next step runs eagerly and warms the caches.
    Warm,
    /// The next step is captured.
    Capture,
    /// Steps replay this.
    Ready(G),
    /// Graphs are off for the rest of the run.
    Off,
}

/// The graph of a run's full-batch training steps.
pub(crate) struct StepGraph<R: GraphRecorder> {
    rec: R,
    phase: Phase<R::Graph>,
    draws: StepDraws,
    fixed: Option<Fixed>,
    /// Noise seeds drawn when the run began.
    noise: usize,
}

impl<R: GraphRecorder> StepGraph<R> {
    pub(crate) fn new(rec: R, draws: StepDraws) -> Self {
        StepGraph {
            noise: rec.noise(),
            rec,
            phase: Phase::Warm,
            draws,
            fixed: None,
        }
    }
}

/// Gives up graphs after a failed `what` (the run goes on eagerly), logged once per
/// process.
fn give_up<R: GraphRecorder>(rec: &mut R, what: &str, e: &dyn std::fmt::Display) {
    rec.recover();
    FAILURE.with(|f| *f.borrow_mut() = Some(format!("{what}: {e}")));
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            "training on the GPU: CUDA graph {what} failed ({e}); the steps run eagerly \
             (logged once)"
        )
    });
}

impl<R: GraphRecorder> StepRunner for StepGraph<R> {
    /// Writes the batch (and the attack's seed, drawn from `rng`) into the graph's
    /// buffers, runs the step (eagerly, captured or replayed), adds its loss, correct
    /// count and checks to `sums` and updates the weights with `sgd` at `lr`.
    fn step(
        &mut self,
        method: &dyn TrainingMethod,
        model: &Classifier,
        (images, labels): (&Tensor, &Tensor),
        rng: &mut ChaCha8Rng,
        sgd: &mut Sgd,
        lr: f64,
        sums: &mut StepSums,
    ) -> Result<Option<usize>> {
        if matches!(self.phase, Phase::Off) {
            return Ok(None);
        }
        match &self.fixed {
            None => {
                let dev = images.device();
                self.fixed = Some(Fixed {
                    images: images.copy()?,
                    labels: labels.copy()?,
                    seed: Tensor::zeros(2, DType::U32, dev)?,
                    stats: Tensor::zeros(2, DType::F64, dev)?,
                    faults: RefCell::new(None),
                    noise: RefCell::new(None),
                    values: RefCell::new(None),
                    examples: Cell::new(0),
                });
            }
            Some(f) => {
                let same = |a: &Tensor, b: &Tensor| a.dims() == b.dims() && a.dtype() == b.dtype();
                if !same(&f.images, images) || !same(&f.labels, labels) {
                    // A batch of another shape: eagerly.
                    return Ok(None);
                }
                f.images.slice_set(&images.contiguous()?, 0, 0)?;
                f.labels.slice_set(&labels.contiguous()?, 0, 0)?;
            }
        }
        let Some(fixed) = self.fixed.as_ref() else {
            return Err(DefenseError::Config(
                "the step graph's buffers are missing".into(),
            ));
        };
        // The method draws from a copy of the RNG as it stands: the same seed as the
        // one drawn here, which advances the run's RNG as the method's step would.
        let body_rng = rng.clone();
        let seed = match self.draws {
            StepDraws::OneSeed => {
                let s = attack_seed(rng);
                let dev = fixed.images.device();
                let words = Tensor::new(&[s as u32, (s >> 32) as u32], dev)?;
                fixed.seed.slice_set(&words, 0, 0)?;
                // What the step would draw from the seed on the host, drawn here.
                let elems = fixed.images.elem_count();
                if let Some(values) = method.step_noise(s, elems) {
                    let drawn = rampart_data::upload::tensor(values, elems, dev)?;
                    let mut noise = fixed.noise.borrow_mut();
                    match noise.as_ref() {
                        Some(buffer) => buffer.slice_set(&drawn, 0, 0)?,
                        None => *noise = Some(drawn),
                    }
                }
                Some(s)
            }
            StepDraws::Values => {
                // Drawn from the run's RNG as the step draws them, into the buffers the
                // graph reads.
                let b = fixed.images.dim(0)?;
                let values = method.step_values(rng, b)?.ok_or_else(|| {
                    DefenseError::Config(format!(
                        "method {} declares values for its steps but draws none",
                        method.name()
                    ))
                })?;
                let dev = fixed.images.device();
                let reals = Tensor::new(values.reals.as_slice(), dev)?;
                let indices = Tensor::new(values.indices.as_slice(), dev)?;
                let mut kept = fixed.values.borrow_mut();
                match kept.as_ref() {
                    Some((r, i)) if r.dims() == reals.dims() && i.dims() == indices.dims() => {
                        r.slice_set(&reals, 0, 0)?;
                        i.slice_set(&indices, 0, 0)?;
                    }
                    Some(_) => {
                        return Err(DefenseError::Config(
                            "a step drew values of another shape than the first step".into(),
                        ))
                    }
                    None => *kept = Some((reals, indices)),
                }
                None
            }
            StepDraws::Nothing | StepDraws::Other => None,
        };
        let failed: RefCell<Option<DefenseError>> = RefCell::new(None);
        let mut run = || -> Result<()> {
            let mut r = body_rng.clone();
            let mut batch = TrainBatch::new(model, &fixed.images, &fixed.labels, &mut r);
            let noise = fixed.noise.borrow().clone();
            let values = fixed.values.borrow().clone();
            let out = match (seed, noise, values) {
                (Some(s), Some(n), _) => crate::method::with_step_noise(&n, s, || {
                    rampart_attacks::with_seed_on_device(&fixed.seed, s, || method.loss(&mut batch))
                })?,
                (Some(s), None, _) => rampart_attacks::with_seed_on_device(&fixed.seed, s, || {
                    method.loss(&mut batch)
                })?,
                (None, _, Some((r, i))) => {
                    crate::method::with_step_values(&r, &i, || method.loss(&mut batch))?
                }
                (None, _, None) => method.loss(&mut batch)?,
            };
            fixed.stats.slice_set(&step_stats(&out)?, 0, 0)?;
            fixed.examples.set(out.labels.dim(0)?);
            let mut kept = fixed.faults.borrow_mut();
            match (&out.faults, kept.as_ref()) {
                (Some(f), Some(k)) => k.slice_set(f.tensor(), 0, 0)?,
                (Some(f), None) => *kept = Some(f.tensor().copy()?),
                (None, Some(_)) => {
                    return Err(DefenseError::Config(
                        "a training attack left no checks after a step that did".into(),
                    ))
                }
                (None, None) => {}
            }
            let grads = rampart_models::backward(&out.loss)?;
            sgd.keep_gradients(&grads)
        };
        let mut body = || -> rampart_attacks::Result<()> {
            run().map_err(|e| {
                let message = e.to_string();
                *failed.borrow_mut() = Some(e);
                rampart_attacks::Error::Input(message)
            })
        };
        // The body's own error where it failed, else the recorder's.
        let eager = |body: &mut dyn FnMut() -> rampart_attacks::Result<()>| -> Result<()> {
            body().map_err(|e| failed.borrow_mut().take().unwrap_or_else(|| e.into()))
        };
        // Off until the step says otherwise: a failure below leaves the run eager.
        let graph = match std::mem::replace(&mut self.phase, Phase::Off) {
            Phase::Warm => {
                if let Err(e) = self.rec.warm(&mut body) {
                    return Err(failed.borrow_mut().take().unwrap_or_else(|| e.into()));
                }
                // Passes that draw noise on the host: a replay would repeat this draw.
                if self.rec.noise() == self.noise {
                    self.phase = Phase::Capture;
                }
                None
            }
            Phase::Capture => match self.rec.capture(&mut body) {
                Ok(g) => {
                    CAPTURES.with(|c| c.set(c.get() + 1));
                    tracing::info!(
                        "training step captured into a CUDA graph: every later full batch \
                         of the run replays it"
                    );
                    Some(g)
                }
                Err(e) => {
                    failed.borrow_mut().take();
                    give_up(&mut self.rec, "capture", &e);
                    eager(&mut body)?;
                    None
                }
            },
            Phase::Ready(g) => Some(g),
            Phase::Off => None,
        };
        if let Some(g) = graph {
            match self.rec.launch(&g) {
                Ok(()) => {
                    LAUNCHES.with(|c| c.set(c.get() + 1));
                    if R::RUNS_BODY {
                        eager(&mut body)?;
                    }
                    self.phase = Phase::Ready(g);
                }
                Err(e) => {
                    give_up(&mut self.rec, "replay", &e);
                    eager(&mut body)?;
                }
            }
        }
        let faults = fixed
            .faults
            .borrow()
            .as_ref()
            .map(|t| -> Result<Faults> { Ok(Faults::from_tensor(t.copy()?)?) })
            .transpose()?;
        sums.add(fixed.stats.copy()?, faults.as_ref())?;
        sgd.step_kept(lr)?;
        Ok(Some(fixed.examples.get()))
    }
}

#[cfg(test)]
#[path = "step_graph_tests.rs"]
pub(crate) mod tests;
