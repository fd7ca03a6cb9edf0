// Batch metadata: reserve_step + build_batch_metadata (+ the index
// conversion) on a small host CacheManager, over a sequence of steps decoded
// from the fuzz bytes (request ids, cached and new counts from tiny to
// int64 extremes, frees between steps). Properties:
//  - a refused step is a dsa::Error, and a refused reserve_step leaves the
//    cache exactly as it was (all-or-nothing);
//  - an accepted step's metadata is consistent: token offsets, positions,
//    every slot inside the cache and owned by its request, no two new tokens
//    sharing a slot, indexer offsets inside one layer's indexer pool.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <vector>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/error.h"
#include "fuzz_util.h"

namespace {

class Bytes {
 public:
  Bytes(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  bool empty() const { return i_ >= n_; }
  uint8_t u8() { return i_ < n_ ? d_[i_++] : 0; }
  int64_t i64() {
    uint64_t v = 0;
    for (int k = 0; k < 8; ++k) v = (v << 8) | u8();
    int64_t s;
    std::memcpy(&s, &v, sizeof s);
    return s;
  }
  // Mostly small counts, sometimes large or hostile ones.
  int64_t count() {
    const uint8_t kind = u8();
    switch (kind % 8) {
      case 0: return static_cast<int64_t>(u8()) - 2;
      case 1: return (static_cast<int64_t>(u8()) << 8) | u8();
      case 2: return i64();
      case 3: return INT32_MAX - static_cast<int64_t>(u8());
      default: return u8() % 40;
    }
  }

 private:
  const uint8_t* d_;
  size_t n_, i_ = 0;
};

struct Snapshot {
  std::map<int64_t, std::pair<int64_t, std::vector<int32_t>>> requests;
  int64_t free_blocks = 0;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const dsa::CacheManager& c) {
  Snapshot s;
  for (int64_t id : c.request_ids()) s.requests[id] = {c.num_tokens(id), c.block_table(id)};
  s.free_blocks = c.free_blocks();
  return s;
}

void check_metadata(const dsa::CacheManager& cache, const std::vector<dsa::StepRequest>& reqs, const dsa::BatchMetadata& md) {
  using dsa_fuzz::fail;
  const auto& cc = cache.config();
  const int64_t R = static_cast<int64_t>(reqs.size());
  if (md.num_requests != R || md.token_offsets.size() != reqs.size() + 1 || md.token_offsets[0] != 0) fail("request counts");
  for (int64_t r = 0; r < R; ++r) {
    if (md.token_offsets[r + 1] - md.token_offsets[r] != reqs[r].num_new) fail("token_offsets");
    if (md.seq_lens[r] != reqs[r].cached + reqs[r].num_new) fail("seq_lens");
  }
  const size_t T = static_cast<size_t>(md.num_tokens);
  if (md.num_tokens != md.token_offsets.back() || md.positions.size() != T || md.slot_mapping.size() != T ||
      md.visible_end.size() != T || md.token_request.size() != T || md.indexer_k_offset.size() != T ||
      md.indexer_scale_offset.size() != T) {
    fail("per-token array sizes");
  }
  if (md.block_table.size() != static_cast<size_t>(R * md.max_blocks_per_request)) fail("block_table size");
  for (int32_t b : md.block_table) {
    if (b < -1 || b >= cc.num_blocks) fail("block_table entry outside the cache");
  }
  std::vector<bool> used(static_cast<size_t>(cc.num_blocks * cc.tokens_per_block));
  for (int64_t t = 0; t < md.num_tokens; ++t) {
    const int64_t r = md.token_request[t];
    if (r < 0 || r >= R || t < md.token_offsets[r] || t >= md.token_offsets[r + 1]) fail("token_request");
    const int64_t p = reqs[r].cached + (t - md.token_offsets[r]);
    if (md.positions[t] != p || md.visible_end[t] != p + 1) fail("positions / visible_end");
    const int64_t s = md.slot_mapping[t];
    if (s < 0 || s >= md.num_slots || s >= cc.num_blocks * cc.tokens_per_block) fail("slot outside the cache");
    if (s != cache.slot(reqs[r].id, p)) fail("slot differs from the cache's own");
    if (used[s]) fail("two new tokens share a slot");
    used[s] = true;
    if (md.indexer_k_offset[t] < 0 || md.indexer_k_offset[t] + cc.index_head_dim > cache.indexer_pool_bytes()) {
      fail("indexer vector offset outside the pool");
    }
    if (md.indexer_scale_offset[t] < 0 || md.indexer_scale_offset[t] + 4 > cache.indexer_pool_bytes()) {
      fail("indexer scale offset outside the pool");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  static constexpr int64_t kTpb[] = {1, 2, 3, 7, 16, 64, 100, 4096};
  dsa::CacheConfig cc;
  cc.tokens_per_block = kTpb[in.u8() % 8];
  // At most 32 blocks and 4096 slots: steps of thousands of tokens at most,
  // so that each input runs in well under a millisecond.
  cc.num_blocks = 1 + in.u8() % std::max<int64_t>(1, std::min<int64_t>(32, 4096 / cc.tokens_per_block));
  cc.kv_lora_rank = 4;  // tiny pools: only the bookkeeping is under test
  cc.rope_dim = 2;
  cc.index_head_dim = 4;
  dsa::CacheManager cache(cc);

  for (int step = 0; step < 16 && !in.empty(); ++step) {
    const uint8_t op = in.u8();
    if (op % 5 == 0) {  // free a request (known or not)
      const int64_t id = in.u8() % 8;
      if (cache.has_request(id)) cache.free_request(id);
      continue;
    }
    std::vector<dsa::StepRequest> reqs(1 + (op >> 4) % 6);
    for (auto& q : reqs) {
      const uint8_t idb = in.u8();
      q.id = idb < 250 ? idb % 8 : in.i64();
      q.cached = in.count();
      q.num_new = in.count();
    }
    if (op % 5 != 1) {  // sometimes build without reserving first
      const Snapshot before = snapshot(cache);
      try {
        dsa::reserve_step(cache, reqs);
      } catch (const dsa::Error&) {
        if (!(snapshot(cache) == before)) dsa_fuzz::fail("a refused reserve_step changed the cache");
        continue;
      }
    }
    dsa::BatchMetadata md;
    try {
      md = dsa::build_batch_metadata(cache, reqs);
    } catch (const dsa::Error&) {
      continue;
    }
    check_metadata(cache, reqs, md);
    // Request-local top-k indices -> global slots, from fuzz bytes.
    const int64_t topk = 1 + in.u8() % 4;
    if (md.num_tokens > 4096) continue;
    std::vector<int32_t> idx(static_cast<size_t>(md.num_tokens * topk));
    for (auto& v : idx) v = static_cast<int32_t>(in.count());
    const std::vector<int32_t> orig = idx;
    try {
      dsa::local_to_global_indices(md, idx.data(), topk);
    } catch (const dsa::ShapeError&) {
      if (idx != orig) dsa_fuzz::fail("a refused local_to_global_indices changed the indices");
      continue;
    }
    for (size_t k = 0; k < idx.size(); ++k) {
      if (orig[k] == -1 ? idx[k] != -1 : idx[k] < 0 || idx[k] >= md.num_slots) dsa_fuzz::fail("converted index outside the cache");
    }
  }
  return 0;
}
