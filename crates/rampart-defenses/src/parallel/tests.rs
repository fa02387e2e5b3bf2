//! Data-parallel training on CPU workers (threads joined by a [`TcpGroup`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use candle_nn::ModuleT;
use rampart_data::{ImageDataset, Loader, LoaderConfig};
use rampart_models::Classifier;

use super::*;
use crate::tests::{assert_same_weights, toy_config, toy_dataset, toy_spec, Crashing};
use crate::{ArAdaLs, ArAdaLsConfig, Normal, TestResult, Trainer, HISTORY_FILE, MODEL_FILE};

const JOIN: Duration = Duration::from_secs(120);

/// Runs `work` on `workers` threads joined by one [`TcpGroup`]; their results in rank
/// order.
fn on_workers<T: Send>(
    workers: usize,
    work: impl Fn(Arc<TcpGroup>) -> Result<T> + Sync,
) -> std::result::Result<Vec<Result<T>>, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let rendezvous = dir.path().join("rendezvous");
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|rank| {
                let (rendezvous, work) = (&rendezvous, &work);
                s.spawn(move || work(Arc::new(TcpGroup::join(rank, workers, rendezvous, JOIN)?)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(DefenseError::Parallel("a worker panicked".into())))
            })
            .collect()
    }))
}

fn all_ok<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    results.into_iter().collect()
}

#[test]
fn tcp_group_adds_in_rank_order_and_broadcasts_worker_0() -> TestResult {
    let out = all_ok(on_workers(3, |g| {
        let r = g.rank() as f32;
        let cpu = &Device::Cpu;
        let sum = g.all_reduce_sum(&Tensor::new(&[r, 1.0, 0.1 * r], cpu)?)?;
        let wide = g.all_reduce_sum(&Tensor::new(&[1e12f64 + f64::from(r)], cpu)?)?;
        let root = g.broadcast(&Tensor::new(&[r + 5.0, 2.0 * r], cpu)?)?;
        Ok((
            sum.to_vec1::<f32>()?,
            wide.to_vec1::<f64>()?,
            root.to_vec1::<f32>()?,
        ))
    })?)?;
    let third = (0.0f32 + 0.1 * 1.0) + 0.1 * 2.0;
    for (sum, wide, root) in &out {
        assert_eq!(sum, &vec![3.0, 3.0, third]);
        assert_eq!(wide, &vec![3e12 + 3.0]);
        assert_eq!(root, &vec![5.0, 0.0]);
    }
    Ok(())
}

#[test]
fn workers_out_of_step_fail_with_a_clear_error() -> TestResult {
    let out = on_workers(2, |g| {
        let n = 3 - g.rank(); // worker 0 sends 3 values, worker 1 two
        g.all_reduce_sum(&Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu)?)
    })?;
    let errors: Vec<String> = out
        .into_iter()
        .map(|r| r.err().map(|e| e.to_string()).unwrap_or_default())
        .collect();
    assert!(errors[0].contains("worker 1 is out of step"), "{errors:?}");
    assert!(errors[1].contains("lost worker 0"), "{errors:?}");
    // Nobody listening: a worker gives up after the time limit, naming the file.
    let dir = tempfile::tempdir()?;
    let lonely = TcpGroup::join(1, 2, &dir.path().join("nobody"), Duration::from_millis(200));
    let err = lonely.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("found no worker 0 through"), "{err}");
    Ok(())
}

