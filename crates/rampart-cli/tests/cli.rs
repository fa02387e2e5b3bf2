//! The `rampart` binary end to end, on a tiny CIFAR-10 written in the official binary
//! format.

use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::{
    ok, on_model, owned, quick_eval_args, rampart, rampart_command, read_json, refused, s, text,
    tiny_cifar10_dir, tiny_train_args, train_tiny, without_timings, write_tiny_cifar10, TestResult,
};

#[test]
fn help_explains_every_flag() -> TestResult {
    let out = rampart(&["train", "--help"])?;
    assert!(out.status.success());
    let help = text(&out);
    for flag in [
        "--preset",
        "--method",
        "--arch",
        "--dataset",
        "--data-dir",
        "--out",
        "--epochs",
        "--batch-size",
        "--lr",
        "--momentum",
        "--nesterov",
        "--no-nesterov",
        "--weight-decay",
        "--decay-scope",
        "--schedule",
        "--milestones",
        "--gamma",
        "--peak",
        "--warmup-epochs",
        "--augment",
        "--cutout",
        "--label-smoothing",
        "--seed",
        "--train-limit",
        "--test-limit",
        "--eval-batch-size",
        "--resume",
        "--device",
        "--threads",
        "normal-wrn28-10",
        "normal-preact-resnet18",
        "RAMPART_DATA_DIR",
        "history.jsonl",
    ] {
        assert!(help.contains(flag), "train --help lacks {flag}:\n{help}");
    }
    let help = text(&rampart(&["eval", "--help"])?);
    for flag in [
        "--model",
        "--data-dir",
        "--dataset",
        "--test-limit",
        "--batch-size",
        "--suite",
        "--out",
        "predictions.json",
    ] {
        assert!(help.contains(flag), "eval --help lacks {flag}:\n{help}");
    }
    Ok(())
}

#[test]
fn bad_flags_and_missing_data_fail_clearly() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = s(dir.path());
    let train = |epochs: &str, data: &str, to: &str, extra: &[&str]| {
        let args = [
            "train",
            "--arch",
            "wrn-10-1",
            "--epochs",
            epochs,
            "--data-dir",
            data,
        ];
        rampart(&[args.as_slice(), &["--out", to], extra].concat())
    };
    let run = train("0", out, out, &[])?;
    assert!(!run.status.success());
    assert!(
        text(&run).contains("--epochs must be at least 1"),
        "{}",
        text(&run)
    );

    let empty = dir.path().join("nothing-here");
    let run = train("1", s(&empty), &format!("{out}/run"), &[])?;
    assert!(!run.status.success());
    let msg = text(&run);
    assert!(
        msg.contains("cifar-10-binary.tar.gz") && msg.contains("--data-dir"),
        "{msg}"
    );

    let run = train("1", out, out, &["--threads", "0"])?;
    assert!(
        text(&run).contains("--threads must be at least 1"),
        "{}",
        text(&run)
    );
    Ok(())
}

/// A folder another process writes into is refused by every long command, with the
/// holder named, before anything is written; once the holder lets go it is free.
#[test]
fn an_output_folder_in_use_is_refused() -> TestResult {
    let dir = tiny_cifar10_dir(4)?;
    let data = s(dir.path());
    let out = dir.path().join("busy");
    let lock = rampart_fs::OutputLock::acquire(&out, "pid 42: rampart train --out busy")?;
    let model = dir.path().join("m.safetensors");
    let train = tiny_train_args("1", &["--data-dir", data], &out);
    for args in [
        train.clone(),
        on_model("eval", &model, data, &["--suite", "clean"], &out),
        on_model("attack", &model, data, &["--eps", "8/255"], &out),
        on_model("sweep", &model, data, &["--over", "lambda"], &out),
    ] {
        let run = rampart(&args)?;
        assert!(!run.status.success(), "{args:?} ran in a locked folder");
        let msg = text(&run);
        assert!(
            msg.contains("in use by another running process") && msg.contains("pid 42"),
            "{args:?}: {msg}"
        );
    }
    assert!(!out.join("config.json").exists() && !out.join("train.log").exists());
    drop(lock);
    let run = rampart(&train)?;
    assert!(run.status.success(), "{}", text(&run));
    Ok(())
}

