//! CUDA kernels run on the CPU, for the tests of machines without a GPU: the kernel
//! source (the CUDA C that NVRTC compiles) is compiled as C++20 by the host's compiler
//! (`CXX`, default `c++`) behind definitions that make each CUDA thread a host thread
//! (`emulate.cpp`: blocks in turn, `__syncthreads` a barrier of the block, a warp
//! shuffle an exchange among the warp's threads, `__shared__` variables statics, the
//! rounding intrinsics the host's IEEE operations, nothing contracted into an FMA).
//! A test writes buffers, lists launches (kernel, grid, block, arguments) and reads
//! the buffers back, then holds them to the kernels' CPU twins: the kernels' code is
//! checked without a GPU. The fused programs' launches themselves (kernel, argument
//! order, grid) are built by the code the CUDA executor runs
//! ([`super::launch`]) and run here by the tests' emulated executor. A launch runs
//! its threads one after another until a thread reaches a barrier or a shuffle; it
//! then starts again, the buffers put back, with a host thread per CUDA thread.
//! Transcendentals (`expf`, `logf`) are the host's, which may differ from the GPU's
//! in the last bits.
//!
//! The compiled emulator is kept in the system's temporary folder under a hash of its
//! source, so a second test run does not compile it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

const HARNESS: &str = include_str!("emulate.cpp");

/// One argument of a launch: a buffer (passed as a pointer to its first element) or a
/// scalar of the kernel parameter's type.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    /// The buffer of this name (written with [`Session::put`] before the launch).
    B(&'a str),
    /// A null pointer (an absent optional buffer).
    Null,
    /// `unsigned int`.
    U32(u32),
    /// `int`.
    I32(i32),
    /// `unsigned long long`.
    U64(u64),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

/// The kernels of one source, compiled for the CPU.
#[derive(Debug)]
pub struct Emulator {
    exe: PathBuf,
}

/// FNV-1a, a hash that does not change between compilers or runs.
fn fnv(parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The names of the `__global__` kernels of `source`.
fn kernel_names(source: &str) -> Vec<&str> {
    source
        .split("__global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(str::trim)
        .collect()
}

impl Emulator {
    /// The emulator of `source`, compiled at the first call for that source in this
    /// process (or found from an earlier run). Panics, with the compiler's message,
    /// when it cannot be built: it is test support.
    pub fn of(source: &'static str) -> &'static Emulator {
        static BUILT: OnceLock<Mutex<Vec<(&'static str, &'static Emulator)>>> = OnceLock::new();
        let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
        let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, e)) = built.iter().find(|(s, _)| std::ptr::eq(*s, source)) {
            return e;
        }
        let e: &'static Emulator = Box::leak(Box::new(Emulator::compile(source)));
        built.push((source, e));
        e
    }

    fn compile(source: &str) -> Emulator {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let key = fnv(&[HARNESS, source, &cxx]);
        let dir = std::env::temp_dir().join(format!("rampart-emulate-{key:016x}"));
        let exe = dir.join("emulate");
        if exe.is_file() {
            return Emulator { exe };
        }
        std::fs::create_dir_all(&dir).expect("a folder for the kernels' emulator");
        // Written under names of this process, then renamed: runs at the same time
        // never see a half-written file.
        let tag = format!("{}-{}", std::process::id(), next());
        let work = dir.join(format!("build-{tag}"));
        std::fs::create_dir_all(&work).expect("a folder for the kernels' emulator");
        std::fs::write(work.join("emulate.cpp"), HARNESS).expect("writing the emulator");
        std::fs::write(work.join("kernels.cu"), source).expect("writing the kernels");
        let list: String = kernel_names(source)
            .iter()
            .map(|k| format!("K({k}) "))
            .collect();
        let built = work.join("emulate");
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-w"])
            .arg(format!("-DKERNEL_LIST={list}"))
            .arg(work.join("emulate.cpp"))
            .arg("-o")
            .arg(&built)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "a C++20 compiler is needed to run the CUDA kernels on the CPU \
                     ({cxx}: {e}); install g++ or set CXX"
                )
            });
        assert!(
            out.status.success(),
            "compiling the kernels for the CPU failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&built, &exe).expect("placing the kernels' emulator");
        let _ = std::fs::remove_dir_all(&work);
        Emulator { exe }
    }

    /// A fresh set of buffers and launches.
    pub fn session(&'static self) -> Session {
        let dir = std::env::temp_dir().join(format!(
            "rampart-emulate-run-{}-{}",
            std::process::id(),
            next()
        ));
        std::fs::create_dir_all(&dir).expect("a folder for an emulated launch");
        Session {
            emulator: self,
            dir,
            script: String::new(),
        }
    }
}

