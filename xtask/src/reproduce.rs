//! `cargo xtask reproduce`: the study presets and the runs that reproduce them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::jobs::Jobs;
use crate::report::{self, Study};

pub use crate::presets::*;

/// Flags of `cargo xtask reproduce`.
#[derive(Args, Debug, Clone)]
pub struct ReproduceArgs {
    /// Data set: cifar10 (the default; the presets are tuned for it), cifar100, mnist
    /// or svhn, passed to every `rampart` command (the presets' budgets stay CIFAR-10's).
    #[arg(value_parser = DATASETS, conflicts_with = "dataset_flag")]
    pub dataset: Option<String>,

    /// The data set, as a flag (same values as the positional argument).
    #[arg(long = "dataset", value_parser = DATASETS)]
    pub dataset_flag: Option<String>,

    /// Which study to run.
    #[arg(long, value_enum, default_value = "smoke")]
    pub preset: Preset,

    /// Folder holding the data set (e.g. the unpacked cifar10-jpeg, or the folder with
    /// cifar-10-binary.tar.gz); defaults to $RAMPART_DATA_DIR, else the per-user cache
    /// folder `rampart` uses (~/.cache/rampart/data), filled on first use. See
    /// datasets/README.md.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Build `rampart` with `--features download`, so a data set missing from the
    /// per-user cache folder is downloaded on first use.
    #[arg(long)]
    pub download: bool,

    /// Output folder [default: runs/DATASET-PRESET in the repository].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Continue a study in --out: skip the models, evaluations and sweeps that
    /// finished, and resume the interrupted one from its last checkpoint, batch or
    /// sweep value. Refused when the study was started with another data set, preset
    /// or device.
    #[arg(long)]
    pub resume: bool,

    /// Run this `rampart` binary instead of building one.
    #[arg(long)]
    pub rampart_bin: Option<PathBuf>,

    /// Run nothing: estimate the wall time of every selected row with 1, 4, 8 … GPUs
    /// (--estimate-gpus) from the step times in this file (the JSON lines of `rampart
    /// bench --json`, or the GPU suite's bench.jsonl, measured on --device), each run's
    /// work counted by `rampart … --dry-run`; prints a Markdown table (see
    /// docs/scale-out.md). Writes nothing into --out.
    #[arg(long, value_name = "STEP_TIMES")]
    pub estimate: Option<PathBuf>,

    /// With --estimate: the numbers of GPUs to estimate for.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub estimate_gpus: Vec<usize>,

    /// With --estimate: the all-reduce bus bandwidth between GPUs, GB/s (NVLink
    /// machines reach 100–400, PCIe about 10–25).
    #[arg(long, default_value_t = 100.0)]
    pub bus_bandwidth: f64,

    /// With --estimate: time AutoAttack's first stage on this share of the images
    /// (the models' clean accuracy) and its later stages on this share (their robust
    /// accuracy), e.g. 0.85,0.45, instead of on every image (the upper bound).
    #[arg(long, value_name = "CLEAN,ROBUST", value_delimiter = ',')]
    pub assume_accuracy: Option<Vec<f64>>,

    /// Fit this invocation into MINUTES: time this machine's steps first (`rampart
    /// bench`, a minute or so), then train every row of the invocation for the same
    /// share of its schedule, the most that fits with the rows' whole evaluation
    /// (--fit-share of the minutes, less the timing; the minutes count from after
    /// building `rampart`); recorded in OUT/fit.json, and the
    /// report gives the whole schedule's projected time. Refused when the evaluation
    /// alone does not fit. With --estimate: only print, per row, the most epochs of its
    /// schedule that fit MINUTES on one GPU with its evaluation.
    #[arg(long, value_name = "MINUTES")]
    pub fit_minutes: Option<f64>,

    /// With --fit-minutes (without --estimate): the share of the minutes the estimated
    /// runs may fill; the rest is for what the estimate leaves out (loading data and
    /// models, the host's work between passes, each run's start).
    #[arg(long, default_value_t = 0.85)]
    pub fit_share: f64,

    /// With --fit-minutes (without --estimate): fit from the step times in this file
    /// (the JSON lines of `rampart bench --json`, e.g. the GPU suite's bench.jsonl,
    /// measured on --device) instead of timing this machine first.
    #[arg(long, value_name = "STEP_TIMES")]
    pub fit_step_times: Option<PathBuf>,

    /// With --estimate: also write the estimate as JSON to this file.
    #[arg(long)]
    pub estimate_json: Option<PathBuf>,

    /// Worker threads given to `rampart --threads` [default: all cores, shared out
    /// between the runs that go side by side].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Train every selected row for N epochs instead of its preset's: a shortened
    /// schedule (learning-rate schedules scale to it), e.g. to fit a row into a time
    /// limit. Each row records the epochs it ran (the report's epochs column, its train
    /// command); rows run by other invocations keep theirs.
    #[arg(long)]
    pub epochs: Option<usize>,

    /// Cut every row's evaluation protocol into N shards, each a run of its own (on its
    /// own device where --device lists several), merged with `rampart merge` into the
    /// folder one run writes: the same results, sooner on several devices (see
    /// docs/scale-out.md).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,

    /// Train every selected row on N data-parallel workers (`rampart train --workers
    /// N`): N GPUs of --device's list at once (`--device cuda:0,…,cuda:7`), or N CPU
    /// processes. BatchNorm statistics are per worker (DDP's default), so the weights
    /// differ from one device's; the study records N (see docs/scale-out.md).
    #[arg(long, default_value_t = 1)]
    pub train_workers: usize,

