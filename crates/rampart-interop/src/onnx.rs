//! ONNX image classifiers, evaluated and attacked like Rampart's own models.
//!
//! [`load_onnx`] reads an exported classifier (one NCHW float input, one logits
//! output) and wraps it as a [`Classifier`] through
//! [`Classifier::from_external`]: every evaluation suite and attack then runs on it,
//! with input gradients, because the graph is executed by candle's tensor
//! operations (`candle-onnx`), which its autograd follows. Before the first forward
//! pass the graph is prepared once:
//!
//! * initializers and `Constant` nodes become tensors on the model's device, kept
//!   beside the graph (not converted again at every forward pass);
//! * the batch dimension of the input is made free, so any batch size runs;
//! * `GlobalAveragePool` becomes `ReduceMean` over H and W, and a `ReduceMean` whose
//!   axes come as an input (opset 18) gets them as an attribute, the forms the
//!   evaluator implements;
//! * any operator outside [`SUPPORTED_OPS`] is refused by name before anything runs.
//!
//! The model's output is checked to be logits (B, K) with K ≥ 2 on a probe batch.
//! Input range, normalisation and layout follow RobustBench's conventions unless
//! told otherwise ([`OnnxOptions`]): inputs in [0, 1], normalisation inside the graph.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    ModelProto, NodeProto,
};
use rampart_models::{Arch, Classifier, ExternalNetwork, ModelSpec};

use crate::{InteropError, Result};

/// The operators an ONNX classifier may use: those of ResNets, WRNs,
/// PreActResNets, VGG-style and small CNNs as `torch.onnx.export` writes them,
/// with their normalisation and shape plumbing.
pub const SUPPORTED_OPS: [&str; 32] = [
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "Div",
    "Dropout",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "Identity",
    "LeakyRelu",
    "MatMul",
    "MaxPool",
    "Mul",
    "Pad",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
];

/// Most values one input image may have (C·H·W; 3×2048×2048 fits): the declared input
/// shape sizes the probe batch, so it is checked before anything is allocated for it.
const MAX_INPUT_VALUES: usize = 1 << 24;

/// How the inputs of an ONNX model look; the defaults are RobustBench's.
#[derive(Clone, Debug)]
pub struct OnnxOptions {
    /// Per-channel mean Rampart subtracts before the graph (none by default: the
    /// graph normalises).
    pub mean: Option<Vec<f32>>,
    /// Per-channel std Rampart divides by before the graph.
    pub std: Option<Vec<f32>>,
    /// Bounds of valid inputs.
    pub bounds: [f32; 2],
    /// The device the graph runs on.
    pub device: Device,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        OnnxOptions {
            mean: None,
            std: None,
            bounds: [0.0, 1.0],
            device: Device::Cpu,
        }
    }
}

/// A prepared graph: the graph without its constant data, the constants as tensors.
struct OnnxNet {
    model: ModelProto,
    constants: HashMap<String, Tensor>,
    input: String,
    output: String,
}

impl ExternalNetwork for OnnxNet {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut values = self.constants.clone();
        values.insert(self.input.clone(), xs.contiguous()?);
        // candle-onnx indexes a node's inputs without checking how many the graph gave
        // it (a Gemm with two inputs panics): a graph it cannot evaluate is an error of
        // this model, not a crash of the process. The evaluation shares no state with
        // anything outside this call.
        let evaluated = std::panic::catch_unwind(AssertUnwindSafe(|| {
            candle_onnx::simple_eval(&self.model, values)
        }));
        let mut out = match evaluated {
            Ok(out) => out?,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                candle_core::bail!("the ONNX evaluator cannot run this graph: {why}")
            }
        };
        match out.remove(&self.output) {
            Some(t) => Ok(t),
            None => candle_core::bail!("the ONNX graph did not produce `{}`", self.output),
        }
    }
}

