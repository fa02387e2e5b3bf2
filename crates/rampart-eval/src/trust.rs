//! Trust checks of an evaluation: signs that a robustness figure over-states the
//! model because the attack behind it was weak (gradient masking, randomness without
//! EOT, probabilities in place of logits, a noise attack beating the white-box
//! attacks, robust accuracy that does not fall as ε grows, a larger step budget that
//! finds much more). Every evaluation path runs them on the first attacked images:
//! every suite of `rampart eval`, `rampart attack`, `rampart sweep` (through `eval`)
//! and the reproduce presets. The checks never change a result; a failed check adds
//! a [`TrustIssue`] that the report, `results.json` and the terminal show.

use std::fmt;

use candle_core::{DType, Device, ModuleT, Tensor};
use rampart_attacks::{check_model, Attack, Bounds, Init, Norm, Pgd, Restarts, StepSize};
use rampart_data::ImageDataset;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// Attacked images the checks run on when nothing else is asked (the first N).
pub const TRUST_EXAMPLES: usize = 100;
/// Random points drawn per image by the noise check.
pub const NOISE_SAMPLES: usize = 10;
/// The budget check repeats the attack with this many times its steps.
pub const BUDGET_FACTOR: usize = 5;
/// Multiples of ε the growth check attacks at (beside ε itself and the whole box).
pub const EPS_FACTORS: [f64; 2] = [2.0, 4.0];
/// Share of the checked points that the stronger budget may break beyond the
/// evaluated one before the budget check fails (2 points in 100).
pub const BUDGET_TOLERANCE: f64 = 0.02;
/// Share of the checked points by which robust accuracy may rise from one ε to a
/// larger one before the growth check fails (noise of a randomised model; at least
/// one point).
pub const GROWTH_TOLERANCE: f64 = 0.01;
/// Share of the checked points that may stay robust when the ε-ball covers the whole
/// input box (any input is then reachable, so an attack that works breaks all).
pub const UNBOUNDED_TOLERANCE: f64 = 0.02;

/// How the checks run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrustConfig {
    /// Attacked images checked (the first N); 0 switches the checks off.
    pub examples: usize,
    /// Random points per image of the noise check.
    pub noise_samples: usize,
    /// Step multiplier of the budget check.
    pub budget_factor: usize,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            examples: TRUST_EXAMPLES,
            noise_samples: NOISE_SAMPLES,
            budget_factor: BUDGET_FACTOR,
        }
    }
}

/// One failed check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrustIssue {
    /// Which check: `zero-gradients`, `nan-gradients`, `infinite-gradients`,
    /// `random-outputs`, `softmax-outputs`, `black-box-beats-white-box`,
    /// `noise-beats-white-box`, `accuracy-rises-with-eps`, `unbounded-attack-fails`,
    /// `larger-budget-finds-more`.
    pub check: String,
    /// What it means, in words.
    pub message: String,
}

impl fmt::Display for TrustIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.check, self.message)
    }
}

/// Robust accuracy of the checked points at one ε.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpsPoint {
    /// The budget.
    pub eps: f64,
    /// Share of the checked points classified correctly clean and under the attack.
    pub robust_accuracy: f64,
}

/// The outcome of every check of one evaluation. Written as `trust` in
/// `results.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrustChecks {
    /// Images checked (the first of the attacked ones).
    pub points: usize,
    /// The white-box attack the ε-growth and budget checks repeat (one run, no
    /// restarts), as text.
    pub attack: String,
    /// The threat model's ε.
    pub eps: f64,
    /// Gradient, randomness and softmax checks of `rampart-attacks`.
    pub model: rampart_attacks::TrustReport,
    /// Random points per image of the noise check.
    pub noise_samples: usize,
    /// Points robust against every white-box attack of the evaluation but fooled by
    /// a uniformly random point of the ε-ball.
    pub noise_only: usize,
    /// Robust accuracy of the checked points against the repeated attack at ε, 2ε, 4ε
    /// and the whole box (the last point), step sizes in proportion to ε.
    pub eps_growth: Vec<EpsPoint>,
    /// Steps of the repeated attack at ε.
    pub steps: usize,
    /// Its robust accuracy at ε.
    pub robust_accuracy: f64,
    /// Steps of the stronger attack.
    pub stronger_steps: usize,
    /// Its robust accuracy at ε.
    pub stronger_robust_accuracy: f64,
    /// The checks that failed.
    pub issues: Vec<TrustIssue>,
}

