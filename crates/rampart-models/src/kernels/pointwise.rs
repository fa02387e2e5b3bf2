//! The small operations around cuDNN's BatchNorm, each one kernel on CUDA (source:
//! `ops.cu`) with its CPU twin here, which is what the CUDA kernel is tested against:
//!
//! * [`ReluMask`]: dy·[y > 0], the gradient through a ReLU whose output is y;
//! * [`BnEvalBackward`]: the input gradient of an eval-mode BatchNorm (+ ReLU) with
//!   frozen γ and β, the whole backward pass of a BatchNorm layer in an attack;
//! * [`RunningUpdate`]: one running statistic of a BatchNorm from the batch's, in
//!   place, doing the float operations of [`crate::layers::BatchNorm`]'s reference
//!   update (five tensor operations for the mean, eight for the variance) in one pass,
//!   so that the result is the reference's bit for bit;
//! * (CUDA only) [`relu_in_place`], the ReLU folded into the BatchNorm's forward op.
//!
//! Built from candle's operations, a ReLU's backward pass alone is four kernels
//! (zeros, comparison, conversion, product) besides the gradient bookkeeping.

use super::common::f32_slice;
use super::launch::{count, KArg, KLaunch};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, InplaceOp2, Layout, Result, Shape, Tensor};
use KArg::{B, F32, I32, U32};

#[cfg(feature = "cuda")]
use super::cuda::{f32_view, uninit, Module};
#[cfg(feature = "cuda")]
use super::launch::cuda::{run, CudaArg};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// The kernels of `ops.cu`.
#[cfg(feature = "cuda")]
pub(crate) static OPS: Module = Module::new("rampart_ops", include_str!("ops.cu"));

/// Every kernel of [`OPS`] (for [`Module::ready`] and the compile check).
#[cfg(feature = "cuda")]
pub const KERNELS: [&str; 15] = [
    "bf16_widen_into",
    "relu_inplace",
    "relu_mask",
    "bn_eval_backward",
    "bn_running",
    "xent_forward",
    "xent_rows",
    "xent_backward",
    "layer_noise",
    "f32_to_bf16",
    "bf16_to_f32",
    "oihw_to_ohwi",
    "ohwi_to_oihw",
    "gather_params",
    "bn_running_multi",
];

/// The PTX of Rampart's CUDA kernels between the convolutions, compiled by NVRTC
/// (no GPU needed): a check that the sources compile.
#[cfg(feature = "cuda")]
pub fn ops_ptx() -> Result<&'static str> {
    OPS.ptx()
}

/// The launch of `relu_mask`: `out` = dy·[y > 0] over `n` values. The CUDA op and the
/// tests' emulated kernels are launched through this one definition (and those
/// below), so the tests check the argument order and grid a GPU gets.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn relu_mask_launch<A>(out: A, dy: A, y: A, n: usize) -> Result<KLaunch<A>> {
    let args = vec![B(out), B(dy), B(y), U32(count(n, "relu-mask")?)];
    KLaunch::ops("relu_mask", n, args)
}

/// The launch of `bn_eval_backward` ([`BnEvalBackward`]) over `n` values of `c`
/// channels.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_eval_backward_launch<A>(
    dx: A,
    dy: A,
    y: A,
    gamma: A,
    var: A,
    eps: f32,
    relu: bool,
    c: usize,
    n: usize,
) -> Result<KLaunch<A>> {
    let args = vec![
        B(dx),
        B(dy),
        B(y),
        B(gamma),
        B(var),
        F32(eps),
        I32(i32::from(relu)),
        U32(count(c, "BatchNorm backward")?),
        U32(count(n, "BatchNorm backward")?),
    ];
    KLaunch::ops("bn_eval_backward", n, args)
}

