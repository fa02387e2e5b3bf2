//! `cargo xtask reproduce … --fit-minutes M` without `--estimate`: the rows of this
//! invocation trained for as much of their schedules as fits M minutes with their
//! whole evaluation, at the speed measured on this very machine, so that one command
//! of a borrowed GPU runs a row to the end without a speed measured beforehand.
//!
//! 1. Every run of the invocation says what it would do (`rampart … --dry-run`).
//! 2. `rampart bench` times the steps those runs are made of for each architecture,
//!    variant and batch size among them (a training's train-step, pgd-step and
//!    forward at its batch size; pgd-step and forward at an evaluation's), on the
//!    study's device with its environment (`OUT/fit/step-times.jsonl`).
//! 3. Each run's time is estimated as `--estimate` does for one GPU
//!    ([`crate::estimate`]): the evaluations', sweeps' and protocols' time is fixed;
//!    a training's scales with its epochs (its per-epoch evaluation included).
//! 4. Every row trained in this invocation gets the same share f of its schedule's
//!    epochs, the largest with elapsed + evaluations + f × trainings ≤ `--fit-share`
//!    × M (each row at least 1 epoch, at most its schedule): [`share_of_schedules`].
//!    Runs are counted one after the other (as on one GPU); side by side they finish
//!    sooner.
//! 5. The invocation runs with those epochs, `OUT/fit.json` records the fit (the
//!    minutes, the share, each row's epochs of its schedule and the estimated seconds
//!    of its training and evaluation), and the report gives each shortened row the
//!    time its whole schedule would take. A row fitted by an earlier invocation keeps
//!    its epochs when the study resumes (its training continues from its checkpoint).
//!
//! When the evaluations alone, or with one epoch of every training, do not fit, the
//! invocation stops before training, saying what they take.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::estimate::{self, duration, Assumptions, StepTimes};
use crate::jobs::Job;

/// The fit's record in the study folder.
pub const RECORD: &str = "fit.json";

/// Repetitions per step of the calibration's benches (their median is taken).
const BENCH_REPS: usize = 5;

/// A network to time: architecture, variant and batch size.
type Network = (String, String, usize);

/// One row's fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowFit {
    /// The epochs of the row's schedule (its preset's, or --epochs).
    pub schedule_epochs: usize,
    /// The epochs it trains for.
    pub epochs: usize,
    /// Estimated seconds of its whole schedule's training.
    pub schedule_train_seconds: f64,
    /// Estimated seconds of its evaluations (every run of the row but its training).
    pub eval_seconds: f64,
}

/// `OUT/fit.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FitRecord {
    /// The rows fitted so far (by this and earlier invocations).
    pub rows: BTreeMap<String, RowFit>,
    /// Each invocation's fit, in order.
    pub fits: Vec<Invocation>,
}

impl FitRecord {
    /// The epochs a fit gave `row` where they are fewer than its schedule's.
    pub fn shortened(&self, row: &str) -> Option<usize> {
        self.rows
            .get(row)
            .filter(|f| f.epochs < f.schedule_epochs)
            .map(|f| f.epochs)
    }
}

/// One invocation's fit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Invocation {
    pub minutes: f64,
    pub share: f64,
    pub device: String,
    /// Seconds spent before the fit (the calibration's benches included).
    pub calibration_seconds: f64,
    /// The share of their schedules the rows fitted here train for.
    pub schedule_share: f64,
    /// The estimated seconds of the invocation's runs with the fitted epochs.
    pub estimated_seconds: f64,
    /// The rows fitted here.
    pub rows: Vec<String>,
    /// The step times, relative to the study folder.
    pub step_times: String,
    /// What the estimate assumed where it lacked a measurement.
    pub notes: Vec<String>,
}

/// A row to fit: its fixed seconds (evaluations), its training's seconds for its whole
/// schedule, and its schedule's epochs; a row whose epochs are already chosen has them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowCost {
    pub eval_seconds: f64,
    pub train_seconds: f64,
    pub epochs: usize,
    pub fixed: Option<usize>,
}

