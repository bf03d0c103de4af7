// uint8 pixels in the kernels: the official normalisation (ToTensor, then Normalize(mean, std))
// folded into x = (v - offset_c) * scale_c in fp32, offset_c = 255 mean_c, scale_c = 1 / (255 std_c)
// (computed in Python, maefast/ops/_pixels.py, which also says how it rounds against the official).
// Up to kMaxPixelChannels channels; the factors travel by value in the kernel arguments (no device
// buffer to copy per call).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "dtype.cuh"

namespace maefast {

constexpr int kMaxPixelChannels = 4;  // maefast/ops/_pixels.py MAX_CHANNELS

struct PixelAffine {
  float scale[kMaxPixelChannels];
  float offset[kMaxPixelChannels];
};

// From the Python lists: for uint8 images (`needed`) C <= 4 channels, at least C values each (the
// rest is ignored); otherwise unused (identity).
inline PixelAffine make_pixel_affine(const std::vector<float>& scale, const std::vector<float>& offset,
                                     long long channels, bool needed, const char* what) {
  PixelAffine a{};
  for (int i = 0; i < kMaxPixelChannels; ++i) {
    a.scale[i] = 1.f;
    a.offset[i] = 0.f;
  }
  if (!needed) return a;
  if (channels < 1 || channels > kMaxPixelChannels || static_cast<long long>(scale.size()) < channels ||
      static_cast<long long>(offset.size()) < channels) {
    throw pybind11::value_error(std::string(what) + ": uint8 images need 1 to " + std::to_string(kMaxPixelChannels) +
                                " channels and a scale and offset per channel (got C=" + std::to_string(channels) +
                                ", " + std::to_string(scale.size()) + " scales, " + std::to_string(offset.size()) +
                                " offsets)");
  }
  for (long long i = 0; i < channels; ++i) {
    a.scale[i] = scale[i];
    a.offset[i] = offset[i];
  }
  return a;
}

// (v - offset_c) * scale_c, the product rounded as such (__fmul_rn: not contracted into an fma with
// what the caller adds next). The factors are selected by comparisons, not by a dynamic index, so
// the struct is never copied to local memory.
__device__ __forceinline__ float normalize_pixel(uint8_t v, long long c, const PixelAffine& a) {
  const float s = c == 0 ? a.scale[0] : c == 1 ? a.scale[1] : c == 2 ? a.scale[2] : a.scale[3];
  const float b = c == 0 ? a.offset[0] : c == 1 ? a.offset[1] : c == 2 ? a.offset[2] : a.offset[3];
  return __fmul_rn(static_cast<float>(v) - b, s);
}

// A pixel of channel c as fp32: float types converted, uint8 normalised.
template <typename T>
__device__ __forceinline__ float pixel_f(T v, long long, const PixelAffine&) { return to_f(v); }
template <>
__device__ __forceinline__ float pixel_f<uint8_t>(uint8_t v, long long c, const PixelAffine& a) {
  return normalize_pixel(v, c, a);
}

}  // namespace maefast
