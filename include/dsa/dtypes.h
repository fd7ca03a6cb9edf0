#pragma once
// Host-side number formats: bfloat16 and float8_e4m3fn (OCP "E4M3FN": no
// infinities, max 448, NaN = S.1111.111), both rounded to nearest even.
// These define what "the same rounded inputs" means for every reference.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dsa {

using bf16_t = uint16_t;  // raw bits
using fp8_t = uint8_t;    // raw bits, e4m3fn

inline float bf16_to_float(bf16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<bf16_t>(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

float fp8_e4m3_to_float(fp8_t v);
// Round to nearest even, saturating to +-448 (the behaviour of cvt.satfinite);
// NaN stays NaN.
fp8_t float_to_fp8_e4m3(float f);
inline float round_fp8_e4m3(float f) { return fp8_e4m3_to_float(float_to_fp8_e4m3(f)); }

// The largest finite e4m3fn magnitude: one definition for the host and for
// device code (a namespace-scope constexpr scalar is usable in kernels), so
// that ue8m0 scales are computed from the same constant on both sides.
inline constexpr float kFp8E4M3Max = 448.0f;

// Power-of-two ("ue8m0") scale for a block whose largest magnitude is amax:
// s = 2^ceil(log2(max(amax, 1e-4) / 448)). Spec section 3.5.
float ue8m0_scale(float amax);

}  // namespace dsa
