#include <gtest/gtest.h>

#include <cmath>

#include "dsa/dtypes.h"

using namespace dsa;

TEST(DTypes, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: goes to the even one.
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_EQ(bf16_to_float(float_to_bf16(-2.5f)), -2.5f);
}

TEST(DTypes, Fp8E4M3AllCodesRoundTrip) {
  for (int v = 0; v < 256; ++v) {
    float f = fp8_e4m3_to_float(static_cast<fp8_t>(v));
    if (std::isnan(f)) continue;
    fp8_t back = float_to_fp8_e4m3(f);
    if (f == 0.0f) {
      EXPECT_EQ(back & 0x7f, 0);
    } else {
      EXPECT_EQ(back, v) << "code " << v << " value " << f;
    }
  }
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));
}

TEST(DTypes, Fp8E4M3SaturatesAndRoundsToEven) {
  EXPECT_EQ(fp8_e4m3_to_float(float_to_fp8_e4m3(1000.0f)), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(float_to_fp8_e4m3(-1e30f)), -448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(float_to_fp8_e4m3(INFINITY)), 448.0f);
  // 1.0625 is halfway between 1.0 and 1.125 (mantissa step 1/8): to even (1.0).
  EXPECT_EQ(round_fp8_e4m3(1.0625f), 1.0f);
  EXPECT_EQ(round_fp8_e4m3(1.1875f), 1.25f);
  // Relative error of normal values is at most 2^-4.
  for (float x = 0.02f; x < 440.0f; x *= 1.013f) {
    EXPECT_LE(std::fabs(round_fp8_e4m3(x) - x), x * 0.0625f + 1e-12f) << x;
  }
}

TEST(DTypes, Ue8m0ScalesArePowersOfTwo) {
  for (float amax : {1e-6f, 1e-4f, 0.3f, 1.0f, 448.0f, 449.0f, 896.0f, 1e5f}) {
    float s = ue8m0_scale(amax);
    int e;
    EXPECT_EQ(std::frexp(s, &e), 0.5f) << amax;
    EXPECT_LE(std::max(amax, 1e-4f) / s, 448.0f) << amax;
    EXPECT_GT(std::max(amax, 1e-4f) / s, 224.0f) << amax;
  }
  EXPECT_EQ(ue8m0_scale(448.0f), 1.0f);
  EXPECT_EQ(ue8m0_scale(896.0f), 2.0f);
  EXPECT_EQ(ue8m0_scale(449.0f), 2.0f);
}
