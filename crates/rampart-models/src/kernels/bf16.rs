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
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

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

/// The two conversion kernels on a device.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub(crate) mod cuda {
    use super::super::cuda::{elementwise, launch_error, uninit};
    use super::super::pointwise::OPS;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
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
            let (cfg, count) = elementwise(n, "f32-to-bf16")?;
            let k = OPS.func(dev, "f32_to_bf16")?;
            let mut b = k.builder();
            b.arg(&mut out).arg(x).arg(&count);
            // SAFETY: thread i < n reads x[i] and writes out[i].
            unsafe { b.launch(cfg) }.map_err(|e| launch_error("f32-to-bf16", e))?;
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
            let (cfg, count) = elementwise(n, "bf16-widen-into")?;
            let acc = i32::from(accumulate);
            let k = OPS.func(dev, "bf16_widen_into")?;
            let mut b = k.builder();
            b.arg(out).arg(x).arg(&acc).arg(&count);
            // SAFETY: n values written, n of x read (checked above).
            unsafe { b.launch(cfg) }.map_err(|e| launch_error("bf16-widen-into", e))?;
        }
        Ok(())
    }

    /// bf16 values widened to f32 (one kernel) into a fresh buffer.
    pub(crate) fn to_f32(dev: &CudaDevice, x: &CudaSlice<half::bf16>) -> Result<CudaSlice<f32>> {
        let n = x.len();
        let mut out = uninit(dev, n.max(1))?;
        if n > 0 {
            let (cfg, count) = elementwise(n, "bf16-to-f32")?;
            let k = OPS.func(dev, "bf16_to_f32")?;
            let mut b = k.builder();
            b.arg(&mut out).arg(x).arg(&count);
            // SAFETY: thread i < n reads x[i] and writes out[i].
            unsafe { b.launch(cfg) }.map_err(|e| launch_error("bf16-to-f32", e))?;
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