#[test]
fn train_resume_and_eval_write_their_files() -> TestResult {
    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    let run_dir = dir.path().join("run");
    let train_args = [
        "train",
        "--threads",
        "2",
        "--arch",
        "wrn-10-1",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--schedule",
        "multistep",
        "--milestones",
        "50%",
        "--cutout",
        "8",
        "--test-limit",
        "4",
        "--data-dir",
        data,
        "--out",
        s(&run_dir),
    ];
    let run = rampart(&train_args)?;
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("trained 2 epochs"),
        "{}",
        text(&run)
    );
    for file in [
        "config.json",
        "command.txt",
        "model.safetensors",
        "checkpoint.safetensors",
        "history.jsonl",
        "train.log",
        "summary.json",
    ] {
        assert!(run_dir.join(file).is_file(), "{file} missing");
    }
    let config = read_json(&run_dir.join("config.json"))?;
    assert_eq!(config["arch"], "wrn-10-1");
    assert_eq!(config["method"], "normal");
    assert_eq!(config["train"]["schedule"]["milestones"][0], "50%");
    assert_eq!(config["train"]["augmentation"]["cutout"], 8);
    let summary = read_json(&run_dir.join("summary.json"))?;
    assert_eq!(
        (
            summary["epochs"].as_u64(),
            summary["train_examples"].as_u64(),
            summary["test_examples"].as_u64()
        ),
        (Some(2), Some(40), Some(4))
    );
    assert_eq!(summary["parameters"], 77850);
    let history = std::fs::read_to_string(run_dir.join("history.jsonl"))?;
    assert_eq!(history.lines().count(), 2);
    assert!(std::fs::read_to_string(run_dir.join("command.txt"))?.contains("--milestones 50%"));

    // The same folder again: refused without --resume, a no-op with it.
    let said = refused(&train_args)?;
    assert!(said.contains("--resume"), "{said}");
    let mut resume_args = train_args.to_vec();
    resume_args.push("--resume");
    let resumed = rampart(&resume_args)?;
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_eq!(
        std::fs::read_to_string(run_dir.join("command.txt"))?
            .lines()
            .count(),
        2
    );
    // A resumed run with other settings is refused.
    let mut other = resume_args.clone();
    other.extend(["--seed", "3"]);
    let said = refused(&other)?;
    assert!(said.contains("cannot resume"), "{said}");
    // ... before touching the run's files.
    let config = read_json(&run_dir.join("config.json"))?;
    assert_eq!(config["train"]["seed"], 0);

    let eval_dir = dir.path().join("eval");
    let model = run_dir.join("model.safetensors");
    let eval = ok(&on_model(
        "eval",
        &model,
        data,
        &["--batch-size", "3"],
        &eval_dir,
    ))?;
    assert!(
        String::from_utf8_lossy(&eval.stdout).contains("on 8 test examples"),
        "{}",
        text(&eval)
    );
    let results = read_json(&eval_dir.join("results.json"))?;
    assert_eq!(results["schema_version"], 1);
    assert_eq!(results["test_examples"], 8);
    assert_eq!(results["dataset"], "cifar10");
    assert_eq!(results["method"], "normal");
    let acc = results["clean_accuracy"].as_f64().unwrap_or(-1.0);
    let err = results["clean_error"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&acc) && (acc + err - 1.0).abs() < 1e-12);
    let predictions = read_json(&eval_dir.join("predictions.json"))?;
    assert_eq!(predictions["labels"].as_array().map(Vec::len), Some(8));
    assert_eq!(predictions["confidence"].as_array().map(Vec::len), Some(8));
    for file in [
        "results.md",
        "probs.safetensors",
        "config.json",
        "command.txt",
        "eval.log",
    ] {
        assert!(eval_dir.join(file).is_file(), "{file} missing");
    }

    // A model evaluated as another data set, and a file that is no model.
    let cifar100 = ["--dataset", "cifar100"];
    let wrong = rampart(&on_model("eval", &model, data, &cifar100, &eval_dir))?;
    assert!(
        text(&wrong).contains("has 10 outputs but CIFAR-100 has 100 classes"),
        "{}",
        text(&wrong)
    );
    let history = run_dir.join("history.jsonl");
    let said = refused(&on_model("eval", &history, data, &[], &eval_dir))?;
    assert!(said.contains("history.jsonl"), "{said}");
    Ok(())
}