/// The epochs of each row and the estimated seconds with them: the largest common
/// share f ∈ (0, 1] of the free rows' schedules such that the fixed rows, every
/// evaluation and f of the free rows' training fit `budget` seconds, each free row at
/// ⌊f · epochs⌋ (at least 1). An error says what does not fit.
pub fn share_of_schedules(rows: &[RowCost], budget: f64) -> Result<(f64, Vec<usize>, f64)> {
    let per_epoch = |r: &RowCost| r.train_seconds / r.epochs.max(1) as f64;
    let fixed: f64 = rows
        .iter()
        .map(|r| r.eval_seconds + r.fixed.map_or(0.0, |e| e as f64 * per_epoch(r)))
        .sum();
    let free: f64 = rows
        .iter()
        .filter(|r| r.fixed.is_none())
        .map(|r| r.train_seconds)
        .sum();
    if fixed > budget {
        bail!(
            "the evaluations alone take an estimated {} (and the trainings {} more), over \
             the {} left: run fewer rows per invocation, or allow more minutes",
            duration(fixed),
            duration(free),
            duration(budget.max(0.0))
        );
    }
    let share = if free > 0.0 {
        ((budget - fixed) / free).min(1.0)
    } else {
        1.0
    };
    let epochs: Vec<usize> = rows
        .iter()
        .map(|r| {
            r.fixed.unwrap_or_else(|| {
                // The small tolerance keeps a share that is exactly a whole number of
                // epochs from rounding down below it.
                ((share * r.epochs as f64 + 1e-9).floor() as usize).clamp(1, r.epochs.max(1))
            })
        })
        .collect();
    let total = rows
        .iter()
        .zip(&epochs)
        .map(|(r, &e)| r.eval_seconds + e as f64 * per_epoch(r))
        .sum::<f64>();
    if total > budget + 1e-9 {
        bail!(
            "even one epoch of every training does not fit: an estimated {} with the \
             evaluations ({} of them), over the {} left",
            duration(total),
            duration(fixed),
            duration(budget.max(0.0))
        );
    }
    Ok((share, epochs, total))
}

/// What the fit needs from the study.
pub struct FitSetup<'a> {
    pub out: &'a Path,
    pub rampart: &'a Path,
    pub threads: Option<usize>,
    /// The device the benches run on (the study's first).
    pub bench_device: &'a str,
    /// The study's device kind (the step times' key).
    pub device: &'a str,
    pub minutes: f64,
    pub share: f64,
    /// When the invocation started.
    pub started: Instant,
    /// The rows trained in this invocation, each with its schedule's epochs.
    pub rows: &'a [(&'a str, usize)],
    /// Step times measured before (`rampart bench --json` lines) instead of timing
    /// this machine.
    pub step_times: Option<&'a Path>,
}