    /// With --train-workers N > 1: synchronised BatchNorm (`rampart train --sync-bn`)
    /// for every row, which then trains like one device on the global batch (a
    /// stochastic student's noise σ and an OAT model's dual BatchNorms too). Recorded
    /// with the study.
    #[arg(long)]
    pub sync_bn: bool,

    /// How many `rampart` runs go side by side, each as soon as the runs it reads have
    /// finished [default: one per core on a CPU, each single-threaded (with --threads T,
    /// cores ÷ T of them); one per device on a GPU].
    /// With more than one, each run's output goes to OUT/logs/. Results depend on the
    /// threads a run used (floating-point sums are split per thread), so a study
    /// resumed or repeated with other --jobs/--threads differs in the last digits.
    #[arg(long)]
    pub jobs: Option<usize>,

    /// Which models to train: `all` (the default), `core` (normal, at, ccat: about
    /// 4.5 minutes of the smoke preset on 2 cores) or a comma-separated list of row names (normal, at, ccat,
    /// ls, regmixup, ar-adals, sat, oat, student; a student needs its teacher `at`).
    #[arg(long, default_value = "all")]
    pub rows: String,

    /// Device given to `rampart --device` (cpu, cuda, cuda:N, cuda+tf32, cuda+bf16) [default:
    /// cpu for smoke, cuda for fast and paper], or several of one kind
    /// (`cuda:0,cuda:1,…`): the study's runs then go side by side, one per device
    /// (see --jobs). A CUDA device builds `rampart` with `--features cudnn` (CUDA and
    /// cuDNN).
    #[arg(long)]
    pub device: Option<String>,
}

/// The data sets `reproduce` accepts.
const DATASETS: [&str; 4] = ["cifar10", "cifar100", "mnist", "svhn"];

impl ReproduceArgs {
    /// The data set: the positional argument or `--dataset`, else cifar10.
    pub fn dataset(&self) -> &str {
        self.dataset
            .as_deref()
            .or(self.dataset_flag.as_deref())
            .unwrap_or("cifar10")
    }
}

/// The repository root (the xtask's parent folder).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or(manifest.clone(), Path::to_path_buf)
}

/// Where the evaluation protocol of one model writes (inside its run folder).
pub fn protocol_dir(out: &Path, method: &str) -> PathBuf {
    model_dir(out, method).join("protocol")
}

/// The folder of one model's run inside the study folder.
pub fn model_dir(out: &Path, method: &str) -> PathBuf {
    out.join(method)
}

/// The folder of one model's evaluation.
pub fn eval_dir(out: &Path, method: &str) -> PathBuf {
    model_dir(out, method).join("eval")
}

/// Whether a model was trained to the end and evaluated: its summary and evaluation
/// are in the folder, and its model file or, where the file stayed on the machine that
/// trained it, the file's record (`model.json`).
pub fn is_finished(out: &Path, method: &str) -> bool {
    let dir = model_dir(out, method);
    dir.join("summary.json").is_file()
        && (dir.join("model.safetensors").is_file() || dir.join(report::MODEL_RECORD).is_file())
        && eval_dir(out, method).join("results.json").is_file()
}

/// The rows `--rows` selects from a preset, in the preset's order.
#[cfg(test)]
pub fn select_rows(preset: Preset, selection: &str) -> Result<Vec<ModelRow>> {
    select_rows_in(preset, selection, &|_| false)
}

/// [`select_rows`] in a study folder where the rows for which `finished` holds are
/// already trained and evaluated: a student may then be selected without its teacher
/// when the teacher is one of them.
pub fn select_rows_in(
    preset: Preset,
    selection: &str,
    finished: &dyn Fn(&str) -> bool,
) -> Result<Vec<ModelRow>> {
    let all = preset.models();
    let rows: Vec<ModelRow> = match selection.trim() {
        "all" => all.to_vec(),
        "core" => all.iter().filter(|r| r.core).copied().collect(),
        list => {
            let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &wanted {
                if !all.iter().any(|r| r.method == *w) {
                    let names: Vec<&str> = all.iter().map(|r| r.method).collect();
                    bail!(
                        "--rows: unknown row `{w}` (the {} preset has {})",
                        preset.name(),
                        names.join(", ")
                    );
                }
            }
            all.iter()
                .filter(|r| wanted.contains(&r.method))
                .copied()
                .collect()
        }
    };
    for r in &rows {
        if let Some(t) = r.teacher {
            if !rows.iter().any(|o| o.method == t) && !finished(t) {
                bail!(
                    "--rows: `{}` starts from the `{t}` model; select `{t}` too (or run it \
                     first into this --out and continue with --resume)",
                    r.method
                );
            }
        }
    }
    if rows.is_empty() {
        bail!("--rows selects no model");
    }
    Ok(rows)
}

