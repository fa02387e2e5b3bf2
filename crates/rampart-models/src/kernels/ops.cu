// The CUDA kernels of the operations between the convolutions (kernels/pointwise.rs
// and kernels/xent.rs hold their CPU twins and the launches). Compiled by NVRTC at
// first use; no header is included, so the source compiles without the toolkit's
// include folder.
//
// Where a kernel's contract is the CPU reference's exact float result, it is written
// with __fmul_rn/__fadd_rn/__frcp_rn, which are never contracted into an FMA.

#define FULL_MASK 0xffffffffu

// ReLU of y, in place (after a cuDNN BatchNorm wrote y).
extern "C" __global__ void relu_inplace(float* y, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = y[i] > 0.0f ? y[i] : 0.0f;
}

// out = dy·[y > 0]: the gradient through a ReLU whose output is y.
extern "C" __global__ void relu_mask(float* out, const float* dy, const float* y,
                                     unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __fmul_rn(dy[i], y[i] > 0.0f ? 1.0f : 0.0f);
}

// The input gradient of an eval-mode BatchNorm (+ ReLU, whose output is y) of NHWC
// activations with c channels: dx = (γ·(1/√(var + ε)))·(dy·[y > 0]).
extern "C" __global__ void bn_eval_backward(float* dx, const float* dy, const float* y,
                                            const float* gamma, const float* var,
                                            float eps, int relu, unsigned int c,
                                            unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int ch = i % c;
    float scale = __fmul_rn(gamma[ch], __frcp_rn(__fsqrt_rn(__fadd_rn(var[ch], eps))));
    float d = dy[i];
    if (relu) d = __fmul_rn(d, y[i] > 0.0f ? 1.0f : 0.0f);
    dx[i] = __fmul_rn(scale, d);
}

// A running statistic of a BatchNorm from the batch's: run ← (run·keep + 0) +
// (b·take + 0), with b the batch mean (var = 0) or the biased variance 1/(s·s)·1 −
// ε from s = 1/√(var + ε) (var = 1), as the tensor operations of the reference do.
extern "C" __global__ void bn_running(float* run, const float* stat, float keep,
                                      float take, float neg_eps, int var,
                                      unsigned int c) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c) return;
    float b = stat[i];
    if (var) b = __fadd_rn(__fmul_rn(__frcp_rn(__fmul_rn(b, b)), 1.0f), neg_eps);
    run[i] = __fadd_rn(__fadd_rn(__fmul_rn(run[i], keep), 0.0f),
                       __fadd_rn(__fmul_rn(b, take), 0.0f));
}

