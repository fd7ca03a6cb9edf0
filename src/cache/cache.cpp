// Paged cache manager: block allocation with all-or-nothing growth, pools on
// the host or (through an installed allocator) on the GPU.
#include "dsa/cache.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>

#include "dsa/error.h"

namespace dsa {

namespace {

std::mutex g_alloc_mutex;
DeviceAllocator g_alloc;
bool g_alloc_set = false;

// Host pools are aligned like cudaMalloc's so that vectorized loads behave the same.
constexpr std::align_val_t kHostAlign{256};

}  // namespace

const char* to_string(Storage s) { return s == Storage::Host ? "host" : "device"; }

void set_device_allocator(const DeviceAllocator* a) {
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  if (a && !a->complete()) {
    throw ConfigError("set_device_allocator: the allocator lacks one of alloc, free, memset, copy; fill all four function pointers");
  }
  g_alloc_set = a != nullptr;
  g_alloc = a ? *a : DeviceAllocator{};
}

const DeviceAllocator* device_allocator() {
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  return g_alloc_set ? &g_alloc : nullptr;
}

// ---- CacheConfig ------------------------------------------------------------

namespace {

// Everything but the capacity: each factor of bytes_per_block() bounded, so
// that no size computed from a valid layout overflows int64.
void check_layout(const CacheConfig& c) {
  if (c.num_layers <= 0 || c.num_layers > CacheConfig::kMaxLayers) {
    throw ConfigError(fmt::format("cache num_layers = {} is invalid: it must be in [1, {}]", c.num_layers, CacheConfig::kMaxLayers),
                      "num_layers");
  }
  if (c.tokens_per_block <= 0 || c.tokens_per_block > ConfigLimits::kMaxTokensPerBlock) {
    throw ConfigError(fmt::format("tokens_per_block = {} is invalid: it must be in [1, {}] (64 in DeepSeek-V3.2)", c.tokens_per_block,
                                  ConfigLimits::kMaxTokensPerBlock),
                      "tokens_per_block");
  }
  if (c.kv_lora_rank <= 0 || c.rope_dim <= 0 || c.index_head_dim <= 0 || c.kv_lora_rank > ConfigLimits::kMaxWidth ||
      c.rope_dim > ConfigLimits::kMaxHeadDim || c.index_head_dim > ConfigLimits::kMaxHeadDim) {
    throw ConfigError(fmt::format("cache dimensions kv_lora_rank = {}, rope_dim = {}, index_head_dim = {} must be positive and at most "
                                  "{}, {}, {}",
                                  c.kv_lora_rank, c.rope_dim, c.index_head_dim, ConfigLimits::kMaxWidth, ConfigLimits::kMaxHeadDim,
                                  ConfigLimits::kMaxHeadDim));
  }
  if (c.latent_dtype == LatentCacheDType::FP8 && c.kv_lora_rank % 128 != 0) {
    throw ConfigError(fmt::format("kv_lora_rank = {} cannot use the fp8 latent cache: it keeps one scale per 128 values, so "
                                  "kv_lora_rank must be a multiple of 128; use kv_cache_dtype bf16",
                                  c.kv_lora_rank),
                      "kv_cache_dtype");
  }
}

}  // namespace

int64_t CacheConfig::latent_bytes_per_token() const {
  if (latent_dtype == LatentCacheDType::BF16) return (kv_lora_rank + rope_dim) * 2;
  // fp8 c_kv, one fp32 scale per 128 values, then k_pe unquantized in bf16 (spec section 4).
  return kv_lora_rank + (kv_lora_rank / 128) * 4 + rope_dim * 2;
}
int64_t CacheConfig::indexer_bytes_per_token() const { return index_head_dim + 4; }
int64_t CacheConfig::latent_bytes_per_block() const { return latent_bytes_per_token() * tokens_per_block; }
int64_t CacheConfig::indexer_bytes_per_block() const { return indexer_bytes_per_token() * tokens_per_block; }
int64_t CacheConfig::bytes_per_block() const { return (latent_bytes_per_block() + indexer_bytes_per_block()) * num_layers; }
int64_t CacheConfig::total_bytes() const { return bytes_per_block() * num_blocks; }

CacheConfig CacheConfig::for_layer(const LayerConfig& cfg, int64_t num_layers) {
  CacheConfig c;
  c.num_layers = num_layers;
  c.tokens_per_block = cfg.tokens_per_block;
  c.latent_dtype = cfg.kv_cache_dtype;
  c.kv_lora_rank = cfg.kv_lora_rank;
  c.rope_dim = cfg.qk_rope_head_dim;
  c.index_head_dim = cfg.index_head_dim;
  return c;
}

CacheConfig CacheConfig::for_step(const LayerConfig& cfg, const std::vector<StepRequest>& requests) {
  CacheConfig c = for_layer(cfg);
  check_layout(c);
  check_step_limits(requests, c.tokens_per_block);  // the sum below cannot overflow past this
  int64_t blocks = 0;
  for (const StepRequest& r : requests) blocks += c.blocks_for(r.cached + r.num_new);
  c.with_tokens(std::max<int64_t>(blocks, 1) * c.tokens_per_block);
  return c;
}

CacheConfig& CacheConfig::with_tokens(int64_t tokens) {
  check_layout(*this);
  if (tokens <= 0) {
    throw ConfigError(fmt::format("cache capacity of {} tokens is invalid: give a positive token count", tokens), "tokens");
  }
  const int64_t max_blocks = StepLimits::kMaxSlots / tokens_per_block;
  if (blocks_for(tokens) > max_blocks) {
    throw ConfigError(fmt::format("cache capacity of {} tokens is too large: a cache addresses at most {} blocks of {} tokens ({} "
                                  "slots; slot numbers are int32)",
                                  tokens, max_blocks, tokens_per_block, max_blocks * tokens_per_block),
                      "tokens");
  }
  num_blocks = blocks_for(tokens);
  return *this;
}

CacheConfig& CacheConfig::with_bytes(int64_t bytes) {
  check_layout(*this);
  const int64_t per_block = bytes_per_block();  // fits: check_layout bounds every factor
  if (bytes < per_block) {
    throw ConfigError(fmt::format(
        "a cache budget of {} bytes holds no block: one {}-token block of {} layer(s) takes {} bytes; give at least that much",
        bytes, tokens_per_block, num_layers, per_block), "bytes");
  }
  const int64_t max_blocks = StepLimits::kMaxSlots / tokens_per_block;
  if (bytes / per_block > max_blocks) {
    throw ConfigError(fmt::format("a cache budget of {} bytes holds {} blocks, more than the {} blocks of {} tokens a cache can address "
                                  "(slot numbers are int32); give at most {} bytes",
                                  bytes, bytes / per_block, max_blocks, tokens_per_block, max_blocks * per_block),
                      "bytes");
  }
  num_blocks = bytes / per_block;
  return *this;
}

void CacheConfig::validate() const {
  check_layout(*this);
  if (num_blocks <= 0) {
    throw ConfigError(fmt::format("cache capacity of {} blocks is invalid: set it with with_tokens() or with_bytes()", num_blocks),
                      "num_blocks");
  }
  // Attention kernels take global slots as int32.
  const int64_t max_slots = StepLimits::kMaxSlots;
  if (num_blocks > max_slots / tokens_per_block) {
    throw ConfigError(fmt::format("cache capacity of {} blocks x {} tokens exceeds {} slots: slot numbers must fit int32; "
                                  "give a smaller capacity",
                                  num_blocks, tokens_per_block, max_slots),
                      "num_blocks");
  }
  // total_bytes() = bytes per token (< 2^18) * slots (< 2^31) * layers (<= 2^12) < 2^61: fits int64.
}

// ---- CacheManager -------------------------------------------------------------

CacheManager::CacheManager(const CacheConfig& cfg, const DeviceAllocator* alloc) : cfg_(cfg) {
  cfg_.validate();
  const size_t lat_bytes = static_cast<size_t>(latent_pool_bytes()) * cfg_.num_layers;
  const size_t idx_bytes = static_cast<size_t>(indexer_pool_bytes()) * cfg_.num_layers;
  if (cfg_.storage == Storage::Device) {
    const DeviceAllocator* a = alloc ? alloc : device_allocator();
    if (!a || !a->complete()) {
      throw CacheError(
          "a device cache needs a device allocator and none is installed: build with the CUDA backend and install its "
          "allocator (dsa::set_device_allocator), or use Storage::Host");
    }
    dev_ = *a;
    latent_ = static_cast<uint8_t*>(dev_.alloc(lat_bytes));
    if (latent_) indexer_ = static_cast<uint8_t*>(dev_.alloc(idx_bytes));
    if (!latent_ || !indexer_) {
      if (latent_) dev_.free(latent_);
      latent_ = nullptr;
      throw OutOfMemoryError(fmt::format("could not allocate {} bytes of GPU memory for a cache of {} blocks ({} layer(s)); "
                                   "give a smaller capacity (num_blocks: with_tokens / with_bytes)",
                                   lat_bytes + idx_bytes, cfg_.num_blocks, cfg_.num_layers));
    }
    dev_.memset(latent_, 0, lat_bytes);
    dev_.memset(indexer_, 0, idx_bytes);
  } else {
    try {
      latent_ = static_cast<uint8_t*>(::operator new(lat_bytes, kHostAlign));
      indexer_ = static_cast<uint8_t*>(::operator new(idx_bytes, kHostAlign));
    } catch (const std::bad_alloc&) {
      if (latent_) ::operator delete(latent_, kHostAlign);
      latent_ = nullptr;
      throw OutOfMemoryError(fmt::format("could not allocate {} bytes of host memory for a cache of {} blocks ({} layer(s)); "
                                   "give a smaller capacity (num_blocks: with_tokens / with_bytes)",
                                   lat_bytes + idx_bytes, cfg_.num_blocks, cfg_.num_layers));
    }
    std::memset(latent_, 0, lat_bytes);
    std::memset(indexer_, 0, idx_bytes);
  }
  free_list_.resize(static_cast<size_t>(cfg_.num_blocks));
  for (int64_t i = 0; i < cfg_.num_blocks; ++i) free_list_[i] = static_cast<int32_t>(cfg_.num_blocks - 1 - i);
}

CacheManager::~CacheManager() {
  if (cfg_.storage == Storage::Device) {
    if (latent_) dev_.free(latent_);
    if (indexer_) dev_.free(indexer_);
  } else {
    if (latent_) ::operator delete(latent_, kHostAlign);
    if (indexer_) ::operator delete(indexer_, kHostAlign);
  }
}

const CacheManager::Request& CacheManager::find(int64_t id, const char* what) const {
  auto it = requests_.find(id);
  if (it == requests_.end()) {
    throw CacheError(fmt::format("{}: request {} is not in the cache ({} live requests); add it with add_request first", what, id,
                                 requests_.size()));
  }
  return it->second;
}

void CacheManager::add_request(int64_t id, int64_t max_tokens) {
  if (max_tokens < 0) {
    throw CacheError(fmt::format("add_request({}): max_tokens = {} is invalid; give 0 (no limit) or a positive limit", id, max_tokens));
  }
  if (requests_.count(id)) {
    throw CacheError(fmt::format("add_request({}): a request with this id is already in the cache; free it first or use another id", id));
  }
  Request r;
  r.max_tokens = max_tokens;
  requests_.emplace(id, std::move(r));
}

bool CacheManager::has_request(int64_t id) const { return requests_.count(id) != 0; }

void CacheManager::reserve(int64_t id, int64_t tokens) {
  find(id, "reserve");
  Request& r = requests_.at(id);
  if (tokens <= r.tokens) return;
  if (tokens > cfg_.capacity_tokens()) {
    throw CacheError(fmt::format("cache full: request {} cannot grow to {} tokens, more than the cache's whole capacity of {} tokens "
                                 "({} blocks of {}); nothing was changed. Build the cache with more capacity",
                                 id, tokens, cfg_.capacity_tokens(), cfg_.num_blocks, cfg_.tokens_per_block));
  }
  if (r.max_tokens > 0 && tokens > r.max_tokens) {
    throw CacheError(fmt::format("request {} cannot grow to {} tokens: its limit is max_tokens = {}; add it with a larger limit",
                                 id, tokens, r.max_tokens));
  }
  const int64_t need = cfg_.blocks_for(tokens) - static_cast<int64_t>(r.blocks.size());
  if (need > static_cast<int64_t>(free_list_.size())) {
    throw CacheError(fmt::format(
        "cache full: request {} needs {} more block(s) to hold {} tokens ({} per block) but only {} of {} blocks are free; "
        "nothing was changed. Free finished requests or build the cache with more capacity (at least {} more tokens)",
        id, need, tokens, cfg_.tokens_per_block, free_list_.size(), cfg_.num_blocks,
        (need - static_cast<int64_t>(free_list_.size())) * cfg_.tokens_per_block));
  }
  // Reserve first so that a bad_alloc cannot leave the table half grown.
  r.blocks.reserve(r.blocks.size() + static_cast<size_t>(std::max<int64_t>(need, 0)));
  for (int64_t i = 0; i < need; ++i) {
    r.blocks.push_back(free_list_.back());
    free_list_.pop_back();
  }
  r.tokens = tokens;
}

void CacheManager::extend(int64_t id, int64_t n) {
  const Request& r = find(id, "extend");
  if (n < 0) throw CacheError(fmt::format("extend(request {}, {}): cannot extend by a negative count; use free_request to release", id, n));
  reserve(id, r.tokens + n);
}

void CacheManager::free_request(int64_t id) {
  const Request& r = find(id, "free_request");
  free_list_.reserve(free_list_.size() + r.blocks.size());
  // Reverse order so that the request's first block is reused first.
  for (auto it = r.blocks.rbegin(); it != r.blocks.rend(); ++it) free_list_.push_back(*it);
  requests_.erase(id);
}

int64_t CacheManager::num_tokens(int64_t id) const { return find(id, "num_tokens").tokens; }
int64_t CacheManager::max_tokens(int64_t id) const { return find(id, "max_tokens").max_tokens; }
const std::vector<int32_t>& CacheManager::block_table(int64_t id) const { return find(id, "block_table").blocks; }
int64_t CacheManager::free_blocks() const { return static_cast<int64_t>(free_list_.size()); }
int64_t CacheManager::used_blocks() const { return cfg_.num_blocks - free_blocks(); }

std::vector<int64_t> CacheManager::request_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(requests_.size());
  for (const auto& kv : requests_) ids.push_back(kv.first);
  return ids;
}

