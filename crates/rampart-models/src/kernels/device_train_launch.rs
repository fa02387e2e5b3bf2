//! The train program's kernel launches and the compositions around cuDNN's
//! BatchNorm, written once over a [`Backend`] (a [`Launcher`] with convolutions,
//! BatchNorm and copies): the CUDA executor runs them on a GPU, the tests' emulated
//! executor on the CPU (`device_train_emulated.rs`), where they are held to the CPU
//! executor.

// Without CUDA the launches run only in the tests (the emulated executor).
#![cfg_attr(not(any(test, feature = "cudnn")), allow(dead_code))]

use candle_core::Result;

use super::super::device_eval::launches::{self as eval, Fc};
use super::super::device_eval::same_len;
use super::super::launch::{count, Backend, KArg, KLaunch, Launcher, Source};
use super::{dot_blocks, TFc, TNoise, TNorm, DOT_THREADS};

use KArg::{B, F32, U32};

/// The element-wise `kernel` that updates `d` in place from `r` (as many values;
/// `what` names them in errors).
fn in_place<L: Launcher>(
    l: &L,
    kernel: &'static str,
    d: &mut L::Buf,
    r: &L::Buf,
    what: &str,
) -> Result<()> {
    let n = L::size(d);
    same_len(n, L::size(r), what)?;
    let args = vec![B(l.all_mut(d)?), B(l.all(r)?), U32(count(n, what)?)];
    l.run(KLaunch::programs(kernel, n, args)?)
}

/// `d += r`.
pub(crate) fn add_in_place<L: Launcher>(l: &L, d: &mut L::Buf, r: &L::Buf) -> Result<()> {
    in_place(l, "de_add_inplace", d, r, "residual gradient")
}

/// `d ← d·[y > 0]`.
pub(crate) fn relu_mask<L: Launcher>(l: &L, d: &mut L::Buf, y: &L::Buf) -> Result<()> {
    in_place(l, "de_relu_mask_inplace", d, y, "ReLU gradient")
}

/// `y ← relu(y + r)`.
pub(crate) fn add_relu_in_place<L: Launcher>(l: &L, y: &mut L::Buf, r: &L::Buf) -> Result<()> {
    in_place(l, "dt_add_relu_inplace", y, r, "shortcut")
}

/// relu(bn(x)) with x's batch statistics, and those statistics
/// ([`super::TrainExec::bn_relu_train`]).
pub(crate) fn bn_relu_train<E: Backend>(
    e: &E,
    x: &E::Buf,
    p: &E::Buf,
    n: &TNorm,
    rows: usize,
) -> Result<(E::Buf, E::Buf)> {
    let (mut y, stats) = bn_train(e, x, p, n, rows)?;
    let len = E::size(&y);
    let args = vec![B(e.all_mut(&mut y)?), U32(count(len, "ReLU")?)];
    e.run(KLaunch::elementwise(
        Source::Ops,
        "relu_inplace",
        len,
        args,
    )?)?;
    Ok((y, stats))
}

/// The input gradient of relu(bn(x)) into `d`; [dγ | dβ] returned
/// ([`super::TrainExec::bn_relu_train_backward`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_relu_train_backward<E: Backend>(
    e: &E,
    x: &E::Buf,
    y: &E::Buf,
    d: &mut E::Buf,
    p: &E::Buf,
    n: &TNorm,
    stats: &E::Buf,
    rows: usize,
) -> Result<E::Buf> {
    relu_mask(e, d, y)?;
    bn_train_backward(e, x, d, p, n, stats, rows)
}

/// bn(x) with x's batch statistics ([`super::TrainExec::bn_train`]), through
/// [`super::TrainExec::bn_train_part`] on every row.
pub(crate) fn bn_train<E: Backend>(
    e: &E,
    x: &E::Buf,
    p: &E::Buf,
    n: &TNorm,
    rows: usize,
) -> Result<(E::Buf, E::Buf)> {
    same_len(E::size(x), rows * n.c, "BatchNorm input")?;
    let mut y = e.alloc(E::size(x))?;
    let stats = e.bn_part(x, &mut y, (0, rows), p, n, (n.gamma, n.beta))?;
    Ok((y, stats))
}

