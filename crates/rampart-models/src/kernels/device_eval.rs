//! The fused eval path of pre-activation networks on a GPU: the whole network as one
//! op, forward and input gradient, written once over an executor ([`Exec`]).
//!
//! Through candle's autograd an attack step on a GPU is one graph node per layer
//! operation: each allocates its output and launches its kernels from the host, and
//! the backward pass adds every node's gradient into a fresh zero tensor (a fill and
//! an addition, each a kernel and a pass over the activation). Here the network runs
//! as one op ([`DeviceEval`]) whose forward pass launches, per pre-activation block,
//! two BatchNorm+ReLU kernels and the block's cuDNN convolutions (the second
//! convolution accumulates onto the shortcut, cuDNN's β = 1), and whose backward pass
//! ([`DeviceEvalBackward`]) launches the convolutions' input-gradient passes (a
//! projection shortcut's accumulating) and one kernel per BatchNorm+ReLU (mask,
//! scale and the residual gradient together); nothing is filled with zeros and no
//! intermediate gradient is allocated twice.
//!
//! The program is written once, generic over [`Exec`]: the CUDA executor (feature
//! `cudnn`: cuDNN and the kernels of `device_eval.cu`) and a CPU executor, whose
//! operations are the CUDA kernels' twins (the same float operations, in the same
//! order) and the CPU convolution passes. The CPU executor exists so that the
//! program itself is tested on any machine against the layer-by-layer path; the
//! CPU's own fast path stays [`super::fused::FusedEval`].
//!
//! Pre-activation networks (a WRN or pre-activation ResNet-18), plain or variant: a
//! stochastic student's noise is drawn by `layer_noise` (the values of the
//! layer-by-layer path, from the same seeds) and added in the BatchNorm+ReLU kernel;
//! an OAT model's FiLM at the pass's λ is folded into γ and β on the device, its dual
//! BatchNorm chosen by the λ. Post-activation networks (ResNet-20, plain or OAT) have
//! a form of their own ([`forward_post`]). In f32, TF32 or bf16 (the convolution
//! passes round their operands as the layer-by-layer path does, `cudnn::conv_into`).
//! On a GPU the path is taken when `RAMPART_CUDA_FUSED_EVAL` is set (see
//! [`enabled`]): it has not yet run on a GPU, and becomes the default once
//! `tests/cuda.rs` has held it to the layer-by-layer path there.

use super::common::f32_slice;
use super::conv::{Conv2d, ConvShape, Pass};
use super::launch::{Backend, Launcher};
use super::postact::PostAct;
use super::preact::PreAct;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The environment variable that turns the fused eval path on for CUDA models
/// (any value but `0`).
pub const ENABLE_ENV: &str = "RAMPART_CUDA_FUSED_EVAL";

/// Whether [`ENABLE_ENV`] asks for the fused eval path on a GPU.
pub fn enabled() -> bool {
    switched_on(ENABLE_ENV)
}

/// Whether the environment variable `var` is set to anything but `0`.
pub(crate) fn switched_on(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v != "0")
}

/// Whether a GPU model may take a fused GPU path switched on by `on`: a build with
/// cuDNN and the path on (in any precision: the convolution passes round to bf16
/// under `cuda+bf16` as the layer-by-layer path does).
pub(crate) fn usable_if(on: bool) -> bool {
    #[cfg(feature = "cudnn")]
    {
        on
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = on;
        false
    }
}

/// Whether a GPU model may take the fused eval path ([`usable_if`] [`enabled`]).
pub(crate) fn usable() -> bool {
    usable_if(enabled())
}

/// A convolution: its OIHW kernel, stride and padding.
#[derive(Clone, Debug)]
pub(crate) struct DConv {
    pub(crate) weight: Tensor,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

/// An eval-mode BatchNorm followed by ReLU: γ, β, the running mean and variance, ε,
/// and a stochastic student's noise added before the ReLU. An OAT layer comes with
/// its FiLM at the batch's λ folded into γ and β (see `Norm::device`).
#[derive(Clone, Debug)]
pub(crate) struct DNorm {
    pub(crate) gamma: Tensor,
    pub(crate) beta: Tensor,
    pub(crate) mean: Tensor,
    pub(crate) var: Tensor,
    pub(crate) eps: f32,
    pub(crate) noise: Option<DNoise>,
    /// For the train program: a student's noise factor α (one value, the live
    /// parameter) and the layer's seed for the pass.
    pub(crate) train_noise: Option<DTrainNoise>,
    /// For the train program: an OAT layer's second BatchNorm (γ, β) and the FiLM
    /// outputs of the pass's images.
    pub(crate) train_oat: Option<DTrainOat>,
}

/// An OAT layer in a training step: its second BatchNorm's γ and β (the live
/// parameters) and its FiLM outputs [γ_f | β_f] (B, 2C) of the batch's images, in the
/// order the program sees them (λ = 0 first).
#[derive(Clone, Debug)]
pub(crate) struct DTrainOat {
    pub(crate) adv: (Tensor, Tensor),
    pub(crate) film: Tensor,
}

/// A stochastic student's noise after one BatchNorm in a training step: α, the seed,
/// the index of the batch's first image in the global batch, the noise scale s.
#[derive(Clone, Debug)]
pub(crate) struct DTrainNoise {
    pub(crate) alpha: Tensor,
    pub(crate) seed: u64,
    pub(crate) first: u64,
    pub(crate) scale: f32,
}

/// A stochastic student's noise after one BatchNorm in one forward pass: y =
/// relu(bn(x) + z·((α·σ)·s)), z of image i drawn as image `first + i` of the layer
/// seeded `seed` ([`super::noise::fill_image`]), α the layer's noise factor (one
/// value), σ its running estimate (C,) and s the test-time noise scale; the kernel
/// computes (α·σ)·s per channel (the layer-by-layer path's float operations), so no
/// tensor operation runs for it.
#[derive(Clone, Debug)]
pub(crate) struct DNoise {
    pub(crate) seed: u64,
    pub(crate) first: u64,
    pub(crate) alpha: Tensor,
    pub(crate) sigma: Tensor,
    pub(crate) scale: f32,
}

/// A pre-activation network, its tensors on the device the op runs on; the linear
/// layer as (weight (K, C), bias (K,)).
pub(crate) type DeviceNet = PreAct<DConv, DNorm, (Tensor, Tensor)>;

/// A post-activation network (CCAT's ResNet-20) in the same terms.
pub(crate) type DevicePostNet = PostAct<DConv, DNorm, (Tensor, Tensor)>;

/// The network of an eval program.
pub(crate) enum DeviceArch {
    Pre(DeviceNet),
    Post(DevicePostNet),
}

impl DeviceArch {
    /// The dtype of the parameters (the stem's kernel's).
    pub(crate) fn dtype(&self) -> DType {
        match self {
            DeviceArch::Pre(n) => n.stem.weight.dtype(),
            DeviceArch::Post(n) => n.stem.weight.dtype(),
        }
    }