/// A variable reached on one worker only counts as zero on the other; one reached
/// nowhere keeps no gradient.
#[test]
fn a_gradient_missing_on_one_worker_counts_as_zero() -> TestResult {
    let out = all_ok(on_workers(2, |g| {
        let cpu = &Device::Cpu;
        let vars: Vec<(String, Var)> = ["a", "b", "c"]
            .iter()
            .map(|n| Ok((n.to_string(), Var::new(&[1f32, 2.0], cpu)?)))
            .collect::<Result<_>>()?;
        let (a, b) = (vars[0].1.as_tensor(), vars[1].1.as_tensor());
        let loss = if g.rank() == 0 {
            (a * 2.0)?.sum_all()?
        } else {
            (a + b)?.sum_all()?
        };
        let mut grads = loss.backward()?;
        average_gradients(g.as_ref(), &vars, &mut grads)?;
        let grad = |i: usize| -> Result<Option<Vec<f32>>> {
            Ok(match grads.get(vars[i].1.as_tensor()) {
                Some(t) => Some(t.to_vec1::<f32>()?),
                None => None,
            })
        };
        Ok((grad(0)?, grad(1)?, grad(2)?))
    })?)?;
    for (a, b, c) in out {
        assert_eq!(a, Some(vec![1.5, 1.5]));
        assert_eq!(b, Some(vec![0.5, 0.5]));
        assert_eq!(c, None);
    }
    Ok(())
}

/// The global batch of eight toy images, as the trainer's loader would give it.
fn global_batch(data: ImageDataset) -> Result<(Tensor, Tensor)> {
    let loader = Loader::new(Arc::new(data), LoaderConfig::eval(8), Device::Cpu)?;
    let batch = loader
        .epoch(0)
        .next()
        .ok_or_else(|| DefenseError::Config("empty toy set".into()))??;
    Ok((batch.images, batch.labels))
}

/// The gradient of every trainable variable of the toy model at seed 11 for the mean
/// cross-entropy over `images`, averaged over the workers when `group` is given.
fn gradients(
    images: &Tensor,
    labels: &Tensor,
    group: Option<&dyn Collective>,
) -> Result<Vec<(String, Vec<f32>)>> {
    let model = Classifier::new(toy_spec(), 11, &Device::Cpu)?;
    // Inference mode: BatchNorm uses its running statistics, so every example's
    // logits depend on that example alone, as the identity requires.
    let logits = model.forward_t(images, false)?;
    let loss = crate::cross_entropy(&logits, labels, 0.0)?;
    let mut grads = loss.backward()?;
    let vars = model.trainable_vars();
    if let Some(group) = group {
        average_gradients(group, &vars, &mut grads)?;
    }
    vars.iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| DefenseError::Config(format!("{name} has no gradient")))?;
            Ok((name.clone(), g.flatten_all()?.to_vec1::<f32>()?))
        })
        .collect()
}

/// The identity: the mean of the workers' gradients on their parts of a batch
/// is the single-process gradient of the whole batch.
#[test]
fn averaged_gradients_equal_the_gradient_of_the_global_batch() -> TestResult {
    let (images, labels) = global_batch(toy_dataset(8, 3))?;
    let single = gradients(&images, &labels, None)?;
    for workers in [2, 4] {
        let per_worker = all_ok(on_workers(workers, |g| {
            let part = 8 / workers;
            let rows = g.rank() * part;
            gradients(
                &images.narrow(0, rows, part)?,
                &labels.narrow(0, rows, part)?,
                Some(g.as_ref()),
            )
        })?)?;
        for averaged in &per_worker {
            assert_eq!(
                averaged, &per_worker[0],
                "the workers got different gradients"
            );
            for ((name, a), (_, s)) in averaged.iter().zip(&single) {
                let scale = s.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(s).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    worst <= 1e-5 * scale,
                    "{workers} workers, {name}: differs by {worst} (scale {scale})"
                );
            }
        }
    }
    Ok(())
}

/// Variables by name, flattened.
type Named = Vec<(String, Vec<f32>)>;