/// Measures this machine's step times for the runs of `jobs`, fits the rows' epochs
/// and records the fit; returns each row's epochs.
pub fn fit(setup: &FitSetup<'_>, jobs: &[Job]) -> Result<BTreeMap<String, usize>> {
    let mut record = read_record(setup.out)?;
    let works = estimate::works(jobs)?;
    // The networks and batch sizes to time, each with the steps the estimate takes
    // there: a training's steps (and its attack's passes) at its batch size, every
    // evaluation pass at the evaluation batch size.
    let mut keys: Vec<(Network, Vec<&str>)> = Vec::new();
    let mut need = |w: &estimate::RunWork<'_>, batch: usize, steps: &[&'static str]| {
        let key = (w.arch.clone(), w.variant.clone(), batch.max(1));
        let at = match keys.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                keys.push((key, Vec::new()));
                keys.len() - 1
            }
        };
        for s in steps {
            if !keys[at].1.contains(s) {
                keys[at].1.push(s);
            }
        }
    };
    for w in &works {
        if w.work.command == "train" {
            need(w, w.work.batch_size, &["train-step", "pgd-step", "forward"]);
        }
        need(w, w.work.eval_batch_size, &["pgd-step", "forward"]);
    }
    let dir = setup.out.join("fit");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let times_path = dir.join("step-times.jsonl");
    let mut lines = String::new();
    let mut failed = Vec::new();
    if let Some(path) = setup.step_times {
        lines = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the step times {}", path.display()))?;
        keys.clear();
    }
    let (timed, failures) = time_networks(keys, |(arch, variant, batch), steps| {
        eprintln!(
            "==> fit: timing {arch} ({variant}) at batch {batch} on {}",
            setup.bench_device
        );
        let mut cmd = Command::new(setup.rampart);
        if let Some(n) = setup.threads {
            cmd.args(["--threads", &n.to_string()]);
        }
        cmd.args(["bench", "--arch", arch, "--variant", variant])
            .args(["--batch-size", &batch.to_string()])
            .args(["--reps", &BENCH_REPS.to_string()])
            .args(["--device", setup.bench_device])
            .args(["--steps", &steps.join(","), "--json"]);
        let run = cmd
            .output()
            .with_context(|| format!("cannot start {}", setup.rampart.display()))?;
        Ok(if run.status.success() {
            Ok(String::from_utf8_lossy(&run.stdout).into_owned())
        } else {
            let why = String::from_utf8_lossy(&run.stderr).trim().to_string();
            eprintln!("==> fit: timing {arch} ({variant}) at batch {batch} failed: {why}");
            Err(why)
        })
    })?;
    lines.push_str(&timed);
    failed.extend(failures);
    rampart_fs::write_atomic(&times_path, lines.as_bytes())?;
    let times = StepTimes::parse(&lines);
    let assume = Assumptions {
        bus_bytes_per_second: 100e9,
        accuracy: None,
    };
    let (estimates, mut notes) =
        estimate::estimate_works(works, setup.device, &[1], &times, assume).with_context(|| {
            if failed.is_empty() {
                "the fit's estimate".to_string()
            } else {
                format!("the fit's estimate ({})", failed.join("; "))
            }
        })?;
    notes.extend(failed);
    // Each row's training and the rest of its runs.
    let mut costs: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for e in &estimates {
        let Some(&(row, _)) = setup.rows.iter().find(|(r, _)| *r == e.row) else {
            continue;
        };
        let s = e.seconds.get(&1).copied().unwrap_or(0.0);
        let c = costs.entry(row).or_default();
        if e.work.command == "train" {
            c.1 += s;
        } else {
            c.0 += s;
        }
    }
    let rows: Vec<RowCost> = setup
        .rows
        .iter()
        .map(|&(row, epochs)| {
            let (eval_seconds, train_seconds) = costs.get(row).copied().unwrap_or_default();
            let fixed = record.rows.get(row).map(|f| f.epochs);
            // A training finished by an earlier invocation costs nothing more.
            if crate::reproduce::model_dir(setup.out, row)
                .join("summary.json")
                .is_file()
            {
                return RowCost {
                    eval_seconds,
                    train_seconds: 0.0,
                    epochs,
                    fixed: Some(fixed.unwrap_or(epochs)),
                };
            }
            RowCost {
                eval_seconds,
                train_seconds,
                epochs,
                fixed,
            }
        })
        .collect();
    let elapsed = setup.started.elapsed().as_secs_f64();
    let budget = setup.minutes * 60.0 * setup.share - elapsed;
    let (schedule_share, epochs, total) = share_of_schedules(&rows, budget).with_context(|| {
        format!(
            "--fit-minutes {}: {} of them ({} × --fit-share {}) less the {} already spent \
             timing this machine",
            setup.minutes,
            duration(budget.max(0.0)),
            duration(setup.minutes * 60.0),
            setup.share,
            duration(elapsed)
        )
    })?;
    let mut fitted = Vec::new();
    for ((&(row, schedule_epochs), cost), &e) in setup.rows.iter().zip(&rows).zip(&epochs) {
        eprintln!(
            "==> fit: {row}: {e} of {schedule_epochs} epochs (estimated: training {} of {}, \
             evaluation {})",
            duration(cost.train_seconds * e as f64 / schedule_epochs.max(1) as f64),
            duration(cost.train_seconds),
            duration(cost.eval_seconds)
        );
        if cost.fixed.is_none() {
            record.rows.insert(
                row.to_string(),
                RowFit {
                    schedule_epochs,
                    epochs: e,
                    schedule_train_seconds: cost.train_seconds,
                    eval_seconds: cost.eval_seconds,
                },
            );
            fitted.push(row.to_string());
        }
    }
    eprintln!(
        "==> fit: the runs of this invocation take an estimated {} of the {} left",
        duration(total),
        duration(budget)
    );
    record.fits.push(Invocation {
        minutes: setup.minutes,
        share: setup.share,
        device: setup.device.to_string(),
        calibration_seconds: elapsed,
        schedule_share,
        estimated_seconds: total,
        rows: fitted,
        step_times: "fit/step-times.jsonl".into(),
        notes,
    });
    rampart_fs::write_atomic(
        &setup.out.join(RECORD),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    // Only the shortened rows: a row on its whole schedule keeps its preset's command.
    Ok(setup
        .rows
        .iter()
        .zip(epochs)
        .filter(|(&(_, schedule), e)| *e < schedule)
        .map(|(&(row, _), e)| (row.to_string(), e))
        .collect())
}

/// Runs `bench` for each network and its steps, in order: the JSON lines of those
/// that succeeded, and a message for each that failed. A variant whose timing fails
/// is estimated from the plain network's (the estimate notes it), so the plain network
/// is then timed too where nothing else times it.
fn time_networks(
    mut keys: Vec<(Network, Vec<&str>)>,
    mut bench: impl FnMut(&Network, &[&str]) -> Result<std::result::Result<String, String>>,
) -> Result<(String, Vec<String>)> {
    let (mut lines, mut failed) = (String::new(), Vec::new());
    let mut i = 0;
    while i < keys.len() {
        let (key, steps) = keys[i].clone();
        i += 1;
        match bench(&key, &steps)? {
            Ok(out) => lines.push_str(&out),
            Err(why) => {
                let (arch, variant, batch) = &key;
                failed.push(format!(
                    "timing {arch} ({variant}) at batch {batch} failed: {why}"
                ));
                let plain = (arch.clone(), "plain".to_string(), *batch);
                if variant != "plain" && !keys.iter().any(|(k, _)| *k == plain) {
                    keys.push((plain, steps));
                }
            }
        }
    }
    Ok((lines, failed))
}

