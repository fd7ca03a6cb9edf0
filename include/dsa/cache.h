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

#include "dsa/config.h"

namespace dsa {

enum class Storage { Host, Device };

struct CacheConfig {
  int64_t num_layers = 1;
  int64_t tokens_per_block = 64;
  int64_t num_blocks = 0;  // capacity; see from_tokens / from_bytes
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

  static CacheConfig for_layer(const LayerConfig& cfg, int64_t num_layers = 1);
  // Capacity from a token count (rounded up to whole blocks) or a byte budget (rounded down).
  CacheConfig& with_tokens(int64_t tokens);
  CacheConfig& with_bytes(int64_t bytes);
};

class CacheManager {
 public:
  explicit CacheManager(const CacheConfig& cfg);
  ~CacheManager();
  CacheManager(const CacheManager&) = delete;
  CacheManager& operator=(const CacheManager&) = delete;

  const CacheConfig& config() const { return cfg_; }

  // Requests. max_tokens (if > 0) is the request's limit; extending past it is an error.
  void add_request(int64_t id, int64_t max_tokens = 0);
  bool has_request(int64_t id) const;
  // Makes room for `tokens` tokens in total (all-or-nothing: on CacheError nothing changes).
  void reserve(int64_t id, int64_t tokens);
  // Convenience: reserve(id, num_tokens(id) + n) and count them as held.
  void extend(int64_t id, int64_t n);
  void free_request(int64_t id);
  int64_t num_tokens(int64_t id) const;  // tokens the request holds room for
  const std::vector<int32_t>& block_table(int64_t id) const;
  int64_t free_blocks() const;
  int64_t used_blocks() const;
  std::vector<int64_t> request_ids() const;

  // Storage. Each layer's pools are contiguous; a slot is block * tokens_per_block + offset.
  uint8_t* latent_pool(int64_t layer);   // [num_blocks * tokens_per_block, latent_bytes_per_token]
  uint8_t* indexer_pool(int64_t layer);  // [num_blocks, indexer_bytes_per_block]
  const uint8_t* latent_pool(int64_t layer) const;
  const uint8_t* indexer_pool(int64_t layer) const;

 private:
  struct Request {
    int64_t max_tokens = 0;
    int64_t tokens = 0;
    std::vector<int32_t> blocks;
  };
  CacheConfig cfg_;
  std::map<int64_t, Request> requests_;
  std::vector<int32_t> free_list_;
  uint8_t* latent_ = nullptr;
  uint8_t* indexer_ = nullptr;
};

}  // namespace dsa
