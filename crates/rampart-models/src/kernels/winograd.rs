//! Winograd F(2×2, 3×3) for the 3×3, stride-1, padding-1 convolutions of the fused CPU
//! paths (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks").
//!
//! Each 2×2 block of outputs ("tile") is computed from the 4×4 input window around it:
//! the window is transformed (V = Bᵀ d B), the 16 transformed values are multiplied
//! channel-wise by the transformed kernel (U = G g Gᵀ) — sixteen GEMMs of
//! (tiles × C_in)·(C_in × C_out), one per position of the 4×4 transform — and the
//! products are transformed back (Y = Aᵀ M A). That is 16 multiply-adds per tile and
//! channel pair where im2col + GEMM does 36: 2.25× fewer, for the layers that hold
//! almost all of a WRN's arithmetic, in the forward pass and, through the transposed
//! kernel, in the input gradient. The transforms use only additions and halvings, so
//! results agree with the direct convolution to f32 rounding (tests compare them).

// The transforms index several small arrays by the same positions (i, j, lane):
// explicit index loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::common::{with_scratch, Affine};
use super::gemm::{sgemm, MatRef};

/// Tiles per block, at most: the sixteen V and M matrices of a block stay within a
/// few MiB.
const BLOCK_TILES: usize = 512;

/// A 3×3 stride-1 padding-1 convolution in the Winograd domain.
#[derive(Clone, Debug)]
pub(crate) struct Winograd {
    /// U[ξ] = (G g Gᵀ)[ξ] as 16 matrices C_in × C_out, row-major.
    u: Vec<f32>,
    c_in: usize,
    c_out: usize,
}

impl Winograd {
    /// From a kernel in (C_out, 9·C_in) layout, patch order (ky, kx, c).
    pub(crate) fn new(w: &[f32], c_in: usize, c_out: usize) -> Self {
        let mut u = vec![0f32; 16 * c_in * c_out];
        for co in 0..c_out {
            for ci in 0..c_in {
                let g = |ky: usize, kx: usize| w[co * 9 * c_in + (ky * 3 + kx) * c_in + ci];
                // G g: 4×3.
                let mut t = [[0f32; 3]; 4];
                for kx in 0..3 {
                    let (g0, g1, g2) = (g(0, kx), g(1, kx), g(2, kx));
                    t[0][kx] = g0;
                    t[1][kx] = 0.5 * (g0 + g1 + g2);
                    t[2][kx] = 0.5 * (g0 - g1 + g2);
                    t[3][kx] = g2;
                }
                // (G g) Gᵀ: 4×4.
                for (i, r) in t.iter().enumerate() {
                    let row = [
                        r[0],
                        0.5 * (r[0] + r[1] + r[2]),
                        0.5 * (r[0] - r[1] + r[2]),
                        r[2],
                    ];
                    for (j, v) in row.into_iter().enumerate() {
                        u[((i * 4 + j) * c_in + ci) * c_out + co] = v;
                    }
                }
            }
        }
        Winograd { u, c_in, c_out }
    }

    /// Calls `f(t0, nt, v, rest)` for consecutive blocks of at most [`BLOCK_TILES`] of the
    /// tiles of `input` (n images H×W×C_in), with `v` the blocks's transformed inputs
    /// V[ξ][t][c] and `rest` `extra` floats per tile and ξ of this thread's scratch.
    fn for_each_block(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        extra: usize,
        mut f: impl FnMut(usize, usize, &[f32], &mut [f32]),
    ) {
        let ci = self.c_in;
        let n = input.len() / (h * w * ci);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = n * th * tw;
        let block = BLOCK_TILES.min(tiles.max(1));
        let zeros = vec![0f32; ci];
        with_scratch(16 * block * (ci + extra), |buf| {
            let (v, rest) = buf.split_at_mut(16 * block * ci);
            for t0 in (0..tiles).step_by(block) {
                let nt = block.min(tiles - t0);
                for t in 0..nt {
                    let (img, y0, x0) = self.tile(t0 + t, th, tw);
                    let image = &input[img * h * w * ci..][..h * w * ci];
                    // d[i][j] = pixel (y0 − 1 + i, x0 − 1 + j), zero outside.
                    let px = |i: usize, j: usize| -> &[f32] {
                        match ((y0 + i).checked_sub(1), (x0 + j).checked_sub(1)) {
                            (Some(y), Some(x)) if y < h && x < w => {
                                &image[(y * w + x) * ci..][..ci]
                            }
                            _ => &zeros,
                        }
                    };
                    let d: [[&[f32]; 4]; 4] =
                        std::array::from_fn(|i| std::array::from_fn(|j| px(i, j)));
                    input_transform(&d, v, t, nt, ci);
                }
                f(t0, nt, &v[..16 * nt * ci], &mut rest[..16 * nt * extra]);
            }
        });
    }

