//! A stochastic student's Gaussian noise, drawn where the activations are.
//!
//! Value j of image i of a noisy layer seeded s is a pure function of (s, i, j):
//! SplitMix64 of the image's key and the pair index j/2 gives 64 random bits, two
//! 24-bit uniforms of which make a Box–Muller pair (r cos 2πt, r sin 2πt), r =
//! √(−2 ln u), u ∈ (0, 1]. The logarithm, cosine and sine are polynomials evaluated
//! with the same f32 operations in the same order on the CPU (Rust does not contract
//! `a * b + c` into a fused multiply-add) and in CUDA (`__fmul_rn`, `__fadd_rn`,
//! `__fdiv_rn`, `__fsqrt_rn`, which are never contracted), so the noise is the same
//! bits on both devices, and on a GPU it is drawn by one kernel with no host work and
//! no copy ([`LayerNoise`]). Any image's noise depends on its place in the batch alone,
//! never on how the batch is cut into chunks or threads.
//!
//! The 24-bit uniforms bound |z| by √(2·24·ln 2) ≈ 5.77 (a standard normal exceeds it
//! with probability 8·10⁻⁹); the polynomials are accurate to about 1e-7 (tested
//! against f64), and the draws pass a Kolmogorov–Smirnov test against the normal law.

use super::launch::{count, KArg, KLaunch};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

use super::common::f32_slice;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const PAIR: u64 = 0xd134_2543_de82_ef95;

/// SplitMix64's finaliser of `z + γ`.
#[inline(always)]
fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of image `image` of a layer seeded `seed`.
#[inline(always)]
fn image_key(seed: u64, image: u64) -> u64 {
    splitmix64(seed ^ image.wrapping_add(1).wrapping_mul(GOLDEN))
}

/// The f32 constants of the polynomials, as bit patterns that `ops.cu` repeats
/// (`__uint_as_float`), so that both devices use the very same values: each is the
/// f32 nearest to its value (tested).
mod bits {
    pub const LN2: u32 = 0x3f31_7218; // ln 2
    pub const SQRT2: u32 = 0x3fb5_04f3; // √2
    pub const TAU: u32 = 0x40c9_0fdb; // 2π
    pub const C3: u32 = 0x3eaa_aaab; // 1/3
    pub const C5: u32 = 0x3e4c_cccd; // 1/5
    pub const C7: u32 = 0x3e12_4925; // 1/7
    pub const C9: u32 = 0x3de3_8e39; // 1/9
    pub const C24: u32 = 0x3d2a_aaab; // 1/24
    pub const C720: u32 = 0xbab6_0b61; // −1/720
    pub const C40320: u32 = 0x37d0_0d01; // 1/40320
    pub const S6: u32 = 0xbe2a_aaab; // −1/6
    pub const S120: u32 = 0x3c08_8889; // 1/120
    pub const S5040: u32 = 0xb950_0d01; // −1/5040
    pub const S362880: u32 = 0x3638_ef1d; // 1/362880
}

#[inline(always)]
fn k(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// ln x for a positive, normal f32: x = m·2^e with m ∈ [√½, √2), then
/// ln m = 2·atanh(s) = 2s·(1 + s²/3 + s⁴/5 + s⁶/7 + s⁸/9), s = (m − 1)/(m + 1).
/// Branch-free (the halving of m is a step of its exponent, which equals m·0.5):
/// random inputs would mispredict a branch half of the time.
#[inline(always)]
fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = u32::from(m > k(bits::SQRT2));
    let m = f32::from_bits(m.to_bits() - (big << 23));
    let e = ((bits >> 23) & 0xff) as i32 - 127 + big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let p = 1.0 + s2 * (k(bits::C3) + s2 * (k(bits::C5) + s2 * (k(bits::C7) + s2 * k(bits::C9))));
    (e as f32) * k(bits::LN2) + (s + s) * p
}

