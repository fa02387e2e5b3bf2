//! `rampart eval`: running a checked plan. The loops themselves live in
//! `rampart-eval` (the protocol suites, the worst case of several attacks, resumable
//! AutoAttack, a stochastic model's noise draws, the trust checks); this file calls
//! them and connects their results to the files of --out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rampart_attacks::{Bounds, Eot, Norm, Passes};
use rampart_data::{DatasetKind, ImageDataset};
use rampart_defenses::{predict, ConfidenceThreshold, Predictions};
use rampart_eval::{AutoAttackConfig, TrustChecks};
use rampart_models::Classifier;
use serde_json::json;

use crate::common::{create_out_dir, load_test_data, record_command, write_json};
use crate::eval::{
    wilson, AttackFigure, AttackOutcome, AttackPlan, EvalPlan, EvalResults, Suite,
    EVAL_SCHEMA_VERSION,
};

/// What every suite of one `rampart eval` works on: the loaded model, its method, the
/// data set and its test split, and the device.
#[derive(Clone, Copy)]
struct Loaded<'a> {
    model: &'a Classifier,
    method: &'a str,
    dataset: DatasetKind,
    test: &'a ImageDataset,
    device: &'a Device,
}

/// What an evaluation costs ([`EvalPlan::cost`]), in network passes of one image.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvalCost {
    /// Everything, every attack on every attacked image: the upper bound.
    pub total: Passes,
    /// The part of `total` that runs only on the correctly classified images.
    pub on_correct: Passes,
    /// The part of `total` that runs only on the images still robust.
    pub on_robust: Passes,
}

impl EvalPlan {
    /// Where the log goes.
    pub fn log_file(&self) -> std::path::PathBuf {
        self.out.join("eval.log")
    }

    /// EOT samples of every attack on `model`: --eot, else [`rampart_eval::STOCHASTIC_EOT`]
    /// for a stochastic model and 1 otherwise.
    fn eot_samples(&self, model: &Classifier) -> usize {
        self.eot.unwrap_or(if model.is_stochastic() {
            rampart_eval::STOCHASTIC_EOT
        } else {
            1
        })
    }

    /// Runs AutoAttack (standard, or rand for a stochastic model) in the plan's norm
    /// batch by batch over the first images (with --shard, over the shard's rows),
    /// resumable through `per_example/autoattack.json`, then the trust checks (in the
    /// shard that holds the first images); writes `autoattack.json` (the per-batch
    /// reports: stages, runtimes, trust checks) and `results.json`, or for a shard its
    /// `shard.json`, which `rampart merge` joins into those.
    fn run_autoattack(&self, loaded: &Loaded<'_>) -> Result<EvalResults> {
        let plan = self
            .attack
            .as_ref()
            .context("autoattack needs its budget")?;
        let n = plan
            .limit
            .unwrap_or(loaded.test.len())
            .min(loaded.test.len());
        let (lo, hi) = loaded.model.bounds();
        let bounds = Bounds::new(lo, hi)?;
        let config = AutoAttackConfig {
            norm: plan.pgd.norm,
            eps: plan.eps,
            limit: n,
            batch_size: self.batch_size,
            seed: plan.seed,
            rand: loaded.model.is_stochastic(),
        };
        let shard = self.shard;
        let rows = shard.rows(n, self.batch_size)?;
        let trust_examples = self.trust.examples.min(n);
        if rows.start == 0 && rows.end < trust_examples {
            bail!(
                "shard {shard} holds the first {} images but the trust checks run on the first \
                 {trust_examples}: use fewer shards, a larger --batch-size or fewer --trust-examples",
                rows.end
            );
        }
        // A manifest says the shard finished: an earlier run's must not outlive this start.
        let manifest = manifest_path(&self.out);
        if manifest.exists() {
            std::fs::remove_file(&manifest)
                .with_context(|| format!("cannot remove {}", manifest.display()))?;
        }
        let outcome = rampart_eval::run_autoattack(
            &loaded.model.frozen(),
            bounds,
            loaded.test,
            &config,
            rows,
            &self.out.join("per_example"),
            loaded.device,
        )?;
        // The trust checks run on the first images, in the shard that holds them.
        let trust = if rows.start == 0 {
            let robust = outcome.robust_images();
            self.trust_checks(
                loaded.model,
                bounds,
                loaded.test,
                &robust,
                &plan.pgd,
                plan.eps,
            )?
        } else {
            None
        };
        let info = AutoAttackModel {
            model: self.model.clone(),
            method: loaded.method.to_string(),
            arch: loaded.model.spec().arch.to_string(),
            dataset: loaded.dataset.to_string(),
            lambda: loaded.model.lambda(),
        };
        if shard.is_whole() {
            let results = write_autoattack(&self.out, &info, &outcome, trust)?;
            self.finish(&results)?;
            return Ok(results);
        }
        let results = autoattack_results(&info, &outcome, trust.clone());
        let settings = json!({"autoattack": config, "trust": self.trust,
            "noise_scale": loaded.model.spec().noise.as_ref().map(|_| loaded.model.noise_scale()),
            "lambda": info.lambda, "dataset": info.dataset, "onnx": format!("{:?}", self.onnx)});
        let manifest = rampart_eval::ShardManifest {
            command: "eval --suite autoattack".into(),
            shard,
            rows,
            total: n,
            fingerprint: crate::common::file_fingerprint(loaded.test, n, &self.model, &settings)?,
            settings,
            details: json!({"model": info, "trust": trust, "strict_checks": self.strict_checks}),
            seconds: outcome.seconds,
            resumed: (outcome.resumed_batches > 0)
                .then(|| format!("{} AutoAttack batches", outcome.resumed_batches))
                .into_iter()
                .collect(),
        };
        write_json(&manifest_path(&self.out), &manifest)?;
        rampart_fs::finish_run(&self.out)?;
        println!(
            "shard {shard} (images {}..{}) written to {}; join every shard with `rampart merge`",
            rows.start,
            rows.end,
            self.out.display()
        );
        Ok(results)
    }

