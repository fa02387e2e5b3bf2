//! `cargo xtask reproduce`: the study presets and the runs that reproduce them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::report::{self, Study};

/// The models one preset trains: one row per training method, keyed by the method's
/// short name in `results.json`.
#[derive(Clone, Copy, Debug)]
pub struct ModelRow {
    /// The method's short name, as `rampart train --method` takes it.
    pub method: &'static str,
    /// How `rampart train` is configured for this row.
    pub training: Training,
    /// Further `rampart train` flags of this row (the method's attack settings, or
    /// overrides of a preset), in order.
    pub extra_flags: &'static [&'static str],
}

/// The training settings of a row.
#[derive(Clone, Copy, Debug)]
pub enum Training {
    /// A `rampart train --preset` (published settings).
    Preset(&'static str),
    /// Explicit settings.
    Recipe(Recipe),
}

/// Explicit `rampart train` settings; the rest are the command's defaults (Nesterov
/// momentum 0.9, weight decay 5e-4, crop + flip).
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    /// `--arch`.
    pub arch: &'static str,
    /// `--epochs`.
    pub epochs: usize,
    /// `--batch-size`.
    pub batch_size: usize,
    /// `--lr` (the peak of a cyclic schedule).
    pub lr: f64,
    /// `--schedule`.
    pub schedule: &'static str,
    /// `--train-limit`: train on the first N images (`None`: all 50,000).
    pub train_limit: Option<usize>,
    /// `--test-limit` of the per-epoch evaluation (the final evaluation always uses
    /// the whole test set).
    pub per_epoch_test_limit: Option<usize>,
}

/// The model of the `smoke` preset: the one setting tuned to its budget, which is
/// 15 minutes of wall time on a 2-core CPU after the build, on real CIFAR-10 with the
/// final evaluation on all 10,000 test images.
pub const SMOKE_NORMAL: Recipe = Recipe {
    arch: "wrn-10-1",
    epochs: 3,
    batch_size: 128,
    lr: 0.2,
    schedule: "cyclic",
    train_limit: None,
    per_epoch_test_limit: Some(1000),
};

/// The smoke preset's adversarial training, from scratch: 1 epoch on the first 25,600
/// training images, batch 64, one-cycle lr 0 → 0.2 → 0, every example adversarial from
/// FGSM with a uniform random start (ε = 8/255, α = 10/255, [`SMOKE_AT_FLAGS`]).
/// Measured on this budget (WRN-10-1, PGD-20 on 1,000 test images): 1 epoch on 25,600
/// or 50,000 images, batch 128 or 64, FGSM-RS or PGD-2, from scratch or fine-tuning the
/// normal model all ended at 21–24 % robust accuracy; from scratch with batch 64 was
/// the best per second.
pub const SMOKE_AT: Recipe = Recipe {
    arch: SMOKE_NORMAL.arch,
    epochs: 1,
    batch_size: 64,
    lr: 0.2,
    schedule: "cyclic",
    train_limit: Some(25_600),
    per_epoch_test_limit: Some(1000),
};

/// `rampart train` flags of the smoke AT row: PGD with one step of 10/255 from a
/// uniform random start at ε = 8/255, i.e. the FGSM-RS step of fast AT.
pub const SMOKE_AT_FLAGS: &[&str] = &["--attack-steps", "1", "--attack-step-size", "10/255"];

/// The smoke preset's CCAT: the images, batch and schedule of [`SMOKE_AT`], half of
/// each batch adversarial from the conf attack shortened to 3 steps of 0.03 (momentum
/// 0.9, backtracking 1.5, uniform-norm start) at ε = 0.03, ρ = 10
/// ([`SMOKE_CCAT_FLAGS`]); per image it costs about as much as the AT row.
pub const SMOKE_CCAT: Recipe = SMOKE_AT;

/// `rampart train` flags of the smoke CCAT row.
pub const SMOKE_CCAT_FLAGS: &[&str] = &["--attack-steps", "3", "--attack-step-size", "0.03"];

/// Test images attacked by PGD-20 in the smoke preset (the first 1,000; the clean
/// figures use all 10,000).
pub const SMOKE_ROBUST_EXAMPLES: usize = 1000;