/// Runs the study.
pub fn run(args: &ReproduceArgs) -> Result<()> {
    let started_at = crate::timestamp::now_utc();
    let root = workspace_root();
    // Without a folder, `rampart` uses (and fills) its per-user cache folder.
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("RAMPART_DATA_DIR").map(PathBuf::from))
        .filter(|d| !d.as_os_str().is_empty());
    let data_dir = data_dir.as_deref();
    let dataset = args.dataset();
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let preset = args.preset;
    // An estimate runs nothing and writes nothing into the study: its runs are asked
    // for their work in a scratch folder.
    let scratch = match &args.estimate {
        Some(_) => Some(check_estimate(args)?),
        None => None,
    };
    let out = match &scratch {
        Some(dir) => dir.clone(),
        None => args.out.clone().unwrap_or_else(|| {
            root.join("runs")
                .join(format!("{dataset}-{}", preset.name()))
        }),
    };
    // Absolute, so that the runs started in it can name its files relative to it.
    let out = std::path::absolute(&out)
        .with_context(|| format!("cannot resolve --out {}", out.display()))?;
    let device = args
        .device
        .clone()
        .unwrap_or_else(|| preset.default_device().to_string());
    // `--device` names one device or a list of one kind (cuda:0,cuda:1,…): the study
    // is recorded with the kind, and each run goes to one of them.
    let devices = device_list(&device)?;
    let device = device_kind(&devices[0]);
    // The rows this invocation runs, and the study's rows: those and every other row
    // of the preset that an earlier invocation finished in this folder (--resume), so
    // that rows run one invocation at a time end in one report.
    let finished_before = |method: &str| args.resume && is_finished(&out, method);
    let selected = select_rows_in(preset, &args.rows, &finished_before)?;
    let study_rows: Vec<ModelRow> = preset
        .models()
        .iter()
        .filter(|r| selected.iter().any(|s| s.method == r.method) || finished_before(r.method))
        .copied()
        .collect();
    for row in &selected {
        if let Some(t) = row.teacher {
            let teacher = model_dir(&out, t).join("model.safetensors");
            if !selected.iter().any(|s| s.method == t) && !teacher.is_file() {
                bail!(
                    "--rows: `{}` starts from the `{t}` model, and {} is not here (it stayed \
                     on the machine that trained it): select `{t}` too, or bring the file back",
                    row.method,
                    teacher.display()
                );
            }
        }
    }
    let rows = study_rows.as_slice();
    let is_selected = |method: &str| selected.iter().any(|s| s.method == method);
    // One study per folder at a time; released when this process ends, however it ends.
    let command = xtask_command_line();
    let _lock = rampart_fs::OutputLock::acquire_for(&out, &command)?;
    // A study folder holds one study: it continues only with its own settings.
    let mut settings = rampart_fs::RunSettings::new("cargo xtask reproduce")
        .with("--dataset", dataset)
        .with("--preset", preset.name())
        .with("--device", device.as_str());
    if args.train_workers == 0 {
        bail!("--train-workers must be at least 1");
    }
    if args.train_workers > 1 {
        // Data-parallel training changes the weights: a study keeps its choice.
        settings = settings.with("--train-workers", args.train_workers.to_string());
    }
    if args.sync_bn {
        if args.train_workers < 2 {
            bail!("--sync-bn synchronises the BatchNorm of --train-workers N (N ≥ 2) only");
        }
        settings = settings.with("--sync-bn", "on");
    }
    if !args.resume {
        for row in &selected {
            let dir = model_dir(&out, row.method);
            if dir.join("checkpoint.safetensors").exists() || dir.join("model.safetensors").exists()
            {
                bail!(
                    "{} already holds a run: pass --resume to skip finished models and continue \
                     interrupted ones, or choose another --out",
                    dir.display()
                );
            }
        }
    }
    settings.begin(&out)?;
    // The runs reach the data folder through DIR/data, so that nothing they record
    // names a folder outside the study.
    let data_link = data_dir
        .map(|d| crate::portable::data_folder(&out, d))
        .transpose()?;
    let data_dir = data_link.as_deref();
    let rampart = match &args.rampart_bin {
        // Absolute: the runs start in the study folder.
        Some(bin) => std::path::absolute(bin)
            .with_context(|| format!("cannot resolve --rampart-bin {}", bin.display()))?,
        // A dry run needs no GPU: the CPU build counts the work of a CUDA study.
        None => build_rampart(
            &root,
            device.starts_with("cuda") && scratch.is_none(),
            args.download,
        )?,
    };
    let clock = Instant::now();
    let budgets = preset.budgets();
    let parallel = args.jobs.unwrap_or_else(|| {
        if devices.len() > 1 {
            devices.len()
        } else {
            default_jobs(&device, args.threads)
        }
    });
    if parallel == 0 {
        bail!("--jobs must be at least 1");
    }
    if args.shards == 0 {
        bail!("--shards must be at least 1");
    }
    if args.epochs == Some(0) {
        bail!("--epochs must be at least 1");
    }
    // Fitted to a time limit here (not an estimate's table of fits).
    let fit_minutes = args.fit_minutes.filter(|_| scratch.is_none());
    if let Some(m) = fit_minutes {
        if !(m.is_finite() && m > 0.0) {
            bail!("--fit-minutes must be a positive number of minutes");
        }
        if !(args.fit_share > 0.0 && args.fit_share <= 1.0) {
            bail!("--fit-share must be in (0, 1]");
        }
        if args.epochs.is_some() {
            bail!("--fit-minutes chooses the epochs: leave out --epochs");
        }
    } else if args.fit_step_times.is_some() {
        bail!("--fit-step-times goes with --fit-minutes (and without --estimate)");
    }
    // Slot k runs on devices[k mod len].
    let slots: Vec<String> = (0..parallel)
        .map(|k| devices[k % devices.len()].clone())
        .collect();
    // Side by side, each run gets its share of the cores (one thread each on a CPU
    // unless --threads says otherwise).
    let threads = args
        .threads
        .or_else(|| (parallel > 1).then(|| (available_cores() / parallel).max(1)));
    let setup = EvalSetup {
        rampart: &rampart,
        threads,
        dataset,
        data_dir,
    };
    let log = |row: &str, what: &str| out.join("logs").join(format!("{row}.{what}.log"));
    // The study's runs, planned once, or, fitted to --fit-minutes, planned with the
    // schedules' epochs, timed, and planned again with the fitted ones.
    // A row fitted by an earlier invocation keeps its epochs when the study resumes.
    let recorded = if args.resume && scratch.is_none() {
        crate::fit::read_record(&out)?
    } else {
        crate::fit::FitRecord::default()
    };
    let trained_here = |m: &str| is_selected(m) && !(args.resume && is_finished(&out, m));
    let mut fitted: Option<std::collections::BTreeMap<String, usize>> = None;
    let (jobs, suite, sweeps, autoattacked) = loop {
        let epochs_of = |method: &str| {
            args.epochs
                .or_else(|| fitted.as_ref().and_then(|f| f.get(method).copied()))
                .or_else(|| recorded.shortened(method))
        };
        let mut jobs = Jobs::in_folder(&out);
        // Each row: training, then its evaluation (both skipped when finished and resumed).
        let mut trained: Vec<Option<usize>> = vec![None; rows.len()];
        let mut evaluated: Vec<Option<usize>> = vec![None; rows.len()];
        for (i, row) in rows.iter().enumerate() {
            let step = format!("[{}/{}] {}", i + 1, rows.len(), row.method);
            if !is_selected(row.method) {
                eprintln!("==> {step}: finished by an earlier invocation, kept in the study");
                continue;
            }
            if args.resume && is_finished(&out, row.method) {
                eprintln!("==> {step}: already trained and evaluated, skipped (--resume)");
                continue;
            }
            let dir = model_dir(&out, row.method);
            let mut train = rampart_command(&rampart, threads);
            train
                .arg("train")
                .args(with_epochs(row.train_flags(), epochs_of(row.method)))
                .args(["--dataset", dataset, "--seed", "0"]);
            data_dir_args(&mut train, data_dir);
            train.arg("--out").arg(&dir);
            let mut after = Vec::new();
            if let Some(teacher) = row.teacher {
                train
                    .arg("--init-from")
                    .arg(model_dir(&out, teacher).join("model.safetensors"));
                after.extend(job_of(rows, &trained, teacher));
            }
            if args.resume {
                train.arg("--resume");
            }
            train.args(worker_flags(args.train_workers, args.sync_bn));
            let t = jobs.add(
                format!("{step}: training ({})", describe(row)),
                train,
                after,
                log(row.method, "train"),
            );
            jobs.wide(t, args.train_workers);
            trained[i] = Some(t);

            let mut eval =
                setup.command(&dir.join("model.safetensors"), &eval_dir(&out, row.method));
            eval.args(row.eval_flags(&budgets));
            let robust = if row.robust_from_protocol(&budgets) {
                "in the protocol".to_string()
            } else {
                if row.stochastic {
                    budgets.stochastic_robust_examples
                } else {
                    budgets.robust_examples
                }
                .map_or("the whole test set".to_string(), |n| {
                    format!("the first {n} images")
                })
            };
            evaluated[i] = Some(jobs.add(
            format!(
                "{step}: evaluation (clean: the whole test set; PGD-20 worst case L∞ 8/255: {robust})"
            ),
            eval,
            [t],
            log(row.method, "eval"),
        ));
        }

        // AutoAttack on the preset's robust rows, with PGD-20 on the very same images:
        // listed before the protocols, so that this long run starts early rather than
        // ending the study alone.
        let (aa_rows, aa_limit) = preset.autoattack();
        let mut autoattacked = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if !aa_rows.contains(&row.method) {
                continue;
            }
            let model = model_dir(&out, row.method).join("model.safetensors");
            for (suite, dir) in [
                ("autoattack", report::autoattack_dir(&out, row.method)),
                ("pgd20", report::autoattack_pgd_dir(&out, row.method)),
            ] {
                if dir.join("results.json").exists() {
                    continue;
                }
                let mut eval = setup.command(&model, &dir);
                eval.args(["--suite", suite]);
                if let Some(n) = aa_limit {
                    let n = n.to_string();
                    eval.args(["--attack-limit", &n]);
                    if suite == "pgd20" {
                        eval.args(["--test-limit", &n]);
                    }
                }
                let name = format!(
                    "{}: {suite} on {}",
                    row.method,
                    aa_limit.map_or("the whole test set".into(), |n| format!(
                        "the first {n} test images"
                    ))
                );
                // AutoAttack, the longest run of a study, and PGD-20 on its images, in
                // shards of whole batches: at most one per batch.
                eval.args(["--batch-size", &AUTOATTACK_BATCH.to_string()]);
                let shards = aa_limit.map_or(args.shards, |n| {
                    args.shards.min(n.div_ceil(AUTOATTACK_BATCH))
                });
                add_sharded(
                    &mut jobs,
                    Sharded {
                        name,
                        eval,
                        dir: &dir,
                        shards,
                        after: trained[i],
                        merge: (suite == "autoattack").then(|| rampart_command(&rampart, threads)),
                    },
                    |part| log(row.method, &format!("{suite}{part}")),
                );
            }
            autoattacked.push(row.method);
        }
        // Wong et al.'s PGD-50-10 on every deterministic row.
        if let Some(n) = budgets.pgd50_10 {
            for (i, row) in rows.iter().enumerate() {
                let dir = report::pgd50_10_dir(&out, row.method);
                if row.stochastic || dir.join("results.json").exists() {
                    continue;
                }
                let model = model_dir(&out, row.method).join("model.safetensors");
                let mut eval = setup.command(&model, &dir);
                let n = n.to_string();
                eval.args(["--suite", "pgd20", "--objectives", "ce"])
                    .args(["--attack-steps", "50", "--restarts", "10"])
                    .args(["--attack-limit", &n, "--test-limit", &n])
                    .args(["--batch-size", &AUTOATTACK_BATCH.to_string()]);
                let shards = args
                    .shards
                    .min(n.parse::<usize>().unwrap_or(1).div_ceil(AUTOATTACK_BATCH));
                add_sharded(
                    &mut jobs,
                    Sharded {
                        name: format!("{}: PGD-50-10 on the first {n} test images", row.method),
                        eval,
                        dir: &dir,
                        shards,
                        after: trained[i],
                        merge: None,
                    },
                    |part| log(row.method, &format!("pgd50-10{part}")),
                );
            }
        }
        // The evaluation protocol on every model, then one comparison (tables + plots).
        let (suite, limit) = preset.protocol();
        let mut compare = rampart_command(&rampart, threads);
        compare.arg("compare").arg("--out").arg(&out);
        let mut protocols: Vec<Option<usize>> = vec![None; rows.len()];
        for (i, row) in rows.iter().enumerate() {
            let dir = protocol_dir(&out, row.method);
            compare.arg(format!(
                "{}={}",
                row.method,
                dir.join("results.json").display()
            ));
            if dir.join("results.json").exists() {
                continue;
            }
            let model = model_dir(&out, row.method).join("model.safetensors");
            let mut eval = setup.command(&model, &dir);
            eval.args(["--suite", suite]);
            eval.args(row.stochastic_protocol_flags(&budgets));
            let limit = if row.stochastic {
                budgets.stochastic_protocol.1
            } else {
                eval.args(["--trust-examples", &budgets.trust_examples.to_string()]);
                limit
            };
            if let Some(n) = limit {
                eval.args(["--attack-limit", &n.to_string()]);
            }
            if let Some(b) = budgets.protocol_batch_size {
                eval.args(["--batch-size", &b.to_string()]);
            }
            let name = format!(
                "[{}/{}] {}: evaluation protocol (--suite {suite})",
                i + 1,
                rows.len(),
                row.method
            );
            protocols[i] = Some(add_sharded(
                &mut jobs,
                Sharded {
                    name,
                    eval,
                    dir: &dir,
                    shards: args.shards,
                    after: trained[i],
                    merge: Some(rampart_command(&rampart, threads)),
                },
                |part| log(row.method, &format!("protocol{part}")),
            ));
        }
        let compared = jobs.add(
            "comparing the models",
            compare,
            protocols.iter().flatten().copied().collect::<Vec<_>>(),
            out.join("logs").join("compare.log"),
        );
        jobs.on_host(compared);

        // The test-time trade-offs: OAT over λ beside the dedicated λ = 0 (normal) and
        // λ = 1 (at) models, and the student over noise levels.
        let mut sweeps = Vec::new();
        let sweep_limits = preset.sweep_limits();
        for (i, row) in rows.iter().enumerate() {
            let mut after: Vec<usize> = trained[i].into_iter().collect();
            let (over, extra): (&str, Vec<String>) = match row.method {
                "oat" => {
                    let mut refs = Vec::new();
                    for (name, key) in [
                        ("normal (lambda 0)", "normal"),
                        ("oat-fixed (lambda 0.3)", "oat-fixed"),
                        ("at (lambda 1)", "at"),
                    ] {
                        if let Some(r) = rows.iter().position(|r| r.method == key) {
                            // The robust figure is where the row's PGD-20 ran.
                            let dir = if rows[r].robust_from_protocol(&budgets) {
                                after.extend(protocols[r]);
                                protocol_dir(&out, key)
                            } else {
                                after.extend(evaluated[r]);
                                eval_dir(&out, key)
                            };
                            refs.push("--reference".to_string());
                            refs.push(format!("{name}={}", dir.join("results.json").display()));
                        }
                    }
                    ("lambda", refs)
                }
                _ if row.stochastic => (
                    "noise-scale",
                    ["--values", budgets.noise_values]
                        .iter()
                        .map(|s| s.to_string())
                        .chain(row.stochastic_protocol_flags(&budgets))
                        .collect(),
                ),
                _ => continue,
            };
            let extra = if row.stochastic {
                extra
            } else {
                let trust = budgets.sweep_trust_examples.to_string();
                extra
                    .into_iter()
                    .chain(["--trust-examples".to_string(), trust])
                    .collect()
            };
            let dir = report::sweep_dir(&out, row.method);
            sweeps.push((row.method, over, dir.clone()));
            if dir.join("sweep.json").exists() {
                continue;
            }
            let mut sweep = rampart_command(&rampart, threads);
            sweep
                .arg("sweep")
                .args(["--over", over])
                .arg("--model")
                .arg(model_dir(&out, row.method).join("model.safetensors"))
                .args(["--dataset", dataset, "--suite", "pgd20"])
                .args(extra);
            if let Some((test, attacked)) = sweep_limits {
                let attacked = match (row.stochastic, budgets.stochastic_sweep_examples) {
                    (true, Some(n)) => n,
                    _ => attacked,
                };
                sweep.args([
                    "--test-limit",
                    &test.to_string(),
                    "--attack-limit",
                    &attacked.to_string(),
                ]);
            }
            data_dir_args(&mut sweep, data_dir);
            sweep.arg("--out").arg(&dir);
            jobs.add(
                format!("{}: sweep over {over}", row.method),
                sweep,
                after,
                log(row.method, "sweep"),
            );
        }

        if let (Some(minutes), None) = (fit_minutes, &fitted) {
            // The rows trained here, with their schedules' epochs.
            let mut here = Vec::new();
            for row in rows.iter().filter(|r| trained_here(r.method)) {
                here.push((row.method, preset_epochs(&rampart, row, dataset)?));
            }
            let setup = crate::fit::FitSetup {
                out: &out,
                rampart: &rampart,
                threads,
                bench_device: &slots[0],
                device: &device,
                minutes,
                share: args.fit_share,
                started: clock,
                rows: &here,
                step_times: args.fit_step_times.as_deref(),
            };
            fitted = Some(crate::fit::fit(&setup, jobs.as_slice())?);
            continue;
        }
        break (jobs, suite, sweeps, autoattacked);
    };

    if parallel > 1 && scratch.is_none() {
        eprintln!(
            "==> {parallel} runs at a time ({}), {} thread(s) each; each run's output goes to {}",
            slots.join(", "),
            threads.map_or("all".to_string(), |t| t.to_string()),
            out.join("logs").display()
        );
    }
    if let (Some(times), Some(dir)) = (&args.estimate, &scratch) {
        let result = print_estimate(args, times, &device, &jobs.into_vec());
        // The scratch folder goes, whatever the estimate gave.
        let _ = std::fs::remove_dir_all(dir);
        return result;
    }
    crate::jobs::run_timed(
        jobs.into_vec(),
        &slots,
        Some(&out.join(crate::jobs::RUN_TIMES)),
    )?;

    let study = Study {
        dataset: dataset.to_string(),
        preset: preset.name().to_string(),
        preset_about: preset.about().to_string(),
        created: started_at,
        command: xtask_command_line(),
        wall_seconds: clock.elapsed().as_secs_f64(),
        build_command: build_command_line(device.starts_with("cuda"), args.download),
        budgets: budgets.markdown(),
    };
    let mut models = report::collect(&out, rows, &budgets)?;
    for (m, row) in models.iter_mut().zip(rows) {
        // A row trained on another schedule (--epochs) says what the preset's takes.
        match preset_epochs(&rampart, row, dataset) {
            Ok(epochs) => m.set_schedule(epochs),
            Err(e) => eprintln!(
                "==> {}: the preset's schedule is unknown: {e:#}",
                row.method
            ),
        }
    }
    report::write(&out, &study, &models)?;
    report::add_protocol(&out, rows, suite)?;
    report::add_sweeps(&out, &sweeps)?;
    report::add_autoattack(&out, &autoattacked)?;
    report::add_row_times(&out, rows)?;
    report::add_claims(&out)?;
    eprintln!("==> report: {}", out.join("report.md").display());
    for m in &models {
        let robust = match (m.robust_accuracy, m.robust_examples) {
            (Some(a), Some(n)) => format!(", PGD-20 robust accuracy {:.2} % on {n}", 100.0 * a),
            _ => String::new(),
        };
        println!(
            "{}: {} {} epochs, clean accuracy {:.2} % (error {:.2} %) on {} test images{robust}, trained in {}",
            m.key,
            m.arch,
            m.epochs,
            100.0 * m.clean_accuracy,
            100.0 * m.clean_error,
            m.test_examples,
            report::duration(m.train_seconds)
        );
    }
    Ok(())
}

