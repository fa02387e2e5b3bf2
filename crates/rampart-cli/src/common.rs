//! What `train` and `eval` share: devices, data folders, run folders, the command line.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use rampart_data::{DatasetKind, ImageDataset, Splits};
use rampart_models::{Arch, ModelSpec, Precision};
use serde::Serialize;

/// Parses `--shard I/N` (0-based) into a checked shard.
pub fn parse_shard(s: &str) -> std::result::Result<rampart_eval::Shard, String> {
    s.parse()
        .map_err(|e: rampart_eval::EvalError| e.to_string())
}

/// Environment variable naming the data folder when `--data-dir` is not given.
pub const DATA_DIR_ENV: &str = "RAMPART_DATA_DIR";

/// Where tensors live: `cpu`, or `cuda` / `cuda:N` (builds with the `cuda` feature),
/// with `+tf32` to let f32 convolutions and matrix products use TF32 tensor cores
/// (faster, 10-bit mantissa) or `+bf16` for bf16 convolutions with f32 accumulation
/// (the default is full f32, see docs/performance.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// The CPU.
    Cpu,
    /// CUDA device `ordinal`.
    Cuda {
        /// Device number.
        ordinal: usize,
        /// The arithmetic of the convolutions and matrix products.
        precision: Precision,
    },
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let (name, precision) = if let Some(name) = lower.strip_suffix("+tf32") {
            (name, Precision::Tf32)
        } else if let Some(name) = lower.strip_suffix("+bf16") {
            (name, Precision::Bf16)
        } else {
            (lower.as_str(), Precision::F32)
        };
        let ordinal = match name {
            "cpu" if precision == Precision::F32 => return Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Some(0),
            other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
        };
        ordinal
            .map(|ordinal| DeviceArg::Cuda { ordinal, precision })
            .ok_or_else(|| {
                format!(
                    "unknown device `{s}` (expected cpu, cuda or cuda:N, the latter two \
                     optionally with +tf32 or +bf16)"
                )
            })
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda { ordinal, precision } => {
                let suffix = match precision {
                    Precision::F32 => "",
                    Precision::Tf32 => "+tf32",
                    Precision::Bf16 => "+bf16",
                };
                write!(f, "cuda:{ordinal}{suffix}")
            }
        }
    }
}

impl DeviceArg {
    /// Opens the device (on CUDA: keeps freed memory pooled, sets the precision).
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda { ordinal, precision } => {
                let dev = Device::new_cuda(ordinal).with_context(|| {
                    format!(
                        "cannot open CUDA device {ordinal} (is `rampart` built with `--features cuda`?)"
                    )
                })?;
                #[cfg(feature = "cuda")]
                rampart_models::cuda::prepare(&dev, precision)?;
                #[cfg(not(feature = "cuda"))]
                let _ = precision;
                Ok(dev)
            }
        }
    }
}

/// Every GPU path's environment switch: the models' and attacks'
/// ([`rampart_models::kernels::GPU_SWITCHES`]) and the staged uploads of batches
/// ([`rampart_data::upload::PINNED_UPLOADS_ENV`]).
pub fn gpu_switch_names() -> impl Iterator<Item = &'static str> {
    rampart_models::kernels::GPU_SWITCHES
        .into_iter()
        .chain([rampart_data::upload::PINNED_UPLOADS_ENV])
}

/// The GPU paths' environment switches that are set, name → value (`config.json`'s
/// `gpu_switches`, [`gpu_switch_names`]): on a GPU they decide which paths a run
/// takes; empty on the CPU, where they change nothing.
pub fn gpu_switches(device: &DeviceArg) -> serde_json::Value {
    let mut set = serde_json::Map::new();
    if let DeviceArg::Cuda { .. } = device {
        for name in gpu_switch_names() {
            if let Some(v) = std::env::var_os(name) {
                set.insert(name.into(), v.to_string_lossy().into());
            }
        }
    }
    serde_json::Value::Object(set)
}