/// Every variable the model holds, flattened.
fn values(model: &Classifier) -> Result<Vec<(String, Vec<f32>)>> {
    model
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// Trains the toy model (seed 5) for `epochs` into `out` with `method`, as a worker of
/// `group` if given, resuming `out`'s checkpoint if asked; its weights and outcome.
fn train_toy(
    group: Option<Arc<TcpGroup>>,
    out: &Path,
    epochs: usize,
    method: &dyn crate::TrainingMethod,
    resume: bool,
) -> Result<(Named, crate::TrainOutcome)> {
    let mut model = Classifier::new(toy_spec(), 5, &Device::Cpu)?;
    let mut trainer = Trainer::new(toy_config(epochs), out)?
        .progress(crate::Progress::Hidden)
        .resume(resume);
    if let Some(group) = group {
        trainer = trainer.parallel(group);
    }
    let outcome = trainer.run(
        &mut model,
        method,
        Arc::new(toy_dataset(48, 1)),
        &toy_dataset(8, 2),
    )?;
    Ok((values(&model)?, outcome))
}

/// Two workers end with the same weights, and worker 0 alone writes.
#[test]
fn two_workers_stay_identical_and_worker_0_alone_writes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (first, second) = (dir.path().join("worker0"), dir.path().join("worker1"));
    let out = all_ok(on_workers(2, |g| {
        let out = if g.rank() == 0 { &first } else { &second };
        train_toy(Some(g), out, 2, &Normal::new(), false)
    })?)?;
    assert_eq!(out[0].0, out[1].0, "the workers' weights drifted apart");
    assert!(!second.exists(), "worker 1 wrote files");
    let history = crate::read_history(&first.join(HISTORY_FILE))?;
    assert_eq!(history.len(), 2);
    assert!(history.iter().all(|r| r.workers == Some(2)));
    assert!(history[1].train_loss.is_finite() && history[1].test_accuracy.is_some());
    // Accuracy over the global batches: 3 steps of 16 examples.
    let correct = history[1].train_accuracy * 48.0;
    assert!((correct - correct.round()).abs() < 1e-9, "{correct}");
    assert!(first.join(MODEL_FILE).is_file());
    Ok(())
}

/// A run of two workers stopped in its third epoch resumes in a single process from
/// worker 0's checkpoint.
#[test]
fn a_checkpoint_of_two_workers_resumes_in_one_process() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = on_workers(2, |g| {
        let crashing = Crashing {
            inner: Normal::new(),
            calls: std::cell::Cell::new(0),
            fail_at: 3 * 2 + 1, // the first step of epoch 3
        };
        train_toy(Some(g), dir.path(), 3, &crashing, false)
    })?;
    assert!(out.iter().all(|r| r.is_err()));
    let (_, resumed) = train_toy(None, dir.path(), 3, &Normal::new(), true)?;
    assert_eq!(resumed.resumed_at, Some(2));
    assert_eq!(resumed.history.len(), 3);
    assert_eq!(resumed.history[1].workers, Some(2));
    assert_eq!(resumed.history[2].workers, None);
    Ok(())
}

/// One worker of a group takes the collective path and trains bit for bit like a
/// single process.
#[test]
fn one_worker_trains_exactly_like_a_single_process() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (plain, grouped) = (dir.path().join("plain"), dir.path().join("grouped"));
    train_toy(None, &plain, 2, &Normal::new(), false)?;
    all_ok(on_workers(1, |g| {
        train_toy(Some(g), &grouped, 2, &Normal::new(), false)
    })?)?;
    assert_same_weights(&plain, &grouped)
}

/// A stateful method that does not synchronise its state: AR-AdaLS with its sums
/// kept per worker.
#[derive(Debug)]
struct PerWorkerState(ArAdaLs);

impl crate::TrainingMethod for PerWorkerState {
    fn name(&self) -> &'static str {
        "per-worker"
    }
    fn settings(&self) -> serde_json::Value {
        self.0.settings()
    }
    fn state(&self) -> Option<serde_json::Value> {
        self.0.state()
    }
    fn loss(&self, batch: &mut crate::TrainBatch<'_>) -> Result<crate::BatchLoss> {
        let mut alone = crate::TrainBatch::new(batch.model, batch.images, batch.labels, batch.rng);
        self.0.loss(&mut alone)
    }
}

fn adals() -> Result<ArAdaLs> {
    ArAdaLs::new(ArAdaLsConfig::qin_cifar10())
}

