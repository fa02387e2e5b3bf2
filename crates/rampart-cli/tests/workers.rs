//! `rampart train --workers N` end to end on the CPU: the launcher starts N worker
//! processes that train one run together, worker 0 writes it, and bad settings or a
//! failing worker stop the run with a clear error.

mod common;

use common::{read_json, refused, run_ok, s, tiny_cifar10_dir, tiny_train_args, TestResult};

#[test]
fn two_cpu_workers_train_one_run_written_by_worker_0() -> TestResult {
    let data = tiny_cifar10_dir(8)?;
    let out = tempfile::tempdir()?;
    let run = out.path().join("run");
    let printed = run_ok(&tiny_train_args(
        "2",
        &[
            "--workers",
            "2",
            "--data-dir",
            s(data.path()),
            "--test-limit",
            "8",
        ],
        &run,
    ))?;
    assert!(printed.contains("model.safetensors"), "{printed}");
    let history = std::fs::read_to_string(run.join("history.jsonl"))?;
    let records: Vec<serde_json::Value> = history
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["workers"] == 2), "{history}");
    assert_eq!(read_json(&run.join("config.json"))?["workers"], 2);
    let command = std::fs::read_to_string(run.join("command.txt"))?;
    assert!(command.contains("--workers 2"), "{command}");
    assert!(
        !command.contains("--worker-rank") && !command.contains("rendezvous"),
        "{command}"
    );
    assert!(run.join("model.safetensors").is_file() && run.join("summary.json").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&run)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".rendezvous"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

#[test]
fn bad_worker_settings_are_refused_before_anything_runs() -> TestResult {
    let data = tiny_cifar10_dir(2)?;
    let out = tempfile::tempdir()?;
    let run = out.path().join("run");
    let with = |flags: &[&str]| -> Result<String, Box<dyn std::error::Error>> {
        let mut all = vec!["--data-dir", s(data.path())];
        all.extend(flags);
        refused(&tiny_train_args("1", &all, &run))
    };
    let uneven = with(&["--workers", "3"])?;
    assert!(
        uneven.contains("must split evenly over --workers 3"),
        "{uneven}"
    );
    let gpu = with(&["--gpus", "2", "--device", "cuda:1"])?;
    assert!(gpu.contains("CUDA_VISIBLE_DEVICES"), "{gpu}");
    let hidden = with(&["--worker-rank", "0"])?;
    assert!(hidden.contains("set together, by the launcher"), "{hidden}");
    let alone = with(&["--sync-bn"])?;
    assert!(alone.contains("--sync-bn synchronises"), "{alone}");
    assert!(!run.exists(), "a refused run wrote {}", run.display());
    Ok(())
}

/// Two CPU workers train with synchronised BatchNorm, recorded in config.json.
#[test]
fn two_cpu_workers_train_with_synchronised_batch_norm() -> TestResult {
    let data = tiny_cifar10_dir(8)?;
    let out = tempfile::tempdir()?;
    let run = out.path().join("run");
    let flags = [
        "--workers",
        "2",
        "--sync-bn",
        "--data-dir",
        s(data.path()),
        "--test-limit",
        "8",
    ];
    run_ok(&tiny_train_args("1", &flags, &run))?;
    let config = read_json(&run.join("config.json"))?;
    assert_eq!(config["sync_batch_norm"], true);
    assert_eq!(config["workers"], 2);
    let history = std::fs::read_to_string(run.join("history.jsonl"))?;
    assert_eq!(history.lines().count(), 1, "{history}");
    Ok(())
}

/// Workers that cannot read the data stop, and the launcher says so.
#[test]
fn a_failing_worker_stops_the_run() -> TestResult {
    let empty = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let run = out.path().join("run");
    let err = refused(&tiny_train_args(
        "1",
        &["--workers", "2", "--data-dir", s(empty.path())],
        &run,
    ))?;
    assert!(err.contains("of the data-parallel run stopped"), "{err}");
    Ok(())
}
