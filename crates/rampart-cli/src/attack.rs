//! `rampart attack`: one configurable attack on a trained model.
//!
//! Builds a [`Pgd`] (or FGSM: `--attack fgsm`, one step of 1.25ε from a random start
//! as in fast AT) from flags, attacks the first --test-limit test images batch by
//! batch for every --eps (`rampart_eval::attack_at_eps`), prints the robust accuracy per ε and writes, into --out,
//! `adversarial.safetensors` (per ε: the clipped adversarial images `adv_<i>`, and
//! `labels`, `success_<i>`, `norm_<i>`, `logits_<i>`), `summary.json` (robust accuracy
//! per ε with its 95 % interval, and the trust checks at the first ε), `config.json`
//! and `command.txt`. Every finished batch is saved under `progress/` until the end, so
//! the same command started again after a kill continues from the last one. With
//! `--shard I/N` it attacks that shard's images only (whole batches, the unsharded
//! run's seeds) and adds `shard.json`; `rampart merge` joins the shards
//! (docs/scale-out.md).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use rampart_attacks::{
    parse_eps, Bounds, Criterion, Eot, Init, Norm, Objective, Pgd, Restarts, StepSize,
};
use rampart_data::DatasetKind;
use serde_json::json;

use crate::common::{
    at_least_one, check_model_fits, create_out_dir, load_test_data, model_dataset, record_command,
    write_json, DataDir, DeviceArg,
};

fn parse_budget(s: &str) -> std::result::Result<f64, String> {
    parse_eps(s).map_err(|e| e.to_string())
}

/// The default PGD step as a fraction of ε: ε/4 (2/255 at 8/255, as PGD-20).
const DEFAULT_RELATIVE_STEP: f64 = 0.25;

