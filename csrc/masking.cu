// Random masking: per-sample noise (given as float32/float64, or drawn with Philox4x32-10 from a
// seed, bit-exact with maefast.reference.philox and Triton's tl.rand) ranked inside the kernel.
//
// Block (n, chunk) stages the whole noise row of sample n in shared memory (as double, which holds
// every float32/float64 value exactly) and ranks RANK_THREADS patches of it against all L:
//   rank[i] = #{j : v[j] < v[i] or (v[j] == v[i] and j < i)}   (a stable ascending argsort)
// then writes ids_restore[n, i] = rank, mask[n, i] = rank >= K, ids_keep[n, rank] = i (rank < K).
// O(L^2 / RANK_THREADS) compares per thread; L <= MAX_L is checked here and in Python.
#include "common.h"

namespace py = pybind11;

namespace {

constexpr int RANK_THREADS = 128;
constexpr long long MAX_L = 4096;  // 32 KiB of shared doubles per block

__device__ __forceinline__ unsigned int philox_first_word(unsigned int c0, unsigned int c1, unsigned int k0,
                                                          unsigned int k1) {
  unsigned int c2 = 0u, c3 = 0u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const unsigned int a0 = c0, a2 = c2;
    c0 = __umulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = __umulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Triton's uint_to_uniform_float: int32 view, ~x where negative, float32(x) * 4.6566127342e-10f.
__device__ __forceinline__ float uint_to_uniform(unsigned int u) {
  int x = static_cast<int>(u);
  if (x < 0) x = ~x;
  return __fmul_rn(__int2float_rn(x), 4.6566127342e-10f);
}

// noise_kind: 0 = draw Philox from (seed, offset), 1 = float32 noise, 2 = float64 noise.
__global__ void random_masking_kernel(const void* __restrict__ noise, long long stride_n, long long stride_l,
                                      int noise_kind, unsigned long long seed, const long long* __restrict__ seed_ptr,
                                      unsigned long long offset, long long L, long long K,
                                      long long* __restrict__ ids_keep, long long* __restrict__ ids_restore,
                                      float* __restrict__ mask) {
  extern __shared__ double s_noise[];  // [L]
  const long long n = blockIdx.x;
  // A device seed (1-element int64 tensor) is read here, so a CUDA graph replays with its current value.
  if (seed_ptr != nullptr) seed = static_cast<unsigned long long>(*seed_ptr);
  const unsigned int k0 = static_cast<unsigned int>(seed & 0xffffffffull);
  const unsigned int k1 = static_cast<unsigned int>(seed >> 32);
  for (long long j = threadIdx.x; j < L; j += blockDim.x) {
    double v;
    if (noise_kind == 0) {
      const unsigned long long ctr = offset + static_cast<unsigned long long>(n * L + j);
      v = static_cast<double>(uint_to_uniform(philox_first_word(static_cast<unsigned int>(ctr & 0xffffffffull),
                                                                static_cast<unsigned int>(ctr >> 32), k0, k1)));
    } else if (noise_kind == 1) {
      v = static_cast<double>(static_cast<const float*>(noise)[n * stride_n + j * stride_l]);
    } else {
      v = static_cast<const double*>(noise)[n * stride_n + j * stride_l];
    }
    s_noise[j] = v;
  }
  __syncthreads();
  const long long i = static_cast<long long>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= L) return;
  const double vi = s_noise[i];
  const bool nan_i = isnan(vi);
  long long rank = 0;
  for (long long j = 0; j < L; ++j) {
    const double vj = s_noise[j];
    const bool nan_j = isnan(vj);
    // NaN ranks after every number (torch's sort order), NaNs among themselves by index
    const bool lt = vj < vi || (nan_i && !nan_j);
    const bool eq = vj == vi || (nan_i && nan_j);
    rank += (lt || (eq && j < i)) ? 1 : 0;
  }
  ids_restore[n * L + i] = rank;
  mask[n * L + i] = rank >= K ? 1.0f : 0.0f;
  if (rank < K) ids_keep[n * K + rank] = i;
}

void random_masking(std::uintptr_t noise, long long stride_n, long long stride_l, int noise_kind,
                    unsigned long long seed, unsigned long long offset, long long N, long long L, long long K,
                    std::uintptr_t ids_keep, std::uintptr_t ids_restore, std::uintptr_t mask, std::uintptr_t stream,
                    std::uintptr_t seed_ptr) {
  if (N < 0 || N > 2147483647LL) throw py::value_error("random_masking: batch must be in [0, 2**31)");
  if (L < 1 || L > MAX_L) throw py::value_error("random_masking: num_patches must be in [1, 4096]");
  if (K < 1 || K > L) throw py::value_error("random_masking: len_keep must be in [1, num_patches]");
  if (noise_kind < 0 || noise_kind > 2) throw py::value_error("random_masking: noise_kind must be 0, 1 or 2");
  if (N == 0) return;  // before the pointer checks: the caching allocator gives empty tensors no memory
  if (noise_kind != 0 && noise == 0) throw py::value_error("random_masking: null noise pointer");
  if (ids_keep == 0 || ids_restore == 0 || mask == 0) throw py::value_error("random_masking: null output pointer");
  const dim3 grid(static_cast<unsigned int>(N), static_cast<unsigned int>((L + RANK_THREADS - 1) / RANK_THREADS));
  const size_t smem = static_cast<size_t>(L) * sizeof(double);
  random_masking_kernel<<<grid, RANK_THREADS, smem, maefast::as_stream(stream)>>>(
      reinterpret_cast<const void*>(noise), stride_n, stride_l, noise_kind, seed,
      reinterpret_cast<const long long*>(seed_ptr), offset, L, K,
      maefast::as_ptr<long long>(ids_keep), maefast::as_ptr<long long>(ids_restore), maefast::as_ptr<float>(mask));
  MAEFAST_LAUNCH_CHECK();
}

}  // namespace

MAEFAST_REGISTER(masking) {
  m.def("random_masking", &random_masking, py::arg("noise"), py::arg("stride_n"), py::arg("stride_l"),
        py::arg("noise_kind"), py::arg("seed"), py::arg("offset"), py::arg("batch"), py::arg("num_patches"),
        py::arg("len_keep"), py::arg("ids_keep"), py::arg("ids_restore"), py::arg("mask"), py::arg("stream"),
        py::arg("seed_ptr") = 0,
        "Random masking of (batch, num_patches) into ids_keep (N,K) int64, ids_restore (N,L) int64, mask (N,L) "
        "float32; noise_kind 0 draws Philox noise from (seed, offset) — seed read from the device int64 at "
        "seed_ptr when it is not 0 — 1/2 read float32/float64 noise");
}
