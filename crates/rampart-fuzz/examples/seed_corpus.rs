//! Writes the seed corpus of every fuzz target into `fuzz/corpus/NAME/`: a couple of
//! small valid files per format and a few truncated or corrupted ones.
//!
//! `cargo run --release -p rampart-fuzz --example seed_corpus [-- OUT]` (default
//! `fuzz/corpus`). Inputs the fuzzer found worth keeping are added to the corpus by
//! hand (`cargo fuzz cmin`), not by this program, which only rewrites its own seeds.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use candle_onnx::onnx::{
    tensor_proto::DataType, tensor_shape_proto, type_proto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;
use rampart_data::DatasetKind;
use rampart_defenses::{CheckpointMeta, TrainConfig};
use rampart_fuzz::{join_two, stored_tar_gz};
use rampart_models::{Arch, Classifier, ModelSpec};

/// Seeds of one target: file name → bytes.
type Seeds = Vec<(&'static str, Vec<u8>)>;

/// The first `n` bytes of `b`.
fn cut(b: &[u8], n: usize) -> Vec<u8> {
    b[..n.min(b.len())].to_vec()
}

/// `b` with byte `at` replaced by `v`.
fn poke(b: &[u8], at: usize, v: u8) -> Vec<u8> {
    let mut out = b.to_vec();
    if let Some(x) = out.get_mut(at) {
        *x = v;
    }
    out
}

/// `records` CIFAR records with `label_bytes` label bytes each.
fn cifar_records(records: usize, label_bytes: usize) -> Vec<u8> {
    (0..records)
        .flat_map(|r| {
            let mut rec: Vec<u8> = (0..label_bytes).map(|i| (r + i) as u8 % 10).collect();
            rec.extend((0..3072).map(|p| ((p * 7 + r * 13) % 251) as u8));
            rec
        })
        .collect()
}

fn cifar_batch() -> Seeds {
    let ten = cifar_records(2, 1);
    let hundred = cifar_records(1, 2);
    vec![
        ("cifar10_two_records.bin", ten.clone()),
        ("cifar100_one_record.bin", hundred),
        ("truncated.bin", cut(&ten, 3000)),
        ("label_out_of_range.bin", poke(&ten, 3073, 200)),
    ]
}

/// Every member of `kind`'s official binary archive (its path in the archive), each
/// holding `record`.
fn cifar_members(kind: DatasetKind, record: &[u8]) -> Result<Vec<(String, &[u8])>> {
    let layout = kind.cifar_layout().context("a CIFAR data set")?;
    Ok(layout
        .train_files
        .iter()
        .chain([&layout.test_file])
        .map(|n| (format!("{}/{n}", layout.binary_folder), record))
        .collect())
}

/// Members with borrowed names, as `stored_tar_gz` takes them.
fn borrowed<'a>(members: &'a [(String, &'a [u8])]) -> Vec<(&'a str, &'a [u8])> {
    members.iter().map(|(n, b)| (n.as_str(), *b)).collect()
}

fn cifar_archive() -> Result<Seeds> {
    let record = cifar_records(1, 1);
    let members = cifar_members(DatasetKind::Cifar10, &record)?;
    let ten = stored_tar_gz(&borrowed(&members))?;
    let record100 = cifar_records(1, 2);
    let members100 = cifar_members(DatasetKind::Cifar100, &record100)?;
    let hundred = stored_tar_gz(&borrowed(&members100))?;
    Ok(vec![
        ("cifar10.tar.gz", ten.clone()),
        ("cifar100.tar.gz", hundred),
        ("truncated.tar.gz", cut(&ten, ten.len() / 2)),
        (
            "missing_member.tar.gz",
            stored_tar_gz(&borrowed(&members[..2]))?,
        ),
    ])
}

/// A w×h image in `color`, encoded as `format`.
fn encoded(
    color: image::ExtendedColorType,
    w: u32,
    h: u32,
    format: image::ImageFormat,
) -> Result<Vec<u8>> {
    let channels = usize::from(color.channel_count());
    let bytes_per = color.bits_per_pixel() as usize / 8 / channels;
    let pixels: Vec<u8> = (0..w as usize * h as usize * channels * bytes_per)
        .map(|i| (i * 37 % 256) as u8)
        .collect();
    let mut out = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(&mut out, &pixels, w, h, color, format)?;
    Ok(out.into_inner())
}

fn images() -> Result<Seeds> {
    use image::{ExtendedColorType as C, ImageFormat as F};
    let png = encoded(C::Rgb8, 4, 3, F::Png)?;
    Ok(vec![
        ("rgb.png", png.clone()),
        ("gray.png", encoded(C::L8, 2, 2, F::Png)?),
        ("rgba16.png", encoded(C::Rgba16, 2, 2, F::Png)?),
        ("rgb.jpg", encoded(C::Rgb8, 8, 8, F::Jpeg)?),
        ("truncated.png", cut(&png, png.len() - 12)),
        ("not_an_image.png", b"\x89PNG\r\n\x1a\nnot a png".to_vec()),
    ])
}

fn image_archive() -> Result<Seeds> {
    use image::{ExtendedColorType as C, ImageFormat as F};
    let a = encoded(C::Rgb8, 3, 2, F::Png)?;
    let b = encoded(C::L8, 3, 2, F::Png)?;
    let wide = encoded(C::Rgb8, 4, 2, F::Png)?;
    let good = stored_tar_gz(&[
        ("imgs/train/ant/1.png", &a),
        ("imgs/train/bee/1.png", &b),
        ("imgs/test/ant/1.png", &b),
        ("imgs/test/bee/1.png", &a),
    ])?;
    Ok(vec![
        ("two_classes.tar.gz", good.clone()),
        (
            "wrong_size.tar.gz",
            stored_tar_gz(&[("train/a/0.png", &a), ("test/a/0.png", &wide)])?,
        ),
        (
            "class_mismatch.tar.gz",
            stored_tar_gz(&[("train/a/0.png", &a), ("test/b/0.png", &a)])?,
        ),
        ("truncated.tar.gz", cut(&good, good.len() / 3)),
    ])
}

fn idx(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(body);
    out
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes)?;
    Ok(gz.finish()?)
}

fn mnist() -> Result<Seeds> {
    let pixels: Vec<u8> = (0..2 * 784).map(|i| (i % 256) as u8).collect();
    let images = idx(0x0803, &[2, 28, 28], &pixels);
    let labels = idx(0x0801, &[2], &[3, 9]);
    Ok(vec![
        ("plain.idx", join_two(&images, &labels)),
        ("gzipped.idx", join_two(&gzip(&images)?, &gzip(&labels)?)),
        ("truncated.idx", join_two(&cut(&images, 900), &labels)),
        (
            "count_mismatch.idx",
            join_two(&images, &idx(0x0801, &[1], &[3])),
        ),
        (
            "bad_label.idx",
            join_two(&images, &idx(0x0801, &[2], &[3, 10])),
        ),
    ])
}

/// A MAT v5 element: tag, data, padding to 8 bytes.
fn element(data_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = data_type.to_le_bytes().to_vec();
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// A real numeric MAT v5 variable of MATLAB class `class`, its real part stored as
/// data type `data_type`.
fn mat_var(name: &str, class: u8, dims: &[i32], data_type: u32, real: &[u8]) -> Vec<u8> {
    let mut m = element(6, &[&[class, 0, 0, 0][..], &[0; 4]].concat());
    let dims: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    m.extend(element(5, &dims));
    m.extend(element(1, name.as_bytes()));
    m.extend(element(data_type, real));
    element(14, &m)
}

fn mat_file(vars: &[Vec<u8>], compress: bool) -> Result<Vec<u8>> {
    let mut out = format!("{:<116}", "MATLAB 5.0 MAT-file, seed corpus").into_bytes();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&0x0100u16.to_le_bytes());
    out.extend_from_slice(b"IM");
    for v in vars {
        if compress {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(v)?;
            let z = z.finish()?;
            out.extend_from_slice(&15u32.to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(&z);
        } else {
            out.extend_from_slice(v);
        }
    }
    Ok(out)
}

fn svhn() -> Result<Seeds> {
    let pixels: Vec<u8> = (0..3072).map(|i| (i % 253) as u8).collect();
    let x = mat_var("X", 9, &[32, 32, 3, 1], 2, &pixels);
    let y = mat_var("y", 6, &[1, 1], 9, &10f64.to_le_bytes());
    let y_u8 = mat_var("y", 6, &[1, 1], 2, &[4]);
    let plain = mat_file(&[x.clone(), y.clone()], false)?;
    Ok(vec![
        ("one_image.mat", plain.clone()),
        ("compressed.mat", mat_file(&[x.clone(), y_u8], true)?),
        ("truncated.mat", cut(&plain, 1000)),
        (
            "wrong_dims.mat",
            mat_file(&[mat_var("X", 9, &[32, 3, 32, 1], 2, &pixels), y], false)?,
        ),
    ])
}

/// A small model file: WRN-10-1 for 1×4×4 inputs and 2 classes.
fn tiny_model() -> Result<Classifier> {
    let spec = ModelSpec::for_input(
        Arch::Wrn {
            depth: 10,
            widen: 1,
        },
        2,
        [1, 4, 4],
        &[0.5],
        &[0.25],
    );
    Ok(Classifier::new(spec, 0, &Device::Cpu)?)
}

/// Safetensors bytes of `tensors` with `metadata`.
fn safetensors_of(tensors: &[(&str, Tensor)], metadata: &[(&str, String)]) -> Result<Vec<u8>> {
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Ok(safetensors::serialize(
        tensors.iter().map(|(n, t)| (*n, t)),
        Some(meta),
    )?)
}

fn model_file(model: &Classifier) -> Result<Seeds> {
    let bytes = model.to_bytes()?;
    let spec = serde_json::to_string(model.spec())?;
    let header_only = safetensors_of(
        &[(
            "fc.bias",
            Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?,
        )],
        &[("rampart.format", "1".into()), ("rampart.spec", spec)],
    )?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    Ok(vec![
        ("wrn_10_1.safetensors", bytes.clone()),
        ("spec_without_weights.safetensors", header_only),
        ("header_only.safetensors", cut(&bytes, 8 + header_len)),
        ("truncated_header.safetensors", cut(&bytes, 200)),
    ])
}

fn checkpoint_meta(model: &Classifier) -> CheckpointMeta {
    CheckpointMeta {
        format: 1,
        epochs_done: 0,
        config: TrainConfig {
            ema: Some(0.999),
            ..TrainConfig::tiny(2)
        },
        method: "normal".into(),
        method_settings: serde_json::json!({ "label_smoothing": 0.0 }),
        spec: model.spec().clone(),
        train_examples: 64,
        history: Vec::new(),
        method_state: Some(serde_json::json!({ "groups": [0.1, 0.2] })),
    }
}

fn checkpoint(model: &Classifier) -> Result<Seeds> {
    let meta = serde_json::to_string(&checkpoint_meta(model))?;
    let cpu = &Device::Cpu;
    let tensors = [
        ("model/fc.bias", Tensor::new(&[0.5f32, -0.5], cpu)?),
        ("momentum/fc.bias", Tensor::new(&[0.0f32, 0.1], cpu)?),
        ("ema/fc.bias", Tensor::new(&[0.4f32, -0.4], cpu)?),
    ];
    let good = safetensors_of(&tensors, &[("rampart.checkpoint", meta.clone())])?;
    let bad_format = meta.replacen("\"format\":1", "\"format\":7", 1);
    Ok(vec![
        ("checkpoint.safetensors", good.clone()),
        (
            "future_format.safetensors",
            safetensors_of(&tensors, &[("rampart.checkpoint", bad_format)])?,
        ),
        ("no_description.safetensors", safetensors_of(&tensors, &[])?),
        ("truncated.safetensors", cut(&good, good.len() - 5)),
    ])
}

fn records(model: &Classifier) -> Result<Seeds> {
    let attack = rampart_eval::AttackRecord {
        key: "0f3a".into(),
        threat_model: "linf".into(),
        attack: "pgd-20-ce".into(),
        eps: 8.0 / 255.0,
        correct: vec![true, false, true],
        confidence: vec![0.9, 0.6, 0.99],
        wrong_class_confidence: vec![0.05, 0.6, 0.001],
        norm: vec![0.031, 0.031, 0.0],
        seconds: 1.5,
        rows: None,
    };
    let search = rampart_eval::SearchRecord {
        key: "77".into(),
        eps_max: 0.1,
        rounds: 8,
        min_eps: vec![Some(0.01), None, Some(0.0)],
        seconds: 0.25,
        rows: None,
    };
    let threshold = rampart_defenses::ConfidenceThreshold {
        tau: 0.7,
        tpr: 0.99,
        held_out_examples: 1000,
        held_out_correct: 900,
    };
    let attack_json = serde_json::to_vec_pretty(&attack)?;
    Ok(vec![
        ("attack_record.json", attack_json.clone()),
        ("search_record.json", serde_json::to_vec(&search)?),
        ("confidence_threshold.json", serde_json::to_vec(&threshold)?),
        ("model_spec.json", serde_json::to_vec(model.spec())?),
        (
            "checkpoint_meta.json",
            serde_json::to_vec(&checkpoint_meta(model))?,
        ),
        ("truncated.json", cut(&attack_json, attack_json.len() / 2)),
    ])
}

/// Pickle opcodes as CPython's protocol-2 pickler writes a state dict.
#[derive(Default)]
struct Pickler(Vec<u8>);

impl Pickler {
    fn op(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, v: u8) -> &mut Self {
        self.0.extend_from_slice(&[b'K', v]);
        self
    }
    fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b')').op(b'R')
    }
    fn tuple(&mut self, xs: &[u8]) -> &mut Self {
        self.op(b'(');
        for &x in xs {
            self.int(x);
        }
        self.op(b't')
    }
}

