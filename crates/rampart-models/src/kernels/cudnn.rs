//! cuDNN on NHWC tensors, the CUDA hot path (feature `cudnn`): the CUDA forward of
//! the [`Conv2d`] op, and BatchNorm.
//!
//! candle's own `conv2d` on CUDA takes NCHW input (so every layer of an NHWC model
//! pays two transposing copies), asks cuDNN's heuristics for an algorithm on every
//! call, and has no cuDNN backward pass. Measured on an H100 (WRN-16-4, batch 128),
//! that made a training step 40× slower than PyTorch's. Here the three calls
//! PyTorch makes, forward, backward-data and backward-filter, run on the NHWC layout
//! the models keep (the layout cuDNN's tensor-core kernels want), with the kernel in
//! KRSC order (a permuted copy of the OIHW parameter, a few hundred kilobytes), and
//! the algorithm choice (cuDNN's heuristics, as PyTorch without `cudnn.benchmark`;
//! cuDNN's measurement of deterministic algorithms under
//! [`super::CUDNN_BENCHMARK_ENV`]) and workspace size are cached per geometry and
//! thread.
//!
//! Precision: full f32 (cuDNN's FMA math mode) unless [`set_precision`] allows TF32
//! tensor cores, PyTorch's default for convolutions. With TF32 an attack's input
//! gradient on a WRN-16-2 moved by 5 % (relative L2) from the f32 one; without it,
//! by 1e-6. With bf16 ([`crate::Precision::Bf16`]) each pass rounds its two f32
//! operands to bf16 (one kernel each, [`super::bf16`]), runs cuDNN on bf16 tensors
//! with f32 accumulation (tensor cores), and widens the bf16 result to f32 (one
//! kernel): the op still takes and returns f32.
//!
//! For an untracked kernel (a [`crate::Frozen`] model's detached weight) the backward
//! pass skips the kernel gradient, as on the CPU.
//!
//! `unsafe` here covers the calls into cuDNN and the uninitialised output buffers
//! cuDNN fills (the other places with `unsafe` are listed in `docs/ARCHITECTURE.md`).
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::safe::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, FilterDescriptor,
    TensorDescriptor,
};
use std::ffi::c_void;

use super::bn::{BatchNormEval, BatchNormTrain, BatchNormTrainBackward};
use super::conv::{Conv2d, ConvShape, Pass};
use crate::Precision;
use candle_core::cuda_backend::cudarc::cudnn::{result, sys, Cudnn, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{CudaStorage, Layout, Result, Shape, Tensor};

/// The cuDNN descriptors of one convolution geometry, on data of type `T` (f32, or
/// bf16) with f32 accumulation.
struct Descriptors<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

impl<T: CudnnDataType> Descriptors<T> {
    /// The forward pass: (x, w) → y.
    fn forward(&self) -> ConvForward<'_, T, f32, T> {
        ConvForward {
            conv: &self.conv,
            x: &self.x,
            w: &self.w,
            y: &self.y,
        }
    }

    /// The input-gradient pass: (dy, w) → dx.
    fn data(&self) -> ConvBackwardData<'_, T, f32, T> {
        ConvBackwardData {
            conv: &self.conv,
            dx: &self.x,
            w: &self.w,
            dy: &self.y,
        }
    }

    /// The kernel-gradient pass: (x, dy) → dw.
    fn filter(&self) -> ConvBackwardFilter<'_, T, f32, T> {
        ConvBackwardFilter {
            conv: &self.conv,
            x: &self.x,
            dw: &self.w,
            dy: &self.y,
        }
    }
}

/// The descriptors of one geometry and cuDNN's choice of algorithm for each pass.
struct Plan<T: CudnnDataType> {
    desc: Descriptors<T>,
    forward: (sys::cudnnConvolutionFwdAlgo_t, usize),
    data: (sys::cudnnConvolutionBwdDataAlgo_t, usize),
    filter: (sys::cudnnConvolutionBwdFilterAlgo_t, usize),
}

/// (device, sizes, precision).
type PlanKey = (DeviceId, ConvShape, Precision);

