//! CUDA graphs of PGD's device-resident steps: a run's middle steps are the same
//! device work on the same buffers (the step kernel, the model's passes at the
//! candidate, the EOT accumulation and the judgement, with the same arguments), so
//! one of them is captured once and the others replay it: one launch per step where
//! the host queued some hundreds, each with its host-side cost.
//!
//! **Which steps.** The start's evaluation and the first step run eagerly (they load
//! the kernels, fill cuDNN's plan cache, the kernels kept in a scope of frozen
//! weights and candle's cache of uploaded layouts, and make the L2 step's working
//! rows); the second step is captured and launched; the others up to the last but one
//! replay it; the last runs eagerly (it differs: no gradient, or no evaluation at
//! all). A run of fewer than [`MIN_STEPS`] steps runs eagerly.
//!
//! **When not.** A model whose passes draw noise (a stochastic student: each pass
//! draws fresh seeds on the host, which a replay would repeat) is seen during the
//! eager steps (`rampart_models::noise_seeds_drawn` moved) and runs eagerly. A
//! capture that fails (a read back to the host in the step, an upload the warm-up did
//! not cache, an operation the driver cannot capture) or a replay the driver refuses
//! falls back to eager steps from that step on, logged once per process: capture
//! runs nothing, so the state is still the previous step's. The same result either
//! way (`tests/cuda.rs` holds replayed runs to eager ones on a GPU, bit for bit where
//! the GPU's passes are deterministic).
//!
//! On a GPU with the `cuda` feature, graphs are used when `RAMPART_CUDA_GRAPHS` is
//! set (any value but `0`) on the device-resident loop (`RAMPART_CUDA_DEVICE_ATTACK`),
//! or under [`with_cuda_graphs`]; off by default until verified on a GPU.

use std::cell::{Cell, RefCell};

use crate::error::Result;

