//! What `train` and `eval` share: devices, data folders, run folders, the command line.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use rampart_data::{DatasetKind, Splits};
use serde::Serialize;

/// Environment variable naming the data folder when `--data-dir` is not given.
pub const DATA_DIR_ENV: &str = "RAMPART_DATA_DIR";

/// Where tensors live: `cpu`, or `cuda` / `cuda:N` (builds with the `cuda` feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) => Device::new_cuda(n).with_context(|| {
                format!("cannot open CUDA device {n} (is `rampart` built with `--features cuda`?)")
            }),
        }
    }
}

/// The data folder: `--data-dir`, else the environment variable [`DATA_DIR_ENV`].
pub fn resolve_data_dir(flag: Option<PathBuf>, env: Option<PathBuf>) -> Result<PathBuf> {
    match flag.or(env) {
        Some(dir) if !dir.as_os_str().is_empty() => Ok(dir),
        _ => bail!(
            "--data-dir is required (or set {DATA_DIR_ENV}): the folder that holds the data set, \
             e.g. the unpacked cifar10-jpeg folder or cifar-10-binary.tar.gz (see datasets/README.md)"
        ),
    }
}

/// The value of [`DATA_DIR_ENV`], if set.
pub fn data_dir_from_env() -> Option<PathBuf> {
    std::env::var_os(DATA_DIR_ENV).map(PathBuf::from)
}

/// Loads both splits of `kind` from `dir`; the data crate's error says what to place where.
pub fn load_data(kind: DatasetKind, dir: &Path) -> Result<Splits> {
    let started = std::time::Instant::now();
    let splits = rampart_data::load(kind, dir)?;
    tracing::info!(
        dataset = %kind,
        train = splits.train.len(),
        test = splits.test.len(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "loaded data"
    );
    Ok(splits)
}

/// The command line of this process, shell-quoted, e.g. `rampart train --out 'my runs/a'`.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes `arg` for a POSIX shell when it holds anything but plain characters.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,%+@".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    rampart_defenses::write_atomic(path, &bytes)?;
    Ok(())
}

/// Appends the command line to `OUT/command.txt` (one line per invocation, so a resumed
/// run lists every session).
pub fn record_command(out: &Path, command: &str) -> Result<()> {
    use std::io::Write;
    let path = out.join("command.txt");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{command}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Creates the output folder.
pub fn create_out_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))
}

/// Parses a count flag that must be at least 1.
pub fn at_least_one(flag: &str, value: usize) -> Result<usize> {
    if value == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:2".parse(), Ok(DeviceArg::Cuda(2)));
        assert!("tpu".parse::<DeviceArg>().is_err());
        assert!("cuda:x".parse::<DeviceArg>().is_err());
    }

    #[test]
    fn data_dir_comes_from_the_flag_then_the_environment() -> Result<()> {
        assert_eq!(
            resolve_data_dir(Some("a".into()), Some("b".into()))?,
            PathBuf::from("a")
        );
        assert_eq!(
            resolve_data_dir(None, Some("b".into()))?,
            PathBuf::from("b")
        );
        let err = resolve_data_dir(None, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--data-dir") && err.contains(DATA_DIR_ENV),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--lr=0.1"), "--lr=0.1");
        assert_eq!(shell_quote("my runs"), "'my runs'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
