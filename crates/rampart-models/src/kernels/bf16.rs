//! bf16 for the convolutions of `--device cuda+bf16` ([`crate::Precision::Bf16`]):
//! the f32 operands of a cuDNN convolution are rounded to bf16 (round to nearest, ties
//! to even) and its bf16 output widened back to f32, each by one kernel of `ops.cu`
//! (`f32_to_bf16`, `bf16_to_f32`). Everything else (BatchNorm and its statistics,
//! the loss, the weights and their updates, an attack's perturbation and input
//! gradient) stays in f32, as under PyTorch's `autocast(dtype=torch.bfloat16)`.
//!
//! [`to_bf16_bits`] and [`from_bf16_bits`] are the kernels' CPU twins (tested against
//! the `half` crate's conversion), and [`RoundBf16`] an op that rounds f32 values
//! through bf16, on the CPU by the twins and on a GPU by the two kernels, so that the
//! GPU tests hold the kernels to the twins bit for bit.

use super::common::f32_slice;
use super::launch::{count, KArg, KLaunch};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use KArg::{B, I32, U32};

/// The bf16 bits nearest to `x` (ties to even); a NaN stays a quiet NaN.
pub fn to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x0040) as u16;
    }
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1));
    (rounded >> 16) as u16
}

/// The f32 of bf16 bits (exact).
pub fn from_bf16_bits(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// f32 → f32: each value rounded to bf16 and widened again.
#[derive(Clone, Copy, Debug)]
pub struct RoundBf16;

impl CustomOp1 for RoundBf16 {
    fn name(&self) -> &'static str {
        "round-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let out = x.iter().map(|&v| from_bf16_bits(to_bf16_bits(v))).collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let x = super::cuda::f32_view(s, l, n, "round-bf16")?;
        let narrow = cuda::to_bf16(&s.device, &x)?;
        let out = cuda::to_f32(&s.device, &narrow)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, s.device.clone()),
            l.shape().clone(),
        ))
    }
}

/// The launch of `f32_to_bf16`: `out` (bf16) ← `x` (f32) rounded, `n` values. The
/// CUDA functions below and the tests' emulated kernels are launched through these
/// definitions.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn to_bf16_launch<A>(out: A, x: A, n: usize) -> Result<KLaunch<A>> {
    let args = vec![B(out), B(x), U32(count(n, "f32-to-bf16")?)];
    KLaunch::ops("f32_to_bf16", n, args)
}

/// The launch of `bf16_to_f32`: `out` (f32) ← `x` (bf16) widened, `n` values.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn to_f32_launch<A>(out: A, x: A, n: usize) -> Result<KLaunch<A>> {
    let args = vec![B(out), B(x), U32(count(n, "bf16-to-f32")?)];
    KLaunch::ops("bf16_to_f32", n, args)
}

/// The launch of `bf16_widen_into`: `out` (f32) ← widen(`x`), or += with
/// `accumulate`, `n` values.
#[cfg_attr(not(any(test, feature = "cudnn")), allow(dead_code))]
pub(crate) fn widen_into_launch<A>(out: A, x: A, accumulate: bool, n: usize) -> Result<KLaunch<A>> {
    let args = vec![
        B(out),
        B(x),
        I32(i32::from(accumulate)),
        U32(count(n, "bf16-widen-into")?),
    ];
    KLaunch::ops("bf16_widen_into", n, args)
}

/// The conversion kernels on a device.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub(crate) mod cuda {
    use super::super::cuda::uninit;
    use super::super::launch::cuda::{run, CudaArg};
    use super::{to_bf16_launch, to_f32_launch};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::Result;

    /// `x` rounded to bf16 (one kernel) into a fresh buffer.
    pub(crate) fn to_bf16(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
    ) -> Result<CudaSlice<half::bf16>> {
        let n = x.len();
        // SAFETY: the kernel writes all n values before anything reads them.
        let mut out = unsafe { dev.alloc::<half::bf16>(n.max(1))? };
        if n > 0 {
            let launch = to_bf16_launch(
                CudaArg::MutBf16(out.slice_mut(..)),
                CudaArg::View(x.slice(..)),
                n,
            )?;
            run(dev, launch)?;
        }
        Ok(out)
    }

    /// out = widen(x) (or out += widen(x) when `accumulate`, an f32 addition), the
    /// first `out.len()` values of `x` (at least as many): one kernel
    /// (`bf16_widen_into`; `tests/cuda_bf16.rs` holds the fused programs that use it
    /// to the layer-by-layer path, which widens with `bf16_to_f32` and adds with
    /// candle).
    #[cfg(feature = "cudnn")]
    pub(crate) fn widen_into(
        dev: &CudaDevice,
        x: &CudaSlice<half::bf16>,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let n = out.len();
        if x.len() < n {
            candle_core::bail!("bf16 widening: {} values into {n}", x.len())
        }
        if n > 0 {
            let launch = super::widen_into_launch(
                CudaArg::Mut(out.slice_mut(..)),
                CudaArg::ViewBf16(x.slice(..n)),
                accumulate,
                n,
            )?;
            run(dev, launch)?;
        }
        Ok(())
    }

    /// bf16 values widened to f32 (one kernel) into a fresh buffer.
    pub(crate) fn to_f32(dev: &CudaDevice, x: &CudaSlice<half::bf16>) -> Result<CudaSlice<f32>> {
        let n = x.len();
        let mut out = uninit(dev, n.max(1))?;
        if n > 0 {
            let launch = to_f32_launch(
                CudaArg::Mut(out.slice_mut(..)),
                CudaArg::ViewBf16(x.slice(..)),
                n,
            )?;
            run(dev, launch)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The twins round as the `half` crate does (nearest, ties to even), keep
    /// infinities, zeros' signs and NaN, and widen exactly.
    #[test]
    fn rounding_to_bf16_is_ieee_round_to_nearest_even() {
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            -3.5e-39,
            // Ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 (rounds to even: 1);
            // 1 + 3·2^-8 halfway between 1 + 2^-7 and 1 + 2^-6 (rounds up).
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
        ];
        let mut state = 0x9e37_79b9u32;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            values.push(f32::from_bits(state));
        }
        for v in values {
            let got = to_bf16_bits(v);
            let want = half::bf16::from_f32(v);
            if v.is_nan() {
                assert!(half::bf16::from_bits(got).is_nan(), "{v}");
                continue;
            }
            assert_eq!(got, want.to_bits(), "{v:e} ({:#010x})", v.to_bits());
            assert_eq!(from_bf16_bits(got), want.to_f32());
        }
        assert_eq!(from_bf16_bits(to_bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(
            from_bf16_bits(to_bf16_bits(1.0 + 3.0 / 256.0)),
            1.0 + 4.0 / 256.0
        );
    }

    #[test]
    fn the_op_rounds_every_value() -> Result<()> {
        let x = Tensor::new(
            &[1.0f32, 1.0 + 1.0 / 1024.0, 3.3125e2, -2.5e-3],
            &Device::Cpu,
        )?;
        let r = x.apply_op1_no_bwd(&RoundBf16)?.to_vec1::<f32>()?;
        let want: Vec<f32> = [1.0f32, 1.0 + 1.0 / 1024.0, 3.3125e2, -2.5e-3]
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(r, want);
        assert_eq!(r[1], 1.0);
        Ok(())
    }
}
