//! The GPU suite (`xtask/bench/gpu-suite.sh`), the one script a machine with a GPU runs,
//! rehearsed on the CPU so that a change to the CLI or to the script cannot break it
//! unseen: a bundle holding this build's `rampart` and four stand-in CUDA test
//! binaries (three whose tests pass, graphs included, one that fails; packed in the
//! bundle's archive, as `gpu-bundle.sh` packs the real ones) runs the whole
//! suite on the CPU with the smallest settings. Every step of the comparison and of
//! the A/B runs exits cleanly, the tables are written, and the comparison's Rampart
//! runs take exactly the opt-in paths whose tests passed.

use std::path::Path;
use std::process::Command;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// An executable shell script `name` in `dir` printing `out`.
fn stand_in(dir: &Path, name: &str, out: &str) -> TestResult {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("#!/usr/bin/env bash\ncat <<'EOF'\n{out}\nEOF\n"),
    )?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// What libtest prints for `tests` (name, passed).
fn harness_output(tests: &[(&str, bool)]) -> String {
    let failed = tests.iter().filter(|(_, ok)| !ok).count();
    let mut out = format!("running {} tests\n", tests.len());
    for (name, ok) in tests {
        out += &format!("test {name} ... {}\n", if *ok { "ok" } else { "FAILED" });
    }
    out += &format!(
        "\ntest result: {}. {} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out",
        if failed == 0 { "ok" } else { "FAILED" },
        tests.len() - failed
    );
    out
}

#[test]
fn the_gpu_suite_runs_end_to_end_on_a_cpu_bundle() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("xtask/bench/gpu-suite.sh");
    let dir = tempfile::tempdir()?;
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle)?;
    std::fs::copy(env!("CARGO_BIN_EXE_rampart"), bundle.join("rampart"))?;
    let mut names = Vec::new();
    for (name, tests) in [
        (
            "test-attacks-cuda",
            &[
                ("device_resident_pgd_on_the_gpu_equals_the_host_loop", true),
                (
                    "pgd_steps_replayed_from_cuda_graphs_equal_eager_steps",
                    true,
                ),
            ][..],
        ),
        (
            "test-data-cuda",
            &[(
                "staged_uploads_behind_a_busy_stream_deliver_their_own_values",
                true,
            )],
        ),
        (
            "test-models-cuda",
            &[("fused_eval_program_matches_cpu", false)],
        ),
        (
            "test-defenses-cuda",
            &[
                ("fused_sgd_on_the_gpu_equals_the_cpu", true),
                (
                    "training_steps_replayed_from_cuda_graphs_equal_eager_steps",
                    true,
                ),
            ],
        ),
    ] {
        stand_in(&bundle, name, &harness_output(tests))?;
        names.push(name);
    }
    // The stand-ins travel in the bundle's archive, as `gpu-bundle.sh` packs the real
    // binaries; the suite unpacks it.
    let packed = Command::new("tar")
        .arg("-C")
        .arg(&bundle)
        .arg("-cJf")
        .arg(bundle.join("bundle.tar.xz"))
        .args(&names)
        .status()?;
    assert!(packed.success(), "tar -cJf: {packed}");
    for name in &names {
        std::fs::remove_file(bundle.join(name))?;
    }
    let out = dir.path().join("out");
    let run = Command::new("bash")
        .arg(&script)
        .arg(&bundle)
        .arg(&out)
        .envs([
            ("ARCHS", "wrn-10-1"),
            ("BATCHES", "8"),
            ("DEVICES", "cpu"),
            ("ROUNDS", "1"),
            ("REPS", "1"),
            ("EPOCH_DEVICE", "cpu"),
            ("AB_ARCHS", "wrn-10-1"),
            ("AB_ROUNDS", "1"),
            (
                "AB_SETTINGS",
                "RAMPART_AB=default RAMPART_CUDA_DEVICE_ATTACK=1+RAMPART_CUDA_GRAPHS=1",
            ),
            ("ESTIMATE_ARCHS", "wrn-10-1"),
            ("EXTRA_BATCHES", "8"),
            ("BUDGET", "600"),
        ])
        .output()?;
    let log =
        String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the suite failed:\n{log}");
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}\n{log}"))
    };
    let steps = read("steps.txt");
    for step in [
        "test-attacks-cuda rc=0",
        "rampart-bench wrn-10-1 8 cpu round 1 rc=0",
        "ab wrn-10-1 RAMPART_AB=default round 1 rc=0",
        "ab wrn-10-1 RAMPART_CUDA_DEVICE_ATTACK=1+RAMPART_CUDA_GRAPHS=1 round 1 rc=0",
        "ab-table rc=0",
        "rampart-bench wrn-10-1 student 128 cpu (estimates) rc=0",
        "bench-table rc=0",
    ] {
        assert!(
            steps.lines().any(|l| l.starts_with(step)),
            "{step} missing from steps.txt:\n{steps}"
        );
    }
    assert!(!steps.contains("skipped"), "{steps}");
    // The attacks' tests passed (graphs included) and the data's, the models' did not:
    // the comparison takes the device-resident loop, its graphs and staged uploads,
    // not the fused programs.
    let bench = read("bench.md");
    for step in ["forward", "train-step", "fast-at-step"] {
        assert!(
            bench.contains(&format!("| wrn-10-1 | 8 | cpu | {step} |")),
            "{step}:\n{bench}"
        );
    }
    assert!(
        bench.contains(
            "took: RAMPART_CUDA_DEVICE_ATTACK=1 RAMPART_CUDA_GRAPHS=1 \
             RAMPART_CUDA_PINNED_UPLOADS=1 RAMPART_CUDA_TRAIN_GRAPHS=1."
        ),
        "{bench}"
    );
    assert!(bench.contains("ratio (Rampart ÷ PyTorch)"), "{bench}");
    let ab = read("ab.md");
    for setting in [
        "default",
        "RAMPART_CUDA_DEVICE_ATTACK=1+RAMPART_CUDA_GRAPHS=1",
    ] {
        assert!(
            ab.contains(&format!("| wrn-10-1 | 128 | cpu | pgd20 | {setting} |")),
            "{setting}:\n{ab}"
        );
    }
    assert!(
        ab.contains("| wrn-10-1 | 128 | cpu | fast-at-step | default |"),
        "fast AT's whole step in the A/B table:\n{ab}"
    );
    assert!(ab.contains("| host share |"), "{ab}");
    // No data folder: no epochs, and the epoch table says so.
    assert!(
        read("epoch.md").starts_with("No fast-AT epoch"),
        "{}",
        read("epoch.md")
    );
    Ok(())
}