/// The data folder: `--data-dir`, else the environment variable [`DATA_DIR_ENV`].
pub fn resolve_data_dir(flag: Option<PathBuf>, env: Option<PathBuf>) -> Result<PathBuf> {
    match flag.or(env) {
        Some(dir) if !dir.as_os_str().is_empty() => Ok(dir),
        _ => bail!(
            "--data-dir is required (or set {DATA_DIR_ENV}): the folder that holds the data set, \
             e.g. the unpacked cifar10-jpeg folder or cifar-10-binary.tar.gz (see datasets/README.md); \
             without either, the per-user cache folder is used, but neither XDG_CACHE_HOME nor HOME is set"
        ),
    }
}

/// The value of [`DATA_DIR_ENV`], if set.
pub fn data_dir_from_env() -> Option<PathBuf> {
    std::env::var_os(DATA_DIR_ENV).map(PathBuf::from)
}

/// Where a data folder was named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// `--data-dir` (or `--dir`).
    Flag,
    /// The environment variable [`DATA_DIR_ENV`].
    Env,
    /// Nowhere: the per-user cache folder ([`rampart_data::user_data_dir`]), filled on
    /// first use.
    Cache,
}

/// A data folder and where it was named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    /// The folder.
    pub path: PathBuf,
    /// Where it was named.
    pub source: DataSource,
}

impl DataDir {
    /// The folder when no flag names one: [`DATA_DIR_ENV`], else the per-user cache
    /// folder; `None` when neither is available.
    pub fn fallback() -> Option<DataDir> {
        Self::fallback_from(data_dir_from_env(), rampart_data::user_data_dir())
    }

    /// [`DataDir::fallback`] from the environment variable's value and the cache folder.
    pub fn fallback_from(env: Option<PathBuf>, cache: Option<PathBuf>) -> Option<DataDir> {
        match env.filter(|d| !d.as_os_str().is_empty()) {
            Some(path) => Some(DataDir {
                path,
                source: DataSource::Env,
            }),
            None => cache.map(|path| DataDir {
                path,
                source: DataSource::Cache,
            }),
        }
    }

    /// The folder of a command: `flag` (`--data-dir`), else `fallback` (see
    /// [`DataDir::fallback`]); an error saying what to pass when there is neither.
    pub fn resolve(flag: Option<PathBuf>, fallback: Option<DataDir>) -> Result<DataDir> {
        let flag = flag.filter(|d| !d.as_os_str().is_empty());
        let source = match (&flag, &fallback) {
            (Some(_), _) => DataSource::Flag,
            (None, Some(f)) => f.source,
            (None, None) => DataSource::Flag,
        };
        let path = resolve_data_dir(flag, fallback.map(|f| f.path))?;
        Ok(DataDir { path, source })
    }

    /// How the folder was named, for messages.
    pub fn describe(&self) -> String {
        match self.source {
            DataSource::Flag => format!("the data folder {}", self.path.display()),
            DataSource::Env => format!("the data folder {} (${DATA_DIR_ENV})", self.path.display()),
            DataSource::Cache => format!(
                "the per-user data folder {} (neither --data-dir nor ${DATA_DIR_ENV} was given)",
                self.path.display()
            ),
        }
    }
}

