//! The `rampart` binary on MNIST and SVHN (tiny files in the official formats, written
//! here), the data-folder resolution (--data-dir, then $RAMPART_DATA_DIR, then the
//! per-user cache folder) and `rampart data download|export`. No network is used.

use std::io::Read;
use std::path::Path;
use std::process::Output;

use rampart_data::DatasetKind;

mod common;

use common::{on_model, rampart_command, read_json, s, text, tiny_train_args, TestResult};

/// The binary with no data folder in its environment and `home` as HOME and, when
/// given, `xdg` as XDG_CACHE_HOME.
fn rampart_in(args: &[&str], home: &Path, xdg: Option<&Path>) -> std::io::Result<Output> {
    let mut cmd = rampart_command(args, "warn");
    cmd.env_remove("XDG_CACHE_HOME").env("HOME", home);
    if let Some(xdg) = xdg {
        cmd.env("XDG_CACHE_HOME", xdg);
    }
    cmd.output()
}

/// The four MNIST IDX files (not gzipped) in `dir`: `train` and `test` images whose
/// pixels depend on the index and the label, labels cycling over the ten digits.
fn write_tiny_mnist(dir: &Path, train: usize, test: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut images = vec![0, 0, 8, 3];
        let mut labels = vec![0, 0, 8, 1];
        for d in [n as u32, 28, 28] {
            images.extend(d.to_be_bytes());
        }
        labels.extend((n as u32).to_be_bytes());
        for i in 0..n {
            let label = (i % 10) as u8;
            labels.push(label);
            images.extend((0..784).map(|p| ((p * 3 + usize::from(label) * 40 + i) % 256) as u8));
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images)?;
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels)?;
    }
    Ok(())
}

/// One data element of a little-endian level-5 MAT-file, padded to 8 bytes.
fn mat_element(data_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = data_type.to_le_bytes().to_vec();
    v.extend((data.len() as u32).to_le_bytes());
    v.extend_from_slice(data);
    v.resize(v.len().next_multiple_of(8), 0);
    v
}

/// A `miMATRIX` variable with a one-letter name (class 9 uint8 or 6 double).
fn mat_matrix(name: u8, class: u32, dims: &[u32], data_type: u32, data: &[u8]) -> Vec<u8> {
    let mut body = mat_element(6, &[class.to_le_bytes(), [0; 4]].concat());
    let dims: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    body.extend(mat_element(5, &dims));
    // The name in the small data element format: count 1 in the upper half, miINT8.
    body.extend(((1u32 << 16) | 1).to_le_bytes());
    body.extend([name, 0, 0, 0]);
    body.extend(mat_element(data_type, data));
    let mut m = 14u32.to_le_bytes().to_vec();
    m.extend((body.len() as u32).to_le_bytes());
    m.extend(body);
    m
}

/// SVHN's `{train,test}_32x32.mat` in `dir`: `X` uint8 32×32×3×N (column-major),
/// `y` double N×1 with labels 1–10 (10 is the digit 0).
fn write_tiny_svhn(dir: &Path, train: usize, test: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, n) in [("train_32x32.mat", train), ("test_32x32.mat", test)] {
        let mut out = b"MATLAB 5.0 MAT-file, written by rampart-cli's tests".to_vec();
        out.resize(116, b' ');
        out.extend([0u8; 8]);
        out.extend(0x0100u16.to_le_bytes());
        out.extend(u16::from_be_bytes(*b"MI").to_le_bytes());
        // Digit 0 is written as 10, as in the official files.
        let labels: Vec<u32> = (0..n)
            .map(|i| match i % 10 {
                0 => 10,
                d => d as u32,
            })
            .collect();
        let mut x = Vec::with_capacity(n * 3072);
        for (img, &label) in labels.iter().enumerate() {
            for ch in 0..3 {
                x.extend(
                    (0..1024).map(|p| ((p * 5 + ch * 60 + label as usize * 23 + img) % 256) as u8),
                );
            }
        }
        out.extend(mat_matrix(b'X', 9, &[32, 32, 3, n as u32], 2, &x));
        let y: Vec<u8> = labels
            .iter()
            .flat_map(|&l| f64::from(l).to_le_bytes())
            .collect();
        out.extend(mat_matrix(b'y', 6, &[n as u32, 1], 9, &y));
        std::fs::write(dir.join(name), out)?;
    }
    Ok(())
}

