// Decoder un-shuffle, forward and backward (CUDA C++; Python validates inputs in maefast/ops/unshuffle.py).
//
// Output row t of sample n (t = 0: cls, t = 1 + l: patch l), D channels:
//   t == 0                        -> x[n, 0] + pos[0]
//   0 <= ids_restore[n, l] < K    -> x[n, 1 + ids_restore[n, l]] + pos[1 + l]
//   otherwise                     -> tok + pos[1 + l]
// Any index outside [0, K) reads the mask token, so no access ever leaves its buffer.
// x, mask token and pos arrive in one dtype, their promotion (Python casts them: exact); math in fp32.
// The backward writes x's gradient in the output gradient's dtype (Python rounds it to x's).
#include "common.h"
#include "dtype.cuh"

namespace py = pybind11;

namespace {

using maefast::from_f;
using maefast::to_f;

constexpr int kThreads = 128;

// The x row that feeds output row t of sample n, or -1 for the mask token.
__device__ __forceinline__ int64_t source_row(const int64_t* ids, int64_t n, int64_t t, int64_t K, int64_t s_ids_n,
                                              int64_t s_ids_l) {
  if (t == 0) return 0;
  const int64_t r = ids[n * s_ids_n + (t - 1) * s_ids_l];
  return (r >= 0 && r < K) ? r + 1 : -1;
}

// One block per output row (n, t); threads stride over the D channels.
template <typename T>
__global__ void unshuffle_fwd_kernel(const T* __restrict__ x, const T* __restrict__ tok,
                                     const int64_t* __restrict__ ids, const T* __restrict__ pos, T* __restrict__ out,
                                     int64_t N, int64_t T_rows, int64_t K, int64_t D, int64_t s_x_n, int64_t s_x_k,
                                     int64_t s_x_d, int64_t s_ids_n, int64_t s_ids_l, int64_t s_pos_t,
                                     int64_t s_pos_d) {
  const int64_t row = blockIdx.x;
  if (row >= N * T_rows) return;
  const int64_t n = row / T_rows;
  const int64_t t = row % T_rows;
  const int64_t src = source_row(ids, n, t, K, s_ids_n, s_ids_l);
  T* o = out + row * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = src >= 0 ? to_f(x[n * s_x_n + src * s_x_k + d * s_x_d]) : to_f(tok[d]);
    o[d] = from_f<T>(v + to_f(pos[t * s_pos_t + d * s_pos_d]));
  }
}

// One block per (output row t, chunk of n_per samples); samples walked in order, so the fp32 sums
// over samples (mask token: masked slots only; pos: all) are deterministic. gx is contiguous
// (N, 1+K, D); tok_part and pos_part are (chunks, T_rows, D) fp32.
template <typename T>
__global__ void unshuffle_bwd_kernel(const T* __restrict__ g, const int64_t* __restrict__ ids, T* __restrict__ gx,
                                     float* __restrict__ tok_part, float* __restrict__ pos_part, int64_t N,
                                     int64_t T_rows, int64_t K, int64_t D, int64_t n_per, int64_t chunks,
                                     int64_t s_g_n, int64_t s_g_t, int64_t s_g_d, int64_t s_ids_n, int64_t s_ids_l,
                                     bool need_pos) {
  const int64_t b = blockIdx.x;
  if (b >= chunks * T_rows) return;
  const int64_t chunk = b / T_rows;
  const int64_t t = b % T_rows;
  const int64_t n0 = chunk * n_per;
  const int64_t n1 = n0 + n_per < N ? n0 + n_per : N;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc_tok = 0.f, acc_pos = 0.f;
    for (int64_t n = n0; n < n1; ++n) {
      const T gv = g[n * s_g_n + t * s_g_t + d * s_g_d];
      const int64_t dst = source_row(ids, n, t, K, s_ids_n, s_ids_l);
      if (dst >= 0) {
        gx[(n * (K + 1) + dst) * D + d] = gv;
      } else {
        acc_tok += to_f(gv);
      }
      acc_pos += to_f(gv);
    }
    const int64_t o = (chunk * T_rows + t) * D + d;
    tok_part[o] = acc_tok;
    if (need_pos) pos_part[o] = acc_pos;
  }
}

void check_sizes(int64_t N, int64_t L, int64_t K, int64_t D) {
  if (N < 1 || L < 1 || D < 1 || K < 0 || K > L) {
    throw py::value_error("unshuffle: need N, L, D >= 1 and 0 <= K <= L, got N=" + std::to_string(N) +
                          " L=" + std::to_string(L) + " K=" + std::to_string(K) + " D=" + std::to_string(D));
  }
  if (N * (L + 1) > 0x7fffffffLL) throw py::value_error("unshuffle: N * (1 + L) exceeds the grid size");
}

