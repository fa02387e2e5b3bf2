//! The study's `rampart` runs as a graph of jobs, run one at a time with the terminal or
//! several at once, each as soon as the runs it reads have finished.
//!
//! A 2-core CPU gets more from two single-threaded runs side by side than from one run
//! on both cores (measured: two FGSM-RS trainings of WRN-10-1 took 28.4 s side by side
//! with one thread each, 35.9 s one after the other with two), and a many-core machine
//! can train and evaluate several rows at once. Jobs run in the order they were added
//! whenever a slot is free and the jobs they wait for are done, so adding each row's
//! runs in row order keeps the rows in order.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One `rampart` run of the study.
pub struct Job {
    /// What it does, for the progress lines (`at: training`).
    pub name: String,
    /// The command.
    pub command: Command,
    /// The jobs (indices into the list) whose outputs it reads.
    pub after: Vec<usize>,
    /// Where its terminal output goes when jobs run side by side (its own log files
    /// are written either way).
    pub log: PathBuf,
    /// Whether it computes on a device: it is then given `--device D`, D the device of
    /// the slot it runs in.
    pub on_device: bool,
    /// How many slots, on distinct devices, it holds at once: more than one for a
    /// data-parallel training (`rampart train --workers N`), which is then given the
    /// devices' kind (`--device cuda`) and, on GPUs, `CUDA_VISIBLE_DEVICES`.
    pub width: usize,
}

impl Job {
    /// The row the run belongs to: its log file is `<row>.<what>.log` (`compare` for
    /// the study's comparison).
    pub fn row(&self) -> String {
        let stem = self
            .log
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        stem.split('.').next().unwrap_or_default().to_string()
    }
}

/// Where [`run_timed`] records each run's wall time: `OUT/runs.jsonl`, one JSON line
/// per run that ended (`{"run", "row", "seconds", "ok", "finished"}`), appended by
/// every invocation of the study.
pub const RUN_TIMES: &str = "runs.jsonl";

/// Appends `job`'s line to the record `times`, if any (a failed write is reported, not
/// fatal: the study's results do not depend on it).
fn record(times: Option<&Path>, job: &Job, seconds: f64, ok: bool) {
    let Some(path) = times else { return };
    let line = serde_json::json!({
        "run": job.name,
        "row": job.row(),
        "seconds": seconds,
        "ok": ok,
        "finished": crate::timestamp::now_utc(),
    });
    let written = File::options()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!(
            "==> cannot record the time of {} in {}: {e}",
            job.name,
            path.display()
        );
    }
}

/// Adds jobs to a list and hands out their indices.
#[derive(Default)]
pub struct Jobs {
    jobs: Vec<Job>,
    /// The folder every job starts in, naming its files relative to it
    /// ([`crate::portable::in_folder`]); `None`: as added.
    folder: Option<PathBuf>,
}

impl Jobs {
    /// A list whose jobs start in `folder` and name the files inside it relative to it.
    pub fn in_folder(folder: &Path) -> Self {
        Self {
            jobs: Vec::new(),
            folder: Some(folder.to_path_buf()),
        }
    }

    /// Adds `command` named `name`, a run on a device, to run after `after`; returns
    /// its index.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        command: Command,
        after: impl IntoIterator<Item = usize>,
        log: PathBuf,
    ) -> usize {
        let command = match &self.folder {
            Some(folder) => crate::portable::in_folder(&command, folder),
            None => command,
        };
        self.jobs.push(Job {
            name: name.into(),
            command,
            after: after.into_iter().collect(),
            log,
            on_device: true,
            width: 1,
        });
        self.jobs.len() - 1
    }

    /// Makes job `index` hold `width` slots on distinct devices at once (see
    /// [`Job::width`]). Returns `index`.
    pub fn wide(&mut self, index: usize, width: usize) -> usize {
        if let Some(job) = self.jobs.get_mut(index) {
            job.width = width.max(1);
        }
        index
    }

    /// Marks job `index` as a run that computes nothing on a device (a merge, a
    /// comparison): it takes a slot but no `--device`. Returns `index`.
    pub fn on_host(&mut self, index: usize) -> usize {
        if let Some(job) = self.jobs.get_mut(index) {
            job.on_device = false;
        }
        index
    }

    /// The jobs added, in order.
    pub fn as_slice(&self) -> &[Job] {
        &self.jobs
    }

    pub fn into_vec(self) -> Vec<Job> {
        self.jobs
    }
}

