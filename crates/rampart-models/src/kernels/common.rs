//! Small pieces the kernels share: checked access to a custom op's f32 operand,
//! per-thread scratch buffers, the eval-mode BatchNorm+ReLU as a per-channel affine
//! map (with the additive noise of a stochastic student, drawn by `noise.rs`), and
//! the hand-over of saved state from a forward pass to its backward pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use std::sync::Mutex;

use super::noise::fill_image;

/// The contiguous f32 data of a custom op's operand; other dtypes and strided layouts
/// are refused with an error naming `op`.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        other => candle_core::bail!("{op}: only f32 is supported, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

thread_local! {
    /// Each thread's patch-matrix buffer, kept between calls: a fresh multi-MiB
    /// allocation per call costs page faults and zeroing.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch buffer of `len` floats (contents unspecified: callers
/// overwrite every element they read).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| *s.borrow_mut() = buf);
    out
}

/// An eval-mode BatchNorm as a per-channel affine map, followed by ReLU.
#[derive(Clone, Debug)]
pub(crate) struct Affine {
    pub(crate) scale: Vec<f32>,
    pub(crate) shift: Vec<f32>,
}

impl Affine {
    /// From γ, β and the running statistics: scale = γ/√(var + eps), shift = β − mean·scale.
    pub(crate) fn from_batch_norm(
        gamma: &[f32],
        beta: &[f32],
        mean: &[f32],
        var: &[f32],
        eps: f32,
    ) -> Self {
        let scale: Vec<f32> = gamma
            .iter()
            .zip(var)
            .map(|(g, v)| g / (v + eps).sqrt())
            .collect();
        let shift = beta
            .iter()
            .zip(mean.iter().zip(&scale))
            .map(|(b, (m, s))| b - m * s)
            .collect();
        Affine { scale, shift }
    }

    /// From a per-channel scale and shift.
    pub(crate) fn from_scale_shift(scale: Vec<f32>, shift: Vec<f32>) -> Self {
        Affine { scale, shift }
    }

    pub(crate) fn channels(&self) -> usize {
        self.scale.len()
    }

    pub(crate) fn relu_in_place(&self, x: &mut [f32]) {
        for row in x.chunks_exact_mut(self.channels()) {
            for ((v, s), t) in row.iter_mut().zip(&self.scale).zip(&self.shift) {
                *v = (*v * s + t).max(0.0);
            }
        }
    }

    pub(crate) fn relu_into(&self, x: &[f32], out: &mut [f32]) {
        let c = self.channels();
        for (o, xr) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for (((o, v), s), t) in o.iter_mut().zip(xr).zip(&self.scale).zip(&self.shift) {
                *o = (v * s + t).max(0.0);
            }
        }
    }

    /// `out = x·scale + shift`, no ReLU.
    pub(crate) fn apply_into(&self, x: &[f32], out: &mut [f32]) {
        let c = self.channels();
        for (o, xr) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for (((o, v), s), t) in o.iter_mut().zip(xr).zip(&self.scale).zip(&self.shift) {
                *o = v * s + t;
            }
        }
    }

    /// The backward pass of `relu(x·scale + shift)` given its output `y`: g ← g·scale
    /// where y > 0, else 0.
    pub(crate) fn backward_in_place(&self, g: &mut [f32], y: &[f32]) {
        let c = self.channels();
        for (gr, yr) in g.chunks_exact_mut(c).zip(y.chunks_exact(c)) {
            for ((g, y), s) in gr.iter_mut().zip(yr).zip(&self.scale) {
                // Mask by multiplication (not a branch), so the loop vectorises.
                *g *= s * f32::from(u8::from(*y > 0.0));
            }
        }
    }
}

/// A student's noise at one layer in eval mode: the layer's seed, the index in the
/// global batch of the batch's first image, and the standard deviation per channel
/// (noise scale · α · running σ).
#[derive(Clone, Debug)]
pub(crate) struct NoiseDraw {
    pub(crate) seed: u64,
    pub(crate) first: usize,
    pub(crate) std: Vec<f32>,
}

/// An eval-mode normalisation layer of the fused path: the per-channel affine map
/// (BatchNorm, with an OAT model's FiLM of the batch's λ folded in), optionally the
/// additive Gaussian noise of a stochastic student, then ReLU.
#[derive(Clone, Debug)]
pub(crate) struct EvalNorm {
    pub(crate) affine: Affine,
    pub(crate) noise: Option<NoiseDraw>,
}

impl EvalNorm {
    pub(crate) fn channels(&self) -> usize {
        self.affine.channels()
    }

    /// The affine map, when nothing else happens before the ReLU (so a convolution
    /// can apply it to its output blocks while they are in cache).
    pub(crate) fn epilogue(&self) -> Option<&Affine> {
        self.noise.is_none().then_some(&self.affine)
    }

    /// `out = relu(x·scale + shift [+ std·z])` over n images of `pixels` pixels, the
    /// first of them image `first` of the batch.
    pub(crate) fn relu_into(&self, x: &[f32], out: &mut [f32], first: usize, pixels: usize) {
        out.copy_from_slice(x);
        self.relu_in_place(out, first, pixels);
    }

    /// [`Self::relu_into`] in place.
    pub(crate) fn relu_in_place(&self, x: &mut [f32], first: usize, pixels: usize) {
        let Some(noise) = &self.noise else {
            self.affine.relu_in_place(x);
            return;
        };
        let c = self.channels();
        let mut z = vec![0f32; pixels * c];
        for (i, image) in x.chunks_exact_mut(pixels * c).enumerate() {
            fill_image(noise.seed, noise.first + first + i, &mut z);
            for (row, zr) in image.chunks_exact_mut(c).zip(z.chunks_exact(c)) {
                for ((((v, s), t), sd), zv) in row
                    .iter_mut()
                    .zip(&self.affine.scale)
                    .zip(&self.affine.shift)
                    .zip(&noise.std)
                    .zip(zr)
                {
                    *v = (*v * s + t + sd * zv).max(0.0);
                }
            }
        }
    }

    /// The backward pass given the layer's output `y` (the noise is additive, so it
    /// changes only which units the ReLU lets through).
    pub(crate) fn backward_in_place(&self, g: &mut [f32], y: &[f32]) {
        self.affine.backward_in_place(g, y);
    }
}

/// Takes what a fused forward pass kept for its backward pass; `gone` explains why it
/// may be missing (a backward pass runs once).
pub(crate) fn take_saved<T>(slot: &Mutex<Option<T>>, gone: &str) -> Result<T> {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| candle_core::Error::Msg(gone.to_string()))
}