// Every running statistic of a fused train pass (kernels/running.rs holds the launch
// and the CPU twins, RunningUpdate's arithmetic): block k updates statistic k, whose
// seven values in meta are [running tensor's address, where its batch values start
// in stats, C, keep, take and neg_eps as f32 bits, whether it is a variance]; the
// update is bn_running's.
extern "C" __global__ void bn_running_multi(const float* stats,
                                            const unsigned long long* meta) {
    const unsigned long long* e = meta + 7ull * blockIdx.x;
    float* run = (float*)e[0];
    const float* stat = stats + e[1];
    unsigned int c = (unsigned int)e[2];
    float keep = __uint_as_float((unsigned int)e[3]);
    float take = __uint_as_float((unsigned int)e[4]);
    float neg_eps = __uint_as_float((unsigned int)e[5]);
    int var = (int)e[6];
    for (unsigned int i = threadIdx.x; i < c; i += blockDim.x) {
        float b = stat[i];
        if (var) b = __fadd_rn(__fmul_rn(__frcp_rn(__fmul_rn(b, b)), 1.0f), neg_eps);
        run[i] = __fadd_rn(__fadd_rn(__fmul_rn(run[i], keep), 0.0f),
                           __fadd_rn(__fmul_rn(b, take), 0.0f));
    }
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// log Σ_j exp(r_j) of a row of k logits, by the 32 lanes of one warp.
__device__ __forceinline__ float row_lse(const float* r, unsigned int k, unsigned int lane) {
    float m = -__int_as_float(0x7f800000);
    for (unsigned int j = lane; j < k; j += 32) m = fmaxf(m, r[j]);
    m = warp_max(m);
    float s = 0.0f;
    for (unsigned int j = lane; j < k; j += 32) s += expf(r[j] - m);
    return m + logf(warp_sum(s));
}

// The target t_j of row i: soft targets (soft ≠ 0), or the label y_i smoothed to
// on·[j = y_i] + off.
__device__ __forceinline__ float target(const unsigned int* y, const float* soft, float on,
                                        float off, unsigned int i, unsigned int j,
                                        unsigned int k) {
    if (soft) return soft[(size_t)i * k + j];
    return (j == y[i] ? on : 0.0f) + off;
}

// Σ_j t_ij·(lse_i − x_ij), the softmax cross-entropy of row i, by the 32 lanes of one
// warp (every lane gets it); NaN for a label ≥ k.
__device__ __forceinline__ float row_loss(const float* x, const unsigned int* y,
                                          const float* soft, float on, float off,
                                          unsigned int i, unsigned int k, unsigned int lane) {
    const float* r = x + (size_t)i * k;
    float lse = row_lse(r, k, lane);
    float l = 0.0f;
    for (unsigned int j = lane; j < k; j += 32) l += target(y, soft, on, off, i, j, k) * (lse - r[j]);
    l = warp_sum(l);
    return (!soft && y[i] >= k) ? __int_as_float(0x7fc00000) : l;
}

// Mean softmax cross-entropy of rows × k logits against their targets, in one block:
// each warp takes rows warp, warp + warps, …; the rows' losses are added in f64 in
// a fixed order, so the result does not depend on scheduling. A label ≥ k gives NaN.
extern "C" __global__ void xent_forward(float* loss, const float* x, const unsigned int* y,
                                        const float* soft, float on, float off,
                                        unsigned int rows, unsigned int k) {
    __shared__ double part[32];
    unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    double acc = 0.0;
    for (unsigned int i = warp; i < rows; i += warps) acc += (double)row_loss(x, y, soft, on, off, i, k, lane);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (unsigned int w = 0; w < warps; ++w) s += part[w];
        loss[0] = (float)(s / (double)rows);
    }
}

// Each row's softmax cross-entropy (as xent_forward, without the mean), one warp per
// row.
extern "C" __global__ void xent_rows(float* loss, const float* x, const unsigned int* y,
                                     const float* soft, float on, float off,
                                     unsigned int rows, unsigned int k) {
    unsigned int lane = threadIdx.x & 31;
    unsigned int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= rows) return;
    float l = row_loss(x, y, soft, on, off, i, k, lane);
    if (lane == 0) loss[i] = l;
}

// The gradient of xent_forward's mean loss, dx_ij = (g/rows)·(softmax_ij·T_i − t_ij)
// with g = grad[0], or (per_row) of xent_rows' losses, dx_ij = g_i·(softmax_ij·T_i −
// t_ij) with g_i = grad[i]; T_i = Σ_j t_ij; the gradient is read on the device. One
// warp per row.
extern "C" __global__ void xent_backward(float* dx, const float* x, const unsigned int* y,
                                         const float* soft, const float* grad, int per_row,
                                         float on, float off, unsigned int rows,
                                         unsigned int k) {
    unsigned int lane = threadIdx.x & 31;
    unsigned int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= rows) return;
    const float* r = x + (size_t)i * k;
    float lse = row_lse(r, k, lane);
    float total = 1.0f;
    if (soft) {
        float t = 0.0f;
        for (unsigned int j = lane; j < k; j += 32) t += soft[(size_t)i * k + j];
        total = warp_sum(t);
    }
    float g = per_row ? grad[i] : grad[0] / (float)rows;
    bool bad = !soft && y[i] >= k;
    for (unsigned int j = lane; j < k; j += 32) {
        float d = g * (expf(r[j] - lse) * total - target(y, soft, on, off, i, j, k));
        dx[(size_t)i * k + j] = bad ? __int_as_float(0x7fc00000) : d;
    }
}

