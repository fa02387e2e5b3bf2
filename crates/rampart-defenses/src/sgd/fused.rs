//! SGD's update as two in-place operations per parameter instead of about seven tensor
//! operations and a copy: [`MomentumUpdate`] writes the momentum buffer, then
//! [`WeightUpdate`] the weights. Each has a CPU and (feature `cuda`) a CUDA kernel;
//! both do the reference path's float operations in its order, never fused into an
//! FMA, so the result is the reference's bit for bit:
//!
//! ```text
//! g' = g + (w·λ + 0)               (decayed parameters; else g' = g)
//! b  = (b·μ + 0) + g'              (μ > 0)
//! d  = g' + (b·μ + 0)  (Nesterov),  b  (heavy ball),  g'  (μ = 0)
//! w  = w − (d·lr + 0)
//! ```
//!
//! (`x·a + 0` is candle's `affine(a, 0)`, which the reference path calls.)

use candle_core::{CpuStorage, InplaceOp3, Layout, Result};
use rayon::prelude::*;

/// Elements per parallel chunk on the CPU; smaller tensors run on one thread.
const CHUNK: usize = 1 << 15;

/// The factors of one step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Factors {
    /// Momentum μ (0: none).
    pub mu: f32,
    /// Weight decay λ, or `None` for a parameter that is not decayed.
    pub decay: Option<f32>,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// The learning rate.
    pub lr: f32,
}

impl Factors {
    #[inline(always)]
    fn decayed(&self, g: f32, w: f32) -> f32 {
        match self.decay {
            Some(wd) => g + (w * wd + 0.0),
            None => g,
        }
    }

    #[inline(always)]
    fn momentum(&self, b: f32, g: f32, w: f32) -> f32 {
        (b * self.mu + 0.0) + self.decayed(g, w)
    }

    #[inline(always)]
    fn weight(&self, w: f32, g: f32, b: f32) -> f32 {
        let g = self.decayed(g, w);
        let d = if self.mu == 0.0 {
            g
        } else if self.nesterov {
            g + (b * self.mu + 0.0)
        } else {
            b
        };
        w - (d * self.lr + 0.0)
    }
}

/// The contiguous f32 values of a storage under its layout.
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fused SGD: the {what} is not f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused SGD: the {what} is not contiguous"),
    }
}

fn values_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fused SGD: the {what} is not f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("fused SGD: the {what} is not contiguous"),
    }
}

/// `out[i] = f(out[i], a[i], b[i])`, in parallel chunks for large tensors.
fn update(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> Result<()> {
    if a.len() != out.len() || b.len() != out.len() {
        candle_core::bail!(
            "fused SGD: {} values updated from {} and {}",
            out.len(),
            a.len(),
            b.len()
        )
    }
    let run = |(o, (x, y)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
            *o = f(*o, x, y);
        }
    };
    if out.len() > CHUNK {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(run);
    } else {
        run((out, (a, b)));
    }
    Ok(())
}

/// In place on the momentum buffer b, from the gradient g and the weights w:
/// `b ← (b·μ + 0) + g'`.
pub(crate) struct MomentumUpdate(pub Factors);

/// In place on the weights w, from the gradient g and the momentum buffer b already
/// updated: `w ← w − (d·lr + 0)`.
pub(crate) struct WeightUpdate(pub Factors);

impl InplaceOp3 for MomentumUpdate {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<()> {
        let f = self.0;
        let b = values_mut(dst, dst_l, "momentum buffer")?;
        let (g, w) = (values(g, gl, "gradient")?, values(w, wl, "weight")?);
        update(b, g, w, |b, g, w| f.momentum(b, g, w))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        super::cuda::launch(
            super::cuda::Kernel::Momentum,
            self.0,
            dst,
            dst_l,
            [(s1, l1), (s2, l2)],
        )
    }
}

impl InplaceOp3 for WeightUpdate {
    fn name(&self) -> &'static str {
        "sgd-weight"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        let f = self.0;
        let w = values_mut(dst, dst_l, "weight")?;
        let (g, b) = (
            values(g, gl, "gradient")?,
            values(b, bl, "momentum buffer")?,
        );
        update(w, g, b, |w, g, b| f.weight(w, g, b))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        super::cuda::launch(
            super::cuda::Kernel::Weight,
            self.0,
            dst,
            dst_l,
            [(s1, l1), (s2, l2)],
        )
    }
}