/// The launch of `bn_running` for `op` on the `c` running values `run`, from the
/// statistic's `c` saved batch values `from`.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn running_launch<A>(
    op: &RunningUpdate,
    run: A,
    from: A,
    c: usize,
) -> Result<KLaunch<A>> {
    let args = vec![
        B(run),
        B(from),
        F32(op.keep),
        F32(op.take),
        F32(op.neg_eps),
        I32(i32::from(op.stat == Stat::Var)),
        U32(count(c, "running statistics")?),
    ];
    KLaunch::ops("bn_running", c, args)
}

/// The launch of `relu_inplace` on `n` values of `y`.
#[cfg_attr(not(any(test, feature = "cudnn")), allow(dead_code))]
pub(crate) fn relu_in_place_launch<A>(y: A, n: usize) -> Result<KLaunch<A>> {
    KLaunch::ops("relu_inplace", n, vec![B(y), U32(count(n, "relu")?)])
}

/// The launch of `oihw_to_ohwi` (`to_ohwi`) or `ohwi_to_oihw` on `n` kernel values of
/// `c_in` input channels and `kk` taps each.
#[cfg_attr(not(any(test, feature = "cudnn")), allow(dead_code))]
pub(crate) fn permute_launch<A>(
    out: A,
    w: A,
    c_in: usize,
    kk: usize,
    n: usize,
    to_ohwi: bool,
) -> Result<KLaunch<A>> {
    if c_in == 0 || kk == 0 || !n.is_multiple_of(c_in * kk) {
        candle_core::bail!("kernel order: {n} values are not kernels of {c_in}×{kk}")
    }
    let name = if to_ohwi {
        "oihw_to_ohwi"
    } else {
        "ohwi_to_oihw"
    };
    let args = vec![
        B(out),
        B(w),
        U32(count(c_in, name)?),
        U32(count(kk, name)?),
        U32(count(n, name)?),
    ];
    KLaunch::ops(name, n, args)
}

#[inline(always)]
fn live(y: f32) -> f32 {
    if y > 0.0 {
        1.0
    } else {
        0.0
    }
}

/// (dy, y) → dy·[y > 0], y the output of a ReLU.
#[derive(Clone, Copy, Debug)]
pub struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dy = f32_slice(s1, l1, self.name())?;
        let y = f32_slice(s2, l2, self.name())?;
        if dy.len() != y.len() {
            candle_core::bail!("relu-mask: {} gradients for {} outputs", dy.len(), y.len())
        }
        let out = dy.iter().zip(y).map(|(d, &v)| d * live(v)).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = l1.shape().elem_count();
        let dy = f32_view(s1, l1, n, "relu-mask: gradient")?;
        let y = f32_view(s2, l2, n, "relu-mask: output")?;
        let out = relu_mask_cuda(&s1.device, &dy, &y)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, s1.device.clone()),
            l1.shape().clone(),
        ))
    }
}

/// dy·[y > 0] into a fresh buffer (one kernel); `dy` and `y` of equal length.
#[cfg(feature = "cuda")]
pub(crate) fn relu_mask_cuda(
    dev: &candle_core::cuda_backend::CudaDevice,
    dy: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
) -> Result<CudaSlice<f32>> {
    let n = dy.len();
    if y.len() != n {
        candle_core::bail!("relu-mask: {n} gradients for {} outputs", y.len())
    }
    let mut out = uninit(dev, n)?;
    run(
        dev,
        relu_mask_launch(
            CudaArg::Mut(out.slice_mut(..)),
            CudaArg::View(dy.slice(..)),
            CudaArg::View(y.slice(..)),
            n,
        )?,
    )?;
    Ok(out)
}

/// (dy, y, γ) → dx = γ·(1/√(var + ε))·(dy·[y > 0] with `relu`, else dy), for NHWC
/// activations of `c` channels; y is the layer's output, `var` its running variance.
#[derive(Clone, Debug)]
pub struct BnEvalBackward {
    /// The running variance (C,), f32.
    pub var: Tensor,
    /// ε added to the variance.
    pub eps: f32,
    /// A ReLU follows the BatchNorm.
    pub relu: bool,
    /// Channels.
    pub c: usize,
}

