// dsa::cuda::fill_synthetic writes exactly the values dsa/synthetic_cache.h
// defines, byte for byte, for both latent forms and the indexer pool of every
// layer: the CPU reference bench's host fill uses the same definitions, so
// host and device synthetic caches agree. Also checks, without a GPU, that
// the header's host arithmetic is the device's fused multiply-add.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "dsa/cache.h"
#include "dsa/cuda.h"
#include "dsa/cuda_layer.h"
#include "dsa/dtypes.h"
#include "dsa/synthetic_cache.h"

namespace {

namespace syn = dsa::synthetic_cache;

TEST(SyntheticCache, HostUnitIsTheDevicesFusedMultiplyAdd) {
  for (uint64_t i = 0; i < 200000; ++i) {
    const uint64_t h = dsa::mix64(7 ^ dsa::mix64(i));
    const float mag = std::fma(0.9375f, dsa::hash_unit_interval(h), 0.0625f);
    const float want = (h & 1) ? -mag : mag;
    const float got = syn::unit(7, i);
    ASSERT_EQ(std::memcmp(&got, &want, 4), 0) << "i = " << i;
  }
}

TEST(SyntheticCache, DeviceFillMatchesTheSharedDefinition) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (dsa::LatentCacheDType dt : {dsa::LatentCacheDType::BF16, dsa::LatentCacheDType::FP8}) {
    SCOPED_TRACE(dsa::to_string(dt));
    dsa::CacheConfig dc;
    dc.num_layers = 2;
    dc.latent_dtype = dt;
    dc.with_tokens(3 * 64);
    dc.storage = dsa::Storage::Device;
    dsa::CacheManager dcache(dc, dsa::cuda::device_allocator());
    const uint64_t seed = 5;
    dsa::cuda::fill_synthetic(dcache, seed);
    dsa::CacheConfig hc = dc;
    hc.storage = dsa::Storage::Host;
    dsa::CacheManager hcache(hc);
    dsa::cuda::copy_pools(dcache, hcache);

    const int64_t slots = dc.capacity_tokens(), tpb = dc.tokens_per_block, dkv = dc.kv_lora_rank, rope = dc.rope_dim;
    const int64_t DI = dc.index_head_dim, row = dc.latent_bytes_per_token(), block_bytes = dc.indexer_bytes_per_block();
    for (int64_t l = 0; l < dc.num_layers; ++l) {
      const uint64_t ls = syn::layer_seed(seed, l);
      std::vector<uint8_t> lat(static_cast<size_t>(slots * row)), idx(static_cast<size_t>(dc.num_blocks * block_bytes));
      for (int64_t s = 0; s < slots; ++s) {
        uint8_t* r = lat.data() + s * row;
        if (dt == dsa::LatentCacheDType::BF16) {
          for (int64_t i = 0; i < dkv + rope; ++i) {
            const dsa::bf16_t b = dsa::float_to_bf16(syn::latent_bf16(ls, s * (dkv + rope) + i));
            std::memcpy(r + 2 * i, &b, 2);
          }
        } else {
          for (int64_t i = 0; i < dkv; ++i) r[i] = dsa::float_to_fp8_e4m3(syn::latent_fp8_ckv(ls, s * row + i));
          for (int64_t g = 0; g < dkv / 128; ++g) std::memcpy(r + dkv + 4 * g, &syn::kLatentFp8Scale, 4);
          for (int64_t i = 0; i < rope; ++i) {
            const dsa::bf16_t b = dsa::float_to_bf16(syn::latent_fp8_rope(ls, s * row + dkv + i));
            std::memcpy(r + dkv + 4 * (dkv / 128) + 2 * i, &b, 2);
          }
        }
      }
      for (int64_t b = 0; b < dc.num_blocks; ++b) {
        uint8_t* base = idx.data() + b * block_bytes;
        for (int64_t i = 0; i < tpb * DI; ++i) base[i] = dsa::float_to_fp8_e4m3(syn::indexer_key(ls, b * block_bytes + i));
        for (int64_t t = 0; t < tpb; ++t) {
          const float sc = std::ldexp(1.0f, syn::indexer_scale_exponent(ls, b * tpb + t));
          std::memcpy(base + tpb * DI + 4 * t, &sc, 4);
        }
      }
      EXPECT_EQ(std::memcmp(lat.data(), hcache.latent_pool(l), lat.size()), 0) << "latent pool of layer " << l;
      EXPECT_EQ(std::memcmp(idx.data(), hcache.indexer_pool(l), idx.size()), 0) << "indexer pool of layer " << l;
    }
  }
}

}  // namespace