/// Two workers train AR-AdaLS and end with the same weights and the same learnt
/// smoothing; a stateful method that keeps its state per worker is refused.
#[test]
fn ar_adals_trains_on_several_workers_and_unsynchronised_state_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = all_ok(on_workers(2, |g| {
        let out = dir.path().join(format!("adals{}", g.rank()));
        let method = adals()?;
        let (weights, outcome) = train_toy(Some(g), &out, 2, &method, false)?;
        Ok((weights, outcome, method.snapshot()?))
    })?)?;
    assert_eq!(out[0].0, out[1].0, "the workers' weights drifted apart");
    assert_eq!(
        out[0].2, out[1].2,
        "the workers' AR-AdaLS states drifted apart"
    );
    // Every example of the 2 epochs × 48 images is counted once, over both workers.
    assert_eq!(out[0].2.examples.iter().sum::<u64>(), 96);
    assert!(out[0].1.history[1].train_loss.is_finite());

    let refused = on_workers(2, |g| {
        let out = dir.path().join(format!("per-worker{}", g.rank()));
        train_toy(Some(g), &out, 1, &PerWorkerState(adals()?), false)
    })?;
    for r in refused {
        let err = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("per-worker learns a state from every batch without synchronising"),
            "{err}"
        );
    }
    Ok(())
}

/// AR-AdaLS's state after one batch of the toy model at seed 11 (train mode), as one
/// worker of `group` with synchronised BatchNorm if given; with `sum` false the
/// worker keeps its calibration sums to itself.
fn adals_step(
    images: &Tensor,
    labels: &Tensor,
    group: Option<Arc<TcpGroup>>,
    sum: bool,
) -> Result<crate::AdaLsState> {
    use rand::SeedableRng;
    let model = Classifier::new(toy_spec(), 11, &Device::Cpu)?;
    let _scope = group
        .clone()
        .map(|g| rampart_models::SyncScope::new(Arc::new(CollectiveSum(g as Arc<dyn Collective>))));
    let method = adals()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut batch = crate::TrainBatch::new(&model, images, labels, &mut rng);
    if let (Some(g), true) = (&group, sum) {
        batch = batch.across(g.as_ref());
    }
    crate::TrainingMethod::loss(&method, &mut batch)?;
    method.snapshot()
}

/// With synchronised BatchNorm, the workers' AR-AdaLS update is the single process's
/// on the global batch: the same examples per group, gaps and smoothing to rounding.
/// Without the sum each worker counts only its own part, which the test checks too.
#[test]
fn ar_adals_learns_the_global_batch_state_on_every_worker() -> TestResult {
    let (images, labels) = global_batch(toy_dataset(8, 3))?;
    let single = adals_step(&images, &labels, None, false)?;
    assert_eq!(single.examples.iter().sum::<u64>(), 8);
    for workers in [2, 4] {
        let part = 8 / workers;
        let rows = |t: &Tensor, rank: usize| t.narrow(0, rank * part, part);
        let step = |sum: bool| -> std::result::Result<_, Box<dyn std::error::Error>> {
            Ok(all_ok(on_workers(workers, |g| {
                let r = g.rank();
                adals_step(&rows(&images, r)?, &rows(&labels, r)?, Some(g), sum)
            })?)?)
        };
        let synced = step(true)?;
        for state in &synced {
            assert_eq!(state, &synced[0], "the workers learnt different states");
            assert_eq!(state.examples, single.examples, "{workers} workers");
            for g in 0..crate::ADALS_GROUPS {
                let (gap, s) = (
                    state.gap[g] - single.gap[g],
                    state.smoothing[g] - single.smoothing[g],
                );
                assert!(
                    gap.abs() < 1e-6 && s.abs() < 1e-6,
                    "{workers} workers, group {g}: {state:?} against {single:?}"
                );
            }
        }
        let apart = step(false)?;
        assert_eq!(apart[0].examples.iter().sum::<u64>(), part as u64);
    }
    Ok(())
}

/// Every trainable variable's gradient (mean cross-entropy over `images`, train mode)
/// and the running statistics after the step, of the toy model at seed 11; with
/// `group`, synchronised BatchNorm and the gradients averaged over the workers.
fn train_mode_step(
    images: &Tensor,
    labels: &Tensor,
    group: Option<Arc<TcpGroup>>,
) -> Result<(Named, Named)> {
    spec_train_mode_step(toy_spec(), images, labels, None, group)
}

