//! Wide residual networks WRN-d-k (Zagoruyko & Komodakis 2016), pre-activation form.

use crate::layers::{conv, global_avg_pool, linear, Conv, Linear};
use crate::variant::{Norm, NormOptions};
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

/// A pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.
/// When the shape changes the shortcut is a 1×1 convolution of the pre-activated input.
#[derive(Clone, Debug)]
pub struct PreActBlock {
    bn1: Norm,
    conv1: Conv,
    bn2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

/// A pre-activation block from `c_in` to `c_out` channels with the given stride.
pub fn preact_block(
    c_in: usize,
    c_out: usize,
    stride: usize,
    vb: VarBuilder,
    opts: &NormOptions,
) -> Result<PreActBlock> {
    let shortcut = if c_in != c_out || stride != 1 {
        Some(conv(c_in, c_out, 1, stride, vb.pp("shortcut"))?)
    } else {
        None
    };
    Ok(PreActBlock {
        bn1: opts.norm(c_in, vb.pp("bn1"))?,
        conv1: conv(c_in, c_out, 3, stride, vb.pp("conv1"))?,
        bn2: opts.norm(c_out, vb.pp("bn2"))?,
        conv2: conv(c_out, c_out, 3, 1, vb.pp("conv2"))?,
        shortcut,
    })
}

impl PreActBlock {
    /// This block for the fused eval path (None if a layer is a variant).
    pub(crate) fn fused(&self) -> Result<Option<crate::fused::Block>> {
        let (Some(bn1), Some(bn2)) = (self.bn1.fused()?, self.bn2.fused()?) else {
            return Ok(None);
        };
        Ok(Some(crate::fused::Block {
            bn1,
            conv1: self.conv1.fused()?,
            bn2,
            conv2: self.conv2.fused()?,
            shortcut: self.shortcut.as_ref().map(Conv::fused).transpose()?,
        }))
    }
}

/// The fused eval program of a pre-activation network (stem, blocks, BN-ReLU, pooling,
/// linear); its input normalisation is filled in by the classifier.
pub(crate) fn preact_program(
    stem: &Conv,
    blocks: &[PreActBlock],
    bn: &Norm,
    fc: &Linear,
) -> Result<Option<crate::fused::Program>> {
    let Some(head) = bn.fused()? else {
        return Ok(None);
    };
    let mut fused = Vec::with_capacity(blocks.len());
    for b in blocks {
        match b.fused()? {
            Some(f) => fused.push(f),
            None => return Ok(None),
        }
    }
    let (fc_w, fc_b) = fc.fused()?;
    Ok(Some(crate::fused::Program {
        mean: Vec::new(),
        inv_std: Vec::new(),
        input: [0; 3],
        stem: stem.fused()?,
        blocks: fused,
        head,
        fc_w,
        fc_b,
    }))
}

/// The parameters of a pre-activation network for the fused train path (None if a
/// layer is a variant).
pub(crate) fn preact_train_net<'a>(
    stem: &'a Conv,
    blocks: &'a [PreActBlock],
    bn: &'a Norm,
    fc: &'a Linear,
) -> Option<crate::fused_train::TrainNet<'a>> {
    let mut parts = Vec::with_capacity(blocks.len());
    for b in blocks {
        parts.push((
            b.bn1.plain_bn()?,
            &b.conv1,
            b.bn2.plain_bn()?,
            &b.conv2,
            b.shortcut.as_ref(),
        ));
    }
    Some(crate::fused_train::TrainNet {
        stem,
        blocks: parts,
        head: bn.plain_bn()?,
        fc,
    })
}

impl ModuleT for PreActBlock {
    /// xs: (B, H, W, C_in) → (B, H/stride, W/stride, C_out).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let pre = self.bn1.forward_relu(xs, train)?;
        let skip = match &self.shortcut {
            Some(sc) => sc.forward(&pre)?,
            None => xs.clone(),
        };
        let h = self.conv1.forward(&pre)?;
        let h = self.bn2.forward_relu(&h, train)?;
        self.conv2.forward(&h)? + skip
    }
}

/// WRN-`depth`-`widen`: a 3×3 stem with 16 channels, three stages of (depth−4)/6 blocks
/// with widths 16k, 32k, 64k (strides 1, 2, 2), BN-ReLU, global average pooling, linear.
#[derive(Clone, Debug)]
pub struct WideResNet {
    stem: Conv,
    blocks: Vec<PreActBlock>,
    bn: Norm,
    fc: Linear,
}

/// Builds WRN-`depth`-`widen` for `num_classes` classes and `in_channels` input channels.
/// `depth` must satisfy (depth − 4) % 6 == 0 (checked by the caller's spec).
pub fn wide_resnet(
    depth: usize,
    widen: usize,
    in_channels: usize,
    num_classes: usize,
    vb: VarBuilder,
    opts: &NormOptions,
) -> Result<WideResNet> {
    let n = (depth - 4) / 6;
    let widths = [16 * widen, 32 * widen, 64 * widen];
    let stem = conv(in_channels, 16, 3, 1, vb.pp("stem"))?;
    let mut blocks = Vec::with_capacity(3 * n);
    let mut c_in = 16;
    for (s, &c_out) in widths.iter().enumerate() {
        for b in 0..n {
            let stride = if b == 0 && s > 0 { 2 } else { 1 };
            let vb_b = vb.pp(format!("stage{}", s + 1)).pp(format!("block{b}"));
            blocks.push(preact_block(c_in, c_out, stride, vb_b, opts)?);
            c_in = c_out;
        }
    }
    Ok(WideResNet {
        stem,
        blocks,
        bn: opts.norm(c_in, vb.pp("bn"))?,
        fc: linear(c_in, num_classes, vb.pp("fc"))?,
    })
}

impl crate::Network for WideResNet {
    fn eval_program(&self) -> Result<Option<crate::fused::Program>> {
        preact_program(&self.stem, &self.blocks, &self.bn, &self.fc)
    }

    fn train_net(&self) -> Option<crate::fused_train::TrainNet<'_>> {
        preact_train_net(&self.stem, &self.blocks, &self.bn, &self.fc)
    }
}

impl ModuleT for WideResNet {
    /// xs: (B, H, W, C), already normalised → logits (B, K).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.stem.forward(xs)?;
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        let h = self.bn.forward_relu(&h, train)?;
        self.fc.forward(&global_avg_pool(&h)?)
    }
}
