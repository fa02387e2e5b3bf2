//! The trainer's step graphs on the CPU, through a stand-in recorder whose capture runs
//! nothing and whose launch runs the step from the graph's buffers (as a replay
//! would): whole runs equal eager runs bit for bit, with one capture and a launch for
//! every later full batch, and fall back to eager steps with the same result when a
//! capture or a launch is refused or the method's draws are not declared.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use candle_core::Device;
use rampart_attacks::{Pgd, Restarts, StepSize};
use rampart_models::Classifier;

use super::{train_graph_failure, train_graph_steps};
use crate::tests::{assert_same_weights, short_ccat, toy_config, toy_dataset, toy_spec, Crashing};
use crate::*;

/// What the stand-in refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refuse {
    Nothing,
    Capture,
    Launch,
}

thread_local! {
    static FAKE: Cell<Option<Refuse>> = const { Cell::new(None) };
    /// Steps the stand-in ran eagerly (warm-up), captured, and launched.
    static SEEN: RefCell<(usize, usize, usize)> = const { RefCell::new((0, 0, 0)) };
}

/// The stand-in recorder of a run started under [`with_fake_graphs`], if any.
pub(crate) fn fake() -> Option<Fake> {
    FAKE.with(Cell::get).map(Fake)
}

/// Runs `f` with every training run on this thread taking the stand-in recorder.
fn with_fake_graphs<R>(refuse: Refuse, f: impl FnOnce() -> R) -> R {
    FAKE.with(|c| c.set(Some(refuse)));
    SEEN.with(|s| *s.borrow_mut() = (0, 0, 0));
    let out = f();
    FAKE.with(|c| c.set(None));
    out
}

/// Capture records nothing; a launch is the step itself (`RUNS_BODY`).
pub(crate) struct Fake(Refuse);

impl rampart_attacks::GraphRecorder for Fake {
    type Graph = ();
    const RUNS_BODY: bool = true;

    fn warm(
        &mut self,
        body: &mut dyn FnMut() -> rampart_attacks::Result<()>,
    ) -> rampart_attacks::Result<()> {
        SEEN.with(|s| s.borrow_mut().0 += 1);
        body()
    }

    fn capture(
        &mut self,
        _body: &mut dyn FnMut() -> rampart_attacks::Result<()>,
    ) -> rampart_attacks::Result<()> {
        if self.0 == Refuse::Capture {
            return Err(rampart_attacks::Error::Input("capture refused".into()));
        }
        SEEN.with(|s| s.borrow_mut().1 += 1);
        Ok(())
    }

    fn launch(&mut self, _g: &()) -> rampart_attacks::Result<()> {
        if self.0 == Refuse::Launch {
            return Err(rampart_attacks::Error::Input("launch refused".into()));
        }
        SEEN.with(|s| s.borrow_mut().2 += 1);
        Ok(())
    }

    fn recover(&mut self) {}

    fn noise(&self) -> usize {
        rampart_models::noise_seeds_drawn()
    }
}

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// 70 training images: 4 full batches of 16 and one of 6 per epoch.
fn data() -> (Arc<rampart_data::ImageDataset>, rampart_data::ImageDataset) {
    (Arc::new(toy_dataset(70, 1)), toy_dataset(16, 2))
}

/// A 2-epoch run of `method` into `dir`, its history.
fn run(
    method: &dyn TrainingMethod,
    dir: &std::path::Path,
) -> std::result::Result<Vec<EpochRecord>, Box<dyn std::error::Error>> {
    let (train, test) = data();
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    let outcome = Trainer::new(toy_config(2), dir)?
        .progress(Progress::Hidden)
        .run(&mut model, method, train, &test)?;
    Ok(outcome.history)
}

/// Histories equal but for their timings.
fn assert_same_history(a: &[EpochRecord], b: &[EpochRecord], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            x.train_loss.to_bits(),
            y.train_loss.to_bits(),
            "{what}: loss"
        );
        assert_eq!(x.train_accuracy, y.train_accuracy, "{what}: accuracy");
        assert_eq!(x.test_accuracy, y.test_accuracy, "{what}: test accuracy");
        assert_eq!(x.lr, y.lr, "{what}: learning rate");
    }
}

fn short_trades() -> Trades {
    Trades {
        steps: 2,
        ..Trades::zhang_cifar10()
    }
}

fn short_sat() -> Sat {
    Sat {
        attack: Pgd {
            steps: 2,
            ..Pgd::linf_pgd10()
        },
        sinkhorn_iters: 10,
        ..Sat::cifar10()
    }
}

