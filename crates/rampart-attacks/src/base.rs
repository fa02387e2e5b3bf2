//! The attack trait (one ε written by each attack, the ε loop, validation, clipping
//! and judgement written once), its single result type, and the values every attack
//! is given: input bounds, a success criterion and ε.

use std::fmt;
use std::str::FromStr;

use candle_core::{ModuleT, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::norm::Norm;
use crate::problem::{Outcome, Problem};

/// Box the inputs live in: every coordinate of a clean or adversarial input lies in
/// `[lo, hi]`. A value of the data, passed with each call, never a hard-coded `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// Smallest value of a coordinate.
    pub lo: f32,
    /// Largest value of a coordinate.
    pub hi: f32,
}

impl Bounds {
    /// Images scaled to `[0, 1]`.
    pub const UNIT: Bounds = Bounds { lo: 0.0, hi: 1.0 };

    /// Bounds `[lo, hi]`; refused unless both are finite and `lo < hi`.
    pub fn new(lo: f32, hi: f32) -> Result<Self> {
        let bounds = Bounds { lo, hi };
        bounds.validate()?;
        Ok(bounds)
    }

    /// `hi − lo`.
    pub fn width(&self) -> f32 {
        self.hi - self.lo
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.lo.is_finite() && self.hi.is_finite() && self.lo < self.hi) {
            return Err(Error::Config(format!(
                "bounds must be finite with lo < hi, got [{}, {}]",
                self.lo, self.hi
            )));
        }
        Ok(())
    }
}

/// When an adversarial input counts as a success. Judged on class probabilities
/// (for a stochastic model, the mean probabilities over several forward passes).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Criterion {
    /// The predicted class (first arg-max) differs from the label.
    Misclassified,
    /// The predicted class is this target class.
    Targeted(u32),
    /// Misclassified with confidence (max probability) at least τ.
    ConfidentlyMisclassified(f32),
    /// Confidence at least τ, whatever the class (distal examples: every class is
    /// wrong for an input that is not an image of any class).
    Confident(f32),
}

impl Criterion {
    /// Whether an input with class probabilities `probs` (K,) and label `label` is a
    /// success.
    pub fn is_success(&self, probs: &[f32], label: u32) -> bool {
        let (pred, conf) = argmax(probs);
        match *self {
            Criterion::Misclassified => pred != label,
            Criterion::Targeted(t) => pred == t,
            Criterion::ConfidentlyMisclassified(tau) => pred != label && conf >= tau,
            Criterion::Confident(tau) => conf >= tau,
        }
    }

    /// The target class of a targeted criterion.
    pub fn target(&self) -> Option<u32> {
        match *self {
            Criterion::Targeted(t) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            Criterion::ConfidentlyMisclassified(tau) | Criterion::Confident(tau)
                if !(0.0..=1.0).contains(&tau) =>
            {
                Err(Error::Config(format!(
                    "confidence threshold τ must lie in [0, 1], got {tau}"
                )))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Criterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Criterion::Misclassified => write!(f, "misclassified"),
            Criterion::Targeted(t) => write!(f, "targeted:{t}"),
            Criterion::ConfidentlyMisclassified(tau) => {
                write!(f, "confidently-misclassified:{tau}")
            }
            Criterion::Confident(tau) => write!(f, "confident:{tau}"),
        }
    }
}

impl FromStr for Criterion {
    type Err = Error;

    /// `misclassified`, `targeted:<class>`, `confidently-misclassified:<τ>`,
    /// `confident:<τ>`.
    fn from_str(s: &str) -> Result<Self> {
        const EXPECTED: &str =
            "misclassified, targeted:<class>, confidently-misclassified:<tau>, confident:<tau>";
        let unknown = || Error::UnknownName {
            kind: "criterion",
            name: s.to_string(),
            expected: EXPECTED,
        };
        let lower = s.trim().to_ascii_lowercase();
        let (name, arg) = match lower.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (lower.as_str(), None),
        };
        let criterion = match (name, arg) {
            ("misclassified", None) => Criterion::Misclassified,
            ("targeted", Some(a)) => Criterion::Targeted(a.parse().map_err(|_| unknown())?),
            ("confidently-misclassified", Some(a)) => {
                Criterion::ConfidentlyMisclassified(a.parse().map_err(|_| unknown())?)
            }
            ("confident", Some(a)) => Criterion::Confident(a.parse().map_err(|_| unknown())?),
            _ => return Err(unknown()),
        };
        criterion.validate()?;
        Ok(criterion)
    }
}