fn bad(path: &Path, message: impl Into<String>) -> InteropError {
    InteropError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads the ONNX classifier in `path`.
pub fn load_onnx(path: &Path, options: &OnnxOptions) -> Result<Classifier> {
    let bytes = std::fs::read(path).map_err(|source| InteropError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_onnx(&bytes, path, options)
}

/// Reads an ONNX classifier held in memory, as [`load_onnx`] reads a file; `path`
/// names the source in errors and in the model's `onnx.file` metadata.
pub fn decode_onnx(bytes: &[u8], path: &Path, options: &OnnxOptions) -> Result<Classifier> {
    let model = <ModelProto as prost::Message>::decode(bytes)
        .map_err(|e| bad(path, format!("not an ONNX model: {e}")))?;
    let (net, [c, h, w]) = prepare(model, &options.device).map_err(|m| bad(path, m))?;
    let net = Arc::new(net);
    let probe = Tensor::zeros((1, c, h, w), DType::F32, &options.device)?;
    let logits = net
        .forward(&probe)
        .map_err(|e| bad(path, format!("the graph fails on a probe batch: {e}")))?;
    let k = match logits.dims() {
        [1, k] if *k >= 2 => *k,
        other => {
            return Err(bad(
                path,
                format!("the output has shape {other:?} for one image: not the logits (1, K ≥ 2) of a classifier"),
            ))
        }
    };
    let spec = ModelSpec {
        arch: Arch::External,
        num_classes: k,
        input_shape: [c, h, w],
        mean: options.mean.clone().unwrap_or_else(|| vec![0.0; c]),
        std: options.std.clone().unwrap_or_else(|| vec![1.0; c]),
        bounds: options.bounds,
        noise: None,
        oat: None,
        // Unused: an external graph holds its own normalisation layers.
        batch_norm: rampart_models::BatchNormSpec::default(),
    };
    let mut model = Classifier::from_external(spec, net, &options.device)?;
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    model.set_metadata("onnx.file", name)?;
    Ok(model)
}

type Prepared = (OnnxNet, [usize; 3]);

/// Prepares `model` (see the module documentation); errors are messages.
fn prepare(mut model: ModelProto, device: &Device) -> std::result::Result<Prepared, String> {
    let graph = model.graph.as_mut().ok_or("no graph in the model")?;
    let mut constants = HashMap::new();
    for t in std::mem::take(&mut graph.initializer) {
        let tensor = tensor_of(&t).map_err(|e| format!("initializer `{}`: {e}", t.name))?;
        constants.insert(t.name.clone(), tensor);
    }
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut unsupported = Vec::new();
    for node in std::mem::take(&mut graph.node) {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            unsupported.push(format!("{}::{}", node.domain, node.op_type));
            continue;
        }
        if !SUPPORTED_OPS.contains(&node.op_type.as_str()) {
            unsupported.push(node.op_type.clone());
            continue;
        }
        if node.op_type == "Constant" {
            if let Some(t) = node
                .attribute
                .iter()
                .find(|a| a.name == "value")
                .and_then(|a| a.t.as_ref())
            {
                let out = node.output.first().ok_or("a Constant without output")?;
                constants.insert(
                    out.clone(),
                    tensor_of(t).map_err(|e| format!("constant `{out}`: {e}"))?,
                );
                continue;
            }
        }
        nodes.push(rewrite(node, &constants)?);
    }
    if !unsupported.is_empty() {
        unsupported.sort();
        unsupported.dedup();
        return Err(format!(
            "operators not supported: {} (supported: {})",
            unsupported.join(", "),
            SUPPORTED_OPS.join(", ")
        ));
    }
    graph.node = nodes;
    let constants: HashMap<String, Tensor> = constants
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| e.to_string())?;
    let inputs: Vec<&mut onnx::ValueInfoProto> = graph
        .input
        .iter_mut()
        .filter(|i| !constants.contains_key(&i.name))
        .collect();
    let [input] = <[_; 1]>::try_from(inputs).map_err(|v: Vec<_>| {
        format!(
            "the graph takes {} inputs besides its weights; a classifier takes one image batch",
            v.len()
        )
    })?;
    let shape = image_shape(input)?;
    let input_name = input.name.clone();
    let [output] = graph.output.as_slice() else {
        return Err(format!(
            "the graph has {} outputs; a classifier has one (the logits)",
            graph.output.len()
        ));
    };
    let output = output.name.clone();
    let net = OnnxNet {
        model,
        constants,
        input: input_name,
        output,
    };
    Ok((net, shape))
}

