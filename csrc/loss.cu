// Masked MSE on (optionally) per-patch-normalised pixels, forward and backward (CUDA C++; Python
// validates inputs in maefast/ops/loss.py). One block per patch (n, l) of the (N, L) grid:
//   pred_masked == false: w = mask[n, l]; pred row (n, l); every image patch is read, also when w == 0
//                         (a zero-weight row adds w * row loss: 0, or NaN when its pred or image
//                         patch is not finite, as the official (loss * mask).sum(): 0 * NaN is NaN).
//   pred_masked == true:  j = ids_restore[n, l] - K; masked iff 0 <= j < M: pred row (n, j), w = 1;
//                         else the block writes 0 (forward) / nothing (backward) and reads nothing.
// Target element e of the patch (official order e = (p_row * p + p_col) * C + c) is
// img[n, c, hi * p + p_row, wi * p + p_col]. With norm: fp32 mean, unbiased var, IEEE sqrt/div.
// Forward writes w * row loss per patch (fp32, summed by torch: deterministic); backward writes
// grad = (*scale) * w * 2 / P * (pred - target), scale = grad_loss / sum(w) read on the device.
// uint8 images: each pixel is normalised as it is read (pixels.cuh), before the statistics.
#include <pybind11/stl.h>

#include "common.h"
#include "dtype.cuh"
#include "pixels.cuh"

namespace py = pybind11;

namespace {

using maefast::from_f;
using maefast::to_f;

constexpr int kThreads = 256;  // a multiple of 32, at most 1024 (block_sum's layout)
constexpr float kEps = 1e-6f;

// Sum over the block, returned to every thread; fixed order (deterministic). smem: 33 floats.
__device__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // every thread has read smem[32] of a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x >> 5;
    float r = lane < nw ? smem[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
    if (lane == 0) smem[32] = r;
  }
  __syncthreads();
  return smem[32];
}

struct Args {
  int64_t N, L, GW, K, M, C, p, P;
  int64_t s_pred_n, s_pred_r, s_pred_e;
  int64_t s_img_n, s_img_c, s_img_h, s_img_w;
  int64_t s_w_n, s_w_l;
  bool norm, pred_masked;
  maefast::PixelAffine px;  // uint8 images only
};

struct Row {
  int64_t n, prow, img_base, hi, wi;
  float w;
  bool pred_ok, active;
};

template <typename TW>
__device__ __forceinline__ Row row_info(const Args& a, const TW* wt, int64_t q) {
  Row r;
  r.n = q / a.L;
  const int64_t l = q % a.L;
  r.hi = l / a.GW;
  r.wi = l % a.GW;
  r.img_base = r.n * a.s_img_n;
  if (a.pred_masked) {
    const int64_t j = static_cast<int64_t>(wt[r.n * a.s_w_n + l * a.s_w_l]) - a.K;
    r.active = j >= 0 && j < a.M;
    r.pred_ok = r.active;
    r.prow = r.active ? j : 0;
    r.w = r.active ? 1.f : 0.f;
  } else {
    r.w = static_cast<float>(wt[r.n * a.s_w_n + l * a.s_w_l]);
    r.active = true;  // read the patch even where w == 0: non-finite pixels reach the loss (official)
    r.pred_ok = true;
    r.prow = l;
  }
  return r;
}

template <typename TI>
__device__ __forceinline__ float target_at(const Args& a, const TI* img, const Row& r, int64_t e) {
  const int64_t c = e % a.C;
  const int64_t pc = (e / a.C) % a.p;
  const int64_t pr = e / (a.C * a.p);
  const int64_t off = r.img_base + c * a.s_img_c + (r.hi * a.p + pr) * a.s_img_h + (r.wi * a.p + pc) * a.s_img_w;
  return maefast::pixel_f(img[off], c, a.px);
}

// mean and 1 / denominator of the normalisation (0 and 1 when not normalising or not active).
template <typename TI>
__device__ __forceinline__ void patch_stats(const Args& a, const TI* img, const Row& r, float* smem, float& mean,
                                            float& denom) {
  mean = 0.f;
  denom = 1.f;
  if (!a.norm || !r.active) return;  // uniform over the block: r depends on blockIdx only
  float s = 0.f;
  for (int64_t e = threadIdx.x; e < a.P; e += blockDim.x) s += target_at(a, img, r, e);
  mean = block_sum(s, smem) / static_cast<float>(a.P);
  float ss = 0.f;
  for (int64_t e = threadIdx.x; e < a.P; e += blockDim.x) {
    const float dv = target_at(a, img, r, e) - mean;
    ss += __fmul_rn(dv, dv);  // rounded before it is summed (no fma), as the Triton kernel and the reference
  }
  const float var = block_sum(ss, smem) / static_cast<float>(a.P - 1);
  denom = sqrtf(var + kEps);
}

