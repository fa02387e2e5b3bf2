use super::*;
use serde_json::json;

fn ci(lo: f64, hi: f64) -> Value {
    json!({"lo": lo, "hi": hi})
}

/// A study with every figure the claims read, chosen so that each verdict occurs.
fn study(dir: &Path) -> Value {
    let point = json!({"test_examples": 1000, "robust_examples": 200});
    std::fs::write(dir.join("point.json"), point.to_string()).unwrap();
    json!({
        "models": {
            "normal": {"robust_accuracy": 0.0, "robust_examples": 1000,
                       "clean_accuracy": 0.7, "test_examples": 10000,
                       "ece": 0.10, "ece_ci": ci(0.08, 0.12)},
            "at": {"robust_accuracy": 0.40, "robust_examples": 1000,
                   "clean_accuracy": 0.5, "test_examples": 10000,
                   "threat_models": {
                       "l2_0p5": {"rerr_at_tpr99": 0.9, "rerr_at_tpr99_ci": ci(0.88, 0.92)},
                       "linf_16_255": {"rerr_at_tpr99": 0.5, "rerr_at_tpr99_ci": ci(0.45, 0.55)}
                   },
                   "ood": {"distal": {"examples": 1000, "fpr_at_tpr99": 1.0}}},
            "ccat": {"clean_accuracy": 0.5, "test_examples": 10000,
                     "threat_models": {
                         "l2_0p5": {"rerr_at_tpr99": 0.5, "rerr_at_tpr99_ci": ci(0.45, 0.55)},
                         "linf_16_255": {"rerr_at_tpr99": 0.9, "rerr_at_tpr99_ci": ci(0.88, 0.92)}
                     },
                     "ood": {"distal": {"examples": 1000, "fpr_at_tpr99": 0.1}}},
            "oat-fixed": {"clean_accuracy": 0.62, "test_examples": 10000,
                          "robust_accuracy": 0.31, "robust_examples": 1000},
            "ls": {"ece": 0.03, "ece_ci": ci(0.02, 0.04)},
            "regmixup": {"ece": 0.10, "ece_ci": ci(0.08, 0.12)}
        },
        "sweeps": {"oat": {"points": [
            {"value": 0.0, "clean_accuracy": 0.7, "robust_accuracy": 0.1, "results": "none.json"},
            {"value": 0.3, "clean_accuracy": 0.61, "robust_accuracy": 0.30, "results": "point.json"}
        ]}}
    })
}

fn verdict(claims: &[Claim], id: &str) -> Verdict {
    claims
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no claim {id}"))
        .verdict
}

#[test]
fn each_claim_gets_the_verdict_its_figures_give() {
    let dir = tempfile::tempdir().unwrap();
    let claims = evaluate(&study(dir.path()), dir.path());
    // 40 % of 1,000 against 0 % of 1,000: far apart.
    assert_eq!(verdict(&claims, "at_robust"), Verdict::Supported);
    // Equal clean accuracies: the interval contains 0.
    assert_eq!(verdict(&claims, "ccat_clean"), Verdict::Inconclusive);
    assert_eq!(verdict(&claims, "ccat_unseen.l2_0p5"), Verdict::Supported);
    assert_eq!(
        verdict(&claims, "ccat_unseen.linf_16_255"),
        Verdict::Contradicted
    );
    assert_eq!(verdict(&claims, "ccat_unseen.l1_12"), Verdict::NotMeasured);
    // CCAT rejects 90 % of 1,000 distal inputs, AT none.
    assert_eq!(verdict(&claims, "ccat_unseen.distal"), Verdict::Supported);
    // 61 % of 1,000 against 62 % of 10,000: d = −1 point, interval about [−4.1, +2.0],
    // above the −5-point bound.
    assert_eq!(verdict(&claims, "oat_trace.clean"), Verdict::Supported);
    // 30 % of 200 against 31 % of 1,000: too few images to bound the loss by 5 points.
    assert_eq!(verdict(&claims, "oat_trace.robust"), Verdict::Inconclusive);
    assert_eq!(verdict(&claims, "student_eot"), Verdict::NotMeasured);
    assert_eq!(verdict(&claims, "calibration.ls"), Verdict::Supported);
    assert_eq!(
        verdict(&claims, "calibration.regmixup"),
        Verdict::Inconclusive
    );
    assert_eq!(
        verdict(&claims, "calibration.ar-adals"),
        Verdict::NotMeasured
    );
    let clean = claims.iter().find(|c| c.id == "oat_trace.clean").unwrap();
    let (e, ci) = (clean.estimate.unwrap(), clean.ci.unwrap());
    assert!((e + 0.01).abs() < 1e-9, "{e}");
    assert!(
        ci.lo > -0.05 && ci.lo < -0.035 && ci.hi > 0.015 && ci.hi < 0.025,
        "{ci:?}"
    );
    let missing = claims.iter().find(|c| c.id == "student_eot").unwrap();
    assert!(
        missing.detail.contains("no `student` row"),
        "{}",
        missing.detail
    );
}

#[test]
fn the_table_lists_every_claim_with_its_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let claims = evaluate(&study(dir.path()), dir.path());
    let md = markdown(&claims);
    assert!(md.starts_with("\n## Claims"));
    // Header, separator and one row per claim.
    assert_eq!(
        md.lines().filter(|l| l.starts_with('|')).count(),
        claims.len() + 2
    );
    assert!(md.contains("| **contradicted** |") && md.contains("| **not measured** |"));
    assert!(md.contains("+40.0 ["), "{md}");
    // The JSON form names the verdicts in snake case.
    let v = serde_json::to_value(&claims).unwrap();
    assert_eq!(v[0]["verdict"], "supported");
}

#[test]
fn an_empty_study_is_all_not_measured() {
    let dir = tempfile::tempdir().unwrap();
    let claims = evaluate(&json!({}), dir.path());
    assert!(claims.iter().all(|c| c.verdict == Verdict::NotMeasured));
    assert!(claims.len() >= 15);
}

#[test]
fn the_study_gains_one_claims_table_however_often_it_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let results = study(dir.path());
    std::fs::write(dir.path().join("results.json"), results.to_string()).unwrap();
    std::fs::write(
        dir.path().join("report.md"),
        "# Study\n\ntext\n\n## Claims\n\nold table\n\n## Later section\n\nkept\n",
    )
    .unwrap();
    for _ in 0..2 {
        crate::report::add_claims(dir.path()).unwrap();
    }
    let report = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert_eq!(report.matches("## Claims").count(), 1, "{report}");
    assert!(!report.contains("old table") && report.contains("## Later section\n\nkept"));
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap())
            .unwrap();
    let claims = written["claims"].as_array().unwrap();
    assert_eq!(claims.len(), evaluate(&results, dir.path()).len());
    assert_eq!(written["models"]["at"]["robust_accuracy"], 0.40);
}
