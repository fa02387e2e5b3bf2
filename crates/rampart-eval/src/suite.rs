//! Suites as values: which threat models, attacks, budgets, OOD sets and corruptions an
//! evaluation runs. `docs/evaluation.md` lists each suite in a table.

use std::fmt;
use std::str::FromStr;

use candle_core::{ModuleT, Tensor};
use rampart_attacks::{
    Apgd, Attack, AttackResult, Bounds, Criterion, Fab, Frames, Init, Norm, Objective, Passes, Pgd,
    Restarts, StepSize,
};
use rampart_data::Corruption;
use serde::{Deserialize, Serialize, Serializer};

use crate::error::{EvalError, Result};

/// The threat model whose confidence-thresholded numbers are also reported at the top
/// level of a report (`rerr_at_tpr99`, `fpr_at_tpr99`, `roc_auc`): L∞ at ε = 8/255,
/// the threat model CCAT and adversarial training are trained against. Every suite has it.
pub const HEADLINE_THREAT_MODEL: &str = "linf_8_255";

/// A named evaluation suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    /// Minutes on a CPU: PGD-20 at L∞ 8/255 with cross-entropy, margin and conf (the
    /// per-example worst case), a 10-step distal attack, uniform noise, two
    /// corruptions at five severities and a coarse accuracy–perturbation curve (PGD-7,
    /// four bisection rounds: 1/255 resolution).
    Quick,
    /// The CCAT paper's L∞ evaluation: PGD-conf (1000 steps, 11 runs) and PGD-CE (200
    /// steps, 50 runs) at 8/255 and 16/255, distal examples at the PGD-conf budget, all
    /// corruptions and the curve.
    Ccat,
    /// Everything: the L∞ threat models with PGD-20 too, L2 0.5 and 2, L1 12 and 24, L0
    /// 10, adversarial frames, distal, noise, all corruptions and a fine curve.
    Full,
}

impl Suite {
    /// All suites.
    pub const ALL: [Suite; 3] = [Suite::Quick, Suite::Ccat, Suite::Full];

