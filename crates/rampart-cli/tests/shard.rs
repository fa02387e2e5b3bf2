//! `rampart eval --shard I/N`, `rampart attack --shard I/N` and `rampart merge` end to
//! end, on a tiny CIFAR-10 written in the official binary format: the merged folder
//! equals the unsharded run's, and sets of shards that are not one run are refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn rampart(args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .env_remove("RAMPART_DATA_DIR")
        .env("RUST_LOG", "warn")
        .output()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// `dir/cifar-10-batches-bin/` with `per_file` records in each training batch and the
/// test batch (label byte, then 3,072 pixel bytes); `salt` changes every pixel.
fn write_tiny_cifar10(dir: &Path, per_file: usize, salt: usize) -> std::io::Result<()> {
    let folder = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&folder)?;
    for (f, name) in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ]
    .iter()
    .enumerate()
    {
        let mut bytes = Vec::new();
        for r in 0..per_file {
            let label = ((f * per_file + r) % 10) as u8;
            bytes.push(label);
            bytes.extend(
                (0..3072).map(|p| ((p * 7 + usize::from(label) * 25 + r + salt) % 256) as u8),
            );
        }
        std::fs::write(folder.join(name), bytes)?;
    }
    Ok(())
}

/// WRN-10-1 trained for one epoch with `seed`; the model file.
fn train_tiny(data: &str, out: &Path, seed: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let run = rampart(&[
        "--threads",
        "2",
        "train",
        "--arch",
        "wrn-10-1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--seed",
        seed,
        "--data-dir",
        data,
        "--out",
        s(out),
    ])?;
    assert!(run.status.success(), "{}", text(&run));
    Ok(out.join("model.safetensors"))
}