/// The epoch table divides each epoch's wall time by its steps × the step time the
/// bench measured after that run (the run's own step time, not another run's).
#[test]
fn the_epoch_table_compares_each_epoch_with_its_steps() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir()?;
    let out = dir.path();
    // 390 steps of 128 images per epoch: 40 s (start-up included), then 22 s.
    for (run, seconds) in [
        ("fast-at-epoch", [40.0, 22.0]),
        ("fast-at-epoch-fused", [30.0, 10.0]),
    ] {
        std::fs::create_dir(out.join(run))?;
        let lines: Vec<String> = seconds
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // The default run's second epoch has its loader's waits recorded.
                let wait = if run == "fast-at-epoch" && i == 1 {
                    r#", "data_wait_seconds": 0.4"#
                } else {
                    ""
                };
                format!(
                    r#"{{"epoch": {}, "epoch_seconds": {s}, "images_per_second": {}{wait}}}"#,
                    i + 1,
                    390.0 * 128.0 / s
                )
            })
            .collect();
        std::fs::write(out.join(run).join("history.jsonl"), lines.join("\n") + "\n")?;
    }
    std::fs::write(
        out.join("epoch-steps.jsonl"),
        r#"{"run": {"epoch_dir": "fast-at-epoch", "device": "cuda+tf32", "switches": ""}}
{"step": "fast-at-step", "batch_size": 128, "seconds_per_batch": 0.05, "path": "layers+host"}
{"run": {"epoch_dir": "fast-at-epoch-fused", "device": "cuda+tf32", "switches": "RAMPART_CUDA_FUSED_TRAIN=1"}}
{"step": "fast-at-step", "batch_size": 128, "seconds_per_batch": 0.025, "path": "fused+device"}
"#,
    )?;
    let run = Command::new("python3")
        .arg(root.join("xtask/bench/epoch-table.py"))
        .arg(out)
        .output()?;
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for row in [
        "| fast-at-epoch | cuda+tf32 | default | layers+host | 1 | 40.00 | 390 | 50.00 | 19.50 | **2.051** | - |",
        "| fast-at-epoch | cuda+tf32 | default | layers+host | 2 | 22.00 | 390 | 50.00 | 19.50 | **1.128** | 0.40 |",
        "| fast-at-epoch-fused | cuda+tf32 | RAMPART_CUDA_FUSED_TRAIN=1 | fused+device | 2 | 10.00 | 390 | 25.00 | 9.75 | **1.026** | - |",
    ] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
    Ok(())
}
