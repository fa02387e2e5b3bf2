//! The fused eval-mode path of pre-activation networks on the CPU: one custom op for
//! the whole network, forward and input-gradient backward.
//!
//! An attack step is an eval-mode forward pass and a gradient with respect to the
//! input. Through candle's autograd that is one graph node per layer, each with a fresh
//! batch-sized allocation, and in the backward pass every node's gradient is added into
//! a zero tensor: several full passes over memory per layer beside the arithmetic. In
//! eval mode with no parameter gradients wanted nothing couples the images of a batch,
//! so here the batch is cut into chunks of a few images and each thread runs its chunk
//! through the whole network on plain slices:
//!
//! * convolutions gather a block of patch rows (about 2 MiB, a core's L2 cache) and
//!   multiply it by the kernel (single-threaded GEMM, AVX-512 where the CPU has it);
//! * the BatchNorm+ReLU after the first convolution of a block is applied to each
//!   output block while it is still in cache, and the second convolution accumulates
//!   directly onto the shortcut;
//! * the backward pass keeps the post-ReLU activations of the forward pass (their sign
//!   is the ReLU mask) and runs the transposed convolutions and masks in the same
//!   chunks, writing the input gradient (through the input normalisation, in NCHW).
//!
//! A [`crate::Frozen`] view of a WRN or pre-activation ResNet-18 takes this path for
//! every forward pass, plain or variant: an OAT model's FiLM and dual BatchNorm at the
//! batch's λ fold into each BatchNorm's affine map, a stochastic student's noise is
//! drawn per image inside the chunk (the same values as the layer-by-layer path).
//! Tests hold it equal to the layer-by-layer path.

