//! SGD's update as two in-place operations per parameter instead of nine tensor
//! operations (with Nesterov momentum and weight decay): [`SgdUpdate`] with
//! [`Kernel::Momentum`] writes the momentum buffer, then with [`Kernel::Weight`] the
//! weights. Each has a CPU and (feature `cuda`) a CUDA kernel;
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

/// Which of the two in-place updates.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kernel {
    /// `b ← (b·μ + 0) + g'` in place on the momentum buffer b; sources g and w.
    Momentum,
    /// `w ← w − (d·lr + 0)` in place on the weights w; sources g and the momentum
    /// buffer b already updated.
    Weight,
}

/// A scalar argument of the per-parameter kernels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scalar {
    F32(f32),
    I32(i32),
    U32(u32),
}

// Read by the CUDA launch and the emulated kernels of the tests.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
impl Kernel {
    /// The kernel's name in `sgd.cu`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Momentum => "sgd_momentum",
            Kernel::Weight => "sgd_weight",
        }
    }

    /// The scalar arguments after the destination and the two sources, in the
    /// kernel's order, for a step with factors `f` on `n` values: μ, λ, whether λ
    /// applies, then (the weights' kernel) Nesterov and the learning rate, then `n`.
    /// The CUDA launch and the tests' emulated kernels both take them from here.
    pub(crate) fn scalars(self, f: &Factors, n: u32) -> Vec<Scalar> {
        let mut v = vec![
            Scalar::F32(f.mu),
            Scalar::F32(f.decay.unwrap_or(0.0)),
            Scalar::I32(i32::from(f.decay.is_some())),
        ];
        if let Kernel::Weight = self {
            v.extend([Scalar::I32(i32::from(f.nesterov)), Scalar::F32(f.lr)]);
        }
        v.push(Scalar::U32(n));
        v
    }
}

/// One of the two updates with the factors of a step, as an in-place candle op on its
/// destination with its two sources.
pub(crate) struct SgdUpdate(pub Kernel, pub Factors);

impl InplaceOp3 for SgdUpdate {
    fn name(&self) -> &'static str {
        match self.0 {
            Kernel::Momentum => "sgd-momentum",
            Kernel::Weight => "sgd-weight",
        }
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let f = self.1;
        let g = values(s1, l1, "gradient")?;
        match self.0 {
            Kernel::Momentum => {
                let b = values_mut(dst, dst_l, "momentum buffer")?;
                update(b, g, values(s2, l2, "weight")?, |b, g, w| {
                    f.momentum(b, g, w)
                })
            }
            Kernel::Weight => {
                let w = values_mut(dst, dst_l, "weight")?;
                update(w, g, values(s2, l2, "momentum buffer")?, |w, g, b| {
                    f.weight(w, g, b)
                })
            }
        }
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
        super::cuda::launch(self.0, self.1, dst, dst_l, [(s1, l1), (s2, l2)])
    }
}
