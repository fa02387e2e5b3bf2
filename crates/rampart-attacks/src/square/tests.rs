//! Square: schedule, profile, invariants, and success where gradients are masked.

use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{eta, Square};
use crate::testutil::{assert_invariants, count, trained, Masked, TinyConv};
use crate::{Apgd, Attack, Bounds, Norm, Result};

#[test]
fn p_follows_the_published_schedule() {
    let sq = Square::autoattack(Norm::Linf);
    let p = |it| sq.p_at(it) / 0.8;
    assert_eq!(p(0), 1.0);
    assert_eq!(p(10), 1.0);
    assert_eq!(p(11), 0.5);
    assert_eq!(p(50), 0.5);
    assert_eq!(p(51), 0.25);
    assert_eq!(p(201), 0.125);
    assert_eq!(p(501), 1.0 / 16.0);
    assert_eq!(p(1001), 1.0 / 32.0);
    assert_eq!(p(2001), 1.0 / 64.0);
    assert_eq!(p(4001), 1.0 / 128.0);
    assert_eq!(p(4999), 1.0 / 128.0);
    let rescaled = Square {
        rescale_schedule: true,
        queries: 1000,
        ..sq
    };
    assert_eq!(rescaled.p_at(101) / 0.8, 1.0 / 32.0);
    assert_eq!(rescaled.p_at(99) / 0.8, 1.0 / 16.0);
}

#[test]
fn the_l2_profile_is_two_opposite_unit_pyramids() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for s in [1, 3, 5, 8] {
        let e = eta(s, &mut rng);
        let norm: f64 = e.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-12);
        if s > 1 {
            assert!(e.iter().any(|v| *v > 0.0) && e.iter().any(|v| *v < 0.0));
            assert!(e.iter().sum::<f64>().abs() < 0.5);
        }
    }
}

#[test]
fn results_are_feasible_and_successes_hold() -> Result<()> {
    let t = trained();
    for (norm, eps) in [(Norm::Linf, 0.08), (Norm::L2, 0.4)] {
        let sq = Square {
            queries: 300,
            ..Square::autoattack(norm)
        };
        let res = sq.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps, eps / 4.0], 1)?;
        for r in &res {
            assert_invariants(&t.model, norm, Bounds::UNIT, &t.xs, &t.ys, r)?;
            assert!(r.iterations.iter().all(|q| *q <= 301));
        }
        assert!(count(&res[0].success) > count(&res[1].success));
        let again = sq.run(&t.model, Bounds::UNIT, &t.xs, &t.ys, &[eps], 1)?;
        let rows = |r: &crate::AttackResult| r.clipped.flatten_all()?.to_vec1::<f32>();
        assert_eq!(rows(&again[0])?, rows(&res[0])?);
    }
    Ok(())
}

/// Random images (8×8, 3 channels) labelled by a random convnet: a model with an
/// image structure, where the square windows mean something.
fn image_problem() -> Result<(TinyConv, Tensor, Tensor)> {
    let model = TinyConv::random(3, 8, 8, 10, 7)?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let pixels: Vec<f32> = (0..16 * 3 * 8 * 8).map(|_| rng.gen()).collect();
    let xs = Tensor::from_vec(pixels, (16, 3, 8, 8), &Device::Cpu)?;
    let ys = model.forward(&xs)?.argmax(1)?;
    Ok((model, xs, ys))
}

/// Behind a gradient-blocking op the white-box attack is blind, the black-box one is
/// not: Square fools nearly as many points as APGD does on the unmasked model.
#[test]
fn square_defeats_gradient_masking() -> Result<()> {
    let (model, xs, ys) = image_problem()?;
    let masked = Masked(&model);
    for (norm, eps) in [(Norm::Linf, 0.02), (Norm::L2, 0.3)] {
        let white_box =
            count(&Apgd::ce(norm).run(&model, Bounds::UNIT, &xs, &ys, &[eps], 0)?[0].success);
        let blind =
            count(&Apgd::ce(norm).run(&masked, Bounds::UNIT, &xs, &ys, &[eps], 0)?[0].success);
        let sq = Square {
            queries: 1000,
            ..Square::autoattack(norm)
        };
        let res = sq.run(&masked, Bounds::UNIT, &xs, &ys, &[eps], 0)?;
        assert_invariants(&masked, norm, Bounds::UNIT, &xs, &ys, &res[0])?;
        let black_box = count(&res[0].success);
        assert!(
            blind + 4 < black_box && 4 * black_box >= 3 * white_box,
            "{norm}: APGD {white_box} unmasked, {blind} masked; Square {black_box} masked"
        );
    }
    Ok(())
}

#[test]
fn square_needs_images_and_a_supported_norm() -> Result<()> {
    let t = trained();
    let flat = t.xs.flatten_from(1)?;
    let mlp_flat =
        Square::autoattack(Norm::Linf).run(&t.model, Bounds::UNIT, &flat, &t.ys, &[0.1], 0);
    assert!(matches!(mlp_flat, Err(crate::Error::Input(_))));
    assert!(Square::autoattack(Norm::l1()).validate().is_err());
    assert!(Square {
        queries: 0,
        ..Square::autoattack(Norm::L2)
    }
    .validate()
    .is_err());
    assert!(Square {
        p_init: 0.0,
        ..Square::autoattack(Norm::L2)
    }
    .validate()
    .is_err());
    let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?;
    Ok(())
}

/// The proposals run examples in parallel (tasks of about 32,768 coordinates): with
/// inputs of 3,072 values and 40 examples, all classified as labelled, four tasks; the
/// outcome is the same bits on one thread as on four, in L∞ and L2.
#[test]
fn outcome_does_not_depend_on_the_threads() -> Result<()> {
    let (model, xs, _) = crate::testutil::wide_batch(40)?;
    let ys = model.forward(&xs)?.argmax(1)?;
    for (norm, eps) in [(Norm::Linf, 8.0 / 255.0), (Norm::L2, 0.5)] {
        let square = Square {
            queries: 40,
            ..Square::autoattack(norm)
        };
        crate::testutil::assert_thread_independent(&format!("{norm:?}"), || {
            square.run(&model, Bounds::UNIT, &xs, &ys, &[eps], 5)
        })?;
    }
    Ok(())
}