/// `data export --dataset DATASET --split SPLIT --out OUT FLAGS…`.
fn export_args<'a>(
    dataset: &'a str,
    split: &'a str,
    out: &'a str,
    flags: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "data",
        "export",
        "--dataset",
        dataset,
        "--split",
        split,
        "--out",
        out,
    ];
    args.extend(flags);
    args
}

/// Trains WRN-10-1 for one epoch on `dataset` in `data`, evaluates it (clean and PGD-20
/// on 4 images, the data set taken from the model), attacks it, and checks the model
/// was built for the data set's images.
fn train_and_evaluate(dataset: &str, data: &Path, home: &Path) -> TestResult {
    let kind: DatasetKind = dataset.parse()?;
    let run = home.join(format!("run-{dataset}"));
    let flags = ["--dataset", dataset, "--data-dir", s(data)];
    let train = rampart_in(&tiny_train_args("1", &flags, &run), home, None)?;
    assert!(train.status.success(), "{}", text(&train));
    let model = run.join("model.safetensors");
    let spec = rampart_models::Classifier::read_spec(&model)?;
    let (c, h, w) = kind.image_shape();
    assert_eq!(spec.input_shape, [c, h, w], "{dataset}");
    assert_eq!(spec.mean.len(), c, "{dataset}");
    let config = read_json(&run.join("config.json"))?;
    let crop_only = &config["train"]["augmentation"];
    assert_eq!(
        crop_only["flip"], false,
        "{dataset}: digits are not mirrored"
    );

    for (suite, extra) in [("clean", vec![]), ("pgd20", vec!["--attack-limit", "4"])] {
        let out = run.join(format!("eval-{suite}"));
        let flags = [&["--threads", "2", "--suite", suite], extra.as_slice()].concat();
        let eval = rampart_in(&on_model("eval", &model, s(data), &flags, &out), home, None)?;
        assert!(eval.status.success(), "{dataset} {suite}: {}", text(&eval));
        let results = read_json(&out.join("results.json"))?;
        assert_eq!(results["dataset"], dataset, "{suite}");
        assert_eq!(results["test_examples"], 10, "{suite}");
        if suite == "pgd20" {
            assert_eq!(results["robust_examples"], 4);
        }
    }
    let out = run.join("attack");
    let flags = ["--threads", "2", "--steps", "2", "--test-limit", "4"];
    let attack = rampart_in(
        &on_model("attack", &model, s(data), &flags, &out),
        home,
        None,
    )?;
    assert!(
        attack.status.success(),
        "{dataset} attack: {}",
        text(&attack)
    );
    Ok(())
}

#[test]
fn mnist_and_svhn_train_evaluate_and_attack() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mnist, svhn) = (dir.path().join("mnist"), dir.path().join("svhn"));
    write_tiny_mnist(&mnist, 16, 10)?;
    write_tiny_svhn(&svhn, 16, 10)?;
    train_and_evaluate("mnist", &mnist, dir.path())?;
    train_and_evaluate("svhn", &svhn, dir.path())?;

    // A model evaluated on a data set of other images is refused before any work.
    let mnist_model = dir.path().join("run-mnist/model.safetensors");
    let out = dir.path().join("wrong");
    for (dataset, data) in [("svhn", &svhn), ("cifar10", &svhn)] {
        let flags = ["--dataset", dataset];
        let args = on_model("eval", &mnist_model, s(data), &flags, &out);
        let eval = rampart_in(&args, dir.path(), None)?;
        assert!(!eval.status.success());
        let msg = text(&eval);
        assert!(
            msg.contains("1×28×28") && msg.contains("3×32×32") && msg.contains("--dataset"),
            "{msg}"
        );
    }
    Ok(())
}

/// `rampart data export` of the tiny MNIST in `data` (`split`) into `out`, with the
/// data folder named as `args` say; the number of examples it reports.
fn export(
    args: &[&str],
    out: &Path,
    home: &Path,
    xdg: Option<&Path>,
) -> Result<String, Box<dyn std::error::Error>> {
    let run = rampart_in(&export_args("mnist", "test", s(out), args), home, xdg)?;
    let msg = text(&run);
    if !run.status.success() {
        return Err(msg.into());
    }
    Ok(msg)
}

