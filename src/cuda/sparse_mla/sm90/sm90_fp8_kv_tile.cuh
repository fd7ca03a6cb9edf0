#pragma once
// The fp8 latent cache (spec section 4) as the sm90 kernel's producer reads
// it: 656-byte rows (512 e4m3 c_kv values, 4 fp32 scales, one per 128
// values, then 64 bf16 k_pe) go into the kernel's bf16 tile (config.h) in
// place, and are dequantized there before the consumers are told the half
// is ready, so the consumers (and their wgmma) are the bf16 kernel's.
//
// In-place layout. A 16-byte chunk of e4m3 (values 16j .. 16j + 15 of the
// row) becomes 32 bytes of bf16: two logical 16-byte chunks c0 = 2 (j % 4),
// c0 + 1 of segment j / 4, which the 128-byte swizzle (chunk c of row r at
// c ^ (r % 8)) puts at physical chunks pc = c0 ^ (r % 8) and pc ^ 1, an
// aligned 32-byte pair. The e4m3 chunk is copied to pc, inside the very 32
// bytes it becomes, and the thread that copied it converts it: so no
// thread's source overlaps another thread's destination, and one thread
// needs only its own cp.async wait. The row's 16 bytes of scales go to the
// free chunk pc ^ 1 of the row's first chunk pair of the half (e4m3 chunk
// 0 or 16, copied and converted by lane cc = 0 of the row); the row's 8
// lanes are one warp, which reads its scales before that lane overwrites
// them (__syncwarp in between). k_pe needs no conversion: it is copied to
// segment 8 as the bf16 kernel copies it.
//
// Dequantization, bit for bit the layer's gather (gather_fp8_kernel in
// src/cuda/layer/layer_kernels.cu): bf16_rn(float(half(e4m3)) * scale) with
// one IEEE fp32 multiply, round to nearest even (no FMA, no FTZ). e4m3 to
// f16 is exact (cvt.rn.f16x2.e4m3x2), f16 to f32 exact, so the only
// roundings are the fp32 product's and bf16's, as in the gather. The fast
// path below replaces these by one bf16x2 multiply only where that gives
// the same bits (see fp8_pow2_scale_bf16).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/sparse_mla/sm90/config.h"

namespace dsa::cuda::sm90_sparse_mla {

constexpr int kFp8RowBytes = 656;     // dense row: 512 e4m3 + 16 scale bytes + 128 k_pe bytes
constexpr int kFp8ScaleOffset = 512;  // byte offset of the 4 fp32 scales
constexpr int kFp8RopeOffset = 528;   // byte offset of the 64 bf16 k_pe

// The fast path's multiplier for a scale of +-2^k with -117 <= k <= 15 as a
// bf16x2 pair (both halves +-2^(k + 112)), or 0 when the scale is not such a
// power of two (then the fp32 path runs). Why it is exact: the f16 bits of
// an e4m3 value v with the magnitude shifted right by 3 are the bf16 bits of
// v * 2^-112 (f16's exponent bias is 15, bf16's 127; f16 keeps 10 mantissa
// bits, of which e4m3 uses the top 3), a normal bf16 (f16 exponent field 6
// .. 23 for nonzero e4m3) or zero. Multiplied by 2^(k + 112) (normal: k +
// 112 <= 127) the exact product v * 2^k has a bf16 exponent field of 6 + 112
// + k .. 23 + 112 + k, inside 1 .. 254 for -117 <= k <= 119: representable
// exactly, so mul.rn.bf16x2 returns it unrounded. The gather's fp32 product
// of the same two numbers is the same exact value (fp32 has bf16's exponent
// range and more mantissa), and bf16_rn of an exact bf16 value is itself.
// Zero keeps its sign both ways. e4m3 NaN (S.1111.111) is not mapped by the
// shift (it would become a finite number): chunks holding one take the fp32
// path (fp8_chunk_has_nan).
__device__ __forceinline__ uint32_t fp8_pow2_scale_bf16(float scale) {
  const uint32_t b = __float_as_uint(scale);
  const uint32_t e = (b >> 23) & 0xffu;
  if ((b & 0x7fffffu) != 0u || e < 10u || e > 142u) return 0u;  // 2^k, k = e - 127 in [-117, 15]
  const uint32_t h = ((b >> 16) & 0x8000u) | ((e + 112u) << 7);
  return h | (h << 16);
}

// Whether one of the 16 bytes is an e4m3 NaN (0x7f after clearing the
// sign), without branches: x = ~w & 0x7f7f7f7f has a zero byte exactly where
// w has a NaN, and for bytes below 0x80, x - 0x01010101 sets a byte's top bit
// only at a zero byte or above one (a borrow), so the OR is nonzero iff some
// byte is NaN.
__device__ __forceinline__ bool fp8_chunk_has_nan(const uint4& v) {
  auto zero_bytes = [](uint32_t w) {
    const uint32_t x = ~w & 0x7f7f7f7fu;
    return (x - 0x01010101u) & 0x80808080u;
  };
  return (zero_bytes(v.x) | zero_bytes(v.y) | zero_bytes(v.z) | zero_bytes(v.w)) != 0u;
}

// Two e4m3 values (low and high byte of the low 16 bits of `pair`) as exact f16x2.
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t pair) {
  uint32_t d;
  asm("{\n\t.reg .b16 lo;\n\tcvt.u16.u32 lo, %1;\n\tcvt.rn.f16x2.e4m3x2 %0, lo;\n\t}" : "=r"(d) : "r"(pair));
  return d;
}

