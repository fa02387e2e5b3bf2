// CUDA kernels run on the CPU, for tests (kernels/emulate.rs). The kernel source
// (kernels.cu beside this file, CUDA C without includes) is compiled as C++20 after
// the definitions below: each CUDA thread is a host thread (created once per launch
// and reused for every block), the blocks of a launch run one after the other,
// __syncthreads is a barrier of the block's threads and a warp shuffle an exchange
// through a barrier of the warp's, __shared__ variables are
// statics (one block runs at a time), and the rounding intrinsics (__fadd_rn, ...)
// are the host's IEEE operations (compiled with -ffp-contract=off, so nothing is
// fused). A thread that returns early drops out of its barriers, as an exited CUDA
// thread does. Transcendentals (expf, logf) are the host's, which may differ from
// the GPU's in the last bits.
//
// A launch first runs its threads one after another on the main thread, which is
// the same computation for a kernel whose threads do not wait for each other; the
// first barrier or shuffle a thread reaches stops that run, the buffers are put back
// as they were before the launch, and the launch runs again with a host thread per
// CUDA thread. (Most kernels are element-wise: a host thread each made the tests
// slow.)
//
// `emulate DIR` runs the launches of DIR/launches.txt, one per line:
//   KERNEL GX GY GZ BX BY BZ ARG...
// each ARG `b NAME` (the buffer DIR/buf_NAME.bin, raw little-endian bytes, loaded at
// its first use and passed as a pointer), `null 0` (a null pointer), or `u32 V`, `i32 V`, `u64 V` (decimal),
// `f32 BITS`, `f64 BITS` (the value's bits in hexadecimal). After the last launch
// every buffer used is written to DIR/out_NAME.bin. A line `@address TABLE I BUF`
// writes the address of buffer BUF's first byte as the I-th 64-bit value of buffer
// TABLE (a table of device addresses, as a multi-tensor kernel takes). KERNEL_LIST
// (a -D definition) names the kernels: K(name) K(name) ...
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
static std::unique_ptr<std::barrier<>> block_barrier;
struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  uint64_t lanes[32];
};
static std::vector<Warp> warps;
thread_local unsigned int lane_id, warp_id;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

// Whether the launch runs its threads one after another (see the top), and what a
// barrier or shuffle throws then.
static bool serial = false;
struct NeedsThreads {};

static inline void __syncthreads() {
  if (serial) throw NeedsThreads{};
  block_barrier->arrive_and_wait();
}

