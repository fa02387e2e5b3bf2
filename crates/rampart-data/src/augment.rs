//! Per-example augmentation of uint8 C×H×W images: random crop with zero padding,
//! horizontal flip, cutout.
//!
//! Randomness and pixel work are apart: [`Augmentation::sample`] draws an
//! [`AugmentDraw`] (crop offset, flip, cutout centre) from an RNG, and
//! [`AugmentDraw::apply`] is a pure function of the image and the draw.

use rand::Rng;

/// Augmentation applied per example on uint8 C×H×W images, in this order:
/// random crop, horizontal flip, cutout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augmentation {
    /// Random-crop padding p: the image is padded with p zero pixels on every side and
    /// an H×W window is cut at an offset uniform in [0, 2p]². 0 = no crop.
    pub crop_padding: usize,
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
    /// Cutout (DeVries & Taylor, 2017): one square hole of this side, centre uniform
    /// over the image's pixels, clipped at the borders (so it may be smaller than
    /// side²), filled with 0 in every channel. `None` = no cutout.
    pub cutout: Option<usize>,
}

impl Augmentation {
    /// No augmentation: images pass through unchanged.
    pub fn none() -> Self {
        Self {
            crop_padding: 0,
            flip: false,
            cutout: None,
        }
    }

    /// The standard CIFAR recipe: 4-pixel zero-padded random crop and random flip.
    pub fn standard() -> Self {
        Self {
            crop_padding: 4,
            flip: true,
            cutout: None,
        }
    }

    /// This augmentation followed by a cutout hole of side `size`.
    pub fn with_cutout(self, size: usize) -> Self {
        Self {
            cutout: Some(size),
            ..self
        }
    }

    /// Whether this augmentation never changes an image.
    pub fn is_identity(&self) -> bool {
        self.crop_padding == 0 && !self.flip && !matches!(self.cutout, Some(s) if s > 0)
    }

    /// Draws the random choices for one image of height `h` and width `w`.
    pub fn sample<R: Rng + ?Sized>(&self, h: usize, w: usize, rng: &mut R) -> AugmentDraw {
        let p = self.crop_padding;
        let (dy, dx) = if p > 0 {
            (rng.gen_range(0..=2 * p), rng.gen_range(0..=2 * p))
        } else {
            (0, 0)
        };
        let flip = self.flip && rng.gen_bool(0.5);
        let cutout = match self.cutout {
            Some(size) if size > 0 && h > 0 && w > 0 => Some(Cutout {
                cy: rng.gen_range(0..h),
                cx: rng.gen_range(0..w),
                size,
            }),
            _ => None,
        };
        AugmentDraw {
            padding: p,
            dy,
            dx,
            flip,
            cutout,
        }
    }
}

/// One cutout hole: rows `cy - size/2 .. cy - size/2 + size` and the same for
/// columns around `cx`, clipped to the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cutout {
    /// Centre row.
    pub cy: usize,
    /// Centre column.
    pub cx: usize,
    /// Side of the (unclipped) square.
    pub size: usize,
}

impl Cutout {
    /// Half-open (row range, column range) covered in an H×W image.
    pub fn bounds(&self, h: usize, w: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let span = |c: usize, n: usize| {
            let start = c.saturating_sub(self.size / 2);
            let end = (c + self.size - self.size / 2).min(n);
            start.min(end)..end
        };
        (span(self.cy, h), span(self.cx, w))
    }
}

/// The random choices made for one image; applying it is deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AugmentDraw {
    /// Zero padding p of the crop (0 = none).
    pub padding: usize,
    /// Crop offset in the padded image, rows, in [0, 2p].
    pub dy: usize,
    /// Crop offset in the padded image, columns, in [0, 2p].
    pub dx: usize,
    /// Mirror left-right.
    pub flip: bool,
    /// The cutout hole, if any.
    pub cutout: Option<Cutout>,
}