/// First arg-max and the maximum of `probs`.
pub(crate) fn argmax(probs: &[f32]) -> (u32, f32) {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (k, &p) in probs.iter().enumerate() {
        if p > best.1 {
            best = (k as u32, p);
        }
    }
    best
}

/// What an attack returns for one ε. Per-example vectors have length B.
#[derive(Clone, Debug)]
pub struct AttackResult {
    /// (B, ...) the attack's own output where it may lie outside the threat model
    /// (FAB: the smallest adversarial input found, of any norm), `None` for attacks
    /// whose every iterate is feasible (PGD, APGD, Square, the ensemble), where it
    /// would only repeat `clipped`.
    pub unconstrained: Option<Tensor>,
    /// (B, ...) the adversarial inputs projected onto the ε-ball and the bounds:
    /// ‖clipped − x‖_p ≤ ε and lo ≤ clipped ≤ hi hold exactly.
    pub clipped: Tensor,
    /// Per example: the criterion holds on `clipped` (judged on fresh forward passes).
    pub success: Vec<bool>,
    /// Per example: max softmax probability on `clipped`.
    pub confidence: Vec<f32>,
    /// Per example: predicted class on `clipped`.
    pub predicted: Vec<u32>,
    /// Per example: ‖clipped − x‖_p in the attack's norm (L0 counts changed values).
    pub norm: Vec<f32>,
    /// Per example: gradient steps taken, summed over restarts.
    pub iterations: Vec<usize>,
    /// The ε this result belongs to.
    pub eps: f64,
}

/// What [`Attack::perturb`] returns for one ε: the points of [`AttackResult`] without
/// its judgement. Per-example vectors have length B.
#[derive(Clone, Debug)]
pub struct Perturbed {
    /// (B, ...) the adversarial inputs projected onto the ε-ball and the bounds, the
    /// very values [`Attack::run`] returns as `clipped` for the same seed.
    pub clipped: Tensor,
    /// Per example: ‖clipped − x‖_p in the attack's norm (L0 counts changed values).
    pub norm: Vec<f32>,
    /// Per example: gradient steps taken, summed over restarts.
    pub iterations: Vec<usize>,
    /// The ε these points belong to.
    pub eps: f64,
}

/// The points of a training attack whose checks of the batch are left on the device
/// ([`Attack::perturb_unchecked`]).
#[derive(Debug)]
pub struct Unchecked {
    /// (B, ...) the points: [`Perturbed::clipped`] of the same call, bit for bit.
    pub clipped: Tensor,
    /// The checks not read yet (the device-resident loop's), or None where they were
    /// made already.
    pub faults: Option<Faults>,
}

/// A training attack's checks of its batch, still on the device: the largest over the
/// batch's examples of [an input NaN or out of bounds, a label of K or more, NaN
/// probabilities at a judged point, the distance of a point from its input beyond ε],
/// four f64 values, each > 0 for a fault. Several batches' faults merge into one
/// tensor (their maximum), which a trainer reads with its loss once per logging
/// interval: no wait for the device inside a training step.
#[derive(Clone, Debug)]
pub struct Faults(Tensor);

impl Faults {
    /// Values of [`Faults::tensor`].
    pub const LEN: usize = 4;

    /// The faults of a verdict reduced on the device (see `engine/resident.rs`).
    pub(crate) fn new(values: Tensor) -> Faults {
        Faults(values)
    }

    /// The faults whose [`Faults::tensor`] is `values` (a (4) f64 tensor, e.g. a copy
    /// of faults kept in a buffer a CUDA graph writes).
    pub fn from_tensor(values: Tensor) -> Result<Faults> {
        if values.dims() != [Self::LEN] || values.dtype() != candle_core::DType::F64 {
            return Err(Error::Input(format!(
                "a training attack's checks are a ({}) f64 tensor, not {:?} {:?}",
                Self::LEN,
                values.dims(),
                values.dtype()
            )));
        }
        Ok(Faults(values))
    }

    /// The (4) f64 tensor of the faults, on the batch's device.
    pub fn tensor(&self) -> &Tensor {
        &self.0
    }