    /// `quick`, `ccat` or `full`.
    pub fn name(&self) -> &'static str {
        match self {
            Suite::Quick => "quick",
            Suite::Ccat => "ccat",
            Suite::Full => "full",
        }
    }

    /// Attacked test images used when the caller sets no limit: 1,000 for `quick`
    /// (minutes on a CPU), all of them (`None`) for `ccat` and `full`.
    pub fn default_test_limit(&self) -> Option<usize> {
        match self {
            Suite::Quick => Some(1000),
            Suite::Ccat | Suite::Full => None,
        }
    }

    /// The resolved plan: every attack with its budget scaled by `effort`, for inputs in
    /// `bounds` (frames are unconstrained within them).
    pub fn plan(&self, effort: Effort, bounds: Bounds) -> SuitePlan {
        let linf = |eps_255: u32, attacks: Vec<AttackPlan>| ThreatModel {
            name: threat_model_name(Norm::Linf, f64::from(eps_255) / 255.0),
            norm: Norm::Linf,
            eps: f64::from(eps_255) / 255.0,
            attacks,
        };
        // CCAT's two attacks and the margin loss at the cross-entropy attack's loop.
        let ccat_pair = |norm: Norm| -> Vec<AttackPlan> {
            vec![
                AttackPlan::pgd("pgd_conf", ccat_conf(norm)),
                AttackPlan::pgd("pgd_ce", ccat_ce(norm)),
                AttackPlan::pgd("pgd_margin", ccat_margin(norm)),
            ]
        };
        // L2 and L1 also get AutoAttack's gradient attacks: APGD-CE, APGD-T and FAB-T.
        let other = |norm: Norm, eps: f64| {
            let mut attacks = ccat_pair(norm);
            if norm != Norm::L0 {
                attacks.extend([
                    AttackPlan::kind("apgd_ce", AttackKind::Apgd(Apgd::ce(norm))),
                    AttackPlan::kind("apgd_t", AttackKind::Apgd(Apgd::dlr_targeted(norm))),
                    AttackPlan::kind("fab_t", AttackKind::Fab(Fab::targeted(norm))),
                ]);
            }
            ThreatModel {
                name: threat_model_name(norm, eps),
                norm,
                eps,
                attacks,
            }
        };
        let all_corruptions = || {
            Corruption::ALL
                .into_iter()
                .map(|corruption| CorruptionPlan {
                    corruption,
                    severities: (1..=rampart_data::corrupt::SEVERITIES).collect(),
                })
                .collect()
        };
        let mut plan = match self {
            Suite::Quick => SuitePlan {
                suite: *self,
                threat_models: vec![linf(8, pgd20_triple())],
                distal: Some(DistalPlan {
                    pgd: Pgd {
                        steps: 10,
                        step_size: StepSize::Absolute(0.01),
                        restarts: Restarts::same(1, Init::Zero),
                        ..ccat_distal().pgd
                    },
                    ..ccat_distal()
                }),
                corruptions: [Corruption::GaussianNoise, Corruption::Contrast]
                    .into_iter()
                    .map(|corruption| CorruptionPlan {
                        corruption,
                        severities: (1..=rampart_data::corrupt::SEVERITIES).collect(),
                    })
                    .collect(),
                curve: curve(7, 4),
            },
            Suite::Ccat => SuitePlan {
                suite: *self,
                threat_models: vec![
                    linf(8, ccat_pair(Norm::Linf)),
                    linf(16, ccat_pair(Norm::Linf)),
                ],
                distal: Some(ccat_distal()),
                corruptions: all_corruptions(),
                curve: curve(20, 6),
            },
            Suite::Full => {
                let linf_all = || {
                    let mut attacks = pgd20_triple();
                    attacks.extend(ccat_pair(Norm::Linf));
                    attacks
                };
                SuitePlan {
                    suite: *self,
                    threat_models: vec![
                        linf(8, linf_all()),
                        linf(16, linf_all()),
                        other(Norm::L2, 0.5),
                        other(Norm::L2, 2.0),
                        other(Norm::l1(), 12.0),
                        other(Norm::l1(), 24.0),
                        other(Norm::L0, 10.0),
                        ThreatModel {
                            name: "frames".into(),
                            norm: Norm::Linf,
                            eps: f64::from(bounds.width()),
                            attacks: vec![AttackPlan {
                                name: "frames_conf".into(),
                                attack: AttackKind::Frames(Frames::ccat()),
                            }],
                        },
                    ],
                    distal: Some(ccat_distal()),
                    corruptions: all_corruptions(),
                    curve: curve(20, 7),
                }
            }
        };
        for tm in &mut plan.threat_models {
            for a in &mut tm.attacks {
                a.attack = a.attack.scaled(effort);
            }
        }
        if let Some(d) = &mut plan.distal {
            d.pgd = effort.apply(&d.pgd);
        }
        plan.curve.pgd = effort.apply(&plan.curve.pgd);
        plan
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Suite {
    type Err = EvalError;

    /// `quick`, `ccat` or `full` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Suite::ALL
            .into_iter()
            .find(|suite| suite.name() == lower)
            .ok_or_else(|| {
                EvalError::Config(format!("unknown suite `{s}`; expected quick, ccat or full"))
            })
    }
}

/// ε of distal examples around uniform noise (L∞), as in CCAT.
pub const DISTAL_EPS: f64 = 0.03;

/// CCAT's distal evaluation: the distal objective at the budget of
/// [`Pgd::ccat_conf_eval`] within [`DISTAL_EPS`] of the noise; the criterion's τ is
/// replaced at run time by the τ picked on the held-out split.
fn ccat_distal() -> DistalPlan {
    DistalPlan {
        pgd: Pgd {
            objective: Objective::Distal,
            criterion: Criterion::Confident(1.0),
            ..Pgd::ccat_conf_eval()
        },
        eps: DISTAL_EPS,
    }
}

/// The conf attack of CCAT's evaluation in `norm`. L∞ is [`Pgd::ccat_conf_eval`]
/// (1000 steps of 0.001). Other norms keep its loop and set the step to 0.03·ε, the
/// same path length in units of ε (1000 · 0.03 = 30ε; L∞ 8/255: 1000 · 0.001 ≈ 32ε).
fn ccat_conf(norm: Norm) -> Pgd {
    match norm {
        Norm::Linf => Pgd::ccat_conf_eval(),
        _ => Pgd {
            norm,
            step_size: StepSize::Relative(0.03),
            ..Pgd::ccat_conf_eval()
        },
    }
}

