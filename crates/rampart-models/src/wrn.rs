//! Pre-activation networks: wide residual networks WRN-d-k (Zagoruyko & Komodakis
//! 2016) and the network type they share with PreActResNet-18 ([`PreActNet`]).
//!
//! The topology is [`crate::kernels::preact::PreAct`], written once; this file
//! instantiates it with this crate's layers, gives it its layer-by-layer forward
//! pass (the reference the fused paths are tested against) and says how the
//! fused paths read its layers.

use crate::kernels::fused::EvalNet;
use crate::kernels::fused_train::TrainNetwork;
use crate::kernels::preact::{self, PreAct};
use crate::layers::{conv, global_avg_pool, linear, Conv, Linear};
use crate::variant::{Norm, NormOptions};
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

/// A pre-activation basic block of this crate's layers: BN-ReLU-conv3x3-BN-ReLU-conv3x3
/// plus shortcut. When the shape changes the shortcut is a 1×1 convolution of the
/// pre-activated input.
pub type PreActBlock = preact::PreActBlock<Conv, Norm>;

/// A pre-activation network of this crate's layers: stem, blocks, BN-ReLU, global
/// average pooling, linear. WRN-d-k and PreActResNet-18 are both one.
pub type PreActNet = PreAct<Conv, Norm, Linear>;

/// WRN-d-k.
pub type WideResNet = PreActNet;

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

/// A pre-activation network with a 3×3 stem of `stem` channels and stages of
/// `per_stage` blocks of the given widths (stride 1 for the first stage, 2 for the
/// others).
pub(crate) fn preact_net(
    in_channels: usize,
    num_classes: usize,
    stem: usize,
    widths: &[usize],
    per_stage: usize,
    vb: VarBuilder,
    opts: &NormOptions,
) -> Result<PreActNet> {
    let stem_conv = conv(in_channels, stem, 3, 1, vb.pp("stem"))?;
    let mut blocks = Vec::with_capacity(widths.len() * per_stage);
    let mut c_in = stem;
    for (s, &c_out) in widths.iter().enumerate() {
        for b in 0..per_stage {
            let stride = if b == 0 && s > 0 { 2 } else { 1 };
            let vb_b = vb.pp(format!("stage{}", s + 1)).pp(format!("block{b}"));
            blocks.push(preact_block(c_in, c_out, stride, vb_b, opts)?);
            c_in = c_out;
        }
    }
    Ok(PreAct {
        stem: stem_conv,
        blocks,
        head: opts.norm(c_in, vb.pp("bn"))?,
        fc: linear(c_in, num_classes, vb.pp("fc"))?,
    })
}

/// Builds WRN-`depth`-`widen` for `num_classes` classes and `in_channels` input
/// channels: a 3×3 stem with 16 channels, three stages of (depth−4)/6 blocks with
/// widths 16k, 32k, 64k (strides 1, 2, 2), BN-ReLU, global average pooling, linear.
/// `depth` must satisfy (depth − 4) % 6 == 0 (checked by the caller's spec).
pub fn wide_resnet(
    depth: usize,
    widen: usize,
    in_channels: usize,
    num_classes: usize,
    vb: VarBuilder,
    opts: &NormOptions,
) -> Result<WideResNet> {
    let widths = [16 * widen, 32 * widen, 64 * widen];
    preact_net(
        in_channels,
        num_classes,
        16,
        &widths,
        (depth - 4) / 6,
        vb,
        opts,
    )
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

impl ModuleT for PreActNet {
    /// xs: (B, H, W, C), already normalised → logits (B, K).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.stem.forward(xs)?;
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        let h = self.head.forward_relu(&h, train)?;
        self.fc.forward(&global_avg_pool(&h)?)
    }
}

impl crate::Network for PreActNet {
    fn eval_program(&self) -> Result<Option<EvalNet>> {
        Ok(self
            .try_map(
                |c| Ok(Some(c.fused()?)),
                Norm::fused,
                |fc| Ok(Some(fc.fused()?)),
            )?
            .map(EvalNet::Pre))
    }

    fn device_net(&self) -> Result<Option<crate::kernels::device_eval::DeviceArch>> {
        let net = self.try_map(
            |c| Ok(Some(c.device())),
            Norm::device,
            |fc| Ok(Some(fc.device())),
        )?;
        Ok(net.map(crate::kernels::device_eval::DeviceArch::Pre))
    }

    fn device_train_net(
        &self,
    ) -> Result<Option<(crate::kernels::device_eval::DeviceArch, Vec<&Norm>)>> {
        let net = self.try_map(
            |c| Ok(Some(c.device())),
            Norm::device_train,
            |fc| Ok(Some(fc.device())),
        )?;
        Ok(net.map(|net| {
            (
                crate::kernels::device_eval::DeviceArch::Pre(net),
                self.norms().collect(),
            )
        }))
    }

    fn train_net(&self) -> Result<Option<(TrainNetwork<'_>, Vec<&Norm>)>> {
        let net = self.try_map(
            |c| Ok(Some(c.parts())),
            Norm::train_params,
            |fc| Ok(Some(fc.parts())),
        )?;
        Ok(net.map(|net| (TrainNetwork::Pre(net), self.norms().collect())))
    }
}