/// Flags of `rampart attack`.
#[derive(Args, Debug)]
pub struct AttackArgs {
    /// Model file written by `rampart train`, or an ONNX image classifier (.onnx).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    onnx: crate::interop::OnnxInputArgs,
    /// Folder holding the data set; defaults to $RAMPART_DATA_DIR, else the per-user
    /// cache folder (~/.cache/rampart/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Data set: cifar10, cifar100, mnist or svhn [default: the one the model was
    /// trained on].
    #[arg(long)]
    dataset: Option<String>,
    /// pgd (projected gradient, the engine of docs/attacks.md) or fgsm (one step of
    /// 1.25·ε from a uniform random start).
    #[arg(long, default_value = "pgd")]
    attack: String,
    /// Threat model: linf, l2, l1 (top-k sparse steps), l0 (ε = number of values).
    #[arg(long, default_value = "linf")]
    norm: String,
    /// Budget(s) ε, comma-separated, decimals or fractions (e.g. 8/255,16/255).
    #[arg(long, value_delimiter = ',', value_parser = parse_budget, allow_negative_numbers = true, default_value = "8/255")]
    eps: Vec<f64>,
    /// Gradient steps per restart.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Step size in input units (absolute, as `rampart eval --attack-step-size`), a
    /// decimal or a fraction such as 2/255 [default: ε/4 at every ε, i.e. PGD-20's
    /// 2/255 at 8/255].
    #[arg(long, value_parser = parse_budget)]
    step_size: Option<f64>,
    /// Restarts; the per-example worst case is kept.
    #[arg(long, default_value_t = 1)]
    restarts: usize,
    /// Objective: ce, ce-targeted, cw, dlr, conf, distal.
    #[arg(long, default_value = "ce")]
    objective: String,
    /// Initialisation: zero, uniform, uniform-norm.
    #[arg(long, default_value = "uniform")]
    init: String,
    /// Momentum β in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    momentum: f64,
    /// Backtracking factor (> 1): shrink an example's step when the objective drops.
    #[arg(long)]
    backtrack: Option<f64>,
    /// Attack the first N test images [default: all].
    #[arg(long)]
    test_limit: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Seed of the random starts (and of a stochastic model's noise).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Once-for-all (OAT) models: the λ to attack at [default: the largest training λ].
    #[arg(long, allow_negative_numbers = true)]
    lambda: Option<f32>,
    /// Stochastic students: the noise scale (0 = deterministic) [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    noise_scale: Option<f32>,
    /// EOT samples (gradients averaged per step, draws judging success) [default: 20
    /// for a stochastic model, 1 otherwise].
    #[arg(long)]
    eot: Option<usize>,
    /// Images the trust checks run on at the first ε (the first N; 0: none).
    #[arg(long, default_value_t = rampart_eval::TRUST_EXAMPLES)]
    trust_examples: usize,
    /// Exit with an error when a trust check fails (after writing the results).
    #[arg(long)]
    strict_checks: bool,
    /// Run shard I of N (0-based: 0/8 … 7/8) of the attacked images, cut into
    /// contiguous runs of whole batches; `rampart merge` joins the shards' folders into
    /// the unsharded run's outputs (see docs/scale-out.md).
    #[arg(long, value_parser = crate::common::parse_shard)]
    shard: Option<rampart_eval::Shard>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Device: cpu, cuda or cuda:N; append +tf32 (cuda+tf32) to allow TF32 tensor cores,
    /// or +bf16 (cuda+bf16) for bf16 convolutions with f32 accumulation.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
}

impl AttackArgs {
    /// Images per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn build(&self) -> Result<Pgd> {
        let norm: Norm = self.norm.parse().context("--norm")?;
        let objective: Objective = self.objective.parse().context("--objective")?;
        let init: Init = self.init.parse().context("--init")?;
        let steps = at_least_one("--steps", self.steps)?;
        let pgd = match self.attack.as_str() {
            "pgd" => Pgd {
                norm,
                objective,
                criterion: Criterion::Misclassified,
                steps,
                step_size: self.step_size.map_or(
                    StepSize::Relative(DEFAULT_RELATIVE_STEP),
                    StepSize::Absolute,
                ),
                momentum: self.momentum,
                backtrack: self.backtrack,
                restarts: Restarts::same(at_least_one("--restarts", self.restarts)?, init),
                early_stop: false,
                eot: Eot::OFF,
                last_iterate: false,
            },
            "fgsm" => Pgd {
                norm,
                objective,
                criterion: Criterion::Misclassified,
                steps: 1,
                step_size: StepSize::Relative(1.25),
                momentum: 0.0,
                backtrack: None,
                restarts: Restarts::same(at_least_one("--restarts", self.restarts)?, Init::Uniform),
                early_stop: false,
                eot: Eot::OFF,
                last_iterate: false,
            },
            other => bail!("--attack {other}: expected pgd or fgsm"),
        };
        pgd.validate().context("invalid attack flags")?;
        for &eps in &self.eps {
            norm.check_eps(eps)
                .with_context(|| format!("--eps {eps}"))?;
        }
        Ok(pgd)
    }

