//! Objectives the attacks maximise, per example, and the input gradient of an
//! objective through a model.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, ModuleT, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A per-example objective computed from the logits f (p = softmax(f), y the label,
/// t the target class of a targeted criterion). Attacks **maximise** it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Objective {
    /// Cross-entropy −log p_y (untargeted).
    CrossEntropy,
    /// log p_t: the negative cross-entropy of the target class.
    CrossEntropyTargeted,
    /// Carlini–Wagner margin max_{k≠y} f_k − f_y.
    CwMargin,
    /// AutoAttack's difference of logits ratio
    /// −(f_y − max_{k≠y} f_k) / (f_π1 − f_π3 + 10⁻¹²), π the classes sorted by logit.
    /// Needs at least 3 classes.
    Dlr,
    /// Targeted DLR −(f_y − f_t) / (f_π1 − ½(f_π3 + f_π4) + 10⁻¹²). Needs at least 4
    /// classes.
    DlrTargeted,
    /// Confidence in the most likely wrong class, max_{k≠y} p_k (Stutz et al.'s attack
    /// against and inside CCAT).
    Conf,
    /// Confidence of the prediction in log space, max_k log p_k (distal examples).
    Distal,
}

const NAMES: [(&str, Objective); 7] = [
    ("ce", Objective::CrossEntropy),
    ("ce-targeted", Objective::CrossEntropyTargeted),
    ("cw", Objective::CwMargin),
    ("dlr", Objective::Dlr),
    ("dlr-targeted", Objective::DlrTargeted),
    ("conf", Objective::Conf),
    ("distal", Objective::Distal),
];

/// Large offset used to exclude the label from a maximum over classes; the offset
/// does not change the gradient of the entries it leaves untouched.
const EXCLUDE: f64 = 1e30;

impl Objective {
    /// The name `from_str` accepts.
    pub fn name(&self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, o)| o == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// Smallest number of classes the objective is defined for.
    pub fn min_classes(&self) -> usize {
        match self {
            Objective::Dlr => 3,
            Objective::DlrTargeted => 4,
            Objective::Distal => 1,
            _ => 2,
        }
    }

    /// Whether the objective needs a target class ([`crate::Criterion::Targeted`]).
    pub fn is_targeted(&self) -> bool {
        matches!(
            self,
            Objective::CrossEntropyTargeted | Objective::DlrTargeted
        )
    }

    /// Refuses a model with too few classes, labels or a target out of range.
    pub(crate) fn check_classes(&self, classes: usize, target: Option<u32>) -> Result<()> {
        if classes < self.min_classes() {
            return Err(Error::TooFewClasses {
                objective: self.name(),
                needed: self.min_classes(),
                classes,
            });
        }
        match (self.is_targeted(), target) {
            (true, None) => Err(Error::Config(format!(
                "objective `{}` is targeted and needs Criterion::Targeted",
                self.name()
            ))),
            (_, Some(t)) if t as usize >= classes => Err(Error::Input(format!(
                "target class {t} is out of range for {classes} classes"
            ))),
            _ => Ok(()),
        }
    }

    /// Per-example objective values.
    ///
    /// logits: (B, K) float; ys: (B,) u32 labels; target: the target class of targeted
    /// objectives (ignored otherwise). Returns (B,) in f32 (f64 for f64 logits),
    /// differentiable w.r.t. `logits`.
    pub fn values(&self, logits: &Tensor, ys: &Tensor, target: Option<u32>) -> Result<Tensor> {
        let (b, k) = logits.dims2()?;
        self.check_classes(k, target)?;
        let targets = target
            .map(|t| Tensor::full(t, b, logits.device()))
            .transpose()?;
        self.compute(logits, ys, targets.as_ref())
    }

