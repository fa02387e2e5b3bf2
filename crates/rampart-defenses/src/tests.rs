//! End-to-end tests of the training loop on a tiny synthetic problem.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use rampart_data::ImageDataset;
use rampart_models::{Arch, Classifier, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::*;

/// `n` 3×8×8 images of two classes: class 0 dark, class 1 bright, with noise.
pub(crate) fn toy_dataset(n: usize, seed: u64) -> ImageDataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut images = Vec::with_capacity(n * 192);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        let base: i32 = if label == 0 { 70 } else { 170 };
        images.extend((0..192).map(|_| (base + rng.gen_range(-60..=60)) as u8));
        labels.push(label);
    }
    ImageDataset::new(
        images,
        labels,
        (3, 8, 8),
        vec!["dark".into(), "bright".into()],
    )
    .unwrap_or_else(|e| panic!("toy dataset: {e}"))
}

pub(crate) fn toy_spec() -> ModelSpec {
    ModelSpec {
        input_shape: [3, 8, 8],
        ..ModelSpec::cifar(
            Arch::Wrn {
                depth: 10,
                widen: 1,
            },
            2,
        )
    }
}

pub(crate) fn toy_config(epochs: usize) -> TrainConfig {
    TrainConfig::tiny(epochs)
}

/// A method that fails on its `fail_at`-th call, like a killed process.
pub(crate) struct Crashing<M> {
    pub(crate) inner: M,
    pub(crate) calls: Cell<usize>,
    pub(crate) fail_at: usize,
}

impl<M: TrainingMethod> TrainingMethod for Crashing<M> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn settings(&self) -> serde_json::Value {
        self.inner.settings()
    }
    fn state(&self) -> Option<serde_json::Value> {
        self.inner.state()
    }
    fn synchronises_state(&self) -> bool {
        self.inner.synchronises_state()
    }
    fn restore_state(&self, state: &serde_json::Value) -> Result<()> {
        self.inner.restore_state(state)
    }
    fn loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        self.calls.set(self.calls.get() + 1);
        if self.calls.get() == self.fail_at {
            return Err(DefenseError::Config("simulated interruption".into()));
        }
        self.inner.loss(batch)
    }
}

type NamedValues = Vec<(String, Vec<f32>)>;

pub(crate) fn weights(
    path: &std::path::Path,
) -> std::result::Result<NamedValues, Box<dyn std::error::Error>> {
    let model = Classifier::load(path, &Device::Cpu)?;
    model
        .named_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// Asserts that the models saved in the folders `a` and `b` hold the same weights.
pub(crate) fn assert_same_weights(a: &Path, b: &Path) -> TestResult {
    let a = weights(&a.join(MODEL_FILE))?;
    let b = weights(&b.join(MODEL_FILE))?;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x, y, "variable {name} differs");
    }
    Ok(())
}

/// The training and test sets of the resume tests.
fn resume_data() -> (Arc<ImageDataset>, ImageDataset) {
    (Arc::new(toy_dataset(48, 1)), toy_dataset(8, 2))
}

/// Trains `method` under `config` into `dir` from the model of seed 3 and interrupts
/// it in the middle of its second epoch, so that the checkpoint holds epoch 1; returns
/// the trainer of `dir` and the interrupted method.
fn interrupted_run<M: TrainingMethod>(
    config: &TrainConfig,
    dir: &Path,
    method: M,
    train: &Arc<ImageDataset>,
    test: &ImageDataset,
) -> std::result::Result<(Trainer, Crashing<M>), Box<dyn std::error::Error>> {
    let crashing = Crashing {
        inner: method,
        calls: Cell::new(0),
        fail_at: train.len() / config.batch_size + 2,
    };
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    let trainer = Trainer::new(config.clone(), dir)?.progress(Progress::Hidden);
    assert!(trainer
        .run(&mut model, &crashing, Arc::clone(train), test)
        .is_err());
    Ok((trainer, crashing))
}

