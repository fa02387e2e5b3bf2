//! The launches of this crate's own CUDA kernels as data: which kernel of which
//! source, on how many blocks of how many threads, with which arguments in the
//! kernel's order. The launch code of the fused programs (`device_eval`,
//! `device_train`) is written once over a [`Launcher`], the part of an executor that
//! turns its buffers into arguments and queues a launch: the CUDA executor queues it
//! on the GPU, and the tests' emulated executor runs the same launch on the CPU
//! ([`super::emulate`]), so the argument order, the grid and the choice of kernel of
//! every launch the programs make run in `cargo test` and are held there to the CPU
//! executor (the kernels' twins). The ops of the layer-by-layer path build theirs
//! with one function each (`relu_mask_launch`, …), which their CUDA code queues
//! ([`cuda::run`]) and their emulated tests run. What only a GPU checks is the
//! queueing itself.

// Without CUDA the launches run only in the tests (the emulated executor).
#![cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]

use std::ops::Range;

use candle_core::{Result, Tensor};

use super::conv::{ConvShape, Pass};
use super::device_train::{TConv, TNorm};

/// The CUDA C source a kernel is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// `device_eval.cu`: the fused programs' kernels.
    Programs,
    /// `ops.cu`: the pointwise kernels of the layer-by-layer path.
    Ops,
}

impl Source {
    /// The kernels' source.
    // Read by the emulated executor of the tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn code(self) -> &'static str {
        match self {
            Source::Programs => include_str!("device_eval.cu"),
            Source::Ops => include_str!("ops.cu"),
        }
    }
}

/// One argument of a launch: an executor's handle to (part of) a buffer, or a scalar.
#[derive(Debug)]
pub(crate) enum KArg<A> {
    /// A pointer to the first value of the handle's part.
    B(A),
    /// A null pointer (an optional buffer the kernel does not read).
    Null,
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
}

/// Threads per block of an element-wise launch (cudarc's
/// `LaunchConfig::for_num_elems`).
pub(crate) const ELEMENTWISE_THREADS: u32 = 1024;

/// One launch of `kernel` of `source` on `grid` blocks of `block` threads (one
/// dimension each).
#[derive(Debug)]
pub(crate) struct KLaunch<A> {
    pub source: Source,
    pub kernel: &'static str,
    pub grid: u32,
    pub block: u32,
    pub args: Vec<KArg<A>>,
}

/// `n` as a kernel's `unsigned int`, or an error naming `what`.
pub(crate) fn count(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{what}: {n} values are too many")))
}

impl<A> KLaunch<A> {
    /// One thread per value of `n` in blocks of [`ELEMENTWISE_THREADS`] (at least one
    /// block).
    pub fn elementwise(
        source: Source,
        kernel: &'static str,
        n: usize,
        args: Vec<KArg<A>>,
    ) -> Result<Self> {
        let n = count(n, kernel)?;
        Ok(KLaunch {
            source,
            kernel,
            grid: n.max(1).div_ceil(ELEMENTWISE_THREADS),
            block: ELEMENTWISE_THREADS,
            args,
        })
    }

    /// [`KLaunch::elementwise`] of a kernel of the fused programs' `device_eval.cu`.
    pub fn programs(kernel: &'static str, n: usize, args: Vec<KArg<A>>) -> Result<Self> {
        Self::elementwise(Source::Programs, kernel, n, args)
    }

    /// [`KLaunch::elementwise`] of a kernel of `ops.cu`.
    pub fn ops(kernel: &'static str, n: usize, args: Vec<KArg<A>>) -> Result<Self> {
        Self::elementwise(Source::Ops, kernel, n, args)
    }

    /// `grid` blocks of `block` threads.
    pub fn blocks(
        source: Source,
        kernel: &'static str,
        grid: usize,
        block: u32,
        args: Vec<KArg<A>>,
    ) -> Result<Self> {
        Ok(KLaunch {
            source,
            kernel,
            grid: count(grid, kernel)?,
            block,
            args,
        })
    }
}

/// What the programs' launch code needs of an executor: its buffers, handles to them
/// (whole or a range, read or written) and to tensors' values, and the launch
/// itself.
pub(crate) trait Launcher {
    /// A buffer of f32 values on the executor's device.
    type Buf: Send + Sync + 'static;
    /// A handle to (part of) a buffer or a tensor, alive for one launch.
    type Arg<'a>
    where
        Self: 'a;