/// The [`Precision`] of the convolutions, process-wide (0 f32, 1 TF32, 2 bf16).
static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the arithmetic of the cuDNN convolutions, process-wide: full f32 (they agree
/// with the CPU path to f32 rounding), TF32 tensor cores (10-bit mantissa, Ampere and
/// newer; PyTorch's default), or bf16 operands with f32 accumulation.
pub fn set_precision(precision: Precision) {
    let code = match precision {
        Precision::F32 => 0,
        Precision::Tf32 => 1,
        Precision::Bf16 => 2,
    };
    PRECISION.store(code, Ordering::Relaxed);
}

/// The precision [`set_precision`] set.
pub fn precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => Precision::Tf32,
        2 => Precision::Bf16,
        _ => Precision::F32,
    }
}

/// The plans of one data type, per thread (descriptors are not Send).
type Plans<T> = RefCell<HashMap<PlanKey, Rc<Plan<T>>>>;

thread_local! {
    // cuDNN handles are neither Send nor Sync: one per thread and device, as candle does.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static PLANS: Plans<f32> = RefCell::new(HashMap::new());
    static PLANS_BF16: Plans<half::bf16> = RefCell::new(HashMap::new());
}

/// A data type of the convolutions: its cache of plans, and the scaling factors 1
/// and 0 (cuDNN's α and β) in it.
trait PlanCache:
    CudnnDataType + candle_core::cuda_backend::cudarc::driver::DeviceRepr + Copy + 'static
{
    const ONE: Self;
    const ZERO: Self;
    fn plans() -> &'static std::thread::LocalKey<Plans<Self>>;
}

impl PlanCache for f32 {
    const ONE: f32 = 1.0;
    const ZERO: f32 = 0.0;
    fn plans() -> &'static std::thread::LocalKey<Plans<f32>> {
        &PLANS
    }
}

impl PlanCache for half::bf16 {
    const ONE: half::bf16 = half::bf16::ONE;
    const ZERO: half::bf16 = half::bf16::ZERO;
    fn plans() -> &'static std::thread::LocalKey<Plans<half::bf16>> {
        &PLANS_BF16
    }
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

fn dims(n: usize, c: usize, h: usize, w: usize) -> [i32; 4] {
    [n as i32, c as i32, h as i32, w as i32]
}

fn plan<T: PlanCache>(dev: &CudaDevice, g: ConvShape) -> Result<Rc<Plan<T>>> {
    let key = (dev.id(), g, precision());
    if let Some(p) = T::plans().with(|p| p.borrow().get(&key).cloned()) {
        return Ok(p);
    }
    let cudnn = handle(dev)?;
    let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    let (ho, wo) = g.out();
    let (p, s) = (g.padding as i32, g.stride as i32);
    let mut conv = cudnn.create_conv2d::<f32>(
        [p, p],
        [s, s],
        [1, 1],
        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    if T::DATA_TYPE == sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16 {
        // bf16 operands, f32 accumulation: on tensor cores.
        conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
    }
    let x = cudnn.create_4d_tensor::<T>(nhwc, dims(g.b, g.c_in, g.h, g.w))?;
    let w = cudnn.create_4d_filter::<T>(nhwc, dims(g.c_out, g.c_in, g.k, g.k))?;
    let y = cudnn.create_4d_tensor::<T>(nhwc, dims(g.b, g.c_out, ho, wo))?;
    let desc = Descriptors { conv, x, w, y };
    // With the benchmark switch, the algorithms cuDNN measures fastest (when the
    // measurement works and the safe wrapper accepts them), else the heuristics'.
    let measured = if benchmark() {
        match measure(dev, g, T::DATA_TYPE) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("cuDNN benchmark of {g:?} failed ({e}); heuristics instead");
                None
            }
        }
    } else {
        None
    };
    // A pass's algorithm (measured, or cuDNN's heuristic pick) and its workspace size.
    macro_rules! choose {
        ($op:expr, $measured:expr) => {{
            let op = $op;
            let fast = $measured.and_then(|a| op.get_workspace_size(a).ok().map(|w| (a, w)));
            match fast {
                Some(chosen) => chosen,
                None => {
                    let algo = op.pick_algorithm()?;
                    (algo, op.get_workspace_size(algo)?)
                }
            }
        }};
    }
    let plan = Rc::new(Plan {
        forward: choose!(desc.forward(), measured.and_then(|m| m.0)),
        data: choose!(desc.data(), measured.and_then(|m| m.1)),
        filter: choose!(desc.filter(), measured.and_then(|m| m.2)),
        desc,
    });
    T::plans().with(|p| p.borrow_mut().insert(key, plan.clone()));
    Ok(plan)
}

