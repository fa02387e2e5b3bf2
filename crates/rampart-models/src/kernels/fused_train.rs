//! The fused train-mode path of pre-activation networks on the CPU: the whole network
//! as one custom op on its flattened parameters.
//!
//! A training step through candle's autograd is one graph node per layer, and the
//! backward pass adds every node's gradient into a fresh zero tensor. Here the
//! forward pass (train-mode BatchNorm with batch statistics) and the backward pass
//! (every parameter gradient) run layer by layer over plain slices, each layer
//! parallel over chunks of images, with no intermediate tensors beyond those the
//! backward pass reads. The op's single input is the concatenation of the network's
//! parameters (candle routes the gradient back to each of them through the
//! concatenation), its output the logits, so any loss can be put on top.
//!
//! [`crate::Classifier`] takes this path for train-mode forward passes on WRN and
//! pre-activation ResNet-18 models, plain or stochastic students, when the input
//! itself needs no gradient; running statistics (and a student's running noise
//! scale) are updated exactly as the layer-by-layer path does. A student's noise
//! α·σ·z (σ the channel's standard deviation over the batch, a constant for the
//! backward pass) is drawn per image from the same seeds and streams as that path,
//! and α receives its gradient Σ dL/dh·σ·z. Tests hold logits, running statistics and
//! every parameter gradient equal to that path.

use super::common::{f32_slice, take_saved};
use super::fused::ConvLayer;
use super::gemm::{sgemm, MatRef};
use super::postact::PostAct;
use super::preact::{ConvParams, LinearParams, NormParams, PreAct};
use super::train_norm::{self, push_norm, Batch, BnAt, Stats};
pub(crate) use super::train_norm::{BnBatch, NoiseSeed};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Images per parallel work item: about 512 output rows, so that every GEMM call
/// amortises the packing of its kernel.
fn images_per_task(out_pixels: usize) -> usize {
    (512 / out_pixels.max(1)).clamp(1, 16)
}

/// The parameters of a pre-activation network, flattened in execution order.
pub(crate) type TrainNet<'a> = PreAct<ConvParams<'a>, NormParams<'a>, LinearParams<'a>>;