/// (cos 2πt, sin 2πt) for t ∈ [0, 1): t = q/4 + r with q a quarter turn and
/// |r| ≤ 1/8, Taylor polynomials of degree 8 and 9 at a = 2πr, |a| ≤ π/4. The
/// quadrant's swap and signs are bit operations (no branch, no `floor` call: t·4 + ½
/// is non-negative, so truncating is flooring).
#[inline(always)]
fn cos_sin_turns(t: f32) -> (f32, f32) {
    let q = (t * 4.0 + 0.5) as u32;
    let a = (t - q as f32 * 0.25) * k(bits::TAU);
    let a2 = a * a;
    let c = 1.0 + a2 * (-0.5 + a2 * (k(bits::C24) + a2 * (k(bits::C720) + a2 * k(bits::C40320))));
    let s = a
        * (1.0
            + a2 * (k(bits::S6)
                + a2 * (k(bits::S120) + a2 * (k(bits::S5040) + a2 * k(bits::S362880)))));
    // Quadrants 0–3: (c, s), (−s, c), (−c, −s), (s, −c).
    let swap = 0u32.wrapping_sub(q & 1);
    let (cb, sb) = (c.to_bits(), s.to_bits());
    let x = (cb & !swap) | (sb & swap);
    let y = (sb & !swap) | (cb & swap);
    let (neg_x, neg_y) = (((q + 1) >> 1) & 1, (q >> 1) & 1);
    (
        f32::from_bits(x ^ (neg_x << 31)),
        f32::from_bits(y ^ (neg_y << 31)),
    )
}

/// Values 2k and 2k + 1 of the image whose key is `key`.
#[inline(always)]
fn normal_pair(key: u64, k: u64) -> (f32, f32) {
    let h = splitmix64(key ^ k.wrapping_mul(PAIR));
    let u = ((h >> 40) + 1) as f32 * (1.0 / 16_777_216.0);
    let t = ((h >> 16) & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0);
    let r = (-2.0 * ln(u)).sqrt();
    let (c, s) = cos_sin_turns(t);
    (r * c, r * s)
}

/// Fills `out` with the first `out.len()` standard normal values of image `image` of
/// the layer seeded `seed`, in the order of the image's NHWC elements (see the module
/// docs). Every path that injects a student's noise (layer by layer, fused) draws it
/// here, and the CUDA kernel computes the same values.
pub(crate) fn fill_image(seed: u64, image: usize, out: &mut [f32]) {
    let key = image_key(seed, image as u64);
    let half = (out.len() / 2) as u64;
    let mut pairs = out.chunks_exact_mut(2);
    for (k, pair) in (&mut pairs).enumerate() {
        let (a, b) = normal_pair(key, k as u64);
        pair[0] = a;
        pair[1] = b;
    }
    if let [last] = pairs.into_remainder() {
        *last = normal_pair(key, half).0;
    }
}

/// The standard normal values of one image of one noisy layer as an endless stream,
/// what [`fill_image`] writes (the tests' reference).
#[cfg(test)]
pub(crate) fn image_noise(seed: u64, image: usize) -> impl Iterator<Item = f32> {
    let key = image_key(seed, image as u64);
    (0u64..).flat_map(move |k| {
        let (a, b) = normal_pair(key, k);
        [a, b]
    })
}

/// The noise z of a layer whose activations have the shape of the operand (B, …):
/// image i's values are those [`fill_image`] writes for (seed, i). On the CPU the images are filled in
/// parallel; on a GPU one kernel draws them (`layer_noise` in `ops.cu`). No gradient
/// flows through it: apply it with `apply_op1_no_bwd`.
#[derive(Clone, Copy, Debug)]
pub struct LayerNoise {
    /// The layer's seed for this forward pass.
    pub seed: u64,
    /// The index in the global batch of the operand's first image: image i draws the
    /// values of image `first + i` (a data-parallel worker's part of a batch).
    pub first: u64,
}

impl LayerNoise {
    /// Values per image and images of a shape (B, …).
    fn split(shape: &Shape) -> (usize, usize) {
        let dims = shape.dims();
        let images = dims.first().copied().unwrap_or(1).max(1);
        (shape.elem_count() / images, images)
    }
}

