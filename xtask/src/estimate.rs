//! `cargo xtask reproduce … --estimate STEP_TIMES`: the wall time of every row of a
//! study on 1, 4, 8 … GPUs (or on the CPU), before running it, from measured step
//! times.
//!
//! Each run of the study (`rampart train`, `eval`, `sweep`) is asked what it would do
//! (`--dry-run`: training steps, train-mode passes, attack and evaluation passes, each
//! counted in images), and every count is multiplied by the measured time per image of
//! that kind of pass (`rampart bench`'s `train-step`, `pgd-step` and `forward`) for the
//! run's architecture, variant, device and batch size. With N GPUs:
//!
//! - a training run is data-parallel (`rampart train --workers N`): each GPU does 1/N
//!   of every pass at the per-GPU batch B/N (its time per image at B/N), and each step
//!   all-reduces the gradients (2(N − 1)/N · 4 bytes per parameter at the assumed bus
//!   bandwidth); the per-epoch evaluation runs on worker 0 alone;
//! - an evaluation is cut into N shards (`--shards N`), each on its own GPU: 1/N of
//!   its passes; a sweep is not sharded (its values run one after the other).
//!
//! What it leaves out, so that measured times run above it: loading data and the
//! model, the host work between passes (the attacks' per-example updates), the last,
//! smaller batch of an epoch, and a row's runs waiting for each other. What makes it
//! high: the attacks' counts are upper bounds (early stopping, AutoAttack's later
//! stages on the points left robust). Checked against a study's measured run times in
//! docs/scale-out.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jobs::Job;

/// Network passes in images, as `rampart … --dry-run` counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Passes {
    pub gradient: f64,
    pub forward: f64,
}

/// One run's work, as `rampart … --dry-run` prints it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct Work {
    pub command: String,
    pub arch: Option<String>,
    pub variant: Option<String>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub parameters: usize,
    pub steps: usize,
    pub train: f64,
    pub attack: Passes,
    pub eval: Passes,
    /// Training: epochs of the run.
    #[serde(default)]
    pub epochs: usize,
    /// The part of `eval` that runs only on the correctly classified images.
    #[serde(default)]
    pub eval_on_correct: Passes,
    /// The part of `eval` that runs only on the images still robust.
    #[serde(default)]
    pub eval_on_robust: Passes,
}

/// The per-image times of one (step, architecture, variant, device): batch size →
/// seconds per image, the median of the measurements.
type Curve = BTreeMap<usize, f64>;

/// (step, architecture, variant, device).
type Key = (String, String, String, String);

/// Measured step times: `rampart bench --json` lines (PyTorch's lines of the GPU
/// suite's `bench.jsonl`, and everything that is not a step line, are skipped).
#[derive(Debug, Default)]
pub struct StepTimes {
    curves: BTreeMap<Key, Curve>,
}

