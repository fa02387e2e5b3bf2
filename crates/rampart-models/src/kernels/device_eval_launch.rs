//! The eval program's kernel launches (`device_eval.cu`), written once over a
//! [`Launcher`]: the CUDA executor queues them on a GPU, the tests' emulated executor
//! runs them on the CPU (`device_eval_emulated.rs`), so the argument order and grid
//! below are what the tests hold to the CPU executor.

// Without CUDA the launches run only in the tests (the emulated executor).
#![cfg_attr(not(any(test, feature = "cudnn")), allow(dead_code))]

use candle_core::{Result, Tensor};

use super::super::launch::{count, KArg, KLaunch, Launcher};
use super::{noise_std, same_len, DNorm};

use KArg::{Null, B, F32, I32, U32};

/// γ, β, running mean and running variance of `n` (`c` values each), read.
fn norm<'a, L: Launcher>(l: &'a L, n: &'a DNorm, c: usize) -> Result<[KArg<L::Arg<'a>>; 4]> {
    Ok([
        B(l.tensor(&n.gamma, c, "BatchNorm scale")?),
        B(l.tensor(&n.beta, c, "BatchNorm shift")?),
        B(l.tensor(&n.mean, c, "running mean")?),
        B(l.tensor(&n.var, c, "running variance")?),
    ])
}

/// `lead`, then BatchNorm `n`'s γ, β, mean, var, ε, the channels and the count `len`:
/// the arguments of the eval-mode BatchNorm kernels.
fn with_norm<'a, L: Launcher>(
    l: &'a L,
    mut lead: Vec<KArg<L::Arg<'a>>>,
    n: &'a DNorm,
    c: usize,
    len: usize,
) -> Result<Vec<KArg<L::Arg<'a>>>> {
    lead.extend(norm(l, n, c)?);
    lead.extend([
        F32(n.eps),
        U32(count(c, "channels")?),
        U32(count(len, "BatchNorm")?),
    ]);
    Ok(lead)
}

/// `out` ← the NCHW images `x` (each `input` = [C, H, W]) normalised by `mean` and
/// `inv_std`, NHWC; `out` holds as many values as `x`.
pub(crate) fn normalise<'a, L: Launcher>(
    l: &'a L,
    out: &'a mut L::Buf,
    x: L::Arg<'a>,
    input: [usize; 3],
    mean: &'a Tensor,
    inv_std: &'a Tensor,
) -> Result<()> {
    let [c, h, w] = input;
    let n = L::size(out);
    let args = vec![
        B(l.tensor(mean, c, "mean")?),
        B(l.tensor(inv_std, c, "1/std")?),
        U32(count(c, "channels")?),
        U32(count(h * w, "pixels")?),
        U32(count(n, "input")?),
    ];
    let mut all = vec![B(l.all_mut(out)?), B(x)];
    all.extend(args);
    l.run(KLaunch::programs("de_normalise", n, all)?)
}

/// `out` ← the NCHW input gradient from `dn`, that of the normalised NHWC input.
pub(crate) fn denormalise<L: Launcher>(
    l: &L,
    out: &mut L::Buf,
    dn: &L::Buf,
    input: [usize; 3],
    inv_std: &Tensor,
) -> Result<()> {
    let [c, h, w] = input;
    let n = L::size(dn);
    same_len(L::size(out), n, "input gradient")?;
    let args = vec![
        B(l.all_mut(out)?),
        B(l.all(dn)?),
        B(l.tensor(inv_std, c, "1/std")?),
        U32(count(c, "channels")?),
        U32(count(h * w, "pixels")?),
        U32(count(n, "input gradient")?),
    ];
    l.run(KLaunch::programs("de_denormalise", n, args)?)
}

/// Where a linear layer's weight (K, C) and bias (K,) are: two tensors (the eval
/// program's) or ranges of a buffer of parameters (the train program's, at `w` and
/// `b`).
pub(crate) enum Fc<'a, Buf> {
    Tensors(&'a (Tensor, Tensor)),
    Params(&'a Buf, usize, usize),
}

/// The weight and bias of `fc` (`k` classes, `c` features), read.
fn fc_args<'a, L: Launcher>(
    l: &'a L,
    fc: &Fc<'a, L::Buf>,
    k: usize,
    c: usize,
) -> Result<[KArg<L::Arg<'a>>; 2]> {
    Ok(match *fc {
        Fc::Tensors((w, b)) => [
            B(l.tensor(w, k * c, "linear weight")?),
            B(l.tensor(b, k, "linear bias")?),
        ],
        Fc::Params(p, w, b) => [B(l.read(p, w..w + k * c)?), B(l.read(p, b..b + k)?)],
    })
}

