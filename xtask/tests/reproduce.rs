//! `cargo xtask reproduce` end to end on the hidden `tiny` preset and a tiny CIFAR-10
//! written in the official binary format, with the `rampart` binary of this build.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `dir/cifar-10-batches-bin/`: `train` records in each training batch, `test` in the
/// test batch (label byte, then 3,072 pixel bytes).
fn write_tiny_cifar10(dir: &Path, train: usize, test: usize) -> std::io::Result<()> {
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
        let n = if f == 5 { test } else { train };
        let mut bytes = Vec::with_capacity(n * 3073);
        for r in 0..n {
            let label = ((f * 7 + r) % 10) as u8;
            bytes.push(label);
            bytes.extend((0..3072).map(|p| ((p * 7 + usize::from(label) * 25 + r) % 256) as u8));
        }
        std::fs::write(folder.join(name), bytes)?;
    }
    Ok(())
}

/// The `rampart` binary built beside this xtask (`cargo test --workspace` builds both).
fn rampart_bin() -> Result<PathBuf, String> {
    let xtask = PathBuf::from(env!("CARGO_BIN_EXE_xtask"));
    let bin = xtask.with_file_name(format!("rampart{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is missing: build it first (cargo build -p rampart-cli in the same profile)",
            bin.display()
        ))
    }
}

/// The study's command, one run at a time with progress lines (a line per saved
/// batch) on stderr.
fn reproduce(data: &Path, out: &Path, resume: bool) -> Result<Command, String> {
    reproduce_jobs(data, out, resume, 1)
}

/// The study's command with `jobs` runs side by side.
fn reproduce_jobs(data: &Path, out: &Path, resume: bool, jobs: usize) -> Result<Command, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(["reproduce", "cifar10", "--preset", "tiny", "--threads", "2"])
        .args(["--jobs", &jobs.to_string()])
        .arg("--data-dir")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--rampart-bin")
        .arg(rampart_bin()?)
        .env_remove("RAMPART_DATA_DIR")
        .env("RUST_LOG", "warn,rampart_eval=debug");
    if resume {
        cmd.arg("--resume");
    }
    Ok(cmd)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn saved_batches(log: &str) -> usize {
    log.lines().filter(|l| l.contains("batch saved")).count()
}

/// `results.json` of a study without what differs between two runs: wall times,
/// timestamps, command lines, the output folder's name and the model files' hashes
/// (the files' metadata holds their training's wall times).
fn comparable(out: &Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(out.join("results.json"))?
        .replace(out.to_str().ok_or("path")?, "OUT");
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.retain(|k, _| {
                    !k.contains("seconds")
                        && k != "row_runs"
                        && !k.contains("command")
                        && k != "created"
                        && k != "model_sha256"
                });
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    Ok(v)
}

/// The files of the study folder `out` (its links not followed) that name any of
/// `paths`, each as `file: path`.
fn names_of(out: &Path, paths: &[&Path]) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut found = Vec::new();
    for file in rampart_fs::files_under(out)? {
        let path = out.join(&file);
        if std::fs::symlink_metadata(&path)?.file_type().is_symlink() {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        for p in paths {
            let needle = p.to_str().ok_or("path")?.as_bytes();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(format!("{}: {}", file.display(), p.display()));
            }
        }
    }
    Ok(found)
}