    /// Runs a suite of the evaluation pipeline (`rampart-eval`): it writes
    /// `results.json` (schema in docs/results-schema.md), `results.md`, plots and
    /// per-example results into --out, and resumes a run interrupted there.
    /// The protocol suite's configuration with `eot` samples per attack step and
    /// judgement (1: none).
    fn protocol_config(
        &self,
        suite: rampart_eval::Suite,
        eot: usize,
    ) -> Result<rampart_eval::EvalConfig> {
        let mut config = rampart_eval::EvalConfig::new(suite, &self.out);
        config.effort = rampart_eval::Effort::new(self.effort.0, self.effort.1)?;
        if self.protocol_limit.is_some() {
            config.test_limit = self.protocol_limit;
        }
        config.seed = self.protocol_seed;
        config.held_out = self.held_out;
        config.batch_size = self.batch_size;
        config.trust = self.trust;
        config.metrics = self.metrics;
        config.curve_points = self.curve_points;
        config.shard = self.shard;
        if eot > 1 {
            config.eot = Eot::new(eot, eot)?;
        }
        Ok(config)
    }

    /// What the plan costs on a test set of `test_images` images for a model that is
    /// `stochastic` or not, in network passes (totals; upper bounds as the attacks'
    /// counts are, see `rampart_attacks::Passes`): the clean predictions, the attacks,
    /// the trust checks and a stochastic model's noise draws; AutoAttack's parts that
    /// run only on the correctly classified or the robust images are also given apart.
    pub fn cost(&self, test_images: usize, stochastic: bool) -> Result<EvalCost> {
        let all = |total: Passes| EvalCost {
            total,
            ..EvalCost::default()
        };
        let test = self.test_limit.map_or(test_images, |l| l.min(test_images));
        let eot = self.eot.unwrap_or(if stochastic {
            rampart_eval::STOCHASTIC_EOT
        } else {
            1
        });
        if let Some(suite) = self.suite.protocol() {
            return Ok(all(self.protocol_config(suite, eot)?.cost(test)?));
        }
        let clean = Passes::forward(test as f64);
        let Some(attack) = &self.attack else {
            let draws = if stochastic { self.draws.max(1) } else { 1 };
            return Ok(all(clean * draws as f64));
        };
        let n = attack.limit.map_or(test, |l| l.min(test));
        let rows = self.shard.rows(n, self.batch_size)?;
        let trusted = if rows.start == 0 {
            self.trust.examples.min(n)
        } else {
            0
        };
        let pgd = rampart_attacks::Pgd {
            eot: Eot {
                grad_samples: eot,
                eval_samples: eot,
            },
            ..attack.pgd
        };
        let trust = rampart_eval::trust_cost(&pgd, &self.trust) * trusted as f64;
        if self.suite == Suite::Autoattack {
            let ensemble = if stochastic {
                rampart_attacks::AutoAttack::rand(attack.pgd.norm)
            } else {
                rampart_attacks::AutoAttack::standard(attack.pgd.norm)
            };
            let (split, images) = (ensemble.cost_by_images(), rows.len() as f64);
            return Ok(EvalCost {
                total: split.total() * images + trust,
                on_correct: split.correct * images,
                on_robust: split.robust * images,
            });
        }
        // The worst case: every objective's PGD and the judgement of its points.
        let objectives = self.objectives.len().max(1) as f64;
        let worst = (pgd.cost() + Passes::forward(1.0)) * objectives;
        let draws = if stochastic && self.shard.is_whole() {
            // Per draw: every image clean, and every attacked one under each attack.
            Passes::forward((test as f64 + n as f64 * objectives) * self.draws as f64)
        } else {
            Passes::NONE
        };
        Ok(all(clean + worst * rows.len() as f64 + trust + draws))
    }

