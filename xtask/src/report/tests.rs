use super::*;
use crate::reproduce::Preset;

/// Writes the files a `rampart train` + `rampart eval` of `method` leave behind.
fn fake_run(out: &Path, method: &str, accuracy: f64) -> Result<()> {
    let dir = model_dir(out, method);
    std::fs::create_dir_all(eval_dir(out, method))?;
    std::fs::write(
        dir.join("summary.json"),
        format!(
            r#"{{"schema_version":1,"method":"{method}","arch":"wrn-10-1","dataset":"cifar10","preset":null,
               "parameters":77850,"epochs":3,"seed":0,"train_examples":50000,"test_examples":1000,
               "test_accuracy":0.6,"train_seconds":754.25,"model":"x/model.safetensors"}}"#
        ),
    )?;
    std::fs::write(
        dir.join("command.txt"),
        "rampart train --out x\nrampart train --out x --resume\n",
    )?;
    std::fs::write(
        eval_dir(out, method).join("results.json"),
        format!(
            r#"{{"schema_version":1,"suite":"pgd20","model":"x","method":"{method}","arch":"wrn-10-1",
               "dataset":"cifar10","test_examples":10000,"clean_accuracy":{accuracy},
               "clean_error":{},"eval_seconds":21.5,
               "attack":"pgd-20 linf ce, step 0.00784, eps 0.03137, uniform start",
               "eps":0.03137254901960784,"robust_examples":1000,"robust_accuracy":0.25,
               "robust_error":0.75,"attack_seconds":30.0,"confidence_threshold":0.5}}"#,
            1.0 - accuracy
        ),
    )?;
    std::fs::write(
        eval_dir(out, method).join("command.txt"),
        "rampart eval --model x\n",
    )?;
    fake_protocol(out, method, 0.75)
}

/// Writes the `results.json` of a quick protocol of `method` whose L∞ 8/255 worst case
/// has robust error `robust_error` on 1,000 attacked images.
fn fake_protocol(out: &Path, method: &str, robust_error: f64) -> Result<()> {
    let dir = protocol_dir(out, method);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("results.json"),
        format!(
            r#"{{"schema_version":2,"suite":"quick","test_examples":1000,"clean_accuracy":0.4,
               "eval_seconds":70.0,"threat_models":{{"linf_8_255":{{"norm":"linf",
               "eps":0.03137254901960784,"attacks":{{"pgd20_ce":{{}},"pgd20_conf":{{}},"pgd20_margin":{{}}}},
               "robust_error":{robust_error},"robust_error_ci":{{"lo":0.7,"hi":0.8}}}}}},
               "trust":{{"points":100,"issues":[]}}}}"#
        ),
    )?;
    Ok(())
}

/// What `collect` reads for the `selection` of rows of the smoke preset in `out`.
fn collect_smoke(out: &Path, selection: &str) -> Result<Vec<ModelOutcome>> {
    collect(
        out,
        &crate::reproduce::select_rows(Preset::Smoke, selection)?,
        &Preset::Smoke.budgets(),
    )
}

/// The core rows (normal, AT, CCAT) at clean accuracy 0.6875, collected from `out`.
fn fake_core_runs(out: &Path) -> Result<Vec<ModelOutcome>> {
    for method in ["normal", "at", "ccat"] {
        fake_run(out, method, 0.6875)?;
    }
    collect_smoke(out, "core")
}

/// Runs of AT (clean accuracy 0.4) and the noisy student (0.38).
fn fake_at_and_student(out: &Path) -> Result<()> {
    fake_run(out, "at", 0.4)?;
    fake_run(out, "student", 0.38)
}

/// A study folder's `results.json` (`results`) and a one-line `report.md`.
fn fake_study_outputs(out: &Path, results: &str) -> Result<()> {
    std::fs::write(out.join("results.json"), results)?;
    std::fs::write(out.join("report.md"), "# Report\n")?;
    Ok(())
}