/// The input gradient of [`bn_train`] into `d`; [dγ | dβ] returned.
pub(crate) fn bn_train_backward<E: Backend>(
    e: &E,
    x: &E::Buf,
    d: &mut E::Buf,
    p: &E::Buf,
    n: &TNorm,
    stats: &E::Buf,
    rows: usize,
) -> Result<E::Buf> {
    same_len(E::size(x), rows * n.c, "BatchNorm input")?;
    let mut dx = e.alloc(E::size(x))?;
    let at = (n.gamma, n.beta);
    let dgb = e.bn_part_backward(x, d, &mut dx, (0, rows), p, n, at, stats)?;
    *d = dx;
    Ok(dgb)
}

/// FiLM and ReLU ([`super::TrainExec::film_relu`]).
pub(crate) fn film_relu<L: Launcher>(
    l: &L,
    h: &L::Buf,
    p: &L::Buf,
    film: usize,
    c: usize,
    per: usize,
) -> Result<L::Buf> {
    let len = L::size(h);
    let images = len / per.max(1);
    if film + images * 2 * c > L::size(p) {
        candle_core::bail!("fused train path: FiLM outputs past the parameters")
    }
    let mut y = l.alloc(len)?;
    let args = vec![
        B(l.all_mut(&mut y)?),
        B(l.all(h)?),
        B(l.read(p, film..film + images * 2 * c)?),
        U32(count(c, "channels")?),
        U32(count(per, "FiLM image")?),
        U32(count(len, "FiLM")?),
    ];
    l.run(KLaunch::programs("dt_film_relu", len, args)?)?;
    Ok(y)
}

/// The backward pass of FiLM ([`super::TrainExec::film_backward`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn film_backward<L: Launcher>(
    l: &L,
    d: &mut L::Buf,
    h: &L::Buf,
    p: &L::Buf,
    film: usize,
    c: usize,
    per: usize,
    grad: &mut L::Buf,
) -> Result<()> {
    same_len(L::size(d), L::size(h), "FiLM gradient")?;
    let images = L::size(h) / per.max(1);
    let len = images * 2 * c;
    if film + len > L::size(p) || film + len > L::size(grad) {
        candle_core::bail!("fused train path: FiLM outputs past the parameters")
    }
    let (c32, per32) = (count(c, "channels")?, count(per, "FiLM image")?);
    let args = vec![
        B(l.write(grad, film..film + len)?),
        B(l.all(d)?),
        B(l.all(h)?),
        U32(c32),
        U32(per32),
        U32(count(len, "FiLM gradient")?),
    ];
    l.run(KLaunch::programs("dt_film_grads", len, args)?)?;
    let n = L::size(d);
    let args = vec![
        B(l.all_mut(d)?),
        B(l.read(p, film..film + len)?),
        U32(c32),
        U32(per32),
        U32(count(n, "FiLM gradient")?),
    ];
    l.run(KLaunch::programs("dt_film_scale", n, args)?)
}

/// A student's noisy BatchNorm ([`super::TrainExec::bn_noise_relu_train`]): (y, the
/// statistics, σ).
pub(crate) fn bn_noise_relu_train<E: Backend>(
    e: &E,
    x: &E::Buf,
    p: &E::Buf,
    n: &TNorm,
    noise: &TNoise,
    rows: usize,
    z: &E::Buf,
) -> Result<(E::Buf, E::Buf, E::Buf)> {
    let c = n.c;
    same_len(E::size(z), E::size(x), "BatchNorm noise")?;
    let (mut y, stats) = bn_train(e, x, p, n, rows)?;
    let mut sigma = e.alloc(c)?;
    let c32 = count(c, "channels")?;
    let args = vec![
        B(e.all_mut(&mut sigma)?),
        B(e.read(p, n.gamma..n.gamma + c)?),
        B(e.all(&stats)?),
        F32(n.eps as f32),
        U32(c32),
    ];
    e.run(KLaunch::programs("dt_noise_sigma", c, args)?)?;
    if noise.alpha >= E::size(p) {
        candle_core::bail!("fused train path: a noise factor past the parameters")
    }
    let len = E::size(&y);
    let args = vec![
        B(e.all_mut(&mut y)?),
        B(e.all(z)?),
        B(e.all(&sigma)?),
        B(e.read(p, noise.alpha..noise.alpha + 1)?),
        F32(noise.scale),
        U32(c32),
        U32(count(len, "noisy BatchNorm")?),
    ];
    e.run(KLaunch::programs("dt_noise_relu_inplace", len, args)?)?;
    Ok((y, stats, sigma))
}

