//! Convolution in NHWC layout as im2col + GEMM, forward and backward, on the CPU.
//!
//! candle's CPU convolution computes its input gradient with a direct transposed
//! convolution several times slower than its forward pass, and its kernel gradient
//! through a second convolution with the batch as channels; both are always
//! computed. Here a convolution of a block of images is `cols(x)·Wᵀ`, where `cols`
//! gathers every k×k patch of an NHWC image into one row (patch order ky, kx, c):
//!
//! * forward: per block, `y = cols·Wᵀ`;
//! * input gradient: per block, `dcols = dy·W`, scattered back by [`col2im`];
//! * kernel gradient: `dW = Σ_blocks dyᵀ·cols`, skipped entirely when the kernel is
//!   untracked (a [`crate::Frozen`] model's detached weight: what attacks need).
//!
//! Blocks are whole images, processed in parallel with rayon, each with its own
//! small `cols` buffer, so no batch-sized patch matrix is ever materialised.

use super::common::f32_slice;
use super::gemm::{sgemm, MatRef};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of a square convolution window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Kernel side k.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Window {
    /// Output side for an input side `n`.
    pub fn out_size(&self, n: usize) -> Result<usize> {
        let padded = n + 2 * self.padding;
        if padded < self.kernel || self.stride == 0 || self.kernel == 0 {
            candle_core::bail!("window {self:?} does not fit an input of side {n}")
        }
        Ok((padded - self.kernel) / self.stride + 1)
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }
}

/// Image geometry of one convolution: input (H, W, C) and output (Ho, Wo).
#[derive(Clone, Copy, Debug)]
struct Geometry {
    window: Window,
    h: usize,
    w: usize,
    c: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    #[cfg(test)]
    fn new(window: Window, h: usize, w: usize, c: usize) -> Result<Self> {
        Ok(Geometry {
            window,
            h,
            w,
            c,
            ho: window.out_size(h)?,
            wo: window.out_size(w)?,
        })
    }

    fn row(&self) -> usize {
        self.window.kernel * self.window.kernel * self.c
    }
    fn image_len(&self) -> usize {
        self.h * self.w * self.c
    }
    fn out_pixels(&self) -> usize {
        self.ho * self.wo
    }
    /// Images per parallel block: enough output rows (≥ 256) for an efficient GEMM.
    fn images_per_block(&self) -> usize {
        (256 / self.out_pixels().max(1)).max(1)
    }
}

/// Calls `tap(col, pixel)` for every tap of the window that falls inside the image,
/// over every output pixel of `n` images: `col` is the tap's offset in the patch
/// matrix (n·Ho·Wo rows of k·k·C), `pixel` the offset of the input pixel it reads in
/// the images (n of H·W·C); both address C consecutive values.
#[inline]
fn for_each_tap(g: &Geometry, n: usize, mut tap: impl FnMut(usize, usize)) {
    let Window {
        kernel: k,
        stride: s,
        padding: p,
    } = g.window;
    let row = g.row();
    for i in 0..n {
        let (img, cols) = (i * g.image_len(), i * g.out_pixels() * row);
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                let patch = cols + (oy * g.wo + ox) * row;
                for ky in 0..k {
                    let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&v| v < g.h) else {
                        continue;
                    };
                    for kx in 0..k {
                        let Some(ix) = (ox * s + kx).checked_sub(p).filter(|&v| v < g.w) else {
                            continue;
                        };
                        tap(patch + (ky * k + kx) * g.c, img + (iy * g.w + ix) * g.c);
                    }
                }
            }
        }
    }
}

/// Gathers the patches of `images` (n images, each H·W·C) into `cols`
/// (n·Ho·Wo rows of k·k·C), zero where the window overlaps the padding.
fn im2col(g: &Geometry, images: &[f32], cols: &mut [f32]) {
    cols.fill(0.0);
    let c = g.c;
    let n = (images.len() / g.image_len()).min(cols.len() / (g.out_pixels() * g.row()));
    for_each_tap(g, n, |col, pixel| {
        cols[col..col + c].copy_from_slice(&images[pixel..pixel + c]);
    });
}

/// The adjoint of [`im2col`]: adds every patch row of `cols` back into `images`.
fn col2im(g: &Geometry, cols: &[f32], images: &mut [f32]) {
    let c = g.c;
    let n = (images.len() / g.image_len()).min(cols.len() / (g.out_pixels() * g.row()));
    for_each_tap(g, n, |col, pixel| {
        for (d, v) in images[pixel..pixel + c].iter_mut().zip(&cols[col..col + c]) {
            *d += v;
        }
    });
}

