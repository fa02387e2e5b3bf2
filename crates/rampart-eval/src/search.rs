//! Per-example minimal adversarial ε by bisection on top of an attack: one search gives
//! the whole accuracy–perturbation curve.
//!
//! For each correctly classified example the attack is first run at ε_max. Examples it
//! does not break there get no minimal ε (+∞: robust at every ε of the curve). For the
//! others the bracket [lo, hi] = [0, ε_max] is halved `rounds` times: the attack runs
//! at the midpoint; success moves hi down, failure moves lo up. The reported minimal
//! norm is the smallest ‖δ‖ of any successful adversarial example found, so it is an
//! upper bound on the example's true minimal norm and within ε_max / 2^rounds of the
//! bisection's last bracket. Misclassified clean examples have minimal norm 0.
//!
//! Bisection assumes the attack's success is monotone in ε, which holds for an optimal
//! attack and approximately for PGD; a non-monotone miss only makes the bound looser.
//! All brackets share the dyadic grid of ε_max, so examples with the same bracket are
//! attacked together in one batch (at most 2^round distinct midpoints per round).

use std::collections::BTreeMap;

use candle_core::{ModuleT, Tensor};
use rampart_attacks::{Attack, Bounds, Pgd};

use crate::error::{EvalError, Result};

/// Minimal ε of each example of one batch. xs: (B, ...) in `bounds`; ys: (B,) u32;
/// clean_correct: (B,). Returns per example `Some(norm)` (0 for clean mistakes) or
/// `None` if not broken at `eps_max`. `name` labels errors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn minimal_eps(
    model: &dyn ModuleT,
    bounds: Bounds,
    pgd: &Pgd,
    xs: &Tensor,
    ys: &Tensor,
    clean_correct: &[bool],
    eps_max: f64,
    rounds: usize,
    seed: u64,
    name: &str,
) -> Result<Vec<Option<f64>>> {
    let n = clean_correct.len();
    if xs.dim(0)? != n {
        return Err(EvalError::Config(format!(
            "{} inputs but {n} clean results",
            xs.dim(0)?
        )));
    }
    let mut best: Vec<Option<f64>> = clean_correct
        .iter()
        .map(|&c| if c { None } else { Some(0.0) })
        .collect();
    let run = |idx: &[usize], eps: f64, seed: u64| -> Result<(Vec<bool>, Vec<f32>)> {
        let index = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
            idx.len(),
            xs.device(),
        )?;
        let sub_x = xs.index_select(&index, 0)?;
        let sub_y = ys.index_select(&index, 0)?;
        let mut res = pgd
            .run(model, bounds, &sub_x, &sub_y, &[eps], seed)
            .map_err(EvalError::attack(name))?;
        let r = res
            .pop()
            .ok_or_else(|| EvalError::Config(format!("{name}: the attack returned no result")))?;
        Ok((r.success, r.norm))
    };
    let correct: Vec<usize> = (0..n).filter(|&i| clean_correct[i]).collect();
    if correct.is_empty() {
        return Ok(best);
    }
    let (success, norm) = run(&correct, eps_max, seed)?;
    let mut brackets: Vec<(usize, f64, f64)> = Vec::new();
    for (j, &i) in correct.iter().enumerate() {
        if success[j] {
            best[i] = Some(f64::from(norm[j]));
            brackets.push((i, 0.0, eps_max));
        }
    }
    for round in 0..rounds {
        let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (b, &(_, lo, hi)) in brackets.iter().enumerate() {
            groups
                .entry(((lo + hi) / 2.0).to_bits())
                .or_default()
                .push(b);
        }
        for (g, (mid_bits, members)) in groups.into_iter().enumerate() {
            let mid = f64::from_bits(mid_bits);
            let idx: Vec<usize> = members.iter().map(|&b| brackets[b].0).collect();
            let round_seed = seed.wrapping_add(((round as u64 + 1) << 40) ^ ((g as u64) << 20));
            let (success, norm) = run(&idx, mid, round_seed)?;
            for (j, &b) in members.iter().enumerate() {
                let (i, lo, hi) = brackets[b];
                if success[j] {
                    let found = f64::from(norm[j]);
                    best[i] = Some(best[i].map_or(found, |v| v.min(found)));
                    brackets[b] = (i, lo, mid);
                } else {
                    brackets[b] = (i, mid, hi);
                }
            }
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Module};
    use rampart_attacks::StepSize;

    /// Two-class linear model on flat inputs: logits = x·Wᵀ with W = [w; −w], so the
    /// margin of class 0 is 2·w·x and the minimal L∞ perturbation that flips a point
    /// of class 0 with w·x = m > 0 is m / ‖w‖₁ (when the box does not bind).
    struct Linear {
        weight: Tensor,
    }

    impl Module for Linear {
        fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
            xs.flatten_from(1)?.matmul(&self.weight.t()?)
        }
    }

    #[test]
    fn bisection_finds_the_analytic_minimal_linf_eps() -> Result<()> {
        let dev = Device::Cpu;
        let d = 8;
        let w: Vec<f32> = (0..d)
            .map(|j| if j % 2 == 0 { 0.5 } else { -0.25 })
            .collect();
        let l1: f64 = w.iter().map(|v| f64::from(v.abs())).sum(); // 3
        let mut rows = w.clone();
        rows.extend(w.iter().map(|v| -v));
        let model = Linear {
            weight: Tensor::from_vec(rows, (2, d), &dev)?,
        };
        // x = 0.5 + (t − 1/6)·sign(w): w·x = 0.5·Σw + (t − 1/6)·‖w‖₁ = 0.5 + 3t − 0.5 = 3t,
        // so the minimal L∞ ε is w·x / ‖w‖₁ = t; x stays within [0.3, 0.7].
        let ts = [0.001f64, 0.004, 0.007, 0.01, 0.02, 0.2];
        let xs: Vec<f32> = ts
            .iter()
            .flat_map(|&t| {
                w.iter()
                    .map(move |&v| (0.5 + (t - 0.5 / l1) * f64::from(v.signum())) as f32)
            })
            .collect();
        let n = ts.len();
        let x = Tensor::from_vec(xs, (n, 1, 1, d), &dev)?;
        let y = Tensor::zeros(n, DType::U32, &dev)?;
        let pgd = Pgd {
            steps: 10,
            step_size: StepSize::Relative(0.25),
            ..Pgd::linf_pgd20()
        };
        let (eps_max, rounds) = (0.05, 8);
        let search = |clean_correct: &[bool]| {
            minimal_eps(
                &model,
                Bounds::UNIT,
                &pgd,
                &x,
                &y,
                clean_correct,
                eps_max,
                rounds,
                3,
                "t",
            )
        };
        let found = search(&[true; 6])?;
        let tol = eps_max / f64::from(1u32 << rounds) + 1e-6;
        for i in 0..5 {
            let f = found[i].ok_or_else(|| EvalError::Config(format!("example {i} unbroken")))?;
            assert!(
                f >= ts[i] - 1e-6 && f <= ts[i] + tol,
                "example {i}: found {f}, true {}",
                ts[i]
            );
        }
        // t = 0.2 needs ε = 0.2 > ε_max: never broken.
        assert_eq!(found[5], None);
        // A clean mistake has minimal ε 0 and is not attacked.
        let found = search(&[false; 6])?;
        assert!(found.iter().all(|f| *f == Some(0.0)));
        Ok(())
    }
}
