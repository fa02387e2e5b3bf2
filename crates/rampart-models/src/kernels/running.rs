//! Every running statistic of a fused train pass updated at once: on a GPU one
//! launch of `bn_running_multi` (`ops.cu`) where each statistic took one
//! (`bn_running`, two per BatchNorm, and four tensor operations for a student's
//! running noise scale); on the CPU a [`RunningUpdate`] per statistic, its twin.
//!
//! The statistics come from the pass's one output (the logits, then each
//! BatchNorm's saved statistics): the kernel takes that buffer's address as an
//! argument and a table of [`SLOTS`] values per statistic (the running tensor's
//! address, where its batch values start in the output, C, keep, take and −ε as f32
//! bits, whether it is a variance), one block each. None of it changes from step to
//! step (the running tensors are updated in place, the output's layout is the
//! batch size's), so the table is copied to the GPU once per batch size and launched
//! on again, also inside a captured CUDA graph.

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};

use super::common::f32_slice;
use super::pointwise::{RunningUpdate, Stat};

/// Values of the table per statistic.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) const SLOTS: usize = 7;
/// Threads per block of `bn_running_multi`.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) const THREADS: u32 = 256;

/// One running statistic of a pass: `run` (an f32 tensor of C values, updated in
/// place) from the C batch values at `at` of the pass's output, as `update` says
/// (for [`Stat::Var`] the values are 1/√(var + ε)).
#[derive(Clone, Debug)]
pub(crate) struct RunningEntry {
    pub run: Tensor,
    pub at: usize,
    pub update: RunningUpdate,
}

/// The table of `entries` (each running tensor's address, slot 0, left 0 for the
/// launch to fill).
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn table(entries: &[RunningEntry]) -> Vec<u64> {
    let mut t = Vec::with_capacity(SLOTS * entries.len());
    for e in entries {
        let u = &e.update;
        t.extend([
            0,
            e.at as u64,
            e.run.elem_count() as u64,
            u64::from(u.keep.to_bits()),
            u64::from(u.take.to_bits()),
            u64::from(u.neg_eps.to_bits()),
            u64::from(u.stat == Stat::Var),
        ]);
    }
    t
}

/// [`RunningUpdate`] from exactly the statistic's C batch values.
struct FromValues(RunningUpdate);

impl InplaceOp2 for FromValues {
    fn name(&self) -> &'static str {
        "batch-norm-running-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        self.0
            .cpu_update(s1, l1, f32_slice(s2, l2, self.name())?, false)
    }
}