/// Global average pooling of `x` (B, hw, C) and the linear layer `fc` (`k` classes):
/// (pooled (B, C), logits (B, K)).
pub(crate) fn pool_linear<L: Launcher>(
    l: &L,
    x: &L::Buf,
    fc: Fc<'_, L::Buf>,
    hw: usize,
    c: usize,
    k: usize,
) -> Result<(L::Buf, L::Buf)> {
    let b = L::size(x) / (hw * c).max(1);
    same_len(L::size(x), b * hw * c, "pooling")?;
    let mut pooled = l.alloc(b * c)?;
    let args = vec![
        B(l.all_mut(&mut pooled)?),
        B(l.all(x)?),
        U32(count(hw, "pixels")?),
        U32(count(c, "channels")?),
        U32(count(b * c, "pooling")?),
    ];
    l.run(KLaunch::programs("de_avg_pool", b * c, args)?)?;
    let mut logits = l.alloc(b * k)?;
    let [w, bias] = fc_args(l, &fc, k, c)?;
    let args = vec![
        B(l.all_mut(&mut logits)?),
        B(l.all(&pooled)?),
        w,
        bias,
        U32(count(c, "channels")?),
        U32(count(k, "classes")?),
        U32(count(b * k, "logits")?),
    ];
    l.run(KLaunch::programs("de_linear", b * k, args)?)?;
    Ok((pooled, logits))
}

/// The gradient (B, hw, C) of the pooled activations from that of the logits `dl`
/// (B, K) through the weight of `fc`.
pub(crate) fn linear_pool_backward<L: Launcher>(
    l: &L,
    dl: &L::Buf,
    fc: Fc<'_, L::Buf>,
    hw: usize,
    c: usize,
    k: usize,
) -> Result<L::Buf> {
    let b = L::size(dl) / k.max(1);
    same_len(L::size(dl), b * k, "logit gradient")?;
    let n = b * hw * c;
    let mut d = l.alloc(n)?;
    let [w, _] = fc_args(l, &fc, k, c)?;
    let args = vec![
        B(l.all_mut(&mut d)?),
        B(l.all(dl)?),
        w,
        U32(count(c, "channels")?),
        U32(count(k, "classes")?),
        U32(count(hw, "pixels")?),
        U32(count(n, "pooled activations' gradient")?),
    ];
    l.run(KLaunch::programs("de_linear_pool_backward", n, args)?)?;
    Ok(d)
}

/// y = relu(bn(x) + std ⊙ z) ([`super::Exec::bn_relu`]).
pub(crate) fn bn_relu<L: Launcher>(
    l: &L,
    n: &DNorm,
    x: &L::Buf,
    y: &mut L::Buf,
    c: usize,
    z: Option<&L::Buf>,
) -> Result<()> {
    let len = L::size(x);
    same_len(len, L::size(y), "BatchNorm")?;
    let launch = match noise_std(n, z)? {
        None => KLaunch::programs(
            "de_bn_relu_into",
            len,
            with_norm(l, vec![B(l.all_mut(y)?), B(l.all(x)?)], n, c, len)?,
        )?,
        Some((nz, z)) => {
            same_len(L::size(z).min(len), len, "BatchNorm noise")?;
            let lead = vec![
                B(l.all_mut(y)?),
                B(l.all(x)?),
                B(l.read(z, 0..len)?),
                B(l.tensor(&nz.alpha, 1, "noise factor")?),
                B(l.tensor(&nz.sigma, c, "running noise scale")?),
                F32(nz.scale),
            ];
            KLaunch::programs("de_bn_noise_relu_into", len, with_norm(l, lead, n, c, len)?)?
        }
    };
    l.run(launch)
}

