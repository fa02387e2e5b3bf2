//! `rampart`: train and evaluate image classifiers for robustness and calibration.
//!
//! Each subcommand parses its flags into a raw `…Args`, checks them into a `…Plan`
//! (every value validated, presets and defaults resolved, the data folder found) and
//! runs the plan. Every run writes its resolved configuration (`config.json`) and its
//! command line (`command.txt`) beside its outputs. The training loop, the methods and
//! evaluation live in `rampart-defenses`; this crate only connects them to the shell.

mod attack;
mod bench;
mod common;
mod compare;
mod data;
mod dry_run;
mod eval;
mod eval_run;
mod interop;
mod logging;
mod merge;
mod preset;
mod sweep;
mod train;

use std::process::ExitCode;

/// candle allocates a fresh buffer for every tensor operation; glibc's allocator hands
/// large ones back to the kernel at once, so every training step paid for page faults
/// and zeroing. mimalloc keeps and reuses them (measured: ~2× faster training steps).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (option 15 in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tensors of one training step are freed and allocated again at the next: never
/// returning freed memory to the kernel avoids re-faulting and re-zeroing it (measured
/// on WRN-10-1 training: 6,006 → 344 huge-page faults, ≈20 % less CPU time).
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets a documented process-wide allocator option to a valid value
    // (-1 = never purge); called once at start-up before any worker thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Whether a `--device` value of the command line asks for TF32 (`cuda+tf32`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn tf32_requested(args: impl IntoIterator<Item = String>) -> bool {
    let mut after_flag = false;
    args.into_iter().any(|a| {
        let value = match a.strip_prefix("--device=") {
            Some(v) => Some(v.to_string()),
            None if after_flag => Some(a.clone()),
            None => None,
        };
        after_flag = a == "--device";
        value.is_some_and(|v| v.to_ascii_lowercase().ends_with("+tf32"))
    })
}
use rampart_defenses::Progress;

/// Train and evaluate image classifiers for adversarial robustness and calibration.
#[derive(Parser, Debug)]
#[command(name = "rampart", version, about, long_about = None)]
struct Cli {
    /// Worker threads for data preparation and tensor math [default: all cores].
    /// Sets RAYON_NUM_THREADS before any work starts.
    #[arg(long, global = true)]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a classifier (checkpointed every epoch; --resume continues a run).
    Train(Box<train::TrainArgs>),
    /// Evaluate a trained classifier on the test set.
    Eval(eval::EvalArgs),
    /// Attack a trained model (PGD in L∞/L2/L1/L0, FGSM) and save the adversarial examples.
    Attack(attack::AttackArgs),
    /// Time forward, attack-step and training-step throughput (images/s).
    Bench(bench::BenchArgs),
    /// Compare evaluated models: tables and plots from their results.json files.
    Compare(compare::CompareArgs),
    /// Evaluate one model over a range of λ (OAT) or noise scales (stochastic students).
    Sweep(Box<sweep::SweepArgs>),
    /// Turn a PyTorch state dict (torch.save or safetensors) into a Rampart model file.
    Import(interop::ImportArgs),
    /// Write a Rampart model's weights as a PyTorch state dict.
    Export(interop::ExportArgs),
    /// Join the output folders of the shards of one `eval` or `attack` run (--shard I/N)
    /// into the unsharded run's results.
    Merge(merge::MergeArgs),
    /// Data sets: download the official files, or export a decoded split for PyTorch.
    #[command(subcommand)]
    Data(data::DataCommand),
}

/// Ctrl-C and SIGTERM ask the running command to stop after the batch at hand (it
/// keeps what it wrote and says how to resume); a second one stops at once.
fn stop_on_signals() {
    let installed = ctrlc::set_handler(|| {
        if rampart_fs::interrupt::requested() {
            eprintln!("stopping now");
            std::process::exit(130);
        }
        rampart_fs::interrupt::request();
        eprintln!("stop requested: finishing the current batch (Ctrl-C again stops at once)");
    });
    if let Err(e) = installed {
        eprintln!("warning: Ctrl-C will stop at once (no handler: {e})");
    }
}