/// Whether [`super::CUDNN_BENCHMARK_ENV`] asks for cuDNN's measured algorithms
/// (read once). Only deterministic algorithms are taken, so a run stays reproducible
/// on its GPU.
pub fn benchmark() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(super::CUDNN_BENCHMARK_ENV).is_some_and(|v| v != "0"))
}

/// Workspace a measured algorithm may take (PyTorch caps it by free memory; this is a
/// fixed bound well below a GPU's).
const BENCHMARK_WORKSPACE: usize = 1 << 30;

/// The measured algorithms of the three passes: forward, input gradient, kernel
/// gradient (None where no deterministic one within the workspace bound succeeded).
type Measured = (
    Option<sys::cudnnConvolutionFwdAlgo_t>,
    Option<sys::cudnnConvolutionBwdDataAlgo_t>,
    Option<sys::cudnnConvolutionBwdFilterAlgo_t>,
);

/// Raw descriptors of one geometry for cuDNN's measurement calls (the safe wrapper's
/// are private), destroyed on drop.
struct RawConv {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Drop for RawConv {
    fn drop(&mut self) {
        // SAFETY: each created once by `measure` and destroyed once here.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// cuDNN's measurement (`cudnnFind…Algorithm`: every algorithm run and timed, on
/// memory cuDNN allocates itself) of the three passes of `g` on data of type `data`
/// with f32 accumulation, as [`plan`] describes them: the fastest deterministic
/// algorithm of each that succeeded within [`BENCHMARK_WORKSPACE`].
fn measure(dev: &CudaDevice, g: ConvShape, data: sys::cudnnDataType_t) -> Result<Measured> {
    let raw = raw_handle(dev)?;
    let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    let (ho, wo) = g.out();
    let d = RawConv {
        x: result::create_tensor_descriptor()?,
        w: result::create_filter_descriptor()?,
        y: result::create_tensor_descriptor()?,
        conv: result::create_convolution_descriptor()?,
    };
    let (p, s) = (g.padding as i32, g.stride as i32);
    // SAFETY: freshly created descriptors, set once.
    unsafe {
        result::set_tensor4d_descriptor(d.x, nhwc, data, dims(g.b, g.c_in, g.h, g.w))?;
        result::set_filter4d_descriptor(d.w, data, nhwc, dims(g.c_out, g.c_in, g.k, g.k))?;
        result::set_tensor4d_descriptor(d.y, nhwc, data, dims(g.b, g.c_out, ho, wo))?;
        result::set_convolution2d_descriptor(
            d.conv,
            p,
            p,
            s,
            s,
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )?;
        if data == sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16 {
            result::set_convolution_math_type(d.conv, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
        }
    }
    let mut n = 0i32;
    // The fastest (cuDNN sorts them) deterministic algorithm that succeeded within
    // the workspace bound, among the `n` results cuDNN wrote.
    macro_rules! fastest {
        ($results:expr) => {
            $results[..usize::try_from(n).unwrap_or(0).min($results.len())]
                .iter()
                .find(|r| {
                    r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                        && r.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
                        && r.memory <= BENCHMARK_WORKSPACE
                })
                .map(|r| r.algo)
        };
    }
    // SAFETY (the three calls): live handle and descriptors; the result arrays hold
    // as many entries as requested; cuDNN writes `n` of them.
    let mut fwd = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; 8];
    unsafe {
        sys::cudnnFindConvolutionForwardAlgorithm(
            raw.0,
            d.x,
            d.w,
            d.conv,
            d.y,
            fwd.len() as i32,
            &mut n,
            fwd.as_mut_ptr(),
        )
        .result()?;
    }
    let forward = fastest!(fwd);
    let mut bwd = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; 6];
    unsafe {
        sys::cudnnFindConvolutionBackwardDataAlgorithm(
            raw.0,
            d.w,
            d.y,
            d.conv,
            d.x,
            bwd.len() as i32,
            &mut n,
            bwd.as_mut_ptr(),
        )
        .result()?;
    }
    let data_algo = fastest!(bwd);
    let mut flt = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>() }; 7];
    unsafe {
        sys::cudnnFindConvolutionBackwardFilterAlgorithm(
            raw.0,
            d.x,
            d.y,
            d.conv,
            d.w,
            flt.len() as i32,
            &mut n,
            flt.as_mut_ptr(),
        )
        .result()?;
    }
    let filter = fastest!(flt);
    Ok((forward, data_algo, filter))
}