impl CustomOp1 for LayerNoise {
    fn name(&self) -> &'static str {
        "layer-noise"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // The operand gives the shape; its values are not read (but must be f32).
        f32_slice(s, l, "layer-noise")?;
        let (per, _) = Self::split(l.shape());
        let mut out = vec![0f32; l.shape().elem_count()];
        if per > 0 {
            out.par_chunks_mut(per)
                .enumerate()
                .for_each(|(i, image)| fill_image(self.seed, self.first as usize + i, image));
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::uninit;
        use candle_core::backend::BackendStorage;
        let dev = s.device().clone();
        let n = l.shape().elem_count();
        let (per, images) = Self::split(l.shape());
        let mut out = uninit(&dev, n.max(1))?;
        fill_cuda(&dev, &mut out, self.seed, self.first, per, images)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            l.shape().clone(),
        ))
    }
}

/// The launch of `layer_noise`: the noise of `images` images of `per` values each
/// into `out` (image i's values those [`fill_image`] writes for (seed, first + i)),
/// one thread per pair of values. The GPU's fill and the tests' emulated kernel are
/// launched through this one definition.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn noise_launch<A>(
    out: A,
    seed: u64,
    first: u64,
    per: usize,
    images: usize,
) -> Result<KLaunch<A>> {
    let pairs_per_image = per.div_ceil(2);
    let pairs = pairs_per_image * images;
    let args = vec![
        KArg::B(out),
        KArg::U64(seed),
        KArg::U64(first),
        KArg::U64(per as u64),
        KArg::U64(pairs_per_image as u64),
        KArg::U32(count(pairs, "layer-noise")?),
    ];
    KLaunch::ops("layer_noise", pairs, args)
}