fn study() -> Study {
    Study {
        dataset: "cifar10".into(),
        preset: "smoke".into(),
        preset_about: "A check.".into(),
        created: "2026-01-02T03:04:05Z".into(),
        command: "cargo xtask reproduce cifar10 --preset smoke --data-dir d".into(),
        wall_seconds: 801.0,
        build_command: "cargo build --release -p rampart-cli".into(),
        budgets: crate::reproduce::Preset::Smoke.budgets().markdown(),
    }
}

#[test]
fn results_json_follows_the_schema() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let models = fake_core_runs(dir.path())?;
    write(dir.path(), &study(), &models)?;
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json"))?)?;
    assert_eq!(json["schema_version"], 1);
    assert_eq!(json["dataset"], "cifar10");
    assert_eq!(json["preset"], "smoke");
    assert_eq!(json["created"], "2026-01-02T03:04:05Z");
    assert_eq!(
        json["command"],
        "cargo xtask reproduce cifar10 --preset smoke --data-dir d"
    );
    let normal = &json["models"]["normal"];
    assert_eq!(normal["clean_accuracy"], 0.6875);
    assert_eq!(normal["clean_error"], 0.3125);
    assert_eq!(normal["arch"], "wrn-10-1");
    assert_eq!(normal["epochs"], 3);
    assert_eq!(normal["train_seconds"], 754.25);
    assert_eq!(normal["test_examples"], 10000);
    assert_eq!(normal["train_examples"], 50000);
    assert_eq!(normal["model_file"], "normal/model.safetensors");
    assert!(normal.get("train_commands").is_none());
    let at = &json["models"]["at"];
    assert_eq!(at["robust_accuracy"], 0.25);
    assert_eq!(at["robust_error"], 0.75);
    assert_eq!(at["robust_examples"], 1000);
    assert_eq!(at["confidence_threshold"], 0.5);
    assert_eq!(at["eps"], 8.0 / 255.0);
    assert!(json["models"]["ccat"].is_object());
    Ok(())
}

/// A row trained on a shortened schedule says the preset's and projects its time from
/// the measured time per epoch; a row on the preset's schedule says nothing more.
#[test]
fn a_shortened_schedule_is_reported_with_the_presets_projected_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut models = fake_core_runs(dir.path())?;
    models[0].set_schedule(15);
    let same = models[1].epochs;
    models[1].set_schedule(same);
    let normal = &models[0];
    assert_eq!(normal.schedule_epochs, Some(15));
    // 3 epochs in 754.25 s: 15 take five times as long.
    assert_eq!(normal.schedule_train_seconds, Some(5.0 * 754.25));
    assert_eq!(models[1].schedule_epochs, None);
    let md = report_markdown(&study(), &models);
    assert!(
        md.contains("| normal | 3 | 12 min 34 s | 15 | ≈ 1 h 02 min |"),
        "{md}"
    );
    assert!(!md.contains("| at | 3 | 12 min 34 s | 3 |"), "{md}");
    write(dir.path(), &study(), &models)?;
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json"))?)?;
    assert_eq!(json["models"]["normal"]["schedule_epochs"], 15);
    assert_eq!(json["models"]["normal"]["schedule_train_seconds"], 3771.25);
    assert!(json["models"]["at"].get("schedule_epochs").is_none());
    Ok(())
}

#[test]
fn report_has_the_table_and_the_commands() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let models = fake_core_runs(dir.path())?;
    let md = report_markdown(&study(), &models);
    assert!(
        md.contains("| at | pgd-20 linf, step 0.00784, eps 0.03137, uniform start, worst case of pgd20_ce, pgd20_conf, pgd20_margin (the protocol's) | 1,000 | 1 | 25.00 % [20.0, 30.0] | 75.00 % | 0.5000 | passed |"),
        "{md}"
    );
    assert!(md.contains("## Evaluation budgets"), "{md}");
    assert!(md.contains("| protocol `--suite quick` | 500 |"), "{md}");
    assert!(
        md.starts_with("# Rampart reproduction: CIFAR-10, preset `smoke`"),
        "{md}"
    );
    assert!(md.contains("| normal | wrn-10-1 | 77,850 | 3 | 50,000 | 12 min 34 s | 10,000 | 68.75 % | 31.25 % |"), "{md}");
    assert!(md.contains("this invocation took 13 min 21 s"), "{md}");
    assert!(
        md.contains("| at | 31.25 % | 9.00 % | 75.00 % | 47.90 % | Madry AT"),
        "{md}"
    );
    assert!(
        !md.contains("| ccat | 31.25 % |"),
        "no published CCAT figure: {md}"
    );
    for line in [
        "cargo build --release -p rampart-cli",
        "rampart train --out x\n",
        "rampart train --out x --resume\n",
        "rampart eval --model x\n",
    ] {
        assert!(md.contains(line), "report lacks {line:?}:\n{md}");
    }
    Ok(())
}

