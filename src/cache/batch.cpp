// Batch metadata: everything a step's stages derive from (cached, new) per request.
#include "dsa/batch.h"

#include <fmt/format.h>

#include <algorithm>
#include <set>

#include "dsa/cache.h"
#include "dsa/error.h"

namespace dsa {

namespace {

void check_step_shape(const std::vector<StepRequest>& requests, const char* what) {
  if (requests.empty()) throw ShapeError(fmt::format("{}: the step has no requests; give at least one (cached, new) pair", what));
  std::set<int64_t> seen;
  for (size_t r = 0; r < requests.size(); ++r) {
    const StepRequest& q = requests[r];
    if (q.cached < 0) {
      throw ShapeError(fmt::format("{}: request {} (index {}) has cached = {}; cached token counts cannot be negative", what, q.id, r, q.cached));
    }
    if (q.num_new < 1) {
      throw ShapeError(fmt::format("{}: request {} (index {}) has num_new = {}; every request in a step needs at least one new token "
                                   "(decode: 1, speculative: 2..4); leave idle requests out of the step",
                                   what, q.id, r, q.num_new));
    }
    if (q.num_new > StepLimits::kMaxSlots || q.cached > StepLimits::kMaxSlots - q.num_new) {
      throw ShapeError(fmt::format("{}: request {} (index {}) has cached {} + new {} tokens, more than the {} positions a request "
                                   "can hold (positions and cache slots are int32)",
                                   what, q.id, r, q.cached, q.num_new, StepLimits::kMaxSlots));
    }
    if (!seen.insert(q.id).second) {
      throw ShapeError(fmt::format("{}: request id {} appears twice in the step (index {}); each request may appear once per step, "
                                   "merge its new tokens into one entry",
                                   what, q.id, r));
    }
  }
}

}  // namespace

void check_step_limits(const std::vector<StepRequest>& requests, int64_t tokens_per_block, const std::string& what) {
  using L = StepLimits;
  if (tokens_per_block <= 0) {
    throw ConfigError(fmt::format("tokens_per_block = {} is invalid: it must be positive", tokens_per_block), "tokens_per_block");
  }
  if (requests.empty()) throw ConfigError(fmt::format("{} has no requests; give at least one (cached, new) pair", what), "requests");
  if (static_cast<int64_t>(requests.size()) > L::kMaxRequests) {
    throw ConfigError(fmt::format("{} has {} requests, more than the limit of {}; split it into several steps", what, requests.size(),
                                  L::kMaxRequests),
                      "requests");
  }
  int64_t blocks = 0;  // at most kMaxRequests * (kMaxSlots / 1 + 1): no overflow
  for (size_t r = 0; r < requests.size(); ++r) {
    const StepRequest& q = requests[r];
    if (q.cached < 0 || q.num_new < 1) {
      throw ConfigError(fmt::format("{}: request {} (index {}) has cached {} and new {}; need cached >= 0 and new >= 1", what, q.id, r,
                                    q.cached, q.num_new),
                        "requests");
    }
    if (q.num_new > L::kMaxSlots || q.cached > L::kMaxSlots - q.num_new) {
      throw ConfigError(fmt::format("{}: request {} (index {}) has cached {} + new {} tokens, more than the limit of {} per request "
                                    "(positions and cache slots are int32); give a shorter sequence",
                                    what, q.id, r, q.cached, q.num_new, L::kMaxSlots),
                        "requests");
    }
    const int64_t seq = q.cached + q.num_new;
    blocks += seq / tokens_per_block + (seq % tokens_per_block != 0);
  }
  if (blocks > L::kMaxSlots / tokens_per_block) {
    throw ConfigError(fmt::format("{} needs {} blocks of {} tokens, more than the {} slots one cache can address (slots are int32); "
                                  "give fewer requests or shorter sequences",
                                  what, blocks, tokens_per_block, L::kMaxSlots));
  }
}

int64_t BatchMetadata::max_seq_len() const {
  int64_t m = 0;
  for (int32_t s : seq_lens) m = std::max<int64_t>(m, s);
  return m;
}

int64_t BatchMetadata::total_visible_keys() const {
  int64_t n = 0;
  for (int32_t v : visible_end) n += v;
  return n;
}

int64_t BatchMetadata::slot_of(int64_t r, int64_t p) const {
  if (r < 0 || r >= num_requests) {
    throw ShapeError(fmt::format("slot_of: request index {} is outside the step's {} requests", r, num_requests));
  }
  const int64_t b = p / tokens_per_block;
  if (p < 0 || b >= max_blocks_per_request || block_table[r * max_blocks_per_request + b] < 0) {
    throw ShapeError(fmt::format("slot_of: position {} of request index {} (id {}) has no block in the step's block table; "
                                 "valid positions are 0..{}",
                                 p, r, requests[r].id, seq_lens[r] - 1));
  }
  return static_cast<int64_t>(block_table[r * max_blocks_per_request + b]) * tokens_per_block + p % tokens_per_block;
}

int64_t BatchMetadata::indexer_k_offset_of(int64_t r, int64_t p) const {
  const int64_t s = slot_of(r, p);
  return (s / tokens_per_block) * indexer_bytes_per_block + (s % tokens_per_block) * index_head_dim;
}

int64_t BatchMetadata::indexer_scale_offset_of(int64_t r, int64_t p) const {
  const int64_t s = slot_of(r, p);
  return (s / tokens_per_block) * indexer_bytes_per_block + tokens_per_block * index_head_dim + (s % tokens_per_block) * 4;
}

void reserve_step(CacheManager& cache, const std::vector<StepRequest>& requests) {
  check_step_shape(requests, "reserve_step");
  const CacheConfig& cc = cache.config();
  int64_t need = 0;
  for (const StepRequest& q : requests) {
    const int64_t tokens = q.cached + q.num_new;
    int64_t held = 0;
    if (cache.has_request(q.id)) {
      held = static_cast<int64_t>(cache.block_table(q.id).size());
      const int64_t lim = cache.max_tokens(q.id);
      if (lim > 0 && tokens > lim) {
        throw CacheError(fmt::format("reserve_step: request {} needs {} tokens (cached {} + new {}) but its limit is max_tokens = {}; "
                                     "nothing was changed",
                                     q.id, tokens, q.cached, q.num_new, lim));
      }
    }
    need += std::max<int64_t>(0, cc.blocks_for(tokens) - held);
  }
  if (need > cache.free_blocks()) {
    throw CacheError(fmt::format("cache full: the step needs {} more block(s) ({} tokens per block) but only {} of {} blocks are free; "
                                 "nothing was changed. Make the step smaller (fewer requests, cached or new tokens) or the cache larger",
                                 need, cc.tokens_per_block, cache.free_blocks(), cc.num_blocks));
  }
  // Cannot fail from here on: every request fits and ids are distinct.
  for (const StepRequest& q : requests) {
    if (!cache.has_request(q.id)) cache.add_request(q.id);
    cache.reserve(q.id, q.cached + q.num_new);
  }
}

BatchMetadata build_batch_metadata(const CacheManager& cache, const std::vector<StepRequest>& requests) {
  check_step_shape(requests, "build_batch_metadata");
  const CacheConfig& cc = cache.config();
  BatchMetadata md;
  md.num_requests = static_cast<int64_t>(requests.size());
  md.tokens_per_block = cc.tokens_per_block;
  md.num_slots = cc.num_blocks * cc.tokens_per_block;
  md.index_head_dim = cc.index_head_dim;
  md.indexer_bytes_per_block = cc.indexer_bytes_per_block();
  md.requests = requests;

  md.token_offsets.assign(requests.size() + 1, 0);
  md.seq_lens.resize(requests.size());
  for (size_t r = 0; r < requests.size(); ++r) {
    const StepRequest& q = requests[r];
    if (!cache.has_request(q.id)) {
      throw CacheError(fmt::format("build_batch_metadata: request {} (index {}) is not in the cache; add it and reserve its tokens "
                                   "first (reserve_step does both)",
                                   q.id, r));
    }
    const int64_t seq = q.cached + q.num_new;
    if (cache.num_tokens(q.id) < seq) {
      throw CacheError(fmt::format("build_batch_metadata: request {} holds room for {} tokens but the step needs cached {} + new {} = {}; "
                                   "reserve them first (CacheManager::reserve or reserve_step)",
                                   q.id, cache.num_tokens(q.id), q.cached, q.num_new, seq));
    }
    md.seq_lens[r] = static_cast<int32_t>(seq);  // fits: the cache's slots fit int32
    md.token_offsets[r + 1] = md.token_offsets[r] + q.num_new;
    md.max_blocks_per_request = std::max(md.max_blocks_per_request, cc.blocks_for(seq));
  }
  md.num_tokens = md.token_offsets.back();

  md.block_table.assign(static_cast<size_t>(md.num_requests * md.max_blocks_per_request), -1);
  for (int64_t r = 0; r < md.num_requests; ++r) {
    const auto& bt = cache.block_table(requests[r].id);
    const int64_t nb = cc.blocks_for(md.seq_lens[r]);
    std::copy(bt.begin(), bt.begin() + nb, md.block_table.begin() + r * md.max_blocks_per_request);
  }

  const size_t T = static_cast<size_t>(md.num_tokens);
  md.positions.resize(T);
  md.token_request.resize(T);
  md.visible_end.resize(T);
  md.slot_mapping.resize(T);
  md.indexer_k_offset.resize(T);
  md.indexer_scale_offset.resize(T);
  for (int64_t r = 0; r < md.num_requests; ++r) {
    for (int64_t i = 0; i < requests[r].num_new; ++i) {
      const int64_t t = md.token_offsets[r] + i;
      const int64_t p = requests[r].cached + i;
      md.positions[t] = static_cast<int32_t>(p);
      md.token_request[t] = static_cast<int32_t>(r);
      md.visible_end[t] = static_cast<int32_t>(p + 1);  // causal: keys at positions <= p
      md.slot_mapping[t] = md.slot_of(r, p);
      md.indexer_k_offset[t] = md.indexer_k_offset_of(r, p);
      md.indexer_scale_offset[t] = md.indexer_scale_offset_of(r, p);
    }
  }
  return md;
}

void check_positions(const BatchMetadata& md, const int32_t* position_ids, int64_t n) {
  if (n != md.num_tokens) {
    throw ShapeError(fmt::format("position_ids has {} entries but the step has {} new tokens; give one position per new token", n,
                                 md.num_tokens));
  }
  for (int64_t t = 0; t < n; ++t) {
    if (position_ids[t] != md.positions[t]) {
      const int64_t r = md.token_request[t];
      throw ShapeError(fmt::format("position_ids[{}] = {} but token {} is new token {} of request {} (cached {}), so its position "
                                   "is {}; positions must be cached + i per request, in order",
                                   t, position_ids[t], t, t - md.token_offsets[r], md.requests[r].id, md.requests[r].cached,
                                   md.positions[t]));
    }
  }
}

void check_positions(const std::vector<StepRequest>& requests, const int64_t* position_ids, int64_t n) {
  int64_t total = 0;  // each num_new is at most StepLimits::kMaxSlots (check_step_limits)
  for (const StepRequest& q : requests) total += q.num_new;
  if (n != total) {
    throw ShapeError(fmt::format("position_ids has {} entries but the step has {} new tokens; give one position per new token", n, total));
  }
  int64_t t = 0;
  for (const StepRequest& q : requests) {
    for (int64_t i = 0; i < q.num_new; ++i, ++t) {
      if (position_ids[t] != q.cached + i) {
        throw ShapeError(fmt::format("position_ids[{}] = {} but token {} is new token {} of request {} (cached {}), so its position "
                                     "is {}; positions must be cached + i per request, in order",
                                     t, position_ids[t], t, i, q.id, q.cached, q.cached + i));
      }
    }
  }
}

void local_to_global_indices(const BatchMetadata& md, int32_t* indices, int64_t topk) {
  if (topk <= 0) throw ShapeError(fmt::format("local_to_global_indices: topk = {} is invalid; it must be positive", topk));
  // Check everything first so that an error leaves the indices untouched.
  for (int64_t t = 0; t < md.num_tokens; ++t) {
    const int32_t* row = indices + t * topk;
    for (int64_t k = 0; k < topk; ++k) {
      if (row[k] == -1) continue;
      if (row[k] < 0 || row[k] >= md.visible_end[t]) {
        throw ShapeError(fmt::format("top-k index [{}, {}] = {} is outside the keys token {} may see (positions 0..{} of request {}); "
                                     "indices must be request-local positions or -1",
                                     t, k, row[k], t, md.visible_end[t] - 1, md.requests[md.token_request[t]].id));
      }
    }
  }
  for (int64_t t = 0; t < md.num_tokens; ++t) {
    int32_t* row = indices + t * topk;
    const int64_t r = md.token_request[t];
    const int32_t* bt = md.block_table.data() + r * md.max_blocks_per_request;
    for (int64_t k = 0; k < topk; ++k) {
      if (row[k] == -1) continue;
      const int32_t p = row[k];
      row[k] = static_cast<int32_t>(static_cast<int64_t>(bt[p / md.tokens_per_block]) * md.tokens_per_block + p % md.tokens_per_block);
    }
  }
}

}  // namespace dsa