    /// A buffer of `n` values, each written before it is read.
    fn alloc(&self, n: usize) -> Result<Self::Buf>;
    /// Values in `b`.
    fn size(b: &Self::Buf) -> usize;
    /// Values `r` of `b`, which the kernel reads.
    fn read<'a>(&'a self, b: &'a Self::Buf, r: Range<usize>) -> Result<Self::Arg<'a>>;
    /// Values `r` of `b`, which the kernel writes (and may read).
    fn write<'a>(&'a self, b: &'a mut Self::Buf, r: Range<usize>) -> Result<Self::Arg<'a>>;
    /// The first `n` values of the contiguous f32 tensor `t` (`what` names it in
    /// errors), which the kernel reads.
    fn tensor<'a>(&'a self, t: &'a Tensor, n: usize, what: &'static str) -> Result<Self::Arg<'a>>;
    /// Queues (or runs) `l`.
    fn run(&self, l: KLaunch<Self::Arg<'_>>) -> Result<()>;

    /// All of `b`, read.
    fn all<'a>(&'a self, b: &'a Self::Buf) -> Result<Self::Arg<'a>> {
        self.read(b, 0..Self::size(b))
    }

    /// All of `b`, written.
    fn all_mut<'a>(&'a self, b: &'a mut Self::Buf) -> Result<Self::Arg<'a>> {
        let n = Self::size(b);
        self.write(b, 0..n)
    }
}

