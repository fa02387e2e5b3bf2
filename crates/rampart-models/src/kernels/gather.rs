//! A model's parameters copied into its one buffer of them (`crate::flat`) by one
//! in-place op: on a GPU one launch of `gather_params` (`ops.cu`) for every
//! parameter, where a copy each cost one; on the CPU its twin, a copy per parameter.
//!
//! The launch's table holds [`SLOTS`] values per parameter (its device address, its
//! length, its place in the buffer, its first block), [`CHUNK`] elements per block,
//! each block finding its parameter by bisection, as `sgd_multi` does. The addresses
//! of a model's parameters do not move (they are updated in place), so the table is
//! copied to the GPU once and launched on again while it is the same.

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Storage, Tensor};

/// Elements per block of `gather_params`, and its threads per block.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) const CHUNK: usize = 4096;
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) const THREADS: u32 = 256;
/// Values of the table per parameter.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) const SLOTS: usize = 4;

/// The table of a gather of tensors of `lens` elements placed one after the other,
/// each one's address (slot 0) left 0 for the launch to fill, and the blocks of the
/// launch: tensor p's blocks are `first_p … first_p + ⌈n_p / CHUNK⌉ − 1`.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn plan(lens: &[usize]) -> (Vec<u64>, usize) {
    let mut table = Vec::with_capacity(SLOTS * lens.len());
    let (mut blocks, mut at) = (0usize, 0usize);
    for &n in lens {
        table.extend([0, n as u64, at as u64, blocks as u64]);
        blocks += n.div_ceil(CHUNK);
        at += n;
    }
    (table, blocks)
}

/// The table's copy on the GPU, with the values it was copied from.
#[cfg(feature = "cuda")]
pub(crate) type TableCache = Option<(
    Vec<u64>,
    candle_core::cuda_backend::cudarc::driver::CudaSlice<u64>,
)>;

/// Copies each parameter (contiguous f32) into the buffer it is applied to, at its
/// place.
pub(crate) struct Gather<'a> {
    pub params: &'a [(Tensor, usize)],
    #[cfg(feature = "cuda")]
    pub table: &'a std::sync::Mutex<TableCache>,
}

