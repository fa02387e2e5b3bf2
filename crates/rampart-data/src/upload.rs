//! Host-to-device copies that do not wait for the device: batches, random starts and
//! other per-step arrays made on the host and needed on a GPU.
//!
//! **Why.** A copy from ordinary (pageable) host memory to a GPU is staged by the
//! driver through page-locked memory of its own, and "the driver may synchronize with
//! the stream" to do so (CUDA's *API synchronization behavior*): the host can wait
//! there for everything queued before the copy, which in a training step is the
//! previous step's work. The host then stops running ahead of the GPU, and every
//! step pays its launch latency again. A copy from page-locked memory is queued and
//! returns at once.
//!
//! **How.** [`tensor`] copies the values into one of [`SLOTS`] page-locked buffers
//! of their length (kept per thread, device, element type and length; the
//! [`MAX_LENGTHS`] lengths used last), queues the copy into a new device buffer on
//! the device's stream and records an event after it. A buffer is written again only
//! after its event has passed: [`SLOTS`] uploads of that length later, when the copy
//! is long done unless the host runs that far ahead, in which case it waits, which is
//! the point. (cudarc records a page-locked buffer's own event only when it manages
//! several streams' synchronisation, which Rampart turns off; without an event of
//! our own, a buffer could be rewritten before the copy that reads it has run.)
//! Copies of fewer than [`STAGED_MIN_BYTES`] bytes go the ordinary way (the driver
//! copies small sources at once), and so does everything on the CPU, on a stream
//! being captured into a CUDA graph, and after a page-locked allocation failed
//! (logged once; the values are the same either way).
//!
//! On a GPU with the `cuda` feature, staging is used when `RAMPART_CUDA_PINNED_UPLOADS`
//! ([`PINNED_UPLOADS_ENV`]) is set (any value but `0`), or under
//! [`with_pinned_uploads`]; off by default until verified on a GPU
//! (`tests/cuda.rs`).

use std::cell::Cell;

use candle_core::{Device, Shape, Tensor, WithDType};