    /// The linear layer.
    fn fc(&self) -> &(Tensor, Tensor) {
        match self {
            DeviceArch::Pre(n) => &n.fc,
            DeviceArch::Post(n) => &n.fc,
        }
    }

    /// The convolution kernels, in execution order.
    fn convs(&self) -> Vec<&DConv> {
        match self {
            DeviceArch::Pre(n) => std::iter::once(&n.stem)
                .chain(
                    n.blocks
                        .iter()
                        .flat_map(|b| [&b.conv1, &b.conv2].into_iter().chain(b.shortcut.as_ref())),
                )
                .collect(),
            DeviceArch::Post(n) => std::iter::once(&n.stem)
                .chain(n.blocks.iter().flat_map(|b| {
                    [&b.conv1, &b.conv2]
                        .into_iter()
                        .chain(b.shortcut.as_ref().map(|(c, _)| c))
                }))
                .collect(),
        }
    }

    /// The BatchNorms, in execution order.
    fn norms(&self) -> Vec<&DNorm> {
        match self {
            DeviceArch::Pre(n) => n.norms().collect(),
            DeviceArch::Post(n) => n.norms().collect(),
        }
    }
}

/// A network and its input: (C, H, W) and the normalisation's per-channel mean and
/// 1/std.
pub(crate) struct DeviceProgram {
    net: DeviceArch,
    input: [usize; 3],
    mean: Tensor,
    inv_std: Tensor,
}

impl DeviceProgram {
    /// Refuses tensors that are not f32 or not where the input normalisation is.
    pub(crate) fn new(
        net: DeviceArch,
        input: [usize; 3],
        mean: Tensor,
        inv_std: Tensor,
    ) -> Result<Self> {
        let device = mean.device().clone();
        let mut tensors: Vec<&Tensor> = vec![&mean, &inv_std];
        tensors.extend(net.convs().into_iter().map(|c| &c.weight));
        for n in net.norms() {
            tensors.extend([&n.gamma, &n.beta, &n.mean, &n.var]);
            if let Some(z) = &n.noise {
                if z.alpha.elem_count() != 1 {
                    candle_core::bail!("fused eval path: a noise factor of {:?}", z.alpha.dims())
                }
                tensors.extend([&z.alpha, &z.sigma]);
            }
        }
        if let DeviceArch::Post(n) = &net {
            if n.norms().any(|n| n.noise.is_some()) {
                candle_core::bail!("fused eval path: a post-activation network with noise")
            }
        }
        let fc = net.fc();
        tensors.extend([&fc.0, &fc.1]);
        for t in tensors {
            if t.dtype() != DType::F32 || !t.device().same_device(&device) {
                candle_core::bail!(
                    "fused eval path: every tensor must be f32 on {device:?}, got {:?} on {:?}",
                    t.dtype(),
                    t.device()
                )
            }
        }
        Ok(DeviceProgram {
            net,
            input,
            mean,
            inv_std,
        })
    }

    fn classes(&self) -> Result<usize> {
        self.net.fc().0.dim(0)
    }

    /// The input's (B, C, H, W), checked against the network's.
    fn batch(&self, shape: &Shape) -> Result<usize> {
        let (b, c, h, w) = shape.dims4()?;
        if [c, h, w] != self.input {
            candle_core::bail!(
                "fused eval path: input {shape:?} does not match the network's {:?}",
                self.input
            )
        }
        Ok(b)
    }
}

/// The operations the program is written in. Activations are NHWC; `c` is their
/// channel count.
pub(crate) trait Exec {
    /// A buffer of f32 values on the executor's device.
    type Buf;