/// Runs `jobs` in `slots`, one job per slot at a time, each after the jobs it waits
/// for; a job on a device gets `--device` of its slot (`slots` lists each slot's
/// device, e.g. `cuda:0`, `cuda:1`, or `cpu` twice). With one slot each job has the
/// terminal, so its progress bars show; otherwise its output goes to its log and a
/// line marks its start and end. After a failure no job starts, the running ones
/// finish, and the error names the failed job and its log.
#[cfg(test)]
pub fn run(jobs: Vec<Job>, slots: &[String]) -> Result<()> {
    run_timed(jobs, slots, None)
}

/// [`run`], each run's wall time appended to `times` ([`RUN_TIMES`]) as it ends.
pub fn run_timed(jobs: Vec<Job>, slots: &[String], times: Option<&Path>) -> Result<()> {
    if slots.is_empty() {
        bail!("no slot to run the study's runs in");
    }
    let parallel = slots.len();
    let mut distinct = slots.to_vec();
    distinct.sort();
    distinct.dedup();
    for (i, job) in jobs.iter().enumerate() {
        if let Some(&bad) = job.after.iter().find(|&&j| j >= i) {
            bail!(
                "job `{}` waits for job {bad}, which is not before it (a bug in the study's plan)",
                job.name
            );
        }
        let devices = if slots[0] == "cpu" {
            parallel
        } else {
            distinct.len()
        };
        if job.width > devices {
            bail!(
                "{} needs {} devices at once, but the study has {devices} ({}); list more with \
                 --device (and --jobs)",
                job.name,
                job.width,
                slots.join(",")
            );
        }
    }
    if parallel == 1 {
        return run_in_order(jobs, &slots[0], times);
    }
    let free_slots = |running: &[(usize, Child, Instant, Vec<usize>)], width: usize| {
        let mut picked: Vec<usize> = Vec::new();
        for k in 0..parallel {
            let busy = running.iter().any(|r| r.3.contains(&k));
            let same_device = slots[k] != "cpu" && picked.iter().any(|&p| slots[p] == slots[k]);
            if !busy && !same_device && picked.len() < width {
                picked.push(k);
            }
        }
        (picked.len() == width).then_some(picked)
    };
    let mut jobs = jobs;
    let total = jobs.len();
    let mut started = vec![false; total];
    let mut done = vec![false; total];
    // (job, child, start, slots)
    let mut running: Vec<(usize, Child, Instant, Vec<usize>)> = Vec::new();
    let mut failed: Option<anyhow::Error> = None;
    loop {
        // Start every job whose inputs are ready, in order, while slots are free.
        while failed.is_none() && running.len() < parallel {
            let ready = (0..total).find(|&i| !started[i] && jobs[i].after.iter().all(|&j| done[j]));
            let Some(i) = ready else { break };
            let Some(taken) = free_slots(&running, jobs[i].width) else {
                break;
            };
            started[i] = true;
            let job = &mut jobs[i];
            let devices: Vec<&str> = taken.iter().map(|&k| slots[k].as_str()).collect();
            if job.on_device {
                give_devices(&mut job.command, &devices);
            }
            match start(job) {
                Ok(child) => {
                    let on = if job.on_device {
                        format!(" on {}", devices.join(","))
                    } else {
                        String::new()
                    };
                    eprintln!("==> started {}{on} (log: {})", job.name, job.log.display());
                    running.push((i, child, Instant::now(), taken));
                }
                Err(e) => failed = Some(e),
            }
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut k = 0;
        while k < running.len() {
            let status = running[k]
                .1
                .try_wait()
                .context("cannot wait for a rampart run")?;
            let Some(status) = status else {
                k += 1;
                continue;
            };
            let (i, _, since, _) = running.swap_remove(k);
            let (name, log) = (&jobs[i].name, &jobs[i].log);
            let seconds = since.elapsed().as_secs_f64();
            record(times, &jobs[i], seconds, status.success());
            if status.success() {
                done[i] = true;
                eprintln!("==> finished {name} in {seconds:.0} s");
            } else {
                eprintln!("==> FAILED {name} ({status}) after {seconds:.0} s; its output ends:");
                eprint!("{}", log_tail(log));
                if failed.is_none() {
                    failed = Some(anyhow::anyhow!(
                        "{name} failed ({status}); its output is in {}",
                        log.display()
                    ));
                }
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None if done.iter().all(|&d| d) => Ok(()),
        None => bail!("some of the study's runs never started (a bug in the study's plan)"),
    }
}

/// Tells a run on a device which devices it has: `--device D` for one; for several
/// (a data-parallel training), their kind (`--device cuda`, `cuda+tf32`, `cpu`) and on
/// GPUs `CUDA_VISIBLE_DEVICES` naming them, translated through this process's own
/// `CUDA_VISIBLE_DEVICES` when it has one.
fn give_devices(command: &mut Command, devices: &[&str]) {
    if let [one] = devices {
        command.args(["--device", one]);
        return;
    }
    let kind = crate::reproduce::device_kind(devices[0]);
    command.args(["--device", &kind]);
    if kind.starts_with("cuda") {
        let inherited: Option<Vec<String>> = std::env::var("CUDA_VISIBLE_DEVICES")
            .ok()
            .map(|v| v.split(',').map(|d| d.trim().to_string()).collect());
        let visible: Vec<String> = devices
            .iter()
            .map(|d| {
                let ordinal: usize = d
                    .split_once(':')
                    .map(|(_, rest)| {
                        rest.chars()
                            .take_while(char::is_ascii_digit)
                            .collect::<String>()
                    })
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                inherited
                    .as_ref()
                    .and_then(|list| list.get(ordinal).cloned())
                    .unwrap_or_else(|| ordinal.to_string())
            })
            .collect();
        command.env("CUDA_VISIBLE_DEVICES", visible.join(","));
    }
}

/// One job after the other, each with the terminal, on `device`.
fn run_in_order(jobs: Vec<Job>, device: &str, times: Option<&Path>) -> Result<()> {
    for mut job in jobs {
        if job.on_device {
            job.command.args(["--device", device]);
        }
        eprintln!("==> {}", job.name);
        let since = Instant::now();
        let status = job.command.status().with_context(|| {
            format!(
                "cannot start {} ({:?})",
                job.name,
                job.command.get_program()
            )
        })?;
        record(times, &job, since.elapsed().as_secs_f64(), status.success());
        if !status.success() {
            bail!("{} failed ({status}); its message is above", job.name);
        }
    }
    Ok(())
}

/// Starts `job` with its output appended to its log.
fn start(job: &mut Job) -> Result<Child> {
    if let Some(dir) = job.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log = File::options()
        .create(true)
        .append(true)
        .open(&job.log)
        .with_context(|| format!("cannot open {}", job.log.display()))?;
    let err = log
        .try_clone()
        .with_context(|| format!("cannot open {}", job.log.display()))?;
    job.command
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} ({:?})",
                job.name,
                job.command.get_program()
            )
        })
}

