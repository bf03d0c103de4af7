// Kernels that pin the CPU emulation's own semantics (tests/test_cuda_emu.py): what a GPU computes, and
// what a GPU refuses or leaves undefined reported as a launch error. Built into the emulated extension
// only (tests/cuda_emu/__init__.py), never into maefast._C.
#include <mma.h>

#include "common.h"

namespace py = pybind11;
using namespace nvcuda;

namespace {

using maefast::as_ptr;

// out[t] = in[t ^ lane_mask] over a whole block (full warps)
__global__ void shfl_kernel(const float* in, float* out, int lane_mask) {
  const int t = threadIdx.x;
  out[t] = __shfl_xor_sync(0xffffffffu, in[t], lane_mask);
}

// out[block] = __syncthreads_or(in[t] of the block), twice with other votes in between
__global__ void vote_kernel(const int* in, int* out) {
  const int t = threadIdx.x;
  const int a = __syncthreads_or(in[blockIdx.x * blockDim.x + t]);
  const int b = __syncthreads_or(0);
  const int c = __syncthreads_or(t == 5);
  if (t == 0) {
    out[3 * blockIdx.x] = a;
    out[3 * blockIdx.x + 1] = b;
    out[3 * blockIdx.x + 2] = c;
  }
}

// half of warp 0 at the block barrier, the other half at a warp barrier: neither is ever complete
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else if (threadIdx.x < 32) {
    __syncwarp();
  }
  out[threadIdx.x] = 1;
}

// lanes >= 8 return before a full-mask shuffle
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x >= 8) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// lane 0 waits at a warp shuffle that lane 1, having returned, never reaches
__global__ void exit_while_waited_kernel(float* out) {
  if (threadIdx.x == 1) return;
  if (threadIdx.x == 0) out[0] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// the block's second warp has 16 threads: a full mask names lanes that do not exist
__global__ void partial_warp_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1); }

__global__ void write_kernel(int* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1; }

// dynamic shared memory: its bytes as the block starts (0xff), then a block-wide exchange through it
__global__ void dyn_smem_kernel(unsigned char* first, float* out) {
  extern __shared__ __align__(16) float sh[];
  const int t = threadIdx.x;
  if (blockIdx.x == 0 && t == 0) first[0] = reinterpret_cast<unsigned char*>(sh)[0];
  sh[t] = static_cast<float>(t + 100 * blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = sh[blockDim.x - 1 - t];
}

// static shared memory: what each thread of each block finds there before writing it (0xff bytes, as
// dynamic shared memory: not zeros, not the previous block's values)
__global__ void static_smem_kernel(unsigned* out) {
  __shared__ unsigned s[64];
  __shared__ float scalar;
  const int t = threadIdx.x;
  out[2 * (blockIdx.x * blockDim.x + t)] = s[t];
  out[2 * (blockIdx.x * blockDim.x + t) + 1] = __float_as_int(scalar);
  __syncthreads();
  s[t] = 7u;
  scalar = 1.0f;
}

// every thread writes its index to one cell between two barriers: the last writer wins (thread order)
__global__ void race_kernel(int* out) {
  __shared__ int cell;
  __syncthreads();
  cell = threadIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = cell;
}

// each thread gets its own copy of a by-value parameter
__global__ void param_kernel(int v, int* out) {
  v += threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = v;
}

// D (16x16 fp32) = A (16x16, row-major) @ B (16x16, col_major or row_major) through WMMA; then every lane
// reads element (lane, 0) of D from shared memory, with or without a __syncwarp after the store.
template <typename T, typename LB>
__global__ void wmma_kernel(const T* a, const T* b, float* d, float* col0, bool sync) {
  __shared__ __align__(32) float tile[256];
  for (int i = threadIdx.x; i < 256; i += 32) tile[i] = -1.0f;
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);
  if (sync) __syncwarp();
  if (threadIdx.x < 16) col0[threadIdx.x] = tile[threadIdx.x * 16];
  __syncwarp();
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// lanes copy A into shared memory, then (with or without a __syncwarp) load it as a WMMA fragment: D = A @ I
__global__ void wmma_load_kernel(const __half* a, const __half* eye, float* d, bool sync) {
  __shared__ __align__(32) __half sa[256];
  for (int i = threadIdx.x; i < 256; i += 32) sa[i] = a[i];
  if (sync) __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, sa, 16);
  wmma::load_matrix_sync(fb, eye, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

__global__ void wmma_misaligned_kernel(const __half* a, float* d) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 1, 16);  // 2 bytes past a 256-bit boundary
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// reads one element past `in` (n elements): caught under AddressSanitizer (CUDA_EMU_ASAN=1)
__global__ void oob_kernel(const float* in, float* out, int n) { out[threadIdx.x] = in[threadIdx.x + 1]; }

// an 8-byte load from an address `offset` bytes into `in`: misaligned unless offset % 8 == 0 (SIGILL here, as
// the build traps misaligned accesses; cudaErrorMisalignedAddress on a card)
__global__ void misaligned_load_kernel(const unsigned char* in, unsigned long long* out, int offset) {
  out[threadIdx.x] = *reinterpret_cast<const unsigned long long*>(in + offset);
}

void check() { MAEFAST_LAUNCH_CHECK(); }

}  // namespace