    /// A buffer of `n` values, each written before it is read.
    fn buffer(&self, n: usize) -> Result<Self::Buf>;
    /// Values in `b`.
    fn len(b: &Self::Buf) -> usize;
    /// An OIHW kernel in OHWI (KRSC) order, the order of the convolution passes.
    fn kernel(&self, w: &Tensor) -> Result<Arc<Self::Buf>>;
    /// The forward pass (x, kernel) → y, or the input-gradient pass (dy, kernel) → dx,
    /// of the convolution `g` into `out`, added to it when `accumulate`.
    fn conv(
        &self,
        pass: Pass,
        g: &ConvShape,
        a: &Self::Buf,
        kernel: &Self::Buf,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// A noisy BatchNorm's z for `len` values of `images` images of the layer seeded
    /// `seed` (image i's values are those of image `first + i`,
    /// [`super::noise::fill_image`]).
    fn draw_noise(&self, seed: u64, first: u64, images: usize, len: usize) -> Result<Self::Buf>;
    /// y = relu(bn(x) + std ⊙ z), `z` (from [`Exec::draw_noise`]) for a noisy
    /// BatchNorm and only for one.
    fn bn_relu(
        &self,
        n: &DNorm,
        x: &Self::Buf,
        y: &mut Self::Buf,
        c: usize,
        z: Option<&Self::Buf>,
    ) -> Result<()>;
    /// y ← relu(bn(y) + std ⊙ z), as [`Exec::bn_relu`].
    fn bn_relu_in_place(
        &self,
        n: &DNorm,
        y: &mut Self::Buf,
        c: usize,
        z: Option<&Self::Buf>,
    ) -> Result<()>;
    /// out ← relu(bn(out) + s), s = `skip_norm`(skip) for a projection shortcut, the
    /// block's input `skip` itself for an identity one: a post-activation block's end.
    fn bn_add_relu(
        &self,
        n: &DNorm,
        out: &mut Self::Buf,
        skip: &Self::Buf,
        skip_norm: Option<&DNorm>,
        c: usize,
    ) -> Result<()>;
    /// The backward pass of [`Exec::bn_add_relu`] whose output is `y`, from its output
    /// gradient d: returns the gradient of the second convolution's output, and d
    /// becomes the shortcut's (before its BatchNorm's scale when there is none, after
    /// it when there is).
    fn add_relu_backward(
        &self,
        n: &DNorm,
        d: &mut Self::Buf,
        y: &Self::Buf,
        skip_norm: Option<&DNorm>,
        c: usize,
    ) -> Result<Self::Buf>;
    /// d ← the input gradient of relu(bn(·)) whose output is `y`, from its output
    /// gradient d, plus `residual`.
    fn bn_relu_backward(
        &self,
        n: &DNorm,
        d: &mut Self::Buf,
        y: &Self::Buf,
        residual: Option<&Self::Buf>,
        c: usize,
    ) -> Result<()>;
    /// The logits (B, K) of global average pooling (`hw` pixels per image) and the
    /// linear layer `fc`.
    fn pool_linear(
        &self,
        x: &Self::Buf,
        fc: &(Tensor, Tensor),
        hw: usize,
        c: usize,
    ) -> Result<Self::Buf>;
    /// The input gradient (B, hw, C) of [`Exec::pool_linear`] from that of the
    /// logits.
    fn linear_pool_backward(
        &self,
        dl: &Self::Buf,
        fc: &(Tensor, Tensor),
        hw: usize,
        c: usize,
    ) -> Result<Self::Buf>;
}

/// The noise z of BatchNorm `n` (None for a plain one) on `len` values of `b` images.
fn noise_of<E: Exec>(e: &E, n: &DNorm, b: usize, len: usize) -> Result<Option<E::Buf>> {
    n.noise
        .as_ref()
        .map(|z| e.draw_noise(z.seed, z.first, b, len))
        .transpose()
}

/// A noisy BatchNorm's noise with z given, None for a plain one without; refuses the
/// two mixed.
fn noise_std<'a, 'b, B>(n: &'a DNorm, z: Option<&'b B>) -> Result<Option<(&'a DNoise, &'b B)>> {
    match (&n.noise, z) {
        (None, None) => Ok(None),
        (Some(nz), Some(z)) => Ok(Some((nz, z))),
        _ => candle_core::bail!(
            "fused eval path: noise for a BatchNorm without, or none for one with"
        ),
    }
}

/// The shape of convolution `conv` on a batch of `b` NHWC images h×w with `c`
/// channels (refused when the kernel does not take `c` channels).
fn shape(conv: &DConv, b: usize, (h, w): (usize, usize), c: usize) -> Result<ConvShape> {
    let (c_out, c_in, k, k2) = conv.weight.dims4()?;
    if c_in != c || k != k2 {
        candle_core::bail!(
            "fused eval path: a kernel {:?} for activations of {c} channels",
            conv.weight.dims()
        )
    }
    ConvShape::from_dims(b, (h, w), c, c_out, k, conv.stride, conv.padding)
}

/// What the backward pass of one block reads: the block's input side, relu(bn1(x)),
/// relu(bn2(conv1(·))) and the three kernels in OHWI order.
struct SavedBlock<B> {
    side: (usize, usize),
    pre: B,
    mid: B,
    k1: Arc<B>,
    k2: Arc<B>,
    shortcut: Option<Arc<B>>,
}

/// What the backward pass of a pre-activation network reads: per block
/// [`SavedBlock`], the head's output (its side and channels) and the stem's kernel.
pub(crate) struct SavedPre<B> {
    b: usize,
    blocks: Vec<SavedBlock<B>>,
    fin: B,
    side: (usize, usize),
    c: usize,
    stem: Arc<B>,
}

/// What the backward pass of a post-activation network reads: the stem's kernel,
/// the outputs of the stem's ReLU and of every block (`acts`, each the next block's
/// input) and per block [`SavedPostBlock`].
pub(crate) struct SavedPost<B> {
    b: usize,
    stem: Arc<B>,
    acts: Vec<B>,
    blocks: Vec<SavedPostBlock<B>>,
    side: (usize, usize),
    c: usize,
}

/// One post-activation block's saved state: its input side, relu(bn1(conv1(x))) and
/// the kernels in OHWI order.
struct SavedPostBlock<B> {
    side: (usize, usize),
    h1: B,
    k1: Arc<B>,
    k2: Arc<B>,
    shortcut: Option<Arc<B>>,
}

/// What the backward pass reads, per architecture.
pub(crate) enum Saved<B> {
    Pre(SavedPre<B>),
    Post(SavedPost<B>),
}

impl<B> Saved<B> {
    /// The images of the pass.
    fn b(&self) -> usize {
        match self {
            Saved::Pre(s) => s.b,
            Saved::Post(s) => s.b,
        }
    }
}

/// The logits of a forward pass and, when asked for, what its backward pass reads.
type Forward<B, S = Saved<B>> = (B, Option<S>);

/// Logits of the normalised NHWC input `a` (B images), and with `keep` what the
/// backward pass needs.
fn forward<E: Exec>(
    e: &E,
    p: &DeviceProgram,
    a: E::Buf,
    b: usize,
    keep: bool,
) -> Result<Forward<E::Buf>> {
    Ok(match &p.net {
        DeviceArch::Pre(net) => {
            let (l, s) = forward_pre(e, net, p.input, a, b, keep)?;
            (l, s.map(Saved::Pre))
        }
        DeviceArch::Post(net) => {
            let (l, s) = forward_post(e, net, p.input, a, b, keep)?;
            (l, s.map(Saved::Post))
        }
    })
}

/// The gradient of the normalised NHWC input from that of the logits `dl`.
fn backward<E: Exec>(e: &E, p: &DeviceProgram, s: &Saved<E::Buf>, dl: &E::Buf) -> Result<E::Buf> {
    match (&p.net, s) {
        (DeviceArch::Pre(net), Saved::Pre(s)) => backward_pre(e, net, p.input, s, dl),
        (DeviceArch::Post(net), Saved::Post(s)) => backward_post(e, net, p.input, s, dl),
        _ => candle_core::bail!("fused eval path: saved state of another network"),
    }
}

/// [`forward`] of a pre-activation network.
fn forward_pre<E: Exec>(
    e: &E,
    net: &DeviceNet,
    input: [usize; 3],
    a: E::Buf,
    b: usize,
    keep: bool,
) -> Result<Forward<E::Buf, SavedPre<E::Buf>>> {
    let [c_in, h0, w0] = input;
    let g = shape(&net.stem, b, (h0, w0), c_in)?;
    let stem = e.kernel(&net.stem.weight)?;
    let mut cur = e.buffer(g.output_len())?;
    e.conv(Pass::Forward, &g, &a, &stem, &mut cur, false)?;
    drop(a);
    let (mut side, mut c) = (g.out(), g.c_out);
    let mut blocks = Vec::with_capacity(if keep { net.blocks.len() } else { 0 });
    for blk in &net.blocks {
        let mut pre = e.buffer(E::len(&cur))?;
        let z = noise_of(e, &blk.bn1, b, E::len(&cur))?;
        e.bn_relu(&blk.bn1, &cur, &mut pre, c, z.as_ref())?;
        drop(z);
        let g1 = shape(&blk.conv1, b, side, c)?;
        let g2 = shape(&blk.conv2, b, g1.out(), g1.c_out)?;
        let (mut out, shortcut) = match &blk.shortcut {
            Some(sc) => {
                let gs = shape(sc, b, side, c)?;
                let ks = e.kernel(&sc.weight)?;
                let mut o = e.buffer(gs.output_len())?;
                e.conv(Pass::Forward, &gs, &pre, &ks, &mut o, false)?;
                (o, Some(ks))
            }
            None => (cur, None),
        };
        if E::len(&out) != g2.output_len() {
            candle_core::bail!(
                "fused eval path: a shortcut of {} values for a block output of {}",
                E::len(&out),
                g2.output_len()
            )
        }
        let k1 = e.kernel(&blk.conv1.weight)?;
        let mut mid = e.buffer(g1.output_len())?;
        e.conv(Pass::Forward, &g1, &pre, &k1, &mut mid, false)?;
        let z = noise_of(e, &blk.bn2, b, E::len(&mid))?;
        e.bn_relu_in_place(&blk.bn2, &mut mid, g1.c_out, z.as_ref())?;
        drop(z);
        let k2 = e.kernel(&blk.conv2.weight)?;
        e.conv(Pass::Forward, &g2, &mid, &k2, &mut out, true)?;
        if keep {
            blocks.push(SavedBlock {
                side,
                pre,
                mid,
                k1,
                k2,
                shortcut,
            });
        }
        cur = out;
        (side, c) = (g2.out(), g2.c_out);
    }
    let mut fin = e.buffer(E::len(&cur))?;
    let z = noise_of(e, &net.head, b, E::len(&cur))?;
    e.bn_relu(&net.head, &cur, &mut fin, c, z.as_ref())?;
    drop(z);
    drop(cur);
    let logits = e.pool_linear(&fin, &net.fc, side.0 * side.1, c)?;
    let saved = keep.then_some(SavedPre {
        b,
        blocks,
        fin,
        side,
        c,
        stem,
    });
    Ok((logits, saved))
}

/// [`backward`] of a pre-activation network.
fn backward_pre<E: Exec>(
    e: &E,
    net: &DeviceNet,
    input: [usize; 3],
    s: &SavedPre<E::Buf>,
    dl: &E::Buf,
) -> Result<E::Buf> {
    let b = s.b;
    let mut d = e.linear_pool_backward(dl, &net.fc, s.side.0 * s.side.1, s.c)?;
    e.bn_relu_backward(&net.head, &mut d, &s.fin, None, s.c)?;
    for (blk, sb) in net.blocks.iter().zip(&s.blocks).rev() {
        let c = blk.conv1.weight.dim(1)?;
        let g1 = shape(&blk.conv1, b, sb.side, c)?;
        let g2 = shape(&blk.conv2, b, g1.out(), g1.c_out)?;
        let mut dmid = e.buffer(g2.input_len())?;
        e.conv(Pass::Data, &g2, &d, &sb.k2, &mut dmid, false)?;
        e.bn_relu_backward(&blk.bn2, &mut dmid, &sb.mid, None, g1.c_out)?;
        let mut dpre = e.buffer(g1.input_len())?;
        e.conv(Pass::Data, &g1, &dmid, &sb.k1, &mut dpre, false)?;
        drop(dmid);
        match (&blk.shortcut, &sb.shortcut) {
            (Some(sc), Some(ks)) => {
                let gs = shape(sc, b, sb.side, c)?;
                e.conv(Pass::Data, &gs, &d, ks, &mut dpre, true)?;
                e.bn_relu_backward(&blk.bn1, &mut dpre, &sb.pre, None, c)?;
            }
            (None, None) => e.bn_relu_backward(&blk.bn1, &mut dpre, &sb.pre, Some(&d), c)?,
            _ => candle_core::bail!("fused eval path: saved state of another network"),
        }
        d = dpre;
    }
    let [c_in, h0, w0] = input;
    let g = shape(&net.stem, b, (h0, w0), c_in)?;
    let mut dn = e.buffer(g.input_len())?;
    e.conv(Pass::Data, &g, &d, &s.stem, &mut dn, false)?;
    Ok(dn)
}

/// [`forward`] of a post-activation network: per block conv1, BatchNorm+ReLU in
/// place, conv2 (and the shortcut's convolution), then one kernel for the second
/// BatchNorm, the shortcut's (or the identity), the sum and the ReLU.
fn forward_post<E: Exec>(
    e: &E,
    net: &DevicePostNet,
    input: [usize; 3],
    a: E::Buf,
    b: usize,
    keep: bool,
) -> Result<Forward<E::Buf, SavedPost<E::Buf>>> {
    let [c_in, h0, w0] = input;
    let g = shape(&net.stem, b, (h0, w0), c_in)?;
    let stem = e.kernel(&net.stem.weight)?;
    let mut cur = e.buffer(g.output_len())?;
    e.conv(Pass::Forward, &g, &a, &stem, &mut cur, false)?;
    drop(a);
    let (mut side, mut c) = (g.out(), g.c_out);
    e.bn_relu_in_place(&net.stem_bn, &mut cur, c, None)?;
    // The stem's output and every block's (all kept for the backward pass, else the
    // last only).
    let mut acts = vec![cur];
    let mut blocks = Vec::with_capacity(if keep { net.blocks.len() } else { 0 });
    for blk in &net.blocks {
        let Some(x) = acts.last() else {
            candle_core::bail!("fused eval path: no block input")
        };
        let g1 = shape(&blk.conv1, b, side, c)?;
        let g2 = shape(&blk.conv2, b, g1.out(), g1.c_out)?;
        let k1 = e.kernel(&blk.conv1.weight)?;
        let mut h1 = e.buffer(g1.output_len())?;
        e.conv(Pass::Forward, &g1, x, &k1, &mut h1, false)?;
        e.bn_relu_in_place(&blk.bn1, &mut h1, g1.c_out, None)?;
        let k2 = e.kernel(&blk.conv2.weight)?;
        let mut out = e.buffer(g2.output_len())?;
        e.conv(Pass::Forward, &g2, &h1, &k2, &mut out, false)?;
        let shortcut = match &blk.shortcut {
            Some((sc, sn)) => {
                let gs = shape(sc, b, side, c)?;
                let ks = e.kernel(&sc.weight)?;
                let mut skip = e.buffer(gs.output_len())?;
                e.conv(Pass::Forward, &gs, x, &ks, &mut skip, false)?;
                e.bn_add_relu(&blk.bn2, &mut out, &skip, Some(sn), g2.c_out)?;
                Some(ks)
            }
            None => {
                e.bn_add_relu(&blk.bn2, &mut out, x, None, g2.c_out)?;
                None
            }
        };
        if keep {
            blocks.push(SavedPostBlock {
                side,
                h1,
                k1,
                k2,
                shortcut,
            });
        } else {
            acts.clear();
        }
        acts.push(out);
        (side, c) = (g2.out(), g2.c_out);
    }
    let Some(last) = acts.last() else {
        candle_core::bail!("fused eval path: no network output")
    };
    let logits = e.pool_linear(last, &net.fc, side.0 * side.1, c)?;
    let saved = keep.then_some(SavedPost {
        b,
        stem,
        acts,
        blocks,
        side,
        c,
    });
    Ok((logits, saved))
}

/// [`backward`] of a post-activation network.
fn backward_post<E: Exec>(
    e: &E,
    net: &DevicePostNet,
    input: [usize; 3],
    s: &SavedPost<E::Buf>,
    dl: &E::Buf,
) -> Result<E::Buf> {
    let b = s.b;
    let mut d = e.linear_pool_backward(dl, &net.fc, s.side.0 * s.side.1, s.c)?;
    if s.acts.len() != s.blocks.len() + 1 || s.blocks.len() != net.blocks.len() {
        candle_core::bail!("fused eval path: saved state of another network")
    }
    for (i, (blk, sb)) in net.blocks.iter().zip(&s.blocks).enumerate().rev() {
        let c = blk.conv1.weight.dim(1)?;
        let g1 = shape(&blk.conv1, b, sb.side, c)?;
        let g2 = shape(&blk.conv2, b, g1.out(), g1.c_out)?;
        // d becomes the shortcut's gradient, d2 the second convolution's.
        let shortcut_norm = blk.shortcut.as_ref().map(|(_, n)| n);
        let d2 = e.add_relu_backward(&blk.bn2, &mut d, &s.acts[i + 1], shortcut_norm, g2.c_out)?;
        let mut dh1 = e.buffer(g2.input_len())?;
        e.conv(Pass::Data, &g2, &d2, &sb.k2, &mut dh1, false)?;
        drop(d2);
        e.bn_relu_backward(&blk.bn1, &mut dh1, &sb.h1, None, g1.c_out)?;
        let mut dx = match (&blk.shortcut, &sb.shortcut) {
            (Some((sc, _)), Some(ks)) => {
                let gs = shape(sc, b, sb.side, c)?;
                let mut dx = e.buffer(gs.input_len())?;
                e.conv(Pass::Data, &gs, &d, ks, &mut dx, false)?;
                dx
            }
            (None, None) => d,
            _ => candle_core::bail!("fused eval path: saved state of another network"),
        };
        e.conv(Pass::Data, &g1, &dh1, &sb.k1, &mut dx, true)?;
        d = dx;
    }
    let c = net.stem.weight.dim(0)?;
    e.bn_relu_backward(&net.stem_bn, &mut d, &s.acts[0], None, c)?;
    let [c_in, h0, w0] = input;
    let g = shape(&net.stem, b, (h0, w0), c_in)?;
    let mut dn = e.buffer(g.input_len())?;
    e.conv(Pass::Data, &g, &d, &s.stem, &mut dn, false)?;
    Ok(dn)
}

/// The saved state of a forward pass, on the device it ran on.
enum SavedOn {
    Cpu(Saved<Vec<f32>>),
    #[cfg(feature = "cudnn")]
    Cuda(Saved<cuda::Slice>),
}

/// The whole network as one op on the NCHW input: logits forward, the input gradient
/// backward ([`DeviceEvalBackward`]); parameters receive none.
pub(crate) struct DeviceEval {
    program: Arc<DeviceProgram>,
    keep: bool,
    saved: Mutex<Option<SavedOn>>,
}

impl DeviceEval {
    /// `keep`: retain what the backward pass needs (when the input is tracked).
    pub(crate) fn new(program: DeviceProgram, keep: bool) -> Self {
        DeviceEval {
            program: Arc::new(program),
            keep,
            saved: Mutex::new(None),
        }
    }

