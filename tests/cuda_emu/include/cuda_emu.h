// A CPU emulation of the CUDA runtime subset maefast's kernels use (csrc/*.cu), so the CUDA C++ kernels
// run in the test suite on machines without a GPU (tests/cuda_emu/__init__.py builds them with g++).
//
// Execution model: blocks run one after another; the threads of a block run as fibers (ucontext) on one
// OS thread, switching only at synchronisation points (__syncthreads*, __syncwarp, warp shuffles, WMMA
// loads and stores), in thread order (CUDA_EMU_ORDER=reverse: the other way round, to show results that
// depend on an order a GPU does not promise). What a GPU would refuse or leave undefined is reported as
// a launch error (read by cudaGetLastError, i.e. MAEFAST_LAUNCH_CHECK raises maefast's CudaError):
// launch configurations past the card's limits (an sm_90 card), dynamic shared memory past the
// kernel's attribute, a barrier some live threads never reach (deadlock), warp operations naming lanes
// that do not exist or have exited, misaligned WMMA pointers or leading dimensions.
// Shared memory: `__shared__` variables are function statics (one block at a time holds them), filled
// with 0xFF bytes (NaN for floats) as each block starts, as dynamic shared memory (a buffer) is.
#pragma once

#include <setjmp.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)  // the memory-checked build (tests/cuda_emu CUDA_EMU_ASAN=1): fibers announced
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_TO_FIBER(fake, bottom, size) __sanitizer_start_switch_fiber(fake, bottom, size)
#define CUDA_EMU_ARRIVED(fake, bottom, size) __sanitizer_finish_switch_fiber(fake, bottom, size)
#else
#define CUDA_EMU_TO_FIBER(fake, bottom, size) ((void)0)
#define CUDA_EMU_ARRIVED(fake, bottom, size) ((void)0)
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers ------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // rewritten for `extern __shared__` by the build (tests/cuda_emu/__init__.py)
#define CUDART_VERSION 13000

// ---- vector types ----------------------------------------------------------------------------------
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

// ---- 16-bit floats ---------------------------------------------------------------------------------
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.__x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // round to nearest even, as the GPU
  __half h;
  std::memcpy(&h.__x, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if (std::isnan(v)) {
    b.__x = 0x7fff;  // cuda_bf16's NaN
  } else {
    b.__x = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }

// ---- device math and intrinsics -------------------------------------------------------------------
// (built with -ffp-contract=off: a product is rounded before it is added, as __fmul_rn promises)
using std::isinf;
using std::isnan;
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float f) {
  int x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
#define CUDA_EMU_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }          \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned int)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
#undef CUDA_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// ---- runtime API -----------------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorUnknown = 999,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrClockRate = 13,
  cudaDevAttrMemoryClockRate = 36,
  cudaDevAttrGlobalMemoryBusWidth = 37,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount, l2CacheSize, regsPerMultiprocessor, warpSize;
  size_t totalGlobalMem, sharedMemPerBlockOptin, sharedMemPerMultiprocessor;
};

