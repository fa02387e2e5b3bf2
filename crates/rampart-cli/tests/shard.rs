//! `rampart eval --shard I/N`, `rampart attack --shard I/N` and `rampart merge` end to
//! end, on a tiny CIFAR-10 written in the official binary format: the merged folder
//! equals the unsharded run's, and sets of shards that are not one run are refused.

use rampart_fs::files_under;
use std::path::{Path, PathBuf};

mod common;

use common::{
    on_model, owned, quick_eval_args, refused, run_ok, s, tiny_cifar10_dir, train_tiny,
    without_timings, write_tiny_cifar10, TestResult,
};

/// A `quick` evaluation of 12 attacked images in batches of 4 (3 batches), 4 held out.
fn eval_args(model: &Path, data: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut flags = vec![
        "--batch-size",
        "4",
        "--trust-examples",
        "4",
        "--restarts-scale",
        "0.5",
        "--bootstrap-resamples",
        "20",
    ];
    flags.extend(extra);
    quick_eval_args(model, data, out, &flags)
}

/// `rampart merge` of the `shards` into `out`, which must succeed.
fn merge<'a>(
    shards: impl Iterator<Item = &'a PathBuf>,
    out: &Path,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut args = owned(&["merge"]);
    args.extend(shards.map(|p| s(p).to_string()));
    args.extend(owned(&["--out", s(out)]));
    run_ok(&args)
}

/// JSON without what differs between two runs by design: wall times, the steps
/// loaded from disk, the output folder and the command line.
fn json_without_timings(bytes: &[u8]) -> serde_json::Result<serde_json::Value> {
    let mut v = serde_json::from_slice(bytes)?;
    without_timings(&mut v, &["out_dir", "command_line"]);
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
    let dir = tiny_cifar10_dir(16)?;
    let data = s(dir.path());
    let model = train_tiny(data, &dir.path().join("m"), &["--seed", "0"])?;

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
    merge(shards.iter().rev(), &merged)?;
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
    let other_model = train_tiny(data, &dir.path().join("m2"), &["--seed", "1"])?;
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
    let eval_refused = |flags: &[&str]| refused(&on_model("eval", &model, data, flags, &to));
    for (spec, says) in [
        ("3/3", "numbered from 0 to 2"),
        ("1/0", "at least 1"),
        ("x", "I/N"),
    ] {
        let said = eval_refused(&["--suite", "quick", "--shard", spec])?;
        assert!(said.contains(says), "{spec}: {said}");
    }
    let said = eval_refused(&["--suite", "clean", "--shard", "0/2"])?;
    assert!(said.contains("--suite clean attacks nothing"), "{said}");
    let said = eval_refused(&["--suite", "quick", "--merge", s(&whole)])?;
    assert!(said.contains("--merge applies to --suite pgd20"), "{said}");
    let said = eval_refused(&[
        "--suite",
        "quick",
        "--held-out",
        "4",
        "--batch-size",
        "4",
        "--shard",
        "0/4",
    ])?;
    assert!(said.contains("only 3 batches"), "{said}");

    // `rampart attack`: 16 images in batches of 4, 2 ε, cut into 3 shards.
    // `command` on the model in batches of 4, trust checks on 4 images, with `flags`.
    let on = |command: &str, flags: &[&str], out: &Path, extra: &[&str]| {
        let small = [
            "--threads",
            "2",
            "--batch-size",
            "4",
            "--trust-examples",
            "4",
        ];
        run_ok(&on_model(
            command,
            &model,
            data,
            &[&small, flags, extra].concat(),
            out,
        ))
    };
    let attack = ["--eps", "2/255,8/255", "--steps", "3"];
    let whole_attack = dir.path().join("attack-whole");
    on("attack", &attack, &whole_attack, &[])?;
    let attack_shards: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("attack-{i}")))
        .collect();
    for (i, out) in attack_shards.iter().enumerate() {
        on("attack", &attack, out, &["--shard", &format!("{i}/3")])?;
    }
    let merged_attack = dir.path().join("attack-merged");
    merge(attack_shards.iter(), &merged_attack)?;
    assert!(assert_same_outputs(&whole_attack, &merged_attack)? >= 3);
    let (a0, a2) = (s(&attack_shards[0]), s(&attack_shards[2]));
    assert!(refused(&["merge", a0, a2, "--out", t])?.contains("shard 1/3 missing"));
    assert!(refused(&["merge", a0, b, a2, "--out", t])?.contains("rampart eval"));

    // `rampart eval --suite autoattack`: 16 images in batches of 4, cut into 2 shards.
    let autoattack = ["--suite", "autoattack", "--attack-limit", "16"];
    let whole_aa = dir.path().join("aa-whole");
    on("eval", &autoattack, &whole_aa, &[])?;
    let aa_shards: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("aa-{i}"))).collect();
    for (i, out) in aa_shards.iter().enumerate() {
        let said = on("eval", &autoattack, out, &["--shard", &format!("{i}/2")])?;
        assert!(said.contains(&format!("shard {i}/2")), "{said}");
        assert!(out.join("shard.json").is_file() && !out.join("results.json").exists());
    }
    let merged_aa = dir.path().join("aa-merged");
    merge(aa_shards.iter().rev(), &merged_aa)?;
    assert!(assert_same_outputs(&whole_aa, &merged_aa)? >= 5);
    let (aa0, aa1) = (s(&aa_shards[0]), s(&aa_shards[1]));
    assert!(refused(&["merge", aa1, "--out", t])?.contains("shard 0/2 missing"));
    assert!(refused(&["merge", aa0, a2, "--out", t])?.contains("rampart eval --suite autoattack"));
    // The trust checks run in the shard holding the first images: too few there is
    // refused.
    let said = refused(&on_model(
        "eval",
        &model,
        data,
        &[
            "--suite",
            "autoattack",
            "--attack-limit",
            "16",
            "--batch-size",
            "2",
            "--trust-examples",
            "4",
            "--shard",
            "0/8",
        ],
        &dir.path().join("aa-refused"),
    ))?;
    assert!(
        said.contains("the trust checks run on the first 4"),
        "{said}"
    );
    Ok(())
}

