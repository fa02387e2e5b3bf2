// The CUDA kernels of the fused eval path on a GPU (kernels/device_eval.rs holds their
// CPU twins, in the same float operations, and the launches). Compiled by NVRTC at
// first use; no header is included. Activations are NHWC with c channels; every
// kernel takes one thread per output value. Written with __fmul_rn/__fadd_rn/
// __fsub_rn/__frcp_rn/__fsqrt_rn, never contracted into an FMA, so that each equals
// its twin bit for bit.

// The eval-mode BatchNorm scale of channel ch: γ·(1/√(var + ε)).
__device__ __forceinline__ float de_scale(const float* gamma, const float* var, float eps,
                                          unsigned int ch) {
    return __fmul_rn(gamma[ch], __frcp_rn(__fsqrt_rn(__fadd_rn(var[ch], eps))));
}

// x·s + (β − μ·s), s = de_scale.
__device__ __forceinline__ float de_bn(float x, const float* gamma, const float* beta,
                                       const float* mean, const float* var, float eps,
                                       unsigned int ch) {
    float s = de_scale(gamma, var, eps, ch);
    float shift = __fsub_rn(beta[ch], __fmul_rn(mean[ch], s));
    return __fadd_rn(__fmul_rn(x, s), shift);
}

// max(0, de_bn).
__device__ __forceinline__ float de_bn_relu(float x, const float* gamma, const float* beta,
                                            const float* mean, const float* var, float eps,
                                            unsigned int ch) {
    float v = de_bn(x, gamma, beta, mean, var, eps, ch);
    return v > 0.0f ? v : 0.0f;
}

// max(0, de_bn + z·((α·σ[ch])·s)): a stochastic student's BatchNorm, its noise z drawn
// by `layer_noise` (ops.cu), scaled per channel as the layer-by-layer path scales it.
__device__ __forceinline__ float de_bn_noise_relu(float x, const float* gamma,
                                                  const float* beta, const float* mean,
                                                  const float* var, float eps, float z,
                                                  const float* alpha, const float* sigma,
                                                  float scale, unsigned int ch) {
    float std = __fmul_rn(__fmul_rn(alpha[0], sigma[ch]), scale);
    float v = __fadd_rn(de_bn(x, gamma, beta, mean, var, eps, ch), __fmul_rn(z, std));
    return v > 0.0f ? v : 0.0f;
}

// y = relu(bn(x)), eval mode.
extern "C" __global__ void de_bn_relu_into(float* y, const float* x, const float* gamma,
                                           const float* beta, const float* mean,
                                           const float* var, float eps, unsigned int c,
                                           unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = de_bn_relu(x[i], gamma, beta, mean, var, eps, i % c);
}

// y ← relu(bn(y)), eval mode, in place.
extern "C" __global__ void de_bn_relu_inplace(float* y, const float* gamma, const float* beta,
                                              const float* mean, const float* var, float eps,
                                              unsigned int c, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = de_bn_relu(y[i], gamma, beta, mean, var, eps, i % c);
}

// y = relu(bn(x) + z·((α·σ)·s)), eval mode, with a student's noise.
extern "C" __global__ void de_bn_noise_relu_into(float* y, const float* x, const float* z,
                                                 const float* alpha, const float* sigma,
                                                 float scale, const float* gamma,
                                                 const float* beta, const float* mean,
                                                 const float* var, float eps, unsigned int c,
                                                 unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] = de_bn_noise_relu(x[i], gamma, beta, mean, var, eps, z[i], alpha, sigma, scale,
                                i % c);
}

// y ← relu(bn(y) + z·((α·σ)·s)), eval mode, in place, with a student's noise.
extern "C" __global__ void de_bn_noise_relu_inplace(float* y, const float* z, const float* alpha,
                                                    const float* sigma, float scale,
                                                    const float* gamma, const float* beta,
                                                    const float* mean, const float* var,
                                                    float eps, unsigned int c, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] = de_bn_noise_relu(y[i], gamma, beta, mean, var, eps, z[i], alpha, sigma, scale,
                                i % c);
}

