//! The normalisation layers of the fused train path: BatchNorm with batch statistics
//! and ReLU, with a stochastic student's noise or an OAT model's dual BatchNorm and
//! FiLM, forward and backward over plain slices.
//!
//! * **Plain**: relu(BN(x)).
//! * **Student**: relu(BN(x) + α·σ·s·z): σ the channel's standard deviation of BN(x)
//!   over the batch (a constant for the backward pass, as in the layer-by-layer
//!   path), z drawn per image by [`fill_image`] from the layer's seed, s the noise
//!   scale; α receives Σ dL/dh·σ·s·z.
//! * **OAT**: relu(BN_g(x)·(1 + γ_e) + β_e): the batch arrives sorted so that the
//!   examples of λ = 0 come first and use the layer's own BatchNorm, the others its
//!   second one (each group with its own batch statistics); (γ_e, β_e) are the FiLM
//!   outputs of example e, a part of the flat input like any parameter, so their
//!   gradient flows back into the FiLM network outside the op.

use super::bn::BnForward;
use super::common::Affine;
use super::noise::fill_image;
use super::preact::NormParams;
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// Where a normalisation layer's parameters sit in the flat vector: γ and β (β right
/// after γ), a noisy layer's α, an OAT layer's second γ, β and its FiLM rows.
#[derive(Clone, Copy, Debug)]
pub(super) struct BnAt {
    pub(super) offset: usize,
    pub(super) c: usize,
    eps: f32,
    alpha: Option<usize>,
    adv: Option<usize>,
    /// (B, 2C) FiLM outputs [γ_e | β_e] in the caller's batch order.
    film: Option<usize>,
}

impl BnAt {
    fn gamma_beta(flat: &[f32], offset: usize, c: usize) -> (&[f32], &[f32]) {
        (&flat[offset..][..c], &flat[offset + c..][..c])
    }
}

/// Appends a normalisation layer's tensors to the flat vector being laid out.
pub(super) fn push_norm(
    bn: &NormParams<'_>,
    tensors: &mut Vec<Tensor>,
    offset: &mut usize,
) -> Result<BnAt> {
    let c = bn.gamma.elem_count();
    let mut push = |t: &Tensor, tensors: &mut Vec<Tensor>| -> Result<usize> {
        let at = *offset;
        *offset += t.elem_count();
        tensors.push(t.flatten_all()?);
        Ok(at)
    };
    let at = push(bn.gamma, tensors)?;
    push(bn.beta, tensors)?;
    let alpha = match bn.alpha {
        Some(a) if a.elem_count() != 1 => {
            candle_core::bail!("fused train path: a noise factor of {:?}", a.dims())
        }
        Some(a) => Some(push(a, tensors)?),
        None => None,
    };
    let adv = match bn.adv {
        Some((g, b)) => {
            let o = push(g, tensors)?;
            push(b, tensors)?;
            Some(o)
        }
        None => None,
    };
    let film = match &bn.film {
        Some(f) => {
            if f.dim(1)? != 2 * c {
                candle_core::bail!(
                    "fused train path: FiLM outputs {:?} for {c} channels",
                    f.dims()
                )
            }
            Some(push(f, tensors)?)
        }
        None => None,
    };
    if alpha.is_some() && (adv.is_some() || film.is_some()) {
        candle_core::bail!("fused train path: noise and λ conditioning in one layer")
    }
    Ok(BnAt {
        offset: at,
        c,
        eps: bn.eps,
        alpha,
        adv,
        film,
    })
}

/// The noise of one layer in one forward pass: its seed and scale, drawn by the caller
/// from the model's generator (in [`super::preact::PreAct::norms`] order), and the
/// index in the global batch of the batch's first image (nonzero on a data-parallel
/// worker: image i of its part draws the values of global image `first + i`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct NoiseSeed {
    pub(crate) seed: u64,
    pub(crate) first: usize,
    pub(crate) scale: f32,
}

/// How the images of a batch are ordered inside the op: `order[j]` is the caller's
/// row of the op's image j; the first `own` images use each layer's own BatchNorm, the
/// rest an OAT layer's second one.
#[derive(Clone, Debug)]
pub(super) struct Batch {
    pub(super) order: Vec<usize>,
    pub(super) own: usize,
}