template <class T>
static T shuffle(T v, unsigned int source_lane) {
  static_assert(sizeof(T) <= 8);
  if (serial) throw NeedsThreads{};
  Warp& w = warps[warp_id];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.lanes[lane_id] = bits;
  w.barrier->arrive_and_wait();
  uint64_t other = w.lanes[source_lane % 32];
  w.barrier->arrive_and_wait();
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}
template <class T>
static inline T __shfl_xor_sync(unsigned int, T v, int mask) {
  return shuffle(v, lane_id ^ (unsigned int)mask);
}
template <class T>
static inline T __shfl_down_sync(unsigned int, T v, unsigned int delta) {
  unsigned int src = lane_id + delta;
  return shuffle(v, src < 32 ? src : lane_id);
}

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return std::sqrt(a); }
static inline float __double2float_rn(double a) { return (float)a; }
static inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float __int_as_float(int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline double __longlong_as_double(long long u) {
  double f;
  std::memcpy(&f, &u, 8);
  return f;
}
// expf, logf, fmaxf, fminf: <cmath>'s C functions.
using std::fabs;
using std::isfinite;
using std::isnan;

#include "kernels.cu"

static std::string dir;
static std::map<std::string, std::vector<unsigned char>> buffers;

static std::vector<unsigned char>& buffer(const std::string& name) {
  auto it = buffers.find(name);
  if (it != buffers.end()) return it->second;
  std::ifstream f(dir + "/buf_" + name + ".bin", std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "no buffer %s\n", name.c_str());
    std::exit(1);
  }
  std::vector<unsigned char> v((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // Eight spare bytes, so that an empty buffer still has an address.
  v.reserve(v.size() + 8);
  return buffers[name] = std::move(v);
}

struct Arg {
  std::string kind, value;
};

template <class T>
static T as(const Arg& a) {
  if constexpr (std::is_pointer_v<T>) {
    if (a.kind == "null") return nullptr;
    if (a.kind != "b") {
      std::fprintf(stderr, "a pointer argument got %s\n", a.kind.c_str());
      std::exit(1);
    }
    return (T)(void*)buffer(a.value).data();
  } else {
    uint64_t bits = std::strtoull(a.value.c_str(), nullptr, a.kind[0] == 'f' ? 16 : 10);
    if (a.kind == "f32") {
      float f;
      uint32_t b32 = (uint32_t)bits;
      std::memcpy(&f, &b32, 4);
      return (T)f;
    }
    if (a.kind == "f64") {
      double f;
      std::memcpy(&f, &bits, 8);
      return (T)f;
    }
    if (a.kind == "i32") return (T)(int32_t)std::strtoll(a.value.c_str(), nullptr, 10);
    return (T)bits;
  }
}

template <class... A, size_t... I>
static std::function<void()> bind_args(void (*f)(A...), const std::vector<Arg>& args,
                                  std::index_sequence<I...>) {
  if (args.size() != sizeof...(A)) {
    std::fprintf(stderr, "%zu arguments for a kernel of %zu\n", args.size(), sizeof...(A));
    std::exit(1);
  }
  // Pointers are resolved here, once, before any thread runs.
  auto values = std::make_shared<std::tuple<A...>>(as<A>(args[I])...);
  return [f, values] { f(std::get<I>(*values)...); };
}

template <class... A>
static std::function<void()> bind_args(void (*f)(A...), const std::vector<Arg>& args) {
  return bind_args(f, args, std::index_sequence_for<A...>{});
}

#define K(name) {#name, [](const std::vector<Arg>& a) { return bind_args(name, a); }},
static const std::map<std::string, std::function<std::function<void()>(const std::vector<Arg>&)>>
    kernels = {KERNEL_LIST};

// One host thread per CUDA thread of a block, created once per launch and reused for
// every block in turn: the main thread sets up the block (its index, a fresh block
// barrier and warp barriers), releases the workers, and waits until every one of them
// has run the kernel for it.
static void launch_threads(const std::function<void()>& kernel, dim3 grid, dim3 block) {
  gridDim = grid;
  blockDim = block;
  unsigned int threads = block.x * block.y * block.z;
  std::barrier<> start(threads + 1), done(threads + 1);
  bool stop = false;
  dim3 current;
  std::vector<std::thread> ts;
  ts.reserve(threads);
  for (unsigned int t = 0; t < threads; t++) {
    ts.emplace_back([&, t] {
      threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      lane_id = t % 32;
      warp_id = t / 32;
      for (;;) {
        start.arrive_and_wait();
        if (stop) return;
        blockIdx = current;
        kernel();
        block_barrier->arrive_and_drop();
        warps[warp_id].barrier->arrive_and_drop();
        done.arrive_and_wait();
      }
    });
  }
  for (unsigned int bz = 0; bz < grid.z; bz++)
    for (unsigned int by = 0; by < grid.y; by++)
      for (unsigned int bx = 0; bx < grid.x; bx++) {
        current = {bx, by, bz};
        block_barrier = std::make_unique<std::barrier<>>(threads);
        warps.clear();
        warps.resize((threads + 31) / 32);
        for (unsigned int w = 0; w < warps.size(); w++) {
          unsigned int in_warp = std::min(32u, threads - 32 * w);
          warps[w].barrier = std::make_unique<std::barrier<>>(in_warp);
        }
        start.arrive_and_wait();
        done.arrive_and_wait();
      }
  stop = true;
  start.arrive_and_wait();
  for (auto& t : ts) t.join();
}

// The launch's threads one after another on this thread; false, with every buffer
// as it was, when a thread reaches a barrier or a shuffle.
static bool launch_serial(const std::function<void()>& kernel, dim3 grid, dim3 block) {
  std::map<std::string, std::vector<unsigned char>> before = buffers;
  gridDim = grid;
  blockDim = block;
  serial = true;
  try {
    for (unsigned int bz = 0; bz < grid.z; bz++)
      for (unsigned int by = 0; by < grid.y; by++)
        for (unsigned int bx = 0; bx < grid.x; bx++) {
          blockIdx = {bx, by, bz};
          for (unsigned int tz = 0; tz < block.z; tz++)
            for (unsigned int ty = 0; ty < block.y; ty++)
              for (unsigned int tx = 0; tx < block.x; tx++) {
                threadIdx = {tx, ty, tz};
                unsigned int t = tx + block.x * (ty + block.y * tz);
                lane_id = t % 32;
                warp_id = t / 32;
                kernel();
              }
        }
  } catch (const NeedsThreads&) {
    serial = false;
    // Back in place (the kernel's pointers point into these vectors).
    for (auto& [name, bytes] : before) std::memcpy(buffers[name].data(), bytes.data(), bytes.size());
    return false;
  }
  serial = false;
  return true;
}

static void launch(const std::function<void()>& kernel, dim3 grid, dim3 block) {
  if (!launch_serial(kernel, grid, block)) launch_threads(kernel, grid, block);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: emulate DIR\n");
    return 2;
  }
  dir = argv[1];
  std::ifstream script(dir + "/launches.txt");
  std::string line;
  while (std::getline(script, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    if (line.rfind("@address ", 0) == 0) {
      std::string op, table, target;
      size_t index = 0;
      in >> op >> table >> index >> target;
      auto& t = buffer(table);
      uint64_t address = (uint64_t)(uintptr_t)buffer(target).data();
      if ((index + 1) * 8 > t.size()) {
        std::fprintf(stderr, "address %zu past the end of %s\n", index, table.c_str());
        return 1;
      }
      std::memcpy(t.data() + index * 8, &address, 8);
      continue;
    }
    std::string name;
    dim3 grid, block;
    in >> name >> grid.x >> grid.y >> grid.z >> block.x >> block.y >> block.z;
    std::vector<Arg> args;
    Arg a;
    while (in >> a.kind >> a.value) args.push_back(a);
    auto k = kernels.find(name);
    if (k == kernels.end()) {
      std::fprintf(stderr, "unknown kernel %s\n", name.c_str());
      return 1;
    }
    launch(k->second(args), grid, block);
  }
  for (auto& [name, bytes] : buffers) {
    std::ofstream out(dir + "/out_" + name + ".bin", std::ios::binary);
    out.write((const char*)bytes.data(), (std::streamsize)bytes.size());
  }
  return 0;
}
