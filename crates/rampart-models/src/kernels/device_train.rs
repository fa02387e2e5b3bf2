//! The fused train path of WRN, PreActResNet-18 and ResNet-20 on a GPU: the whole network in
//! train mode as one op on its flattened parameters, forward (logits, batch
//! statistics) and backward (every parameter gradient), written once over an
//! executor ([`TrainExec`]), like the eval path of [`super::device_eval`].
//!
//! Layer by layer, a training step on a GPU is one candle node per operation, and the
//! backward pass adds every node's gradient into a fresh zero tensor. Here the op's
//! input is the concatenation of the network's parameters (candle routes each part of
//! its gradient back to its variable), its output the logits followed by each
//! BatchNorm's batch statistics [mean | 1/√(var + ε)] (from which the caller updates
//! the running estimates, as the layer-by-layer path does). Per pre-activation block
//! the forward pass runs two cuDNN train-mode BatchNorms (each followed by a ReLU in
//! place) and the block's convolutions, the second accumulating onto the shortcut;
//! the backward pass runs, per convolution, its kernel-gradient and input-gradient
//! passes, per BatchNorm a ReLU mask and cuDNN's backward pass, and writes every
//! parameter gradient into one buffer.
//!
//! The CPU executor (the kernels' twins, the CPU convolution passes and the CPU
//! BatchNorm) tests the program against the layer-by-layer path on any machine; the
//! CPU's own fast path stays [`super::fused_train`]. Pre-activation networks (a WRN or
//! pre-activation ResNet-18 in f32, TF32 or bf16 convolutions, no synchronised
//! BatchNorm, an input that needs no gradient), plain or stochastic students: a noisy layer's z is drawn by
//! `layer_noise` from the seed the layer-by-layer pass would draw, σ (the batch
//! standard deviation of the BatchNorm's output, a constant for the gradient) comes
//! from the batch statistics, and its output carries σ for the running estimate; α's
//! gradient is a deterministic two-kernel sum. OAT models: the batch comes with its
//! λ = 0 rows first ([`TrainProgram::with_groups`]), each dual BatchNorm runs on its
//! two row ranges, and FiLM's per-image outputs are inputs like the parameters.
//! Post-activation networks (ResNet-20, plain) have a form of their own
//! ([`forward_post`]). On a GPU the path is taken when `RAMPART_CUDA_FUSED_TRAIN` is
//! set ([`enabled`]): it has not yet run on a GPU.

use super::common::f32_slice;
use super::conv::{ohwi_to_oihw, oihw_to_ohwi, Conv2d, ConvShape, Pass};
use super::device_eval::{CpuExec, Exec};
use super::launch::Backend;
use super::postact::PostAct;
use super::preact::PreAct;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The environment variable that turns the fused train path on for CUDA models (any
/// value but `0`).
pub const ENABLE_ENV: &str = "RAMPART_CUDA_FUSED_TRAIN";

/// Whether [`ENABLE_ENV`] asks for the fused train path on a GPU.
pub fn enabled() -> bool {
    super::device_eval::switched_on(ENABLE_ENV)
}

/// Whether a GPU model may take the path: a build with cuDNN and the path
/// [`enabled`] (in any precision).
pub(crate) fn usable() -> bool {
    super::device_eval::usable_if(enabled())
}

/// A convolution: where its OIHW kernel starts in the flat parameters, its shape,
/// stride and padding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TConv {
    at: usize,
    c_out: usize,
    c_in: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

/// A BatchNorm (+ ReLU): where γ and β start, the channels and ε, and a student's
/// noise.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TNorm {
    gamma: usize,
    beta: usize,
    c: usize,
    eps: f64,
    noise: Option<TNoise>,
    oat: Option<TOat>,
}

/// An OAT layer: where its second BatchNorm's γ and β are, and its FiLM outputs
/// [γ_f | β_f] of every image of the batch ((B, 2C), in the batch's order).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TOat {
    adv: (usize, usize),
    film: usize,
}

/// A student's noise after a BatchNorm in one pass: where α is, the layer's seed, the
/// batch's first image in the global batch, the noise scale s.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TNoise {
    alpha: usize,
    seed: u64,
    first: u64,
    scale: f32,
}

/// Added to the batch variance under the root of a noisy layer's σ (as
/// `variant::Noise` does).
pub(crate) const NOISE_STD_EPS: f32 = 1e-5;

/// The linear layer: where its weight (K, C) and bias (K,) start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TFc {
    w: usize,
    b: usize,
    k: usize,
    c: usize,
}

/// A pre-activation network's parameters laid out in one flat vector.
pub(crate) type TrainNet = PreAct<TConv, TNorm, TFc>;

/// A post-activation network's (ResNet-20's) in the same terms.
pub(crate) type TrainPostNet = PostAct<TConv, TNorm, TFc>;

/// The network of a train program.
pub(crate) enum TrainArch {
    Pre(TrainNet),
    Post(TrainPostNet),
}

impl TrainArch {
    /// The BatchNorms in execution order ([`PreAct::norms`], [`PostAct::norms`]).
    fn norms(&self) -> Vec<&TNorm> {
        match self {
            TrainArch::Pre(n) => n.norms().collect(),
            TrainArch::Post(n) => n.norms().collect(),
        }
    }

    /// The linear layer.
    fn fc(&self) -> &TFc {
        match self {
            TrainArch::Pre(n) => &n.fc,
            TrainArch::Post(n) => &n.fc,
        }
    }
}

/// A network's layout, the tensors it was laid out from (in order), and its input.
pub(crate) struct TrainProgram {
    net: TrainArch,
    /// An OAT pass's batch: its images and how many of them come first with λ = 0
    /// (the first BatchNorm's group; the others go through the second).
    groups: Option<(usize, usize)>,
    params: usize,
    input: [usize; 3],
    mean: Tensor,
    inv_std: Tensor,
}

impl TrainProgram {
    /// The layout of `net` (whose BatchNorms carry their ε) and the parameter tensors
    /// in layout order, to be concatenated (each flattened) into the op's input.
    pub(crate) fn new(
        net: &super::device_eval::DeviceArch,
        input: [usize; 3],
        mean: Tensor,
        inv_std: Tensor,
    ) -> Result<(Self, Vec<Tensor>)> {
        // The tensors placed so far and the length they take (`try_map` takes `Fn`
        // closures, so the placement state sits in a cell).
        let placed = std::cell::RefCell::new((Vec::<Tensor>::new(), 0usize));
        let place = |t: &Tensor| -> Result<usize> {
            if t.dtype() != DType::F32 {
                candle_core::bail!(
                    "fused train path: parameters must be f32, got {:?}",
                    t.dtype()
                )
            }
            let mut p = placed.borrow_mut();
            let start = p.1;
            p.1 += t.elem_count();
            p.0.push(t.clone());
            Ok(start)
        };
        let conv = |c: &super::device_eval::DConv| {
            let (c_out, c_in, k, k2) = c.weight.dims4()?;
            if k != k2 {
                return Ok(None);
            }
            Ok(Some(TConv {
                at: place(&c.weight)?,
                c_out,
                c_in,
                k,
                stride: c.stride,
                padding: c.padding,
            }))
        };
        let norm = |n: &super::device_eval::DNorm| {
            if n.noise.is_some() {
                candle_core::bail!("fused train path: an eval-mode noisy layer")
            }
            let c = n.gamma.elem_count();
            let (gamma, beta) = (place(&n.gamma)?, place(&n.beta)?);
            let oat = match &n.train_oat {
                Some(o) => {
                    let adv = (place(&o.adv.0)?, place(&o.adv.1)?);
                    let (rows, two_c) = o.film.dims2()?;
                    if two_c != 2 * c || n.train_noise.is_some() {
                        candle_core::bail!(
                            "fused train path: FiLM outputs ({rows}, {two_c}) for {c} channels, or noise with λ"
                        )
                    }
                    Some(TOat {
                        adv,
                        film: place(&o.film)?,
                    })
                }
                None => None,
            };
            let noise = match &n.train_noise {
                Some(z) => {
                    if z.alpha.elem_count() != 1 {
                        candle_core::bail!(
                            "fused train path: a noise factor of {:?}",
                            z.alpha.dims()
                        )
                    }
                    Some(TNoise {
                        alpha: place(&z.alpha)?,
                        seed: z.seed,
                        first: z.first,
                        scale: z.scale,
                    })
                }
                None => None,
            };
            Ok(Some(TNorm {
                gamma,
                beta,
                c,
                eps: f64::from(n.eps),
                noise,
                oat,
            }))
        };
        let fc = |(w, b): &(Tensor, Tensor)| {
            let (k, c) = w.dims2()?;
            Ok(Some(TFc {
                w: place(w)?,
                b: place(b)?,
                k,
                c,
            }))
        };
        let layout = match net {
            super::device_eval::DeviceArch::Pre(n) => {
                n.try_map(conv, norm, fc)?.map(TrainArch::Pre)
            }
            super::device_eval::DeviceArch::Post(n) => {
                n.try_map(conv, norm, fc)?.map(TrainArch::Post)
            }
        };
        let Some(net) = layout else {
            candle_core::bail!("fused train path: a convolution with a non-square kernel")
        };
        let (tensors, params) = placed.into_inner();
        Ok((
            TrainProgram {
                net,
                groups: None,
                params,
                input,
                mean: mean.to_dtype(DType::F32)?,
                inv_std: inv_std.to_dtype(DType::F32)?,
            },
            tensors,
        ))
    }

