//! Learning-rate schedules, evaluated per iteration.
//!
//! **Time.** A schedule is a function of the training progress t in epochs, taken at
//! the *end* of an iteration: iteration i (0-based) of epoch e (0-based) in an epoch
//! of n iterations uses lr(t) with t = e + (i + 1)/n ([`progress`]), as in the fast-AT
//! code. Step schedules change after an epoch is complete: for t ∈ (k, k + 1] the
//! exponential schedule gives base·γ^k, and a multistep milestone m lowers the rate for
//! every iteration with t > m, i.e. from the first iteration of epoch m (0-based) on,
//! exactly like PyTorch's `MultiStepLR` stepped once per epoch.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{DefenseError, Result};

/// Training progress in epochs at the end of iteration `batch` (0-based) of `epoch`
/// (0-based), with `batches_per_epoch` iterations per epoch.
pub fn progress(epoch: usize, batch: usize, batches_per_epoch: usize) -> f64 {
    epoch as f64 + (batch + 1) as f64 / batches_per_epoch.max(1) as f64
}

/// A multistep milestone: an epoch, or a fraction of the training run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Milestone {
    /// After this many epochs (written `100`).
    Epoch(f64),
    /// After this fraction of the epochs (written `50%`).
    Fraction(f64),
}

impl Milestone {
    /// The milestone in epochs for a run of `epochs` epochs.
    pub fn epochs(self, epochs: usize) -> f64 {
        match self {
            Milestone::Epoch(e) => e,
            Milestone::Fraction(f) => f * epochs as f64,
        }
    }
}

impl fmt::Display for Milestone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Milestone::Epoch(e) => write!(f, "{e}"),
            Milestone::Fraction(x) => write!(f, "{}%", x * 100.0),
        }
    }
}

impl FromStr for Milestone {
    type Err = DefenseError;

    /// `100` (an epoch) or `50%` (a fraction of the run).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || {
            DefenseError::Config(format!(
                "milestone `{s}` is neither an epoch (`100`) nor a percentage of the run (`50%`)"
            ))
        };
        let milestone = match s.strip_suffix('%') {
            Some(p) => Milestone::Fraction(p.trim().parse::<f64>().map_err(|_| bad())? / 100.0),
            None => Milestone::Epoch(s.parse().map_err(|_| bad())?),
        };
        Ok(milestone)
    }
}

impl TryFrom<String> for Milestone {
    type Error = DefenseError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Milestone> for String {
    fn from(m: Milestone) -> String {
        m.to_string()
    }
}

/// The shape of a schedule, as a multiple of the base learning rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// 1 throughout.
    Constant,
    /// γ^(number of milestones passed).
    Multistep {
        /// When to multiply by γ.
        milestones: Vec<Milestone>,
        /// The factor, in (0, 1].
        gamma: f64,
    },
    /// ½·(1 + cos(π·t/T)), from 1 to 0 over the T epochs.
    Cosine,
    /// One cycle (fast AT): linear from 0 up to 1 at `peak`·T, then linear down to 0 at T.
    Cyclic {
        /// Where the peak lies, as a fraction of the run in (0, 1); fast AT uses 0.4.
        peak: f64,
    },
    /// γ^k during epoch k (0-based): multiplied by γ after every epoch (CCAT: 0.95).
    Exponential {
        /// The per-epoch factor, in (0, 1].
        gamma: f64,
    },
}

impl ScheduleKind {
    /// Short name: `constant`, `multistep`, `cosine`, `cyclic` or `exponential`.
    pub fn name(&self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Multistep { .. } => "multistep",
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Cyclic { .. } => "cyclic",
            ScheduleKind::Exponential { .. } => "exponential",
        }
    }
}

/// A learning-rate schedule over a run of `epochs` epochs, with an optional linear
/// warm-up that multiplies the schedule by min(1, t / warmup_epochs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The base (peak) learning rate, > 0.
    pub base_lr: f64,
    /// Length of the run in epochs, ≥ 1.
    pub epochs: usize,
    /// The shape.
    pub kind: ScheduleKind,
    /// Linear warm-up length in epochs, in [0, epochs]; 0 = none.
    pub warmup_epochs: f64,
}