    /// Per-example objective values with one target class per example (APGD-T attacks
    /// each example towards its own k-th most likely class).
    ///
    /// logits: (B, K) float; ys: (B,) u32 labels; targets: (B,) u32 target classes
    /// (used by targeted objectives, ignored otherwise). Returns (B,) as [`Self::values`].
    pub fn values_per_example(
        &self,
        logits: &Tensor,
        ys: &Tensor,
        targets: &Tensor,
    ) -> Result<Tensor> {
        let (b, k) = logits.dims2()?;
        let list = labels_to_vec(targets)?;
        if list.len() != b {
            return Err(Error::Input(format!(
                "{} targets for a batch of {b}",
                list.len()
            )));
        }
        let first = list.first().copied();
        self.check_classes(k, first)?;
        if let Some(t) = list.iter().find(|t| **t as usize >= k) {
            return Err(Error::Input(format!(
                "target class {t} is out of range for {k} classes"
            )));
        }
        self.compute(logits, ys, Some(&targets.to_dtype(DType::U32)?))
    }

    /// The values; `targets` (B,) u32 is present whenever the objective is targeted.
    fn compute(&self, logits: &Tensor, ys: &Tensor, targets: Option<&Tensor>) -> Result<Tensor> {
        let (b, k) = logits.dims2()?;
        let dtype = match logits.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let logits = logits.to_dtype(dtype)?;
        let dev = logits.device();
        let classes = Tensor::arange(0u32, k as u32, dev)?.unsqueeze(0)?;
        let one_hot = |idx: &Tensor| -> Result<Tensor> {
            Ok(classes.broadcast_eq(&idx.unsqueeze(1)?)?.to_dtype(dtype)?)
        };
        let ys = ys.to_dtype(DType::U32)?;
        let pick =
            |t: &Tensor| -> Result<Tensor> { Ok(t.gather(&ys.unsqueeze(1)?, 1)?.squeeze(1)?) };
        let max_other = |t: &Tensor| -> Result<Tensor> {
            Ok((t - (one_hot(&ys)? * EXCLUDE)?)?.max(D::Minus1)?)
        };
        // The one-hot rows are built only by the objectives that use them.
        let target_idx = || -> Result<Tensor> {
            match targets {
                Some(t) => Ok(t.unsqueeze(1)?),
                None => Ok(Tensor::zeros((b, 1), DType::U32, dev)?),
            }
        };
        let values = match self {
            Objective::CrossEntropy => {
                pick(&candle_nn::ops::log_softmax(&logits, D::Minus1)?)?.neg()?
            }
            Objective::CrossEntropyTargeted => candle_nn::ops::log_softmax(&logits, D::Minus1)?
                .gather(&target_idx()?, 1)?
                .squeeze(1)?,
            Objective::CwMargin => (max_other(&logits)? - pick(&logits)?)?,
            Objective::Dlr => {
                let (sorted, _) = logits.contiguous()?.sort_last_dim(false)?;
                let gap = (sorted.narrow(1, 0, 1)? - sorted.narrow(1, 2, 1)?)?.squeeze(1)?;
                let margin = (pick(&logits)? - max_other(&logits)?)?;
                (margin.neg()? / (gap + 1e-12)?)?
            }
            Objective::DlrTargeted => {
                let (sorted, _) = logits.contiguous()?.sort_last_dim(false)?;
                let tail = ((sorted.narrow(1, 2, 1)? + sorted.narrow(1, 3, 1)?)? * 0.5)?;
                let gap = (sorted.narrow(1, 0, 1)? - tail)?.squeeze(1)?;
                let f_t = logits.gather(&target_idx()?, 1)?.squeeze(1)?;
                let margin = (pick(&logits)? - f_t)?;
                (margin.neg()? / (gap + 1e-12)?)?
            }
            Objective::Conf => max_other(&candle_nn::ops::softmax(&logits, D::Minus1)?)?,
            Objective::Distal => candle_nn::ops::log_softmax(&logits, D::Minus1)?.max(D::Minus1)?,
        };
        Ok(values)
    }
}

/// The logits, objective values and (optionally) the input gradient of the summed
/// objective at `xs`; the model's weights are never updated (the gradient store that
/// also holds weight gradients is dropped).
pub(crate) struct Probe {
    pub logits: Tensor,
    pub values: Tensor,
    pub grad: Option<Tensor>,
}