    /// An OAT pass of `b` images whose first `clean` have λ = 0 (its rows ordered so:
    /// see `Classifier::fused_gpu_train`).
    pub(crate) fn with_groups(mut self, b: usize, clean: usize) -> Result<Self> {
        if clean > b {
            candle_core::bail!("fused train path: {clean} clean images in a batch of {b}")
        }
        self.groups = Some((b, clean));
        Ok(self)
    }

    /// The groups a BatchNorm normalises separately, for a batch of `b` images: (first
    /// image, images, where γ and β are), the empty ones left out; an OAT layer's
    /// clean images through its own BatchNorm, the others through the second.
    #[allow(clippy::type_complexity)]
    fn norm_groups(&self, n: &TNorm, b: usize) -> Result<Vec<(usize, usize, (usize, usize))>> {
        let own = (n.gamma, n.beta);
        let Some(o) = &n.oat else {
            return Ok(vec![(0, b, own)]);
        };
        let Some((gb, clean)) = self.groups else {
            candle_core::bail!("fused train path: an OAT layer without the batch's λ groups")
        };
        if gb != b {
            candle_core::bail!("fused train path: λ groups of {gb} images for a batch of {b}")
        }
        Ok([(0, clean, own), (clean, b - clean, o.adv)]
            .into_iter()
            .filter(|g| g.1 > 0)
            .collect())
    }

    /// A BatchNorm's statistics in the op's output for `b` images: [mean |
    /// 1/√(var + ε)] per group, a noisy one's batch σ after them.
    fn norm_stats_len(&self, n: &TNorm, b: usize) -> Result<usize> {
        let noise = if n.noise.is_some() { n.c } else { 0 };
        Ok(2 * n.c * self.norm_groups(n, b)?.len() + noise)
    }

    /// The number of BatchNorm statistics values after the logits for `b` images.
    fn stats_len(&self, b: usize) -> Result<usize> {
        Ok(self.norm_stats_lens(b)?.iter().sum())
    }

    /// Each BatchNorm's statistics length in the output for `b` images, in the
    /// network's `norms` order.
    pub(crate) fn norm_stats_lens(&self, b: usize) -> Result<Vec<usize>> {
        self.net
            .norms()
            .into_iter()
            .map(|n| self.norm_stats_len(n, b))
            .collect()
    }

    /// The rows (images × pixels) each BatchNorm normalises over for a batch of `b`
    /// images, in [`PreAct::norms`] order.
    pub(crate) fn norm_rows(&self, b: usize) -> Result<Vec<usize>> {
        let [_, h0, w0] = self.input;
        let mut rows = Vec::new();
        match &self.net {
            TrainArch::Pre(net) => {
                let mut side = shape(&net.stem, b, (h0, w0))?.out();
                for blk in &net.blocks {
                    rows.push(b * side.0 * side.1);
                    let g1 = shape(&blk.conv1, b, side)?;
                    let (ho, wo) = g1.out();
                    rows.push(b * ho * wo);
                    side = shape(&blk.conv2, b, (ho, wo))?.out();
                }
                rows.push(b * side.0 * side.1);
            }
            TrainArch::Post(net) => {
                let mut side = shape(&net.stem, b, (h0, w0))?.out();
                rows.push(b * side.0 * side.1);
                for blk in &net.blocks {
                    let g1 = shape(&blk.conv1, b, side)?;
                    let (ho, wo) = g1.out();
                    rows.push(b * ho * wo);
                    side = shape(&blk.conv2, b, (ho, wo))?.out();
                    rows.push(b * side.0 * side.1);
                    if blk.shortcut.is_some() {
                        rows.push(b * side.0 * side.1);
                    }
                }
            }
        }
        Ok(rows)
    }
}

/// Where the parts of a [`DeviceTrain`] op's output are: the logits (B, K), then each
/// BatchNorm's statistics.
pub(crate) struct OutputLayout {
    b: usize,
    k: usize,
    lens: Vec<usize>,
}

impl OutputLayout {
    /// The logits (B, K) and each BatchNorm's statistics [mean | 1/√(var + ε)] (2C)
    /// with a noisy one's batch σ (C) after them ([`PreAct::norms`] order, detached)
    /// of the op's output.
    pub(crate) fn split(&self, out: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, k) = (self.b, self.k);
        let logits = out.narrow(0, 0, b * k)?.reshape((b, k))?;
        let mut at = b * k;
        let mut stats = Vec::new();
        for &len in &self.lens {
            stats.push(out.narrow(0, at, len)?.detach());
            at += len;
        }
        Ok((logits, stats))
    }

    /// Where each BatchNorm's statistics start in the op's output and how many
    /// values they take, in [`OutputLayout::split`]'s order.
    pub(crate) fn stat_places(&self) -> Vec<(usize, usize)> {
        let mut at = self.b * self.k;
        self.lens
            .iter()
            .map(|&len| {
                let place = (at, len);
                at += len;
                place
            })
            .collect()
    }
}