namespace cuda_emu {

constexpr int kOptinSmem = 232448;  // sm_90's cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr int kDefaultDynSmem = 48 * 1024;
constexpr int kWarp = 32;

// A fiber starts on its own stack through makecontext/swapcontext and then switches with _setjmp/_longjmp,
// which, unlike swapcontext, make no system call (the signal mask is left alone): ~50x faster.
struct Fiber {
  ucontext_t ctx;  // its start
  jmp_buf jb;      // where it yielded
  void* fake = nullptr;  // AddressSanitizer's fake stack of the fiber while it is switched out
  dim3 tid;
  int linear = 0;
  bool started = false, done = false;
};

struct Emu {
  // the launch and block being run
  dim3 grid, block, block_idx;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  ucontext_t sched;
  jmp_buf sched_jb;
  const void* sched_bottom = nullptr;  // the scheduler's stack, for AddressSanitizer's fiber switches
  size_t sched_size = 0;
  void* sched_fake = nullptr;
  size_t stack_size = 256 * 1024;
  int cur = -1;
  const std::function<void()>* body = nullptr;
  // the block's dynamic shared memory: exactly the launch's bytes, 128-byte aligned (under AddressSanitizer an
  // access past them is reported)
  std::unique_ptr<unsigned char, void (*)(void*)> dyn_smem{nullptr, std::free};
  size_t dyn_bytes = 0;
  // block barrier: arrivals, generation, the __syncthreads_or vote of each generation's parity
  int live = 0, bar_arrived = 0;
  unsigned long long bar_gen = 0;
  int vote[2] = {0, 0}, vote_result[2] = {0, 0};
  // warp barriers and the shuffle exchange
  std::vector<int> w_live, w_arrived, w_size;
  std::vector<unsigned long long> w_gen;
  std::vector<std::array<unsigned long long, kWarp>> w_buf;
  std::vector<std::vector<float>> w_tile;  // a WMMA product, computed once per warp
  unsigned long long events = 0;
  bool aborted = false;
  std::string error;  // the first failure of this launch
  cudaError_t last_error = cudaSuccess;  // cleared by cudaGetLastError
  std::string reported;  // the message of the last launch error, kept for cudaGetErrorString
  cudaError_t reported_code = cudaSuccess;
  std::map<const void*, int> max_dyn_smem;  // cudaFuncSetAttribute
  unsigned long long launches = 0;
  unsigned long long block_serial = 0;  // blocks run so far: static shared memory is poisoned once per block
  std::map<const void*, unsigned long long> static_smem;  // a static __shared__ variable -> its block serial
};

inline Emu& emu() {
  static thread_local Emu e;
  return e;
}

inline void fail(cudaError_t code, const std::string& what) {
  Emu& e = emu();
  if (e.error.empty()) {
    e.error = what;
    e.last_error = code;
  }
  e.aborted = true;
}

inline Fiber& self() { return emu().fibers[emu().cur]; }
inline void yield() {
  Emu& e = emu();
  Fiber& f = e.fibers[e.cur];
  if (_setjmp(f.jb) == 0) {
    CUDA_EMU_TO_FIBER(&f.fake, e.sched_bottom, e.sched_size);
    _longjmp(e.sched_jb, 1);
  }
  CUDA_EMU_ARRIVED(f.fake, nullptr, nullptr);
}

inline void release_block_if_ready() {
  Emu& e = emu();
  if (e.bar_arrived > 0 && e.bar_arrived == e.live) {
    const int slot = static_cast<int>(e.bar_gen & 1);
    e.vote_result[slot] = e.vote[slot];
    e.vote[slot ^ 1] = 0;
    e.bar_arrived = 0;
    ++e.bar_gen;
    ++e.events;
  }
}

inline void release_warp_if_ready(int w) {
  Emu& e = emu();
  if (e.w_arrived[w] > 0 && e.w_arrived[w] == e.w_live[w]) {
    e.w_arrived[w] = 0;
    ++e.w_gen[w];
    ++e.events;
  }
}

// __syncthreads with a vote (the or of `pred` over the block, returned to every thread).
inline int block_barrier(int pred) {
  Emu& e = emu();
  if (e.aborted) return pred;
  const unsigned long long g = e.bar_gen;
  const int slot = static_cast<int>(g & 1);
  e.vote[slot] |= pred != 0;
  ++e.bar_arrived;
  ++e.events;
  release_block_if_ready();
  do yield(); while (e.bar_gen == g && !e.aborted);  // the releasing thread too: all go on in thread order
  return e.aborted ? pred : e.vote_result[slot];
}

inline void check_warp_mask(unsigned mask, const char* what) {
  Emu& e = emu();
  const int w = self().linear / kWarp;
  const int n = e.w_size[w];
  const unsigned all = n == kWarp ? 0xffffffffu : ((1u << n) - 1u);
  if ((mask & ~all) != 0) {
    fail(cudaErrorLaunchFailure, std::string(what) + ": mask names lanes that do not run (warp of " +
                                     std::to_string(n) + " threads, mask " + std::to_string(mask) + ")");
  } else if (mask != all) {
    fail(cudaErrorLaunchFailure, std::string(what) + ": a mask of part of a warp (the emulation runs full ones)");
  } else if (e.w_live[w] != n) {
    fail(cudaErrorLaunchFailure, std::string(what) + ": a lane named by the mask has exited");
  }
}

inline void warp_barrier(unsigned mask, const char* what) {
  Emu& e = emu();
  if (e.aborted) return;
  check_warp_mask(mask, what);
  if (e.aborted) return;
  const int w = self().linear / kWarp;
  const unsigned long long g = e.w_gen[w];
  ++e.w_arrived[w];
  ++e.events;
  release_warp_if_ready(w);
  do yield(); while (e.w_gen[w] == g && !e.aborted);
}

inline void fiber_main() {
  Emu& e = emu();
  CUDA_EMU_ARRIVED(nullptr, &e.sched_bottom, &e.sched_size);
  (*e.body)();
  Fiber& f = self();
  f.done = true;
  if (e.w_arrived[f.linear / kWarp] > 0) {  // lanes wait for it at a full-mask warp barrier: undefined on a GPU
    fail(cudaErrorLaunchFailure, "a lane exited while others of its warp wait for it at a warp operation");
  }
  --e.live;
  --e.w_live[f.linear / kWarp];
  ++e.events;
  release_block_if_ready();
  release_warp_if_ready(f.linear / kWarp);
  CUDA_EMU_TO_FIBER(nullptr, e.sched_bottom, e.sched_size);  // nullptr: this fiber's stack is done with
  _longjmp(e.sched_jb, 1);  // never resumed
}

// Runs fiber i until it yields or ends.
inline void resume(int i) {
  Emu& e = emu();
  Fiber& f = e.fibers[i];
  e.cur = i;
  if (_setjmp(e.sched_jb) == 0) {
    CUDA_EMU_TO_FIBER(&e.sched_fake, e.stacks[i], e.stack_size);
    if (!f.started) {
      f.started = true;
      swapcontext(&e.sched, &f.ctx);  // the fiber comes back by _longjmp, not through this call
    } else {
      _longjmp(f.jb, 1);
    }
  }
  CUDA_EMU_ARRIVED(e.sched_fake, nullptr, nullptr);
}

// The byte shared memory is filled with as a block starts: 0xff (NaN for floats), or CUDA_EMU_POISON (e.g.
// 0x7f: 3.4e38, a finite value that fmaxf does not skip as it skips NaN).
inline unsigned char poison_byte() {
  const char* v = std::getenv("CUDA_EMU_POISON");
  return v == nullptr ? 0xff : static_cast<unsigned char>(std::strtoul(v, nullptr, 0));
}

inline void run_block(bool reverse) {
  Emu& e = emu();
  const size_t kStack = e.stack_size;
  while (static_cast<int>(e.stacks.size()) < e.nthreads) e.stacks.push_back(static_cast<char*>(std::malloc(kStack)));
  e.fibers.assign(e.nthreads, Fiber{});
  const int nwarps = (e.nthreads + kWarp - 1) / kWarp;
  e.w_live.assign(nwarps, 0);
  e.w_size.assign(nwarps, 0);
  e.w_arrived.assign(nwarps, 0);
  e.w_gen.assign(nwarps, 0);
  e.w_buf.assign(nwarps, {});
  e.w_tile.assign(nwarps, {});
  for (int i = 0; i < e.nthreads; ++i) {
    Fiber& f = e.fibers[i];
    f.linear = i;
    f.tid = dim3(i % e.block.x, (i / e.block.x) % e.block.y, i / (e.block.x * e.block.y));
    ++e.w_size[i / kWarp];
    ++e.w_live[i / kWarp];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = e.stacks[i];
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  ++e.block_serial;
  e.live = e.nthreads;
  e.bar_arrived = 0;
  e.vote[0] = e.vote[1] = 0;
  if (e.dyn_bytes > 0) std::memset(e.dyn_smem.get(), poison_byte(), e.dyn_bytes);
  for (;;) {
    bool any = false;
    const unsigned long long before = e.events;
    for (int k = 0; k < e.nthreads; ++k) {
      const int i = reverse ? e.nthreads - 1 - k : k;
      if (e.fibers[i].done) continue;
      any = true;
      resume(i);
    }
    e.cur = -1;
    if (!any) break;
    if (e.events == before && !e.aborted) {
      fail(cudaErrorLaunchFailure, "deadlock: a barrier that some live threads of the block never reach");
    }
  }
}

inline bool reverse_order() {
  const char* o = std::getenv("CUDA_EMU_ORDER");
  return o != nullptr && std::string(o) == "reverse";
}

inline void launch_impl(dim3 grid, dim3 block, size_t smem, const void* kernel, const std::function<void()>& body) {
  Emu& e = emu();
  ++e.launches;
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    if (e.last_error == cudaSuccess) {
      e.last_error = e.reported_code = cudaErrorInvalidConfiguration;
      e.error = e.reported = "invalid launch configuration";
    }
    return;
  }
  auto it = e.max_dyn_smem.find(kernel);
  const int limit = it == e.max_dyn_smem.end() ? kDefaultDynSmem : it->second;
  if (smem > static_cast<size_t>(limit)) {
    if (e.last_error == cudaSuccess) {
      e.last_error = e.reported_code = cudaErrorInvalidValue;
      e.error = e.reported = "dynamic shared memory past the kernel's limit";
    }
    return;
  }
  const std::string prev_error = e.error;
  const cudaError_t prev_code = e.last_error;
  e.error.clear();
  e.aborted = false;
  e.grid = grid;
  e.block = block;
  e.nthreads = static_cast<int>(threads);
  e.body = &body;
  void* mem = nullptr;
  if (smem > 0 && posix_memalign(&mem, 128, smem) != 0) {
    e.last_error = e.reported_code = cudaErrorMemoryAllocation;
    e.error = e.reported = "dynamic shared memory";
    return;
  }
  e.dyn_smem.reset(static_cast<unsigned char*>(mem));
  e.dyn_bytes = smem;
  const bool reverse = reverse_order();
  for (unsigned z = 0; z < grid.z && !e.aborted; ++z)
    for (unsigned y = 0; y < grid.y && !e.aborted; ++y)
      for (unsigned x = 0; x < grid.x && !e.aborted; ++x) {
        e.block_idx = dim3(x, y, z);
        run_block(reverse);
      }
  e.body = nullptr;
  if (e.error.empty() || prev_code != cudaSuccess) {  // an earlier launch's error stays until read
    e.error = prev_error;
    e.last_error = prev_code;
  }
  if (e.last_error != cudaSuccess) {
    e.reported = e.error;
    e.reported_code = e.last_error;
  }
  e.aborted = false;
}

// A static `__shared__` variable, after its declaration (the build's rewrite): filled with 0xff bytes the
// first time a thread of a block reaches it, so a block never reads zeros or the previous block's values
// where a GPU leaves the memory undefined.
inline void poison_static(void* p, size_t n) {
  Emu& e = emu();
  unsigned long long& seen = e.static_smem[p];
  if (seen != e.block_serial) {
    std::memset(p, poison_byte(), n);
    seen = e.block_serial;
  }
}

inline unsigned char* dynamic_smem() {
  Emu& e = emu();
  return e.dyn_smem.get();
}

struct Cfg {
  dim3 grid, block;
  size_t smem;
  Cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

template <typename... P>
struct Launcher {
  Cfg cfg;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<P...> params(std::forward<A>(args)...);
    auto k = kernel;
    const std::function<void()> body = [&params, k]() {
      std::tuple<P...> mine = params;  // each thread its own copy of the parameters, as on a GPU
      std::apply(k, mine);
    };
    launch_impl(cfg.grid, cfg.block, cfg.smem, reinterpret_cast<const void*>(kernel), body);
  }
};
template <typename... P>
Launcher<P...> launch(Cfg cfg, void (*kernel)(P...)) {
  return Launcher<P...>{cfg, kernel};
}

}  // namespace cuda_emu