    /// The faults of this batch and of `other`: their maximum (one launch).
    pub fn merge(&self, other: &Faults) -> Result<Faults> {
        Ok(Faults(self.0.maximum(&other.0)?))
    }

    /// The error that the values of [`Faults::tensor`], read, stand for (in the
    /// order the attack checks: inputs, labels, logits, distances), or None.
    pub fn error(values: &[f64]) -> Option<Error> {
        if values.len() != Self::LEN {
            return Some(Error::Input(format!(
                "{} values of a training attack's checks, expected {}",
                values.len(),
                Self::LEN
            )));
        }
        let fault = |v: f64| v > 0.0 || v.is_nan();
        if fault(values[0]) {
            return Some(Error::Input(
                "an input of a training batch is NaN or outside the model's bounds (found by \
                 the training attack's checks on the device)"
                    .into(),
            ));
        }
        if fault(values[1]) {
            return Some(Error::Input(
                "a label of a training batch is not below the model's number of classes \
                 (found by the training attack's checks on the device)"
                    .into(),
            ));
        }
        if fault(values[2]) {
            return Some(crate::batch::nan_logits());
        }
        if fault(values[3]) {
            return Some(Error::Input(format!(
                "a training attack's point lies {} beyond its ε-ball",
                values[3]
            )));
        }
        None
    }
}

/// An attack: a configuration that, given a model and a batch, returns one
/// [`AttackResult`] per ε, in the order of `eps` (foolbox's `FixedEpsilonAttack`).
///
/// An attack writes only the work of one ε, [`Attack::attack_eps`], and says how its
/// results are measured and judged ([`Attack::norm`], [`Attack::criterion`],
/// [`Attack::eval_samples`]). The provided [`Attack::run`] does the rest once for
/// every attack: it validates the configuration, the bounds and every ε, prepares the
/// [`Problem`] (inputs, labels and model output checked), then per ε calls
/// `attack_eps`, projects any point outside the ε-ball onto the ε-ball ∩ box, and
/// judges the points on fresh forward passes. Restarts are [`crate::Repeated`]'s.
pub trait Attack {
    /// The threat model: ε is a bound in this norm, and results are measured and
    /// clipped in it.
    fn norm(&self) -> Norm;

    /// When an example counts as fooled (judged on the mean class probabilities of
    /// [`Attack::eval_samples`] passes). Misclassification unless overridden.
    fn criterion(&self) -> Criterion {
        Criterion::Misclassified
    }

    /// Forward passes averaged to judge the returned points (several for stochastic
    /// models, see [`crate::Eot`]). One unless overridden.
    fn eval_samples(&self) -> usize {
        1
    }

    /// Refuses an inconsistent configuration, before any forward pass.
    fn validate(&self) -> Result<()>;