// out ← relu(bn(out) + k), k = bn_s(skip) when has_sn (a projection shortcut and its
// BatchNorm), else skip (the block's input): the end of a post-activation block.
extern "C" __global__ void de_bn_add_relu(float* out, const float* skip, const float* gamma,
                                          const float* beta, const float* mean,
                                          const float* var, float eps, const float* s_gamma,
                                          const float* s_beta, const float* s_mean,
                                          const float* s_var, float s_eps, int has_sn,
                                          unsigned int c, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int ch = i % c;
    float v = de_bn(out[i], gamma, beta, mean, var, eps, ch);
    float k = has_sn ? de_bn(skip[i], s_gamma, s_beta, s_mean, s_var, s_eps, ch) : skip[i];
    float t = __fadd_rn(v, k);
    out[i] = t > 0.0f ? t : 0.0f;
}

// The backward pass of de_bn_add_relu whose output is y: g = d·[y > 0]; d2 = s·g (the
// second convolution's output gradient), d ← s_s·g when has_sn, else g (the
// shortcut's).
extern "C" __global__ void de_add_relu_backward(float* d2, float* d, const float* y,
                                                const float* gamma, const float* var,
                                                float eps, const float* s_gamma,
                                                const float* s_var, float s_eps, int has_sn,
                                                unsigned int c, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int ch = i % c;
    float g = __fmul_rn(d[i], y[i] > 0.0f ? 1.0f : 0.0f);
    d2[i] = __fmul_rn(de_scale(gamma, var, eps, ch), g);
    d[i] = has_sn ? __fmul_rn(de_scale(s_gamma, s_var, s_eps, ch), g) : g;
}

// d ← s·(d·[y > 0]) (+ r when has_r): the input gradient of relu(bn(·)) whose output
// is y, in place, plus a residual gradient r.
extern "C" __global__ void de_bn_relu_backward(float* d, const float* y, const float* gamma,
                                               const float* var, float eps, const float* r,
                                               int has_r, unsigned int c, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = de_scale(gamma, var, eps, i % c);
    float v = __fmul_rn(s, __fmul_rn(d[i], y[i] > 0.0f ? 1.0f : 0.0f));
    if (has_r) v = __fadd_rn(v, r[i]);
    d[i] = v;
}

// out[(b·hw + p)·c + ch] = (x[(b·c + ch)·hw + p] − mean[ch])·inv_std[ch]: the input
// normalisation, NCHW in, NHWC out.
extern "C" __global__ void de_normalise(float* out, const float* x, const float* mean,
                                        const float* inv_std, unsigned int c,
                                        unsigned int hw, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int ch = i % c, rest = i / c;
    unsigned int p = rest % hw, b = rest / hw;
    out[i] = __fmul_rn(__fsub_rn(x[(b * c + ch) * hw + p], mean[ch]), inv_std[ch]);
}

// dx[(b·c + ch)·hw + p] = dn[(b·hw + p)·c + ch]·inv_std[ch]: the normalisation's
// backward pass, NHWC in, NCHW out (one thread per output value).
extern "C" __global__ void de_denormalise(float* dx, const float* dn, const float* inv_std,
                                          unsigned int c, unsigned int hw, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int p = i % hw, rest = i / hw;
    unsigned int ch = rest % c, b = rest / c;
    dx[i] = __fmul_rn(dn[(b * hw + p) * c + ch], inv_std[ch]);
}

// out[b·c + ch] = (Σ_p x[(b·hw + p)·c + ch], p in order)·(1/hw): global average
// pooling.
extern "C" __global__ void de_avg_pool(float* out, const float* x, unsigned int hw,
                                       unsigned int c, unsigned int n) {
    unsigned int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    unsigned int ch = j % c, b = j / c;
    const float* row = x + (unsigned long long)b * hw * c + ch;
    float s = 0.0f;
    for (unsigned int p = 0; p < hw; ++p) s = __fadd_rn(s, row[(unsigned long long)p * c]);
    out[j] = __fmul_rn(s, __frcp_rn((float)hw));
}