/// One group of images normalised with one set of batch statistics.
#[derive(Clone, Debug)]
struct Group {
    images: Range<usize>,
    /// Offset of the group's γ (β follows).
    offset: usize,
    bn: BnForward,
    var: Vec<f32>,
}

/// The noise α·σ·s·z of one layer in a training step.
#[derive(Clone, Debug)]
struct LayerNoise {
    /// σ per channel: the standard deviation of BN(x) over the batch.
    sigma: Vec<f32>,
    scale: f32,
    /// z, as the activations (B, H, W, C).
    z: Vec<f32>,
}

/// What a layer's backward pass needs from its forward pass.
#[derive(Clone, Debug)]
pub(super) struct Stats {
    groups: Vec<Group>,
    noise: Option<LayerNoise>,
}

/// Batch statistics of one BatchNorm: mean and biased variance over `rows` rows.
#[derive(Clone, Debug)]
pub(crate) struct GroupStats {
    pub(crate) mean: Vec<f32>,
    pub(crate) var: Vec<f32>,
    pub(crate) rows: usize,
}

/// What one normalisation layer's running estimates are updated from.
#[derive(Clone, Debug)]
pub(crate) struct BnBatch {
    /// The layer's own BatchNorm (None when no example used it).
    pub(crate) own: Option<GroupStats>,
    /// An OAT layer's second BatchNorm (None when no example used it).
    pub(crate) adv: Option<GroupStats>,
    /// A noisy layer's σ.
    pub(crate) sigma: Option<Vec<f32>>,
}

impl BnBatch {
    pub(super) fn of(st: &Stats, at: BnAt, pixels: usize) -> Self {
        let stats = |g: &Group| GroupStats {
            mean: g.bn.mean.clone(),
            var: g.var.clone(),
            rows: g.images.len() * pixels,
        };
        BnBatch {
            own: st.groups.iter().find(|g| g.offset == at.offset).map(stats),
            adv: st
                .groups
                .iter()
                .find(|g| Some(g.offset) == at.adv)
                .map(stats),
            sigma: st.noise.as_ref().map(|z| z.sigma.clone()),
        }
    }
}

/// Rows per parallel work item of the element-wise loops.
fn rows_per_task(c: usize) -> usize {
    (16_384 / c.max(1)).max(1)
}

/// The FiLM factors (1 + γ_e, β_e) of the op's image j.
fn film_of(flat: &[f32], film: usize, c: usize, row: usize) -> (&[f32], &[f32]) {
    let p = &flat[film + row * 2 * c..][..2 * c];
    (&p[..c], &p[c..])
}

/// relu(norm(x)) with batch statistics over the n images of `x` (in the op's order
/// `batch`): returns the output and what the backward pass needs. `noise`: the layer's
/// seed and scale, for a noisy layer.
pub(super) fn forward(
    x: &[f32],
    n: usize,
    at: BnAt,
    flat: &[f32],
    noise: Option<NoiseSeed>,
    batch: &Batch,
) -> (Vec<f32>, Stats) {
    forward_impl(x, n, at, flat, noise, batch, true)
}

/// BN(x) with batch statistics and no ReLU (a post-activation block's second
/// BatchNorm and its shortcut's, whose ReLU follows the sum): plain layers.
pub(super) fn forward_linear(
    x: &[f32],
    n: usize,
    at: BnAt,
    flat: &[f32],
    batch: &Batch,
) -> (Vec<f32>, Stats) {
    forward_impl(x, n, at, flat, None, batch, false)
}