impl StepTimes {
    /// Reads the JSON lines of `path`.
    pub fn read(path: &Path) -> Result<StepTimes> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the step times {}", path.display()))?;
        let times = Self::parse(&text);
        if times.curves.is_empty() {
            bail!(
                "{} holds no step times: expected the JSON lines of `rampart bench --json`",
                path.display()
            );
        }
        Ok(times)
    }

    /// The step lines of `text`.
    pub fn parse(text: &str) -> StepTimes {
        let mut samples: BTreeMap<Key, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v.get("framework").is_some_and(|f| f != "rampart") {
                continue;
            }
            let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
            let (Some(step), Some(arch), Some(device)) =
                (text("step"), text("arch"), text("device"))
            else {
                continue;
            };
            let variant = text("variant").unwrap_or_else(|| "plain".into());
            let (Some(batch), Some(seconds)) = (
                v.get("batch_size").and_then(Value::as_u64),
                v.get("seconds_per_batch").and_then(Value::as_f64),
            ) else {
                continue;
            };
            if batch == 0 || !(seconds.is_finite() && seconds > 0.0) {
                continue;
            }
            samples
                .entry((step, arch, variant, device))
                .or_default()
                .entry(batch as usize)
                .or_default()
                .push(seconds / batch as f64);
        }
        let curves = samples
            .into_iter()
            .map(|(key, batches)| {
                let curve = batches
                    .into_iter()
                    .map(|(b, mut v)| {
                        v.sort_by(f64::total_cmp);
                        (b, v[v.len() / 2])
                    })
                    .collect();
                (key, curve)
            })
            .collect();
        StepTimes { curves }
    }

    /// Seconds per image of `step` for the architecture, variant and device at batch
    /// `batch`. A batch's time is modelled as a fixed cost plus a cost per image
    /// (T(b) = α + β·b, what launch overhead and arithmetic make of a GPU step): the
    /// measurement at that batch; else T interpolated linearly between the nearest
    /// measured batches; else extrapolated along the line through the two nearest
    /// (noted), or, with a single measured batch or a line that is not a cost (α < 0 or
    /// β ≤ 0), that batch's time per image (noted). A variant that was not timed is
    /// timed as `plain` (noted).
    pub fn per_image(
        &self,
        step: &str,
        arch: &str,
        variant: &str,
        device: &str,
        batch: usize,
        notes: &mut Vec<String>,
    ) -> Result<f64> {
        let key = |v: &str| {
            (
                step.to_string(),
                arch.to_string(),
                v.to_string(),
                device.to_string(),
            )
        };
        let curve = match self.curves.get(&key(variant)) {
            Some(c) => c,
            None => {
                let plain = self.curves.get(&key("plain")).with_context(|| {
                    format!("no `{step}` time for {arch} on {device} among the step times")
                })?;
                note(
                    notes,
                    format!("{arch} {variant}: timed as plain (not measured)"),
                );
                plain
            }
        };
        let batch_seconds = |(&b, &t): (&usize, &f64)| (b as f64, t * b as f64);
        let b = batch as f64;
        if let Some(&t) = curve.get(&batch) {
            return Ok(t);
        }
        let below: Vec<_> = curve
            .range(..batch)
            .rev()
            .take(2)
            .map(batch_seconds)
            .collect();
        let above: Vec<_> = curve.range(batch..).take(2).map(batch_seconds).collect();
        let line = match (below.first(), above.first()) {
            (Some(&p0), Some(&p1)) => {
                let (t0, t1) = (p0.1, p1.1);
                let w = (b - p0.0) / (p1.0 - p0.0);
                return Ok((t0 + w * (t1 - t0)) / b);
            }
            (None, Some(_)) => above.get(1).map(|&p1| (above[0], p1)),
            (Some(_), None) => below.get(1).map(|&p0| (p0, below[0])),
            (None, None) => bail!("no `{step}` time for {arch} on {device}"),
        };
        let nearest = above
            .first()
            .or(below.first())
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no `{step}` time for {arch} on {device}"))?;
        if let Some(((b0, t0), (b1, t1))) = line {
            let beta = (t1 - t0) / (b1 - b0);
            let alpha = t0 - beta * b0;
            if beta > 0.0 && alpha >= 0.0 {
                note(
                    notes,
                    format!(
                        "{arch} {variant} {step} at batch {batch}: extrapolated from batches \
                         {b0} and {b1}"
                    ),
                );
                return Ok((alpha + beta * b) / b);
            }
        }
        note(
            notes,
            format!(
                "{arch} {variant} {step} at batch {batch}: the time per image at batch {}",
                nearest.0
            ),
        );
        Ok(nearest.1 / nearest.0)
    }
}

fn note(notes: &mut Vec<String>, text: String) {
    if !notes.contains(&text) {
        notes.push(text);
    }
}

/// How the estimate models several GPUs.
#[derive(Clone, Copy, Debug)]
pub struct Assumptions {
    /// All-reduce bus bandwidth between GPUs, bytes per second.
    pub bus_bytes_per_second: f64,
    /// The models' clean and robust accuracy, for the parts of an evaluation that run
    /// only on the correctly classified or the robust images (AutoAttack's stages);
    /// `None`: every image (the upper bound).
    pub accuracy: Option<(f64, f64)>,
}

/// A run of the study and its work.
#[derive(Clone, Debug, Serialize)]
pub struct JobEstimate {
    /// The run's name, as the study prints it.
    pub name: String,
    /// The row (the method's key).
    pub row: String,
    /// What the run would do.
    pub work: Work,
    /// Estimated seconds with each number of GPUs.
    pub seconds: BTreeMap<usize, f64>,
}