fn short_pgd_at() -> AdversarialTraining {
    AdversarialTraining {
        attack: Pgd {
            steps: 3,
            step_size: StepSize::Relative(0.5),
            restarts: Restarts::same(2, rampart_attacks::Init::Uniform),
            ..Pgd::madry_linf_cifar10()
        },
        ..AdversarialTraining::madry_cifar10()
    }
}

/// Normal training (with label smoothing), fast AT, PGD-AT (two restarts), CCAT,
/// TRADES (its Gaussian start drawn by the trainer before each step), RegMixup (its
/// mixing weight and partners drawn by the trainer into device buffers), SAT (its
/// Sinkhorn annealing made on the device) and AR-AdaLS (its state in device buffers
/// updated in place): the
/// graph's run equals the eager run bit for bit (weights, losses, accuracies), with one
/// capture at the second full batch and a launch for it and every later full batch of
/// both epochs (4 full batches each: 7 launches), the last small batch eagerly.
#[test]
fn runs_replayed_from_step_graphs_equal_eager_runs() -> TestResult {
    // A new method for each run: AR-AdaLS learns its state from the run's batches.
    type Make = fn() -> Result<Box<dyn TrainingMethod>>;
    let methods: Vec<(&str, Make)> = vec![
        ("normal", || Ok(Box::new(Normal::new()))),
        ("label smoothing", || {
            Ok(Box::new(Normal::with_label_smoothing(0.1)?))
        }),
        ("fast AT", || Ok(Box::new(FastAt::wong_cifar10()))),
        ("PGD-AT", || Ok(Box::new(short_pgd_at()))),
        ("CCAT", || Ok(Box::new(short_ccat()))),
        ("TRADES", || Ok(Box::new(short_trades()))),
        ("RegMixup", || Ok(Box::new(RegMixup::pinto_cifar10()))),
        ("SAT", || Ok(Box::new(short_sat()))),
        ("AR-AdaLS", || {
            Ok(Box::new(ArAdaLs::new(ArAdaLsConfig::qin_cifar10())?))
        }),
    ];
    for (what, make) in &methods {
        let eager = tempfile::tempdir()?;
        let graphed = tempfile::tempdir()?;
        let h_eager = run(make()?.as_ref(), eager.path())?;
        let before = train_graph_steps();
        let method = make()?;
        let h_graph = with_fake_graphs(Refuse::Nothing, || run(method.as_ref(), graphed.path()))?;
        let after = train_graph_steps();
        assert_eq!(
            SEEN.with(|s| *s.borrow()),
            (1, 1, 7),
            "{what}: warm-ups, captures, launches"
        );
        assert_eq!((after.0 - before.0, after.1 - before.1), (1, 7), "{what}");
        assert_same_history(&h_eager, &h_graph, what);
        assert_same_weights(eager.path(), graphed.path())?;
    }
    Ok(())
}

/// A refused capture or launch: the run goes on eagerly from that step, the same run;
/// the failure is reported. A method whose draws are not declared never captures.
#[test]
fn refused_graphs_and_undeclared_draws_train_eagerly() -> TestResult {
    let method = FastAt::wong_cifar10();
    let eager = tempfile::tempdir()?;
    let h_eager = run(&method, eager.path())?;
    for (refuse, seen) in [(Refuse::Capture, (1, 0, 0)), (Refuse::Launch, (1, 1, 0))] {
        let dir = tempfile::tempdir()?;
        let h = with_fake_graphs(refuse, || run(&method, dir.path()))?;
        assert_eq!(SEEN.with(|s| *s.borrow()), seen, "{refuse:?}");
        assert!(
            train_graph_failure().is_some_and(|f| f.contains("refused")),
            "{refuse:?}: {:?}",
            train_graph_failure()
        );
        assert_same_history(&h_eager, &h, &format!("{refuse:?}"));
        assert_same_weights(eager.path(), dir.path())?;
    }
    // A wrapper that does not declare its draws (the trait's default).
    let undeclared = Crashing {
        inner: FastAt::wong_cifar10(),
        calls: Cell::new(0),
        fail_at: usize::MAX,
    };
    let dir = tempfile::tempdir()?;
    let h = with_fake_graphs(Refuse::Nothing, || run(&undeclared, dir.path()))?;
    assert_eq!(SEEN.with(|s| *s.borrow()), (0, 0, 0));
    assert_same_history(&h_eager, &h, "undeclared");
    Ok(())
}