/// --data-dir, then $RAMPART_DATA_DIR, then $XDG_CACHE_HOME/rampart/data, then
/// $HOME/.cache/rampart/data; an empty cache folder is an error naming every file to
/// place in it (built without the `download` feature).
#[test]
fn the_data_folder_is_the_flag_then_the_environment_then_the_cache() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (home, xdg) = (dir.path().join("home"), dir.path().join("xdg"));
    let out = dir.path().join("x.safetensors");
    let xdg_data = xdg.join("rampart").join("data");
    let home_data = home.join(".cache").join("rampart").join("data");

    if !cfg!(feature = "download") {
        let err = export(&[], &out, &home, Some(&xdg))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        for file in DatasetKind::Mnist.official_files() {
            for needle in [
                xdg_data.join(file.name).display().to_string(),
                file.url.to_string(),
                file.checksum.hex().to_string(),
            ] {
                assert!(err.contains(&needle), "lacks {needle}: {err}");
            }
        }
        assert!(
            err.contains("per-user data folder") && err.contains("--features download"),
            "{err}"
        );
        let r = dir.path().join("r");
        let train = rampart_in(
            &tiny_train_args("1", &["--dataset", "mnist"], &r),
            &home,
            None,
        )?;
        assert!(!train.status.success());
        assert!(
            text(&train).contains(
                &home_data
                    .join("train-images-idx3-ubyte.gz")
                    .display()
                    .to_string()
            ),
            "{}",
            text(&train)
        );
    }

    // Sizes tell the folders apart: 3 test images in the home cache, 4 in the XDG
    // cache, 5 in $RAMPART_DATA_DIR, 6 in --data-dir.
    let (env_data, flag_data) = (dir.path().join("env"), dir.path().join("flag"));
    for (folder, n) in [
        (&home_data, 3),
        (&xdg_data, 4),
        (&env_data, 5),
        (&flag_data, 6),
    ] {
        write_tiny_mnist(folder, 10, n)?;
    }
    assert!(export(&[], &out, &home, None)?.contains("3 examples"));
    assert!(export(&[], &out, &home, Some(&xdg))?.contains("4 examples"));
    let with_env = rampart_command(&export_args("mnist", "test", s(&out), &[]), "warn")
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", &xdg)
        .env("RAMPART_DATA_DIR", &env_data)
        .output()?;
    assert!(
        text(&with_env).contains("5 examples"),
        "{}",
        text(&with_env)
    );
    assert!(
        export(&["--data-dir", s(&flag_data)], &out, &home, Some(&xdg))?.contains("6 examples")
    );

    // Training without any data flag uses the cache folder and records it.
    let run = dir.path().join("run");
    let args = tiny_train_args("1", &["--dataset", "mnist"], &run);
    let train = rampart_in(&args, &home, Some(&xdg))?;
    assert!(train.status.success(), "{}", text(&train));
    let config = read_json(&run.join("config.json"))?;
    assert_eq!(config["data_dir"], s(&xdg_data));
    Ok(())
}

#[cfg(not(feature = "download"))]
#[test]
fn download_without_the_feature_says_what_to_place_where() -> TestResult {
    let dir = tempfile::tempdir()?;
    for kind in DatasetKind::ALL {
        let target = dir.path().join(kind.to_string());
        let run = rampart_in(
            &["data", "download", &kind.to_string(), "--dir", s(&target)],
            dir.path(),
            None,
        )?;
        assert!(!run.status.success(), "{kind}");
        let msg = text(&run);
        for file in kind.official_files() {
            for needle in [
                target.join(file.name).display().to_string(),
                file.url.to_string(),
                file.checksum.hex().to_string(),
            ] {
                assert!(msg.contains(&needle), "{kind}: lacks {needle}: {msg}");
            }
        }
        assert!(msg.contains("--features download"), "{msg}");
    }
    // Without --dir: the per-user cache folder.
    let run = rampart_in(&["data", "download", "svhn"], dir.path(), None)?;
    let cache = dir.path().join(".cache/rampart/data/test_32x32.mat");
    assert!(
        text(&run).contains(&cache.display().to_string()),
        "{}",
        text(&run)
    );
    Ok(())
}

/// A parsed `.npy`: dtype descriptor, shape, and the data bytes.
type Npy<'a> = (String, Vec<usize>, &'a [u8]);