    /// Runs the attack; `command` is recorded beside the outputs.
    pub fn run(&self, command: &str, data_fallback: Option<DataDir>) -> Result<()> {
        let mut pgd = self.build()?;
        if self.test_limit == Some(0) {
            bail!("--test-limit must be at least 1");
        }
        at_least_one("--batch-size", self.batch_size)?;
        let kind = self
            .dataset
            .as_deref()
            .map(str::parse::<DatasetKind>)
            .transpose()
            .context("--dataset")?;
        let data_dir = DataDir::resolve(self.data_dir.clone(), data_fallback)?;
        let device = self.device.open()?;
        let model = crate::common::load_model(
            &self.model,
            &device,
            self.lambda,
            self.noise_scale,
            self.seed,
            &self.onnx,
        )?;
        let kind = model_dataset(kind, &model, &self.model)?;
        check_model_fits(&model, &self.model, kind)?;
        let samples = self
            .eot
            .map(|e| at_least_one("--eot", e))
            .transpose()?
            .unwrap_or(if model.is_stochastic() {
                rampart_eval::STOCHASTIC_EOT
            } else {
                1
            });
        pgd.eot = Eot::new(samples, samples)?;
        let (lo, hi) = model.bounds();
        let bounds = Bounds::new(lo, hi)?;
        create_out_dir(&self.out)?;
        // An interrupted run here continues only with the same settings.
        let settings = crate::common::run_settings();
        settings.begin(&self.out)?;
        record_command(&self.out, command)?;
        let shard = self.shard.unwrap_or(rampart_eval::Shard::WHOLE);
        let mut config = json!({"command": "attack", "model": self.model, "dataset": kind.to_string(),
                    "data_dir": data_dir.path, "attack": pgd, "eps": self.eps, "test_limit": self.test_limit,
                    "batch_size": self.batch_size, "seed": self.seed, "device": self.device.to_string(),
                    "gpu_switches": crate::common::gpu_switches(&self.device),
                    "lambda": model.lambda(), "eot_samples": samples,
                    "noise_scale": model.spec().noise.as_ref().map(|_| model.noise_scale())});
        if let (false, Some(c)) = (shard.is_whole(), config.as_object_mut()) {
            c.insert("shard".into(), json!(shard.to_string()));
        }
        write_json(&self.out.join("config.json"), &config)?;
        // A manifest says the shard finished: an earlier run's must not outlive this start.
        let manifest = self.out.join(rampart_eval::SHARD_MANIFEST);
        if manifest.exists() {
            std::fs::remove_file(&manifest)
                .with_context(|| format!("cannot remove {}", manifest.display()))?;
        }
        let test = load_test_data(kind, &data_dir)?;
        let n = self.test_limit.unwrap_or(test.len()).min(test.len());
        let rows = shard.rows(n, self.batch_size)?;
        let trust_examples = self.trust_examples.min(n);
        if rows.start == 0 && rows.end < trust_examples {
            bail!(
                "shard {shard} holds the first {} images but the trust checks run on the first \
                 {trust_examples}: use fewer shards, a larger --batch-size or fewer --trust-examples",
                rows.end
            );
        }
        let started = std::time::Instant::now();
        let key = rampart_eval::fingerprint(
            &model.frozen(),
            &test,
            n,
            self.batch_size,
            &format!("{settings:?}"),
            &device,
        )?;
        let reseed = |seed| model.reseed_noise(seed);
        let journal =
            rampart_eval::BatchJournal::new(self.out.join("progress"), key).reseeding(&reseed);
        let attacked = rampart_eval::attack_at_eps(
            &model.frozen(),
            bounds,
            &test,
            rows.range(),
            &pgd,
            &self.eps,
            self.batch_size,
            self.seed,
            &device,
            Some(&journal),
        )?;
        // The trust checks run on the first images, in the shard that holds them.
        let trust = match self.eps.first().filter(|_| rows.start == 0) {
            Some(&eps) => {
                let robust: Vec<bool> = attacked.success(0).iter().map(|s| !s).collect();
                // The noise of a stochastic model from a fixed point, as after a resume.
                model.reseed_noise(self.seed);
                rampart_eval::check_first(
                    &model.frozen(),
                    bounds,
                    &test,
                    &robust,
                    &pgd,
                    eps,
                    &rampart_eval::TrustConfig {
                        examples: self.trust_examples,
                        ..Default::default()
                    },
                    self.seed,
                    model.device(),
                    "rampart attack",
                )?
            }
            None => None,
        };
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        tensors.insert("labels".into(), attacked.labels()?);
        let mut success = Vec::new();
        let mut norms = Vec::new();
        for i in 0..self.eps.len() {
            tensors.insert(format!("adv_{i}"), attacked.adversarial(i)?);
            tensors.insert(format!("logits_{i}"), attacked.logits(i)?);
            success.push(attacked.success(i));
            norms.push(attacked.norms(i));
        }
        let outcome = AttackOutcome {
            eps: self.eps.clone(),
            success,
            norms,
        };
        outcome.insert_tensors(&mut tensors)?;
        let prefix = if shard.is_whole() {
            String::new()
        } else {
            format!("shard {shard}: ")
        };
        let results = outcome.summary(&prefix);
        crate::eval_run::save_safetensors(&tensors, &self.out.join("adversarial.safetensors"))?;
        write_json(
            &self.out.join("summary.json"),
            &json!({"model": self.model, "attack": pgd, "seconds": attacked.seconds, "results": results,
                    "trust": trust}),
        )?;
        if !shard.is_whole() {
            let settings = json!({"attack": pgd, "eps": self.eps, "examples": n,
                "batch_size": self.batch_size, "seed": self.seed, "eot_samples": samples,
                "lambda": model.lambda(), "noise_scale": model.spec().noise.as_ref().map(|_| model.noise_scale()),
                "trust_examples": self.trust_examples, "dataset": kind.to_string(),
                "onnx": format!("{:?}", self.onnx)});
            let manifest = rampart_eval::ShardManifest {
                command: "attack".into(),
                shard,
                rows,
                total: n,
                fingerprint: crate::common::file_fingerprint(&test, n, &self.model, &settings)?,
                settings,
                details: serde_json::Value::Null,
                seconds: started.elapsed().as_secs_f64(),
                resumed: Vec::new(),
            };
            write_json(&self.out.join(rampart_eval::SHARD_MANIFEST), &manifest)?;
            println!(
                "shard {shard} (images {}..{}) written to {}; join every shard with `rampart merge`",
                rows.start,
                rows.end,
                self.out.display()
            );
        }
        journal.remove()?;
        rampart_fs::finish_run(&self.out)?;
        if let Some(t) = &trust {
            if !t.passed() {
                eprintln!("{}", t.markdown());
                if self.strict_checks {
                    bail!("trust checks failed (--strict-checks); see summary.json");
                }
            }
        }
        Ok(())
    }
}