use super::common::{f32_slice, take_saved, with_scratch, Affine, EvalNorm};
use super::conv::Window;
use super::gemm::{sgemm, MatRef};
use super::preact::{PreAct, PreActBlock};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Patch-matrix block size in floats (2 MiB, the size of a core's L2 cache here;
/// measured best among 0.5–8 MiB on WRN-16-4).
const BLOCK_FLOATS: usize = 1 << 19;

/// Channels from which a 3×3 stride-1 convolution runs as Winograd F(2×2, 3×3): below,
/// the transforms cost more than the multiply-adds they save.
const WINOGRAD_MIN_CHANNELS: usize = 64;

fn winograd_for(
    w: &[f32],
    kernel: usize,
    stride: usize,
    padding: usize,
    c_in: usize,
    c_out: usize,
) -> Option<super::winograd::Winograd> {
    (kernel == 3
        && stride == 1
        && padding == 1
        && c_in >= WINOGRAD_MIN_CHANNELS
        && c_out >= WINOGRAD_MIN_CHANNELS)
        .then(|| super::winograd::Winograd::new(w, c_in, c_out))
}

/// A bias-free convolution: kernel as (C_out, k·k·C_in), patch order (ky, kx, c).
#[derive(Clone, Debug)]
pub(crate) struct ConvLayer {
    w: Vec<f32>,
    window: Window,
    c_in: usize,
    c_out: usize,
    /// For a stride-1 "same" convolution, the convolution whose forward pass is this
    /// one's input gradient: kernel transposed (C_in ↔ C_out) and flipped. It replaces
    /// the GEMM + scatter of the general backward pass by a gather + GEMM.
    transposed: Option<Box<ConvLayer>>,
    /// For a 3×3 stride-1 padding-1 convolution with enough channels, the same
    /// convolution in the Winograd domain (2.25× fewer multiply-adds).
    winograd: Option<super::winograd::Winograd>,
}

impl ConvLayer {
    /// From an OIHW kernel tensor.
    pub(crate) fn new(weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        Self::new_scaled(weight, stride, padding, None)
    }

    /// From an OIHW kernel tensor whose output channel o is multiplied by `scale[o]`
    /// (a BatchNorm folded into the convolution).
    pub(crate) fn new_scaled(
        weight: &Tensor,
        stride: usize,
        padding: usize,
        scale: Option<&[f32]>,
    ) -> Result<Self> {
        let (c_out, c_in, k, k2) = weight.dims4()?;
        if k != k2 {
            candle_core::bail!("fused path: non-square kernel {:?}", weight.dims())
        }
        let mut w = weight
            .permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if let Some(scale) = scale {
            if scale.len() != c_out {
                candle_core::bail!("fused path: {} scales for {c_out} channels", scale.len())
            }
            for (row, s) in w.chunks_exact_mut(k * k * c_in).zip(scale) {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        Ok(ConvLayer::from_parts(w, k, stride, padding, c_in, c_out))
    }

    /// From a kernel already in (C_out, k·k·C_in) layout.
    pub(crate) fn from_parts(
        w: Vec<f32>,
        kernel: usize,
        stride: usize,
        padding: usize,
        c_in: usize,
        c_out: usize,
    ) -> Self {
        let transposed = (kernel > 1 && stride == 1 && 2 * padding + 1 == kernel).then(|| {
            let k = kernel;
            let mut t = vec![0f32; w.len()];
            for co in 0..c_out {
                for ky in 0..k {
                    for kx in 0..k {
                        let src = &w[co * k * k * c_in + (ky * k + kx) * c_in..][..c_in];
                        let (fy, fx) = (k - 1 - ky, k - 1 - kx);
                        for (ci, v) in src.iter().enumerate() {
                            t[ci * k * k * c_out + (fy * k + fx) * c_out + co] = *v;
                        }
                    }
                }
            }
            Box::new(ConvLayer {
                window: Window {
                    kernel,
                    stride,
                    padding,
                },
                c_in: c_out,
                c_out: c_in,
                winograd: winograd_for(&t, kernel, stride, padding, c_out, c_in),
                w: t,
                transposed: None,
            })
        });
        ConvLayer {
            winograd: winograd_for(&w, kernel, stride, padding, c_in, c_out),
            w,
            window: Window {
                kernel,
                stride,
                padding,
            },
            c_in,
            c_out,
            transposed,
        }
    }

    pub(crate) fn c_out(&self) -> usize {
        self.c_out
    }

    pub(crate) fn c_in(&self) -> usize {
        self.c_in
    }

    /// The Winograd form, when this layer has one and it pays at this image size: with
    /// fewer than 128 channels, only on images of at least 16×16 (measured on WRN-10-1,
    /// whose 64-channel 8×8 layers train faster as im2col + GEMM, and WRN-16-4).
    fn winograd_at(&self, h: usize, w: usize) -> Option<&super::winograd::Winograd> {
        self.winograd
            .as_ref()
            .filter(|_| self.c_in.min(self.c_out) >= 128 || h * w >= 256)
    }

    pub(crate) fn weight_len(&self) -> usize {
        self.w.len()
    }

    fn row(&self) -> usize {
        self.window.kernel * self.window.kernel * self.c_in
    }

    pub(crate) fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        Ok((self.window.out_size(h)?, self.window.out_size(w)?))
    }

    fn pointwise(&self) -> bool {
        self.window.kernel == 1 && self.window.stride == 1 && self.window.padding == 0
    }

    /// Output rows per block for `total` rows.
    fn block_rows(&self, total: usize) -> usize {
        (BLOCK_FLOATS / self.row().max(1))
            .max(512)
            .min(total.max(1))
    }

    /// Maps patch row `pix` of n images with Ho×Wo outputs to (image, top input row,
    /// left input column) of its window, before the padding is subtracted.
    fn window_origins(&self, h: usize, w: usize) -> impl Fn(usize) -> (usize, usize, usize) {
        let s = self.window.stride;
        let (ho, wo) = self.out_hw(h, w).unwrap_or((0, 0));
        move |pix| {
            let (img, q) = (pix / (ho * wo), pix % (ho * wo));
            (img, (q / wo) * s, (q % wo) * s)
        }
    }

    /// Writes patch rows `r0 .. r0 + rows` of `input` (n images H×W×C_in) into `cols`.
    fn gather(&self, input: &[f32], h: usize, w: usize, r0: usize, cols: &mut [f32]) {
        let (k, p) = (self.window.kernel, self.window.padding);
        let (c, row) = (self.c_in, self.row());
        let origin = self.window_origins(h, w);
        for (i, dst) in cols.chunks_exact_mut(row).enumerate() {
            let (img, y0, x0) = origin(r0 + i);
            let image = &input[img * h * w * c..][..h * w * c];
            // Columns ox·s − p + kx, kx < k: when all lie inside the image, the k
            // pixels of a kernel row are adjacent in NHWC and copy as one run.
            let first = x0.checked_sub(p).filter(|&v| v + k <= w);
            for ky in 0..k {
                let iy = (y0 + ky).checked_sub(p).filter(|&v| v < h);
                let run = &mut dst[ky * k * c..][..k * c];
                match (iy, first) {
                    (None, _) => run.fill(0.0),
                    (Some(iy), Some(x0)) => {
                        run.copy_from_slice(&image[(iy * w + x0) * c..][..k * c]);
                    }
                    (Some(iy), None) => {
                        for (kx, slot) in run.chunks_exact_mut(c).enumerate() {
                            match (x0 + kx).checked_sub(p).filter(|&v| v < w) {
                                Some(ix) => slot.copy_from_slice(&image[(iy * w + ix) * c..][..c]),
                                None => slot.fill(0.0),
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds patch rows `r0 ..` of `cols` back into `grad` (n images H×W×C_in): the
    /// adjoint of [`Self::gather`].
    fn scatter(&self, cols: &[f32], h: usize, w: usize, r0: usize, grad: &mut [f32]) {
        let (k, p) = (self.window.kernel, self.window.padding);
        let (c, row) = (self.c_in, self.row());
        let origin = self.window_origins(h, w);
        for (i, src) in cols.chunks_exact(row).enumerate() {
            let (img, y0, x0) = origin(r0 + i);
            let image = &mut grad[img * h * w * c..][..h * w * c];
            for ky in 0..k {
                let Some(iy) = (y0 + ky).checked_sub(p).filter(|&v| v < h) else {
                    continue;
                };
                for kx in 0..k {
                    let Some(ix) = (x0 + kx).checked_sub(p).filter(|&v| v < w) else {
                        continue;
                    };
                    let slot = &src[(ky * k + kx) * c..][..c];
                    for (d, v) in image[(iy * w + ix) * c..][..c].iter_mut().zip(slot) {
                        *d += v;
                    }
                }
            }
        }
    }

    /// `out` (n·Ho·Wo × C_out) = conv(input) (`+= ` when `accumulate`), then
    /// `relu(out·scale + shift)` per block when `epilogue` is given.
    pub(crate) fn forward(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        out: &mut [f32],
        accumulate: bool,
        epilogue: Option<&Affine>,
    ) {
        if let Some(wg) = self.winograd_at(h, w) {
            wg.forward(input, h, w, out, accumulate, epilogue);
            return;
        }
        let (row, c_out) = (self.row(), self.c_out);
        let total = out.len() / c_out;
        let wt = MatRef::row_major(&self.w, c_out, row).t();
        self.for_each_patch_block(input, h, w, total, self.block_rows(total), |r0, a| {
            let dst = &mut out[r0 * c_out..(r0 + a.rows) * c_out];
            sgemm(dst, a, wt, accumulate);
            if let Some(affine) = epilogue {
                affine.relu_in_place(dst);
            }
        });
    }

    /// Calls `f(r0, patches)` for consecutive blocks of at most `block` of the `total`
    /// patch rows of `input` (n images H×W×C_in): the input itself for a pointwise
    /// convolution, else the rows gathered into this thread's scratch buffer.
    fn for_each_patch_block(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        total: usize,
        block: usize,
        mut f: impl FnMut(usize, MatRef<'_>),
    ) {
        let row = self.row();
        let scratch = if self.pointwise() { 0 } else { block * row };
        with_scratch(scratch, |cols| {
            for r0 in (0..total).step_by(block) {
                let rows = block.min(total - r0);
                if self.pointwise() {
                    f(
                        r0,
                        MatRef::row_major(&input[r0 * row..(r0 + rows) * row], rows, row),
                    );
                } else {
                    let cols = &mut cols[..rows * row];
                    self.gather(input, h, w, r0, cols);
                    f(r0, MatRef::row_major(cols, rows, row));
                }
            }
        });
    }

    /// Adds the input gradient of this convolution for output gradient `dy`
    /// (n·Ho·Wo × C_out) into `grad` (n images H×W×C_in).
    pub(crate) fn backward_input(&self, dy: &[f32], h: usize, w: usize, grad: &mut [f32]) {
        if let Some(t) = &self.transposed {
            // Stride 1, same size: dx = conv(dy, flipped Wᵀ).
            t.forward(dy, h, w, grad, true, None);
            return;
        }
        let (row, c_out) = (self.row(), self.c_out);
        let total = dy.len() / c_out;
        let wm = MatRef::row_major(&self.w, c_out, row);
        let block = self.block_rows(total);
        if self.pointwise() {
            for r0 in (0..total).step_by(block) {
                let rows = block.min(total - r0);
                let g = &mut grad[r0 * row..(r0 + rows) * row];
                let d = MatRef::row_major(&dy[r0 * c_out..(r0 + rows) * c_out], rows, c_out);
                sgemm(g, d, wm, true);
            }
            return;
        }
        with_scratch(block * row, |cols| {
            for r0 in (0..total).step_by(block) {
                let rows = block.min(total - r0);
                let cols = &mut cols[..rows * row];
                let d = MatRef::row_major(&dy[r0 * c_out..(r0 + rows) * c_out], rows, c_out);
                sgemm(cols, d, wm, false);
                self.scatter(cols, h, w, r0, grad);
            }
        });
    }
}

impl ConvLayer {
    /// Adds the kernel gradient Σ dyᵀ·cols(input) of n images (input H×W×C_in, `dy`
    /// n·Ho·Wo × C_out) into `acc` (C_out × k·k·C_in).
    pub(crate) fn backward_weight(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        dy: &[f32],
        acc: &mut [f32],
    ) {
        if let Some(wg) = self.winograd_at(h, w) {
            wg.backward_weight(input, h, w, dy, acc);
            return;
        }
        let (row, c_out) = (self.row(), self.c_out);
        let total = dy.len() / c_out;
        // Long blocks: every GEMM call reads and writes the whole accumulator, so the
        // inner dimension (rows) should be large.
        let block = (2 * BLOCK_FLOATS / row.max(1)).max(256).min(total.max(1));
        self.for_each_patch_block(input, h, w, total, block, |r0, a| {
            let d = MatRef::row_major(&dy[r0 * c_out..(r0 + a.rows) * c_out], a.rows, c_out);
            sgemm(acc, d.t(), a, true);
        });
    }
}

/// A pre-activation block of the fused path (see [`PreActBlock`]).
pub(crate) type Block = PreActBlock<ConvLayer, EvalNorm>;

/// A network frozen for evaluation: input normalisation, the body (a pre-activation
/// or a post-activation ResNet), global average pooling, linear layer.
#[derive(Clone, Debug)]
pub(crate) struct Program {
    pub(crate) mean: Vec<f32>,
    pub(crate) inv_std: Vec<f32>,
    /// Input (C, H, W).
    pub(crate) input: [usize; 3],
    body: Body,
    /// (K, C) row-major and (K,).
    pub(crate) fc_w: Vec<f32>,
    pub(crate) fc_b: Vec<f32>,
}

#[derive(Clone, Debug)]
enum Body {
    /// Stem convolution, pre-activation blocks, BN-ReLU head.
    Pre {
        stem: ConvLayer,
        blocks: Vec<Block>,
        head: EvalNorm,
    },
    Post(super::postact::PostBody),
}

/// What the backward pass of one chunk needs from its forward pass.
struct ChunkState {
    images: usize,
    body: BodyState,
    /// The body's output (post-ReLU, its sign the last mask), and its side.
    head: Vec<f32>,
    head_pixels: usize,
}

enum BodyState {
    Pre(PreState),
    Post(super::postact::PostState),
}

/// A pre-activation network in the form this path runs: kernels in GEMM layout,
/// BatchNorms folded into affine maps, the linear layer as (K × C row-major, K).
pub(crate) type ProgramNet = PreAct<ConvLayer, EvalNorm, (Vec<f32>, Vec<f32>)>;

/// A network in the form the fused eval path runs.
pub(crate) enum EvalNet {
    Pre(ProgramNet),
    Post(super::postact::PostNet),
}

impl Program {
    /// The program of `net` for inputs of shape `input` (C, H, W), normalised by
    /// (x − mean)·inv_std per channel inside the program.
    pub(crate) fn new(
        net: EvalNet,
        input: [usize; 3],
        mean: Vec<f32>,
        inv_std: Vec<f32>,
    ) -> Result<Self> {
        let (body, (fc_w, fc_b)) = match net {
            EvalNet::Pre(PreAct {
                stem,
                blocks,
                head,
                fc,
            }) => (Body::Pre { stem, blocks, head }, fc),
            EvalNet::Post(net) => {
                let (body, fc) = super::postact::PostBody::new(net)?;
                (Body::Post(body), fc)
            }
        };
        Ok(Program {
            mean,
            inv_std,
            input,
            body,
            fc_w,
            fc_b,
        })
    }

    fn classes(&self) -> usize {
        self.fc_b.len()
    }

    fn image_len(&self) -> usize {
        self.input.iter().product()
    }

    /// Logits (n × K) of a chunk of n NCHW images, the first of them image `first` of
    /// the batch (a student's noise depends on it); with `keep`, what its backward
    /// pass needs.
    fn forward_chunk(
        &self,
        x: &[f32],
        first: usize,
        keep: bool,
    ) -> Result<(Vec<f32>, Option<ChunkState>)> {
        let [c, h, w] = self.input;
        let n = x.len() / self.image_len();
        // Normalise into NHWC.
        let mut a = vec![0f32; x.len()];
        for (img, dst) in x.chunks_exact(c * h * w).zip(a.chunks_exact_mut(c * h * w)) {
            for ch in 0..c {
                let (m, s) = (self.mean[ch], self.inv_std[ch]);
                for (p, v) in img[ch * h * w..(ch + 1) * h * w].iter().enumerate() {
                    dst[p * c + ch] = (v - m) * s;
                }
            }
        }
        let (fin, (h, w), body) = match &self.body {
            Body::Pre { stem, blocks, head } => {
                let (fin, hw, saved) = pre_forward(stem, blocks, head, &a, h, w, first, keep)?;
                (fin, hw, BodyState::Pre(saved))
            }
            Body::Post(body) => {
                let (fin, hw, saved) = body.forward(&a, h, w, keep)?;
                (fin, hw, BodyState::Post(saved))
            }
        };
        drop(a);
        let channels = self.fc_w.len() / self.classes().max(1);
        let pixels = h * w;
        let mut pooled = vec![0f32; n * channels];
        for (img, p) in fin
            .chunks_exact(pixels * channels)
            .zip(pooled.chunks_exact_mut(channels))
        {
            for row in img.chunks_exact(channels) {
                p.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            p.iter_mut().for_each(|a| *a /= pixels as f32);
        }
        let k = self.classes();
        let mut logits: Vec<f32> = (0..n).flat_map(|_| self.fc_b.iter().copied()).collect();
        sgemm(
            &mut logits,
            MatRef::row_major(&pooled, n, channels),
            MatRef::row_major(&self.fc_w, k, channels).t(),
            true,
        );
        let state = keep.then_some(ChunkState {
            images: n,
            body,
            head: fin,
            head_pixels: pixels,
        });
        Ok((logits, state))
    }

    /// The input gradient (n NCHW images) of a chunk for logit gradients `dlogits`.
    fn backward_chunk(&self, st: &ChunkState, dlogits: &[f32]) -> Result<Vec<f32>> {
        let n = st.images;
        let k = self.classes();
        let channels = self.fc_w.len() / k.max(1);
        let mut dpool = vec![0f32; n * channels];
        sgemm(
            &mut dpool,
            MatRef::row_major(dlogits, n, k),
            MatRef::row_major(&self.fc_w, k, channels),
            false,
        );
        let pixels = st.head_pixels;
        let mut d = vec![0f32; st.head.len()];
        for (img, dp) in d
            .chunks_exact_mut(pixels * channels)
            .zip(dpool.chunks_exact(channels))
        {
            for row in img.chunks_exact_mut(channels) {
                row.iter_mut()
                    .zip(dp)
                    .for_each(|(g, v)| *g = v / pixels as f32);
            }
        }
        let [c, h, w] = self.input;
        let dn = match (&self.body, &st.body) {
            (Body::Pre { stem, blocks, head }, BodyState::Pre(saved)) => {
                pre_backward(stem, blocks, head, saved, &st.head, d, n, h, w)
            }
            (Body::Post(body), BodyState::Post(saved)) => body.backward(saved, &st.head, d, h, w),
            _ => candle_core::bail!("fused path: saved state of another network"),
        };
        let mut dx = vec![0f32; dn.len()];
        for (src, dst) in dn
            .chunks_exact(h * w * c)
            .zip(dx.chunks_exact_mut(c * h * w))
        {
            for ch in 0..c {
                let s = self.inv_std[ch];
                for (p, g) in dst[ch * h * w..(ch + 1) * h * w].iter_mut().enumerate() {
                    *g = src[p * c + ch] * s;
                }
            }
        }
        Ok(dx)
    }
}

/// The body of a pre-activation network over a chunk of n normalised NHWC images
/// (H×W), the first of them image `first` of the batch: the head's output (post-ReLU),
/// its side, and with `keep` what the backward pass needs.
#[allow(clippy::too_many_arguments)]
fn pre_forward(
    stem: &ConvLayer,
    blocks: &[Block],
    head: &EvalNorm,
    a: &[f32],
    mut h: usize,
    mut w: usize,
    first: usize,
    keep: bool,
) -> Result<(Vec<f32>, (usize, usize), PreState)> {
    let n = a.len() / (h * w * stem.c_in).max(1);
    let (ho, wo) = stem.out_hw(h, w)?;
    let mut cur = vec![0f32; n * ho * wo * stem.c_out];
    stem.forward(a, h, w, &mut cur, false, None);
    (h, w) = (ho, wo);
    let mut saved = Vec::with_capacity(if keep { blocks.len() } else { 0 });
    for b in blocks {
        let mut pre = vec![0f32; cur.len()];
        b.bn1.relu_into(&cur, &mut pre, first, h * w);
        let (ho, wo) = b.conv1.out_hw(h, w)?;
        let out_len = n * ho * wo * b.conv1.c_out;
        let mut out = match &b.shortcut {
            Some(sc) => {
                let mut o = vec![0f32; out_len];
                sc.forward(&pre, h, w, &mut o, false, None);
                o
            }
            None => cur,
        };
        let mut mid = vec![0f32; out_len];
        b.conv1
            .forward(&pre, h, w, &mut mid, false, b.bn2.epilogue());
        if b.bn2.epilogue().is_none() {
            b.bn2.relu_in_place(&mut mid, first, ho * wo);
        }
        b.conv2.forward(&mid, ho, wo, &mut out, true, None);
        if keep {
            saved.push((h, w, pre, mid));
        }
        cur = out;
        (h, w) = (ho, wo);
    }
    let mut fin = vec![0f32; cur.len()];
    head.relu_into(&cur, &mut fin, first, h * w);
    Ok((fin, (h, w), saved))
}

/// The input gradient of conv2(norm(conv1(x))) (`[conv1, conv2]`) from the gradient
/// `d` of its output: x is `len` values, images `h`×`w`; `mid` is the saved output of
/// `norm`.
pub(crate) fn conv_norm_conv_backward(
    [conv1, conv2]: [&ConvLayer; 2],
    norm: &EvalNorm,
    d: &[f32],
    (h, w): (usize, usize),
    mid: &[f32],
    len: usize,
) -> Vec<f32> {
    let (ho, wo) = conv1.out_hw(h, w).unwrap_or((0, 0));
    let mut dmid = vec![0f32; mid.len()];
    conv2.backward_input(d, ho, wo, &mut dmid);
    norm.backward_in_place(&mut dmid, mid);
    let mut dx = vec![0f32; len];
    conv1.backward_input(&dmid, h, w, &mut dx);
    dx
}

/// Per block: input side (H, W), pre-activation relu(bn1(x)), relu(bn2(conv1)).
type PreState = Vec<(usize, usize, Vec<f32>, Vec<f32>)>;

/// The backward pass of [`pre_forward`]: from the gradient `d` of the head's output
/// `fin` to that of the normalised input (n images H×W).
#[allow(clippy::too_many_arguments)]
fn pre_backward(
    stem: &ConvLayer,
    blocks: &[Block],
    head: &EvalNorm,
    saved: &PreState,
    fin: &[f32],
    mut d: Vec<f32>,
    n: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    head.backward_in_place(&mut d, fin);
    for (b, (bh, bw, pre, mid)) in blocks.iter().zip(saved).rev() {
        let mut dpre =
            conv_norm_conv_backward([&b.conv1, &b.conv2], &b.bn2, &d, (*bh, *bw), mid, pre.len());
        match &b.shortcut {
            Some(sc) => {
                sc.backward_input(&d, *bh, *bw, &mut dpre);
                b.bn1.backward_in_place(&mut dpre, pre);
            }
            None => {
                b.bn1.backward_in_place(&mut dpre, pre);
                dpre.iter_mut().zip(&d).for_each(|(g, v)| *g += v);
            }
        }
        d = dpre;
    }
    let mut dn = vec![0f32; n * h * w * stem.c_in];
    stem.backward_input(&d, h, w, &mut dn);
    dn
}

/// The whole network as one custom op on the NCHW input: logits forward, input
/// gradient backward (parameters receive none).
pub(crate) struct FusedEval {
    program: Arc<Program>,
    keep: bool,
    saved: Mutex<Option<Vec<ChunkState>>>,
}

impl FusedEval {
    /// `keep`: retain what the backward pass needs (when the input is tracked).
    pub(crate) fn new(program: Program, keep: bool) -> Self {
        FusedEval {
            program: Arc::new(program),
            keep,
            saved: Mutex::new(None),
        }
    }

    /// Images per chunk: at most 8, and enough chunks for every thread to have two.
    fn chunk_images(batch: usize) -> usize {
        let threads = rayon::current_num_threads().max(1);
        batch.div_ceil(2 * threads).clamp(1, 8)
    }
}

impl CustomOp1 for FusedEval {
    fn name(&self) -> &'static str {
        "fused-eval-network"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (b, c, h, w) = l.shape().dims4()?;
        if [c, h, w] != self.program.input {
            candle_core::bail!(
                "fused path: input {:?} does not match the network's {:?}",
                l.shape(),
                self.program.input
            )
        }
        let k = self.program.classes();
        if b == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((0, k))));
        }
        let images = Self::chunk_images(b);
        let parts = x
            .par_chunks(images * self.program.image_len())
            .enumerate()
            .map(|(i, xc)| self.program.forward_chunk(xc, i * images, self.keep))
            .collect::<Result<Vec<_>>>()?;
        let mut logits = Vec::with_capacity(b * k);
        let mut states = Vec::with_capacity(parts.len());
        for (part, state) in parts {
            logits.extend_from_slice(&part);
            states.extend(state);
        }
        if self.keep {
            *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(states);
        }
        Ok((CpuStorage::F32(logits), Shape::from((b, k))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let states = take_saved(
            &self.saved,
            "fused eval path: the backward pass of this forward pass already ran (or its input was not tracked)",
        )?;
        let k = self.program.classes();
        let dlogits = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut offsets = Vec::with_capacity(states.len());
        let mut row = 0;
        for st in &states {
            offsets.push(row);
            row += st.images;
        }
        if row * k != dlogits.len() {
            candle_core::bail!(
                "fused path: gradient of {} values for {row} images",
                dlogits.len()
            )
        }
        let parts: Vec<Vec<f32>> = states
            .par_iter()
            .zip(offsets.par_iter())
            .map(|(st, &r)| {
                self.program
                    .backward_chunk(st, &dlogits[r * k..(r + st.images) * k])
            })
            .collect::<Result<_>>()?;
        let dx: Vec<f32> = parts.concat();
        Ok(Some(
            Tensor::from_vec(dx, arg.shape(), arg.device())?.to_dtype(arg.dtype())?,
        ))
    }
}