impl InplaceOp1 for Gather<'_> {
    fn name(&self) -> &'static str {
        "gather-params"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("parameter buffer: not f32")
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("parameter buffer: not contiguous")
        };
        let dst = &mut v[a..b];
        for (p, at) in self.params {
            let n = p.elem_count();
            let (s, l) = p.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(src)), Some((pa, pb))) =
                (&*s, l.contiguous_offsets())
            else {
                candle_core::bail!("parameter buffer: a parameter is not contiguous f32 on the CPU")
            };
            if pb - pa != n || at + n > dst.len() {
                candle_core::bail!("parameter buffer: a parameter does not fit its place")
            }
            dst[*at..at + n].copy_from_slice(&src[pa..pb]);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        cuda::gather(self, storage, layout)
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, Layout, Result, Storage};

    use super::super::cuda::{contiguous, launch_error};
    use super::super::pointwise::OPS;
    use super::{plan, Gather, CHUNK, SLOTS, THREADS};

    /// One launch of `gather_params` on `dst` (see the module's documentation).
    pub(super) fn gather(g: &Gather<'_>, dst: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let total = layout.shape().elem_count();
        let d0 = contiguous(layout, total, "parameter buffer")?;
        let dev = dst.device.clone();
        let stream = dev.cuda_stream();
        // The read guards keep every parameter's buffer (and its address) alive until
        // the launch is queued, after every operation queued before it.
        let guards: Vec<_> = g
            .params
            .iter()
            .map(|(p, _)| p.storage_and_layout())
            .collect();
        let lens: Vec<usize> = g.params.iter().map(|(p, _)| p.elem_count()).collect();
        let (mut table, blocks) = plan(&lens);
        let mut syncs = Vec::with_capacity(guards.len());
        for (k, ((p, at), (s, l))) in g.params.iter().zip(&guards).enumerate() {
            let n = p.elem_count();
            let Storage::Cuda(s) = &**s else {
                candle_core::bail!("parameter buffer: a parameter is not on the GPU")
            };
            if table[SLOTS * k + 2] != *at as u64 || at + n > total {
                candle_core::bail!("parameter buffer: a parameter does not fit its place")
            }
            let offset = contiguous(l, n, "parameter buffer: a parameter")?;
            let (ptr, sync) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
            syncs.push(sync);
            table[SLOTS * k] = ptr + (offset * std::mem::size_of::<f32>()) as u64;
        }
        if blocks == 0 {
            return Ok(());
        }
        let mut cache = g.table.lock().unwrap_or_else(|p| p.into_inner());
        if cache.as_ref().is_none_or(|(last, _)| *last != table) {
            let copied = dev.clone_htod(&table)?;
            *cache = Some((table, copied));
        }
        let Some((_, meta)) = cache.as_ref() else {
            candle_core::bail!("parameter buffer: the table was not copied")
        };
        let func = OPS.func(&dev, "gather_params")?;
        let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d0 + total);
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(blocks).map_err(candle_core::Error::wrap)?,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let tensors = u32::try_from(g.params.len()).map_err(candle_core::Error::wrap)?;
        let chunk = CHUNK as u32;
        let mut builder = func.builder();
        builder.arg(&mut out).arg(meta).arg(&tensors).arg(&chunk);
        // SAFETY: the table holds four values per parameter as the kernel reads them
        // and is this call's (copied now or equal to the cached copy); each address is
        // that of a live, contiguous f32 run of n values, and n values from its offset
        // fit the destination run of `total` values (both checked above); block k
        // writes its parameter's chunk only.
        unsafe { builder.launch(cfg) }.map_err(|e| launch_error("parameter buffer", e))?;
        drop(cache);
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

    /// `gather_params`, run on the CPU with the table and grid of the GPU's launch
    /// (`plan`), copies tensors of 7, 0 (first, between and last), 4,096 (whole
    /// blocks), 5,000 and 9,000 values into their places bit for bit, as the CPU op
    /// does; the CPU op refuses a parameter that does not fit.
    #[test]
    fn the_gather_kernel_and_its_twin_put_every_parameter_in_its_place() -> TestResult {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let lens = [0usize, 7, 0, 4096, 5000, 9000, 0];
        let values: Vec<Vec<f32>> = lens
            .iter()
            .map(|&n| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        let want: Vec<f32> = values.concat();
        let total = want.len();

        let emu = Emulator::of(include_str!("ops.cu"));
        let mut s = emu.session();
        let (table, blocks) = plan(&lens);
        s.put("dst", &vec![f32::NAN; total]).put("meta", &table);
        for (k, v) in values.iter().enumerate() {
            let name = format!("p{k}");
            // An empty tensor's buffer is never read: one value stands for it.
            s.put(&name, if v.is_empty() { &[0f32][..] } else { &v[..] });
            s.address("meta", SLOTS * k, &name);
        }
        s.launch(
            "gather_params",
            [blocks as u32, 1, 1],
            [THREADS, 1, 1],
            &[
                Arg::B("dst"),
                Arg::B("meta"),
                Arg::U32(lens.len() as u32),
                Arg::U32(CHUNK as u32),
            ],
        );
        let out = s.run();
        assert_eq!(bits(&out.get::<f32>("dst")), bits(&want));

        let dev = Device::Cpu;
        let mut params = Vec::new();
        let mut at = 0;
        for (v, &n) in values.iter().zip(&lens) {
            params.push((Var::from_slice(v, n, &dev)?.as_tensor().clone(), at));
            at += n;
        }
        let dst = Tensor::zeros(total, candle_core::DType::F32, &dev)?;
        dst.inplace_op1(&Gather {
            params: &params,
            #[cfg(feature = "cuda")]
            table: &std::sync::Mutex::new(None),
        })?;
        assert_eq!(bits(&dst.to_vec1::<f32>()?), bits(&want));
        let short = Tensor::zeros(total - 1, candle_core::DType::F32, &dev)?;
        let err = short
            .inplace_op1(&Gather {
                params: &params,
                #[cfg(feature = "cuda")]
                table: &std::sync::Mutex::new(None),
            })
            .err()
            .ok_or("a parameter past the buffer's end was taken")?;
        assert!(err.to_string().contains("does not fit"), "{err}");
        Ok(())
    }
}