/// Test images the smoke preset's evaluation protocol (`rampart eval --suite quick`)
/// attacks per model; the last 1,000 test images pick τ and are never attacked.
pub const SMOKE_PROTOCOL_EXAMPLES: usize = 200;

/// The study presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Minutes on a 2-core CPU: a small WRN, a few epochs (default device: cpu).
    Smoke,
    /// One GPU, minutes to an hour: PreActResNet-18, 30 epochs, one-cycle lr
    /// (default device: cuda).
    Fast,
    /// The published schedules: WRN-28-10, 200 epochs (default device: cuda).
    Paper,
}

impl Preset {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Smoke => "smoke",
            Preset::Fast => "fast",
            Preset::Paper => "paper",
        }
    }

    /// What the preset approximates, for the report.
    pub fn about(self) -> &'static str {
        match self {
            Preset::Smoke => {
                "A check that the whole pipeline works on real data within about 15 minutes on \
                 a 2-core CPU: a small Wide-ResNet (WRN-10-1) trained normally for a few epochs \
                 with a one-cycle learning rate; adversarially trained (FGSM with a random \
                 start at 8/255) and CCAT-trained (a 3-step conf attack, half of each batch) \
                 for one epoch on half of the training images; PGD-20 at 8/255 on the first \
                 1,000 test images. It approximates no published model; expect errors far \
                 above the published figures (a normally trained WRN-28-10 reaches about 4 % \
                 clean error, adversarial training about 48 % robust error)."
            }
            Preset::Fast => {
                "The single-GPU configuration (minutes to hours): PreActResNet-18 for 30 \
                 epochs with the one-cycle learning rate of fast adversarial training \
                 (Wong et al. 2020), batch 128, Nesterov momentum 0.9, weight decay 5e-4, \
                 crop + flip; adversarial training with PGD-7 (2/255, ε = 8/255) on the \
                 15-epoch schedule of fast AT; CCAT of ResNet-20 for 30 epochs with a \
                 10-step conf attack. PGD-20 at 8/255 on the whole test set."
            }
            Preset::Paper => {
                "The published schedule: WRN-28-10 for 200 epochs, batch 128, lr 0.1 multiplied \
                 by 0.1 after 50 % and 75 % of the epochs (as the robustness baselines of Rice \
                 et al. 2020; the WRN paper used ×0.2 at 30/60/80 %), Nesterov momentum 0.9, \
                 weight decay 5e-4, crop + flip. Normal training this way reaches about 4 % \
                 clean error on the original CIFAR-10 pixels. Adversarial training: WRN-28-10, \
                 PGD-10 (0.007, ε = 0.03), 150 epochs (REFERENCE: 47.9 % robust error); CCAT: \
                 ResNet-20 with the paper's settings (200 epochs, lr 0.075 ×0.95 per epoch, \
                 batch 100). PGD-20 at 8/255 on the whole test set."
            }
        }
    }

    /// The models trained, in order.
    pub fn models(self) -> &'static [ModelRow] {
        match self {
            Preset::Smoke => &[
                ModelRow {
                    method: "normal",
                    training: Training::Recipe(SMOKE_NORMAL),
                    extra_flags: &[],
                },
                ModelRow {
                    method: "at",
                    training: Training::Recipe(SMOKE_AT),
                    extra_flags: SMOKE_AT_FLAGS,
                },
                ModelRow {
                    method: "ccat",
                    training: Training::Recipe(SMOKE_CCAT),
                    extra_flags: SMOKE_CCAT_FLAGS,
                },
            ],
            Preset::Fast => &[
                ModelRow {
                    method: "normal",
                    training: Training::Preset("normal-preact-resnet18"),
                    extra_flags: &[],
                },
                // PGD-7 adversarial training on the one-cycle schedule of fast AT.
                ModelRow {
                    method: "at",
                    training: Training::Preset("fast-at-preact-resnet18"),
                    extra_flags: &[],
                },
                // CCAT of ResNet-20 for 30 epochs with a 10-step conf attack.
                ModelRow {
                    method: "ccat",
                    training: Training::Preset("ccat-resnet20"),
                    extra_flags: &[
                        "--epochs",
                        "30",
                        "--attack-steps",
                        "10",
                        "--attack-step-size",
                        "0.01",
                    ],
                },
            ],
            Preset::Paper => &[
                ModelRow {
                    method: "normal",
                    training: Training::Preset("normal-wrn28-10"),
                    extra_flags: &[],
                },
                ModelRow {
                    method: "at",
                    training: Training::Preset("at-wrn28-10"),
                    extra_flags: &[],
                },
                ModelRow {
                    method: "ccat",
                    training: Training::Preset("ccat-resnet20"),
                    extra_flags: &[],
                },
            ],
        }
    }

    /// The evaluation protocol run on every model after training (see
    /// docs/evaluation.md) and how many test images it attacks.
    pub fn protocol(self) -> (&'static str, Option<usize>) {
        match self {
            Preset::Smoke => ("quick", Some(SMOKE_PROTOCOL_EXAMPLES)),
            Preset::Fast => ("quick", None),
            Preset::Paper => ("ccat", None),
        }
    }

    /// Test images attacked by PGD-20 (the first N), or all.
    pub fn robust_examples(self) -> Option<usize> {
        match self {
            Preset::Smoke => Some(SMOKE_ROBUST_EXAMPLES),
            Preset::Fast | Preset::Paper => None,
        }
    }

    fn default_device(self) -> &'static str {
        match self {
            Preset::Smoke => "cpu",
            Preset::Fast | Preset::Paper => "cuda",
        }
    }
}

