//! Every training method's settings as one value: its paper defaults, the settings a
//! caller may override ([`Setting`]), and the one generic merge ([`merge`],
//! [`MethodConfig::merge`]) that lays optional values over the defaults.
//!
//! Each method declares what it accepts by implementing [`MethodSettings`] next to its
//! own code; the merge refuses a value for a setting the method does not accept,
//! naming the setting and the method, so a caller (the `rampart train` command line)
//! merges generically instead of keeping a table of which flag fits which method.
//! A setting's name is also the name of the `rampart train` flag that sets it
//! (`--{name}`), which is how the errors name it.

use std::fmt;

use rampart_attacks::{Pgd, StepSize};

use super::{
    AdversarialTraining, ArAdaLs, ArAdaLsConfig, Ccat, FastAt, Normal, Oat, RegMixup, Sat, Trades,
    TrainingMethod,
};
use crate::error::{DefenseError, Result};

/// A setting of a training method that a caller may override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    /// Label smoothing s of the targets (normal), or every group's initial smoothing
    /// (AR-AdaLS).
    LabelSmoothing,
    /// RegMixup's α of λ ~ Beta(α, α).
    MixupAlpha,
    /// L∞ budget ε of the training attack or of the robustness probe.
    Eps,
    /// Steps of the training attack.
    AttackSteps,
    /// Absolute step size of the training attack (fast AT: the FGSM step α).
    AttackStepSize,
    /// Fraction of each batch made adversarial.
    AdvFraction,
    /// Weight β of the regulariser (TRADES' KL term, SAT's Sinkhorn divergence).
    Beta,
    /// CCAT's power ρ of the soft targets' λ.
    Rho,
    /// The training attack returns its last iterate, not its best point
    /// ([`Pgd::last_iterate`]: Madry et al.'s and Wong et al.'s training code).
    AttackLastIterate,
}

impl Setting {
    /// Every setting.
    pub const ALL: [Setting; 9] = [
        Setting::LabelSmoothing,
        Setting::MixupAlpha,
        Setting::Eps,
        Setting::AttackSteps,
        Setting::AttackStepSize,
        Setting::AdvFraction,
        Setting::Beta,
        Setting::Rho,
        Setting::AttackLastIterate,
    ];

    /// The setting's name, also the `rampart train` flag without its dashes
    /// (`label-smoothing`, `eps`, …).
    pub fn name(self) -> &'static str {
        match self {
            Setting::LabelSmoothing => "label-smoothing",
            Setting::MixupAlpha => "mixup-alpha",
            Setting::Eps => "eps",
            Setting::AttackSteps => "attack-steps",
            Setting::AttackStepSize => "attack-step-size",
            Setting::AdvFraction => "adv-fraction",
            Setting::Beta => "beta",
            Setting::Rho => "rho",
            Setting::AttackLastIterate => "attack-last-iterate",
        }
    }
}

/// `--{name}`, as the command line spells the setting.
impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--{}", self.name())
    }
}

/// Optional values of the [`Setting`]s; `None` keeps the method's value.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overrides {
    /// [`Setting::LabelSmoothing`].
    pub label_smoothing: Option<f64>,
    /// [`Setting::MixupAlpha`].
    pub mixup_alpha: Option<f64>,
    /// [`Setting::Eps`].
    pub eps: Option<f64>,
    /// [`Setting::AttackSteps`].
    pub attack_steps: Option<usize>,
    /// [`Setting::AttackStepSize`].
    pub attack_step_size: Option<f64>,
    /// [`Setting::AdvFraction`].
    pub adv_fraction: Option<f64>,
    /// [`Setting::Beta`].
    pub beta: Option<f64>,
    /// [`Setting::Rho`].
    pub rho: Option<f64>,
    /// [`Setting::AttackLastIterate`].
    pub attack_last_iterate: Option<bool>,
}