impl CustomOp3 for BnEvalBackward {
    fn name(&self) -> &'static str {
        "batch-norm-eval-input-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dy = f32_slice(s1, l1, self.name())?;
        let y = f32_slice(s2, l2, self.name())?;
        let gamma = f32_slice(s3, l3, self.name())?;
        let var = self.var.to_vec1::<f32>()?;
        let c = self.c;
        if c == 0 || gamma.len() != c || var.len() != c || dy.len() != y.len() || dy.len() % c != 0
        {
            candle_core::bail!("{}: operands do not match {c} channels", self.name())
        }
        let scale: Vec<f32> = gamma
            .iter()
            .zip(&var)
            .map(|(g, v)| g * (1.0 / (v + self.eps).sqrt()))
            .collect();
        let mut dx = Vec::with_capacity(dy.len());
        for (dr, yr) in dy.chunks_exact(c).zip(y.chunks_exact(c)) {
            dx.extend(dr.iter().zip(yr).zip(&scale).map(|((&d, &v), s)| {
                let d = if self.relu { d * live(v) } else { d };
                s * d
            }));
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, c) = (l1.shape().elem_count(), self.c);
        if c == 0 || n % c != 0 {
            candle_core::bail!("{}: {n} values are not rows of {c} channels", self.name())
        }
        let dy = f32_view(s1, l1, n, "BatchNorm backward: gradient")?;
        let y = f32_view(s2, l2, n, "BatchNorm backward: output")?;
        let gamma = f32_view(s3, l3, c, "BatchNorm backward: scale")?;
        let (vs, vl) = self.var.storage_and_layout();
        let candle_core::Storage::Cuda(vs) = &*vs else {
            candle_core::bail!("BatchNorm: running variance on another device than the input")
        };
        let var = f32_view(vs, vl, c, "BatchNorm backward: running variance")?;
        let dev = &s1.device;
        let mut dx = uninit(dev, n)?;
        let launch = bn_eval_backward_launch(
            CudaArg::Mut(dx.slice_mut(..)),
            CudaArg::View(dy),
            CudaArg::View(y),
            CudaArg::View(gamma),
            CudaArg::View(var),
            self.eps,
            self.relu,
            c,
            n,
        )?;
        run(dev, launch)?;
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            l1.shape().clone(),
        ))
    }
}

/// Which running statistic a [`RunningUpdate`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// The mean, from the batch mean (the first C values of the saved statistics).
    Mean,
    /// The variance, from 1/√(var + ε) (the next C values).
    Var,
}

/// running ← (running·keep + 0) + (b·take + 0) in place, from the saved statistics
/// [mean | 1/√(var + ε)] (2C) of a train-mode BatchNorm op: b the batch mean, or the
/// biased variance 1/(s·s)·1 + (−ε). These are the float operations, in order, of
/// the reference update with keep = 1 − momentum and take = momentum (·n/(n − 1)
/// for the variance), each rounded to f32.
#[derive(Clone, Copy, Debug)]
pub struct RunningUpdate {
    /// The statistic written.
    pub stat: Stat,
    /// The factor of the old value.
    pub keep: f32,
    /// The factor of the batch's value.
    pub take: f32,
    /// −ε.
    pub neg_eps: f32,
}

impl RunningUpdate {
    /// The batch's value from a saved one (`s` itself, or the variance from
    /// 1/√(var + ε)).
    #[inline(always)]
    fn batch_value(&self, s: f32) -> f32 {
        match self.stat {
            Stat::Mean => s,
            Stat::Var => (s * s).recip() * 1.0 + self.neg_eps,
        }
    }

