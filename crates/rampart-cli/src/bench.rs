//! `rampart bench`: throughput of the three steps every experiment is made of.
//!
//! On a fixed network and batch (default WRN-16-4, batch 128, f32) it times
//! * `forward`: logits in eval mode;
//! * `pgd-step`: forward + gradient of the cross-entropy with respect to the input,
//!   eval mode (one attack iteration, as `rampart-attacks` computes it);
//! * `train-step`: forward in train mode + backward + one SGD (Nesterov) update;
//! * `attack-linf`, `attack-l2`, `attack-l1`, `attack-l0`: a 2-step PGD of
//!   `rampart-attacks` (momentum 0.9, backtracking) at ε 8/255, 0.5, 12, 10, reported
//!   in image·steps/s (the `images_per_second` field counts image·steps);
//! * `apgd-linf`, `apgd-l2`: a 10-step APGD-CE at ε 8/255 and 0.5 on labels that are
//!   the network's own predictions (every example attacked until fooled), reported
//!   per image·step taken (APGD stops attacking an example once it is fooled);
//! * `fast-at-step`, `pgd-at-step`: a whole training step of a method, the trainer's
//!   own (`rampart_defenses::train_step`: the training attack, the loss, its sums
//!   left on the device, backward, SGD), with the method and SGD settings of a preset:
//!   fast AT as `fast-at-preact-resnet18` trains (FGSM from a uniform start, ε 8/255,
//!   step 10/255, the stepped point) and PGD-10 AT as `at-wrn28-10` does. An epoch's
//!   wall time (`history.jsonl`) over its steps × this step time says how much the
//!   input pipeline and the reads between steps add. On a GPU with the trainer's CUDA
//!   graphs asked for (`RAMPART_CUDA_TRAIN_GRAPHS`), the step replays its graph as the
//!   trainer would (the warm-up steps warm and capture it) and `path` ends in
//!   `+graphs`; so does `train-step`, as normal training's step (its batch copied
//!   into the graph's buffers and its loss summed on the device, as the trainer
//!   does), for plain and student models.
//!
//! Each is run `--warmup` times untimed, then `--reps` times; the median wall time
//! gives images/s. Results are printed as a table and, with `--json`, as one JSON
//! object per line. Speed is measured here, never in tests.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, ModuleT, Tensor};
use clap::Args;
use rampart_attacks::{input_gradient, Apgd, Attack, Bounds, Norm, Objective, Pgd, StepSize};
use rampart_defenses::{
    method_rng, train_step, MethodConfig, Overrides, Sgd, SgdConfig, StepSums, TrainBatch,
    TrainGraph, TrainingMethod,
};
use rampart_models::{Arch, Classifier, ModelSpec, NoiseSpec, OatSpec};

use crate::common::DeviceArg;
use crate::preset::PresetName;
use serde::Serialize;

/// Flags of `rampart bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Architecture to time (wrn-D-K, resnet20, preact-resnet18).
    #[arg(long, default_value = "wrn-16-4")]
    arch: String,
    /// The network's variant: plain, student (noise after every BatchNorm, α = 0.1)
    /// or oat (FiLM and dual BatchNorm, the published λ values; evaluated at λ = 1,
    /// trained on a batch whose examples cycle through the six λ values).
    #[arg(long, default_value = "plain")]
    variant: Variant,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed repetitions per step (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Untimed repetitions before timing (allocator and caches warm up).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Which steps to time, comma-separated: forward, pgd-step, train-step,
    /// attack-linf, attack-l2, attack-l1, attack-l0 (a 2-step PGD with momentum and
    /// backtracking), pgd20 (the evaluation's PGD-20, L∞ 8/255), apgd-linf, apgd-l2
    /// (the attacks: image·steps/s), fast-at-step, pgd-at-step (a whole training
    /// step of fast AT as `fast-at-preact-resnet18` trains, or of PGD-10 AT as
    /// `at-wrn28-10` does; plain and student models).
    #[arg(
        long,
        default_value = "forward,pgd-step,train-step",
        value_delimiter = ','
    )]
    steps: Vec<String>,
    /// Device: cpu, cuda or cuda:N, with +tf32 to allow TF32 tensor cores or +bf16 for bf16 convolutions (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also print one JSON object per line.
    #[arg(long)]
    json: bool,
}

