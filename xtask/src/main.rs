//! `cargo xtask`: project automation for Rampart.
//!
//! `cargo xtask reproduce cifar10 [--preset smoke|fast|paper]` builds the `rampart`
//! command, trains and evaluates every model of the preset with it, and writes
//! `report.md` and `results.json` (see `docs/results-schema.md`); `cargo xtask bench`
//! times the hot steps (see `docs/performance.md`). The xtask only runs
//! the `rampart` binary and reads the JSON files it writes; it links none of the
//! library crates, so building it is quick.

mod bench;
mod claims;
mod estimate;
mod fit;
mod jobs;
mod portable;
mod presets;
mod report;
mod reproduce;
mod timestamp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Rampart's project automation.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train and evaluate the models of a preset and write report.md and results.json.
    Reproduce(Box<reproduce::ReproduceArgs>),
    /// Time forward, attack step and training step (optionally against PyTorch).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Reproduce(args) => reproduce::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