/// An executor of the fused programs whose own kernels are launches (the CUDA one and
/// the tests' emulated one): what it does besides launching them, namely the
/// convolutions, a kernel's reordering, a student's noise, cuDNN's train-mode
/// BatchNorm and copies. Its [`super::device_eval::Exec`] and
/// [`super::device_train::TrainExec`] are these and the shared launch code
/// (`device_eval_launch.rs`, `device_train_launch.rs`), written once for both.
pub(crate) trait Backend: Launcher {
    /// [`super::device_eval::Exec::kernel`].
    fn krsc(&self, w: &Tensor) -> Result<Self::Buf>;
    /// [`super::device_eval::Exec::conv`].
    fn convolve(
        &self,
        pass: Pass,
        g: &ConvShape,
        a: &Self::Buf,
        kernel: &Self::Buf,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// [`super::device_eval::Exec::draw_noise`].
    fn noise(&self, seed: u64, first: u64, images: usize, len: usize) -> Result<Self::Buf>;
    /// [`super::device_train::TrainExec::copy`].
    fn duplicate(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// [`super::device_train::TrainExec::put`].
    fn place(&self, dst: &mut Self::Buf, at: usize, src: &Self::Buf) -> Result<()>;
    /// [`super::device_train::TrainExec::buffer_zeroed`].
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// [`super::device_train::TrainExec::kernel_at`].
    fn krsc_at(&self, p: &Self::Buf, conv: &TConv) -> Result<Self::Buf>;
    /// [`super::device_train::TrainExec::filter_into`].
    fn filter(
        &self,
        g: &ConvShape,
        x: &Self::Buf,
        dy: &Self::Buf,
        grad: &mut Self::Buf,
        at: usize,
    ) -> Result<()>;
    /// [`super::device_train::TrainExec::bn_train_part`].
    fn bn_part(
        &self,
        x: &Self::Buf,
        y: &mut Self::Buf,
        rows: (usize, usize),
        p: &Self::Buf,
        n: &TNorm,
        at: (usize, usize),
    ) -> Result<Self::Buf>;
    /// [`super::device_train::TrainExec::bn_train_part_backward`].
    #[allow(clippy::too_many_arguments)]
    fn bn_part_backward(
        &self,
        x: &Self::Buf,
        d: &Self::Buf,
        dx: &mut Self::Buf,
        rows: (usize, usize),
        p: &Self::Buf,
        n: &TNorm,
        at: (usize, usize),
        stats: &Self::Buf,
    ) -> Result<Self::Buf>;
}

/// `r` checked to lie in a buffer of `len` values.
#[cfg_attr(not(any(test, feature = "cudnn")), allow(dead_code))]
pub(crate) fn within(r: &Range<usize>, len: usize, what: &str) -> Result<()> {
    if r.start > r.end || r.end > len {
        candle_core::bail!("{what}: values {}..{} of a buffer of {len}", r.start, r.end)
    }
    Ok(())
}

/// The CUDA side: handles to device memory, launches queued on the device's stream.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub(crate) mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{Layout, Result, Storage};

    use super::super::cuda::{f32_view, launch_error};
    use super::{KArg, KLaunch, Source};

    /// A CUDA launch argument.
    pub(crate) enum CudaArg<'a> {
        /// f32 device memory the kernel reads.
        View(CudaView<'a, f32>),
        /// u32 device memory the kernel reads (labels).
        ViewU32(CudaView<'a, u32>),
        /// bf16 device memory the kernel reads.
        ViewBf16(CudaView<'a, half::bf16>),
        /// f32 device memory the kernel writes.
        Mut(CudaViewMut<'a, f32>),
        /// bf16 device memory the kernel writes.
        MutBf16(CudaViewMut<'a, half::bf16>),
        /// A tensor's storage, held for reading until the launch is queued, and how
        /// many of its f32 values the kernel reads (the fused programs' operands).
        #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
        Tensor(Guard<'a>, &'a Layout, usize, &'static str),
    }

    /// A tensor storage's read guard.
    pub(crate) type Guard<'a> = candle_core::StorageRef<'a>;

    /// A launch argument with tensors' storage guards set aside.
    enum Slot<'a> {
        Arg(CudaArg<'a>),
        /// The view of guard i.
        Tensor(usize),
        Null,
        U32(u32),
        I32(i32),
        U64(u64),
        F32(f32),
    }

    /// Queues `l` on `dev`'s stream.
    pub(crate) fn run(dev: &CudaDevice, l: KLaunch<CudaArg<'_>>) -> Result<()> {
        let KLaunch {
            source,
            kernel,
            grid,
            block,
            args,
        } = l;
        // The tensors' guards first, then their views (which borrow them), then the
        // arguments in order.
        let mut guards = Vec::new();
        let mut slots: Vec<Slot<'_>> = args
            .into_iter()
            .map(|a| match a {
                KArg::B(CudaArg::Tensor(g, l, n, what)) => {
                    guards.push(((g, l), n, what));
                    Slot::Tensor(guards.len() - 1)
                }
                KArg::B(a) => Slot::Arg(a),
                KArg::Null => Slot::Null,
                KArg::U32(x) => Slot::U32(x),
                KArg::I32(x) => Slot::I32(x),
                KArg::U64(x) => Slot::U64(x),
                KArg::F32(x) => Slot::F32(x),
            })
            .collect();
        let views = guards
            .iter()
            .map(|((g, l), n, what)| match &**g {
                Storage::Cuda(s) => f32_view(s, l, *n, what),
                _ => candle_core::bail!("{kernel}: {what} is not on the GPU"),
            })
            .collect::<Result<Vec<_>>>()?;
        let module = match source {
            #[cfg(feature = "cudnn")]
            Source::Programs => &super::super::device_eval::cuda::KERNELS_MODULE,
            #[cfg(not(feature = "cudnn"))]
            Source::Programs => candle_core::bail!("{kernel}: a build without cuDNN"),
            Source::Ops => &super::super::pointwise::OPS,
        };
        let func = module.func(dev, kernel)?;
        let null = 0u64;
        let mut b = func.builder();
        for s in &mut slots {
            match s {
                Slot::Arg(CudaArg::View(v)) => b.arg(&*v),
                Slot::Arg(CudaArg::ViewU32(v)) => b.arg(&*v),
                Slot::Arg(CudaArg::ViewBf16(v)) => b.arg(&*v),
                Slot::Arg(CudaArg::Mut(v)) => b.arg(v),
                Slot::Arg(CudaArg::MutBf16(v)) => b.arg(v),
                Slot::Arg(CudaArg::Tensor(..)) => unreachable!("set aside above"),
                Slot::Tensor(i) => b.arg(&views[*i]),
                Slot::Null => b.arg(&null),
                Slot::U32(x) => b.arg(&*x),
                Slot::I32(x) => b.arg(&*x),
                Slot::U64(x) => b.arg(&*x),
                Slot::F32(x) => b.arg(&*x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's, in its order (the tests' emulated
        // executor runs the same launches against the kernels' source); every pointer
        // is a checked range of its buffer or the first values of a tensor's
        // contiguous storage, as many as the kernel indexes on this grid (each
        // launch's construction checks the lengths).
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;
        Ok(())
    }

    /// The fused programs' executor on a GPU.
    #[cfg(feature = "cudnn")]
    mod exec {
        use std::ops::Range;

        use candle_core::{Result, Tensor};

        use super::super::super::device_eval::cuda::{CudaExec, Slice};
        use super::super::{within, KLaunch, Launcher};
        use super::CudaArg;

        impl Launcher for CudaExec {
            type Buf = Slice;
            type Arg<'a> = CudaArg<'a>;

            fn alloc(&self, n: usize) -> Result<Slice> {
                super::super::super::cuda::uninit(&self.dev, n)
            }

            fn size(b: &Slice) -> usize {
                b.len()
            }

            fn read<'a>(&'a self, b: &'a Slice, r: Range<usize>) -> Result<CudaArg<'a>> {
                within(&r, b.len(), "fused GPU program")?;
                Ok(CudaArg::View(b.slice(r)))
            }

            fn write<'a>(&'a self, b: &'a mut Slice, r: Range<usize>) -> Result<CudaArg<'a>> {
                within(&r, b.len(), "fused GPU program")?;
                Ok(CudaArg::Mut(b.slice_mut(r)))
            }

            fn tensor<'a>(
                &'a self,
                t: &'a Tensor,
                n: usize,
                what: &'static str,
            ) -> Result<CudaArg<'a>> {
                let (g, l) = t.storage_and_layout();
                Ok(CudaArg::Tensor(g, l, n, what))
            }

            fn run(&self, l: KLaunch<CudaArg<'_>>) -> Result<()> {
                super::run(&self.dev, l)
            }
        }
    }
}

#[cfg(test)]
#[path = "launch_emulated.rs"]
pub(crate) mod emulated;
