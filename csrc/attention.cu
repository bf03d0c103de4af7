// Short-sequence attention forward on the packed qkv layout (N, L, 3*H*Dh), tensor cores via WMMA.
//
// One block per (sequence, head) holds the whole sequence (L <= 128): K and V in shared memory,
// one warp per 16-row strip of queries. Each warp computes its 16 x Lp score strip with WMMA
// (fp32 accumulate), does the softmax in fp32 in shared memory (rows of a strip are independent,
// so no block-wide reduction), writes P back as fp16/bf16 and multiplies by V with WMMA.
// Writes out (N, L, H*Dh) and the fp32 natural-log logsumexp (for the Triton backward).
// The backward of this impl is the Triton one (maefast/ops/attention.py).
//
// Shared memory per block: K, V (Lp x Dh each) + per warp [A: Q strip, then P strip] and
// [B: S strip (fp32), then O strip (fp32)]; 160 KiB at Lp = Dh = 128 (fits sm_80 and sm_90).
// Safety: every global load/store is bounds-checked against the sequence length, which is clamped
// to the padded length the shared memory was sized for; inputs are validated in Python and again
// here (alignment for the 16-byte loads, sizes) before the launch. Varlen offsets on the device are
// not checked on the host (a sync): they are clamped into [0, total_rows] here; offsets that do not
// start at 0, decrease or end beyond the rows make every sequence write NaN (out and lse), and a
// sequence longer than max_seqlen writes NaN instead of a truncated result (maefast/_validate.py
// check_cu_seqlens states the contract).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"

namespace py = pybind11;
using namespace nvcuda;