/// The sizes of one convolution: input (b, h, w, c_in) and kernel (c_out, k, k, c_in)
/// in KRSC order, which is the (C_out, k·k·C_in) patch layout of [`im2col`] and the
/// layout cuDNN's NHWC kernels want.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConvShape {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl ConvShape {
    /// The shape of convolving `xs` (B, H, W, C_in) with an OIHW `weight`; refused
    /// when the channels disagree, the kernel is not square or the window does not fit.
    pub(crate) fn new(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (b, h, w, c_in) = xs.dims4()?;
        let (c_out, c_in_w, k, k2) = weight.dims4()?;
        if c_in != c_in_w || k != k2 {
            candle_core::bail!(
                "conv2d_nhwc: input has {c_in} channels, kernel {:?}",
                weight.dims()
            )
        }
        Self::from_dims(b, (h, w), c_in, c_out, k, stride, padding)
    }

    /// The shape of convolving `b` NHWC images `h`×`w` of `c_in` channels with a
    /// square `k`×`k` kernel to `c_out` channels; refused when the window does not fit.
    pub(crate) fn from_dims(
        b: usize,
        (h, w): (usize, usize),
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let window = Window {
            kernel: k,
            stride,
            padding,
        };
        window.out_size(h)?;
        window.out_size(w)?;
        Ok(ConvShape {
            b,
            h,
            w,
            c_in,
            c_out,
            k,
            stride,
            padding,
        })
    }

    fn window(&self) -> Window {
        Window {
            kernel: self.k,
            stride: self.stride,
            padding: self.padding,
        }
    }

    /// Output side (Ho, Wo); the window fits (checked by [`ConvShape::new`]).
    pub(crate) fn out(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.k) / self.stride + 1;
        (o(self.h), o(self.w))
    }

    pub(crate) fn input_len(&self) -> usize {
        self.b * self.h * self.w * self.c_in
    }

    pub(crate) fn output_len(&self) -> usize {
        let (ho, wo) = self.out();
        self.b * ho * wo * self.c_out
    }

    pub(crate) fn kernel_len(&self) -> usize {
        self.c_out * self.k * self.k * self.c_in
    }

    fn geometry(&self) -> Geometry {
        let (ho, wo) = self.out();
        Geometry {
            window: self.window(),
            h: self.h,
            w: self.w,
            c: self.c_in,
            ho,
            wo,
        }
    }
}

/// Which pass of a convolution an op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// (x, w) → y: x (b, h, w, c_in), w (c_out, c_in, k, k), y (b, ho, wo, c_out).
    Forward,
    /// (dy, w) → dx.
    Data,
    /// (x, dy) → dw, (c_out, c_in, k, k).
    Filter,
}

/// An OIHW kernel of `ci` input channels and `kk` = k·k taps per channel in OHWI
/// (KRSC) order: the twin of the CUDA kernel `oihw_to_ohwi` (`ops.cu`).
pub(crate) fn oihw_to_ohwi(w: &[f32], ci: usize, kk: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for (src, dst) in w.chunks_exact(ci * kk).zip(out.chunks_exact_mut(ci * kk)) {
        for (i, taps) in src.chunks_exact(kk).enumerate() {
            for (q, &v) in taps.iter().enumerate() {
                dst[q * ci + i] = v;
            }
        }
    }
    out
}

/// The inverse of [`oihw_to_ohwi`]: the twin of `ohwi_to_oihw`.
pub(crate) fn ohwi_to_oihw(w: &[f32], ci: usize, kk: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for (src, dst) in w.chunks_exact(ci * kk).zip(out.chunks_exact_mut(ci * kk)) {
        for (i, taps) in dst.chunks_exact_mut(kk).enumerate() {
            for (q, t) in taps.iter_mut().enumerate() {
                *t = src[q * ci + i];
            }
        }
    }
    out
}

/// One pass of a 2-D convolution of NHWC activations with an OIHW kernel (PyTorch's
/// order, the model's; put in KRSC order inside the op, which is what the passes
/// compute in): the one op
/// type behind every convolution of the layer-by-layer path, with its CPU forward
/// (blocked im2col + GEMM, this module) and its CUDA forward (cuDNN, feature
/// `cudnn`). Only the forward pass has a backward pass of its own: the other two are
/// its gradients, and the kernel gradient is skipped for an untracked kernel (a
/// [`crate::Frozen`] model's detached weight: what attacks need).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Conv2d {
    pub(crate) shape: ConvShape,
    pub(crate) pass: Pass,
}

