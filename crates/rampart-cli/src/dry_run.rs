//! `--dry-run` of `rampart train`, `rampart eval` and `rampart sweep`: what the command
//! would make the network do, counted in passes of one image, printed as one JSON
//! object (`{"dry_run": {...}}`, the [`Work`] below) without loading data or weights
//! or writing anything. `cargo xtask reproduce --estimate` turns these counts into
//! wall time with the step times `rampart bench` measures.
//!
//! The counts are upper bounds where the work depends on the model (attacks that stop
//! at success, AutoAttack's later stages on the points left robust; see
//! `rampart_attacks::Passes`). The test set's size is the data set's official one
//! (--dataset is needed; or --test-limit); the model file is read for its
//! architecture when it exists
//! (a model that a run before this one will train need not): without it the
//! architecture is unknown (`null`) and the model counts as stochastic when --eot
//! asks for more than one sample.

use std::path::Path;

use anyhow::{Context, Result};
use rampart_attacks::Passes;
use rampart_models::{ModelSpec, OatSpec};
use serde::{Deserialize, Serialize};

use crate::eval::EvalPlan;
use crate::eval_run::EvalCost;
use crate::sweep::{SweepArgs, SweepOver};
use crate::train::TrainPlan;

/// What one command would do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Work {
    /// `train`, `eval` or `sweep`.
    pub command: String,
    /// The architecture (`null`: the model file does not exist yet).
    pub arch: Option<String>,
    /// `plain`, `student` (noise injection) or `oat` (FiLM and dual BatchNorm): the
    /// variant `rampart bench --variant` times.
    pub variant: Option<String>,
    /// Whether the evaluation treats the model as stochastic (EOT, noise draws).
    pub stochastic: bool,
    /// Images per training step (train) or per evaluation batch (eval, sweep).
    pub batch_size: usize,
    /// Training: images per batch of the per-epoch evaluation.
    pub eval_batch_size: usize,
    /// Training: data-parallel workers sharing each step's batch.
    pub workers: usize,
    /// Training: the model's trainable values (what data-parallel workers all-reduce
    /// every step); 0 otherwise.
    pub parameters: usize,
    /// Training: epochs of the run.
    pub epochs: usize,
    /// Training: optimiser steps over the whole run.
    pub steps: usize,
    /// Training: train-mode passes (forward, backward, update) over the whole run.
    pub train: f64,
    /// Training: the passes of the attacks inside the steps (at `batch_size`).
    pub attack: Passes,
    /// Eval-mode passes outside the training steps (at `eval_batch_size` for train,
    /// `batch_size` otherwise): evaluations, attacks, trust checks; every attack on
    /// every attacked image, an upper bound.
    pub eval: Passes,
    /// The part of `eval` that runs only on the correctly classified images
    /// (AutoAttack's first stage).
    pub eval_on_correct: Passes,
    /// The part of `eval` that runs only on the images still robust (AutoAttack's
    /// later stages).
    pub eval_on_robust: Passes,
}

/// The variant of a model specification.
fn variant(spec: &ModelSpec) -> &'static str {
    if spec.oat.is_some() {
        "oat"
    } else if spec.noise.is_some() {
        "student"
    } else {
        "plain"
    }
}

/// Prints `work` as the one JSON line of a dry run.
pub fn print(work: &Work) -> Result<()> {
    println!("{}", serde_json::json!({ "dry_run": work }));
    Ok(())
}

/// The dry run of a training plan.
pub fn train(plan: &TrainPlan) -> Result<Work> {
    let spec = plan.model_spec();
    let (train_size, test_size) = plan.dataset.split_sizes();
    let images = plan.train_limit.map_or(train_size, |n| n.min(train_size));
    let cfg = &plan.config;
    let per_epoch = images.div_ceil(cfg.batch_size.max(1));
    let steps = per_epoch * cfg.epochs;
    let cost = plan.training_method()?.step_cost(&spec);
    let trained = (images * cfg.epochs) as f64;
    let tested = plan.test_limit.map_or(test_size, |n| n.min(test_size));
    // An evaluation after every epoch (twice with EMA: the averaged and the raw
    // weights), and the threshold's held-out images once.
    let evaluations = if cfg.ema.is_some() { 2 } else { 1 };
    let eval =
        Passes::forward((tested * evaluations * cfg.epochs + plan.threshold_held_out) as f64);
    Ok(Work {
        command: "train".into(),
        arch: Some(plan.arch.to_string()),
        variant: Some(variant(&spec).into()),
        stochastic: spec.noise.is_some(),
        batch_size: cfg.batch_size,
        eval_batch_size: cfg.eval_batch_size,
        workers: plan.workers.count(),
        parameters: rampart_models::Classifier::new(spec.clone(), 0, &candle_core::Device::Cpu)?
            .num_parameters(),
        epochs: cfg.epochs,
        steps,
        train: cost.train * trained,
        attack: cost.attack * trained,
        eval,
        eval_on_correct: Passes::NONE,
        eval_on_robust: Passes::NONE,
    })
}