    /// Refuses a problem the attack cannot work on (too few classes, inputs that are
    /// not images, …), after the inputs were validated and before the first ε.
    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        let _ = problem;
        Ok(())
    }

    /// The attack at one budget `eps` (already checked) on a validated problem: one
    /// point per example. Runs with the same `seed` at every ε.
    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome>;

    /// Attacks `model` (always called as `forward_t(x, false)`, returning (B, K) logits).
    ///
    /// xs: (B, ...) clean inputs, every value in `bounds`, no NaN.
    /// ys: (B,) integer labels in `[0, K)`.
    /// eps: one or more budgets; each is attacked independently with the same seed.
    fn run(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        eps: &[f64],
        seed: u64,
    ) -> Result<Vec<AttackResult>> {
        // The model's weights cannot change during an attack: the fused GPU program keeps
        // its reordered kernels for the run (`rampart_models::frozen_weights`).
        #[cfg(feature = "cuda")]
        let _weights = rampart_models::frozen_weights();
        let problem = checked_problem(self, model, bounds, xs, ys, eps, None)?;
        eps.iter()
            .map(|&e| {
                let outcome = self.attack_eps(&problem, e, seed)?;
                problem.judge(self, outcome, e)
            })
            .collect()
    }

    /// The points of [`Attack::run`] at one budget `eps`, without its judgement: the
    /// same `clipped` inputs (bit for bit, for the same seed), their distances and the
    /// steps taken, but no success, prediction or confidence, and so without the
    /// final forward pass over the batch (`eval_samples` passes per image) that
    /// computes them. What adversarial training needs of its attack. The same checks
    /// as `run`.
    fn perturb(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        eps: f64,
        seed: u64,
    ) -> Result<Perturbed> {
        perturbed(self, model, bounds, (xs, ys), eps, seed, None)
    }

    /// [`Attack::perturb`] for a model known to return `classes` logits per example:
    /// the one-image forward pass that otherwise learns K before the attack is skipped
    /// (on a GPU it costs a whole network's kernel launches, once per training step
    /// of an adversarial method). The attack's passes still check the logits' shape,
    /// so a wrong `classes` is an error, not a wrong result.
    #[allow(clippy::too_many_arguments)]
    fn perturb_with_classes(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        eps: f64,
        seed: u64,
        classes: usize,
    ) -> Result<Perturbed> {
        match self.resident_pgd() {
            Some(pgd) => crate::engine::perturb_on_device_or_host(
                self,
                &pgd,
                model,
                bounds,
                (xs, ys),
                (eps, seed, classes),
            ),
            None => perturbed(self, model, bounds, (xs, ys), eps, seed, Some(classes)),
        }
    }

    /// [`Attack::perturb_with_classes`] without waiting for its checks: where the
    /// batch stays on the device (PGD's device-resident loop, L∞, f32 inputs), the
    /// checks of its inputs, labels and logits come back unread in
    /// [`Unchecked::faults`], for the caller to read later with other values (the
    /// trainer reads them with its loss, once per logging interval) and so nothing
    /// waits for the device; elsewhere the checks are made as `perturb_with_classes`
    /// makes them and `faults` is None. The same points, bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn perturb_unchecked(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        eps: f64,
        seed: u64,
        classes: usize,
    ) -> Result<Unchecked> {
        match self.resident_pgd() {
            Some(pgd) => crate::engine::unchecked_on_device_or_host(
                self,
                &pgd,
                model,
                bounds,
                (xs, ys),
                (eps, seed, classes),
            ),
            None => Ok(Unchecked {
                clipped: perturbed(self, model, bounds, (xs, ys), eps, seed, Some(classes))?
                    .clipped,
                faults: None,
            }),
        }
    }

    /// This attack as the PGD configuration that PGD's device-resident loop runs for
    /// [`Attack::perturb_with_classes`] and [`Attack::perturb_unchecked`] (PGD itself,
    /// FGSM as one step), where the loop applies (an L∞ configuration, f32 inputs;
    /// see `engine/resident.rs`); None (the default): always the host path.
    fn resident_pgd(&self) -> Option<crate::Pgd> {
        None
    }
}

/// The checks of the settings alone, which [`Attack::run`] and [`Attack::perturb`]
/// make first: the configuration, the criterion, the bounds and every ε (at least
/// one).
pub(crate) fn check_settings<A: Attack + ?Sized>(
    attack: &A,
    bounds: Bounds,
    eps: &[f64],
) -> Result<()> {
    attack.validate()?;
    attack.criterion().validate()?;
    bounds.validate()?;
    if eps.is_empty() {
        return Err(Error::Config("no ε given".into()));
    }
    for &e in eps {
        attack.norm().check_eps(e)?;
    }
    Ok(())
}

/// [`Attack::perturb`], K learnt from a forward pass unless `classes` gives it.
pub(crate) fn perturbed<A: Attack + ?Sized>(
    attack: &A,
    model: &dyn ModuleT,
    bounds: Bounds,
    (xs, ys): (&Tensor, &Tensor),
    eps: f64,
    seed: u64,
    classes: Option<usize>,
) -> Result<Perturbed> {
    // The model's weights cannot change during an attack: the fused GPU program keeps
    // its reordered kernels for the run (`rampart_models::frozen_weights`).
    #[cfg(feature = "cuda")]
    let _weights = rampart_models::frozen_weights();
    let problem = checked_problem(attack, model, bounds, xs, ys, &[eps], classes)?;
    let outcome = attack.attack_eps(&problem, eps, seed)?;
    problem.points(attack.norm(), outcome, eps)
}