/// `job`'s command with `--dry-run`: its work, or `None` for a run that is not a
/// training, evaluation or sweep (comparisons, merges).
fn dry_run(job: &Job) -> Result<Option<Work>> {
    let args: Vec<_> = job.command.get_args().collect();
    // The subcommand is the first of these words (global flags may come before it).
    let sub = args.iter().filter_map(|a| a.to_str()).find(|a| {
        matches!(
            *a,
            "train" | "eval" | "sweep" | "attack" | "compare" | "merge"
        )
    });
    if !matches!(sub, Some("train" | "eval" | "sweep")) {
        return Ok(None);
    }
    let mut cmd = Command::new(job.command.get_program());
    cmd.args(&args).arg("--dry-run");
    if let Some(dir) = job.command.get_current_dir() {
        cmd.current_dir(dir);
    }
    for (k, v) in job.command.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", job.command.get_program()))?;
    if !out.status.success() {
        bail!(
            "`{}` --dry-run failed: {}",
            job.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("{\"dry_run\""))
        .with_context(|| format!("`{}` --dry-run printed no work", job.name))?;
    let v: Value = serde_json::from_str(line)?;
    Ok(Some(serde_json::from_value(v["dry_run"].clone())?))
}

/// What a run's passes are timed as: its network on a device.
#[derive(Clone, Copy, Debug)]
pub struct Network<'a> {
    pub arch: &'a str,
    pub variant: &'a str,
    pub device: &'a str,
}

/// The seconds of one run's `work` with `gpus` GPUs of the network's device.
pub fn seconds(
    work: &Work,
    on: Network<'_>,
    gpus: usize,
    times: &StepTimes,
    assume: Assumptions,
    notes: &mut Vec<String>,
) -> Result<f64> {
    let n = gpus.max(1) as f64;
    let t = |step: &str, batch: usize, images: f64, notes: &mut Vec<String>| -> Result<f64> {
        if images == 0.0 {
            return Ok(0.0);
        }
        Ok(images * times.per_image(step, on.arch, on.variant, on.device, batch.max(1), notes)?)
    };
    let timed = |p: Passes, notes: &mut Vec<String>| -> Result<f64> {
        Ok(t("pgd-step", work.eval_batch_size, p.gradient, notes)?
            + t("forward", work.eval_batch_size, p.forward, notes)?)
    };
    let mut eval = timed(work.eval, notes)?;
    if let Some((clean, robust)) = assume.accuracy {
        // Those parts run on a share of the images only.
        eval -= (1.0 - clean) * timed(work.eval_on_correct, notes)?
            + (1.0 - robust) * timed(work.eval_on_robust, notes)?;
    }
    if work.command != "train" {
        // Evaluations are cut into shards, one per GPU; sweeps run value by value.
        let share = if work.command == "eval" { n } else { 1.0 };
        return Ok(eval / share);
    }
    let per_gpu = (work.batch_size / gpus.max(1)).max(1);
    let training = t("train-step", per_gpu, work.train / n, notes)?
        + t("pgd-step", per_gpu, work.attack.gradient / n, notes)?
        + t("forward", per_gpu, work.attack.forward / n, notes)?;
    let all_reduce = if gpus > 1 {
        let bytes = 4.0 * work.parameters as f64 * 2.0 * (n - 1.0) / n;
        work.steps as f64 * bytes / assume.bus_bytes_per_second
    } else {
        0.0
    };
    Ok(training + all_reduce + eval)
}

/// The estimate of every run of `jobs` with each number of `gpus`.
pub fn estimate(
    jobs: &[Job],
    device: &str,
    gpus: &[usize],
    times: &StepTimes,
    assume: Assumptions,
) -> Result<(Vec<JobEstimate>, Vec<String>)> {
    estimate_works(works(jobs)?, device, gpus, times, assume)
}

/// A run of the study, its work and the network its passes run on.
pub struct RunWork<'a> {
    pub job: &'a Job,
    pub work: Work,
    /// Its row (the method's key).
    pub row: String,
    pub arch: String,
    pub variant: String,
}

/// The work of every training, evaluation and sweep among `jobs` (`--dry-run`), each
/// with its network: a run on a model that does not exist yet takes the architecture
/// of its row's training.
pub fn works(jobs: &[Job]) -> Result<Vec<RunWork<'_>>> {
    let mut works = Vec::new();
    for job in jobs {
        if let Some(work) = dry_run(job)? {
            works.push((job, work));
        }
    }
    let trained: BTreeMap<String, (String, String)> = works
        .iter()
        .filter(|(_, w)| w.command == "train")
        .filter_map(|(j, w)| {
            Some((
                j.row(),
                (w.arch.clone()?, w.variant.clone().unwrap_or("plain".into())),
            ))
        })
        .collect();
    works
        .into_iter()
        .map(|(job, work)| {
            let row = job.row();
            let (arch, variant) = match (&work.arch, trained.get(&row)) {
                (Some(a), _) => (a.clone(), work.variant.clone().unwrap_or("plain".into())),
                (None, Some((a, v))) => (a.clone(), v.clone()),
                (None, None) => {
                    bail!("`{}`: the architecture of its model is unknown", job.name)
                }
            };
            Ok(RunWork {
                job,
                work,
                row,
                arch,
                variant,
            })
        })
        .collect()
}