#[test]
fn deterministic_rows_take_pgd20_from_the_quick_protocol() -> Result<()> {
    let dir = tempfile::tempdir()?;
    fake_at_and_student(dir.path())?;
    // The protocol's worst case differs from what the eval folder holds: the
    // deterministic row reports the protocol's, the stochastic one its own EOT figure.
    fake_protocol(dir.path(), "at", 0.8)?;
    fake_protocol(dir.path(), "student", 0.9)?;
    let rows = crate::reproduce::select_rows(Preset::Smoke, "at,student")?;
    let models = collect(dir.path(), &rows, &Preset::Smoke.budgets())?;
    let at = &models[0];
    assert!((at.robust_accuracy.unwrap() - 0.2).abs() < 1e-12);
    assert!((at.robust_error.unwrap() - 0.8).abs() < 1e-12);
    assert_eq!(at.robust_examples, Some(1000));
    let ci = at.robust_accuracy_ci.unwrap();
    assert!((ci.lo - 0.2).abs() < 1e-12 && (ci.hi - 0.3).abs() < 1e-12);
    assert_eq!(at.trust_checked, Some(100));
    assert_eq!(models[1].robust_accuracy, Some(0.25));
    // The paper preset's protocol (ccat) is not PGD-20: its rows keep their own run.
    let paper = collect(dir.path(), &rows, &Preset::Paper.budgets())?;
    assert_eq!(paper[0].robust_accuracy, Some(0.25));
    // A deterministic smoke row without its protocol is an error that names the file.
    std::fs::remove_file(protocol_dir(dir.path(), "at").join("results.json"))?;
    let err = collect(dir.path(), &rows, &Preset::Smoke.budgets()).unwrap_err();
    assert!(format!("{err:#}").contains("protocol"), "{err:#}");
    Ok(())
}

#[test]
fn rows_are_keyed_by_row_name_not_method() -> Result<()> {
    let dir = tempfile::tempdir()?;
    fake_at_and_student(dir.path())?;
    let summary = model_dir(dir.path(), "student").join("summary.json");
    let text = std::fs::read_to_string(&summary)?.replace("\"student\"", "\"at\"");
    std::fs::write(&summary, text)?;
    let models = collect_smoke(dir.path(), "at,student")?;
    let json: serde_json::Value = serde_json::from_str(&results_json(&study(), &models)?)?;
    assert_eq!(json["models"]["at"]["clean_accuracy"], 0.4);
    assert_eq!(json["models"]["student"]["clean_accuracy"], 0.38);
    assert_eq!(json["models"]["student"]["method"], "at");
    let md = report_markdown(&study(), &models);
    assert!(md.contains("| student | wrn-10-1 |"), "{md}");
    Ok(())
}

#[test]
fn sweeps_join_results_and_report() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path();
    fake_study_outputs(out, r#"{"schema_version":1,"models":{}}"#)?;
    let sweep = sweep_dir(out, "oat");
    std::fs::create_dir_all(&sweep)?;
    std::fs::write(
        sweep.join("sweep.json"),
        r#"{"schema_version":1,"over":"lambda","points":[{"value":0.0,"clean_accuracy":0.5}]}"#,
    )?;
    std::fs::write(
        sweep.join("sweep.md"),
        "# Sweep\n\n| λ |\n\n![sweep](plots/sweep.png)\n",
    )?;
    add_sweeps(out, &[("oat", "lambda", sweep.clone())])?;
    let results: serde_json::Value = read_json(&out.join("results.json"))?;
    assert_eq!(results["sweeps"]["oat"]["points"][0]["clean_accuracy"], 0.5);
    let md = std::fs::read_to_string(out.join("report.md"))?;
    assert!(md.contains("### `oat` over lambda"), "{md}");
    assert!(md.contains("![sweep](oat/sweep/plots/sweep.png)"), "{md}");
    assert!(!md.contains("# Sweep"), "{md}");
    Ok(())
}