/// [`train_mode_step`] of a model of `spec`, an OAT model's at one λ per row
/// (`lambdas`); a worker's part starts at row rank·B/W of the global batch
/// ([`Classifier::set_batch_offset`]).
fn spec_train_mode_step(
    spec: rampart_models::ModelSpec,
    images: &Tensor,
    labels: &Tensor,
    lambdas: Option<&[f32]>,
    group: Option<Arc<TcpGroup>>,
) -> Result<(Named, Named)> {
    let model = Classifier::new(spec, 11, &Device::Cpu)?;
    if let Some(g) = &group {
        model.set_batch_offset(g.rank() * images.dim(0)?);
    }
    let _scope = group
        .clone()
        .map(|g| rampart_models::SyncScope::new(Arc::new(CollectiveSum(g as Arc<dyn Collective>))));
    let logits = match lambdas {
        Some(l) => model.forward_lambdas(images, l, true)?,
        None => model.forward_t(images, true)?,
    };
    let loss = crate::cross_entropy(&logits, labels, 0.0)?;
    let mut grads = loss.backward()?;
    let vars = model.trainable_vars();
    if let Some(group) = &group {
        average_gradients(group.as_ref(), &vars, &mut grads)?;
    }
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let grads = vars
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| DefenseError::Config(format!("{name} has no gradient")))?;
            Ok((name.clone(), flat(g)?))
        })
        .collect::<Result<Named>>()?;
    let buffers = model
        .named_vars()
        .into_iter()
        .filter(|(n, _)| rampart_models::is_buffer(n))
        .map(|(n, v)| Ok((n, flat(v.as_tensor())?)))
        .collect::<Result<Named>>()?;
    Ok((grads, buffers))
}

/// Every trainable variable's gradient of the mean cross-entropy over `images` (train
/// mode), averaged over the workers of `group`.
fn worker_gradients(
    model: &Classifier,
    images: &Tensor,
    labels: &Tensor,
    group: &Arc<TcpGroup>,
) -> Result<Named> {
    let loss = crate::cross_entropy(&model.forward_t(images, true)?, labels, 0.0)?;
    let mut grads = loss.backward()?;
    let vars = model.trainable_vars();
    average_gradients(group.as_ref(), &vars, &mut grads)?;
    vars.iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| DefenseError::Config(format!("{n} has no gradient")))?;
            Ok((n.clone(), g.flatten_all()?.to_vec1::<f32>()?))
        })
        .collect()
}

/// With synchronised BatchNorm, 2 and 4 workers of a `spec` model (an OAT model at
/// `lambdas`, one per row) on their parts of the global batch get the single
/// process's gradients (averaged; within 1e-4 of each variable's largest entry) and
/// running statistics (within 1e-5), all workers the same. Returns the single
/// process's gradients and buffers.
fn synchronised_workers_match_one_process(
    spec: &rampart_models::ModelSpec,
    images: &Tensor,
    labels: &Tensor,
    lambdas: Option<&[f32]>,
) -> std::result::Result<(Named, Named), Box<dyn std::error::Error>> {
    let name = spec.arch.to_string();
    let (single, single_buffers) =
        spec_train_mode_step(spec.clone(), images, labels, lambdas, None)?;
    let b = images.dim(0)?;
    for workers in [2, 4] {
        let part = b / workers;
        let synced = all_ok(on_workers(workers, |g| {
            let r = g.rank();
            spec_train_mode_step(
                spec.clone(),
                &images.narrow(0, r * part, part)?,
                &labels.narrow(0, r * part, part)?,
                lambdas.map(|l| &l[r * part..(r + 1) * part]),
                Some(g),
            )
        })?)?;
        for (grads, buffers) in &synced {
            assert_eq!(
                grads, &synced[0].0,
                "{name}: the workers got different gradients"
            );
            let d = worst_relative(grads, &single);
            eprintln!("{name}, {workers} synchronised workers: gradients within {d:.1e}");
            assert!(
                d < 1e-4,
                "{name}, {workers} workers: gradients differ by {d}"
            );
            let d = worst_relative(buffers, &single_buffers);
            assert!(
                d < 1e-5,
                "{name}, {workers} workers: running statistics differ by {d}"
            );
        }
    }
    Ok((single, single_buffers))
}

