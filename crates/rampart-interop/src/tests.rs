//! Tests of the PyTorch interop: archives written here byte for byte as
//! `torch.save(model.state_dict(), path)` writes them (pickle protocol 2, a zip of
//! stored members `archive/data.pkl`, `archive/data/<key>`, `archive/version`,
//! `archive/byteorder`), safetensors exports read back, hostile and malformed files.

use std::io::Write;

use candle_core::{Device, ModuleT, Tensor};
use rampart_models::{Arch, Classifier, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::pickle::{self, PickleError};
use crate::*;

/// Writes pickle opcodes the way CPython's protocol-2 pickler does for a state dict.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    memo: u8,
}

/// A tensor entry of a test state dict: name, storage class, shape, values.
struct Entry {
    name: String,
    class: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Pickler {
    fn op(&mut self, b: u8) -> &mut Self {
        self.out.push(b);
        self
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.out.push(b'c');
        self.out
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self
    }

    fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        }
        self
    }

    fn put(&mut self) -> &mut Self {
        self.out.extend_from_slice(&[b'q', self.memo]);
        self.memo = self.memo.wrapping_add(1);
        self
    }

    fn tuple(&mut self, xs: &[usize]) -> &mut Self {
        if xs.is_empty() {
            return self.op(b')');
        }
        self.op(b'(');
        for &x in xs {
            self.int(x as i64);
        }
        self.op(b't')
    }

    fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b')').op(b'R')
    }

    /// The pickle of an OrderedDict state dict whose i-th tensor is storage `i`.
    fn state_dict(entries: &[Entry]) -> Vec<u8> {
        let mut p = Pickler::default();
        p.op(0x80).op(2).ordered_dict().put().op(b'(');
        for (i, e) in entries.iter().enumerate() {
            let numel: usize = e.shape.iter().product();
            let mut stride = vec![1usize; e.shape.len()];
            for d in (0..e.shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * e.shape[d + 1];
            }
            p.str(&e.name)
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(b'(')
                .op(b'(')
                .str("storage")
                .global("torch", e.class)
                .str(&i.to_string())
                .str("cpu")
                .int(numel as i64)
                .op(b't')
                .op(b'Q')
                .int(0)
                .tuple(&e.shape)
                .tuple(&stride)
                .op(0x89)
                .ordered_dict()
                .op(b't')
                .op(b'R')
                .put();
        }
        p.op(b'u');
        // The state dict's `_metadata` attribute, set by BUILD.
        p.op(b'}').str("_metadata").ordered_dict().op(b's').op(b'b');
        p.op(b'.');
        p.out
    }
}