#[test]
fn autoattack_joins_results_and_report() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path();
    fake_study_outputs(
        out,
        r#"{"schema_version":1,"models":{"at":{"method":"at"}}}"#,
    )?;
    let aa = autoattack_dir(out, "at");
    let pgd = autoattack_pgd_dir(out, "at");
    std::fs::create_dir_all(&aa)?;
    std::fs::create_dir_all(&pgd)?;
    let results = |acc: f64, attack: &str| {
        format!(
            r#"{{"test_examples":100,"clean_accuracy":0.4,"clean_error":0.6,"eval_seconds":90.0,
               "attack":"{attack}","eps":0.0313,"robust_examples":100,
               "robust_accuracy":{acc},"robust_error":{}}}"#,
            1.0 - acc
        )
    };
    std::fs::write(
        aa.join("results.json"),
        results(0.22, "autoattack standard linf"),
    )?;
    std::fs::write(pgd.join("results.json"), results(0.3, "pgd-20"))?;
    std::fs::write(
        aa.join("autoattack.json"),
        r#"{"trust_warnings":[],"batches":[
             {"stages":[{"name":"apgd-ce","attacked":40,"broken":10,"robust_accuracy":0.3,"seconds":5.0},
                        {"name":"apgd-t","attacked":30,"broken":8,"robust_accuracy":0.22,"seconds":7.0}]},
             {"stages":[{"name":"apgd-ce","attacked":1,"broken":1,"robust_accuracy":0.0,"seconds":1.0}]}]}"#,
    )?;
    add_autoattack(out, &["at"])?;
    let r: serde_json::Value = read_json(&out.join("results.json"))?;
    let entry = &r["models"]["at"]["autoattack"];
    assert_eq!(entry["robust_accuracy"], 0.22);
    assert_eq!(entry["pgd20_robust_accuracy"], 0.3);
    assert_eq!(entry["stages"][0]["fooled"], 11, "summed over batches");
    assert_eq!(entry["stages"][1]["name"], "apgd-t");
    let md = std::fs::read_to_string(out.join("report.md"))?;
    assert!(
        md.contains(
            "| at | 100 | 40.00 % | 30.00 % | 22.00 % | apgd-ce 11, apgd-t 8 | 1 min 30 s | none |"
        ),
        "{md}"
    );
    Ok(())
}

#[test]
fn missing_outputs_name_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let err = collect_smoke(dir.path(), "core")
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("summary.json"), "{err}");
    Ok(())
}

#[test]
fn formatting() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1000), "1,000");
    assert_eq!(thousands(36_479_194), "36,479,194");
    assert_eq!(duration(42.04), "42.0 s");
    assert_eq!(duration(725.0), "12 min 05 s");
    assert_eq!(duration(11_220.0), "3 h 07 min");
    assert_eq!(rampart_fs::shell_quote("a b"), "'a b'");
}