impl TrustChecks {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.issues.is_empty()
    }

    /// Logs every failed check as a warning (the terminal shows it).
    pub fn log(&self, context: &str) {
        for issue in &self.issues {
            tracing::warn!("trust check failed ({context}): {issue}");
        }
    }

    /// A Markdown block: a visible warning per failed check, or one line saying that
    /// every check passed.
    pub fn markdown(&self) -> String {
        let growth: Vec<String> = self
            .eps_growth
            .iter()
            .map(|p| format!("{:.4}: {:.1} %", p.eps, 100.0 * p.robust_accuracy))
            .collect();
        let summary = format!(
            "on the first {} attacked images with {}: zero CE / margin gradients {:.1} / {:.1} %, \
             noise-only successes {}, robust accuracy by ε {}, {} vs {} steps {:.1} vs {:.1} %",
            self.points,
            self.attack,
            100.0 * self.model.zero_gradient_ce,
            100.0 * self.model.zero_gradient_margin,
            self.noise_only,
            growth.join(", "),
            self.steps,
            self.stronger_steps,
            100.0 * self.robust_accuracy,
            100.0 * self.stronger_robust_accuracy,
        );
        if self.passed() {
            return format!("\nTrust checks passed ({summary}).\n");
        }
        let mut md = String::from("\n> **Warning: trust checks failed.** The robust figures may over-state the model.\n>\n");
        for issue in &self.issues {
            md.push_str(&format!("> - **{}**: {}\n", issue.check, issue.message));
        }
        md.push_str(&format!(">\n> Checks {summary}.\n"));
        md
    }
}

/// The whole box as an ε in `norm` for inputs of `d` values: any point of the box is
/// then within ε of any other (L∞: the width; L2: width·√d; L1: width·d; L0: d).
pub fn box_diameter(norm: Norm, bounds: Bounds, d: usize) -> f64 {
    let w = f64::from(bounds.width());
    match norm {
        Norm::Linf => w,
        Norm::L2 => w * (d as f64).sqrt(),
        Norm::L1 { .. } => w * d as f64,
        Norm::L0 => d as f64,
    }
}

/// [`run_checks`] on the first `config.examples` images of `data` (no more than were
/// attacked: `white_box_robust` has one entry per attacked image, in order), with the
/// seed `seed ^ 0x0074_7275_7374`; `None` when there is no image to check. Failed
/// checks are logged as warnings naming `context` ([`TrustChecks::log`]).
#[allow(clippy::too_many_arguments)]
pub fn check_first(
    model: &dyn ModuleT,
    bounds: Bounds,
    data: &ImageDataset,
    white_box_robust: &[bool],
    attack: &Pgd,
    eps: f64,
    config: &TrustConfig,
    seed: u64,
    device: &Device,
    context: &str,
) -> Result<Option<TrustChecks>> {
    let n = config.examples.min(white_box_robust.len());
    if n == 0 {
        return Ok(None);
    }
    let idx: Vec<usize> = (0..n).collect();
    let (xs, ys) = data.batch_tensors(&idx, device)?;
    let checks = run_checks(
        model,
        bounds,
        &xs,
        &ys,
        &white_box_robust[..n],
        attack,
        eps,
        config,
        seed ^ 0x0074_7275_7374,
    )?;
    checks.log(context);
    Ok(Some(checks))
}