template <typename T>
void launch_fwd(std::uintptr_t x, std::uintptr_t tok, std::uintptr_t ids, std::uintptr_t pos, std::uintptr_t out,
                int64_t N, int64_t L, int64_t K, int64_t D, int64_t sxn, int64_t sxk, int64_t sxd, int64_t sin,
                int64_t sil, int64_t spt, int64_t spd, cudaStream_t stream) {
  const int64_t rows = N * (L + 1);
  unshuffle_fwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      maefast::as_ptr<const T>(x), maefast::as_ptr<const T>(tok), maefast::as_ptr<const int64_t>(ids),
      maefast::as_ptr<const T>(pos), maefast::as_ptr<T>(out), N, L + 1, K, D, sxn, sxk, sxd, sin, sil, spt, spd);
  MAEFAST_LAUNCH_CHECK();
}

void unshuffle_fwd(std::uintptr_t x, std::uintptr_t tok, std::uintptr_t ids, std::uintptr_t pos, std::uintptr_t out,
                   int64_t N, int64_t L, int64_t K, int64_t D, int64_t sxn, int64_t sxk, int64_t sxd, int64_t sin,
                   int64_t sil, int64_t spt, int64_t spd, int dtype, std::uintptr_t stream) {
  check_sizes(N, L, K, D);
  if (!x || !tok || !ids || !pos || !out) throw py::value_error("unshuffle_fwd: null pointer");
  cudaStream_t s = maefast::as_stream(stream);
  switch (dtype) {
    case 0: launch_fwd<float>(x, tok, ids, pos, out, N, L, K, D, sxn, sxk, sxd, sin, sil, spt, spd, s); break;
    case 1: launch_fwd<__half>(x, tok, ids, pos, out, N, L, K, D, sxn, sxk, sxd, sin, sil, spt, spd, s); break;
    case 2: launch_fwd<__nv_bfloat16>(x, tok, ids, pos, out, N, L, K, D, sxn, sxk, sxd, sin, sil, spt, spd, s); break;
    default: throw py::value_error("unshuffle_fwd: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

template <typename T>
void launch_bwd(std::uintptr_t g, std::uintptr_t ids, std::uintptr_t gx, std::uintptr_t tok_part,
                std::uintptr_t pos_part, int64_t N, int64_t L, int64_t K, int64_t D, int64_t n_per, int64_t chunks,
                int64_t sgn, int64_t sgt, int64_t sgd, int64_t sin, int64_t sil, bool need_pos, cudaStream_t stream) {
  const int64_t blocks = chunks * (L + 1);
  unshuffle_bwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      maefast::as_ptr<const T>(g), maefast::as_ptr<const int64_t>(ids), maefast::as_ptr<T>(gx),
      maefast::as_ptr<float>(tok_part), maefast::as_ptr<float>(pos_part), N, L + 1, K, D, n_per, chunks, sgn, sgt,
      sgd, sin, sil, need_pos);
  MAEFAST_LAUNCH_CHECK();
}

void unshuffle_bwd(std::uintptr_t g, std::uintptr_t ids, std::uintptr_t gx, std::uintptr_t tok_part,
                   std::uintptr_t pos_part, int64_t N, int64_t L, int64_t K, int64_t D, int64_t n_per, int64_t chunks,
                   int64_t sgn, int64_t sgt, int64_t sgd, int64_t sin, int64_t sil, bool need_pos, int dtype,
                   std::uintptr_t stream) {
  check_sizes(N, L, K, D);
  if (!g || !ids || !gx || !tok_part || !pos_part) throw py::value_error("unshuffle_bwd: null pointer");
  // The chunks must cover 0..N-1 exactly: chunks * n_per >= N and (chunks - 1) * n_per < N.
  if (n_per < 1 || chunks < 1 || chunks * n_per < N || (chunks - 1) * n_per >= N) {
    throw py::value_error("unshuffle_bwd: chunks=" + std::to_string(chunks) + " x n_per=" + std::to_string(n_per) +
                          " must cover N=" + std::to_string(N) + " with no empty chunk");
  }
  if (chunks * (L + 1) > 0x7fffffffLL) throw py::value_error("unshuffle_bwd: chunks * (1 + L) exceeds the grid size");
  cudaStream_t s = maefast::as_stream(stream);
  switch (dtype) {
    case 0: launch_bwd<float>(g, ids, gx, tok_part, pos_part, N, L, K, D, n_per, chunks, sgn, sgt, sgd, sin, sil, need_pos, s); break;
    case 1: launch_bwd<__half>(g, ids, gx, tok_part, pos_part, N, L, K, D, n_per, chunks, sgn, sgt, sgd, sin, sil, need_pos, s); break;
    case 2: launch_bwd<__nv_bfloat16>(g, ids, gx, tok_part, pos_part, N, L, K, D, n_per, chunks, sgn, sgt, sgd, sin, sil, need_pos, s); break;
    default: throw py::value_error("unshuffle_bwd: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

}  // namespace

MAEFAST_REGISTER(unshuffle) {
  m.def("unshuffle_fwd", &unshuffle_fwd,
        "Decoder un-shuffle forward: (x, tok, ids, pos, out pointers, N, L, K, D, x strides (3), ids strides (2), "
        "pos strides (2), dtype code, stream)");
  m.def("unshuffle_bwd", &unshuffle_bwd,
        "Decoder un-shuffle backward: (g, ids, gx, tok_part, pos_part pointers, N, L, K, D, n_per, chunks, g strides "
        "(3), ids strides (2), need_pos, dtype code, stream)");
}
