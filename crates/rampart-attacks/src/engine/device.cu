// The CUDA kernels of the attacks' device loops: PGD's (engine/device.rs), its
// resident training batch (engine/resident.rs) and APGD's (apgd/device.rs), compiled
// by NVRTC at first use (engine/device_cuda.rs). Each does its CPU twin's operations
// (the `twin` modules) in the same order, with __dadd_rn, __dmul_rn, __fadd_rn, ... so
// that nothing is contracted into a multiply-add. The tests also compile this file
// with a C++ compiler, each CUDA thread a host thread (rampart_models::kernels::emulate),
// and hold its results to the twins bit for bit.
__device__ __forceinline__ float step_toward(float a, float x) {
    if (a == 0.0f) return x > a ? __uint_as_float(1u) : __uint_as_float(0x80000001u);
    bool away_from_zero = (a > 0.0f) == (x > a);
    unsigned int bits = __float_as_uint(a);
    return __uint_as_float(away_from_zero ? bits + 1u : bits - 1u);
}

// x + delta rounded to f32, clamped to [lo, hi], and where that went past |delta| the
// next f32 towards x: the host's `Batch::store` of one coordinate.
__device__ __forceinline__ float stored_toward(float xf, double delta, float lo, float hi) {
    double xc = (double)xf;
    float s = __double2float_rn(__dadd_rn(xc, delta));
    s = s < lo ? lo : (s > hi ? hi : s);
    if (fabs(__dsub_rn((double)s, xc)) > fabs(delta)) s = step_toward(s, xf);
    return s;
}

__device__ __forceinline__ double clampd(double v, double lo, double hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// obj[i] += values[i] / n, probs[i] += p[i], grad[i] += g[i] / n (f32); each sum
// starts at 0 when first. One thread per element of the largest of the three.
extern "C" __global__ void atk_accumulate(double* obj, double* probs, float* grad,
                                          const double* values, const float* p,
                                          const float* g, unsigned int m, unsigned int mk,
                                          unsigned int md, unsigned int n, int first) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < m) obj[i] = __dadd_rn(first ? 0.0 : obj[i], __ddiv_rn(values[i], (double)n));
    if (i < mk) probs[i] = __dadd_rn(first ? 0.0 : probs[i], (double)p[i]);
    if (g != 0 && i < md) {
        grad[i] = __fadd_rn(first ? 0.0f : grad[i], __fdiv_rn(g[i], (float)n));
    }
}

// One block per row: thread 0 judges the candidate from the sums (first arg-max of
// the mean probabilities), offers it to the row's best and accepts it (or divides the
// step size by the backtracking factor); then the block copies the rows it took.
// rows: per row [lr, cur_obj, cur_success, best_obj, best_success, nan].
extern "C" __global__ void atk_judge(double* rows, float* best, float* adv, float* grad,
                                     const float* cand, const float* acc_grad,
                                     const double* obj, const double* probs,
                                     const unsigned int* labels, unsigned int k,
                                     unsigned int d, unsigned int n, int criterion,
                                     unsigned int target, float tau, int first,
                                     int want_grad, double backtrack) {
    __shared__ int take_best, take_adv;
    unsigned int j = blockIdx.x;
    double* r = rows + 6ull * j;
    if (threadIdx.x == 0) {
        const double* pr = probs + (unsigned long long)j * k;
        unsigned int pred = 0;
        float conf = __int_as_float(0xff800000); // -inf
        int nan = 0;
        for (unsigned int c = 0; c < k; c++) {
            float p = __double2float_rn(__ddiv_rn(pr[c], (double)n));
            if (isnan(p)) nan = 1;
            if (p > conf) { pred = c; conf = p; }
        }
        unsigned int label = labels[j];
        int success;
        if (criterion == 0) success = pred != label;
        else if (criterion == 1) success = pred == target;
        else if (criterion == 2) success = pred != label && conf >= tau;
        else success = conf >= tau;
        double o = obj[j];
        if (isnan(o)) o = __longlong_as_double(0xfff0000000000000ll); // -inf
        int best_success = r[4] != 0.0;
        int better = first || (success && !best_success)
                     || (success == best_success && o > r[3]);
        if (better) { r[3] = o; r[4] = success ? 1.0 : 0.0; }
        int accept = first || backtrack == 0.0 || o >= r[1];
        if (accept) { r[1] = o; r[2] = success ? 1.0 : 0.0; }
        else r[0] = __ddiv_rn(r[0], backtrack);
        if (nan) r[5] = 1.0;
        take_best = better;
        take_adv = accept;
    }
    __syncthreads();
    unsigned long long base = (unsigned long long)j * d;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = cand[base + c];
        if (take_best) best[base + c] = v;
        if (take_adv) {
            adv[base + c] = v;
            if (want_grad) grad[base + c] = acc_grad[base + c];
        }
    }
}

