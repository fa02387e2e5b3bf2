//! Writes the comparison of evaluated models: `OUT/comparison.md` and `OUT/plots/`.
//!
//! `cargo run --release -p rampart-eval --example compare -- OUT NAME=results.json ...`

use std::path::Path;

use rampart_eval::{compare_models, EvalReport};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: compare OUT NAME=PATH/results.json [NAME=PATH/results.json ...]";
    let (out, specs) = args.split_first().ok_or(usage)?;
    let mut reports = Vec::new();
    for spec in specs {
        let (name, path) = spec.split_once('=').ok_or(usage)?;
        let report: EvalReport = serde_json::from_slice(&std::fs::read(path)?)?;
        reports.push((name.to_string(), report));
    }
    if reports.is_empty() {
        return Err(usage.into());
    }
    let refs: Vec<(&str, &EvalReport)> = reports.iter().map(|(n, r)| (n.as_str(), r)).collect();
    compare_models(&refs, Path::new(out))?;
    println!(
        "{}",
        std::fs::read_to_string(Path::new(out).join("comparison.md"))?
    );
    Ok(())
}