/// A zip of stored members.
fn zip_of(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in members {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// A `torch.save` archive of `entries`, its pickle replaced by `pickle` if given.
fn torch_archive(entries: &[Entry], pickle: Option<Vec<u8>>) -> Vec<u8> {
    let mut members = vec![
        (
            "archive/data.pkl".to_string(),
            pickle.unwrap_or_else(|| Pickler::state_dict(entries)),
        ),
        ("archive/byteorder".to_string(), b"little".to_vec()),
    ];
    for (i, e) in entries.iter().enumerate() {
        members.push((format!("archive/data/{i}"), e.bytes.clone()));
    }
    members.push(("archive/version".to_string(), b"3\n".to_vec()));
    zip_of(&members)
}

/// The state dict of `model` under `convention`, as PyTorch holds it (with the
/// int64 `num_batches_tracked` scalars).
fn torch_entries(model: &Classifier, convention: Convention) -> Vec<Entry> {
    let mut out = Vec::new();
    for (ours, var) in model.named_vars() {
        let name = convention.rename(&ours).unwrap();
        let values = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        if let Some(prefix) = name.strip_suffix(".running_var") {
            out.push(Entry {
                name: format!("{prefix}.num_batches_tracked"),
                class: "LongStorage",
                shape: Vec::new(),
                bytes: 7i64.to_le_bytes().to_vec(),
            });
        }
        out.push(Entry {
            name,
            class: "FloatStorage",
            shape: var.dims().to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
    }
    out
}

/// A model with random weights and non-trivial running statistics.
pub(crate) fn random_model(arch: Arch, seed: u64) -> Classifier {
    let mut spec = ModelSpec::cifar(arch, 10);
    spec.mean = vec![0.0; 3];
    spec.std = vec![1.0; 3];
    let model = Classifier::new(spec, seed, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in model.named_vars() {
        let n = var.as_tensor().elem_count();
        let values: Vec<f32> = if name.ends_with("running_var") {
            (0..n).map(|_| rng.gen_range(0.5..2.0)).collect()
        } else if name.ends_with("running_mean") || name.ends_with("bias") {
            (0..n).map(|_| rng.gen_range(-0.3..0.3)).collect()
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    model
}

pub(crate) fn images(b: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..b * 3 * 32 * 32).map(|_| rng.gen()).collect();
    Tensor::from_vec(v, (b, 3, 32, 32), &Device::Cpu).unwrap()
}

pub(crate) fn logits(model: &Classifier, x: &Tensor) -> Vec<f32> {
    model
        .forward_t(x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn write_temp(bytes: &[u8], name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn import_file(bytes: &[u8], options: &ImportOptions) -> Result<Classifier> {
    let (_dir, path) = write_temp(bytes, "model.pt");
    import_state_dict(&read_state_dict(&path)?, options)
}

pub(crate) const ARCHS: [Arch; 3] = [
    Arch::Wrn {
        depth: 10,
        widen: 2,
    },
    Arch::Resnet20,
    Arch::PreactResnet18,
];

/// A torch.save archive under each public convention imports to a model whose
/// logits equal the original's; so does Rampart's own safetensors export.
#[test]
fn torch_archives_and_exports_import_to_the_same_logits() {
    let x = images(3, 9);
    for (i, arch) in ARCHS.into_iter().enumerate() {
        let model = random_model(arch, 40 + i as u64);
        let want = logits(&model, &x);
        let options = ImportOptions::robustbench(arch);
        let archive = torch_archive(&torch_entries(&model, options.convention), None);
        let imported = import_file(&archive, &options).unwrap();
        assert_eq!(logits(&imported, &x), want, "{arch} from a torch archive");
        assert_eq!(imported.spec(), model.spec(), "{arch}");
        for convention in [options.convention, Convention::Rampart] {
            let bytes = export_state_dict(&model, convention).unwrap();
            let options = ImportOptions {
                convention,
                ..options.clone()
            };
            let back = import_file(&bytes, &options).unwrap();
            assert_eq!(logits(&back, &x), want, "{arch} exported as {convention}");
        }
    }
}

/// An export carries the public names, int64 `num_batches_tracked` scalars and the
/// normalisation in its metadata.
#[test]
fn exports_use_public_names_and_carry_the_normalisation() {
    let model = random_model(
        Arch::Wrn {
            depth: 10,
            widen: 2,
        },
        1,
    );
    let bytes = export_state_dict(&model, Convention::Robustbench).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    for want in [
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.convShortcut.weight",
        "block3.layer.0.conv2.weight",
        "bn1.running_var",
        "fc.bias",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let counter = st.tensor("block2.layer.0.bn2.num_batches_tracked").unwrap();
    assert_eq!(counter.dtype(), safetensors::Dtype::I64);
    assert!(counter.shape().is_empty());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta[metadata::ARCH], "wrn-10-2");
    assert_eq!(meta[metadata::MEAN], "[0.0,0.0,0.0]");
    assert_eq!(meta["format"], "pt");
    // The preact-resnet names are refused for a WRN.
    assert!(export_state_dict(&model, Convention::PreactResnet).is_err());
}

#[test]
fn renames_follow_the_public_modules() {
    let cases = [
        (Convention::Robustbench, "stem.weight", "conv1.weight"),
        (
            Convention::Robustbench,
            "stage2.block0.shortcut.weight",
            "block2.layer.0.convShortcut.weight",
        ),
        (
            Convention::Robustbench,
            "bn.running_mean",
            "bn1.running_mean",
        ),
        (
            Convention::PreactResnet,
            "stage4.block1.bn2.bias",
            "layer4.1.bn2.bias",
        ),
        (
            Convention::PreactResnet,
            "stage3.block0.shortcut.weight",
            "layer3.0.shortcut.0.weight",
        ),
        (Convention::PreactResnet, "fc.weight", "linear.weight"),
        (Convention::Ccat, "stem_bn.running_var", "norm1.running_var"),
        (
            Convention::Ccat,
            "stage1.block2.bn2.weight",
            "block0.2.norm2.weight",
        ),
        (
            Convention::Ccat,
            "stage3.block0.shortcut_bn.bias",
            "block2.0.downsample.1.bias",
        ),
        (Convention::Ccat, "fc.bias", "logits.bias"),
    ];
    for (c, ours, theirs) in cases {
        assert_eq!(c.rename(ours).as_deref(), Some(theirs), "{c} {ours}");
    }
    for c in Convention::ALL {
        assert_eq!(c.to_string().parse::<Convention>().unwrap(), c);
    }
    assert!("pytorch".parse::<Convention>().is_err());
}

/// Checkpoints keep the state dict under a key; DataParallel adds `module.`.
#[test]
fn checkpoints_and_data_parallel_names_are_understood() {
    let arch = Arch::Wrn {
        depth: 10,
        widen: 1,
    };
    let model = random_model(arch, 3);
    let x = images(2, 1);
    let mut entries = torch_entries(&model, Convention::Robustbench);
    for e in &mut entries {
        e.name = format!("module.{}", e.name);
    }
    // {"epoch": 3, "state_dict": OrderedDict(...)}: the state dict's pickle nested.
    let inner = Pickler::state_dict(&entries);
    let mut p = Pickler::default();
    p.op(0x80)
        .op(2)
        .op(b'}')
        .op(b'(')
        .str("epoch")
        .int(3)
        .str("state_dict");
    // Splice the inner pickle without its PROTO header and STOP.
    p.out.extend_from_slice(&inner[2..inner.len() - 1]);
    p.op(b'u').op(b'.');
    let archive = torch_archive(&entries, Some(p.out));
    let imported = import_file(&archive, &ImportOptions::robustbench(arch)).unwrap();
    assert_eq!(logits(&imported, &x), logits(&model, &x));
}

fn small_entries() -> Vec<Entry> {
    let model = random_model(
        Arch::Wrn {
            depth: 10,
            widen: 1,
        },
        5,
    );
    torch_entries(&model, Convention::Robustbench)
}

/// Pickles that call anything outside the state-dict constructors are refused by
/// name, even when the call's result is thrown away, and no code ever runs.
#[test]
fn pickles_that_call_code_are_refused() {
    let entries = small_entries();
    let valid = Pickler::state_dict(&entries);
    for (module, name) in [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
        ("__builtin__", "exec"),
        ("subprocess", "Popen"),
        ("torch", "load"),
    ] {
        // GLOBAL module.name ('id',) REDUCE POP, then the valid state dict.
        let mut p = Pickler::default();
        p.op(0x80)
            .op(2)
            .global(module, name)
            .op(b'(')
            .str("id")
            .op(b't')
            .op(b'R')
            .op(b'0');
        p.out.extend_from_slice(&valid[2..]);
        let err = pickle::read(&p.out).unwrap_err();
        assert_eq!(err, PickleError::Refused(format!("{module}.{name}")));
        let archive = torch_archive(&entries, Some(p.out));
        let (_dir, path) = write_temp(&archive, "evil.pt");
        let msg = read_state_dict(&path).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("{module}.{name}")) && msg.contains("refused"),
            "{msg}"
        );
    }
    // INST builds an arbitrary object: refused as an opcode.
    let inst = b"\x80\x02ios\nsystem\n(X\x02\x00\x00\x00idtR.";
    assert!(matches!(
        pickle::read(inst),
        Err(PickleError::Malformed { .. } | PickleError::Refused(_))
    ));
}

/// Truncations, random corruptions and hostile lengths are errors, never panics.
#[test]
fn malformed_pickles_and_archives_are_errors() {
    let entries = small_entries();
    let valid = Pickler::state_dict(&entries);
    assert!(pickle::read(&valid).is_ok());
    for cut in 0..valid.len() {
        assert!(
            pickle::read(&valid[..cut]).is_err(),
            "prefix of {cut} bytes read"
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    for _ in 0..3000 {
        let mut bad = valid.clone();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..bad.len());
            bad[i] = rng.gen();
        }
        let _ = pickle::read(&bad);
    }
    // A string length of 4 GiB, a 200-deep nesting, a memo entry never put.
    assert!(pickle::read(b"\x80\x02X\xff\xff\xff\xff.").is_err());
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b']', 200));
    deep.extend(std::iter::repeat_n(b'a', 199));
    deep.push(b'.');
    assert!(pickle::read(&deep).is_err());
    assert!(pickle::read(b"\x80\x02h\x05.").is_err());
    // A 1,000-item list memoized 10,000 times: refused by the value budget.
    let mut big = b"\x80\x02]".to_vec();
    big.extend(
        std::iter::repeat_n(b'N', 1000)
            .chain([b'e'])
            .collect::<Vec<_>>(),
    );
    big.insert(3, b'(');
    for i in 0..10_000u32 {
        big.push(b'r');
        big.extend_from_slice(&(i % 64).to_le_bytes());
    }
    big.push(b'.');
    let err = pickle::read(&big).unwrap_err().to_string();
    assert!(err.contains("values"), "{err}");

    let archive = torch_archive(&entries, None);
    let mut rng = ChaCha8Rng::seed_from_u64(78);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.pt");
    for _ in 0..300 {
        let mut bad = archive.clone();
        let i = rng.gen_range(0..bad.len());
        bad[i] = rng.gen();
        std::fs::write(&path, &bad).unwrap();
        let _ = read_state_dict(&path);
    }
    for cut in [0, 4, 100, archive.len() / 2, archive.len() - 1] {
        std::fs::write(&path, &archive[..cut]).unwrap();
        assert!(read_state_dict(&path).is_err(), "cut at {cut}");
    }
    std::fs::write(&path, b"\x80\x02}.").unwrap();
    let msg = read_state_dict(&path).unwrap_err().to_string();
    assert!(msg.contains("legacy"), "{msg}");
    assert!(matches!(
        read_state_dict(&dir.path().join("missing.pt")),
        Err(InteropError::Io { .. })
    ));
}

/// A storage shorter than its header says, or a strided tensor, is refused.
#[test]
fn inconsistent_storages_are_refused() {
    let mut entries = small_entries();
    let short = entries[1].bytes.len() - 4;
    entries[1].bytes.truncate(short);
    let (_d, path) = write_temp(&torch_archive(&entries, None), "short.pt");
    let msg = read_state_dict(&path).unwrap_err().to_string();
    assert!(msg.contains(&entries[1].name), "{msg}");
}

/// Missing, unexpected or misshapen tensors are named in the error.
#[test]
fn state_dicts_that_do_not_fit_are_refused() {
    let arch = Arch::Wrn {
        depth: 10,
        widen: 1,
    };
    let options = ImportOptions::robustbench(arch);
    let mut entries = small_entries();
    let removed = entries.remove(3).name;
    let msg = import_file(&torch_archive(&entries, None), &options)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains(&removed) && msg.contains("missing"), "{msg}");

    let mut entries = small_entries();
    entries.push(Entry {
        name: "sub_block1.layer.0.conv1.weight".into(),
        class: "FloatStorage",
        shape: vec![1],
        bytes: 1f32.to_le_bytes().to_vec(),
    });
    let msg = import_file(&torch_archive(&entries, None), &options)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("sub_block1") && msg.contains("no place"),
        "{msg}"
    );

    // A WRN-10-1 file read as a WRN-16-1: tensors are missing.
    let wider = ImportOptions::robustbench(Arch::Wrn {
        depth: 16,
        widen: 1,
    });
    assert!(import_file(&torch_archive(&small_entries(), None), &wider).is_err());
    // A WRN-10-1 file read as WRN-10-2: shapes differ.
    let msg = import_file(
        &torch_archive(&small_entries(), None),
        &ImportOptions::robustbench(Arch::Wrn {
            depth: 10,
            widen: 2,
        }),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(msg.contains("shape"), "{msg}");
}

/// Found by fuzzing (`state_dict`): a zip member whose header claims 1.9 GB made the
/// reader reserve that much memory before reading the few bytes the archive holds.
#[test]
fn a_member_claiming_more_than_the_archive_holds_is_refused() {
    let bytes = include_bytes!("../tests/data/zip_member_claiming_1.9_gb.pt");
    let err = decode_state_dict(bytes, std::path::Path::new("w.pt"));
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("w.pt"), "{msg}");
}