// One L-inf step per element: the gradient's sign (zero where not finite, masked, or
// pushing a coordinate on a bound outwards), momentum, step, mask, box, eps-ball,
// box, then x + delta rounded to f32 and, where that went past |delta|, the next f32
// towards x.
extern "C" __global__ void atk_step_linf(float* cand, double* mom, const float* adv,
                                         const float* x, const float* grad,
                                         const double* rows, const double* mask,
                                         unsigned int d, unsigned int md, double eps,
                                         double beta, float lo, float hi) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= md) return;
    unsigned int row = i / d, c = i % d;
    float a = adv[i], xc = x[i];
    double v = (double)grad[i];
    if (!isfinite(v)) v = 0.0;
    if (mask != 0) v = __dmul_rn(v, mask[c]);
    if ((a >= hi && v > 0.0) || (a <= lo && v < 0.0)) v = 0.0;
    v = v > 0.0 ? 1.0 : (v < 0.0 ? -1.0 : 0.0);
    double m = __dadd_rn(__dmul_rn(beta, mom[i]), __dmul_rn(__dsub_rn(1.0, beta), v));
    mom[i] = m;
    double delta = __dadd_rn(__dsub_rn((double)a, (double)xc), __dmul_rn(rows[6ull * row], m));
    if (mask != 0) delta = __dmul_rn(delta, mask[c]);
    double l = __dsub_rn((double)lo, (double)xc), h = __dsub_rn((double)hi, (double)xc);
    delta = clampd(delta, l, h);
    delta = clampd(delta, -eps, eps);
    delta = clampd(delta, l, h);
    cand[i] = stored_toward(xc, delta, lo, hi);
}

__device__ double norm2(const double* v, unsigned int d) {
    double sum = 0.0;
    for (unsigned int c = 0; c < d; c++) sum = __dadd_rn(sum, __dmul_rn(v[c], v[c]));
    return __dsqrt_rn(sum);
}

// The L2 projection of a block's row v (D values) onto the eps-ball, as the host's
// Norm::project: scaled onto the sphere, then shrunk by ulps until its norm is at most
// eps; each norm summed by thread 0 in coordinate order. Every thread of the block calls it.
__device__ void project_l2_row(double* v, unsigned int d, double eps) {
    __shared__ double norm;
    __shared__ int more;
    __syncthreads();
    if (threadIdx.x == 0) norm = norm2(v, d);
    __syncthreads();
    if (norm > eps) {
        double scale = __ddiv_rn(eps, norm);
        for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) v[c] = __dmul_rn(v[c], scale);
        const double shrink = 1.0 - 2.220446049250313e-16;
        double factor = shrink;
        for (;;) {
            __syncthreads();
            if (threadIdx.x == 0) more = norm2(v, d) > eps;
            __syncthreads();
            if (!more) break;
            for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) v[c] = __dmul_rn(v[c], factor);
            factor = __dmul_rn(factor, shrink);
        }
    }
    __syncthreads();
}

