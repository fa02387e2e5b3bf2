//! The bodies of Rampart's fuzz targets: every parser of bytes that come from outside
//! (data sets, model and checkpoint files, evaluation records, PyTorch and ONNX files),
//! each called on arbitrary input.
//!
//! A body returns nothing: the parser under test must answer `Ok` or its typed error,
//! and the body checks what holds either way (an error names the source it was given,
//! a decoded data set is consistent). A panic, a hang or an absurd allocation is the
//! failure the fuzzer looks for. Two drivers call the same bodies through [`TARGETS`]:
//!
//! - `fuzz/` (cargo-fuzz, libFuzzer, nightly): one `fuzz_target!` per body, outside
//!   the workspace, for coverage-guided runs (`cargo +nightly fuzz run NAME`);
//! - this crate's test `corpus`, part of every `cargo test`: every body over its
//!   committed seed corpus `fuzz/corpus/NAME/` and a fixed number of seeded mutations
//!   of it, so the targets build and hold without nightly.
//!
//! This crate owns no parser: it knows only the public decoding entry points of the
//! crates it drives.
#![warn(missing_docs)]

use std::path::Path;

use candle_core::Device;
use rampart_data::{DatasetKind, ImageDataset, Splits};

/// One fuzz target: its name (the folder of its corpus, the binary in `fuzz/`) and body.
pub struct Target {
    /// Name, e.g. `cifar_batch`.
    pub name: &'static str,
    /// What it feeds the input to.
    pub parser: &'static str,
    /// The body.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: [Target; 12] = [
    Target {
        name: "cifar_batch",
        parser: "rampart_data::decode_cifar_batch (CIFAR-10 and CIFAR-100 records)",
        run: cifar_batch,
    },
    Target {
        name: "cifar_archive",
        parser: "rampart_data::decode_cifar_archive (the official .tar.gz)",
        run: cifar_archive,
    },
    Target {
        name: "image",
        parser: "the image-folder decoder on one PNG or JPEG file",
        run: image,
    },
    Target {
        name: "image_archive",
        parser: "rampart_data::decode_image_archive (an image folder as .tar.gz)",
        run: image_archive,
    },
    Target {
        name: "mnist_idx",
        parser: "rampart_data::decode_mnist_idx (IDX images and labels, gzipped or not)",
        run: mnist_idx,
    },
    Target {
        name: "svhn_mat",
        parser: "rampart_data::decode_svhn_mat (MATLAB level-5 MAT-files)",
        run: svhn_mat,
    },
    Target {
        name: "model_file",
        parser: "rampart_models::Classifier::from_bytes (safetensors and the spec metadata)",
        run: model_file,
    },
    Target {
        name: "checkpoint",
        parser: "rampart_defenses::decode_checkpoint_meta and the checkpoint's tensors",
        run: checkpoint,
    },
    Target {
        name: "records_json",
        parser: "the JSON records read back for resume and compare",
        run: records_json,
    },
    Target {
        name: "pickle",
        parser: "rampart_interop::pickle::read (the restricted pickle reader)",
        run: pickle,
    },
    Target {
        name: "state_dict",
        parser: "rampart_interop::decode_state_dict (torch.save zip or safetensors)",
        run: state_dict,
    },
    Target {
        name: "onnx",
        parser: "rampart_interop::decode_onnx (protobuf, graph preparation, probe batch)",
        run: onnx,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// An error's message must name the source it was given.
fn names_source(err: &dyn std::fmt::Display, source: &str) {
    let msg = err.to_string();
    assert!(msg.contains(source), "error does not name {source}: {msg}");
}

/// A decoded split is consistent: one label below the class count per image.
fn check_dataset(ds: &ImageDataset) {
    let (c, h, w) = ds.shape();
    assert_eq!(ds.images().len(), ds.len() * c * h * w);
    assert_eq!(ds.labels().len(), ds.len());
    assert!(ds.labels().iter().all(|&l| (l as usize) < ds.num_classes()));
}

fn check_splits(splits: &Splits) {
    check_dataset(&splits.train);
    check_dataset(&splits.test);
    assert_eq!(splits.train.shape(), splits.test.shape());
}

/// CIFAR-10 and CIFAR-100 batch files.
pub fn cifar_batch(data: &[u8]) {
    for kind in [DatasetKind::Cifar10, DatasetKind::Cifar100] {
        match rampart_data::decode_cifar_batch(kind, data, Path::new("batch.bin")) {
            Ok(ds) => check_dataset(&ds),
            Err(e) => names_source(&e, "batch.bin"),
        }
    }
}

/// The official CIFAR `.tar.gz`, read as CIFAR-10 and as CIFAR-100.
pub fn cifar_archive(data: &[u8]) {
    for kind in [DatasetKind::Cifar10, DatasetKind::Cifar100] {
        match rampart_data::decode_cifar_archive(kind, data, Path::new("cifar.tar.gz")) {
            Ok(s) => check_splits(&s),
            Err(e) => names_source(&e, "cifar.tar.gz"),
        }
    }
}

/// One image file, decoded as the image-folder reader decodes each file: placed as the
/// only image of class `a` in both splits of an in-memory archive.
pub fn image(data: &[u8]) {
    let Ok(archive) = stored_tar_gz(&[("train/a/0.png", data), ("test/a/0.png", data)]) else {
        return;
    };
    match rampart_data::decode_image_archive(&archive, Path::new("images.tar.gz")) {
        Ok(s) => {
            check_splits(&s);
            assert_eq!(s.train.images(), s.test.images());
        }
        Err(e) => names_source(&e, "images.tar.gz"),
    }
}

/// An image folder packed as `.tar.gz`.
pub fn image_archive(data: &[u8]) {
    match rampart_data::decode_image_archive(data, Path::new("images.tar.gz")) {
        Ok(s) => check_splits(&s),
        Err(e) => names_source(&e, "images.tar.gz"),
    }
}

/// A gzipped tar (stored, uncompressed deflate blocks) of `members`.
pub fn stored_tar_gz(members: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, *bytes)?;
    }
    tar.into_inner()?.finish()
}

