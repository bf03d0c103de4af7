// Patch gather for the masked patch embedding: the kept patches of an NCHW image batch, read in
// place (any strides), written as rows out[n*K + k, :] of length C*p*p ordered (c, kh, kw) — the
// flattening of the Conv2d weight [D, C, p, p], so rows @ weight.view(D, -1).T is the embedding.
// The GEMM itself is a torch matmul in maefast/ops/patch_embed.py (no cuBLAS in this extension).
//
// A pure copy: elements move as raw 2/4/8-byte words. An ids_keep entry outside [0, h*w) gives a
// row of NaN (nan_bits) instead of an out-of-bounds read.
#include "common.h"

#include <algorithm>
#include <cstring>

namespace py = pybind11;

namespace {

template <typename T>
__global__ void patch_gather_kernel(const T* __restrict__ imgs, long long s_n, long long s_c, long long s_h,
                                    long long s_w, const long long* __restrict__ ids_keep, long long N, long long K,
                                    long long C, long long P, long long grid_h, long long grid_w, T nan_value,
                                    T* __restrict__ out) {
  const long long cols = C * P * P;
  const long long total = N * K * cols;
  const long long L = grid_h * grid_w;
  for (long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = e / cols;
    const long long col = e - row * cols;
    const long long n = row / K;
    const long long l = ids_keep[row];
    T v = nan_value;
    if (l >= 0 && l < L) {
      const long long pr = l / grid_w, pc = l - (l / grid_w) * grid_w;
      const long long c = col / (P * P);
      const long long kh = (col / P) % P;
      const long long kw = col % P;
      v = imgs[n * s_n + c * s_c + (pr * P + kh) * s_h + (pc * P + kw) * s_w];
    }
    out[e] = v;
  }
}

template <typename T>
void launch(std::uintptr_t imgs, long long s_n, long long s_c, long long s_h, long long s_w, std::uintptr_t ids_keep,
            long long N, long long K, long long C, long long P, long long grid_h, long long grid_w,
            unsigned long long nan_bits, std::uintptr_t out, cudaStream_t stream) {
  const long long total = N * K * C * P * P;
  if (total == 0) return;
  constexpr int threads = 256;
  // Grid-stride loop: cap the grid, every element is still visited.
  const long long blocks = std::min<long long>((total + threads - 1) / threads, 65536LL * 8);
  T nan_value;
  static_assert(sizeof(T) <= sizeof(unsigned long long), "word size");
  std::memcpy(&nan_value, &nan_bits, sizeof(T));  // little-endian: the low bytes
  patch_gather_kernel<T><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
      maefast::as_ptr<const T>(imgs), s_n, s_c, s_h, s_w, maefast::as_ptr<const long long>(ids_keep), N, K, C, P,
      grid_h, grid_w, nan_value, maefast::as_ptr<T>(out));
  MAEFAST_LAUNCH_CHECK();
}

void patch_gather(std::uintptr_t imgs, long long s_n, long long s_c, long long s_h, long long s_w,
                  std::uintptr_t ids_keep, long long N, long long K, long long C, long long P, long long grid_h,
                  long long grid_w, int elem_size, unsigned long long nan_bits, std::uintptr_t out,
                  std::uintptr_t stream) {
  if (N < 0 || K < 0 || C < 1 || P < 1 || grid_h < 1 || grid_w < 1) {
    throw py::value_error("patch_gather: sizes must be positive (N, K >= 0)");
  }
  if (imgs == 0 || ids_keep == 0 || out == 0) throw py::value_error("patch_gather: null pointer");
  cudaStream_t s = maefast::as_stream(stream);
  switch (elem_size) {
    case 2: launch<unsigned short>(imgs, s_n, s_c, s_h, s_w, ids_keep, N, K, C, P, grid_h, grid_w, nan_bits, out, s); break;
    case 4: launch<unsigned int>(imgs, s_n, s_c, s_h, s_w, ids_keep, N, K, C, P, grid_h, grid_w, nan_bits, out, s); break;
    case 8: launch<unsigned long long>(imgs, s_n, s_c, s_h, s_w, ids_keep, N, K, C, P, grid_h, grid_w, nan_bits, out, s); break;
    default: throw py::value_error("patch_gather: elem_size must be 2, 4 or 8");
  }
}

}  // namespace

MAEFAST_REGISTER(patch_embed) {
  m.def("patch_gather", &patch_gather, py::arg("imgs"), py::arg("stride_n"), py::arg("stride_c"), py::arg("stride_h"),
        py::arg("stride_w"), py::arg("ids_keep"), py::arg("batch"), py::arg("len_keep"), py::arg("channels"),
        py::arg("patch_size"), py::arg("grid_h"), py::arg("grid_w"), py::arg("elem_size"), py::arg("nan_bits"),
        py::arg("out"), py::arg("stream"),
        "Gather the kept patches of NCHW images (strides in elements) into rows (N*K, C*p*p) ordered (c, kh, kw); "
        "ids_keep (N, K) int64 contiguous; out contiguous, same element size as imgs");
}
