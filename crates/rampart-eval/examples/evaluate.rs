//! Evaluates a saved model with a suite and prints the Markdown table; for trying the
//! pipeline before it is wired into `rampart eval`.
//!
//! `cargo run --release -p rampart-eval --example evaluate -- MODEL DATA_DIR SUITE OUT
//! [TEST_LIMIT] [STEPS_MULTIPLIER] [RESTARTS_MULTIPLIER]`

use std::path::{Path, PathBuf};
use std::time::Instant;

use rampart_data::DatasetKind;
use rampart_eval::{run_suite, Effort, EvalConfig, Suite};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let usage = "usage: evaluate MODEL DATA_DIR quick|ccat|full OUT [TEST_LIMIT] [STEPS_MULTIPLIER] [RESTARTS_MULTIPLIER]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err(usage.into());
    }
    let model = PathBuf::from(&args[0]);
    let suite: Suite = args[2].parse()?;
    let mut config = EvalConfig::new(suite, &args[3]);
    if let Some(limit) = args.get(4) {
        config.test_limit = Some(limit.parse()?);
    }
    let steps = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    let restarts = args.get(6).map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    config.effort = Effort::new(steps, restarts)?;

    let loaded = Instant::now();
    let splits = rampart_data::load(DatasetKind::Cifar10, Path::new(&args[1]))?;
    eprintln!("data loaded in {:.1} s", loaded.elapsed().as_secs_f64());
    let report = run_suite(&model, &splits.test, &config)?;
    println!("{}", report.markdown("Evaluation", &[]));
    eprintln!("evaluation took {:.1} s", report.eval_seconds);
    Ok(())
}
