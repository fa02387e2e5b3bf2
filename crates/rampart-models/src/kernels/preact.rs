//! The shape of a pre-activation network, written once.
//!
//! [`PreAct`] is generic over what stands for a convolution (`C`), a BatchNorm (`N`)
//! and the final linear layer (`L`). The architectures hold one with their layers
//! (`rampart_models::wrn::PreActNet`, whose layer-by-layer forward pass is the
//! reference); the fused eval path maps it to kernels in GEMM layout and folded
//! BatchNorms ([`super::fused::Program::new`]); the fused train path maps it to the
//! places of its parameters in one flat vector ([`super::fused_train::layout`]). A
//! change of topology is therefore made here and in the two executors, never per
//! architecture.

use candle_core::{Result, Tensor};

/// A pre-activation basic block: BN-ReLU-conv-BN-ReLU-conv, plus the shortcut: a
/// (1×1) convolution of the pre-activated input when the shape changes, else the
/// block's input itself.
#[derive(Clone, Debug)]
pub struct PreActBlock<C, N> {
    /// BatchNorm (+ ReLU) before the first convolution.
    pub bn1: N,
    /// First convolution (carries the block's stride).
    pub conv1: C,
    /// BatchNorm (+ ReLU) between the convolutions.
    pub bn2: N,
    /// Second convolution.
    pub conv2: C,
    /// Projection shortcut, when the shape changes.
    pub shortcut: Option<C>,
}

/// A pre-activation network: stem convolution, blocks, BN-ReLU head, global average
/// pooling, linear layer.
#[derive(Clone, Debug)]
pub struct PreAct<C, N, L> {
    /// Stem convolution of the (normalised) input.
    pub stem: C,
    /// The blocks, in order.
    pub blocks: Vec<PreActBlock<C, N>>,
    /// BatchNorm (+ ReLU) before pooling.
    pub head: N,
    /// Linear layer on the pooled features.
    pub fc: L,
}

impl<C, N, L> PreAct<C, N, L> {
    /// The same network with every layer mapped; `None` as soon as one layer has no
    /// image (a variant BatchNorm, say, for the fused paths, which run only plain
    /// ones).
    pub fn try_map<'s, C2, N2, L2>(
        &'s self,
        conv: impl Fn(&'s C) -> Result<Option<C2>>,
        norm: impl Fn(&'s N) -> Result<Option<N2>>,
        fc: impl FnOnce(&'s L) -> Result<Option<L2>>,
    ) -> Result<Option<PreAct<C2, N2, L2>>> {
        let Some(stem) = conv(&self.stem)? else {
            return Ok(None);
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let shortcut = match &b.shortcut {
                Some(s) => match conv(s)? {
                    Some(s) => Some(s),
                    None => return Ok(None),
                },
                None => None,
            };
            let (Some(bn1), Some(conv1), Some(bn2), Some(conv2)) = (
                norm(&b.bn1)?,
                conv(&b.conv1)?,
                norm(&b.bn2)?,
                conv(&b.conv2)?,
            ) else {
                return Ok(None);
            };
            blocks.push(PreActBlock {
                bn1,
                conv1,
                bn2,
                conv2,
                shortcut,
            });
        }
        let (Some(head), Some(fc)) = (norm(&self.head)?, fc(&self.fc)?) else {
            return Ok(None);
        };
        Ok(Some(PreAct {
            stem,
            blocks,
            head,
            fc,
        }))
    }

    /// Every BatchNorm in execution order (bn1, bn2 of each block, then the head).
    pub fn norms(&self) -> impl Iterator<Item = &N> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.bn1, &b.bn2])
            .chain(std::iter::once(&self.head))
    }
}

/// A convolution's parameters as the fused train path reads them: OIHW kernel,
/// stride, padding.
pub type ConvParams<'a> = (&'a Tensor, usize, usize);

/// A normalisation layer's parameters as the fused train path reads them: γ, β, eps;
/// a stochastic student's noise factor α (a one-element tensor) where the layer injects
/// noise after the BatchNorm; an OAT layer's second BatchNorm (γ, β) and the FiLM
/// outputs of the batch, (B, 2C) = [γ_e | β_e] per example.
#[derive(Clone, Debug)]
pub struct NormParams<'a> {
    /// Scale γ (C,).
    pub gamma: &'a Tensor,
    /// Shift β (C,).
    pub beta: &'a Tensor,
    /// The variance's ε.
    pub eps: f32,
    /// Noise factor α (1,), for a noisy layer.
    pub alpha: Option<&'a Tensor>,
    /// The second BatchNorm's γ and β, for an OAT layer.
    pub adv: Option<(&'a Tensor, &'a Tensor)>,
    /// The FiLM outputs of the batch's examples, for an OAT layer.
    pub film: Option<Tensor>,
}

/// A linear layer's parameters: weight (K, C) and bias (K,).
pub type LinearParams<'a> = (&'a Tensor, &'a Tensor);
