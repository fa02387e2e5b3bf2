//! The training loop every method shares: batches, SGD steps on the method's loss,
//! per-epoch evaluation, checkpoints and the final model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rampart_data::{ImageDataset, Loader, LoaderConfig};
use rampart_models::Classifier;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::ema::Ema;
use crate::error::{DefenseError, Result};
use crate::method::{TrainBatch, TrainingMethod};
use crate::parallel::{self, Collective};
use crate::predict::predict;
use crate::schedule::progress;
use crate::sgd::Sgd;
use rampart_fs::write_atomic;

/// The checkpoint, rewritten after every epoch.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Steps between two reads of the loss and accuracy on a GPU (on the CPU: every step,
/// which costs nothing there): reading a device value waits for the device, so the
/// running figures stay on it in between (see [`Trainer::sync_every`]).
pub const SYNC_EVERY_GPU: usize = 50;
/// One JSON [`EpochRecord`] per line, rewritten after every epoch.
pub const HISTORY_FILE: &str = "history.jsonl";
/// The trained model, written when the last epoch is done.
pub const MODEL_FILE: &str = "model.safetensors";

/// What happened in one epoch; one line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epochs completed, 1-based.
    pub epoch: usize,
    /// Learning rate of the epoch's last iteration.
    pub lr: f64,
    /// Mean of the batch losses.
    pub train_loss: f64,
    /// Accuracy on what the method trained on (augmented, possibly adversarial), in [0, 1].
    pub train_accuracy: f64,
    /// Clean accuracy on the evaluation set after the epoch, in [0, 1]; `null` when
    /// the evaluation set is empty.
    pub test_accuracy: Option<f64>,
    /// Size of the evaluation set.
    pub test_examples: usize,
    /// Wall time of the epoch's training steps.
    pub epoch_seconds: f64,
    /// Of that, the time the loop waited for the loader's next batch (its first batch
    /// included): what the input pipeline cost the epoch beyond overlapping with the
    /// steps. Absent in histories written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_wait_seconds: Option<f64>,
    /// Wall time of the evaluation after the epoch.
    pub eval_seconds: f64,
    /// Training examples per second.
    pub images_per_second: f64,
    /// Wall time of training and evaluation so far, summed over resumed sessions.
    pub elapsed_seconds: f64,
    /// The method's state after the epoch (e.g. AR-AdaLS's per-group smoothing);
    /// absent for stateless methods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_state: Option<serde_json::Value>,
    /// Data-parallel workers that trained the epoch (see `parallel`); absent for one
    /// process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
}

/// Whether to draw progress bars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Epoch and batch bars on stderr (drawn only when stderr is a terminal).
    Bars,
    /// Nothing drawn; `tracing` logs only.
    Hidden,
}

/// The result of [`Trainer::run`].
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// One record per epoch of the whole run, resumed sessions included.
    pub history: Vec<EpochRecord>,
    /// Epochs already done when this session resumed a checkpoint.
    pub resumed_at: Option<usize>,
    /// Where the final model was saved.
    pub model_path: PathBuf,
}

/// The ChaCha8 stream a method draws from during `epoch` (0-based): a function of
/// (seed, epoch) only, independent of the loader's streams.
pub fn method_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(epoch as u64).to_le_bytes());
    key[16..24].copy_from_slice(b"training");
    key[24..].copy_from_slice(b"method\0\0");
    ChaCha8Rng::from_seed(key)
}

/// Runs a [`TrainingMethod`] under a [`TrainConfig`], writing into one output folder:
/// [`CHECKPOINT_FILE`] and [`HISTORY_FILE`] after every epoch, [`MODEL_FILE`] at the end.
///
/// **Invariant:** a run interrupted after any epoch and resumed (`resume(true)`) ends
/// with exactly the weights of the uninterrupted run: the checkpoint holds every
/// variable and momentum buffer, and every random choice of epoch e derives from
/// (seed, e).
#[derive(Clone, Debug)]
pub struct Trainer {
    config: TrainConfig,
    out_dir: PathBuf,
    resume: bool,
    progress: Progress,
    metadata: BTreeMap<String, String>,
    collective: Option<Arc<dyn Collective>>,
    sync_every: Option<usize>,
    sync_batch_norm: bool,
}