impl Overrides {
    /// Whether a value of `setting` is given.
    pub fn is_set(&self, setting: Setting) -> bool {
        match setting {
            Setting::LabelSmoothing => self.label_smoothing.is_some(),
            Setting::MixupAlpha => self.mixup_alpha.is_some(),
            Setting::Eps => self.eps.is_some(),
            Setting::AttackSteps => self.attack_steps.is_some(),
            Setting::AttackStepSize => self.attack_step_size.is_some(),
            Setting::AdvFraction => self.adv_fraction.is_some(),
            Setting::Beta => self.beta.is_some(),
            Setting::Rho => self.rho.is_some(),
            Setting::AttackLastIterate => self.attack_last_iterate.is_some(),
        }
    }

    /// `attack` with the given attack steps, (absolute) step size and last-iterate
    /// rule in place.
    pub(crate) fn pgd(&self, attack: Pgd) -> Pgd {
        Pgd {
            steps: self.attack_steps.unwrap_or(attack.steps),
            step_size: self
                .attack_step_size
                .map_or(attack.step_size, StepSize::Absolute),
            last_iterate: self.attack_last_iterate.unwrap_or(attack.last_iterate),
            ..attack
        }
    }

    /// Each value of `self`, else that of `fallback`.
    pub fn or(self, fallback: Overrides) -> Overrides {
        Overrides {
            label_smoothing: self.label_smoothing.or(fallback.label_smoothing),
            mixup_alpha: self.mixup_alpha.or(fallback.mixup_alpha),
            eps: self.eps.or(fallback.eps),
            attack_steps: self.attack_steps.or(fallback.attack_steps),
            attack_step_size: self.attack_step_size.or(fallback.attack_step_size),
            adv_fraction: self.adv_fraction.or(fallback.adv_fraction),
            beta: self.beta.or(fallback.beta),
            rho: self.rho.or(fallback.rho),
            attack_last_iterate: self.attack_last_iterate.or(fallback.attack_last_iterate),
        }
    }

    /// The values of the `accepted` settings only.
    pub fn only(mut self, accepted: &[Setting]) -> Overrides {
        for setting in Setting::ALL {
            if !accepted.contains(&setting) {
                self.clear(setting);
            }
        }
        self
    }

    /// Drops the value of `setting`, if given.
    fn clear(&mut self, setting: Setting) {
        match setting {
            Setting::LabelSmoothing => self.label_smoothing = None,
            Setting::MixupAlpha => self.mixup_alpha = None,
            Setting::Eps => self.eps = None,
            Setting::AttackSteps => self.attack_steps = None,
            Setting::AttackStepSize => self.attack_step_size = None,
            Setting::AdvFraction => self.adv_fraction = None,
            Setting::Beta => self.beta = None,
            Setting::Rho => self.rho = None,
            Setting::AttackLastIterate => self.attack_last_iterate = None,
        }
    }
}

/// The settings of a method trained on a multi-step attack with a β-weighted
/// regulariser (TRADES, SAT): the attack's budget, steps and step size, and β.
pub(crate) const ATTACK_AND_BETA: &[Setting] = &[
    Setting::Eps,
    Setting::AttackSteps,
    Setting::AttackStepSize,
    Setting::Beta,
];

/// A training method's settings as a value: its name, its published defaults, the
/// [`Setting`]s a caller may override and how they apply. Implemented by every
/// method's configuration type, next to the method.
pub trait MethodSettings: Copy + Sized {
    /// The method's name (its [`TrainingMethod::name`], e.g. `"at"`).
    const NAME: &'static str;
    /// The settings a caller may override; any other is refused by [`merge`].
    const ACCEPTS: &'static [Setting];
    /// The settings of the method's paper on CIFAR-10.
    fn defaults() -> Self;
    /// `self` with the given values in place, checked as the method's constructor
    /// checks them. `values` holds only settings of [`MethodSettings::ACCEPTS`].
    fn with_overrides(self, values: &Overrides) -> Result<Self>;
}

/// Refuses `setting` when it is given but `M` does not accept it.
fn refuse<M: MethodSettings>(given: &Overrides, setting: Setting) -> Result<()> {
    if given.is_set(setting) && !M::ACCEPTS.contains(&setting) {
        return Err(DefenseError::NotApplicable {
            setting,
            method: M::NAME,
        });
    }
    Ok(())
}

