//! `cargo xtask bench`: throughput of forward, attack step and training step (and,
//! with `--methods`, of fast AT's and PGD-10 AT's whole training steps).
//!
//! Builds `rampart` (with `--features cudnn` when `--device cuda…`), runs
//! `rampart bench --json` and prints its table and JSON lines. With
//! `--compare-pytorch` it also runs `xtask/bench/pytorch_bench.py` (the identical
//! network in PyTorch, when a Python with torch is available) and prints the ratio
//! rampart images/s ÷ PyTorch images/s per step (> 1 means Rampart is faster).

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::reproduce::{build_rampart, workspace_root};

/// Flags of `cargo xtask bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Architecture to time.
    #[arg(long, default_value = "wrn-16-4")]
    arch: String,
    /// Variant of the network: plain, student (noise after every BatchNorm) or oat
    /// (FiLM and dual BatchNorm); see `rampart bench --help`.
    #[arg(long, default_value = "plain")]
    variant: String,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed repetitions per step (median reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Device: cpu, cuda or cuda:N, with +tf32 to allow TF32 tensor cores or +bf16 for
    /// bf16 convolutions (PyTorch then runs under bf16 autocast).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also time one PGD step per threat model with the attack engine, the
    /// evaluation's PGD-20, and APGD-CE in L∞ and L2 (image·steps/s).
    #[arg(long)]
    attacks: bool,
    /// Also time the methods' whole training steps, fast AT's and PGD-10 AT's, with
    /// their presets' settings (`rampart bench --steps fast-at-step,pgd-at-step`; in
    /// PyTorch too with --compare-pytorch).
    #[arg(long)]
    methods: bool,
    /// Also time the identical network in PyTorch (on the same device) and print the ratios.
    #[arg(long)]
    compare_pytorch: bool,
    /// The Python interpreter with torch installed (for --compare-pytorch).
    #[arg(long, default_value = "python3")]
    python: String,
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn images_per_second(lines: &[Value], step: &str) -> Option<f64> {
    field(lines, step, "images_per_second")
}

/// `key` of the line of `step`, as a number.
fn field(lines: &[Value], step: &str, key: &str) -> Option<f64> {
    lines
        .iter()
        .find(|l| l["step"] == step)
        .and_then(|l| l[key].as_f64())
}

/// Bytes as MiB, or `-` when not measured (the CPU).
fn mib(bytes: Option<f64>) -> String {
    bytes.map_or("-".to_string(), |b| format!("{:.0}", b / 1048576.0))
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> Result<()> {
    let root = workspace_root();
    let bin = build_rampart(&root, args.device.starts_with("cuda"), false)?;
    let common = [
        "--arch".to_string(),
        args.arch.clone(),
        "--variant".into(),
        args.variant.clone(),
        "--batch-size".into(),
        args.batch_size.to_string(),
        "--reps".into(),
        args.reps.to_string(),
    ];
    let mut steps = String::from("forward,pgd-step,train-step");
    if args.attacks {
        steps += ",attack-linf,attack-l2,attack-l1,attack-l0,pgd20,apgd-linf,apgd-l2";
    }
    // The steps PyTorch also times.
    let mut compared = vec!["forward", "pgd-step", "train-step"];
    if args.methods {
        steps += ",fast-at-step,pgd-at-step";
        compared.extend(["fast-at-step", "pgd-at-step"]);
    }
    let out = Command::new(&bin)
        .arg("bench")
        .args(&common)
        .args(["--steps", &steps])
        .args(["--device", &args.device, "--json"])
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "rampart bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !args.compare_pytorch {
        return Ok(());
    }
    let ours = json_lines(&out.stdout);
    let script = root.join("xtask").join("bench").join("pytorch_bench.py");
    let torch = Command::new(&args.python)
        .arg(&script)
        .args(&common)
        .args(["--steps", &compared.join(",")])
        .args(["--device", &args.device])
        .output()
        .with_context(|| format!("cannot run {} (set --python)", args.python))?;
    if !torch.status.success() {
        bail!(
            "the PyTorch benchmark failed (is torch installed for {}?): {}",
            args.python,
            String::from_utf8_lossy(&torch.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&torch.stdout));
    let theirs = json_lines(&torch.stdout);
    println!(
        "\n| step | rampart images/s | pytorch images/s | ratio (rampart ÷ pytorch) | rampart peak MiB | pytorch peak MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for step in compared {
        if let (Some(a), Some(b)) = (
            images_per_second(&ours, step),
            images_per_second(&theirs, step),
        ) {
            let (ma, mb) = (
                field(&ours, step, "peak_memory_bytes"),
                field(&theirs, step, "peak_memory_bytes"),
            );
            println!(
                "| {step} | {a:.1} | {b:.1} | {:.2} | {} | {} |",
                a / b,
                mib(ma),
                mib(mb)
            );
            println!(
                "{}",
                serde_json::json!({"step": step, "arch": args.arch, "variant": args.variant, "batch_size": args.batch_size,
                    "rampart_images_per_second": a, "pytorch_images_per_second": b, "ratio": a / b,
                    "rampart_peak_memory_bytes": ma, "pytorch_peak_memory_bytes": mb})
            );
        }
    }
    Ok(())
}