/// The whole study (process group: the xtask and the `rampart` it runs) killed with
/// SIGKILL after a seeded random number of saved batches and continued with `--resume`
/// ends with the uninterrupted study's `results.json`, redoing none of the saved work;
/// `--resume` with another preset is refused.
#[cfg(unix)]
#[test]
fn a_killed_study_resumes_to_the_same_results() -> TestResult {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    let dir = tempfile::tempdir()?;
    write_tiny_cifar10(dir.path(), 4, 1010)?;
    let whole_dir = dir.path().join("whole");
    let whole = reproduce(dir.path(), &whole_dir, false)?.output()?;
    assert!(whole.status.success(), "{}", text(&whole));
    let whole_log = String::from_utf8_lossy(&whole.stderr).to_string();
    // The study folder names nothing outside it: not the folder holding it and the
    // data, not the binaries' folder.
    let bin = rampart_bin()?;
    let bin_dir = bin.parent().ok_or("the binary has no folder")?;
    assert_eq!(
        names_of(&whole_dir, &[dir.path(), bin_dir])?,
        Vec::<String>::new()
    );
    assert!(whole_dir.join("normal/model.json").is_file());
    // PGD-50-10 ran on both rows and joined the study's results.
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(whole_dir.join("results.json"))?)?;
    for row in ["normal", "at"] {
        assert_eq!(results["models"][row]["pgd50_10"]["examples"], 8, "{row}");
    }
    let total = saved_batches(&whole_log);
    // Runs side by side at the same threads per run: the same results, each run's
    // output in OUT/logs/.
    let side_dir = dir.path().join("side-by-side");
    let side = reproduce_jobs(dir.path(), &side_dir, false, 2)?.output()?;
    assert!(side.status.success(), "{}", text(&side));
    assert_eq!(comparable(&side_dir)?, comparable(&whole_dir)?);
    assert!(side_dir.join("logs/at.protocol.log").is_file());
    // One row per invocation into one folder (as a GPU session runs a row per
    // command): the second invocation, with --resume, keeps the first's row, and the
    // study ends with the one-invocation results.
    let rows_dir = dir.path().join("row-by-row");
    let first = reproduce(dir.path(), &rows_dir, false)?
        .args(["--rows", "normal"])
        .output()?;
    assert!(first.status.success(), "{}", text(&first));
    let second = reproduce(dir.path(), &rows_dir, true)?
        .args(["--rows", "at"])
        .output()?;
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("normal: finished by an earlier invocation"),
        "{}",
        text(&second)
    );
    assert_eq!(comparable(&rows_dir)?, comparable(&whole_dir)?);
    // Every protocol cut into 2 shards (runs of their own, side by side) and merged:
    // the same study.
    let shard_dir = dir.path().join("sharded");
    let sharded = reproduce_jobs(dir.path(), &shard_dir, false, 2)?
        .args(["--shards", "2"])
        .output()?;
    assert!(sharded.status.success(), "{}", text(&sharded));
    assert!(shard_dir.join("at/protocol/shard-1/shard.json").is_file());
    assert!(shard_dir.join("logs/at.protocol.merge.log").is_file());
    assert_eq!(comparable(&shard_dir)?, comparable(&whole_dir)?);
    // A row trained by two data-parallel workers (CPU processes here, GPUs with
    // --device cuda:0,cuda:1), recorded as such.
    let dp_dir = dir.path().join("data-parallel");
    let dp = reproduce_jobs(dir.path(), &dp_dir, false, 2)?
        .args(["--train-workers", "2", "--rows", "normal"])
        .output()?;
    assert!(dp.status.success(), "{}", text(&dp));
    let history = std::fs::read_to_string(dp_dir.join("normal/history.jsonl"))?;
    assert!(
        history.lines().all(|l| l.contains("\"workers\":2")),
        "{history}"
    );
    assert!(total > 4, "{whole_log}");
    // A seeded pick of the kill point: after batch k of the first half of the study's
    // saved batches (the second half leaves the kill plenty of work to interrupt).
    let k = 2 + (0x5eed_u64.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 33) as usize % (total / 2 - 1);

    let out = dir.path().join("killed");
    let mut child = reproduce(dir.path(), &out, false)?
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut seen = 0;
    for line in std::io::BufReader::new(stderr).lines() {
        if line?.contains("batch saved") {
            seen += 1;
            if seen == k {
                break;
            }
        }
    }
    // SIGKILL to the whole group, as a scheduler stops a job.
    let status = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status()?;
    assert!(status.success());
    child.wait()?;
    assert_eq!(seen, k, "the study ended before the kill");
    assert!(
        !out.join("results.json").exists(),
        "the study finished before the kill"
    );

    // Without --resume the folder is refused; with another preset too.
    let refused = reproduce(dir.path(), &out, false)?.output()?;
    assert!(
        !refused.status.success() && text(&refused).contains("--resume"),
        "{}",
        text(&refused)
    );
    let mut other = reproduce(dir.path(), &out, true)?;
    other.args(["--device", "cuda"]);
    let refused = other.output()?;
    let msg = text(&refused);
    assert!(
        !refused.status.success() && msg.contains("--device: cpu → cuda"),
        "{msg}"
    );

    let resumed = reproduce(dir.path(), &out, true)?.output()?;
    assert!(resumed.status.success(), "{}", text(&resumed));
    let redone = saved_batches(&String::from_utf8_lossy(&resumed.stderr));
    assert!(
        redone + k <= total,
        "{redone} batches saved again after {k} of {total} were saved before the kill"
    );
    assert_eq!(comparable(&out)?, comparable(&whole_dir)?);
    Ok(())
}