/// The largest difference of two sets of named values, relative to the reference's
/// largest magnitude per variable.
fn worst_relative(got: &Named, want: &Named) -> f32 {
    got.iter()
        .zip(want)
        .map(|((name, a), (other, s))| {
            assert_eq!(name, other);
            let scale = s.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            a.iter().zip(s).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        })
        .fold(0f32, f32::max)
}

/// With synchronised BatchNorm the identity holds in train mode: the workers'
/// averaged gradients equal the single-process gradient of the whole batch (which
/// runs the fused CPU train path), and every worker's running statistics are the
/// single process's. Without it they are not (DDP's per-worker BatchNorm), which the
/// test checks too, so that it can fail.
#[test]
fn synchronised_batch_norm_gives_the_global_batch_in_train_mode() -> TestResult {
    let (images, labels) = global_batch(toy_dataset(8, 3))?;
    let (single, single_buffers) = train_mode_step(&images, &labels, None)?;
    for workers in [2, 4] {
        let part = 8 / workers;
        let rows = |t: &Tensor, rank: usize| t.narrow(0, rank * part, part);
        let synced = all_ok(on_workers(workers, |g| {
            let r = g.rank();
            train_mode_step(&rows(&images, r)?, &rows(&labels, r)?, Some(g))
        })?)?;
        for (grads, buffers) in &synced {
            assert_eq!(grads, &synced[0].0, "the workers got different gradients");
            let d = worst_relative(grads, &single);
            eprintln!("{workers} synchronised workers: gradients within {d:.1e} (relative)");
            assert!(d < 1e-4, "{workers} workers: gradients differ by {d}");
            let d = worst_relative(buffers, &single_buffers);
            assert!(
                d < 1e-5,
                "{workers} workers: running statistics differ by {d}"
            );
        }
        // Per-worker BatchNorm: the same step without synchronisation.
        let plain = all_ok(on_workers(workers, |g| {
            let r = g.rank();
            let model = Classifier::new(toy_spec(), 11, &Device::Cpu)?;
            worker_gradients(&model, &rows(&images, r)?, &rows(&labels, r)?, &g)
        })?)?;
        let d = worst_relative(&plain[0], &single);
        eprintln!("{workers} workers, per-worker BatchNorm: gradients {d:.1e} apart");
        assert!(
            d > 1e-2,
            "{workers} workers without synchronisation: only {d} apart"
        );
    }
    Ok(())
}

