//! Property tests: the attack invariants over random problems — shapes, classes,
//! norms, budgets (from nothing to the whole box), input bounds anywhere on the real
//! line, step counts, restarts and seeds — for PGD and FGSM on random ReLU networks.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::pgd::{Restarts, StepSize};
use crate::testutil::{assert_invariants, Mlp};
use crate::{Attack, Bounds, Fgsm, Init, Norm, Pgd};

/// One random problem: model, inputs in `bounds`, labels.
fn problem(shape: [usize; 4], classes: usize, bounds: Bounds, seed: u64) -> (Mlp, Tensor, Tensor) {
    let [b, c, h, w] = shape;
    let model = Mlp::random(&[c * h * w, 8, classes], seed, DType::F32).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let xs: Vec<f32> = (0..b * c * h * w)
        .map(|_| rng.gen_range(bounds.lo..=bounds.hi))
        .collect();
    let ys: Vec<u32> = (0..b).map(|_| rng.gen_range(0..classes as u32)).collect();
    (
        model,
        Tensor::from_vec(xs, (b, c, h, w), &Device::Cpu).unwrap(),
        Tensor::new(ys.as_slice(), &Device::Cpu).unwrap(),
    )
}

fn norm_of(kind: usize) -> Norm {
    match kind {
        0 => Norm::Linf,
        1 => Norm::L2,
        2 => Norm::l1(),
        _ => Norm::L0,
    }
}

/// A budget that spans "none" to "the whole box" in the norm's units.
fn budget(norm: Norm, frac: f64, width: f64, dim: usize) -> f64 {
    match norm {
        Norm::Linf => frac * width,
        Norm::L2 => frac * width * (dim as f64).sqrt(),
        Norm::L1 { .. } => frac * width * dim as f64,
        Norm::L0 => (frac * dim as f64).floor(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn pgd_keeps_its_invariants_on_random_problems(
        b in 1usize..4,
        c in 1usize..3,
        side in 2usize..5,
        classes in 2usize..5,
        kind in 0usize..4,
        frac in 0.0f64..1.0,
        lo in -3.0f32..1.0,
        width in 0.05f32..4.0,
        steps in 1usize..4,
        restarts in 1usize..3,
        seed in any::<u64>(),
    ) {
        let bounds = Bounds::new(lo, lo + width).unwrap();
        let (model, xs, ys) = problem([b, c, side, side], classes, bounds, seed);
        let norm = norm_of(kind);
        let eps = budget(norm, frac, f64::from(width), c * side * side);
        let pgd = Pgd {
            norm,
            steps,
            step_size: match norm {
                Norm::L0 => StepSize::Absolute(1.0),
                _ => StepSize::Relative(0.25),
            },
            restarts: Restarts { count: restarts, first: Init::Zero, rest: Init::Uniform },
            ..Pgd::linf_pgd20()
        };
        let results = pgd.run(&model, bounds, &xs, &ys, &[eps], seed).unwrap();
        prop_assert_eq!(results.len(), 1);
        assert_invariants(&model, norm, bounds, &xs, &ys, &results[0]).unwrap();
    }

    #[test]
    fn fgsm_keeps_its_invariants_on_random_problems(
        b in 1usize..4,
        side in 2usize..5,
        frac in 0.0f64..1.0,
        lo in -3.0f32..1.0,
        width in 0.05f32..4.0,
        seed in any::<u64>(),
    ) {
        let bounds = Bounds::new(lo, lo + width).unwrap();
        let (model, xs, ys) = problem([b, 2, side, side], 3, bounds, seed);
        let eps = f64::from(width) * frac;
        let results = Fgsm::goodfellow().run(&model, bounds, &xs, &ys, &[eps, eps / 2.0], seed).unwrap();
        for r in &results {
            assert_invariants(&model, Norm::Linf, bounds, &xs, &ys, r).unwrap();
        }
    }
}
