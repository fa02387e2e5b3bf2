//! The kernel launches of the attacks' device loops as data: which kernel of
//! `engine/device.cu`, on how many blocks of how many threads, with which arguments in
//! the kernel's order (tensors by their first element, scalars by value). The CUDA
//! executor queues a [`Launch`] on the GPU (`device_cuda::run`); the tests' emulated
//! executor runs the same [`Launch`] on the CPU (`rampart_models::kernels::emulate`),
//! on the loop's own tensors, written back in place as the GPU would leave them. So
//! the whole device path but the queueing itself, the argument order and the grid of
//! every launch included, runs in `cargo test` and is held to the host loops there.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// One argument of a launch.
// Without CUDA and outside the tests, launches are built but never run (the twins run).
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) enum Val<'a> {
    /// A contiguous tensor, passed as a pointer to its first element (f32, f64 or u32).
    T(&'a Tensor),
    /// A null pointer (an absent optional tensor).
    Null,
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl<'a> From<Option<&'a Tensor>> for Val<'a> {
    fn from(t: Option<&'a Tensor>) -> Val<'a> {
        t.map_or(Val::Null, Val::T)
    }
}

// The kernels index these many values per row (or example) of the loops' scalars.
const _: () = assert!(
    super::device::ROW == 6,
    "PGD's kernels index 6 values per row"
);
const _: () = assert!(
    super::resident::VERDICT == 6,
    "the resident batch's kernels index 6 values per verdict row"
);
const _: () = assert!(
    crate::apgd::device::AROW == 8 && crate::apgd::device::EROW == 3,
    "APGD's kernels index 8 values per row and 3 per example"
);

/// Threads per block of an element-wise launch (cudarc's `LaunchConfig::for_num_elems`).
pub(crate) const ELEMENTWISE_THREADS: u32 = 1024;
/// Threads per block of the per-row and per-example kernels (at most the 256 their
/// shared arrays hold).
pub(crate) const ROW_THREADS: u32 = 256;

/// One launch on `grid` blocks of `block` threads (one dimension each).
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    pub kernel: &'static str,
    /// What the launch does, for errors.
    pub what: &'static str,
    pub grid: u32,
    pub block: u32,
    pub args: Vec<Val<'a>>,
}

/// `n` as a kernel's `unsigned int`, or an error naming `what`.
pub(crate) fn count(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Input(format!("{what}: {n} values are too many")))
}

impl<'a> Launch<'a> {
    /// One thread per value of `n` (at least one block).
    pub fn elementwise(
        kernel: &'static str,
        what: &'static str,
        n: usize,
        args: Vec<Val<'a>>,
    ) -> Result<Launch<'a>> {
        let n = count(n, what)?;
        Ok(Launch {
            kernel,
            what,
            grid: n.div_ceil(ELEMENTWISE_THREADS).max(1),
            block: ELEMENTWISE_THREADS,
            args,
        })
    }

    /// One block of [`ROW_THREADS`] per row of `rows`.
    pub fn per_row(
        kernel: &'static str,
        what: &'static str,
        rows: usize,
        args: Vec<Val<'a>>,
    ) -> Result<Launch<'a>> {
        Ok(Launch {
            kernel,
            what,
            grid: count(rows, what)?,
            block: ROW_THREADS,
            args,
        })
    }
}

/// The emulated executor of the tests: every launch runs on the CPU.
#[cfg(test)]
pub(crate) mod emulated {
    use std::cell::Cell;

    use candle_core::{DType, Tensor};
    use rampart_models::kernels::emulate::{Arg, Emulator};

    use super::{Launch, Val};
    use crate::error::{Error, Result};

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static LAUNCHES: Cell<usize> = const { Cell::new(0) };
    }

    /// Runs `f` with the device loops taken on this thread and their launches
    /// emulated (the CUDA kernels compiled for the CPU) instead of the twins.
    pub fn with_emulated_kernels<R>(f: impl FnOnce() -> R) -> R {
        crate::engine::with_switch(&ON, f)
    }

    /// Whether launches are emulated on this thread.
    pub fn on() -> bool {
        ON.with(Cell::get)
    }

    /// Launches emulated on this thread so far.
    pub fn launches() -> usize {
        LAUNCHES.with(Cell::get)
    }

    /// Runs `l` on the CPU: each tensor argument written to a buffer (from its layout's
    /// offset), the kernel run on the launch's grid, and every buffer written back into
    /// its tensor's storage in place (unchanged values included).
    pub fn run(l: &Launch<'_>) -> Result<()> {
        LAUNCHES.with(|c| c.set(c.get() + 1));
        let mut s = Emulator::of(include_str!("device.cu")).session();
        // Buffer `t{i}` holds the tensor of argument i.
        let mut names: Vec<(String, &Tensor)> = Vec::new();
        let mut args: Vec<Arg<'_>> = Vec::new();
        for (i, v) in l.args.iter().enumerate() {
            if let Val::T(t) = v {
                if !t.is_contiguous() {
                    return Err(Error::Input(format!(
                        "{}: a tensor is not contiguous",
                        l.what
                    )));
                }
                let flat = t.flatten_all()?;
                let name = format!("t{i}");
                match t.dtype() {
                    DType::F32 => s.put(&name, &flat.to_vec1::<f32>()?),
                    DType::F64 => s.put(&name, &flat.to_vec1::<f64>()?),
                    DType::U32 => s.put(&name, &flat.to_vec1::<u32>()?),
                    other => {
                        return Err(Error::Input(format!("{}: a {other:?} tensor", l.what)));
                    }
                };
                names.push((name, *t));
            }
        }
        let mut tensors = names.iter();
        for v in &l.args {
            args.push(match *v {
                Val::T(_) => Arg::B(&tensors.next().expect("one buffer per tensor").0),
                Val::Null => Arg::Null,
                Val::U32(x) => Arg::U32(x),
                Val::I32(x) => Arg::I32(x),
                Val::U64(x) => Arg::U64(x),
                Val::F32(x) => Arg::F32(x),
                Val::F64(x) => Arg::F64(x),
            });
        }
        s.launch(l.kernel, [l.grid, 1, 1], [l.block, 1, 1], &args);
        let out = s.run();
        for (name, t) in &names {
            match t.dtype() {
                DType::F32 => write_back(t, out.get::<f32>(name))?,
                DType::F64 => write_back(t, out.get::<f64>(name))?,
                _ => write_back(t, out.get::<u32>(name))?,
            }
        }
        Ok(())
    }

    /// `values` into `t`'s storage, in place (as the GPU leaves its buffers).
    fn write_back<T: candle_core::WithDType>(t: &Tensor, values: Vec<T>) -> Result<()> {
        let w = Tensor::from_vec(values, t.shape(), t.device())?;
        Ok(t.slice_set(&w, 0, 0)?)
    }
}