// ---- built-in variables and synchronisation --------------------------------------------------------
#define threadIdx (::cuda_emu::self().tid)
#define blockIdx (::cuda_emu::emu().block_idx)
#define blockDim (::cuda_emu::emu().block)
#define gridDim (::cuda_emu::emu().grid)
constexpr int warpSize = 32;

inline void __syncthreads() { ::cuda_emu::block_barrier(0); }
inline int __syncthreads_or(int pred) { return ::cuda_emu::block_barrier(pred); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cuda_emu::warp_barrier(mask, "__syncwarp"); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  auto& e = ::cuda_emu::emu();
  const int lin = ::cuda_emu::self().linear, w = lin / 32, lane = lin % 32;
  std::memcpy(&e.w_buf[w][lane], &v, sizeof(T));
  ::cuda_emu::warp_barrier(mask, "__shfl_xor_sync");  // every lane has written
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the segment: own value
  T r;
  std::memcpy(&r, &e.w_buf[w][src], sizeof(T));
  ::cuda_emu::warp_barrier(mask, "__shfl_xor_sync");  // every lane has read
  return r;
}

// ---- host API --------------------------------------------------------------------------------------
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}
inline const char* cudaGetErrorString(cudaError_t e) {
  thread_local std::string s;
  auto& em = ::cuda_emu::emu();
  s = std::string("emulated: ") + (e == em.reported_code && !em.reported.empty() ? em.reported : cudaGetErrorName(e));
  return s.c_str();
}
inline cudaError_t cudaGetLastError() {
  auto& e = ::cuda_emu::emu();
  const cudaError_t r = e.last_error;
  e.last_error = cudaSuccess;
  return r;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;  // no driver
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 0;  // an emulation is no device: maefast never takes it for a GPU
  return cudaErrorNoDevice;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches run to completion
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp*, int) { return cudaErrorInvalidDevice; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  if (dev != 0) return cudaErrorInvalidDevice;
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? ::cuda_emu::kOptinSmem : 0;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > ::cuda_emu::kOptinSmem) {
    return cudaErrorInvalidValue;
  }
  ::cuda_emu::emu().max_dyn_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