#[test]
fn training_lowers_the_loss_and_writes_its_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let train = Arc::new(toy_dataset(64, 1));
    let test = toy_dataset(32, 2);
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    let before = predict(&model, &test, 32)?;
    let outcome = Trainer::new(toy_config(4), dir.path())?
        .progress(Progress::Hidden)
        .metadata("dataset", "toy")
        .run(&mut model, &Normal::new(), train, &test)?;
    let h = &outcome.history;
    assert_eq!(h.len(), 4);
    assert!(h[3].train_loss < h[0].train_loss, "{h:?}");
    let after = h[3].test_accuracy.unwrap_or(0.0);
    assert!(
        after >= 0.9,
        "test accuracy {after} (before {})",
        before.accuracy()
    );
    assert_eq!(h.iter().map(|r| r.epoch).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(h
        .windows(2)
        .all(|w| w[1].elapsed_seconds > w[0].elapsed_seconds));
    // The loader's waits are part of each epoch's time.
    for r in h {
        let waited = r.data_wait_seconds.unwrap_or(-1.0);
        assert!((0.0..=r.epoch_seconds).contains(&waited), "{r:?}");
    }
    // A history written before the waits were recorded still reads.
    let mut old = serde_json::to_value(&h[0])?;
    old.as_object_mut().map(|o| o.remove("data_wait_seconds"));
    let old: EpochRecord = serde_json::from_value(old)?;
    assert_eq!(old.data_wait_seconds, None);
    // The cosine schedule ends at 0 on the last iteration.
    assert!(h[3].lr.abs() < 1e-12);

    assert_eq!(read_history(&dir.path().join(HISTORY_FILE))?, *h);
    let meta = read_checkpoint_meta(&dir.path().join(CHECKPOINT_FILE))?;
    assert_eq!(
        (meta.epochs_done, meta.method.as_str(), meta.train_examples),
        (4, "normal", 64)
    );
    let saved = Classifier::load(&outcome.model_path, &Device::Cpu)?;
    let md = saved.metadata();
    assert_eq!(md.get("method").map(String::as_str), Some("normal"));
    assert_eq!(md.get("dataset").map(String::as_str), Some("toy"));
    assert_eq!(md.get("epochs").map(String::as_str), Some("4"));
    assert_eq!(md.get("seed").map(String::as_str), Some("7"));
    // Evaluation of the saved model reproduces the last epoch's accuracy.
    assert_eq!(
        Some(predict(&saved, &test, 5)?.accuracy()),
        h[3].test_accuracy
    );
    Ok(())
}

#[test]
fn resumed_run_ends_with_the_weights_of_the_uninterrupted_run() -> TestResult {
    let (train, test) = resume_data();
    let config = toy_config(2);

    let straight = tempfile::tempdir()?;
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    Trainer::new(config.clone(), straight.path())?
        .progress(Progress::Hidden)
        .run(&mut model, &Normal::new(), Arc::clone(&train), &test)?;

    // Interrupted in the middle of the second epoch: the checkpoint holds epoch 1.
    let resumed = tempfile::tempdir()?;
    let (trainer, _) = interrupted_run(&config, resumed.path(), Normal::new(), &train, &test)?;
    assert_eq!(
        read_checkpoint_meta(&resumed.path().join(CHECKPOINT_FILE))?.epochs_done,
        1
    );
    assert!(!resumed.path().join(MODEL_FILE).exists());

    // Without `resume` the folder is refused; with it, training continues. The model
    // passed in is freshly initialised with another seed: the checkpoint overrides it.
    let mut model = Classifier::new(toy_spec(), 99, &Device::Cpu)?;
    assert!(matches!(
        trainer.run(&mut model, &Normal::new(), Arc::clone(&train), &test),
        Err(DefenseError::Config(_))
    ));
    let outcome =
        trainer
            .clone()
            .resume(true)
            .run(&mut model, &Normal::new(), Arc::clone(&train), &test)?;
    assert_eq!(outcome.resumed_at, Some(1));
    assert_eq!(outcome.history.len(), 2);

    assert_eq!(
        weights(&straight.path().join(MODEL_FILE))?.len(),
        weights(&resumed.path().join(MODEL_FILE))?.len()
    );
    assert_same_weights(straight.path(), resumed.path())?;
    let ha = read_history(&straight.path().join(HISTORY_FILE))?;
    let hb = read_history(&resumed.path().join(HISTORY_FILE))?;
    for (ra, rb) in ha.iter().zip(&hb) {
        assert_eq!(
            (ra.train_loss, ra.train_accuracy, ra.test_accuracy, ra.lr),
            (rb.train_loss, rb.train_accuracy, rb.test_accuracy, rb.lr)
        );
    }
    Ok(())
}