    /// Tile `tile` of the n·⌈H/2⌉·⌈W/2⌉: (image, top output row, left output column).
    fn tile(&self, tile: usize, th: usize, tw: usize) -> (usize, usize, usize) {
        let (img, q) = (tile / (th * tw), tile % (th * tw));
        (img, 2 * (q / tw), 2 * (q % tw))
    }

    /// Offsets in an (n·H·W × C) matrix of the four output pixels of a tile (row-major
    /// 2×2), `None` past the image's edge.
    fn pixels(
        img: usize,
        y0: usize,
        x0: usize,
        h: usize,
        w: usize,
        c: usize,
    ) -> [Option<usize>; 4] {
        std::array::from_fn(|p| {
            let (py, px) = (y0 + p / 2, x0 + p % 2);
            (py < h && px < w).then_some(((img * h + py) * w + px) * c)
        })
    }

    /// `out` (n·H·W × C_out) = conv(input) (`+=` when `accumulate`), then
    /// `relu(out·scale + shift)` when `epilogue` is given; `input` is n images H×W×C_in.
    pub(crate) fn forward(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        out: &mut [f32],
        accumulate: bool,
        epilogue: Option<&Affine>,
    ) {
        let (ci, co) = (self.c_in, self.c_out);
        if h == 0 || w == 0 {
            return;
        }
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        self.for_each_block(input, h, w, co, |t0, nt, v, m| {
            // Sixteen GEMMs: M[ξ] (nt × C_out) = V[ξ] (nt × C_in) · U[ξ].
            for xi in 0..16 {
                let a = MatRef::row_major(&v[xi * nt * ci..][..nt * ci], nt, ci);
                let b = MatRef::row_major(&self.u[xi * ci * co..][..ci * co], ci, co);
                sgemm(&mut m[xi * nt * co..][..nt * co], a, b, false);
            }
            // Output transform into the (up to) four pixels of each tile.
            for t in 0..nt {
                let (img, y0, x0) = self.tile(t0 + t, th, tw);
                let pixels = Self::pixels(img, y0, x0, h, w, co);
                output_transform(m, t, nt, co, pixels, out, accumulate);
                if let Some(affine) = epilogue {
                    for at in pixels.into_iter().flatten() {
                        affine.relu_in_place(&mut out[at..at + co]);
                    }
                }
            }
        });
    }

    /// Adds the kernel gradient for output gradient `dy` (n·H·W × C_out) and `input`
    /// (n images H×W×C_in) into `acc` (C_out × 9·C_in, patch order (ky, kx, c)): the
    /// adjoint of the forward pass, dU[ξ] = Σ_tiles V[ξ]ᵀ·(A dY Aᵀ)[ξ], then
    /// dg = Gᵀ dU G.
    pub(crate) fn backward_weight(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        dy: &[f32],
        acc: &mut [f32],
    ) {
        let (ci, co) = (self.c_in, self.c_out);
        if h == 0 || w == 0 {
            return;
        }
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let mut du = vec![0f32; 16 * ci * co];
        self.for_each_block(input, h, w, co, |t0, nt, v, dm| {
            for t in 0..nt {
                let (img, y0, x0) = self.tile(t0 + t, th, tw);
                grad_output_transform(dy, Self::pixels(img, y0, x0, h, w, co), dm, t, nt, co);
            }
            for xi in 0..16 {
                let a = MatRef::row_major(&v[xi * nt * ci..][..nt * ci], nt, ci).t();
                let b = MatRef::row_major(&dm[xi * nt * co..][..nt * co], nt, co);
                sgemm(&mut du[xi * ci * co..][..ci * co], a, b, true);
            }
        });
        // dg = Gᵀ dU G, G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]].
        let gt = |x: [f32; 4]| {
            [
                x[0] + 0.5 * (x[1] + x[2]),
                0.5 * (x[1] - x[2]),
                0.5 * (x[1] + x[2]) + x[3],
            ]
        };
        for c in 0..ci {
            for o in 0..co {
                let x = |i: usize, j: usize| du[((4 * i + j) * ci + c) * co + o];
                let rows: [[f32; 3]; 4] =
                    std::array::from_fn(|i| gt([x(i, 0), x(i, 1), x(i, 2), x(i, 3)]));
                for kx in 0..3 {
                    let col = gt([rows[0][kx], rows[1][kx], rows[2][kx], rows[3][kx]]);
                    for (ky, g) in col.into_iter().enumerate() {
                        acc[o * 9 * ci + (ky * 3 + kx) * ci + c] += g;
                    }
                }
            }
        }
    }
}