template <typename TP, typename TI, typename TW>
__global__ void norm_pix_loss_fwd_kernel(const TP* __restrict__ pred, const TI* __restrict__ img,
                                         const TW* __restrict__ wt, float* __restrict__ row_out, Args a) {
  __shared__ float smem[33];
  const int64_t q = blockIdx.x;
  if (q >= a.N * a.L) return;
  const Row r = row_info(a, wt, q);
  if (!r.pred_ok) {
    if (threadIdx.x == 0) row_out[q] = 0.f;
    return;
  }
  float mean, denom;
  patch_stats(a, img, r, smem, mean, denom);
  const TP* x = pred + r.n * a.s_pred_n + r.prow * a.s_pred_r;
  float s = 0.f;
  for (int64_t e = threadIdx.x; e < a.P; e += blockDim.x) {
    float t = 0.f;
    if (r.active) {
      t = target_at(a, img, r, e);
      if (a.norm) t = (t - mean) / denom;
    }
    const float dv = to_f(x[e * a.s_pred_e]) - t;
    s += __fmul_rn(dv, dv);  // rounded before it is summed (no fma), as the Triton kernel and the reference
  }
  const float total = block_sum(s, smem);
  if (threadIdx.x == 0) row_out[q] = total / static_cast<float>(a.P) * r.w;
}

template <typename TP, typename TI, typename TW>
__global__ void norm_pix_loss_bwd_kernel(const TP* __restrict__ pred, const TI* __restrict__ img,
                                         const TW* __restrict__ wt, const float* __restrict__ scale,
                                         TP* __restrict__ gpred, Args a) {
  __shared__ float smem[33];
  const int64_t q = blockIdx.x;
  if (q >= a.N * a.L) return;
  const Row r = row_info(a, wt, q);
  if (!r.pred_ok) return;
  float mean, denom;
  patch_stats(a, img, r, smem, mean, denom);
  const float k = scale[0] * 2.f / static_cast<float>(a.P) * r.w;
  const TP* x = pred + r.n * a.s_pred_n + r.prow * a.s_pred_r;
  const int64_t rows = a.pred_masked ? a.M : a.L;
  TP* gout = gpred + (r.n * rows + r.prow) * a.P;  // contiguous (N, rows, P)
  for (int64_t e = threadIdx.x; e < a.P; e += blockDim.x) {
    float t = 0.f;
    if (r.active) {
      t = target_at(a, img, r, e);
      if (a.norm) t = (t - mean) / denom;
    }
    gout[e] = from_f<TP>((to_f(x[e * a.s_pred_e]) - t) * k);
  }
}

Args make_args(int64_t N, int64_t L, int64_t GW, int64_t K, int64_t M, int64_t C, int64_t p, int64_t spn,
               int64_t spr, int64_t spe, int64_t sin, int64_t sic, int64_t sih, int64_t siw, int64_t swn,
               int64_t swl, bool norm, bool pred_masked, const maefast::PixelAffine& px) {
  if (N < 1 || L < 1 || GW < 1 || L % GW != 0 || C < 1 || p < 1 || M < 1 || M > L || K < 0 || K > L) {
    throw py::value_error("norm_pix_loss: bad sizes N=" + std::to_string(N) + " L=" + std::to_string(L) + " GW=" +
                          std::to_string(GW) + " K=" + std::to_string(K) + " M=" + std::to_string(M) +
                          " C=" + std::to_string(C) + " p=" + std::to_string(p));
  }
  if (!pred_masked && M != L) throw py::value_error("norm_pix_loss: pred must have L rows when pred_masked is false");
  if (N * L > 0x7fffffffLL) throw py::value_error("norm_pix_loss: N * L exceeds the grid size");
  return Args{N, L, GW, K, M, C, p, p * p * C, spn, spr, spe, sin, sic, sih, siw, swn, swl, norm, pred_masked, px};
}

template <typename TP, typename TI, typename TW>
void launch_weights(bool fwd, std::uintptr_t pred, std::uintptr_t img, std::uintptr_t wt, std::uintptr_t scale,
                    std::uintptr_t out, const Args& a, cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>(a.N * a.L);
  if (fwd) {
    norm_pix_loss_fwd_kernel<TP, TI, TW><<<blocks, kThreads, 0, s>>>(
        maefast::as_ptr<const TP>(pred), maefast::as_ptr<const TI>(img), maefast::as_ptr<const TW>(wt),
        maefast::as_ptr<float>(out), a);
  } else {
    norm_pix_loss_bwd_kernel<TP, TI, TW><<<blocks, kThreads, 0, s>>>(
        maefast::as_ptr<const TP>(pred), maefast::as_ptr<const TI>(img), maefast::as_ptr<const TW>(wt),
        maefast::as_ptr<const float>(scale), maefast::as_ptr<TP>(out), a);
  }
}

template <typename TP, typename TI>
void launch(bool fwd, std::uintptr_t pred, std::uintptr_t img, std::uintptr_t wt, std::uintptr_t scale,
            std::uintptr_t out, const Args& a, cudaStream_t s) {
  // The index tensor (pred_masked) is int64, the weight tensor fp32 (converted in Python).
  if (a.pred_masked) {
    launch_weights<TP, TI, int64_t>(fwd, pred, img, wt, scale, out, a, s);
  } else {
    launch_weights<TP, TI, float>(fwd, pred, img, wt, scale, out, a, s);
  }
  MAEFAST_LAUNCH_CHECK();
}

