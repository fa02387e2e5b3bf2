use super::*;

/// The smoke preset's row `method`.
fn smoke_row(method: &str) -> Option<&'static ModelRow> {
    Preset::Smoke.models().iter().find(|r| r.method == method)
}

/// The training flags of the smoke preset's row `method`, joined by spaces (empty
/// when there is no such row).
fn smoke_train_flags(method: &str) -> String {
    smoke_row(method)
        .map(ModelRow::train_flags)
        .unwrap_or_default()
        .join(" ")
}

/// The methods of the smoke rows that `selection` picks, in order.
fn selected_methods(selection: &str) -> Result<Vec<&'static str>> {
    Ok(select_rows(Preset::Smoke, selection)?
        .iter()
        .map(|r| r.method)
        .collect())
}

#[test]
fn every_preset_has_normal_at_and_ccat_rows() {
    for preset in [Preset::Smoke, Preset::Fast, Preset::Paper] {
        let rows = preset.models();
        let names: Vec<&str> = rows.iter().map(|r| r.method).collect();
        // The fast preset adds fast AT as published and TRADES on its schedule.
        let study = match preset {
            Preset::Fast => {
                assert_eq!(names[11..], ["fast-at", "trades"]);
                &names[..11]
            }
            _ => &names[..],
        };
        assert_eq!(
            study,
            [
                "normal",
                "at",
                "ccat",
                "ls",
                "regmixup",
                "ar-adals",
                "sat",
                "oat",
                "oat-fixed",
                "student",
                "student-normal"
            ]
        );
        assert!(!preset.about().is_empty());
        // Every teacher is trained before its student.
        for (i, r) in rows.iter().enumerate() {
            if let Some(t) = r.teacher {
                assert!(rows[..i].iter().any(|o| o.method == t), "{}", r.method);
            }
        }
    }
}

#[test]
fn rows_are_selected_by_name_or_group() -> Result<()> {
    let core = selected_methods("core")?;
    assert_eq!(core, ["normal", "at", "ccat"]);
    assert_eq!(select_rows(Preset::Smoke, "all")?.len(), 11);
    let plain = smoke_row("student-normal");
    assert_eq!(plain.and_then(|r| r.teacher), Some("normal"));
    let some = selected_methods("oat, at")?;
    assert_eq!(some, ["at", "oat"], "the preset's order is kept");
    let err = select_rows(Preset::Smoke, "student")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("select `at` too"), "{err}");
    // In a folder where `at` is finished, the student alone is a valid selection.
    let alone = select_rows_in(Preset::Smoke, "student", &|m| m == "at")?;
    assert_eq!(
        alone.iter().map(|r| r.method).collect::<Vec<_>>(),
        ["student"]
    );
    assert!(select_rows_in(Preset::Smoke, "student", &|m| m == "normal").is_err());
    assert!(select_rows(Preset::Smoke, "nope").is_err());
    // Rows that vary a method train with the method's own name.
    for (row, first, last) in [
        ("student-normal", "--method normal ", "--noise 0.1"),
        ("oat-fixed", "--method oat ", "--lambdas 0.3"),
        ("ls", "--method normal ", "--label-smoothing 0.1"),
    ] {
        let flags = smoke_train_flags(row);
        assert!(flags.starts_with(first), "{flags}");
        assert!(flags.ends_with(last), "{flags}");
    }
    let student = smoke_train_flags("student");
    assert!(student.starts_with("--method at "), "{student}");
    assert!(student.contains("--noise 0.1"), "{student}");
    Ok(())
}

#[test]
fn smoke_rows_train_on_a_subset_and_attack_a_subset() {
    let at = Preset::Smoke.models()[1].train_flags().join(" ");
    assert!(
        at.starts_with("--method at --arch wrn-10-1 --epochs 1 --batch-size 64"),
        "{at}"
    );
    assert!(at.contains("--train-limit 10240"), "{at}");
    assert!(
        at.ends_with("--attack-steps 1 --attack-step-size 10/255"),
        "{at}"
    );
    let ccat = Preset::Smoke.models()[2].train_flags().join(" ");
    assert!(ccat.starts_with("--method ccat --arch wrn-10-1"), "{ccat}");
    assert!(
        ccat.ends_with("--attack-steps 3 --attack-step-size 0.03"),
        "{ccat}"
    );
    let smoke = Preset::Smoke.budgets();
    let eval = Preset::Smoke.models()[0].eval_flags(&smoke).join(" ");
    // A deterministic row's PGD-20 is the protocol's: its own evaluation is clean.
    assert_eq!(eval, "--suite clean");
    let student = smoke_row("student");
    let eval = student.map(|r| r.eval_flags(&smoke).join(" "));
    assert_eq!(
        eval.as_deref(),
        Some("--suite pgd20 --eot 3 --draws 2 --trust-examples 10 --attack-limit 100")
    );
    let eval = Preset::Paper.models()[0]
        .eval_flags(&Preset::Paper.budgets())
        .join(" ");
    assert_eq!(eval, "--suite pgd20");
    // The protocol and calibration metrics see at least 1,000 images in the GPU
    // presets, and 500 (95 % intervals of at most ±4.4 points) in the 15-minute smoke.
    for (p, least) in [
        (Preset::Smoke, 500),
        (Preset::Fast, 1000),
        (Preset::Paper, 1000),
    ] {
        assert!(p.budgets().protocol.1.is_none_or(|n| n >= least), "{p:?}");
    }
    let ccat = Preset::Fast.models()[2].train_flags().join(" ");
    assert_eq!(
        ccat,
        "--method ccat --preset ccat-resnet20 --epochs 30 --attack-steps 10 --attack-step-size 0.01"
    );
}

