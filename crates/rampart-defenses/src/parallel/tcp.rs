//! [`TcpGroup`]: the collective of CPU workers on one machine, over loopback TCP.
//! Worker 0 is the hub: it receives every worker's values, adds them in rank order
//! and sends the sum back, so every worker gets bit-identical results.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::Collective;
use crate::error::{DefenseError, Result};

/// Opens every message, so that a stray connection is refused.
const MAGIC: &[u8; 4] = b"RMPT";

/// The two operations; each message names the one it belongs to, so that workers out
/// of step fail with a clear error rather than mixing numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Sum = 1,
    Broadcast = 2,
}

/// CPU workers of one machine joined over loopback TCP. Worker 0 listens on a free
/// port and writes its address into the rendezvous file; the others read it there.
#[derive(Debug)]
pub struct TcpGroup {
    rank: usize,
    workers: usize,
    /// Worker 0: the links to workers 1.., in rank order. Others: the link to worker 0.
    links: Mutex<Vec<TcpStream>>,
}

fn fail(what: impl std::fmt::Display) -> DefenseError {
    DefenseError::Parallel(what.to_string())
}

impl TcpGroup {
    /// Joins worker `rank` of `workers` through the rendezvous file `rendezvous` (a
    /// fresh path per run, on a file system every worker sees), waiting at most
    /// `timeout` for the others.
    pub fn join(rank: usize, workers: usize, rendezvous: &Path, timeout: Duration) -> Result<Self> {
        if workers == 0 || rank >= workers {
            return Err(fail(format!("worker {rank} of {workers} does not exist")));
        }
        let deadline = Instant::now() + timeout;
        let links = if workers == 1 {
            Vec::new()
        } else if rank == 0 {
            Self::listen(workers, rendezvous, deadline)?
        } else {
            vec![Self::connect(rank, workers, rendezvous, deadline)?]
        };
        Ok(Self {
            rank,
            workers,
            links: Mutex::new(links),
        })
    }

    fn listen(workers: usize, rendezvous: &Path, deadline: Instant) -> Result<Vec<TcpStream>> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| fail(format!("cannot listen: {e}")))?;
        let addr = listener.local_addr().map_err(fail)?;
        rampart_fs::write_atomic(rendezvous, addr.to_string().as_bytes())?;
        listener.set_nonblocking(true).map_err(fail)?;
        let mut links: Vec<Option<TcpStream>> = (1..workers).map(|_| None).collect();
        while links.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).map_err(fail)?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(fail)?;
                    let mut hello = [0u8; 20];
                    if stream.read_exact(&mut hello).is_err() || &hello[..4] != MAGIC {
                        continue; // not one of ours
                    }
                    let rank =
                        u64::from_le_bytes(hello[4..12].try_into().unwrap_or_default()) as usize;
                    let size =
                        u64::from_le_bytes(hello[12..20].try_into().unwrap_or_default()) as usize;
                    if size != workers || rank == 0 || rank >= workers {
                        return Err(fail(format!(
                            "a worker joined as {rank} of {size}, but this run has {workers} workers"
                        )));
                    }
                    if links[rank - 1].is_some() {
                        return Err(fail(format!("two workers joined as worker {rank}")));
                    }
                    stream.set_read_timeout(None).map_err(fail)?;
                    stream.set_nodelay(true).map_err(fail)?;
                    links[rank - 1] = Some(stream);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = links
                            .iter()
                            .enumerate()
                            .filter(|(_, l)| l.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(fail(format!(
                            "worker(s) {} did not join within the time limit",
                            missing.join(", ")
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(format!("accepting a worker: {e}"))),
            }
        }
        Ok(links.into_iter().flatten().collect())
    }

    fn connect(
        rank: usize,
        workers: usize,
        rendezvous: &Path,
        deadline: Instant,
    ) -> Result<TcpStream> {
        loop {
            let attempt = std::fs::read_to_string(rendezvous)
                .ok()
                .and_then(|text| text.trim().parse::<SocketAddr>().ok())
                .and_then(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok());
            if let Some(mut stream) = attempt {
                let mut hello = Vec::with_capacity(20);
                hello.extend_from_slice(MAGIC);
                hello.extend_from_slice(&(rank as u64).to_le_bytes());
                hello.extend_from_slice(&(workers as u64).to_le_bytes());
                if stream.write_all(&hello).is_ok() {
                    stream.set_nodelay(true).map_err(fail)?;
                    return Ok(stream);
                }
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "worker {rank} found no worker 0 through {} within the time limit",
                    rendezvous.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exchange(&self, op: Op, values: &Tensor) -> Result<Tensor> {
        let (bytes, dtype) = encode(values)?;
        let mut links = self
            .links
            .lock()
            .map_err(|_| fail("a worker thread panicked"))?;
        let out = if self.rank == 0 {
            let mut acc = bytes;
            if op == Op::Sum {
                for (i, link) in links.iter_mut().enumerate() {
                    let theirs = receive(link, op, dtype, acc.len(), i + 1)?;
                    add_into(&mut acc, &theirs, dtype);
                }
            }
            for (i, link) in links.iter_mut().enumerate() {
                send(link, op, dtype, &acc).map_err(|e| lost(i + 1, e))?;
            }
            acc
        } else {
            let link = &mut links[0];
            if op == Op::Sum {
                send(link, op, dtype, &bytes).map_err(|e| lost(0, e))?;
            }
            receive(link, op, dtype, bytes.len(), 0)?
        };
        Ok(decode(&out, dtype, values.device())?)
    }
}

impl Collective for TcpGroup {
    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn place(&self) -> (usize, usize) {
        (self.rank, self.workers)
    }

    fn all_reduce_sum(&self, values: &Tensor) -> Result<Tensor> {
        if self.workers == 1 {
            return Ok(values.clone());
        }
        self.exchange(Op::Sum, values)
    }

    fn broadcast(&self, values: &Tensor) -> Result<Tensor> {
        if self.workers == 1 {
            return Ok(values.clone());
        }
        self.exchange(Op::Broadcast, values)
    }
}

fn lost(peer: usize, e: std::io::Error) -> DefenseError {
    fail(format!(
        "lost worker {peer} ({e}); it probably stopped with an error of its own"
    ))
}

fn encode(values: &Tensor) -> Result<(Vec<u8>, DType)> {
    if values.rank() != 1 {
        return Err(fail(format!(
            "collectives take 1-D tensors, got {:?}",
            values.shape()
        )));
    }
    let bytes: Vec<u8> = match values.dtype() {
        DType::F32 => values
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => values
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => return Err(fail(format!("collectives take f32 or f64, got {other:?}"))),
    };
    Ok((bytes, values.dtype()))
}

fn decode(bytes: &[u8], dtype: DType, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    match dtype {
        DType::F64 => Tensor::new(le_values(bytes, f64::from_le_bytes).as_slice(), device),
        _ => Tensor::new(le_values(bytes, f32::from_le_bytes).as_slice(), device),
    }
}

/// The little-endian values of `N` bytes each in `bytes`.
fn le_values<const N: usize, T>(bytes: &[u8], from: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().unwrap_or([0; N])))
        .collect()
}