/// Applies every entry's update from `out`, the pass's output: one launch on a GPU
/// (built with `cuda`), one [`RunningUpdate`] each on the CPU.
pub(crate) fn update_all(out: &Tensor, entries: &[RunningEntry]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if out.device().is_cuda() {
        return cuda::update_all(out, entries);
    }
    for e in entries {
        let c = e.run.elem_count();
        e.run.inplace_op2(
            &out.narrow(0, e.at, c)?.contiguous()?,
            &FromValues(e.update),
        )?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
    };
    use candle_core::{Result, Storage, Tensor};

    use super::super::cuda::{contiguous, launch_error};
    use super::super::pointwise::OPS;
    use super::{table, RunningEntry, SLOTS, THREADS};

    /// Tables copied to the GPU (a few: one per batch size and model in use).
    static TABLES: Mutex<Vec<(Vec<u64>, CudaSlice<u64>)>> = Mutex::new(Vec::new());
    const KEPT: usize = 8;

    pub(super) fn update_all(out: &Tensor, entries: &[RunningEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let candle_core::Device::Cuda(dev) = out.device() else {
            candle_core::bail!("running statistics: the pass's output is not on the GPU")
        };
        let stream = dev.cuda_stream();
        let total = out.elem_count();
        // Read guards keep the output and every running tensor (and their addresses)
        // alive until the launch is queued; the kernel writes the running tensors in
        // place on the device's one stream, after every operation queued before it.
        let (out_s, out_l) = out.storage_and_layout();
        let Storage::Cuda(out_s) = &*out_s else {
            candle_core::bail!("running statistics: the pass's output is not on the GPU")
        };
        let o0 = contiguous(out_l, total, "running statistics: the pass's output")?;
        let guards: Vec<_> = entries.iter().map(|e| e.run.storage_and_layout()).collect();
        let mut t = table(entries);
        let mut syncs = Vec::with_capacity(guards.len() + 1);
        for (k, (e, (s, l))) in entries.iter().zip(&guards).enumerate() {
            let c = e.run.elem_count();
            if e.at + c > total {
                candle_core::bail!("running statistics: batch values past the pass's output")
            }
            let Storage::Cuda(s) = &**s else {
                candle_core::bail!("running statistics: a running tensor is not on the GPU")
            };
            let offset = contiguous(l, c, "running statistics: a running tensor")?;
            let (ptr, sync) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
            syncs.push(sync);
            t[SLOTS * k] = ptr + (offset * std::mem::size_of::<f32>()) as u64;
        }
        let stats = out_s.as_cuda_slice::<f32>()?.slice(o0..o0 + total);
        let mut tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
        let i = match tables.iter().position(|(last, _)| *last == t) {
            Some(i) => i,
            None => {
                if tables.len() == KEPT {
                    tables.remove(0);
                }
                let copied = dev.clone_htod(&t)?;
                tables.push((t, copied));
                tables.len() - 1
            }
        };
        let meta = &tables[i].1;
        let func = OPS.func(dev, "bn_running_multi")?;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(entries.len()).map_err(candle_core::Error::wrap)?,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&stats).arg(meta);
        // SAFETY: the table holds seven values per statistic as the kernel reads them
        // and is this call's (copied now or equal to a kept copy); each running
        // address is that of a live, contiguous f32 run of C values and each batch
        // run of C values lies within the output (both checked above); block k
        // writes statistic k only, and no two statistics share a running tensor.
        unsafe { builder.launch(cfg) }.map_err(|e| launch_error("running statistics", e))?;
        drop(tables);
        drop(syncs);
        drop(guards);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::emulate::{bits, Arg, Emulator};
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// `bn_running_multi`, run on the CPU with the launch's table, updates a mean, a
    /// variance (from 1/√(var + ε)) and a noise scale of 5, 300 and 7 channels from
    /// their places in one output, bit for bit as [`update_all`]'s CPU twins do, which
    /// are the per-statistic [`RunningUpdate`]'s own arithmetic.
    #[test]
    fn the_multi_update_kernel_equals_its_twins() -> TestResult {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let out: Vec<f32> = (0..700).map(|_| rng.gen_range(0.2f32..2.0)).collect();
        let dev = Device::Cpu;
        let specs = [
            (5usize, 11usize, Stat::Mean, 0.9f32, 0.1f32, -1e-5f32),
            (300, 100, Stat::Var, 0.9, 0.100_02, -1e-5),
            (7, 693, Stat::Mean, 0.9, 0.1, 0.0),
        ];
        let mut entries = Vec::new();
        let mut runs = Vec::new();
        for &(c, at, stat, keep, take, neg_eps) in &specs {
            let run: Vec<f32> = (0..c).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            runs.push(run.clone());
            entries.push(RunningEntry {
                run: Var::from_vec(run, c, &dev)?.as_tensor().clone(),
                at,
                update: RunningUpdate {
                    stat,
                    keep,
                    take,
                    neg_eps,
                },
            });
        }
        let out_t = Tensor::from_vec(out.clone(), out.len(), &dev)?;
        update_all(&out_t, &entries)?;
        // The twins are RunningUpdate's arithmetic: the variance's against
        // RunningUpdate itself, given its values as the second half of a saved 2C.
        let reference = Tensor::from_vec(runs[1].clone(), 300, &dev)?;
        reference.inplace_op2(
            &Tensor::cat(&[&out_t.narrow(0, 0, 300)?, &out_t.narrow(0, 100, 300)?], 0)?,
            &RunningUpdate {
                stat: Stat::Var,
                keep: 0.9,
                take: 0.100_02,
                neg_eps: -1e-5,
            },
        )?;
        assert_eq!(
            bits(&entries[1].run.to_vec1::<f32>()?),
            bits(&reference.to_vec1::<f32>()?)
        );

        let emu = Emulator::of(include_str!("ops.cu"));
        let mut s = emu.session();
        s.put("out", &out).put("meta", &table(&entries));
        for (k, run) in runs.iter().enumerate() {
            let name = format!("run{k}");
            s.put(&name, run);
            s.address("meta", SLOTS * k, &name);
        }
        s.launch(
            "bn_running_multi",
            [entries.len() as u32, 1, 1],
            [THREADS, 1, 1],
            &[Arg::B("out"), Arg::B("meta")],
        );
        let got = s.run();
        for (k, e) in entries.iter().enumerate() {
            assert_eq!(
                bits(&got.get::<f32>(&format!("run{k}"))),
                bits(&e.run.to_vec1::<f32>()?),
                "statistic {k}"
            );
        }
        Ok(())
    }
}