/// The model's specification, when its file exists.
fn spec_of(model: &Path) -> Result<Option<ModelSpec>> {
    if !model.is_file() || model.extension().is_some_and(|e| e == "onnx") {
        return Ok(None);
    }
    rampart_models::Classifier::read_spec(model)
        .map(Some)
        .with_context(|| format!("cannot read {}", model.display()))
}

/// The official test set's size of --dataset (the model's metadata is not read: its
/// file may not exist yet).
fn test_images(plan: &EvalPlan) -> Result<usize> {
    let dataset = plan
        .dataset
        .context("--dry-run needs --dataset (it does not read the model's metadata)")?;
    Ok(dataset.split_sizes().1)
}

/// The dry run of an evaluation plan.
pub fn eval(plan: &EvalPlan) -> Result<Work> {
    let spec = spec_of(&plan.model)?;
    let stochastic = match &spec {
        Some(s) => s.noise.is_some() && plan.noise_scale != Some(0.0),
        None => plan.eot.is_some_and(|k| k > 1),
    };
    let eval = plan.cost(test_images(plan)?, stochastic)?;
    Ok(eval_work("eval", plan, spec.as_ref(), stochastic, eval))
}

fn eval_work(
    command: &str,
    plan: &EvalPlan,
    spec: Option<&ModelSpec>,
    stochastic: bool,
    eval: EvalCost,
) -> Work {
    Work {
        command: command.into(),
        arch: spec.map(|s| s.arch.to_string()),
        variant: spec.map(|s| variant(s).into()),
        stochastic,
        batch_size: plan.batch_size,
        eval_batch_size: plan.batch_size,
        workers: 1,
        parameters: 0,
        epochs: 0,
        steps: 0,
        train: 0.0,
        attack: Passes::NONE,
        eval: eval.total,
        eval_on_correct: eval.on_correct,
        eval_on_robust: eval.on_robust,
    }
}