impl Trainer {
    /// A trainer writing into `out_dir`; refuses an invalid config.
    pub fn new(config: TrainConfig, out_dir: impl Into<PathBuf>) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            out_dir: out_dir.into(),
            resume: false,
            progress: Progress::Bars,
            metadata: BTreeMap::new(),
            collective: None,
            sync_every: None,
            sync_batch_norm: false,
        })
    }

    /// Continue from `out_dir`'s checkpoint if there is one (otherwise start afresh).
    /// Without it, a folder that already holds a checkpoint is refused.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// Progress bars or not.
    pub fn progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// Data-parallel training: this process is one worker of `collective` (see
    /// [`crate::parallel`]). Worker 0 alone evaluates and writes files; the others
    /// return its history without writing anything.
    pub fn parallel(mut self, collective: Arc<dyn Collective>) -> Self {
        self.collective = Some(collective);
        self
    }

    /// Synchronised BatchNorm for data-parallel training: every train-mode BatchNorm
    /// normalises with the whole global batch's statistics and reduces its gradient
    /// sums over the workers (see [`rampart_models::kernels::sync_bn`]), as PyTorch's
    /// `SyncBatchNorm`; without it each worker normalises with its own rows (DDP's
    /// default). A stochastic student's noise layers measure their σ on the global
    /// batch too, and an OAT model's dual BatchNorms each normalise their λ group of
    /// the global batch. Needs [`Trainer::parallel`].
    pub fn sync_batch_norm(mut self, on: bool) -> Self {
        self.sync_batch_norm = on;
        self
    }

    /// Read the running loss and accuracy from the device every `steps` steps (and at
    /// the end of an epoch) instead of every step [default: every step on the CPU,
    /// [`SYNC_EVERY_GPU`] on a GPU]. In between, nothing in a step waits for the
    /// device; a non-finite loss is then noticed at the next read and reported with
    /// the batches read together. Results do not depend on it, but the last digits of
    /// the history's `train_loss` (a sum in another order).
    pub fn sync_every(mut self, steps: usize) -> Self {
        self.sync_every = Some(steps.max(1));
        self
    }

    /// A metadata entry for the final model file (e.g. `dataset`).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The output folder.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Trains `model` with `method` on `train`, evaluating on `eval` after each epoch,
    /// and saves the final model with metadata `method`, `method_settings`,
    /// `method_state` (for a method that keeps one), `epochs`,
    /// `seed`, `train_examples`, `train_config` and the entries given to
    /// [`Trainer::metadata`]. With an EMA (`TrainConfig::ema`) the evaluation uses the
    /// averaged weights, and `model` ends holding them (saved with `ema_decay`).
    pub fn run(
        &self,
        model: &mut Classifier,
        method: &dyn TrainingMethod,
        train: Arc<ImageDataset>,
        eval: &ImageDataset,
    ) -> Result<TrainOutcome> {
        let cfg = &self.config;
        check_data(model, &train, "training")?;
        check_data(model, eval, "evaluation")?;
        let group = self.collective.as_deref();
        let (rank, workers) = group.map_or((0, 1), |g| (g.rank(), g.workers()));
        let leader = rank == 0;
        if let Some(group) = group {
            parallel::check_method(group, method)?;
        }
        let sync_bn = match (&self.collective, self.sync_batch_norm) {
            (_, false) => None,
            (None, true) => {
                return Err(DefenseError::Config(
                    "synchronised BatchNorm needs data-parallel workers".into(),
                ))
            }
            (Some(group), true) => Some(Arc::new(parallel::CollectiveSum(Arc::clone(group)))),
        };
        let loader_config = LoaderConfig {
            batch_size: cfg.batch_size,
            shuffle: true,
            drop_last: true,
            augmentation: cfg.augmentation.to_augmentation(),
            seed: cfg.seed,
        };
        let loader = Loader::new(Arc::clone(&train), loader_config, model.device().clone())?
            .shard(rank, workers)?;
        let batches = loader.batches_per_epoch();
        if batches == 0 {
            return Err(DefenseError::Config(format!(
                "batch size {} is larger than the training set ({} examples)",
                cfg.batch_size,
                train.len()
            )));
        }
        let schedule = cfg.lr_schedule()?;
        let mut sgd = Sgd::new(model.trainable_vars(), cfg.sgd)?;
        let ema = cfg.ema.map(|decay| Ema::new(model, decay)).transpose()?;
        let ckpt_path = self.out_dir.join(CHECKPOINT_FILE);
        let history_path = self.out_dir.join(HISTORY_FILE);
        let expected = checkpoint::meta(0, cfg, method, model.spec(), train.len(), &[]);

        let mut history = Vec::new();
        let mut resumed_at = None;
        if ckpt_path.is_file() {
            if !self.resume {
                return Err(DefenseError::Config(format!(
                    "{} already holds a checkpoint: resume it, or train into another folder",
                    self.out_dir.display()
                )));
            }
            let meta =
                checkpoint::restore(&ckpt_path, &expected, model, &mut sgd, ema.as_ref(), method)?;
            tracing::info!(
                checkpoint = %ckpt_path.display(),
                epochs_done = meta.epochs_done,
                epochs = cfg.epochs,
                "resuming"
            );
            resumed_at = Some(meta.epochs_done);
            history = meta.history;
            if leader {
                write_history(&history_path, &history)?;
            }
        } else if self.resume {
            tracing::info!(folder = %self.out_dir.display(), "no checkpoint to resume; starting afresh");
        }
        if leader {
            std::fs::create_dir_all(&self.out_dir)
                .map_err(|e| DefenseError::io(&self.out_dir, e))?;
        }
        let trainable = model.trainable_vars();
        let buffers: Vec<_> = model
            .named_vars()
            .into_iter()
            .filter(|(name, _)| rampart_models::is_buffer(name))
            .collect();
        if let Some(group) = group {
            // Every worker starts from worker 0's weights and statistics.
            parallel::broadcast_vars(group, &model.named_vars())?;
            tracing::info!(
                rank,
                workers,
                backend = group.backend(),
                local_batch = cfg.batch_size / workers,
                "data-parallel worker joined"
            );
        }
        tracing::info!(
            method = method.name(),
            arch = %model.spec().arch,
            parameters = model.num_parameters(),
            train_examples = train.len(),
            eval_examples = eval.len(),
            batches_per_epoch = batches,
            epochs = cfg.epochs,
            "training"
        );

        let progress_kind = if leader {
            self.progress
        } else {
            Progress::Hidden
        };
        let bars = Bars::new(progress_kind, cfg.epochs, history.len());
        let sync_every = self.sync_every.unwrap_or(if model.device().is_cuda() {
            SYNC_EVERY_GPU
        } else {
            1
        });
        // Full batches replayed from a CUDA graph where that applies (`step_graph`).
        let mut graph = crate::step_graph::for_run(model, method, workers);
        for epoch in history.len()..cfg.epochs {
            // Train-mode BatchNorm on this thread synchronised for the epoch's steps
            // (the evaluation after it runs in eval mode, untouched).
            let sync_scope = sync_bn.clone().map(|sum| {
                rampart_models::SyncScope::new(sum as Arc<dyn rampart_models::ChannelSum>)
            });
            // This worker's rows start at rank·B/N of each global batch: a student
            // draws their noise as the single process draws it for those rows.
            model.set_batch_offset(rank * (cfg.batch_size / workers));
            let mut rng = parallel::worker_rng(cfg.seed, epoch, rank);
            let started = Instant::now();
            bars.start_epoch(epoch, batches);
            let (mut loss_sum, mut correct, mut seen, mut lr) = (0.0f64, 0usize, 0usize, 0.0);
            // What the steps since the last read left on the device.
            let mut sums = StepSums::default();
            let mut window_start = 0;
            // The time spent waiting for the loader's batches.
            let waited = std::cell::Cell::new(0.0f64);
            let mut epoch_batches = loader.epoch(epoch);
            let timed_batches = std::iter::from_fn(|| {
                let asked = Instant::now();
                let next = epoch_batches.next();
                waited.set(waited.get() + asked.elapsed().as_secs_f64());
                next
            });
            for (i, batch) in timed_batches.enumerate() {
                let batch = batch?;
                lr = schedule.lr(progress(epoch, i, batches));
                if let Some(group) = group {
                    parallel::broadcast_vars(group, &buffers)?;
                }
                let replayed = match graph.as_mut() {
                    Some(g) if batch.labels.dim(0)? == cfg.batch_size => g.step(
                        method,
                        model,
                        (&batch.images, &batch.labels),
                        &mut rng,
                        &mut sgd,
                        lr,
                        &mut sums,
                    )?,
                    _ => None,
                };
                let examples = match replayed {
                    Some(examples) => examples,
                    None => {
                        let mut train_batch =
                            TrainBatch::new(model, &batch.images, &batch.labels, &mut rng)
                                .with_host_labels(&batch.host_labels);
                        if let Some(group) = group {
                            train_batch = train_batch.across(group);
                        }
                        let workers_vars = group.map(|g| (g, trainable.as_slice()));
                        train_step(
                            method,
                            &mut train_batch,
                            &mut sgd,
                            lr,
                            workers_vars,
                            &mut sums,
                        )?
                    }
                };
                if let Some(ema) = &ema {
                    ema.update(model)?;
                }
                if rampart_fs::interrupt::requested() {
                    return Err(DefenseError::Interrupted {
                        epoch: epoch + 1,
                        batch: i + 1,
                        checkpoint: ckpt_path.is_file().then(|| ckpt_path.clone()),
                    });
                }
                seen += examples;
                bars.step();
                if (i + 1) % sync_every != 0 && i + 1 != batches {
                    continue;
                }
                // The one wait for the device in `sync_every` steps.
                let read = sums.read()?;
                // The attacks' checks first: a bad batch explains a bad loss.
                if let Some(source) = read
                    .checks
                    .as_deref()
                    .and_then(rampart_attacks::Faults::error)
                {
                    return Err(DefenseError::AttackChecks {
                        epoch: epoch + 1,
                        batch: i + 1,
                        first_batch: window_start + 1,
                        source,
                    });
                }
                if !read.loss_sum.is_finite() {
                    return Err(DefenseError::Diverged {
                        epoch: epoch + 1,
                        batch: i + 1,
                        first_batch: window_start + 1,
                        value: read.loss_sum as f32,
                        checkpoint: ckpt_path.is_file().then(|| ckpt_path.clone()),
                    });
                }
                loss_sum += read.loss_sum;
                correct += read.correct as usize;
                window_start = i + 1;
                let rate = (batch.indices.len() * workers) as f64 * (i + 1) as f64
                    / started.elapsed().as_secs_f64();
                bars.message(format!(
                    "loss {:.3} acc {:.1}% lr {:.4} {:.0} img/s",
                    loss_sum / (i + 1) as f64,
                    100.0 * correct as f64 / seen.max(1) as f64,
                    lr,
                    rate
                ));
                if (i + 1) % 50 == 0 {
                    tracing::debug!(
                        epoch = epoch + 1,
                        batch = i + 1,
                        loss = loss_sum / (i + 1) as f64,
                        lr
                    );
                }
            }
            if let Some(group) = group {
                let sums = parallel::sum_scalars(
                    group,
                    &[loss_sum, correct as f64, seen as f64],
                    model.device(),
                )?;
                loss_sum = sums[0] / workers as f64;
                (correct, seen) = (sums[1] as usize, sums[2] as usize);
            }
            drop(sync_scope);
            model.set_batch_offset(0);
            let epoch_seconds = started.elapsed().as_secs_f64();
            let eval_started = Instant::now();
            let evaluated = ema.as_ref().map_or(&*model, Ema::model);
            let test_accuracy = if eval.is_empty() || !leader {
                None
            } else {
                Some(predict(evaluated, eval, cfg.eval_batch_size)?.accuracy())
            };
            let eval_seconds = eval_started.elapsed().as_secs_f64();
            let previous = history
                .last()
                .map_or(0.0, |r: &EpochRecord| r.elapsed_seconds);
            let record = EpochRecord {
                epoch: epoch + 1,
                lr,
                train_loss: loss_sum / batches as f64,
                train_accuracy: correct as f64 / seen.max(1) as f64,
                test_accuracy,
                test_examples: eval.len(),
                epoch_seconds,
                data_wait_seconds: Some(waited.get()),
                eval_seconds,
                images_per_second: (batches * cfg.batch_size) as f64 / epoch_seconds,
                elapsed_seconds: previous + epoch_seconds + eval_seconds,
                method_state: method.state(),
                workers: (workers > 1).then_some(workers),
            };
            history.push(record.clone());
            if leader {
                let meta =
                    checkpoint::meta(epoch + 1, cfg, method, model.spec(), train.len(), &history);
                checkpoint::save(&ckpt_path, &meta, model, &sgd, ema.as_ref())?;
                write_history(&history_path, &history)?;
                bars.end_epoch(&record, cfg.epochs);
            }
        }
        bars.finish();

        if let Some(ema) = &ema {
            model.copy_weights_from(ema.model())?;
            model.set_metadata("ema_decay", ema.decay().to_string())?;
        }
        model.set_metadata("method", method.name())?;
        model.set_metadata("method_settings", method.settings().to_string())?;
        if let Some(state) = method.state() {
            model.set_metadata("method_state", state.to_string())?;
        }
        model.set_metadata("epochs", cfg.epochs.to_string())?;
        model.set_metadata("seed", cfg.seed.to_string())?;
        model.set_metadata("train_examples", train.len().to_string())?;
        model.set_metadata(
            "train_config",
            serde_json::to_string(cfg).map_err(|e| DefenseError::Config(e.to_string()))?,
        )?;
        for (k, v) in &self.metadata {
            model.set_metadata(k.clone(), v.clone())?;
        }
        let model_path = self.out_dir.join(MODEL_FILE);
        if leader {
            model.save(&model_path)?;
            tracing::info!(model = %model_path.display(), "saved the trained model");
        }
        Ok(TrainOutcome {
            history,
            resumed_at,
            model_path,
        })
    }
}