#[allow(clippy::too_many_arguments)]
fn forward_impl(
    x: &[f32],
    n: usize,
    at: BnAt,
    flat: &[f32],
    noise: Option<NoiseSeed>,
    batch: &Batch,
    relu: bool,
) -> (Vec<f32>, Stats) {
    let c = at.c;
    let per_image = x.len() / n.max(1);
    let ranges = match at.adv {
        Some(adv) => vec![(0..batch.own, at.offset), (batch.own..n, adv)],
        None => vec![(0..n, at.offset)],
    };
    let plain = noise.is_none() && at.film.is_none();
    let mut y = vec![0f32; x.len()];
    let mut groups = Vec::new();
    for (images, offset) in ranges.into_iter().filter(|(r, _)| !r.is_empty()) {
        let xs = &x[images.start * per_image..images.end * per_image];
        let (mean, var) = super::bn::mean_var(xs, c);
        let bn = BnForward {
            inv_std: var.iter().map(|v| 1.0 / (v + at.eps).sqrt()).collect(),
            mean,
            // Noise and FiLM sit between the BatchNorm and the ReLU: those layers mask
            // the gradient by their own output.
            relu: plain && relu,
            batch_stats: true,
        };
        let (gamma, beta) = BnAt::gamma_beta(flat, offset, c);
        let (scale, shift) = bn.scale_shift(gamma, beta);
        let ys = &mut y[images.start * per_image..images.end * per_image];
        match (at.film, noise) {
            (Some(film), _) => {
                ys.par_chunks_mut(per_image.max(1))
                    .zip(xs.par_chunks(per_image.max(1)))
                    .enumerate()
                    .for_each(|(i, (yi, xi))| {
                        let (g, b) = film_of(flat, film, c, batch.order[images.start + i]);
                        for (yr, xr) in yi.chunks_exact_mut(c).zip(xi.chunks_exact(c)) {
                            for (ch, (o, v)) in yr.iter_mut().zip(xr).enumerate() {
                                let h = v * scale[ch] + shift[ch];
                                *o = (h * (1.0 + g[ch]) + b[ch]).max(0.0);
                            }
                        }
                    });
            }
            _ => {
                let affine = Affine::from_scale_shift(scale, shift);
                let per = rows_per_task(c) * c;
                ys.par_chunks_mut(per)
                    .zip(xs.par_chunks(per))
                    .for_each(|(yc, xc)| {
                        if relu {
                            affine.relu_into(xc, yc)
                        } else {
                            affine.apply_into(xc, yc)
                        }
                    });
            }
        }
        groups.push(Group {
            images,
            offset,
            bn,
            var,
        });
    }
    let noise = match (noise, at.alpha, groups.first()) {
        (Some(noise), Some(alpha_at), Some(g)) => {
            Some(add_noise(x, &mut y, per_image, c, g, flat, alpha_at, noise))
        }
        _ => None,
    };
    (y, Stats { groups, noise })
}

/// y ← relu(BN(x) + α·σ·s·z) for a noisy layer (one group, the whole batch in the
/// caller's order); returns the noise for the backward pass.
#[allow(clippy::too_many_arguments)]
fn add_noise(
    x: &[f32],
    y: &mut [f32],
    per_image: usize,
    c: usize,
    g: &Group,
    flat: &[f32],
    alpha_at: usize,
    noise: NoiseSeed,
) -> LayerNoise {
    let (seed, s) = (noise.seed, noise.scale);
    let (gamma, beta) = BnAt::gamma_beta(flat, g.offset, c);
    let (scale, shift) = g.bn.scale_shift(gamma, beta);
    // σ of BN(x) = scale·x + shift over the batch: |scale|·√var (the layer-by-layer
    // path measures it on the BatchNorm's output, with 1e-5 under the root).
    let sigma: Vec<f32> = scale
        .iter()
        .zip(&g.var)
        .map(|(sc, v)| (sc * sc * v + 1e-5).sqrt())
        .collect();
    let amp: Vec<f32> = sigma.iter().map(|sg| flat[alpha_at] * sg * s).collect();
    let mut z = vec![0f32; x.len()];
    let per = per_image.max(1);
    z.par_chunks_mut(per)
        .zip(y.par_chunks_mut(per))
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(i, ((zi, yi), xi))| {
            fill_image(seed, noise.first + i, zi);
            for ((yr, xr), zr) in yi
                .chunks_exact_mut(c)
                .zip(xi.chunks_exact(c))
                .zip(zi.chunks_exact(c))
            {
                for (((((o, v), zv), sc), sh), a) in yr
                    .iter_mut()
                    .zip(xr)
                    .zip(zr)
                    .zip(&scale)
                    .zip(&shift)
                    .zip(&amp)
                {
                    *o = (v * sc + sh + a * zv).max(0.0);
                }
            }
        });
    LayerNoise { sigma, scale: s, z }
}

