#include "dsa/dtypes.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dsa {

float fp8_e4m3_to_float(fp8_t v) {
  const int sign = v >> 7;
  const int exp = (v >> 3) & 0xf;
  const int man = v & 0x7;
  float out;
  if (exp == 0xf && man == 0x7) {
    out = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    out = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  } else {
    out = std::ldexp(1.0f + man / 8.0f, exp - 7);
  }
  return sign ? -out : out;
}

fp8_t float_to_fp8_e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  float a = std::fabs(f);
  if (a >= kFp8E4M3Max) return sign | 0x7e;  // saturate (also +-inf)
  // Smallest normal is 2^-6; below it the grid spacing is 2^-9.
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp_unbiased = e - 1;
  if (exp_unbiased < -6) exp_unbiased = -6;
  const float quantum = std::ldexp(1.0f, exp_unbiased - 3);
  // nearbyint rounds half to even in the default rounding mode.
  float q = std::nearbyint(a / quantum) * quantum;
  if (q >= kFp8E4M3Max) return sign | 0x7e;
  if (q == 0.0f) return sign;
  int qe;
  std::frexp(q, &qe);
  int ue = qe - 1;
  if (ue < -6) {  // subnormal
    return sign | static_cast<uint8_t>(std::lround(q / std::ldexp(1.0f, -9)));
  }
  const int man = static_cast<int>(std::lround((q / std::ldexp(1.0f, ue) - 1.0f) * 8.0f));
  return sign | static_cast<uint8_t>(((ue + 7) << 3) | man);
}

float ue8m0_scale(float amax) {
  // Exact: take the exponent of x = a/448 (one fp32 division, as on the GPU)
  // rather than log2, whose rounding could move ceil() at powers of two.
  const float x = std::max(amax, 1e-4f) / kFp8E4M3Max;
  int e;
  const float m = std::frexp(x, &e);  // x = m * 2^e, m in [0.5, 1)
  return std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
}

}  // namespace dsa