/// Runs every check on the checked images `xs` (B, ...) with labels `ys` (B,):
/// `white_box_robust[i]` says whether image i survived every white-box attack of the
/// evaluation (clean correct and never broken). `attack` is the evaluation's
/// white-box attack at budget `eps`; the growth and budget checks repeat it with one
/// run. `eot` is the evaluation's EOT (the noise check judges on its `eval_samples`
/// mean probabilities).
#[allow(clippy::too_many_arguments)]
pub fn run_checks(
    model: &dyn ModuleT,
    bounds: Bounds,
    xs: &Tensor,
    ys: &Tensor,
    white_box_robust: &[bool],
    attack: &Pgd,
    eps: f64,
    config: &TrustConfig,
    seed: u64,
) -> Result<TrustChecks> {
    let b = xs.dim(0)?;
    if white_box_robust.len() != b {
        return Err(EvalError::Config(format!(
            "trust checks: {} white-box outcomes for {b} images",
            white_box_robust.len()
        )));
    }
    let eot = attack.eot;
    let model_report =
        check_model(model, bounds, xs, ys, eot).map_err(EvalError::attack("trust checks"))?;
    let labels: Vec<u32> = ys.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let d = xs.elem_count() / b.max(1);
    let mut issues: Vec<TrustIssue> = model_report
        .warnings
        .iter()
        .map(|w| TrustIssue {
            check: warning_kind(w).into(),
            message: w.to_string(),
        })
        .collect();

    // Noise: uniformly random points of the ε-ball (then the box).
    let clean_correct = correct_under(model, xs, &labels, eot.eval_samples)?;
    let mut noise_fooled = vec![false; b];
    let flat: Vec<f32> = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6e6f_6973_6521);
    let init = Init::Uniform;
    let mut delta = vec![0f64; d];
    for _ in 0..config.noise_samples {
        let mut noisy = Vec::with_capacity(flat.len());
        for i in 0..b {
            attack
                .norm
                .sample(init, eps, f64::from(bounds.width()), &mut rng, &mut delta);
            for (j, dv) in delta.iter().enumerate() {
                let v = f64::from(flat[i * d + j]) + dv;
                noisy.push(v.clamp(f64::from(bounds.lo), f64::from(bounds.hi)) as f32);
            }
        }
        let noisy = Tensor::from_vec(noisy, xs.dims(), xs.device())?.to_dtype(xs.dtype())?;
        let ok = correct_under(model, &noisy, &labels, eot.eval_samples)?;
        for i in 0..b {
            noise_fooled[i] |= clean_correct[i] && !ok[i];
        }
    }
    let noise_only = (0..b)
        .filter(|&i| white_box_robust[i] && noise_fooled[i])
        .count();
    if noise_only as f64 > rampart_attacks::BLACK_BOX_TOLERANCE * b as f64 {
        issues.push(TrustIssue {
            check: "noise-beats-white-box".into(),
            message: format!(
                "{noise_only} of {b} points survived every white-box attack but not a \
                 uniformly random point of the ε-ball: the gradients mislead the attacks"
            ),
        });
    }

    // One run of the attack, step sizes in proportion to ε.
    let single = Pgd {
        restarts: Restarts {
            count: 1,
            ..attack.restarts
        },
        step_size: StepSize::Relative(attack.step_size.at(eps) / eps.max(f64::MIN_POSITIVE)),
        ..*attack
    };
    let robust_at = |pgd: &Pgd, e: f64, salt: u64| -> Result<f64> {
        let mut res = pgd
            .run(model, bounds, xs, ys, &[e], seed.wrapping_add(salt))
            .map_err(EvalError::attack("trust checks"))?;
        let r = res
            .pop()
            .ok_or_else(|| EvalError::Config("the attack returned no result".into()))?;
        let robust = (0..b)
            .filter(|&i| clean_correct[i] && !r.success[i])
            .count();
        Ok(robust as f64 / b.max(1) as f64)
    };
    let diameter = box_diameter(attack.norm, bounds, d);
    let mut eps_list = vec![eps];
    eps_list.extend(
        EPS_FACTORS
            .iter()
            .map(|f| f * eps)
            .filter(|&e| e < diameter),
    );
    eps_list.push(diameter);
    let mut eps_growth = Vec::with_capacity(eps_list.len());
    for (j, &e) in eps_list.iter().enumerate() {
        eps_growth.push(EpsPoint {
            eps: e,
            robust_accuracy: robust_at(&single, e, 1 + j as u64)?,
        });
    }
    let tolerance = (GROWTH_TOLERANCE * b as f64).max(1.0) / b.max(1) as f64;
    for w in eps_growth.windows(2) {
        if w[1].robust_accuracy > w[0].robust_accuracy + tolerance {
            issues.push(TrustIssue {
                check: "accuracy-rises-with-eps".into(),
                message: format!(
                    "robust accuracy rises from {:.1} % at ε = {:.4} to {:.1} % at ε = {:.4}: \
                     a larger ball contains the smaller one, so the attack is failing",
                    100.0 * w[0].robust_accuracy,
                    w[0].eps,
                    100.0 * w[1].robust_accuracy,
                    w[1].eps
                ),
            });
        }
    }
    if let Some(last) = eps_growth.last() {
        if last.robust_accuracy > UNBOUNDED_TOLERANCE {
            issues.push(TrustIssue {
                check: "unbounded-attack-fails".into(),
                message: format!(
                    "{:.1} % of the points stay robust at ε = {:.4}, where the ball covers the \
                     whole input box: the attack cannot reach inputs that certainly exist",
                    100.0 * last.robust_accuracy,
                    last.eps
                ),
            });
        }
    }

    // A larger step budget.
    let robust_accuracy = eps_growth[0].robust_accuracy;
    let stronger = Pgd {
        steps: single.steps * config.budget_factor.max(1),
        ..single
    };
    let stronger_robust_accuracy = robust_at(&stronger, eps, 101)?;
    if robust_accuracy - stronger_robust_accuracy > BUDGET_TOLERANCE {
        issues.push(TrustIssue {
            check: "larger-budget-finds-more".into(),
            message: format!(
                "{} steps leave {:.1} % robust, {} steps {:.1} %: the evaluated budget has not \
                 converged",
                single.steps,
                100.0 * robust_accuracy,
                stronger.steps,
                100.0 * stronger_robust_accuracy
            ),
        });
    }
    Ok(TrustChecks {
        points: b,
        attack: format!(
            "{} {} PGD-{} ({} start)",
            attack.norm, attack.objective, single.steps, single.restarts.first
        ),
        eps,
        model: model_report,
        noise_samples: config.noise_samples,
        noise_only,
        eps_growth,
        steps: single.steps,
        robust_accuracy,
        stronger_steps: stronger.steps,
        stronger_robust_accuracy,
        issues,
    })
}

