//! `tracing` output: stderr (filtered by `RUST_LOG`, default `info`) and a log file.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether [`init`] has installed the logger (errors then go through it, to stderr
/// and the log file).
pub fn is_active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Installs the global subscriber; `log_file` (appended to) gets the same lines
/// without colours. Its folder is created.
pub fn init(log_file: Option<&Path>) -> Result<()> {
    init_at(log_file, "info")
}

/// [`init`] with another default level than `info` (`RUST_LOG` still wins): the
/// data-parallel workers other than worker 0 log warnings and errors only.
pub fn init_at(log_file: Option<&Path>, default_level: &str) -> Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let file = match log_file {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            Some(
                fmt::layer()
                    .with_ansi(false)
                    .with_target(false)
                    .with_writer(Mutex::new(f)),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .try_init()
        .context("cannot install the logger")?;
    ACTIVE.store(true, Ordering::Relaxed);
    Ok(())
}