    fn store(&self, saved: Option<SavedOn>) {
        if self.keep {
            *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = saved;
        }
    }
}

impl CustomOp1 for DeviceEval {
    fn name(&self) -> &'static str {
        "device-eval-network"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.program;
        let b = p.batch(l.shape())?;
        let x = f32_slice(s, l, self.name())?;
        let e = CpuExec;
        let a = normalise(x, &e.values(&p.mean)?, &e.values(&p.inv_std)?, p.input);
        let (logits, saved) = forward(&e, p, a, b, self.keep)?;
        self.store(saved.map(SavedOn::Cpu));
        Ok((CpuStorage::F32(logits), Shape::from((b, p.classes()?))))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let p = &self.program;
        let b = p.batch(l.shape())?;
        let e = cuda::CudaExec::new(&s.device);
        let a = e.normalise(s, l, p)?;
        let (logits, saved) = forward(&e, p, a, b, self.keep)?;
        self.store(saved.map(SavedOn::Cuda));
        Ok((e.storage(logits), Shape::from((b, p.classes()?))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = super::common::take_saved(
            &self.saved,
            "fused eval path: the backward pass of this forward pass already ran (or its input was not tracked)",
        )?;
        let op = DeviceEvalBackward {
            program: self.program.clone(),
            saved: Mutex::new(Some(saved)),
            input: arg.shape().clone(),
        };
        let dl = grad.to_dtype(DType::F32)?.contiguous()?;
        Ok(Some(dl.apply_op1_no_bwd(&op)?.to_dtype(arg.dtype())?))
    }
}

/// The backward pass of a [`DeviceEval`]: the gradient of the logits (B, K) → that
/// of the NCHW input.
struct DeviceEvalBackward {
    program: Arc<DeviceProgram>,
    saved: Mutex<Option<SavedOn>>,
    input: Shape,
}

impl DeviceEvalBackward {
    fn saved(&self) -> Result<SavedOn> {
        super::common::take_saved(
            &self.saved,
            "fused eval path: the backward pass already ran",
        )
    }