/// A `quick` evaluation of 12 attacked images in batches of 4 (3 batches), 4 held out.
fn eval_args(model: &Path, data: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--threads",
        "2",
        "eval",
        "--model",
        s(model),
        "--data-dir",
        data,
        "--suite",
        "quick",
        "--held-out",
        "4",
        "--batch-size",
        "4",
        "--trust-examples",
        "4",
        "--steps-scale",
        "0.5",
        "--restarts-scale",
        "0.5",
        "--bootstrap-resamples",
        "20",
        "--out",
        s(out),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn run_ok(args: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = rampart(&refs)?;
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    Ok(text(&out))
}

fn refused(args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = rampart(args)?;
    assert!(!out.status.success(), "{args:?} was accepted");
    Ok(text(&out))
}

/// Every file under `root`, relative to it, sorted.
fn files_under(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// JSON without what differs between two runs by design: wall times, the steps
/// loaded from disk, the output folder and the command line.
fn json_without_timings(bytes: &[u8]) -> serde_json::Result<serde_json::Value> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.retain(|k, _| {
                    !k.contains("seconds")
                        && !["resumed", "out_dir", "command_line"].contains(&k.as_str())
                });
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::from_slice(bytes)?;
    strip(&mut v);
    Ok(v)
}

/// Markdown with every `(N s)` wall time blanked.
fn markdown_without_timings(text: &str) -> String {
    text.split(" s)")
        .map(|part| part.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.'))
        .collect::<Vec<_>>()
        .join(" s)")
}

/// The files of `whole` and `merged` are the same (apart from the logs, the command
/// lines, the folder's lock and run settings, and timings); returns how many were
/// compared.
fn assert_same_outputs(whole: &Path, merged: &Path) -> Result<usize, Box<dyn std::error::Error>> {
    let differ_by_design = |f: &Path| {
        let name = f.to_string_lossy();
        name.ends_with(".log")
            || name == "command.txt"
            || name == ".rampart.lock"
            || name == ".rampart.settings"
    };
    let expected: Vec<PathBuf> = files_under(whole)?
        .into_iter()
        .filter(|f| !differ_by_design(f))
        .collect();
    let got: Vec<PathBuf> = files_under(merged)?
        .into_iter()
        .filter(|f| !differ_by_design(f))
        .collect();
    assert_eq!(got, expected);
    for f in &expected {
        let a = std::fs::read(whole.join(f))?;
        let b = std::fs::read(merged.join(f))?;
        let name = f.to_string_lossy();
        if name.ends_with(".json") {
            assert_eq!(
                json_without_timings(&b)?,
                json_without_timings(&a)?,
                "{name}"
            );
        } else if name.ends_with(".md") {
            let (a, b) = (String::from_utf8(a)?, String::from_utf8(b)?);
            assert_eq!(
                markdown_without_timings(&b),
                markdown_without_timings(&a),
                "{name}"
            );
        } else {
            assert!(a == b, "{name} differs");
        }
    }
    Ok(expected.len())
}

/// An unsharded `quick` evaluation and the same evaluation in 3 shards merged write
/// the same results, records, report and plots; `rampart attack` likewise. Missing,
/// repeated and foreign shards (another model, data set or seed) are refused by name.
#[test]
fn sharded_runs_merge_into_the_unsharded_outputs() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_cifar10(dir.path(), 16, 0)?;
    let data = s(dir.path());
    let model = train_tiny(data, &dir.path().join("m"), "0")?;

    let whole = dir.path().join("whole");
    run_ok(&eval_args(&model, data, &whole, &[]))?;
    let shards: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("shard-{i}")))
        .collect();
    for (i, out) in shards.iter().enumerate() {
        let spec = format!("{i}/3");
        let said = run_ok(&eval_args(&model, data, out, &["--shard", &spec]))?;
        assert!(said.contains(&format!("shard {spec}")), "{said}");
        assert!(out.join("shard.json").is_file() && !out.join("results.json").exists());
    }
    let merged = dir.path().join("merged");
    let mut merge: Vec<&str> = vec!["merge"];
    merge.extend(shards.iter().rev().map(|p| s(p)));
    merge.extend(["--out", s(&merged)]);
    let out = rampart(&merge)?;
    assert!(out.status.success(), "{}", text(&out));
    let compared = assert_same_outputs(&whole, &merged)?;
    assert!(compared > 20, "only {compared} files");

    // Refusals, each naming its problem.
    let to = dir.path().join("refused");
    let t = s(&to);
    let (a, b, c) = (s(&shards[0]), s(&shards[1]), s(&shards[2]));
    assert!(refused(&["merge", a, c, "--out", t])?.contains("shard 1/3 missing"));
    assert!(refused(&["merge", a, b, c, b, "--out", t])?.contains("shard 1/3 is given twice"));
    assert!(refused(&["merge", s(&whole), "--out", t])?.contains("no shard.json"));
    let reseeded = dir.path().join("reseeded");
    run_ok(&eval_args(
        &model,
        data,
        &reseeded,
        &["--shard", "1/3", "--attack-seed", "7"],
    ))?;
    let said = refused(&["merge", a, s(&reseeded), c, "--out", t])?;
    assert!(
        said.contains("different settings") && said.contains("seed"),
        "{said}"
    );
    let other_model = train_tiny(data, &dir.path().join("m2"), "1")?;
    let foreign = dir.path().join("other-model");
    run_ok(&eval_args(
        &other_model,
        data,
        &foreign,
        &["--shard", "1/3"],
    ))?;
    assert!(refused(&["merge", a, s(&foreign), c, "--out", t])?.contains("different models"));
    let other_data = dir.path().join("other-data");
    write_tiny_cifar10(&other_data, 16, 3)?;
    let moved = dir.path().join("other-data-shard");
    run_ok(&eval_args(
        &model,
        s(&other_data),
        &moved,
        &["--shard", "1/3"],
    ))?;
    assert!(refused(&["merge", a, s(&moved), c, "--out", t])?.contains("different data"));
    assert!(!to.join("results.json").exists());

    // Bad shard specifications.
    let m = s(&model);
    for (spec, says) in [
        ("3/3", "numbered from 0 to 2"),
        ("1/0", "at least 1"),
        ("x", "I/N"),
    ] {
        let said = refused(&[
            "eval",
            "--model",
            m,
            "--data-dir",
            data,
            "--suite",
            "quick",
            "--shard",
            spec,
            "--out",
            t,
        ])?;
        assert!(said.contains(says), "{spec}: {said}");
    }
    let said = refused(&[
        "eval",
        "--model",
        m,
        "--data-dir",
        data,
        "--suite",
        "pgd20",
        "--shard",
        "0/2",
        "--out",
        t,
    ])?;
    assert!(said.contains("--shard applies to --suite quick"), "{said}");
    let said = refused(&[
        "eval",
        "--model",
        m,
        "--data-dir",
        data,
        "--suite",
        "quick",
        "--held-out",
        "4",
        "--batch-size",
        "4",
        "--shard",
        "0/4",
        "--out",
        t,
    ])?;
    assert!(said.contains("only 3 batches"), "{said}");

    // `rampart attack`: 16 images in batches of 4, 2 ε, cut into 3 shards.
    let attack = |out: &Path, extra: &[&str]| {
        let mut args: Vec<String> = [
            "--threads",
            "2",
            "attack",
            "--model",
            m,
            "--data-dir",
            data,
            "--eps",
            "2/255,8/255",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--trust-examples",
            "4",
            "--out",
            s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        run_ok(&args)
    };
    let whole_attack = dir.path().join("attack-whole");
    attack(&whole_attack, &[])?;
    let attack_shards: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("attack-{i}")))
        .collect();
    for (i, out) in attack_shards.iter().enumerate() {
        attack(out, &["--shard", &format!("{i}/3")])?;
    }
    let merged_attack = dir.path().join("attack-merged");
    let mut merge: Vec<&str> = vec!["merge"];
    merge.extend(attack_shards.iter().map(|p| s(p)));
    merge.extend(["--out", s(&merged_attack)]);
    let out = rampart(&merge)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(assert_same_outputs(&whole_attack, &merged_attack)? >= 3);
    let (a0, a2) = (s(&attack_shards[0]), s(&attack_shards[2]));
    assert!(refused(&["merge", a0, a2, "--out", t])?.contains("shard 1/3 missing"));
    assert!(refused(&["merge", a0, b, a2, "--out", t])?.contains("rampart eval"));
    Ok(())
}
