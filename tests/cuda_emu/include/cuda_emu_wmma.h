// The CPU emulation's WMMA (tests/cuda_emu): nvcuda::wmma's fragments, loads, stores and products, on the
// fibers and warp barriers of cuda_emu.h. Included by the stand-in <mma.h>.
#pragma once

#include "cuda_emu.h"

// ---- WMMA (warp matrix multiply-accumulate) -----------------------------------------------------------
// Every lane holds the whole tile (the real fragments split it over the lanes in an unspecified layout,
// which code may not depend on); stores and products wait for every lane, as their `.sync` says.
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  T x[rows * cols];  // element (r, c) at x[r * cols + c]
};

inline void check_ptr(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
    ::cuda_emu::fail(cudaErrorMisalignedAddress, std::string(what) + ": pointer not 256-bit aligned");
  }
  if ((ldm * elem) % 16 != 0) {
    ::cuda_emu::fail(cudaErrorMisalignedAddress, std::string(what) + ": ldm not a multiple of 16 bytes");
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  for (auto& x : f.x) x = static_cast<T>(v);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout");
  // no warp barrier: `.sync` makes the lanes wait for each other, but it does not order their earlier memory
  // accesses (a __syncwarp does); a lane loading a tile other lanes write without one reads what was there
  check_ptr(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
}

// Each lane stores its own share of the tile (every 32nd element), as on a GPU: a lane reading what
// another stored needs a __syncwarp first, or it reads what was there before.
template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t l) {
  ::cuda_emu::warp_barrier(0xffffffffu, "wmma::store_matrix_sync");
  check_ptr(p, ldm, sizeof(T), "wmma::store_matrix_sync");
  const int lane = ::cuda_emu::self().linear % 32;
  for (int e = lane; e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The product is computed by lane 0 and copied by every lane (the lanes' fragments are equal: WMMA is
// warp-uniform, and the barriers check that every lane takes part).
template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float, void>& c) {
  auto& e = ::cuda_emu::emu();
  const int lin = ::cuda_emu::self().linear, w = lin / 32;
  ::cuda_emu::warp_barrier(0xffffffffu, "wmma::mma_sync");
  if (lin % 32 == 0) {
    std::vector<float>& out = e.w_tile[w];
    out.assign(M * N, 0.f);
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float s = c.x[i * N + j];
        for (int k = 0; k < K; ++k) s += as_float(a.x[i * K + k]) * as_float(b.x[k * N + j]);
        out[i * N + j] = s;
      }
  }
  ::cuda_emu::warp_barrier(0xffffffffu, "wmma::mma_sync");
  if (!e.aborted) std::memcpy(d.x, e.w_tile[w].data(), sizeof(float) * M * N);
  ::cuda_emu::warp_barrier(0xffffffffu, "wmma::mma_sync");  // every lane has its copy
}

}  // namespace wmma
}  // namespace nvcuda
