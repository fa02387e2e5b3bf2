//! What the end-to-end tests of the `rampart` binary share: running it, tiny CIFAR-10
//! files in the official binary format, a tiny trained model, and JSON compared
//! without what differs between two runs by design.

// Each test file uses a part of this module.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A test's result: any error fails it.
pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `rampart args`, not started, with no data folder in its environment and `RUST_LOG`
/// set to `log`.
pub fn rampart_command(args: &[impl AsRef<OsStr>], log: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.args(args)
        .env_remove("RAMPART_DATA_DIR")
        .env("RUST_LOG", log);
    cmd
}

/// The binary with no data folder in its environment, logging warnings only.
pub fn rampart(args: &[impl AsRef<OsStr>]) -> std::io::Result<Output> {
    rampart_command(args, "warn").output()
}

/// What a run printed: stdout, then stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Owned arguments from string slices.
pub fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Runs `rampart args`, which must succeed.
pub fn ok(args: &[impl AsRef<OsStr> + Debug]) -> Result<Output, Box<dyn std::error::Error>> {
    let out = rampart(args)?;
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    Ok(out)
}

/// Runs `rampart args`, which must succeed; what it printed.
pub fn run_ok(args: &[impl AsRef<OsStr> + Debug]) -> Result<String, Box<dyn std::error::Error>> {
    Ok(text(&ok(args)?))
}

/// Runs `rampart args`, which must fail; what it printed.
pub fn refused(args: &[impl AsRef<OsStr> + Debug]) -> Result<String, Box<dyn std::error::Error>> {
    let out = rampart(args)?;
    assert!(!out.status.success(), "{args:?} was accepted");
    Ok(text(&out))
}

/// A JSON file the run wrote.
pub fn read_json(path: &Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// `dir/cifar-10-batches-bin/` with `per_file` records in each of the five training
/// batches and the test batch (the files the loader reads): label byte, then 3,072
/// pixel bytes (R, G, B planes); `salt` changes every pixel. Returns the folder.
pub fn write_tiny_cifar10(dir: &Path, per_file: usize, salt: usize) -> std::io::Result<PathBuf> {
    let layout = rampart_data::DatasetKind::Cifar10
        .cifar_layout()
        .ok_or_else(|| std::io::Error::other("CIFAR-10 has no binary layout"))?;
    let folder = dir.join(layout.binary_folder);
    std::fs::create_dir_all(&folder)?;
    let names = layout.train_files.iter().chain([&layout.test_file]);
    for (f, name) in names.enumerate() {
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
    Ok(folder)
}

/// A temporary folder holding the tiny CIFAR-10 of [`write_tiny_cifar10`] with
/// `per_file` records a file (no salt).
pub fn tiny_cifar10_dir(per_file: usize) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    write_tiny_cifar10(dir.path(), per_file, 0)?;
    Ok(dir)
}

/// `--threads 2 train --arch wrn-10-1 --epochs EPOCHS --batch-size 8 FLAGS… --out OUT`:
/// the smallest WRN in batches of 8.
pub fn tiny_train_args<'a>(epochs: &'a str, flags: &[&'a str], out: &'a Path) -> Vec<&'a str> {
    let mut args = vec![
        "--threads",
        "2",
        "train",
        "--arch",
        "wrn-10-1",
        "--epochs",
        epochs,
        "--batch-size",
        "8",
    ];
    args.extend(flags);
    args.extend(["--out", s(out)]);
    args
}

/// `COMMAND --model MODEL --data-dir DATA FLAGS… --out OUT`: a command run on a model.
pub fn on_model<'a>(
    command: &'a str,
    model: &'a Path,
    data: &'a str,
    flags: &[&'a str],
    out: &'a Path,
) -> Vec<&'a str> {
    let mut args = vec![command, "--model", s(model), "--data-dir", data];
    args.extend(flags);
    args.extend(["--out", s(out)]);
    args
}

/// Trains WRN-10-1 for one epoch (batch 8) on the tiny data set in `data` into `out`,
/// with the `extra` flags; the model file.
pub fn train_tiny(
    data: &str,
    out: &Path,
    extra: &[&str],
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    ok(&tiny_train_args(
        "1",
        &[extra, &["--data-dir", data]].concat(),
        out,
    ))?;
    Ok(out.join("model.safetensors"))
}

/// The arguments of a small `quick`-suite evaluation of `model` into `out` (4 held
/// out, half the attack steps), with the `extra` flags.
pub fn quick_eval_args(model: &Path, data: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let flags = [
        &[
            "--threads",
            "2",
            "--suite",
            "quick",
            "--held-out",
            "4",
            "--steps-scale",
            "0.5",
        ],
        extra,
    ]
    .concat();
    owned(&on_model("eval", model, data, &flags, out))
}

/// JSON without what differs between two runs by design: wall times (keys naming
/// seconds), which steps were loaded from disk (`resumed`), and the keys `also`.
pub fn without_timings(v: &mut serde_json::Value, also: &[&str]) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| {
                !k.contains("seconds") && k != "resumed" && !also.contains(&k.as_str())
            });
            map.values_mut().for_each(|v| without_timings(v, also));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| without_timings(v, also)),
        _ => {}
    }
}