impl LrSchedule {
    /// A checked schedule.
    pub fn new(
        base_lr: f64,
        epochs: usize,
        kind: ScheduleKind,
        warmup_epochs: f64,
    ) -> Result<Self> {
        let schedule = Self {
            base_lr,
            epochs,
            kind,
            warmup_epochs,
        };
        schedule.validate()?;
        Ok(schedule)
    }

    /// Refuses values that give no sensible schedule.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DefenseError::Config(m));
        if !(self.base_lr.is_finite() && self.base_lr > 0.0) {
            return bad(format!(
                "learning rate must be finite and > 0, got {}",
                self.base_lr
            ));
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        let total = self.epochs as f64;
        if !(self.warmup_epochs.is_finite() && (0.0..=total).contains(&self.warmup_epochs)) {
            return bad(format!(
                "warm-up must lie in [0, {total}] epochs, got {}",
                self.warmup_epochs
            ));
        }
        let gamma_ok = |g: f64| g.is_finite() && g > 0.0 && g <= 1.0;
        match &self.kind {
            ScheduleKind::Constant | ScheduleKind::Cosine => {}
            ScheduleKind::Multistep { milestones, gamma } => {
                if !gamma_ok(*gamma) {
                    return bad(format!("multistep gamma must lie in (0, 1], got {gamma}"));
                }
                if milestones.is_empty() {
                    return bad("multistep needs at least one milestone".into());
                }
                for m in milestones {
                    let e = m.epochs(self.epochs);
                    if !(e.is_finite() && e > 0.0 && e < total) {
                        return bad(format!(
                            "milestone {m} lies outside the run of {} epochs",
                            self.epochs
                        ));
                    }
                }
            }
            ScheduleKind::Cyclic { peak } => {
                if !(peak.is_finite() && *peak > 0.0 && *peak < 1.0) {
                    return bad(format!("cyclic peak must lie in (0, 1), got {peak}"));
                }
            }
            ScheduleKind::Exponential { gamma } => {
                if !gamma_ok(*gamma) {
                    return bad(format!("exponential gamma must lie in (0, 1], got {gamma}"));
                }
            }
        }
        Ok(())
    }