/// What to lower when a command runs out of device memory: its batch-size flags and
/// their values (None for commands that hold no batches).
fn batch_flags(command: &Command) -> Option<String> {
    match command {
        Command::Train(a) => Some(format!(
            "--batch-size ({}) or --eval-batch-size ({})",
            a.batch_size
                .map_or_else(|| "the preset's".to_string(), |b| b.to_string()),
            a.eval_batch_size
        )),
        Command::Eval(a) => Some(format!("--batch-size ({})", a.batch_size)),
        Command::Sweep(a) => Some(format!("--batch-size ({})", a.eval.batch_size)),
        Command::Attack(a) => Some(format!("--batch-size ({})", a.batch_size())),
        Command::Bench(a) => Some(format!("--batch-size ({})", a.batch_size())),
        _ => None,
    }
}

/// The advice printed after an error that says a device ran out of memory.
fn out_of_memory_advice(message: &str, flags: Option<&str>) -> Option<String> {
    if !rampart_fs::is_out_of_memory(message) {
        return None;
    }
    Some(match flags {
        Some(f) => format!(
            "the device ran out of memory: run the same command again with a smaller {f}, \
             e.g. half; what finished is kept (batches, epochs) and the run continues from it"
        ),
        None => "the device ran out of memory".to_string(),
    })
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    stop_on_signals();
    let flags = batch_flags(&cli.command);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}");
            let advice = out_of_memory_advice(&message, flags.as_deref());
            if logging::is_active() {
                tracing::error!("{message}");
                if let Some(a) = &advice {
                    tracing::error!("{a}");
                }
            } else {
                eprintln!("error: {message}");
                if let Some(a) = &advice {
                    eprintln!("{a}");
                }
            }
            if rampart_fs::interrupt::requested() {
                // 128 + SIGINT, as a shell reports an interrupted command.
                return ExitCode::from(130);
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        common::at_least_one("--threads", n)?;
        // Before any thread pool exists: rayon and candle read it on first use.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    #[cfg(feature = "cuda")]
    if std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() && !tf32_requested(std::env::args()) {
        // Full f32 on CUDA unless a device asks for TF32 (`--device cuda+tf32`).
        // NVIDIA's switch, read by cuBLAS and cuDNN when they start (before any CUDA
        // call here), is what measurably keeps both off reduced-precision kernels;
        // see docs/performance.md.
        std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    }
    let command = common::command_line();
    // The data folder when --data-dir is not given: $RAMPART_DATA_DIR, else the
    // per-user cache folder.
    let data_fallback = common::DataDir::fallback();
    match cli.command {
        Command::Bench(args) => {
            args.run()?;
        }
        Command::Attack(args) => {
            let _lock = common::lock_out_dir(&args.out, &command)?;
            logging::init(None)?;
            args.run(&command, data_fallback)?;
        }
        Command::Import(args) => println!("{}", args.run()?),
        Command::Merge(args) => {
            let _lock = common::lock_out_dir(&args.out, &command)?;
            logging::init(Some(&args.log_file()))?;
            println!("{}", args.run(&command)?);
        }
        Command::Data(cmd) => cmd.run(data_fallback)?,
        Command::Export(args) => println!("{}", args.run()?),
        Command::Compare(args) => {
            println!("comparison written to {}", args.run()?.display());
        }
        Command::Sweep(args) if args.eval.dry_run => {
            dry_run::print(&dry_run::sweep(&args, &args.eval.plan(data_fallback)?)?)?;
        }
        Command::Sweep(args) => {
            let _lock = common::lock_out_dir(&args.eval.out, &command)?;
            logging::init(Some(&args.log_file()))?;
            let results = args.run(&command, data_fallback)?;
            println!(
                "sweep of {} values written to {}",
                results.points.len(),
                args.eval.out.join("sweep.md").display()
            );
        }
        Command::Train(args) if args.dry_run => {
            dry_run::print(&dry_run::train(&args.plan(data_fallback)?)?)?;
        }
        Command::Train(args) => {
            let plan = args.plan(data_fallback)?;
            match &plan.workers {
                train::Workers::Single => {
                    let _lock = common::lock_out_dir(&plan.out, &command)?;
                    logging::init(Some(&plan.log_file()))?;
                    let summary = plan.run(&command, Progress::Bars)?;
                    println!("{}", summary.line(&plan.out));
                }
                train::Workers::Launcher { workers } => {
                    // The launcher holds the folder while its workers train in it.
                    let _lock = common::lock_out_dir(&plan.out, &command)?;
                    logging::init(None)?;
                    plan.check_out_dir()?;
                    common::create_out_dir(&plan.out)?;
                    train::workers::launch(*workers, &plan.out, plan.device)?;
                }
                train::Workers::Worker { .. } => {
                    let command = common::command_line_without(&["--worker-rank", "--rendezvous"]);
                    let leader = plan.workers.leads();
                    let log_file = leader.then(|| plan.log_file());
                    logging::init_at(log_file.as_deref(), if leader { "info" } else { "warn" })?;
                    let summary = plan.run(&command, Progress::Bars)?;
                    if leader {
                        println!("{}", summary.line(&plan.out));
                    }
                }
            }
        }
        Command::Eval(args) if args.dry_run => {
            dry_run::print(&dry_run::eval(&args.plan(data_fallback)?)?)?;
        }
        Command::Eval(args) => {
            let plan = args.plan(data_fallback)?;
            let _lock = common::lock_out_dir(&plan.out, &command)?;
            logging::init(Some(&plan.log_file()))?;
            let results = plan.run(&command)?;
            if !plan.shard.is_whole() {
                let join = if plan.suite == eval::Suite::Pgd20 {
                    "this command with --merge and every shard's folder"
                } else {
                    "`rampart merge`"
                };
                println!(
                    "shard {} of the evaluation written to {}; join every shard with {join}",
                    plan.shard,
                    plan.out.display()
                );
                return Ok(());
            }
            println!(
                "clean accuracy {:.2} % (error {:.2} %) on {} test examples; results in {}",
                100.0 * results.clean_accuracy,
                100.0 * results.clean_error,
                results.test_examples,
                plan.out.display()
            );
            if let (Some(acc), Some(n)) = (results.robust_accuracy, results.robust_examples) {
                println!(
                    "robust accuracy {:.2} % on {n} attacked test examples",
                    100.0 * acc
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{batch_flags, out_of_memory_advice, tf32_requested, Cli};
    use clap::Parser;

    /// An out-of-memory error names the command's batch-size flags with their values;
    /// other errors get no advice.
    #[test]
    fn out_of_memory_names_the_batch_size_to_lower() {
        let flags = |line: &str| batch_flags(&Cli::parse_from(line.split(' ')).command);
        let eval = flags("rampart eval --model m.safetensors --out o --batch-size 512");
        assert_eq!(eval.as_deref(), Some("--batch-size (512)"));
        let train = flags("rampart train --method normal --out o --batch-size 64");
        assert_eq!(
            train.as_deref(),
            Some("--batch-size (64) or --eval-batch-size (256)")
        );
        let oom = "training failed: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let advice = out_of_memory_advice(oom, eval.as_deref()).unwrap();
        assert!(advice.contains("smaller --batch-size (512)"), "{advice}");
        assert!(out_of_memory_advice("shape mismatch", eval.as_deref()).is_none());
    }

    #[test]
    fn tf32_only_from_a_device_value() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert!(tf32_requested(args(
            "rampart train --device cuda+tf32 --epochs 1"
        )));
        assert!(tf32_requested(args("rampart eval --device=CUDA:1+TF32")));
        assert!(!tf32_requested(args(
            "rampart train --device cuda --out runs/a+tf32"
        )));
        assert!(!tf32_requested(args("rampart train --out x+tf32")));
        // bf16 convolutions keep the f32 work in full f32.
        assert!(!tf32_requested(args("rampart train --device cuda+bf16")));
    }
}