/// Backward pass of [`forward`]: `g` holds dL/dy and becomes dL/dx; the gradients of
/// γ and β (of each group's BatchNorm), of a noisy layer's α and of an OAT layer's
/// FiLM rows are written into `dflat`. `y`: the forward pass's output (its sign is
/// the ReLU mask).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    g: &mut [f32],
    x: &[f32],
    y: &[f32],
    st: &Stats,
    at: BnAt,
    flat: &[f32],
    dflat: &mut [f32],
    batch: &Batch,
) {
    let c = at.c;
    if let (Some(noise), Some(alpha_at)) = (&st.noise, at.alpha) {
        let per = rows_per_task(c) * c;
        let dalpha: f64 = g
            .par_chunks_mut(per)
            .zip(y.par_chunks(per))
            .zip(noise.z.par_chunks(per))
            .map(|((gc, yc), zc)| {
                let mut acc = vec![0f32; c];
                for ((gr, yr), zr) in gc
                    .chunks_exact_mut(c)
                    .zip(yc.chunks_exact(c))
                    .zip(zc.chunks_exact(c))
                {
                    for (((gv, yv), zv), a) in gr.iter_mut().zip(yr).zip(zr).zip(acc.iter_mut()) {
                        *gv *= f32::from(u8::from(*yv > 0.0));
                        *a += *gv * zv;
                    }
                }
                acc.iter()
                    .zip(&noise.sigma)
                    .map(|(a, sg)| f64::from(*a) * f64::from(*sg))
                    .sum::<f64>()
            })
            .sum();
        dflat[alpha_at] = (dalpha * f64::from(noise.scale)) as f32;
    }
    let n = batch.order.len();
    let per_image = x.len() / n.max(1);
    if let Some(film) = at.film {
        // Per image: dβ_e = Σ g, dγ_e = Σ g·BN(x), then g ← g·(1 + γ_e).
        let mut dfilm = vec![0f32; n * 2 * c];
        for grp in &st.groups {
            let (gamma, beta) = BnAt::gamma_beta(flat, grp.offset, c);
            let (scale, shift) = grp.bn.scale_shift(gamma, beta);
            let span = grp.images.start * per_image..grp.images.end * per_image;
            let rows: Vec<(usize, Vec<f32>)> = g[span.clone()]
                .par_chunks_mut(per_image.max(1))
                .zip(x[span.clone()].par_chunks(per_image.max(1)))
                .zip(y[span].par_chunks(per_image.max(1)))
                .enumerate()
                .map(|(i, ((gi, xi), yi))| {
                    let row = batch.order[grp.images.start + i];
                    let (fg, _) = film_of(flat, film, c, row);
                    let mut d = vec![0f32; 2 * c];
                    let (dg, db) = d.split_at_mut(c);
                    for ((gr, xr), yr) in gi
                        .chunks_exact_mut(c)
                        .zip(xi.chunks_exact(c))
                        .zip(yi.chunks_exact(c))
                    {
                        for ch in 0..c {
                            let gv = gr[ch] * f32::from(u8::from(yr[ch] > 0.0));
                            dg[ch] += gv * (xr[ch] * scale[ch] + shift[ch]);
                            db[ch] += gv;
                            gr[ch] = gv * (1.0 + fg[ch]);
                        }
                    }
                    (row, d)
                })
                .collect();
            for (row, d) in rows {
                dfilm[row * 2 * c..][..2 * c].copy_from_slice(&d);
            }
        }
        dflat[film..][..n * 2 * c].copy_from_slice(&dfilm);
    }
    for grp in &st.groups {
        let (gamma, beta) = BnAt::gamma_beta(flat, grp.offset, c);
        let span = grp.images.start * per_image..grp.images.end * per_image;
        let sums = grp
            .bn
            .backward_in_place(&mut g[span.clone()], &x[span], gamma, beta, true);
        for (d, v) in dflat[grp.offset..][..2 * c].iter_mut().zip(sums) {
            *d = v as f32;
        }
    }
}