impl ModelRow {
    /// The `rampart train` flags that select this row's settings.
    pub fn train_flags(&self) -> Vec<String> {
        let mut flags = vec!["--method".to_string(), self.method.to_string()];
        match self.training {
            Training::Preset(name) => flags.extend(["--preset".to_string(), name.to_string()]),
            Training::Recipe(r) => {
                flags.extend([
                    "--arch".to_string(),
                    r.arch.to_string(),
                    "--epochs".to_string(),
                    r.epochs.to_string(),
                    "--batch-size".to_string(),
                    r.batch_size.to_string(),
                    "--lr".to_string(),
                    r.lr.to_string(),
                    "--schedule".to_string(),
                    r.schedule.to_string(),
                ]);
                if let Some(n) = r.train_limit {
                    flags.extend(["--train-limit".to_string(), n.to_string()]);
                }
                if let Some(n) = r.per_epoch_test_limit {
                    flags.extend(["--test-limit".to_string(), n.to_string()]);
                }
            }
        }
        flags.extend(self.extra_flags.iter().map(|f| f.to_string()));
        flags
    }

    /// The `rampart eval` flags of this row's evaluation: clean accuracy on the whole
    /// test set and PGD-20 (L∞, ε = 8/255, step 2/255) on the first `robust_examples`.
    pub fn eval_flags(robust_examples: Option<usize>) -> Vec<String> {
        let mut flags = vec!["--suite".to_string(), "pgd20".to_string()];
        if let Some(n) = robust_examples {
            flags.extend(["--attack-limit".to_string(), n.to_string()]);
        }
        flags
    }
}

/// Flags of `cargo xtask reproduce`.
#[derive(Args, Debug, Clone)]
pub struct ReproduceArgs {
    /// Data set: cifar10 (the presets are tuned for it) or cifar100.
    #[arg(value_parser = ["cifar10", "cifar100"])]
    pub dataset: String,

    /// Which study to run.
    #[arg(long, value_enum, default_value = "smoke")]
    pub preset: Preset,

    /// Folder holding the data set (e.g. the unpacked cifar10-jpeg, or the folder with
    /// cifar-10-binary.tar.gz); defaults to $RAMPART_DATA_DIR. See datasets/README.md.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Output folder [default: runs/DATASET-PRESET in the repository].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Skip models already trained and evaluated, and resume interrupted trainings.
    #[arg(long)]
    pub resume: bool,

