//! Common corruptions for measuring calibration and error under distribution shift.
//!
//! Eight of the corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), each at
//! five severities, made procedurally from an [`ImageDataset`] instead of downloaded.
//! The severity tables are the CIFAR-10 ones of the authors' `make_cifar_c.py`:
//!
//! | corruption | parameter | severity 1 … 5 |
//! |---|---|---|
//! | `gaussian_noise` | std of N(0, σ²) added to x ∈ [0, 1] | 0.04, 0.06, 0.08, 0.09, 0.10 |
//! | `shot_noise` | photons c: Poisson(x·c)/c | 500, 250, 100, 75, 50 |
//! | `impulse_noise` | salt-and-pepper amount (fraction of values) | 0.01, 0.02, 0.03, 0.05, 0.07 |
//! | `gaussian_blur` | σ in pixels | 0.4, 0.6, 0.7, 0.8, 1.0 |
//! | `contrast` | c: (x − mean_c)·c + mean_c | 0.75, 0.5, 0.4, 0.3, 0.15 |
//! | `brightness` | c added to V of HSV | 0.05, 0.1, 0.15, 0.2, 0.3 |
//! | `jpeg_compression` | JPEG quality | 80, 65, 58, 50, 40 |
//! | `pixelate` | c: box-resize to ⌊c·H⌋ × ⌊c·W⌋ and back | 0.95, 0.9, 0.85, 0.75, 0.65 |
//!
//! Every result is clipped to [0, 1] and rounded to the nearest byte (the original
//! truncates with `np.uint8`; rounding avoids a systematic darkening of ½ level).
//! Differences from the original, which used numpy, scikit-image and PIL:
//! random numbers come from ChaCha8 (seeded, one stream per image, so a corrupted
//! set depends only on (images, corruption, parameter, seed), not on threads);
//! the Gaussian blur is scipy's (kernel radius ⌊4σ + ½⌋, edges repeated), computed
//! in f64; brightness uses the exact identity that changing V alone scales RGB by
//! V'/V (black pixels become grey V'); pixelate follows PIL's BOX resampling
//! (average of the source pixels whose centres fall in each target pixel), rounding
//! to bytes after each pass like PIL; JPEG uses the `image` crate's encoder, which
//! subsamples chroma 4:2:2 where PIL uses 4:2:0, so its artefacts differ slightly.
//!
//! Corruptions act on every channel count except JPEG (1 or 3 channels only);
//! brightness treats the channels of a pixel as its colour (V = max over channels).

use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Poisson};
use rayon::prelude::*;

use crate::dataset::ImageDataset;
use crate::error::DataError;

/// Number of severities of every corruption (1 … 5).
pub const SEVERITIES: u8 = 5;

/// A corruption of CIFAR-10-C; see the module documentation for the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Corruption {
    /// Additive Gaussian noise.
    GaussianNoise,
    /// Poisson (shot) noise.
    ShotNoise,
    /// Salt-and-pepper noise.
    ImpulseNoise,
    /// Gaussian blur.
    GaussianBlur,
    /// Contrast reduction towards the per-channel mean.
    Contrast,
    /// Brightness increase (the V channel of HSV).
    Brightness,
    /// JPEG compression.
    Jpeg,
    /// Pixelation by box down- and up-sampling.
    Pixelate,
}