pub(crate) fn probe(
    model: &dyn ModuleT,
    objective: Objective,
    xs: &Tensor,
    ys: &Tensor,
    target: Option<u32>,
    want_grad: bool,
) -> Result<Probe> {
    probe_with(model, xs, want_grad, |logits| {
        check_labels(ys, xs.dim(0)?, logits.dim(1)?)?;
        objective.values(logits, ys, target)
    })
}

/// As [`probe`], with the per-example values computed from the (B, K) logits by
/// `values` (which must return a (B,) tensor differentiable w.r.t. the logits).
pub(crate) fn probe_with(
    model: &dyn ModuleT,
    xs: &Tensor,
    want_grad: bool,
    values: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Probe> {
    let batch = xs.dim(0)?;
    let (input, var) = if want_grad {
        let var = Var::from_tensor(xs)?;
        (var.as_tensor().clone(), Some(var))
    } else {
        (xs.detach(), None)
    };
    let logits = model.forward_t(&input, false)?;
    let (b, _) = logits.dims2().map_err(|_| {
        Error::Input(format!(
            "the model must return (B, K) logits, got shape {:?}",
            logits.dims()
        ))
    })?;
    if b != batch {
        return Err(Error::Input(format!(
            "the model returned {b} rows of logits for a batch of {batch}"
        )));
    }
    let values = values(&logits)?;
    let grad = match var {
        Some(var) => {
            // Only the input gradient is read: a model whose parameters are untracked
            // (a frozen view, `rampart_models::Classifier::frozen`) computes no other.
            let loss = values.sum_all()?;
            let grads = loss.backward()?;
            Some(match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                // The output does not depend on the input: the gradient is zero.
                None => xs.zeros_like()?,
            })
        }
        None => None,
    };
    Ok(Probe {
        logits: logits.to_dtype(DType::F32)?,
        values,
        grad,
    })
}

/// Checks that `ys` holds `batch` labels in `[0, classes)`.
pub(crate) fn check_labels(ys: &Tensor, batch: usize, classes: usize) -> Result<()> {
    check_label_values(&labels_to_vec(ys)?, batch, classes)
}

/// Checks that `labels` (read from the device already) are `batch` labels in
/// `[0, classes)`.
pub(crate) fn check_label_values(labels: &[u32], batch: usize, classes: usize) -> Result<()> {
    if labels.len() != batch {
        return Err(Error::Input(format!(
            "{} labels for a batch of {batch}",
            labels.len()
        )));
    }
    if let Some((i, y)) = labels
        .iter()
        .enumerate()
        .find(|(_, y)| **y as usize >= classes)
    {
        return Err(Error::Input(format!(
            "label {y} at index {i} is out of range for {classes} classes"
        )));
    }
    Ok(())
}

/// Labels as u32, refusing anything but a rank-1 integer tensor of non-negative values.
pub(crate) fn labels_to_vec(ys: &Tensor) -> Result<Vec<u32>> {
    if ys.rank() != 1 {
        return Err(Error::Input(format!(
            "labels must have shape (B,), got {:?}",
            ys.dims()
        )));
    }
    match ys.dtype() {
        DType::U32 => Ok(ys.to_vec1::<u32>()?),
        DType::U8 => Ok(ys.to_vec1::<u8>()?.into_iter().map(u32::from).collect()),
        DType::I64 => ys
            .to_vec1::<i64>()?
            .into_iter()
            .map(|y| {
                u32::try_from(y).map_err(|_| Error::Input(format!("label {y} is out of range")))
            })
            .collect(),
        other => Err(Error::Input(format!(
            "labels must be an integer tensor (u8, u32 or i64), got {other:?}"
        ))),
    }
}