// ---------------------------------------------------------------------------------
// A stochastic student's noise (noise.rs): value j of image i of a layer seeded s is
// a Box–Muller pair of SplitMix64 bits, with the logarithm, cosine and sine as
// polynomials in the same f32 operations as the CPU's (no contraction), so both
// devices draw the same bits. The constants are the CPU's bit patterns.
#define RP_LN2 __uint_as_float(0x3f317218u)
#define RP_SQRT2 __uint_as_float(0x3fb504f3u)
#define RP_TAU __uint_as_float(0x40c90fdbu)
#define RP_C3 __uint_as_float(0x3eaaaaabu)
#define RP_C5 __uint_as_float(0x3e4ccccdu)
#define RP_C7 __uint_as_float(0x3e124925u)
#define RP_C9 __uint_as_float(0x3de38e39u)
#define RP_C24 __uint_as_float(0x3d2aaaabu)
#define RP_C720 __uint_as_float(0xbab60b61u)
#define RP_C40320 __uint_as_float(0x37d00d01u)
#define RP_S6 __uint_as_float(0xbe2aaaabu)
#define RP_S120 __uint_as_float(0x3c088889u)
#define RP_S5040 __uint_as_float(0xb9500d01u)
#define RP_S362880 __uint_as_float(0x3638ef1du)

__device__ __forceinline__ unsigned long long rp_splitmix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float rp_ln(float x) {
    unsigned int bits = __float_as_uint(x);
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    unsigned int big = m > RP_SQRT2 ? 1u : 0u;
    m = __uint_as_float(__float_as_uint(m) - (big << 23));  // m·0.5 when big
    int e = (int)((bits >> 23) & 0xffu) - 127 + (int)big;
    float s = __fdiv_rn(__fsub_rn(m, 1.0f), __fadd_rn(m, 1.0f));
    float s2 = __fmul_rn(s, s);
    float p = __fadd_rn(1.0f, __fmul_rn(s2, __fadd_rn(RP_C3, __fmul_rn(s2,
        __fadd_rn(RP_C5, __fmul_rn(s2, __fadd_rn(RP_C7, __fmul_rn(s2, RP_C9))))))));
    return __fadd_rn(__fmul_rn((float)e, RP_LN2), __fmul_rn(__fadd_rn(s, s), p));
}

__device__ __forceinline__ void rp_cos_sin_turns(float t, float* cs, float* sn) {
    unsigned int qi = (unsigned int)__fadd_rn(__fmul_rn(t, 4.0f), 0.5f);
    float a = __fmul_rn(__fsub_rn(t, __fmul_rn((float)qi, 0.25f)), RP_TAU);
    float a2 = __fmul_rn(a, a);
    float c = __fadd_rn(1.0f, __fmul_rn(a2, __fadd_rn(-0.5f, __fmul_rn(a2,
        __fadd_rn(RP_C24, __fmul_rn(a2, __fadd_rn(RP_C720, __fmul_rn(a2, RP_C40320))))))));
    float s = __fmul_rn(a, __fadd_rn(1.0f, __fmul_rn(a2, __fadd_rn(RP_S6, __fmul_rn(a2,
        __fadd_rn(RP_S120, __fmul_rn(a2, __fadd_rn(RP_S5040, __fmul_rn(a2, RP_S362880)))))))));
    switch (qi & 3u) {
        case 0: *cs = c; *sn = s; break;
        case 1: *cs = -s; *sn = c; break;
        case 2: *cs = -c; *sn = -s; break;
        default: *cs = s; *sn = -c; break;
    }
}