fn next() -> usize {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    COUNT.fetch_add(1, Ordering::Relaxed)
}

/// Element types a buffer can hold (little-endian bytes).
pub trait Element: Copy {
    /// Bytes per element.
    const SIZE: usize;
    /// Appends the element's bytes.
    fn put(self, out: &mut Vec<u8>);
    /// The element of `SIZE` bytes.
    fn get(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend(self.to_le_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}
element!(f32, f64, u16, u32, u64);

/// The bit patterns of `v`, for exact comparisons of kernel outputs (a NaN equals a
/// NaN of the same bits).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|a| a.to_bits()).collect()
}

/// `n` values in [−2, 2) with NaN, +0 and −0 among them (one in twelve each): inputs
/// of element-wise kernels.
pub fn awkward(rng: &mut impl rand::Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.gen_range(0..12) {
            0 => f32::NAN,
            1 => 0.0,
            2 => -0.0,
            _ => rng.gen_range(-2.0f32..2.0),
        })
        .collect()
}

/// `n` finite values in [−2, 2): inputs of kernels that sum (one NaN would make every
/// sum NaN, and the comparison empty).
pub fn finite(rng: &mut impl rand::Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
}

/// Buffers and launches run together by [`Session::run`].
#[derive(Debug)]
pub struct Session {
    emulator: &'static Emulator,
    dir: PathBuf,
    script: String,
}

impl Session {
    /// Writes the buffer `name`.
    pub fn put<T: Element>(&mut self, name: &str, values: &[T]) -> &mut Self {
        let mut bytes = Vec::with_capacity(values.len() * T::SIZE);
        values.iter().for_each(|v| v.put(&mut bytes));
        std::fs::write(self.dir.join(format!("buf_{name}.bin")), bytes)
            .expect("writing an emulated buffer");
        self
    }

