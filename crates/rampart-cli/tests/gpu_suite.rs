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

mod common;

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
    // A tiny CIFAR-10 for the fast-AT epochs (160 training and 32 test images), trained
    // with WRN-10-1 instead of the preset's PreActResNet-18.
    let data = dir.path().join("data");
    common::write_tiny_cifar10(&data, 32, 0)?;
    let run = Command::new("bash")
        .arg(&script)
        .arg(&bundle)
        .arg(&out)
        .arg(&data)
        .envs([
            ("EPOCH_ARCH", "wrn-10-1"),
            ("EPOCHS", "1"),
            ("F32_DEVICE", "cpu"),
            ("BF16_DEVICE", "cpu"),
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
    // What comes back from the GPU machine: the archive and summaries, eight plain
    // files at most, none larger than a part, with plain names; the archive is the
    // whole folder.
    let delivered = delivered_files(&out)?;
    assert!(
        delivered.len() <= 8 && delivered.iter().any(|(n, _)| n == "results.tar.xz"),
        "{delivered:?}\n{log}"
    );
    for name in ["steps.txt", "bench.md", "ab.md", "epoch.md"] {
        assert!(
            delivered.iter().any(|(n, _)| n == name),
            "{name}: {delivered:?}"
        );
    }
    let back = dir.path().join("back");
    unpack(&root, &out, &back)?;
    for name in ["steps.txt", "bench.md", "ab.md"] {
        assert_eq!(
            std::fs::read(out.join(name))?,
            std::fs::read(back.join(name))?,
            "{name}"
        );
    }
    let out = back;
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}\n{log}"))
    };
    for name in [
        "gpu.txt",
        "tests-test-attacks-cuda.txt",
        "tests-test-models-cuda.txt",
        "bench.jsonl",
        "ab.jsonl",
    ] {
        assert!(out.join(name).is_file(), "{name} is not in the archive");
    }
    let steps = read("steps.txt");
    for step in [
        "test-attacks-cuda rc=0",
        "rampart-bench wrn-10-1 8 cpu round 1 rc=0",
        "ab wrn-10-1 RAMPART_AB=default round 1 rc=0",
        "ab wrn-10-1 RAMPART_CUDA_DEVICE_ATTACK=1+RAMPART_CUDA_GRAPHS=1 round 1 rc=0",
        "ab-table rc=0",
        "rampart-bench wrn-10-1 student 128 cpu (estimates) rc=0",
        "bench-table rc=0",
        "fast-at-epoch rc=0",
        "pgd20 cpu rc=0",
        "bf16-table rc=0",
        "fast-at-step fast-at-epoch rc=0",
        "fast-at-epoch-fused rc=0",
        "fast-at-epoch-bf16 rc=0",
        "epoch-table rc=0",
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
    // The fast-AT epochs, each against its step time; PGD-20 in f32 and "bf16" (the
    // CPU twice here) on the same images.
    let epochs = read("epoch.md");
    for run in ["fast-at-epoch", "fast-at-epoch-fused", "fast-at-epoch-bf16"] {
        assert!(
            epochs.contains(&format!("| {run} | cpu |")),
            "{run}:\n{epochs}"
        );
    }
    let bf16 = read("bf16.md");
    assert!(bf16.contains('|'), "{bf16}");
    // The models were not kept in what comes back.
    assert!(!out.join("fast-at-epoch/model.safetensors").exists());
    Ok(())
}

/// The files a packed output folder holds (`xtask/bench/deliver.py pack`), with their
/// sizes, after checking that it holds nothing else: no folder, no link, and names of
/// letters, digits, '.', '_' and '-', each file no larger than a part (16,000,000
/// bytes).
fn delivered_files(out: &Path) -> Result<Vec<(String, u64)>, Box<dyn std::error::Error>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(out)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(entry.path())?;
        assert!(meta.is_file(), "{name} is not a plain file");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "{name}"
        );
        assert!(meta.len() <= 16_000_000, "{name}: {} bytes", meta.len());
        files.push((name, meta.len()));
    }
    files.sort();
    Ok(files)
}

/// `deliver.py unpack SRC DEST`.
fn unpack(root: &Path, src: &Path, dest: &Path) -> TestResult {
    let run = Command::new("python3")
        .arg(root.join("xtask/bench/deliver.py"))
        .arg("unpack")
        .arg(src)
        .arg(dest)
        .output()?;
    assert!(
        run.status.success(),
        "deliver.py unpack: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    Ok(())
}

/// Every file under `dir` (relative path → bytes).
fn snapshot(
    dir: &Path,
) -> Result<std::collections::BTreeMap<String, Vec<u8>>, Box<dyn std::error::Error>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
                files.insert(rel, std::fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

/// `deliver.py pack` turns a folder into numbered parts of at most --part-bytes and the
/// summaries that fit --max-files beside them; `unpack` gives back every file exactly,
/// and refuses a missing part; parts that alone exceed --max-files fail the packing.
#[test]
fn a_packed_folder_travels_in_parts_and_unpacks_to_itself() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("xtask/bench/deliver.py");
    let dir = tempfile::tempdir()?;
    let make = |out: &Path| -> TestResult {
        std::fs::create_dir_all(out.join("run/eval/plots"))?;
        // 2.5 MB that xz cannot shrink (xorshift), three folders down.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..2_500_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(out.join("run/eval/plots/noise.bin"), noise)?;
        std::fs::write(out.join("steps.txt"), "suite rc=0 seconds=1\n")?;
        std::fs::write(out.join("bench.md"), "| a | b |\n")?;
        std::fs::write(out.join("huge.md"), "x".repeat(1_200_000))?;
        for i in 0..12 {
            std::fs::write(
                out.join(format!("tests-{i}.txt")),
                format!("test {i} ... ok\n"),
            )?;
        }
        std::fs::write(out.join("x.md"), "x\n")?;
        std::fs::write(out.join("y.md"), "y\n")?;
        Ok(())
    };
    let pack = |out: &Path, max_files: &str| {
        Command::new("python3")
            .arg(&script)
            .args(["pack"])
            .arg(out)
            .args([
                "steps.txt",
                "huge.md",
                "missing.md",
                "bench.md",
                "x.md",
                "y.md",
            ])
            .args(["--part-bytes", "1000000", "--max-files", max_files])
            .output()
    };
    let out = dir.path().join("out");
    make(&out)?;
    let before = snapshot(&out)?;
    let run = pack(&out, "6")?;
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // 2.5 MB of noise make three parts; three summaries fit beside them: the first
    // three given that exist and are no larger than a part.
    let names: Vec<String> = delivered_files(&out)?.into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "bench.md",
            "results.tar.xz.000",
            "results.tar.xz.001",
            "results.tar.xz.002",
            "steps.txt",
            "x.md"
        ]
    );
    let back = dir.path().join("back");
    unpack(&root, &out, &back)?;
    assert!(snapshot(&back)? == before, "the unpacked folder differs");
    // Packing twice is refused; a missing part is refused.
    assert!(!pack(&out, "6")?.status.success());
    std::fs::remove_file(out.join("results.tar.xz.001"))?;
    let run = Command::new("python3")
        .arg(&script)
        .arg("unpack")
        .arg(&out)
        .arg(dir.path().join("again"))
        .output()?;
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("part 001 is missing"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // More parts than files that travel: an error, not a silent loss.
    let small = dir.path().join("small");
    make(&small)?;
    let run = pack(&small, "2")?;
    assert_eq!(
        run.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("3 parts exceed the 2 files"));
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