// out[b·k + j] = bias[j] + Σ_ch w[j·c + ch]·x[b·c + ch] (the sum in channel order,
// then the bias): the linear layer.
extern "C" __global__ void de_linear(float* out, const float* x, const float* w,
                                     const float* bias, unsigned int c, unsigned int k,
                                     unsigned int n) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    unsigned int j = t % k, b = t / k;
    float s = 0.0f;
    for (unsigned int ch = 0; ch < c; ++ch) s = __fadd_rn(s, __fmul_rn(w[j * c + ch], x[b * c + ch]));
    out[t] = __fadd_rn(s, bias[j]);
}

// d[(b·hw + p)·c + ch] = (Σ_j dl[b·k + j]·w[j·c + ch])·(1/hw): the linear layer's and
// the pooling's input gradient in one.
extern "C" __global__ void de_linear_pool_backward(float* d, const float* dl, const float* w,
                                                   unsigned int c, unsigned int k,
                                                   unsigned int hw, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int ch = i % c, b = i / (c * hw);
    float s = 0.0f;
    for (unsigned int j = 0; j < k; ++j) s = __fadd_rn(s, __fmul_rn(dl[b * k + j], w[j * c + ch]));
    d[i] = __fmul_rn(s, __frcp_rn((float)hw));
}

// The train program's kernels (kernels/device_train.rs holds their twins).

// d ← d·[y > 0]: the gradient through a ReLU whose output is y, in place.
extern "C" __global__ void de_relu_mask_inplace(float* d, const float* y, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = __fmul_rn(d[i], y[i] > 0.0f ? 1.0f : 0.0f);
}

// y ← relu(y + r): the end of a post-activation block in the train program.
extern "C" __global__ void dt_add_relu_inplace(float* y, const float* r, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = __fadd_rn(y[i], r[i]);
    y[i] = v > 0.0f ? v : 0.0f;
}

// d ← d + r.
extern "C" __global__ void de_add_inplace(float* d, const float* r, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = __fadd_rn(d[i], r[i]);
}

// The linear layer's parameter gradients from the logits' gradient dl (B, K) and its
// input x (B, C): out[j·c + ch] = Σ_b dl[b·k + j]·x[b·c + ch] (t < k·c), then
// out[k·c + j] = Σ_b dl[b·k + j]; the images in order.
extern "C" __global__ void de_linear_param_grads(float* out, const float* dl, const float* x,
                                                 unsigned int b, unsigned int c,
                                                 unsigned int k, unsigned int n) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float s = 0.0f;
    if (t < k * c) {
        unsigned int j = t / c, ch = t % c;
        for (unsigned int i = 0; i < b; ++i) s = __fadd_rn(s, __fmul_rn(dl[i * k + j], x[i * c + ch]));
    } else {
        unsigned int j = t - k * c;
        for (unsigned int i = 0; i < b; ++i) s = __fadd_rn(s, dl[i * k + j]);
    }
    out[t] = s;
}

// A stochastic student's noisy BatchNorm in the train program (kernels/device_train.rs
// holds the twins).

// σ[ch] = √(max(γ²·(1 − (ε·r)·r), 0) + 1e-5), r = stats[c + ch] = 1/√(var + ε): the
// batch standard deviation per channel of h = γ·(x − μ)·r + β.
extern "C" __global__ void dt_noise_sigma(float* sigma, const float* gamma, const float* stats,
                                          float eps, unsigned int c) {
    unsigned int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    float r = stats[c + ch], g = gamma[ch];
    float v = __fmul_rn(__fmul_rn(g, g), __fsub_rn(1.0f, __fmul_rn(__fmul_rn(eps, r), r)));
    v = v > 0.0f ? v : 0.0f;
    sigma[ch] = __fsqrt_rn(__fadd_rn(v, 1e-5f));
}