// One block per row: as atk_step_linf with the L2 direction (the gradient over its
// norm, when not zero) and the L2 projection (scaled onto the sphere, then shrunk by
// ulps until its norm is at most eps). Each norm is summed by thread 0 in coordinate
// order, as the host does; `scratch` holds the row's direction, then its delta.
extern "C" __global__ void atk_step_l2(float* cand, double* mom, double* scratch,
                                       const float* adv, const float* x, const float* grad,
                                       const double* rows, const double* mask,
                                       unsigned int d, double eps, double beta, float lo,
                                       float hi) {
    __shared__ double norm;
    unsigned int row = blockIdx.x;
    unsigned long long base = (unsigned long long)row * d;
    double* v = scratch + base;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        float a = adv[base + c];
        double g = (double)grad[base + c];
        if (!isfinite(g)) g = 0.0;
        if (mask != 0) g = __dmul_rn(g, mask[c]);
        if ((a >= hi && g > 0.0) || (a <= lo && g < 0.0)) g = 0.0;
        v[c] = g;
    }
    __syncthreads();
    if (threadIdx.x == 0) norm = norm2(v, d);
    __syncthreads();
    double n = norm, lr = rows[6ull * row];
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        unsigned long long i = base + c;
        double g = n > 0.0 ? __ddiv_rn(v[c], n) : v[c];
        double m = __dadd_rn(__dmul_rn(beta, mom[i]), __dmul_rn(__dsub_rn(1.0, beta), g));
        mom[i] = m;
        double xc = (double)x[i];
        double delta = __dadd_rn(__dsub_rn((double)adv[i], xc), __dmul_rn(lr, m));
        if (mask != 0) delta = __dmul_rn(delta, mask[c]);
        v[c] = clampd(delta, __dsub_rn((double)lo, xc), __dsub_rn((double)hi, xc));
    }
    project_l2_row(v, d, eps);
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        unsigned long long i = base + c;
        float xc = x[i];
        double delta = clampd(v[c], __dsub_rn((double)lo, (double)xc),
                              __dsub_rn((double)hi, (double)xc));
        cand[i] = stored_toward(xc, delta, lo, hi);
    }
}

// The kernels of a training attack whose batch stays on the device (engine/resident.rs).
// verdict: per row [bad_input, bad_label, saw_nan, record_obj, record_success, distance].

// One block per row (at most 256 threads): flags an input value that is NaN or
// outside [lo, hi] and a label >= k, and starts the row's record (the clean input,
// not a success, objective -inf).
extern "C" __global__ void atk_check(double* verdict, const float* x,
                                     const unsigned int* labels, unsigned int d,
                                     unsigned int k, float lo, float hi) {
    __shared__ int bad[256];
    unsigned int j = blockIdx.x;
    unsigned long long base = (unsigned long long)j * d;
    int b = 0;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = x[base + c];
        if (isnan(v) || v < lo || v > hi) b = 1;
    }
    bad[threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.x == 0) {
        int any = 0;
        for (unsigned int t = 0; t < blockDim.x; t++) any |= bad[t];
        double* r = verdict + 6ull * j;
        r[0] = any ? 1.0 : 0.0;
        r[1] = labels[j] >= k ? 1.0 : 0.0;
        r[2] = 0.0;
        r[3] = __longlong_as_double(0xfff0000000000000ll); // -inf
        r[4] = 0.0;
        r[5] = 0.0;
    }
}

// One L-inf start per element: x + delta (0 where delta is null) through the box, the
// eps-ball and the box, rounded to f32 towards x (the host's `finish`).
extern "C" __global__ void atk_start_linf(float* cand, const float* x, const double* delta,
                                          unsigned int md, double eps, float lo, float hi) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= md) return;
    float xc = x[i];
    double v = delta != 0 ? delta[i] : 0.0;
    double l = __dsub_rn((double)lo, (double)xc), h = __dsub_rn((double)hi, (double)xc);
    v = clampd(v, l, h);
    v = clampd(v, -eps, eps);
    v = clampd(v, l, h);
    cand[i] = stored_toward(xc, v, lo, hi);
}