/// The checks [`Attack::run`] and [`Attack::perturb`] make before their first ε: the
/// configuration, the criterion, the bounds and every ε (at least one); then the
/// problem (inputs, labels, model output) and the attack's own [`Attack::check`].
fn checked_problem<'m, A: Attack + ?Sized>(
    attack: &A,
    model: &'m dyn ModuleT,
    bounds: Bounds,
    xs: &Tensor,
    ys: &Tensor,
    eps: &[f64],
    classes: Option<usize>,
) -> Result<Problem<'m>> {
    check_settings(attack, bounds, eps)?;
    let problem = match classes {
        Some(k) => Problem::with_classes(model, bounds, xs, ys, k)?,
        None => Problem::new(model, bounds, xs, ys)?,
    };
    attack.check(&problem)?;
    Ok(problem)
}

/// Parses an ε given as a decimal (`0.5`) or a fraction (`8/255`). Negative, NaN and
/// infinite values, and a zero denominator, are refused.
pub fn parse_eps(s: &str) -> Result<f64> {
    let refuse = |reason: &str| Error::Eps {
        eps: s.to_string(),
        reason: reason.to_string(),
    };
    let number = |t: &str| -> Result<f64> {
        t.trim()
            .parse::<f64>()
            .map_err(|_| refuse("not a number or a fraction like 8/255"))
    };
    let value = match s.split_once('/') {
        Some((num, den)) => {
            let den = number(den)?;
            if den == 0.0 {
                return Err(refuse("zero denominator"));
            }
            number(num)? / den
        }
        None => number(s)?,
    };
    if value.is_nan() {
        return Err(refuse("NaN"));
    }
    if !value.is_finite() {
        return Err(refuse("infinite"));
    }
    if value < 0.0 {
        return Err(refuse("negative"));
    }
    // `+ 0.0` turns a parsed "-0" into 0.
    Ok(value + 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_eps_reads_fractions_and_decimals() -> Result<()> {
        assert_eq!(parse_eps("8/255")?, 8.0 / 255.0);
        assert!((parse_eps("8/255")? - 0.031_372_549).abs() < 1e-9);
        assert_eq!(parse_eps("0.5")?, 0.5);
        assert_eq!(parse_eps(" 12 ")?, 12.0);
        assert_eq!(parse_eps("0")?, 0.0);
        for bad in [
            "-0.1", "NaN", "nan", "inf", "1/0", "abc", "", "8/", "-8/255",
        ] {
            assert!(parse_eps(bad).is_err(), "{bad} accepted");
        }
        Ok(())
    }

    #[test]
    fn criteria_judge_probabilities() {
        let p = [0.1, 0.7, 0.2];
        assert!(Criterion::Misclassified.is_success(&p, 0));
        assert!(!Criterion::Misclassified.is_success(&p, 1));
        assert!(Criterion::Targeted(1).is_success(&p, 0));
        assert!(!Criterion::Targeted(2).is_success(&p, 0));
        assert!(Criterion::ConfidentlyMisclassified(0.6).is_success(&p, 0));
        assert!(!Criterion::ConfidentlyMisclassified(0.8).is_success(&p, 0));
        assert!(!Criterion::ConfidentlyMisclassified(0.6).is_success(&p, 1));
        assert!(Criterion::Confident(0.7).is_success(&p, 1));
        assert!(!Criterion::Confident(0.71).is_success(&p, 1));
    }

    #[test]
    fn criterion_parses_and_displays() -> Result<()> {
        for c in [
            Criterion::Misclassified,
            Criterion::Targeted(3),
            Criterion::ConfidentlyMisclassified(0.9),
            Criterion::Confident(0.5),
        ] {
            assert_eq!(c.to_string().parse::<Criterion>()?, c);
        }
        assert!("targeted".parse::<Criterion>().is_err());
        assert!("confident:1.5".parse::<Criterion>().is_err());
        assert!("fooled".parse::<Criterion>().is_err());
        Ok(())
    }

    #[test]
    fn bounds_refuse_empty_or_nan_boxes() {
        assert!(Bounds::new(0.0, 1.0).is_ok());
        assert!(Bounds::new(-1.0, 2.0).is_ok());
        assert!(Bounds::new(1.0, 1.0).is_err());
        assert!(Bounds::new(1.0, 0.0).is_err());
        assert!(Bounds::new(f32::NAN, 1.0).is_err());
        assert!(Bounds::new(0.0, f32::INFINITY).is_err());
    }
}