/// The epochs of `row`'s training as the preset has it (`rampart train --dry-run`
/// of its flags, without --epochs).
fn preset_epochs(rampart: &Path, row: &ModelRow, dataset: &str) -> Result<usize> {
    let scratch = std::env::temp_dir().join("rampart-schedule");
    let out = Command::new(rampart)
        .arg("train")
        .args(row.train_flags())
        .args(["--dataset", dataset, "--dry-run", "--out"])
        .arg(&scratch)
        .output()
        .with_context(|| format!("cannot start {}", rampart.display()))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("{\"dry_run\""))
        .context("the dry run printed no work")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    v["dry_run"]["epochs"]
        .as_u64()
        .map(|e| e as usize)
        .context("the dry run gave no epochs")
}

/// Refuses what an estimate cannot model and gives it a scratch folder.
fn check_estimate(args: &ReproduceArgs) -> Result<PathBuf> {
    if args.train_workers > 1 || args.shards > 1 || args.resume {
        bail!(
            "--estimate models several GPUs itself (--estimate-gpus): leave out \
             --train-workers, --shards and --resume"
        );
    }
    if args.estimate_gpus.is_empty() || args.estimate_gpus.contains(&0) {
        bail!("--estimate-gpus takes numbers of GPUs, each at least 1");
    }
    if args
        .fit_minutes
        .is_some_and(|m| !(m.is_finite() && m > 0.0))
    {
        bail!("--fit-minutes must be a positive number of minutes");
    }
    if !(args.bus_bandwidth.is_finite() && args.bus_bandwidth > 0.0) {
        bail!("--bus-bandwidth must be a positive number of GB/s");
    }
    if let Some(a) = &args.assume_accuracy {
        if a.len() != 2 || !a.iter().all(|v| (0.0..=1.0).contains(v)) || a[1] > a[0] {
            bail!(
                "--assume-accuracy takes CLEAN,ROBUST, two fractions in [0, 1] with ROBUST ≤ \
                 CLEAN, e.g. 0.85,0.45"
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("rampart-estimate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the scratch folder {}", dir.display()))?;
    Ok(dir)
}

/// Prints (and with --estimate-json writes) the estimate of the study's `jobs`.
fn print_estimate(
    args: &ReproduceArgs,
    times: &Path,
    device: &str,
    jobs: &[crate::jobs::Job],
) -> Result<()> {
    let step_times = crate::estimate::StepTimes::read(times)?;
    let assume = crate::estimate::Assumptions {
        bus_bytes_per_second: args.bus_bandwidth * 1e9,
        accuracy: args.assume_accuracy.as_ref().map(|a| (a[0], a[1])),
    };
    let (estimates, notes) =
        crate::estimate::estimate(jobs, device, &args.estimate_gpus, &step_times, assume)?;
    println!(
        "{}",
        crate::estimate::markdown(
            &estimates,
            &args.estimate_gpus,
            device,
            &times.display().to_string(),
            assume,
            args.fit_minutes,
            &notes
        )
    );
    if let Some(path) = &args.estimate_json {
        let json = serde_json::json!({
            "device": device,
            "step_times": times,
            "gpus": args.estimate_gpus,
            "bus_bandwidth_gb_per_s": args.bus_bandwidth,
            "assumed_accuracy": args.assume_accuracy,
            "runs": estimates,
            "notes": notes,
        });
        rampart_fs::write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}

fn describe(row: &ModelRow) -> String {
    let mut text = match row.training {
        Training::Preset(name) => format!("preset {name}"),
        Training::Recipe(r) => format!(
            "{}, {} epochs, {} schedule, lr {}",
            r.arch, r.epochs, r.schedule, r.lr
        ),
    };
    if !row.extra_flags.is_empty() {
        text.push_str(&format!(", {}", row.extra_flags.join(" ")));
    }
    text
}

/// The features `rampart` is built with.
fn features(cuda: bool, download: bool) -> Vec<&'static str> {
    let mut features = Vec::new();
    if cuda {
        // CUDA with cuDNN: the fast path (docs/performance.md).
        features.push("cudnn");
    }
    if download {
        features.push("download");
    }
    features
}

fn build_command_line(cuda: bool, download: bool) -> String {
    let mut line = "cargo build --release -p rampart-cli".to_string();
    let features = features(cuda, download);
    if !features.is_empty() {
        line.push_str(&format!(" --features {}", features.join(",")));
    }
    line
}

/// Builds the `rampart` binary (with cuDNN when `cuda`, with downloads when
/// `download`) and returns its path.
pub(crate) fn build_rampart(root: &Path, cuda: bool, download: bool) -> Result<PathBuf> {
    eprintln!("==> {}", build_command_line(cuda, download));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(root)
        .args(["build", "--release", "-p", "rampart-cli"]);
    let features = features(cuda, download);
    if !features.is_empty() {
        build.args(["--features", &features.join(",")]);
    }
    run_child(build, "cargo build")?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    let bin = target
        .join("release")
        .join(format!("rampart{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// `flags` with the value of every `--epochs` set to `epochs` (added when there is
/// none); unchanged for `None`.
pub fn with_epochs(mut flags: Vec<String>, epochs: Option<usize>) -> Vec<String> {
    let Some(epochs) = epochs else {
        return flags;
    };
    let mut found = false;
    for i in 1..flags.len() {
        if flags[i - 1] == "--epochs" {
            flags[i] = epochs.to_string();
            found = true;
        }
    }
    if !found {
        flags.extend(["--epochs".to_string(), epochs.to_string()]);
    }
    flags
}

/// Images per batch of the study's AutoAttack runs (and so the unit of its shards).
const AUTOATTACK_BATCH: usize = 256;

/// An evaluation to add as one run or cut into shards ([`add_sharded`]).
struct Sharded<'a> {
    /// What it does, for the progress lines.
    name: String,
    /// The `rampart eval` command, writing into `dir`.
    eval: Command,
    /// Its output folder.
    dir: &'a Path,
    /// Into how many shards to cut it (1: one run).
    shards: usize,
    /// The job it waits for (the model's training), if any.
    after: Option<usize>,
    /// `rampart` (with the study's threads), to merge the shards with; `None` for a
    /// pgd20 run, whose shards the unsharded command joins with `--merge`.
    merge: Option<Command>,
}

/// Adds `s.eval` as one job or, with `s.shards` > 1, as `--shard k/N` runs into
/// `DIR/shard-k`, each a run of its own, and a `rampart merge` of them into `DIR` (a
/// pgd20 run: `s.eval` itself with `--merge DIR/shard-0 …`, on a device, since it
/// reruns the clean pass and the trust checks; docs/scale-out.md); `log(part)` names
/// the log of each (`""`, `.shard-k`, `.merge`). Returns the job after which `DIR`
/// holds the whole run's outputs.
fn add_sharded(jobs: &mut Jobs, s: Sharded<'_>, log: impl Fn(&str) -> PathBuf) -> usize {
    let Sharded {
        name,
        eval,
        dir,
        shards,
        after,
        mut merge,
    } = s;
    if shards <= 1 {
        return jobs.add(name, eval, after, log(""));
    }
    let rerun = merge.is_none();
    let mut merge = match merge.take() {
        Some(mut merge) => {
            merge.arg("merge");
            merge
        }
        None => {
            let mut joined = Command::new(eval.get_program());
            joined.args(eval.get_args());
            joined.arg("--merge");
            joined
        }
    };
    let mut parts = Vec::new();
    for k in 0..shards {
        let part = dir.join(format!("shard-{k}"));
        let mut shard = Command::new(eval.get_program());
        shard.args(eval.get_args().map(|a| {
            if a == dir.as_os_str() {
                part.as_os_str()
            } else {
                a
            }
        }));
        shard.args(["--shard", &format!("{k}/{shards}")]);
        parts.push(jobs.add(
            format!("{name}, shard {k}/{shards}"),
            shard,
            after,
            log(&format!(".shard-{k}")),
        ));
        merge.arg(&part);
    }
    if !rerun {
        merge.arg("--out").arg(dir);
    }
    let merged = jobs.add(
        format!("{name}: merging {shards} shards"),
        merge,
        parts,
        log(".merge"),
    );
    if rerun {
        merged
    } else {
        jobs.on_host(merged)
    }
}

/// Where `rampart eval` runs and what it reads: shared by every evaluation of a study.
struct EvalSetup<'a> {
    rampart: &'a Path,
    threads: Option<usize>,
    dataset: &'a str,
    data_dir: Option<&'a Path>,
}

impl EvalSetup<'_> {
    /// `rampart eval` of `model` (a row's) into `out`; the caller adds the suite, the
    /// limits and a stochastic row's budget, the job runner the device.
    fn command(&self, model: &Path, out: &Path) -> Command {
        let mut eval = rampart_command(self.rampart, self.threads);
        eval.arg("eval")
            .arg("--model")
            .arg(model)
            .args(["--dataset", self.dataset]);
        data_dir_args(&mut eval, self.data_dir);
        eval.arg("--out").arg(out);
        eval
    }
}

/// `--data-dir DIR` when a folder was named; without it `rampart` takes its per-user
/// cache folder.
fn data_dir_args(cmd: &mut Command, data_dir: Option<&Path>) {
    if let Some(dir) = data_dir {
        cmd.arg("--data-dir").arg(dir);
    }
}

fn rampart_command(bin: &Path, threads: Option<usize>) -> Command {
    let mut cmd = Command::new(bin);
    if let Some(n) = threads {
        cmd.args(["--threads", &n.to_string()]);
    }
    cmd
}

/// Runs a child with the terminal (its progress shows), failing on a non-zero exit.
fn run_child(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {what} ({:?})", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status}); its message is above");
    }
    Ok(())
}