    /// Worker threads given to `rampart --threads` [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Device given to `rampart --device` (cpu, cuda, cuda:N) [default: cpu for
    /// smoke, cuda for fast and paper]. A CUDA device builds `rampart` with
    /// `--features cuda`.
    #[arg(long)]
    pub device: Option<String>,
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

/// Whether a model was trained to the end and evaluated.
pub fn is_finished(out: &Path, method: &str) -> bool {
    model_dir(out, method).join("summary.json").is_file()
        && model_dir(out, method).join("model.safetensors").is_file()
        && eval_dir(out, method).join("results.json").is_file()
}

/// Runs the study.
pub fn run(args: &ReproduceArgs) -> Result<()> {
    let started_at = crate::timestamp::now_utc();
    let root = workspace_root();
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("RAMPART_DATA_DIR").map(PathBuf::from))
        .filter(|d| !d.as_os_str().is_empty())
        .context(
            "--data-dir is required (or set RAMPART_DATA_DIR): the folder that holds the data \
             set, e.g. the unpacked cifar10-jpeg folder (see datasets/README.md)",
        )?;
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let preset = args.preset;
    let out = args.out.clone().unwrap_or_else(|| {
        root.join("runs")
            .join(format!("{}-{}", args.dataset, preset.name()))
    });
    let device = args
        .device
        .clone()
        .unwrap_or_else(|| preset.default_device().to_string());
    if !args.resume {
        for row in preset.models() {
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
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    let rampart = build_rampart(&root, device.starts_with("cuda"))?;
    let clock = Instant::now();
    let rows = preset.models();
    for (i, row) in rows.iter().enumerate() {
        let step = format!("[{}/{}] {}", i + 1, rows.len(), row.method);
        if args.resume && is_finished(&out, row.method) {
            eprintln!("==> {step}: already trained and evaluated, skipped (--resume)");
            continue;
        }
        let dir = model_dir(&out, row.method);
        let mut train = rampart_command(&rampart, args.threads);
        train.arg("train").args(row.train_flags()).args([
            "--dataset",
            &args.dataset,
            "--seed",
            "0",
            "--device",
            &device,
        ]);
        train
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--out")
            .arg(&dir);
        if args.resume {
            train.arg("--resume");
        }
        eprintln!("==> {step}: training ({})", describe(row));
        run_child(train, "rampart train")?;

        let mut eval = rampart_command(&rampart, args.threads);
        eval.arg("eval")
            .arg("--model")
            .arg(dir.join("model.safetensors"))
            .args(["--dataset", &args.dataset, "--device", &device])
            .args(ModelRow::eval_flags(preset.robust_examples()))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--out")
            .arg(eval_dir(&out, row.method));
        eprintln!(
            "==> {step}: evaluating (clean: the whole test set; PGD-20 L∞ 8/255: {})",
            preset
                .robust_examples()
                .map_or("the whole test set".to_string(), |n| format!(
                    "the first {n} images"
                ))
        );
        run_child(eval, "rampart eval")?;
    }

    // The evaluation protocol on every model, then one comparison (tables + plots).
    let (suite, limit) = preset.protocol();
    let mut compare = rampart_command(&rampart, args.threads);
    compare.arg("compare").arg("--out").arg(&out);
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
        let mut eval = rampart_command(&rampart, args.threads);
        eval.arg("eval")
            .arg("--model")
            .arg(model_dir(&out, row.method).join("model.safetensors"))
            .args([
                "--dataset",
                &args.dataset,
                "--device",
                &device,
                "--suite",
                suite,
            ]);
        if let Some(n) = limit {
            eval.args(["--attack-limit", &n.to_string()]);
        }
        eval.arg("--data-dir").arg(&data_dir).arg("--out").arg(&dir);
        eprintln!(
            "==> [{}/{}] {}: evaluation protocol (--suite {suite})",
            i + 1,
            rows.len(),
            row.method
        );
        run_child(eval, "rampart eval --suite")?;
    }
    eprintln!("==> comparing the models");
    run_child(compare, "rampart compare")?;

    let study = Study {
        dataset: args.dataset.clone(),
        preset: preset.name().to_string(),
        preset_about: preset.about().to_string(),
        created: started_at,
        command: xtask_command_line(),
        wall_seconds: clock.elapsed().as_secs_f64(),
        build_command: build_command_line(device.starts_with("cuda")),
    };
    let models = report::collect(&out, rows)?;
    report::write(&out, &study, &models)?;
    report::add_protocol(&out, rows, suite)?;
    eprintln!("==> report: {}", out.join("report.md").display());
    for m in &models {
        let robust = match (m.robust_accuracy, m.robust_examples) {
            (Some(a), Some(n)) => format!(", PGD-20 robust accuracy {:.2} % on {n}", 100.0 * a),
            _ => String::new(),
        };
        println!(
            "{}: {} {} epochs, clean accuracy {:.2} % (error {:.2} %) on {} test images{robust}, trained in {}",
            m.method,
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

fn build_command_line(cuda: bool) -> String {
    let mut line = "cargo build --release -p rampart-cli".to_string();
    if cuda {
        line.push_str(" --features cuda");
    }
    line
}

/// Builds the `rampart` binary and returns its path.
pub(crate) fn build_rampart(root: &Path, cuda: bool) -> Result<PathBuf> {
    eprintln!("==> {}", build_command_line(cuda));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(root)
        .args(["build", "--release", "-p", "rampart-cli"]);
    if cuda {
        build.args(["--features", "cuda"]);
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

/// `cargo xtask` and this process's arguments, shell-quoted.
fn xtask_command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| report::shell_quote(&a))
        .collect();
    format!("cargo xtask {}", args.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_has_normal_at_and_ccat_rows() {
        for preset in [Preset::Smoke, Preset::Fast, Preset::Paper] {
            let rows = preset.models();
            let names: Vec<&str> = rows.iter().map(|r| r.method).collect();
            assert_eq!(names, ["normal", "at", "ccat"]);
            assert!(!preset.about().is_empty());
        }
    }

    #[test]
    fn smoke_rows_train_on_a_subset_and_attack_a_subset() {
        let at = Preset::Smoke.models()[1].train_flags().join(" ");
        assert!(
            at.starts_with("--method at --arch wrn-10-1 --epochs 1 --batch-size 64"),
            "{at}"
        );
        assert!(at.contains("--train-limit 25600"), "{at}");
        assert!(
            at.ends_with("--attack-steps 1 --attack-step-size 10/255"),
            "{at}"
        );
        let ccat = Preset::Smoke.models()[2].train_flags().join(" ");
        assert!(ccat.starts_with("--method ccat --arch wrn-10-1"), "{ccat}");
        assert!(
            ccat.ends_with("--attack-steps 3 --attack-step-size 0.03"),
            "{ccat}"
        );
        let eval = ModelRow::eval_flags(Preset::Smoke.robust_examples()).join(" ");
        assert_eq!(eval, "--suite pgd20 --attack-limit 1000");
        let eval = ModelRow::eval_flags(Preset::Paper.robust_examples()).join(" ");
        assert_eq!(eval, "--suite pgd20");
        let ccat = Preset::Fast.models()[2].train_flags().join(" ");
        assert_eq!(
            ccat,
            "--method ccat --preset ccat-resnet20 --epochs 30 --attack-steps 10 --attack-step-size 0.01"
        );
    }

    #[test]
    fn rows_become_train_flags() {
        let smoke = Preset::Smoke.models()[0].train_flags().join(" ");
        assert!(smoke.starts_with("--method normal --arch "), "{smoke}");
        assert!(smoke.contains(&format!("--epochs {}", SMOKE_NORMAL.epochs)));
        assert!(smoke.contains(&format!("--schedule {}", SMOKE_NORMAL.schedule)));
        let paper = Preset::Paper.models()[0].train_flags();
        assert_eq!(paper, ["--method", "normal", "--preset", "normal-wrn28-10"]);
    }

    #[test]
    fn finished_means_model_summary_and_results() -> Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(!is_finished(dir.path(), "normal"));
        std::fs::create_dir_all(eval_dir(dir.path(), "normal"))?;
        std::fs::write(
            model_dir(dir.path(), "normal").join("model.safetensors"),
            b"x",
        )?;
        std::fs::write(model_dir(dir.path(), "normal").join("summary.json"), b"{}")?;
        assert!(!is_finished(dir.path(), "normal"));
        std::fs::write(eval_dir(dir.path(), "normal").join("results.json"), b"{}")?;
        assert!(is_finished(dir.path(), "normal"));
        Ok(())
    }
}