template <typename TP>
void dispatch_img(bool fwd, int img_dtype, std::uintptr_t pred, std::uintptr_t img, std::uintptr_t wt,
                  std::uintptr_t scale, std::uintptr_t out, const Args& a, cudaStream_t s) {
  switch (img_dtype) {
    case 0: launch<TP, float>(fwd, pred, img, wt, scale, out, a, s); break;
    case 1: launch<TP, __half>(fwd, pred, img, wt, scale, out, a, s); break;
    case 2: launch<TP, __nv_bfloat16>(fwd, pred, img, wt, scale, out, a, s); break;
    case 3: launch<TP, uint8_t>(fwd, pred, img, wt, scale, out, a, s); break;
    default: throw py::value_error("norm_pix_loss: imgs dtype code must be 0 (fp32), 1 (fp16), 2 (bf16) or 3 (uint8)");
  }
}

void run(bool fwd, std::uintptr_t pred, std::uintptr_t img, std::uintptr_t wt, std::uintptr_t scale,
         std::uintptr_t out, int64_t N, int64_t L, int64_t GW, int64_t K, int64_t M, int64_t C, int64_t p,
         int64_t spn, int64_t spr, int64_t spe, int64_t sin, int64_t sic, int64_t sih, int64_t siw, int64_t swn,
         int64_t swl, bool norm, bool pred_masked, int pred_dtype, int img_dtype, const std::vector<float>& px_scale,
         const std::vector<float>& px_offset, std::uintptr_t stream) {
  const maefast::PixelAffine px =
      maefast::make_pixel_affine(px_scale, px_offset, C, img_dtype == maefast::kUInt8, "norm_pix_loss");
  const Args a = make_args(N, L, GW, K, M, C, p, spn, spr, spe, sin, sic, sih, siw, swn, swl, norm, pred_masked, px);
  if (!pred || !img || !wt || !out || (!fwd && !scale)) throw py::value_error("norm_pix_loss: null pointer");
  cudaStream_t s = maefast::as_stream(stream);
  switch (pred_dtype) {
    case 0: dispatch_img<float>(fwd, img_dtype, pred, img, wt, scale, out, a, s); break;
    case 1: dispatch_img<__half>(fwd, img_dtype, pred, img, wt, scale, out, a, s); break;
    case 2: dispatch_img<__nv_bfloat16>(fwd, img_dtype, pred, img, wt, scale, out, a, s); break;
    default: throw py::value_error("norm_pix_loss: pred dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

void norm_pix_loss_fwd(std::uintptr_t pred, std::uintptr_t img, std::uintptr_t wt, std::uintptr_t row_out, int64_t N,
                       int64_t L, int64_t GW, int64_t K, int64_t M, int64_t C, int64_t p, int64_t spn, int64_t spr,
                       int64_t spe, int64_t sin, int64_t sic, int64_t sih, int64_t siw, int64_t swn, int64_t swl,
                       bool norm, bool pred_masked, int pred_dtype, int img_dtype, const std::vector<float>& px_scale,
                       const std::vector<float>& px_offset, std::uintptr_t stream) {
  run(true, pred, img, wt, 0, row_out, N, L, GW, K, M, C, p, spn, spr, spe, sin, sic, sih, siw, swn, swl, norm,
      pred_masked, pred_dtype, img_dtype, px_scale, px_offset, stream);
}

void norm_pix_loss_bwd(std::uintptr_t pred, std::uintptr_t img, std::uintptr_t wt, std::uintptr_t scale,
                       std::uintptr_t gpred, int64_t N, int64_t L, int64_t GW, int64_t K, int64_t M, int64_t C,
                       int64_t p, int64_t spn, int64_t spr, int64_t spe, int64_t sin, int64_t sic, int64_t sih,
                       int64_t siw, int64_t swn, int64_t swl, bool norm, bool pred_masked, int pred_dtype,
                       int img_dtype, const std::vector<float>& px_scale, const std::vector<float>& px_offset,
                       std::uintptr_t stream) {
  run(false, pred, img, wt, scale, gpred, N, L, GW, K, M, C, p, spn, spr, spe, sin, sic, sih, siw, swn, swl, norm,
      pred_masked, pred_dtype, img_dtype, px_scale, px_offset, stream);
}

}  // namespace

MAEFAST_REGISTER(loss) {
  m.def("norm_pix_loss_fwd", &norm_pix_loss_fwd,
        "Per-patch w * MSE rows: (pred, img, mask-or-ids, row_out pointers, N, L, GW, K, M, C, p, pred strides (3), "
        "img strides (4), mask/ids strides (2), norm, pred_masked, pred dtype, img dtype, uint8 pixel scales and "
        "offsets (C floats each, empty for float images), stream)");
  m.def("norm_pix_loss_bwd", &norm_pix_loss_bwd,
        "Grad of pred: (pred, img, mask-or-ids, scale, gpred pointers, N, L, GW, K, M, C, p, pred strides (3), "
        "img strides (4), mask/ids strides (2), norm, pred_masked, pred dtype, img dtype, uint8 pixel scales and "
        "offsets (C floats each, empty for float images), stream)");
}