namespace {

constexpr int kTile = 16;     // WMMA m = n = k
constexpr int kMaxLen = 128;  // whole sequence in one block
constexpr int kWarp = 32;

struct AttnFwdParams {
  const void* qkv;        // (Nb, Lr, 3*H*Dh), last dim contiguous, [3][H][Dh]
  void* out;              // (Nb, Lr, H*Dh), last dim contiguous
  float* lse;             // (Nb, H, Lr), row stride 1
  const int* cu_seqlens;  // (num_seqs+1,) or nullptr (then sequence s is batch s, rows [0, seqlen))
  long long stride_qkv_b, stride_qkv_l, stride_out_b, stride_out_l, stride_lse_b, stride_lse_h;
  int num_heads;
  int seqlen;  // L (batched) or max_seqlen (varlen)
  long long total_rows;  // Lr: rows of each batch entry (varlen: the packed T)
  int lp;      // padded length: multiple of 16, <= kMaxLen; blockDim.x == 2 * lp (lp / 16 warps)
  float scale;
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Per-warp scratch, in bytes (multiples of 32 so every WMMA pointer stays 256-bit aligned).
template <typename T>
__host__ __device__ constexpr int region_a_bytes(int lp, int dh) { return kTile * (lp > dh ? lp : dh) * (int)sizeof(T); }
__host__ __device__ constexpr int region_b_bytes(int lp, int dh) { return kTile * (lp > dh ? lp : dh) * (int)sizeof(float); }
template <typename T>
__host__ __device__ constexpr int smem_bytes(int lp, int dh) {
  return 2 * lp * dh * (int)sizeof(T) + (lp / kTile) * (region_a_bytes<T>(lp, dh) + region_b_bytes(lp, dh));
}

// Copies rows [0, rows) of a (rows x DH) tile from global (row stride `ld` elements) into shared
// (row stride DH), 8 elements (16 bytes) at a time; rows in [valid, rows) are zero-filled.
template <typename T, int DH>
__device__ __forceinline__ void load_tile(T* dst, const T* src, long long ld, int rows, int valid, int tid, int nthreads) {
  constexpr int kVec = 8;
  constexpr int kVecPerRow = DH / kVec;
  const int total = rows * kVecPerRow;
  for (int i = tid; i < total; i += nthreads) {
    const int r = i / kVecPerRow;
    const int c = (i % kVecPerRow) * kVec;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) v = *reinterpret_cast<const uint4*>(src + r * ld + c);
    *reinterpret_cast<uint4*>(dst + r * DH + c) = v;
  }
}

template <typename T, int DH>
__global__ void __launch_bounds__(2 * kMaxLen) attention_fwd_wmma_kernel(AttnFwdParams p) {
  static_assert(DH % kTile == 0 && DH <= 128, "head dim must be a multiple of 16, at most 128");
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int lp = p.lp;
  const int tid = threadIdx.x;
  const int warp = tid / kWarp;
  const int lane = tid % kWarp;

  long long batch = seq, row0 = 0;
  int len = p.seqlen;
  bool poison = false;
  if (p.cu_seqlens != nullptr) {
    batch = 0;
    const long long a = p.cu_seqlens[seq], b = p.cu_seqlens[seq + 1];
    row0 = min(max(a, 0LL), p.total_rows);
    const long long end = min(max(b, row0), p.total_rows);
    poison = a != row0 || b != end || end - row0 > p.seqlen;
    len = static_cast<int>(min(end - row0, static_cast<long long>(lp)));
  }
  len = max(0, min(len, lp));  // never index past the shared tiles (a longer sequence is poisoned)

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + lp * DH;
  unsigned char* scratch = reinterpret_cast<unsigned char*>(sv + lp * DH) +
                           warp * (region_a_bytes<T>(lp, DH) + region_b_bytes(lp, DH));
  T* sa = reinterpret_cast<T*>(scratch);                                   // Q strip, then P strip
  float* sb = reinterpret_cast<float*>(scratch + region_a_bytes<T>(lp, DH));  // S strip, then O strip

  const T* qkv = static_cast<const T*>(p.qkv);
  const long long hd = (long long)p.num_heads * DH;
  const T* q_rows = qkv + batch * p.stride_qkv_b + row0 * p.stride_qkv_l + (long long)head * DH;
  const T* k_rows = q_rows + hd;
  const T* v_rows = k_rows + hd;

  load_tile<T, DH>(sk, k_rows, p.stride_qkv_l, lp, len, tid, blockDim.x);
  load_tile<T, DH>(sv, v_rows, p.stride_qkv_l, lp, len, tid, blockDim.x);
  const int r0 = warp * kTile;  // this warp's first query row
  load_tile<T, DH>(sa, q_rows + r0 * p.stride_qkv_l, p.stride_qkv_l, kTile, len - r0, lane, kWarp);
  // Varlen: every block checks the whole offset array (B+1 values, in cache after the first block):
  // sequences that decreasing offsets make overlap are each well-formed on their own and would race
  // on shared rows, so offsets that do not start at 0, decrease or end beyond the rows poison every
  // sequence. The vote rides on the barrier the block needs anyway.
  int malformed = 0;
  if (p.cu_seqlens != nullptr) {
    const int num_seqs = gridDim.x;
    for (int i = tid; i < num_seqs; i += blockDim.x) malformed |= p.cu_seqlens[i + 1] < p.cu_seqlens[i];
    if (tid == 0) malformed |= p.cu_seqlens[0] != 0 || p.cu_seqlens[num_seqs] > p.total_rows;
  }
  // the only block-wide barrier: every thread reaches it
  poison = __syncthreads_or(malformed) != 0 || poison;
  if (r0 >= len) return;  // warp-uniform; no barrier follows

  const int ntiles = lp / kTile;
  // S strip (16 x lp) = Q strip (16 x DH) @ K^T; K row-major (lp x DH) is K^T column-major.
  for (int j = 0; j < ntiles; ++j) {
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < DH / kTile; ++kk) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, sa + kk * kTile, DH);
      wmma::load_matrix_sync(b, sk + j * kTile * DH + kk * kTile, DH);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(sb + j * kTile, acc, lp, wmma::mem_row_major);
  }
  __syncwarp();

  // Softmax over the valid keys, fp32; P (normalised, like the reference) overwrites the Q strip.
  for (int i = 0; i < kTile; ++i) {
    const float* srow = sb + i * lp;
    float m = -INFINITY;
    for (int c = lane; c < len; c += kWarp) m = fmaxf(m, srow[c] * p.scale);
    m = warp_max(m);
    float sum = 0.0f;
    for (int c = lane; c < len; c += kWarp) sum += expf(srow[c] * p.scale - m);
    sum = warp_sum(sum);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* prow = sa + i * lp;
    for (int c = lane; c < lp; c += kWarp) prow[c] = from_float<T>(c < len ? expf(srow[c] * p.scale - m) * inv : 0.0f);
    const int row = r0 + i;
    if (lane == 0 && row < len) {
      p.lse[batch * p.stride_lse_b + (long long)head * p.stride_lse_h + row0 + row] = poison ? NAN : m + logf(sum);
    }
  }
  __syncwarp();

  // O strip (16 x DH) = P strip (16 x lp) @ V (lp x DH), staged in region B (S is dead).
#pragma unroll
  for (int d = 0; d < DH / kTile; ++d) {
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < ntiles; ++kk) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> b;
      wmma::load_matrix_sync(a, sa + kk * kTile, lp);
      wmma::load_matrix_sync(b, sv + kk * kTile * DH + d * kTile, DH);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(sb + d * kTile, acc, DH, wmma::mem_row_major);
  }
  __syncwarp();

  T* out = static_cast<T*>(p.out) + batch * p.stride_out_b + row0 * p.stride_out_l + (long long)head * DH;
  for (int i = lane; i < kTile * DH; i += kWarp) {
    const int r = i / DH;
    const int d = i % DH;
    if (r0 + r < len) out[(long long)(r0 + r) * p.stride_out_l + d] = from_float<T>(poison ? NAN : sb[r * DH + d]);
  }
}