/// The pickle of a state dict `{name: FloatTensor(shape)}`, tensor i in storage `i`.
fn state_dict_pickle(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut p = Pickler::default();
    p.op(0x80).op(2).ordered_dict().op(b'(');
    for (i, (name, shape)) in entries.iter().enumerate() {
        let numel: u8 = shape.iter().product();
        let mut stride = vec![1u8; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        p.str(name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b'(')
            .op(b'(')
            .str("storage")
            .global("torch", "FloatStorage")
            .str(&i.to_string())
            .str("cpu")
            .int(numel)
            .op(b't')
            .op(b'Q')
            .int(0)
            .tuple(shape)
            .tuple(&stride)
            .op(0x89)
            .ordered_dict()
            .op(b't')
            .op(b'R');
    }
    p.op(b'u').op(b'.');
    p.0
}

fn pickles() -> Seeds {
    let good = state_dict_pickle(&[("conv.weight", &[2, 1, 2, 2]), ("fc.bias", &[2])]);
    let mut hostile = Pickler::default();
    hostile
        .op(0x80)
        .op(2)
        .global("os", "system")
        .str("echo owned")
        .op(0x85)
        .op(b'R')
        .op(b'.');
    vec![
        ("state_dict.pkl", good.clone()),
        ("calls_os_system.pkl", hostile.0),
        ("truncated.pkl", cut(&good, good.len() / 2)),
        (
            "protocol_4_frame.pkl",
            [&[0x80, 4, 0x95, 1, 0, 0, 0, 0, 0, 0, 0][..], b"N."].concat(),
        ),
    ]
}

fn zip_of(members: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in members {
        w.start_file(*name, opts)?;
        w.write_all(data)?;
    }
    Ok(w.finish()?.into_inner())
}

fn state_dicts() -> Result<Seeds> {
    let pkl = state_dict_pickle(&[("conv.weight", &[2, 1, 2, 2]), ("fc.bias", &[2])]);
    let conv: Vec<u8> = (0..8)
        .flat_map(|i| (i as f32 * 0.25).to_le_bytes())
        .collect();
    let bias: Vec<u8> = [0.5f32, -1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let torch = zip_of(&[
        ("archive/data.pkl", &pkl),
        ("archive/byteorder", b"little"),
        ("archive/data/0", &conv),
        ("archive/data/1", &bias),
        ("archive/version", b"3\n"),
    ])?;
    let short_storage = zip_of(&[
        ("archive/data.pkl", &pkl),
        ("archive/data/0", &conv[..12]),
        ("archive/data/1", &bias),
    ])?;
    let cpu = &Device::Cpu;
    let st = safetensors_of(
        &[
            (
                "module.fc.weight",
                Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], cpu)?,
            ),
            ("module.fc.bias", Tensor::new(&[1i64, 2], cpu)?),
        ],
        &[],
    )?;
    Ok(vec![
        ("torch_save.pt", torch.clone()),
        ("weights.safetensors", st),
        ("short_storage.pt", short_storage),
        ("truncated.pt", cut(&torch, torch.len() - 30)),
    ])
}

fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: values.to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn onnx_model(nodes: Vec<NodeProto>, initializer: Vec<TensorProto>, input: &[i64]) -> Vec<u8> {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "seed".into(),
            node: nodes,
            initializer,
            input: vec![value_info("x", input)],
            output: vec![value_info("y", &[1, 2])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn onnx() -> Seeds {
    let linear = onnx_model(
        vec![
            node("Flatten", &["x"], "f"),
            node("Gemm", &["f", "w", "b"], "y"),
        ],
        vec![
            float_tensor("w", &[4, 2], &[0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8]),
            float_tensor("b", &[2], &[0.0, 1.0]),
        ],
        &[1, 1, 2, 2],
    );
    let conv = onnx_model(
        vec![
            node("Conv", &["x", "k"], "c"),
            node("Relu", &["c"], "r"),
            node("GlobalAveragePool", &["r"], "p"),
            node("Flatten", &["p"], "f"),
            node("Gemm", &["f", "w", "b"], "y"),
        ],
        vec![
            float_tensor("k", &[3, 1, 1, 1], &[1.0, -1.0, 0.5]),
            float_tensor("w", &[3, 2], &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
            float_tensor("b", &[2], &[0.0, 0.0]),
        ],
        &[1, 1, 3, 3],
    );
    let unsupported = onnx_model(vec![node("Einsum", &["x"], "y")], Vec::new(), &[1, 1, 2, 2]);
    vec![
        ("linear.onnx", linear.clone()),
        ("conv_pool.onnx", conv),
        ("unsupported_op.onnx", unsupported),
        ("truncated.onnx", cut(&linear, linear.len() - 7)),
    ]
}

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus"));
    let model = tiny_model()?;
    let all: Vec<(&str, Seeds)> = vec![
        ("cifar_batch", cifar_batch()),
        ("cifar_archive", cifar_archive()?),
        ("image", images()?),
        ("image_archive", image_archive()?),
        ("mnist_idx", mnist()?),
        ("svhn_mat", svhn()?),
        ("model_file", model_file(&model)?),
        ("checkpoint", checkpoint(&model)?),
        ("records_json", records(&model)?),
        ("pickle", pickles()),
        ("state_dict", state_dicts()?),
        ("onnx", onnx()),
    ];
    ensure!(
        all.len() == rampart_fuzz::TARGETS.len(),
        "a target has no seeds"
    );
    for (target, seeds) in all {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}