/// Writes the noise of `images` images of `per` values each into `out` (at least
/// `per`·`images` values) on a GPU: image i's values are those [`fill_image`] writes for
/// (seed, first + i). One kernel (`layer_noise` in `ops.cu`).
#[cfg(feature = "cuda")]
pub(crate) fn fill_cuda(
    dev: &candle_core::cuda_backend::CudaDevice,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    seed: u64,
    first: u64,
    per: usize,
    images: usize,
) -> Result<()> {
    use super::launch::cuda::{run, CudaArg};
    if per == 0 || images == 0 {
        return Ok(());
    }
    if out.len() < per * images {
        candle_core::bail!(
            "layer-noise: {} values for {images} images of {per}",
            out.len()
        )
    }
    // Thread p writes values 2k, 2k + 1 (k = p mod half, the second only below per)
    // of image p / half: within the per·images values checked above (`first` only
    // changes which values, not where they go).
    let launch = noise_launch(
        CudaArg::Mut(out.slice_mut(..per * images)),
        seed,
        first,
        per,
        images,
    )?;
    run(dev, launch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Each constant is the f32 nearest to its value, and `ops.cu` uses the same bits.
    #[test]
    fn the_constants_are_the_nearest_f32_and_shared_with_the_cuda_source() {
        let cases = [
            (bits::LN2, std::f64::consts::LN_2, "LN2"),
            (bits::SQRT2, std::f64::consts::SQRT_2, "SQRT2"),
            (bits::TAU, std::f64::consts::TAU, "TAU"),
            (bits::C3, 1.0 / 3.0, "C3"),
            (bits::C5, 1.0 / 5.0, "C5"),
            (bits::C7, 1.0 / 7.0, "C7"),
            (bits::C9, 1.0 / 9.0, "C9"),
            (bits::C24, 1.0 / 24.0, "C24"),
            (bits::C720, -1.0 / 720.0, "C720"),
            (bits::C40320, 1.0 / 40_320.0, "C40320"),
            (bits::S6, -1.0 / 6.0, "S6"),
            (bits::S120, 1.0 / 120.0, "S120"),
            (bits::S5040, -1.0 / 5_040.0, "S5040"),
            (bits::S362880, 1.0 / 362_880.0, "S362880"),
        ];
        let source = include_str!("ops.cu");
        for (b, value, name) in cases {
            assert_eq!(b, (value as f32).to_bits(), "{name}");
            let literal = format!("#define RP_{name} __uint_as_float(0x{b:08x}u)");
            assert!(source.contains(&literal), "ops.cu lacks `{literal}`");
        }
    }

    #[test]
    fn the_logarithm_and_the_quarter_turns_are_accurate() {
        for i in 1..=100_000u32 {
            let x = i as f32 / 100_000.0;
            let want = f64::from(x).ln();
            let got = f64::from(ln(x));
            assert!(
                (got - want).abs() <= 2e-7 * want.abs().max(1.0),
                "ln {x}: {got} vs {want}"
            );
        }
        for &x in &[1.0 / 16_777_216.0f32, 1e-5, 0.5, 0.999_999_9] {
            let want = f64::from(x).ln();
            assert!((f64::from(ln(x)) - want).abs() <= 2e-7 * want.abs().max(1.0));
        }
        for i in 0..100_000u32 {
            let t = i as f32 / 100_000.0;
            let (c, s) = cos_sin_turns(t);
            let a = std::f64::consts::TAU * f64::from(t);
            assert!((f64::from(c) - a.cos()).abs() < 3e-7, "cos at {t}");
            assert!((f64::from(s) - a.sin()).abs() < 3e-7, "sin at {t}");
        }
    }

    /// Φ(x) by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
    fn normal_cdf(x: f64) -> f64 {
        let z = x.abs() / std::f64::consts::SQRT_2;
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly = t
            * (0.254_829_592
                + t * (-0.284_496_736
                    + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        let erf = 1.0 - poly * (-z * z).exp();
        0.5 * (1.0 + if x < 0.0 { -erf } else { erf })
    }

    /// 200,000 draws over many images: mean 0, variance 1, and a Kolmogorov–Smirnov
    /// distance to Φ below its 0.1 % critical value (1.95/√n); bounded by 5.77.
    #[test]
    fn the_draws_are_standard_normal() {
        let mut v: Vec<f64> = (0..200)
            .flat_map(|i| image_noise(42, i).take(1000).collect::<Vec<f32>>())
            .map(f64::from)
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "variance {var}");
        assert!(v.iter().all(|x| x.abs() <= 5.78));
        v.sort_by(f64::total_cmp);
        let ks = v
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = normal_cdf(x);
                (f - i as f64 / n).abs().max((f - (i + 1) as f64 / n).abs())
            })
            .fold(0.0, f64::max);
        assert!(ks < 1.95 / n.sqrt(), "Kolmogorov–Smirnov distance {ks}");
    }

    /// The op gives each image its own stream, the same for any batch it sits in, and
    /// the same values as the iterator and `fill_image` (odd lengths included).
    #[test]
    fn the_layer_op_matches_the_per_image_stream() -> Result<()> {
        let x = Tensor::zeros((3, 5, 3), candle_core::DType::F32, &Device::Cpu)?;
        let z = x.apply_op1_no_bwd(&LayerNoise { seed: 9, first: 0 })?;
        let rows = z.reshape((3, 15))?.to_vec2::<f32>()?;
        for (i, row) in rows.iter().enumerate() {
            let want: Vec<f32> = image_noise(9, i).take(15).collect();
            assert_eq!(row, &want);
            let mut filled = vec![0f32; 15];
            fill_image(9, i, &mut filled);
            assert_eq!(row, &filled);
        }
        assert_ne!(rows[0], rows[1]);
        let other = x.apply_op1_no_bwd(&LayerNoise { seed: 10, first: 0 })?;
        assert_ne!(other.reshape((3, 15))?.to_vec2::<f32>()?[0], rows[0]);
        // A batch whose first image is image 1 of the global batch draws its rows.
        let part = x
            .narrow(0, 0, 2)?
            .apply_op1_no_bwd(&LayerNoise { seed: 9, first: 1 })?;
        assert_eq!(part.reshape((2, 15))?.to_vec2::<f32>()?, rows[1..].to_vec());
        Ok(())
    }
}