/// `rampart eval --suite pgd20` in 2 shards, joined by the unsharded command with
/// `--merge`, writes the unsharded run's files; foreign or missing shards are refused.
#[test]
fn pgd20_shards_join_into_the_unsharded_outputs() -> TestResult {
    let dir = tiny_cifar10_dir(16)?;
    let data = s(dir.path());
    let model = train_tiny(data, &dir.path().join("m"), &["--seed", "0"])?;
    // 12 attacked images in batches of 4: shard 0/2 holds batch 0, shard 1/2 batches 1-2.
    let pgd20 = |out: &Path, extra: &[&str]| -> Vec<String> {
        let flags = [
            &[
                "--threads",
                "2",
                "--suite",
                "pgd20",
                "--attack-limit",
                "12",
                "--attack-steps",
                "3",
                "--batch-size",
                "4",
                "--trust-examples",
                "4",
            ],
            extra,
        ]
        .concat();
        owned(&on_model("eval", &model, data, &flags, out))
    };
    let whole = dir.path().join("whole");
    run_ok(&pgd20(&whole, &[]))?;
    let shards: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("shard-{i}")))
        .collect();
    for (i, out) in shards.iter().enumerate() {
        let said = run_ok(&pgd20(out, &["--shard", &format!("{i}/2")]))?;
        assert!(said.contains("--merge"), "{said}");
        assert!(out.join("shard.json").is_file() && !out.join("results.json").exists());
    }
    let (a, b) = (s(&shards[0]), s(&shards[1]));
    let merged = dir.path().join("merged");
    let said = run_ok(&pgd20(&merged, &["--merge", b, a]))?;
    assert!(said.contains("robust accuracy"), "{said}");
    assert!(assert_same_outputs(&whole, &merged)? >= 5);

    let to = dir.path().join("refused");
    let t = s(&to);
    assert!(refused(&pgd20(&to, &["--merge", a]))?.contains("shard 1/2 missing"));
    let reseeded = dir.path().join("reseeded");
    run_ok(&pgd20(&reseeded, &["--shard", "1/2", "--attack-seed", "7"]))?;
    let said = refused(&pgd20(&to, &["--merge", a, s(&reseeded)]))?;
    assert!(said.contains("different settings"), "{said}");
    let said = refused(&pgd20(&to, &["--attack-seed", "7", "--merge", a, b]))?;
    assert!(said.contains("a shard of another run"), "{said}");
    let said = refused(&["merge", a, b, "--out", t])?;
    assert!(said.contains("--merge"), "{said}");
    assert!(!to.join("results.json").exists());
    Ok(())
}
