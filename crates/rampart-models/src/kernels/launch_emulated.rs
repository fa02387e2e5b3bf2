//! The tests' emulated executor: the fused programs with every launch of their own
//! kernels built by the launch code the CUDA executor runs
//! (`device_eval_launch.rs`, `device_train_launch.rs`) and run on the CPU by the
//! kernels' emulator; the convolutions, the kernels' reordering and cuDNN's
//! train-mode BatchNorm are the CPU executor's (they are not Rampart's kernels). So
//! a program on this executor equals the program on the CPU executor (the kernels'
//! twins) bit for bit exactly when every launch names the right kernel, with the
//! right arguments in the right order, on a grid that covers its values.

use std::cell::Cell;
use std::ops::Range;

use candle_core::{Result, Tensor};

use super::{within, Backend, KArg, KLaunch, Launcher};
use crate::kernels::conv::{ConvShape, Pass};
use crate::kernels::device_eval::{CpuExec, Exec};
use crate::kernels::device_train::{TConv, TNorm, TrainExec};
use crate::kernels::emulate::{bits, Arg, Emulator};

/// The emulated executor (f32 buffers on the host, like the CPU executor's).
pub(crate) struct EmuExec;

/// An emulated launch argument.
pub(crate) enum EmuArg<'a> {
    /// Values the kernel reads (a copy; the launch fails if the kernel writes them).
    Read(Vec<f32>),
    /// Values the kernel writes, written back after the launch.
    Write(&'a mut [f32]),
    /// u32 values the kernel reads (labels).
    ReadU32(Vec<u32>),
    /// 16-bit values (bf16 bits) the kernel reads.
    ReadU16(Vec<u16>),
    /// 16-bit values (bf16 bits) the kernel writes.
    WriteU16(&'a mut [u16]),
}

thread_local! {
    static LAUNCHES: Cell<usize> = const { Cell::new(0) };
    static REORDERS: Cell<usize> = const { Cell::new(0) };
}

/// Kernels this thread's emulated executor put in KRSC order so far.
pub(crate) fn reorders() -> usize {
    REORDERS.with(Cell::get)
}

/// Launches emulated on this thread so far.
pub(crate) fn launches() -> usize {
    LAUNCHES.with(Cell::get)
}

impl Launcher for EmuExec {
    type Buf = Vec<f32>;
    type Arg<'a> = EmuArg<'a>;

    fn alloc(&self, n: usize) -> Result<Vec<f32>> {
        CpuExec.buffer(n)
    }

    fn size(b: &Vec<f32>) -> usize {
        b.len()
    }

    fn read<'a>(&'a self, b: &'a Vec<f32>, r: Range<usize>) -> Result<EmuArg<'a>> {
        within(&r, b.len(), "emulated program")?;
        Ok(EmuArg::Read(b[r].to_vec()))
    }

    fn write<'a>(&'a self, b: &'a mut Vec<f32>, r: Range<usize>) -> Result<EmuArg<'a>> {
        within(&r, b.len(), "emulated program")?;
        Ok(EmuArg::Write(&mut b[r]))
    }

    fn tensor<'a>(&'a self, t: &'a Tensor, n: usize, what: &'static str) -> Result<EmuArg<'a>> {
        if !t.is_contiguous() {
            candle_core::bail!("emulated program: {what} is not contiguous")
        }
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        if v.len() < n {
            candle_core::bail!("emulated program: {what} holds {} values, not {n}", v.len())
        }
        Ok(EmuArg::Read(v[..n].to_vec()))
    }

    fn run(&self, l: KLaunch<EmuArg<'_>>) -> Result<()> {
        LAUNCHES.with(|c| c.set(c.get() + 1));
        let mut s = Emulator::of(l.source.code()).session();
        let names: Vec<String> = (0..l.args.len()).map(|i| format!("a{i}")).collect();
        let mut args = Vec::with_capacity(l.args.len());
        for (a, name) in l.args.iter().zip(&names) {
            args.push(match a {
                KArg::B(a) => {
                    match a {
                        EmuArg::Read(v) => s.put(name, v),
                        EmuArg::Write(v) => s.put(name, v),
                        EmuArg::ReadU32(v) => s.put(name, v),
                        EmuArg::ReadU16(v) => s.put(name, v),
                        EmuArg::WriteU16(v) => s.put(name, v),
                    };
                    Arg::B(name)
                }
                KArg::Null => Arg::Null,
                KArg::U32(x) => Arg::U32(*x),
                KArg::I32(x) => Arg::I32(*x),
                KArg::U64(x) => Arg::U64(*x),
                KArg::F32(x) => Arg::F32(*x),
            });
        }
        s.launch(l.kernel, [l.grid, 1, 1], [l.block, 1, 1], &args);
        let out = s.run();
        for (i, (a, name)) in l.args.into_iter().zip(&names).enumerate() {
            let unchanged = match a {
                KArg::B(EmuArg::Write(dst)) => {
                    dst.copy_from_slice(&out.get::<f32>(name));
                    true
                }
                KArg::B(EmuArg::WriteU16(dst)) => {
                    dst.copy_from_slice(&out.get::<u16>(name));
                    true
                }
                KArg::B(EmuArg::Read(v)) => bits(&out.get::<f32>(name)) == bits(&v),
                KArg::B(EmuArg::ReadU32(v)) => out.get::<u32>(name) == v,
                KArg::B(EmuArg::ReadU16(v)) => out.get::<u16>(name) == v,
                _ => true,
            };
            if !unchanged {
                candle_core::bail!("{}: argument {i}, passed to be read, was written", l.kernel)
            }
        }
        Ok(())
    }
}