/// dM[ξ][t] = (A dY Aᵀ)[ξ] for tile `t` of a block of `nt`, from the output gradient
/// rows of its pixels (zero past the image's edge); A = [[1,0],[1,1],[1,−1],[0,−1]].
fn grad_output_transform(
    dy: &[f32],
    pixels: [Option<usize>; 4],
    dm: &mut [f32],
    t: usize,
    nt: usize,
    c: usize,
) {
    let stride = nt * c;
    let full = c - c % LANES;
    let zeros = [0f32; LANES];
    for k in (0..full).step_by(LANES) {
        let g: [&Lanes; 4] =
            std::array::from_fn(|p| pixels[p].map_or(&zeros, |base| at(dy, base + k)));
        // s = A dY (4×2): rows dY0, dY0 + dY1, dY0 − dY1, −dY1.
        let mut s = [[[0f32; LANES]; 2]; 4];
        for q in 0..LANES {
            s[0][0][q] = g[0][q];
            s[0][1][q] = g[1][q];
            s[1][0][q] = g[0][q] + g[2][q];
            s[1][1][q] = g[1][q] + g[3][q];
            s[2][0][q] = g[0][q] - g[2][q];
            s[2][1][q] = g[1][q] - g[3][q];
            s[3][0][q] = -g[2][q];
            s[3][1][q] = -g[3][q];
        }
        // dM = s Aᵀ (4×4).
        for (i, si) in s.iter().enumerate() {
            let base = 4 * i * stride + t * c + k;
            let o = at_mut(dm, base);
            o.copy_from_slice(&si[0]);
            let o = at_mut(dm, base + stride);
            for q in 0..LANES {
                o[q] = si[0][q] + si[1][q];
            }
            let o = at_mut(dm, base + 2 * stride);
            for q in 0..LANES {
                o[q] = si[0][q] - si[1][q];
            }
            let o = at_mut(dm, base + 3 * stride);
            for q in 0..LANES {
                o[q] = -si[1][q];
            }
        }
    }
    for k in full..c {
        let g = |p: usize| pixels[p].map_or(0.0, |base| dy[base + k]);
        let (g00, g01, g10, g11) = (g(0), g(1), g(2), g(3));
        let s = [
            [g00, g01],
            [g00 + g10, g01 + g11],
            [g00 - g10, g01 - g11],
            [-g10, -g11],
        ];
        for (i, si) in s.iter().enumerate() {
            let base = 4 * i * stride + t * c + k;
            dm[base] = si[0];
            dm[base + stride] = si[0] + si[1];
            dm[base + 2 * stride] = si[0] - si[1];
            dm[base + 3 * stride] = -si[1];
        }
    }
}

/// Channels per step of the transforms: one AVX-512 register of f32.
const LANES: usize = 16;

type Lanes = [f32; LANES];

/// `LANES` values of `s` from `at` as a fixed-size array reference.
#[inline(always)]
fn at(s: &[f32], at: usize) -> &Lanes {
    s[at..at + LANES].try_into().expect("a whole register")
}

#[inline(always)]
fn at_mut(s: &mut [f32], at: usize) -> &mut Lanes {
    (&mut s[at..at + LANES])
        .try_into()
        .expect("a whole register")
}

#[inline(always)]
fn add(a: &Lanes, b: &Lanes) -> Lanes {
    let mut o = [0f32; LANES];
    for q in 0..LANES {
        o[q] = a[q] + b[q];
    }
    o
}

#[inline(always)]
fn sub(a: &Lanes, b: &Lanes) -> Lanes {
    let mut o = [0f32; LANES];
    for q in 0..LANES {
        o[q] = a[q] - b[q];
    }
    o
}