// rand_chacha 0.3's ChaCha8Rng, seeded as rand_core 0.6's `seed_from_u64` seeds it:
// PCG32 steps from `state` give the eight key words (each output rotated right by the
// state's top five bits).
__device__ __forceinline__ void chacha8_key(unsigned long long state, unsigned int key[8]) {
    for (int k = 0; k < 8; k++) {
        state = state * 6364136223846793005ull + 11634580027462260723ull;
        unsigned int xorshifted = (unsigned int)(((state >> 18) ^ state) >> 27);
        unsigned int rot = (unsigned int)(state >> 59);
        key[k] = (xorshifted >> rot) | (xorshifted << ((32u - rot) & 31u));
    }
}

__device__ __forceinline__ unsigned int rotl32(unsigned int v, int r) {
    return (v << r) | (v >> (32 - r));
}

#define CHACHA_QR(a, b, c, d)                 \
    x[a] += x[b]; x[d] = rotl32(x[d] ^ x[a], 16); \
    x[c] += x[d]; x[b] = rotl32(x[b] ^ x[c], 12); \
    x[a] += x[b]; x[d] = rotl32(x[d] ^ x[a], 8);  \
    x[c] += x[d]; x[b] = rotl32(x[b] ^ x[c], 7);

// Block `counter` of the ChaCha8 stream `nonce` under `key`: 16 words, the 64-bit
// block counter in words 12-13 and the stream in words 14-15 (low word first).
__device__ void chacha8_block(const unsigned int key[8], unsigned long long counter,
                              unsigned long long nonce, unsigned int out[16]) {
    unsigned int s[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                          key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
                          (unsigned int)counter, (unsigned int)(counter >> 32),
                          (unsigned int)nonce, (unsigned int)(nonce >> 32)};
    unsigned int x[16];
    for (int k = 0; k < 16; k++) x[k] = s[k];
    for (int r = 0; r < 4; r++) {
        CHACHA_QR(0, 4, 8, 12) CHACHA_QR(1, 5, 9, 13) CHACHA_QR(2, 6, 10, 14) CHACHA_QR(3, 7, 11, 15)
        CHACHA_QR(0, 5, 10, 15) CHACHA_QR(1, 6, 11, 12) CHACHA_QR(2, 7, 8, 13) CHACHA_QR(3, 4, 9, 14)
    }
    for (int k = 0; k < 16; k++) out[k] = x[k] + s[k];
}

// The L-inf uniform starts' perturbations drawn on the device, the values the host
// draws (`Norm::sample` with `Init::Uniform` on `example_rng`): row i (of `rows`, D
// values each) is ChaCha8 seeded with `seed_from_u64(s)` on stream i, s = `seed`, or
// with `seed_at` (two words, low first, on the device: a training step's seed written
// before a CUDA graph of the step replays) its value plus `seed` (the restart); value j
// eps * (v * scale + low), v from the stream's u64 draw j (words 2j and 2j + 1, low
// first) as rand's `gen_range(-1.0..=1.0)` makes it: the top 52 bits as a float in
// [1, 2), minus 1. One thread per block of 16 words (8 values).
extern "C" __global__ void atk_draw_linf(double* delta, const unsigned int* seed_at,
                                         unsigned long long seed, unsigned int rows,
                                         unsigned int d, double eps, double scale,
                                         double low) {
    unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long per_row = (d + 7ull) / 8ull;
    if (t >= (unsigned long long)rows * per_row) return;
    unsigned long long i = t / per_row, blk = t % per_row;
    if (seed_at != 0) seed += ((unsigned long long)seed_at[1] << 32) | seed_at[0];
    unsigned int key[8], words[16];
    chacha8_key(seed, key);
    chacha8_block(key, blk, i, words);
    for (int k = 0; k < 8; k++) {
        unsigned long long j = blk * 8ull + k;
        if (j >= d) break;
        unsigned long long bits = ((unsigned long long)words[2 * k + 1] << 32) | words[2 * k];
        double v = __longlong_as_double((long long)((bits >> 12) | 0x3FF0000000000000ull));
        double u = __dadd_rn(__dmul_rn(__dsub_rn(v, 1.0), scale), low);
        delta[i * d + j] = __dmul_rn(eps, u);
    }
}

