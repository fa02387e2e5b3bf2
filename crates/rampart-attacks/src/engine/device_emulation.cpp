// The CUDA kernels of device.cu run on the CPU, for the tests (engine/device_tests.rs):
// each CUDA thread a host thread, the blocks one after the other, __syncthreads a
// barrier, __shared__ variables statics (one block runs at a time), the rounding
// intrinsics the host's IEEE operations (compiled with -ffp-contract=off, so nothing
// is fused). `emulate DIR` reads the inputs the test wrote into DIR (raw
// little-endian arrays, NAME.bin) and writes each launch's outputs beside them
// (emu_*.bin), which the test compares with the kernels' Rust twins.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>
#include <memory>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
std::unique_ptr<std::barrier<>> bar;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
static inline void __syncthreads() { bar->arrive_and_wait(); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return std::sqrt(a); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __double2float_rn(double a) { return (float)a; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
static inline double __longlong_as_double(long long u) { double f; memcpy(&f, &u, 8); return f; }
using std::isnan; using std::isfinite; using std::fabs;
#include "device.cu"

template <class F> void launch(unsigned grid, unsigned block, F f) {
  gridDim.x = grid; blockDim.x = block;
  for (unsigned b = 0; b < grid; b++) {
    bar = std::make_unique<std::barrier<>>(block);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; t++)
      ts.emplace_back([=] { blockIdx.x = b; threadIdx.x = t; f(); });
    for (auto& t : ts) t.join();
  }
}
static std::string dir;
template <class T> std::vector<T> rd(const std::string& n) {
  FILE* f = fopen((dir + "/" + n + ".bin").c_str(), "rb");
  if (!f) { fprintf(stderr, "missing %s\n", n.c_str()); exit(1); }
  fseek(f, 0, SEEK_END); long sz = ftell(f); fseek(f, 0, SEEK_SET);
  std::vector<T> v(sz / sizeof(T));
  if (fread(v.data(), 1, sz, f) != (size_t)sz) { fprintf(stderr, "short read %s\n", n.c_str()); exit(1); }
  fclose(f); return v;
}
template <class T> void wr(const std::string& n, const std::vector<T>& v) {
  FILE* f = fopen((dir + "/" + n + ".bin").c_str(), "wb");
  fwrite(v.data(), sizeof(T), v.size(), f); fclose(f);
}
int main(int argc, char** argv) {
  if (argc != 2) { fprintf(stderr, "usage: emulate DIR\n"); return 2; }
  dir = argv[1];
  auto dims = rd<uint32_t>("dims");
  unsigned m = dims[0], d = dims[1], k = dims[2];
  // Steps: cases c = 0..ncases, params in step_params (f64: l2, masked, beta, eps).
  auto sp = rd<double>("step_params");
  for (unsigned c = 0; c * 4 < sp.size(); c++) {
    bool l2 = sp[4 * c] != 0, masked = sp[4 * c + 1] != 0;
    double beta = sp[4 * c + 2], eps = sp[4 * c + 3];
    auto cand = std::vector<float>(m * d, NAN);
    auto mom = rd<double>("mom"); auto adv = rd<float>("adv"); auto x = rd<float>("x");
    auto grad = rd<float>("grad"); auto rows = rd<double>("rows"); auto mask = rd<double>("mask");
    std::vector<double> scratch(m * d, NAN);
    const double* mk = masked ? mask.data() : nullptr;
    float lo = 0.0f, hi = 1.0f;
    if (l2) {
      launch(m, 64, [&] { atk_step_l2(cand.data(), mom.data(), scratch.data(), adv.data(), x.data(), grad.data(), rows.data(), mk, d, eps, beta, lo, hi); });
    } else {
      unsigned n = m * d, blk = 128, grid = (n + blk - 1) / blk;
      launch(grid, blk, [&] { atk_step_linf(cand.data(), mom.data(), adv.data(), x.data(), grad.data(), rows.data(), mk, d, n, eps, beta, lo, hi); });
    }
    wr("emu_cand_" + std::to_string(c), cand); wr("emu_mom_" + std::to_string(c), mom);
  }
  // Judge: params per case (f64): criterion, target, tau, samples, first, want_grad, backtrack.
  auto jp = rd<double>("judge_params");
  for (unsigned c = 0; c * 7 < jp.size(); c++) {
    auto rows = rd<double>("j_rows"); auto best = rd<float>("j_best"); auto adv = rd<float>("j_adv");
    auto grad = rd<float>("j_grad"); auto cand = rd<float>("j_cand"); auto accg = rd<float>("j_accg");
    auto obj = rd<double>("j_obj"); auto probs = rd<double>("j_probs"); auto labels = rd<uint32_t>("j_labels");
    const double* p = &jp[7 * c];
    launch(m, 32, [&] { atk_judge(rows.data(), best.data(), adv.data(), grad.data(), cand.data(), accg.data(), obj.data(), probs.data(), labels.data(), k, d, (unsigned)p[3], (int)p[0], (unsigned)p[1], (float)p[2], (int)p[4], (int)p[5], p[6]); });
    auto s = std::to_string(c);
    wr("emu_jrows_" + s, rows); wr("emu_jbest_" + s, best); wr("emu_jadv_" + s, adv); wr("emu_jgrad_" + s, grad);
  }
  // Accumulate: first and not, with and without gradient.
  for (int c = 0; c < 4; c++) {
    bool first = c & 1, with_grad = c & 2;
    auto obj = rd<double>("a_obj"); auto probs = rd<double>("a_probs"); auto grad = rd<float>("a_grad");
    auto values = rd<double>("a_values"); auto p = rd<float>("a_p"); auto g = rd<float>("a_g");
    unsigned n = std::max(m * d, m * k), blk = 128, grid = (n + blk - 1) / blk;
    launch(grid, blk, [&] { atk_accumulate(obj.data(), probs.data(), grad.data(), values.data(), p.data(), with_grad ? g.data() : nullptr, m, m * k, m * d, 3, first); });
    auto s = std::to_string(c);
    wr("emu_aobj_" + s, obj); wr("emu_aprobs_" + s, probs); wr("emu_agrad_" + s, grad);
  }
  printf("ok\n");
}
