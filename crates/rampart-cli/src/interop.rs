//! `rampart import` and `rampart export`: PyTorch state dicts in and out (see
//! `docs/interop.md` and the `rampart-interop` crate).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rampart_interop::{Convention, ImportOptions};
use rampart_models::{Arch, Classifier};

fn parse_arch(s: &str) -> std::result::Result<Arch, String> {
    s.parse::<Arch>().map_err(|e| e.to_string())
}

fn parse_names(s: &str) -> std::result::Result<Convention, String> {
    s.parse()
}

/// Flags of `rampart import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The PyTorch state dict: a `torch.save` file (.pt, .pth; read without running
    /// any code from it) or a safetensors file.
    pub file: PathBuf,
    /// The architecture the weights belong to: wrn-D-K, resnet20 or preact-resnet18.
    #[arg(long, value_parser = parse_arch)]
    pub arch: Arch,
    /// Whose parameter names the file uses: robustbench (WideResNet), preact-resnet
    /// (Wong et al.'s PreActResNet-18), ccat (CCAT's ResNet-20) or rampart
    /// [default: the architecture's public implementation].
    #[arg(long, value_parser = parse_names)]
    pub names: Option<Convention>,
    /// Per-channel mean the model subtracts from its inputs (RobustBench's models
    /// take raw [0, 1] inputs: 0).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0,0",
        allow_negative_numbers = true
    )]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation the model divides its inputs by.
    #[arg(long, value_delimiter = ',', default_value = "1,1,1")]
    pub std: Vec<f32>,
    /// Input side in pixels (the channels and classes come from the weights).
    #[arg(long, default_value_t = 32)]
    pub input_size: usize,
    /// Bounds of valid inputs, `lo,hi`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1",
        allow_negative_numbers = true
    )]
    pub bounds: Vec<f32>,
    /// The Rampart model file to write (safetensors with the spec in its metadata).
    #[arg(long)]
    pub out: PathBuf,
}

impl ImportArgs {
    /// Reads, checks and writes; returns the line to print.
    pub fn run(&self) -> Result<String> {
        let [lo, hi] = self.bounds[..] else {
            bail!("--bounds takes two values, lo,hi");
        };
        let options = ImportOptions {
            arch: self.arch,
            convention: self
                .names
                .unwrap_or_else(|| Convention::default_for(&self.arch)),
            mean: self.mean.clone(),
            std: self.std.clone(),
            input_size: self.input_size,
            bounds: [lo, hi],
        };
        let dict = rampart_interop::read_state_dict(&self.file)?;
        let mut model = rampart_interop::import_state_dict(&dict, &options)
            .with_context(|| format!("{} as a {}", self.file.display(), self.arch))?;
        let source = self
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        model.set_metadata("import.source", source)?;
        model.set_metadata("import.names", options.convention.to_string())?;
        model.save(&self.out)?;
        Ok(format!(
            "imported a {} ({} classes, {:.2} M parameters, `{}` names) from {} to {}",
            self.arch,
            model.spec().num_classes,
            model.num_parameters() as f64 / 1e6,
            options.convention,
            self.file.display(),
            self.out.display()
        ))
    }
}

/// How an ONNX model's inputs look (`rampart eval` and `rampart attack`); the
/// defaults are RobustBench's: inputs in [0, 1], normalisation inside the graph.
#[derive(Args, Clone, Debug, Default, PartialEq)]
pub struct OnnxInputArgs {
    /// ONNX models only: per-channel mean Rampart subtracts before the graph
    /// [default: none, the graph normalises].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub onnx_mean: Option<Vec<f32>>,
    /// ONNX models only: per-channel std Rampart divides by before the graph.
    #[arg(long, value_delimiter = ',')]
    pub onnx_std: Option<Vec<f32>>,
    /// ONNX models only: bounds of valid inputs, lo,hi [default: 0,1].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub onnx_bounds: Option<Vec<f32>>,
}

impl OnnxInputArgs {
    fn given(&self) -> bool {
        *self != OnnxInputArgs::default()
    }
}

/// Whether `path` names an ONNX model (by its extension).
pub fn is_onnx(path: &std::path::Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// Loads `path`: an ONNX graph (`.onnx`) with `inputs`, or a Rampart model file.
pub fn load_classifier(
    path: &std::path::Path,
    device: &candle_core::Device,
    inputs: &OnnxInputArgs,
) -> Result<Classifier> {
    if !is_onnx(path) {
        if inputs.given() {
            bail!("--onnx-mean, --onnx-std and --onnx-bounds apply to ONNX models (.onnx) only");
        }
        return Ok(Classifier::load(path, device)?);
    }
    let bounds = match inputs.onnx_bounds.as_deref() {
        None => [0.0, 1.0],
        Some([lo, hi]) => [*lo, *hi],
        Some(_) => bail!("--onnx-bounds takes two values, lo,hi"),
    };
    let options = rampart_interop::OnnxOptions {
        mean: inputs.onnx_mean.clone(),
        std: inputs.onnx_std.clone(),
        bounds,
        device: device.clone(),
    };
    Ok(rampart_interop::load_onnx(path, &options)?)
}

/// What `rampart export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A PyTorch `state_dict` as safetensors (`safetensors.torch.load_file`).
    PytorchSafetensors,
    /// An ONNX graph (opset 13) with the input normalisation inside: inputs in the
    /// model's bounds, output the logits.
    Onnx,
}

/// Flags of `rampart export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The Rampart model file.
    #[arg(long)]
    pub model: PathBuf,
    /// The output format.
    #[arg(long, value_enum, default_value = "pytorch-safetensors")]
    pub format: ExportFormat,
    /// Whose parameter names to write [default: the architecture's public
    /// implementation: robustbench, preact-resnet or ccat].
    #[arg(long, value_parser = parse_names)]
    pub names: Option<Convention>,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
}

impl ExportArgs {
    /// Writes the state dict or graph; returns the line to print.
    pub fn run(&self) -> Result<String> {
        let model = Classifier::load(&self.model, &candle_core::Device::Cpu)?;
        let arch = model.spec().arch;
        let names = self.names.unwrap_or_else(|| Convention::default_for(&arch));
        let bytes = match self.format {
            ExportFormat::PytorchSafetensors => rampart_interop::export_state_dict(&model, names),
            ExportFormat::Onnx => rampart_interop::export_onnx(&model),
        }
        .with_context(|| format!("exporting {}", self.model.display()))?;
        rampart_fs::write_atomic(&self.out, &bytes)?;
        if self.format == ExportFormat::Onnx {
            return Ok(format!(
                "exported the {arch} of {} as ONNX to {} (input `input`: images in [{}, {}], normalisation inside; output `logits`)",
                self.model.display(),
                self.out.display(),
                model.spec().bounds[0],
                model.spec().bounds[1]
            ));
        }
        Ok(format!(
            "exported the {arch} of {} as a PyTorch state dict with `{names}` names to {} (normalisation mean {:?}, std {:?}: apply it before the network, see docs/interop.md)",
            self.model.display(),
            self.out.display(),
            model.spec().mean,
            model.spec().std
        ))
    }
}