/// PGD-20 (L∞, 20 steps of 2/255, uniform start) with the three objectives whose
/// per-example worst case every suite reports at L∞ 8/255: cross-entropy, the C&W
/// margin max_{k≠y} z_k − z_y (on logits: it does not saturate with the softmax) and
/// conf, max_{k≠y} p_k (the objective a model that rejects low confidence is evaluated
/// with: it looks for confident mistakes).
fn pgd20_triple() -> Vec<AttackPlan> {
    let with = |objective| Pgd {
        objective,
        ..Pgd::linf_pgd20()
    };
    vec![
        AttackPlan::pgd("pgd20_ce", Pgd::linf_pgd20()),
        AttackPlan::pgd("pgd20_margin", with(Objective::CwMargin)),
        AttackPlan::pgd("pgd20_conf", with(Objective::Conf)),
    ]
}

/// The margin attack of the ccat and full suites: the cross-entropy attack's loop
/// ([`ccat_ce`]) with the C&W margin objective and 10 restarts (a fifth of CE's 50:
/// the margin loss needs fewer restarts; *this crate's choice*, not the paper's).
fn ccat_margin(norm: Norm) -> Pgd {
    let ce = ccat_ce(norm);
    Pgd {
        objective: Objective::CwMargin,
        restarts: Restarts {
            count: 10,
            ..ce.restarts
        },
        ..ce
    }
}

/// The cross-entropy attack of CCAT's evaluation in `norm`: [`Pgd::ccat_ce_eval`] for
/// L∞ (200 steps of 0.005); other norms use a step of 0.15·ε (path length 30ε).
fn ccat_ce(norm: Norm) -> Pgd {
    match norm {
        Norm::Linf => Pgd::ccat_ce_eval(),
        _ => Pgd {
            norm,
            step_size: StepSize::Relative(0.15),
            ..Pgd::ccat_ce_eval()
        },
    }
}

/// The accuracy–perturbation curve up to L∞ 16/255 with `rounds` bisection rounds, on
/// a 65-point grid. The attack under the minimal-ε search: L∞ PGD with cross-entropy,
/// `steps` steps of ε/4 (the Madry ratio 2/255 : 8/255, so it scales with the ε being
/// tried), uniform start.
fn curve(steps: usize, rounds: usize) -> CurvePlan {
    CurvePlan {
        pgd: Pgd {
            steps,
            step_size: StepSize::Relative(0.25),
            ..Pgd::linf_pgd20()
        },
        eps_max: 16.0 / 255.0,
        rounds,
        grid_points: 65,
    }
}

/// `linf_8_255`, `linf_16_255` (L∞ at multiples of 1/255), `l2_0p5`, `l2_2`, `l1_12`,
/// `l0_10`: the norm, then ε with `p` for the decimal point.
pub fn threat_model_name(norm: Norm, eps: f64) -> String {
    let norm_name = match norm {
        Norm::Linf => "linf",
        Norm::L2 => "l2",
        Norm::L1 { .. } => "l1",
        Norm::L0 => "l0",
    };
    let in_255 = eps * 255.0;
    if norm == Norm::Linf && (in_255 - in_255.round()).abs() < 1e-9 && in_255.round() >= 1.0 {
        return format!("{norm_name}_{}_255", in_255.round() as u64);
    }
    let eps_text = format!("{eps}").replace('.', "p");
    format!("{norm_name}_{eps_text}")
}

/// How much of the paper budgets to spend: multipliers of every attack's steps and
/// restarts (each rounded, at least 1). `Effort::PAPER` (1, 1) runs the suites as
/// published; a smoke run on a CPU uses e.g. steps 0.02, restarts 0.1.
///
/// When steps shrink by a factor s < 1 the step size grows by 1/s (rounded steps
/// accounted for), so the path an attack can travel stays the same; more steps keep
/// the step size.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Effort {
    /// Multiplier of the number of steps (> 0).
    pub steps: f64,
    /// Multiplier of the number of restarts (> 0).
    pub restarts: f64,
}

impl Effort {
    /// The published budgets.
    pub const PAPER: Effort = Effort {
        steps: 1.0,
        restarts: 1.0,
    };