/// Loads both splits of `kind` from `dir`; the data crate's error says what to place
/// where. The per-user cache folder is filled on first use: when it lacks the data set,
/// its official files are downloaded into it (builds with the `download` feature;
/// without it, or offline, the error names each file, its URL and checksum, and where
/// in that folder to place it).
pub fn load_data(kind: DatasetKind, dir: &DataDir) -> Result<Splits> {
    let started = std::time::Instant::now();
    let splits = load_with(kind, dir, rampart_data::load)?;
    tracing::info!(
        dataset = %kind,
        train = splits.train.len(),
        test = splits.test.len(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "loaded data"
    );
    Ok(splits)
}

/// The test split of `kind` from `dir`, as [`load_data`] finds it (an image folder
/// decodes its test images only): what evaluations and attacks read.
pub fn load_test_data(kind: DatasetKind, dir: &DataDir) -> Result<ImageDataset> {
    let started = std::time::Instant::now();
    let test = load_with(kind, dir, rampart_data::load_test)?;
    tracing::info!(
        dataset = %kind,
        test = test.len(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "loaded test data"
    );
    Ok(test)
}

/// `load` of `kind` from `dir`, filling the per-user cache folder first when that is
/// where the data should be and they are missing.
fn load_with<T>(
    kind: DatasetKind,
    dir: &DataDir,
    load: impl Fn(DatasetKind, &std::path::Path) -> rampart_data::Result<T>,
) -> Result<T> {
    Ok(match load(kind, &dir.path) {
        Err(rampart_data::DataError::Missing { .. }) if dir.source == DataSource::Cache => {
            tracing::info!(
                folder = %dir.path.display(),
                "{} is not in the per-user data folder yet: downloading it",
                kind.title()
            );
            rampart_data::download(kind, &dir.path).with_context(|| {
                format!(
                    "{} does not hold {} yet and it could not be fetched{}",
                    dir.describe(),
                    kind.title(),
                    DOWNLOAD_HINT
                )
            })?;
            load(kind, &dir.path)?
        }
        result => {
            result.with_context(|| format!("loading {} from {}", kind.title(), dir.describe()))?
        }
    })
}

/// How to get a build that downloads, when this one does not.
pub const DOWNLOAD_HINT: &str = if cfg!(feature = "download") {
    ""
} else {
    " (this `rampart` was built without the `download` feature: build it with \
     `cargo build --release -p rampart-cli --features download` to fetch data sets, \
     or place the files as said below)"
};

/// The command line of this process, shell-quoted, e.g. `rampart train --out 'my runs/a'`.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`command_line`] without the flags `flags` and their values: what the user typed,
/// as seen by a process its launcher started with extra flags.
pub fn command_line_without(flags: &[&str]) -> String {
    let mut out = Vec::new();
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if flags.contains(&a.as_str()) {
            args.next();
            continue;
        }
        out.push(shell_quote(&a));
    }
    out.join(" ")
}

pub use rampart_fs::shell_quote;

/// Writes `value` as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    rampart_fs::write_atomic(path, &bytes)?;
    Ok(())
}

/// The settings of this invocation of a long command (see `rampart_fs::RunSettings`):
/// the subcommand and every flag given after it with its value as typed (a repeated
/// flag's values joined by spaces), but --out and --threads, which change no result.
/// Started again in the folder of an interrupted run, the command continues it only
/// with the same settings.
pub fn run_settings() -> rampart_fs::RunSettings {
    settings_of(std::env::args().skip(1))
}

fn settings_of(args: impl IntoIterator<Item = String>) -> rampart_fs::RunSettings {
    let args: Vec<String> = args.into_iter().collect();
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut command = String::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(flag) = arg.strip_prefix("--") else {
            if command.is_empty() {
                command = format!("rampart {arg}");
            }
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => match args.get(i) {
                // A value: anything but another flag (negative numbers are values).
                Some(next) if !next.starts_with("--") => {
                    i += 1;
                    (flag.to_string(), next.clone())
                }
                _ => (flag.to_string(), "true".to_string()),
            },
        };
        if name == "out" || name == "threads" {
            continue;
        }
        match flags.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => {
                v.push(' ');
                v.push_str(&value);
            }
            None => flags.push((name, value)),
        }
    }
    flags
        .into_iter()
        .fold(rampart_fs::RunSettings::new(command), |s, (n, v)| {
            s.with(format!("--{n}"), v)
        })
}

/// Appends the command line to `OUT/command.txt` (one line per invocation, so a resumed
/// run lists every session).
pub fn record_command(out: &Path, command: &str) -> Result<()> {
    use std::io::Write;
    let path = out.join("command.txt");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{command}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Locks the output folder `out` for this process (creating it), so that a second
/// `rampart` writing there is refused with a clear error; released when the process
/// ends, however it ends (see `rampart_fs::OutputLock`).
pub fn lock_out_dir(out: &Path, command: &str) -> Result<rampart_fs::OutputLock> {
    Ok(rampart_fs::OutputLock::acquire_for(out, command)?)
}

/// Creates the output folder.
pub fn create_out_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))
}

/// Parses a count flag that must be at least 1.
pub fn at_least_one(flag: &str, value: usize) -> Result<usize> {
    if value == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(value)
}