/// V[ξ][t][c] = (Bᵀ d B)[ξ] for the 4×4 window `d` (rows of C channels) of tile `t` of
/// a block of `nt` tiles; Bᵀ = [[1,0,−1,0],[0,1,1,0],[0,−1,1,0],[0,1,0,−1]].
fn input_transform(d: &[[&[f32]; 4]; 4], v: &mut [f32], t: usize, nt: usize, c: usize) {
    let full = c - c % LANES;
    let stride = nt * c;
    for k in (0..full).step_by(LANES) {
        let x = |i: usize, j: usize| at(d[i][j], k);
        for i in 0..4 {
            // Row i of Bᵀ d, one register per column j.
            let r: [Lanes; 4] = [0, 1, 2, 3].map(|j| match i {
                0 => sub(x(0, j), x(2, j)),
                1 => add(x(1, j), x(2, j)),
                2 => sub(x(2, j), x(1, j)),
                _ => sub(x(1, j), x(3, j)),
            });
            // Times B, stored at ξ = 4·i + j.
            let base = (4 * i * nt + t) * c + k;
            *at_mut(v, base) = sub(&r[0], &r[2]);
            *at_mut(v, base + stride) = add(&r[1], &r[2]);
            *at_mut(v, base + 2 * stride) = sub(&r[2], &r[1]);
            *at_mut(v, base + 3 * stride) = sub(&r[1], &r[3]);
        }
    }
    // The last channels (C not a multiple of 16), one at a time.
    for k in full..c {
        let x = |i: usize, j: usize| d[i][j][k];
        for i in 0..4 {
            let r = |j: usize| match i {
                0 => x(0, j) - x(2, j),
                1 => x(1, j) + x(2, j),
                2 => x(2, j) - x(1, j),
                _ => x(1, j) - x(3, j),
            };
            let base = (4 * i * nt + t) * c + k;
            v[base] = r(0) - r(2);
            v[base + stride] = r(1) + r(2);
            v[base + 2 * stride] = r(2) - r(1);
            v[base + 3 * stride] = r(1) - r(3);
        }
    }
}