int64_t CacheManager::slot(int64_t id, int64_t position) const {
  const Request& r = find(id, "slot");
  if (position < 0 || position >= r.tokens) {
    throw CacheError(fmt::format("slot: position {} of request {} is outside the {} tokens it holds room for", position, id, r.tokens));
  }
  return static_cast<int64_t>(r.blocks[position / cfg_.tokens_per_block]) * cfg_.tokens_per_block + position % cfg_.tokens_per_block;
}

int64_t CacheManager::layer_checked(int64_t layer) const {
  if (layer < 0 || layer >= cfg_.num_layers) {
    throw CacheError(fmt::format("layer {} does not exist: the cache holds layers 0..{}", layer, cfg_.num_layers - 1));
  }
  return layer;
}

int64_t CacheManager::latent_pool_bytes() const { return cfg_.num_blocks * cfg_.latent_bytes_per_block(); }
int64_t CacheManager::indexer_pool_bytes() const { return cfg_.num_blocks * cfg_.indexer_bytes_per_block(); }

uint8_t* CacheManager::latent_pool(int64_t layer) { return latent_ + layer_checked(layer) * latent_pool_bytes(); }
uint8_t* CacheManager::indexer_pool(int64_t layer) { return indexer_ + layer_checked(layer) * indexer_pool_bytes(); }
const uint8_t* CacheManager::latent_pool(int64_t layer) const { return latent_ + layer_checked(layer) * latent_pool_bytes(); }
const uint8_t* CacheManager::indexer_pool(int64_t layer) const { return indexer_ + layer_checked(layer) * indexer_pool_bytes(); }

void CacheManager::fill(uint8_t byte) {
  const size_t lat = static_cast<size_t>(latent_pool_bytes()) * cfg_.num_layers;
  const size_t idx = static_cast<size_t>(indexer_pool_bytes()) * cfg_.num_layers;
  if (cfg_.storage == Storage::Device) {
    dev_.memset(latent_, byte, lat);
    dev_.memset(indexer_, byte, idx);
  } else {
    std::memset(latent_, byte, lat);
    std::memset(indexer_, byte, idx);
  }
}

void CacheManager::copy(void* dst, const void* src, size_t bytes) const {
  if (bytes == 0) return;
  if (cfg_.storage == Storage::Device) {
    dev_.copy(dst, src, bytes);
  } else {
    std::memcpy(dst, src, bytes);
  }
}

}  // namespace dsa