#[test]
fn rows_become_train_flags() {
    let smoke = Preset::Smoke.models()[0].train_flags().join(" ");
    assert!(smoke.starts_with("--method normal --arch "), "{smoke}");
    assert!(smoke.contains(&format!("--epochs {}", SMOKE_NORMAL.epochs)));
    assert!(smoke.contains(&format!("--schedule {}", SMOKE_NORMAL.schedule)));
    let paper = Preset::Paper.models()[0].train_flags();
    assert_eq!(paper, ["--method", "normal", "--preset", "normal-wrn28-10"]);
}

#[test]
fn finished_means_model_summary_and_results() -> Result<()> {
    let dir = tempfile::tempdir()?;
    assert!(!is_finished(dir.path(), "normal"));
    std::fs::create_dir_all(eval_dir(dir.path(), "normal"))?;
    std::fs::write(
        model_dir(dir.path(), "normal").join("model.safetensors"),
        b"x",
    )?;
    std::fs::write(model_dir(dir.path(), "normal").join("summary.json"), b"{}")?;
    assert!(!is_finished(dir.path(), "normal"));
    std::fs::write(eval_dir(dir.path(), "normal").join("results.json"), b"{}")?;
    assert!(is_finished(dir.path(), "normal"));
    Ok(())
}

/// A row whose model file stayed on the machine that trained it is finished by the
/// file's record, which the report keeps naming it by.
#[test]
fn a_model_left_behind_is_named_by_its_record() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let row = model_dir(dir.path(), "at");
    std::fs::create_dir_all(eval_dir(dir.path(), "at"))?;
    std::fs::write(row.join("summary.json"), b"{}")?;
    std::fs::write(eval_dir(dir.path(), "at").join("results.json"), b"{}")?;
    assert_eq!(crate::report::model_record(&row)?, None);
    assert!(!is_finished(dir.path(), "at"));
    std::fs::write(row.join("model.safetensors"), b"abc")?;
    let record = crate::report::model_record(&row)?.ok_or_else(|| anyhow::anyhow!("none"))?;
    assert_eq!(record.bytes, 3);
    // SHA-256 of "abc" (FIPS 180-2, appendix B.1).
    assert_eq!(
        record.sha256,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    std::fs::remove_file(row.join("model.safetensors"))?;
    assert!(is_finished(dir.path(), "at"));
    assert_eq!(crate::report::model_record(&row)?, Some(record));
    Ok(())
}

/// Wong et al.'s PGD-50-10 runs on 1,000 images of the fast preset's deterministic
/// rows; the smoke preset does without it.
#[test]
fn the_fast_preset_runs_pgd50_10() {
    assert_eq!(Preset::Fast.budgets().pgd50_10, Some(1000));
    assert_eq!(Preset::Smoke.budgets().pgd50_10, None);
    assert!(Preset::Fast.budgets().markdown().contains("PGD-50-10 (CE)"));
}