/// The last lines of a log, for a failure.
fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    let mut s = tail.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary folder, its path as text (for scripts), and an empty job list.
    fn fixture() -> Result<(tempfile::TempDir, String, Jobs)> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().display().to_string();
        Ok((dir, d, Jobs::default()))
    }

    fn slots(n: usize) -> Vec<String> {
        vec!["cpu".to_string(); n]
    }

    #[cfg(unix)]
    #[test]
    fn each_slot_gives_its_device_to_the_runs_on_a_device() -> Result<()> {
        let (dir, d, mut jobs) = fixture()?;
        // `sh -c SCRIPT NAME ARGS…`: the appended `--device D` arrive as $1 $2. Two
        // jobs that wait for each other run at once, so they hold both slots.
        for (name, other) in [("a", "b"), ("b", "a")] {
            let mut c = Command::new("sh");
            let script = format!(
                "echo \"$@\" > {d}/{name}.args; {}",
                rendezvous(&d, name, other)
            );
            c.args(["-c", &script, name]);
            jobs.add(name, c, [], dir.path().join(format!("{name}.log")));
        }
        let mut host = Command::new("sh");
        host.args(["-c", &format!("echo \"$@\" > {d}/host"), "host"]);
        let h = jobs.add("host", host, [0, 1], dir.path().join("host.log"));
        jobs.on_host(h);
        run(
            jobs.into_vec(),
            &["cuda:0".to_string(), "cuda:1".to_string()],
        )?;
        let mut seen: Vec<String> = ["a.args", "b.args"]
            .iter()
            .map(|n| std::fs::read_to_string(dir.path().join(n)).map(|s| s.trim().to_string()))
            .collect::<std::io::Result<_>>()?;
        seen.sort();
        assert_eq!(seen, ["--device cuda:0", "--device cuda:1"]);
        assert_eq!(std::fs::read_to_string(dir.path().join("host"))?.trim(), "");
        Ok(())
    }

    /// A data-parallel training holds two GPUs at once: the devices' kind and
    /// `CUDA_VISIBLE_DEVICES`; one that needs more devices than the study has is refused.
    #[cfg(unix)]
    #[test]
    fn a_wide_job_holds_several_devices_at_once() -> Result<()> {
        let (dir, d, mut jobs) = fixture()?;
        let mut c = Command::new("sh");
        let script = format!("echo \"$@ $CUDA_VISIBLE_DEVICES\" > {d}/wide.args");
        c.args(["-c", &script, "wide"]);
        let w = jobs.add("wide", c, [], dir.path().join("wide.log"));
        jobs.wide(w, 2);
        let two = ["cuda:0+tf32".to_string(), "cuda:1+tf32".to_string()];
        run(jobs.into_vec(), &two)?;
        let seen = std::fs::read_to_string(dir.path().join("wide.args"))?;
        let words: Vec<&str> = seen.split_whitespace().collect();
        assert_eq!(&words[..2], ["--device", "cuda+tf32"], "{seen}");
        assert_eq!(words[2].split(',').count(), 2, "{seen}");
        let mut jobs = Jobs::default();
        let w = jobs.add(
            "too wide",
            Command::new("true"),
            [],
            dir.path().join("x.log"),
        );
        jobs.wide(w, 3);
        let err = run(jobs.into_vec(), &two).unwrap_err().to_string();
        assert!(err.contains("needs 3 devices at once"), "{err}");
        Ok(())
    }

    /// Adds the job `name` running `script` after `after`, logged to `logs/name.log`.
    fn add_shell(jobs: &mut Jobs, logs: &Path, name: &str, script: &str, after: &[usize]) -> usize {
        jobs.add(
            name,
            shell(script),
            after.to_vec(),
            logs.join(format!("{name}.log")),
        )
    }

    fn shell(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    /// A script that leaves the file `dir/me`, then succeeds once `dir/other` exists
    /// (within 5 s): two such jobs finish only when they run side by side.
    fn rendezvous(dir: &str, me: &str, other: &str) -> String {
        format!(
            "touch {dir}/{me}; for i in $(seq 100); do [ -e {dir}/{other} ] && exit 0; sleep 0.05; done; exit 1"
        )
    }

    #[cfg(unix)]
    #[test]
    fn jobs_wait_for_their_inputs_and_run_side_by_side() -> Result<()> {
        let (dir, d, mut jobs) = fixture()?;
        // a and b run together (each waits for the other's file to appear, so they
        // finish only side by side); c reads both.
        let a = add_shell(&mut jobs, dir.path(), "a", &rendezvous(&d, "a", "b"), &[]);
        let b = add_shell(&mut jobs, dir.path(), "b", &rendezvous(&d, "b", "a"), &[]);
        let both = format!("[ -e {d}/a ] && [ -e {d}/b ] && echo seen > {d}/c");
        add_shell(&mut jobs, dir.path(), "c", &both, &[a, b]);
        run(jobs.into_vec(), &slots(2))?;
        assert_eq!(std::fs::read_to_string(dir.path().join("c"))?, "seen\n");
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn a_failure_stops_new_jobs_and_names_the_log() -> Result<()> {
        let (dir, d, mut jobs) = fixture()?;
        let logs = dir.path().join("logs");
        let bad = add_shell(&mut jobs, &logs, "bad", "echo the reason >&2; exit 3", &[]);
        add_shell(
            &mut jobs,
            &logs,
            "after",
            &format!("touch {d}/after"),
            &[bad],
        );
        let err = run(jobs.into_vec(), &slots(2)).unwrap_err().to_string();
        assert!(
            err.contains("bad failed") && err.contains("bad.log"),
            "{err}"
        );
        assert!(std::fs::read_to_string(dir.path().join("logs/bad.log"))?.contains("the reason"));
        assert!(!dir.path().join("after").exists());
        // One at a time: the same refusal, with the terminal.
        let mut jobs = Jobs::default();
        jobs.add("bad", shell("exit 3"), [], dir.path().join("x.log"));
        assert!(run(jobs.into_vec(), &slots(1)).is_err());
        Ok(())
    }

    #[test]
    fn a_job_cannot_wait_for_a_later_one() {
        let mut jobs = Jobs::default();
        jobs.add("first", Command::new("true"), [1], PathBuf::from("x.log"));
        jobs.add("second", Command::new("true"), [], PathBuf::from("y.log"));
        let err = run(jobs.into_vec(), &slots(2)).unwrap_err().to_string();
        assert!(err.contains("first"), "{err}");
    }
}
