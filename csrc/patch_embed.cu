// Patch gather for the masked patch embedding: the kept patches of an NCHW image batch, read in
// place (any strides), written as rows out[n*K + k, :] of length C*p*p ordered (c, kh, kw) — the
// flattening of the Conv2d weight [D, C, p, p], so rows @ weight.view(D, -1).T is the embedding.
// The GEMM itself is a torch matmul in maefast/ops/patch_embed.py (no cuBLAS in this extension).
//
// A pure copy, elements moved as raw words. An ids_keep entry outside [0, h*w) gives a row of NaN
// (nan_bits) instead of an out-of-bounds read.
//
// Fast path (pixels contiguous along W, the usual NCHW): one block per output row; each row is C*p
// lines of p contiguous pixels, copied in the widest unit U (16/8/4/2 bytes) that divides the line,
// the image strides and both base addresses, so a bf16 p=16 line is two 16-byte loads. Int32 index
// math inside a row (the host checks the sizes fit). Anything else (e.g. channels_last) takes the
// element-wise grid-stride kernel.
//
// uint8 images (patch_gather_normalize): the same rows, each pixel normalised as it is read
// (pixels.cuh: (v - offset_c) * scale_c in fp32) and rounded to the GEMM's dtype (fp32/fp16/bf16), so
// the rows are what the gather of a float image normalised first would give, and no float image
// is made. One block per row, any strides.
#include <pybind11/stl.h>

#include "common.h"
#include "dtype.cuh"
#include "pixels.cuh"

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

// One block per output row; threads walk the row's units. Strides and offsets in bytes.
template <typename U>
__global__ void patch_gather_rows_kernel(const unsigned char* __restrict__ imgs, long long s_n, long long s_c,
                                         long long s_h, const long long* __restrict__ ids_keep, int K, int P,
                                         int line_bytes, int line_units, int row_units, int grid_w, int L,
                                         U nan_unit, U* __restrict__ out) {
  const long long row = blockIdx.x;
  const int n = static_cast<int>(row / K);
  const long long l = ids_keep[row];
  const bool ok = l >= 0 && l < L;
  const int li = ok ? static_cast<int>(l) : 0;
  const int pr = li / grid_w;
  const int pc = li - pr * grid_w;
  const unsigned char* base = imgs + n * s_n + static_cast<long long>(pr) * P * s_h +
                              static_cast<long long>(pc) * line_bytes;
  U* dst = out + row * row_units;
  for (int u = threadIdx.x; u < row_units; u += blockDim.x) {
    const int line = u / line_units;
    const int j = u - line * line_units;
    const int c = line / P;
    const int kh = line - c * P;
    U v = nan_unit;
    if (ok) v = *reinterpret_cast<const U*>(base + c * s_c + kh * s_h + static_cast<long long>(j) * sizeof(U));
    dst[u] = v;
  }
}

template <typename U>
void launch_rows(std::uintptr_t imgs, long long s_n, long long s_c, long long s_h, std::uintptr_t ids_keep,
                 long long rows, long long K, int C, int P, int elem, long long grid_w, long long L,
                 unsigned long long nan_bits, std::uintptr_t out, cudaStream_t stream) {
  const int line_bytes = P * elem;
  const int line_units = line_bytes / static_cast<int>(sizeof(U));
  const int row_units = C * P * line_units;
  U nan_unit;
  unsigned char* nb = reinterpret_cast<unsigned char*>(&nan_unit);
  for (int i = 0; i < static_cast<int>(sizeof(U)); i += elem) std::memcpy(nb + i, &nan_bits, elem);
  const int threads = std::min(256, ((row_units + 31) / 32) * 32);
  patch_gather_rows_kernel<U><<<static_cast<unsigned int>(rows), threads, 0, stream>>>(
      maefast::as_ptr<const unsigned char>(imgs), s_n, s_c, s_h, maefast::as_ptr<const long long>(ids_keep),
      static_cast<int>(K), P, line_bytes, line_units, row_units, static_cast<int>(grid_w), static_cast<int>(L),
      nan_unit, maefast::as_ptr<U>(out));
  MAEFAST_LAUNCH_CHECK();
}

