#pragma once
// The synthetic cache contents that stand in for a long prefill when only the
// new tokens matter (decode benchmarks, dsa check): one definition of every
// value, in host and device code alike, used by the device fill
// (dsa::cuda::fill_synthetic) and the CPU reference bench's host fill, so that
// both write the same values for the same seed. Each function gives the fp32
// value before it is stored; the caller rounds it to the pool's type (bf16 or
// e4m3 with saturation, round to nearest even on both sides).
#include <cstdint>

#include "dsa/hash.h"

namespace dsa::synthetic_cache {

// The seed of layer `layer`'s pools.
DSA_HOST_DEVICE constexpr uint64_t layer_seed(uint64_t seed, int64_t layer) {
  return seed * 0x100000001b3ull + static_cast<uint64_t>(layer);
}

// Uniform magnitude in [1/16, 1), random sign: no zeros.
DSA_HOST_DEVICE inline float unit(uint64_t seed, uint64_t i) {
  const uint64_t h = mix64(seed ^ mix64(i));
  const float u = hash_unit_interval(h);
#if defined(__CUDA_ARCH__)
  const float mag = fmaf(0.9375f, u, 0.0625f);
#else
  // The same fused multiply-add: exact in double (u has 24 significant bits,
  // so the sum has at most 29), then rounded to fp32 once.
  const float mag = static_cast<float>(0.0625 + 0.9375 * static_cast<double>(u));
#endif
  return (h & 1) ? -mag : mag;
}

// Latent values of RMS about 1 (uniform magnitudes times sqrt(3)).
inline constexpr float kLatentGain = 1.7320508f;
// e4m3 values over nearly the whole range (448 is the largest).
inline constexpr float kFp8Gain = 440.0f;
// The fp8 latent form's ue8m0 scale, the same for every group.
inline constexpr float kLatentFp8Scale = 1.0f / 256.0f;

// Every value below is a function of the layer seed and of one flat index e
// of its pool, so that a fill may walk the pool in any order. The index of
// each value is given beside it (j counts from 0 inside its part).

// bf16 latent pool, [slots, dkv + rope] values: e = slot * (dkv + rope) + j.
DSA_HOST_DEVICE inline float latent_bf16(uint64_t ls, uint64_t e) { return kLatentGain * unit(ls, e); }

// fp8 latent form, rows of row_bytes (dkv e4m3, dkv / 128 fp32 scales, each
// kLatentFp8Scale, rope bf16): c_kv value j (stored as e4m3) at
// e = slot * row_bytes + j, rope value j at e = slot * row_bytes + dkv + j.
DSA_HOST_DEVICE inline float latent_fp8_ckv(uint64_t ls, uint64_t e) { return kFp8Gain * unit(ls, e); }
DSA_HOST_DEVICE inline float latent_fp8_rope(uint64_t ls, uint64_t e) { return kLatentGain * unit(ls, e); }

// Indexer pool, blocks of block_bytes (tokens_per_block x dim e4m3, then one
// fp32 scale per token): key value j in [0, tokens_per_block * dim) (stored
// as e4m3) at e = block * block_bytes + j; token t's scale is
// 2^indexer_scale_exponent (2^-9 .. 2^-6, so dequantized keys are O(1)) at
// e = block * tokens_per_block + t.
DSA_HOST_DEVICE inline float indexer_key(uint64_t ls, uint64_t e) { return kFp8Gain * unit(ls ^ 0x5bd1e995ull, e); }
DSA_HOST_DEVICE inline int indexer_scale_exponent(uint64_t ls, uint64_t e) {
  return -9 + static_cast<int>(mix64(ls ^ 0x27d4eb2full ^ mix64(e)) & 3);
}

}  // namespace dsa::synthetic_cache