impl Backend for EmuExec {
    fn krsc(&self, w: &Tensor) -> Result<Vec<f32>> {
        REORDERS.with(|c| c.set(c.get() + 1));
        Ok(std::sync::Arc::unwrap_or_clone(CpuExec.kernel(w)?))
    }

    fn convolve(
        &self,
        pass: Pass,
        g: &ConvShape,
        a: &Vec<f32>,
        kernel: &Vec<f32>,
        out: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        CpuExec.conv(pass, g, a, kernel, out, accumulate)
    }

    fn noise(&self, seed: u64, first: u64, images: usize, len: usize) -> Result<Vec<f32>> {
        CpuExec.draw_noise(seed, first, images, len)
    }

    fn duplicate(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        CpuExec.copy(x)
    }

    fn place(&self, dst: &mut Vec<f32>, at: usize, src: &Vec<f32>) -> Result<()> {
        CpuExec.put(dst, at, src)
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        CpuExec.buffer_zeroed(n)
    }

    fn krsc_at(&self, p: &Vec<f32>, conv: &TConv) -> Result<Vec<f32>> {
        CpuExec.kernel_at(p, conv)
    }

    fn filter(
        &self,
        g: &ConvShape,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        grad: &mut Vec<f32>,
        at: usize,
    ) -> Result<()> {
        CpuExec.filter_into(g, x, dy, grad, at)
    }

    fn bn_part(
        &self,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        rows: (usize, usize),
        p: &Vec<f32>,
        n: &TNorm,
        at: (usize, usize),
    ) -> Result<Vec<f32>> {
        CpuExec.bn_train_part(x, y, rows, p, n, at)
    }

    fn bn_part_backward(
        &self,
        x: &Vec<f32>,
        d: &Vec<f32>,
        dx: &mut Vec<f32>,
        rows: (usize, usize),
        p: &Vec<f32>,
        n: &TNorm,
        at: (usize, usize),
        stats: &Vec<f32>,
    ) -> Result<Vec<f32>> {
        CpuExec.bn_train_part_backward(x, d, dx, rows, p, n, at, stats)
    }
}

/// `a` and `b` the same bits, or a failure naming the first value that differs.
pub(crate) fn same_bits(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: value {i} of {} is {} and {}", a.len(), a[i], b[i]);
    }
}
