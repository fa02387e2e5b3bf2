//! ResNet-20 as used by CCAT (post-activation, 64/128/256 channels) and PreActResNet-18.

use crate::kernels::fused::EvalNet;
use crate::kernels::fused_train::TrainNetwork;
use crate::kernels::postact::{PostAct, PostActBlock};
use crate::layers::{conv, global_avg_pool, linear, Conv, Linear};
use crate::variant::{Norm, NormOptions};
use crate::wrn::{preact_net, PreActNet};
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

/// The original (post-activation) basic block: conv-BN-ReLU-conv-BN, plus shortcut, ReLU.
/// The shortcut is a 1×1 convolution with BatchNorm when the shape changes.
pub type BasicBlock = PostActBlock<Conv, Norm>;

fn basic_block(
    c_in: usize,
    c_out: usize,
    stride: usize,
    vb: VarBuilder,
    opts: &NormOptions,
) -> Result<BasicBlock> {
    let shortcut = if c_in != c_out || stride != 1 {
        Some((
            conv(c_in, c_out, 1, stride, vb.pp("shortcut"))?,
            opts.norm(c_out, vb.pp("shortcut_bn"))?,
        ))
    } else {
        None
    };
    Ok(BasicBlock {
        conv1: conv(c_in, c_out, 3, stride, vb.pp("conv1"))?,
        bn1: opts.norm(c_out, vb.pp("bn1"))?,
        conv2: conv(c_out, c_out, 3, 1, vb.pp("conv2"))?,
        bn2: opts.norm(c_out, vb.pp("bn2"))?,
        shortcut,
    })
}

impl ModuleT for BasicBlock {
    /// xs: (B, H, W, C_in) → (B, H/stride, W/stride, C_out).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_relu(&self.conv1.forward(xs)?, train)?;
        let h = self.bn2.forward_t(&self.conv2.forward(&h)?, train)?;
        let skip = match &self.shortcut {
            Some((c, bn)) => bn.forward_t(&c.forward(xs)?, train)?,
            None => xs.clone(),
        };
        (h + skip)?.relu()
    }
}

/// ResNet-20 in the CCAT configuration: stem conv3x3 (64) + BN-ReLU, three stages of
/// three basic blocks with 64, 128, 256 channels (strides 1, 2, 2), average pool, linear.
/// Its shape is [`PostAct`]'s, which the fused eval path also runs.
pub type ResNet20 = PostAct<Conv, Norm, Linear>;

/// Builds ResNet-20 (CCAT widths) for `num_classes` classes.
pub fn resnet20(
    in_channels: usize,
    num_classes: usize,
    vb: VarBuilder,
    opts: &NormOptions,
) -> Result<ResNet20> {
    let widths = [64, 128, 256];
    let mut blocks = Vec::with_capacity(9);
    let mut c_in = 64;
    for (s, &c_out) in widths.iter().enumerate() {
        for b in 0..3 {
            let stride = if b == 0 && s > 0 { 2 } else { 1 };
            let vb_b = vb.pp(format!("stage{}", s + 1)).pp(format!("block{b}"));
            blocks.push(basic_block(c_in, c_out, stride, vb_b, opts)?);
            c_in = c_out;
        }
    }
    Ok(ResNet20 {
        stem: conv(in_channels, 64, 3, 1, vb.pp("stem"))?,
        stem_bn: opts.norm(64, vb.pp("stem_bn"))?,
        blocks,
        fc: linear(c_in, num_classes, vb.pp("fc"))?,
    })
}

impl crate::Network for ResNet20 {
    fn eval_program(&self) -> Result<Option<EvalNet>> {
        // A student's noise sits before the sum of a block: not on this path (checked
        // before any layer draws its noise seed).
        if self.norms().any(Norm::has_noise) {
            return Ok(None);
        }
        let net = self.try_map(
            |c| {
                let (w, s, p) = c.parts();
                Ok(Some((w.clone(), s, p)))
            },
            Norm::fused,
            |fc| Ok(Some(fc.fused()?)),
        )?;
        Ok(net.map(EvalNet::Post))
    }

    fn device_net(&self) -> Result<Option<crate::kernels::device_eval::DeviceArch>> {
        // As on the CPU, a student's noise (before a block's sum) is not on this path
        // (checked before any layer draws its noise seed).
        if self.norms().any(Norm::has_noise) {
            return Ok(None);
        }
        let net = self.try_map(
            |c| Ok(Some(c.device())),
            Norm::device,
            |fc| Ok(Some(fc.device())),
        )?;
        Ok(net.map(crate::kernels::device_eval::DeviceArch::Post))
    }

    #[allow(clippy::type_complexity)]
    fn device_train_net(
        &self,
    ) -> Result<Option<(crate::kernels::device_eval::DeviceArch, Vec<&Norm>)>> {
        // Plain layers only, as on the CPU: a variant's extras would sit before a
        // block's sum.
        if !self.norms().all(Norm::is_plain) {
            return Ok(None);
        }
        let net = self.try_map(
            |c| Ok(Some(c.device())),
            Norm::device_train,
            |fc| Ok(Some(fc.device())),
        )?;
        Ok(net.map(|net| {
            (
                crate::kernels::device_eval::DeviceArch::Post(net),
                self.norms().collect(),
            )
        }))
    }

    fn train_net(&self) -> Result<Option<(TrainNetwork<'_>, Vec<&Norm>)>> {
        // Plain layers only: a variant's extras would sit before a block's sum.
        if !self.norms().all(Norm::is_plain) {
            return Ok(None);
        }
        let net = self.try_map(
            |c| Ok(Some(c.parts())),
            Norm::train_params,
            |fc| Ok(Some(fc.parts())),
        )?;
        Ok(net.map(|net| (TrainNetwork::Post(net), self.norms().collect())))
    }
}

impl ModuleT for ResNet20 {
    /// xs: (B, H, W, C), already normalised → logits (B, K).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.stem_bn.forward_relu(&self.stem.forward(xs)?, train)?;
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        self.fc.forward(&global_avg_pool(&h)?)
    }
}

/// PreActResNet-18 (He et al. 2016; the fast-AT model): stem conv3x3 (64), four stages
/// of two pre-activation blocks with 64, 128, 256, 512 channels (strides 1, 2, 2, 2),
/// BN-ReLU, average pool, linear.
pub type PreActResNet18 = PreActNet;

/// Builds PreActResNet-18 for `num_classes` classes.
pub fn preact_resnet18(
    in_channels: usize,
    num_classes: usize,
    vb: VarBuilder,
    opts: &NormOptions,
) -> Result<PreActResNet18> {
    preact_net(
        in_channels,
        num_classes,
        64,
        &[64, 128, 256, 512],
        2,
        vb,
        opts,
    )
}
