#pragma once
// Paged caches of one or several layers (spec section 4): the latent cache
// (576 bf16 per token, or the 656-byte fp8 form) and the indexer K cache
// (per 64-token block: 64 x 128 fp8 vectors, then 64 fp32 scales = 8448 bytes).
// Both share one block table per request. Capacity is fixed at construction;
// running out is a CacheError that leaves every request as it was.
#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "dsa/batch.h"
#include "dsa/config.h"

namespace dsa {

enum class Storage { Host, Device };

const char* to_string(Storage s);

// How Device storage is allocated. dsa_core does not depend on CUDA: the CUDA
// backend fills this struct (cudaMalloc / cudaFree / cudaMemset / cudaMemcpy
// with cudaMemcpyDefault, all synchronous) and installs it with
// set_device_allocator(), or hands it to a CacheManager directly.
struct DeviceAllocator {
  void* (*alloc)(size_t bytes) = nullptr;                        // nullptr when out of memory (may also throw dsa::Error)
  void (*free)(void* ptr) = nullptr;                             // ptr from alloc; never called with nullptr
  void (*memset)(void* ptr, int value, size_t bytes) = nullptr;  // device memory, completes before returning
  void (*copy)(void* dst, const void* src, size_t bytes) = nullptr;  // any direction, completes before returning
  bool complete() const { return alloc && free && memset && copy; }
};

// Process-wide allocator used by CacheManagers built with Storage::Device and
// no allocator of their own. The struct is copied; nullptr uninstalls.
void set_device_allocator(const DeviceAllocator* a);
// The installed allocator, or nullptr when none is.
const DeviceAllocator* device_allocator();

struct CacheConfig {
  int64_t num_layers = 1;
  int64_t tokens_per_block = 64;
  int64_t num_blocks = 0;  // capacity; see with_tokens / with_bytes
  LatentCacheDType latent_dtype = LatentCacheDType::BF16;
  int64_t kv_lora_rank = 512;
  int64_t rope_dim = 64;
  int64_t index_head_dim = 128;
  Storage storage = Storage::Host;

  int64_t latent_bytes_per_token() const;   // 1152 or 656
  int64_t indexer_bytes_per_token() const;  // 132
  int64_t latent_bytes_per_block() const;
  int64_t indexer_bytes_per_block() const;  // 8448
  int64_t bytes_per_block() const;          // both caches, all layers
  int64_t total_bytes() const;
  int64_t capacity_tokens() const { return num_blocks * tokens_per_block; }
  // Blocks (of this config's page size) that n tokens occupy.
  // Written so that it cannot overflow for any tokens >= 0.
  int64_t blocks_for(int64_t tokens) const { return tokens / tokens_per_block + (tokens % tokens_per_block != 0); }

  static CacheConfig for_layer(const LayerConfig& cfg, int64_t num_layers = 1);
  // One layer with room for exactly one step: each request's cached + num_new
  // tokens in whole blocks (at least one block in all).
  static CacheConfig for_step(const LayerConfig& cfg, const std::vector<StepRequest>& requests);
  // Capacity from a token count (rounded up to whole blocks) or a byte budget
  // (rounded down). Throw ConfigError for non-positive values, a budget below
  // one block, or a capacity past kMaxSlots (StepLimits) slots.
  CacheConfig& with_tokens(int64_t tokens);
  CacheConfig& with_bytes(int64_t bytes);

  static constexpr int64_t kMaxLayers = int64_t{1} << 12;  // DeepSeek-V3.2 has 61

  // Sizes and limits: dimensions within ConfigLimits, 1..kMaxLayers layers,
  // slots (num_blocks * tokens_per_block) fit int32 for the attention
  // kernels' indices, and total_bytes() fits int64. Throws ConfigError naming
  // the value, the rule and a fix.
  void validate() const;
};

class CacheManager {
 public:
  // Allocates all pools (validate() first). Device storage uses `alloc` when
  // given, else the installed device_allocator(); without one it is a
  // CacheError. Pools start zeroed; fill() poisons them.
  explicit CacheManager(const CacheConfig& cfg, const DeviceAllocator* alloc = nullptr);
  ~CacheManager();
  CacheManager(const CacheManager&) = delete;
  CacheManager& operator=(const CacheManager&) = delete;

  const CacheConfig& config() const { return cfg_; }

  // Requests. max_tokens (if > 0) is the request's limit; extending past it is
  // an error. A duplicate id or a negative max_tokens is a CacheError.
  void add_request(int64_t id, int64_t max_tokens = 0);
  bool has_request(int64_t id) const;
  // Makes room for `tokens` tokens in total (all-or-nothing: on CacheError
  // nothing changes). Never shrinks: a smaller count is a no-op.
  void reserve(int64_t id, int64_t tokens);
  // Convenience: reserve(id, num_tokens(id) + n) (n >= 0).
  void extend(int64_t id, int64_t n);
  // Returns the request's blocks to the free list (their bytes are left as they are).
  void free_request(int64_t id);
  int64_t num_tokens(int64_t id) const;  // tokens the request holds room for
  int64_t max_tokens(int64_t id) const;  // 0: no limit
  const std::vector<int32_t>& block_table(int64_t id) const;
  int64_t free_blocks() const;
  int64_t used_blocks() const;
  int64_t num_requests() const { return static_cast<int64_t>(requests_.size()); }
  std::vector<int64_t> request_ids() const;  // ascending

  // Global slot of request-local position p (block_table[p / tpb] * tpb + p % tpb).
  int64_t slot(int64_t id, int64_t position) const;

  // Storage. Each layer's pools are contiguous; a slot is block * tokens_per_block + offset.
  // Device storage: device pointers.
  uint8_t* latent_pool(int64_t layer);   // [num_blocks * tokens_per_block, latent_bytes_per_token]
  uint8_t* indexer_pool(int64_t layer);  // [num_blocks, indexer_bytes_per_block]
  const uint8_t* latent_pool(int64_t layer) const;
  const uint8_t* indexer_pool(int64_t layer) const;
  int64_t latent_pool_bytes() const;   // one layer
  int64_t indexer_pool_bytes() const;  // one layer

  // Sets every byte of every pool (0xFF makes bf16, fp8 and fp32 all NaN: use it
  // to catch reads of slots nobody wrote).
  void fill(uint8_t byte);
  // Copies bytes between host memory and the pools (memcpy for Host storage,
  // the allocator's copy for Device). Either side may be a pool pointer.
  void copy(void* dst, const void* src, size_t bytes) const;

 private:
  struct Request {
    int64_t max_tokens = 0;
    int64_t tokens = 0;
    std::vector<int32_t> blocks;
  };
  const Request& find(int64_t id, const char* what) const;
  int64_t layer_checked(int64_t layer) const;

  CacheConfig cfg_;
  DeviceAllocator dev_{};
  std::map<int64_t, Request> requests_;
  std::vector<int32_t> free_list_;  // popped from the back: lowest block ids first on a fresh cache
  uint8_t* latent_ = nullptr;
  uint8_t* indexer_ = nullptr;
};

}  // namespace dsa