/// The plain model of `arch` for `kind`: the data set's image shape and classes, and
/// the per-channel normalisation of its training set, fixed published constants
/// (CIFAR-10's for CIFAR-10 and CIFAR-100, MNIST's, SVHN's; see `rampart_models`).
pub fn model_spec_for(arch: Arch, kind: DatasetKind) -> ModelSpec {
    let (c, h, w) = kind.image_shape();
    let (mean, std): (&[f32], &[f32]) = match kind {
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            (&rampart_models::CIFAR10_MEAN, &rampart_models::CIFAR10_STD)
        }
        DatasetKind::Mnist => (&rampart_models::MNIST_MEAN, &rampart_models::MNIST_STD),
        DatasetKind::Svhn => (&rampart_models::SVHN_MEAN, &rampart_models::SVHN_STD),
    };
    ModelSpec::for_input(arch, kind.num_classes(), [c, h, w], mean, std)
}

/// The data set a model is evaluated on: `flag` (`--dataset`), else the one its file
/// says it was trained on, else CIFAR-10 (files of models trained elsewhere).
pub fn model_dataset(
    flag: Option<DatasetKind>,
    model: &rampart_models::Classifier,
    path: &Path,
) -> Result<DatasetKind> {
    Ok(match (flag, model.metadata().get("dataset")) {
        (Some(d), _) => d,
        (None, Some(name)) => name.parse().with_context(|| {
            format!(
                "{}: metadata `dataset` = `{name}` is not a known data set; pass --dataset",
                path.display()
            )
        })?,
        (None, None) => DatasetKind::Cifar10,
    })
}

/// Refuses a model whose outputs or input shape do not fit `dataset`.
pub fn check_model_fits(
    model: &rampart_models::Classifier,
    path: &Path,
    dataset: DatasetKind,
) -> Result<()> {
    let k = model.spec().num_classes;
    if k != dataset.num_classes() {
        bail!(
            "{} has {k} outputs but {} has {} classes: pass the --dataset it was trained on",
            path.display(),
            dataset.title(),
            dataset.num_classes()
        );
    }
    let (c, h, w) = dataset.image_shape();
    let [mc, mh, mw] = model.spec().input_shape;
    if [mc, mh, mw] != [c, h, w] {
        bail!(
            "{} takes {mc}×{mh}×{mw} images but {} has {c}×{h}×{w} images: pass the --dataset it was trained on",
            path.display(),
            dataset.title(),
        );
    }
    Ok(())
}

/// What a shard of `rampart attack` or `rampart eval --suite autoattack` was made
/// from: the first `n` images and labels of `test`, the model file at `model`, and
/// `settings`.
pub fn file_fingerprint(
    test: &rampart_data::ImageDataset,
    n: usize,
    model: &Path,
    settings: &serde_json::Value,
) -> Result<rampart_eval::Fingerprint> {
    let examples = test.take(n);
    let labels: Vec<u8> = examples
        .labels()
        .iter()
        .flat_map(|l| l.to_le_bytes())
        .collect();
    let model_bytes =
        std::fs::read(model).with_context(|| format!("cannot read {}", model.display()))?;
    Ok(rampart_eval::Fingerprint {
        data: rampart_eval::fingerprint_digest([examples.images(), &labels]),
        model: rampart_eval::fingerprint_digest([model_bytes.as_slice()]),
        settings: rampart_eval::settings_digest(settings),
    })
}

