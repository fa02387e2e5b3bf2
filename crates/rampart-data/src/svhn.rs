//! Reader for SVHN's cropped-digit files, `train_32x32.mat` and `test_32x32.mat`.
//!
//! Each is a level-5 MAT-file (read by [`crate::mat`]) with two variables: `X`, uint8
//! 32×32×3×N, and `y`, N×1 labels 1–10 where 10 stands for the digit 0. MATLAB stores
//! arrays column-major, so pixel X(r, c, ch, n) (row r, column c, channel ch of image n,
//! zero-based) is byte r + 32·c + 1024·ch + 3072·n; it becomes byte
//! 3072·n + 1024·ch + 32·r + c of the crate's C×H×W layout, which is what torchvision's
//! `np.transpose(X, (3, 2, 0, 1))` gives. Label 10 becomes 0, as torchvision maps it
//! (`labels % 10`), so class k is the digit k. Examples keep the order of the file.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::dataset::{ImageDataset, Splits};
use crate::error::{DataError, Result};
use crate::kind::DatasetKind;
use crate::load::absent_note;
use crate::mat::{self, read_mat, MatArray};

/// Channels, height and width of every SVHN image.
pub const SVHN_SHAPE: (usize, usize, usize) = (3, 32, 32);
const PIXELS: usize = 3 * 32 * 32;

/// The split files: (train, test).
const FILES: [&str; 2] = ["train_32x32.mat", "test_32x32.mat"];

/// Loads both SVHN splits from `dir/train_32x32.mat` and `dir/test_32x32.mat`, or from
/// the same names under `dir/svhn/` (the first folder holding either file).
///
/// Neither file in either folder, or one of the two missing, gives
/// [`DataError::Missing`] naming the file to place and where to download it.
pub fn load_svhn(dir: &Path) -> Result<Splits> {
    let folder = [dir.to_path_buf(), dir.join("svhn")]
        .into_iter()
        .find(|f| FILES.iter().any(|name| f.join(name).is_file()));
    let Some(folder) = folder else {
        return Err(DataError::Missing {
            path: dir.to_path_buf(),
            help: missing_help(dir),
        });
    };
    let file = |name: &str| -> Result<PathBuf> {
        let path = folder.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(DataError::Missing {
                help: format!(
                    "{} holds the other SVHN file but not {name}: fetch {} and place it there",
                    folder.display(),
                    official(name)
                ),
                path,
            })
        }
    };
    let (train, test) = (file(FILES[0])?, file(FILES[1])?);
    let splits = Splits {
        train: load_svhn_mat(&train)?,
        test: load_svhn_mat(&test)?,
    };
    tracing::info!(
        source = %folder.display(),
        train = splits.train.len(),
        test = splits.test.len(),
        "loaded SVHN .mat files"
    );
    Ok(splits)
}

/// Loads one SVHN `.mat` file (`X`: uint8 32×32×3×N, `y`: N labels 1–10) as images of
/// shape (3, 32, 32) with labels 0–9 (10 read as 0), classes `"0"` … `"9"`.
///
/// A file that is not a level-5 MAT-file, is truncated, lacks `X` or `y`, or has wrong
/// dimensions, labels outside 1–10 or a label count different from N gives an error
/// naming the file.
pub fn load_svhn_mat(path: &Path) -> Result<ImageDataset> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_svhn_mat(&bytes, path)
}