/// The job that trains row `key` in this invocation (none when it was finished
/// before and skipped).
fn job_of(rows: &[ModelRow], jobs: &[Option<usize>], key: &str) -> Option<usize> {
    rows.iter()
        .position(|r| r.method == key)
        .and_then(|i| jobs[i])
}

/// `--device` as a list: one device, or several of one kind (`cuda:0,cuda:1`).
fn device_list(device: &str) -> Result<Vec<String>> {
    let devices: Vec<String> = device
        .split(',')
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect();
    let Some(first) = devices.first() else {
        bail!("--device names no device");
    };
    let kind = device_kind(first);
    if let Some(other) = devices.iter().find(|d| device_kind(d) != kind) {
        bail!(
            "--device lists devices of different kinds ({first} and {other}): one kind per study"
        );
    }
    Ok(devices)
}

/// A device without its index: `cuda:1+tf32` → `cuda+tf32`; the kind a study is
/// recorded with, so that it may continue on other devices of that kind.
pub(crate) fn device_kind(device: &str) -> String {
    match device.split_once(':') {
        Some((kind, rest)) => {
            let suffix = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            format!("{kind}{suffix}")
        }
        None => device.to_string(),
    }
}

/// The cores this process may use.
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Runs side by side when `--jobs` is not given: on a CPU one per core (each
/// single-threaded, which uses the cores better than one run on all of them), or as
/// many as the cores hold at `--threads` each; on a GPU one.
fn default_jobs(device: &str, threads: Option<usize>) -> usize {
    if device.starts_with("cuda") {
        1
    } else {
        (available_cores() / threads.unwrap_or(1).max(1)).max(1)
    }
}

/// `cargo xtask` and this process's arguments, shell-quoted, with the study folder
/// written `DIR` and the data folder `DATA` ([`crate::portable::study_command`]).
fn xtask_command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    crate::portable::study_command(&args)
}

/// The data-parallel flags of `row`'s `rampart train`: `--workers N` for N > 1, and
/// `--sync-bn` with it when asked.
fn worker_flags(workers: usize, sync_bn: bool) -> Vec<String> {
    if workers < 2 {
        return Vec::new();
    }
    let mut flags = vec!["--workers".to_string(), workers.to_string()];
    if sync_bn {
        flags.push("--sync-bn".to_string());
    }
    flags
}

#[cfg(test)]
mod tests;