/// [`estimate`] of runs whose work is known.
pub fn estimate_works(
    works: Vec<RunWork<'_>>,
    device: &str,
    gpus: &[usize],
    times: &StepTimes,
    assume: Assumptions,
) -> Result<(Vec<JobEstimate>, Vec<String>)> {
    let mut notes = Vec::new();
    let mut out = Vec::new();
    for RunWork {
        job,
        work,
        row,
        arch,
        variant,
    } in works
    {
        let mut seconds_by = BTreeMap::new();
        for &g in gpus {
            let on = Network {
                arch: &arch,
                variant: &variant,
                device,
            };
            let s = seconds(&work, on, g, times, assume, &mut notes)?;
            seconds_by.insert(g, s);
        }
        out.push(JobEstimate {
            name: job.name.clone(),
            row,
            work,
            seconds: seconds_by,
        });
    }
    Ok((out, notes))
}

/// The most epochs (at most `epochs`) of a training that took `train_seconds` for
/// `epochs` epochs that fit, with an evaluation of `eval_seconds`, into
/// `budget_seconds`; 0 when not even the evaluation fits.
pub fn fit_epochs(train_seconds: f64, epochs: usize, eval_seconds: f64, budget: f64) -> usize {
    if epochs == 0 || train_seconds <= 0.0 {
        return epochs;
    }
    let per_epoch = train_seconds / epochs as f64;
    let left = budget - eval_seconds;
    if left <= 0.0 {
        return 0;
    }
    ((left / per_epoch).floor() as usize).min(epochs)
}

/// Seconds as `1 h 02 min`, `3 min 05 s` or `41 s`.
pub fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ if s < 48 * 3600 => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
        _ => format!("{:.1} days", s as f64 / 86_400.0),
    }
}

