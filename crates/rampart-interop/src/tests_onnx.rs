//! Tests of the ONNX path: Rampart models exported to ONNX and loaded back compute
//! the same logits and input gradients; hand-written graphs in the forms exporters
//! write; attacks through an ONNX model; malformed and unsupported graphs.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_onnx::onnx::{
    self, tensor_proto::DataType, tensor_shape_proto, type_proto, ModelProto, NodeProto,
    TensorProto,
};
use rampart_attacks::{Attack, Bounds, Pgd};
use rampart_models::{Arch, Classifier, ModelSpec};

use crate::tests::{images, logits, random_model, ARCHS};
use crate::*;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn load(bytes: &[u8]) -> Result<Classifier> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, bytes).unwrap();
    load_onnx(&path, &OnnxOptions::default())
}

/// ∂⟨logits(x), probe⟩/∂x through `model`'s frozen view.
fn input_gradient(model: &Classifier, x: &Tensor, probe: &Tensor) -> Tensor {
    let x = Var::from_tensor(x).unwrap();
    let out = model.frozen().forward_t(&x, false).unwrap();
    let g = (out * probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    g.get(&x).unwrap().clone()
}

/// Every architecture, exported to ONNX and loaded back, gives Rampart's logits and
/// input gradients (the CIFAR-normalised WRN exercises the normalisation inside the
/// graph).
#[test]
fn exported_models_compute_rampart_logits_and_gradients() {
    let x = images(3, 5);
    let mut models: Vec<Classifier> = ARCHS
        .into_iter()
        .enumerate()
        .map(|(i, a)| random_model(a, 60 + i as u64))
        .collect();
    models.push(Classifier::new(ModelSpec::wrn(10, 1, 10), 7, &Device::Cpu).unwrap());
    for model in &models {
        let onnx_model = load(&export_onnx(model).unwrap()).unwrap();
        assert_eq!(onnx_model.spec().num_classes, 10);
        assert_eq!(onnx_model.spec().input_shape, [3, 32, 32]);
        let (a, b) = (
            model.forward_t(&x, false).unwrap(),
            onnx_model.forward_t(&x, false).unwrap(),
        );
        let d = max_abs_diff(&a, &b);
        assert!(
            d <= 1e-4 * max_abs(&a).max(1.0),
            "{}: logits differ by {d}",
            model.spec().arch
        );
        let probe = images(3, 6)
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .narrow(1, 0, 10)
            .unwrap();
        let (ga, gb) = (
            input_gradient(model, &x, &probe),
            input_gradient(&onnx_model, &x, &probe),
        );
        let d = max_abs_diff(&ga, &gb);
        assert!(
            d <= 1e-3 * max_abs(&ga),
            "{}: input gradients differ by {d}",
            model.spec().arch
        );
    }
}

/// The input gradient through an ONNX model matches central finite differences.
#[test]
fn onnx_input_gradients_match_finite_differences() {
    let model = random_model(
        Arch::Wrn {
            depth: 10,
            widen: 1,
        },
        8,
    );
    let onnx_model = load(&export_onnx(&model).unwrap()).unwrap();
    let x = images(2, 9);
    let probe = Tensor::from_vec(
        (0..20).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<f32>>(),
        (2, 10),
        &Device::Cpu,
    )
    .unwrap();
    let grad = input_gradient(&onnx_model, &x, &probe);
    let f = |x: &Tensor| -> f64 {
        let out = onnx_model
            .forward_t(x, false)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        (out * probe.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let dir = images(2, 10).affine(2.0, -1.0).unwrap();
    let h = 1e-2;
    let plus = f(&(&x + (&dir * h).unwrap()).unwrap());
    let minus = f(&(&x - (&dir * h).unwrap()).unwrap());
    let numeric = (plus - minus) / (2.0 * h);
    let analytic = (grad * &dir)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        (numeric - analytic).abs() <= 2e-2 * analytic.abs().max(1.0),
        "finite differences {numeric} vs gradient {analytic}"
    );
}

/// PGD through an ONNX model keeps every invariant of the attack contract.
#[test]
fn attacks_run_on_onnx_models() {
    let model = random_model(
        Arch::Wrn {
            depth: 10,
            widen: 1,
        },
        11,
    );
    let onnx_model = load(&export_onnx(&model).unwrap()).unwrap();
    let x = images(4, 12);
    let labels: Vec<u32> = logits(&onnx_model, &x)
        .chunks(10)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(
                    (0, f32::MIN),
                    |b, (k, &v)| if v > b.1 { (k as u32, v) } else { b },
                )
                .0
        })
        .collect();
    let ys = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let eps = 8.0 / 255.0;
    let mut pgd = Pgd::linf_pgd20();
    pgd.steps = 5;
    let frozen = onnx_model.frozen();
    let results = pgd.run(&frozen, Bounds::UNIT, &x, &ys, &[eps], 0).unwrap();
    let r = &results[0];
    let delta = (&r.clipped - &x).unwrap();
    assert!(max_abs(&delta) <= eps as f32 + 1e-7);
    let lo = r
        .clipped
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let hi = r
        .clipped
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));
    for (i, &fooled) in r.success.iter().enumerate() {
        assert_eq!(fooled, r.predicted[i] != labels[i], "example {i}");
    }
}

fn float_init(name: &str, dims: &[usize], values: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        float_data: values,
        ..Default::default()
    }
}

