use super::*;
use rampart_attacks::Pgd;

fn rec(name: &str, correct: &[bool], conf: &[f64], wrong: &[f64]) -> AttackRecord {
    AttackRecord {
        key: String::new(),
        rows: None,
        threat_model: "linf_8_255".into(),
        attack: name.into(),
        eps: 8.0 / 255.0,
        correct: correct.to_vec(),
        confidence: conf.to_vec(),
        wrong_class_confidence: wrong.to_vec(),
        norm: vec![0.0; correct.len()],
        seconds: 1.5,
    }
}

/// Two-class logits [ln p, ln(1 − p)] give softmax (p, 1 − p) exactly enough.
fn logits_for(p0: &[f64]) -> Vec<f32> {
    p0.iter()
        .flat_map(|&p| [p.ln() as f32, (1.0 - p).ln() as f32])
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-5
}

#[test]
fn hand_worked_report_on_six_examples() -> Result<()> {
    // Six test examples, all of class 0, with p(class 0):
    //   0.9, 0.8, 0.7, 0.58 (correct), 0.3, 0.45 (wrong: predicted 1, conf 0.7, 0.55).
    let labels = [0u32; 6];
    let logits = logits_for(&[0.9, 0.8, 0.7, 0.58, 0.3, 0.45]);
    // Held out: four correct with confidences 0.95, 0.75, 0.65, 0.62.
    // τ at 99 % TPR: k = ⌈0.99·4⌉ = 4 → the smallest, 0.62.
    let held_labels = [0u32; 4];
    let held_logits = logits_for(&[0.95, 0.75, 0.65, 0.62]);
    // Attack A breaks example 1 (conf 0.85) and leaves the rest; attack B breaks
    // example 2 with low confidence (0.55 < τ) and example 3 with 0.72.
    let a = rec(
        "a",
        &[true, false, true, true, false, false],
        &[0.9, 0.85, 0.7, 0.58, 0.7, 0.55],
        &[0.1, 0.85, 0.3, 0.42, 0.7, 0.55],
    );
    let b = rec(
        "b",
        &[true, true, false, false, false, false],
        &[0.9, 0.8, 0.55, 0.72, 0.7, 0.55],
        &[0.1, 0.2, 0.55, 0.72, 0.7, 0.55],
    );
    let plan = crate::suite::CurvePlan {
        pgd: Pgd::linf_pgd20(),
        eps_max: 4.0,
        rounds: 2,
        grid_points: 5,
    };
    // Minimal ε: examples 4, 5 are clean mistakes (0); 0 unbroken; 1..3 at 1, 2, 3.
    let min_eps = [None, Some(1.0), Some(2.0), Some(3.0), Some(0.0), Some(0.0)];
    let noise = [0.5, 0.65, 0.99];
    let inputs = ReportInputs {
        suite: "quick".into(),
        num_classes: 2,
        labels: &labels,
        logits: &logits,
        held_out_labels: &held_labels,
        held_out_logits: &held_logits,
        model_threshold: Some(0.75),
        threat_models: vec![ThreatModelInputs {
            name: "linf_8_255".into(),
            norm: "linf".into(),
            eps: 8.0 / 255.0,
            attacks: vec![&a, &b],
        }],
        noise_confidence: Some(&noise),
        distal_confidence: None,
        curve: Some((&plan, &min_eps)),
        corruptions: vec![],
        metrics: MetricSettings::default(),
    };
    let r = build_report(&inputs)?;
    assert!(close(r.clean_error, 2.0 / 6.0));
    assert!(close(r.tau_at_tpr99.unwrap_or(f64::NAN), 0.62));
    // Accepted at τ = 0.62: 0.9, 0.8, 0.7 (correct) and 0.7 (wrong) → Err@τ = 1/4.
    assert!(close(r.err_at_tpr99.unwrap_or(f64::NAN), 0.25));
    // Test TPR: 3 of the 4 correct (0.58 < τ) → 0.75.
    assert!(close(r.test_tpr.unwrap_or(f64::NAN), 0.75));
    let tm = &r.threat_models["linf_8_255"];
    // Robust error: examples 1, 2, 3 broken, 4, 5 wrong clean → 5/6.
    assert!(close(tm.robust_error, 5.0 / 6.0));
    assert!(close(tm.attacks["a"].robust_error, 3.0 / 6.0));
    assert!(close(tm.attacks["b"].robust_error, 4.0 / 6.0));
    // Worst case by wrong-class confidence: ex 0 A (ties keep A: correct, 0.9);
    // ex 1 A (wrong, 0.85); ex 2 B (wrong, 0.55); ex 3 B (wrong, 0.72);
    // ex 4 A (wrong, 0.7); ex 5 A (wrong, 0.55).
    // RErr@0.62 numerator: ex 1 (adv wrong 0.85 ≥ τ), ex 3 (0.72), ex 4 (clean wrong
    // 0.7 ≥ τ) → 3; ex 2 has an accepted clean version (0.7) but its adversarial one
    // is rejected, so it counts as correct. Denominator: ex 0, 1, 2, 3 (adv 0.72),
    // 4 → 5; ex 5 (clean 0.55, adv 0.55) is rejected → RErr@τ = 3/5.
    assert!(close(tm.rerr_at_tpr99.unwrap_or(f64::NAN), 0.6));
    assert!(close(r.rerr_at_tpr99.unwrap_or(f64::NAN), 0.6));
    // Each attack alone at τ = 0.62. A: accepted ex 0, 1, 2, 4 (ex 3 and 5 below τ
    // both ways); wrong ex 1 (adv 0.85) and ex 4 (clean 0.7) → 2/4. B: accepted ex
    // 0, 1, 2 (clean 0.7), 3 (adv 0.72), 4; wrong ex 3 and ex 4 → 2/5. Each is below
    // the worst case's 3/5.
    assert!(close(
        tm.attacks["a"].rerr_at_tpr99.unwrap_or(f64::NAN),
        0.5
    ));
    assert!(close(
        tm.attacks["b"].rerr_at_tpr99.unwrap_or(f64::NAN),
        0.4
    ));
    // FPR@τ: negatives (clean correct, adv wrong) 1, 2, 3 with adv conf 0.85, 0.55,
    // 0.72 → 2 of 3 accepted.
    assert!(close(tm.fpr_at_tpr99.unwrap_or(f64::NAN), 2.0 / 3.0));
    // ROC AUC: positives 0.9, 0.8, 0.7, 0.58 vs negatives 0.85, 0.55, 0.72:
    // 0.9 beats 3; 0.8 beats 2; 0.7 beats 1; 0.58 beats 1 → 7 / 12.
    assert!(close(tm.roc_auc.unwrap_or(f64::NAN), 7.0 / 12.0));
    // At the model's own τ = 0.75 only ex 0 (clean 0.9) and ex 1 (clean 0.8, adv
    // wrong 0.85) have an accepted version, and ex 1 is an error → 1/2.
    assert!(close(tm.rerr_at_model_threshold.unwrap_or(f64::NAN), 0.5));
    // ECE (15 bins of width 1/15): 0.9 alone (bin 13), 0.8 alone (on the edge
    // 12/15: bin 11 or 12, alone either way), 0.7 ×2 (bin 10, one right, one
    // wrong), 0.58 and 0.55 (bin 8, one right, one wrong). Gaps weighted by count:
    // |1 − 0.9| + |1 − 0.8| + 2·|0.5 − 0.7| + 2·|0.5 − 0.565| = 0.1 + 0.2 + 0.4 + 0.13
    // = 0.83 → ECE = 0.83 / 6.
    assert!(close(r.ece, 0.83 / 6.0), "{}", r.ece);
    // Brier: Σ 2·(1 − p_y)² / 6 with p_y = 0.9, 0.8, 0.7, 0.58, 0.3, 0.45.
    let brier = [0.9f64, 0.8, 0.7, 0.58, 0.3, 0.45]
        .iter()
        .map(|p| 2.0 * (1.0 - p) * (1.0 - p))
        .sum::<f64>()
        / 6.0;
    assert!(close(r.brier, brier));
    let nll = [0.9f64, 0.8, 0.7, 0.58, 0.3, 0.45]
        .iter()
        .map(|p| -p.ln())
        .sum::<f64>()
        / 6.0;
    assert!(close(r.nll, nll));
    // Curve on ε = 0, 1, 2, 3, 4: accuracy = #(min ε > ε)/6 = 4/6, 3/6, 2/6, 1/6, 1/6;
    // AUAC = (4/2 + 3 + 2 + 1 + 1/2)/6 / 4 = 8.5/24.
    let curve = r
        .accuracy_curve
        .as_ref()
        .map(|c| c.curve.accuracy.clone())
        .unwrap_or_default();
    let expected = [4.0 / 6.0, 3.0 / 6.0, 2.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0];
    assert!(
        curve.iter().zip(expected).all(|(a, b)| close(*a, b)),
        "{curve:?}"
    );
    assert!(close(r.auac.unwrap_or(f64::NAN), 8.5 / 24.0));
    // Noise vs clean confidences 0.9, 0.8, 0.7, 0.58, 0.7, 0.55: 0.5 is below all
    // 6, 0.65 below 4 of them, 0.99 below none → AUROC = 10/18.
    let n = &r.ood["noise"];
    assert!(close(n.auroc, 10.0 / 18.0));
    // Accepted at τ = 0.62: 0.65 and 0.99 → 2/3.
    assert!(close(n.fpr_at_tpr99.unwrap_or(f64::NAN), 2.0 / 3.0));
    assert_eq!(r.confidence_histograms.clean.iter().sum::<usize>(), 6);
    assert_eq!(
        r.confidence_histograms
            .adversarial
            .as_ref()
            .map(|h| h.iter().sum::<usize>()),
        Some(6)
    );
    // The report survives a JSON round trip.
    let json = serde_json::to_string(&r).map_err(|e| EvalError::Config(e.to_string()))?;
    let back: EvalReport =
        serde_json::from_str(&json).map_err(|e| EvalError::Config(e.to_string()))?;
    assert_eq!(back, r);
    Ok(())
}