/// Writes (or, with `accumulate`, adds) the output pixels of tile `t`, (Aᵀ M A) with
/// Aᵀ = [[1,1,1,0],[0,1,−1,−1]], at the offsets `pixels` (row-major 2×2, `None`
/// past the image's edge) of `out`.
fn output_transform(
    m: &[f32],
    t: usize,
    nt: usize,
    c: usize,
    pixels: [Option<usize>; 4],
    out: &mut [f32],
    accumulate: bool,
) {
    let full = c - c % LANES;
    let stride = nt * c;
    let put = |out: &mut [f32], p: usize, k: usize, y: &Lanes| {
        if let Some(base) = pixels[p] {
            let o = at_mut(out, base + k);
            if accumulate {
                for q in 0..LANES {
                    o[q] += y[q];
                }
            } else {
                *o = *y;
            }
        }
    };
    for k in (0..full).step_by(LANES) {
        let x = |xi: usize| at(m, xi * stride + t * c + k);
        // Rows: r = Aᵀ M (2×4).
        let mut r = [[[0f32; LANES]; 4]; 2];
        for j in 0..4 {
            let (a, b, cc, d) = (x(j), x(4 + j), x(8 + j), x(12 + j));
            for q in 0..LANES {
                r[0][j][q] = a[q] + b[q] + cc[q];
                r[1][j][q] = b[q] - cc[q] - d[q];
            }
        }
        // Columns: r A (2×2).
        for (i, ri) in r.iter().enumerate() {
            let mut y0 = [0f32; LANES];
            let mut y1 = [0f32; LANES];
            for q in 0..LANES {
                y0[q] = ri[0][q] + ri[1][q] + ri[2][q];
                y1[q] = ri[1][q] - ri[2][q] - ri[3][q];
            }
            put(out, 2 * i, k, &y0);
            put(out, 2 * i + 1, k, &y1);
        }
    }
    for k in full..c {
        let x = |xi: usize| m[xi * stride + t * c + k];
        for i in 0..2 {
            let r = |j: usize| {
                if i == 0 {
                    x(j) + x(4 + j) + x(8 + j)
                } else {
                    x(4 + j) - x(8 + j) - x(12 + j)
                }
            };
            for (dx, y) in [r(0) + r(1) + r(2), r(1) - r(2) - r(3)]
                .into_iter()
                .enumerate()
            {
                if let Some(base) = pixels[2 * i + dx] {
                    if accumulate {
                        out[base + k] += y;
                    } else {
                        out[base + k] = y;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Calls `f(output pixel, input pixel, tap ky·3 + kx)` for every tap of a 3×3
    /// "same" window that lies inside the n images H×W (pixels as flat indices).
    fn taps(n: usize, h: usize, w: usize, mut f: impl FnMut(usize, usize, usize)) {
        for img in 0..n {
            for y in 0..h {
                for x in 0..w {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (Some(iy), Some(ix)) =
                                ((y + ky).checked_sub(1), (x + kx).checked_sub(1))
                            else {
                                continue;
                            };
                            if iy < h && ix < w {
                                f((img * h + y) * w + x, (img * h + iy) * w + ix, ky * 3 + kx);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The direct 3×3 "same" cross-correlation, in f64.
    fn direct(
        input: &[f32],
        w: &[f32],
        n: usize,
        h: usize,
        wd: usize,
        ci: usize,
        co: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * h * wd * co];
        taps(n, h, wd, |out_px, in_px, tap| {
            for o in 0..co {
                for c in 0..ci {
                    out[out_px * co + o] +=
                        f64::from(input[in_px * ci + c]) * f64::from(w[o * 9 * ci + tap * ci + c]);
                }
            }
        });
        out
    }

    /// Odd and even sizes, a block boundary inside an image, accumulation and the
    /// BatchNorm+ReLU epilogue, against the direct convolution.
    #[test]
    fn matches_direct_convolution() {
        for (n, h, w, ci, co) in [
            (2, 5, 7, 16, 24),
            (3, 8, 8, 32, 16),
            (1, 1, 3, 16, 16),
            (600, 2, 2, 16, 16),
        ] {
            let input = values(n * h * w * ci, 1);
            let kernel = values(co * 9 * ci, 2);
            let wg = Winograd::new(&kernel, ci, co);
            let reference = direct(&input, &kernel, n, h, w, ci, co);
            let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
            let mut out = vec![f32::NAN; n * h * w * co];
            wg.forward(&input, h, w, &mut out, false, None);
            for (a, b) in out.iter().zip(&reference) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-5 * scale,
                    "{n}×{h}×{w} {ci}→{co}: {a} vs {b}"
                );
            }
            // Accumulate onto existing values, then the epilogue.
            let base = values(out.len(), 3);
            let mut acc = base.clone();
            let (sc, sh) = (values(co, 4), values(co, 5));
            let affine = Affine::from_scale_shift(sc.clone(), sh.clone());
            wg.forward(&input, h, w, &mut acc, true, Some(&affine));
            for (i, (a, b)) in acc.iter().zip(&reference).enumerate() {
                let c = i % co;
                let want =
                    ((f64::from(base[i]) + b) * f64::from(sc[c]) + f64::from(sh[c])).max(0.0);
                assert!(
                    (f64::from(*a) - want).abs() < 1e-5 * (scale + 1.0),
                    "accumulate: {a} vs {want}"
                );
            }
        }
    }

    /// The kernel gradient against Σ dy·input over every output pixel, accumulated
    /// onto existing values.
    #[test]
    fn weight_gradient_matches_direct_sum() {
        for (n, h, w, ci, co) in [(2, 5, 7, 16, 24), (1, 4, 6, 24, 16), (600, 2, 2, 16, 16)] {
            let input = values(n * h * w * ci, 6);
            let dy = values(n * h * w * co, 7);
            let wg = Winograd::new(&values(co * 9 * ci, 8), ci, co);
            let start = values(co * 9 * ci, 9);
            let mut acc = start.clone();
            wg.backward_weight(&input, h, w, &dy, &mut acc);
            let mut reference: Vec<f64> = start.iter().map(|v| f64::from(*v)).collect();
            taps(n, h, w, |out_px, in_px, tap| {
                for o in 0..co {
                    let g = f64::from(dy[out_px * co + o]);
                    for c in 0..ci {
                        reference[o * 9 * ci + tap * ci + c] +=
                            g * f64::from(input[in_px * ci + c]);
                    }
                }
            });
            let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (a, b) in acc.iter().zip(&reference) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-5 * scale,
                    "{n}×{h}×{w} {ci}→{co}: {a} vs {b}"
                );
            }
        }
    }
}