// y ← relu(y + z·((α·σ[ch])·s)), α = alpha[0].
extern "C" __global__ void dt_noise_relu_inplace(float* y, const float* z, const float* sigma,
                                                 const float* alpha, float scale,
                                                 unsigned int c, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = __fmul_rn(__fmul_rn(alpha[0], sigma[i % c]), scale);
    float v = __fadd_rn(y[i], __fmul_rn(z[i], s));
    y[i] = v > 0.0f ? v : 0.0f;
}

// partial[b] = Σ d[i]·z[i]·σ[i mod c] over block b's share: thread t of block b sums
// i = b·256 + t, b·256 + t + stride, … (stride = blocks·256) in order, then the block
// adds its threads' sums by halving. 256 threads per block.
extern "C" __global__ void dt_noise_dot(float* partial, const float* d, const float* z,
                                        const float* sigma, unsigned int c, unsigned int n) {
    __shared__ float v[256];
    unsigned int t = threadIdx.x, b = blockIdx.x, stride = gridDim.x * 256u;
    float s = 0.0f;
    for (unsigned int i = b * 256u + t; i < n; i += stride)
        s = __fadd_rn(s, __fmul_rn(__fmul_rn(d[i], z[i]), sigma[i % c]));
    v[t] = s;
    __syncthreads();
    for (unsigned int h = 128u; h > 0u; h >>= 1) {
        if (t < h) v[t] = __fadd_rn(v[t], v[t + h]);
        __syncthreads();
    }
    if (t == 0u) partial[b] = v[0];
}

// out[0] = (Σ_b partial[b], in order)·scale: α's gradient.
extern "C" __global__ void dt_noise_alpha_grad(float* out, const float* partial,
                                               unsigned int blocks, float scale) {
    if (blockIdx.x != 0u || threadIdx.x != 0u) return;
    float s = 0.0f;
    for (unsigned int b = 0; b < blocks; ++b) s = __fadd_rn(s, partial[b]);
    out[0] = __fmul_rn(s, scale);
}

// An OAT layer's FiLM in the train program (kernels/device_train.rs holds the twins):
// image i's [γ_f | β_f] at f + 2c·i, `per` values per image.

// y = relu(h·(γ_f + 1) + β_f).
extern "C" __global__ void dt_film_relu(float* y, const float* h, const float* f,
                                        unsigned int c, unsigned int per, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int img = i / per, ch = i % c;
    const float* fi = f + (unsigned long long)img * 2u * c;
    float v = __fadd_rn(__fmul_rn(h[i], __fadd_rn(fi[ch], 1.0f)), fi[c + ch]);
    y[i] = v > 0.0f ? v : 0.0f;
}

// df[img·2c + j] = Σ over the image's pixels in order of d·h (j < c) or d (j ≥ c),
// channel j mod c: the FiLM outputs' gradients.
extern "C" __global__ void dt_film_grads(float* df, const float* d, const float* h,
                                         unsigned int c, unsigned int per, unsigned int n) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    unsigned int img = t / (2u * c), j = t % (2u * c), ch = j % c, hw = per / c;
    const float* di = d + (unsigned long long)img * per + ch;
    const float* hi = h + (unsigned long long)img * per + ch;
    float s = 0.0f;
    for (unsigned int p = 0; p < hw; ++p) {
        unsigned long long k = (unsigned long long)p * c;
        s = __fadd_rn(s, j < c ? __fmul_rn(di[k], hi[k]) : di[k]);
    }
    df[t] = s;
}

// d ← d·(γ_f + 1).
extern "C" __global__ void dt_film_scale(float* d, const float* f, unsigned int c,
                                         unsigned int per, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int img = i / per, ch = i % c;
    d[i] = __fmul_rn(d[i], __fadd_rn(f[(unsigned long long)img * 2u * c + ch], 1.0f));
}
