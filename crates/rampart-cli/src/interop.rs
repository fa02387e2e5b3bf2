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

/// What `rampart export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A PyTorch `state_dict` as safetensors (`safetensors.torch.load_file`).
    PytorchSafetensors,
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
    /// Writes the state dict; returns the line to print.
    pub fn run(&self) -> Result<String> {
        let model = Classifier::load(&self.model, &candle_core::Device::Cpu)?;
        let arch = model.spec().arch;
        let names = self.names.unwrap_or_else(|| Convention::default_for(&arch));
        let bytes = match self.format {
            ExportFormat::PytorchSafetensors => {
                rampart_interop::export_state_dict(&model, names)
                    .with_context(|| format!("exporting {}", self.model.display()))?
            }
        };
        rampart_fs::write_atomic(&self.out, &bytes)?;
        Ok(format!(
            "exported the {arch} of {} as a PyTorch state dict with `{names}` names to {} (normalisation mean {:?}, std {:?}: apply it before the network, see docs/interop.md)",
            self.model.display(),
            self.out.display(),
            model.spec().mean,
            model.spec().std
        ))
    }
}