/// What a run's training steps leave on the device between two reads: the sum of
/// their (loss, correct count) pairs and their training attacks' merged checks.
#[derive(Debug, Default)]
pub struct StepSums {
    sums: Option<Tensor>,
    faults: Option<rampart_attacks::Faults>,
}

/// [`StepSums`] read back.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRead {
    /// The sum of the steps' mean batch losses.
    pub loss_sum: f64,
    /// Examples the steps' models classified correctly.
    pub correct: f64,
    /// The training attacks' checks ([`rampart_attacks::Faults::error`] names a
    /// fault), where a step's attack left them on the device.
    pub checks: Option<Vec<f64>>,
}

impl StepSums {
    /// Adds one step's (loss, correct count) (2, f64) and its training attack's
    /// checks, on the device.
    pub fn add(&mut self, stats: Tensor, faults: Option<&rampart_attacks::Faults>) -> Result<()> {
        self.sums = Some(match self.sums.take() {
            Some(p) => (p + stats)?,
            None => stats,
        });
        if let Some(f) = faults {
            self.faults = Some(match self.faults.take() {
                Some(all) => all.merge(f)?,
                None => f.clone(),
            });
        }
        Ok(())
    }

    /// Reads the sums and clears them: one wait for the device (zeros after no step).
    pub fn read(&mut self) -> Result<StepRead> {
        let (values, checks) = match (self.sums.take(), self.faults.take()) {
            (Some(p), Some(f)) => (Tensor::cat(&[&p, f.tensor()], 0)?.to_vec1::<f64>()?, true),
            (Some(p), None) => (p.to_vec1::<f64>()?, false),
            (None, _) => (vec![0.0, 0.0], false),
        };
        Ok(StepRead {
            loss_sum: values[0],
            correct: values[1],
            checks: checks.then(|| values[2..].to_vec()),
        })
    }
}