/// An attack-based method fine-tuned from a normal model, with an EMA, then the PGD
/// suite: the files and fields the reproduction reads.
#[test]
fn adversarial_training_and_the_pgd_suite() -> TestResult {
    let help = text(&rampart(&["train", "--help"])?);
    for flag in [
        "--eps",
        "--attack-steps",
        "--attack-step-size",
        "--adv-fraction",
        "--beta",
        "--rho",
        "--ema",
        "--init-from",
        "--threshold-held-out",
        "fast-at",
        "trades",
        "ccat",
        "at-wrn28-10",
        "fast-at-preact-resnet18",
        "trades-wrn34-10",
        "ccat-resnet20",
    ] {
        assert!(help.contains(flag), "train --help lacks {flag}:\n{help}");
    }
    let help = text(&rampart(&["eval", "--help"])?);
    for flag in ["pgd20", "--attack-limit", "--attack-steps", "--eps"] {
        assert!(help.contains(flag), "eval --help lacks {flag}:\n{help}");
    }

    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    let common = ["--lr", "0.05", "--data-dir", data];
    let train =
        |extra: &[&str], out: &Path| owned(&tiny_train_args("1", &[&common, extra].concat(), out));
    let normal = dir.path().join("normal");
    ok(&train(&[], &normal))?;

    let ccat = dir.path().join("ccat");
    let normal_model = normal.join("model.safetensors");
    ok(&train(
        &[
            "--method",
            "ccat",
            "--attack-steps",
            "2",
            "--attack-step-size",
            "0.01",
            "--ema",
            "0.9",
            "--init-from",
            s(&normal_model),
            "--threshold-held-out",
            "8",
        ],
        &ccat,
    ))?;
    let config = read_json(&ccat.join("config.json"))?;
    assert_eq!(config["method"], "ccat");
    assert_eq!(config["method_settings"]["attack"]["steps"], 2);
    assert_eq!(config["method_settings"]["rho"], 10.0);
    assert_eq!(config["train"]["ema"], 0.9);
    assert_eq!(config["threshold_held_out"], 8);

    // The method's flags are refused for a method that does not use them.
    let elsewhere = dir.path().join("x");
    let said = refused(&train(&["--method", "at", "--beta", "6"], &elsewhere))?;
    assert!(said.contains("--beta does not apply"), "{said}");

    let eval_dir = dir.path().join("eval");
    let eval = ok(&on_model(
        "eval",
        &ccat.join("model.safetensors"),
        data,
        &[
            "--suite",
            "pgd20",
            "--attack-steps",
            "2",
            "--attack-limit",
            "5",
            "--batch-size",
            "4",
        ],
        &eval_dir,
    ))?;
    assert!(
        String::from_utf8_lossy(&eval.stdout).contains("on 5 attacked test examples"),
        "{}",
        text(&eval)
    );
    let results = read_json(&eval_dir.join("results.json"))?;
    assert_eq!(results["suite"], "pgd20");
    assert_eq!(results["method"], "ccat");
    assert_eq!(results["test_examples"], 8);
    assert_eq!(results["robust_examples"], 5);
    assert_eq!(results["eps"], 8.0 / 255.0);
    let robust = results["robust_accuracy"].as_f64().unwrap_or(-1.0);
    let robust_err = results["robust_error"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&robust) && (robust + robust_err - 1.0).abs() < 1e-12);
    let attack = results["attack"].as_str().unwrap_or_default();
    assert!(
        attack.starts_with("pgd-2 linf") && attack.ends_with("worst case of ce, cw, conf"),
        "{attack}"
    );
    // The worst case is over every objective, each reported alone, with intervals.
    let attacks = results["attacks"].as_array().ok_or("no attacks")?;
    let names: Vec<&str> = attacks.iter().filter_map(|a| a["name"].as_str()).collect();
    assert_eq!(names, ["pgd2_ce", "pgd2_margin", "pgd2_conf"]);
    for a in attacks {
        let alone = a["robust_accuracy"].as_f64().unwrap_or(-1.0);
        assert!(alone + 1e-12 >= robust, "{a}");
    }
    let ci = &results["robust_accuracy_ci"];
    assert!(
        ci["lo"].as_f64().unwrap_or(2.0) <= robust && robust <= ci["hi"].as_f64().unwrap_or(-1.0)
    );
    // Trust checks ran and per-example records exist for every attack.
    assert!(
        results["trust"]["points"].as_u64() == Some(5),
        "{}",
        results["trust"]
    );
    let record = read_json(&eval_dir.join("per_example/pgd.json"))?;
    assert_eq!(record["fooled"].as_array().map(Vec::len), Some(3));
    let logits = candle_core::safetensors::load(
        eval_dir.join("per_example/logits.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    assert_eq!(logits["clean_logits"].dims(), &[8, 10]);
    assert_eq!(logits["pgd2_conf.logits"].dims(), &[5, 10]);

    // Attack flags belong to attack suites.
    let limit = ["--attack-limit", "5"];
    let said = refused(&on_model("eval", &normal_model, data, &limit, &eval_dir))?;
    assert!(
        said.contains("--attack-limit applies to attack suites"),
        "{said}"
    );
    Ok(())
}

/// `rampart attack` writes adversarial examples within budget and a summary;
/// `rampart eval --suite quick` and `rampart compare` write their reports; bad attack
/// flags are refused with messages naming the flag.
#[test]
fn attack_quick_suite_and_compare() -> TestResult {
    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    let model = train_tiny(data, &dir.path().join("m"), &[])?;

    let out = dir.path().join("atk");
    let run = ok(&on_model(
        "attack",
        &model,
        data,
        &["--eps", "8/255,16/255", "--steps", "3", "--test-limit", "6"],
        &out,
    ))?;
    assert!(text(&run).contains("robust accuracy"), "{}", text(&run));
    let summary = read_json(&out.join("summary.json"))?;
    assert_eq!(summary["results"].as_array().map(Vec::len), Some(2));
    let tensors = candle_core::safetensors::load(
        out.join("adversarial.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let (adv, norm) = (&tensors["adv_0"], &tensors["norm_0"]);
    assert_eq!(adv.dims(), &[6, 3, 32, 32]);
    let max_norm: f32 = norm.max(0)?.to_scalar()?;
    assert!(
        max_norm <= 8.0 / 255.0 + 1e-6,
        "L∞ norm {max_norm} exceeds ε"
    );
    let (lo, hi): (f32, f32) = (adv.min_all()?.to_scalar()?, adv.max_all()?.to_scalar()?);
    assert!(lo >= 0.0 && hi <= 1.0);

    for (flags, needle) in [
        (vec!["--norm", "l0", "--eps", "2.5"], "integer"),
        (vec!["--eps", "-1"], "eps"),
        (vec!["--norm", "l7"], "--norm"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--momentum", "1.5"], "momentum"),
        (vec!["--attack", "cw"], "--attack"),
    ] {
        let run = rampart(&on_model("attack", &model, data, &flags, &out))?;
        assert!(!run.status.success(), "{flags:?} was accepted");
        assert!(text(&run).contains(needle), "{flags:?}: {}", text(&run));
    }

    let quick = dir.path().join("quick");
    ok(&on_model(
        "eval",
        &model,
        data,
        &[
            "--suite",
            "quick",
            "--attack-limit",
            "4",
            "--held-out",
            "4",
            "--steps-scale",
            "0.25",
        ],
        &quick,
    ))?;
    assert!(quick.join("results.json").is_file() && quick.join("results.md").is_file());
    let cmp = dir.path().join("cmp");
    let spec = format!("tiny={}", quick.join("results.json").display());
    ok(&["compare", "--out", s(&cmp), &spec])?;
    assert!(cmp.join("comparison.md").is_file());
    Ok(())
}

#[test]
fn oat_models_and_stochastic_students() -> TestResult {
    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    let common = [
        "--lr",
        "0.05",
        "--threshold-held-out",
        "0",
        "--data-dir",
        data,
    ];
    let train = |out: &Path, extra: &[&str]| -> TestResult {
        ok(&tiny_train_args("1", &[&common, extra].concat(), out))?;
        Ok(())
    };
    let teacher = dir.path().join("teacher");
    train(&teacher, &[])?;
    let teacher_model = teacher.join("model.safetensors");
    let student = dir.path().join("student");
    train(
        &student,
        &[
            "--method",
            "at",
            "--attack-steps",
            "1",
            "--init-from",
            s(&teacher_model),
            "--noise",
            "0.1",
        ],
    )?;
    let oat = dir.path().join("oat");
    train(&oat, &["--method", "oat", "--attack-steps", "1"])?;
    let config = read_json(&student.join("config.json"))?;
    assert!((config["noise"].as_f64().unwrap_or(0.0) - 0.1).abs() < 1e-6);

    let eval = |model: &Path, out: &Path, extra: &[&str]| -> std::io::Result<Output> {
        let flags = [&["--threads", "2"], extra].concat();
        rampart(&on_model("eval", model, data, &flags, out))
    };
    let attack = |model: &Path, out: &Path, extra: &[&str]| {
        let flags = [&["--threads", "2"], extra].concat();
        ok(&on_model("attack", model, data, &flags, out))
    };
    let results = |out: &Path| read_json(&out.join("results.json"));

    // OAT: λ is a test-time parameter.
    let oat_model = oat.join("model.safetensors");
    let out = dir.path().join("oat-eval");
    let run = eval(&oat_model, &out, &["--lambda", "0.3"])?;
    assert!(run.status.success(), "{}", text(&run));
    assert!((results(&out)?["lambda"].as_f64().unwrap_or(0.0) - 0.3).abs() < 1e-6);
    let run = eval(&teacher_model, &dir.path().join("x"), &["--lambda", "0.3"])?;
    assert!(!run.status.success());
    assert!(
        text(&run).contains("only to once-for-all"),
        "{}",
        text(&run)
    );
    let run = eval(&oat_model, &dir.path().join("y"), &["--lambda", "1.5"])?;
    assert!(!run.status.success());
    let out = dir.path().join("oat-attack");
    let flags = ["--lambda", "0.2", "--steps", "2", "--test-limit", "4"];
    attack(&oat_model, &out, &flags)?;
    let config = read_json(&out.join("config.json"))?;
    assert!((config["lambda"].as_f64().unwrap_or(0.0) - 0.2).abs() < 1e-6);
    assert_eq!(config["eot_samples"], 1);

    // The student: attacks use EOT, figures are means over noise draws.
    let student_model = student.join("model.safetensors");
    let out = dir.path().join("student-eval");
    let run = eval(
        &student_model,
        &out,
        &[
            "--suite",
            "pgd20",
            "--attack-steps",
            "2",
            "--attack-limit",
            "8",
            "--eot",
            "2",
            "--draws",
            "3",
        ],
    )?;
    assert!(run.status.success(), "{}", text(&run));
    let r = results(&out)?;
    let st = &r["stochastic"];
    assert_eq!(st["draws"], 3);
    assert_eq!(st["eot_samples"], 2);
    let clean: Vec<f64> = serde_json::from_value(st["clean_accuracy_draws"].clone())?;
    let robust: Vec<f64> = serde_json::from_value(st["robust_accuracy_draws"].clone())?;
    assert_eq!((clean.len(), robust.len()), (3, 3));
    let mean = clean.iter().sum::<f64>() / 3.0;
    assert!((r["clean_accuracy"].as_f64().unwrap_or(-1.0) - mean).abs() < 1e-9);
    assert!(robust.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(st["robust_accuracy_eot"].is_number());
    let attacked_clean = r["attacked_clean_accuracy"]
        .as_f64()
        .ok_or("no attacked clean")?;
    assert!(attacked_clean + 1e-12 >= r["robust_accuracy"].as_f64().unwrap_or(2.0));
    let md = std::fs::read_to_string(out.join("results.md"))?;
    assert!(md.contains("independent noise draws"), "{md}");
    // `rampart attack` on the student uses EOT by default.
    let out = dir.path().join("student-attack");
    attack(&student_model, &out, &["--steps", "1", "--test-limit", "2"])?;
    let config = read_json(&out.join("config.json"))?;
    // 20 samples by default (AutoAttack's rand version, REFERENCE §2).
    assert_eq!(config["eot_samples"], 20);
    // Without noise the student is deterministic: no draws.
    let out = dir.path().join("student-quiet");
    let run = eval(&student_model, &out, &["--noise-scale", "0"])?;
    assert!(run.status.success(), "{}", text(&run));
    assert!(results(&out)?.get("stochastic").is_none());
    let run = eval(
        &student_model,
        &dir.path().join("z"),
        &["--noise-scale", "-1"],
    )?;
    assert!(!run.status.success());
    Ok(())
}

#[test]
fn calibration_methods_train_from_the_command_line() -> TestResult {
    let help = text(&rampart(&["train", "--help"])?);
    for flag in ["regmixup", "sat", "ar-adals", "--mixup-alpha"] {
        assert!(help.contains(flag), "train --help lacks {flag}:\n{help}");
    }
    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    for (method, extra) in [
        ("regmixup", vec!["--mixup-alpha", "2"]),
        ("sat", vec!["--attack-steps", "2", "--beta", "0.5"]),
        ("ar-adals", vec!["--label-smoothing", "0.2"]),
    ] {
        let out = dir.path().join(method);
        let flags = [
            "--lr",
            "0.05",
            "--threshold-held-out",
            "0",
            "--data-dir",
            data,
        ];
        let method_flags = [flags.as_slice(), &["--method", method], &extra].concat();
        let run = rampart(&tiny_train_args("1", &method_flags, &out))?;
        assert!(run.status.success(), "{method}: {}", text(&run));
        let config = read_json(&out.join("config.json"))?;
        assert_eq!(config["method"], method);
        let history = std::fs::read_to_string(out.join("history.jsonl"))?;
        let record: serde_json::Value =
            serde_json::from_str(history.lines().next().ok_or("one epoch recorded")?)?;
        match method {
            "regmixup" => assert_eq!(config["method_settings"]["alpha"], 2.0),
            "sat" => assert_eq!(config["method_settings"]["beta"], 0.5),
            _ => {
                assert_eq!(config["method_settings"]["initial_smoothing"], 0.2);
                // The per-group smoothing after the epoch is in the history.
                let smoothing = record["method_state"]["smoothing"]
                    .as_array()
                    .ok_or("AR-AdaLS records its smoothing per epoch")?;
                assert_eq!(smoothing.len(), 4);
                assert!(smoothing
                    .iter()
                    .all(|v| v.as_f64().is_some_and(|v| (0.0..=0.5).contains(&v))));
            }
        }
        if method != "ar-adals" {
            assert!(record.get("method_state").is_none(), "{record}");
        }
    }
    Ok(())
}

/// `RUST_LOG` of the kill tests: progress, and a line per batch saved or loaded.
const PROGRESS_LOG: &str = "info,rampart_eval=debug";

/// Lines that follow finished, saved work: a batch of an attack loop, an AutoAttack
/// batch, a finished step of a protocol suite.
fn is_progress(line: &str) -> bool {
    ["batch saved", "autoattack batch", "attack done"]
        .iter()
        .any(|m| line.contains(m))
}

/// Lines of a run that continued saved work.
fn shows_resume(text: &str) -> bool {
    [
        "batch loaded",
        "loaded from",
        "resumed from",
        "sweep: loaded",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// A seeded stream of kill points (splitmix64).
struct KillPoints(u64);

impl KillPoints {
    /// A number in 1..=n (n ≥ 1).
    fn pick(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        1 + ((z ^ (z >> 31)) % n.max(1) as u64) as usize
    }
}

/// `rampart args` run to the end with progress lines on stderr.
fn run_logged(args: &[String]) -> std::io::Result<Output> {
    rampart_command(args, PROGRESS_LOG).output()
}

/// Starts `rampart args` in the background, logging at `log`, its stderr piped.
fn spawn_piped(args: &[String], log: &str) -> std::io::Result<std::process::Child> {
    rampart_command(args, log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
}

/// Starts `rampart args` and kills it with SIGKILL right after its `k`-th stderr line
/// that `counts`, or when it ends first.
fn kill_after_line(
    args: &[String],
    k: usize,
    counts: impl Fn(&str) -> bool,
) -> std::io::Result<()> {
    use std::io::BufRead;
    let mut child = spawn_piped(args, PROGRESS_LOG)?;
    let stderr = child.stderr.take().ok_or(std::io::ErrorKind::BrokenPipe)?;
    let mut seen = 0;
    for line in std::io::BufReader::new(stderr).lines() {
        if counts(&line?) {
            seen += 1;
            if seen == k {
                break;
            }
        }
    }
    let _ = child.kill(); // SIGKILL (an error: it had ended already)
    child.wait()?;
    Ok(())
}

/// Whether `out` holds a run that was stopped before it finished.
fn interrupted(out: &Path) -> bool {
    std::fs::read_to_string(out.join(rampart_fs::SETTINGS_FILE))
        .is_ok_and(|s| s.lines().nth(1) == Some("running"))
}

/// A JSON output with what legitimately differs between two runs removed: wall times,
/// which steps were loaded from disk, and the output folder's name.
fn comparable_json(
    path: &Path,
    out: &Path,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)?.replace(s(out), "OUT");
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    without_timings(&mut v, &[]);
    Ok(v)
}

/// The command `args(out)` run whole, then `kills` times killed with SIGKILL at a seeded
/// random progress line (any line when the run prints none) and started again with the
/// same command: the `files` each run leaves (JSON compared without timings, others
/// byte for byte) equal the uninterrupted run's, and every restart of a run killed
/// after saved work continued it.
fn killed_runs_end_like_the_whole(
    dir: &Path,
    name: &str,
    args: impl Fn(&Path) -> Vec<String>,
    files: &[&str],
    seed: u64,
    kills: usize,
) -> TestResult {
    let whole = dir.join(format!("{name}-whole"));
    let run = run_logged(&args(&whole))?;
    assert!(run.status.success(), "{name}: {}", text(&run));
    let log = String::from_utf8_lossy(&run.stderr).to_string();
    let markers = log.lines().filter(|l| is_progress(l)).count();
    let lines = log.lines().count();
    let mut points = KillPoints(seed);
    for i in 0..kills {
        let out = dir.join(format!("{name}-killed-{i}"));
        let k = if markers > 0 {
            let k = points.pick(markers);
            kill_after_line(&args(&out), k, is_progress)?;
            k
        } else {
            let k = points.pick(lines.saturating_sub(1).max(1));
            kill_after_line(&args(&out), k, |_| true)?;
            0
        };
        let was_interrupted = interrupted(&out);
        let again = run_logged(&args(&out))?;
        let msg = text(&again);
        assert!(again.status.success(), "{name}, kill {i}: {msg}");
        if was_interrupted && k > 0 {
            assert!(
                shows_resume(&msg),
                "{name}: killed after progress line {k} of {markers}, the restart continued nothing:\n{msg}"
            );
        }
        for file in files {
            let (a, b) = (whole.join(file), out.join(file));
            if file.ends_with(".json") {
                assert_eq!(
                    comparable_json(&b, &out)?,
                    comparable_json(&a, &whole)?,
                    "{name}, kill {i} after line {k}: {file}"
                );
            } else {
                assert!(
                    std::fs::read(&b)? == std::fs::read(&a)?,
                    "{name}, kill {i}: {file} differs"
                );
            }
        }
        assert!(
            !out.join("progress").exists(),
            "{name}: the journal is left behind"
        );
    }
    Ok(())
}

/// `rampart eval` of every suite killed with SIGKILL at random points (after a seeded
/// random number of finished batches) and started again with the same command ends
/// with the uninterrupted run's results and per-example records.
#[test]
fn every_eval_suite_killed_resumes_to_the_same_results() -> TestResult {
    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    let model = train_tiny(data, &dir.path().join("m"), &[])?;
    let protocol = [
        "--held-out",
        "2",
        "--batch-size",
        "2",
        "--trust-examples",
        "2",
    ];
    let suites: [(&str, Vec<&str>, Vec<&str>); 6] = [
        ("clean", vec![], vec!["results.json", "predictions.json"]),
        (
            "pgd20",
            vec![
                "--attack-steps",
                "4",
                "--batch-size",
                "2",
                "--trust-examples",
                "2",
            ],
            vec![
                "results.json",
                "per_example/pgd.json",
                "per_example/logits.safetensors",
            ],
        ),
        (
            "quick",
            [
                protocol.as_slice(),
                &["--steps-scale", "0.25", "--curve-points", "5"],
            ]
            .concat(),
            vec![
                "results.json",
                "per_example/linf_8_255.worst.json",
                "per_example/min_eps_linf.json",
            ],
        ),
        (
            "ccat",
            [
                protocol.as_slice(),
                &[
                    "--steps-scale",
                    "0.05",
                    "--restarts-scale",
                    "0.1",
                    "--curve-points",
                    "5",
                ],
            ]
            .concat(),
            vec!["results.json", "per_example/distal.json"],
        ),
        (
            "full",
            [
                protocol.as_slice(),
                &[
                    "--steps-scale",
                    "0.02",
                    "--restarts-scale",
                    "0.1",
                    "--curve-points",
                    "5",
                ],
            ]
            .concat(),
            vec!["results.json", "per_example/linf_8_255.worst.json"],
        ),
        (
            "autoattack",
            vec![
                "--attack-limit",
                "4",
                "--batch-size",
                "2",
                "--trust-examples",
                "2",
            ],
            vec!["results.json", "per_example/autoattack.json"],
        ),
    ];
    for (i, (suite, extra, files)) in suites.iter().enumerate() {
        let args = |out: &Path| -> Vec<String> {
            let flags = [&["--threads", "2", "--suite", suite], extra.as_slice()].concat();
            owned(&on_model("eval", &model, data, &flags, out))
        };
        killed_runs_end_like_the_whole(dir.path(), suite, args, files, 17 + i as u64, 1)?;
    }
    Ok(())
}

/// `rampart attack` killed with SIGKILL after a random number of finished batches and
/// started again ends with the uninterrupted run's adversarial examples and summary; a
/// restart with other settings is refused, naming them.
#[test]
fn a_killed_attack_resumes_to_the_same_examples() -> TestResult {
    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    let model = train_tiny(data, &dir.path().join("m"), &[])?;
    let args = |eps: &str, out: &Path| -> Vec<String> {
        let flags = [
            "--threads",
            "2",
            "--eps",
            eps,
            "--steps",
            "5",
            "--batch-size",
            "2",
            "--trust-examples",
            "2",
        ];
        owned(&on_model("attack", &model, data, &flags, out))
    };
    let files = ["summary.json", "adversarial.safetensors"];
    killed_runs_end_like_the_whole(
        dir.path(),
        "attack",
        |o| args("4/255,8/255", o),
        &files,
        5,
        2,
    )?;

    // A run stopped before it finished (its settings file says so), then started with
    // another ε: refused by name, and nothing of it is overwritten.
    let out = dir.path().join("other");
    let run = rampart(&args("8/255", &out))?;
    assert!(run.status.success(), "{}", text(&run));
    let settings = out.join(rampart_fs::SETTINGS_FILE);
    let written = std::fs::read_to_string(&settings)?.replacen("finished", "running", 1);
    std::fs::write(&settings, &written)?;
    assert!(interrupted(&out));
    let summary = std::fs::read(out.join("summary.json"))?;
    let refused = rampart(&args("16/255", &out))?;
    let msg = text(&refused);
    assert!(!refused.status.success(), "{msg}");
    assert!(
        msg.contains("other settings") && msg.contains("--eps: 8/255 → 16/255"),
        "{msg}"
    );
    assert_eq!(std::fs::read(out.join("summary.json"))?, summary);
    assert_eq!(std::fs::read_to_string(&settings)?, written);
    Ok(())
}

/// `rampart sweep` killed with SIGKILL at a random point and started again keeps the
/// values that finished, continues the interrupted one and ends with the uninterrupted
/// sweep.
#[test]
fn a_killed_sweep_resumes_to_the_same_points() -> TestResult {
    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    let model = train_tiny(data, &dir.path().join("student"), &["--noise", "0.1"])?;
    let args = |out: &Path| -> Vec<String> {
        let flags = [
            "--threads",
            "2",
            "--over",
            "noise-scale",
            "--values",
            "0,1",
            "--suite",
            "pgd20",
            "--attack-steps",
            "2",
            "--attack-limit",
            "4",
            "--batch-size",
            "2",
            "--eot",
            "2",
            "--draws",
            "2",
            "--trust-examples",
            "2",
        ];
        owned(&on_model("sweep", &model, data, &flags, out))
    };
    let files = [
        "sweep.json",
        "noise-scale-0/results.json",
        "noise-scale-1/results.json",
    ];
    killed_runs_end_like_the_whole(dir.path(), "sweep", args, &files, 9, 2)
}

/// `rampart export` writes a PyTorch state dict under RobustBench's names;
/// `rampart import` of that file (with the model's normalisation) gives a model whose
/// per-example predictions equal the original's; a wrong architecture is refused.
#[test]
fn export_and_import_round_trip_through_a_pytorch_state_dict() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = write_tiny_cifar10(dir.path(), 20, 0)?;
    let data = s(&data);
    let model = train_tiny(data, &dir.path().join("train"), &[])?;
    let exported = dir.path().join("wrn.safetensors");
    let run = ok(&["export", "--model", s(&model), "--out", s(&exported)])?;
    assert!(text(&run).contains("robustbench"), "{}", text(&run));

    let imported = dir.path().join("imported.safetensors");
    let import = |arch: &str, out: &Path| {
        rampart(&[
            "import",
            s(&exported),
            "--arch",
            arch,
            "--mean",
            "0.4914,0.4822,0.4465",
            "--std",
            "0.2470,0.2435,0.2616",
            "--out",
            s(out),
        ])
    };
    let run = import("wrn-10-1", &imported)?;
    assert!(run.status.success(), "{}", text(&run));
    let wrong = import("wrn-16-1", &dir.path().join("wrong.safetensors"))?;
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("missing"), "{}", text(&wrong));

    let mut predictions = Vec::new();
    for (name, m) in [("original", &model), ("imported", &imported)] {
        let out = dir.path().join(name);
        ok(&on_model("eval", m, data, &["--suite", "clean"], &out))?;
        predictions.push(std::fs::read_to_string(out.join("predictions.json"))?);
    }
    assert_eq!(predictions[0], predictions[1]);
    Ok(())
}

/// `rampart export --format onnx` writes a graph that `rampart eval` and `rampart
/// attack` take as `--model x.onnx`: the same predictions as the Rampart model, an
/// attack within ε; the ONNX-only input flags are refused for a Rampart model file.
#[test]
fn onnx_models_are_evaluated_and_attacked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = write_tiny_cifar10(dir.path(), 12, 0)?;
    let data = s(&data);
    let model = train_tiny(data, &dir.path().join("train"), &[])?;
    let onnx = dir.path().join("wrn.onnx");
    ok(&[
        "export",
        "--model",
        s(&model),
        "--format",
        "onnx",
        "--out",
        s(&onnx),
    ])?;

    let mut predicted = Vec::new();
    for (name, m) in [("rampart", &model), ("onnx", &onnx)] {
        let out = dir.path().join(name);
        let flags = ["--suite", "clean", "--dataset", "cifar10"];
        ok(&on_model("eval", m, data, &flags, &out))?;
        predicted.push(read_json(&out.join("predictions.json"))?["predicted"].clone());
    }
    assert_eq!(predicted[0], predicted[1]);

    let out = dir.path().join("atk");
    let flags = ["--eps", "8/255", "--steps", "2", "--test-limit", "4"];
    ok(&on_model("attack", &onnx, data, &flags, &out))?;
    let tensors = candle_core::safetensors::load(
        out.join("adversarial.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let max_norm: f32 = tensors["norm_0"].max(0)?.to_scalar()?;
    assert!(
        max_norm <= 8.0 / 255.0 + 1e-6,
        "L∞ norm {max_norm} exceeds ε"
    );

    let flags = ["--onnx-mean", "0.5,0.5,0.5", "--suite", "clean"];
    let run = rampart(&on_model(
        "eval",
        &model,
        data,
        &flags,
        &dir.path().join("bad"),
    ))?;
    assert!(!run.status.success());
    assert!(text(&run).contains("ONNX models"), "{}", text(&run));
    Ok(())
}

/// Sends `signal` (INT, TERM) to a child process.
fn signal(child: &std::process::Child, signal: &str) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()?;
    assert!(status.success(), "kill -{signal} failed");
    Ok(())
}

/// Waits until `ready()` or the child exits (two minutes at most).
fn wait_for(child: &mut std::process::Child, ready: impl Fn() -> bool) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ready() && child.try_wait()?.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(())
}

/// Ctrl-C (SIGINT) stops `rampart train` after a finished batch with exit status 130
/// and a line naming the checkpoint and `--resume`; resuming ends with the weights of
/// the uninterrupted run. SIGTERM stops `rampart eval` the same way, and running it
/// again ends with the uninterrupted results.
#[test]
fn sigint_and_sigterm_stop_cleanly_and_resume() -> TestResult {
    let dir = tiny_cifar10_dir(8)?;
    let data = s(dir.path());
    let train = |out: &Path| owned(&tiny_train_args("40", &["--data-dir", data], out));
    let straight = dir.path().join("straight");
    let run = rampart(&train(&straight))?;
    assert!(run.status.success(), "{}", text(&run));

    let out = dir.path().join("interrupted");
    let mut child = spawn_piped(&train(&out), "warn")?;
    let ckpt = out.join("checkpoint.safetensors");
    wait_for(&mut child, || ckpt.is_file())?;
    signal(&child, "INT")?;
    let stopped = child.wait_with_output()?;
    let msg = String::from_utf8_lossy(&stopped.stderr).to_string();
    assert_eq!(stopped.status.code(), Some(130), "{msg}");
    assert!(
        msg.contains("interrupted at epoch") && msg.contains("--resume"),
        "{msg}"
    );
    assert!(!out.join("model.safetensors").exists());
    let resumed = rampart(&[train(&out), vec!["--resume".to_string()]].concat())?;
    assert!(resumed.status.success(), "{}", text(&resumed));
    let weights = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu);
    let (a, b) = (
        weights(&straight.join("model.safetensors"))?,
        weights(&out.join("model.safetensors"))?,
    );
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let diff: f32 = (t - &b[name])?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        assert_eq!(diff, 0.0, "{name} differs after a resumed SIGINT");
    }

    let model = straight.join("model.safetensors");
    let eval = |out: &Path| quick_eval_args(&model, data, out, &["--attack-limit", "8"]);
    let whole = dir.path().join("whole");
    let run = rampart(&eval(&whole))?;
    assert!(run.status.success(), "{}", text(&run));
    let out = dir.path().join("eval-term");
    let mut child = spawn_piped(&eval(&out), "warn")?;
    let records = out.join("per_example");
    wait_for(&mut child, || {
        std::fs::read_dir(&records)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    })?;
    signal(&child, "TERM")?;
    let stopped = child.wait_with_output()?;
    let msg = String::from_utf8_lossy(&stopped.stderr).to_string();
    // A run that finished before the signal arrived is fine too.
    eprintln!("eval after SIGTERM: {:?}", stopped.status.code());
    if !stopped.status.success() {
        assert_eq!(stopped.status.code(), Some(130), "{msg}");
        assert!(msg.contains("run the same command again"), "{msg}");
        let again = rampart(&eval(&out))?;
        assert!(again.status.success(), "{}", text(&again));
    }
    let mut expected = read_json(&whole.join("results.json"))?;
    let mut got = read_json(&out.join("results.json"))?;
    without_timings(&mut expected, &[]);
    without_timings(&mut got, &[]);
    assert_eq!(got, expected);
    Ok(())
}