// One block per row: a run's result offered to the row's record. The run's best point
// (success and objective from its rows) replaces the record when it is a success and
// the record is not, or both agree and its objective is strictly higher; with `take`
// the point replaces it whatever it is (a last iterate). A NaN seen by the run is kept.
extern "C" __global__ void atk_offer(double* verdict, float* rec, const float* point,
                                     const double* rows, unsigned int d, int take) {
    __shared__ int better;
    unsigned int j = blockIdx.x;
    if (threadIdx.x == 0) {
        double* v = verdict + 6ull * j;
        const double* r = rows + 6ull * j;
        if (r[5] != 0.0) v[2] = 1.0;
        int success = r[4] != 0.0, rec_success = v[4] != 0.0;
        int b = take || (success && !rec_success) || (success == rec_success && r[3] > v[3]);
        if (b) {
            v[3] = take ? __longlong_as_double(0xfff0000000000000ll) : r[3];
            v[4] = (!take && success) ? 1.0 : 0.0;
        }
        better = b;
    }
    __syncthreads();
    if (!better) return;
    unsigned long long base = (unsigned long long)j * d;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) rec[base + c] = point[base + c];
}

// One block per row (at most 256 threads): the L-inf distance of the record from the
// clean input, max |rec - x| in f64 (a maximum: the same in any order).
extern "C" __global__ void atk_measure(double* verdict, const float* rec, const float* x,
                                       unsigned int d) {
    __shared__ double most[256];
    unsigned int j = blockIdx.x;
    unsigned long long base = (unsigned long long)j * d;
    double m = 0.0;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        m = fmax(m, fabs(__dsub_rn((double)rec[base + c], (double)x[base + c])));
    }
    most[threadIdx.x] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        double all = 0.0;
        for (unsigned int t = 0; t < blockDim.x; t++) all = fmax(all, most[t]);
        verdict[6ull * j + 5] = all;
    }
}

// APGD's loop with its state on the device (apgd/device.rs). rows: per row [loss,
// best_loss, best_loss_last_check, reduced_last_check, increases, step, success, nan];
// pos[row]: the row's place among the rows evaluated this step, or 0xffffffff when the
// row is no longer attacked (its example fooled). rec: per example [success, objective,
// nan_seen] of the record.

// One L-inf proposal per element of the attacked rows: z = P(cur + step*sign(g)), then
// P(cur + a(z - cur) + (1 - a)(cur - prev)), P the eps-ball then the box; the current
// point becomes the old one and the proposal, stored towards x, the current one.
extern "C" __global__ void apgd_propose_linf(float* adv, float* old, const float* x,
                                             const float* grad, const double* rows,
                                             const unsigned int* pos, unsigned int d,
                                             unsigned int md, double eps, double a,
                                             float lo, float hi) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= md) return;
    unsigned int row = i / d;
    if (pos[row] == 0xffffffffu) return;
    float xf = x[i];
    double xc = (double)xf;
    double l = __dsub_rn((double)lo, xc), h = __dsub_rn((double)hi, xc);
    double cur = __dsub_rn((double)adv[i], xc);
    float gf = grad[i];
    double g = isfinite(gf) ? (double)gf : 0.0;
    double sign = g > 0.0 ? 1.0 : (g < 0.0 ? -1.0 : 0.0);
    double step = rows[8ull * row + 5];
    double z = clampd(clampd(__dadd_rn(cur, __dmul_rn(step, sign)), -eps, eps), l, h);
    double prev = __dsub_rn((double)old[i], xc);
    double next = __dadd_rn(__dadd_rn(cur, __dmul_rn(a, __dsub_rn(z, cur))),
                            __dmul_rn(__dsub_rn(1.0, a), __dsub_rn(cur, prev)));
    next = clampd(clampd(next, -eps, eps), l, h);
    old[i] = adv[i];
    adv[i] = stored_toward(xf, next, lo, hi);
}

