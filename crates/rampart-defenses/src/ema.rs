//! An exponential moving average (EMA) of a model's weights.

use rampart_models::Classifier;

use crate::error::{DefenseError, Result};

/// A shadow copy of a model whose every variable follows
/// e ← decay·e + (1 − decay)·w after each optimiser step, starting from the weights at
/// step 0. BatchNorm running statistics are averaged the same way (as timm's
/// `ModelEmaV2` does with the whole state), so the shadow is a complete, evaluable model.
pub struct Ema {
    decay: f64,
    model: Classifier,
}

impl std::fmt::Debug for Ema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ema")
            .field("decay", &self.decay)
            .finish_non_exhaustive()
    }
}

impl Ema {
    /// Checks a decay: it must lie in [0, 1).
    pub fn check_decay(decay: f64) -> Result<()> {
        if !(0.0..1.0).contains(&decay) {
            return Err(DefenseError::Config(format!(
                "EMA decay must lie in [0, 1), got {decay}"
            )));
        }
        Ok(())
    }

    /// An average starting at `model`'s current weights.
    pub fn new(model: &Classifier, decay: f64) -> Result<Self> {
        Self::check_decay(decay)?;
        let shadow = Classifier::new(model.spec().clone(), 0, model.device())?;
        shadow.copy_weights_from(model)?;
        Ok(Self {
            decay,
            model: shadow,
        })
    }

    /// The decay.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// The averaged model.
    pub fn model(&self) -> &Classifier {
        &self.model
    }

    /// One step: e ← decay·e + (1 − decay)·w for every variable.
    pub fn update(&self, model: &Classifier) -> Result<()> {
        for ((name, e), (other, w)) in self.model.named_vars().iter().zip(model.named_vars()) {
            if *name != other {
                return Err(DefenseError::Config(format!(
                    "EMA and model disagree: `{name}` vs `{other}`"
                )));
            }
            let next = ((e.as_tensor() * self.decay)? + (w.as_tensor() * (1.0 - self.decay))?)?;
            e.set(&next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::testutil::tiny_model;
    use crate::TestResult;
    use candle_core::Tensor;

    fn values(model: &Classifier, name: &str) -> Vec<f32> {
        model
            .named_vars()
            .into_iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_tensor().flatten_all().ok()?.to_vec1::<f32>().ok())
            .unwrap_or_default()
    }

    /// After w₀ and two steps to w₁, w₂: e = d²·w₀ + d(1 − d)·w₁ + (1 − d)·w₂.
    #[test]
    fn update_follows_the_formula() -> TestResult {
        let model = tiny_model(2, 1);
        let d = 0.9;
        let ema = Ema::new(&model, d)?;
        let (name, var) = model
            .named_vars()
            .into_iter()
            .next()
            .ok_or("no variables")?;
        let w0 = values(&model, &name);
        let w1: Vec<f32> = w0.iter().map(|v| v + 1.0).collect();
        let w2: Vec<f32> = w0.iter().map(|v| 2.0 * v - 3.0).collect();
        for w in [&w1, &w2] {
            var.set(&Tensor::from_slice(w, var.dims(), var.device())?)?;
            ema.update(&model)?;
        }
        let got = values(ema.model(), &name);
        for i in 0..w0.len() {
            let want = d * d * f64::from(w0[i])
                + d * (1.0 - d) * f64::from(w1[i])
                + (1.0 - d) * f64::from(w2[i]);
            assert!(
                (f64::from(got[i]) - want).abs() < 1e-5,
                "{} vs {want}",
                got[i]
            );
        }
        // Variables that did not move stay equal to the model's.
        let (other, _) = model
            .named_vars()
            .into_iter()
            .nth(1)
            .ok_or("one variable")?;
        assert_eq!(values(ema.model(), &other), values(&model, &other));
        assert!(Ema::new(&model, 1.0).is_err());
        assert!(Ema::new(&model, -0.1).is_err());
        Ok(())
    }
}