template <typename T, int DH>
void launch(const AttnFwdParams& p, int num_seqs, cudaStream_t stream) {
  const int smem = smem_bytes<T>(p.lp, DH);
  int dev = 0, optin = 0;
  MAEFAST_CUDA_CHECK(cudaGetDevice(&dev));
  MAEFAST_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (smem > optin) {
    throw std::invalid_argument("attention_fwd: needs " + std::to_string(smem) + " bytes of shared memory per block, "
                                "the device allows " + std::to_string(optin));
  }
  auto kernel = attention_fwd_wmma_kernel<T, DH>;
  MAEFAST_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(num_seqs, p.num_heads);
  const dim3 block(2 * p.lp);
  kernel<<<grid, block, smem, stream>>>(p);
  MAEFAST_LAUNCH_CHECK();
}

template <typename T>
void dispatch_head_dim(const AttnFwdParams& p, int head_dim, int num_seqs, cudaStream_t stream) {
  switch (head_dim) {
    case 32: return launch<T, 32>(p, num_seqs, stream);
    case 64: return launch<T, 64>(p, num_seqs, stream);
    case 80: return launch<T, 80>(p, num_seqs, stream);
    case 96: return launch<T, 96>(p, num_seqs, stream);
    case 128: return launch<T, 128>(p, num_seqs, stream);
    default: throw std::invalid_argument("attention_fwd: head_dim must be one of 32, 64, 80, 96, 128, got " +
                                         std::to_string(head_dim));
  }
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("attention_fwd: " + msg);
}

void attention_fwd(std::uintptr_t qkv, std::uintptr_t out, std::uintptr_t lse, std::uintptr_t cu_seqlens,
                   int num_seqs, int num_heads, int head_dim, int seqlen, long long total_rows,
                   long long stride_qkv_b,
                   long long stride_qkv_l, long long stride_out_b, long long stride_out_l, long long stride_lse_b,
                   long long stride_lse_h, float scale, bool bf16, std::uintptr_t stream) {
  require(qkv != 0 && out != 0 && lse != 0, "null pointer");
  require(num_seqs >= 1 && num_heads >= 1 && num_heads <= 65535, "need num_seqs >= 1 and 1 <= num_heads <= 65535");
  require(seqlen >= 1 && seqlen <= kMaxLen, "seqlen (max_seqlen) must be in [1, 128], got " + std::to_string(seqlen));
  require(total_rows >= 0, "total_rows must be >= 0");
  require(qkv % 16 == 0, "qkv must be 16-byte aligned");
  require(stride_qkv_b % 8 == 0 && stride_qkv_l % 8 == 0, "qkv strides must be multiples of 8 elements");
  require(stride_qkv_b >= 0 && stride_qkv_l >= 0 && stride_out_b >= 0 && stride_out_l >= 0 && stride_lse_b >= 0 &&
              stride_lse_h >= 0, "negative stride");
  AttnFwdParams p;
  p.qkv = maefast::as_ptr<const void>(qkv);
  p.out = maefast::as_ptr<void>(out);
  p.lse = maefast::as_ptr<float>(lse);
  p.cu_seqlens = cu_seqlens ? maefast::as_ptr<const int>(cu_seqlens) : nullptr;
  p.stride_qkv_b = stride_qkv_b;
  p.stride_qkv_l = stride_qkv_l;
  p.stride_out_b = stride_out_b;
  p.stride_out_l = stride_out_l;
  p.stride_lse_b = stride_lse_b;
  p.stride_lse_h = stride_lse_h;
  p.num_heads = num_heads;
  p.seqlen = seqlen;
  p.total_rows = total_rows;
  p.lp = (seqlen + kTile - 1) / kTile * kTile;
  p.scale = scale;
  if (bf16) {
    dispatch_head_dim<__nv_bfloat16>(p, head_dim, num_seqs, maefast::as_stream(stream));
  } else {
    dispatch_head_dim<__half>(p, head_dim, num_seqs, maefast::as_stream(stream));
  }
}

}  // namespace

MAEFAST_REGISTER(attention) {
  m.def("attention_fwd", &attention_fwd, py::arg("qkv"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens"),
        py::arg("num_seqs"), py::arg("num_heads"), py::arg("head_dim"), py::arg("seqlen"), py::arg("total_rows"),
        py::arg("stride_qkv_b"), py::arg("stride_qkv_l"), py::arg("stride_out_b"), py::arg("stride_out_l"),
        py::arg("stride_lse_b"), py::arg("stride_lse_h"), py::arg("scale"), py::arg("bf16"), py::arg("stream"),
        "Attention forward for L <= 128 (fp16/bf16, WMMA): out (Nb, Lr, H*Dh) and lse (Nb, H, Lr) fp32. "
        "cu_seqlens: int32 device pointer or 0.");
}
