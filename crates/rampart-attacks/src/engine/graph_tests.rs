//! The control of a run's graphed steps ([`super::Steps`]) on the CPU, through a
//! recorder that behaves as a CUDA graph does where a test can see it: its capture
//! runs nothing, its launch runs the step, and either can be made to fail. Every step
//! of a run must happen once, in order, however the run falls back; the runs of the
//! PGD loop through it equal eager runs bit for bit. `tests/cuda.rs` holds real
//! graphs to eager steps on a GPU.

use std::cell::{Cell, RefCell};

use super::{cuda_graph_failure, cuda_graph_steps, Recorder, Steps, MIN_STEPS};
use crate::testutil::{trained, value_bits, By};
use crate::{
    device_resident_pgd_runs, with_device_resident_pgd, Attack, AttackResult, Bounds, Error, Init,
    Norm, Objective, Pgd, Restarts, Result, StepSize,
};

/// How the fake recorder behaves.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Spec {
    /// Its capture fails.
    pub fail_capture: bool,
    /// Its n-th launch (1-based, per run) fails.
    pub fail_launch: Option<usize>,
    /// Its warm steps draw noise.
    pub noisy: bool,
}

thread_local! {
    static FAKE: Cell<Option<Spec>> = const { Cell::new(None) };
    static CALLS: RefCell<Vec<&'static str>> = const { RefCell::new(Vec::new()) };
}

/// The fake recorder of the PGD loop's runs on this thread, if a test installed one.
pub(crate) fn fake() -> Option<Fake> {
    FAKE.with(Cell::get).map(|spec| Fake {
        spec,
        launches: 0,
        noise: 0,
    })
}

/// Runs `f` with the PGD loop's runs recording through a fake recorder of `spec`.
fn with_fake<R>(spec: Spec, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Spec>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FAKE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FAKE.with(|c| c.replace(Some(spec))));
    f()
}

fn calls() -> Vec<&'static str> {
    CALLS.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

fn call(what: &'static str) {
    CALLS.with(|c| c.borrow_mut().push(what));
}

pub(crate) struct Fake {
    spec: Spec,
    launches: usize,
    noise: usize,
}

impl Recorder for Fake {
    type Graph = ();

    fn warm(&mut self, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        call("warm");
        if self.spec.noisy {
            self.noise += 1;
        }
        body()
    }

    fn capture(&mut self, _body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        call("capture");
        if self.spec.fail_capture {
            return Err(Error::Input("capture refused".into()));
        }
        Ok(())
    }

    const RUNS_BODY: bool = true;

    fn launch(&mut self, _: &()) -> Result<()> {
        call("launch");
        self.launches += 1;
        if self.spec.fail_launch == Some(self.launches) {
            return Err(Error::Input("launch refused".into()));
        }
        Ok(())
    }

    fn recover(&mut self) {
        call("recover");
    }

    fn noise(&self) -> usize {
        self.noise
    }
}

/// The steps a run of `n` steps took (the start as step −1, then 0 … n − 2, the last
/// left to the caller as the loop does) and the recorder's calls.
fn run(spec: Option<Spec>, n: usize) -> Result<(Vec<i64>, Vec<&'static str>)> {
    calls();
    let rec = spec.map(|spec| Fake {
        spec,
        launches: 0,
        noise: 0,
    });
    let mut steps = Steps::new(rec, n);
    let mut done = Vec::new();
    steps.start(&mut || {
        done.push(-1);
        Ok(())
    })?;
    for t in 0..n.saturating_sub(1) {
        steps.step(t, &mut || {
            done.push(t as i64);
            Ok(())
        })?;
    }
    Ok((done, calls()))
}

#[test]
fn every_step_runs_once_in_order_however_the_steps_are_recorded() -> Result<()> {
    for n in 0..9usize {
        let all: Vec<i64> = (-1..n.saturating_sub(1) as i64).collect();
        let (eager, none) = run(None, n)?;
        assert_eq!(eager, all, "{n} steps, no recorder");
        assert!(none.is_empty());

        let (done, calls) = run(Some(Spec::default()), n)?;
        assert_eq!(done, all, "{n} steps, recorded");
        if n < MIN_STEPS {
            assert!(calls.is_empty(), "{n} steps: {calls:?}");
        } else {
            // Start and step 0 warm, step 1 is captured then launched, the others
            // up to n − 2 launched.
            let mut want = vec!["warm", "warm", "capture"];
            want.extend(std::iter::repeat_n("launch", n - 2));
            assert_eq!(calls, want, "{n} steps");
        }

        let refused = Spec {
            fail_capture: true,
            ..Spec::default()
        };
        let (done, calls) = run(Some(refused), n)?;
        assert_eq!(done, all, "{n} steps, capture refused");
        if n >= MIN_STEPS {
            assert_eq!(calls, ["warm", "warm", "capture", "recover"], "{n} steps");
        }

        let noisy = Spec {
            noisy: true,
            ..Spec::default()
        };
        let (done, calls) = run(Some(noisy), n)?;
        assert_eq!(done, all, "{n} steps, noise drawn");
        assert!(
            !calls.contains(&"capture"),
            "{n} steps, noise drawn: {calls:?}"
        );

        for k in 1..n.saturating_sub(1) {
            let spec = Spec {
                fail_launch: Some(k),
                ..Spec::default()
            };
            let (done, calls) = run(Some(spec), n)?;
            assert_eq!(done, all, "{n} steps, launch {k} refused");
            if n >= MIN_STEPS && k <= n - 2 {
                let launches = calls.iter().filter(|c| **c == "launch").count();
                assert_eq!(launches, k, "{n} steps, launch {k} refused: {calls:?}");
                assert_eq!(calls.last(), Some(&"recover"));
            }
        }
    }
    Ok(())
}