/// A contiguous f32 operand of `len` elements.
fn view<'a>(s: &'a CudaStorage, l: &Layout, len: usize, what: &str) -> Result<CudaView<'a, f32>> {
    if !l.is_contiguous() || l.shape().elem_count() != len {
        candle_core::bail!(
            "cuDNN convolution: {what} must be a contiguous tensor of {len} values, got {:?}",
            l.shape()
        )
    }
    let start = l.start_offset();
    Ok(s.as_cuda_slice::<f32>()?.slice(start..start + len))
}

fn workspace(dev: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: cuDNN only writes to its workspace before reading it.
    Ok(Some(unsafe { dev.alloc::<u8>(bytes)? }))
}

/// One pass of a [`Conv2d`] on CUDA: the cuDNN call for its pass, on buffers the
/// plan of its shape describes. The op's OIHW kernel is put in KRSC order first (one
/// kernel), and a kernel gradient, computed in KRSC order, is put back in OIHW order.
pub(crate) fn conv2d(
    op: &Conv2d,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    use super::pointwise::permute_kernel;
    let dev = &s1.device;
    let ([(n1, what1), (n2, what2)], shape) = op.sizes();
    let (a, b) = (view(s1, l1, n1, what1)?, view(s2, l2, n2, what2)?);
    let (ci, kk) = (op.shape.c_in, op.shape.k * op.shape.k);
    // The kernel operand (forward and input-gradient passes) in KRSC order.
    let krsc = match op.pass {
        Pass::Forward | Pass::Data => Some(permute_kernel(dev, &b, ci, kk, true)?),
        Pass::Filter => None,
    };
    let b = match &krsc {
        Some(k) => k.slice(0..n2),
        None => b,
    };
    let out = if precision() == Precision::Bf16 {
        // bf16 operands, f32 accumulation, the result widened to f32.
        use super::bf16::cuda::{to_bf16, to_f32};
        let (a, b) = (to_bf16(dev, &a)?, to_bf16(dev, &b)?);
        let (a, b) = (a.slice(0..n1), b.slice(0..n2));
        let out = run::<half::bf16>(op, dev, &a, &b, shape.elem_count())?;
        to_f32(dev, &out)?
    } else {
        run::<f32>(op, dev, &a, &b, shape.elem_count())?
    };
    let out = match op.pass {
        Pass::Filter => permute_kernel(dev, &out.slice(..), ci, kk, false)?,
        Pass::Forward | Pass::Data => out,
    };
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

/// The forward pass (x, kernel), the input-gradient pass (dy, kernel) or the
/// kernel-gradient pass (x, dy: `kernel` holds dy, `out` gets the KRSC gradient) of
/// the convolution `g` on f32 buffers into `out` (its length checked by the caller),
/// added to what `out` holds when `accumulate`, else overwriting it. In f32 or TF32
/// the sum is cuDNN's β = 1 (β = 0: cuDNN does not read `out`). In bf16
/// ([`Precision::Bf16`]) the operands are rounded to bf16, the pass runs on them with
/// f32 accumulation into a bf16 result, which is widened to f32 into `out` or added
/// to it: the roundings of the layer-by-layer path, whose sums are f32 too. For the
/// fused GPU paths.
pub(crate) fn conv_into(
    dev: &CudaDevice,
    g: ConvShape,
    pass: Pass,
    a: &CudaView<'_, f32>,
    kernel: &CudaView<'_, f32>,
    out: &mut CudaSlice<f32>,
    accumulate: bool,
) -> Result<()> {
    if precision() == Precision::Bf16 {
        use super::bf16::cuda::{to_bf16, widen_into};
        let (n_a, n_k) = (a.len(), kernel.len());
        let (a, kernel) = (to_bf16(dev, a)?, to_bf16(dev, kernel)?);
        // SAFETY: β = 0, so cuDNN writes every value of the result before it is read.
        let mut narrow = unsafe { dev.alloc::<half::bf16>(out.len().max(1))? };
        let ab = (half::bf16::ONE, half::bf16::ZERO);
        launch_into::<half::bf16>(
            dev,
            g,
            pass,
            &a.slice(0..n_a),
            &kernel.slice(0..n_k),
            &mut narrow,
            ab,
        )?;
        return widen_into(dev, &narrow, out, accumulate);
    }
    let ab = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
    launch_into::<f32>(dev, g, pass, a, kernel, out, ab)
}

/// One cuDNN pass of the convolution `g` on operands of type `T` into `out`, scaled
/// as cuDNN's (α, β) `ab` say.
fn launch_into<T: PlanCache>(
    dev: &CudaDevice,
    g: ConvShape,
    pass: Pass,
    a: &CudaView<'_, T>,
    kernel: &CudaView<'_, T>,
    out: &mut CudaSlice<T>,
    ab: (T, T),
) -> Result<()> {
    let p = plan::<T>(dev, g)?;
    // SAFETY (every launch): the descriptors of `p` describe these buffers (lengths
    // checked by the caller, NHWC, kernel KRSC).
    match pass {
        Pass::Forward => {
            let mut work = workspace(dev, p.forward.1)?;
            let op = p.desc.forward();
            unsafe { op.launch(p.forward.0, work.as_mut(), ab, a, kernel, out) }?;
        }
        Pass::Data => {
            let mut work = workspace(dev, p.data.1)?;
            let op = p.desc.data();
            unsafe { op.launch(p.data.0, work.as_mut(), ab, out, kernel, a) }?;
        }
        Pass::Filter => {
            // (x, dy) → the KRSC kernel gradient: `kernel` holds dy here.
            let mut work = workspace(dev, p.filter.1)?;
            let op = p.desc.filter();
            unsafe { op.launch(p.filter.0, work.as_mut(), ab, a, out, kernel) }?;
        }
    }
    Ok(())
}

/// The cuDNN call of `op`'s pass on operands of type `T`, into a fresh buffer of
/// `len` values.
fn run<T: PlanCache>(
    op: &Conv2d,
    dev: &CudaDevice,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    len: usize,
) -> Result<CudaSlice<T>> {
    let p = plan::<T>(dev, op.shape)?;
    // SAFETY: beta = 0, so cuDNN writes every output value before anything reads it.
    let mut out = unsafe { dev.alloc::<T>(len)? };
    let ab = (T::ONE, T::ZERO);
    // SAFETY (every launch): the descriptors of `p` describe these buffers
    // (lengths checked above, NHWC, kernel KRSC).
    match op.pass {
        Pass::Forward => {
            let mut work = workspace(dev, p.forward.1)?;
            let op = p.desc.forward();
            unsafe { op.launch(p.forward.0, work.as_mut(), ab, a, b, &mut out) }?;
        }
        Pass::Data => {
            let mut work = workspace(dev, p.data.1)?;
            let op = p.desc.data();
            unsafe { op.launch(p.data.0, work.as_mut(), ab, &mut out, b, a) }?;
        }
        Pass::Filter => {
            let mut work = workspace(dev, p.filter.1)?;
            let op = p.desc.filter();
            unsafe { op.launch(p.filter.0, work.as_mut(), ab, a, &mut out, b) }?;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// BatchNorm: cuDNN's spatial batch normalisation on NHWC tensors (one kernel for the
// forward pass, one for the backward pass, where candle's generic operations take a
// dozen broadcasting kernels each way).

/// A raw cuDNN handle on the device's stream (the safe wrapper keeps its handle
/// private, and BatchNorm has no safe wrapper).
struct RawHandle(sys::cudnnHandle_t);

impl Drop for RawHandle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle` and dropped once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

/// A 4-d f32 tensor descriptor.
struct Desc(sys::cudnnTensorDescriptor_t);

impl Desc {
    fn new(format: sys::cudnnTensorFormat_t, d: [i32; 4]) -> Result<Self> {
        let desc = Desc(result::create_tensor_descriptor()?);
        // SAFETY: a freshly created descriptor.
        unsafe {
            result::set_tensor4d_descriptor(
                desc.0,
                format,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                d,
            )
        }?;
        Ok(desc)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `create_tensor_descriptor` and dropped once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

/// The descriptors of one BatchNorm shape: the activations (NHWC) and the
/// per-channel parameters (1, C, 1, 1).
struct BnPlan {
    x: Desc,
    p: Desc,
}

type BnKey = (DeviceId, [usize; 4]);

thread_local! {
    static RAW: RefCell<HashMap<DeviceId, Rc<RawHandle>>> = RefCell::new(HashMap::new());
    static BN_PLANS: RefCell<HashMap<BnKey, Rc<BnPlan>>> = RefCell::new(HashMap::new());
}

fn raw_handle(dev: &CudaDevice) -> Result<Rc<RawHandle>> {
    if let Some(h) = RAW.with(|r| r.borrow().get(&dev.id()).cloned()) {
        return Ok(h);
    }
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread()?;
    let h = RawHandle(result::create_handle()?);
    // SAFETY: a live handle and the device's own stream, which outlives it.
    unsafe { result::set_stream(h.0, stream.cu_stream() as sys::cudaStream_t) }?;
    let h = Rc::new(h);
    RAW.with(|r| r.borrow_mut().insert(dev.id(), h.clone()));
    Ok(h)
}

fn bn_plan(dev: &CudaDevice, d: [usize; 4]) -> Result<Rc<BnPlan>> {
    let key = (dev.id(), d);
    if let Some(p) = BN_PLANS.with(|p| p.borrow().get(&key).cloned()) {
        return Ok(p);
    }
    let [n, c, h, w] = d;
    let plan = Rc::new(BnPlan {
        x: Desc::new(
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            dims(n, c, h, w),
        )?,
        p: Desc::new(
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            dims(1, c, 1, 1),
        )?,
    });
    BN_PLANS.with(|p| p.borrow_mut().insert(key, plan.clone()));
    Ok(plan)
}

/// The smallest ε cuDNN's BatchNorm accepts (`CUDNN_BN_MIN_EPSILON` of cuDNN 7;
/// later versions accept less, the models use 1e-5).
const BN_MIN_EPSILON: f64 = 1e-5;

const SPATIAL: sys::cudnnBatchNormMode_t = sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;

/// Train-mode BatchNorm (forward and backward): cuDNN's persistent NHWC kernels,
/// measured 20 % faster on a WRN-16-4 training step than the plain spatial mode.
const SPATIAL_PERSISTENT: sys::cudnnBatchNormMode_t =
    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL_PERSISTENT;

fn scalar(v: &f32) -> *const c_void {
    (v as *const f32).cast()
}

/// What every BatchNorm call starts from: the device and its stream, the input `x`
/// (n·c·h·w values, `len`) of shape `dims`, that shape's plan and the raw handle.
struct BnCall<'a> {
    dev: &'a CudaDevice,
    stream: Arc<CudaStream>,
    x: CudaView<'a, f32>,
    len: usize,
    c: usize,
    plan: Rc<BnPlan>,
    handle: Rc<RawHandle>,
}

impl<'a> BnCall<'a> {
    fn new(dev: &'a CudaDevice, x: CudaView<'a, f32>, dims: [usize; 4]) -> Result<Self> {
        let [n, c, h, w] = dims;
        let len = n * c * h * w;
        if x.len() != len {
            candle_core::bail!("BatchNorm: {} values for activations {dims:?}", x.len())
        }
        Ok(BnCall {
            dev,
            stream: dev.cuda_stream(),
            x,
            len,
            c,
            plan: bn_plan(dev, dims)?,
            handle: raw_handle(dev)?,
        })
    }

    /// `out`, written by cuDNN, as candle storage.
    fn finish(&self, out: CudaSlice<f32>) -> (CudaStorage, Shape) {
        let len = out.len();
        (
            CudaStorage::wrap_cuda_slice(out, self.dev.clone()),
            Shape::from(len),
        )
    }
}

/// The CUDA forward of [`BatchNormTrain`]: cuDNN's training-mode forward, writing y,
/// then the batch mean and 1/√(var + ε) per channel (cuDNN's saved statistics).
pub(crate) fn batch_norm_train(
    op: &BatchNormTrain,
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let len = op.dims.iter().product();
    let c = op.dims[1];
    let x = view(xs, xl, len, "input")?;
    let call = BnCall::new(&xs.device, x, op.dims)?;
    // SAFETY: every value is written by cuDNN below.
    let mut out = unsafe { call.dev.alloc::<f32>(len + 2 * c)? };
    {
        let (mut y, mut stats) = out.split_at_mut(len);
        let (g, b) = (view(gs, gl, c, "scale")?, view(bs, bl, c, "shift")?);
        bn_train(&call, &g, &b, op.eps, &mut y, &mut stats)?;
    }
    Ok(call.finish(out))
}

/// cuDNN's training-mode forward of the activations `x` (NHWC, `dims` as (n, c, h,
/// w)) with γ and β, into `y` (n·c·h·w values) and `stats` ([mean | 1/√(var + ε)],
/// 2C).
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_train_into(
    dev: &CudaDevice,
    x: CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    dims: [usize; 4],
    eps: f64,
    y: &mut CudaViewMut<'_, f32>,
    stats: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    bn_train(&BnCall::new(dev, x, dims)?, gamma, beta, eps, y, stats)
}

fn bn_train(
    call: &BnCall<'_>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    eps: f64,
    y: &mut CudaViewMut<'_, f32>,
    stats: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (len, c) = (call.len, call.c);
    if gamma.len() != c || beta.len() != c || y.len() != len || stats.len() != 2 * c {
        candle_core::bail!(
            "BatchNorm: γ, β, y and the statistics must hold {c}, {c}, {len} and {} values",
            2 * c
        )
    }
    let (xp, _gx) = call.x.device_ptr(&call.stream);
    let (gp, _gg) = gamma.device_ptr(&call.stream);
    let (bp, _gb) = beta.device_ptr(&call.stream);
    let (yp, _gy) = y.device_ptr_mut(&call.stream);
    let (mean, _gs) = stats.device_ptr_mut(&call.stream);
    let inv_std = mean + (4 * c) as u64;
    // SAFETY: the descriptors match the checked lengths; the running statistics are
    // not asked for (both null, factor 0).
    unsafe {
        sys::cudnnBatchNormalizationForwardTraining(
            call.handle.0,
            SPATIAL_PERSISTENT,
            scalar(&1.0),
            scalar(&0.0),
            call.plan.x.0,
            xp as *const c_void,
            call.plan.x.0,
            yp as *mut c_void,
            call.plan.p.0,
            gp as *const c_void,
            bp as *const c_void,
            0.0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            eps,
            mean as *mut c_void,
            inv_std as *mut c_void,
        )
    }
    .result()?;
    Ok(())
}

/// The CUDA forward of [`BatchNormTrainBackward`]: (x, ∂/∂y, saved [y | mean |
/// inv_std]) → dx, dγ, dβ in one buffer, through cuDNN's backward pass. `dy` is the
/// gradient of the normalised output (already through the ReLU, if any).
pub(crate) fn batch_norm_backward(
    op: &BatchNormTrainBackward,
    xs: &CudaStorage,
    xl: &Layout,
    dy: &CudaView<'_, f32>,
    rs: &CudaStorage,
    rl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let forward = op.forward();
    let len: usize = forward.dims.iter().product();
    let c = forward.dims[1];
    let call = BnCall::new(&xs.device, view(xs, xl, len, "input")?, forward.dims)?;
    let saved = view(rs, rl, len + 2 * c, "saved statistics")?;
    let (gs, gl) = op.gamma().storage_and_layout();
    let candle_core::Storage::Cuda(gs) = &*gs else {
        candle_core::bail!("BatchNorm: scale on another device than the input")
    };
    let gamma = view(gs, gl, c, "scale")?;
    // SAFETY: every value is written by cuDNN below.
    let mut out = unsafe { call.dev.alloc::<f32>(len + 2 * c)? };
    {
        let (mut dx, mut dgb) = out.split_at_mut(len);
        let stats = saved.slice(len..len + 2 * c);
        bn_backward(&call, dy, &gamma, &stats, forward.eps, &mut dx, &mut dgb)?;
    }
    Ok(call.finish(out))
}

/// cuDNN's training-mode backward pass of the activations `x` (NHWC, `dims`) from
/// the gradient `dy` of the normalised output, γ, and the forward pass's saved
/// [mean | 1/√(var + ε)] (2C): dx into `dx`, [dγ | dβ] into `dgb`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_backward_into(
    dev: &CudaDevice,
    x: CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    stats: &CudaView<'_, f32>,
    dims: [usize; 4],
    eps: f64,
    dx: &mut CudaViewMut<'_, f32>,
    dgb: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    bn_backward(&BnCall::new(dev, x, dims)?, dy, gamma, stats, eps, dx, dgb)
}

fn bn_backward(
    call: &BnCall<'_>,
    dy: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    stats: &CudaView<'_, f32>,
    eps: f64,
    dx: &mut CudaViewMut<'_, f32>,
    dgb: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (len, c) = (call.len, call.c);
    if dy.len() != len || dx.len() != len {
        candle_core::bail!(
            "BatchNorm backward: {} gradients and {} outputs for {len} values",
            dy.len(),
            dx.len()
        )
    }
    if gamma.len() != c || stats.len() != 2 * c || dgb.len() != 2 * c {
        candle_core::bail!(
            "BatchNorm backward: γ, the statistics and [dγ | dβ] must hold {c}, {} and {} values",
            2 * c,
            2 * c
        )
    }
    let (xp, _gx) = call.x.device_ptr(&call.stream);
    let (dyp, _gdy) = dy.device_ptr(&call.stream);
    let (sp, _gs) = stats.device_ptr(&call.stream);
    let (gp, _gg) = gamma.device_ptr(&call.stream);
    let (dxp, _gdx) = dx.device_ptr_mut(&call.stream);
    let (d_gamma, _gdgb) = dgb.device_ptr_mut(&call.stream);
    let (mean, inv_std) = (sp, sp + (4 * c) as u64);
    let d_beta = d_gamma + (4 * c) as u64;
    // SAFETY: as in the forward pass; the saved statistics are those the forward pass
    // wrote for this x.
    unsafe {
        sys::cudnnBatchNormalizationBackward(
            call.handle.0,
            SPATIAL_PERSISTENT,
            scalar(&1.0),
            scalar(&0.0),
            scalar(&1.0),
            scalar(&0.0),
            call.plan.x.0,
            xp as *const c_void,
            call.plan.x.0,
            dyp as *const c_void,
            call.plan.x.0,
            dxp as *mut c_void,
            call.plan.p.0,
            gp as *const c_void,
            d_gamma as *mut c_void,
            d_beta as *mut c_void,
            eps,
            mean as *const c_void,
            inv_std as *const c_void,
        )
    }
    .result()?;
    Ok(())
}

/// Whether cuDNN can run this BatchNorm (f32 on CUDA, ε at least cuDNN's minimum,
/// a non-empty batch).
pub(crate) fn batch_norm_supported(xs: &Tensor, eps: f64) -> bool {
    xs.device().is_cuda()
        && xs.dtype() == candle_core::DType::F32
        && eps >= BN_MIN_EPSILON
        && xs.elem_count() > 0
}

/// The CUDA forward of [`BatchNormEval`]: cuDNN's inference kernel with the running
/// statistics.
pub(crate) fn batch_norm_eval(
    op: &BatchNormEval,
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let len: usize = op.dims.iter().product();
    let call = BnCall::new(&xs.device, view(xs, xl, len, "input")?, op.dims)?;
    let c = call.c;
    let gamma = view(gs, gl, c, "scale")?;
    let beta = view(bs, bl, c, "shift")?;
    let (ms, ml) = op.mean.storage_and_layout();
    let (vs, vl) = op.var.storage_and_layout();
    let (candle_core::Storage::Cuda(ms), candle_core::Storage::Cuda(vs)) = (&*ms, &*vs) else {
        candle_core::bail!("BatchNorm: running statistics on another device than the input")
    };
    let mean = view(ms, ml, c, "running mean")?;
    let var = view(vs, vl, c, "running variance")?;
    // SAFETY: every value is written by cuDNN below.
    let mut y = unsafe { call.dev.alloc::<f32>(len)? };
    {
        let (xp, _gx) = call.x.device_ptr(&call.stream);
        let (gp, _gg) = gamma.device_ptr(&call.stream);
        let (bp, _gb) = beta.device_ptr(&call.stream);
        let (mp, _gm) = mean.device_ptr(&call.stream);
        let (vp, _gv) = var.device_ptr(&call.stream);
        let (yp, _gy) = y.device_ptr_mut(&call.stream);
        // SAFETY: the descriptors match the checked lengths.
        unsafe {
            sys::cudnnBatchNormalizationForwardInference(
                call.handle.0,
                SPATIAL,
                scalar(&1.0),
                scalar(&0.0),
                call.plan.x.0,
                xp as *const c_void,
                call.plan.x.0,
                yp as *mut c_void,
                call.plan.p.0,
                gp as *const c_void,
                bp as *const c_void,
                mp as *const c_void,
                vp as *const c_void,
                op.eps,
            )
        }
        .result()?;
    }
    Ok(call.finish(y))
}