/// The backward pass of [`bn_noise_relu_train`]
/// ([`super::TrainExec::bn_noise_relu_train_backward`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_noise_relu_train_backward<E: Backend>(
    e: &E,
    x: &E::Buf,
    y: &E::Buf,
    d: &mut E::Buf,
    p: &E::Buf,
    n: &TNorm,
    noise: &TNoise,
    (stats, z, sigma): (&E::Buf, &E::Buf, &E::Buf),
    rows: usize,
    grad: &mut E::Buf,
) -> Result<E::Buf> {
    same_len(E::size(z), E::size(y), "BatchNorm noise")?;
    if noise.alpha >= E::size(grad) {
        candle_core::bail!("fused train path: a noise factor past the parameters")
    }
    relu_mask(e, d, y)?;
    let len = E::size(d);
    let blocks = dot_blocks(len);
    let mut partial = e.alloc(blocks)?;
    let args = vec![
        B(e.all_mut(&mut partial)?),
        B(e.all(d)?),
        B(e.all(z)?),
        B(e.all(sigma)?),
        U32(count(n.c, "channels")?),
        U32(count(len, "noise gradient")?),
    ];
    // DOT_THREADS threads per block: the kernel's static shared array.
    e.run(KLaunch::blocks(
        Source::Programs,
        "dt_noise_dot",
        blocks,
        DOT_THREADS as u32,
        args,
    )?)?;
    let args = vec![
        B(e.write(grad, noise.alpha..noise.alpha + 1)?),
        B(e.all(&partial)?),
        U32(count(blocks, "blocks")?),
        F32(noise.scale),
    ];
    e.run(KLaunch::blocks(
        Source::Programs,
        "dt_noise_alpha_grad",
        1,
        1,
        args,
    )?)?;
    bn_train_backward(e, x, d, p, n, stats, rows)
}

/// Pooling and the linear layer of `p` ([`super::TrainExec::pool_linear_at`]).
pub(crate) fn pool_linear_at<L: Launcher>(
    l: &L,
    x: &L::Buf,
    p: &L::Buf,
    fc: &TFc,
    hw: usize,
) -> Result<(L::Buf, L::Buf)> {
    eval::pool_linear(l, x, Fc::Params(p, fc.w, fc.b), hw, fc.c, fc.k)
}

/// The linear layer's parameter gradients into `grad` and the pooled activations'
/// gradient ([`super::TrainExec::linear_pool_backward_at`]).
pub(crate) fn linear_pool_backward_at<E: Backend>(
    e: &E,
    dl: &E::Buf,
    pooled: &E::Buf,
    p: &E::Buf,
    fc: &TFc,
    hw: usize,
    grad: &mut E::Buf,
) -> Result<E::Buf> {
    let (k, c) = (fc.k, fc.c);
    let b = E::size(dl) / k.max(1);
    same_len(E::size(dl), b * k, "logit gradient")?;
    same_len(E::size(pooled), b * c, "pooled activations")?;
    if fc.b != fc.w + k * c {
        candle_core::bail!("fused train path: the bias does not follow the weight")
    }
    let mut dwb = e.alloc(k * c + k)?;
    let args = vec![
        B(e.all_mut(&mut dwb)?),
        B(e.all(dl)?),
        B(e.all(pooled)?),
        U32(count(b, "images")?),
        U32(count(c, "channels")?),
        U32(count(k, "classes")?),
        U32(count(k * c + k, "linear gradient")?),
    ];
    e.run(KLaunch::programs("de_linear_param_grads", k * c + k, args)?)?;
    e.place(grad, fc.w, &dwb)?;
    eval::linear_pool_backward(e, dl, Fc::Params(p, fc.w, fc.b), hw, c, k)
}
