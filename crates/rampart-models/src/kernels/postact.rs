//! The shape of a post-activation ResNet (CCAT's ResNet-20), written once, and its
//! fused eval-mode body.
//!
//! [`PostAct`] is generic over what stands for a convolution (`C`), a BatchNorm (`N`)
//! and the linear layer (`L`), like [`super::preact::PreAct`]: the architecture holds
//! one with its layers (whose layer-by-layer forward pass is the reference), the
//! fused eval path one with kernels in GEMM layout. In eval mode a BatchNorm after a
//! convolution is an affine map per output channel: after the first convolution of a
//! block (and the stem) it is applied with the ReLU to each output block while it is
//! in cache; the second convolution and the shortcut's convolution have it folded
//! into their kernels and a bias, so the block's sum is accumulated in place and
//! rectified once.

use super::common::EvalNorm;
use super::fused::{conv_norm_conv_backward, ConvLayer};
use candle_core::{Result, Tensor};

/// A post-activation basic block: conv-BN-ReLU-conv-BN, plus the shortcut (a 1×1
/// convolution with BatchNorm when the shape changes, else the block's input), ReLU.
#[derive(Clone, Debug)]
pub struct PostActBlock<C, N> {
    /// First convolution (carries the block's stride).
    pub conv1: C,
    /// BatchNorm (+ ReLU) after it.
    pub bn1: N,
    /// Second convolution.
    pub conv2: C,
    /// BatchNorm after it (the ReLU follows the sum).
    pub bn2: N,
    /// Projection shortcut and its BatchNorm, when the shape changes.
    pub shortcut: Option<(C, N)>,
}

/// A post-activation network: stem convolution + BN-ReLU, blocks, global average
/// pooling, linear layer.
#[derive(Clone, Debug)]
pub struct PostAct<C, N, L> {
    /// Stem convolution of the (normalised) input.
    pub stem: C,
    /// Its BatchNorm (+ ReLU).
    pub stem_bn: N,
    /// The blocks, in order.
    pub blocks: Vec<PostActBlock<C, N>>,
    /// Linear layer on the pooled features.
    pub fc: L,
}

