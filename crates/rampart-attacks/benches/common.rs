//! What the attack benchmarks share.

use rampart_attacks::{Criterion as Goal, Eot, Init, Norm, Objective, Pgd, Restarts, StepSize};

/// The four threat models of the benchmarks: name, norm, ε and step size.
pub fn threat_models() -> [(&'static str, Norm, f64, StepSize); 4] {
    [
        ("linf", Norm::Linf, 8.0 / 255.0, StepSize::Relative(0.25)),
        ("l2", Norm::L2, 0.5, StepSize::Relative(0.25)),
        ("l1", Norm::l1(), 12.0, StepSize::Relative(0.25)),
        ("l0", Norm::L0, 10.0, StepSize::Absolute(1.0)),
    ]
}

/// The benchmarks' PGD: cross-entropy, momentum 0.9, backtracking by 1.5, one uniform
/// start, every step taken.
pub fn pgd(norm: Norm, steps: usize, step_size: StepSize) -> Pgd {
    Pgd {
        norm,
        objective: Objective::CrossEntropy,
        criterion: Goal::Misclassified,
        steps,
        step_size,
        momentum: 0.9,
        backtrack: Some(1.5),
        restarts: Restarts::same(1, Init::Uniform),
        early_stop: false,
        eot: Eot::OFF,
        last_iterate: false,
    }
}