// One block per attacked row: the L2 proposal (the gradient over its norm + 1e-12, the
// L2 projection and the box, twice), `scratch` holding the row's working values.
extern "C" __global__ void apgd_propose_l2(float* adv, float* old, double* scratch,
                                           const float* x, const float* grad,
                                           const double* rows, const unsigned int* pos,
                                           unsigned int d, double eps, double a, float lo,
                                           float hi) {
    __shared__ double gnorm;
    unsigned int row = blockIdx.x;
    if (pos[row] == 0xffffffffu) return;
    unsigned long long base = (unsigned long long)row * d;
    double* v = scratch + base;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        float gf = grad[base + c];
        v[c] = isfinite(gf) ? (double)gf : 0.0;
    }
    __syncthreads();
    if (threadIdx.x == 0) gnorm = norm2(v, d);
    __syncthreads();
    double scale = __ddiv_rn(1.0, __dadd_rn(gnorm, 1e-12));
    double step = rows[8ull * row + 5];
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        double cur = __dsub_rn((double)adv[base + c], (double)x[base + c]);
        v[c] = __dadd_rn(cur, __dmul_rn(step, __dmul_rn(v[c], scale)));
    }
    project_l2_row(v, d, eps);
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        double xc = (double)x[base + c];
        double z = clampd(v[c], __dsub_rn((double)lo, xc), __dsub_rn((double)hi, xc));
        double cur = __dsub_rn((double)adv[base + c], xc);
        double prev = __dsub_rn((double)old[base + c], xc);
        v[c] = __dadd_rn(__dadd_rn(cur, __dmul_rn(a, __dsub_rn(z, cur))),
                         __dmul_rn(__dsub_rn(1.0, a), __dsub_rn(cur, prev)));
    }
    project_l2_row(v, d, eps);
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        unsigned long long i = base + c;
        float xf = x[i];
        double xc = (double)xf;
        double delta = clampd(v[c], __dsub_rn((double)lo, xc), __dsub_rn((double)hi, xc));
        old[i] = adv[i];
        adv[i] = stored_toward(xf, delta, lo, hi);
    }
}

// One block per row: the evaluation of the attacked rows (EOT sums at their places)
// taken into the state. With `first` (the start) every row is set up: the loss (-inf
// where not attacked), the gradient (0 there), the best point and gradient, the
// checkpoint state and the step size. Otherwise, for an attacked row: an increase of
// the loss is counted, the loss and (with want_grad) the gradient replaced, and a
// strictly higher loss becomes the best (the point, and the gradient with want_grad).
// Each attacked row's success (first arg-max of the mean probabilities against its
// label) and NaN flag are left for apgd_offer.
extern "C" __global__ void apgd_update(double* rows, float* grad, float* best_point,
                                       float* best_grad, const float* adv,
                                       const double* obj, const double* probs,
                                       const float* acc_grad, const unsigned int* labels,
                                       const unsigned int* pos, unsigned int k,
                                       unsigned int d, unsigned int n, int first,
                                       int want_grad, double step0) {
    __shared__ int copy_grad, take_best, copy_best_grad;
    unsigned int j = blockIdx.x;
    unsigned int r = pos[j];
    int live = r != 0xffffffffu;
    double* s = rows + 8ull * j;
    if (threadIdx.x == 0) {
        const double neg_inf = __longlong_as_double(0xfff0000000000000ll);
        double o = neg_inf;
        if (live) {
            o = obj[r];
            if (isnan(o)) o = neg_inf;
            const double* pr = probs + (unsigned long long)r * k;
            unsigned int pred = 0;
            float conf = __int_as_float(0xff800000);
            int nan = 0;
            for (unsigned int c = 0; c < k; c++) {
                float p = __double2float_rn(__ddiv_rn(pr[c], (double)n));
                if (isnan(p)) nan = 1;
                if (p > conf) { pred = c; conf = p; }
            }
            s[6] = pred != labels[j] ? 1.0 : 0.0;
            s[7] = nan ? 1.0 : 0.0;
        }
        if (first) {
            s[0] = o; s[1] = o; s[2] = o; s[3] = 1.0; s[4] = 0.0; s[5] = step0;
            copy_grad = 1; take_best = 1; copy_best_grad = 1;
        } else if (live) {
            if (o > s[0]) s[4] = __dadd_rn(s[4], 1.0);
            s[0] = o;
            copy_grad = want_grad;
            take_best = o > s[1];
            if (take_best) s[1] = o;
            copy_best_grad = take_best && want_grad;
        } else {
            copy_grad = 0; take_best = 0; copy_best_grad = 0;
        }
    }
    __syncthreads();
    unsigned long long base = (unsigned long long)j * d;
    unsigned long long from = (unsigned long long)r * d;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        if (copy_grad) grad[base + c] = live ? acc_grad[from + c] : 0.0f;
        if (take_best) best_point[base + c] = adv[base + c];
        if (copy_best_grad) best_grad[base + c] = grad[base + c];
    }
}

