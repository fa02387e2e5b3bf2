//! `rampart train --workers N`: data-parallel training (see `rampart_defenses::parallel`
//! and docs/scale-out.md). The command the user types is the *launcher*: it checks the
//! run, starts N copies of itself as workers (`--worker-rank R --rendezvous FILE`, hidden
//! flags), waits for them, and stops the others as soon as one fails. Worker r runs
//! on `cuda:r` (NCCL) or on the CPU (loopback TCP); worker 0 writes every file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use rampart_defenses::parallel::{Collective, TcpGroup};

use crate::common::DeviceArg;

/// How long a worker waits for the others to join.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(600);

/// How this `rampart train` process takes part in training.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workers {
    /// One process: the plain path.
    Single,
    /// The launcher of `workers` worker processes.
    Launcher {
        /// The number of workers.
        workers: usize,
    },
    /// Worker `rank` of `workers`, joined through the file `rendezvous`.
    Worker {
        /// This worker's rank.
        rank: usize,
        /// The number of workers.
        workers: usize,
        /// The rendezvous file its launcher named.
        rendezvous: PathBuf,
    },
}

impl Workers {
    /// Checks `--workers`, `--worker-rank` and `--rendezvous` against the device and
    /// the global batch size, and gives the device this process trains on.
    pub fn plan(
        workers: usize,
        rank: Option<usize>,
        rendezvous: Option<&Path>,
        device: DeviceArg,
        batch_size: usize,
    ) -> Result<(Self, DeviceArg)> {
        if workers == 0 {
            bail!("--workers must be at least 1");
        }
        if workers > 1 && !batch_size.is_multiple_of(workers) {
            bail!(
                "--batch-size {batch_size} is the global batch and must split evenly over \
                 --workers {workers}; choose a multiple of {workers}"
            );
        }
        if workers > 1 {
            if let DeviceArg::Cuda { ordinal, .. } = device {
                if ordinal != 0 {
                    bail!(
                        "--workers {workers} trains on cuda:0 … cuda:{}; pick the GPUs with \
                         CUDA_VISIBLE_DEVICES rather than --device cuda:{ordinal}",
                        workers - 1
                    );
                }
                if !cfg!(feature = "nccl") {
                    bail!(
                        "data-parallel training on GPUs needs NCCL: build rampart with \
                         `--features nccl`"
                    );
                }
            }
        }
        Ok(match (rank, rendezvous) {
            (None, None) if workers == 1 => (Workers::Single, device),
            (None, None) => (Workers::Launcher { workers }, device),
            (Some(rank), Some(path)) if rank < workers => {
                let device = match device {
                    DeviceArg::Cuda { precision, .. } => DeviceArg::Cuda {
                        ordinal: rank,
                        precision,
                    },
                    DeviceArg::Cpu => DeviceArg::Cpu,
                };
                let worker = Workers::Worker {
                    rank,
                    workers,
                    rendezvous: path.to_path_buf(),
                };
                (worker, device)
            }
            (Some(rank), Some(_)) => bail!("--worker-rank {rank} is not below --workers {workers}"),
            _ => bail!("--worker-rank and --rendezvous are set together, by the launcher"),
        })
    }

    /// Worker 0, or a single process: the one that writes.
    pub fn leads(&self) -> bool {
        !matches!(self, Workers::Worker { rank, .. } if *rank > 0)
    }

    /// The number of workers.
    pub fn count(&self) -> usize {
        match self {
            Workers::Single => 1,
            Workers::Launcher { workers } | Workers::Worker { workers, .. } => *workers,
        }
    }

    /// A worker joins the others; None for a single process.
    pub fn join(&self, device: &Device) -> Result<Option<Arc<dyn Collective>>> {
        let Workers::Worker {
            rank,
            workers,
            rendezvous,
        } = self
        else {
            return Ok(None);
        };
        let group: Arc<dyn Collective> = match device {
            Device::Cpu => Arc::new(TcpGroup::join(*rank, *workers, rendezvous, JOIN_TIMEOUT)?),
            #[cfg(feature = "nccl")]
            Device::Cuda(_) => Arc::new(rampart_defenses::parallel::NcclGroup::join(
                device,
                *rank,
                *workers,
                rendezvous,
                JOIN_TIMEOUT,
            )?),
            other => bail!("data-parallel training does not run on {other:?}"),
        };
        Ok(Some(group))
    }
}

/// Starts `workers` copies of this command as workers in `out` and waits for them all;
/// when one fails, stops the others and names the failure.
pub fn launch(workers: usize, out: &Path, device: DeviceArg) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the rampart executable")?;
    let rendezvous = out.join(format!(".rendezvous-{}", std::process::id()));
    let _ = std::fs::remove_file(&rendezvous);
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    // CPU workers share the cores unless --threads says otherwise.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / workers).max(1);
    tracing::info!(workers, %device, "starting the data-parallel workers");
    let mut children: Vec<Option<Child>> = Vec::with_capacity(workers);
    for rank in 0..workers {
        let mut command = Command::new(&exe);
        command
            .args(&args)
            .arg("--worker-rank")
            .arg(rank.to_string())
            .arg("--rendezvous")
            .arg(&rendezvous);
        if device == DeviceArg::Cpu && std::env::var_os("RAYON_NUM_THREADS").is_none() {
            command.env("RAYON_NUM_THREADS", threads.to_string());
        }
        match command.spawn() {
            Ok(child) => children.push(Some(child)),
            Err(e) => {
                stop_all(&mut children);
                bail!("cannot start worker {rank}: {e}");
            }
        }
    }
    let outcome = wait_all(&mut children);
    let _ = std::fs::remove_file(&rendezvous);
    outcome
}

/// Waits for every worker; the first failure stops the rest.
fn wait_all(children: &mut [Option<Child>]) -> Result<()> {
    let mut failure: Option<(usize, ExitStatus)> = None;
    while children.iter().any(Option::is_some) {
        for rank in 0..children.len() {
            let Some(child) = children[rank].as_mut() else {
                continue;
            };
            let status = match child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => bail!("cannot watch worker {rank}: {e}"),
            };
            children[rank] = None;
            if !status.success() && failure.is_none() {
                failure = Some((rank, status));
                // A worker that stopped leaves the others waiting in a collective.
                stop_all(children);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match failure {
        None => Ok(()),
        Some((rank, status)) => bail!(
            "worker {rank} of the data-parallel run stopped ({status}; its error is above), \
             so the others were stopped too; the last checkpoint resumes with --resume"
        ),
    }
}

fn stop_all(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
    children.iter_mut().for_each(|c| *c = None);
}
