//! Rampart models as ONNX graphs: [`export_onnx`] writes a plain WRN,
//! PreActResNet-18 or ResNet-20 with its input normalisation inside the graph, so the
//! ONNX model takes images in the model's bounds like the Rampart model (RobustBench's
//! convention). Operators: Sub, Div, Conv, BatchNormalization, Relu, Add, ReduceMean,
//! Gemm (opset 13).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    ModelProto, NodeProto, TensorProto,
};
use rampart_models::{Arch, Classifier};

use crate::onnx::{int_attr, ints_attr};
use crate::{InteropError, Result};

/// Builds the graph node by node.
struct Graph {
    weights: HashMap<String, Tensor>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    next: usize,
}

fn float_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> onnx::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v as i64),
                None => tensor_shape_proto::dimension::Value::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(onnx::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Graph {
    fn fresh(&mut self, what: &str) -> String {
        self.next += 1;
        format!("{what}_{}", self.next)
    }

    /// The weight `name` as an initializer (once); missing weights are an error.
    fn weight(&mut self, name: &str) -> Result<String> {
        if !self.initializers.iter().any(|t| t.name == name) {
            let t = self
                .weights
                .get(name)
                .ok_or_else(|| InteropError::Unsupported(format!("the model has no `{name}`")))?;
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            self.initializers
                .push(float_tensor(name, t.dims(), &values));
        }
        Ok(name.to_string())
    }

    fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    fn node(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        attribute: Vec<onnx::AttributeProto>,
    ) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: out.clone(),
            input: inputs,
            output: vec![out.clone()],
            attribute,
            ..Default::default()
        });
        out
    }

    fn conv(&mut self, x: &str, prefix: &str, stride: usize, padding: usize) -> Result<String> {
        let w = self.weight(&format!("{prefix}.weight"))?;
        let k = self.weights[&w].dim(2)? as i64;
        let (s, p) = (stride as i64, padding as i64);
        Ok(self.node(
            "Conv",
            vec![x.into(), w],
            vec![
                ints_attr("kernel_shape", &[k, k]),
                ints_attr("strides", &[s, s]),
                ints_attr("pads", &[p, p, p, p]),
            ],
        ))
    }

    fn bn(&mut self, x: &str, prefix: &str, eps: f32) -> Result<String> {
        let inputs = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|p| self.weight(&format!("{prefix}.{p}")))
            .collect::<Result<Vec<_>>>()?;
        let eps = onnx::AttributeProto {
            name: "epsilon".into(),
            r#type: AttributeType::Float as i32,
            f: eps,
            ..Default::default()
        };
        Ok(self.node(
            "BatchNormalization",
            [vec![x.to_string()], inputs].concat(),
            vec![eps],
        ))
    }

    fn relu(&mut self, x: &str) -> String {
        self.node("Relu", vec![x.into()], Vec::new())
    }

    fn add(&mut self, a: &str, b: &str) -> String {
        self.node("Add", vec![a.into(), b.into()], Vec::new())
    }
}

/// (stage, block) pairs of the model, in order, from its variable names.
fn blocks(weights: &HashMap<String, Tensor>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = weights
        .keys()
        .filter_map(|n| {
            let mut parts = n.split('.');
            let s = parts.next()?.strip_prefix("stage")?.parse().ok()?;
            let b = parts.next()?.strip_prefix("block")?.parse().ok()?;
            Some((s, b))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// `model` as an ONNX graph (bytes of a `ModelProto`): input `input` (B, C, H, W) in
/// the model's bounds, output `logits` (B, K).
pub fn export_onnx(model: &Classifier) -> Result<Vec<u8>> {
    let spec = model.spec();
    if spec.noise.is_some() || spec.oat.is_some() || spec.arch == Arch::External {
        return Err(InteropError::Unsupported(
            "only plain WRN, PreActResNet-18 and ResNet-20 models are exported to ONNX".into(),
        ));
    }
    let weights = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            Ok((
                n,
                v.as_tensor()
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?,
            ))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    let [c, h, w] = spec.input_shape;
    let mut g = Graph {
        weights,
        nodes: Vec::new(),
        initializers: Vec::new(),
        next: 0,
    };
    g.initializers
        .push(float_tensor("input_mean", &[1, c, 1, 1], &spec.mean));
    g.initializers
        .push(float_tensor("input_std", &[1, c, 1, 1], &spec.std));
    let x = g.node("Sub", vec!["input".into(), "input_mean".into()], Vec::new());
    let mut x = g.node("Div", vec![x, "input_std".into()], Vec::new());
    let post_activation = spec.arch == Arch::Resnet20;
    let eps = spec.batch_norm.eps as f32;
    x = g.conv(&x, "stem", 1, 1)?;
    if post_activation {
        x = g.bn(&x, "stem_bn", eps)?;
        x = g.relu(&x);
    }
    for (s, b) in blocks(&g.weights) {
        let p = format!("stage{s}.block{b}");
        let stride = if b == 0 && s > 1 { 2 } else { 1 };
        let shortcut = g.has(&format!("{p}.shortcut.weight"));
        x = if post_activation {
            let mut h = g.conv(&x, &format!("{p}.conv1"), stride, 1)?;
            h = g.bn(&h, &format!("{p}.bn1"), eps)?;
            h = g.relu(&h);
            h = g.conv(&h, &format!("{p}.conv2"), 1, 1)?;
            h = g.bn(&h, &format!("{p}.bn2"), eps)?;
            let skip = if shortcut {
                let sc = g.conv(&x, &format!("{p}.shortcut"), stride, 0)?;
                g.bn(&sc, &format!("{p}.shortcut_bn"), eps)?
            } else {
                x.clone()
            };
            let sum = g.add(&h, &skip);
            g.relu(&sum)
        } else {
            let pre = g.bn(&x, &format!("{p}.bn1"), eps)?;
            let pre = g.relu(&pre);
            let skip = if shortcut {
                g.conv(&pre, &format!("{p}.shortcut"), stride, 0)?
            } else {
                x.clone()
            };
            let mut h = g.conv(&pre, &format!("{p}.conv1"), stride, 1)?;
            h = g.bn(&h, &format!("{p}.bn2"), eps)?;
            h = g.relu(&h);
            h = g.conv(&h, &format!("{p}.conv2"), 1, 1)?;
            g.add(&h, &skip)
        };
    }
    if !post_activation {
        x = g.bn(&x, "bn", eps)?;
        x = g.relu(&x);
    }
    let pooled = g.node(
        "ReduceMean",
        vec![x],
        vec![ints_attr("axes", &[2, 3]), int_attr("keepdims", 0)],
    );
    let (fw, fb) = (g.weight("fc.weight")?, g.weight("fc.bias")?);
    let logits = g.node("Gemm", vec![pooled, fw, fb], vec![int_attr("transB", 1)]);
    if let Some(last) = g.nodes.last_mut() {
        last.output = vec!["logits".into()];
    }
    let _ = logits;
    let graph = onnx::GraphProto {
        name: format!("rampart-{}", spec.arch),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![value_info("input", &[None, Some(c), Some(h), Some(w)])],
        output: vec![value_info("logits", &[None, Some(spec.num_classes)])],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        producer_name: "rampart".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset_import: vec![onnx::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    };
    Ok(prost::Message::encode_to_vec(&model))
}