#[test]
fn resume_refuses_a_different_run() -> TestResult {
    let train = Arc::new(toy_dataset(32, 1));
    let test = toy_dataset(4, 2);
    let dir = tempfile::tempdir()?;
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    Trainer::new(toy_config(1), dir.path())?
        .progress(Progress::Hidden)
        .run(&mut model, &Normal::new(), Arc::clone(&train), &test)?;

    let other_lr = TrainConfig {
        lr: 0.1,
        ..toy_config(1)
    };
    let err = Trainer::new(other_lr, dir.path())?
        .resume(true)
        .progress(Progress::Hidden)
        .run(&mut model, &Normal::new(), Arc::clone(&train), &test)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("cannot resume") && err.contains("training configuration"),
        "{err}"
    );

    let smoothing = Normal::with_label_smoothing(0.1)?;
    let err = Trainer::new(toy_config(1), dir.path())?
        .resume(true)
        .progress(Progress::Hidden)
        .run(&mut model, &smoothing, Arc::clone(&train), &test);
    assert!(
        matches!(err, Err(DefenseError::Checkpoint { .. })),
        "{err:?}"
    );

    let fewer = Arc::new(toy_dataset(16, 1));
    let err = Trainer::new(toy_config(1), dir.path())?
        .resume(true)
        .progress(Progress::Hidden)
        .run(&mut model, &Normal::new(), fewer, &test);
    assert!(
        matches!(err, Err(DefenseError::Checkpoint { .. })),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn refuses_data_the_model_cannot_take() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut model = Classifier::new(
        ModelSpec::cifar(
            Arch::Wrn {
                depth: 10,
                widen: 1,
            },
            2,
        ),
        0,
        &Device::Cpu,
    )?;
    let train = Arc::new(toy_dataset(32, 1));
    let err = Trainer::new(toy_config(1), dir.path())?
        .progress(Progress::Hidden)
        .run(&mut model, &Normal::new(), train, &toy_dataset(4, 2));
    assert!(matches!(err, Err(DefenseError::Config(m)) if m.contains("8×8")));

    let mut model = Classifier::new(toy_spec(), 0, &Device::Cpu)?;
    let big_batch = TrainConfig {
        batch_size: 64,
        ..toy_config(1)
    };
    let err = Trainer::new(big_batch, dir.path())?
        .progress(Progress::Hidden)
        .run(
            &mut model,
            &Normal::new(),
            Arc::new(toy_dataset(32, 1)),
            &toy_dataset(4, 2),
        );
    assert!(
        matches!(err, Err(DefenseError::Config(m)) if m.contains("larger than the training set"))
    );
    Ok(())
}

#[test]
fn predictions_are_deterministic_and_consistent() -> TestResult {
    let model = Classifier::new(toy_spec(), 5, &Device::Cpu)?;
    let data = toy_dataset(10, 3);
    let a = predict(&model, &data, 3)?;
    let b = predict(&model, &data, 10)?;
    assert_eq!(a.predicted, b.predicted);
    for (x, y) in a.confidence.iter().zip(&b.confidence) {
        assert!((x - y).abs() < 1e-5);
    }
    assert_eq!(a.probs.len(), 20);
    for (i, row) in a.probs.chunks(2).enumerate() {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let (arg, max) = if row[0] >= row[1] {
            (0, row[0])
        } else {
            (1, row[1])
        };
        assert_eq!(a.predicted[i], arg);
        assert_eq!(a.confidence[i], max);
    }
    assert!(predict(&model, &data, 0).is_err());
    Ok(())
}