#[test]
fn a_step_body_error_is_the_runs_error() {
    let mut steps = Steps::new(Some(fake_default()), 6);
    steps.start(&mut || Ok(())).unwrap();
    steps.step(0, &mut || Ok(())).unwrap();
    // Step 1 is captured (runs nothing) then launched, which runs the body.
    let e = steps
        .step(1, &mut || Err(Error::Config("the body failed".into())))
        .unwrap_err();
    assert!(e.to_string().contains("the body failed"), "{e}");
    assert!(steps.replaying());
}

fn fake_default() -> Fake {
    Fake {
        spec: Spec::default(),
        launches: 0,
        noise: 0,
    }
}

fn assert_same(a: &[AttackResult], b: &[AttackResult], what: &str) -> Result<()> {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(b) {
        assert_eq!(
            value_bits(&a.clipped)?,
            value_bits(&b.clipped)?,
            "{what}: points"
        );
        assert_eq!(a.success, b.success, "{what}: successes");
        assert_eq!(a.iterations, b.iterations, "{what}: steps");
    }
    Ok(())
}

/// The PGD loop's runs with their middle steps through the recorder equal eager runs,
/// bit for bit, and each run of n ≥ MIN_STEPS steps captures once and launches n − 2
/// times (unless told to fail).
#[test]
fn recorded_pgd_runs_equal_eager_runs() -> Result<()> {
    let t = trained();
    let model = By(&t.model);
    let configs = [
        (
            "PGD-10 CE, 3 restarts",
            Pgd {
                steps: 10,
                step_size: StepSize::Relative(0.25),
                restarts: Restarts::same(3, Init::Uniform),
                ..Pgd::madry_linf_cifar10()
            },
        ),
        (
            "PGD-12 L2, momentum, backtracking",
            Pgd {
                norm: Norm::L2,
                steps: 12,
                momentum: 0.75,
                backtrack: Some(1.5),
                objective: Objective::CwMargin,
                step_size: StepSize::Relative(0.25),
                restarts: Restarts::same(2, Init::Uniform),
                ..Pgd::madry_linf_cifar10()
            },
        ),
        (
            "CCAT's training attack, last iterate",
            Pgd {
                steps: 12,
                last_iterate: true,
                ..Pgd::ccat_train()
            },
        ),
        ("PGD-3 (too short to record)", {
            Pgd {
                steps: 3,
                ..Pgd::madry_linf_cifar10()
            }
        }),
    ];
    let eps = [0.03, 0.1];
    for (what, cfg) in &configs {
        let attack =
            || with_device_resident_pgd(|| cfg.run(&model, Bounds::UNIT, &t.xs, &t.ys, &eps, 7));
        let eager = attack()?;
        let recorded = cfg.steps >= MIN_STEPS;
        for (how, spec) in [
            ("recorded", Spec::default()),
            (
                "capture refused",
                Spec {
                    fail_capture: true,
                    ..Spec::default()
                },
            ),
            (
                "third launch refused",
                Spec {
                    fail_launch: Some(3),
                    ..Spec::default()
                },
            ),
        ] {
            let (captures, launches) = cuda_graph_steps();
            let before = device_resident_pgd_runs();
            let out = with_fake(spec, attack)?;
            let runs = device_resident_pgd_runs() - before;
            assert!(runs > 0, "{what}: the device-resident loop did not run");
            assert_same(&eager, &out, &format!("{what}, {how}"))?;
            let (c, l) = cuda_graph_steps();
            let (c, l) = (c - captures, l - launches);
            match (recorded, how) {
                (false, _) | (true, "capture refused") => {
                    assert_eq!((c, l), (0, 0), "{what}, {how}")
                }
                (true, "recorded") => assert_eq!((c, l), (runs, runs * (cfg.steps - 2)), "{what}"),
                (true, _) => assert_eq!((c, l), (runs, runs * 2), "{what}, {how}"),
            }
            if recorded && how != "recorded" {
                let failure = cuda_graph_failure().unwrap_or_default();
                assert!(failure.contains("refused"), "{what}, {how}: {failure}");
            }
        }
    }
    Ok(())
}