/// The dry run of a sweep: one evaluation per value (a noise scale of 0 makes a
/// student deterministic). Without --values, the values the sweep would take: the
/// noise scales 0, 0.5, 1, 2, 4, or the OAT model's λ values (the standard ones when
/// the model does not exist yet).
pub fn sweep(args: &SweepArgs, plan: &EvalPlan) -> Result<Work> {
    let spec = spec_of(&plan.model)?;
    let values = if !args.values.is_empty() {
        args.values.clone()
    } else {
        match args.over {
            SweepOver::NoiseScale => vec![0.0, 0.5, 1.0, 2.0, 4.0],
            SweepOver::Lambda => spec
                .as_ref()
                .and_then(|s| s.oat.as_ref())
                .map_or_else(|| OatSpec::standard().lambdas, |o| o.lambdas.clone()),
        }
    };
    let images = test_images(plan)?;
    let mut eval = EvalCost::default();
    let mut any_stochastic = false;
    for &value in &values {
        let stochastic = match args.over {
            SweepOver::NoiseScale => value != 0.0,
            SweepOver::Lambda => false,
        } && spec
            .as_ref()
            .map_or(plan.eot.is_some_and(|k| k > 1), |s| s.noise.is_some());
        any_stochastic |= stochastic;
        let cost = plan.cost(images, stochastic)?;
        eval.total += cost.total;
        eval.on_correct += cost.on_correct;
        eval.on_robust += cost.on_robust;
    }
    Ok(eval_work(
        "sweep",
        plan,
        spec.as_ref(),
        any_stochastic,
        eval,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    enum Wrapper {
        Train(Box<crate::train::TrainArgs>),
        Eval(Box<crate::eval::EvalArgs>),
        Sweep(Box<SweepArgs>),
    }

    fn work(line: &str) -> Result<Work> {
        let argv = std::iter::once("rampart").chain(line.split_whitespace());
        match Wrapper::try_parse_from(argv)? {
            Wrapper::Train(a) => train(&a.plan(None)?),
            Wrapper::Eval(a) => eval(&a.plan(None)?),
            Wrapper::Sweep(a) => sweep(&a, &a.eval.plan(None)?),
        }
    }

    /// Worked by hand: PGD-7 adversarial training of WRN-16-4 on 1,000 images for 2
    /// epochs, batch 100; evaluated on 500 test images after each epoch.
    #[test]
    fn a_training_run_counts_its_steps_attacks_and_evaluations() -> Result<()> {
        let w = work(
            "train --arch wrn-16-4 --method at --attack-steps 7 --epochs 2 --batch-size 100 \
             --train-limit 1000 --test-limit 500 --threshold-held-out 0 --data-dir d --out o \
             --dry-run",
        )?;
        assert_eq!(
            (w.arch.as_deref(), w.variant.as_deref()),
            (Some("wrn-16-4"), Some("plain"))
        );
        assert_eq!(
            (w.epochs, w.steps, w.batch_size, w.workers),
            (2, 20, 100, 1)
        );
        assert_eq!(w.train, 2000.0);
        // Per image and step: 7 gradients (the start's and six steps'), 1 forward
        // pass (the last step's point); a training attack is not judged.
        assert_eq!(
            w.attack,
            Passes {
                gradient: 14_000.0,
                forward: 2_000.0
            }
        );
        assert_eq!(w.eval, Passes::forward(1_000.0));
        Ok(())
    }

    /// The pgd20 suite on 100 of 10,000 images: the clean pass, three objectives of
    /// PGD-20 with their judgements, trust checks on 10 images.
    #[test]
    fn an_evaluation_counts_the_clean_pass_attacks_and_trust_checks() -> Result<()> {
        let w = work(
            "eval --model absent.safetensors --dataset cifar10 --suite pgd20 \
             --attack-limit 100 --trust-examples 10 --data-dir d --out o --dry-run",
        )?;
        assert_eq!((w.arch, w.stochastic), (None, false));
        let pgd = rampart_attacks::Pgd::linf_pgd20();
        let trust = rampart_eval::trust_cost(&pgd, &rampart_eval::TrustConfig::default()) * 10.0;
        let attacks = (pgd.cost() + Passes::forward(1.0)) * 300.0;
        let want = Passes::forward(10_000.0) + attacks + trust;
        assert!(
            (w.eval.gradient - want.gradient).abs() < 1e-6,
            "{:?} {want:?}",
            w.eval
        );
        assert!(
            (w.eval.forward - want.forward).abs() < 1e-6,
            "{:?} {want:?}",
            w.eval
        );
        // A stochastic model (by --eot without the file): 20 EOT samples and 5 draws.
        let s = work(
            "eval --model absent.safetensors --dataset cifar10 --suite pgd20 --eot 20 \
             --draws 5 --attack-limit 100 --trust-examples 0 --data-dir d --out o --dry-run",
        )?;
        assert!(s.stochastic);
        assert_eq!(s.eval.gradient, 3.0 * 20.0 * 20.0 * 100.0);
        // A sweep adds one evaluation per value (--eot applies at each, as in the run;
        // noise scale 0 only has no noise draws).
        let sweep = work(
            "sweep --over noise-scale --values 0,1 --model absent.safetensors --dataset cifar10 \
             --suite pgd20 --eot 20 --attack-limit 100 --trust-examples 0 --data-dir d --out o \
             --dry-run",
        )?;
        assert_eq!(sweep.eval.gradient, 2.0 * s.eval.gradient);
        assert!(sweep.stochastic);
        // AutoAttack: every stage on every image in `eval`, and apart the first stage
        // (correctly classified images) and the later ones (robust images).
        let aa = work(
            "eval --model absent.safetensors --dataset cifar10 --suite autoattack \
             --attack-limit 100 --trust-examples 0 --data-dir d --out o --dry-run",
        )?;
        let split =
            rampart_attacks::AutoAttack::standard(rampart_attacks::Norm::Linf).cost_by_images();
        assert_eq!(aa.eval, split.total() * 100.0);
        assert_eq!(aa.eval_on_correct, split.correct * 100.0);
        assert_eq!(aa.eval_on_robust, split.robust * 100.0);
        let err = work("eval --model m --suite clean --data-dir d --out o --dry-run")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("needs --dataset"), "{err}");
        Ok(())
    }
}