/// A method with a short attack, for the tests of adversarial methods.
pub(crate) fn short_ccat() -> Ccat {
    Ccat {
        attack: rampart_attacks::Pgd {
            steps: 3,
            ..rampart_attacks::Pgd::ccat_train()
        },
        ..Ccat::stutz_cifar10()
    }
}

#[test]
fn every_method_lowers_its_loss_on_a_toy_problem() -> TestResult {
    let train = Arc::new(toy_dataset(64, 1));
    let test = toy_dataset(16, 2);
    let pgd3 = rampart_attacks::Pgd {
        steps: 3,
        ..rampart_attacks::Pgd::madry_linf_cifar10()
    };
    let methods: Vec<Box<dyn TrainingMethod>> = vec![
        Box::new(AdversarialTraining::new(pgd3, 8.0 / 255.0, 0.5)?),
        Box::new(FastAt::wong_cifar10()),
        Box::new(Trades {
            steps: 3,
            ..Trades::zhang_cifar10()
        }),
        Box::new(short_ccat()),
        Box::new(RegMixup::pinto_cifar10()),
        Box::new(Sat {
            attack: rampart_attacks::Pgd {
                steps: 3,
                ..rampart_attacks::Pgd::linf_pgd10()
            },
            ..Sat::cifar10()
        }),
        Box::new(ArAdaLs::new(ArAdaLsConfig::qin_cifar10())?),
    ];
    for method in &methods {
        let dir = tempfile::tempdir()?;
        let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
        let outcome = Trainer::new(toy_config(4), dir.path())?
            .progress(Progress::Hidden)
            .run(&mut model, method.as_ref(), Arc::clone(&train), &test)?;
        let h = &outcome.history;
        assert!(
            h[3].train_loss < h[0].train_loss,
            "{}: losses {:?}",
            method.name(),
            h.iter().map(|r| r.train_loss).collect::<Vec<_>>()
        );
        let saved = Classifier::load(&outcome.model_path, &Device::Cpu)?;
        assert_eq!(
            saved.metadata().get("method").map(String::as_str),
            Some(method.name())
        );
    }
    Ok(())
}

/// Two classes told apart by a faint overall brightness difference (±0.06 around 0.5,
/// which an L∞ perturbation of 0.1 erases) and by a 3×3 patch that is dark or bright
/// (0.1 or 0.9, which it cannot). Per-pixel noise U(−0.2, 0.2).
fn toy_robust_dataset(n: usize, seed: u64) -> ImageDataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut images = Vec::with_capacity(n * 192);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        let sign = if label == 0 { -1.0 } else { 1.0 };
        for c in 0..3 {
            for r in 0..8 {
                for col in 0..8 {
                    let v: f64 = if c == 0 && r < 3 && col < 3 {
                        0.5 + sign * 0.4 + rng.gen_range(-0.05..0.05)
                    } else {
                        0.5 + sign * 0.06 + rng.gen_range(-0.2..0.2)
                    };
                    images.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
                }
            }
        }
        labels.push(label);
    }
    ImageDataset::new(images, labels, (3, 8, 8), vec!["a".into(), "b".into()])
        .unwrap_or_else(|e| panic!("toy dataset: {e}"))
}

/// Accuracy under PGD-10 (L∞, step ε/4, uniform start): an example counts as robust if
/// it is classified correctly clean and adversarially.
fn robust_accuracy(model: &Classifier, data: &ImageDataset, eps: f64) -> Result<f64> {
    use rampart_attacks::{Attack, Bounds, Pgd, StepSize};
    let indices: Vec<usize> = (0..data.len()).collect();
    let (x, y) = data.batch_tensors(&indices, &Device::Cpu)?;
    let pgd = Pgd {
        steps: 10,
        step_size: StepSize::Relative(0.25),
        ..Pgd::madry_linf_cifar10()
    };
    let clean = predict(model, data, 64)?;
    let res = pgd.run(&model.frozen(), Bounds::UNIT, &x, &y, &[eps], 1)?;
    let robust = clean
        .labels
        .iter()
        .zip(&clean.predicted)
        .zip(&res[0].success)
        .filter(|((l, p), s)| l == p && !**s)
        .count();
    Ok(robust as f64 / data.len() as f64)
}