/// The operations the train program adds to [`Exec`]'s. `p` is the flat parameter
/// vector; activations are NHWC.
pub(crate) trait TrainExec: Exec {
    /// A copy of `x`.
    fn copy(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// `dst[at..at + src.len()] = src`.
    fn put(&self, dst: &mut Self::Buf, at: usize, src: &Self::Buf) -> Result<()>;
    /// `d += r`.
    fn add_in_place(&self, d: &mut Self::Buf, r: &Self::Buf) -> Result<()>;
    /// The normalised NHWC input of the NCHW images `x`.
    fn input(&self, x: &Tensor, p: &TrainProgram) -> Result<Self::Buf>;
    /// The KRSC kernel of `conv` from the OIHW one in `p`.
    fn kernel_at(&self, p: &Self::Buf, conv: &TConv) -> Result<Self::Buf>;
    /// The kernel gradient of convolution `g` from its input `x` and output gradient
    /// `dy`, written in OIHW order at `at` of `grad`.
    fn filter_into(
        &self,
        g: &ConvShape,
        x: &Self::Buf,
        dy: &Self::Buf,
        grad: &mut Self::Buf,
        at: usize,
    ) -> Result<()>;
    /// relu(bn(x)) with x's batch statistics, and those statistics
    /// [mean | 1/√(var + ε)] (2C).
    fn bn_relu_train(
        &self,
        x: &Self::Buf,
        p: &Self::Buf,
        n: &TNorm,
        rows: usize,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// The input gradient of relu(bn(x)) (output `y`, statistics `stats`) from the
    /// output gradient `d`, into `d`; [dγ | dβ] (2C) returned.
    #[allow(clippy::too_many_arguments)]
    fn bn_relu_train_backward(
        &self,
        x: &Self::Buf,
        y: &Self::Buf,
        d: &mut Self::Buf,
        p: &Self::Buf,
        n: &TNorm,
        stats: &Self::Buf,
        rows: usize,
    ) -> Result<Self::Buf>;
    /// bn(x) with x's batch statistics (no ReLU), and those statistics
    /// [mean | 1/√(var + ε)] (2C).
    fn bn_train(
        &self,
        x: &Self::Buf,
        p: &Self::Buf,
        n: &TNorm,
        rows: usize,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// The input gradient of [`TrainExec::bn_train`] from its output gradient d, into
    /// d; [dγ | dβ] (2C) returned.
    fn bn_train_backward(
        &self,
        x: &Self::Buf,
        d: &mut Self::Buf,
        p: &Self::Buf,
        n: &TNorm,
        stats: &Self::Buf,
        rows: usize,
    ) -> Result<Self::Buf>;
    /// d ← d·[y > 0].
    fn relu_mask(&self, d: &mut Self::Buf, y: &Self::Buf) -> Result<()>;
    /// A buffer of `n` zeros.
    fn buffer_zeroed(&self, n: usize) -> Result<Self::Buf>;
    /// bn(x) with the batch statistics of rows `first..first + rows` of x (C values
    /// each), written to the same rows of `y`, with the γ and β at `at` of `p`; the
    /// statistics [mean | 1/√(var + ε)] returned. One group of an OAT layer.
    fn bn_train_part(
        &self,
        x: &Self::Buf,
        y: &mut Self::Buf,
        part: (usize, usize),
        p: &Self::Buf,
        n: &TNorm,
        at: (usize, usize),
    ) -> Result<Self::Buf>;
    /// The backward pass of [`TrainExec::bn_train_part`] on those rows: their input
    /// gradient into the same rows of `dx` from the output gradient `d`; [dγ | dβ].
    #[allow(clippy::too_many_arguments)]
    fn bn_train_part_backward(
        &self,
        x: &Self::Buf,
        d: &Self::Buf,
        dx: &mut Self::Buf,
        part: (usize, usize),
        p: &Self::Buf,
        n: &TNorm,
        at: (usize, usize),
        stats: &Self::Buf,
    ) -> Result<Self::Buf>;
    /// FiLM and ReLU: y = relu(h·(1 + γ_f) + β_f), image i's [γ_f | β_f] (2C) at
    /// `film` + 2C·i of `p`, `per` values per image.
    fn film_relu(
        &self,
        h: &Self::Buf,
        p: &Self::Buf,
        film: usize,
        c: usize,
        per: usize,
    ) -> Result<Self::Buf>;
    /// The backward pass of FiLM from d = the gradient of h·(1 + γ_f) + β_f: the FiLM
    /// outputs' gradients (image i's [Σ d·h | Σ d] over its pixels) written at
    /// `film` of `grad`, and d ← d·(1 + γ_f).
    #[allow(clippy::too_many_arguments)]
    fn film_backward(
        &self,
        d: &mut Self::Buf,
        h: &Self::Buf,
        p: &Self::Buf,
        film: usize,
        c: usize,
        per: usize,
        grad: &mut Self::Buf,
    ) -> Result<()>;
    /// y ← relu(y + r).
    fn add_relu_in_place(&self, y: &mut Self::Buf, r: &Self::Buf) -> Result<()>;
    /// A student's noisy BatchNorm: h = bn(x) with x's batch statistics, σ the
    /// per-channel standard deviation of h over the batch (√(γ²·(1 − ε·r²) + 1e-5),
    /// r = 1/√(var + ε), the variance of γ·(x − μ)·r + β), y = relu(h + (α·σ)·s ⊙ z);
    /// returns (y, the statistics [mean | r], σ).
    fn bn_noise_relu_train(
        &self,
        x: &Self::Buf,
        p: &Self::Buf,
        n: &TNorm,
        noise: &TNoise,
        rows: usize,
        z: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// The backward pass of [`TrainExec::bn_noise_relu_train`] (σ a constant, as on
    /// the layer-by-layer path): d ← d·[y > 0], α's gradient (Σ d·z·σ)·s written at its
    /// place in `grad`, then d ← the BatchNorm's input gradient; [dγ | dβ] returned.
    #[allow(clippy::too_many_arguments)]
    fn bn_noise_relu_train_backward(
        &self,
        x: &Self::Buf,
        y: &Self::Buf,
        d: &mut Self::Buf,
        p: &Self::Buf,
        n: &TNorm,
        noise: &TNoise,
        saved: (&Self::Buf, &Self::Buf, &Self::Buf),
        rows: usize,
        grad: &mut Self::Buf,
    ) -> Result<Self::Buf>;
    /// Global average pooling (`hw` pixels) and the linear layer of `p`: (pooled
    /// (B, C), logits (B, K)).
    fn pool_linear_at(
        &self,
        x: &Self::Buf,
        p: &Self::Buf,
        fc: &TFc,
        hw: usize,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// From the logits' gradient: the linear layer's weight and bias gradients,
    /// written at their places in `grad`, and the gradient (B, hw, C) of the pooled
    /// activations.
    fn linear_pool_backward_at(
        &self,
        dl: &Self::Buf,
        pooled: &Self::Buf,
        p: &Self::Buf,
        fc: &TFc,
        hw: usize,
        grad: &mut Self::Buf,
    ) -> Result<Self::Buf>;
}

/// A convolution's shape on `b` images of side `side`.
fn shape(conv: &TConv, b: usize, side: (usize, usize)) -> Result<ConvShape> {
    ConvShape::from_dims(
        b,
        side,
        conv.c_in,
        conv.c_out,
        conv.k,
        conv.stride,
        conv.padding,
    )
}

/// One block's saved state: its input and side, the first BatchNorm's output (and
/// statistics), the first convolution's output, the second BatchNorm's output (and
/// statistics), the KRSC kernels.
struct BlockState<B> {
    side: (usize, usize),
    x: B,
    stats1: NormState<B>,
    pre: B,
    h: B,
    stats2: NormState<B>,
    mid: B,
    k1: B,
    k2: B,
    shortcut: Option<B>,
}

/// What the backward pass reads, per architecture.
pub(crate) enum TrainState<B> {
    Pre(PreState<B>),
    Post(PostState<B>),
}

/// One post-activation block's saved state: its input side, conv1's output, bn1's
/// statistics, relu(bn1(·)), conv2's output, bn2's statistics, the shortcut's
/// convolution output, statistics and kernel, the KRSC kernels.
struct PostBlockState<B> {
    side: (usize, usize),
    h1: B,
    stats1: NormState<B>,
    a1: B,
    c2: B,
    stats2: B,
    shortcut: Option<(B, B, B)>,
    k1: B,
    k2: B,
}

/// What the backward pass of a post-activation network reads: the input, the stem's
/// convolution output and statistics, every block's input and the last block's
/// output (`acts`), the blocks' states, the pooled features.
pub(crate) struct PostState<B> {
    b: usize,
    params: B,
    a0: B,
    h0: B,
    stats0: NormState<B>,
    acts: Vec<B>,
    blocks: Vec<PostBlockState<B>>,
    pooled: B,
    side: (usize, usize),
}

/// What the backward pass of a pre-activation network reads.
pub(crate) struct PreState<B> {
    b: usize,
    params: B,
    a0: B,
    blocks: Vec<BlockState<B>>,
    head_x: B,
    head_stats: NormState<B>,
    fin: B,
    pooled: B,
    side: (usize, usize),
}

/// A BatchNorm's saved state: its statistics [mean | 1/√(var + ε)]; a noisy one's z
/// and σ too; an OAT layer's per group, with the BatchNorms' output before FiLM.
enum NormState<B> {
    Plain { stats: B },
    Noisy { stats: B, z: B, sigma: B },
    Oat { h: B, stats: Vec<B> },
}

/// relu(bn(x)) of BatchNorm `n` over `rows` rows of `b` images in train mode, with a
/// student's noise (z drawn here) or an OAT layer's groups and FiLM.
#[allow(clippy::too_many_arguments)]
fn norm_forward<E: TrainExec>(
    e: &E,
    prog: &TrainProgram,
    x: &E::Buf,
    p: &E::Buf,
    n: &TNorm,
    rows: usize,
    b: usize,
) -> Result<(E::Buf, NormState<E::Buf>)> {
    match (&n.noise, &n.oat) {
        (None, None) => {
            let (y, stats) = e.bn_relu_train(x, p, n, rows)?;
            Ok((y, NormState::Plain { stats }))
        }
        (Some(nz), None) => {
            let z = e.draw_noise(nz.seed, nz.first, b, E::len(x))?;
            let (y, stats, sigma) = e.bn_noise_relu_train(x, p, n, nz, rows, &z)?;
            Ok((y, NormState::Noisy { stats, z, sigma }))
        }
        (None, Some(o)) => {
            let per = rows / b.max(1);
            let mut h = e.buffer(E::len(x))?;
            let mut stats = Vec::new();
            for (first, images, at) in prog.norm_groups(n, b)? {
                stats.push(e.bn_train_part(x, &mut h, (first * per, images * per), p, n, at)?);
            }
            let y = e.film_relu(&h, p, o.film, n.c, per * n.c)?;
            Ok((y, NormState::Oat { h, stats }))
        }
        (Some(_), Some(_)) => candle_core::bail!("fused train path: noise and λ in one layer"),
    }
}

/// The backward pass of [`norm_forward`]: d ← the input gradient; the layer's
/// parameter gradients (γ and β; a noisy layer's α; an OAT layer's second γ and β,
/// zero for an empty group, and its FiLM outputs') written into `grad`.
#[allow(clippy::too_many_arguments)]
fn norm_backward<E: TrainExec>(
    e: &E,
    prog: &TrainProgram,
    (x, y): (&E::Buf, &E::Buf),
    d: &mut E::Buf,
    p: &E::Buf,
    n: &TNorm,
    st: &NormState<E::Buf>,
    rows: usize,
    b: usize,
    grad: &mut E::Buf,
) -> Result<()> {
    let dgb = match (&n.noise, &n.oat, st) {
        (None, None, NormState::Plain { stats }) => {
            e.bn_relu_train_backward(x, y, d, p, n, stats, rows)?
        }
        (Some(nz), None, NormState::Noisy { stats, z, sigma }) => {
            e.bn_noise_relu_train_backward(x, y, d, p, n, nz, (stats, z, sigma), rows, grad)?
        }
        (None, Some(o), NormState::Oat { h, stats }) => {
            let per = rows / b.max(1);
            e.relu_mask(d, y)?;
            e.film_backward(d, h, p, o.film, n.c, per * n.c, grad)?;
            let mut dx = e.buffer(E::len(d))?;
            let groups = prog.norm_groups(n, b)?;
            if groups.len() != stats.len() {
                candle_core::bail!("fused train path: saved state of another network")
            }
            for ((first, images, at), st) in groups.iter().zip(stats) {
                let part = (first * per, images * per);
                let dgb = e.bn_train_part_backward(x, d, &mut dx, part, p, n, *at, st)?;
                put_grads_at(e, grad, *at, n.c, &dgb)?;
            }
            // A BatchNorm no image went through has zero gradients.
            for at in [(n.gamma, n.beta), o.adv] {
                if !groups.iter().any(|g| g.2 == at) {
                    put_grads_at(e, grad, at, n.c, &e.buffer_zeroed(2 * n.c)?)?;
                }
            }
            *d = dx;
            return Ok(());
        }
        _ => candle_core::bail!("fused train path: saved state of another network"),
    };
    put_norm_grads(e, grad, n, &dgb)
}

/// The forward pass: logits followed by every BatchNorm's statistics (in the
/// network's `norms` order), and the state of the backward pass.
fn forward<E: TrainExec>(
    e: &E,
    prog: &TrainProgram,
    params: E::Buf,
    x: &Tensor,
) -> Result<(E::Buf, TrainState<E::Buf>)> {
    Ok(match &prog.net {
        TrainArch::Pre(net) => {
            let (out, st) = forward_pre(e, prog, net, params, x)?;
            (out, TrainState::Pre(st))
        }
        TrainArch::Post(net) => {
            let (out, st) = forward_post(e, prog, net, params, x)?;
            (out, TrainState::Post(st))
        }
    })
}

/// The backward pass: every parameter's gradient, in the flat layout, from the
/// logits' gradient `dl` (B, K).
fn backward<E: TrainExec>(
    e: &E,
    prog: &TrainProgram,
    s: &TrainState<E::Buf>,
    dl: &E::Buf,
) -> Result<E::Buf> {
    match (&prog.net, s) {
        (TrainArch::Pre(net), TrainState::Pre(s)) => backward_pre(e, prog, net, s, dl),
        (TrainArch::Post(net), TrainState::Post(s)) => backward_post(e, prog, net, s, dl),
        _ => candle_core::bail!("fused train path: saved state of another network"),
    }
}

/// The output buffer of a forward pass (logits, then the statistics) and a writer of
/// the statistics in order.
struct Output<B> {
    out: B,
    at: usize,
}

impl<B> Output<B> {
    fn new<E: TrainExec<Buf = B>>(e: &E, prog: &TrainProgram, b: usize) -> Result<Self> {
        let logits_len = b * prog.net.fc().k;
        Ok(Output {
            out: e.buffer(logits_len + prog.stats_len(b)?)?,
            at: logits_len,
        })
    }

    /// Appends a BatchNorm's statistics (and a noisy one's σ).
    fn stats<E: TrainExec<Buf = B>>(&mut self, e: &E, st: &NormState<B>) -> Result<()> {
        match st {
            NormState::Plain { stats } => self.raw(e, stats),
            NormState::Noisy { stats, sigma, .. } => {
                self.raw(e, stats)?;
                self.raw(e, sigma)
            }
            NormState::Oat { stats, .. } => stats.iter().try_for_each(|s| self.raw(e, s)),
        }
    }

    /// Appends `v`.
    fn raw<E: TrainExec<Buf = B>>(&mut self, e: &E, v: &B) -> Result<()> {
        e.put(&mut self.out, self.at, v)?;
        self.at += E::len(v);
        Ok(())
    }
}

/// [`forward`] of a pre-activation network.
fn forward_pre<E: TrainExec>(
    e: &E,
    prog: &TrainProgram,
    net: &TrainNet,
    params: E::Buf,
    x: &Tensor,
) -> Result<(E::Buf, PreState<E::Buf>)> {
    let b = x.dim(0)?;
    let [_, h0, w0] = prog.input;
    let a0 = e.input(x, prog)?;
    let g = shape(&net.stem, b, (h0, w0))?;
    let stem = e.kernel_at(&params, &net.stem)?;
    let mut cur = e.buffer(g.output_len())?;
    e.conv(Pass::Forward, &g, &a0, &stem, &mut cur, false)?;
    drop(stem);
    let mut side = g.out();
    let mut blocks = Vec::with_capacity(net.blocks.len());
    // The output: the logits, then every BatchNorm's statistics as they come.
    let mut out = Output::new(e, prog, b)?;
    for blk in &net.blocks {
        let rows = b * side.0 * side.1;
        let (pre, stats1) = norm_forward(e, prog, &cur, &params, &blk.bn1, rows, b)?;
        let g1 = shape(&blk.conv1, b, side)?;
        let g2 = shape(&blk.conv2, b, g1.out())?;
        let (mut sum, shortcut) = match &blk.shortcut {
            Some(sc) => {
                let gs = shape(sc, b, side)?;
                let ks = e.kernel_at(&params, sc)?;
                let mut o = e.buffer(gs.output_len())?;
                e.conv(Pass::Forward, &gs, &pre, &ks, &mut o, false)?;
                (o, Some(ks))
            }
            // The block's input stays for the first BatchNorm's backward pass.
            None => (e.copy(&cur)?, None),
        };
        if E::len(&sum) != g2.output_len() {
            candle_core::bail!("fused train path: a shortcut of the wrong size")
        }
        let k1 = e.kernel_at(&params, &blk.conv1)?;
        let mut h = e.buffer(g1.output_len())?;
        e.conv(Pass::Forward, &g1, &pre, &k1, &mut h, false)?;
        let (ho, wo) = g1.out();
        let (mid, stats2) = norm_forward(e, prog, &h, &params, &blk.bn2, b * ho * wo, b)?;
        let k2 = e.kernel_at(&params, &blk.conv2)?;
        e.conv(Pass::Forward, &g2, &mid, &k2, &mut sum, true)?;
        out.stats(e, &stats1)?;
        out.stats(e, &stats2)?;
        blocks.push(BlockState {
            side,
            x: cur,
            stats1,
            pre,
            h,
            stats2,
            mid,
            k1,
            k2,
            shortcut,
        });
        cur = sum;
        side = g2.out();
    }
    let hw = side.0 * side.1;
    let (fin, head_stats) = norm_forward(e, prog, &cur, &params, &net.head, b * hw, b)?;
    out.stats(e, &head_stats)?;
    let (pooled, logits) = e.pool_linear_at(&fin, &params, &net.fc, hw)?;
    let mut out = out.out;
    e.put(&mut out, 0, &logits)?;
    Ok((
        out,
        PreState {
            b,
            params,
            a0,
            blocks,
            head_x: cur,
            head_stats,
            fin,
            pooled,
            side,
        },
    ))
}

/// [`backward`] of a pre-activation network.
fn backward_pre<E: TrainExec>(
    e: &E,
    prog: &TrainProgram,
    net: &TrainNet,
    s: &PreState<E::Buf>,
    dl: &E::Buf,
) -> Result<E::Buf> {
    let b = s.b;
    let mut grad = e.buffer(prog.params)?;
    let hw = s.side.0 * s.side.1;
    let mut d = e.linear_pool_backward_at(dl, &s.pooled, &s.params, &net.fc, hw, &mut grad)?;
    norm_backward(
        e,
        prog,
        (&s.head_x, &s.fin),
        &mut d,
        &s.params,
        &net.head,
        &s.head_stats,
        b * hw,
        b,
        &mut grad,
    )?;
    for (blk, st) in net.blocks.iter().zip(&s.blocks).rev() {
        let g1 = shape(&blk.conv1, b, st.side)?;
        let g2 = shape(&blk.conv2, b, g1.out())?;
        e.filter_into(&g2, &st.mid, &d, &mut grad, blk.conv2.at)?;
        let mut dmid = e.buffer(g2.input_len())?;
        e.conv(Pass::Data, &g2, &d, &st.k2, &mut dmid, false)?;
        let (ho, wo) = g1.out();
        norm_backward(
            e,
            prog,
            (&st.h, &st.mid),
            &mut dmid,
            &s.params,
            &blk.bn2,
            &st.stats2,
            b * ho * wo,
            b,
            &mut grad,
        )?;
        e.filter_into(&g1, &st.pre, &dmid, &mut grad, blk.conv1.at)?;
        let mut dpre = e.buffer(g1.input_len())?;
        e.conv(Pass::Data, &g1, &dmid, &st.k1, &mut dpre, false)?;
        drop(dmid);
        if let (Some(sc), Some(ks)) = (&blk.shortcut, &st.shortcut) {
            let gs = shape(sc, b, st.side)?;
            e.filter_into(&gs, &st.pre, &d, &mut grad, sc.at)?;
            e.conv(Pass::Data, &gs, &d, ks, &mut dpre, true)?;
        }
        let rows = b * st.side.0 * st.side.1;
        norm_backward(
            e,
            prog,
            (&st.x, &st.pre),
            &mut dpre,
            &s.params,
            &blk.bn1,
            &st.stats1,
            rows,
            b,
            &mut grad,
        )?;
        if blk.shortcut.is_none() {
            e.add_in_place(&mut dpre, &d)?;
        }
        d = dpre;
    }
    let [_, h0, w0] = prog.input;
    let g = shape(&net.stem, b, (h0, w0))?;
    e.filter_into(&g, &s.a0, &d, &mut grad, net.stem.at)?;
    Ok(grad)
}

/// [`forward`] of a post-activation network: the stem's convolution and
/// BatchNorm+ReLU; per block conv1, BatchNorm+ReLU, conv2, BatchNorm, the shortcut's
/// convolution and BatchNorm (or the identity), then the sum and the ReLU in one
/// kernel.
fn forward_post<E: TrainExec>(
    e: &E,
    prog: &TrainProgram,
    net: &TrainPostNet,
    params: E::Buf,
    x: &Tensor,
) -> Result<(E::Buf, PostState<E::Buf>)> {
    let b = x.dim(0)?;
    let [_, h0, w0] = prog.input;
    if net.norms().any(|n| n.noise.is_some()) {
        candle_core::bail!("fused train path: a post-activation network with noise")
    }
    let a0 = e.input(x, prog)?;
    let g = shape(&net.stem, b, (h0, w0))?;
    let stem = e.kernel_at(&params, &net.stem)?;
    let mut hs = e.buffer(g.output_len())?;
    e.conv(Pass::Forward, &g, &a0, &stem, &mut hs, false)?;
    drop(stem);
    let mut side = g.out();
    let mut out = Output::new(e, prog, b)?;
    let (y0, stats0) = norm_forward(e, prog, &hs, &params, &net.stem_bn, b * side.0 * side.1, b)?;
    out.stats(e, &stats0)?;
    let mut acts = vec![y0];
    let mut blocks = Vec::with_capacity(net.blocks.len());
    for blk in &net.blocks {
        let Some(x) = acts.last() else {
            candle_core::bail!("fused train path: no block input")
        };
        let g1 = shape(&blk.conv1, b, side)?;
        let g2 = shape(&blk.conv2, b, g1.out())?;
        let k1 = e.kernel_at(&params, &blk.conv1)?;
        let mut h1 = e.buffer(g1.output_len())?;
        e.conv(Pass::Forward, &g1, x, &k1, &mut h1, false)?;
        let (o1, o2) = g1.out();
        let (a1, stats1) = norm_forward(e, prog, &h1, &params, &blk.bn1, b * o1 * o2, b)?;
        let k2 = e.kernel_at(&params, &blk.conv2)?;
        let mut c2 = e.buffer(g2.output_len())?;
        e.conv(Pass::Forward, &g2, &a1, &k2, &mut c2, false)?;
        let rows2 = b * g2.out().0 * g2.out().1;
        let (mut y, stats2) = e.bn_train(&c2, &params, &blk.bn2, rows2)?;
        out.stats(e, &stats1)?;
        out.raw(e, &stats2)?;
        let shortcut = match &blk.shortcut {
            Some((sc, sn)) => {
                let gs = shape(sc, b, side)?;
                let ks = e.kernel_at(&params, sc)?;
                let mut cs = e.buffer(gs.output_len())?;
                e.conv(Pass::Forward, &gs, x, &ks, &mut cs, false)?;
                let (ys, stats_s) = e.bn_train(&cs, &params, sn, rows2)?;
                e.add_relu_in_place(&mut y, &ys)?;
                out.raw(e, &stats_s)?;
                Some((cs, stats_s, ks))
            }
            None => {
                e.add_relu_in_place(&mut y, x)?;
                None
            }
        };
        blocks.push(PostBlockState {
            side,
            h1,
            stats1,
            a1,
            c2,
            stats2,
            shortcut,
            k1,
            k2,
        });
        acts.push(y);
        side = g2.out();
    }
    let Some(last) = acts.last() else {
        candle_core::bail!("fused train path: no network output")
    };
    let (pooled, logits) = e.pool_linear_at(last, &params, &net.fc, side.0 * side.1)?;
    let mut out = out.out;
    e.put(&mut out, 0, &logits)?;
    Ok((
        out,
        PostState {
            b,
            params,
            a0,
            h0: hs,
            stats0,
            acts,
            blocks,
            pooled,
            side,
        },
    ))
}

/// [`backward`] of a post-activation network.
fn backward_post<E: TrainExec>(
    e: &E,
    prog: &TrainProgram,
    net: &TrainPostNet,
    s: &PostState<E::Buf>,
    dl: &E::Buf,
) -> Result<E::Buf> {
    let b = s.b;
    if s.acts.len() != s.blocks.len() + 1 || s.blocks.len() != net.blocks.len() {
        candle_core::bail!("fused train path: saved state of another network")
    }
    let mut grad = e.buffer(prog.params)?;
    let hw = s.side.0 * s.side.1;
    let mut d = e.linear_pool_backward_at(dl, &s.pooled, &s.params, &net.fc, hw, &mut grad)?;
    for (i, (blk, st)) in net.blocks.iter().zip(&s.blocks).enumerate().rev() {
        let (x, y) = (&s.acts[i], &s.acts[i + 1]);
        let g1 = shape(&blk.conv1, b, st.side)?;
        let g2 = shape(&blk.conv2, b, g1.out())?;
        let rows1 = b * g1.out().0 * g1.out().1;
        let rows2 = b * g2.out().0 * g2.out().1;
        // d: the sum's gradient; both branches read it.
        e.relu_mask(&mut d, y)?;
        let mut dc2 = e.copy(&d)?;
        let dgb = e.bn_train_backward(&st.c2, &mut dc2, &s.params, &blk.bn2, &st.stats2, rows2)?;
        put_norm_grads(e, &mut grad, &blk.bn2, &dgb)?;
        e.filter_into(&g2, &st.a1, &dc2, &mut grad, blk.conv2.at)?;
        let mut da1 = e.buffer(g2.input_len())?;
        e.conv(Pass::Data, &g2, &dc2, &st.k2, &mut da1, false)?;
        drop(dc2);
        norm_backward(
            e,
            prog,
            (&st.h1, &st.a1),
            &mut da1,
            &s.params,
            &blk.bn1,
            &st.stats1,
            rows1,
            b,
            &mut grad,
        )?;
        e.filter_into(&g1, x, &da1, &mut grad, blk.conv1.at)?;
        let mut dx = match (&blk.shortcut, &st.shortcut) {
            (Some((sc, sn)), Some((cs, stats_s, ks))) => {
                let gs = shape(sc, b, st.side)?;
                let dgb = e.bn_train_backward(cs, &mut d, &s.params, sn, stats_s, rows2)?;
                put_norm_grads(e, &mut grad, sn, &dgb)?;
                e.filter_into(&gs, x, &d, &mut grad, sc.at)?;
                let mut dx = e.buffer(gs.input_len())?;
                e.conv(Pass::Data, &gs, &d, ks, &mut dx, false)?;
                dx
            }
            (None, None) => d,
            _ => candle_core::bail!("fused train path: saved state of another network"),
        };
        e.conv(Pass::Data, &g1, &da1, &st.k1, &mut dx, true)?;
        d = dx;
    }
    let [_, h0, w0] = prog.input;
    let g = shape(&net.stem, b, (h0, w0))?;
    let rows0 = b * g.out().0 * g.out().1;
    norm_backward(
        e,
        prog,
        (&s.h0, &s.acts[0]),
        &mut d,
        &s.params,
        &net.stem_bn,
        &s.stats0,
        rows0,
        b,
        &mut grad,
    )?;
    e.filter_into(&g, &s.a0, &d, &mut grad, net.stem.at)?;
    Ok(grad)
}

/// Writes [dγ | dβ] at the BatchNorm's places in `grad`.
fn put_norm_grads<E: TrainExec>(e: &E, grad: &mut E::Buf, n: &TNorm, dgb: &E::Buf) -> Result<()> {
    put_grads_at(e, grad, (n.gamma, n.beta), n.c, dgb)
}

/// Writes [dγ | dβ] (2C) at (γ's place, β's place) in `grad`.
fn put_grads_at<E: TrainExec>(
    e: &E,
    grad: &mut E::Buf,
    (gamma, beta): (usize, usize),
    c: usize,
    dgb: &E::Buf,
) -> Result<()> {
    if beta != gamma + c {
        candle_core::bail!("fused train path: β does not follow γ in the layout")
    }
    e.put(grad, gamma, dgb)
}

/// The saved state of a forward pass, on the device it ran on.
enum StateOn {
    Cpu(Box<TrainState<Vec<f32>>>),
    #[cfg(feature = "cudnn")]
    Cuda(Box<TrainState<super::device_eval::cuda::Slice>>),
}

/// The network in train mode as one op on its flat parameters (see the module
/// docs): output [logits (B·K) | statistics], backward every parameter gradient.
pub(crate) struct DeviceTrain {
    program: Arc<TrainProgram>,
    x: Tensor,
    saved: Mutex<Option<StateOn>>,
}

impl DeviceTrain {
    /// The op for the images `x` (B, C, H, W), untracked.
    pub(crate) fn new(program: TrainProgram, x: Tensor) -> Result<Self> {
        let (_, c, h, w) = x.dims4()?;
        if [c, h, w] != program.input || x.dtype() != DType::F32 {
            candle_core::bail!(
                "fused train path: input {:?} ({:?}) does not match the network's {:?}",
                x.shape(),
                x.dtype(),
                program.input
            )
        }
        Ok(DeviceTrain {
            program: Arc::new(program),
            x: x.detach(),
            saved: Mutex::new(None),
        })
    }

    fn out_shape(&self) -> Result<Shape> {
        let b = self.x.dim(0)?;
        Ok(Shape::from(
            b * self.program.net.fc().k + self.program.stats_len(b)?,
        ))
    }

    fn store(&self, st: StateOn) {
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(st);
    }

    /// Where the parts of this op's output are.
    pub(crate) fn output_layout(&self) -> Result<OutputLayout> {
        Ok(OutputLayout {
            b: self.x.dim(0)?,
            k: self.program.net.fc().k,
            lens: self.program.norm_stats_lens(self.x.dim(0)?)?,
        })
    }
}

impl CustomOp1 for DeviceTrain {
    fn name(&self) -> &'static str {
        "device-train-network"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let params = f32_slice(s, l, self.name())?;
        if params.len() != self.program.params {
            candle_core::bail!(
                "fused train path: {} parameters for a layout of {}",
                params.len(),
                self.program.params
            )
        }
        let (out, st) = forward(&CpuExec, &self.program, params.to_vec(), &self.x)?;
        self.store(StateOn::Cpu(Box::new(st)));
        Ok((CpuStorage::F32(out), self.out_shape()?))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let e = super::device_eval::cuda::CudaExec::new(&s.device);
        let params = e.copy_of(s, l)?;
        if params.len() != self.program.params {
            candle_core::bail!(
                "fused train path: {} parameters for a layout of {}",
                params.len(),
                self.program.params
            )
        }
        let (out, st) = forward(&e, &self.program, params, &self.x)?;
        self.store(StateOn::Cuda(Box::new(st)));
        Ok((e.storage(out), self.out_shape()?))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let st = super::common::take_saved(
            &self.saved,
            "fused train path: the backward pass of this forward pass already ran",
        )?;
        let (b, k) = (self.x.dim(0)?, self.program.net.fc().k);
        let dl = grad
            .narrow(0, 0, b * k)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let op = DeviceTrainBackward {
            program: self.program.clone(),
            saved: Mutex::new(Some(st)),
        };
        Ok(Some(dl.apply_op1_no_bwd(&op)?.to_dtype(arg.dtype())?))
    }
}

/// The backward pass of a [`DeviceTrain`]: the logits' gradient (B·K) → every
/// parameter's, flat.
struct DeviceTrainBackward {
    program: Arc<TrainProgram>,
    saved: Mutex<Option<StateOn>>,
}

impl DeviceTrainBackward {
    fn state(&self) -> Result<StateOn> {
        super::common::take_saved(
            &self.saved,
            "fused train path: the backward pass already ran",
        )
    }
}

impl CustomOp1 for DeviceTrainBackward {
    fn name(&self) -> &'static str {
        "device-train-network-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // Irrefutable without the `cudnn` feature.
        #[allow(irrefutable_let_patterns)]
        let StateOn::Cpu(st) = self.state()?
        else {
            candle_core::bail!("fused train path: the forward pass ran on another device")
        };
        let dl = f32_slice(s, l, self.name())?.to_vec();
        let grad = backward(&CpuExec, &self.program, &st, &dl)?;
        Ok((CpuStorage::F32(grad), Shape::from(self.program.params)))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let StateOn::Cuda(st) = self.state()? else {
            candle_core::bail!("fused train path: the forward pass ran on another device")
        };
        let e = super::device_eval::cuda::CudaExec::new(&s.device);
        let dl = e.copy_of(s, l)?;
        let grad = backward(&e, &self.program, &st, &dl)?;
        Ok((e.storage(grad), Shape::from(self.program.params)))
    }
}

// ---------------------------------------------------------------------------------
// The CPU executor's train operations.

/// Threads per block of `dt_noise_dot`.
const DOT_THREADS: usize = 256;

/// The blocks `dt_noise_dot` runs on for `n` values (the sum's order depends on it).
pub(crate) fn dot_blocks(n: usize) -> usize {
    n.div_ceil(DOT_THREADS).clamp(1, 1024)
}

/// The twin of `dt_noise_sigma`: σ = √(max(γ²·(1 − (ε·r)·r), 0) + 1e-5) per channel.
fn noise_sigma(gamma: &[f32], inv_std: &[f32], eps: f32) -> Vec<f32> {
    gamma
        .iter()
        .zip(inv_std)
        .map(|(&g, &r)| {
            let v = (g * g) * (1.0 - (eps * r) * r);
            let v = if v > 0.0 { v } else { 0.0 };
            (v + NOISE_STD_EPS).sqrt()
        })
        .collect()
}

/// The twin of `dt_noise_relu_inplace`: y ← relu(y + z·((α·σ)·s)).
fn noise_relu(y: &mut [f32], z: &[f32], sigma: &[f32], alpha: f32, scale: f32, c: usize) {
    for (i, (yv, &zv)) in y.iter_mut().zip(z).enumerate() {
        let std = (alpha * sigma[i % c]) * scale;
        let v = *yv + zv * std;
        *yv = if v > 0.0 { v } else { 0.0 };
    }
}

/// The twin of `dt_noise_dot` and `dt_noise_alpha_grad`: Σ d·z·σ in the kernels'
/// order (per block, each thread's strided sum, then the block's halving tree; the
/// blocks in order).
fn noise_dot(d: &[f32], z: &[f32], sigma: &[f32], c: usize) -> f32 {
    let n = d.len();
    let blocks = dot_blocks(n);
    let stride = blocks * DOT_THREADS;
    let mut total = 0f32;
    for b in 0..blocks {
        let mut v = [0f32; DOT_THREADS];
        for (t, vt) in v.iter_mut().enumerate() {
            let mut s = 0f32;
            let mut i = b * DOT_THREADS + t;
            while i < n {
                s += (d[i] * z[i]) * sigma[i % c];
                i += stride;
            }
            *vt = s;
        }
        let mut h = DOT_THREADS / 2;
        while h > 0 {
            for t in 0..h {
                v[t] += v[t + h];
            }
            h /= 2;
        }
        total += v[0];
    }
    total
}

/// The CPU executor's train-mode BatchNorm (the CPU BatchNorm) on rows `x` (C
/// values each) with the γ and β at `(g, b)` of `p`: the output, rectified when
/// `relu`, and [mean | 1/√(var + ε)].
fn cpu_bn_train(
    x: &[f32],
    p: &[f32],
    (g, b): (usize, usize),
    n: &TNorm,
    relu: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let c = n.c;
    let (Some(gamma), Some(beta)) = (p.get(g..g + c), p.get(b..b + c)) else {
        candle_core::bail!("fused train path: BatchNorm parameters past the parameters")
    };
    let (mean, var) = super::bn::mean_var(x, c);
    let inv_std: Vec<f32> = var
        .iter()
        .map(|v| 1.0 / (v + n.eps as f32).sqrt())
        .collect();
    let f = super::bn::BnForward {
        mean: mean.clone(),
        inv_std: inv_std.clone(),
        relu,
        batch_stats: true,
    };
    let y = f.normalise(x, gamma, beta)?;
    Ok((y, [mean, inv_std].concat()))
}

/// The backward pass of [`cpu_bn_train`] (its statistics `stats`): d ← the input
/// gradient (through the ReLU, recomputed from x, when `relu`); [dγ | dβ] returned.
fn cpu_bn_train_backward(
    d: &mut [f32],
    x: &[f32],
    p: &[f32],
    (g, b): (usize, usize),
    n: &TNorm,
    stats: &[f32],
    relu: bool,
) -> Result<Vec<f32>> {
    let c = n.c;
    super::device_eval::same_len(d.len(), x.len(), "BatchNorm gradient")?;
    let (Some(gamma), Some(beta)) = (p.get(g..g + c), p.get(b..b + c)) else {
        candle_core::bail!("fused train path: BatchNorm parameters past the parameters")
    };
    let f = super::bn::BnForward {
        mean: stats[..c].to_vec(),
        inv_std: stats[c..2 * c].to_vec(),
        relu,
        batch_stats: true,
    };
    let sums = f.backward_in_place(d, x, gamma, beta, true);
    Ok(sums.into_iter().map(|v| v as f32).collect())
}

/// The executors whose own kernels are launches (the CUDA one, the tests' emulated
/// one): their backend's convolutions, BatchNorm and copies, and the launch code of
/// `device_train_launch.rs`, written once.
impl<T: Backend> TrainExec for T {
    fn copy(&self, x: &T::Buf) -> Result<T::Buf> {
        self.duplicate(x)
    }

    fn put(&self, dst: &mut T::Buf, at: usize, src: &T::Buf) -> Result<()> {
        self.place(dst, at, src)
    }

    fn add_in_place(&self, d: &mut T::Buf, r: &T::Buf) -> Result<()> {
        launches::add_in_place(self, d, r)
    }

    fn input(&self, x: &Tensor, p: &TrainProgram) -> Result<T::Buf> {
        let n = x.elem_count();
        let mut out = self.alloc(n)?;
        let images = self.tensor(x, n, "images")?;
        super::device_eval::launches::normalise(
            self, &mut out, images, p.input, &p.mean, &p.inv_std,
        )?;
        Ok(out)
    }

    fn kernel_at(&self, p: &T::Buf, conv: &TConv) -> Result<T::Buf> {
        self.krsc_at(p, conv)
    }

    fn filter_into(
        &self,
        g: &ConvShape,
        x: &T::Buf,
        dy: &T::Buf,
        grad: &mut T::Buf,
        at: usize,
    ) -> Result<()> {
        self.filter(g, x, dy, grad, at)
    }

    fn bn_relu_train(
        &self,
        x: &T::Buf,
        p: &T::Buf,
        n: &TNorm,
        rows: usize,
    ) -> Result<(T::Buf, T::Buf)> {
        launches::bn_relu_train(self, x, p, n, rows)
    }

    fn bn_relu_train_backward(
        &self,
        x: &T::Buf,
        y: &T::Buf,
        d: &mut T::Buf,
        p: &T::Buf,
        n: &TNorm,
        stats: &T::Buf,
        rows: usize,
    ) -> Result<T::Buf> {
        launches::bn_relu_train_backward(self, x, y, d, p, n, stats, rows)
    }

    fn bn_train(&self, x: &T::Buf, p: &T::Buf, n: &TNorm, rows: usize) -> Result<(T::Buf, T::Buf)> {
        launches::bn_train(self, x, p, n, rows)
    }

    fn bn_train_backward(
        &self,
        x: &T::Buf,
        d: &mut T::Buf,
        p: &T::Buf,
        n: &TNorm,
        stats: &T::Buf,
        rows: usize,
    ) -> Result<T::Buf> {
        launches::bn_train_backward(self, x, d, p, n, stats, rows)
    }

    fn relu_mask(&self, d: &mut T::Buf, y: &T::Buf) -> Result<()> {
        launches::relu_mask(self, d, y)
    }

    fn buffer_zeroed(&self, n: usize) -> Result<T::Buf> {
        self.zeros(n)
    }

    fn bn_train_part(
        &self,
        x: &T::Buf,
        y: &mut T::Buf,
        rows: (usize, usize),
        p: &T::Buf,
        n: &TNorm,
        at: (usize, usize),
    ) -> Result<T::Buf> {
        self.bn_part(x, y, rows, p, n, at)
    }

    fn bn_train_part_backward(
        &self,
        x: &T::Buf,
        d: &T::Buf,
        dx: &mut T::Buf,
        rows: (usize, usize),
        p: &T::Buf,
        n: &TNorm,
        at: (usize, usize),
        stats: &T::Buf,
    ) -> Result<T::Buf> {
        self.bn_part_backward(x, d, dx, rows, p, n, at, stats)
    }

    fn film_relu(
        &self,
        h: &T::Buf,
        p: &T::Buf,
        film: usize,
        c: usize,
        per: usize,
    ) -> Result<T::Buf> {
        launches::film_relu(self, h, p, film, c, per)
    }

    fn film_backward(
        &self,
        d: &mut T::Buf,
        h: &T::Buf,
        p: &T::Buf,
        film: usize,
        c: usize,
        per: usize,
        grad: &mut T::Buf,
    ) -> Result<()> {
        launches::film_backward(self, d, h, p, film, c, per, grad)
    }

    fn add_relu_in_place(&self, y: &mut T::Buf, r: &T::Buf) -> Result<()> {
        launches::add_relu_in_place(self, y, r)
    }

    fn bn_noise_relu_train(
        &self,
        x: &T::Buf,
        p: &T::Buf,
        n: &TNorm,
        noise: &TNoise,
        rows: usize,
        z: &T::Buf,
    ) -> Result<(T::Buf, T::Buf, T::Buf)> {
        launches::bn_noise_relu_train(self, x, p, n, noise, rows, z)
    }

    fn bn_noise_relu_train_backward(
        &self,
        x: &T::Buf,
        y: &T::Buf,
        d: &mut T::Buf,
        p: &T::Buf,
        n: &TNorm,
        noise: &TNoise,
        saved: (&T::Buf, &T::Buf, &T::Buf),
        rows: usize,
        grad: &mut T::Buf,
    ) -> Result<T::Buf> {
        launches::bn_noise_relu_train_backward(self, x, y, d, p, n, noise, saved, rows, grad)
    }

    fn pool_linear_at(
        &self,
        x: &T::Buf,
        p: &T::Buf,
        fc: &TFc,
        hw: usize,
    ) -> Result<(T::Buf, T::Buf)> {
        launches::pool_linear_at(self, x, p, fc, hw)
    }

    fn linear_pool_backward_at(
        &self,
        dl: &T::Buf,
        pooled: &T::Buf,
        p: &T::Buf,
        fc: &TFc,
        hw: usize,
        grad: &mut T::Buf,
    ) -> Result<T::Buf> {
        launches::linear_pool_backward_at(self, dl, pooled, p, fc, hw, grad)
    }
}

impl TrainExec for CpuExec {
    fn copy(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn put(&self, dst: &mut Vec<f32>, at: usize, src: &Vec<f32>) -> Result<()> {
        let Some(slot) = dst.get_mut(at..at + src.len()) else {
            candle_core::bail!("fused train path: a write past the end of a buffer")
        };
        slot.copy_from_slice(src);
        Ok(())
    }

    fn add_in_place(&self, d: &mut Vec<f32>, r: &Vec<f32>) -> Result<()> {
        d.iter_mut().zip(r).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn input(&self, x: &Tensor, p: &TrainProgram) -> Result<Vec<f32>> {
        let v = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (x, mean, inv_std) = (v(x)?, v(&p.mean)?, v(&p.inv_std)?);
        Ok(super::device_eval::normalise(&x, &mean, &inv_std, p.input))
    }

    fn kernel_at(&self, p: &Vec<f32>, conv: &TConv) -> Result<Vec<f32>> {
        let n = conv.c_out * conv.c_in * conv.k * conv.k;
        Ok(oihw_to_ohwi(
            &p[conv.at..conv.at + n],
            conv.c_in,
            conv.k * conv.k,
        ))
    }

    fn filter_into(
        &self,
        g: &ConvShape,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        grad: &mut Vec<f32>,
        at: usize,
    ) -> Result<()> {
        let op = Conv2d {
            shape: *g,
            pass: Pass::Filter,
        };
        let dw = ohwi_to_oihw(&op.cpu_filter(x, dy), g.c_in, g.k * g.k);
        self.put(grad, at, &dw)
    }

    fn bn_relu_train(
        &self,
        x: &Vec<f32>,
        p: &Vec<f32>,
        n: &TNorm,
        _rows: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        cpu_bn_train(x, p, (n.gamma, n.beta), n, true)
    }

    fn bn_relu_train_backward(
        &self,
        x: &Vec<f32>,
        _y: &Vec<f32>,
        d: &mut Vec<f32>,
        p: &Vec<f32>,
        n: &TNorm,
        stats: &Vec<f32>,
        _rows: usize,
    ) -> Result<Vec<f32>> {
        cpu_bn_train_backward(d, x, p, (n.gamma, n.beta), n, stats, true)
    }

    fn bn_train(
        &self,
        x: &Vec<f32>,
        p: &Vec<f32>,
        n: &TNorm,
        _rows: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        cpu_bn_train(x, p, (n.gamma, n.beta), n, false)
    }

    fn bn_train_backward(
        &self,
        x: &Vec<f32>,
        d: &mut Vec<f32>,
        p: &Vec<f32>,
        n: &TNorm,
        stats: &Vec<f32>,
        _rows: usize,
    ) -> Result<Vec<f32>> {
        cpu_bn_train_backward(d, x, p, (n.gamma, n.beta), n, stats, false)
    }

    fn relu_mask(&self, d: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        super::device_eval::same_len(d.len(), y.len(), "ReLU gradient")?;
        for (dv, &yv) in d.iter_mut().zip(y) {
            *dv *= if yv > 0.0 { 1.0 } else { 0.0 };
        }
        Ok(())
    }

    fn buffer_zeroed(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; n])
    }

    fn bn_train_part(
        &self,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        (first, rows): (usize, usize),
        p: &Vec<f32>,
        n: &TNorm,
        at: (usize, usize),
    ) -> Result<Vec<f32>> {
        let range = first * n.c..(first + rows) * n.c;
        let (Some(xs), true) = (x.get(range.clone()), y.len() == x.len()) else {
            candle_core::bail!("fused train path: BatchNorm rows past the activations")
        };
        let (part, stats) = cpu_bn_train(xs, p, at, n, false)?;
        y[range].copy_from_slice(&part);
        Ok(stats)
    }

    fn bn_train_part_backward(
        &self,
        x: &Vec<f32>,
        d: &Vec<f32>,
        dx: &mut Vec<f32>,
        (first, rows): (usize, usize),
        p: &Vec<f32>,
        n: &TNorm,
        at: (usize, usize),
        stats: &Vec<f32>,
    ) -> Result<Vec<f32>> {
        let range = first * n.c..(first + rows) * n.c;
        let (Some(xs), Some(ds), true) = (
            x.get(range.clone()),
            d.get(range.clone()),
            dx.len() == x.len(),
        ) else {
            candle_core::bail!("fused train path: BatchNorm rows past the activations")
        };
        let mut part = ds.to_vec();
        let dgb = cpu_bn_train_backward(&mut part, xs, p, at, n, stats, false)?;
        dx[range].copy_from_slice(&part);
        Ok(dgb)
    }

    fn film_relu(
        &self,
        h: &Vec<f32>,
        p: &Vec<f32>,
        film: usize,
        c: usize,
        per: usize,
    ) -> Result<Vec<f32>> {
        let images = h.len() / per.max(1);
        let Some(f) = p.get(film..film + images * 2 * c) else {
            candle_core::bail!("fused train path: FiLM outputs past the parameters")
        };
        Ok(h.iter()
            .enumerate()
            .map(|(i, &hv)| {
                let (img, ch) = (i / per, i % c);
                let v = hv * (f[img * 2 * c + ch] + 1.0) + f[img * 2 * c + c + ch];
                if v > 0.0 {
                    v
                } else {
                    0.0
                }
            })
            .collect())
    }

    fn film_backward(
        &self,
        d: &mut Vec<f32>,
        h: &Vec<f32>,
        p: &Vec<f32>,
        film: usize,
        c: usize,
        per: usize,
        grad: &mut Vec<f32>,
    ) -> Result<()> {
        super::device_eval::same_len(d.len(), h.len(), "FiLM gradient")?;
        let images = h.len() / per.max(1);
        let Some(f) = p.get(film..film + images * 2 * c) else {
            candle_core::bail!("fused train path: FiLM outputs past the parameters")
        };
        // The twin of `dt_film_grads`: per (image, j < 2C) the sum over its pixels in
        // order of d·h (j < C, γ_f's) or d (β_f's).
        let hw = per / c.max(1);
        let mut df = vec![0f32; images * 2 * c];
        for (t, o) in df.iter_mut().enumerate() {
            let (img, j) = (t / (2 * c), t % (2 * c));
            let ch = j % c;
            let mut sum = 0f32;
            for px in 0..hw {
                let i = img * per + px * c + ch;
                sum += if j < c { d[i] * h[i] } else { d[i] };
            }
            *o = sum;
        }
        self.put(grad, film, &df)?;
        // The twin of `dt_film_scale`.
        for (i, dv) in d.iter_mut().enumerate() {
            let (img, ch) = (i / per, i % c);
            *dv *= f[img * 2 * c + ch] + 1.0;
        }
        Ok(())
    }

    fn add_relu_in_place(&self, y: &mut Vec<f32>, r: &Vec<f32>) -> Result<()> {
        super::device_eval::same_len(y.len(), r.len(), "shortcut")?;
        for (yv, &rv) in y.iter_mut().zip(r) {
            let v = *yv + rv;
            *yv = if v > 0.0 { v } else { 0.0 };
        }
        Ok(())
    }

    fn bn_noise_relu_train(
        &self,
        x: &Vec<f32>,
        p: &Vec<f32>,
        n: &TNorm,
        noise: &TNoise,
        _rows: usize,
        z: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let c = n.c;
        super::device_eval::same_len(z.len(), x.len(), "BatchNorm noise")?;
        let (mut y, stats) = cpu_bn_train(x, p, (n.gamma, n.beta), n, false)?;
        let sigma = noise_sigma(&p[n.gamma..n.gamma + c], &stats[c..2 * c], n.eps as f32);
        noise_relu(&mut y, z, &sigma, p[noise.alpha], noise.scale, c);
        Ok((y, stats, sigma))
    }

    fn bn_noise_relu_train_backward(
        &self,
        x: &Vec<f32>,
        y: &Vec<f32>,
        d: &mut Vec<f32>,
        p: &Vec<f32>,
        n: &TNorm,
        noise: &TNoise,
        (stats, z, sigma): (&Vec<f32>, &Vec<f32>, &Vec<f32>),
        _rows: usize,
        grad: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        super::device_eval::same_len(z.len(), y.len(), "BatchNorm noise")?;
        self.relu_mask(d, y)?;
        let Some(slot) = grad.get_mut(noise.alpha) else {
            candle_core::bail!("fused train path: a noise factor past the parameters")
        };
        *slot = noise_dot(d, z, sigma, n.c) * noise.scale;
        cpu_bn_train_backward(d, x, p, (n.gamma, n.beta), n, stats, false)
    }

    fn pool_linear_at(
        &self,
        x: &Vec<f32>,
        p: &Vec<f32>,
        fc: &TFc,
        hw: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (k, c) = (fc.k, fc.c);
        let b = x.len() / (hw * c).max(1);
        let pooled = super::device_eval::avg_pool(x, hw, c);
        let (w, bias) = (&p[fc.w..fc.w + k * c], &p[fc.b..fc.b + k]);
        let logits = super::device_eval::linear(&pooled, w, bias, b, c, k);
        Ok((pooled, logits))
    }

    fn linear_pool_backward_at(
        &self,
        dl: &Vec<f32>,
        pooled: &Vec<f32>,
        p: &Vec<f32>,
        fc: &TFc,
        hw: usize,
        grad: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let (k, c) = (fc.k, fc.c);
        let b = dl.len() / k.max(1);
        // The twin of `de_linear_param_grads`: dW[j·c + ch] = Σ_b dl·x (images in
        // order), then db[j] = Σ_b dl.
        let mut dwb = vec![0f32; k * c + k];
        for (t, o) in dwb.iter_mut().enumerate() {
            let mut s = 0f32;
            if t < k * c {
                let (j, ch) = (t / c, t % c);
                for img in 0..b {
                    s += dl[img * k + j] * pooled[img * c + ch];
                }
            } else {
                let j = t - k * c;
                for img in 0..b {
                    s += dl[img * k + j];
                }
            }
            *o = s;
        }
        if fc.b != fc.w + k * c {
            candle_core::bail!("fused train path: the bias does not follow the weight")
        }
        self.put(grad, fc.w, &dwb)?;
        Ok(super::device_eval::linear_pool_input_grad(
            dl,
            &p[fc.w..fc.w + k * c],
            b,
            hw,
            c,
            k,
        ))
    }
}

// ---------------------------------------------------------------------------------
// The CUDA executor's train operations.

#[cfg(feature = "cudnn")]
mod cuda {
    use super::super::conv::{ConvShape, Pass};
    use super::super::cuda::uninit;
    use super::super::device_eval::cuda::{view, CudaExec, Slice};
    use super::super::device_eval::same_len;
    use super::super::launch::Backend;
    use super::{TConv, TNorm};
    use candle_core::{Result, Tensor};

    /// The activations' (n, c, h, w) for cuDNN's BatchNorm from the rows (n·h·w) and
    /// channels: the rows as n, h = w = 1 (the same NHWC bytes, the same per-channel
    /// statistics).
    fn bn_dims(rows: usize, c: usize) -> [usize; 4] {
        [rows, c, 1, 1]
    }

    impl Backend for CudaExec {
        fn krsc(&self, w: &Tensor) -> Result<Slice> {
            let (_, ci, k, _) = w.dims4()?;
            let gw = w.storage_and_layout();
            let src = view(&gw, w.elem_count(), "convolution kernel")?;
            super::super::pointwise::permute_kernel(&self.dev, &src, ci, k * k, true)
        }

        fn convolve(
            &self,
            pass: Pass,
            g: &ConvShape,
            a: &Slice,
            kernel: &Slice,
            out: &mut Slice,
            accumulate: bool,
        ) -> Result<()> {
            let (a_len, out_len) = match pass {
                Pass::Forward => (g.input_len(), g.output_len()),
                Pass::Data => (g.output_len(), g.input_len()),
                Pass::Filter => candle_core::bail!("fused eval path: no kernel gradients"),
            };
            same_len(a.len(), a_len, "convolution operand")?;
            same_len(kernel.len(), g.kernel_len(), "convolution kernel")?;
            same_len(out.len(), out_len, "convolution result")?;
            super::super::cudnn::conv_into(
                &self.dev,
                *g,
                pass,
                &a.slice(..),
                &kernel.slice(..),
                out,
                accumulate,
            )
        }

        fn noise(&self, seed: u64, first: u64, images: usize, len: usize) -> Result<Slice> {
            if images > 0 && !len.is_multiple_of(images) {
                candle_core::bail!("fused eval path: {len} noise values for {images} images")
            }
            let mut z = uninit(&self.dev, len.max(1))?;
            let per = len / images.max(1);
            super::super::noise::fill_cuda(&self.dev, &mut z, seed, first, per, images)?;
            Ok(z)
        }

        fn duplicate(&self, x: &Slice) -> Result<Slice> {
            let mut out = uninit(&self.dev, x.len())?;
            self.dev.memcpy_dtod(x, &mut out)?;
            Ok(out)
        }

        fn place(&self, dst: &mut Slice, at: usize, src: &Slice) -> Result<()> {
            if at + src.len() > dst.len() {
                candle_core::bail!("fused train path: a write past the end of a buffer")
            }
            let mut slot = dst.slice_mut(at..at + src.len());
            self.dev.memcpy_dtod(src, &mut slot)?;
            Ok(())
        }

        fn krsc_at(&self, p: &Slice, conv: &TConv) -> Result<Slice> {
            let n = conv.c_out * conv.c_in * conv.k * conv.k;
            let src = p.slice(conv.at..conv.at + n);
            super::super::pointwise::permute_kernel(
                &self.dev,
                &src,
                conv.c_in,
                conv.k * conv.k,
                true,
            )
        }

        fn filter(
            &self,
            g: &ConvShape,
            x: &Slice,
            dy: &Slice,
            grad: &mut Slice,
            at: usize,
        ) -> Result<()> {
            same_len(x.len(), g.input_len(), "kernel gradient: input")?;
            same_len(dy.len(), g.output_len(), "kernel gradient: output gradient")?;
            let mut krsc = uninit(&self.dev, g.kernel_len())?;
            super::super::cudnn::conv_into(
                &self.dev,
                *g,
                super::super::conv::Pass::Filter,
                &x.slice(..),
                &dy.slice(..),
                &mut krsc,
                false,
            )?;
            // Back to OIHW, straight into the kernel's place among the gradients.
            let n = krsc.len();
            if at + n > grad.len() {
                candle_core::bail!("fused train path: a write past the end of a buffer")
            }
            super::super::pointwise::permute_kernel_into(
                &self.dev,
                &krsc.slice(..),
                &mut grad.slice_mut(at..at + n),
                g.c_in,
                g.k * g.k,
                false,
            )
        }

        fn zeros(&self, n: usize) -> Result<Slice> {
            self.dev.alloc_zeros::<f32>(n)
        }

        fn bn_part(
            &self,
            x: &Slice,
            y: &mut Slice,
            (first, rows): (usize, usize),
            p: &Slice,
            n: &TNorm,
            (g, b): (usize, usize),
        ) -> Result<Slice> {
            let c = n.c;
            let range = first * c..(first + rows) * c;
            if range.end > x.len() || y.len() != x.len() {
                candle_core::bail!("fused train path: BatchNorm rows past the activations")
            }
            let mut stats = uninit(&self.dev, 2 * c)?;
            super::super::cudnn::batch_norm_train_into(
                &self.dev,
                x.slice(range.clone()),
                &p.slice(g..g + c),
                &p.slice(b..b + c),
                bn_dims(rows, c),
                n.eps,
                &mut y.slice_mut(range),
                &mut stats.slice_mut(..),
            )?;
            Ok(stats)
        }

        fn bn_part_backward(
            &self,
            x: &Slice,
            d: &Slice,
            dx: &mut Slice,
            (first, rows): (usize, usize),
            p: &Slice,
            n: &TNorm,
            (g, _): (usize, usize),
            stats: &Slice,
        ) -> Result<Slice> {
            let c = n.c;
            let range = first * c..(first + rows) * c;
            if range.end > x.len() || d.len() != x.len() || dx.len() != x.len() {
                candle_core::bail!("fused train path: BatchNorm rows past the activations")
            }
            let mut dgb = uninit(&self.dev, 2 * c)?;
            super::super::cudnn::batch_norm_backward_into(
                &self.dev,
                x.slice(range.clone()),
                &d.slice(range.clone()),
                &p.slice(g..g + c),
                &stats.slice(..),
                bn_dims(rows, c),
                n.eps,
                &mut dx.slice_mut(range),
                &mut dgb.slice_mut(..),
            )?;
            Ok(dgb)
        }
    }
}

/// The train program's launches, shared by the CUDA executor and the tests'
/// emulated one.
#[path = "device_train_launch.rs"]
pub(crate) mod launches;

#[cfg(test)]
#[path = "device_train_emulated.rs"]
mod emulated;