/// Loads a model file (or an ONNX graph) for evaluation or attack: the λ of a once-for-all model and the
/// noise scale of a stochastic one set (when given), its noise reseeded with `seed`.
pub fn load_model(
    path: &Path,
    device: &Device,
    lambda: Option<f32>,
    noise_scale: Option<f32>,
    seed: u64,
    onnx: &crate::interop::OnnxInputArgs,
) -> Result<rampart_models::Classifier> {
    let model = crate::interop::load_classifier(path, device, onnx)
        .with_context(|| format!("cannot load the model {}", path.display()))?;
    if let Some(lambda) = lambda {
        model.set_lambda(lambda).context("--lambda")?;
    }
    if let Some(scale) = noise_scale {
        model.set_noise_scale(scale).context("--noise-scale")?;
    }
    model.reseed_noise(seed);
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        use Precision::{Bf16, Tf32, F32};
        let cuda = |ordinal, precision| DeviceArg::Cuda { ordinal, precision };
        assert_eq!("CUDA".parse(), Ok(cuda(0, F32)));
        assert_eq!("cuda:2".parse(), Ok(cuda(2, F32)));
        assert_eq!("cuda+tf32".parse(), Ok(cuda(0, Tf32)));
        assert_eq!("cuda:1+TF32".parse(), Ok(cuda(1, Tf32)));
        assert_eq!("cuda+bf16".parse(), Ok(cuda(0, Bf16)));
        assert_eq!("cuda:3+BF16".parse(), Ok(cuda(3, Bf16)));
        for bad in [
            "tpu",
            "cuda:x",
            "cpu+tf32",
            "cpu+bf16",
            "cuda+fp16",
            "cuda:+tf32",
            "cuda+tf32+bf16",
        ] {
            assert!(bad.parse::<DeviceArg>().is_err(), "{bad}");
        }
        // The recorded form parses back to the same device.
        for d in [DeviceArg::Cpu, cuda(0, F32), cuda(3, Tf32), cuda(1, Bf16)] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
    }

    #[test]
    fn settings_are_the_flags_but_out_and_threads() {
        let of = |line: &str| settings_of(line.split(' ').map(String::from));
        let a =
            of("--threads 2 attack --model m --eps 8/255 --lambda -0.5 --strict-checks --out a");
        let same = of("attack --out=b --strict-checks --lambda -0.5 --eps 8/255 --model m");
        assert_eq!(a, same);
        assert_ne!(
            a,
            of("attack --model m --eps 16/255 --lambda -0.5 --strict-checks")
        );
        assert_ne!(
            a,
            of("eval --model m --eps 8/255 --lambda -0.5 --strict-checks")
        );
        // Repeated flags keep every value.
        assert_ne!(
            of("sweep --reference a=x --reference b=y"),
            of("sweep --reference a=x")
        );
    }

    /// A GPU run records the GPU switches that are set, with their values; a CPU run
    /// none.
    #[test]
    fn gpu_switches_are_recorded_for_gpu_runs_only() {
        // The benchmark switch only acts inside cuDNN plans, which no test here builds.
        std::env::set_var(rampart_models::kernels::CUDNN_BENCHMARK_ENV, "1");
        let gpu = DeviceArg::Cuda {
            ordinal: 0,
            precision: Precision::Bf16,
        };
        let set = gpu_switches(&gpu);
        assert_eq!(set[rampart_models::kernels::CUDNN_BENCHMARK_ENV], "1");
        assert_eq!(gpu_switch_names().count(), 8);
        for name in gpu_switch_names() {
            assert_eq!(
                set.get(name).is_some(),
                std::env::var_os(name).is_some(),
                "{name}"
            );
        }
        assert_eq!(gpu_switches(&DeviceArg::Cpu), serde_json::json!({}));
        std::env::remove_var(rampart_models::kernels::CUDNN_BENCHMARK_ENV);
    }

    #[test]
    fn data_dir_comes_from_the_flag_then_the_environment() -> Result<()> {
        assert_eq!(
            resolve_data_dir(Some("a".into()), Some("b".into()))?,
            PathBuf::from("a")
        );
        assert_eq!(
            resolve_data_dir(None, Some("b".into()))?,
            PathBuf::from("b")
        );
        let err = resolve_data_dir(None, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--data-dir") && err.contains(DATA_DIR_ENV),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn data_dir_is_the_flag_then_the_environment_then_the_cache() -> Result<()> {
        let cache = Some(PathBuf::from("/cache/rampart/data"));
        let fallback =
            |env: Option<&str>| DataDir::fallback_from(env.map(PathBuf::from), cache.clone());
        let flag = DataDir::resolve(Some("a".into()), fallback(Some("b")))?;
        assert_eq!(
            (flag.path, flag.source),
            (PathBuf::from("a"), DataSource::Flag)
        );
        let env = DataDir::resolve(None, fallback(Some("b")))?;
        assert_eq!(
            (env.path, env.source),
            (PathBuf::from("b"), DataSource::Env)
        );
        let cached = DataDir::resolve(None, fallback(Some("")))?;
        assert_eq!(cached.source, DataSource::Cache);
        assert_eq!(Some(cached.path), cache);
        let err = DataDir::resolve(None, DataDir::fallback_from(None, None))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--data-dir") && err.contains("HOME"), "{err}");
        Ok(())
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--lr=0.1"), "--lr=0.1");
        assert_eq!(shell_quote("my runs"), "'my runs'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