impl Conv2d {
    /// The lengths of the two operands (with their names, for errors) and the result's
    /// shape.
    pub(crate) fn sizes(&self) -> ([(usize, &'static str); 2], Shape) {
        let g = self.shape;
        let (ho, wo) = g.out();
        let (input, kernel, output) = (
            (g.input_len(), "input"),
            (g.kernel_len(), "kernel"),
            (g.output_len(), "output gradient"),
        );
        match self.pass {
            Pass::Forward => ([input, kernel], Shape::from((g.b, ho, wo, g.c_out))),
            Pass::Data => ([output, kernel], Shape::from((g.b, g.h, g.w, g.c_in))),
            Pass::Filter => ([input, output], Shape::from((g.c_out, g.c_in, g.k, g.k))),
        }
    }

    /// y = cols(x)·Wᵀ per block of images.
    pub(crate) fn cpu_forward(&self, x: &[f32], wt: &[f32]) -> Vec<f32> {
        let (g, c_out) = (self.shape.geometry(), self.shape.c_out);
        let ipb = g.images_per_block();
        let mut y = vec![0f32; self.shape.output_len()];
        let w_t = MatRef::row_major(wt, c_out, g.row()).t();
        y.par_chunks_mut(ipb * g.out_pixels() * c_out)
            .zip(x.par_chunks(ipb * g.image_len()))
            .for_each(|(yb, xb)| {
                let rows = xb.len() / g.image_len() * g.out_pixels();
                if g.window.is_pointwise() {
                    sgemm(yb, MatRef::row_major(xb, rows, g.c), w_t, false);
                } else {
                    let mut cols = vec![0f32; rows * g.row()];
                    im2col(&g, xb, &mut cols);
                    sgemm(yb, MatRef::row_major(&cols, rows, g.row()), w_t, false);
                }
            });
        y
    }

    /// dx = col2im(dy·W) per block of images (blocks own disjoint slices of dx).
    pub(crate) fn cpu_data(&self, dy: &[f32], wt: &[f32]) -> Vec<f32> {
        let (g, c_out) = (self.shape.geometry(), self.shape.c_out);
        let ipb = g.images_per_block();
        let w_mat = MatRef::row_major(wt, c_out, g.row());
        let mut dx = vec![0f32; self.shape.input_len()];
        dx.par_chunks_mut(ipb * g.image_len())
            .zip(dy.par_chunks(ipb * g.out_pixels() * c_out))
            .for_each(|(dxb, dyb)| {
                let rows = dyb.len() / c_out;
                if g.window.is_pointwise() {
                    sgemm(dxb, MatRef::row_major(dyb, rows, c_out), w_mat, false);
                } else {
                    let mut dcols = vec![0f32; rows * g.row()];
                    sgemm(
                        &mut dcols,
                        MatRef::row_major(dyb, rows, c_out),
                        w_mat,
                        false,
                    );
                    col2im(&g, &dcols, dxb);
                }
            });
        dx
    }

    /// dW = Σ_blocks dyᵀ·cols(x): per-thread partial sums, then reduced.
    pub(crate) fn cpu_filter(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let (g, c_out) = (self.shape.geometry(), self.shape.c_out);
        let ipb = g.images_per_block();
        x.par_chunks(ipb * g.image_len())
            .zip(dy.par_chunks(ipb * g.out_pixels() * c_out))
            .fold(
                || vec![0f32; c_out * g.row()],
                |mut acc, (xb, dyb)| {
                    let rows = dyb.len() / c_out;
                    let dyt = MatRef::row_major(dyb, rows, c_out).t();
                    if g.window.is_pointwise() {
                        sgemm(&mut acc, dyt, MatRef::row_major(xb, rows, g.c), true);
                    } else {
                        let mut cols = vec![0f32; rows * g.row()];
                        im2col(&g, xb, &mut cols);
                        sgemm(&mut acc, dyt, MatRef::row_major(&cols, rows, g.row()), true);
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f32; c_out * g.row()],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "conv2d-nhwc",
            Pass::Data => "conv2d-nhwc-backward-data",
            Pass::Filter => "conv2d-nhwc-backward-filter",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ([(n1, what1), (n2, what2)], shape) = self.sizes();
        let operand = |s, l: &Layout, len: usize, what: &str| -> Result<&[f32]> {
            let v = f32_slice(s, l, self.name())?;
            if v.len() != len {
                candle_core::bail!(
                    "{}: the {what} has shape {:?}, expected {len} values",
                    self.name(),
                    l.shape()
                )
            }
            Ok(v)
        };
        let (a, b) = (operand(s1, l1, n1, what1)?, operand(s2, l2, n2, what2)?);
        let (ci, kk) = (self.shape.c_in, self.shape.k * self.shape.k);
        let out = match self.pass {
            Pass::Forward => self.cpu_forward(a, &oihw_to_ohwi(b, ci, kk)),
            Pass::Data => self.cpu_data(a, &oihw_to_ohwi(b, ci, kk)),
            Pass::Filter => ohwi_to_oihw(&self.cpu_filter(a, b), ci, kk),
        };
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cudnn::conv2d(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.pass != Pass::Forward {
            candle_core::bail!(
                "{}: convolution gradients have no gradient of their own",
                self.name()
            )
        }
        let grad = grad.contiguous()?;
        let pass = |pass| Conv2d {
            shape: self.shape,
            pass,
        };
        let dx = grad.apply_op2_no_bwd(w, &pass(Pass::Data))?;
        // An untracked kernel (a frozen model's detached weight) needs no gradient.
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &pass(Pass::Filter))?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// 2-D convolution of NHWC input with an OIHW kernel.
///
/// xs: (B, H, W, C_in), weight: (C_out, C_in, k, k) → (B, Ho, Wo, C_out). f32 on the
/// CPU, and f32 on CUDA with the `cudnn` feature, run the [`Conv2d`] op; other dtypes
/// and devices take [`conv2d_nhwc_generic`].
pub fn conv2d_nhwc(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let shape = ConvShape::new(xs, weight, stride, padding)?;
    let native = xs.dtype() == candle_core::DType::F32
        && (xs.device().is_cpu()
            || (cfg!(feature = "cudnn") && xs.device().is_cuda() && shape.b > 0));
    if !native {
        return conv2d_nhwc_generic(xs, weight, stride, padding);
    }
    xs.contiguous()?.apply_op2(
        &weight.contiguous()?,
        Conv2d {
            shape,
            pass: Pass::Forward,
        },
    )
}

/// The convolution on devices without the CPU kernels above (CUDA) and for other
/// dtypes: candle's NCHW `conv2d` forward (cuDNN when candle is built with its
/// `cudnn` feature) with a backward pass of our own. candle's own backward computes
/// the input gradient with `conv_transpose2d`, a naive kernel on CUDA; here the
/// input gradient is a forward `conv2d` (cuDNN again) of the output gradient, dilated
/// by the stride and padded, with the transposed, flipped kernel; the kernel gradient
/// is candle's (a `conv2d`), skipped for an untracked kernel (a [`crate::Frozen`]
/// model's).
pub fn conv2d_nhwc_generic(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let x = xs.permute((0, 3, 1, 2))?;
    let y = x
        .detach()
        .conv2d(&weight.detach(), padding, stride, 1, 1)?
        .contiguous()?;
    let y = if x.track_op() || weight.track_op() {
        x.apply_op2_arc(
            weight,
            std::sync::Arc::new(Box::new(GenericConv { y, stride, padding })),
        )?
    } else {
        y
    };
    y.permute((0, 2, 3, 1))
}

/// Attaches the backward pass of [`conv2d_nhwc_generic`] to a convolution output
/// computed without a graph: its forward pass hands back a copy of that output.
struct GenericConv {
    y: Tensor,
    stride: usize,
    padding: usize,
}

impl GenericConv {
    fn output<S: BackendStorage>(
        &self,
        pick: impl FnOnce(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (storage, layout) = self.y.storage_and_layout();
        let Some(s) = pick(&storage) else {
            candle_core::bail!("conv2d: output on another device than its inputs")
        };
        if layout.start_offset() != 0 || !layout.is_contiguous() {
            candle_core::bail!("conv2d: output is not a contiguous tensor")
        }
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }
}

impl CustomOp2 for GenericConv {
    fn name(&self) -> &'static str {
        "conv2d-nhwc-generic"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output(|s| match s {
            candle_core::Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(|s| match s {
            candle_core::Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (s, p) = (self.stride, self.padding);
        let (_, _, k, k2) = w.dims4()?;
        let out_size = |g: usize| (g - 1) * s + (k - 1) + 1 - 2 * p;
        let (pad_h, pad_w) = (
            x.dim(2)? - out_size(grad.dim(2)?),
            x.dim(3)? - out_size(grad.dim(3)?),
        );
        let dx = if k == k2 && p < k {
            // dx = conv(dilate_s(dy) padded by k−1−p (+ the output padding at the end),
            // W̃) with W̃[i, o, a, b] = W[o, i, k−1−a, k−1−b]: a forward convolution,
            // where candle would run conv_transpose2d.
            let rev: Vec<u32> = (0..k as u32).rev().collect();
            let rev = Tensor::new(rev.as_slice(), w.device())?;
            let flipped = w
                .detach()
                .transpose(0, 1)?
                .contiguous()?
                .index_select(&rev, 2)?
                .index_select(&rev, 3)?;
            let lo = k - 1 - p;
            let dy = dilate(&dilate(grad, 2, s)?, 3, s)?;
            if pad_h == 0 && pad_w == 0 {
                dy.conv2d(&flipped, lo, 1, 1, 1)?
            } else {
                dy.pad_with_zeros(2, lo, lo + pad_h)?
                    .pad_with_zeros(3, lo, lo + pad_w)?
                    .conv2d(&flipped, 0, 1, 1, 1)?
            }
        } else {
            grad.conv_transpose2d(&w.detach(), p, pad_h, s, 1)?
        };
        let dw = if !w.track_op() {
            None
        } else {
            let g = x
                .detach()
                .transpose(0, 1)?
                // The output gradient acts as a kernel dilated by the stride.
                .conv2d(&grad.transpose(0, 1)?, p, 1, s, 1)?
                .transpose(0, 1)?;
            let (_, _, g0, g1) = g.dims4()?;
            Some(if g0 != k || g1 != k2 {
                g.narrow(2, 0, k)?.narrow(3, 0, k2)?
            } else {
                g
            })
        };
        Ok((Some(dx), dw))
    }
}

/// Inserts `s − 1` zeros between consecutive entries of `t` along `dim`
/// (n entries become (n − 1)·s + 1).
fn dilate(t: &Tensor, dim: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(t.clone());
    }
    let n = t.dim(dim)?;
    let mut parts = vec![t.clone()];
    parts.extend(std::iter::repeat_n(t.zeros_like()?, s - 1));
    let mut dims = t.dims().to_vec();
    dims[dim] = n * s;
    Tensor::stack(&parts, dim + 1)?
        .reshape(dims)?
        .narrow(dim, 0, (n - 1) * s + 1)
}

/// The same convolution through candle's NCHW `conv2d`.
pub fn conv2d_nhwc_reference(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    xs.permute((0, 3, 1, 2))?
        .conv2d(weight, padding, stride, 1, 1)?
        .permute((0, 2, 3, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::max_abs_diff;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect()
    }

    fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
        rand_on(shape, seed, &Device::Cpu)
    }

    fn rand_on(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
        Tensor::from_vec(rand_vec(shape.iter().product(), seed), shape, dev).unwrap()
    }

    type ConvFn = fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>;

    /// Forward, input gradient and kernel gradient of `conv` equal candle's own conv2d
    /// (the reference path) for each (batch, k, stride, padding, side, C_in, C_out),
    /// and input-gradient-only mode gives the same input gradient and no kernel
    /// gradient.
    fn check_against_candle(
        conv: ConvFn,
        cases: &[(usize, usize, usize, usize, usize, usize, usize)],
        dev: &Device,
    ) {
        for &(b, k, stride, pad, h, c_in, c_out) in cases {
            let x = Var::from_tensor(&rand_on(&[b, h, h, c_in], 1, dev)).unwrap();
            let wt = Var::from_tensor(&rand_on(&[c_out, c_in, k, k], 2, dev)).unwrap();
            let reference = conv2d_nhwc_reference(&x, &wt, stride, pad).unwrap();
            let ours = conv(&x, &wt, stride, pad).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            assert!(
                max_abs_diff(&ours, &reference) < 1e-4,
                "forward k={k} s={stride}"
            );
            let probe = rand_on(reference.dims(), 3, dev);
            let loss = |t: &Tensor| (t * &probe).unwrap().sum_all().unwrap();
            let g_ref = loss(&reference).backward().unwrap();
            let g_ours = loss(&ours).backward().unwrap();
            let gx = max_abs_diff(g_ref.get(&x).unwrap(), g_ours.get(&x).unwrap());
            let gw = max_abs_diff(g_ref.get(&wt).unwrap(), g_ours.get(&wt).unwrap());
            assert!(
                gx < 1e-4 && gw < 1e-4,
                "k={k} s={stride}: grad x {gx}, grad w {gw}"
            );
            // A detached kernel (a frozen model's) gets no gradient at all.
            let g_in = loss(&conv(&x, &wt.detach(), stride, pad).unwrap())
                .backward()
                .unwrap();
            assert!(g_in.get(&wt).is_none());
            assert!(max_abs_diff(g_ref.get(&x).unwrap(), g_in.get(&x).unwrap()) < 1e-4);
        }
    }

    /// (batch, k, stride, padding, side, C_in, C_out): every geometry the
    /// architectures use, strides with and without output padding, and a batch that
    /// splits into several blocks.
    const GEOMETRIES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
        (2, 3, 1, 1, 8, 3, 5),
        (3, 3, 2, 1, 8, 4, 6),
        (2, 3, 2, 1, 7, 3, 4),
        (5, 1, 1, 0, 6, 4, 3),
        (2, 1, 2, 0, 7, 4, 3),
        (40, 3, 1, 1, 4, 2, 2),
        (2, 5, 2, 2, 9, 2, 3),
        (2, 5, 1, 2, 7, 3, 2),
    ];

    /// The [`Conv2d`] op (im2col + GEMM on the CPU, cuDNN on CUDA).
    fn conv2d_matches_candle(dev: &Device) {
        check_against_candle(conv2d_nhwc, GEOMETRIES, dev);
    }

    test_device!(
        conv2d_matches_candle,
        matches_candle_conv2d_forward_and_gradients,
        matches_candle_conv2d_forward_and_gradients_cuda
    );

    /// The generic path (other dtypes and devices), whose backward pass avoids
    /// conv_transpose2d.
    #[test]
    fn generic_path_matches_candle_conv2d() {
        check_against_candle(conv2d_nhwc_generic, GEOMETRIES, &Device::Cpu);
        // Untracked inputs: a plain forward pass.
        let x = rand_tensor(&[1, 5, 5, 2], 4);
        let wt = rand_tensor(&[3, 2, 3, 3], 5);
        let y = conv2d_nhwc_generic(&x, &wt, 1, 1).unwrap();
        assert!(max_abs_diff(&y, &conv2d_nhwc_reference(&x, &wt, 1, 1).unwrap()) < 1e-5);
    }

    /// ⟨im2col(x), y⟩ = ⟨x, col2im(y)⟩: the gather and the scatter are adjoint.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        let window = Window {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let g = Geometry::new(window, 5, 5, 3).unwrap();
        let x = rand_vec(2 * g.image_len(), 4);
        let mut cols = vec![0f32; 2 * g.out_pixels() * g.row()];
        im2col(&g, &x, &mut cols);
        let y = rand_vec(cols.len(), 5);
        let mut back = vec![0f32; x.len()];
        col2im(&g, &y, &mut back);
        let lhs: f32 = cols.iter().zip(&y).map(|(a, b)| a * b).sum();
        let rhs: f32 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
        assert!(
            (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    /// The kernel orders the op converts between: OHWI is candle's permute (0, 2, 3,
    /// 1) of OIHW, and the two conversions undo each other.
    #[test]
    fn kernel_orders_match_candle_permute_and_invert() {
        let w = rand_tensor(&[4, 3, 3, 3], 6);
        let flat = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ohwi = oihw_to_ohwi(&flat, 3, 9);
        let want = w
            .permute((0, 2, 3, 1))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ohwi, want);
        assert_eq!(ohwi_to_oihw(&ohwi, 3, 9), flat);
    }

    #[test]
    fn bad_geometry_is_an_error() {
        let x = rand_tensor(&[1, 2, 2, 3], 0);
        assert!(conv2d_nhwc(&x, &rand_tensor(&[4, 3, 5, 5], 0), 1, 0).is_err());
        assert!(conv2d_nhwc(&x, &rand_tensor(&[4, 2, 3, 3], 0), 1, 1).is_err());
    }
}