/// Per-example objective values and their gradient with respect to the input: the
/// building block of every attack here, public for gradient-masking diagnostics
/// (a zero or NaN gradient on a model that is not robust is a red flag).
///
/// xs: (B, ...) inputs; ys: (B,) integer labels in `[0, K)`; target: the target class
/// of targeted objectives. Returns (values (B,) in f32, f64 for an f64 model; gradient
/// with the shape and dtype of `xs`). The model is called as `forward_t(x, false)`; its weights are untouched.
pub fn input_gradient(
    model: &dyn ModuleT,
    objective: Objective,
    xs: &Tensor,
    ys: &Tensor,
    target: Option<u32>,
) -> Result<(Tensor, Tensor)> {
    let probe = probe(model, objective, xs, ys, target, true)?;
    let grad = probe.grad.unwrap_or(xs.zeros_like()?);
    Ok((probe.values, grad))
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Objective {
    type Err = Error;

    /// `ce`, `ce-targeted`, `cw`, `dlr`, `dlr-targeted`, `conf`, `distal`.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        NAMES
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, o)| *o)
            .ok_or_else(|| Error::UnknownName {
                kind: "objective",
                name: s.to_string(),
                expected: "ce, ce-targeted, cw, dlr, dlr-targeted, conf, distal",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Mlp;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const ALL: [Objective; 7] = [
        Objective::CrossEntropy,
        Objective::CrossEntropyTargeted,
        Objective::CwMargin,
        Objective::Dlr,
        Objective::DlrTargeted,
        Objective::Conf,
        Objective::Distal,
    ];

    /// Values on hand-computed logits: f = (2, 1, 0, −1), y = 0, t = 3.
    #[test]
    fn values_match_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 1.0, 0.0, -1.0]], &dev)?;
        let ys = Tensor::new(&[0u32], &dev)?;
        let z: f64 = [2.0f64, 1.0, 0.0, -1.0].iter().map(|f| f.exp()).sum();
        let log_p = |f: f64| f - z.ln();
        let expected = [
            (Objective::CrossEntropy, -log_p(2.0)),
            (Objective::CrossEntropyTargeted, log_p(-1.0)),
            (Objective::CwMargin, 1.0 - 2.0),
            (Objective::Dlr, -(2.0 - 1.0) / (2.0 - 0.0)),
            (
                Objective::DlrTargeted,
                -(2.0 - -1.0) / (2.0 - 0.5 * (0.0 + -1.0)),
            ),
            (Objective::Conf, log_p(1.0).exp()),
            (Objective::Distal, log_p(2.0)),
        ];
        for (objective, want) in expected {
            let got = objective.values(&logits, &ys, Some(3))?.to_vec1::<f32>()?[0] as f64;
            assert!((got - want).abs() < 1e-5, "{objective}: {got} vs {want}");
        }
        Ok(())
    }

    /// One target per example gives, row by row, the values of that single target.
    #[test]
    fn per_example_targets_match_single_targets() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(
            &[
                [2f32, 1.0, 0.0, -1.0],
                [0.5, -0.5, 3.0, 1.0],
                [1.0, 1.0, 0.0, 2.0],
            ],
            &dev,
        )?;
        let ys = Tensor::new(&[0u32, 2, 3], &dev)?;
        let targets = Tensor::new(&[3u32, 0, 1], &dev)?;
        for objective in [Objective::DlrTargeted, Objective::CrossEntropyTargeted] {
            let joint = objective
                .values_per_example(&logits, &ys, &targets)?
                .to_vec1::<f32>()?;
            for (i, t) in [3u32, 0, 1].into_iter().enumerate() {
                let single = objective.values(&logits, &ys, Some(t))?.to_vec1::<f32>()?[i];
                assert_eq!(joint[i], single, "{objective}, row {i}");
            }
        }
        let out_of_range = Tensor::new(&[3u32, 4, 1], &dev)?;
        assert!(Objective::DlrTargeted
            .values_per_example(&logits, &ys, &out_of_range)
            .is_err());
        let short = Tensor::new(&[3u32], &dev)?;
        assert!(Objective::DlrTargeted
            .values_per_example(&logits, &ys, &short)
            .is_err());
        Ok(())
    }

    #[test]
    fn too_few_classes_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let two = Tensor::new(&[[1f32, 0.0]], &dev)?;
        let three = Tensor::new(&[[1f32, 0.0, 2.0]], &dev)?;
        let ys = Tensor::new(&[0u32], &dev)?;
        assert!(matches!(
            Objective::Dlr.values(&two, &ys, None),
            Err(Error::TooFewClasses {
                needed: 3,
                classes: 2,
                ..
            })
        ));
        assert!(Objective::Dlr.values(&three, &ys, None).is_ok());
        assert!(matches!(
            Objective::DlrTargeted.values(&three, &ys, Some(1)),
            Err(Error::TooFewClasses {
                needed: 4,
                classes: 3,
                ..
            })
        ));
        assert!(Objective::CrossEntropyTargeted
            .values(&three, &ys, None)
            .is_err());
        assert!(Objective::CrossEntropyTargeted
            .values(&three, &ys, Some(3))
            .is_err());
        Ok(())
    }

    /// The autodiff input gradient of every objective agrees with central finite
    /// differences, on an f64 MLP at random inputs.
    #[test]
    fn input_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let model = Mlp::random(&[12, 16, 5], 7, DType::F64)?;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let b = 3;
        let x: Vec<f64> = (0..b * 12).map(|_| rng.gen()).collect();
        let xs = Tensor::from_vec(x.clone(), (b, 3, 2, 2), &dev)?;
        let ys = Tensor::new(&[0u32, 2, 4], &dev)?;
        for objective in ALL {
            let (values, grad) = input_gradient(&model, objective, &xs, &ys, Some(1))?;
            assert_eq!(values.dims(), &[b]);
            assert_eq!(grad.dims(), xs.dims());
            let grad: Vec<f64> = grad.flatten_all()?.to_vec1()?;
            let h = 1e-6;
            for j in 0..x.len() {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[j] += h;
                down[j] -= h;
                let f = |x: Vec<f64>| -> Result<Vec<f64>> {
                    let xs = Tensor::from_vec(x, (b, 3, 2, 2), &dev)?;
                    let logits = model.forward_t(&xs, false)?.to_vec2::<f64>()?;
                    Ok(objective_f64(objective, &logits, &[0, 2, 4], 1))
                };
                let i = j / 12;
                let fd = (f(up)?[i] - f(down)?[i]) / (2.0 * h);
                let tol = 1e-4 + 1e-3 * fd.abs();
                assert!(
                    (grad[j] - fd).abs() < tol,
                    "{objective}: coordinate {j}: autodiff {} vs finite difference {fd}",
                    grad[j]
                );
            }
        }
        Ok(())
    }

    /// The objectives in f64 straight from their definitions, for finite differences.
    fn objective_f64(
        objective: Objective,
        logits: &[Vec<f64>],
        ys: &[usize],
        t: usize,
    ) -> Vec<f64> {
        logits
            .iter()
            .zip(ys)
            .map(|(f, &y)| {
                let m = f.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + f.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let other = f
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| *k != y)
                    .map(|(_, v)| *v)
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut sorted = f.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                match objective {
                    Objective::CrossEntropy => lse - f[y],
                    Objective::CrossEntropyTargeted => f[t] - lse,
                    Objective::CwMargin => other - f[y],
                    Objective::Dlr => -(f[y] - other) / (sorted[0] - sorted[2] + 1e-12),
                    Objective::DlrTargeted => {
                        -(f[y] - f[t]) / (sorted[0] - 0.5 * (sorted[2] + sorted[3]) + 1e-12)
                    }
                    Objective::Conf => (other - lse).exp(),
                    Objective::Distal => m - lse,
                }
            })
            .collect()
    }

    #[test]
    fn names_parse_and_print() -> Result<()> {
        for objective in ALL {
            assert_eq!(objective.to_string().parse::<Objective>()?, objective);
        }
        assert_eq!("CE".parse::<Objective>()?, Objective::CrossEntropy);
        assert!("margin".parse::<Objective>().is_err());
        Ok(())
    }
}
