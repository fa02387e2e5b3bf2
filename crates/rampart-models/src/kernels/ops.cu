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