/// y ← relu(bn(y) + std ⊙ z) ([`super::Exec::bn_relu_in_place`]).
pub(crate) fn bn_relu_in_place<L: Launcher>(
    l: &L,
    n: &DNorm,
    y: &mut L::Buf,
    c: usize,
    z: Option<&L::Buf>,
) -> Result<()> {
    let len = L::size(y);
    let launch = match noise_std(n, z)? {
        None => KLaunch::programs(
            "de_bn_relu_inplace",
            len,
            with_norm(l, vec![B(l.all_mut(y)?)], n, c, len)?,
        )?,
        Some((nz, z)) => {
            same_len(L::size(z).min(len), len, "BatchNorm noise")?;
            let lead = vec![
                B(l.all_mut(y)?),
                B(l.read(z, 0..len)?),
                B(l.tensor(&nz.alpha, 1, "noise factor")?),
                B(l.tensor(&nz.sigma, c, "running noise scale")?),
                F32(nz.scale),
            ];
            KLaunch::programs(
                "de_bn_noise_relu_inplace",
                len,
                with_norm(l, lead, n, c, len)?,
            )?
        }
    };
    l.run(launch)
}

/// out ← relu(bn(out) + s) ([`super::Exec::bn_add_relu`]).
pub(crate) fn bn_add_relu<L: Launcher>(
    l: &L,
    n: &DNorm,
    out: &mut L::Buf,
    skip: &L::Buf,
    skip_norm: Option<&DNorm>,
    c: usize,
) -> Result<()> {
    let len = L::size(out);
    same_len(L::size(skip), len, "shortcut")?;
    let mut args = vec![B(l.all_mut(out)?), B(l.all(skip)?)];
    args.extend(norm(l, n, c)?);
    args.push(F32(n.eps));
    match skip_norm {
        Some(sn) => args.extend(norm(l, sn, c)?),
        None => args.extend([Null, Null, Null, Null]),
    }
    args.extend([
        F32(skip_norm.map_or(0.0, |sn| sn.eps)),
        I32(i32::from(skip_norm.is_some())),
        U32(count(c, "channels")?),
        U32(count(len, "block output")?),
    ]);
    l.run(KLaunch::programs("de_bn_add_relu", len, args)?)
}

/// d2 ← the second convolution's output gradient, d ← the shortcut's
/// ([`super::Exec::add_relu_backward`]); `d2` holds as many values as `d`.
pub(crate) fn add_relu_backward<L: Launcher>(
    l: &L,
    n: &DNorm,
    d2: &mut L::Buf,
    d: &mut L::Buf,
    y: &L::Buf,
    skip_norm: Option<&DNorm>,
    c: usize,
) -> Result<()> {
    let len = L::size(d);
    same_len(L::size(y), len, "block gradient")?;
    same_len(L::size(d2), len, "block gradient")?;
    let [g, _, _, v] = norm(l, n, c)?;
    let mut args = vec![
        B(l.all_mut(d2)?),
        B(l.all_mut(d)?),
        B(l.all(y)?),
        g,
        v,
        F32(n.eps),
    ];
    match skip_norm {
        Some(sn) => {
            let [sg, _, _, sv] = norm(l, sn, c)?;
            args.extend([sg, sv]);
        }
        None => args.extend([Null, Null]),
    }
    args.extend([
        F32(skip_norm.map_or(0.0, |sn| sn.eps)),
        I32(i32::from(skip_norm.is_some())),
        U32(count(c, "channels")?),
        U32(count(len, "block gradient")?),
    ]);
    l.run(KLaunch::programs("de_add_relu_backward", len, args)?)
}

/// d ← the input gradient of relu(bn(·)) plus `residual`
/// ([`super::Exec::bn_relu_backward`]).
pub(crate) fn bn_relu_backward<L: Launcher>(
    l: &L,
    n: &DNorm,
    d: &mut L::Buf,
    y: &L::Buf,
    residual: Option<&L::Buf>,
    c: usize,
) -> Result<()> {
    let len = L::size(d);
    same_len(L::size(y), len, "BatchNorm gradient")?;
    if let Some(r) = residual {
        same_len(L::size(r), len, "residual gradient")?;
    }
    let args = vec![
        B(l.all_mut(d)?),
        B(l.all(y)?),
        B(l.tensor(&n.gamma, c, "BatchNorm scale")?),
        B(l.tensor(&n.var, c, "running variance")?),
        F32(n.eps),
        match residual {
            Some(r) => B(l.all(r)?),
            None => Null,
        },
        I32(i32::from(residual.is_some())),
        U32(count(c, "channels")?),
        U32(count(len, "BatchNorm gradient")?),
    ];
    l.run(KLaunch::programs("de_bn_relu_backward", len, args)?)
}