/// What [`run_checks`] costs per checked image with `attack` and `config`: the model
/// checks, the clean and noisy judgements, one run of the attack (its first restart)
/// at ε, at each multiple of [`EPS_FACTORS`] and at the box's diameter (an upper
/// bound: multiples past the diameter are skipped), and the run with
/// `budget_factor` times its steps.
pub fn trust_cost(attack: &Pgd, config: &TrustConfig) -> rampart_attacks::Passes {
    let single = Pgd {
        restarts: Restarts {
            count: 1,
            ..attack.restarts
        },
        ..*attack
    };
    let stronger = Pgd {
        steps: single.steps * config.budget_factor.max(1),
        ..single
    };
    let judgements = (1 + config.noise_samples) * attack.eot.eval_samples.max(1);
    rampart_attacks::check_model_cost()
        + rampart_attacks::Passes::forward(judgements as f64)
        + single.cost() * (EPS_FACTORS.len() + 2) as f64
        + stronger.cost()
}

fn warning_kind(w: &rampart_attacks::TrustWarning) -> &'static str {
    use rampart_attacks::TrustWarning as W;
    match w {
        W::ZeroGradients { .. } => "zero-gradients",
        W::NanGradients { .. } => "nan-gradients",
        W::InfiniteGradients { .. } => "infinite-gradients",
        W::RandomOutputs { .. } => "random-outputs",
        W::SoftmaxOutputs => "softmax-outputs",
        W::BlackBoxBeatsWhiteBox { .. } => "black-box-beats-white-box",
    }
}

/// Whether each image is classified correctly, judged on the mean probabilities of
/// `samples` forward passes (one for a deterministic model).
fn correct_under(
    model: &dyn ModuleT,
    xs: &Tensor,
    labels: &[u32],
    samples: usize,
) -> Result<Vec<bool>> {
    let mut mean: Option<Tensor> = None;
    for _ in 0..samples.max(1) {
        let logits = model.forward_t(xs, false)?;
        let p = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        mean = Some(match mean {
            Some(m) => (m + p)?,
            None => p,
        });
    }
    let mean = mean.ok_or_else(|| EvalError::Config("no forward pass".into()))?;
    let pred = mean.argmax(1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).map(|(p, l)| p == l).collect())
}