/// Parses a version-1.0 `.npy` of a C-order array.
fn parse_npy(bytes: &[u8]) -> Result<Npy<'_>, Box<dyn std::error::Error>> {
    if bytes.get(..8) != Some(b"\x93NUMPY\x01\x00".as_slice()) {
        return Err("not a version-1.0 .npy".into());
    }
    let len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let header = std::str::from_utf8(&bytes[10..10 + len])?;
    assert_eq!((10 + len) % 64, 0, "data start at a multiple of 64");
    assert!(
        header.contains("'fortran_order': False") && header.ends_with('\n'),
        "{header}"
    );
    let field = |key: &str| -> Result<&str, Box<dyn std::error::Error>> {
        let start = header.find(key).ok_or("key missing")? + key.len();
        let rest = &header[start..];
        let end = rest.find(['\'', ')']).ok_or("unterminated")?;
        Ok(&rest[..end])
    };
    let descr = field("'descr': '")?.to_string();
    let shape = field("'shape': (")?
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<usize>, _>>()?;
    Ok((descr, shape, &bytes[10 + len..]))
}

/// The exported pixels and labels are the loader's, in its order, in both formats.
#[test]
fn export_writes_the_loaders_pixels_and_labels() -> TestResult {
    let dir = tempfile::tempdir()?;
    for (kind, write) in [
        (
            DatasetKind::Mnist,
            write_tiny_mnist as fn(&Path, usize, usize) -> std::io::Result<()>,
        ),
        (DatasetKind::Svhn, write_tiny_svhn),
    ] {
        let data = dir.path().join(kind.to_string());
        write(&data, 12, 7)?;
        let splits = rampart_data::load(kind, &data)?;
        for (split, expected) in [("train", &splits.train), ("test", &splits.test)] {
            let (c, h, w) = expected.shape();
            let dims = vec![expected.len(), c, h, w];
            let labels: Vec<i64> = expected.labels().iter().map(|&l| i64::from(l)).collect();
            assert!(labels.contains(&0), "SVHN's label 10 is read as 0");

            let st = dir.path().join(format!("{kind}-{split}.safetensors"));
            let npz = dir.path().join(format!("{kind}-{split}.npz"));
            let name = kind.to_string();
            for out in [&st, &npz] {
                let args = export_args(&name, split, s(out), &["--data-dir", s(&data)]);
                let run = rampart_in(&args, dir.path(), None)?;
                assert!(run.status.success(), "{}", text(&run));
            }

            let bytes = std::fs::read(&st)?;
            let file = safetensors::SafeTensors::deserialize(&bytes)?;
            let images = file.tensor("images")?;
            assert_eq!(images.dtype(), safetensors::Dtype::U8);
            assert_eq!(images.shape(), dims.as_slice());
            assert_eq!(images.data(), expected.images());
            let l = file.tensor("labels")?;
            assert_eq!(
                (l.dtype(), l.shape()),
                (safetensors::Dtype::I64, [expected.len()].as_slice())
            );
            let read: Vec<i64> = l
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
                .collect();
            assert_eq!(read, labels);
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
            let meta = meta.metadata().clone().unwrap_or_default();
            assert_eq!(
                meta.get("dataset").map(String::as_str),
                Some(kind.to_string().as_str())
            );
            assert_eq!(meta.get("split").map(String::as_str), Some(split));

            let mut zip = zip::ZipArchive::new(std::fs::File::open(&npz)?)?;
            let mut member = |name: &str| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
                let mut v = Vec::new();
                zip.by_name(name)?.read_to_end(&mut v)?;
                Ok(v)
            };
            let (img_bytes, label_bytes) = (member("images.npy")?, member("labels.npy")?);
            let (descr, shape, pixels) = parse_npy(&img_bytes)?;
            assert_eq!(
                (descr.as_str(), shape, pixels),
                ("|u1", dims.clone(), expected.images())
            );
            let (descr, shape, raw) = parse_npy(&label_bytes)?;
            assert_eq!((descr.as_str(), shape), ("<i8", vec![expected.len()]));
            let read: Vec<i64> = raw
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
                .collect();
            assert_eq!(read, labels);
        }
    }
    let mnist = dir.path().join("mnist");
    let args = export_args("mnist", "test", "x.csv", &["--data-dir", s(&mnist)]);
    let bad = rampart_in(&args, dir.path(), None)?;
    assert!(
        !bad.status.success() && text(&bad).contains(".safetensors or .npz"),
        "{}",
        text(&bad)
    );
    Ok(())
}
