//! [`NcclGroup`]: one process per GPU, joined through NCCL (cudarc's bindings, which
//! candle's CUDA stack builds with its `nccl` feature). Worker 0 creates NCCL's unique
//! id and writes it into the rendezvous file; the others read it there. The sums run
//! on the GPUs, on candle's stream, as custom ops: nothing is copied to the host.
#![allow(unsafe_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::Collective;
use crate::error::{DefenseError, Result};

/// The length of NCCL's unique id.
const ID_BYTES: usize = 128;

fn fail(what: impl std::fmt::Display) -> DefenseError {
    DefenseError::Parallel(what.to_string())
}

/// An NCCL communicator that may move between threads.
#[derive(Debug)]
struct Communicator(Comm);

// SAFETY: an NCCL communicator is not bound to the thread that created it; it must
// not be used by two threads at once, which the `Mutex` around it rules out.
unsafe impl Send for Communicator {}

/// GPU workers joined by NCCL; worker r runs on `device` (usually `cuda:r`).
#[derive(Debug)]
pub struct NcclGroup {
    comm: Arc<Mutex<Communicator>>,
    rank: usize,
    workers: usize,
}

impl NcclGroup {
    /// Joins worker `rank` of `workers` on the CUDA `device` through the rendezvous
    /// file `rendezvous` (a fresh path per run), waiting at most `timeout`.
    pub fn join(
        device: &Device,
        rank: usize,
        workers: usize,
        rendezvous: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        if workers == 0 || rank >= workers {
            return Err(fail(format!("worker {rank} of {workers} does not exist")));
        }
        let Device::Cuda(cuda) = device else {
            return Err(fail("NCCL needs a CUDA device (--device cuda)"));
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| fail(format!("NCCL unique id: {e:?}")))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            rampart_fs::write_atomic(rendezvous, &bytes)?;
            id
        } else {
            let deadline = Instant::now() + timeout;
            loop {
                match std::fs::read(rendezvous) {
                    Ok(bytes) if bytes.len() == ID_BYTES => {
                        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
                        for (c, b) in internal.iter_mut().zip(bytes) {
                            *c = b as std::ffi::c_char;
                        }
                        break Id::uninit(internal);
                    }
                    _ if Instant::now() > deadline => {
                        return Err(fail(format!(
                        "worker {rank} found no NCCL id from worker 0 in {} within the time limit",
                        rendezvous.display()
                    )))
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, workers, id).map_err(|e| {
            fail(format!(
                "NCCL could not join worker {rank} of {workers}: {e:?}"
            ))
        })?;
        Ok(Self {
            comm: Arc::new(Mutex::new(Communicator(comm))),
            rank,
            workers,
        })
    }

    fn run(&self, op: Op, values: &Tensor) -> Result<Tensor> {
        if values.rank() != 1 || !matches!(values.dtype(), DType::F32 | DType::F64) {
            return Err(fail(format!(
                "collectives take 1-D f32 or f64 tensors, got {:?} {:?}",
                values.shape(),
                values.dtype()
            )));
        }
        let custom = NcclOp {
            comm: Arc::clone(&self.comm),
            op,
        };
        Ok(values.contiguous()?.apply_op1_no_bwd(&custom)?)
    }
}

impl Collective for NcclGroup {
    fn place(&self) -> (usize, usize) {
        (self.rank, self.workers)
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, values: &Tensor) -> Result<Tensor> {
        self.run(Op::Sum, values)
    }

    fn broadcast(&self, values: &Tensor) -> Result<Tensor> {
        self.run(Op::Broadcast, values)
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Sum,
    Broadcast,
}

/// One NCCL call as a candle op: reads the input's device buffer and returns a new one.
struct NcclOp {
    comm: Arc<Mutex<Communicator>>,
    op: Op,
}

impl NcclOp {
    fn call<T>(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::nccl::safe::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        let n = l.shape().elem_count();
        let start = l.start_offset();
        let input = s.as_cuda_slice::<T>()?.slice(start..start + n);
        let dev = s.device.clone();
        let mut out = dev.alloc_zeros::<T>(n)?;
        let comm = self
            .comm
            .lock()
            .map_err(|_| candle_core::Error::Msg("NCCL: a thread panicked mid-call".into()))?;
        match self.op {
            Op::Sum => comm.0.all_reduce(&input, &mut out, &ReduceOp::Sum),
            Op::Broadcast => comm.0.broadcast(Some(&input), &mut out, 0),
        }
        .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp1 for NcclOp {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need tensors on a CUDA device")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F64 => self.call::<f64>(s, l)?,
            _ => self.call::<f32>(s, l)?,
        };
        Ok((out, l.shape().clone()))
    }
}