#[test]
fn undefined_numbers_are_none_not_zero() -> Result<()> {
    // Every held-out example is wrong: no τ, so nothing at τ is defined.
    let labels = [0u32, 0];
    let logits = logits_for(&[0.9, 0.8]);
    let held_logits = logits_for(&[0.2, 0.3]);
    let a = rec("a", &[true, true], &[0.9, 0.8], &[0.1, 0.2]);
    let r = build_report(&ReportInputs {
        suite: "quick".into(),
        num_classes: 2,
        labels: &labels,
        logits: &logits,
        held_out_labels: &labels,
        held_out_logits: &held_logits,
        model_threshold: None,
        threat_models: vec![ThreatModelInputs {
            name: "linf_8_255".into(),
            norm: "linf".into(),
            eps: 0.03,
            attacks: vec![&a],
        }],
        noise_confidence: None,
        distal_confidence: None,
        curve: None,
        corruptions: vec![],
        metrics: MetricSettings::default(),
    })?;
    assert_eq!(
        (r.tau_at_tpr99, r.err_at_tpr99, r.rerr_at_tpr99),
        (None, None, None)
    );
    // No attack succeeded: FPR and ROC AUC are undefined too.
    let tm = &r.threat_models["linf_8_255"];
    assert_eq!((tm.fpr_at_tpr99, tm.roc_auc), (None, None));
    assert_eq!(tm.robust_error, 0.0);
    assert_eq!((r.auac, r.accuracy_curve.is_none()), (None, true));
    Ok(())
}
