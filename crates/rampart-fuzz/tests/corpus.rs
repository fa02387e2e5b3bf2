//! Every fuzz target over its committed seed corpus (`fuzz/corpus/NAME/`) and a fixed
//! number of seeded mutations of it: the targets stay alive without cargo-fuzz, and
//! every input the fuzzer once kept runs in every `cargo test`.

use std::path::{Path, PathBuf};

use rampart_fuzz::TARGETS;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mutated inputs per target (a fixed count, not a time budget).
const MUTATIONS: usize = 150;

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(name)
}

/// The files of `dir`, sorted by name.
fn files(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    paths.sort();
    paths.iter().map(std::fs::read).collect()
}

/// One of libFuzzer's simple mutations of `input`: flip a bit, set a byte, write an
/// extreme little- or big-endian integer, truncate, cut out or duplicate a slice.
fn mutate(input: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.gen_range(1..=3) {
        if out.is_empty() {
            out.push(rng.gen());
            continue;
        }
        let at = rng.gen_range(0..out.len());
        match rng.gen_range(0..6) {
            0 => out[at] ^= 1 << rng.gen_range(0..8),
            1 => out[at] = rng.gen(),
            2 => {
                let extremes = [u64::MAX, 0, 1 << 31, 1 << 62, u32::MAX as u64, 0x7fff_ffff];
                let v = extremes[rng.gen_range(0..extremes.len())];
                let bytes = if rng.gen() {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let width = [2, 4, 8][rng.gen_range(0..3)];
                for (i, b) in bytes.iter().take(width).enumerate() {
                    if let Some(slot) = out.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            3 => out.truncate(at),
            4 => {
                let end = (at + rng.gen_range(1..64)).min(out.len());
                out.drain(at..end);
            }
            _ => {
                let end = (at + rng.gen_range(1..64)).min(out.len());
                let copy = out[at..end].to_vec();
                let to = rng.gen_range(0..=out.len());
                out.splice(to..to, copy);
            }
        }
    }
    out
}

#[test]
fn every_target_holds_on_its_corpus_and_seeded_mutations() -> std::io::Result<()> {
    for (i, target) in TARGETS.iter().enumerate() {
        let seeds = files(&corpus_dir(target.name))?;
        assert!(
            seeds.len() >= 3,
            "{}: the corpus needs valid and broken seeds",
            target.name
        );
        for seed in &seeds {
            (target.run)(seed);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
        for _ in 0..MUTATIONS {
            let seed = &seeds[rng.gen_range(0..seeds.len())];
            (target.run)(&mutate(seed, &mut rng));
        }
        (target.run)(&[]);
    }
    Ok(())
}

#[test]
fn every_target_has_a_fuzz_binary() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))?;
    for target in &TARGETS {
        let source = std::fs::read_to_string(dir.join(format!("fuzz_targets/{}.rs", target.name)))?;
        assert!(
            source.contains(&format!("rampart_fuzz::{}(", target.name)),
            "fuzz_targets/{}.rs does not call its body",
            target.name
        );
        assert!(
            manifest.contains(&format!("name = \"{}\"", target.name)),
            "fuzz/Cargo.toml lacks [[bin]] {}",
            target.name
        );
    }
    Ok(())
}