impl AugmentDraw {
    /// Writes the augmented `src` into `dst`; both are C×H×W with `shape` = (C, H, W).
    ///
    /// Output pixel (y, x) is input pixel (y + dy − p, x' + dx − p), where x' is x or
    /// W−1−x when flipped, or 0 where that falls outside the input; then the cutout
    /// hole is zeroed.
    pub fn apply(&self, src: &[u8], shape: (usize, usize, usize), dst: &mut [u8]) {
        let (c, h, w) = shape;
        debug_assert_eq!(src.len(), c * h * w);
        debug_assert_eq!(dst.len(), c * h * w);
        let p = self.padding as isize;
        let (dy, dx) = (self.dy as isize - p, self.dx as isize - p);
        for ch in 0..c {
            let plane_in = &src[ch * h * w..(ch + 1) * h * w];
            let plane_out = &mut dst[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                let sy = y as isize + dy;
                let row_out = &mut plane_out[y * w..(y + 1) * w];
                if sy < 0 || sy >= h as isize {
                    row_out.fill(0);
                    continue;
                }
                let row_in = &plane_in[sy as usize * w..(sy as usize + 1) * w];
                for (x, out) in row_out.iter_mut().enumerate() {
                    let xx = if self.flip { w - 1 - x } else { x };
                    let sx = xx as isize + dx;
                    *out = if sx < 0 || sx >= w as isize {
                        0
                    } else {
                        row_in[sx as usize]
                    };
                }
            }
        }
        if let Some(hole) = self.cutout {
            let (rows, cols) = hole.bounds(h, w);
            for ch in 0..c {
                for y in rows.clone() {
                    let start = ch * h * w + y * w;
                    dst[start + cols.start..start + cols.end].fill(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const SHAPE: (usize, usize, usize) = (3, 5, 7);

    /// Distinct non-zero bytes, so moved or zeroed pixels are visible.
    fn image() -> Vec<u8> {
        (0..3 * 5 * 7).map(|i| (i % 250 + 1) as u8).collect()
    }

    fn run(draw: AugmentDraw, src: &[u8]) -> Vec<u8> {
        let mut dst = vec![0xAA; src.len()];
        draw.apply(src, SHAPE, &mut dst);
        dst
    }

    fn plain() -> AugmentDraw {
        AugmentDraw {
            padding: 0,
            dy: 0,
            dx: 0,
            flip: false,
            cutout: None,
        }
    }

    #[test]
    fn no_padding_no_flip_is_identity() {
        let src = image();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..10 {
            let draw = Augmentation::none().sample(5, 7, &mut rng);
            assert_eq!(run(draw, &src), src);
        }
        // A centred crop (offset p, p) is the identity too.
        let centred = AugmentDraw {
            padding: 4,
            dy: 4,
            dx: 4,
            ..plain()
        };
        assert_eq!(run(centred, &src), src);
    }

    #[test]
    fn flip_twice_is_identity_and_flip_mirrors_rows() {
        let src = image();
        let flip = AugmentDraw {
            flip: true,
            ..plain()
        };
        let once = run(flip, &src);
        assert_ne!(once, src);
        assert_eq!(once[0], src[6]); // channel 0, row 0: x = 0 takes x = W-1
        assert_eq!(once[2 * 35 + 4 * 7 + 2], src[2 * 35 + 4 * 7 + 4]);
        assert_eq!(run(flip, &once), src);
    }

    #[test]
    fn crop_shifts_and_zero_fills() {
        let src = image();
        // Offset (0, 0) with p = 2: output (y, x) = input (y - 2, x - 2).
        let out = run(
            AugmentDraw {
                padding: 2,
                ..plain()
            },
            &src,
        );
        let (_, h, w) = SHAPE;
        for ch in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let got = out[ch * h * w + y * w + x];
                    let want = if y < 2 || x < 2 {
                        0
                    } else {
                        src[ch * h * w + (y - 2) * w + x - 2]
                    };
                    assert_eq!(got, want, "ch {ch} y {y} x {x}");
                }
            }
        }
    }

    #[test]
    fn cutout_zeroes_exactly_a_clipped_square() {
        let src = vec![255u8; 3 * 5 * 7];
        let (_, h, w) = SHAPE;
        for (cy, cx, size, rows, cols) in [
            (2, 3, 3, 1..4, 2..5),  // inside
            (0, 0, 4, 0..2, 0..2),  // clipped at the top-left corner
            (4, 6, 4, 2..5, 4..7),  // clipped at the bottom-right corner
            (2, 3, 20, 0..5, 0..7), // larger than the image
        ] {
            let draw = AugmentDraw {
                cutout: Some(Cutout { cy, cx, size }),
                ..plain()
            };
            let out = run(draw, &src);
            for ch in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let inside = rows.contains(&y) && cols.contains(&x);
                        assert_eq!(
                            out[ch * h * w + y * w + x] == 0,
                            inside,
                            "({cy},{cx},{size}) at {y},{x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sampled_cutout_is_a_clipped_square_of_the_right_side() {
        let src = vec![200u8; 3 * 5 * 7];
        let aug = Augmentation::none().with_cutout(3);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..50 {
            let draw = aug.sample(5, 7, &mut rng);
            let out = run(draw, &src);
            let zero: Vec<(usize, usize)> = (0..35)
                .filter(|&i| out[i] == 0)
                .map(|i| (i / 7, i % 7))
                .collect();
            let (y0, y1) = (
                zero.iter().map(|p| p.0).min().unwrap_or(0),
                zero.iter().map(|p| p.0).max().unwrap_or(0),
            );
            let (x0, x1) = (
                zero.iter().map(|p| p.1).min().unwrap_or(0),
                zero.iter().map(|p| p.1).max().unwrap_or(0),
            );
            // A filled rectangle, at most 3×3, full 3 wide unless touching a border.
            assert_eq!(zero.len(), (y1 - y0 + 1) * (x1 - x0 + 1));
            assert!(y1 - y0 < 3 && x1 - x0 < 3);
            assert!(y1 - y0 == 2 || y0 == 0 || y1 == 4);
            assert!(x1 - x0 == 2 || x0 == 0 || x1 == 6);
            // All channels share the hole.
            assert_eq!(out[..35], out[35..70]);
        }
    }

    #[test]
    fn standard_draws_stay_in_range_and_flip_both_ways() {
        let aug = Augmentation::standard();
        assert_eq!(aug.with_cutout(8).cutout, Some(8));
        assert!(Augmentation::none().is_identity() && !aug.is_identity());
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let draws: Vec<_> = (0..200).map(|_| aug.sample(32, 32, &mut rng)).collect();
        assert!(draws
            .iter()
            .all(|d| d.dy <= 8 && d.dx <= 8 && d.padding == 4));
        assert!(draws.iter().any(|d| d.flip) && draws.iter().any(|d| !d.flip));
        assert!(draws.iter().any(|d| d.dy == 0) && draws.iter().any(|d| d.dy == 8));
    }
}