/// The data-parallel workers of a step and the trainable variables whose gradients
/// they average.
pub type Workers<'a> = (&'a dyn Collective, &'a [(String, candle_core::Var)]);

/// One training step as [`Trainer::run`] takes it (and `rampart bench`'s method steps
/// time it): the method's loss on `batch`; its loss and correct count added into
/// `sums` on the device, with its training attack's checks; the gradients, averaged
/// over the data-parallel workers of `workers` (the collective and the trainable
/// variables); one SGD step at `lr`. Nothing is read from the device. Returns the
/// number of examples the method trained on.
pub fn train_step(
    method: &dyn TrainingMethod,
    batch: &mut TrainBatch<'_>,
    sgd: &mut Sgd,
    lr: f64,
    workers: Option<Workers<'_>>,
    sums: &mut StepSums,
) -> Result<usize> {
    let out = method.loss(batch)?;
    sums.add(step_stats(&out)?, out.faults.as_ref())?;
    let mut grads = rampart_models::backward(&out.loss)?;
    if let Some((group, vars)) = workers {
        parallel::average_gradients(group, vars, &mut grads)?;
    }
    sgd.step(&grads, lr)?;
    Ok(out.labels.dim(0)?)
}

/// A step's (loss, correct count), f64 on the device.
pub(crate) fn step_stats(out: &crate::method::BatchLoss) -> Result<Tensor> {
    Ok(Tensor::stack(
        &[
            out.loss.detach().to_dtype(DType::F64)?,
            correct_of(&out.logits, &out.labels)?,
        ],
        0,
    )?)
}