/// Per ε, whether the attack succeeded on each attacked image and its distance: what
/// `summary.json` is computed from (by `rampart attack` and by `rampart merge`).
pub(crate) struct AttackOutcome {
    /// The budgets, in the order given.
    pub eps: Vec<f64>,
    /// Per ε: success per image.
    pub success: Vec<Vec<bool>>,
    /// Per ε: ‖x_adv − x‖ per image.
    pub norms: Vec<Vec<f32>>,
}

impl AttackOutcome {
    /// Adds `success_<i>` (u8) and `norm_<i>` (f32) to `tensors`.
    pub(crate) fn insert_tensors(&self, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
        for (i, (success, norms)) in self.success.iter().zip(&self.norms).enumerate() {
            let s: Vec<u8> = success.iter().map(|&b| u8::from(b)).collect();
            tensors.insert(
                format!("success_{i}"),
                Tensor::new(s.as_slice(), &Device::Cpu)?,
            );
            tensors.insert(
                format!("norm_{i}"),
                Tensor::new(norms.as_slice(), &Device::Cpu)?,
            );
        }
        Ok(())
    }

    /// The `results` of `summary.json`, one entry per ε, each also printed as a line
    /// (after `prefix`).
    pub(crate) fn summary(&self, prefix: &str) -> Vec<serde_json::Value> {
        let mut summary = Vec::new();
        for (i, eps) in self.eps.iter().enumerate() {
            let (success, norms) = (&self.success[i], &self.norms[i]);
            let n = success.len();
            let fooled = success.iter().filter(|&&b| b).count();
            let robust_accuracy = 1.0 - fooled as f64 / n as f64;
            println!(
                "{prefix}eps {eps:.5}: robust accuracy {:.2} % ({} of {n} images not fooled)",
                100.0 * robust_accuracy,
                n - fooled
            );
            let ci = crate::eval::wilson(n - fooled, n);
            summary.push(json!({"eps": eps, "index": i, "examples": n, "fooled": fooled,
                                "robust_accuracy": robust_accuracy, "robust_accuracy_ci": ci,
                                "robust_error": 1.0 - robust_accuracy,
                                "mean_norm": norms.iter().map(|&v| v as f64).sum::<f64>() / n.max(1) as f64}));
        }
        summary
    }
}