    /// The learning rate at progress `t` epochs (see the module docs; t is clamped to
    /// [0, epochs]).
    pub fn lr(&self, t: f64) -> f64 {
        let total = self.epochs as f64;
        let t = t.clamp(0.0, total);
        let factor = match &self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Multistep { milestones, gamma } => {
                let passed = milestones
                    .iter()
                    .filter(|m| m.epochs(self.epochs) < t)
                    .count();
                gamma.powi(passed as i32)
            }
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * t / total).cos()),
            ScheduleKind::Cyclic { peak } => {
                let p = peak * total;
                if t <= p {
                    t / p
                } else {
                    (total - t) / (total - p)
                }
            }
            ScheduleKind::Exponential { gamma } => {
                let completed = (t.ceil() - 1.0).max(0.0);
                gamma.powi(completed as i32)
            }
        };
        let warmup = if self.warmup_epochs > 0.0 {
            (t / self.warmup_epochs).min(1.0)
        } else {
            1.0
        };
        self.base_lr * factor * warmup
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestResult;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Asserts that `s` gives the rate `want` at progress `t` for each (t, want).
    fn assert_lrs(s: &LrSchedule, points: &[(f64, f64)]) {
        for &(t, want) in points {
            assert!(close(s.lr(t), want), "lr({t}) = {}, want {want}", s.lr(t));
        }
    }

    #[test]
    fn progress_is_taken_at_the_end_of_each_iteration() {
        assert!(close(progress(0, 0, 4), 0.25));
        assert!(close(progress(1, 3, 4), 2.0));
        assert!(close(progress(2, 0, 1), 3.0));
    }

    #[test]
    fn constant_and_warmup() -> TestResult {
        let s = LrSchedule::new(0.1, 10, ScheduleKind::Constant, 0.0)?;
        assert!(close(s.lr(0.5), 0.1) && close(s.lr(10.0), 0.1));
        let w = LrSchedule::new(0.1, 10, ScheduleKind::Constant, 2.0)?;
        assert!(
            close(w.lr(0.5), 0.025)
                && close(w.lr(1.0), 0.05)
                && close(w.lr(2.0), 0.1)
                && close(w.lr(7.0), 0.1)
        );
        Ok(())
    }

    #[test]
    fn multistep_drops_after_the_milestone_epoch() -> TestResult {
        let kind = ScheduleKind::Multistep {
            milestones: vec!["50%".parse()?, "8".parse()?],
            gamma: 0.1,
        };
        let s = LrSchedule::new(0.1, 10, kind, 0.0)?;
        // The last iteration of epoch 4 (0-based) ends at t = 5: still 0.1; the first
        // iteration of epoch 5 lies after the 50 % milestone.
        assert_lrs(&s, &[(5.0, 0.1), (5.01, 0.01), (8.0, 0.01)]);
        assert!((s.lr(8.5) - 0.001).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn cosine_values() -> TestResult {
        let s = LrSchedule::new(1.0, 10, ScheduleKind::Cosine, 0.0)?;
        // ½(1 + cos(π/4)) = ½ + √2/4 at a quarter of the run.
        let quarter = 0.5 + 2f64.sqrt() / 4.0;
        assert_lrs(&s, &[(0.0, 1.0), (5.0, 0.5), (2.5, quarter), (10.0, 0.0)]);
        Ok(())
    }

    #[test]
    fn cyclic_goes_zero_peak_zero() -> TestResult {
        let s = LrSchedule::new(0.2, 10, ScheduleKind::Cyclic { peak: 0.4 }, 0.0)?;
        assert_lrs(
            &s,
            &[(0.0, 0.0), (2.0, 0.1), (4.0, 0.2), (7.0, 0.1), (10.0, 0.0)],
        );
        Ok(())
    }

    #[test]
    fn exponential_multiplies_after_each_epoch() -> TestResult {
        let s = LrSchedule::new(0.075, 200, ScheduleKind::Exponential { gamma: 0.95 }, 0.0)?;
        assert_lrs(
            &s,
            &[
                (0.5, 0.075),
                (1.0, 0.075),
                (1.01, 0.07125),
                (3.0, 0.075 * 0.9025),
            ],
        );
        Ok(())
    }

    #[test]
    fn milestones_parse_display_and_serialise() -> TestResult {
        assert_eq!("50%".parse::<Milestone>()?, Milestone::Fraction(0.5));
        assert_eq!(" 100 ".parse::<Milestone>()?, Milestone::Epoch(100.0));
        assert!("half".parse::<Milestone>().is_err());
        assert_eq!(Milestone::Fraction(0.75).to_string(), "75%");
        let kind = ScheduleKind::Multistep {
            milestones: vec![Milestone::Fraction(0.5), Milestone::Epoch(150.0)],
            gamma: 0.1,
        };
        let json = serde_json::to_string(&kind)?;
        assert_eq!(
            json,
            r#"{"kind":"multistep","milestones":["50%","150"],"gamma":0.1}"#
        );
        assert_eq!(serde_json::from_str::<ScheduleKind>(&json)?, kind);
        Ok(())
    }

    #[test]
    fn refuses_bad_values() {
        let ms = |m: &str, gamma| ScheduleKind::Multistep {
            milestones: vec![m.parse().unwrap_or(Milestone::Epoch(-1.0))],
            gamma,
        };
        for (lr, epochs, kind, warmup) in [
            (0.0, 10, ScheduleKind::Constant, 0.0),
            (-0.1, 10, ScheduleKind::Constant, 0.0),
            (f64::NAN, 10, ScheduleKind::Constant, 0.0),
            (0.1, 0, ScheduleKind::Constant, 0.0),
            (0.1, 10, ScheduleKind::Constant, 11.0),
            (0.1, 10, ms("10", 0.1), 0.0),
            (0.1, 10, ms("0", 0.1), 0.0),
            (0.1, 10, ms("50%", 0.0), 0.0),
            (0.1, 10, ms("50%", 1.5), 0.0),
            (
                0.1,
                10,
                ScheduleKind::Multistep {
                    milestones: vec![],
                    gamma: 0.1,
                },
                0.0,
            ),
            (0.1, 10, ScheduleKind::Cyclic { peak: 1.0 }, 0.0),
            (0.1, 10, ScheduleKind::Exponential { gamma: 0.0 }, 0.0),
        ] {
            assert!(
                LrSchedule::new(lr, epochs, kind.clone(), warmup).is_err(),
                "{lr} {epochs} {kind:?} {warmup}"
            );
        }
    }
}