#[test]
fn adversarial_training_is_more_robust_than_normal_training() -> TestResult {
    let train = Arc::new(toy_robust_dataset(128, 1));
    let test = toy_robust_dataset(64, 2);
    let eps = 0.1;
    let config = TrainConfig {
        lr: 0.05,
        augmentation: AugmentationConfig {
            crop_padding: 0,
            flip: false,
            cutout: None,
        },
        ..toy_config(6)
    };
    let at = AdversarialTraining::new(
        rampart_attacks::Pgd {
            steps: 5,
            step_size: rampart_attacks::StepSize::Relative(0.4),
            ..rampart_attacks::Pgd::madry_linf_cifar10()
        },
        eps,
        1.0,
    )?;
    let mut accuracies = Vec::new();
    for method in [&Normal::new() as &dyn TrainingMethod, &at] {
        let dir = tempfile::tempdir()?;
        let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
        let outcome = Trainer::new(config.clone(), dir.path())?
            .progress(Progress::Hidden)
            .run(&mut model, method, Arc::clone(&train), &test)?;
        let clean = outcome.history.last().and_then(|r| r.test_accuracy);
        accuracies.push((clean, robust_accuracy(&model, &test, eps)?));
    }
    let [(normal_clean, normal), (at_clean, at)] = accuracies[..] else {
        return Err("two runs expected".into());
    };
    assert!(
        at >= normal + 0.3 && at >= 0.6,
        "robust accuracy: AT {at} (clean {at_clean:?}), normal {normal} (clean {normal_clean:?})"
    );
    Ok(())
}

/// With an attack-based method and an EMA, a run interrupted in its second epoch and
/// resumed ends with the weights (the averaged ones) of the uninterrupted run.
#[test]
fn resume_is_exact_with_an_attack_and_an_average() -> TestResult {
    let (train, test) = resume_data();
    let config = TrainConfig {
        ema: Some(0.8),
        ..toy_config(2)
    };

    let straight = tempfile::tempdir()?;
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    Trainer::new(config.clone(), straight.path())?
        .progress(Progress::Hidden)
        .run(&mut model, &short_ccat(), Arc::clone(&train), &test)?;

    let resumed = tempfile::tempdir()?;
    let (trainer, _) = interrupted_run(&config, resumed.path(), short_ccat(), &train, &test)?;
    let mut model = Classifier::new(toy_spec(), 99, &Device::Cpu)?;
    let outcome =
        trainer
            .clone()
            .resume(true)
            .run(&mut model, &short_ccat(), Arc::clone(&train), &test)?;
    assert_eq!(outcome.resumed_at, Some(1));

    assert_same_weights(straight.path(), resumed.path())?;
    let ha = read_history(&straight.path().join(HISTORY_FILE))?;
    let hb = read_history(&resumed.path().join(HISTORY_FILE))?;
    for (ra, rb) in ha.iter().zip(&hb) {
        assert_eq!(
            (ra.train_loss, ra.train_accuracy, ra.test_accuracy),
            (rb.train_loss, rb.train_accuracy, rb.test_accuracy)
        );
    }
    let saved = Classifier::load(straight.path().join(MODEL_FILE), &Device::Cpu)?;
    assert_eq!(
        saved.metadata().get("ema_decay").map(String::as_str),
        Some("0.8")
    );
    // The saved model is the average, not the last iterate: its evaluation reproduces
    // the last epoch's (EMA) test accuracy.
    assert_eq!(
        Some(predict(&saved, &test, 8)?.accuracy()),
        ha[1].test_accuracy
    );
    Ok(())
}