    fn run_protocol(&self, suite: rampart_eval::Suite, loaded: &Loaded<'_>) -> Result<EvalResults> {
        let k = self.eot_samples(loaded.model);
        let mut config = self.protocol_config(suite, k)?;
        config.device = loaded.device.clone();
        let (lo, hi) = loaded.model.bounds();
        config.bounds = Bounds::new(lo, hi)?;
        let mut info = rampart_eval::ModelInfo::of(loaded.model, Some(&self.model));
        info.dataset = Some(loaded.dataset.to_string());
        let report =
            rampart_eval::evaluate_model(&loaded.model.frozen(), &info, loaded.test, &config)
                .with_context(|| format!("evaluating {}", self.model.display()))?;
        rampart_fs::finish_run(&self.out)?;
        let linf = report
            .threat_models
            .get(rampart_eval::HEADLINE_THREAT_MODEL);
        let results = EvalResults {
            schema_version: report.schema_version,
            suite: self.suite.name().into(),
            model: self.model.clone(),
            method: loaded.method.to_string(),
            arch: loaded.model.spec().arch.to_string(),
            dataset: loaded.dataset.to_string(),
            test_examples: report.test_examples,
            clean_accuracy: report.clean_accuracy,
            clean_accuracy_ci: report.clean_error_ci.map(|c| rampart_metrics::Interval {
                lo: 1.0 - c.hi,
                hi: 1.0 - c.lo,
            }),
            clean_error: report.clean_error,
            eval_seconds: report.eval_seconds,
            attack: linf.map(|_| format!("{} suite, L∞ 8/255 worst case", self.suite.name())),
            norm: linf.map(|t| t.norm.clone()),
            eps: linf.map(|t| t.eps),
            robust_examples: linf.map(|_| report.test_examples),
            robust_accuracy: linf.map(|t| 1.0 - t.robust_error),
            robust_accuracy_ci: linf.and_then(|t| t.robust_error_ci).map(|c| {
                rampart_metrics::Interval {
                    lo: 1.0 - c.hi,
                    hi: 1.0 - c.lo,
                }
            }),
            robust_error: linf.map(|t| t.robust_error),
            attack_seconds: None,
            attacked_clean_accuracy: None,
            attacks: Vec::new(),
            eot_samples: Some(k),
            confidence_threshold: report.model_confidence_threshold,
            clean_rejected: None,
            clean_err_at_threshold: None,
            robust_err_at_threshold: linf.and_then(|t| t.rerr_at_model_threshold),
            robust_err_at_threshold_ci: None,
            lambda: loaded.model.lambda(),
            stochastic: None,
            trust: report.trust.clone(),
            autoattack_trust_warnings: Vec::new(),
        };
        if self.strict_checks && !results.trusted() {
            bail!(
                "trust checks failed (--strict-checks); see {}",
                self.out.join("results.md").display()
            );
        }
        Ok(results)
    }

    /// Writes `results.json` and `results.md` and marks the run finished (its journal
    /// of finished batches is removed); with --strict-checks a failed trust check is
    /// then an error.
    fn finish(&self, results: &EvalResults) -> Result<()> {
        write_json(&self.out.join("results.json"), results)?;
        rampart_fs::write_atomic(&self.out.join("results.md"), results.markdown().as_bytes())?;
        self.journal("").remove()?;
        rampart_fs::finish_run(&self.out)?;
        if self.strict_checks && !results.trusted() {
            bail!(
                "trust checks failed (--strict-checks); see {}",
                self.out.join("results.md").display()
            );
        }
        Ok(())
    }

    /// The trust checks on the first attacked images, repeating `attack` at `eps`
    /// (`robust[i]`: image i survived every attack of the evaluation).
    fn trust_checks(
        &self,
        model: &Classifier,
        bounds: Bounds,
        test: &ImageDataset,
        robust: &[bool],
        attack: &rampart_attacks::Pgd,
        eps: f64,
    ) -> Result<Option<TrustChecks>> {
        // A stochastic model's noise from a fixed point: the same checks after a resume.
        model.reseed_noise(self.protocol_seed);
        Ok(rampart_eval::check_first(
            &model.frozen(),
            bounds,
            test,
            robust,
            attack,
            eps,
            &self.trust,
            self.protocol_seed,
            model.device(),
            &format!("suite {}", self.suite.name()),
        )?)
    }