/// `M`'s defaults with the values of `given`, else of `fallback` (e.g. a preset's),
/// laid over them, then checked.
///
/// A value in `given` for a setting `M` does not accept is refused
/// ([`DefenseError::NotApplicable`]: "`--{setting} does not apply to --method {M}`");
/// one in `fallback` is ignored. The checks run in a fixed order, which decides the
/// error reported when several apply: label smoothing and mixup α are refused first,
/// then a step size ≤ 0 is refused (methods with an attack), then the attack's and
/// the regularisers' settings, in the order of [`Setting::ALL`]. A value the method
/// itself refuses comes back as [`DefenseError::Invalid`], whose context names the
/// setting when the method has only one, else the method.
pub fn merge<M: MethodSettings>(given: &Overrides, fallback: &Overrides) -> Result<M> {
    refuse::<M>(given, Setting::LabelSmoothing)?;
    refuse::<M>(given, Setting::MixupAlpha)?;
    let values = given.or(*fallback).only(M::ACCEPTS);
    if let Some(s) = values.attack_step_size.filter(|s| *s <= 0.0) {
        return Err(DefenseError::NonPositive {
            setting: Setting::AttackStepSize,
            value: s,
        });
    }
    for setting in &Setting::ALL[2..] {
        refuse::<M>(given, *setting)?;
    }
    M::defaults()
        .with_overrides(&values)
        .map_err(|source| DefenseError::Invalid {
            context: match M::ACCEPTS {
                [only] => only.to_string(),
                _ => format!("invalid settings for --method {}", M::NAME),
            },
            source: Box::new(source),
        })
}

/// The training methods, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MethodKind {
    /// [`Normal`].
    Normal,
    /// [`AdversarialTraining`].
    At,
    /// [`FastAt`].
    FastAt,
    /// [`Trades`].
    Trades,
    /// [`Ccat`].
    Ccat,
    /// [`Oat`].
    Oat,
    /// [`RegMixup`].
    RegMixup,
    /// [`Sat`].
    Sat,
    /// [`ArAdaLs`], configured by [`ArAdaLsConfig`].
    ArAdaLs,
}

impl MethodKind {
    /// Every method.
    pub const ALL: [MethodKind; 9] = [
        MethodKind::Normal,
        MethodKind::At,
        MethodKind::FastAt,
        MethodKind::Trades,
        MethodKind::Ccat,
        MethodKind::Oat,
        MethodKind::RegMixup,
        MethodKind::Sat,
        MethodKind::ArAdaLs,
    ];

    /// The method's name (`"normal"`, `"at"`, `"fast-at"`, …).
    pub fn name(self) -> &'static str {
        self.defaults().name()
    }

    /// The settings the method accepts.
    pub fn accepts(self) -> &'static [Setting] {
        self.defaults().accepts()
    }

    /// The method's published settings.
    pub fn defaults(self) -> MethodConfig {
        match self {
            MethodKind::Normal => MethodConfig::Normal(Normal::defaults()),
            MethodKind::At => MethodConfig::At(AdversarialTraining::defaults()),
            MethodKind::FastAt => MethodConfig::FastAt(FastAt::defaults()),
            MethodKind::Trades => MethodConfig::Trades(Trades::defaults()),
            MethodKind::Ccat => MethodConfig::Ccat(Ccat::defaults()),
            MethodKind::Oat => MethodConfig::Oat(Oat::defaults()),
            MethodKind::RegMixup => MethodConfig::RegMixup(RegMixup::defaults()),
            MethodKind::Sat => MethodConfig::Sat(Sat::defaults()),
            MethodKind::ArAdaLs => MethodConfig::ArAdaLs(ArAdaLsConfig::defaults()),
        }
    }
}