    /// Multipliers, refused unless finite and > 0.
    pub fn new(steps: f64, restarts: f64) -> Result<Self> {
        let effort = Effort { steps, restarts };
        effort.validate()?;
        Ok(effort)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        for (what, v) in [("steps", self.steps), ("restarts", self.restarts)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(EvalError::Config(format!(
                    "effort multiplier of {what} must be finite and > 0, got {v}"
                )));
            }
        }
        Ok(())
    }

    /// `steps` scaled (rounded, at least 1).
    pub fn scale_steps(&self, steps: usize) -> usize {
        ((steps as f64 * self.steps).round() as usize).max(1)
    }

    /// `restarts` scaled (rounded, at least 1).
    pub fn scale_restarts(&self, restarts: usize) -> usize {
        ((restarts as f64 * self.restarts).round() as usize).max(1)
    }

    /// `pgd` with its steps and restarts scaled.
    pub fn apply(&self, pgd: &Pgd) -> Pgd {
        let steps = self.scale_steps(pgd.steps);
        let restarts = self.scale_restarts(pgd.restarts.count);
        let stretch = (pgd.steps as f64 / steps as f64).max(1.0);
        let step_size = match pgd.step_size {
            StepSize::Absolute(v) => StepSize::Absolute(v * stretch),
            StepSize::Relative(v) => StepSize::Relative(v * stretch),
        };
        Pgd {
            steps,
            step_size,
            restarts: Restarts {
                count: restarts,
                ..pgd.restarts
            },
            ..*pgd
        }
    }
}

impl Default for Effort {
    fn default() -> Self {
        Effort::PAPER
    }
}

/// One attack of a threat model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AttackPlan {
    /// Name, unique within the threat model (`pgd20_ce`, `pgd_conf`, `pgd_ce`, `frames_conf`).
    pub name: String,
    /// Its configuration.
    pub attack: AttackKind,
}

impl AttackPlan {
    fn pgd(name: &str, pgd: Pgd) -> Self {
        AttackPlan::kind(name, AttackKind::Pgd(pgd))
    }

    fn kind(name: &str, attack: AttackKind) -> Self {
        AttackPlan {
            name: name.into(),
            attack,
        }
    }
}

/// The attacks a suite can hold.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttackKind {
    /// The PGD loop.
    Pgd(Pgd),
    /// Adversarial frames.
    Frames(Frames),
    /// APGD (AutoAttack's gradient attack: CE or targeted DLR).
    Apgd(Apgd),
    /// FAB-T (AutoAttack's minimum-norm attack; deterministic models only).
    Fab(Fab),
}

impl SuitePlan {
    /// Uses `eot` in every attack of the plan (stochastic models). FAB takes no EOT
    /// samples, so with EOT on it leaves the plan, as in AutoAttack's `rand` version.
    pub fn set_eot(&mut self, eot: rampart_attacks::Eot) {
        let eot_on = eot.grad_samples > 1 || eot.eval_samples > 1;
        for tm in &mut self.threat_models {
            if eot_on {
                tm.attacks
                    .retain(|a| !matches!(a.attack, AttackKind::Fab(_)));
            }
            for a in &mut tm.attacks {
                match &mut a.attack {
                    AttackKind::Pgd(p) => p.eot = eot,
                    AttackKind::Frames(f) => f.pgd.eot = eot,
                    AttackKind::Apgd(p) => p.eot = eot,
                    AttackKind::Fab(_) => {}
                }
            }
        }
        if let Some(d) = &mut self.distal {
            d.pgd.eot = eot;
        }
        self.curve.pgd.eot = eot;
    }
}

impl SuitePlan {
    /// What the plan costs per attacked image ([`rampart_attacks::Passes`]): every
    /// attack of every threat model and the forward pass judging its points, the
    /// uniform noise image and its distal attack, the minimal-ε search (a run at
    /// `eps_max` and one per bisection round, an upper bound: examples leave the search
    /// as their ε is found) and a forward pass per corruption and severity. The trust
    /// checks come on top, on their own images ([`SuitePlan::trust_cost`]).
    pub fn cost(&self) -> Passes {
        let judged = |p: Passes| p + Passes::forward(1.0);
        let mut total = Passes::NONE;
        for tm in &self.threat_models {
            for a in &tm.attacks {
                total += judged(a.attack.cost());
            }
        }
        total += Passes::forward(1.0);
        if let Some(d) = &self.distal {
            total += judged(d.pgd.cost());
        }
        total += self.curve.pgd.cost() * (self.curve.rounds + 1) as f64;
        let corrupted: usize = self.corruptions.iter().map(|c| c.severities.len()).sum();
        total + Passes::forward(corrupted as f64)
    }

    /// The headline threat model (or the first) and the PGD attack the trust checks
    /// repeat: its cross-entropy PGD, else its first PGD.
    pub fn trust_attack(&self) -> Option<(&ThreatModel, &Pgd)> {
        let tm = self
            .threat_models
            .iter()
            .find(|t| t.name == crate::HEADLINE_THREAT_MODEL)
            .or_else(|| self.threat_models.first())?;
        let pgds: Vec<&Pgd> = tm
            .attacks
            .iter()
            .filter_map(|a| match &a.attack {
                AttackKind::Pgd(p) => Some(p),
                _ => None,
            })
            .collect();
        let attack = pgds
            .iter()
            .find(|p| p.objective == rampart_attacks::Objective::CrossEntropy)
            .or(pgds.first())
            .copied()?;
        Some((tm, attack))
    }