/// Decodes the contents of an SVHN `.mat` file held in memory, as [`load_svhn_mat`]
/// reads it; `file` only names the source in errors.
pub fn decode_svhn_mat(bytes: &[u8], file: &Path) -> Result<ImageDataset> {
    let malformed = |problem: String| DataError::Malformed {
        file: file.to_path_buf(),
        format: mat::FORMAT,
        problem,
    };
    let mut contents = read_mat(bytes, file, &["X", "y"])?;
    let (x, y) = (contents.take("X"), contents.take("y"));
    let has_x = x.is_some();
    let (Some(x), Some(y)) = (x, y) else {
        let (var, what) = if has_x {
            ("y", "the labels")
        } else {
            ("X", "the images")
        };
        return Err(malformed(format!(
            "no numeric variable `{var}` ({what}); the file holds [{}], so it is not an SVHN file",
            contents.names.join(", ")
        )));
    };
    let n = match x.dims.as_slice() {
        [32, 32, 3, n] => *n,
        // MATLAB drops a trailing singleton dimension: one image is 32×32×3.
        [32, 32, 3] => 1,
        dims => {
            return Err(malformed(format!(
                "`X` has dimensions {dims:?}, expected [32, 32, 3, N] (32×32 RGB images)"
            )))
        }
    };
    if n == 0 {
        return Err(malformed("`X` holds no images (N = 0)".into()));
    }
    let n_labels = match y.dims.as_slice() {
        [m, 1] | [1, m] => *m,
        dims => {
            return Err(malformed(format!(
                "`y` has dimensions {dims:?}, expected [N, 1]"
            )))
        }
    };
    if n_labels != n {
        return Err(DataError::CountMismatch {
            images_file: file.to_path_buf(),
            images: n,
            labels_file: file.to_path_buf(),
            labels: n_labels,
        });
    }
    let labels = read_labels(&y, n, &malformed)?;
    let images = transpose_images(&x, n, &malformed)?;
    let names = DatasetKind::Svhn
        .class_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    ImageDataset::new(images, labels, SVHN_SHAPE, names)
}

/// `y` as labels 0–9: 1–9 kept, 10 read as 0, anything else refused.
fn read_labels(
    y: &MatArray,
    n: usize,
    malformed: &dyn Fn(String) -> DataError,
) -> Result<Vec<u32>> {
    (0..n)
        .map(|i| {
            let v = y.value(i).unwrap_or(f64::NAN);
            if v.fract() == 0.0 && (1.0..=10.0).contains(&v) {
                Ok(v as u32 % 10)
            } else {
                Err(malformed(format!(
                    "`y` element {} is {v}; SVHN labels are whole numbers 1 to 10 (10 stands for the digit 0)",
                    i + 1
                )))
            }
        })
        .collect()
}

/// `X` (column-major 32×32×3×N) as N images C×H×W.
fn transpose_images(
    x: &MatArray,
    n: usize,
    malformed: &dyn Fn(String) -> DataError,
) -> Result<Vec<u8>> {
    let converted;
    let source: &[u8] = match x.as_u8() {
        Some(bytes) => bytes,
        None => {
            converted = (0..n * PIXELS)
                .map(|i| match x.value(i) {
                    Some(v) if v.fract() == 0.0 && (0.0..=255.0).contains(&v) => Ok(v as u8),
                    v => Err(malformed(format!(
                        "`X` ({}) element {} is {v:?}, not a byte value 0-255",
                        x.class,
                        i + 1
                    ))),
                })
                .collect::<Result<Vec<u8>>>()?;
            &converted
        }
    };
    let mut images = vec![0u8; n * PIXELS];
    images
        .par_chunks_mut(PIXELS)
        .zip(source.par_chunks(PIXELS))
        .for_each(|(out, src)| {
            // Within one image, channel plane ch: src[r + 32c] -> out[32r + c].
            for (out_plane, src_plane) in out.chunks_exact_mut(1024).zip(src.chunks_exact(1024)) {
                for (c, column) in src_plane.chunks_exact(32).enumerate() {
                    for (r, &v) in column.iter().enumerate() {
                        out_plane[32 * r + c] = v;
                    }
                }
            }
        });
    Ok(images)
}

/// Where to fetch `name` and its digest.
fn official(name: &str) -> String {
    DatasetKind::Svhn.official_source(|f| f == name)
}