    fn check(&self, l: &Layout, b: usize) -> Result<()> {
        let k = self.program.classes()?;
        if l.shape().dims() != [b, k] {
            candle_core::bail!(
                "fused eval path: a logit gradient of shape {:?} for {b} images of {k} classes",
                l.shape()
            )
        }
        Ok(())
    }
}

impl CustomOp1 for DeviceEvalBackward {
    fn name(&self) -> &'static str {
        "device-eval-network-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // Irrefutable without the `cudnn` feature.
        #[allow(irrefutable_let_patterns)]
        let SavedOn::Cpu(saved) = self.saved()?
        else {
            candle_core::bail!("fused eval path: the forward pass ran on another device")
        };
        self.check(l, saved.b())?;
        let dl = f32_slice(s, l, self.name())?.to_vec();
        let p = &self.program;
        let e = CpuExec;
        let dn = backward(&e, p, &saved, &dl)?;
        let dx = denormalise(&dn, &e.values(&p.inv_std)?, p.input);
        Ok((CpuStorage::F32(dx), self.input.clone()))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let SavedOn::Cuda(saved) = self.saved()? else {
            candle_core::bail!("fused eval path: the forward pass ran on another device")
        };
        self.check(l, saved.b())?;
        let e = cuda::CudaExec::new(&s.device);
        let dl = e.copy_of(s, l)?;
        let p = &self.program;
        let dn = backward(&e, p, &saved, &dl)?;
        let dx = e.denormalise(&dn, p)?;
        Ok((e.storage(dx), self.input.clone()))
    }
}

/// The classes K of a linear layer (K, C) on `c` features (checked).
fn classes(fc: &(Tensor, Tensor), c: usize) -> Result<usize> {
    let (k, c_w) = fc.0.dims2()?;
    same_len(c_w, c, "linear layer")?;
    Ok(k)
}

/// The executors whose own kernels are launches (the CUDA one, the tests' emulated
/// one): their backend's convolutions and noise, and the launch code of
/// `device_eval_launch.rs`, written once.
impl<T: Backend> Exec for T {
    type Buf = <T as Launcher>::Buf;