/// The environment switch of staged uploads on a GPU.
pub const PINNED_UPLOADS_ENV: &str = "RAMPART_CUDA_PINNED_UPLOADS";
/// The smallest copy that is staged; smaller ones go the ordinary way.
pub const STAGED_MIN_BYTES: usize = 64 << 10;
/// Page-locked buffers per length: the uploads of one length that can be in flight.
pub const SLOTS: usize = 4;
/// Lengths kept per thread, device and element type (the least recently used beyond
/// them is freed).
pub const MAX_LENGTHS: usize = 4;

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
    static STAGED: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` with staged uploads on this thread wherever a copy goes to a GPU,
/// whatever the environment (tests and benchmarks).
pub fn with_pinned_uploads<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(true)));
    f()
}

/// Uploads staged through page-locked memory on this thread so far (the GPU tests
/// check that the path was taken).
pub fn staged_uploads() -> usize {
    STAGED.with(Cell::get)
}

/// Whether staging is asked for on this thread.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn wanted() -> bool {
    FORCED.with(Cell::get)
        || std::env::var_os(PINNED_UPLOADS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// An element type [`tensor`] uploads (f32, f64, u32).
pub trait Element: WithDType + private::Sealed {}
impl Element for f32 {}
impl Element for f64 {}
impl Element for u32 {}

mod private {
    #[cfg(not(feature = "cuda"))]
    pub trait Sealed {}
    #[cfg(feature = "cuda")]
    pub trait Sealed:
        candle_core::cuda_backend::CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
    {
    }
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for u32 {}
}

/// A tensor of `shape` on `device` holding `values` (row-major): `Tensor::from_vec`,
/// with the copy to a GPU staged through page-locked memory where that applies (see
/// the module docs). The same tensor either way.
pub fn tensor<T: Element>(
    values: Vec<T>,
    shape: impl Into<Shape>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if wanted()
            && shape.elem_count() == values.len()
            && std::mem::size_of_val(values.as_slice()) >= STAGED_MIN_BYTES
        {
            if let Some(slice) = cuda::staged(dev, &values) {
                STAGED.with(|c| c.set(c.get() + 1));
                let storage = candle_core::Storage::Cuda(T::wrap_cuda_slice(slice, dev.clone()));
                return Ok(Tensor::from_storage(
                    storage,
                    shape,
                    candle_core::op::BackpropOp::none(),
                    false,
                ));
            }
        }
    }
    Tensor::from_vec(values, shape, device)
}

/// Where staged copies go: page-locked buffers and the device's stream in the GPU
/// build, a stand-in whose copies run late in the tests.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) trait Stage<T> {
    /// A page-locked buffer and the event of its last copy.
    type Buf;
    /// The device buffer a copy makes.
    type Out;
    /// A buffer of `len` elements.
    fn alloc(&mut self, len: usize) -> candle_core::Result<Self::Buf>;
    /// Waits until `buf`'s last copy has run, then writes `values` into it.
    fn fill(&mut self, buf: &mut Self::Buf, values: &[T]) -> candle_core::Result<()>;
    /// Queues the copy of `buf` into a new device buffer, marking `buf` busy until it
    /// has run.
    fn send(&mut self, buf: &mut Self::Buf) -> candle_core::Result<Self::Out>;
}

/// The buffers of one length.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Slots<B> {
    len: usize,
    bufs: Vec<B>,
    next: usize,
}

/// Page-locked buffers by length, the most recently used length first.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Ring<T, S: Stage<T>> {
    stage: S,
    lengths: Vec<Slots<S::Buf>>,
    _t: std::marker::PhantomData<T>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl<T, S: Stage<T>> Ring<T, S> {
    pub fn new(stage: S) -> Self {
        Self {
            stage,
            lengths: Vec::new(),
            _t: std::marker::PhantomData,
        }
    }

    /// Copies `values` to the device through the next buffer of their length.
    pub fn upload(&mut self, values: &[T]) -> candle_core::Result<S::Out> {
        let len = values.len();
        let at = match self.lengths.iter().position(|s| s.len == len) {
            Some(at) => at,
            None => {
                if self.lengths.len() == MAX_LENGTHS {
                    // Dropping a buffer waits for its copy.
                    self.lengths.pop();
                }
                self.lengths.push(Slots {
                    len,
                    bufs: Vec::with_capacity(SLOTS),
                    next: 0,
                });
                self.lengths.len() - 1
            }
        };
        self.lengths[..=at].rotate_right(1);
        let slots = &mut self.lengths[0];
        if slots.bufs.len() < SLOTS {
            let buf = self.stage.alloc(len)?;
            slots.bufs.push(buf);
            slots.next = slots.bufs.len() - 1;
        }
        let buf = &mut slots.bufs[slots.next];
        self.stage.fill(buf, values)?;
        let out = self.stage.send(buf)?;
        slots.next = (slots.next + 1) % SLOTS;
        Ok(out)
    }

    /// (length, buffers) of each length kept, the most recent first.
    #[cfg(test)]
    pub fn kept(&self) -> Vec<(usize, usize)> {
        self.lengths.iter().map(|s| (s.len, s.bufs.len())).collect()
    }
}

#[cfg(feature = "cuda")]
// Page-locked memory comes uninitialised from the driver (written before every copy
// here), and a stream-ordered device allocation is written by the copy queued right
// after it: the two `unsafe` calls of cudarc.
#[allow(unsafe_code)]
mod cuda {
    use std::any::{Any, TypeId};
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::marker::PhantomData;

    use candle_core::cuda_backend::cudarc::driver::{
        sys, CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};

    use super::{Ring, Stage};

    /// A page-locked buffer and the event recorded after its last copy.
    pub(crate) struct Pinned<T> {
        host: PinnedHostSlice<T>,
        done: CudaEvent,
    }

    impl<T> Drop for Pinned<T> {
        fn drop(&mut self) {
            // Freed only after its last copy has read it (cudarc's own drop waits on
            // an event it never recorded here).
            let _ = self.done.synchronize();
        }
    }

    /// Copies on one device's stream.
    pub(crate) struct Stream<T> {
        dev: CudaDevice,
        _t: PhantomData<T>,
    }

    impl<T: DeviceRepr + ValidAsZeroBits + Copy> Stage<T> for Stream<T> {
        type Buf = Pinned<T>;
        type Out = CudaSlice<T>;

        fn alloc(&mut self, len: usize) -> candle_core::Result<Pinned<T>> {
            let stream = self.dev.cuda_stream();
            let ctx = stream.context();
            // Write-combined: fast for the host to write, which is all it does here.
            // SAFETY: the buffer is written whole (`fill`) before any copy reads it.
            let host = unsafe { ctx.alloc_pinned::<T>(len) }.w()?;
            let done = ctx.new_event(None).w()?;
            Ok(Pinned { host, done })
        }

        fn fill(&mut self, buf: &mut Pinned<T>, values: &[T]) -> candle_core::Result<()> {
            buf.done.synchronize().w()?;
            buf.host.as_mut_slice().w()?.copy_from_slice(values);
            Ok(())
        }

        fn send(&mut self, buf: &mut Pinned<T>) -> candle_core::Result<CudaSlice<T>> {
            let stream = self.dev.cuda_stream();
            // SAFETY: the copy queued next on the same stream writes it whole.
            let mut out = unsafe { stream.alloc::<T>(buf.host.len()) }.w()?;
            stream.memcpy_htod(&buf.host, &mut out).w()?;
            buf.done.record(&stream).w()?;
            Ok(out)
        }
    }

    thread_local! {
        /// Rings by (device, element type). A device is one stream (`Device::new_cuda`
        /// makes a new one each call): a ring's copies go on its device's stream, in
        /// order with that device's work.
        static RINGS: RefCell<HashMap<(DeviceId, TypeId), Box<dyn Any>>> = RefCell::new(HashMap::new());
        /// Devices whose staging failed on this thread.
        static REFUSED: RefCell<Vec<DeviceId>> = const { RefCell::new(Vec::new()) };
    }

    fn capturing(stream: &CudaStream) -> bool {
        !matches!(
            stream.capture_status(),
            Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
        )
    }

    /// `values` copied to `dev` through page-locked memory, or None where the copy
    /// should go the ordinary way (a capture under way, staging refused before).
    pub(super) fn staged<T>(dev: &CudaDevice, values: &[T]) -> Option<CudaSlice<T>>
    where
        T: DeviceRepr + ValidAsZeroBits + Copy + 'static,
    {
        let id = dev.id();
        if REFUSED.with(|r| r.borrow().contains(&id)) || capturing(&dev.cuda_stream()) {
            return None;
        }
        let key = (id, TypeId::of::<T>());
        let result = RINGS.with(|rings| {
            let mut rings = rings.borrow_mut();
            let ring = rings.entry(key).or_insert_with(|| {
                Box::new(Ring::<T, Stream<T>>::new(Stream {
                    dev: dev.clone(),
                    _t: PhantomData,
                }))
            });
            ring.downcast_mut::<Ring<T, Stream<T>>>()
                .map(|ring| ring.upload(values))
        })?;
        match result {
            Ok(slice) => Some(slice),
            Err(e) => {
                REFUSED.with(|r| r.borrow_mut().push(id));
                // A failed call may have left its error in the context.
                let _ = dev.cuda_stream().context().check_err();
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    tracing::warn!(
                        "staged uploads to the GPU failed ({e}); copies go the ordinary way \
                         (logged once)"
                    )
                });
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestResult;

    /// A device whose copies run late: a queued copy reads its buffer only when
    /// `fill` waits on that buffer or when the test drains the queue, as a DMA engine
    /// busy with earlier work would. A buffer written while its copy is queued (what
    /// the ring must never do) gives that copy the new values.
    #[derive(Default)]
    struct Late {
        /// Per buffer id, its host values.
        host: Vec<Vec<f32>>,
        /// Queued copies: (buffer id, output id).
        queue: Vec<(usize, usize)>,
        /// Per output id, what its copy delivered (None: not yet run).
        out: Vec<Option<Vec<f32>>>,
        allocs: usize,
        waits: usize,
    }

    impl Late {
        fn run(&mut self, buf: Option<usize>) {
            let host = &self.host;
            let out = &mut self.out;
            self.queue.retain(|&(b, o)| {
                if buf.is_none_or(|id| id == b) {
                    out[o] = Some(host[b].clone());
                    false
                } else {
                    true
                }
            });
        }
    }

    impl Stage<f32> for &mut Late {
        type Buf = usize;
        type Out = usize;
        fn alloc(&mut self, len: usize) -> candle_core::Result<usize> {
            self.allocs += 1;
            self.host.push(vec![f32::NAN; len]);
            Ok(self.host.len() - 1)
        }
        fn fill(&mut self, buf: &mut usize, values: &[f32]) -> candle_core::Result<()> {
            if self.queue.iter().any(|&(b, _)| b == *buf) {
                self.waits += 1;
            }
            self.run(Some(*buf));
            self.host[*buf].copy_from_slice(values);
            Ok(())
        }
        fn send(&mut self, buf: &mut usize) -> candle_core::Result<usize> {
            self.out.push(None);
            self.queue.push((*buf, self.out.len() - 1));
            Ok(self.out.len() - 1)
        }
    }

    /// Every upload delivers its own values, however late the copies run, through at
    /// most SLOTS buffers per length; a buffer is rewritten only after its copy ran;
    /// lengths beyond MAX_LENGTHS drop the least recently used.
    #[test]
    fn staged_copies_deliver_their_values_however_late_they_run() -> TestResult {
        let mut late = Late::default();
        let mut sent = Vec::new();
        {
            let mut ring = Ring::<f32, &mut Late>::new(&mut late);
            // Three lengths interleaved, 11 uploads each, nothing run in between.
            for i in 0..33 {
                let len = [5, 7, 5, 9][i % 4];
                let values: Vec<f32> = (0..len).map(|j| (100 * i + j) as f32).collect();
                let out = ring.upload(&values)?;
                sent.push((out, values));
            }
            assert_eq!(ring.kept(), vec![(5, 4), (9, 4), (7, 4)]);
            // Two more lengths: the least recently used (7) goes.
            ring.upload(&[1.0; 3])?;
            ring.upload(&[2.0; 4])?;
            assert_eq!(ring.kept(), vec![(4, 1), (3, 1), (5, 4), (9, 4)]);
        }
        late.run(None);
        for (out, values) in &sent {
            assert_eq!(late.out[*out].as_ref(), Some(values), "upload {out}");
        }
        assert_eq!(late.allocs, 3 * SLOTS + 2);
        // Every reuse of a buffer found its copy still queued (none had run).
        assert_eq!(late.waits, 33 - 3 * SLOTS);
        Ok(())
    }

    /// Off a GPU (and for copies too small to stage) `tensor` is `Tensor::from_vec`.
    #[test]
    fn tensor_is_from_vec_on_the_cpu() -> TestResult {
        let values: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.5).collect();
        let before = staged_uploads();
        let t = with_pinned_uploads(|| tensor(values.clone(), (100, 400), &Device::Cpu))?;
        assert_eq!(t.dims(), &[100, 400]);
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, values);
        let wide: Vec<f64> = vec![0.25; 12];
        assert_eq!(
            tensor(wide.clone(), 12, &Device::Cpu)?.to_vec1::<f64>()?,
            wide
        );
        assert!(tensor(vec![1u32, 2], 3, &Device::Cpu).is_err());
        assert_eq!(staged_uploads(), before);
        Ok(())
    }
}