/// The network variants `rampart bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// The architecture as it is.
    Plain,
    /// A stochastic student (noise after every BatchNorm).
    Student,
    /// An OAT model (FiLM and dual BatchNorm).
    Oat,
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::Plain => "plain",
            Variant::Student => "student",
            Variant::Oat => "oat",
        })
    }
}

/// Gradient steps of the `attack-*` benchmarks (their time is reported per step).
const ATTACK_STEPS: usize = 2;
/// Steps of the `apgd-*` benchmarks (their time is reported per image·step taken).
const APGD_STEPS: usize = 10;

/// One measured step.
#[derive(Debug, Serialize)]
pub struct BenchLine {
    /// Step name (forward, pgd-step, train-step).
    pub step: String,
    /// Architecture.
    pub arch: String,
    /// Variant (plain, student, oat).
    pub variant: String,
    /// Batch size.
    pub batch_size: usize,
    /// Device description.
    pub device: String,
    /// Median seconds per batch.
    pub seconds_per_batch: f64,
    /// Images per second at the median.
    pub images_per_second: f64,
    /// Timed repetitions.
    pub reps: usize,
    /// Worker threads.
    pub threads: usize,
    /// On a GPU: the most memory the step's tensors held at once (the pool's
    /// high-water mark over warm-up and timed repetitions), in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// On a GPU: the host's share of the step's time, the median time until the
    /// step's code returned (having queued its work, before waiting for the device)
    /// ÷ the median time until the device finished it, in (0, 1]. Near 1: the host is
    /// the bottleneck (launches, host work or reads inside the step, where the host
    /// waits); well below 1: the device is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_share: Option<f64>,
    /// On a GPU, for the forward, PGD and training steps: `fused` when the step ran
    /// on a fused GPU program (`RAMPART_CUDA_FUSED_EVAL`, `RAMPART_CUDA_FUSED_TRAIN`),
    /// else `layers`; for the attack steps: `device` when PGD's device-resident loop
    /// ran (`RAMPART_CUDA_DEVICE_ATTACK`), `device+graphs` when its middle steps were
    /// replayed from CUDA graphs (`RAMPART_CUDA_GRAPHS`), else `host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Starts a new high-water mark of GPU memory (nothing on the CPU).
fn reset_peak(dev: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    rampart_models::cuda::reset_peak_memory(dev)?;
    let _ = dev;
    Ok(())
}

/// The GPU memory high-water mark since [`reset_peak`] (None on the CPU).
fn peak(dev: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    return Ok(rampart_models::cuda::peak_memory(dev)?);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        Ok(None)
    }
}

/// The training method a method step times, and its SGD settings, as the preset
/// trains: `fast-at-preact-resnet18` (FGSM from a uniform start, training on the
/// stepped point) or `at-wrn28-10` (PGD-10 AT, the last iterate).
fn method_of_step(step: &str) -> Result<(Box<dyn TrainingMethod>, SgdConfig)> {
    let preset = match step {
        "fast-at-step" => PresetName::FastAtPreactResnet18,
        "pgd-at-step" => PresetName::AtWrn28_10,
        other => bail!("`{other}` is no method step"),
    }
    .preset();
    let config = MethodConfig::merge(
        preset.method.kind(),
        &Overrides::default(),
        &preset.attack.overrides(),
    )?;
    let sgd = SgdConfig {
        momentum: preset.momentum,
        nesterov: preset.nesterov,
        weight_decay: preset.weight_decay,
        ..SgdConfig::cifar()
    };
    Ok((config.method()?, sgd))
}

/// A step's median times over the timed repetitions.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// Seconds from the start of a repetition until the device finished it.
    wall: f64,
    /// Seconds until the step's code returned (before waiting for the device): the
    /// host's time to queue the step.
    host: f64,
}