/// `--epochs` replaces a row's epochs wherever its flags give them, and adds them to
/// a preset row that gives none.
#[test]
fn a_shortened_schedule_sets_every_rows_epochs() {
    let flags = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let recipe = flags(&["--method", "at", "--epochs", "1", "--lr", "0.2"]);
    assert_eq!(with_epochs(recipe.clone(), None), recipe);
    assert_eq!(
        with_epochs(recipe, Some(3)),
        flags(&["--method", "at", "--epochs", "3", "--lr", "0.2"])
    );
    // A preset row, and one whose extra flags name epochs (the fast preset's CCAT).
    let preset = flags(&["--method", "at", "--preset", "fast-at-preact-resnet18"]);
    assert_eq!(
        with_epochs(preset, Some(5)),
        flags(&[
            "--method",
            "at",
            "--preset",
            "fast-at-preact-resnet18",
            "--epochs",
            "5"
        ])
    );
    for row in Preset::Fast.models() {
        let got = with_epochs(row.train_flags(), Some(2));
        let values: Vec<&String> = got
            .windows(2)
            .filter(|w| w[0] == "--epochs")
            .map(|w| &w[1])
            .collect();
        assert_eq!(values, [&"2".to_string()], "{}: {got:?}", row.method);
    }
}

#[test]
fn device_lists_are_one_kind() -> Result<()> {
    assert_eq!(device_list("cuda")?, ["cuda"]);
    assert_eq!(device_list("cuda:0, cuda:1")?, ["cuda:0", "cuda:1"]);
    assert_eq!(device_kind("cuda:1"), "cuda");
    assert_eq!(device_kind("cuda:12+tf32"), "cuda+tf32");
    assert_eq!(device_kind("cuda:3+bf16"), "cuda+bf16");
    assert_eq!(device_kind("cpu"), "cpu");
    let err = device_list("cuda:0,cpu").unwrap_err().to_string();
    assert!(err.contains("different kinds"), "{err}");
    assert!(device_list(" , ").is_err());
    Ok(())
}

#[test]
fn default_jobs_fill_the_cores() {
    let cores = available_cores();
    assert_eq!(default_jobs("cpu", None), cores);
    assert_eq!(default_jobs("cpu", Some(cores)), 1);
    assert_eq!(default_jobs("cpu", Some(cores * 4)), 1);
    assert_eq!(default_jobs("cuda", None), 1);
    assert_eq!(default_jobs("cuda+tf32", Some(1)), 1);
}

/// A pgd20 run cut into shards is joined by its own command with `--merge` (on a
/// device: it reruns the clean pass); other runs by `rampart merge`, on the host.
#[test]
fn pgd20_shards_are_joined_by_the_unsharded_command() {
    let dir = Path::new("study/at/pgd50-10");
    let mut eval = Command::new("rampart");
    eval.args(["eval", "--suite", "pgd20", "--out"]).arg(dir);
    let mut jobs = Jobs::default();
    let last = add_sharded(
        &mut jobs,
        Sharded {
            name: "at: PGD-50-10".into(),
            eval,
            dir,
            shards: 2,
            after: None,
            merge: None,
        },
        |part| PathBuf::from(format!("at.pgd50-10{part}.log")),
    );
    let jobs = jobs.into_vec();
    assert_eq!((jobs.len(), last), (3, 2));
    let args = |j: &crate::jobs::Job| -> Vec<String> {
        j.command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        args(&jobs[1]),
        [
            "eval",
            "--suite",
            "pgd20",
            "--out",
            "study/at/pgd50-10/shard-1",
            "--shard",
            "1/2"
        ]
    );
    assert_eq!(
        args(&jobs[2]),
        [
            "eval",
            "--suite",
            "pgd20",
            "--out",
            "study/at/pgd50-10",
            "--merge",
            "study/at/pgd50-10/shard-0",
            "study/at/pgd50-10/shard-1"
        ]
    );
    assert!(jobs[2].on_device && jobs[2].after == [0, 1]);
}

/// `--train-workers N --sync-bn` gives `--sync-bn` and `--workers N` to every row
/// (the stochastic students and OAT included), and nothing with one worker.
#[test]
fn sync_bn_goes_to_every_row() {
    for preset in [Preset::Smoke, Preset::Fast] {
        let rows = preset.models();
        assert!(rows.iter().any(|r| r.stochastic) && rows.iter().any(|r| r.train_method == "oat"));
        for row in rows {
            let flags = worker_flags(4, true).join(" ");
            assert!(flags.starts_with("--workers 4"), "{flags}");
            assert!(flags.contains("--sync-bn"), "{}: {flags}", row.method);
            assert!(!worker_flags(4, false).contains(&"--sync-bn".to_string()));
            assert!(worker_flags(1, true).is_empty());
        }
    }
}

/// The fast preset runs AutoAttack on every one of its rows (the published protocol),
/// and its list names no row the preset does not have.
#[test]
fn the_fast_preset_runs_autoattack_on_every_row() {
    let (rows, limit) = Preset::Fast.autoattack();
    let methods: Vec<&str> = Preset::Fast.models().iter().map(|r| r.method).collect();
    assert_eq!(rows, methods.as_slice());
    assert_eq!(limit, Some(1000));
}