/// A row's PGD-50-10 run (`OUT/<row>/pgd50-10`) joins its results and the report; a
/// row without one has none.
#[test]
fn pgd50_10_joins_results_and_report() -> Result<()> {
    let dir = tempfile::tempdir()?;
    fake_core_runs(dir.path())?;
    let wong = pgd50_10_dir(dir.path(), "at");
    std::fs::create_dir_all(&wong)?;
    std::fs::write(
        wong.join("results.json"),
        r#"{"schema_version":1,"suite":"pgd20","model":"x","method":"at","arch":"wrn-10-1",
           "dataset":"cifar10","test_examples":1000,"clean_accuracy":0.8,"clean_error":0.2,
           "eval_seconds":9.0,"robust_examples":1000,"robust_accuracy":0.431,
           "robust_accuracy_ci":{"lo":0.4,"hi":0.46},"robust_error":0.569}"#,
    )?;
    let models = collect_smoke(dir.path(), "core")?;
    let at = models.iter().find(|m| m.key == "at").context("no at")?;
    assert_eq!(
        at.pgd50_10.map(|f| (f.examples, f.robust_accuracy)),
        Some((1000, 0.431))
    );
    assert!(models.iter().all(|m| m.key == "at" || m.pgd50_10.is_none()));
    let md = report_markdown(&study(), &models);
    assert!(md.contains("## PGD-50-10 (Wong et al.'s protocol)"), "{md}");
    assert!(
        md.contains("| at | 1,000 | 43.10 % [40.0, 46.0] | 56.90 % |"),
        "{md}"
    );
    let json: serde_json::Value = serde_json::from_str(&results_json(&study(), &models)?)?;
    assert_eq!(json["models"]["at"]["pgd50_10"]["robust_accuracy"], 0.431);
    assert!(json["models"]["normal"].get("pgd50_10").is_none());
    Ok(())
}

/// Fast AT's published robust error is Wong et al.'s PGD-50-10: the row meets it with
/// its own PGD-50-10 where that ran, else with its PGD-20 worst case.
#[test]
fn fast_at_meets_its_published_figure_under_pgd50_10() -> Result<()> {
    let dir = tempfile::tempdir()?;
    fake_run(dir.path(), "fast-at", 0.6875)?;
    let rows = crate::reproduce::select_rows(Preset::Fast, "fast-at")?;
    let budgets = Preset::Fast.budgets();
    let md = report_markdown(&study(), &collect(dir.path(), &rows, &budgets)?);
    assert!(
        md.contains("| fast-at | 31.25 % | 14.00 % | 75.00 % | 54.00 % | fast AT"),
        "{md}"
    );
    let wong = pgd50_10_dir(dir.path(), "fast-at");
    std::fs::create_dir_all(&wong)?;
    std::fs::write(
        wong.join("results.json"),
        r#"{"schema_version":1,"suite":"pgd20","model":"x","method":"fast-at","arch":"x",
           "dataset":"cifar10","test_examples":1000,"clean_accuracy":0.8,"clean_error":0.2,
           "eval_seconds":9.0,"robust_examples":1000,"robust_accuracy":0.431,"robust_error":0.569}"#,
    )?;
    let md = report_markdown(&study(), &collect(dir.path(), &rows, &budgets)?);
    assert!(
        md.contains("| fast-at | 31.25 % | 14.00 % | 56.90 % (PGD-50-10) | 54.00 % | fast AT"),
        "{md}"
    );
    Ok(())
}

/// Each row's time is the sum of its finished runs, the training runs apart; failed
/// runs and lines that are not a run's are left out; no record, no times.
#[test]
fn row_times_sum_each_rows_finished_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("runs.jsonl");
    assert!(row_times(&path)?.is_empty());
    std::fs::write(
        &path,
        r#"{"run":"[1/2] at: training (preset x)","row":"at","seconds":100.0,"ok":true}
{"run":"[1/2] at: evaluation (clean)","row":"at","seconds":20.5,"ok":true}
{"run":"at: autoattack on the first 1000 test images","row":"at","seconds":60.0,"ok":false}
not a run
{"run":"[2/2] normal: training (preset y)","row":"normal","seconds":30.0,"ok":true}
{"run":"[1/2] at: training (preset x)","row":"at","seconds":5.0,"ok":true}
{"run":"comparing the models","row":"compare","seconds":1.0,"ok":true}
"#,
    )?;
    let times = row_times(&path)?;
    assert_eq!(
        times["at"],
        RowTime {
            runs: 3,
            seconds: 125.5,
            train_seconds: 105.0
        }
    );
    assert_eq!(times["normal"].runs, 1);
    assert_eq!(times["compare"].seconds, 1.0);
    Ok(())
}