    /// Runs the plan; `command` is recorded beside the outputs.
    pub fn run(&self, command: &str) -> Result<EvalResults> {
        let device = self.device.open()?;
        let model = crate::common::load_model(
            &self.model,
            &device,
            self.lambda,
            self.noise_scale,
            self.protocol_seed,
            &self.onnx,
        )?;
        let dataset = crate::common::model_dataset(self.dataset, &model, &self.model)?;
        crate::common::check_model_fits(&model, &self.model, dataset)?;
        let method = model
            .metadata()
            .get("method")
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        let test = load_test_data(dataset, &self.data_dir)?;
        let test = match self.test_limit {
            Some(n) => test.take(n),
            None => test,
        };
        let settings = crate::common::run_settings();
        // What the attacked batches depend on: not on the shard a run is cut into, nor on
        // the shards a run merges, so every shard's batches are the whole run's.
        let work = settings.clone().without(&["--shard", "--merge"]);
        // The shards to merge are checked before anything is written.
        let merged_shards = match &self.attack {
            Some(attack) if !self.merge.is_empty() => {
                let n = attack.limit.map_or(test.len(), |l| l.min(test.len()));
                let key = self.journal_key(&model, &test, n, &work)?;
                Some(self.check_shards(&key, n)?)
            }
            _ => None,
        };
        create_out_dir(&self.out)?;
        // An interrupted run here continues only with the same settings.
        settings.begin(&self.out)?;
        record_command(&self.out, command)?;
        let eot_samples = self.eot_samples(&model);
        write_json(
            &self.out.join("config.json"),
            &json!({
                "command": "eval",
                "rampart_version": env!("CARGO_PKG_VERSION"),
                "command_line": command,
                "model": self.model,
                "method": method,
                "arch": model.spec().arch.to_string(),
                "dataset": dataset.to_string(),
                "data_dir": self.data_dir.path,
                "test_limit": self.test_limit,
                "batch_size": self.batch_size,
                "suite": self.suite,
                "attack": self.attack.as_ref().map(|a| a.describe(&self.objectives)),
                "attack_limit": self.attack.as_ref().and_then(|a| a.limit),
                "attack_seed": self.attack.as_ref().map(|a| a.seed),
                "objectives": self.objectives.iter().map(|o| o.name()).collect::<Vec<_>>(),
                "lambda": model.lambda(),
                "noise_scale": model.spec().noise.as_ref().map(|_| model.noise_scale()),
                "eot": eot_samples,
                "draws": model.is_stochastic().then_some(self.draws),
                "trust": self.trust,
                "strict_checks": self.strict_checks,
                "metrics": self.metrics,
                "curve_points": self.curve_points,
                "shard": (!self.shard.is_whole()).then(|| self.shard.to_string()),
                "device": self.device.to_string(),
                "gpu_switches": crate::common::gpu_switches(&self.device),
            }),
        )?;
        let loaded = Loaded {
            model: &model,
            method: &method,
            dataset,
            test: &test,
            device: &device,
        };
        if let Some(suite) = self.suite.protocol() {
            return self.run_protocol(suite, &loaded);
        }
        if self.suite == Suite::Autoattack {
            return self.run_autoattack(&loaded);
        }
        let threshold = ConfidenceThreshold::stored(&model)
            .with_context(|| format!("cannot read {}", self.model.display()))?;
        let started = Instant::now();
        let predictions = predict(&model, &test, self.batch_size)?;
        let clean_correct: Vec<bool> = predictions
            .labels
            .iter()
            .zip(&predictions.predicted)
            .map(|(l, p)| l == p)
            .collect();
        let attack_plan = self.attack.map(|mut a| {
            a.pgd.eot = Eot {
                grad_samples: eot_samples,
                eval_samples: eot_samples,
            };
            a
        });
        let (lo, hi) = model.bounds();
        let bounds = Bounds::new(lo, hi)?;
        let sharded = !self.shard.is_whole();
        let attacked = match &attack_plan {
            Some(attack) => {
                let n = attack.limit.map_or(test.len(), |l| l.min(test.len()));
                let key = self.journal_key(&model, &test, n, &work)?;
                if let Some(shards) = &merged_shards {
                    self.take_shards(&key, shards)?;
                }
                let rows = self.shard.rows(n, self.batch_size)?;
                if sharded {
                    // A manifest says the shard finished: an earlier run's must not
                    // outlive this start.
                    let manifest = manifest_path(&self.out);
                    if manifest.exists() {
                        std::fs::remove_file(&manifest)
                            .with_context(|| format!("cannot remove {}", manifest.display()))?;
                    }
                }
                let outcome =
                    self.attack(&model, attack, &test, &clean_correct, &key, rows.range())?;
                if sharded {
                    self.write_pgd20_manifest(&test, n, rows, &key, &work, &outcome)?;
                    None
                } else {
                    Some(outcome)
                }
            }
            None => None,
        };
        let trust = match (&attack_plan, &attacked) {
            (Some(a), Some(w)) => {
                self.trust_checks(&model, bounds, &test, &w.robust, &a.pgd, a.eps)?
            }
            _ => None,
        };
        let stochastic = if model.is_stochastic() && !sharded {
            let draws = rampart_eval::NoiseDraws {
                draws: self.draws,
                batch_size: self.batch_size,
                seed: self.protocol_seed,
                eot_samples,
            };
            Some(rampart_eval::over_noise_draws(
                &model,
                &test,
                attacked.as_ref(),
                &draws,
            )?)
        } else {
            None
        };
        let eval_seconds = started.elapsed().as_secs_f64();
        if !sharded {
            predictions.save_json(&self.out.join("predictions.json"))?;
            predictions.save_probs(&self.out.join("probs.safetensors"))?;
        }
        if let (Some(a), Some(w)) = (&attack_plan, &attacked) {
            self.save_per_example(&model, &test, &predictions, &clean_correct, a, w)?;
        }
        let clean_confidence: Vec<f64> = predictions
            .confidence
            .iter()
            .map(|&c| f64::from(c))
            .collect();
        let robust_count = attacked
            .as_ref()
            .map(|a| a.robust.iter().filter(|&&c| c).count());
        let robust_accuracy = match &stochastic {
            Some(st) => st.robust_accuracy_mean,
            None => attacked
                .as_ref()
                .zip(robust_count)
                .map(|(a, r)| r as f64 / a.robust.len().max(1) as f64),
        };
        let clean_accuracy = stochastic
            .as_ref()
            .map_or(predictions.accuracy(), |st| st.clean_accuracy_mean);
        let attacked_clean_accuracy = match (&stochastic, &attacked) {
            (Some(st), Some(_)) => st.attacked_clean_accuracy_mean,
            (None, Some(a)) => {
                let n = a.robust.len();
                let ok = (0..n).filter(|&i| clean_correct[i]).count();
                Some(ok as f64 / n.max(1) as f64)
            }
            _ => None,
        };
        let tau = threshold.map(|t| t.tau);
        let clean_rejected = tau.map(|tau| {
            clean_confidence.iter().filter(|&&c| c < tau).count() as f64
                / clean_confidence.len().max(1) as f64
        });
        let clean_err_at_threshold = match tau {
            Some(tau) => rampart_metrics::err_at_threshold(&clean_correct, &clean_confidence, tau)
                .map_err(|e| tracing::warn!("Err@τ: {e}"))
                .ok(),
            None => None,
        };
        let (robust_err_at_threshold, robust_err_at_threshold_ci) = match (tau, &attacked) {
            (Some(tau), Some(a)) => {
                let n = a.robust.len();
                let rerr = |idx: &[usize]| {
                    let pick = |v: &[bool]| idx.iter().map(|&i| v[i]).collect::<Vec<_>>();
                    let pickf = |v: &[f64]| idx.iter().map(|&i| v[i]).collect::<Vec<_>>();
                    rampart_metrics::rerr_at_threshold(
                        &pick(&clean_correct),
                        &pickf(&clean_confidence),
                        &pick(&a.worst_correct),
                        &pickf(&a.worst_confidence),
                        tau,
                    )
                };
                let all: Vec<usize> = (0..n).collect();
                let value = rerr(&all).map_err(|e| tracing::warn!("RErr@τ: {e}")).ok();
                let ci = if self.metrics.bootstrap_resamples >= 2 {
                    rampart_metrics::bootstrap(
                        n,
                        self.metrics.bootstrap_resamples,
                        rampart_metrics::CONFIDENCE_95,
                        self.protocol_seed,
                        |idx| rerr(idx).ok(),
                    )
                    .ok()
                    .flatten()
                } else {
                    None
                };
                (value, ci)
            }
            _ => (None, None),
        };
        let attacks = attacked
            .as_ref()
            .map(|w| {
                (0..w.attacks.len())
                    .map(|a| {
                        let acc = w.robust_accuracy_of(a, &clean_correct);
                        let n = w.robust.len();
                        AttackFigure {
                            name: w.attacks[a].clone(),
                            robust_accuracy: acc,
                            robust_accuracy_ci: wilson((acc * n as f64).round() as usize, n),
                            seconds: w.seconds[a],
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let results = EvalResults {
            schema_version: EVAL_SCHEMA_VERSION,
            suite: self.suite.name().into(),
            model: self.model.clone(),
            method,
            arch: model.spec().arch.to_string(),
            dataset: dataset.to_string(),
            test_examples: predictions.len(),
            clean_accuracy,
            clean_accuracy_ci: wilson(predictions.correct(), predictions.len()),
            clean_error: 1.0 - clean_accuracy,
            eval_seconds,
            attack: attack_plan.as_ref().map(|a| a.describe(&self.objectives)),
            norm: attack_plan.as_ref().map(|a| a.pgd.norm.to_string()),
            eps: self.attack.as_ref().map(|a| a.eps),
            robust_examples: attacked.as_ref().map(|a| a.robust.len()),
            robust_accuracy,
            robust_accuracy_ci: attacked
                .as_ref()
                .zip(robust_count)
                .and_then(|(a, r)| wilson(r, a.robust.len())),
            robust_error: robust_accuracy.map(|a| 1.0 - a),
            attack_seconds: attacked.as_ref().map(|a| a.seconds.iter().sum()),
            attacked_clean_accuracy,
            attacks,
            eot_samples: attack_plan.as_ref().map(|_| eot_samples),
            confidence_threshold: tau,
            clean_rejected,
            clean_err_at_threshold,
            robust_err_at_threshold,
            robust_err_at_threshold_ci,
            lambda: model.lambda(),
            stochastic,
            trust,
            autoattack_trust_warnings: Vec::new(),
        };
        if sharded {
            // Its attacked batches (`progress/`) and `shard.json` are the shard's output.
            rampart_fs::finish_run(&self.out)?;
            return Ok(results);
        }
        self.finish(&results)?;
        tracing::info!(
            accuracy = results.clean_accuracy,
            examples = results.test_examples,
            seconds = format!("{eval_seconds:.1}"),
            "evaluated"
        );
        Ok(results)
    }

    /// `per_example/`: the clean logits of every evaluated image, the worst-case
    /// record of the attacked ones (`pgd.json`: per attack whether it fooled the image,
    /// the CCAT worst case's attack, correctness and confidence), every attack's
    /// adversarial logits, and with --save-adversarial the adversarial images.
    fn save_per_example(
        &self,
        model: &Classifier,
        test: &ImageDataset,
        predictions: &Predictions,
        clean_correct: &[bool],
        plan: &AttackPlan,
        w: &AttackOutcome,
    ) -> Result<()> {
        let dir = self.out.join("per_example");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let (logits, k) =
            rampart_eval::dataset_logits(&model.frozen(), test, self.batch_size, model.device())?;
        let n = w.robust.len();
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        tensors.insert(
            "clean_logits".into(),
            Tensor::from_vec(logits, (test.len(), k), &Device::Cpu)?,
        );
        tensors.insert(
            "labels".into(),
            Tensor::new(predictions.labels.as_slice(), &Device::Cpu)?,
        );
        for (a, name) in w.attacks.iter().enumerate() {
            tensors.insert(
                format!("{name}.logits"),
                Tensor::from_vec(w.logits[a].clone(), (n, w.classes), &Device::Cpu)?,
            );
        }
        save_safetensors(&tensors, &dir.join("logits.safetensors"))?;
        write_json(
            &dir.join("pgd.json"),
            &w.record(plan.eps, &predictions.labels, clean_correct),
        )?;
        if self.save_adversarial {
            let mut images: HashMap<String, Tensor> = HashMap::new();
            for (a, name) in w.attacks.iter().enumerate() {
                let parts: Vec<Tensor> = w.adversarial.iter().map(|(_, t)| t[a].clone()).collect();
                images.insert(
                    name.clone(),
                    Tensor::cat(&parts, 0)?.to_device(&Device::Cpu)?,
                );
            }
            save_safetensors(&images, &self.out.join("adversarial.safetensors"))?;
        }
        Ok(())
    }

    /// The journal of the pgd20 suite's finished batches (`OUT/progress/`), for work
    /// fingerprinted by `key`.
    fn journal(&self, key: &str) -> rampart_eval::BatchJournal<'static> {
        rampart_eval::BatchJournal::new(self.out.join("progress"), key)
    }

    /// Attacks the images `rows` of the first `attack.limit` of `test` (all of them, or
    /// a shard's) with every objective of the plan; an image counts as robust when it
    /// is classified correctly clean (`clean_correct`) and no attack fooled it. Every
    /// finished batch is saved in the journal of `key`, so a run of the same work
    /// continues from the last one.
    fn attack(
        &self,
        model: &Classifier,
        attack: &AttackPlan,
        test: &ImageDataset,
        clean_correct: &[bool],
        key: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<AttackOutcome> {
        let (lo, hi) = model.bounds();
        let bounds = Bounds::new(lo, hi)?;
        let prefix = format!("pgd{}", attack.pgd.steps);
        let attacks = rampart_eval::objective_variants(&prefix, &attack.pgd, &self.objectives);
        if attack.pgd.norm != Norm::Linf {
            bail!("the pgd20 suite is L∞");
        }
        let reseed = |seed| model.reseed_noise(seed);
        let journal = self.journal(key).reseeding(&reseed);
        Ok(rampart_eval::worst_case(
            &model.frozen(),
            bounds,
            test,
            rows,
            &attacks,
            attack.eps,
            clean_correct,
            self.batch_size,
            attack.seed,
            model.device(),
            model.is_stochastic() || self.save_adversarial,
            Some(&journal),
        )?)
    }
}

/// The command a pgd20 shard's manifest names.
pub(crate) const PGD20_SHARD: &str = "eval --suite pgd20";

impl EvalPlan {
    /// `shard.json` of a pgd20 shard: its rows, what they were made from, and the key
    /// of its attacked batches (`progress/`), which `--merge` takes.
    fn write_pgd20_manifest(
        &self,
        test: &ImageDataset,
        n: usize,
        rows: rampart_eval::Rows,
        key: &str,
        work: &rampart_fs::RunSettings,
        outcome: &AttackOutcome,
    ) -> Result<()> {
        let settings = serde_json::Value::Object(
            work.values()
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect(),
        );
        let manifest = rampart_eval::ShardManifest {
            command: PGD20_SHARD.into(),
            shard: self.shard,
            rows,
            total: n,
            fingerprint: crate::common::file_fingerprint(test, n, &self.model, &settings)?,
            settings,
            details: json!({ "journal_key": key }),
            seconds: outcome.seconds.iter().sum(),
            resumed: Vec::new(),
        };
        write_json(&manifest_path(&self.out), &manifest)?;
        Ok(())
    }

    /// The key of the pgd20 suite's attacked batches over the first `n` images: the
    /// model's logits, the labels and the settings that shape the batches (`work`).
    fn journal_key(
        &self,
        model: &Classifier,
        test: &ImageDataset,
        n: usize,
        work: &rampart_fs::RunSettings,
    ) -> Result<String> {
        Ok(rampart_eval::fingerprint(
            &model.frozen(),
            test,
            n,
            self.batch_size,
            &format!("{work:?}"),
            model.device(),
        )?)
    }

    /// `--merge`: checks that the shards are this run's (`key`), every shard once, cut
    /// into whole batches that tile its `n` attacked images.
    fn check_shards(
        &self,
        key: &str,
        n: usize,
    ) -> Result<Vec<(PathBuf, rampart_eval::ShardManifest)>> {
        let shards = rampart_eval::read_shards(&self.merge)?;
        for (dir, m) in &shards {
            if m.command != PGD20_SHARD {
                bail!(
                    "{} holds a shard of `rampart {}`, not of `rampart {PGD20_SHARD}`",
                    dir.display(),
                    m.command
                );
            }
            if m.total != n || m.details["journal_key"].as_str() != Some(key) {
                bail!(
                    "{} is a shard of another run: its model, data or settings differ from this \
                     command's (run every shard with this command and --shard I/N instead of \
                     --merge)",
                    dir.display()
                );
            }
        }
        Ok(shards)
    }

    /// Copies the attacked batches of the checked `shards` into this run's journal of
    /// `key`, so that the run loads them instead of attacking again.
    fn take_shards(
        &self,
        key: &str,
        shards: &[(PathBuf, rampart_eval::ShardManifest)],
    ) -> Result<()> {
        let into = self.journal(key).dir().to_path_buf();
        std::fs::create_dir_all(&into)
            .with_context(|| format!("cannot create {}", into.display()))?;
        for (dir, m) in shards {
            let from = dir.join("progress");
            // The folder is listed once; each batch takes its files from the list.
            let names: Vec<String> = std::fs::read_dir(&from)
                .with_context(|| format!("cannot read {}", from.display()))?
                .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()?;
            for b in m.rows.start / self.batch_size..m.rows.end.div_ceil(self.batch_size) {
                let prefix = format!("batch-{b:06}.");
                let mut record = false;
                for name in names.iter().filter(|n| n.starts_with(&prefix)) {
                    std::fs::copy(from.join(name), into.join(name))
                        .with_context(|| format!("cannot copy {}", from.join(name).display()))?;
                    record |= name.ends_with(".json");
                }
                if !record {
                    bail!(
                        "{} lacks its attacked batch {b}: run the shard again to finish it",
                        dir.display()
                    );
                }
            }
        }
        tracing::info!(shards = shards.len(), "took the shards' attacked batches");
        Ok(())
    }
}

/// The shard manifest of the output folder `out`.
fn manifest_path(out: &Path) -> std::path::PathBuf {
    out.join(rampart_eval::SHARD_MANIFEST)
}

/// The model an AutoAttack run evaluated, as its results name it (kept in a shard's
/// manifest for the merge).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AutoAttackModel {
    /// The model file.
    pub model: std::path::PathBuf,
    /// The training method it records.
    pub method: String,
    /// Its architecture.
    pub arch: String,
    /// The data set.
    pub dataset: String,
    /// λ of a once-for-all model.
    pub lambda: Option<f32>,
}

/// The `results.json` of an AutoAttack run (`suite: autoattack`) from its outcome.
pub(crate) fn autoattack_results(
    info: &AutoAttackModel,
    outcome: &rampart_eval::AutoAttackOutcome,
    trust: Option<TrustChecks>,
) -> EvalResults {
    let config = outcome.config;
    let n = outcome.examples;
    let clean_accuracy = outcome.clean_correct as f64 / n as f64;
    let robust_accuracy = outcome.robust as f64 / n as f64;
    let attacks = outcome
        .stages()
        .into_iter()
        .map(|stage| AttackFigure {
            name: format!("after {}", stage.name),
            robust_accuracy: stage.robust_after as f64 / n as f64,
            robust_accuracy_ci: wilson(stage.robust_after, n),
            seconds: stage.seconds,
        })
        .collect();
    EvalResults {
        schema_version: EVAL_SCHEMA_VERSION,
        suite: Suite::Autoattack.name().into(),
        model: info.model.clone(),
        method: info.method.clone(),
        arch: info.arch.clone(),
        dataset: info.dataset.clone(),
        test_examples: n,
        clean_accuracy,
        clean_accuracy_ci: wilson(outcome.clean_correct, n),
        clean_error: 1.0 - clean_accuracy,
        eval_seconds: outcome.seconds,
        attack: Some(format!(
            "autoattack {} {}, eps {:.5}",
            outcome.version, config.norm, config.eps
        )),
        norm: Some(config.norm.to_string()),
        eps: Some(config.eps),
        robust_examples: Some(n),
        robust_accuracy: Some(robust_accuracy),
        robust_accuracy_ci: wilson(outcome.robust, n),
        robust_error: Some(1.0 - robust_accuracy),
        attack_seconds: Some(outcome.seconds),
        attacked_clean_accuracy: Some(clean_accuracy),
        attacks,
        eot_samples: Some(if config.rand { 20 } else { 1 }),
        confidence_threshold: None,
        clean_rejected: None,
        clean_err_at_threshold: None,
        robust_err_at_threshold: None,
        robust_err_at_threshold_ci: None,
        lambda: info.lambda,
        stochastic: None,
        trust,
        autoattack_trust_warnings: outcome.trust_warnings.clone(),
    }
}

/// Writes `autoattack.json` (the per-batch reports: stages, runtimes, trust checks)
/// of a whole run and returns its `results.json`.
pub(crate) fn write_autoattack(
    out: &Path,
    info: &AutoAttackModel,
    outcome: &rampart_eval::AutoAttackOutcome,
    trust: Option<TrustChecks>,
) -> Result<EvalResults> {
    let (config, n) = (outcome.config, outcome.examples);
    write_json(
        &out.join("autoattack.json"),
        &json!({ "norm": config.norm.to_string(), "eps": config.eps, "examples": n,
                 "version": outcome.version, "seconds": outcome.seconds,
                 "resumed_batches": outcome.resumed_batches,
                 "robust_accuracy": outcome.robust as f64 / n as f64,
                 "trust_warnings": outcome.trust_warnings,
                 "batches": outcome.batches.iter().map(|b| &b.report).collect::<Vec<_>>() }),
    )?;
    for w in &outcome.trust_warnings {
        tracing::warn!("trust check (AutoAttack): {w}");
    }
    Ok(autoattack_results(info, outcome, trust))
}

/// Writes tensors as safetensors, atomically (see `rampart_fs`).
pub(crate) fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(sorted, None)
        .with_context(|| format!("cannot serialise {}", path.display()))?;
    rampart_fs::write_atomic(path, &bytes)?;
    Ok(())
}