/// `acc += theirs`, element-wise, in `dtype`.
fn add_into(acc: &mut [u8], theirs: &[u8], dtype: DType) {
    fn add<const N: usize>(
        acc: &mut [u8],
        theirs: &[u8],
        sum: impl Fn([u8; N], [u8; N]) -> [u8; N],
    ) {
        for (a, b) in acc.chunks_exact_mut(N).zip(theirs.chunks_exact(N)) {
            let s = sum(
                a.try_into().unwrap_or([0; N]),
                b.try_into().unwrap_or([0; N]),
            );
            a.copy_from_slice(&s);
        }
    }
    if dtype == DType::F64 {
        add(acc, theirs, |a, b| {
            (f64::from_le_bytes(a) + f64::from_le_bytes(b)).to_le_bytes()
        });
    } else {
        add(acc, theirs, |a, b| {
            (f32::from_le_bytes(a) + f32::from_le_bytes(b)).to_le_bytes()
        });
    }
}

fn header(op: Op, dtype: DType, len: usize) -> [u8; 14] {
    let mut h = [0u8; 14];
    h[..4].copy_from_slice(MAGIC);
    h[4] = op as u8;
    h[5] = u8::from(dtype == DType::F64);
    h[6..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

fn send(link: &mut TcpStream, op: Op, dtype: DType, bytes: &[u8]) -> std::io::Result<()> {
    link.write_all(&header(op, dtype, bytes.len()))?;
    link.write_all(bytes)
}

fn receive(link: &mut TcpStream, op: Op, dtype: DType, len: usize, peer: usize) -> Result<Vec<u8>> {
    let mut h = [0u8; 14];
    link.read_exact(&mut h).map_err(|e| lost(peer, e))?;
    if h != header(op, dtype, len) {
        return Err(fail(format!(
            "worker {peer} is out of step: it sent another operation or size than this \
             worker expected ({op:?} of {len} bytes)"
        )));
    }
    let mut bytes = vec![0u8; len];
    link.read_exact(&mut bytes).map_err(|e| lost(peer, e))?;
    Ok(bytes)
}