/// `$body` for the settings `$m` of whichever method `$config` holds.
macro_rules! each {
    ($config:expr, $m:ident => $body:expr) => {
        match $config {
            MethodConfig::Normal($m) => $body,
            MethodConfig::At($m) => $body,
            MethodConfig::FastAt($m) => $body,
            MethodConfig::Trades($m) => $body,
            MethodConfig::Ccat($m) => $body,
            MethodConfig::Oat($m) => $body,
            MethodConfig::RegMixup($m) => $body,
            MethodConfig::Sat($m) => $body,
            MethodConfig::ArAdaLs($m) => $body,
        }
    };
}

/// One method with its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MethodConfig {
    /// Normal training.
    Normal(Normal),
    /// Adversarial training.
    At(AdversarialTraining),
    /// Fast AT.
    FastAt(FastAt),
    /// TRADES.
    Trades(Trades),
    /// CCAT.
    Ccat(Ccat),
    /// Once-for-all AT.
    Oat(Oat),
    /// RegMixup.
    RegMixup(RegMixup),
    /// Sinkhorn AT.
    Sat(Sat),
    /// AR-AdaLS (its settings; the method, which keeps a state, is built by
    /// [`MethodConfig::method`]).
    ArAdaLs(ArAdaLsConfig),
}

impl MethodConfig {
    /// The method `kind` with `given`, else `fallback`, laid over its defaults: the
    /// generic [`merge`] for that method.
    pub fn merge(kind: MethodKind, given: &Overrides, fallback: &Overrides) -> Result<Self> {
        Ok(match kind {
            MethodKind::Normal => MethodConfig::Normal(merge(given, fallback)?),
            MethodKind::At => MethodConfig::At(merge(given, fallback)?),
            MethodKind::FastAt => MethodConfig::FastAt(merge(given, fallback)?),
            MethodKind::Trades => MethodConfig::Trades(merge(given, fallback)?),
            MethodKind::Ccat => MethodConfig::Ccat(merge(given, fallback)?),
            MethodKind::Oat => MethodConfig::Oat(merge(given, fallback)?),
            MethodKind::RegMixup => MethodConfig::RegMixup(merge(given, fallback)?),
            MethodKind::Sat => MethodConfig::Sat(merge(given, fallback)?),
            MethodKind::ArAdaLs => MethodConfig::ArAdaLs(merge(given, fallback)?),
        })
    }

    /// Which method this is.
    pub fn kind(&self) -> MethodKind {
        match self {
            MethodConfig::Normal(_) => MethodKind::Normal,
            MethodConfig::At(_) => MethodKind::At,
            MethodConfig::FastAt(_) => MethodKind::FastAt,
            MethodConfig::Trades(_) => MethodKind::Trades,
            MethodConfig::Ccat(_) => MethodKind::Ccat,
            MethodConfig::Oat(_) => MethodKind::Oat,
            MethodConfig::RegMixup(_) => MethodKind::RegMixup,
            MethodConfig::Sat(_) => MethodKind::Sat,
            MethodConfig::ArAdaLs(_) => MethodKind::ArAdaLs,
        }
    }

