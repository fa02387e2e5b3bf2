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

use super::{within, KArg, KLaunch, Launcher};
use crate::kernels::conv::{ConvShape, Pass};
use crate::kernels::device_eval::{launches, CpuExec, DNorm, Exec};
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
}

/// Launches emulated on this thread so far.
pub(crate) fn launches() -> usize {
    LAUNCHES.with(Cell::get)
}

impl Launcher for EmuExec {
    type Arg<'a> = EmuArg<'a>;

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

impl Exec for EmuExec {
    type Buf = Vec<f32>;

    fn buffer(&self, n: usize) -> Result<Vec<f32>> {
        CpuExec.buffer(n)
    }

    fn len(b: &Vec<f32>) -> usize {
        b.len()
    }

    fn kernel(&self, w: &Tensor) -> Result<Vec<f32>> {
        CpuExec.kernel(w)
    }

    fn conv(
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

    fn draw_noise(&self, seed: u64, first: u64, images: usize, len: usize) -> Result<Vec<f32>> {
        CpuExec.draw_noise(seed, first, images, len)
    }

    fn bn_relu(
        &self,
        n: &DNorm,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        c: usize,
        z: Option<&Vec<f32>>,
    ) -> Result<()> {
        launches::bn_relu(self, n, x, y, c, z)
    }

    fn bn_relu_in_place(
        &self,
        n: &DNorm,
        y: &mut Vec<f32>,
        c: usize,
        z: Option<&Vec<f32>>,
    ) -> Result<()> {
        launches::bn_relu_in_place(self, n, y, c, z)
    }

    fn bn_add_relu(
        &self,
        n: &DNorm,
        out: &mut Vec<f32>,
        skip: &Vec<f32>,
        skip_norm: Option<&DNorm>,
        c: usize,
    ) -> Result<()> {
        launches::bn_add_relu(self, n, out, skip, skip_norm, c)
    }

    fn add_relu_backward(
        &self,
        n: &DNorm,
        d: &mut Vec<f32>,
        y: &Vec<f32>,
        skip_norm: Option<&DNorm>,
        c: usize,
    ) -> Result<Vec<f32>> {
        let mut d2 = self.buffer(d.len().max(1))?;
        launches::add_relu_backward(self, n, &mut d2, d, y, skip_norm, c)?;
        Ok(d2)
    }

    fn bn_relu_backward(
        &self,
        n: &DNorm,
        d: &mut Vec<f32>,
        y: &Vec<f32>,
        residual: Option<&Vec<f32>>,
        c: usize,
    ) -> Result<()> {
        launches::bn_relu_backward(self, n, d, y, residual, c)
    }

    fn pool_linear(
        &self,
        x: &Vec<f32>,
        fc: &(Tensor, Tensor),
        hw: usize,
        c: usize,
    ) -> Result<Vec<f32>> {
        let (k, _) = fc.0.dims2()?;
        Ok(launches::pool_linear(self, x, launches::Fc::Tensors(fc), hw, c, k)?.1)
    }

    fn linear_pool_backward(
        &self,
        dl: &Vec<f32>,
        fc: &(Tensor, Tensor),
        hw: usize,
        c: usize,
    ) -> Result<Vec<f32>> {
        let (k, _) = fc.0.dims2()?;
        launches::linear_pool_backward(self, dl, launches::Fc::Tensors(fc), hw, c, k)
    }
}

/// `a` and `b` the same bits, or a failure naming the first value that differs.
pub(crate) fn same_bits(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: value {i} of {} is {} and {}", a.len(), a[i], b[i]);
    }
}