    /// The update of the C running values of `s1` on the CPU from `stats`: the saved
    /// 2C (`saved`, this statistic's half taken), or exactly this statistic's C.
    pub(crate) fn cpu_update(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        stats: &[f32],
        saved: bool,
    ) -> Result<()> {
        const NAME: &str = "batch-norm-running-update";
        let CpuStorage::F32(run) = s1 else {
            candle_core::bail!("{NAME}: running statistics must be f32")
        };
        let c = l1.shape().elem_count();
        let (len, at) = if saved {
            (2 * c, self.offset(c))
        } else {
            (c, 0)
        };
        let start = match l1.contiguous_offsets() {
            Some((a, b)) if b - a == c && stats.len() == len => a,
            _ => candle_core::bail!("{NAME}: {c} statistics from {} values", stats.len()),
        };
        for (r, &s) in run[start..start + c].iter_mut().zip(&stats[at..at + c]) {
            *r = (*r * self.keep + 0.0) + (self.batch_value(s) * self.take + 0.0);
        }
        Ok(())
    }

    /// Where this statistic's C values start in the saved 2C.
    fn offset(&self, c: usize) -> usize {
        match self.stat {
            Stat::Mean => 0,
            Stat::Var => c,
        }
    }
}

impl InplaceOp2 for RunningUpdate {
    fn name(&self) -> &'static str {
        "batch-norm-running-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        self.cpu_update(s1, l1, f32_slice(s2, l2, self.name())?, true)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        let c = l1.shape().elem_count();
        let at = super::cuda::contiguous(l1, c, "running statistics")?;
        let stats = f32_view(s2, l2, 2 * c, "saved BatchNorm statistics")?;
        let from = stats.slice(self.offset(c)..self.offset(c) + c);
        let dev = s1.device.clone();
        let to = s1.as_cuda_slice_mut::<f32>()?.slice_mut(at..at + c);
        run(
            &dev,
            running_launch(self, CudaArg::Mut(to), CudaArg::View(from), c)?,
        )
    }
}

/// The ReLU of the first `n` values of `s`, in place (after cuDNN wrote them).
#[cfg(feature = "cudnn")]
pub(crate) fn relu_in_place(s: &mut CudaStorage, n: usize) -> Result<()> {
    let dev = s.device.clone();
    let y = s.as_cuda_slice_mut::<f32>()?.slice_mut(0..n);
    run(&dev, relu_in_place_launch(CudaArg::Mut(y), n)?)
}

/// A convolution kernel of `c_in` input channels and `kk` = k·k taps per channel,
/// from OIHW to OHWI (KRSC) order (`to_ohwi`) or back, into a fresh buffer: the
/// kernels `oihw_to_ohwi` and `ohwi_to_oihw`, whose CPU twins are
/// [`super::conv::oihw_to_ohwi`] and [`super::conv::ohwi_to_oihw`].
#[cfg(feature = "cudnn")]
pub(crate) fn permute_kernel(
    dev: &candle_core::cuda_backend::CudaDevice,
    w: &CudaView<'_, f32>,
    c_in: usize,
    kk: usize,
    to_ohwi: bool,
) -> Result<CudaSlice<f32>> {
    let mut out = uninit(dev, w.len())?;
    permute_kernel_into(dev, w, &mut out.slice_mut(..), c_in, kk, to_ohwi)?;
    Ok(out)
}

/// [`permute_kernel`] into `out` (as many values as `w`), a part of a larger buffer.
#[cfg(feature = "cudnn")]
pub(crate) fn permute_kernel_into(
    dev: &candle_core::cuda_backend::CudaDevice,
    w: &CudaView<'_, f32>,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32>,
    c_in: usize,
    kk: usize,
    to_ohwi: bool,
) -> Result<()> {
    let n = w.len();
    if out.len() != n {
        candle_core::bail!("kernel order: {n} values into {}", out.len())
    }
    let launch = permute_launch(
        CudaArg::Mut(out.slice_mut(..)),
        CudaArg::View(w.slice(..)),
        c_in,
        kk,
        n,
        to_ohwi,
    )?;
    run(dev, launch)
}

/// `dy·[y > 0]` as a tensor, without a backward pass (see [`ReluMask`]).
pub(crate) fn relu_mask(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    dy.contiguous()?
        .apply_op2_no_bwd(&y.contiguous()?, &ReluMask)
}

#[cfg(test)]
mod tests;