fn info(name: &str, dims: &[i64]) -> onnx::ValueInfoProto {
    onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(onnx::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<onnx::AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

/// A small CNN as exporters write it: fixed batch of 1 in the input's shape, conv
/// with bias, GlobalAveragePool, Flatten, Gemm; `last` replaces the final node.
fn small_cnn(
    last: Option<NodeProto>,
    extra_output: bool,
) -> (Vec<u8>, Tensor, Tensor, Tensor, Tensor) {
    let w: Vec<f32> = (0..4 * 3 * 3 * 3)
        .map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.5)
        .collect();
    let b = vec![0.1, -0.2, 0.05, 0.0];
    let fw: Vec<f32> = (0..10 * 4)
        .map(|i| ((i * 13) % 7) as f32 / 7.0 - 0.4)
        .collect();
    let fb: Vec<f32> = (0..10).map(|i| i as f32 / 10.0).collect();
    let nodes = vec![
        node(
            "Conv",
            &["x", "w", "b"],
            "c",
            vec![crate::onnx::ints_attr("pads", &[1, 1, 1, 1])],
        ),
        node("Relu", &["c"], "r", vec![]),
        node("GlobalAveragePool", &["r"], "p", vec![]),
        node(
            "Flatten",
            &["p"],
            "f",
            vec![crate::onnx::int_attr("axis", 1)],
        ),
        last.unwrap_or_else(|| {
            node(
                "Gemm",
                &["f", "fw", "fb"],
                "y",
                vec![crate::onnx::int_attr("transB", 1)],
            )
        }),
    ];
    let mut outputs = vec![info("y", &[1, 10])];
    if extra_output {
        outputs.push(info("f", &[1, 4]));
    }
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![onnx::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(onnx::GraphProto {
            node: nodes,
            initializer: vec![
                float_init("w", &[4, 3, 3, 3], w.clone()),
                float_init("b", &[4], b.clone()),
                float_init("fw", &[10, 4], fw.clone()),
                float_init("fb", &[10], fb.clone()),
            ],
            input: vec![info("x", &[1, 3, 8, 8])],
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &Device::Cpu).unwrap();
    (
        prost::Message::encode_to_vec(&model),
        t(w, &[4, 3, 3, 3]),
        t(b, &[4]),
        t(fw, &[10, 4]),
        t(fb, &[10]),
    )
}

/// A hand-written graph with a fixed batch of one and GlobalAveragePool runs on a
/// batch of three and equals the same network computed with candle's operations.
#[test]
fn exporter_style_graphs_run_at_any_batch_size() {
    let (bytes, w, b, fw, fb) = small_cnn(None, false);
    let model = load(&bytes).unwrap();
    assert_eq!(model.spec().input_shape, [3, 8, 8]);
    let x = images(3, 1)
        .narrow(2, 0, 8)
        .unwrap()
        .narrow(3, 0, 8)
        .unwrap()
        .contiguous()
        .unwrap();
    let reference = x
        .conv2d(&w, 1, 1, 1, 1)
        .unwrap()
        .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
        .unwrap()
        .relu()
        .unwrap()
        .mean((2, 3))
        .unwrap()
        .matmul(&fw.t().unwrap())
        .unwrap()
        .broadcast_add(&fb)
        .unwrap();
    let got = model.forward_t(&x, false).unwrap();
    assert!(max_abs_diff(&got, &reference) < 1e-5);
}

/// Bytes that are not ONNX, unsupported operators, several outputs and outputs that
/// are not logits are clear errors.
#[test]
fn bad_graphs_are_refused_clearly() {
    let err = |bytes: &[u8]| load(bytes).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(b"definitely not a protobuf \xff\xfe").contains("not an ONNX model"));
    let good = export_onnx(&random_model(
        Arch::Wrn {
            depth: 10,
            widen: 1,
        },
        2,
    ))
    .unwrap();
    for cut in [1, good.len() / 3, good.len() - 5] {
        assert!(load(&good[..cut]).is_err(), "cut at {cut}");
    }
    let (lstm, ..) = small_cnn(Some(node("LSTM", &["f"], "y", vec![])), false);
    let msg = err(&lstm);
    assert!(msg.contains("not supported: LSTM"), "{msg}");
    let (two, ..) = small_cnn(None, true);
    assert!(err(&two).contains("2 outputs"), "{}", err(&two));
    let (features, ..) = small_cnn(Some(node("Identity", &["r"], "y", vec![])), false);
    let msg = err(&features);
    assert!(msg.contains("not the logits"), "{msg}");
}

/// Found by fuzzing (`onnx`): a `Gemm` node given two inputs instead of three made
/// candle-onnx index past the node's inputs and panic during the probe batch.
#[test]
fn a_graph_the_evaluator_cannot_run_is_an_error() {
    let bytes = include_bytes!("../tests/data/gemm_with_two_inputs.onnx");
    let err = decode_onnx(
        bytes,
        std::path::Path::new("m.onnx"),
        &OnnxOptions::default(),
    );
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("m.onnx") && msg.contains("the ONNX evaluator cannot run this graph"),
        "{msg}"
    );
}

/// An input declared as 1×10⁹×10⁹ is refused before the probe batch is allocated.
#[test]
fn an_enormous_declared_input_is_refused() {
    let (bytes, ..) = small_cnn(None, false);
    let mut model = <ModelProto as prost::Message>::decode(bytes.as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    graph.input = vec![info("x", &[1, 1, 1_000_000_000, 1_000_000_000])];
    let msg = load(&prost::Message::encode_to_vec(&model))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("more than 16777216 values"), "{msg}");
}