// The widest unit the row path can use (0: take the element-wise kernel).
int row_unit_bytes(std::uintptr_t imgs, long long s_n, long long s_c, long long s_h, long long s_w, long long N,
                   long long K, long long C, long long P, long long grid_h, long long grid_w, int elem,
                   std::uintptr_t out) {
  if (s_w != 1) return 0;
  const long long rows = N * K, L = grid_h * grid_w;
  if (rows >= (1LL << 31) || L >= (1LL << 31) || C * P * P * elem >= (1LL << 31) || K >= (1LL << 31)) return 0;
  if (s_n < 0 || s_c < 0 || s_h < 0) return 0;
  for (int u = 16; u >= elem; u /= 2) {
    const bool fits = (P * elem) % u == 0 && (s_h * elem) % u == 0 && (s_c * elem) % u == 0 && (s_n * elem) % u == 0 &&
                      imgs % u == 0 && out % u == 0;
    if (fits) return u;
  }
  return 0;
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
  if (N * K == 0) return;  // before the pointer checks: the caching allocator gives empty tensors no memory
  if (imgs == 0 || ids_keep == 0 || out == 0) throw py::value_error("patch_gather: null pointer");
  cudaStream_t s = maefast::as_stream(stream);
  if (elem_size == 2 || elem_size == 4 || elem_size == 8) {
    const int u = row_unit_bytes(imgs, s_n, s_c, s_h, s_w, N, K, C, P, grid_h, grid_w, elem_size, out);
    const long long e = elem_size;  // byte strides for the row kernel
    switch (u) {
      case 16: launch_rows<uint4>(imgs, s_n * e, s_c * e, s_h * e, ids_keep, N * K, K, C, P, elem_size, grid_w, grid_h * grid_w, nan_bits, out, s); return;
      case 8: launch_rows<unsigned long long>(imgs, s_n * e, s_c * e, s_h * e, ids_keep, N * K, K, C, P, elem_size, grid_w, grid_h * grid_w, nan_bits, out, s); return;
      case 4: launch_rows<unsigned int>(imgs, s_n * e, s_c * e, s_h * e, ids_keep, N * K, K, C, P, elem_size, grid_w, grid_h * grid_w, nan_bits, out, s); return;
      case 2: launch_rows<unsigned short>(imgs, s_n * e, s_c * e, s_h * e, ids_keep, N * K, K, C, P, elem_size, grid_w, grid_h * grid_w, nan_bits, out, s); return;
      default: break;  // the element-wise kernel below
    }
  }
  switch (elem_size) {
    case 2: launch<unsigned short>(imgs, s_n, s_c, s_h, s_w, ids_keep, N, K, C, P, grid_h, grid_w, nan_bits, out, s); break;
    case 4: launch<unsigned int>(imgs, s_n, s_c, s_h, s_w, ids_keep, N, K, C, P, grid_h, grid_w, nan_bits, out, s); break;
    case 8: launch<unsigned long long>(imgs, s_n, s_c, s_h, s_w, ids_keep, N, K, C, P, grid_h, grid_w, nan_bits, out, s); break;
    default: throw py::value_error("patch_gather: elem_size must be 2, 4 or 8");
  }
}

// One block per output row; threads walk its C*p*p columns (c, kh, kw), reading bytes (consecutive
// along a patch line when s_w == 1) and writing TO contiguously. NaN row for an id outside [0, L).
template <typename TO>
__global__ void patch_gather_normalize_kernel(const uint8_t* __restrict__ imgs, long long s_n, long long s_c,
                                              long long s_h, long long s_w, const long long* __restrict__ ids_keep,
                                              long long K, int P, long long grid_w, long long L, int cols,
                                              maefast::PixelAffine px, TO* __restrict__ out) {
  const long long row = blockIdx.x;
  const long long n = row / K;
  const long long l = ids_keep[row];
  const bool ok = l >= 0 && l < L;
  const long long pr = ok ? l / grid_w : 0;
  const long long pc = ok ? l - pr * grid_w : 0;
  const uint8_t* base = imgs + n * s_n + pr * P * s_h + pc * P * s_w;
  TO* dst = out + row * cols;
  const int pp = P * P;
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    const int c = col / pp;
    const int r = col - c * pp;
    const int kh = r / P;
    const int kw = r - kh * P;
    float v = __int_as_float(0x7fc00000);  // NaN
    if (ok) v = maefast::normalize_pixel(base[c * s_c + kh * s_h + kw * s_w], c, px);
    dst[col] = maefast::from_f<TO>(v);
  }
}