/// AR-AdaLS learns a per-group smoothing while training: a run interrupted in its
/// second epoch and resumed restores it from the checkpoint and ends with the weights
/// and the smoothing of the uninterrupted run.
#[test]
fn resume_is_exact_with_ar_adals_state() -> TestResult {
    let (train, test) = resume_data();
    let config = toy_config(2);
    let adals = || ArAdaLs::new(ArAdaLsConfig::qin_cifar10());

    let straight = tempfile::tempdir()?;
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    let method = adals()?;
    let outcome = Trainer::new(config.clone(), straight.path())?
        .progress(Progress::Hidden)
        .run(&mut model, &method, Arc::clone(&train), &test)?;
    let final_state = method.snapshot()?;
    // The smoothing moved away from its start, and every epoch records it.
    assert_ne!(final_state, AdaLsState::new(&method.config()));
    assert!(outcome.history.iter().all(|r| r.method_state.is_some()));
    assert_eq!(
        outcome.history[1].method_state,
        Some(serde_json::to_value(&final_state)?)
    );

    let resumed = tempfile::tempdir()?;
    let (trainer, crashing) = interrupted_run(&config, resumed.path(), adals()?, &train, &test)?;
    // The checkpoint holds the state after epoch 1, not the one of the crashed epoch.
    let meta = read_checkpoint_meta(&resumed.path().join(CHECKPOINT_FILE))?;
    assert_eq!(meta.epochs_done, 1);
    assert_eq!(meta.method_state, meta.history[0].method_state);
    assert_ne!(
        meta.method_state,
        Some(serde_json::to_value(crashing.inner.snapshot()?)?)
    );

    let mut model = Classifier::new(toy_spec(), 99, &Device::Cpu)?;
    let method = adals()?;
    let outcome =
        trainer
            .clone()
            .resume(true)
            .run(&mut model, &method, Arc::clone(&train), &test)?;
    assert_eq!(outcome.resumed_at, Some(1));
    assert_eq!(method.snapshot()?, final_state);

    assert_same_weights(straight.path(), resumed.path())?;
    let ha = read_history(&straight.path().join(HISTORY_FILE))?;
    let hb = read_history(&resumed.path().join(HISTORY_FILE))?;
    for (ra, rb) in ha.iter().zip(&hb) {
        assert_eq!(
            (ra.train_loss, ra.train_accuracy, &ra.method_state),
            (rb.train_loss, rb.train_accuracy, &rb.method_state)
        );
    }
    let saved = Classifier::load(resumed.path().join(MODEL_FILE), &Device::Cpu)?;
    let stored: AdaLsState = serde_json::from_str(
        saved
            .metadata()
            .get("method_state")
            .ok_or("the model records the method's state")?,
    )?;
    assert_eq!(stored, final_state);

    // The same method without its state cannot resume that checkpoint, and a
    // checkpoint written without the state cannot be resumed by the stateful method.
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    let forgetful = Forgetful(adals()?);
    let err = trainer
        .clone()
        .resume(true)
        .run(&mut model, &forgetful, Arc::clone(&train), &test);
    assert!(
        matches!(&err, Err(DefenseError::Checkpoint { message, .. }) if message.contains("method state")),
        "{err:?}"
    );
    let without = tempfile::tempdir()?;
    let trainer = Trainer::new(toy_config(1), without.path())?.progress(Progress::Hidden);
    trainer.run(&mut model, &forgetful, Arc::clone(&train), &test)?;
    assert_eq!(
        read_checkpoint_meta(&without.path().join(CHECKPOINT_FILE))?.method_state,
        None
    );
    let err = trainer
        .resume(true)
        .run(&mut model, &adals()?, Arc::clone(&train), &test);
    assert!(
        matches!(&err, Err(DefenseError::Checkpoint { message, .. }) if message.contains("missing")),
        "{err:?}"
    );
    Ok(())
}

/// A method that hides the state of the one it wraps.
struct Forgetful<M>(M);

impl<M: TrainingMethod> TrainingMethod for Forgetful<M> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn settings(&self) -> serde_json::Value {
        self.0.settings()
    }
    fn loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        self.0.loss(batch)
    }
}

/// A method whose loss turns NaN on its `nan_at`-th call.
struct Diverging {
    inner: Normal,
    calls: Cell<usize>,
    nan_at: usize,
}

impl TrainingMethod for Diverging {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn settings(&self) -> serde_json::Value {
        self.inner.settings()
    }
    fn loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        self.calls.set(self.calls.get() + 1);
        let mut out = self.inner.loss(batch)?;
        if self.calls.get() == self.nan_at {
            out.loss = (out.loss * f64::NAN)?;
        }
        Ok(out)
    }
}