/// Splits fuzz input into two files: a little-endian u32 length, the first file, the
/// second (inputs shorter than their own length field give two empty files).
pub fn split_two(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return (&[], &[]);
    };
    let len = u32::from_le_bytes(*len) as usize;
    if len > rest.len() {
        return (&[], &[]);
    }
    rest.split_at(len)
}

/// Joins two files into one fuzz input, the inverse of [`split_two`].
pub fn join_two(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut out = (first.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

/// An MNIST split: the input holds the images file and the labels file ([`split_two`]).
pub fn mnist_idx(data: &[u8]) {
    let (images, labels) = split_two(data);
    let (img, lab) = (Path::new("images-idx3"), Path::new("labels-idx1"));
    match rampart_data::decode_mnist_idx(images, img, labels, lab) {
        Ok(ds) => check_dataset(&ds),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("images-idx3") || msg.contains("labels-idx1"),
                "error names neither file: {msg}"
            );
        }
    }
}

/// An SVHN `.mat` file.
pub fn svhn_mat(data: &[u8]) {
    match rampart_data::decode_svhn_mat(data, Path::new("svhn.mat")) {
        Ok(ds) => check_dataset(&ds),
        Err(e) => names_source(&e, "svhn.mat"),
    }
}

/// A Rampart model file.
pub fn model_file(data: &[u8]) {
    let path = Path::new("model.safetensors");
    if let Ok(model) = rampart_models::Classifier::from_bytes(data, path, &Device::Cpu) {
        let spec = model.spec();
        assert!(spec.validate().is_ok());
        // What was loaded saves again.
        assert!(model.to_bytes().is_ok());
    }
}

/// A training checkpoint: its description, then its tensors as `--resume` loads them.
pub fn checkpoint(data: &[u8]) {
    let path = Path::new("checkpoint.safetensors");
    match rampart_defenses::decode_checkpoint_meta(data, path) {
        Ok(meta) => assert!(serde_json::to_string(&meta).is_ok()),
        Err(e) => names_source(&e, "checkpoint.safetensors"),
    }
    let _ = candle_core::safetensors::load_buffer(data, &Device::Cpu);
}

/// The JSON records Rampart reads back: per-example records and AutoAttack state
/// (resume), evaluation reports (`rampart compare`), checkpoint descriptions and the
/// confidence threshold of a model's metadata.
pub fn records_json(data: &[u8]) {
    fn parse<T: serde::de::DeserializeOwned + serde::Serialize>(data: &[u8]) {
        if let Ok(value) = serde_json::from_slice::<T>(data) {
            assert!(serde_json::to_vec(&value).is_ok());
        }
    }
    parse::<rampart_eval::AttackRecord>(data);
    parse::<rampart_eval::DistalRecord>(data);
    parse::<rampart_eval::SearchRecord>(data);
    parse::<rampart_eval::TrustRecord>(data);
    parse::<rampart_eval::ThreatModelRecord>(data);
    parse::<rampart_eval::AutoAttackState>(data);
    parse::<rampart_eval::EvalReport>(data);
    parse::<rampart_defenses::CheckpointMeta>(data);
    parse::<rampart_defenses::ConfidenceThreshold>(data);
    parse::<rampart_models::ModelSpec>(data);
}

/// A pickle, as found in `data.pkl` of a `torch.save` archive.
pub fn pickle(data: &[u8]) {
    let _ = rampart_interop::pickle::read(data);
}

/// A PyTorch state dict file.
pub fn state_dict(data: &[u8]) {
    match rampart_interop::decode_state_dict(data, Path::new("weights.pt")) {
        Ok(dict) => {
            assert!(!dict.tensors.is_empty());
            for (_, t) in &dict.tensors {
                assert_eq!(t.values.len(), t.shape.iter().product::<usize>());
            }
        }
        Err(e) => names_source(&e, "weights.pt"),
    }
}

/// An ONNX classifier.
pub fn onnx(data: &[u8]) {
    let options = rampart_interop::OnnxOptions::default();
    match rampart_interop::decode_onnx(data, Path::new("model.onnx"), &options) {
        Ok(model) => assert!(model.spec().num_classes >= 2),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
        }
    }
}