/// Fewest steps of a run that captures one: the first runs eagerly, the second is
/// captured and launched, the last runs eagerly, so that at least one more launch
/// replays the graph.
pub(crate) const MIN_STEPS: usize = 4;

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
    static CAPTURES: Cell<usize> = const { Cell::new(0) };
    static LAUNCHES: Cell<usize> = const { Cell::new(0) };
    static FAILURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Why the last capture or replay of a step on this thread failed (its runs went on
/// eagerly), if one did: what the GPU tests and `rampart bench` report.
pub fn cuda_graph_failure() -> Option<String> {
    FAILURE.with(|f| f.borrow().clone())
}

/// CUDA graphs captured and launched (a launch is one step) by PGD's device-resident
/// runs on this thread so far: a caller that compares the counts before and after an
/// attack knows whether its steps were replayed (`rampart bench` reports it, the GPU
/// tests check it).
pub fn cuda_graph_steps() -> (usize, usize) {
    (CAPTURES.with(Cell::get), LAUNCHES.with(Cell::get))
}

/// Runs `f` with CUDA graphs of PGD's device-resident steps taken on this thread
/// wherever the loop runs on a GPU, whatever the environment (tests and benchmarks).
pub fn with_cuda_graphs<R>(f: impl FnOnce() -> R) -> R {
    crate::engine::with_switch(&FORCED, f)
}

/// Whether graphs are asked for on this thread: [`with_cuda_graphs`] or the
/// environment switch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn wanted() -> bool {
    if FORCED.with(Cell::get) {
        return true;
    }
    #[cfg(feature = "cuda")]
    {
        std::env::var_os(rampart_models::kernels::CUDA_GRAPHS_ENV).is_some_and(|v| v != "0")
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// What runs a step's device work as a graph: the CUDA stream in the GPU build, a
/// recording stand-in in the tests (PGD's steps here, the trainer's steps in
/// `rampart-defenses`).
pub trait Recorder {
    /// A captured graph.
    type Graph;
    /// Runs `body` eagerly, caching whatever a later capture of it needs.
    fn warm(&mut self, body: &mut dyn FnMut() -> Result<()>) -> Result<()>;
    /// Records `body`'s device work into a graph without running it.
    fn capture(&mut self, body: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    /// Runs `g` once (what running the captured body would do).
    fn launch(&mut self, g: &Self::Graph) -> Result<()>;
    /// Whether the body itself runs after each launch: a stand-in whose graphs hold
    /// nothing (the tests'); a body's error is then the step's.
    const RUNS_BODY: bool = false;
    /// Clears what a failed capture or launch left behind (recorded driver errors).
    fn recover(&mut self);
    /// Noise seeds drawn so far (a pass that draws them cannot be replayed).
    fn noise(&self) -> usize;
}

enum Phase<G> {
    /// Every step eagerly.
    Eager,
    /// Eager steps that warm the caches; the next middle step is captured.
    Warm,
    /// Middle steps replay this.
    Ready(G),
}

/// The middle steps of one run (steps 0 … `steps` − 2; the last runs on its own).
pub(crate) struct Steps<R: Recorder> {
    /// The recorder (None: every step eagerly).
    rec: Option<R>,
    phase: Phase<R::Graph>,
    /// Noise seeds drawn when the run began.
    noise: usize,
}

impl<R: Recorder> Steps<R> {
    /// The steps of a run of `steps` steps through `rec`, or eager ones if `rec` is
    /// None or the run is too short.
    pub fn new(rec: Option<R>, steps: usize) -> Steps<R> {
        let rec = rec.filter(|_| steps >= MIN_STEPS);
        Steps {
            noise: rec.as_ref().map_or(0, Recorder::noise),
            phase: if rec.is_some() {
                Phase::Warm
            } else {
                Phase::Eager
            },
            rec,
        }
    }

    /// Runs the start's evaluation (eagerly, warming the caches).
    pub fn start(&mut self, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        match (&self.phase, self.rec.as_mut()) {
            (Phase::Warm, Some(rec)) => rec.warm(body),
            _ => body(),
        }
    }

    /// Runs middle step `t` (0-based, not the run's last).
    pub fn step(&mut self, t: usize, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let Some(rec) = self.rec.as_mut() else {
            return body();
        };
        match &self.phase {
            Phase::Eager => body(),
            Phase::Warm if t == 0 => {
                rec.warm(body)?;
                if rec.noise() != self.noise {
                    // The passes draw noise: a replay would repeat this step's draw.
                    self.phase = Phase::Eager;
                }
                Ok(())
            }
            Phase::Warm => match rec.capture(body) {
                Ok(g) => {
                    CAPTURES.with(|c| c.set(c.get() + 1));
                    self.phase = Phase::Ready(g);
                    self.step(t, body)
                }
                Err(e) => {
                    self.give_up("capture", &e);
                    body()
                }
            },
            Phase::Ready(g) => match rec.launch(g) {
                Ok(()) => {
                    LAUNCHES.with(|c| c.set(c.get() + 1));
                    if R::RUNS_BODY {
                        body()
                    } else {
                        Ok(())
                    }
                }
                Err(e) => {
                    self.give_up("replay", &e);
                    body()
                }
            },
        }
    }

    /// Whether the run's middle steps replay a graph now.
    #[cfg(test)]
    pub fn replaying(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    /// Falls back to eager steps after a failed `what`, logged once per process.
    fn give_up(&mut self, what: &str, e: &crate::Error) {
        if let Some(rec) = self.rec.as_mut() {
            rec.recover();
        }
        self.phase = Phase::Eager;
        FAILURE.with(|f| *f.borrow_mut() = Some(format!("{what}: {e}")));
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::warn!(
                "PGD on the device: CUDA graph {what} failed ({e}); these steps run eagerly \
                 (logged once)"
            )
        });
    }
}

/// The recorder of a build without CUDA: none exists.
#[cfg(not(feature = "cuda"))]
pub(crate) enum Never {}

#[cfg(not(feature = "cuda"))]
impl Recorder for Never {
    type Graph = ();
    fn warm(&mut self, _: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        match *self {}
    }
    fn capture(&mut self, _: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        match *self {}
    }
    fn launch(&mut self, _: &()) -> Result<()> {
        match *self {}
    }
    fn recover(&mut self) {
        match *self {}
    }
    fn noise(&self) -> usize {
        match *self {}
    }
}

/// The GPU's recorder: stream capture on the device's stream.
#[cfg(feature = "cuda")]
pub mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream};
    use candle_core::cuda_backend::CudaDevice;

    use crate::error::Result;

    /// Stream capture of a step on `0`'s stream.
    pub struct Stream(pub CudaDevice);

    fn driver(what: &str, e: impl std::fmt::Debug) -> crate::Error {
        crate::Error::Candle(candle_core::Error::Msg(format!("CUDA graph {what}: {e:?}")))
    }

    impl super::Recorder for Stream {
        type Graph = CudaGraph;

        fn warm(&mut self, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
            // Small uploads (candle's layouts, a kernel's parameters) are kept on the
            // device, keyed by their bytes, so that the capture finds them there.
            let _cache = self.0.enable_cuda_graph_htod_cache();
            body()
        }

        fn capture(&mut self, body: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
            let _cache = self.0.enable_cuda_graph_htod_cache();
            let stream = self.0.cuda_stream();
            // Thread-local: this thread's calls that cannot be captured (a synchronous
            // allocation or copy) fail instead of running; other threads are free.
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| driver("capture", e))?;
            // The capture ends whatever the body does, a panic included, so that the
            // stream stays usable.
            struct Ending<'a>(Option<&'a std::sync::Arc<CudaStream>>);
            impl Drop for Ending<'_> {
                fn drop(&mut self) {
                    if let Some(stream) = self.0.take() {
                        let _ = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                    }
                }
            }
            let mut ending = Ending(Some(&stream));
            let run = body();
            ending.0 = None;
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            run?;
            let graph = graph
                .map_err(|e| driver("instantiation", e))?
                .ok_or_else(|| driver("capture", "nothing captured"))?;
            graph.upload().map_err(|e| driver("upload", e))?;
            Ok(graph)
        }

        fn launch(&mut self, g: &CudaGraph) -> Result<()> {
            g.launch().map_err(|e| driver("launch", e))
        }

        fn recover(&mut self) {
            // Frees queued during a failed capture record their errors in the
            // context, where the next checked call would find them.
            let _ = self.0.cuda_stream().context().check_err();
        }

        fn noise(&self) -> usize {
            rampart_models::noise_seeds_drawn()
        }
    }
}

#[cfg(test)]
#[path = "graph_tests.rs"]
pub(crate) mod tests;