/// The study's fit record (empty when it has none).
pub fn read_record(out: &Path) -> Result<FitRecord> {
    let path = out.join(RECORD);
    if !path.exists() {
        return Ok(FitRecord::default());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a fit record", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(eval: f64, train: f64, epochs: usize) -> RowCost {
        RowCost {
            eval_seconds: eval,
            train_seconds: train,
            epochs,
            fixed: None,
        }
    }

    #[test]
    fn every_free_row_gets_the_same_share_of_its_schedule() -> Result<()> {
        // 100 s of evaluation and 600 s of training (15 epochs of 40 s) in 400 s: half
        // the schedule, 7 epochs (280 s).
        let (share, epochs, total) = share_of_schedules(&[row(100.0, 600.0, 15)], 400.0)?;
        assert!((share - 0.5).abs() < 1e-12);
        assert_eq!(epochs, [7]);
        assert!((total - 380.0).abs() < 1e-9);
        // Two rows share the budget: 60 + 40 s fixed, 300 + 100 s of training in 300 s
        // leave 200 s, half of the trainings: 5 of 10 and 15 of 30 epochs.
        let (share, epochs, _) =
            share_of_schedules(&[row(60.0, 300.0, 10), row(40.0, 100.0, 30)], 300.0)?;
        assert!((share - 0.5).abs() < 1e-12);
        assert_eq!(epochs, [5, 15]);
        // Everything fits: the whole schedules.
        let (share, epochs, _) = share_of_schedules(&[row(10.0, 100.0, 15)], 1000.0)?;
        assert_eq!((share, epochs), (1.0, vec![15]));
        // A row fixed by an earlier invocation keeps its epochs and its time counts:
        // 4 epochs of 10 s + 20 s fixed, 100 s left for 200 s of the free row's
        // training: half, 3 of 6 epochs.
        let fixed = RowCost {
            fixed: Some(4),
            ..row(20.0, 150.0, 15)
        };
        let (_, epochs, total) = share_of_schedules(&[fixed, row(0.0, 200.0, 6)], 160.0)?;
        assert_eq!(epochs, [4, 3]);
        assert!((total - 160.0).abs() < 1e-9);
        Ok(())
    }

    /// A variant whose timing fails brings the plain network's timing in, once, and
    /// every failure is reported.
    #[test]
    fn a_failed_variant_is_timed_as_the_plain_network() -> Result<()> {
        let net = |v: &str, b: usize| ("preact-resnet18".to_string(), v.to_string(), b);
        let keys = vec![
            (net("student", 128), vec!["train-step"]),
            (net("student", 256), vec!["forward"]),
            (net("plain", 256), vec!["forward"]),
        ];
        let mut asked = Vec::new();
        let (lines, failed) = time_networks(keys, |k, steps| {
            asked.push((k.clone(), steps.join(",")));
            Ok(if k.1 == "student" {
                Err("no noise here".to_string())
            } else {
                Ok(format!("{} {}\n", k.1, k.2))
            })
        })?;
        assert_eq!(
            asked
                .iter()
                .map(|(k, s)| format!("{} {} {s}", k.1, k.2))
                .collect::<Vec<_>>(),
            [
                "student 128 train-step",
                "student 256 forward",
                "plain 256 forward",
                "plain 128 train-step"
            ]
        );
        assert_eq!(lines, "plain 256\nplain 128\n");
        assert_eq!(failed.len(), 2);
        assert!(failed[0].contains("student) at batch 128 failed: no noise here"));
        Ok(())
    }

    #[test]
    fn what_does_not_fit_is_refused_with_its_time() {
        // The evaluations alone: over the budget.
        let e = share_of_schedules(&[row(500.0, 600.0, 15)], 400.0).unwrap_err();
        assert!(e
            .to_string()
            .contains("the evaluations alone take an estimated 8 min 20 s"));
        // One epoch of 100 s with 350 s of evaluation in 400 s: does not fit.
        let e = share_of_schedules(&[row(350.0, 1500.0, 15)], 400.0).unwrap_err();
        assert!(e.to_string().contains("even one epoch"), "{e}");
        // A negative budget (the calibration took it all).
        assert!(share_of_schedules(&[row(1.0, 1.0, 1)], -5.0).is_err());
    }
}