/// A preset's rows run on one GPU machine after another with `xtask/bench/gpu-rows.sh`
/// (here a CPU stand-in bundle: this build's `xtask` and `rampart`): each invocation
/// brings back only its packed folder (a few plain files, the archive cut into parts),
/// the next continues from what the last brought back (`PREVIOUS`), and the study ends
/// with both rows in one report and one `results.json`, naming neither machine's
/// folders.
#[cfg(unix)]
#[test]
fn rows_run_on_one_machine_after_another_merge_from_what_each_brought_back() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_tiny_cifar10(&data, 4, 1010)?;
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle)?;
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_xtask"), bundle.join("xtask"))?;
    std::os::unix::fs::symlink(rampart_bin()?, bundle.join("rampart"))?;
    let rows = |row: &str,
                out: &Path,
                previous: Option<&Path>,
                part_bytes: &str|
     -> Result<Output, std::io::Error> {
        let mut cmd = Command::new("bash");
        cmd.arg(root.join("xtask/bench/gpu-rows.sh"))
            .arg(&bundle)
            .arg(out)
            .arg(&data)
            .arg(row)
            // The rows fitted to a time limit, as a device command runs them.
            .args(["--threads", "2", "--fit-minutes", "30"])
            .envs([("PRESET", "tiny"), ("DEVICE", "cpu")])
            .env("DELIVER_PART_BYTES", part_bytes)
            .env("KEEP", dir.path().join("kept"))
            .env_remove("PREVIOUS")
            .env_remove("DELIVER");
        if let Some(p) = previous {
            cmd.env("PREVIOUS", p);
        }
        cmd.output()
    };
    let delivered = |out: &Path| -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(out)? {
            let entry = entry?;
            assert!(entry.file_type()?.is_file(), "{:?}", entry.path());
            assert!(entry.metadata()?.len() <= 1_000_000, "{:?}", entry.path());
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    };
    let first = dir.path().join("first");
    // Parts of 200,000 bytes here, to cut the archive.
    let run = rows("normal", &first, None, "200000")?;
    assert!(run.status.success(), "{}", text(&run));
    let names = delivered(&first)?;
    assert!(names.len() <= 8, "{names:?}");
    assert!(
        names.iter().any(|n| n == "results.tar.xz.001"),
        "the archive was cut into parts: {names:?}"
    );
    for name in ["steps.txt", "report.md", "gpu.txt"] {
        assert!(names.iter().any(|n| n == name), "{name}: {names:?}");
    }

    let second = dir.path().join("second");
    let run = rows("at", &second, Some(&first), "1000000")?;
    assert!(run.status.success(), "{}", text(&run));
    let names = delivered(&second)?;
    assert!(
        names.len() <= 8 && names.iter().any(|n| n == "report.md"),
        "{names:?}"
    );
    let steps = std::fs::read_to_string(second.join("steps.txt"))?;
    assert!(steps.contains("continued from"), "{steps}");
    let back = dir.path().join("back");
    let unpacked = Command::new("python3")
        .arg(root.join("xtask/bench/deliver.py"))
        .arg("unpack")
        .arg(&second)
        .arg(&back)
        .output()?;
    assert!(unpacked.status.success(), "{}", text(&unpacked));
    let study = back.join("study");
    let log = std::fs::read_to_string(back.join("reproduce.log"))?;
    assert!(
        log.contains("normal: finished by an earlier invocation"),
        "{log}"
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(study.join("results.json"))?)?;
    for row in ["normal", "at"] {
        assert_eq!(results["models"][row]["pgd50_10"]["examples"], 8, "{row}");
    }
    let report = std::fs::read_to_string(study.join("report.md"))?;
    assert_eq!(report, std::fs::read_to_string(second.join("report.md"))?);
    // Both invocations fitted their row, on this machine's measured steps.
    let fit: serde_json::Value = serde_json::from_slice(&std::fs::read(study.join("fit.json"))?)?;
    assert_eq!(fit["fits"].as_array().map(Vec::len), Some(2), "{fit}");
    assert!(study.join("fit/step-times.jsonl").is_file());
    assert_eq!(
        names_of(&study, &[&first, &second, dir.path()])?,
        Vec::<String>::new()
    );
    Ok(())
}