template <typename TO>
void launch_normalize(std::uintptr_t imgs, long long s_n, long long s_c, long long s_h, long long s_w,
                      std::uintptr_t ids_keep, long long rows, long long K, int C, int P, long long grid_w,
                      long long L, const maefast::PixelAffine& px, std::uintptr_t out, cudaStream_t stream) {
  const int cols = C * P * P;
  const int threads = std::min(256, ((cols + 31) / 32) * 32);
  patch_gather_normalize_kernel<TO><<<static_cast<unsigned int>(rows), threads, 0, stream>>>(
      maefast::as_ptr<const uint8_t>(imgs), s_n, s_c, s_h, s_w, maefast::as_ptr<const long long>(ids_keep), K, P,
      grid_w, L, cols, px, maefast::as_ptr<TO>(out));
  MAEFAST_LAUNCH_CHECK();
}

void patch_gather_normalize(std::uintptr_t imgs, long long s_n, long long s_c, long long s_h, long long s_w,
                            std::uintptr_t ids_keep, long long N, long long K, long long C, long long P,
                            long long grid_h, long long grid_w, const std::vector<float>& scale,
                            const std::vector<float>& offset, int out_dtype, std::uintptr_t out,
                            std::uintptr_t stream) {
  if (N < 0 || K < 0 || C < 1 || P < 1 || grid_h < 1 || grid_w < 1) {
    throw py::value_error("patch_gather_normalize: sizes must be positive (N, K >= 0)");
  }
  const maefast::PixelAffine px = maefast::make_pixel_affine(scale, offset, C, true, "patch_gather_normalize");
  if (N * K >= (1LL << 31) || C * P * P >= (1LL << 31)) {
    throw py::value_error("patch_gather_normalize: N*K and C*p*p must be below 2^31");
  }
  if (N * K == 0) return;  // before the pointer checks: the caching allocator gives empty tensors no memory
  if (imgs == 0 || ids_keep == 0 || out == 0) throw py::value_error("patch_gather_normalize: null pointer");
  cudaStream_t s = maefast::as_stream(stream);
  const int c = static_cast<int>(C), p = static_cast<int>(P);
  auto go = [&](auto tag) {
    using TO = decltype(tag);
    launch_normalize<TO>(imgs, s_n, s_c, s_h, s_w, ids_keep, N * K, K, c, p, grid_w, grid_h * grid_w, px, out, s);
  };
  switch (out_dtype) {
    case maefast::kFloat32: go(float{}); break;
    case maefast::kFloat16: go(__half{}); break;
    case maefast::kBFloat16: go(__nv_bfloat16{}); break;
    default: throw py::value_error("patch_gather_normalize: out dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
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
  m.def("patch_gather_unit_bytes", &row_unit_bytes, py::arg("imgs"), py::arg("stride_n"), py::arg("stride_c"),
        py::arg("stride_h"), py::arg("stride_w"), py::arg("batch"), py::arg("len_keep"), py::arg("channels"),
        py::arg("patch_size"), py::arg("grid_h"), py::arg("grid_w"), py::arg("elem_size"), py::arg("out"),
        "The copy unit (bytes) patch_gather's row kernel would use for these arguments; 0: the element-wise kernel");
  m.def("patch_gather_normalize", &patch_gather_normalize, py::arg("imgs"), py::arg("stride_n"), py::arg("stride_c"),
        py::arg("stride_h"), py::arg("stride_w"), py::arg("ids_keep"), py::arg("batch"), py::arg("len_keep"),
        py::arg("channels"), py::arg("patch_size"), py::arg("grid_h"), py::arg("grid_w"), py::arg("scale"),
        py::arg("offset"), py::arg("out_dtype"), py::arg("out"), py::arg("stream"),
        "Gather the kept patches of uint8 NCHW images (strides in elements) into rows (N*K, C*p*p) ordered "
        "(c, kh, kw), each pixel normalised as (v - offset[c]) * scale[c] in fp32 and stored in out's dtype (code "
        "0 fp32, 1 fp16, 2 bf16); ids_keep (N, K) int64 contiguous; out contiguous; 1 to 4 channels");
}