// Thread p writes values 2k and 2k + 1 (k = p mod half; the second only below
// per_image) of image p / half.
extern "C" __global__ void layer_noise(float* out, unsigned long long seed,
                                       unsigned long long first,
                                       unsigned long long per_image,
                                       unsigned long long half, unsigned int pairs) {
    unsigned int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    unsigned long long image = p / half, k = p % half;
    unsigned long long global = first + image;
    unsigned long long key = rp_splitmix64(seed ^ ((global + 1ULL) * 0x9e3779b97f4a7c15ULL));
    unsigned long long h = rp_splitmix64(key ^ (k * 0xd1342543de82ef95ULL));
    float u = __fmul_rn((float)((h >> 40) + 1ULL), 5.9604644775390625e-8f);
    float t = __fmul_rn((float)((h >> 16) & 0xffffffULL), 5.9604644775390625e-8f);
    float r = __fsqrt_rn(__fmul_rn(-2.0f, rp_ln(u)));
    float c, s;
    rp_cos_sin_turns(t, &c, &s);
    float* row = out + image * per_image;
    unsigned long long j = 2ULL * k;
    row[j] = __fmul_rn(r, c);
    if (j + 1ULL < per_image) row[j + 1ULL] = __fmul_rn(r, s);
}

// bf16 <-> f32 for the bf16 convolutions (`bf16.rs`, the CPU twin): round to nearest,
// ties to even, on the bits (no header needed); a NaN stays a (quiet) NaN.
extern "C" __global__ void f32_to_bf16(unsigned short* out, const float* x, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int u = __float_as_uint(x[i]);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out[i] = (unsigned short)((u >> 16) | 0x0040u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out[i] = (unsigned short)(u >> 16);
}

extern "C" __global__ void bf16_to_f32(float* out, const unsigned short* x, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __uint_as_float(((unsigned int)x[i]) << 16);
}

// out = widen(x), or out + widen(x) when accumulate: a bf16 convolution's result into
// the fused GPU programs' f32 buffers (bf16_to_f32, then an f32 addition).
extern "C" __global__ void bf16_widen_into(float* out, const unsigned short* x, int accumulate,
                                           unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = __uint_as_float(((unsigned int)x[i]) << 16);
    out[i] = accumulate ? __fadd_rn(out[i], v) : v;
}

// A convolution kernel between PyTorch's OIHW order and the OHWI (KRSC) order of the
// NHWC convolutions, kk = k·k (kernels/conv.rs holds the CPU twins).
// out[((o·kk) + q)·ci + i] = w[(o·ci + i)·kk + q]
extern "C" __global__ void oihw_to_ohwi(float* out, const float* w, unsigned int ci,
                                        unsigned int kk, unsigned int n) {
    unsigned int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    unsigned int i = j % ci, rest = j / ci;
    unsigned int q = rest % kk, o = rest / kk;
    out[j] = w[(o * ci + i) * kk + q];
}

// out[(o·ci + i)·kk + q] = w[((o·kk) + q)·ci + i]
extern "C" __global__ void ohwi_to_oihw(float* out, const float* w, unsigned int ci,
                                        unsigned int kk, unsigned int n) {
    unsigned int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    unsigned int q = j % kk, rest = j / kk;
    unsigned int i = rest % ci, o = rest / ci;
    out[j] = w[(o * kk + q) * ci + i];
}

// A model's parameters copied into its one buffer (kernels/gather.rs holds the CPU
// twin and the launch): meta holds four values per tensor [source address, n, offset
// in dst, first block]; block k copies elements (k - first) * chunk ... + chunk of
// the last tensor whose first block is at most k (found by bisection; an empty tensor
// shares its first block with the next and is passed over).
extern "C" __global__ void gather_params(float* dst, const unsigned long long* meta,
                                         unsigned int tensors, unsigned int chunk) {
    unsigned long long k = blockIdx.x;
    unsigned int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        unsigned int mid = lo + (hi - lo + 1) / 2;
        if (meta[4ull * mid + 3] <= k) lo = mid;
        else hi = mid - 1;
    }
    const unsigned long long* e = meta + 4ull * lo;
    const float* src = (const float*)e[0];
    unsigned long long n = e[1], at = e[2], start = (k - e[3]) * chunk;
    unsigned long long end = start + chunk < n ? start + chunk : n;
    for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        dst[at + i] = src[i];
    }
}