/// Refuses data whose images or labels the model cannot take.
fn check_data(model: &Classifier, data: &ImageDataset, what: &str) -> Result<()> {
    let (c, h, w) = data.shape();
    let spec = model.spec();
    if [c, h, w] != spec.input_shape {
        return Err(DefenseError::Config(format!(
            "the {what} images are {c}×{h}×{w}, but the model ({}) takes {:?}",
            spec.arch, spec.input_shape
        )));
    }
    if data.num_classes() > spec.num_classes {
        return Err(DefenseError::Config(format!(
            "the {what} set has {} classes, but the model ({}) has {} outputs",
            data.num_classes(),
            spec.arch,
            spec.num_classes
        )));
    }
    Ok(())
}

/// The number of rows of `logits` (M, K) whose arg-max equals `labels` (M,), as an f64
/// scalar on the device (not read).
fn correct_of(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(logits
        .argmax(D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F64)?
        .sum_all()?)
}

fn write_history(path: &Path, history: &[EpochRecord]) -> Result<()> {
    let mut text = String::new();
    for record in history {
        let line =
            serde_json::to_string(record).map_err(|e| DefenseError::Config(e.to_string()))?;
        text.push_str(&line);
        text.push('\n');
    }
    Ok(write_atomic(path, text.as_bytes())?)
}

