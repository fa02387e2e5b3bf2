//! The fused SGD kernels (`sgd.cu`) run on the CPU
//! (`rampart_models::kernels::emulate`) against the CPU kernels, bit for bit, with
//! the arguments in the order of `cuda.rs`'s launches: both per-parameter kernels for
//! every kind of step (momentum or none, Nesterov or heavy ball, decayed or not), and
//! the multi-tensor kernel on a table of three tensors, one shorter than a block and
//! two spanning several 4,096-element blocks (one of whole blocks), decayed and not,
//! laid out and launched by the code the CUDA launch uses (`multi.rs`), each block
//! finding its tensor in the table.

use candle_core::{Device, Tensor};
use rampart_models::kernels::emulate::{bits, Arg, Emulator};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::fused::{Factors, Kernel, Scalar, SgdUpdate};
use super::multi::{self, Slot, MULTI_THREADS};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The CPU kernel `kernel` on `dst` with sources `a` and `b`.
fn cpu(
    kernel: Kernel,
    f: Factors,
    dst: &[f32],
    a: &[f32],
    b: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let dev = Device::Cpu;
    let d = Tensor::new(dst, &dev)?;
    d.inplace_op3(
        &Tensor::new(a, &dev)?,
        &Tensor::new(b, &dev)?,
        &SgdUpdate(kernel, f),
    )?;
    d.to_vec1::<f32>()
}

fn values(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

#[test]
fn sgd_kernels_equal_the_cpu_kernels() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let emu = Emulator::of(include_str!("sgd.cu"));
    let mut s = emu.session();
    let n = 1300usize;
    let (w, g, b) = (
        values(&mut rng, n),
        values(&mut rng, n),
        values(&mut rng, n),
    );
    s.put("w", &w).put("g", &g).put("b", &b);
    let mut expected = Vec::new();
    let mut case = 0;
    for mu in [0.0f32, 0.9] {
        for decay in [None, Some(5e-4f32)] {
            for nesterov in [false, true] {
                let f = Factors {
                    mu,
                    decay,
                    nesterov,
                    lr: 0.05,
                };
                let (bn, wn) = (format!("b{case}"), format!("w{case}"));
                s.put(&bn, &b).put(&wn, &w);
                for (kernel, dst, sources) in [
                    (Kernel::Momentum, &bn, ["g", "w"]),
                    (Kernel::Weight, &wn, ["g", "b"]),
                ] {
                    let mut args = vec![Arg::B(dst), Arg::B(sources[0]), Arg::B(sources[1])];
                    args.extend(kernel.scalars(&f, n as u32).into_iter().map(|s| match s {
                        Scalar::F32(x) => Arg::F32(x),
                        Scalar::I32(x) => Arg::I32(x),
                        Scalar::U32(x) => Arg::U32(x),
                    }));
                    s.launch_n(kernel.name(), n, 1024, &args);
                }
                expected.push((bn, cpu(Kernel::Momentum, f, &b, &g, &w)?));
                expected.push((wn, cpu(Kernel::Weight, f, &w, &g, &b)?));
                case += 1;
            }
        }
    }

    // The multi-tensor kernel, launched as `launch_multi` launches it: its table and
    // grid from `multi::plan`, its scalars from `multi::scalars`, the addresses of the
    // table's address slots written by the emulator.
    let sizes = [7usize, 5000, 8192, 9000];
    let decayed = [true, false, false, true];
    let (mu, wd, lr) = (0.9f32, 5e-4f32, 0.05f32);
    for nesterov in [false, true] {
        let mut names = Vec::new();
        for (t, (&len, &dec)) in sizes.iter().zip(&decayed).enumerate() {
            let tag = format!("m{}_{t}", u8::from(nesterov));
            let (mw, mg, mb) = (
                values(&mut rng, len),
                values(&mut rng, len),
                values(&mut rng, len),
            );
            let f = Factors {
                mu,
                decay: dec.then_some(wd),
                nesterov,
                lr,
            };
            let b_new = cpu(Kernel::Momentum, f, &mb, &mg, &mw)?;
            let w_new = cpu(Kernel::Weight, f, &mw, &mg, &b_new)?;
            let names_t = ["w", "g", "b"].map(|p| format!("{tag}_{p}"));
            s.put(&names_t[0], &mw)
                .put(&names_t[1], &mg)
                .put(&names_t[2], &mb);
            expected.push((names_t[0].clone(), w_new));
            expected.push((names_t[2].clone(), b_new));
            names.push(names_t);
        }
        let params: Vec<(usize, bool)> = sizes.iter().copied().zip(decayed).collect();
        let plan = multi::plan(&params);
        let table: Vec<u64> = plan
            .table
            .iter()
            .map(|slot| match *slot {
                Slot::Address { .. } => 0,
                Slot::Value(v) => v,
            })
            .collect();
        let meta = format!("meta{}", u8::from(nesterov));
        s.put(&meta, &table);
        for (index, slot) in plan.table.iter().enumerate() {
            if let Slot::Address { param, operand } = *slot {
                s.address(&meta, index, &names[param][operand]);
            }
        }
        let (tensors, mu, wd, nest, lr, chunk) =
            multi::scalars(sizes.len() as u32, mu, wd, nesterov, lr);
        s.launch(
            "sgd_multi",
            [plan.blocks as u32, 1, 1],
            [MULTI_THREADS, 1, 1],
            &[
                Arg::B(&meta),
                Arg::U32(tensors),
                Arg::F32(mu),
                Arg::F32(wd),
                Arg::I32(nest),
                Arg::F32(lr),
                Arg::U32(chunk),
            ],
        );
    }
    let out = s.run();
    for (name, want) in &expected {
        assert_eq!(bits(&out.get::<f32>(name)), bits(want), "{name}");
    }
    Ok(())
}