    fn buffer(&self, n: usize) -> Result<Self::Buf> {
        self.alloc(n)
    }

    fn len(b: &Self::Buf) -> usize {
        T::size(b)
    }

    fn kernel(&self, w: &Tensor) -> Result<Arc<Self::Buf>> {
        super::weights::reordered(w, || self.krsc(w))
    }

    fn conv(
        &self,
        pass: Pass,
        g: &ConvShape,
        a: &Self::Buf,
        kernel: &Self::Buf,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.convolve(pass, g, a, kernel, out, accumulate)
    }

    fn draw_noise(&self, seed: u64, first: u64, images: usize, len: usize) -> Result<Self::Buf> {
        self.noise(seed, first, images, len)
    }

    fn bn_relu(
        &self,
        n: &DNorm,
        x: &Self::Buf,
        y: &mut Self::Buf,
        c: usize,
        z: Option<&Self::Buf>,
    ) -> Result<()> {
        launches::bn_relu(self, n, x, y, c, z)
    }

    fn bn_relu_in_place(
        &self,
        n: &DNorm,
        y: &mut Self::Buf,
        c: usize,
        z: Option<&Self::Buf>,
    ) -> Result<()> {
        launches::bn_relu_in_place(self, n, y, c, z)
    }

    fn bn_add_relu(
        &self,
        n: &DNorm,
        out: &mut Self::Buf,
        skip: &Self::Buf,
        skip_norm: Option<&DNorm>,
        c: usize,
    ) -> Result<()> {
        launches::bn_add_relu(self, n, out, skip, skip_norm, c)
    }

    fn add_relu_backward(
        &self,
        n: &DNorm,
        d: &mut Self::Buf,
        y: &Self::Buf,
        skip_norm: Option<&DNorm>,
        c: usize,
    ) -> Result<Self::Buf> {
        let mut d2 = self.alloc(T::size(d).max(1))?;
        launches::add_relu_backward(self, n, &mut d2, d, y, skip_norm, c)?;
        Ok(d2)
    }

    fn bn_relu_backward(
        &self,
        n: &DNorm,
        d: &mut Self::Buf,
        y: &Self::Buf,
        residual: Option<&Self::Buf>,
        c: usize,
    ) -> Result<()> {
        launches::bn_relu_backward(self, n, d, y, residual, c)
    }

    fn pool_linear(
        &self,
        x: &Self::Buf,
        fc: &(Tensor, Tensor),
        hw: usize,
        c: usize,
    ) -> Result<Self::Buf> {
        let k = classes(fc, c)?;
        Ok(launches::pool_linear(self, x, launches::Fc::Tensors(fc), hw, c, k)?.1)
    }

    fn linear_pool_backward(
        &self,
        dl: &Self::Buf,
        fc: &(Tensor, Tensor),
        hw: usize,
        c: usize,
    ) -> Result<Self::Buf> {
        let k = classes(fc, c)?;
        launches::linear_pool_backward(self, dl, launches::Fc::Tensors(fc), hw, c, k)
    }
}

// ---------------------------------------------------------------------------------
// The CPU executor: the twins of the CUDA kernels (the same float operations, in the
// same order) and the CPU convolution passes.

/// The CPU executor (for tests of the program; the CPU's fast path is
/// [`super::fused::FusedEval`]).
pub(crate) struct CpuExec;

impl CpuExec {
    fn values(&self, t: &Tensor) -> Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }

    /// (γ, β, mean, var) of a BatchNorm.
    fn norm(&self, n: &DNorm) -> Result<[Vec<f32>; 4]> {
        Ok([
            self.values(&n.gamma)?,
            self.values(&n.beta)?,
            self.values(&n.mean)?,
            self.values(&n.var)?,
        ])
    }
}

/// γ·(1/√(var + ε)), the twin of `de_scale`.
fn bn_scale(gamma: f32, var: f32, eps: f32) -> f32 {
    gamma * (1.0 / (var + eps).sqrt())
}

/// The twin of `de_bn`: x·s + (β − μ·s).
fn bn_value(x: f32, [g, b, m, v]: [f32; 4], eps: f32) -> f32 {
    let s = bn_scale(g, v, eps);
    let shift = b - m * s;
    x * s + shift
}

/// max(0, v) as the kernels write it.
fn relu(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

/// The twins of `de_bn_relu_into`/`_inplace` (no noise) and
/// `de_bn_noise_relu_into`/`_inplace` (noise std·z added before the ReLU): y[i] =
/// relu(bn(x[i]) (+ z[i]·std[ch])), x = y in place.
fn cpu_bn_relu(
    e: &CpuExec,
    n: &DNorm,
    x: Option<&[f32]>,
    y: &mut [f32],
    c: usize,
    z: Option<&Vec<f32>>,
) -> Result<()> {
    let [g, b, m, v] = e.norm(n)?;
    // (α·σ)·s per channel, as the kernels compute it.
    let std = noise_std(n, z)?
        .map(|(nz, _)| -> Result<Vec<f32>> {
            let alpha = e.values(&nz.alpha)?[0];
            Ok(e.values(&nz.sigma)?
                .iter()
                .map(|&sg| (alpha * sg) * nz.scale)
                .collect())
        })
        .transpose()?;
    if let Some(x) = x {
        same_len(x.len(), y.len(), "BatchNorm")?;
    }
    if let Some(z) = z {
        same_len(z.len(), y.len(), "BatchNorm noise")?;
    }
    for i in 0..y.len() {
        let ch = i % c;
        let xv = x.map_or(y[i], |x| x[i]);
        let mut t = bn_value(xv, [g[ch], b[ch], m[ch], v[ch]], n.eps);
        if let (Some(z), Some(std)) = (z, &std) {
            t += z[i] * std[ch];
        }
        y[i] = relu(t);
    }
    Ok(())
}

/// Refuses two buffers of different lengths that must match.
pub(crate) fn same_len(a: usize, b: usize, what: &str) -> Result<()> {
    if a != b {
        candle_core::bail!("fused eval path: {what}: {a} values against {b}")
    }
    Ok(())
}

/// The twin of `de_normalise`: NCHW in, normalised NHWC out.
pub(crate) fn normalise(
    x: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    [c, h, w]: [usize; 3],
) -> Vec<f32> {
    let hw = h * w;
    let mut out = vec![0f32; x.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let (ch, rest) = (i % c, i / c);
        let (p, b) = (rest % hw, rest / hw);
        *o = (x[(b * c + ch) * hw + p] - mean[ch]) * inv_std[ch];
    }
    out
}

/// The twin of `de_denormalise`: NHWC gradient in, NCHW out, scaled by 1/std.
fn denormalise(dn: &[f32], inv_std: &[f32], [c, h, w]: [usize; 3]) -> Vec<f32> {
    let hw = h * w;
    let mut dx = vec![0f32; dn.len()];
    for (i, o) in dx.iter_mut().enumerate() {
        let (p, rest) = (i % hw, i / hw);
        let (ch, b) = (rest % c, rest / c);
        *o = dn[(b * hw + p) * c + ch] * inv_std[ch];
    }
    dx
}

impl Exec for CpuExec {
    type Buf = Vec<f32>;

    fn buffer(&self, n: usize) -> Result<Vec<f32>> {
        // NaN, like the GPU's uninitialised memory at its worst: a value the programs
        // read before writing shows in their results (the tests compare them).
        Ok(vec![f32::NAN; n])
    }

    fn len(b: &Vec<f32>) -> usize {
        b.len()
    }

    fn kernel(&self, w: &Tensor) -> Result<Arc<Vec<f32>>> {
        let (_, ci, k, _) = w.dims4()?;
        Ok(Arc::new(super::conv::oihw_to_ohwi(
            &self.values(w)?,
            ci,
            k * k,
        )))
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
        let op = Conv2d { shape: *g, pass };
        let r = match pass {
            Pass::Forward => op.cpu_forward(a, kernel),
            Pass::Data => op.cpu_data(a, kernel),
            Pass::Filter => candle_core::bail!("fused eval path: no kernel gradients"),
        };
        if r.len() != out.len() {
            candle_core::bail!(
                "fused eval path: a convolution of {} values into {}",
                r.len(),
                out.len()
            )
        }
        if accumulate {
            out.iter_mut().zip(&r).for_each(|(o, v)| *o += v);
        } else {
            *out = r;
        }
        Ok(())
    }

    fn draw_noise(&self, seed: u64, first: u64, images: usize, len: usize) -> Result<Vec<f32>> {
        let mut z = vec![0f32; len];
        if images > 0 && !len.is_multiple_of(images) {
            candle_core::bail!("fused eval path: {len} noise values for {images} images")
        }
        let per = len / images.max(1);
        if per > 0 {
            for (i, zi) in z.chunks_exact_mut(per).enumerate() {
                super::noise::fill_image(seed, first as usize + i, zi);
            }
        }
        Ok(z)
    }

    fn bn_relu(
        &self,
        n: &DNorm,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        c: usize,
        z: Option<&Vec<f32>>,
    ) -> Result<()> {
        cpu_bn_relu(self, n, Some(x), y, c, z)
    }

    fn bn_relu_in_place(
        &self,
        n: &DNorm,
        y: &mut Vec<f32>,
        c: usize,
        z: Option<&Vec<f32>>,
    ) -> Result<()> {
        cpu_bn_relu(self, n, None, y, c, z)
    }

    fn bn_add_relu(
        &self,
        n: &DNorm,
        out: &mut Vec<f32>,
        skip: &Vec<f32>,
        skip_norm: Option<&DNorm>,
        c: usize,
    ) -> Result<()> {
        same_len(skip.len(), out.len(), "shortcut")?;
        let [g, b, m, v] = self.norm(n)?;
        let sn = skip_norm.map(|sn| self.norm(sn)).transpose()?;
        for (i, (o, &k)) in out.iter_mut().zip(skip).enumerate() {
            let ch = i % c;
            let main = bn_value(*o, [g[ch], b[ch], m[ch], v[ch]], n.eps);
            let side = match (&sn, skip_norm) {
                (Some([sg, sb, sm, sv]), Some(sn)) => {
                    bn_value(k, [sg[ch], sb[ch], sm[ch], sv[ch]], sn.eps)
                }
                _ => k,
            };
            *o = relu(main + side);
        }
        Ok(())
    }

    fn add_relu_backward(
        &self,
        n: &DNorm,
        d: &mut Vec<f32>,
        y: &Vec<f32>,
        skip_norm: Option<&DNorm>,
        c: usize,
    ) -> Result<Vec<f32>> {
        same_len(y.len(), d.len(), "block gradient")?;
        let (g, v) = (self.values(&n.gamma)?, self.values(&n.var)?);
        let sn = skip_norm
            .map(|sn| -> Result<_> { Ok((self.values(&sn.gamma)?, self.values(&sn.var)?, sn.eps)) })
            .transpose()?;
        let mut d2 = vec![0f32; d.len()];
        for (i, (dv, &yv)) in d.iter_mut().zip(y).enumerate() {
            let ch = i % c;
            let live = if yv > 0.0 { 1.0 } else { 0.0 };
            let gsum = *dv * live;
            d2[i] = bn_scale(g[ch], v[ch], n.eps) * gsum;
            *dv = match &sn {
                Some((sg, sv, eps)) => bn_scale(sg[ch], sv[ch], *eps) * gsum,
                None => gsum,
            };
        }
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
        let (g, v) = (self.values(&n.gamma)?, self.values(&n.var)?);
        for (i, (dv, &yv)) in d.iter_mut().zip(y).enumerate() {
            let ch = i % c;
            let live = if yv > 0.0 { 1.0 } else { 0.0 };
            let mut r = bn_scale(g[ch], v[ch], n.eps) * (*dv * live);
            if let Some(res) = residual {
                r += res[i];
            }
            *dv = r;
        }
        Ok(())
    }

    fn pool_linear(
        &self,
        x: &Vec<f32>,
        fc: &(Tensor, Tensor),
        hw: usize,
        c: usize,
    ) -> Result<Vec<f32>> {
        let (w, bias) = (self.values(&fc.0)?, self.values(&fc.1)?);
        let k = bias.len();
        let b = x.len() / (hw * c).max(1);
        Ok(linear(&avg_pool(x, hw, c), &w, &bias, b, c, k))
    }

    fn linear_pool_backward(
        &self,
        dl: &Vec<f32>,
        fc: &(Tensor, Tensor),
        hw: usize,
        c: usize,
    ) -> Result<Vec<f32>> {
        let w = self.values(&fc.0)?;
        let k = fc.0.dim(0)?;
        let b = dl.len() / k.max(1);
        Ok(linear_pool_input_grad(dl, &w, b, hw, c, k))
    }
}

/// The twin of `de_avg_pool`: (B, hw, C) → (B, C).
pub(crate) fn avg_pool(x: &[f32], hw: usize, c: usize) -> Vec<f32> {
    let b = x.len() / (hw * c).max(1);
    let mut pooled = vec![0f32; b * c];
    for (j, o) in pooled.iter_mut().enumerate() {
        let (ch, img) = (j % c, j / c);
        let mut s = 0f32;
        for p in 0..hw {
            s += x[(img * hw + p) * c + ch];
        }
        *o = s * (1.0 / hw as f32);
    }
    pooled
}

/// The twin of `de_linear`: (B, C) → (B, K) with weight (K, C) and bias (K,).
pub(crate) fn linear(x: &[f32], w: &[f32], bias: &[f32], b: usize, c: usize, k: usize) -> Vec<f32> {
    let mut logits = vec![0f32; b * k];
    for (t, o) in logits.iter_mut().enumerate() {
        let (j, img) = (t % k, t / k);
        let mut s = 0f32;
        for ch in 0..c {
            s += w[j * c + ch] * x[img * c + ch];
        }
        *o = s + bias[j];
    }
    logits
}

/// The twin of `de_linear_pool_backward`: the gradient (B, hw, C) of the pooled
/// activations from that of the logits (B, K).
pub(crate) fn linear_pool_input_grad(
    dl: &[f32],
    w: &[f32],
    b: usize,
    hw: usize,
    c: usize,
    k: usize,
) -> Vec<f32> {
    let mut d = vec![0f32; b * hw * c];
    for (i, o) in d.iter_mut().enumerate() {
        let (ch, img) = (i % c, i / (c * hw));
        let mut s = 0f32;
        for j in 0..k {
            s += dl[img * k + j] * w[j * c + ch];
        }
        *o = s * (1.0 / hw as f32);
    }
    d
}

// ---------------------------------------------------------------------------------
// The CUDA executor.

#[cfg(feature = "cudnn")]
pub(crate) mod cuda {
    use super::super::cuda::{f32_view, uninit, Module};
    use super::super::launch::cuda::CudaArg;
    use super::launches;
    use super::DeviceProgram;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{CudaStorage, Layout, Result, Storage, Tensor};

    pub(crate) type Slice = CudaSlice<f32>;

    /// The kernels of `device_eval.cu`.
    pub(crate) static KERNELS_MODULE: Module =
        Module::new("rampart_device_eval", include_str!("device_eval.cu"));

    /// The CUDA executor on one device.
    pub(crate) struct CudaExec {
        pub(crate) dev: CudaDevice,
    }

    /// The `n` f32 values (contiguous, on a GPU) of a tensor through its storage's
    /// read guard and its layout (`Tensor::storage_and_layout`).
    pub(crate) fn view<'a, G: std::ops::Deref<Target = Storage>>(
        g: &'a (G, &Layout),
        n: usize,
        what: &str,
    ) -> Result<CudaView<'a, f32>> {
        let Storage::Cuda(s) = &*g.0 else {
            candle_core::bail!("fused eval path: {what} is not on the GPU")
        };
        f32_view(s, g.1, n, what)
    }