    /// What the trust checks cost per checked image ([`crate::trust::trust_cost`] of
    /// [`SuitePlan::trust_attack`]); nothing when the plan has no PGD to check.
    pub fn trust_cost(&self, config: &crate::TrustConfig) -> Passes {
        self.trust_attack().map_or(Passes::NONE, |(_, pgd)| {
            crate::trust::trust_cost(pgd, config)
        })
    }
}

impl AttackKind {
    /// What one run of the attack costs per image.
    pub fn cost(&self) -> Passes {
        match self {
            AttackKind::Pgd(p) => p.cost(),
            AttackKind::Frames(f) => f.cost(),
            AttackKind::Apgd(a) => a.cost(),
            AttackKind::Fab(f) => f.cost(),
        }
    }

    /// The attack with its budget scaled.
    pub fn scaled(&self, effort: Effort) -> AttackKind {
        match self {
            AttackKind::Pgd(p) => AttackKind::Pgd(effort.apply(p)),
            AttackKind::Frames(f) => AttackKind::Frames(Frames {
                pgd: effort.apply(&f.pgd),
                ..*f
            }),
            AttackKind::Apgd(a) => AttackKind::Apgd(Apgd {
                // The L1 3ε → 2ε → ε schedule needs a step per phase.
                steps: effort
                    .scale_steps(a.steps)
                    .max(if a.large_eps_warmup { 3 } else { 1 }),
                restarts: effort.scale_restarts(a.restarts),
                ..*a
            }),
            AttackKind::Fab(f) => AttackKind::Fab(Fab {
                steps: effort.scale_steps(f.steps),
                restarts: effort.scale_restarts(f.restarts),
                ..*f
            }),
        }
    }

    /// The underlying PGD loop configuration (PGD and frames; `None` for APGD and FAB).
    pub fn pgd(&self) -> Option<&Pgd> {
        match self {
            AttackKind::Pgd(p) => Some(p),
            AttackKind::Frames(f) => Some(&f.pgd),
            AttackKind::Apgd(_) | AttackKind::Fab(_) => None,
        }
    }

    /// Refuses an inconsistent configuration.
    pub fn validate(&self) -> rampart_attacks::Result<()> {
        match self {
            AttackKind::Pgd(p) => p.validate(),
            AttackKind::Frames(f) => f.pgd.validate(),
            AttackKind::Apgd(a) => a.validate(),
            AttackKind::Fab(f) => f.validate(),
        }
    }

    pub(crate) fn run(
        &self,
        model: &dyn ModuleT,
        bounds: Bounds,
        xs: &Tensor,
        ys: &Tensor,
        eps: f64,
        seed: u64,
    ) -> rampart_attacks::Result<AttackResult> {
        let mut results = match self {
            AttackKind::Pgd(p) => p.run(model, bounds, xs, ys, &[eps], seed)?,
            AttackKind::Frames(f) => f.run(model, bounds, xs, ys, &[eps], seed)?,
            AttackKind::Apgd(a) => a.run(model, bounds, xs, ys, &[eps], seed)?,
            AttackKind::Fab(f) => f.run(model, bounds, xs, ys, &[eps], seed)?,
        };
        results.pop().ok_or_else(|| {
            rampart_attacks::Error::Input("the attack returned no result for its ε".into())
        })
    }
}

/// A threat model: a norm ball and the attacks whose per-example worst case is reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ThreatModel {
    /// Key in the report (`linf_8_255`, `l2_0p5`, `frames`, …).
    pub name: String,
    /// The norm.
    pub norm: Norm,
    /// The budget ε in that norm.
    pub eps: f64,
    /// The attacks, run in order.
    pub attacks: Vec<AttackPlan>,
}

/// Distal adversarial examples (CCAT): L∞ ε around uniform noise, maximising the
/// largest log-probability.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DistalPlan {
    /// The loop (objective `distal`; its criterion's τ is set at run time).
    pub pgd: Pgd,
    /// ε around the noise.
    pub eps: f64,
}