/// A stochastic student with synchronised BatchNorm: the noise σ of every layer is
/// measured on the global batch and each worker draws the noise of its rows of the
/// global batch, so the workers' averaged gradients and their running statistics
/// (running σ included) are the single process's. Without the shared σ and the row
/// offset they are not, which the test also checks.
#[test]
fn a_synchronised_student_trains_on_the_global_batch() -> TestResult {
    let student = rampart_models::ModelSpec {
        noise: Some(rampart_models::NoiseSpec { alpha: 0.5 }),
        ..toy_spec()
    };
    let (images, labels) = global_batch(toy_dataset(8, 3))?;
    let (single, single_buffers) =
        synchronised_workers_match_one_process(&student, &images, &labels, None)?;
    assert!(
        single_buffers.iter().any(|(n, _)| n.contains("noise")),
        "no running noise scale among {:?}",
        single_buffers.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    let rows = |t: &Tensor, rank: usize, part: usize| t.narrow(0, rank * part, part);
    // Each worker drawing its rows as a batch of its own (offset 0): other noise.
    let apart = all_ok(on_workers(2, |g| {
        let r = g.rank();
        let model = Classifier::new(student.clone(), 11, &Device::Cpu)?;
        let _scope = rampart_models::SyncScope::new(Arc::new(CollectiveSum(
            Arc::clone(&g) as Arc<dyn Collective>
        )));
        worker_gradients(&model, &rows(&images, r, 4)?, &rows(&labels, r, 4)?, &g)
    })?)?;
    let d = worst_relative(&apart[0], &single);
    assert!(d > 1e-3, "the row offset made no difference ({d})");
    Ok(())
}

/// An OAT model with synchronised BatchNorm: each dual BatchNorm normalises its λ
/// group of the global batch, a worker whose part has no row of a group taking part
/// in that group's sums with none (here worker 0 of 2 has no λ = 0 row), so the
/// workers' averaged gradients and their running statistics are the single
/// process's.
#[test]
fn a_synchronised_oat_model_trains_on_the_global_batch() -> TestResult {
    let oat = rampart_models::ModelSpec {
        oat: Some(rampart_models::OatSpec::standard()),
        ..toy_spec()
    };
    let (images, labels) = global_batch(toy_dataset(8, 3))?;
    let lambdas = [0.3f32, 1.0, 0.1, 0.4, 0.0, 0.2, 0.0, 1.0];
    synchronised_workers_match_one_process(&oat, &images, &labels, Some(&lambdas))?;
    Ok(())
}

/// A worker with no row at all for a synchronised pass (an OAT batch whose part has
/// no adversarial row) runs it on an empty batch and takes part in every sum: the
/// others get the gradients and statistics of their rows alone.
#[test]
fn a_worker_without_rows_takes_part_in_the_synchronised_sums() -> TestResult {
    let oat = rampart_models::ModelSpec {
        oat: Some(rampart_models::OatSpec::standard()),
        ..toy_spec()
    };
    let (images, labels) = global_batch(toy_dataset(4, 3))?;
    let lambdas = [0.3f32, 1.0, 0.1, 0.4];
    let step = |images: &Tensor, labels: &Tensor, lambdas: &[f32], group: Option<Arc<TcpGroup>>| {
        let model = Classifier::new(oat.clone(), 11, &Device::Cpu)?;
        let _scope = group.clone().map(|g| {
            rampart_models::SyncScope::new(Arc::new(CollectiveSum(g as Arc<dyn Collective>)))
        });
        let logits = model.forward_lambdas(images, lambdas, true)?;
        // A sum over the rows, so that an empty part adds nothing (but its graph
        // still reaches every layer, whose backward sums it takes part in).
        let loss = match images.dim(0)? {
            0 => logits.sum_all()?,
            n => (crate::cross_entropy(&logits, labels, 0.0)? * n as f64)?,
        };
        let mut grads = loss.backward()?;
        let vars = model.trainable_vars();
        if let Some(g) = &group {
            average_gradients(g.as_ref(), &vars, &mut grads)?;
        }
        let named = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let grads = vars
            .iter()
            .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
            .map(|(n, g)| Ok((n, named(&g)?)))
            .collect::<Result<Named>>()?;
        let buffers = model
            .named_vars()
            .into_iter()
            .filter(|(n, _)| rampart_models::is_buffer(n))
            .map(|(n, v)| Ok((n, named(v.as_tensor())?)))
            .collect::<Result<Named>>()?;
        Ok::<_, DefenseError>((grads, buffers))
    };
    let (single, single_buffers) = step(&images, &labels, &lambdas, None)?;
    let out = all_ok(on_workers(2, |g| {
        let (x, y, l) = if g.rank() == 0 {
            (
                images.narrow(0, 0, 0)?,
                labels.narrow(0, 0, 0)?,
                &lambdas[..0],
            )
        } else {
            (images.clone(), labels.clone(), &lambdas[..])
        };
        step(&x, &y, l, Some(g))
    })?)?;
    // Averaged over 2 workers, one of which had nothing: half the single gradient.
    // The clean BatchNorms have no row anywhere: no gradient on the workers, a zero
    // one in the single process (its fused path gives every parameter one).
    let (grads, buffers) = &out[1];
    let (mut doubled, mut want) = (Named::new(), Named::new());
    for (n, v) in &single {
        match grads.iter().find(|(g, _)| g == n) {
            Some((_, g)) => {
                doubled.push((n.clone(), g.iter().map(|x| 2.0 * x).collect()));
                want.push((n.clone(), v.clone()));
            }
            None => assert!(v.iter().all(|&x| x == 0.0), "{n}: only the single moved"),
        }
    }
    assert!(doubled.len() > 10, "{} gradients compared", doubled.len());
    assert_eq!(
        doubled.len(),
        grads.len(),
        "a worker's gradient the single lacks"
    );
    let d = worst_relative(&doubled, &want);
    assert!(d < 1e-4, "gradients differ by {d}");
    assert!(worst_relative(buffers, &single_buffers) < 1e-5);
    assert_eq!(out[0].1, out[1].1, "the empty worker's statistics differ");
    Ok(())
}

/// One epoch of normal training of a toy model (`spec`, seed 5) on 48 images into
/// `out`, with synchronised BatchNorm, as a worker of `group` if given.
fn train_synchronised(
    spec: rampart_models::ModelSpec,
    out: &Path,
    group: Option<Arc<TcpGroup>>,
) -> Result<(Named, crate::TrainOutcome)> {
    train_synchronised_with(spec, &Normal::new(), out, group)
}

/// [`train_synchronised`] with `method`.
fn train_synchronised_with(
    spec: rampart_models::ModelSpec,
    method: &dyn crate::TrainingMethod,
    out: &Path,
    group: Option<Arc<TcpGroup>>,
) -> Result<(Named, crate::TrainOutcome)> {
    let mut model = Classifier::new(spec, 5, &Device::Cpu)?;
    let mut trainer = Trainer::new(toy_config(1), out)?.progress(crate::Progress::Hidden);
    if let Some(g) = group {
        trainer = trainer.parallel(g);
    }
    let outcome = trainer.sync_batch_norm(true).run(
        &mut model,
        method,
        Arc::new(toy_dataset(48, 1)),
        &toy_dataset(8, 2),
    )?;
    Ok((values(&model)?, outcome))
}

/// Two workers train with synchronised BatchNorm and stay identical, a stochastic
/// student's and an OAT model's too; synchronised BatchNorm without workers is
/// refused.
#[test]
fn trainer_runs_synchronised_batch_norm_and_refuses_it_where_it_cannot_hold() -> TestResult {
    let dir = tempfile::tempdir()?;
    let worker = |name: &str, g: &Arc<TcpGroup>| dir.path().join(format!("{name}{}", g.rank()));
    let out = all_ok(on_workers(2, |g| {
        train_synchronised(toy_spec(), &worker("worker", &g), Some(g))
    })?)?;
    assert_eq!(out[0].0, out[1].0, "the workers' weights drifted apart");
    assert!(out[0].1.history[0].train_loss.is_finite());

    let err = train_synchronised(toy_spec(), &dir.path().join("alone"), None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("needs data-parallel workers"), "{err}");

    let student = rampart_models::ModelSpec {
        noise: Some(rampart_models::NoiseSpec { alpha: 0.1 }),
        ..toy_spec()
    };
    let out = all_ok(on_workers(2, |g| {
        train_synchronised(student.clone(), &worker("student", &g), Some(g))
    })?)?;
    assert_eq!(
        out[0].0, out[1].0,
        "the student workers' weights drifted apart"
    );
    assert!(out[0].1.history[0].train_loss.is_finite());

    let oat = rampart_models::ModelSpec {
        oat: Some(rampart_models::OatSpec::standard()),
        ..toy_spec()
    };
    let out = all_ok(on_workers(2, |g| {
        train_synchronised(oat.clone(), &worker("oat", &g), Some(g))
    })?)?;
    assert_eq!(out[0].0, out[1].0, "the OAT workers' weights drifted apart");
    // Once-for-all training itself: λ per example, clean and adversarial passes.
    let method = crate::Oat::new(rampart_attacks::Fgsm::fast_at().as_pgd(), 8.0 / 255.0)?;
    let out = all_ok(on_workers(2, |g| {
        train_synchronised_with(oat.clone(), &method, &worker("oat-method", &g), Some(g))
    })?)?;
    assert_eq!(
        out[0].0, out[1].0,
        "the OAT-trained workers' weights drifted apart"
    );
    assert!(out[0].1.history[0].train_loss.is_finite());
    Ok(())
}