MAEFAST_REGISTER(emulation_selftest) {
  m.def("selftest_shfl", [](std::uintptr_t in, std::uintptr_t out, int threads, int lane_mask) {
    shfl_kernel<<<1, threads>>>(as_ptr<const float>(in), as_ptr<float>(out), lane_mask);
    check();
  });
  m.def("selftest_vote", [](std::uintptr_t in, std::uintptr_t out, int blocks, int threads) {
    vote_kernel<<<blocks, threads>>>(as_ptr<const int>(in), as_ptr<int>(out));
    check();
  });
  m.def("selftest_deadlock", [](std::uintptr_t out) {
    deadlock_kernel<<<1, 64>>>(as_ptr<int>(out));
    check();
  });
  m.def("selftest_exited_lane", [](std::uintptr_t out) {
    exited_lane_kernel<<<1, 32>>>(as_ptr<float>(out));
    check();
  });
  m.def("selftest_exit_while_waited", [](std::uintptr_t out) {
    exit_while_waited_kernel<<<1, 32>>>(as_ptr<float>(out));
    check();
  });
  m.def("selftest_partial_warp", [](std::uintptr_t out) {
    partial_warp_kernel<<<1, 48>>>(as_ptr<float>(out));
    check();
  });
  m.def("selftest_launch", [](std::uintptr_t out, unsigned gx, unsigned gy, unsigned bx, unsigned by) {
    write_kernel<<<dim3(gx, gy), dim3(bx, by)>>>(as_ptr<int>(out));
    check();
  });
  m.def("selftest_dyn_smem", [](std::uintptr_t first, std::uintptr_t out, int blocks, int threads, int smem,
                                int attribute) {
    if (attribute >= 0) MAEFAST_CUDA_CHECK(cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attribute));
    dyn_smem_kernel<<<blocks, threads, smem>>>(as_ptr<unsigned char>(first), as_ptr<float>(out));
    check();
  });
  m.def("selftest_static_smem", [](std::uintptr_t out, int blocks) {
    static_smem_kernel<<<blocks, 64>>>(as_ptr<unsigned>(out));
    check();
  });
  m.def("selftest_race", [](std::uintptr_t out, int threads) {
    race_kernel<<<1, threads>>>(as_ptr<int>(out));
    check();
  });
  m.def("selftest_param", [](int v, std::uintptr_t out, int threads) {
    param_kernel<<<1, threads>>>(v, as_ptr<int>(out));
    check();
  });
  m.def("selftest_wmma", [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t d, std::uintptr_t col0, bool bf16,
                            bool b_col_major, bool sync) {
    if (bf16 && b_col_major) {
      wmma_kernel<__nv_bfloat16, wmma::col_major><<<1, 32>>>(as_ptr<const __nv_bfloat16>(a), as_ptr<const __nv_bfloat16>(b),
                                                             as_ptr<float>(d), as_ptr<float>(col0), sync);
    } else if (bf16) {
      wmma_kernel<__nv_bfloat16, wmma::row_major><<<1, 32>>>(as_ptr<const __nv_bfloat16>(a), as_ptr<const __nv_bfloat16>(b),
                                                             as_ptr<float>(d), as_ptr<float>(col0), sync);
    } else if (b_col_major) {
      wmma_kernel<__half, wmma::col_major><<<1, 32>>>(as_ptr<const __half>(a), as_ptr<const __half>(b), as_ptr<float>(d),
                                                      as_ptr<float>(col0), sync);
    } else {
      wmma_kernel<__half, wmma::row_major><<<1, 32>>>(as_ptr<const __half>(a), as_ptr<const __half>(b), as_ptr<float>(d),
                                                      as_ptr<float>(col0), sync);
    }
    check();
  });
  m.def("selftest_oob", [](std::uintptr_t in, std::uintptr_t out, int n) {
    oob_kernel<<<1, n>>>(as_ptr<const float>(in), as_ptr<float>(out), n);
    check();
  });
  m.def("selftest_wmma_load", [](std::uintptr_t a, std::uintptr_t eye, std::uintptr_t d, bool sync) {
    wmma_load_kernel<<<1, 32>>>(as_ptr<const __half>(a), as_ptr<const __half>(eye), as_ptr<float>(d), sync);
    check();
  });
  m.def("selftest_misaligned_load", [](std::uintptr_t in, std::uintptr_t out, int offset) {
    misaligned_load_kernel<<<1, 1>>>(as_ptr<const unsigned char>(in), as_ptr<unsigned long long>(out), offset);
    check();
  });
  m.def("selftest_wmma_misaligned", [](std::uintptr_t a, std::uintptr_t d) {
    wmma_misaligned_kernel<<<1, 32>>>(as_ptr<const __half>(a), as_ptr<float>(d));
    check();
  });
}