    impl CudaExec {
        pub(crate) fn new(dev: &CudaDevice) -> Self {
            CudaExec { dev: dev.clone() }
        }

        /// `out` as candle storage.
        pub(crate) fn storage(&self, out: Slice) -> CudaStorage {
            CudaStorage::wrap_cuda_slice(out, self.dev.clone())
        }

        /// A copy of a contiguous f32 operand.
        pub(crate) fn copy_of(&self, s: &CudaStorage, l: &Layout) -> Result<Slice> {
            let n = l.shape().elem_count();
            let v = f32_view(s, l, n, "fused eval path: logit gradient")?;
            let mut out = uninit(&self.dev, n)?;
            self.dev.memcpy_dtod(&v, &mut out)?;
            Ok(out)
        }

        /// The normalised NHWC input from the NCHW operand.
        pub(crate) fn normalise(
            &self,
            s: &CudaStorage,
            l: &Layout,
            p: &DeviceProgram,
        ) -> Result<Slice> {
            self.normalise_with(s, l, p.input, &p.mean, &p.inv_std)
        }

        /// The NCHW images of `s` (each of shape `input`) normalised by `mean` and
        /// `inv_std`, NHWC.
        pub(crate) fn normalise_with(
            &self,
            s: &CudaStorage,
            l: &Layout,
            input: [usize; 3],
            mean: &Tensor,
            inv_std: &Tensor,
        ) -> Result<Slice> {
            let n = l.shape().elem_count();
            let x = f32_view(s, l, n, "fused eval path: input")?;
            let mut out = uninit(&self.dev, n)?;
            launches::normalise(self, &mut out, CudaArg::View(x), input, mean, inv_std)?;
            Ok(out)
        }

        /// The NCHW input gradient from that of the normalised NHWC input.
        pub(crate) fn denormalise(&self, dn: &Slice, p: &DeviceProgram) -> Result<Slice> {
            let mut out = uninit(&self.dev, dn.len())?;
            launches::denormalise(self, &mut out, dn, p.input, &p.inv_std)?;
            Ok(out)
        }
    }
}

/// Every kernel of `device_eval.cu`, the eval program's and the train program's (for
/// the compile check).
pub const KERNELS: [&str; 23] = [
    "dt_film_relu",
    "dt_film_grads",
    "dt_film_scale",
    "dt_add_relu_inplace",
    "dt_noise_sigma",
    "dt_noise_relu_inplace",
    "dt_noise_dot",
    "dt_noise_alpha_grad",
    "de_bn_add_relu",
    "de_add_relu_backward",
    "de_bn_relu_into",
    "de_bn_relu_inplace",
    "de_bn_noise_relu_into",
    "de_bn_noise_relu_inplace",
    "de_bn_relu_backward",
    "de_normalise",
    "de_denormalise",
    "de_avg_pool",
    "de_linear",
    "de_linear_pool_backward",
    "de_relu_mask_inplace",
    "de_add_inplace",
    "de_linear_param_grads",
];

/// The PTX of `device_eval.cu` (NVRTC; no GPU needed).
#[cfg(feature = "cudnn")]
pub fn ptx() -> Result<&'static str> {
    cuda::KERNELS_MODULE.ptx()
}

/// The eval program's launches, shared by the CUDA executor and the tests' emulated
/// one.
#[path = "device_eval_launch.rs"]
pub(crate) mod launches;

#[cfg(test)]
#[path = "device_eval_emulated.rs"]
mod emulated;