/// (C, H, W) of an NCHW float input, its batch dimension made free.
fn image_shape(input: &mut onnx::ValueInfoProto) -> std::result::Result<[usize; 3], String> {
    let name = input.name.clone();
    let tensor = match input.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        Some(type_proto::Value::TensorType(t)) => t,
        _ => return Err(format!("input `{name}` is not a tensor")),
    };
    if tensor.elem_type != DataType::Float as i32 {
        return Err(format!("input `{name}` is not float32"));
    }
    let dims = &mut tensor
        .shape
        .as_mut()
        .ok_or_else(|| format!("input `{name}` has no shape"))?
        .dim;
    if dims.len() != 4 {
        return Err(format!(
            "input `{name}` has rank {}, an NCHW image batch has rank 4",
            dims.len()
        ));
    }
    let mut chw = [0usize; 3];
    for (i, d) in dims[1..].iter().enumerate() {
        match d.value {
            Some(tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => chw[i] = v as usize,
            _ => {
                return Err(format!(
                    "input `{name}`: channels, height and width must be fixed"
                ))
            }
        }
    }
    let values = chw.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if values.is_none_or(|n| n > MAX_INPUT_VALUES) {
        return Err(format!(
            "input `{name}` is {}×{}×{}, more than {MAX_INPUT_VALUES} values per image",
            chw[0], chw[1], chw[2]
        ));
    }
    dims[0].value = Some(tensor_shape_proto::dimension::Value::DimParam(
        "batch".into(),
    ));
    Ok(chw)
}

/// The forms of nodes the evaluator implements.
fn rewrite(
    mut node: NodeProto,
    constants: &HashMap<String, Tensor>,
) -> std::result::Result<NodeProto, String> {
    match node.op_type.as_str() {
        "GlobalAveragePool" => {
            node.op_type = "ReduceMean".into();
            node.attribute = vec![ints_attr("axes", &[2, 3]), int_attr("keepdims", 1)];
        }
        "ReduceMean" if node.input.len() == 2 => {
            let axes = constants
                .get(&node.input[1])
                .ok_or("ReduceMean with computed axes")?
                .to_dtype(DType::I64)
                .and_then(|t| t.flatten_all()?.to_vec1::<i64>())
                .map_err(|e| e.to_string())?;
            node.input.truncate(1);
            node.attribute.retain(|a| a.name != "axes");
            node.attribute.push(ints_attr("axes", &axes));
        }
        _ => {}
    }
    Ok(node)
}

pub(crate) fn int_attr(name: &str, v: i64) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

pub(crate) fn ints_attr(name: &str, v: &[i64]) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// A tensor from an ONNX `TensorProto` (float, double, int64 or int32; typed fields
/// or raw little-endian bytes), its length checked against its dims.
fn tensor_of(t: &onnx::TensorProto) -> std::result::Result<Tensor, String> {
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
        .collect::<std::result::Result<_, _>>()?;
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("dimensions overflow")?;
    if !t.external_data.is_empty() {
        return Err("weights in an external file are not supported; export with the weights inside the .onnx file".into());
    }
    /// The typed field if it is filled, else the raw little-endian bytes.
    fn values<const N: usize, T: Clone>(
        typed: &[T],
        raw: &[u8],
        f: impl Fn([u8; N]) -> T,
        n: usize,
    ) -> std::result::Result<Vec<T>, String> {
        let v: Vec<T> = if typed.is_empty() {
            crate::state_dict::le_elements(raw, f)
        } else {
            typed.to_vec()
        };
        if v.len() != n {
            return Err(format!("{} values for {n} elements", v.len()));
        }
        Ok(v)
    }
    let dt = DataType::try_from(t.data_type).map_err(|_| format!("data type {}", t.data_type))?;
    let cpu = &Device::Cpu;
    let tensor = match dt {
        DataType::Float => Tensor::from_vec(
            values(&t.float_data, &t.raw_data, f32::from_le_bytes, n)?,
            dims,
            cpu,
        ),
        DataType::Double => Tensor::from_vec(
            values(&t.double_data, &t.raw_data, f64::from_le_bytes, n)?,
            dims,
            cpu,
        )
        .and_then(|t| t.to_dtype(DType::F32)),
        DataType::Int64 => Tensor::from_vec(
            values(&t.int64_data, &t.raw_data, i64::from_le_bytes, n)?,
            dims,
            cpu,
        ),
        DataType::Int32 => {
            let v = values(&t.int32_data, &t.raw_data, i32::from_le_bytes, n)?;
            Tensor::from_vec(v.into_iter().map(i64::from).collect::<Vec<_>>(), dims, cpu)
        }
        other => return Err(format!("data type {other:?} is not supported")),
    };
    tensor.map_err(|e| e.to_string())
}