impl<C, N, L> PostAct<C, N, L> {
    /// The same network with every layer mapped, in execution order; `None` as soon
    /// as one layer has no image.
    pub fn try_map<'s, C2, N2, L2>(
        &'s self,
        conv: impl Fn(&'s C) -> Result<Option<C2>>,
        norm: impl Fn(&'s N) -> Result<Option<N2>>,
        fc: impl FnOnce(&'s L) -> Result<Option<L2>>,
    ) -> Result<Option<PostAct<C2, N2, L2>>> {
        let (Some(stem), Some(stem_bn)) = (conv(&self.stem)?, norm(&self.stem_bn)?) else {
            return Ok(None);
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (Some(conv1), Some(bn1), Some(conv2), Some(bn2)) = (
                conv(&b.conv1)?,
                norm(&b.bn1)?,
                conv(&b.conv2)?,
                norm(&b.bn2)?,
            ) else {
                return Ok(None);
            };
            let shortcut = match &b.shortcut {
                Some((c, n)) => match (conv(c)?, norm(n)?) {
                    (Some(c), Some(n)) => Some((c, n)),
                    _ => return Ok(None),
                },
                None => None,
            };
            blocks.push(PostActBlock {
                conv1,
                bn1,
                conv2,
                bn2,
                shortcut,
            });
        }
        let Some(fc) = fc(&self.fc)? else {
            return Ok(None);
        };
        Ok(Some(PostAct {
            stem,
            stem_bn,
            blocks,
            fc,
        }))
    }

    /// Every BatchNorm in execution order (the stem's; per block bn1, bn2, the
    /// shortcut's).
    pub fn norms(&self) -> impl Iterator<Item = &N> {
        std::iter::once(&self.stem_bn).chain(self.blocks.iter().flat_map(|b| {
            [&b.bn1, &b.bn2]
                .into_iter()
                .chain(b.shortcut.as_ref().map(|(_, n)| n))
        }))
    }
}

/// A convolution as the fused eval path takes it: OIHW kernel, stride, padding.
pub(crate) type ConvWeights = (Tensor, usize, usize);

/// A linear layer as the fused eval path takes it: weight (K × C row-major), bias.
pub(crate) type LinearWeights = (Vec<f32>, Vec<f32>);

/// A post-activation network in the form the fused eval path is built from.
pub(crate) type PostNet = PostAct<ConvWeights, EvalNorm, LinearWeights>;

/// A block of the fused body: the second convolution and the shortcut carry their
/// BatchNorm folded in (kernel rows scaled, shift as a bias).
#[derive(Clone, Debug)]
struct Block {
    conv1: ConvLayer,
    bn1: EvalNorm,
    conv2: ConvLayer,
    bias2: Vec<f32>,
    shortcut: Option<(ConvLayer, Vec<f32>)>,
}

/// The body of a post-activation network on the fused eval path.
#[derive(Clone, Debug)]
pub(crate) struct PostBody {
    stem: ConvLayer,
    stem_bn: EvalNorm,
    blocks: Vec<Block>,
}

/// What a chunk's backward pass reads: per block its input side, its input (the
/// previous ReLU's output) and relu(bn1(conv1)).
pub(crate) type PostState = Vec<(usize, usize, Vec<f32>, Vec<f32>)>;

impl PostBody {
    /// The body of `net` (whose normalisation layers carry no noise: the caller
    /// checks) and its linear layer.
    pub(crate) fn new(net: PostNet) -> Result<(Self, LinearWeights)> {
        if net.norms().any(|n| n.noise.is_some()) {
            candle_core::bail!("fused path: a post-activation network with noise layers")
        }
        let plain = |(w, s, p): &ConvWeights| ConvLayer::new(w, *s, *p);
        let folded = |(w, s, p): &ConvWeights, n: &EvalNorm| -> Result<(ConvLayer, Vec<f32>)> {
            Ok((
                ConvLayer::new_scaled(w, *s, *p, Some(&n.affine.scale))?,
                n.affine.shift.clone(),
            ))
        };
        let mut blocks = Vec::with_capacity(net.blocks.len());
        for b in &net.blocks {
            let (conv2, bias2) = folded(&b.conv2, &b.bn2)?;
            blocks.push(Block {
                conv1: plain(&b.conv1)?,
                bn1: b.bn1.clone(),
                conv2,
                bias2,
                shortcut: match &b.shortcut {
                    Some((c, n)) => Some(folded(c, n)?),
                    None => None,
                },
            });
        }
        Ok((
            PostBody {
                stem: plain(&net.stem)?,
                stem_bn: net.stem_bn,
                blocks,
            },
            net.fc,
        ))
    }

    /// The body over a chunk of n normalised NHWC images (H×W): its output (the last
    /// ReLU's), the output's side, and with `keep` what the backward pass needs.
    pub(crate) fn forward(
        &self,
        a: &[f32],
        mut h: usize,
        mut w: usize,
        keep: bool,
    ) -> Result<(Vec<f32>, (usize, usize), PostState)> {
        let n = a.len() / (h * w * self.stem.c_in()).max(1);
        let (ho, wo) = self.stem.out_hw(h, w)?;
        let mut cur = vec![0f32; n * ho * wo * self.stem.c_out()];
        self.stem
            .forward(a, h, w, &mut cur, false, self.stem_bn.epilogue());
        (h, w) = (ho, wo);
        let mut saved = Vec::with_capacity(if keep { self.blocks.len() } else { 0 });
        for b in &self.blocks {
            let (ho, wo) = b.conv1.out_hw(h, w)?;
            let c_out = b.conv1.c_out();
            let out_len = n * ho * wo * c_out;
            let mut mid = vec![0f32; out_len];
            b.conv1
                .forward(&cur, h, w, &mut mid, false, b.bn1.epilogue());
            // out = shortcut + bias2, then += conv2'(mid), then ReLU.
            let mut out = match &b.shortcut {
                Some((sc, bias)) => {
                    let mut o: Vec<f32> = (0..n * ho * wo)
                        .flat_map(|_| bias.iter().zip(&b.bias2).map(|(a, b)| a + b))
                        .collect();
                    sc.forward(&cur, h, w, &mut o, true, None);
                    o
                }
                None => {
                    let mut o = cur.clone();
                    for row in o.chunks_exact_mut(c_out) {
                        row.iter_mut().zip(&b.bias2).for_each(|(v, t)| *v += t);
                    }
                    o
                }
            };
            b.conv2.forward(&mid, ho, wo, &mut out, true, None);
            out.iter_mut().for_each(|v| *v = v.max(0.0));
            if keep {
                saved.push((h, w, std::mem::take(&mut cur), mid));
            }
            cur = out;
            (h, w) = (ho, wo);
        }
        Ok((cur, (h, w), saved))
    }

    /// The backward pass of [`Self::forward`]: from the gradient `d` of the body's
    /// output `fin` to that of the normalised input (images H×W).
    pub(crate) fn backward(
        &self,
        saved: &PostState,
        fin: &[f32],
        mut d: Vec<f32>,
        h: usize,
        w: usize,
    ) -> Vec<f32> {
        let relu_mask = |g: &mut [f32], y: &[f32]| {
            g.iter_mut()
                .zip(y)
                .for_each(|(g, y)| *g *= f32::from(u8::from(*y > 0.0)));
        };
        for (i, (b, (bh, bw, input, mid))) in self.blocks.iter().zip(saved).enumerate().rev() {
            // The block's output: the next block's input, or the body's output.
            let out = saved.get(i + 1).map_or(fin, |s| s.2.as_slice());
            relu_mask(&mut d, out);
            let mut dx = conv_norm_conv_backward(
                [&b.conv1, &b.conv2],
                &b.bn1,
                &d,
                (*bh, *bw),
                mid,
                input.len(),
            );
            match &b.shortcut {
                Some((sc, _)) => sc.backward_input(&d, *bh, *bw, &mut dx),
                None => dx.iter_mut().zip(&d).for_each(|(g, v)| *g += v),
            }
            d = dx;
        }
        // The stem's BN-ReLU: its output is the first block's input (or the body's
        // output, for a network without blocks).
        let stem_out = saved.first().map_or(fin, |s| s.2.as_slice());
        self.stem_bn.backward_in_place(&mut d, stem_out);
        let (ho, wo) = self.stem.out_hw(h, w).unwrap_or((0, 0));
        let images = stem_out.len() / (self.stem.c_out() * ho * wo).max(1);
        let mut dn = vec![0f32; images * h * w * self.stem.c_in()];
        self.stem.backward_input(&d, h, w, &mut dn);
        dn
    }
}