/// `--fit-minutes`: the rows of an invocation trained for the share of their
/// schedules that fits the minutes with their whole evaluation. With step times given
/// (`--fit-step-times`, so that the estimate is exact here): a budget that fits half
/// of the two-epoch trainings trains each row one epoch and records it; one that fits
/// the evaluations but not one epoch, or not even the evaluations, is refused before
/// anything trains. Without them, this machine is timed first (`fit/step-times.jsonl`)
/// and ample minutes keep the whole schedules.
#[test]
fn rows_fitted_to_a_time_limit_train_the_share_of_their_schedules_that_fits() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_cifar10(dir.path(), 4, 1010)?;
    // One second per image of a training step; evaluation passes a thousand times
    // cheaper: the two trainings take about 65 s, the evaluations about 30 s.
    let times = dir.path().join("times.jsonl");
    let mut lines = String::new();
    for (step, per_image) in [
        ("train-step", 1.0),
        ("pgd-step", 0.001),
        ("forward", 0.0005),
    ] {
        for batch in [4, 256] {
            lines += &format!(
                "{{\"step\":\"{step}\",\"arch\":\"wrn-10-1\",\"variant\":\"plain\",\"device\":\"cpu\",\
                 \"batch_size\":{batch},\"seconds_per_batch\":{}}}\n",
                per_image * batch as f64
            );
        }
    }
    std::fs::write(&times, lines)?;
    let fitted =
        |name: &str, minutes: &str| -> Result<(PathBuf, Output), Box<dyn std::error::Error>> {
            let out = dir.path().join(name);
            let run = reproduce(dir.path(), &out, false)?
                .args(["--fit-minutes", minutes, "--fit-share", "1"])
                .arg("--fit-step-times")
                .arg(&times)
                .output()?;
            Ok((out, run))
        };
    // 20 s: not even the evaluations.
    let (out, run) = fitted("no-eval", "0.333")?;
    assert!(!run.status.success());
    assert!(
        text(&run).contains("the evaluations alone take an estimated 30 s"),
        "{}",
        text(&run)
    );
    assert!(!out.join("normal/model.safetensors").exists());
    // 45 s: the evaluations, but not one epoch of each training.
    let (out, run) = fitted("no-epoch", "0.75")?;
    assert!(
        !run.status.success() && text(&run).contains("even one epoch"),
        "{}",
        text(&run)
    );
    assert!(!out.join("normal/model.safetensors").exists());
    // 80 s: the evaluations and 0.77 of the trainings: one epoch of two each.
    let (out, run) = fitted("half", "1.333")?;
    assert!(run.status.success(), "{}", text(&run));
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("fit.json"))?)?;
    for row in ["normal", "at"] {
        let fit = &record["rows"][row];
        assert_eq!(
            (fit["epochs"].as_u64(), fit["schedule_epochs"].as_u64()),
            (Some(1), Some(2)),
            "{row}"
        );
        let history = std::fs::read_to_string(out.join(row).join("history.jsonl"))?;
        assert_eq!(history.lines().count(), 1, "{row}: {history}");
    }
    // Each row's runs timed (training, evaluation, PGD-50-10, protocol), in the report
    // and results.json.
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json"))?)?;
    for row in ["normal", "at"] {
        let m = &results["models"][row];
        assert!(m["row_runs"].as_u64().is_some_and(|n| n >= 4), "{row}: {m}");
        let (all, train) = (m["row_seconds"].as_f64(), m["row_train_seconds"].as_f64());
        assert!(
            matches!((all, train), (Some(a), Some(t)) if a > t && t > 0.0),
            "{row}: {m}"
        );
    }
    let share = record["fits"][0]["schedule_share"]
        .as_f64()
        .ok_or("share")?;
    assert!(share > 0.5 && share < 1.0, "{share}");
    let report = std::fs::read_to_string(out.join("report.md"))?;
    assert!(report.contains("`fit.json` holds the fit"), "{report}");
    assert!(report.contains("--epochs 1"), "{report}");
    assert!(report.contains("## Time per row"), "{report}");
    // A `rampart` whose timing fails: the fit stops before training and says why.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let stand_in = dir.path().join("rampart-no-bench");
        std::fs::write(
            &stand_in,
            format!(
                "#!/usr/bin/env bash\nfor a in \"$@\"; do [ \"$a\" = bench ] && {{ echo 'no timer here' >&2; exit 1; }}; done\nexec {} \"$@\"\n",
                rampart_bin()?.display()
            ),
        )?;
        std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755))?;
        let out = dir.path().join("untimed");
        let run = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["reproduce", "cifar10", "--preset", "tiny", "--threads", "2"])
            .args(["--jobs", "1", "--fit-minutes", "60"])
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--out")
            .arg(&out)
            .arg("--rampart-bin")
            .arg(&stand_in)
            .env_remove("RAMPART_DATA_DIR")
            .output()?;
        assert!(!run.status.success());
        assert!(
            text(&run).contains("timing wrn-10-1 (plain) at batch")
                && text(&run).contains("no timer here"),
            "{}",
            text(&run)
        );
        assert!(!out.join("normal/model.safetensors").exists());
    }
    // This machine timed first; an hour keeps the whole schedules.
    let out = dir.path().join("timed");
    let run = reproduce(dir.path(), &out, false)?
        .args(["--fit-minutes", "60"])
        .output()?;
    assert!(run.status.success(), "{}", text(&run));
    let measured = std::fs::read_to_string(out.join("fit/step-times.jsonl"))?;
    assert!(measured.contains("\"step\":\"train-step\""), "{measured}");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("fit.json"))?)?;
    assert_eq!(record["rows"]["at"]["epochs"], 2);
    assert_eq!(
        std::fs::read_to_string(out.join("at/history.jsonl"))?
            .lines()
            .count(),
        2
    );
    Ok(())
}