/// A NaN loss stops training with its epoch and batch and names the last good
/// checkpoint, which stays valid; in the first epoch it says there is none.
#[test]
fn divergence_names_the_last_good_checkpoint() -> TestResult {
    let train = Arc::new(toy_dataset(64, 1));
    let test = toy_dataset(16, 2);
    for (nan_at, epoch, batch) in [(6, 2, 2), (2, 1, 2)] {
        let dir = tempfile::tempdir()?;
        let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
        let method = Diverging {
            inner: Normal::new(),
            calls: Cell::new(0),
            nan_at,
        };
        let err = Trainer::new(toy_config(3), dir.path())?
            .progress(Progress::Hidden)
            .run(&mut model, &method, train.clone(), &test)
            .err()
            .ok_or("a NaN loss did not stop training")?;
        let ckpt = dir.path().join(CHECKPOINT_FILE);
        match &err {
            DefenseError::Diverged {
                epoch: e,
                batch: b,
                value,
                checkpoint,
                ..
            } => {
                assert_eq!((*e, *b), (epoch, batch));
                assert!(value.is_nan());
                assert_eq!(checkpoint.as_deref(), (epoch > 1).then_some(ckpt.as_path()));
            }
            other => return Err(format!("unexpected error {other}").into()),
        }
        let msg = err.to_string();
        if epoch > 1 {
            assert!(
                msg.contains(&ckpt.display().to_string()) && msg.contains("after epoch 1"),
                "{msg}"
            );
            assert_eq!(read_checkpoint_meta(&ckpt)?.epochs_done, 1);
        } else {
            assert!(msg.contains("no checkpoint"), "{msg}");
            assert!(!ckpt.exists());
        }
    }
    Ok(())
}

