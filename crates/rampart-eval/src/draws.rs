//! A stochastic model (noise injected at test time) over independent noise draws:
//! the clean accuracy of every draw and, after an attack, the robust accuracy of the
//! attacked images within each draw, reported as mean ± standard deviation
//! (`rampart eval --suite clean|pgd20` on a stochastic student).

use candle_core::{ModuleT, D};
use rampart_data::ImageDataset;
use rampart_models::Classifier;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::robust::WorstCase;

/// How a stochastic model fared over independent noise draws.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StochasticFigures {
    /// The noise scale evaluated (1 = as trained).
    pub noise_scale: f32,
    /// Independent noise draws.
    pub draws: usize,
    /// EOT samples of the attack (gradients averaged per step; draws judging success).
    pub eot_samples: usize,
    /// Clean accuracy of each draw.
    pub clean_accuracy_draws: Vec<f64>,
    /// Their mean and standard deviation.
    pub clean_accuracy_mean: f64,
    /// Standard deviation (n − 1) over draws; 0 for one draw.
    pub clean_accuracy_std: f64,
    /// Robust accuracy of each draw: the attacked image is classified correctly clean
    /// and under every attack's adversarial example within that draw.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub robust_accuracy_draws: Vec<f64>,
    /// Their mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_mean: Option<f64>,
    /// Their standard deviation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_std: Option<f64>,
    /// Mean over draws of the clean accuracy on the attacked images alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attacked_clean_accuracy_mean: Option<f64>,
    /// Robust accuracy judged by the attack's own EOT rule (mean probabilities over
    /// `eot_samples` draws).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_eot: Option<f64>,
}

/// How to run [`over_noise_draws`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoiseDraws {
    /// Independent noise draws (at least 1).
    pub draws: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Seed; draw d reseeds the noise with `seed + 0x9e3779b97f4a7c15·(d + 1)`
    /// (wrapping).
    pub seed: u64,
    /// EOT samples the attack used (recorded in the figures).
    pub eot_samples: usize,
}

impl NoiseDraws {
    /// The noise seed of draw `draw`.
    pub fn seed_of(&self, draw: usize) -> u64 {
        self.seed
            .wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(draw as u64 + 1))
    }
}

/// Mean and sample standard deviation ([`rampart_metrics::mean_std`]), with a standard
/// deviation of 0 for a single value (one noise draw) and (0, 0) for none.
fn mean_std(values: &[f64]) -> Result<(f64, f64)> {
    Ok(match values {
        [] => (0.0, 0.0),
        [v] => (*v, 0.0),
        _ => rampart_metrics::mean_std(values).map_err(EvalError::metric("mean ± std"))?,
    })
}

/// Predicted classes (first arg-max) of every image of `data`, in batches.
fn predicted(model: &Classifier, data: &ImageDataset, batch_size: usize) -> Result<Vec<u32>> {
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(data.len());
    for chunk in indices.chunks(batch_size) {
        crate::error::check_interrupt()?;
        let (images, _) = data.batch_tensors(chunk, model.device())?;
        let logits = model.frozen().forward_t(&images, false)?;
        out.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    Ok(out)
}

/// Clean and robust accuracy of a stochastic model over `config.draws` independent
/// noise draws: each draw reseeds the noise ([`NoiseDraws::seed_of`]), classifies
/// every image of `data` and, when there was an attack (`attacked`, which must have
/// kept its adversarial images), the attacked images under every attack's adversarial
/// example (robust in a draw: correct clean and under all of them). Each draw is
/// logged (`noise draw`, with its clean accuracy) as it finishes.
pub fn over_noise_draws(
    model: &Classifier,
    data: &ImageDataset,
    attacked: Option<&WorstCase>,
    config: &NoiseDraws,
) -> Result<StochasticFigures> {
    if config.batch_size == 0 {
        return Err(EvalError::Config(
            "evaluation batch size must be at least 1".into(),
        ));
    }
    let labels = data.labels();
    let mut clean = Vec::with_capacity(config.draws);
    let mut robust = Vec::new();
    let mut attacked_clean = Vec::new();
    for draw in 0..config.draws {
        model.reseed_noise(config.seed_of(draw));
        let predicted = predicted(model, data, config.batch_size)?;
        let correct = |i: usize| predicted[i] == labels[i];
        let ok = (0..data.len()).filter(|&i| correct(i)).count();
        clean.push(if data.is_empty() {
            0.0
        } else {
            ok as f64 / data.len() as f64
        });
        if let Some(a) = attacked {
            let mut ok = 0usize;
            for (rows, advs) in &a.adversarial {
                let mut right = vec![true; rows.len()];
                for adv in advs {
                    let under_attack = model
                        .frozen()
                        .forward_t(adv, false)?
                        .argmax(1)?
                        .to_vec1::<u32>()?;
                    for (j, (&i, &pred)) in rows.iter().zip(&under_attack).enumerate() {
                        right[j] &= pred == labels[i];
                    }
                }
                ok += rows
                    .iter()
                    .enumerate()
                    .filter(|&(j, &i)| correct(i) && right[j])
                    .count();
            }
            let n = a.robust.len();
            robust.push(ok as f64 / n.max(1) as f64);
            let clean_ok = (0..n).filter(|&i| correct(i)).count();
            attacked_clean.push(clean_ok as f64 / n.max(1) as f64);
        }
        tracing::info!(draw, clean_accuracy = clean[draw], "noise draw");
    }
    let (clean_mean, clean_std) = mean_std(&clean)?;
    let (robust_mean, robust_std) = mean_std(&robust)?;
    let (attacked_clean_mean, _) = mean_std(&attacked_clean)?;
    let has_attack = attacked.is_some();
    Ok(StochasticFigures {
        noise_scale: model.noise_scale(),
        draws: config.draws,
        eot_samples: config.eot_samples,
        clean_accuracy_draws: clean,
        clean_accuracy_mean: clean_mean,
        clean_accuracy_std: clean_std,
        robust_accuracy_draws: robust,
        robust_accuracy_mean: has_attack.then_some(robust_mean),
        robust_accuracy_std: has_attack.then_some(robust_std),
        attacked_clean_accuracy_mean: has_attack.then_some(attacked_clean_mean),
        robust_accuracy_eot: attacked
            .map(|a| a.robust.iter().filter(|&&c| c).count() as f64 / a.robust.len().max(1) as f64),
    })
}