/// The accuracy–perturbation curve: per-example minimal L∞ ε by bisection on top of PGD.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CurvePlan {
    /// The attack run at each trial ε (L∞).
    pub pgd: Pgd,
    /// Largest ε tried; examples not broken there have no minimal ε (+∞).
    pub eps_max: f64,
    /// Bisection rounds after the test at `eps_max`: the minimal ε is bracketed to
    /// within eps_max / 2^rounds.
    pub rounds: usize,
    /// Points of the reported curve's ε grid, evenly spaced from 0 to `eps_max`.
    pub grid_points: usize,
}

impl CurvePlan {
    /// The ε grid of the reported curve: `grid_points` points from 0 to `eps_max`.
    pub fn grid(&self) -> Vec<f64> {
        let n = self.grid_points.max(2);
        (0..n)
            .map(|i| self.eps_max * i as f64 / (n - 1) as f64)
            .collect()
    }
}

/// Corruptions applied to the attacked split to measure calibration under shift.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CorruptionPlan {
    /// The corruption (serialised by its CIFAR-10-C name).
    #[serde(serialize_with = "serialize_corruption")]
    pub corruption: Corruption,
    /// Severities, each in 1 ..= 5.
    pub severities: Vec<u8>,
}

fn serialize_corruption<S: Serializer>(
    c: &Corruption,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(c.name())
}

/// A suite resolved into runnable pieces. Written to `config.json` beside the outputs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SuitePlan {
    /// The suite it came from.
    pub suite: Suite,
    /// Threat models, in order.
    pub threat_models: Vec<ThreatModel>,
    /// Distal examples (uniform noise is always evaluated; it is the distal anchors).
    pub distal: Option<DistalPlan>,
    /// Corruptions and severities.
    pub corruptions: Vec<CorruptionPlan>,
    /// The minimal-ε search behind the accuracy–perturbation curve.
    pub curve: CurvePlan,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_parse_and_name_their_threat_models() -> Result<()> {
        for s in Suite::ALL {
            assert_eq!(s.name().parse::<Suite>()?, s);
            let plan = s.plan(Effort::PAPER, Bounds::UNIT);
            assert_eq!(plan.threat_models[0].name, HEADLINE_THREAT_MODEL);
            for tm in &plan.threat_models {
                for a in &tm.attacks {
                    a.attack.validate().map_err(EvalError::attack(&a.name))?;
                }
            }
        }
        assert!(" QUICK ".parse::<Suite>().is_ok());
        assert!("paper".parse::<Suite>().is_err());
        let full = Suite::Full.plan(Effort::PAPER, Bounds::UNIT);
        let names: Vec<&str> = full.threat_models.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "linf_8_255",
                "linf_16_255",
                "l2_0p5",
                "l2_2",
                "l1_12",
                "l1_24",
                "l0_10",
                "frames"
            ]
        );
        assert_eq!(full.corruptions.len(), 8);
        Ok(())
    }

    #[test]
    fn effort_scales_steps_restarts_and_step_size() -> Result<()> {
        let conf = Pgd::ccat_conf_eval();
        let small = Effort::new(0.02, 0.1)?.apply(&conf);
        assert_eq!(small.steps, 20);
        assert_eq!(small.restarts.count, 1);
        assert_eq!(small.restarts.first, Init::Zero);
        // 1000 steps of 0.001 become 20 steps of 0.05: the same path length.
        assert_eq!(small.step_size, StepSize::Absolute(0.001 * 50.0));
        let big = Effort::new(2.0, 1.0)?.apply(&Pgd::linf_pgd20());
        assert_eq!(
            (big.steps, big.step_size),
            (40, StepSize::Absolute(2.0 / 255.0))
        );
        let tiny = Effort::new(1e-6, 1e-6)?.apply(&conf);
        assert_eq!((tiny.steps, tiny.restarts.count), (1, 1));
        assert!(Effort::new(0.0, 1.0).is_err());
        assert!(Effort::new(1.0, f64::NAN).is_err());
        Ok(())
    }

    #[test]
    fn threat_model_names() {
        assert_eq!(threat_model_name(Norm::Linf, 8.0 / 255.0), "linf_8_255");
        assert_eq!(threat_model_name(Norm::Linf, 0.03), "linf_0p03");
        assert_eq!(threat_model_name(Norm::L2, 0.5), "l2_0p5");
        assert_eq!(threat_model_name(Norm::l1(), 24.0), "l1_24");
        assert_eq!(threat_model_name(Norm::L0, 10.0), "l0_10");
    }
}