/// Reads a `history.jsonl` written by the trainer.
pub fn read_history(path: &Path) -> Result<Vec<EpochRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| DefenseError::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| DefenseError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// The epoch and batch bars.
struct Bars {
    multi: MultiProgress,
    epochs: ProgressBar,
    batches: ProgressBar,
}

impl Bars {
    fn new(progress: Progress, epochs: usize, done: usize) -> Self {
        let target = match progress {
            Progress::Bars => ProgressDrawTarget::stderr(),
            Progress::Hidden => ProgressDrawTarget::hidden(),
        };
        let multi = MultiProgress::with_draw_target(target);
        let style = |template: &str| {
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ")
        };
        let epochs_bar = multi.add(ProgressBar::new(epochs as u64));
        epochs_bar.set_style(style(
            "epochs  [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        ));
        epochs_bar.set_position(done as u64);
        let batches = multi.add(ProgressBar::new(0));
        batches.set_style(style(
            "{prefix:>7} [{bar:30}] {pos}/{len} {msg} (eta {eta})",
        ));
        Self {
            multi,
            epochs: epochs_bar,
            batches,
        }
    }

    fn start_epoch(&self, epoch: usize, batches: usize) {
        self.batches.reset();
        self.batches.set_length(batches as u64);
        self.batches.set_prefix(format!("epoch {}", epoch + 1));
    }

    fn step(&self) {
        self.batches.inc(1);
    }

    fn message(&self, message: String) {
        self.batches.set_message(message);
    }

    fn end_epoch(&self, r: &EpochRecord, epochs: usize) {
        let test = r
            .test_accuracy
            .map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a));
        self.epochs.set_message(format!("test acc {test}"));
        self.epochs.inc(1);
        self.multi.suspend(|| {
            tracing::info!(
                "epoch {}/{epochs}: loss {:.4}, train acc {:.2}%, test acc {test} ({} examples), lr {:.5}, {:.0} img/s, {:.1} s + {:.1} s eval",
                r.epoch,
                r.train_loss,
                100.0 * r.train_accuracy,
                r.test_examples,
                r.lr,
                r.images_per_second,
                r.epoch_seconds,
                r.eval_seconds
            );
            if let Some(state) = &r.method_state {
                tracing::info!("epoch {}/{epochs}: method state {state}", r.epoch);
            }
        });
    }

    fn finish(&self) {
        self.batches.finish_and_clear();
        self.epochs.finish();
    }
}