/// Reading the loss every few steps (as on a GPU) trains the same weights and counts
/// the same accuracy; a NaN is reported with the batches read together.
#[test]
fn reading_the_loss_every_few_steps_changes_only_its_last_digits() -> TestResult {
    let (train, test) = resume_data();
    let dir = tempfile::tempdir()?;
    let run = |folder: &str,
               every: usize|
     -> std::result::Result<Vec<EpochRecord>, Box<dyn std::error::Error>> {
        let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
        Ok(Trainer::new(toy_config(2), dir.path().join(folder))?
            .progress(Progress::Hidden)
            .sync_every(every)
            .run(&mut model, &Normal::new(), Arc::clone(&train), &test)?
            .history)
    };
    let (each, pairs) = (run("each", 1)?, run("pairs", 2)?);
    assert_same_weights(&dir.path().join("each"), &dir.path().join("pairs"))?;
    for (a, b) in each.iter().zip(&pairs) {
        assert_eq!(a.train_accuracy, b.train_accuracy);
        assert_eq!(a.test_accuracy, b.test_accuracy);
        assert!((a.train_loss - b.train_loss).abs() <= 1e-12 * a.train_loss.abs());
    }
    let method = Diverging {
        inner: Normal::new(),
        calls: Cell::new(0),
        nan_at: 2,
    };
    let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
    let err = Trainer::new(toy_config(2), dir.path().join("nan"))?
        .progress(Progress::Hidden)
        .sync_every(2)
        .run(&mut model, &method, Arc::clone(&train), &test)
        .err()
        .ok_or("a NaN loss did not stop training")?;
    assert!(
        matches!(
            err,
            DefenseError::Diverged {
                epoch: 1,
                batch: 2,
                first_batch: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("in batches 1–2"), "{err}");
    Ok(())
}

/// The training attacks on PGD's device-resident loop (its kernels' CPU twins here)
/// train the same weights as on the host loop, bit for bit: FGSM-RS of fast AT, PGD
/// of adversarial training, CCAT's conf attack with momentum and backtracking, and
/// SAT's PGD-10 (its checks left for the trainer).
#[test]
fn training_attacks_on_the_device_loop_train_the_same_weights() -> TestResult {
    let (train, test) = resume_data();
    let dir = tempfile::tempdir()?;
    let run = |method: &dyn TrainingMethod,
               folder: &str|
     -> std::result::Result<(), Box<dyn std::error::Error>> {
        let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
        Trainer::new(toy_config(1), dir.path().join(folder))?
            .progress(Progress::Hidden)
            .run(&mut model, method, Arc::clone(&train), &test)?;
        Ok(())
    };
    let fast_at = FastAt::wong_cifar10();
    let pgd = AdversarialTraining::madry_cifar10();
    let ccat = Ccat::stutz_cifar10();
    let sat = Sat {
        attack: rampart_attacks::Pgd {
            steps: 3,
            ..rampart_attacks::Pgd::linf_pgd10()
        },
        sinkhorn_iters: 10,
        ..Sat::cifar10()
    };
    let methods: [(&str, &dyn TrainingMethod); 4] = [
        ("fast-at", &fast_at),
        ("at", &pgd),
        ("ccat", &ccat),
        ("sat", &sat),
    ];
    for (name, method) in methods {
        let (host, device) = (format!("{name}-host"), format!("{name}-device"));
        run(method, &host)?;
        rampart_attacks::with_device_resident_pgd(|| run(method, &device))?;
        assert_same_weights(&dir.path().join(&host), &dir.path().join(&device))?;
    }
    Ok(())
}

/// Fast AT whose training attack meets a NaN input at its `bad_at`-th batch (a pixel
/// of the batch's first image made NaN).
struct NanInput {
    inner: FastAt,
    calls: Cell<usize>,
    bad_at: usize,
}

impl TrainingMethod for NanInput {
    fn name(&self) -> &'static str {
        "nan-input"
    }

    fn settings(&self) -> serde_json::Value {
        self.inner.settings()
    }

    fn loss(&self, batch: &mut TrainBatch<'_>) -> Result<BatchLoss> {
        let n = self.calls.get() + 1;
        self.calls.set(n);
        if n != self.bad_at {
            return self.inner.loss(batch);
        }
        let mut x = batch.images.flatten_all()?.to_vec1::<f32>()?;
        x[3] = f32::NAN;
        let images = candle_core::Tensor::from_vec(x, batch.images.dims(), batch.images.device())?;
        self.inner.loss(&mut TrainBatch::new(
            batch.model,
            &images,
            batch.labels,
            &mut *batch.rng,
        ))
    }
}

/// On the device-resident loop a training attack's checks are read with the loss: a
/// NaN input is refused at the end of the interval that holds it, with its batches,
/// before the NaN loss it causes; off that loop the attack refuses it at once.
#[test]
fn a_training_attacks_checks_are_read_with_the_loss() -> TestResult {
    let train = Arc::new(toy_dataset(64, 1));
    let test = toy_dataset(8, 2);
    let dir = tempfile::tempdir()?;
    let run = |folder: &str, every: usize, device: bool| -> DefenseError {
        let go = || {
            let mut model = Classifier::new(toy_spec(), 3, &Device::Cpu)?;
            let method = NanInput {
                inner: FastAt::wong_cifar10(),
                calls: Cell::new(0),
                bad_at: 3,
            };
            Trainer::new(toy_config(1), dir.path().join(folder))?
                .progress(Progress::Hidden)
                .sync_every(every)
                .run(&mut model, &method, Arc::clone(&train), &test)
        };
        let out = if device {
            rampart_attacks::with_device_resident_pgd(go)
        } else {
            go()
        };
        match out {
            Err(e) => e,
            Ok(_) => panic!("{folder}: a NaN input was not refused"),
        }
    };
    let err = run("pairs", 2, true);
    assert!(
        matches!(
            &err,
            DefenseError::AttackChecks {
                epoch: 1,
                batch: 4,
                first_batch: 3,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("batches 3–4") && msg.contains("NaN or outside"),
        "{msg}"
    );
    let err = run("each", 1, true);
    assert!(
        matches!(
            &err,
            DefenseError::AttackChecks {
                epoch: 1,
                batch: 3,
                first_batch: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("epoch 1, batch 3:"), "{err}");
    // The host path's checks refuse the batch at once.
    let err = run("host", 2, false);
    assert!(matches!(err, DefenseError::Attack(_)), "{err:?}");
    Ok(())
}
