//! Each check fires on a model built to fail it and stays silent on a normal one.

use super::{check_model, TrustReport, TrustWarning};
use crate::testutil::{trained, InfiniteGradient, Masked, NanGradient, Noisy, SoftmaxOutput};
use crate::{Bounds, Eot, Result};

fn check<M: candle_core::Module>(model: &M, eot: Eot) -> Result<TrustReport> {
    let t = trained();
    check_model(model, Bounds::UNIT, &t.xs, &t.ys, eot)
}

fn has(report: &TrustReport, pred: impl Fn(&TrustWarning) -> bool) -> bool {
    report.warnings.iter().any(pred)
}

#[test]
fn a_normal_model_passes_every_check() -> Result<()> {
    let report = check(&trained().model, Eot::OFF)?;
    assert!(report.passed(), "{:?}", report.warnings);
    assert_eq!(report.points, 64);
    assert_eq!(report.zero_gradient_ce, 0.0);
    assert_eq!(report.zero_gradient_margin, 0.0);
    assert_eq!(report.output_change, 0.0);
    assert!(!report.softmax_outputs);
    Ok(())
}

#[test]
fn zero_gradients_are_reported() -> Result<()> {
    let report = check(&Masked(&trained().model), Eot::OFF)?;
    assert_eq!(report.zero_gradient_ce, 1.0);
    assert_eq!(report.zero_gradient_margin, 1.0);
    assert!(has(
        &report,
        |w| matches!(w, TrustWarning::ZeroGradients { share, .. } if *share == 1.0)
    ));
    Ok(())
}

#[test]
fn nan_and_infinite_gradients_are_reported() -> Result<()> {
    let t = trained();
    let nan = check(&NanGradient(&t.model), Eot::OFF)?;
    assert_eq!(nan.nan_gradient, 1.0);
    assert!(has(&nan, |w| matches!(
        w,
        TrustWarning::NanGradients { .. }
    )));
    let inf = check(&InfiniteGradient(&t.model), Eot::OFF)?;
    assert!(inf.infinite_gradient > 0.5, "{}", inf.infinite_gradient);
    assert!(has(&inf, |w| matches!(
        w,
        TrustWarning::InfiniteGradients { .. }
    )));
    Ok(())
}

#[test]
fn randomness_without_eot_is_reported() -> Result<()> {
    let t = trained();
    let noisy = Noisy::new(&t.model, 0.1, 0);
    let report = check(&noisy, Eot::OFF)?;
    assert!(report.output_change > 1e-3);
    assert!(has(&report, |w| matches!(
        w,
        TrustWarning::RandomOutputs { .. }
    )));
    // With EOT the randomness is measured, and expected.
    let with_eot = check(&noisy, Eot::autoattack_rand())?;
    assert!(with_eot.eot_in_use && with_eot.output_change > 1e-3);
    assert!(with_eot.passed(), "{:?}", with_eot.warnings);
    Ok(())
}

#[test]
fn probabilities_instead_of_logits_are_reported() -> Result<()> {
    let report = check(&SoftmaxOutput(&trained().model), Eot::OFF)?;
    assert!(report.softmax_outputs);
    assert!(has(&report, |w| matches!(w, TrustWarning::SoftmaxOutputs)));
    Ok(())
}

#[test]
fn black_box_successes_are_reported_above_the_tolerance() -> Result<()> {
    let mut report = check(&trained().model, Eot::OFF)?;
    report.record_black_box(0);
    assert!(report.passed());
    assert_eq!(report.black_box_only, Some(0));
    report.record_black_box(2);
    assert!(has(&report, |w| matches!(
        w,
        TrustWarning::BlackBoxBeatsWhiteBox { points: 2, .. }
    )));
    let json = serde_json::to_string(&report).map_err(|e| crate::Error::Config(e.to_string()))?;
    let back: TrustReport =
        serde_json::from_str(&json).map_err(|e| crate::Error::Config(e.to_string()))?;
    assert_eq!(back, report);
    for w in &report.warnings {
        assert!(!w.to_string().is_empty());
    }
    Ok(())
}
