// The CUDA side of the cache manager's device storage, and synthetic cache
// contents for long-context runs.
#include <cuda_fp8.h>
#include <fmt/format.h>

#include "cuda/check.cuh"
#include "dsa/cuda_layer.h"
#include "dsa/error.h"
#include "dsa/synthetic_cache.h"

namespace dsa::cuda {

namespace {

void* dev_alloc(size_t bytes) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // out of memory is reported by the cache as a CacheError
    return nullptr;
  }
  return p;
}
void dev_free(void* p) { cudaFree(p); }
void dev_memset(void* p, int v, size_t n) { DSA_CUDA_CHECK(cudaMemset(p, v, n)); }
void dev_copy(void* d, const void* s, size_t n) { DSA_CUDA_CHECK(cudaMemcpy(d, s, n, cudaMemcpyDefault)); }

const DeviceAllocator kAllocator{dev_alloc, dev_free, dev_memset, dev_copy};

// The values are dsa/synthetic_cache.h's (shared with the host fill of the
// CPU bench); these kernels only lay them out.
namespace syn = ::dsa::synthetic_cache;

__global__ void fill_latent_bf16(__nv_bfloat16* pool, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    pool[i] = __float2bfloat16_rn(syn::latent_bf16(seed, i));
}

// fp8 latent form per slot: dkv e4m3, dkv/128 fp32 scales, rope bf16.
__global__ void fill_latent_fp8(uint8_t* pool, int64_t slots, int dkv, int rope, uint64_t seed) {
  const int row = dkv + 4 * (dkv / 128) + 2 * rope;
  for (int64_t s = blockIdx.x; s < slots; s += gridDim.x) {
    uint8_t* r = pool + s * row;
    for (int i = threadIdx.x; i < dkv; i += blockDim.x)
      r[i] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(syn::latent_fp8_ckv(seed, s * row + i), __NV_SATFINITE, __NV_E4M3));
    for (int g = threadIdx.x; g < dkv / 128; g += blockDim.x) reinterpret_cast<float*>(r + dkv)[g] = syn::kLatentFp8Scale;
    __nv_bfloat16* rp = reinterpret_cast<__nv_bfloat16*>(r + dkv + 4 * (dkv / 128));
    for (int i = threadIdx.x; i < rope; i += blockDim.x) rp[i] = __float2bfloat16_rn(syn::latent_fp8_rope(seed, s * row + dkv + i));
  }
}

// Indexer blocks: tokens_per_block x dim e4m3, then one power-of-two scale per token.
__global__ void fill_indexer(uint8_t* pool, int64_t blocks, int tpb, int dim, uint64_t seed) {
  const int64_t block_bytes = static_cast<int64_t>(tpb) * (dim + 4);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    uint8_t* base = pool + b * block_bytes;
    for (int i = threadIdx.x; i < tpb * dim; i += blockDim.x)
      base[i] = static_cast<uint8_t>(
          __nv_cvt_float_to_fp8(syn::indexer_key(seed, b * block_bytes + i), __NV_SATFINITE, __NV_E4M3));
    for (int t = threadIdx.x; t < tpb; t += blockDim.x)
      reinterpret_cast<float*>(base + tpb * dim)[t] = ldexpf(1.0f, syn::indexer_scale_exponent(seed, b * tpb + t));
  }
}

}  // namespace

const DeviceAllocator* device_allocator() { return &kAllocator; }

void install_device_allocator() { set_device_allocator(&kAllocator); }

DeviceCacheView device_view(CacheManager& cache, int64_t layer) {
  const CacheConfig& cc = cache.config();
  if (cc.storage != Storage::Device) {
    throw CacheError("device_view: this cache keeps its pools in host memory; build it with Storage::Device (and "
                     "dsa::cuda::device_allocator()) for the CUDA layer");
  }
  DeviceCacheView v;
  v.latent = cache.latent_pool(layer);
  v.indexer = cache.indexer_pool(layer);
  v.num_blocks = cc.num_blocks;
  v.tokens_per_block = cc.tokens_per_block;
  v.latent_dtype = cc.latent_dtype;
  return v;
}

void fill_synthetic(CacheManager& cache, uint64_t seed) {
  const CacheConfig& cc = cache.config();
  if (cc.storage != Storage::Device) throw CacheError("fill_synthetic: the cache must use Storage::Device");
  for (int64_t l = 0; l < cc.num_layers; ++l) {
    const uint64_t ls = syn::layer_seed(seed, l);
    const int64_t slots = cc.num_blocks * cc.tokens_per_block;
    if (cc.latent_dtype == LatentCacheDType::BF16) {
      const int64_t n = slots * (cc.kv_lora_rank + cc.rope_dim);
      fill_latent_bf16<<<4096, 256>>>(reinterpret_cast<__nv_bfloat16*>(cache.latent_pool(l)), n, ls);
    } else {
      fill_latent_fp8<<<4096, 256>>>(cache.latent_pool(l), slots, static_cast<int>(cc.kv_lora_rank),
                                     static_cast<int>(cc.rope_dim), ls);
    }
    DSA_CHECK_LAUNCH("fill_latent");
    fill_indexer<<<4096, 256>>>(cache.indexer_pool(l), cc.num_blocks, static_cast<int>(cc.tokens_per_block),
                                static_cast<int>(cc.index_head_dim), ls);
    DSA_CHECK_LAUNCH("fill_indexer");
  }
  DSA_CUDA_CHECK(cudaDeviceSynchronize());
}

void copy_pools(const CacheManager& src, CacheManager& dst) {
  const CacheConfig &a = src.config(), &b = dst.config();
  if (a.num_layers != b.num_layers || a.num_blocks != b.num_blocks || a.tokens_per_block != b.tokens_per_block ||
      a.latent_dtype != b.latent_dtype || a.kv_lora_rank != b.kv_lora_rank || a.rope_dim != b.rope_dim ||
      a.index_head_dim != b.index_head_dim) {
    throw CacheError("copy_pools: the two caches have different configurations; build both from the same CacheConfig "
                     "(only the storage may differ)");
  }
  for (int64_t l = 0; l < a.num_layers; ++l) {
    DSA_CUDA_CHECK(cudaMemcpy(dst.latent_pool(l), src.latent_pool(l), src.latent_pool_bytes(), cudaMemcpyDefault));
    DSA_CUDA_CHECK(cudaMemcpy(dst.indexer_pool(l), src.indexer_pool(l), src.indexer_pool_bytes(), cudaMemcpyDefault));
  }
}

}  // namespace dsa::cuda