impl Timing {
    /// The host's share of the step's time: [`Timing::host`] ÷ [`Timing::wall`].
    fn host_share(&self) -> f64 {
        if self.wall > 0.0 {
            (self.host / self.wall).min(1.0)
        } else {
            1.0
        }
    }
}

/// The median times of `reps` calls of `f` after at least `warmup` untimed ones.
fn timed(
    reps: usize,
    warmup: usize,
    dev: &Device,
    f: &mut dyn FnMut() -> Result<()>,
) -> Result<Timing> {
    // At least `warmup` calls, and on a GPU at least half a second of them: a GPU
    // leaves its idle clocks only under sustained load.
    let start = Instant::now();
    let mut done = 0;
    while done < warmup || (!dev.is_cpu() && start.elapsed().as_secs_f64() < 0.5) {
        f()?;
        dev.synchronize()?;
        done += 1;
    }
    let mut walls = Vec::with_capacity(reps);
    let mut hosts = Vec::with_capacity(reps);
    for _ in 0..reps {
        dev.synchronize()?;
        let t = Instant::now();
        f()?;
        hosts.push(t.elapsed().as_secs_f64());
        dev.synchronize()?;
        walls.push(t.elapsed().as_secs_f64());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Timing {
        wall: median(walls),
        host: median(hosts),
    })
}