/// Errors of corrupting a data set.
#[derive(Debug, thiserror::Error)]
pub enum CorruptError {
    /// A severity outside 1 ..= 5.
    #[error("corruption severity must be in 1..={SEVERITIES}, got {0}")]
    Severity(u8),
    /// A parameter outside the corruption's domain.
    #[error("invalid {corruption} parameter {value}: {reason}")]
    Parameter {
        /// The corruption.
        corruption: Corruption,
        /// The parameter given.
        value: f64,
        /// Its domain.
        reason: &'static str,
    },
    /// JPEG needs 1 (grey) or 3 (RGB) channels.
    #[error("{corruption} needs 1 or 3 channels, the images have {channels}")]
    Channels {
        /// The corruption.
        corruption: Corruption,
        /// Channels of the images.
        channels: usize,
    },
    /// The JPEG encoder or decoder failed.
    #[error("JPEG round trip failed: {0}")]
    Jpeg(#[from] image::ImageError),
    /// The corrupted images could not form a data set.
    #[error(transparent)]
    Data(#[from] DataError),
}

impl Corruption {
    /// All corruptions, in the order of the module documentation's table.
    pub const ALL: [Corruption; 8] = [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::GaussianBlur,
        Corruption::Contrast,
        Corruption::Brightness,
        Corruption::Jpeg,
        Corruption::Pixelate,
    ];

    /// The CIFAR-10-C name (`gaussian_noise`, …, `jpeg_compression`, `pixelate`).
    pub fn name(&self) -> &'static str {
        match self {
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::GaussianBlur => "gaussian_blur",
            Corruption::Contrast => "contrast",
            Corruption::Brightness => "brightness",
            Corruption::Jpeg => "jpeg_compression",
            Corruption::Pixelate => "pixelate",
        }
    }

    /// The parameter of `severity` (1 ..= 5) from the CIFAR-10-C table.
    pub fn parameter(&self, severity: u8) -> Result<f64, CorruptError> {
        if !(1..=SEVERITIES).contains(&severity) {
            return Err(CorruptError::Severity(severity));
        }
        let table: [f64; 5] = match self {
            Corruption::GaussianNoise => [0.04, 0.06, 0.08, 0.09, 0.10],
            Corruption::ShotNoise => [500.0, 250.0, 100.0, 75.0, 50.0],
            Corruption::ImpulseNoise => [0.01, 0.02, 0.03, 0.05, 0.07],
            Corruption::GaussianBlur => [0.4, 0.6, 0.7, 0.8, 1.0],
            Corruption::Contrast => [0.75, 0.5, 0.4, 0.3, 0.15],
            Corruption::Brightness => [0.05, 0.1, 0.15, 0.2, 0.3],
            Corruption::Jpeg => [80.0, 65.0, 58.0, 50.0, 40.0],
            Corruption::Pixelate => [0.95, 0.9, 0.85, 0.75, 0.65],
        };
        Ok(table[usize::from(severity - 1)])
    }

    /// The parameter at which the corruption leaves images unchanged, where one exists
    /// (shot noise and JPEG have none).
    pub fn identity_parameter(&self) -> Option<f64> {
        match self {
            Corruption::GaussianNoise
            | Corruption::ImpulseNoise
            | Corruption::GaussianBlur
            | Corruption::Brightness => Some(0.0),
            Corruption::Contrast | Corruption::Pixelate => Some(1.0),
            Corruption::ShotNoise | Corruption::Jpeg => None,
        }
    }

    /// Whether the corruption draws random numbers (the seed matters).
    pub fn is_random(&self) -> bool {
        matches!(
            self,
            Corruption::GaussianNoise | Corruption::ShotNoise | Corruption::ImpulseNoise
        )
    }

    fn check_parameter(&self, p: f64) -> Result<(), CorruptError> {
        let refuse = |reason| {
            Err(CorruptError::Parameter {
                corruption: *self,
                value: p,
                reason,
            })
        };
        if !p.is_finite() {
            return refuse("must be finite");
        }
        match self {
            Corruption::GaussianNoise | Corruption::GaussianBlur | Corruption::Contrast
                if p < 0.0 =>
            {
                refuse("must be ≥ 0")
            }
            Corruption::ShotNoise if p <= 0.0 => refuse("must be > 0"),
            Corruption::ImpulseNoise if !(0.0..=1.0).contains(&p) => refuse("must lie in [0, 1]"),
            Corruption::Jpeg if !(1.0..=100.0).contains(&p) || p.fract() != 0.0 => {
                refuse("must be an integer quality in 1..=100")
            }
            Corruption::Pixelate if !(p > 0.0 && p <= 1.0) => refuse("must lie in (0, 1]"),
            _ => Ok(()),
        }
    }

    /// A salt that makes the random streams of different corruptions independent.
    fn salt(&self) -> u64 {
        let index = Corruption::ALL.iter().position(|c| c == self).unwrap_or(0) as u64;
        0x9E37_79B9_7F4A_7C15u64.wrapping_mul(index + 1)
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Corruption {
    type Err = String;

    /// The CIFAR-10-C names; `jpeg` is accepted for `jpeg_compression`, `-` for `_`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase().replace('-', "_");
        if lower == "jpeg" {
            return Ok(Corruption::Jpeg);
        }
        Corruption::ALL
            .into_iter()
            .find(|c| c.name() == lower)
            .ok_or_else(|| {
                let names: Vec<&str> = Corruption::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown corruption `{s}`; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Corrupts every image of `dataset` at `severity` (1 ..= 5) of the CIFAR-10-C table.
/// Labels, shape and class names are kept. Deterministic in `seed`.
pub fn corrupt(
    dataset: &ImageDataset,
    corruption: Corruption,
    severity: u8,
    seed: u64,
) -> Result<ImageDataset, CorruptError> {
    corrupt_with_parameter(dataset, corruption, corruption.parameter(severity)?, seed)
}

/// Corrupts every image with an explicit parameter (the severity tables are one choice
/// of parameters; see the module documentation for each parameter's meaning).
/// Image i draws its random numbers from ChaCha8 seeded by `seed` (salted by the
/// corruption) on stream i, so the result does not depend on the thread count.
pub fn corrupt_with_parameter(
    dataset: &ImageDataset,
    corruption: Corruption,
    parameter: f64,
    seed: u64,
) -> Result<ImageDataset, CorruptError> {
    corruption.check_parameter(parameter)?;
    let shape = dataset.shape();
    if corruption == Corruption::Jpeg && !matches!(shape.0, 1 | 3) {
        return Err(CorruptError::Channels {
            corruption,
            channels: shape.0,
        });
    }
    let len = dataset.image_len();
    let mut images = vec![0u8; dataset.images().len()];
    images
        .par_chunks_mut(len)
        .enumerate()
        .try_for_each(|(i, out)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ corruption.salt());
            rng.set_stream(i as u64);
            let corrupted =
                corrupt_image(dataset.image(i), shape, corruption, parameter, &mut rng)?;
            out.copy_from_slice(&corrupted);
            Ok::<(), CorruptError>(())
        })?;
    Ok(ImageDataset::new(
        images,
        dataset.labels().to_vec(),
        shape,
        dataset.class_names().to_vec(),
    )?)
}

/// Corrupts one image: C×H×W bytes of `shape` = (C, H, W), channel-major.
pub fn corrupt_image<R: Rng + ?Sized>(
    image: &[u8],
    shape: (usize, usize, usize),
    corruption: Corruption,
    parameter: f64,
    rng: &mut R,
) -> Result<Vec<u8>, CorruptError> {
    corruption.check_parameter(parameter)?;
    let (c, h, w) = shape;
    if image.len() != c * h * w {
        return Err(DataError::InvalidDataset(format!(
            "an image of shape {shape:?} needs {} bytes, got {}",
            c * h * w,
            image.len()
        ))
        .into());
    }
    let x: Vec<f64> = image.iter().map(|&b| f64::from(b) / 255.0).collect();
    let y: Vec<f64> = match corruption {
        Corruption::GaussianNoise => {
            if parameter == 0.0 {
                x
            } else {
                let normal = Normal::new(0.0, parameter).map_err(|_| CorruptError::Parameter {
                    corruption,
                    value: parameter,
                    reason: "must be a valid standard deviation",
                })?;
                x.iter().map(|&v| v + normal.sample(rng)).collect()
            }
        }
        Corruption::ShotNoise => x
            .iter()
            .map(|&v| {
                let lambda = v * parameter;
                if lambda > 0.0 {
                    // `Poisson::new` accepts any finite λ > 0.
                    Poisson::new(lambda).map_or(v, |p| p.sample(rng) / parameter)
                } else {
                    0.0
                }
            })
            .collect(),
        Corruption::ImpulseNoise => x
            .iter()
            .map(|&v| {
                if rng.gen::<f64>() < parameter {
                    if rng.gen::<bool>() {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    v
                }
            })
            .collect(),
        Corruption::GaussianBlur => gaussian_blur(&x, shape, parameter),
        Corruption::Contrast => {
            let plane = h * w;
            let mut y = x.clone();
            for ch in 0..c {
                let values = &mut y[ch * plane..(ch + 1) * plane];
                let mean = values.iter().sum::<f64>() / plane as f64;
                for v in values {
                    *v = (*v - mean) * parameter + mean;
                }
            }
            y
        }
        Corruption::Brightness => brightness(&x, shape, parameter),
        Corruption::Jpeg => return jpeg(image, shape, parameter as u8),
        Corruption::Pixelate => return Ok(pixelate(image, shape, parameter)),
    };
    Ok(y.into_iter().map(to_byte).collect())
}

/// x ∈ ℝ → the nearest byte of clip(x, 0, 1)·255.
fn to_byte(v: f64) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Separable Gaussian filter per channel, as scipy's `gaussian_filter` (truncate 4,
/// mode `nearest`). σ = 0 returns the input.
fn gaussian_blur(x: &[f64], (c, h, w): (usize, usize, usize), sigma: f64) -> Vec<f64> {
    if sigma == 0.0 {
        return x.to_vec();
    }
    let radius = (4.0 * sigma + 0.5) as isize;
    let mut kernel: Vec<f64> = (-radius..=radius)
        .map(|d| (-0.5 * (d * d) as f64 / (sigma * sigma)).exp())
        .collect();
    let total: f64 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let mut tmp = vec![0.0; x.len()];
    let mut out = vec![0.0; x.len()];
    filter_axis(x, &mut tmp, (c, h, w), &kernel, false);
    filter_axis(&tmp, &mut out, (c, h, w), &kernel, true);
    out
}

/// One pass of a separable filter: `src` convolved with `kernel` (2·radius + 1 taps)
/// along the rows of each h×w plane, or along its columns when `vertical`, edge values
/// repeated (scipy's mode `nearest`), into `dst`.
fn filter_axis(
    src: &[f64],
    dst: &mut [f64],
    (c, h, w): (usize, usize, usize),
    kernel: &[f64],
    vertical: bool,
) {
    let radius = (kernel.len() / 2) as isize;
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    // The axis length and the distance between neighbours along it.
    let (n, step) = if vertical { (h, w) } else { (w, 1) };
    for ch in 0..c {
        let base = ch * h * w;
        for row in 0..h {
            for col in 0..w {
                // The position along the axis, and the index where the axis starts.
                let (p, start) = if vertical {
                    (row, base + col)
                } else {
                    (col, base + row * w)
                };
                dst[base + row * w + col] = kernel
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| {
                        wt * src[start + clamp(p as isize + k as isize - radius, n) * step]
                    })
                    .sum();
            }
        }
    }
}

/// V ← clip(V + c, 0, 1) in HSV, H and S kept: RGB scales by V'/V; black (V = 0, S = 0)
/// becomes grey V'.
fn brightness(x: &[f64], (c, h, w): (usize, usize, usize), add: f64) -> Vec<f64> {
    let plane = h * w;
    let mut y = x.to_vec();
    for p in 0..plane {
        let v = (0..c).map(|ch| x[ch * plane + p]).fold(0.0, f64::max);
        let v_new = (v + add).clamp(0.0, 1.0);
        for ch in 0..c {
            y[ch * plane + p] = if v > 0.0 {
                x[ch * plane + p] * (v_new / v)
            } else {
                v_new
            };
        }
    }
    y
}

/// JPEG round trip at `quality` with the `image` crate (1 or 3 channels).
fn jpeg(
    image: &[u8],
    (c, h, w): (usize, usize, usize),
    quality: u8,
) -> Result<Vec<u8>, CorruptError> {
    use image::codecs::jpeg::JpegEncoder;
    use image::ExtendedColorType;
    let plane = h * w;
    let interleaved: Vec<u8> = (0..plane)
        .flat_map(|p| (0..c).map(move |ch| image[ch * plane + p]))
        .collect();
    let color = if c == 1 {
        ExtendedColorType::L8
    } else {
        ExtendedColorType::Rgb8
    };
    let mut encoded = Vec::new();
    JpegEncoder::new_with_quality(&mut encoded, quality).encode(
        &interleaved,
        w as u32,
        h as u32,
        color,
    )?;
    let decoded = image::load_from_memory_with_format(&encoded, image::ImageFormat::Jpeg)?;
    let pixels: Vec<u8> = if c == 1 {
        decoded.to_luma8().into_raw()
    } else {
        decoded.to_rgb8().into_raw()
    };
    let mut out = vec![0u8; c * plane];
    for p in 0..plane {
        for ch in 0..c {
            out[ch * plane + p] = pixels[p * c + ch];
        }
    }
    Ok(out)
}

/// Box down-sampling to ⌊factor·H⌋ × ⌊factor·W⌋ (at least 1) and box up-sampling back.
fn pixelate(image: &[u8], (c, h, w): (usize, usize, usize), factor: f64) -> Vec<u8> {
    let small_h = ((h as f64 * factor) as usize).max(1);
    let small_w = ((w as f64 * factor) as usize).max(1);
    let plane = h * w;
    let mut out = Vec::with_capacity(image.len());
    for ch in 0..c {
        let src = &image[ch * plane..(ch + 1) * plane];
        let small = box_resize(src, (h, w), (small_h, small_w));
        out.extend(box_resize(&small, (small_h, small_w), (h, w)));
    }
    out
}

/// PIL's BOX resampling of one channel: horizontal pass, then vertical, each rounded
/// to bytes; a pass is skipped when that size does not change.
fn box_resize(src: &[u8], (h, w): (usize, usize), (out_h, out_w): (usize, usize)) -> Vec<u8> {
    let mut cur = src.to_vec();
    let mut cur_w = w;
    if out_w != w {
        let coeffs = box_coefficients(w, out_w);
        let mut next = vec![0u8; h * out_w];
        for row in 0..h {
            for (col, (start, weights)) in coeffs.iter().enumerate() {
                let v: f64 = weights
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| wt * f64::from(cur[row * cur_w + start + k]))
                    .sum();
                next[row * out_w + col] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        cur = next;
        cur_w = out_w;
    }
    if out_h != h {
        let coeffs = box_coefficients(h, out_h);
        let mut next = vec![0u8; out_h * cur_w];
        for (row, (start, weights)) in coeffs.iter().enumerate() {
            for col in 0..cur_w {
                let v: f64 = weights
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| wt * f64::from(cur[(start + k) * cur_w + col]))
                    .sum();
                next[row * cur_w + col] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        cur = next;
    }
    cur
}

/// For each output index: the first input index and the normalised weights, as PIL's
/// `precompute_coeffs` with the box filter (1 on (−½, ½]).
fn box_coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 0.5 * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
            let xmax = ((center + support + 0.5).floor() as usize).min(in_size);
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = (x as f64 - center + 0.5) / filter_scale;
                    if t > -0.5 && t <= 0.5 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = weights.iter().sum();
            if total > 0.0 {
                weights.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, weights)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// Eight smooth 3×32×32 images (gradients, a disc, stripes) with a little texture,
    /// like natural images: every corruption changes them visibly.
    fn smooth_images() -> Result<ImageDataset, DataError> {
        let (c, h, w) = (3, 32, 32);
        let mut images = Vec::with_capacity(8 * c * h * w);
        for i in 0..8usize {
            for ch in 0..c {
                for row in 0..h {
                    for col in 0..w {
                        let gx = col as f64 / (w - 1) as f64;
                        let gy = row as f64 / (h - 1) as f64;
                        let disc = {
                            let (dx, dy) = (col as f64 - 16.0, row as f64 - 10.0 - i as f64);
                            if dx * dx + dy * dy < 60.0 {
                                0.3
                            } else {
                                0.0
                            }
                        };
                        let stripes = 0.1 * ((col + 2 * row + 3 * i) as f64 * 0.7).sin();
                        let v = 0.15
                            + 0.5 * (gx * (ch + 1) as f64 / 3.0 + gy * (i % 3) as f64 / 3.0)
                            + disc
                            + stripes;
                        images.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
                    }
                }
            }
        }
        ImageDataset::new(
            images,
            (0..8).map(|i| i % 2).collect(),
            (c, h, w),
            vec!["a".into(), "b".into()],
        )
    }

    fn mean_abs_diff(a: &ImageDataset, b: &ImageDataset) -> f64 {
        let total: f64 = a
            .images()
            .iter()
            .zip(b.images())
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
            .sum();
        total / a.images().len() as f64
    }

    #[test]
    fn identity_parameters_leave_images_unchanged() -> TestResult {
        let ds = smooth_images()?;
        for c in Corruption::ALL {
            if let Some(p) = c.identity_parameter() {
                let out = corrupt_with_parameter(&ds, c, p, 3)?;
                assert_eq!(out.images(), ds.images(), "{c} at {p}");
            }
        }
        // Shot noise with very many photons and JPEG at quality 100 are nearly lossless.
        let shot = corrupt_with_parameter(&ds, Corruption::ShotNoise, 1e9, 3)?;
        assert!(mean_abs_diff(&ds, &shot) < 0.05);
        let jpeg = corrupt_with_parameter(&ds, Corruption::Jpeg, 100.0, 3)?;
        assert!(
            mean_abs_diff(&ds, &jpeg) < 2.0,
            "{}",
            mean_abs_diff(&ds, &jpeg)
        );
        Ok(())
    }

    #[test]
    fn distortion_grows_with_severity() -> TestResult {
        let ds = smooth_images()?;
        for c in Corruption::ALL {
            let diffs: Vec<f64> = (1..=SEVERITIES)
                .map(|s| Ok(mean_abs_diff(&ds, &corrupt(&ds, c, s, 11)?)))
                .collect::<Result<_, CorruptError>>()?;
            for pair in diffs.windows(2) {
                assert!(pair[1] >= pair[0], "{c}: {diffs:?} is not monotone");
            }
            assert!(diffs[4] > diffs[0], "{c}: {diffs:?}");
            assert!(diffs[0] > 0.0, "{c} at severity 1 changed nothing");
        }
        Ok(())
    }

    #[test]
    fn seeded_and_shape_preserving() -> TestResult {
        let ds = smooth_images()?;
        for c in Corruption::ALL {
            let a = corrupt(&ds, c, 3, 7)?;
            let b = corrupt(&ds, c, 3, 7)?;
            assert_eq!(a.images(), b.images(), "{c} is not deterministic");
            assert_eq!(a.labels(), ds.labels());
            assert_eq!(a.shape(), ds.shape());
            assert_eq!(a.class_names(), ds.class_names());
            let other = corrupt(&ds, c, 3, 8)?;
            assert_eq!(other.images() != a.images(), c.is_random(), "{c}");
        }
        // Image i depends only on (seed, i): corrupting a prefix gives a prefix.
        let full = corrupt(&ds, Corruption::GaussianNoise, 2, 1)?;
        let prefix = corrupt(&ds.take(3), Corruption::GaussianNoise, 2, 1)?;
        assert_eq!(prefix.images(), &full.images()[..prefix.images().len()]);
        Ok(())
    }

    #[test]
    fn values_saturate_at_the_bounds() -> TestResult {
        // All-white and all-black images: noise and brightness clip at 0 and 255.
        let white = ImageDataset::new(
            vec![255; 2 * 3 * 4 * 4],
            vec![0, 0],
            (3, 4, 4),
            vec!["a".into()],
        )?;
        assert!(corrupt(&white, Corruption::Brightness, 5, 0)?
            .images()
            .iter()
            .all(|&v| v == 255));
        let black = ImageDataset::new(vec![0; 3 * 4 * 4], vec![0], (3, 4, 4), vec!["a".into()])?;
        // Shot noise of a zero intensity is zero; brightness turns black into grey V'.
        assert!(corrupt(&black, Corruption::ShotNoise, 5, 0)?
            .images()
            .iter()
            .all(|&v| v == 0));
        let grey = to_byte(0.3);
        assert!(corrupt(&black, Corruption::Brightness, 5, 0)?
            .images()
            .iter()
            .all(|&v| v == grey));
        // Impulse noise only ever writes 0 or 255.
        let ds = smooth_images()?;
        let imp = corrupt_with_parameter(&ds, Corruption::ImpulseNoise, 0.5, 0)?;
        let changed: Vec<u8> = imp
            .images()
            .iter()
            .zip(ds.images())
            .filter(|(a, b)| a != b)
            .map(|(a, _)| *a)
            .collect();
        assert!(changed.iter().all(|&v| v == 0 || v == 255));
        let fraction = changed.len() as f64 / ds.images().len() as f64;
        assert!((0.4..0.55).contains(&fraction), "{fraction}");
        Ok(())
    }

    #[test]
    fn hand_worked_values() -> TestResult {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // Contrast 0.5 on one channel [0, 102, 204, 255]/255: mean 140.25/255;
        // (x − m)/2 + m → 70.125, 121.125, 172.125, 197.625 → 70, 121, 172, 198.
        let img = [0u8, 102, 204, 255];
        let out = corrupt_image(&img, (1, 2, 2), Corruption::Contrast, 0.5, &mut rng)?;
        assert_eq!(out, vec![70, 121, 172, 198]);
        // Brightness +0.2 on an RGB pixel (120, 40, 0): V = 120/255 → 171/255, RGB × 171/120.
        let out = corrupt_image(
            &[120, 40, 0],
            (3, 1, 1),
            Corruption::Brightness,
            0.2,
            &mut rng,
        )?;
        assert_eq!(out, vec![171, 57, 0]);
        // Pixelate 0.5 of a 4×4 ramp: 2×2 block means, then each block repeated.
        let ramp: Vec<u8> = (0..16).map(|i| (i * 10) as u8).collect();
        let out = corrupt_image(&ramp, (1, 4, 4), Corruption::Pixelate, 0.5, &mut rng)?;
        // Block (0,0) holds 0, 10, 40, 50 → 25; (0,1) 20, 30, 60, 70 → 45; …
        let expected = [
            25, 25, 45, 45, 25, 25, 45, 45, 105, 105, 125, 125, 105, 105, 125, 125,
        ];
        assert_eq!(out, expected);
        // A blurred constant stays constant; a blurred impulse keeps (almost) its mass.
        let flat = vec![77u8; 25];
        let out = corrupt_image(&flat, (1, 5, 5), Corruption::GaussianBlur, 1.0, &mut rng)?;
        assert!(out.iter().all(|&v| v == 77));
        let mut dot = vec![0u8; 81];
        dot[40] = 255;
        let out = corrupt_image(&dot, (1, 9, 9), Corruption::GaussianBlur, 1.0, &mut rng)?;
        let mass: u32 = out.iter().map(|&v| u32::from(v)).sum();
        assert!((245..=265).contains(&mass), "{mass}");
        // 1/(2π) ≈ 0.159 of the mass stays in the centre: 40.6 → 41.
        assert_eq!(out[40], 41);
        Ok(())
    }

    #[test]
    fn bad_input_is_refused() -> TestResult {
        let ds = smooth_images()?;
        assert!(matches!(
            corrupt(&ds, Corruption::Contrast, 0, 0),
            Err(CorruptError::Severity(0))
        ));
        assert!(matches!(
            corrupt(&ds, Corruption::Contrast, 6, 0),
            Err(CorruptError::Severity(6))
        ));
        for (c, p) in [
            (Corruption::GaussianNoise, -0.1),
            (Corruption::ShotNoise, 0.0),
            (Corruption::ImpulseNoise, 1.5),
            (Corruption::Jpeg, 0.0),
            (Corruption::Jpeg, 50.5),
            (Corruption::Pixelate, 0.0),
            (Corruption::Pixelate, 1.5),
            (Corruption::Brightness, f64::NAN),
        ] {
            assert!(
                matches!(
                    corrupt_with_parameter(&ds, c, p, 0),
                    Err(CorruptError::Parameter { .. })
                ),
                "{c} {p}"
            );
        }
        let two = ImageDataset::new(vec![0; 2 * 4], vec![0], (2, 2, 2), vec!["a".into()])?;
        assert!(matches!(
            corrupt(&two, Corruption::Jpeg, 1, 0),
            Err(CorruptError::Channels { channels: 2, .. })
        ));
        assert!(corrupt(&two, Corruption::Brightness, 1, 0).is_ok());
        assert_eq!("jpeg".parse::<Corruption>(), Ok(Corruption::Jpeg));
        assert_eq!(
            "Gaussian-Noise".parse::<Corruption>(),
            Ok(Corruption::GaussianNoise)
        );
        for c in Corruption::ALL {
            assert_eq!(c.to_string().parse::<Corruption>(), Ok(c));
        }
        assert!("fog".parse::<Corruption>().is_err());
        Ok(())
    }
}