/// The Markdown report: per row, training and evaluation with each number of GPUs;
/// then every run with one GPU.
pub fn markdown(
    estimates: &[JobEstimate],
    gpus: &[usize],
    device: &str,
    source: &str,
    assume: Assumptions,
    fit_minutes: Option<f64>,
    notes: &[String],
) -> String {
    let mut rows: Vec<String> = Vec::new();
    for e in estimates {
        if !rows.contains(&e.row) {
            rows.push(e.row.clone());
        }
    }
    let sum = |row: &str, train: bool, g: usize| -> f64 {
        estimates
            .iter()
            .filter(|e| e.row == row && (e.work.command == "train") == train)
            .map(|e| e.seconds[&g])
            .sum()
    };
    let mut md = format!(
        "# Wall-time estimate\n\nFrom the step times in `{source}` on `{device}`; each run's \
         work from `rampart … --dry-run`. With N GPUs a training is data-parallel over N \
         (all-reduce at {:.0} GB/s) and an evaluation is cut into N shards; a sweep runs on \
         one. Not counted: loading, the host work between passes, runs waiting for each \
         other (see docs/scale-out.md).\n\n| row |",
        assume.bus_bytes_per_second / 1e9
    );
    let unit = if device.starts_with("cuda") {
        "GPU"
    } else {
        "CPU"
    };
    for &g in gpus {
        md += &format!(" train, {g} {unit} | eval, {g} {unit} | total, {g} {unit} |");
    }
    md += "\n|---|";
    md += &"---:|".repeat(3 * gpus.len());
    md += "\n";
    let mut totals = vec![0.0; gpus.len()];
    for row in &rows {
        md += &format!("| {row} |");
        for (i, &g) in gpus.iter().enumerate() {
            let (t, e) = (sum(row, true, g), sum(row, false, g));
            totals[i] += t + e;
            md += &format!(" {} | {} | {} |", duration(t), duration(e), duration(t + e));
        }
        md += "\n";
    }
    md += "| **all rows, one after the other** |";
    for total in &totals {
        md += &format!(" | | **{}** |", duration(*total));
    }
    let first = gpus.first().copied().unwrap_or(1);
    if let Some(minutes) = fit_minutes {
        md += &format!(
            "\n\n## Rows within {minutes} minutes on {first} {unit}\n\nThe most epochs of \
             each row's schedule whose training, with the row's whole evaluation, fits \
             (`cargo xtask reproduce --rows ROW --epochs N`); training time scales with the \
             epochs, the evaluation does not.\n\n| row | epochs | total | epochs that fit \
             | total with them |\n|---|---:|---:|---:|---:|\n"
        );
        for row in &rows {
            let epochs: usize = estimates
                .iter()
                .filter(|e| &e.row == row && e.work.command == "train")
                .map(|e| e.work.epochs)
                .max()
                .unwrap_or(0);
            let (t, e) = (sum(row, true, first), sum(row, false, first));
            let fit = fit_epochs(t, epochs, e, minutes * 60.0);
            let with_fit = if epochs > 0 {
                e + t * fit as f64 / epochs as f64
            } else {
                e
            };
            let cell = match fit {
                0 if e >= minutes * 60.0 => {
                    format!("none (the evaluation alone takes {})", duration(e))
                }
                0 => format!(
                    "none (an epoch takes {}, {} are left after the evaluation)",
                    duration(t / epochs.max(1) as f64),
                    duration(minutes * 60.0 - e)
                ),
                n => n.to_string(),
            };
            md += &format!(
                "| {row} | {epochs} | {} | {cell} | {} |\n",
                duration(t + e),
                duration(with_fit)
            );
        }
    }
    md += &format!(
        "\n\n## Every run ({first} {unit})\n\n| run | gradient passes | forward passes | train passes | estimate |\n|---|---:|---:|---:|---:|\n"
    );
    for e in estimates {
        let w = &e.work;
        md += &format!(
            "| {} | {:.3e} | {:.3e} | {:.3e} | {} |\n",
            e.name,
            w.eval.gradient + w.attack.gradient,
            w.eval.forward + w.attack.forward,
            w.train,
            duration(e.seconds[&first])
        );
    }
    md += &match assume.accuracy {
        None => "\nAutoAttack's runs are upper bounds: the count runs every stage on every \
                 image, while the ensemble attacks only the correctly classified images and \
                 each later stage only those still robust (`--assume-accuracy CLEAN,ROBUST` \
                 times them on those shares).\n"
            .to_string(),
        Some((c, r)) => format!(
            "\nAutoAttack's first stage is timed on {:.0} % of its images (the assumed clean \
             accuracy) and its later stages on {:.0} % (the assumed robust accuracy).\n",
            100.0 * c,
            100.0 * r
        ),
    };
    if !notes.is_empty() {
        md += "\nNotes:\n";
        for n in notes {
            md += &format!("- {n}\n");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: Network<'static> = Network {
        arch: "a",
        variant: "plain",
        device: "cuda",
    };

    const LINES: &str = r#"
{"run": {"framework": "rampart"}}
{"step":"train-step","arch":"a","variant":"plain","batch_size":100,"device":"cuda","seconds_per_batch":1.0,"images_per_second":100.0}
{"step":"train-step","arch":"a","variant":"plain","batch_size":100,"device":"cuda","seconds_per_batch":3.0,"images_per_second":33.3}
{"step":"train-step","arch":"a","variant":"plain","batch_size":100,"device":"cuda","seconds_per_batch":2.0,"images_per_second":50.0}
{"step":"train-step","arch":"a","variant":"plain","batch_size":400,"device":"cuda","seconds_per_batch":4.0,"images_per_second":100.0}
{"framework":"pytorch","step":"train-step","arch":"a","variant":"plain","batch_size":100,"device":"cuda","seconds_per_batch":0.1}
{"step":"pgd-step","arch":"a","variant":"plain","batch_size":100,"device":"cuda","seconds_per_batch":0.5}
{"step":"forward","arch":"a","variant":"plain","batch_size":100,"device":"cuda","seconds_per_batch":0.2}
"#;

    #[test]
    fn step_times_take_the_median_and_interpolate_in_log_batch() -> Result<()> {
        let t = StepTimes::parse(LINES);
        let mut notes = Vec::new();
        // Median of 1, 3, 2 s for 100 images; PyTorch's line is skipped.
        assert_eq!(
            t.per_image("train-step", "a", "plain", "cuda", 100, &mut notes)?,
            0.02
        );
        // Batch times 2 s at 100 and 4 s at 400: at 200, 2 + 2·(100/300) s.
        let mid = t.per_image("train-step", "a", "plain", "cuda", 200, &mut notes)?;
        assert!((mid - (2.0 + 2.0 / 3.0) / 200.0).abs() < 1e-12, "{mid}");
        assert!(notes.is_empty());
        // Below: along T(b) = 4/3 + b/150 s, so 1.5 s at 25 (noted); an unmeasured
        // variant as plain (noted).
        let low = t.per_image("train-step", "a", "student", "cuda", 25, &mut notes)?;
        assert!((low - 1.5 / 25.0).abs() < 1e-12, "{low}");
        assert_eq!(notes.len(), 2, "{notes:?}");
        // One measured batch: its time per image (noted).
        assert_eq!(
            t.per_image("pgd-step", "a", "plain", "cuda", 50, &mut notes)?,
            0.005
        );
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(t
            .per_image("train-step", "b", "plain", "cuda", 100, &mut notes)
            .is_err());
        assert!(t
            .per_image("train-step", "a", "plain", "cpu", 100, &mut notes)
            .is_err());
        Ok(())
    }

    /// Worked by hand: 10 steps of 100 images, 2 train passes and 4 gradient passes
    /// per image, 1,000 evaluation forward passes at batch 100, 1e6 parameters.
    #[test]
    fn a_run_is_timed_from_its_passes_on_one_and_several_gpus() -> Result<()> {
        let t = StepTimes::parse(LINES);
        let work = Work {
            command: "train".into(),
            arch: Some("a".into()),
            variant: Some("plain".into()),
            batch_size: 100,
            eval_batch_size: 100,
            parameters: 1_000_000,
            steps: 10,
            train: 2000.0,
            attack: Passes {
                gradient: 4000.0,
                forward: 0.0,
            },
            eval: Passes {
                gradient: 0.0,
                forward: 1000.0,
            },
            epochs: 1,
            eval_on_correct: Passes::default(),
            eval_on_robust: Passes {
                gradient: 0.0,
                forward: 500.0,
            },
        };
        let assume = Assumptions {
            bus_bytes_per_second: 1e9,
            accuracy: None,
        };
        let mut notes = Vec::new();
        let one = seconds(&work, ON, 1, &t, assume, &mut notes)?;
        // 2000 × 0.02 + 4000 × 0.005 + 1000 × 0.002.
        assert!((one - (40.0 + 20.0 + 2.0)).abs() < 1e-9, "{one}");
        // Two GPUs: half the passes at batch 50 (train step 5/3 s per batch on the
        // line through 100 and 400, the PGD step at 100's time per image, noted), and
        // 10 all-reduces of 2·(1/2)·4e6 bytes at 1 GB/s; the evaluation on one GPU.
        let two = seconds(&work, ON, 2, &t, assume, &mut notes)?;
        let want = 1000.0 * (5.0 / 3.0) / 50.0 + 10.0 + 0.04 + 2.0;
        assert!((two - want).abs() < 1e-9, "{two} vs {want}");
        assert!(!notes.is_empty());
        // An evaluation is sharded, a sweep is not.
        let eval = Work {
            command: "eval".into(),
            ..work.clone()
        };
        let sweep = Work {
            command: "sweep".into(),
            ..work
        };
        assert!((seconds(&eval, ON, 4, &t, assume, &mut notes)? - 0.5).abs() < 1e-9);
        assert!((seconds(&sweep, ON, 4, &t, assume, &mut notes)? - 2.0).abs() < 1e-9);
        // Half the evaluation runs on the robust images only: with 40 % robust, 60 %
        // of that half is not run.
        let assumed = Assumptions {
            accuracy: Some((0.9, 0.4)),
            ..assume
        };
        let cut = seconds(&eval, ON, 1, &t, assumed, &mut notes)?;
        assert!((cut - (2.0 - 0.6 * 1.0)).abs() < 1e-9, "{cut}");
        Ok(())
    }

    #[test]
    fn the_epochs_that_fit_a_budget() {
        // 15 epochs in 600 s (40 s each), evaluation 100 s: 380 s leave 9 epochs.
        assert_eq!(fit_epochs(600.0, 15, 100.0, 480.0), 9);
        // Everything fits: the schedule itself.
        assert_eq!(fit_epochs(60.0, 15, 100.0, 480.0), 15);
        // The evaluation alone is over the budget.
        assert_eq!(fit_epochs(600.0, 15, 500.0, 480.0), 0);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(41.4), "41 s");
        assert_eq!(duration(185.0), "3 min 05 s");
        assert_eq!(duration(3720.0), "1 h 02 min");
        assert_eq!(duration(3.0 * 86_400.0), "3.0 days");
    }
}