    /// Adds a launch of `kernel` on `grid` blocks of `block` threads.
    pub fn launch(
        &mut self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        args: &[Arg<'_>],
    ) -> &mut Self {
        use std::fmt::Write;
        let [gx, gy, gz] = grid;
        let [bx, by, bz] = block;
        let _ = write!(self.script, "{kernel} {gx} {gy} {gz} {bx} {by} {bz}");
        for a in args {
            let _ = match *a {
                Arg::B(n) => write!(self.script, " b {n}"),
                Arg::Null => write!(self.script, " null 0"),
                Arg::U32(v) => write!(self.script, " u32 {v}"),
                Arg::I32(v) => write!(self.script, " i32 {v}"),
                Arg::U64(v) => write!(self.script, " u64 {v}"),
                Arg::F32(v) => write!(self.script, " f32 {:x}", v.to_bits()),
                Arg::F64(v) => write!(self.script, " f64 {:x}", v.to_bits()),
            };
        }
        self.script.push('\n');
        self
    }

    /// Writes, before the launches that follow, the address of buffer `target` as the
    /// `index`-th 64-bit value of buffer `table` (both written already): a table of
    /// device addresses, as a multi-tensor kernel reads.
    pub fn address(&mut self, table: &str, index: usize, target: &str) -> &mut Self {
        use std::fmt::Write;
        let _ = writeln!(self.script, "@address {table} {index} {target}");
        self
    }

    /// A launch of `n` threads in blocks of `block` (one dimension).
    pub fn launch_n(&mut self, kernel: &str, n: usize, block: u32, args: &[Arg<'_>]) -> &mut Self {
        let grid = u32::try_from(n.div_ceil(block as usize).max(1)).expect("a grid that fits");
        self.launch(kernel, [grid, 1, 1], [block, 1, 1], args)
    }

    /// Runs the launches in order; every buffer they used, as it is afterwards.
    pub fn run(&mut self) -> Buffers {
        std::fs::write(self.dir.join("launches.txt"), &self.script)
            .expect("writing the emulated launches");
        let out = std::process::Command::new(&self.emulator.exe)
            .arg(&self.dir)
            .output()
            .expect("running the kernels' emulator");
        assert!(
            out.status.success(),
            "the kernels' emulation failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.script.clear();
        Buffers(read_outputs(&self.dir))
    }
}

fn read_outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut map = BTreeMap::new();
    for entry in std::fs::read_dir(dir)
        .expect("the emulated launch's folder")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name
            .strip_prefix("out_")
            .and_then(|n| n.strip_suffix(".bin"))
        {
            let bytes = std::fs::read(entry.path()).expect("reading an emulated buffer");
            map.insert(stem.to_string(), bytes);
        }
    }
    map
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The buffers after an emulated run.
#[derive(Debug)]
pub struct Buffers(BTreeMap<String, Vec<u8>>);

impl Buffers {
    /// The values of buffer `name` (panics when no launch used it).
    pub fn get<T: Element>(&self, name: &str) -> Vec<T> {
        let bytes = self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("no launch used the buffer {name}"));
        bytes.chunks_exact(T::SIZE).map(T::get).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel of each emulated feature: a grid of blocks, shared memory and
    /// `__syncthreads`, warp shuffles, an early return.
    const SOURCE: &str = r#"
extern "C" __global__ void block_sums(float* out, const float* x, unsigned int n) {
    __shared__ float part[64];
    unsigned int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    part[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) part[t] = __fadd_rn(part[t], part[t + s]);
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = part[0];
}

extern "C" __global__ void warp_max(float* out, const float* x) {
    unsigned int t = threadIdx.x;
    float v = x[t];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    out[t] = v;
}

extern "C" __global__ void scale(double* y, double a, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = __dmul_rn(y[i], a);
}
"#;

    #[test]
    fn emulated_kernels_compute_what_cuda_would() {
        let emu = Emulator::of(SOURCE);
        let x: Vec<f32> = (0..150).map(|i| i as f32).collect();
        let w: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32).collect();
        let y: Vec<f64> = (0..5).map(f64::from).collect();
        let mut s = emu.session();
        s.put("x", &x)
            .put("sums", &[0f32; 3])
            .put("w", &w)
            .put("wmax", &[0f32; 64])
            .put("y", &y)
            .launch_n(
                "block_sums",
                150,
                64,
                &[Arg::B("sums"), Arg::B("x"), Arg::U32(150)],
            )
            .launch(
                "warp_max",
                [1, 1, 1],
                [64, 1, 1],
                &[Arg::B("wmax"), Arg::B("w")],
            )
            .launch_n("scale", 5, 4, &[Arg::B("y"), Arg::F64(2.5), Arg::U32(5)]);
        let out = s.run();
        let sums: Vec<f32> = out.get("sums");
        let expect: Vec<f32> = x.chunks(64).map(|c| c.iter().sum()).collect();
        assert_eq!(sums, expect);
        let wmax: Vec<f32> = out.get("wmax");
        for (t, m) in wmax.iter().enumerate() {
            let warp = &w[t / 32 * 32..t / 32 * 32 + 32];
            assert_eq!(*m, warp.iter().copied().fold(f32::MIN, f32::max));
        }
        assert_eq!(out.get::<f64>("y"), vec![0.0, 2.5, 5.0, 7.5, 10.0]);
        assert_eq!(kernel_names(SOURCE), ["block_sums", "warp_max", "scale"]);
    }
}