// The gather's arithmetic for two values: bf16_rn(float(f16) * scale).
__device__ __forceinline__ uint32_t f16x2_times_scale_bf16x2(uint32_t f16x2, float scale) {
  const __half2 h = *reinterpret_cast<const __half2*>(&f16x2);
  const float lo = __fmul_rn(__low2float(h), scale);
  const float hi = __fmul_rn(__high2float(h), scale);
  const __nv_bfloat16 blo = __float2bfloat16_rn(lo), bhi = __float2bfloat16_rn(hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(blo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(bhi)) << 16);
}

// The fast path for two values: f16x2 magnitude >> 3 with the sign kept,
// times the bf16x2 multiplier (fp8_pow2_scale_bf16).
__device__ __forceinline__ uint32_t f16x2_times_pow2_bf16x2(uint32_t f16x2, uint32_t mult) {
  const uint32_t rebiased = ((f16x2 >> 3) & 0x0fff0fffu) | (f16x2 & 0x80008000u);
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(rebiased), "r"(mult));
  return d;
}

// 16 e4m3 values -> 16 bf16 (lo: values 0-7, hi: values 8-15).
__device__ __forceinline__ void dequant_chunk(const uint4& v, float scale, uint4& lo, uint4& hi) {
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t o[8];
  const uint32_t mult = fp8_pow2_scale_bf16(scale);
  if (mult != 0u && !fp8_chunk_has_nan(v)) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = f16x2_times_pow2_bf16x2(e4m3x2_to_f16x2(w[i]), mult);
      o[2 * i + 1] = f16x2_times_pow2_bf16x2(e4m3x2_to_f16x2(w[i] >> 16), mult);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = f16x2_times_scale_bf16x2(e4m3x2_to_f16x2(w[i]), scale);
      o[2 * i + 1] = f16x2_times_scale_bf16x2(e4m3x2_to_f16x2(w[i] >> 16), scale);
    }
  }
  lo = make_uint4(o[0], o[1], o[2], o[3]);
  hi = make_uint4(o[4], o[5], o[6], o[7]);
}

// Shared address (relative to the tile) where row r's e4m3 chunk j (0..31)
// lands and its bf16 pair begins: physical chunk pc = (2 (j % 4)) ^ (r % 8)
// of segment j / 4. The pair's other chunk is this address ^ 16.
__device__ __forceinline__ uint32_t fp8_chunk_offset(int r, int j) {
  return static_cast<uint32_t>((j >> 2) * kSegBytes + r * 128 + (((2 * (j & 3)) ^ (r & 7)) << 4));
}
// Where row r's 16 scale bytes go for half `half` (0: L, values 0-255;
// 1: R, values 256-511): the free chunk of e4m3 chunk 16 * half's pair.
__device__ __forceinline__ uint32_t fp8_scale_offset(int r, int half) { return fp8_chunk_offset(r, 16 * half) ^ 16u; }

}  // namespace dsa::cuda::sm90_sparse_mla