/// What to place where when no SVHN file was found under `dir`.
pub(crate) fn missing_help(dir: &Path) -> String {
    let (d, exists) = (dir.display(), absent_note(dir));
    let files = DatasetKind::Svhn.placement_lines(dir);
    format!(
        "no SVHN data found{exists}. Place the two cropped-digit MAT-files in {d} (or in \
         {d}/svhn), or pass --data-dir with the folder that holds them:{files}\n\
         With network access, rampart_data::download(DatasetKind::Svhn, dir) fetches and verifies them."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        assert_matches, assert_mentions, error_text, mat_v5, svhn_mat, svhn_pixel, MatEndian,
        MatValues, MatVar, TestResult,
    };
    use rand::{Rng, SeedableRng};

    fn decode(bytes: &[u8]) -> Result<ImageDataset> {
        decode_svhn_mat(bytes, Path::new("train_32x32.mat"))
    }

    fn message(bytes: &[u8]) -> String {
        error_text(decode(bytes).err())
    }

    /// Expected C×H×W bytes of image `n`: pixel (ch, r, c) is svhn_pixel(r, c, ch, n).
    fn expected_image(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for ch in 0..3 {
            for r in 0..32 {
                for c in 0..32 {
                    v.push(svhn_pixel(r, c, ch, n));
                }
            }
        }
        v
    }

    #[test]
    fn transposes_pixels_and_maps_label_10_to_0() -> TestResult {
        for endian in [MatEndian::Little, MatEndian::Big] {
            for compressed in [false, true] {
                for labels_as_u8 in [false, true] {
                    let bytes = svhn_mat(&[10, 3, 1], endian, compressed, labels_as_u8)?;
                    let ds = decode(&bytes)?;
                    assert_eq!(ds.len(), 3);
                    assert_eq!(ds.shape(), (3, 32, 32));
                    assert_eq!(ds.labels(), &[0, 3, 1]);
                    assert_eq!(ds.class_names()[0], "0");
                    for n in 0..3 {
                        assert_eq!(ds.image(n), expected_image(n).as_slice(), "image {n}");
                    }
                }
            }
        }
        // Spot check against hand-computed offsets: X(r=1, c=2, ch=0, n=0) is byte
        // 1 + 32·2 = 65 of the file's array and byte 32·1 + 2 = 34 of image 0.
        let ds = decode(&svhn_mat(&[5], MatEndian::Little, false, false)?)?;
        assert_eq!(ds.image(0)[34], svhn_pixel(1, 2, 0, 0));
        assert_ne!(svhn_pixel(1, 2, 0, 0), svhn_pixel(2, 1, 0, 0));
        Ok(())
    }

    #[test]
    fn loads_from_a_data_folder_and_says_what_is_missing() -> TestResult {
        let dir = tempfile::tempdir()?;
        assert_mentions(
            &error_text(load_svhn(dir.path()).err()),
            &[
                "no SVHN data found",
                "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                "e26dedcc434d2e4c54c9b2d4a06d8373",
                "eb5a983be6a315427106f1b164d9cef3",
                "--data-dir",
            ],
        );
        let sub = dir.path().join("svhn");
        std::fs::create_dir_all(&sub)?;
        std::fs::write(
            sub.join("train_32x32.mat"),
            svhn_mat(&[1, 2], MatEndian::Little, true, false)?,
        )?;
        let err = load_svhn(dir.path()).err();
        assert_matches!(
            &err,
            Some(DataError::Missing { path, .. }) if *path == sub.join("test_32x32.mat")
        );
        std::fs::write(
            sub.join("test_32x32.mat"),
            svhn_mat(&[10], MatEndian::Little, false, false)?,
        )?;
        let s = crate::load(DatasetKind::Svhn, dir.path())?;
        assert_eq!((s.train.labels(), s.test.labels()), (&[1, 2][..], &[0][..]));
        Ok(())
    }

    #[test]
    fn malformed_files_get_clear_errors() -> TestResult {
        let good = svhn_mat(&[1, 2], MatEndian::Little, false, false)?;
        decode(&good)?;

        assert_mentions(
            &message(&good[..good.len() - 10]),
            &["train_32x32.mat", "truncated"],
        );

        // A huge byte count in the first element's tag: refused by length, not allocated.
        let mut huge = good.clone();
        huge[132..136].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(&huge).err();
        assert_matches!(
            &err,
            Some(DataError::Truncated { needed, .. }) if *needed == u64::from(u32::MAX)
        );
        // The same inside a compressed element.
        let mut huge_z = svhn_mat(&[1, 2], MatEndian::Little, true, false)?;
        huge_z[132..136].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge_z).is_err());

        let x_only = plain_mat(&[x_var(2)])?;
        assert_mentions(&message(&x_only), &["no numeric variable `y`", "[X]"]);
        let y_only = plain_mat(&[y_var(&[1.0])])?;
        assert!(message(&y_only).contains("no numeric variable `X`"));

        let err = decode(&plain_mat(&[x_var(2), y_var(&[1.0, 2.0, 3.0])])?).err();
        assert_matches!(
            &err,
            Some(DataError::CountMismatch {
                images: 2,
                labels: 3,
                ..
            })
        );

        for bad in [0.0, 11.0, 2.5, -1.0] {
            let msg = message(&plain_mat(&[x_var(2), y_var(&[1.0, bad])])?);
            assert_mentions(&msg, &["`y` element 2", "1 to 10"]);
        }

        let wrong_dims = MatVar::new(
            "X",
            9,
            vec![28, 28, 3, 1],
            MatValues::U8(vec![0; 28 * 28 * 3]),
        );
        let msg = message(&plain_mat(&[wrong_dims, y_var(&[1.0])])?);
        assert!(msg.contains("[28, 28, 3, 1]"), "{msg}");

        // Dimensions that disagree with the data length.
        let short = MatVar::new("X", 9, vec![32, 32, 3, 2], MatValues::U8(vec![0; 3072]));
        let msg = message(&plain_mat(&[short, y_var(&[1.0, 2.0])])?);
        assert_mentions(&msg, &["need 6144 bytes", "`X`"]);

        // A uint8-valued X saved as double is accepted; a fractional one is not.
        let x_double = MatVar::new("X", 6, vec![32, 32, 3], MatValues::F64(vec![4.0; 3072]));
        assert_eq!(
            decode(&mat_v5(&[x_double, y_var(&[7.0])], MatEndian::Big, true)?)?.image(0)[5],
            4
        );
        let x_frac = MatVar::new("X", 6, vec![32, 32, 3], MatValues::F64(vec![0.5; 3072]));
        assert!(message(&plain_mat(&[x_frac, y_var(&[7.0])])?).contains("not a byte value"));
        Ok(())
    }

    /// A little-endian, uncompressed MAT-file of `vars`.
    fn plain_mat(vars: &[MatVar]) -> std::io::Result<Vec<u8>> {
        mat_v5(vars, MatEndian::Little, false)
    }

    fn x_var(n: usize) -> MatVar {
        MatVar::new(
            "X",
            9,
            vec![32, 32, 3, n as u32],
            MatValues::U8(vec![1; n * 3072]),
        )
    }

    fn y_var(labels: &[f64]) -> MatVar {
        MatVar::new(
            "y",
            6,
            vec![labels.len() as u32, 1],
            MatValues::F64(labels.to_vec()),
        )
    }

    /// Fuzz-style: truncations, byte flips and random bytes derived from valid files
    /// (plain and compressed, both byte orders) give `Ok` or `Err`, never a panic.
    #[test]
    fn random_corruptions_never_panic() -> TestResult {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        let bases = [
            svhn_mat(&[1, 10], MatEndian::Little, false, false)?,
            svhn_mat(&[1, 10], MatEndian::Big, false, true)?,
            svhn_mat(&[1, 10], MatEndian::Little, true, false)?,
            svhn_mat(&[1, 10], MatEndian::Big, true, true)?,
        ];
        let (mut ok, mut err) = (0, 0);
        for round in 0..400 {
            let mut b = bases[round % bases.len()].clone();
            match rng.gen_range(0..4) {
                0 => {
                    let n = rng.gen_range(0..=b.len());
                    b.truncate(n);
                }
                1 => {
                    for _ in 0..rng.gen_range(1..4) {
                        let at = rng.gen_range(0..b.len());
                        b[at] = rng.gen();
                    }
                }
                2 => {
                    // Corrupt the header or the first element tags, where lengths live.
                    let at = rng.gen_range(120..b.len().min(240));
                    b[at] = rng.gen();
                }
                _ => {
                    let n = rng.gen_range(0..300);
                    let mut random: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                    if n >= 128 && rng.gen_bool(0.5) {
                        random[124..128].copy_from_slice(&[0, 1, b'I', b'M']);
                    }
                    b = random;
                }
            }
            match decode(&b) {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
        }
        assert!(err > 100, "{ok} ok, {err} errors");
        Ok(())
    }
}