    /// The method's name.
    pub fn name(&self) -> &'static str {
        fn of<M: MethodSettings>(_: &M) -> &'static str {
            M::NAME
        }
        each!(self, m => of(m))
    }

    /// The settings the method accepts.
    pub fn accepts(&self) -> &'static [Setting] {
        fn of<M: MethodSettings>(_: &M) -> &'static [Setting] {
            M::ACCEPTS
        }
        each!(self, m => of(m))
    }

    /// A fresh method of these settings (a stateful method starts from its initial
    /// state).
    pub fn method(&self) -> Result<Box<dyn TrainingMethod>> {
        Ok(match *self {
            MethodConfig::Normal(m) => Box::new(m),
            MethodConfig::At(m) => Box::new(m),
            MethodConfig::FastAt(m) => Box::new(m),
            MethodConfig::Trades(m) => Box::new(m),
            MethodConfig::Ccat(m) => Box::new(m),
            MethodConfig::Oat(m) => Box::new(m),
            MethodConfig::RegMixup(m) => Box::new(m),
            MethodConfig::Sat(m) => Box::new(m),
            MethodConfig::ArAdaLs(c) => Box::new(ArAdaLs::new(c)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use rampart_attacks::StepSize;

    use super::*;
    use crate::TestResult;

    /// `given` with one value of `setting`, valid for every method that accepts it.
    fn one(setting: Setting) -> Overrides {
        let mut o = Overrides::default();
        match setting {
            Setting::LabelSmoothing => o.label_smoothing = Some(0.2),
            Setting::MixupAlpha => o.mixup_alpha = Some(2.0),
            Setting::Eps => o.eps = Some(4.0 / 255.0),
            Setting::AttackSteps => o.attack_steps = Some(3),
            Setting::AttackStepSize => o.attack_step_size = Some(1.0 / 255.0),
            Setting::AdvFraction => o.adv_fraction = Some(0.5),
            Setting::Beta => o.beta = Some(2.0),
            Setting::Rho => o.rho = Some(4.0),
            Setting::AttackLastIterate => o.attack_last_iterate = Some(true),
        }
        o
    }

    #[test]
    fn a_setting_the_method_lacks_is_refused_naming_the_method() {
        for kind in MethodKind::ALL {
            for setting in Setting::ALL {
                let merged = MethodConfig::merge(kind, &one(setting), &Overrides::default());
                if kind.accepts().contains(&setting) {
                    assert!(merged.is_ok(), "{setting} on {}: {merged:?}", kind.name());
                } else {
                    let text = merged.err().map(|e| e.to_string()).unwrap_or_default();
                    assert_eq!(
                        text,
                        format!("{setting} does not apply to --method {}", kind.name())
                    );
                }
            }
        }
        // A fallback (a preset's value) for a setting the method lacks is ignored.
        let fallback = Overrides {
            eps: Some(0.03),
            adv_fraction: Some(1.0),
            ..Overrides::default()
        };
        let merged = MethodConfig::merge(MethodKind::Trades, &Overrides::default(), &fallback);
        assert!(
            matches!(merged, Ok(MethodConfig::Trades(t)) if t.eps == 0.03),
            "{merged:?}"
        );
        let merged = MethodConfig::merge(MethodKind::Normal, &Overrides::default(), &fallback);
        assert!(matches!(merged, Ok(MethodConfig::Normal(_))), "{merged:?}");
    }

    #[test]
    fn defaults_are_the_papers_settings() -> TestResult {
        let none = Overrides::default();
        // In the order of MethodKind::ALL.
        let papers = [
            MethodConfig::Normal(Normal::new()),
            MethodConfig::At(AdversarialTraining::madry_cifar10()),
            MethodConfig::FastAt(FastAt::wong_cifar10()),
            MethodConfig::Trades(Trades::zhang_cifar10()),
            MethodConfig::Ccat(Ccat::stutz_cifar10()),
            MethodConfig::Oat(Oat::wang_cifar10()),
            MethodConfig::RegMixup(RegMixup::pinto_cifar10()),
            MethodConfig::Sat(Sat::cifar10()),
            MethodConfig::ArAdaLs(ArAdaLsConfig::qin_cifar10()),
        ];
        for (kind, want) in MethodKind::ALL.into_iter().zip(papers) {
            assert_eq!(MethodConfig::merge(kind, &none, &none)?, want);
        }
        // The numbers of the papers, as the method constructors name them.
        let at = AdversarialTraining::madry_cifar10();
        assert_eq!(
            (at.eps, at.attack.steps, at.fraction),
            (8.0 / 255.0, 7, 1.0)
        );
        assert_eq!(at.attack.step_size, StepSize::Absolute(2.0 / 255.0));
        let t = Trades::zhang_cifar10();
        assert_eq!(
            (t.eps, t.steps, t.step_size, t.beta),
            (0.031, 10, 0.007, 6.0)
        );
        let c = Ccat::stutz_cifar10();
        assert_eq!(
            (c.eps, c.attack.steps, c.rho, c.fraction),
            (0.03, 40, 10.0, 0.5)
        );
        assert_eq!(RegMixup::pinto_cifar10().alpha, 20.0);
        let s = Sat::cifar10();
        assert_eq!((s.eps, s.attack.steps, s.beta), (8.0 / 255.0, 10, 1.0));
        let a = ArAdaLsConfig::qin_cifar10();
        assert_eq!((a.eps, a.initial_smoothing), (8.0 / 255.0, 0.1));
        for kind in MethodKind::ALL {
            let method = kind.defaults().method()?;
            assert_eq!(method.name(), kind.name());
        }
        Ok(())
    }

    #[test]
    fn overrides_are_applied_flags_before_fallbacks() -> TestResult {
        let given = Overrides {
            eps: Some(16.0 / 255.0),
            attack_step_size: Some(4.0 / 255.0),
            ..Overrides::default()
        };
        let fallback = Overrides {
            eps: Some(0.03),
            attack_steps: Some(10),
            adv_fraction: Some(0.5),
            ..Overrides::default()
        };
        let MethodConfig::At(at) = MethodConfig::merge(MethodKind::At, &given, &fallback)? else {
            return Err("expected at".into());
        };
        assert_eq!(
            (at.eps, at.attack.steps, at.fraction),
            (16.0 / 255.0, 10, 0.5)
        );
        assert_eq!(at.attack.step_size, StepSize::Absolute(4.0 / 255.0));
        let MethodConfig::FastAt(f) = MethodConfig::merge(MethodKind::FastAt, &given, &fallback)?
        else {
            return Err("expected fast-at".into());
        };
        assert_eq!(f.attack.step, StepSize::Absolute(4.0 / 255.0));
        assert_eq!((f.eps, f.fraction), (16.0 / 255.0, 0.5));
        let n: Normal = merge(&one(Setting::LabelSmoothing), &Overrides::default())?;
        assert_eq!(n.label_smoothing, 0.2);
        let r: RegMixup = merge(&one(Setting::MixupAlpha), &Overrides::default())?;
        assert_eq!(r.alpha, 2.0);
        let t: Trades = merge(&one(Setting::Beta), &Overrides::default())?;
        assert_eq!((t.beta, t.eps), (2.0, 0.031));
        let c: Ccat = merge(&one(Setting::Rho), &Overrides::default())?;
        assert_eq!(c.rho, 4.0);
        let a: ArAdaLsConfig = merge(&one(Setting::LabelSmoothing), &Overrides::default())?;
        assert_eq!((a.initial_smoothing, a.max_smoothing), (0.2, 0.5));
        Ok(())
    }

    #[test]
    fn bad_values_are_refused_with_their_context() {
        let err = |kind, given: Overrides| {
            MethodConfig::merge(kind, &given, &Overrides::default())
                .err()
                .map(|e| {
                    let mut text = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        text.push_str(&format!(": {s}"));
                        source = s.source();
                    }
                    text
                })
                .unwrap_or_default()
        };
        let step = Overrides {
            attack_step_size: Some(0.0),
            attack_steps: Some(3),
            ..Overrides::default()
        };
        assert_eq!(
            err(MethodKind::FastAt, step),
            "--attack-step-size must be > 0, got 0"
        );
        let fraction = Overrides {
            adv_fraction: Some(1.5),
            ..Overrides::default()
        };
        assert!(err(MethodKind::At, fraction)
            .starts_with("invalid settings for --method at: invalid training configuration: the adversarial fraction"));
        let alpha = Overrides {
            mixup_alpha: Some(-2.0),
            ..Overrides::default()
        };
        assert!(err(MethodKind::RegMixup, alpha).starts_with("--mixup-alpha: "));
        let smoothing = Overrides {
            label_smoothing: Some(1.0),
            ..Overrides::default()
        };
        assert!(err(MethodKind::Normal, smoothing).starts_with("--label-smoothing: "));
        assert!(err(MethodKind::ArAdaLs, smoothing)
            .starts_with("invalid settings for --method ar-adals: "));
        // Label smoothing on a method without it is refused before any value check.
        let both = Overrides {
            label_smoothing: Some(0.1),
            attack_step_size: Some(-1.0),
            ..Overrides::default()
        };
        assert_eq!(
            err(MethodKind::Sat, both),
            "--label-smoothing does not apply to --method sat"
        );
    }
}