// One block per example: its attacked rows' points offered to its record in row order
// (a success beats a non-success, then a strictly higher objective; ties keep the
// earlier point); the last one taken is copied. A NaN seen is kept.
extern "C" __global__ void apgd_offer(double* rec, float* rec_points, const double* rows,
                                      const float* adv, const unsigned int* pos,
                                      const unsigned int* row_start,
                                      const unsigned int* row_list, unsigned int d) {
    __shared__ long long winner;
    unsigned int e = blockIdx.x;
    if (threadIdx.x == 0) {
        double* re = rec + 3ull * e;
        int rs = re[0] != 0.0;
        double ro = re[1];
        long long w = -1;
        for (unsigned int q = row_start[e]; q < row_start[e + 1]; q++) {
            unsigned int j = row_list[q];
            if (pos[j] == 0xffffffffu) continue;
            const double* s = rows + 8ull * j;
            int success = s[6] != 0.0;
            double o = s[0];
            if (s[7] != 0.0) re[2] = 1.0;
            if ((success && !rs) || (success == rs && o > ro)) {
                rs = success;
                ro = o;
                w = j;
            }
        }
        re[0] = rs ? 1.0 : 0.0;
        re[1] = ro;
        winner = w;
    }
    __syncthreads();
    if (winner < 0) return;
    unsigned long long to = (unsigned long long)e * d, from = (unsigned long long)winner * d;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) rec_points[to + c] = adv[from + c];
}

// One block per attacked row at a checkpoint after `interval` steps: the step is halved
// and the point and gradient reset to the best when at most rho of the interval's
// steps increased the loss, or when the last checkpoint did not halve and the best loss
// has not improved since; the increase count restarts.
extern "C" __global__ void apgd_check(double* rows, float* adv, float* grad,
                                      const float* best_point, const float* best_grad,
                                      const unsigned int* pos, unsigned int d, double rho,
                                      unsigned int interval) {
    __shared__ int reset;
    unsigned int j = blockIdx.x;
    if (pos[j] == 0xffffffffu) return;
    if (threadIdx.x == 0) {
        double* s = rows + 8ull * j;
        int oscillating = s[4] <= __dmul_rn(rho, (double)interval);
        int stalled = s[3] == 0.0 && s[2] >= s[1];
        int reduce = oscillating || stalled;
        s[3] = reduce ? 1.0 : 0.0;
        s[2] = s[1];
        if (reduce) s[5] = __ddiv_rn(s[5], 2.0);
        s[4] = 0.0;
        reset = reduce;
    }
    __syncthreads();
    if (!reset) return;
    unsigned long long base = (unsigned long long)j * d;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        adv[base + c] = best_point[base + c];
        grad[base + c] = best_grad[base + c];
    }
}