impl BenchArgs {
    /// Images per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Runs the benchmark and prints its table (and JSON lines with `--json`).
    pub fn run(&self) -> Result<Vec<BenchLine>> {
        if self.batch_size == 0 || self.reps == 0 {
            bail!("--batch-size and --reps must be at least 1");
        }
        let dev = self
            .device
            .parse::<DeviceArg>()
            .map_err(anyhow::Error::msg)?
            .open()?;
        let arch: Arch = self.arch.parse()?;
        let mut spec = ModelSpec::cifar(arch, 10);
        match self.variant {
            Variant::Plain => {}
            Variant::Student => spec.noise = Some(NoiseSpec { alpha: 0.1 }),
            Variant::Oat => spec.oat = Some(OatSpec::standard()),
        }
        let model = Classifier::new(spec, 0, &dev)?;
        let train_lambdas: Vec<f32> = {
            let values = OatSpec::standard().lambdas;
            (0..self.batch_size)
                .map(|i| values[i % values.len()])
                .collect()
        };
        let xs = Tensor::rand(0f32, 1f32, (self.batch_size, 3, 32, 32), &dev)?;
        let labels: Vec<u32> = (0..self.batch_size as u32).map(|i| i % 10).collect();
        let ys = Tensor::new(labels.as_slice(), &dev)?;
        let threads = rayon::current_num_threads();
        let mut lines = Vec::new();
        for step in &self.steps {
            reset_peak(&dev)?;
            let mut attack_on_device = false;
            // Whether a method step replayed the trainer's CUDA graph.
            let mut step_graphs = false;
            let graph_launches = rampart_attacks::cuda_graph_steps().1;
            let mut host_share = None;
            let mut time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
                let t = timed(self.reps, self.warmup, &dev, f)?;
                host_share = Some(t.host_share());
                Ok(t.wall)
            };
            let seconds = match step.as_str() {
                "forward" => time(&mut || {
                    // As predictions run: the frozen view (the fused path).
                    model.frozen().forward_t(&xs, false)?.to_dtype(DType::F32)?;
                    Ok(())
                })?,
                "pgd-step" => time(&mut || {
                    input_gradient(&model.frozen(), Objective::CrossEntropy, &xs, &ys, None)?;
                    Ok(())
                })?,
                "train-step" => {
                    let mut sgd = Sgd::new(model.trainable_vars(), SgdConfig::cifar())?;
                    // Under the trainer's CUDA graphs, normal training's step replayed
                    // as the trainer replays it (plain and student models).
                    let normal = rampart_defenses::Normal::new();
                    let mut graph = match self.variant {
                        Variant::Oat => None,
                        _ => TrainGraph::for_run(&model, &normal),
                    };
                    let mut rng = method_rng(0, 0);
                    let mut sums = StepSums::default();
                    let launches = rampart_defenses::train_graph_steps().1;
                    let seconds = time(&mut || {
                        if let Some(g) = graph.as_mut() {
                            let batch = (&xs, &ys);
                            if g.step(&normal, &model, batch, &mut rng, &mut sgd, 0.01, &mut sums)?
                                .is_some()
                            {
                                return Ok(());
                            }
                        }
                        let logits = match self.variant {
                            Variant::Oat => model.forward_lambdas(&xs, &train_lambdas, true)?,
                            _ => model.forward_t(&xs, true)?,
                        };
                        // The training methods' loss (one fused op each way).
                        let loss = rampart_defenses::cross_entropy(&logits, &ys, 0.0)?;
                        sgd.step(&rampart_models::backward(&loss)?, 0.01)?;
                        Ok(())
                    })?;
                    step_graphs = rampart_defenses::train_graph_steps().1 > launches;
                    if step_graphs && !sums.read()?.loss_sum.is_finite() {
                        bail!("train-step: the loss is not finite");
                    }
                    seconds
                }
                "pgd20" => {
                    // The evaluation suite's PGD-20 (`rampart eval --suite pgd20`): a
                    // run long enough for CUDA graphs to replay its middle steps.
                    let pgd = Pgd::linf_pgd20();
                    let before = rampart_attacks::device_resident_pgd_runs();
                    let seconds = time(&mut || {
                        let bounds = Bounds::new(0.0, 1.0)?;
                        pgd.run(&model.frozen(), bounds, &xs, &ys, &[8.0 / 255.0], 0)?;
                        Ok(())
                    })?;
                    attack_on_device = rampart_attacks::device_resident_pgd_runs() > before;
                    seconds / pgd.steps as f64
                }
                attack if attack.starts_with("attack-") => {
                    let (norm, eps) = match &attack["attack-".len()..] {
                        "linf" => (Norm::Linf, 8.0 / 255.0),
                        "l2" => (Norm::L2, 0.5),
                        "l1" => (Norm::l1(), 12.0),
                        "l0" => (Norm::L0, 10.0),
                        other => bail!("unknown attack norm `{other}` (linf, l2, l1, l0)"),
                    };
                    let pgd = Pgd {
                        norm,
                        steps: ATTACK_STEPS,
                        step_size: StepSize::Relative(0.25),
                        momentum: 0.9,
                        backtrack: Some(1.5),
                        ..Pgd::linf_pgd20()
                    };
                    let before = rampart_attacks::device_resident_pgd_runs();
                    let seconds = time(&mut || {
                        pgd.run(&model.frozen(), Bounds::new(0.0, 1.0)?, &xs, &ys, &[eps], 0)?;
                        Ok(())
                    })?;
                    attack_on_device = rampart_attacks::device_resident_pgd_runs() > before;
                    seconds / ATTACK_STEPS as f64
                }
                apgd if apgd.starts_with("apgd-") => {
                    let (norm, eps) = match &apgd["apgd-".len()..] {
                        "linf" => (Norm::Linf, 8.0 / 255.0),
                        "l2" => (Norm::L2, 0.5),
                        other => bail!("unknown APGD norm `{other}` (linf, l2)"),
                    };
                    let apgd = Apgd {
                        steps: APGD_STEPS,
                        ..Apgd::ce(norm)
                    };
                    // The network's own predictions as labels: no example starts fooled.
                    let predicted = model
                        .frozen()
                        .forward_t(&xs, false)?
                        .argmax(1)?
                        .to_dtype(DType::U32)?;
                    let before = rampart_attacks::device_resident_apgd_runs();
                    let mut image_steps = 0usize;
                    let seconds = time(&mut || {
                        let bounds = Bounds::new(0.0, 1.0)?;
                        let r = apgd.run(&model.frozen(), bounds, &xs, &predicted, &[eps], 0)?;
                        image_steps = r[0].iterations.iter().sum();
                        Ok(())
                    })?;
                    attack_on_device = rampart_attacks::device_resident_apgd_runs() > before;
                    // The time of one batch-step: the run's over its image·steps, × B.
                    seconds * self.batch_size as f64 / image_steps.max(1) as f64
                }
                "fast-at-step" | "pgd-at-step" => {
                    if self.variant == Variant::Oat {
                        bail!("{step} times plain and student models (OAT trains with its own method)");
                    }
                    let (method, sgd_config) = method_of_step(step)?;
                    let mut sgd = Sgd::new(model.trainable_vars(), sgd_config)?;
                    let mut rng = method_rng(0, 0);
                    let mut sums = StepSums::default();
                    let before = rampart_attacks::device_resident_pgd_runs();
                    // The trainer's CUDA graph of the step where it applies (asked for,
                    // on a GPU): the warm-up steps warm and capture it.
                    let mut graph = TrainGraph::for_run(&model, method.as_ref());
                    let launches = rampart_defenses::train_graph_steps().1;
                    let seconds = time(&mut || {
                        let replayed = match graph.as_mut() {
                            Some(g) => g.step(
                                method.as_ref(),
                                &model,
                                (&xs, &ys),
                                &mut rng,
                                &mut sgd,
                                0.01,
                                &mut sums,
                            )?,
                            None => None,
                        };
                        if replayed.is_none() {
                            let mut batch = TrainBatch::new(&model, &xs, &ys, &mut rng)
                                .with_host_labels(&labels);
                            train_step(method.as_ref(), &mut batch, &mut sgd, 0.01, None, &mut sums)?;
                        }
                        Ok(())
                    })?;
                    step_graphs = rampart_defenses::train_graph_steps().1 > launches;
                    attack_on_device = rampart_attacks::device_resident_pgd_runs() > before;
                    // The steps' own checks: a step that went wrong is no timing.
                    let read = sums.read()?;
                    if let Some(e) = read.checks.as_deref().and_then(rampart_attacks::Faults::error)
                    {
                        bail!("{step}: the training attack's checks failed: {e}");
                    }
                    if !read.loss_sum.is_finite() {
                        bail!("{step}: the loss is not finite ({})", read.loss_sum);
                    }
                    seconds
                }
                other => bail!(
                    "unknown step `{other}` (expected forward, pgd-step, train-step, attack-linf, attack-l2, attack-l1, attack-l0, pgd20, apgd-linf, apgd-l2, fast-at-step, pgd-at-step)"
                ),
            };
            lines.push(BenchLine {
                step: step.clone(),
                arch: arch.to_string(),
                variant: self.variant.to_string(),
                batch_size: self.batch_size,
                device: self.device.clone(),
                seconds_per_batch: seconds,
                images_per_second: self.batch_size as f64 / seconds,
                reps: self.reps,
                threads,
                peak_memory_bytes: peak(&dev)?,
                host_share: host_share.filter(|_| dev.is_cuda()),
                path: match step.as_str() {
                    "forward" | "pgd-step" | "train-step" if dev.is_cuda() => {
                        let fused = model.takes_fused_gpu_path(step == "train-step")?;
                        let fused = if fused { "fused" } else { "layers" };
                        Some(format!(
                            "{fused}{}",
                            if step_graphs { "+graphs" } else { "" }
                        ))
                    }
                    "fast-at-step" | "pgd-at-step" if dev.is_cuda() => {
                        // The training pass's path, then the attack's loop.
                        let fused = model.takes_fused_gpu_path(true)?;
                        Some(format!(
                            "{}+{}{}",
                            if fused { "fused" } else { "layers" },
                            if attack_on_device { "device" } else { "host" },
                            if step_graphs { "+graphs" } else { "" }
                        ))
                    }
                    attack
                        if (attack.starts_with("attack-")
                            || attack.starts_with("apgd-")
                            || attack == "pgd20")
                            && dev.is_cuda() =>
                    {
                        let graphs = rampart_attacks::cuda_graph_steps().1 > graph_launches;
                        Some(
                            match (attack_on_device, graphs) {
                                (true, true) => "device+graphs",
                                (true, false) => "device",
                                _ => "host",
                            }
                            .to_string(),
                        )
                    }
                    _ => None,
                },
            });
        }
        println!("| step | arch | variant | batch | device | s/batch | images/s | peak MiB |");
        println!("|---|---|---|---:|---|---:|---:|---:|");
        for l in &lines {
            println!(
                "| {} | {} | {} | {} | {} | {:.3} | {:.1} | {} |",
                l.step,
                l.arch,
                l.variant,
                l.batch_size,
                l.device,
                l.seconds_per_batch,
                l.images_per_second,
                l.peak_memory_bytes
                    .map_or("-".to_string(), |b| format!("{:.0}", b as f64 / 1048576.0))
            );
        }
        if self.json {
            for l in &lines {
                println!("{}", serde_json::to_string(l)?);
            }
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The method steps run the preset's method and SGD settings, time a whole step on
    /// a small network, and refuse an OAT model.
    #[test]
    fn method_steps_time_the_presets_training_steps() -> Result<()> {
        let (fast, sgd) = method_of_step("fast-at-step")?;
        assert_eq!(fast.name(), "fast-at");
        assert_eq!(
            fast.settings()["attack"]["last_iterate"],
            true,
            "{}",
            fast.settings()
        );
        assert!(!sgd.nesterov);
        assert_eq!((sgd.momentum, sgd.weight_decay), (0.9, 5e-4));
        let (at, _) = method_of_step("pgd-at-step")?;
        assert_eq!(at.name(), "at");
        assert_eq!(at.settings()["attack"]["steps"], 10, "{}", at.settings());
        assert!(method_of_step("train-step").is_err());
        let args = |variant: Variant| BenchArgs {
            arch: "wrn-10-1".into(),
            variant,
            batch_size: 4,
            reps: 1,
            warmup: 1,
            steps: vec!["fast-at-step".into(), "pgd-at-step".into()],
            device: "cpu".into(),
            json: false,
        };
        let lines = args(Variant::Plain).run()?;
        assert_eq!(lines.len(), 2);
        for l in &lines {
            assert!(
                l.seconds_per_batch > 0.0 && l.seconds_per_batch.is_finite(),
                "{l:?}"
            );
            assert_eq!(l.path, None, "no GPU path on the CPU");
        }
        assert_eq!(args(Variant::Student).run()?.len(), 2);
        let oat = args(Variant::Oat)
            .run()
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(oat.contains("plain and student"), "{oat}");
        Ok(())
    }

    #[test]
    fn timing_is_the_median_of_the_repetitions_and_the_host_share_a_fraction() -> Result<()> {
        let dev = Device::Cpu;
        let mut calls = 0;
        let mut f = || {
            calls += 1;
            std::thread::sleep(std::time::Duration::from_millis(if calls % 2 == 0 {
                20
            } else {
                1
            }));
            Ok(())
        };
        let t = timed(5, 1, &dev, &mut f)?;
        assert_eq!(calls, 6, "one warm-up call, five timed");
        // Timed calls 2..=6: three sleep 20 ms (calls 2, 4, 6), two 1 ms: the median
        // is a 20 ms one.
        assert!(t.wall >= 0.02, "{t:?}");
        assert!(t.host <= t.wall, "{t:?}");
        // On the CPU the step is done when its code returns.
        assert!(t.host_share() > 0.5 && t.host_share() <= 1.0, "{t:?}");
        assert_eq!(
            Timing {
                wall: 0.0,
                host: 0.0
            }
            .host_share(),
            1.0
        );
        assert_eq!(
            Timing {
                wall: 1.0,
                host: 2.0
            }
            .host_share(),
            1.0
        );
        assert_eq!(
            Timing {
                wall: 2.0,
                host: 0.5
            }
            .host_share(),
            0.25
        );
        Ok(())
    }
}
