// The CUDA kernels of the fused SGD update (sgd/cuda.rs launches them; sgd/fused.rs
// holds the CPU kernels they equal): per parameter (sgd_momentum, sgd_weight) and for
// all of them in one launch (sgd_multi). __fmul_rn and __fadd_rn are never contracted
// into an FMA, so a kernel does the CPU kernel's float operations exactly.
extern "C" __global__ void sgd_momentum(float* b, const float* g, const float* w,
                                        float mu, float wd, int decay, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    if (decay) gi = __fadd_rn(gi, __fadd_rn(__fmul_rn(w[i], wd), 0.0f));
    b[i] = __fadd_rn(__fadd_rn(__fmul_rn(b[i], mu), 0.0f), gi);
}

extern "C" __global__ void sgd_weight(float* w, const float* g, const float* b,
                                      float mu, float wd, int decay, int nesterov,
                                      float lr, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float wi = w[i];
    float gi = g[i];
    if (decay) gi = __fadd_rn(gi, __fadd_rn(__fmul_rn(wi, wd), 0.0f));
    float d;
    if (mu == 0.0f) d = gi;
    else if (nesterov) d = __fadd_rn(gi, __fadd_rn(__fmul_rn(b[i], mu), 0.0f));
    else d = b[i];
    w[i] = __fsub_rn(wi, __fadd_rn(__fmul_rn(d, lr), 0.0f));
}

// Every parameter's update in one launch (multi-tensor): meta holds, per tensor,
// [weights, gradient, momentum buffer (device addresses), n, decayed, first block];
// block k updates elements (k - first) * chunk ... + chunk of the last tensor whose
// first block is at most k (found by bisection; an empty tensor shares its first
// block with the next and is passed over). Per element the momentum kernel's then
// the weight kernel's float operations, as sgd_momentum and sgd_weight do them.
extern "C" __global__ void sgd_multi(const unsigned long long* meta, unsigned int tensors,
                                     float mu, float wd, int nesterov, float lr,
                                     unsigned int chunk) {
    unsigned long long k = blockIdx.x;
    unsigned int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        unsigned int mid = lo + (hi - lo + 1) / 2;
        if (meta[6ull * mid + 5] <= k) lo = mid;
        else hi = mid - 1;
    }
    const unsigned long long* e = meta + 6ull * lo;
    float* w = (float*)e[0];
    const float* g = (const float*)e[1];
    float* b = (float*)e[2];
    unsigned long long n = e[3], start = (k - e[5]) * chunk;
    int decay = (int)e[4];
    unsigned long long end = start + chunk < n ? start + chunk : n;
    for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float wi = w[i];
        float gi = g[i];
        if (decay) gi = __fadd_rn(gi, __fadd_rn(__fmul_rn(wi, wd), 0.0f));
        float d;
        if (mu == 0.0f) {
            d = gi;
        } else {
            float bi = __fadd_rn(__fadd_rn(__fmul_rn(b[i], mu), 0.0f), gi);
            b[i] = bi;
            d = nesterov ? __fadd_rn(gi, __fadd_rn(__fmul_rn(bi, mu), 0.0f)) : bi;
        }
        w[i] = __fsub_rn(wi, __fadd_rn(__fmul_rn(d, lr), 0.0f));
    }
}