/// Where a convolution's OIHW kernel sits in the flat parameter vector.
#[derive(Clone, Copy, Debug)]
struct ConvAt {
    offset: usize,
    c_out: usize,
    c_in: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl ConvAt {
    fn len(&self) -> usize {
        self.c_out * self.c_in * self.k * self.k
    }

    /// Every kernel entry as (OIHW index, index in the (C_out, k·k·C_in) layout of
    /// [`ConvLayer`]).
    fn layouts(&self) -> impl Iterator<Item = (usize, usize)> {
        let (i, k) = (self.c_in, self.k);
        (0..self.len()).map(move |oihw| {
            let (kx, rest) = (oihw % k, oihw / k);
            let (ky, rest) = (rest % k, rest / k);
            let (ic, oc) = (rest % i, rest / i);
            (oihw, ((oc * k + ky) * k + kx) * i + ic)
        })
    }

    /// The kernel in the (C_out, k·k·C_in) layout of [`ConvLayer`].
    fn layer(&self, flat: &[f32]) -> ConvLayer {
        let src = &flat[self.offset..self.offset + self.len()];
        let mut w = vec![0f32; src.len()];
        self.layouts().for_each(|(oihw, rows)| w[rows] = src[oihw]);
        ConvLayer::from_parts(w, self.k, self.stride, self.padding, self.c_in, self.c_out)
    }

    /// Writes a (C_out, k·k·C_in) gradient back in OIHW order.
    fn store_grad(&self, g: &[f32], flat: &mut [f32]) {
        let dst = &mut flat[self.offset..self.offset + self.len()];
        self.layouts().for_each(|(oihw, rows)| dst[oihw] = g[rows]);
    }
}

#[derive(Clone, Copy, Debug)]
struct BlockAt {
    bn1: BnAt,
    conv1: ConvAt,
    bn2: BnAt,
    conv2: ConvAt,
    shortcut: Option<ConvAt>,
}

/// A post-activation block's parameters.
#[derive(Clone, Copy, Debug)]
struct PostBlockAt {
    conv1: ConvAt,
    bn1: BnAt,
    conv2: ConvAt,
    bn2: BnAt,
    shortcut: Option<(ConvAt, BnAt)>,
}

/// The layers between the stem convolution and the pooling.
#[derive(Clone, Debug)]
enum BodyAt {
    /// Pre-activation blocks and the BN-ReLU head.
    Pre { blocks: Vec<BlockAt>, head: BnAt },
    /// The stem's BN-ReLU and post-activation blocks.
    Post {
        stem_bn: BnAt,
        blocks: Vec<PostBlockAt>,
    },
}

/// The layout of the flat parameter vector.
#[derive(Clone, Debug)]
pub(crate) struct TrainLayout {
    stem: ConvAt,
    body: BodyAt,
    fc_w: usize,
    fc_b: usize,
    classes: usize,
    features: usize,
    total: usize,
}

/// The parameters of a post-activation network, flattened in execution order.
pub(crate) type PostTrainNet<'a> = PostAct<ConvParams<'a>, NormParams<'a>, LinearParams<'a>>;

/// A network's parameters as the fused train path takes them.
pub(crate) enum TrainNetwork<'a> {
    Pre(TrainNet<'a>),
    Post(PostTrainNet<'a>),
}

/// The layout of `net`'s flat parameter vector, and the parameter tensors in
/// flattening order (their concatenation is the fused op's input). BatchNorm
/// statistics are reported in the order of the network's `norms()`.
pub(crate) fn layout(net: &TrainNetwork<'_>) -> Result<(TrainLayout, Vec<Tensor>)> {
    let mut tensors = Vec::new();
    let mut offset = 0;
    let (stem, body, fc) = match net {
        TrainNetwork::Pre(net) => {
            let stem = push_conv(net.stem, &mut tensors, &mut offset)?;
            let mut blocks = Vec::new();
            for b in &net.blocks {
                let bn1 = push_norm(&b.bn1, &mut tensors, &mut offset)?;
                let conv1 = push_conv(b.conv1, &mut tensors, &mut offset)?;
                let bn2 = push_norm(&b.bn2, &mut tensors, &mut offset)?;
                let conv2 = push_conv(b.conv2, &mut tensors, &mut offset)?;
                let shortcut = match b.shortcut {
                    Some(sc) => Some(push_conv(sc, &mut tensors, &mut offset)?),
                    None => None,
                };
                blocks.push(BlockAt {
                    bn1,
                    conv1,
                    bn2,
                    conv2,
                    shortcut,
                });
            }
            let head = push_norm(&net.head, &mut tensors, &mut offset)?;
            (stem, BodyAt::Pre { blocks, head }, net.fc)
        }
        TrainNetwork::Post(net) => {
            let stem = push_conv(net.stem, &mut tensors, &mut offset)?;
            let stem_bn = push_norm(&net.stem_bn, &mut tensors, &mut offset)?;
            let mut blocks = Vec::new();
            for b in &net.blocks {
                let conv1 = push_conv(b.conv1, &mut tensors, &mut offset)?;
                let bn1 = push_norm(&b.bn1, &mut tensors, &mut offset)?;
                let conv2 = push_conv(b.conv2, &mut tensors, &mut offset)?;
                let bn2 = push_norm(&b.bn2, &mut tensors, &mut offset)?;
                let shortcut = match &b.shortcut {
                    Some((c, bn)) => Some((
                        push_conv(*c, &mut tensors, &mut offset)?,
                        push_norm(bn, &mut tensors, &mut offset)?,
                    )),
                    None => None,
                };
                blocks.push(PostBlockAt {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    shortcut,
                });
            }
            (stem, BodyAt::Post { stem_bn, blocks }, net.fc)
        }
    };
    let (fw, fb) = fc;
    let (classes, features) = fw.dims2()?;
    let fc_w = offset;
    offset += classes * features;
    let fc_b = offset;
    offset += classes;
    tensors.push(fw.flatten_all()?);
    tensors.push(fb.flatten_all()?);
    Ok((
        TrainLayout {
            stem,
            body,
            fc_w,
            fc_b,
            classes,
            features,
            total: offset,
        },
        tensors,
    ))
}

fn push_conv(c: ConvParams<'_>, tensors: &mut Vec<Tensor>, offset: &mut usize) -> Result<ConvAt> {
    let (w, stride, padding) = c;
    let (c_out, c_in, k, _) = w.dims4()?;
    let at = ConvAt {
        offset: *offset,
        c_out,
        c_in,
        k,
        stride,
        padding,
    };
    *offset += at.len();
    tensors.push(w.flatten_all()?);
    Ok(at)
}

/// Convolution over the whole batch, parallel over image chunks.
fn conv_forward(
    l: &ConvLayer,
    input: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    let in_img = input.len() / n;
    let out_img = out.len() / n;
    let per = images_per_task(out_img / l.c_out());
    out.par_chunks_mut(per * out_img)
        .zip(input.par_chunks(per * in_img))
        .for_each(|(o, i)| l.forward(i, h, w, o, accumulate, None));
}

/// Adds the input gradient of a convolution into `grad`, parallel over image chunks.
fn conv_backward_input(l: &ConvLayer, dy: &[f32], n: usize, h: usize, w: usize, grad: &mut [f32]) {
    let g_img = grad.len() / n;
    let dy_img = dy.len() / n;
    let per = images_per_task(dy_img / l.c_out());
    grad.par_chunks_mut(per * g_img)
        .zip(dy.par_chunks(per * dy_img))
        .for_each(|(g, d)| l.backward_input(d, h, w, g));
}

/// The kernel gradient Σ dyᵀ·cols(input), (C_out, k·k·C_in): one contiguous share of
/// the images per thread, each summed into its own accumulator, then added up.
fn conv_backward_weight(
    l: &ConvLayer,
    input: &[f32],
    dy: &[f32],
    n: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let in_img = input.len() / n;
    let dy_img = dy.len() / n;
    let share = n.div_ceil(rayon::current_num_threads().max(1));
    let mut parts: Vec<Vec<f32>> = input
        .par_chunks(share * in_img)
        .zip(dy.par_chunks(share * dy_img))
        .map(|(i, d)| {
            let mut acc = vec![0f32; l.weight_len()];
            l.backward_weight(i, h, w, d, &mut acc);
            acc
        })
        .collect();
    let mut total = parts.pop().unwrap_or_else(|| vec![0f32; l.weight_len()]);
    for p in parts {
        total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    total
}

/// What a block's backward pass reads.
struct BlockState {
    h: usize,
    w: usize,
    conv1: ConvLayer,
    conv2: ConvLayer,
    shortcut: Option<ConvLayer>,
    x: Vec<f32>,
    pre: Vec<f32>,
    st1: Stats,
    c1: Vec<f32>,
    mid: Vec<f32>,
    st2: Stats,
}

/// What a post-activation block's backward pass reads.
struct PostBlockState {
    h: usize,
    w: usize,
    conv1: ConvLayer,
    conv2: ConvLayer,
    shortcut: Option<ConvLayer>,
    /// The block's input (the previous ReLU's output).
    x: Vec<f32>,
    c1: Vec<f32>,
    st1: Stats,
    mid: Vec<f32>,
    c2: Vec<f32>,
    st2: Stats,
    /// The shortcut convolution's output and its BatchNorm's statistics.
    cs: Option<(Vec<f32>, Stats)>,
}

enum BodyState {
    Pre {
        blocks: Vec<BlockState>,
        /// The input of the head BatchNorm.
        last: Vec<f32>,
        st_head: Stats,
    },
    Post {
        /// The stem convolution's output and its BatchNorm's statistics.
        c0: Vec<f32>,
        st_stem: Stats,
        blocks: Vec<PostBlockState>,
    },
}

struct TrainState {
    n: usize,
    stem: ConvLayer,
    body: BodyState,
    /// The body's output (post-ReLU: its sign is the last ReLU's mask).
    fin: Vec<f32>,
    pixels: usize,
    pooled: Vec<f32>,
}

/// The whole network in train mode as one op on its flat parameter vector.
pub(crate) struct FusedTrain {
    layout: Arc<TrainLayout>,
    /// Normalised NHWC input, (B, H, W, C).
    input: Vec<f32>,
    dims: [usize; 4],
    /// Per normalisation layer in [`PreAct::norms`] order: its noise seed and scale.
    noise: Vec<Option<NoiseSeed>>,
    /// The op's order of the caller's images (an OAT batch: λ = 0 first).
    batch: Batch,
    saved: Mutex<Option<TrainState>>,
    /// (mean, biased variance, rows) of every BatchNorm, filled by the forward pass.
    pub(crate) stats: Arc<Mutex<Vec<BnBatch>>>,
}

impl FusedTrain {
    /// `x`: NCHW input in bounds; `mean`/`inv_std`: the model's input normalisation;
    /// `noise`: each normalisation layer's noise seed and scale (None for a plain one),
    /// in [`PreAct::norms`] order; `second`: for an OAT model, which rows use each
    /// layer's second BatchNorm (λ > 0).
    pub(crate) fn new(
        layout: TrainLayout,
        x: &[f32],
        dims: [usize; 4],
        mean: &[f32],
        inv_std: &[f32],
        noise: Vec<Option<NoiseSeed>>,
        second: Option<&[bool]>,
    ) -> Self {
        let [b, c, h, w] = dims;
        let batch = match second {
            Some(adv) => {
                let mut order: Vec<usize> = (0..b).filter(|&i| !adv[i]).collect();
                let own = order.len();
                order.extend((0..b).filter(|&i| adv[i]));
                Batch { order, own }
            }
            None => Batch {
                order: (0..b).collect(),
                own: b,
            },
        };
        let mut input = vec![0f32; x.len()];
        input
            .par_chunks_mut(c * h * w)
            .zip(batch.order.par_iter())
            .for_each(|(dst, &row)| {
                let img = &x[row * c * h * w..(row + 1) * c * h * w];
                for ch in 0..c {
                    for (p, v) in img[ch * h * w..(ch + 1) * h * w].iter().enumerate() {
                        dst[p * c + ch] = (v - mean[ch]) * inv_std[ch];
                    }
                }
            });
        debug_assert_eq!(input.len(), b * c * h * w);
        FusedTrain {
            layout: Arc::new(layout),
            input,
            dims,
            noise,
            batch,
            saved: Mutex::new(None),
            stats: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn forward(&self, flat: &[f32]) -> Result<(Vec<f32>, TrainState)> {
        let lay = &self.layout;
        let [n, _, h, w] = self.dims;
        let stem = lay.stem.layer(flat);
        let (ho, wo) = stem.out_hw(h, w)?;
        let mut cur = vec![0f32; n * ho * wo * lay.stem.c_out];
        conv_forward(&stem, &self.input, n, h, w, &mut cur, false);
        let mut stats = Vec::new();
        let (fin, (h, w), body) = match &lay.body {
            BodyAt::Pre { blocks, head } => {
                self.pre_forward(blocks, *head, cur, n, (ho, wo), flat, &mut stats)?
            }
            BodyAt::Post { stem_bn, blocks } => {
                self.post_forward(*stem_bn, blocks, cur, n, (ho, wo), flat, &mut stats)?
            }
        };
        let (c, pixels) = (lay.features, h * w);
        let mut pooled = vec![0f32; n * c];
        pooled
            .par_chunks_mut(c)
            .zip(fin.par_chunks(pixels * c))
            .for_each(|(p, img)| {
                for row in img.chunks_exact(c) {
                    p.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
                p.iter_mut().for_each(|a| *a /= pixels as f32);
            });
        let k = lay.classes;
        let bias = &flat[lay.fc_b..][..k];
        let mut logits: Vec<f32> = (0..n).flat_map(|_| bias.iter().copied()).collect();
        sgemm(
            &mut logits,
            MatRef::row_major(&pooled, n, c),
            MatRef::row_major(&flat[lay.fc_w..][..k * c], k, c).t(),
            true,
        );
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
        Ok((
            logits,
            TrainState {
                n,
                stem,
                body,
                fin,
                pixels,
                pooled,
            },
        ))
    }

    /// The pre-activation body from the stem's output `cur` (n images of side `hw`):
    /// the head's output, its side and the state of the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn pre_forward(
        &self,
        blocks_at: &[BlockAt],
        head: BnAt,
        mut cur: Vec<f32>,
        n: usize,
        (mut h, mut w): (usize, usize),
        flat: &[f32],
        stats: &mut Vec<BnBatch>,
    ) -> Result<(Vec<f32>, (usize, usize), BodyState)> {
        let mut blocks = Vec::with_capacity(blocks_at.len());
        // The kernels in GEMM layout, every layer's in parallel.
        let kernels: Vec<_> = blocks_at
            .par_iter()
            .map(|b| {
                (
                    b.conv1.layer(flat),
                    b.conv2.layer(flat),
                    b.shortcut.map(|s| s.layer(flat)),
                )
            })
            .collect();
        let noise = |i: usize| self.noise.get(i).copied().flatten();
        for (i, (b, (conv1, conv2, shortcut))) in blocks_at.iter().zip(kernels).enumerate() {
            let (pre, st1) = train_norm::forward(&cur, n, b.bn1, flat, noise(2 * i), &self.batch);
            let (ho, wo) = conv1.out_hw(h, w)?;
            let out_len = n * ho * wo * b.conv1.c_out;
            let mut out = match &shortcut {
                Some(sc) => {
                    let mut o = vec![0f32; out_len];
                    conv_forward(sc, &pre, n, h, w, &mut o, false);
                    o
                }
                None => cur.clone(),
            };
            let mut c1 = vec![0f32; out_len];
            conv_forward(&conv1, &pre, n, h, w, &mut c1, false);
            let (mid, st2) =
                train_norm::forward(&c1, n, b.bn2, flat, noise(2 * i + 1), &self.batch);
            conv_forward(&conv2, &mid, n, ho, wo, &mut out, true);
            stats.push(BnBatch::of(&st1, b.bn1, h * w));
            stats.push(BnBatch::of(&st2, b.bn2, ho * wo));
            blocks.push(BlockState {
                h,
                w,
                conv1,
                conv2,
                shortcut,
                x: std::mem::replace(&mut cur, out),
                pre,
                st1,
                c1,
                mid,
                st2,
            });
            (h, w) = (ho, wo);
        }
        let (fin, st_head) =
            train_norm::forward(&cur, n, head, flat, noise(2 * blocks_at.len()), &self.batch);
        stats.push(BnBatch::of(&st_head, head, h * w));
        Ok((
            fin,
            (h, w),
            BodyState::Pre {
                blocks,
                last: cur,
                st_head,
            },
        ))
    }

    /// The post-activation body from the stem convolution's output `c0`.
    #[allow(clippy::too_many_arguments)]
    fn post_forward(
        &self,
        stem_bn: BnAt,
        blocks_at: &[PostBlockAt],
        c0: Vec<f32>,
        n: usize,
        (mut h, mut w): (usize, usize),
        flat: &[f32],
        stats: &mut Vec<BnBatch>,
    ) -> Result<(Vec<f32>, (usize, usize), BodyState)> {
        let (mut cur, st_stem) = train_norm::forward(&c0, n, stem_bn, flat, None, &self.batch);
        stats.push(BnBatch::of(&st_stem, stem_bn, h * w));
        let kernels: Vec<_> = blocks_at
            .par_iter()
            .map(|b| {
                (
                    b.conv1.layer(flat),
                    b.conv2.layer(flat),
                    b.shortcut.map(|(s, _)| s.layer(flat)),
                )
            })
            .collect();
        let mut blocks = Vec::with_capacity(blocks_at.len());
        for (b, (conv1, conv2, shortcut)) in blocks_at.iter().zip(kernels) {
            let (ho, wo) = conv1.out_hw(h, w)?;
            let out_len = n * ho * wo * b.conv1.c_out;
            let mut c1 = vec![0f32; out_len];
            conv_forward(&conv1, &cur, n, h, w, &mut c1, false);
            let (mid, st1) = train_norm::forward(&c1, n, b.bn1, flat, None, &self.batch);
            let mut c2 = vec![0f32; out_len];
            conv_forward(&conv2, &mid, n, ho, wo, &mut c2, false);
            let (mut out, st2) = train_norm::forward_linear(&c2, n, b.bn2, flat, &self.batch);
            stats.push(BnBatch::of(&st1, b.bn1, ho * wo));
            stats.push(BnBatch::of(&st2, b.bn2, ho * wo));
            let cs = match (&shortcut, b.shortcut) {
                (Some(sc), Some((_, bn))) => {
                    let mut cs = vec![0f32; out_len];
                    conv_forward(sc, &cur, n, h, w, &mut cs, false);
                    let (ys, sts) = train_norm::forward_linear(&cs, n, bn, flat, &self.batch);
                    stats.push(BnBatch::of(&sts, bn, ho * wo));
                    add_relu(&mut out, &ys);
                    Some((cs, sts))
                }
                _ => {
                    add_relu(&mut out, &cur);
                    None
                }
            };
            blocks.push(PostBlockState {
                h,
                w,
                conv1,
                conv2,
                shortcut,
                x: std::mem::replace(&mut cur, out),
                c1,
                st1,
                mid,
                c2,
                st2,
                cs,
            });
            (h, w) = (ho, wo);
        }
        Ok((
            cur,
            (h, w),
            BodyState::Post {
                c0,
                st_stem,
                blocks,
            },
        ))
    }

    fn backward(&self, st: TrainState, flat: &[f32], dlogits: &[f32]) -> Result<Vec<f32>> {
        let lay = &self.layout;
        let n = st.n;
        let (k, c) = (lay.classes, lay.features);
        let mut dflat = vec![0f32; lay.total];
        // Linear layer.
        let mut dfc = vec![0f32; k * c];
        sgemm(
            &mut dfc,
            MatRef::row_major(dlogits, n, k).t(),
            MatRef::row_major(&st.pooled, n, c),
            false,
        );
        dflat[lay.fc_w..][..k * c].copy_from_slice(&dfc);
        for row in dlogits.chunks_exact(k) {
            for (d, v) in dflat[lay.fc_b..][..k].iter_mut().zip(row) {
                *d += v;
            }
        }
        let mut dpool = vec![0f32; n * c];
        sgemm(
            &mut dpool,
            MatRef::row_major(dlogits, n, k),
            MatRef::row_major(&flat[lay.fc_w..][..k * c], k, c),
            false,
        );
        let pixels = st.pixels;
        let mut d = vec![0f32; st.fin.len()];
        d.par_chunks_mut(pixels * c)
            .zip(dpool.par_chunks(c))
            .for_each(|(img, dp)| {
                for row in img.chunks_exact_mut(c) {
                    row.iter_mut()
                        .zip(dp)
                        .for_each(|(g, v)| *g = v / pixels as f32);
                }
            });
        let d = match (&lay.body, &st.body) {
            (BodyAt::Pre { blocks, head }, BodyState::Pre { .. }) => {
                self.pre_backward(blocks, *head, &st, d, flat, &mut dflat)
            }
            (BodyAt::Post { stem_bn, blocks }, BodyState::Post { .. }) => {
                self.post_backward(*stem_bn, blocks, &st, d, flat, &mut dflat)
            }
            _ => candle_core::bail!("fused train path: saved state of another network"),
        };
        let [_, _, h, w] = self.dims;
        let dws = conv_backward_weight(&st.stem, &self.input, &d, n, h, w);
        lay.stem.store_grad(&dws, &mut dflat);
        Ok(dflat)
    }

    /// The backward pass of [`Self::pre_forward`]: from the gradient of the head's
    /// output to that of the stem's output.
    fn pre_backward(
        &self,
        blocks_at: &[BlockAt],
        head: BnAt,
        st: &TrainState,
        mut d: Vec<f32>,
        flat: &[f32],
        dflat: &mut [f32],
    ) -> Vec<f32> {
        let BodyState::Pre {
            blocks,
            last,
            st_head,
        } = &st.body
        else {
            return d;
        };
        let n = st.n;
        train_norm::backward(
            &mut d,
            last,
            &st.fin,
            st_head,
            head,
            flat,
            dflat,
            &self.batch,
        );
        for (b, s) in blocks_at.iter().zip(blocks).rev() {
            let (ho, wo) = s.conv1.out_hw(s.h, s.w).unwrap_or((0, 0));
            let dw2 = conv_backward_weight(&s.conv2, &s.mid, &d, n, ho, wo);
            b.conv2.store_grad(&dw2, dflat);
            let mut dmid = vec![0f32; s.mid.len()];
            conv_backward_input(&s.conv2, &d, n, ho, wo, &mut dmid);
            train_norm::backward(
                &mut dmid,
                &s.c1,
                &s.mid,
                &s.st2,
                b.bn2,
                flat,
                dflat,
                &self.batch,
            );
            let dw1 = conv_backward_weight(&s.conv1, &s.pre, &dmid, n, s.h, s.w);
            b.conv1.store_grad(&dw1, dflat);
            let mut dpre = vec![0f32; s.pre.len()];
            conv_backward_input(&s.conv1, &dmid, n, s.h, s.w, &mut dpre);
            drop(dmid);
            if let (Some(sc), Some(at)) = (&s.shortcut, b.shortcut) {
                let dws = conv_backward_weight(sc, &s.pre, &d, n, s.h, s.w);
                at.store_grad(&dws, dflat);
                conv_backward_input(sc, &d, n, s.h, s.w, &mut dpre);
            }
            train_norm::backward(
                &mut dpre,
                &s.x,
                &s.pre,
                &s.st1,
                b.bn1,
                flat,
                dflat,
                &self.batch,
            );
            if s.shortcut.is_none() {
                dpre.par_iter_mut()
                    .zip(d.par_iter())
                    .for_each(|(g, v)| *g += v);
            }
            d = dpre;
        }
        d
    }

    /// The backward pass of [`Self::post_forward`]: from the gradient of the last
    /// block's output to that of the stem convolution's output.
    fn post_backward(
        &self,
        stem_bn: BnAt,
        blocks_at: &[PostBlockAt],
        st: &TrainState,
        mut d: Vec<f32>,
        flat: &[f32],
        dflat: &mut [f32],
    ) -> Vec<f32> {
        let BodyState::Post {
            c0,
            st_stem,
            blocks,
        } = &st.body
        else {
            return d;
        };
        let n = st.n;
        for (i, (b, s)) in blocks_at.iter().zip(blocks).enumerate().rev() {
            // The block's output: the next block's input, or the body's output.
            let out = blocks
                .get(i + 1)
                .map_or(st.fin.as_slice(), |nb| nb.x.as_slice());
            d.par_iter_mut()
                .zip(out.par_iter())
                .for_each(|(g, y)| *g *= f32::from(u8::from(*y > 0.0)));
            let (ho, wo) = s.conv1.out_hw(s.h, s.w).unwrap_or((0, 0));
            // The second convolution's branch.
            let mut dc2 = d.clone();
            train_norm::backward(
                &mut dc2,
                &s.c2,
                &[],
                &s.st2,
                b.bn2,
                flat,
                dflat,
                &self.batch,
            );
            let dw2 = conv_backward_weight(&s.conv2, &s.mid, &dc2, n, ho, wo);
            b.conv2.store_grad(&dw2, dflat);
            let mut dmid = vec![0f32; s.mid.len()];
            conv_backward_input(&s.conv2, &dc2, n, ho, wo, &mut dmid);
            drop(dc2);
            train_norm::backward(
                &mut dmid,
                &s.c1,
                &s.mid,
                &s.st1,
                b.bn1,
                flat,
                dflat,
                &self.batch,
            );
            let dw1 = conv_backward_weight(&s.conv1, &s.x, &dmid, n, s.h, s.w);
            b.conv1.store_grad(&dw1, dflat);
            let mut dx = vec![0f32; s.x.len()];
            conv_backward_input(&s.conv1, &dmid, n, s.h, s.w, &mut dx);
            drop(dmid);
            match (&s.shortcut, b.shortcut, &s.cs) {
                (Some(sc), Some((at, bn)), Some((cs, sts))) => {
                    train_norm::backward(&mut d, cs, &[], sts, bn, flat, dflat, &self.batch);
                    let dws = conv_backward_weight(sc, &s.x, &d, n, s.h, s.w);
                    at.store_grad(&dws, dflat);
                    conv_backward_input(sc, &d, n, s.h, s.w, &mut dx);
                }
                _ => dx
                    .par_iter_mut()
                    .zip(d.par_iter())
                    .for_each(|(g, v)| *g += v),
            }
            d = dx;
        }
        let stem_out = blocks.first().map_or(st.fin.as_slice(), |b| b.x.as_slice());
        train_norm::backward(
            &mut d,
            c0,
            stem_out,
            st_stem,
            stem_bn,
            flat,
            dflat,
            &self.batch,
        );
        d
    }
}

/// out ← relu(out + skip).
fn add_relu(out: &mut [f32], skip: &[f32]) {
    out.par_iter_mut()
        .zip(skip.par_iter())
        .for_each(|(o, s)| *o = (*o + s).max(0.0));
}

impl CustomOp1 for FusedTrain {
    fn name(&self) -> &'static str {
        "fused-train-network"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let flat = f32_slice(s, l, self.name())?;
        if flat.len() != self.layout.total {
            candle_core::bail!(
                "fused train path: {} parameters, expected {}",
                flat.len(),
                self.layout.total
            )
        }
        let (logits, state) = self.forward(flat)?;
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        // Back into the caller's order.
        let k = self.layout.classes;
        let mut out = vec![0f32; logits.len()];
        for (j, &row) in self.batch.order.iter().enumerate() {
            out[row * k..(row + 1) * k].copy_from_slice(&logits[j * k..(j + 1) * k]);
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.dims[0], self.layout.classes)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let state = take_saved(
            &self.saved,
            "fused train path: the backward pass of this forward pass already ran",
        )?;
        let flat = arg.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let dlogits = grad
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let k = self.layout.classes;
        if dlogits.len() != state.n * k || self.batch.order.len() != state.n {
            candle_core::bail!("fused train path: gradient of {} values", dlogits.len())
        }
        // Into the op's order.
        let dlogits: Vec<f32> = self
            .batch
            .order
            .iter()
            .flat_map(|&row| dlogits[row * k..(row + 1) * k].iter().copied())
            .collect();
        let dflat = self.backward(state, &flat, &dlogits)?;
        Ok(Some(Tensor::from_vec(dflat, arg.shape(), arg.device())?))
    }
}
