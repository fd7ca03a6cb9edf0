// Paged cache manager: sizes, hand-computed block layouts, the 8448-byte
// indexer block, errors that change nothing, the device allocator hook, and a
// long random sequence of operations checked against a simple model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>

#include "expect_error.h"
#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/error.h"

using namespace dsa;

namespace {

using dsa::test::expect_error;

CacheConfig small_config(int64_t tpb, int64_t blocks, int64_t layers = 1) {
  CacheConfig c;
  c.tokens_per_block = tpb;
  c.num_blocks = blocks;
  c.num_layers = layers;
  return c;
}

// Everything observable about the allocation state, to compare before/after a failed call.
struct Snapshot {
  std::map<int64_t, std::vector<int32_t>> tables;
  std::map<int64_t, int64_t> tokens;
  int64_t free_blocks = 0;
  bool operator==(const Snapshot&) const = default;
};
Snapshot snapshot(const CacheManager& c) {
  Snapshot s;
  for (int64_t id : c.request_ids()) {
    s.tables[id] = c.block_table(id);
    s.tokens[id] = c.num_tokens(id);
  }
  s.free_blocks = c.free_blocks();
  return s;
}

}  // namespace

TEST(CacheConfig, SizesOfDeepSeekV32) {
  LayerConfig lc;
  CacheConfig c = CacheConfig::for_layer(lc);
  EXPECT_EQ(c.latent_bytes_per_token(), 1152);
  EXPECT_EQ(c.indexer_bytes_per_token(), 132);
  EXPECT_EQ(c.latent_bytes_per_block(), 64 * 1152);
  EXPECT_EQ(c.indexer_bytes_per_block(), 8448);
  EXPECT_EQ(c.bytes_per_block(), 64 * 1152 + 8448);
  lc.kv_cache_dtype = LatentCacheDType::FP8;
  CacheConfig f = CacheConfig::for_layer(lc, 61);
  EXPECT_EQ(f.latent_bytes_per_token(), 656);  // 512 fp8 + 4 scales * 4 + 64 bf16
  EXPECT_EQ(f.bytes_per_block(), (64 * 656 + 8448) * 61);
  f.with_tokens(1);
  EXPECT_EQ(f.num_blocks, 1);
  f.with_tokens(129);
  EXPECT_EQ(f.num_blocks, 3);  // rounded up
  EXPECT_EQ(f.total_bytes(), 3 * f.bytes_per_block());
  f.with_bytes(5 * f.bytes_per_block() + f.bytes_per_block() - 1);
  EXPECT_EQ(f.num_blocks, 5);  // rounded down
  EXPECT_EQ(f.capacity_tokens(), 5 * 64);
}

TEST(CacheConfig, InvalidCapacitiesAreErrors) {
  CacheConfig c;
  expect_error<ConfigError>([&] { c.with_tokens(0); }, {"0 tokens", "positive"});
  expect_error<ConfigError>([&] { c.with_bytes(100); }, {"100 bytes", "holds no block", "82176"});
  expect_error<ConfigError>([&] { CacheConfig{}.validate(); }, {"0 blocks", "with_tokens"});
  CacheConfig big;
  big.num_blocks = int64_t(1) << 26;  // 2^32 slots
  expect_error<ConfigError>([&] { big.validate(); }, {"int32"});
  CacheConfig tpb = small_config(0, 4);
  expect_error<ConfigError>([&] { tpb.validate(); }, {"tokens_per_block = 0"});
  expect_error<ConfigError>([&] { CacheManager m(small_config(64, 4, 0)); }, {"num_layers = 0"});
}

// Allocation order, reuse and slots, all computed by hand.
TEST(CacheManager, BlockLayoutByHand) {
  CacheManager m(small_config(64, 4));
  EXPECT_EQ(m.free_blocks(), 4);
  m.add_request(10);
  m.reserve(10, 70);  // 2 blocks
  m.add_request(20);
  m.extend(20, 10);  // 1 block
  EXPECT_EQ(m.block_table(10), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(m.block_table(20), (std::vector<int32_t>{2}));
  EXPECT_EQ(m.num_tokens(10), 70);
  EXPECT_EQ(m.num_tokens(20), 10);
  EXPECT_EQ(m.used_blocks(), 3);
  EXPECT_EQ(m.slot(10, 0), 0);
  EXPECT_EQ(m.slot(10, 65), 65);
  EXPECT_EQ(m.slot(20, 5), 2 * 64 + 5);
  m.extend(20, 54);  // 64 tokens: still one block
  EXPECT_EQ(m.block_table(20).size(), 1u);
  m.reserve(20, 30);  // never shrinks
  EXPECT_EQ(m.num_tokens(20), 64);

  m.free_request(10);  // blocks 0 and 1 come back; 0 is reused first
  EXPECT_FALSE(m.has_request(10));
  EXPECT_EQ(m.free_blocks(), 3);
  m.add_request(30);
  m.reserve(30, 130);  // 3 blocks: 0, 1, then the never-used 3
  EXPECT_EQ(m.block_table(30), (std::vector<int32_t>{0, 1, 3}));
  EXPECT_EQ(m.slot(30, 127), 127);
  EXPECT_EQ(m.slot(30, 128), 3 * 64);
  EXPECT_EQ(m.slot(30, 129), 3 * 64 + 1);
  EXPECT_EQ(m.free_blocks(), 0);
  EXPECT_EQ(m.request_ids(), (std::vector<int64_t>{20, 30}));
  expect_error<CacheError>([&] { m.slot(30, 130); }, {"position 130", "130 tokens"});
}

TEST(CacheManager, PoolsAreContiguousPerLayer) {
  CacheConfig c = small_config(16, 5, 3);
  c.latent_dtype = LatentCacheDType::FP8;
  CacheManager m(c);
  EXPECT_EQ(m.latent_pool_bytes(), 5 * 16 * 656);
  EXPECT_EQ(m.indexer_pool_bytes(), 5 * 16 * 132);
  EXPECT_EQ(m.latent_pool(1) - m.latent_pool(0), m.latent_pool_bytes());
  EXPECT_EQ(m.latent_pool(2) - m.latent_pool(1), m.latent_pool_bytes());
  EXPECT_EQ(m.indexer_pool(2) - m.indexer_pool(0), 2 * m.indexer_pool_bytes());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m.latent_pool(0)) % 256, 0u);
  expect_error<CacheError>([&] { m.latent_pool(3); }, {"layer 3", "0..2"});
  expect_error<CacheError>([&] { m.indexer_pool(-1); }, {"layer -1"});
  // Fresh pools are zeroed; fill() sets every byte of every layer.
  EXPECT_EQ(m.latent_pool(2)[m.latent_pool_bytes() - 1], 0);
  m.fill(0xFF);
  EXPECT_EQ(m.latent_pool(0)[0], 0xFF);
  EXPECT_EQ(m.latent_pool(2)[m.latent_pool_bytes() - 1], 0xFF);
  EXPECT_EQ(m.indexer_pool(2)[m.indexer_pool_bytes() - 1], 0xFF);
}

// The indexer block: all 64 fp8 vectors (8192 bytes), then the 64 fp32 scales.
TEST(CacheManager, IndexerBlockIs8448Bytes) {
  CacheManager m(small_config(64, 3));
  m.add_request(1);
  m.reserve(1, 64);  // block 0
  m.add_request(2);
  m.reserve(2, 128);  // blocks 1, 2
  const BatchMetadata md = build_batch_metadata(m, {{2, 60, 5}});  // positions 60..64 cross blocks 1 -> 2
  // Position 60: block 1, offset 60. Position 64: block 2, offset 0.
  EXPECT_EQ(md.indexer_k_offset[0], 1 * 8448 + 60 * 128);
  EXPECT_EQ(md.indexer_scale_offset[0], 1 * 8448 + 8192 + 60 * 4);
  EXPECT_EQ(md.indexer_k_offset[3], 1 * 8448 + 63 * 128);
  EXPECT_EQ(md.indexer_scale_offset[3], 1 * 8448 + 8192 + 63 * 4);
  EXPECT_EQ(md.indexer_k_offset[4], 2 * 8448);
  EXPECT_EQ(md.indexer_scale_offset[4], 2 * 8448 + 8192);
  // The last scale of a block ends exactly at the next block.
  EXPECT_EQ(md.indexer_scale_offset[3] + 4, 2 * 8448);

  // Write a token's vector and scale there; they land inside its block only.
  uint8_t* pool = m.indexer_pool(0);
  m.fill(0);
  std::memset(pool + md.indexer_k_offset[4], 0x3C, 128);
  const float scale = 0.125f;
  std::memcpy(pool + md.indexer_scale_offset[4], &scale, 4);
  for (int64_t i = 0; i < m.indexer_pool_bytes(); ++i) {
    const bool in_vec = i >= 2 * 8448 && i < 2 * 8448 + 128;
    const bool in_scale = i >= 2 * 8448 + 8192 && i < 2 * 8448 + 8196;
    if (!in_vec && !in_scale) ASSERT_EQ(pool[i], 0) << "byte " << i;
  }
  float back = 0;
  std::memcpy(&back, pool + 2 * 8448 + 8192, 4);
  EXPECT_EQ(back, 0.125f);
}

// Other page sizes follow the same rule: tpb vectors, then tpb scales.
TEST(CacheManager, IndexerBlockGeneralInTokensPerBlock) {
  CacheManager m(small_config(32, 4));
  m.add_request(5);
  m.reserve(5, 100);  // blocks 0..3
  const BatchMetadata md = build_batch_metadata(m, {{5, 70, 1}});  // block 2, offset 6
  EXPECT_EQ(m.config().indexer_bytes_per_block(), 32 * 132);
  EXPECT_EQ(md.indexer_bytes_per_block, 4224);
  EXPECT_EQ(md.slot_mapping[0], 2 * 32 + 6);
  EXPECT_EQ(md.indexer_k_offset[0], 2 * 4224 + 6 * 128);
  EXPECT_EQ(md.indexer_scale_offset[0], 2 * 4224 + 32 * 128 + 6 * 4);
}

TEST(CacheManager, ErrorsChangeNothing) {
  CacheManager m(small_config(64, 4));
  m.add_request(1, 200);
  m.reserve(1, 150);  // 3 blocks
  m.add_request(2);
  m.reserve(2, 10);  // 1 block: the cache is full
  const Snapshot before = snapshot(m);

  expect_error<CacheError>([&] { m.reserve(2, 65); }, {"cache full", "request 2", "1 more block", "0 of 4 blocks are free",
                                                        "nothing was changed", "more capacity"});
  EXPECT_EQ(snapshot(m), before);
  expect_error<CacheError>([&] { m.extend(1, 51); }, {"201 tokens", "max_tokens = 200"});
  EXPECT_EQ(snapshot(m), before);
  expect_error<CacheError>([&] { m.extend(1, -1); }, {"negative"});
  expect_error<CacheError>([&] { m.add_request(2); }, {"request with this id is already"});
  EXPECT_EQ(snapshot(m), before);
  expect_error<CacheError>([&] { m.free_request(3); }, {"free_request", "request 3 is not in the cache"});
  expect_error<CacheError>([&] { m.reserve(3, 1); }, {"request 3"});
  expect_error<CacheError>([&] { m.num_tokens(3); }, {"request 3"});
  expect_error<CacheError>([&] { m.block_table(3); }, {"request 3"});
  expect_error<CacheError>([&] { m.add_request(4, -5); }, {"max_tokens = -5"});
  EXPECT_EQ(snapshot(m), before);

  // Within the request's current last block no new block is needed, even when full.
  m.reserve(1, 192);
  EXPECT_EQ(m.free_blocks(), 0);
  EXPECT_EQ(m.num_tokens(1), 192);
  // A whole step either fits or changes nothing (including requests it would add).
  m.free_request(2);
  const Snapshot before_step = snapshot(m);
  expect_error<CacheError>([&] { reserve_step(m, {{1, 200, 1}, {7, 0, 5}}); }, {"201 tokens", "max_tokens = 200"});
  expect_error<CacheError>([&] { reserve_step(m, {{1, 190, 2}, {7, 0, 65}}); },
                           {"cache full", "2 more block", "only 1 of 4 blocks are free", "nothing was changed"});
  EXPECT_EQ(snapshot(m), before_step);
  EXPECT_FALSE(m.has_request(7));
  reserve_step(m, {{1, 190, 2}, {7, 0, 64}});
  EXPECT_EQ(m.block_table(7), (std::vector<int32_t>{3}));
}

// ---- the device allocator hook, exercised with host memory ----------------
namespace {
int g_allocs = 0, g_frees = 0, g_memsets = 0, g_copies = 0;
bool g_fail_alloc = false;
void* fake_alloc(size_t n) {
  if (g_fail_alloc) return nullptr;
  ++g_allocs;
  return std::malloc(n);
}
void fake_free(void* p) {
  ++g_frees;
  std::free(p);
}
void fake_memset(void* p, int v, size_t n) {
  ++g_memsets;
  std::memset(p, v, n);
}
void fake_copy(void* d, const void* s, size_t n) {
  ++g_copies;
  std::memcpy(d, s, n);
}
}  // namespace

TEST(CacheManager, DeviceStorageGoesThroughTheAllocatorHook) {
  CacheConfig c = small_config(64, 3, 2);
  c.storage = Storage::Device;
  set_device_allocator(nullptr);
  EXPECT_EQ(device_allocator(), nullptr);
  expect_error<CacheError>([&] { CacheManager m(c); }, {"device allocator", "none is installed", "Storage::Host"});

  DeviceAllocator incomplete;
  incomplete.alloc = fake_alloc;
  expect_error<ConfigError>([&] { set_device_allocator(&incomplete); }, {"alloc, free, memset, copy"});

  DeviceAllocator a{fake_alloc, fake_free, fake_memset, fake_copy};
  g_allocs = g_frees = g_memsets = g_copies = 0;
  {
    CacheManager m(c, &a);  // an allocator handed over directly
    EXPECT_EQ(g_allocs, 2);  // one latent and one indexer buffer for both layers
    EXPECT_EQ(g_memsets, 2);
    m.fill(0xAB);
    EXPECT_EQ(g_memsets, 4);
    uint8_t host[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    m.copy(m.indexer_pool(1) + 8440, host, 8);
    uint8_t back[8] = {};
    m.copy(back, m.indexer_pool(1) + 8440, 8);
    EXPECT_EQ(std::memcmp(host, back, 8), 0);
    EXPECT_EQ(g_copies, 2);
    EXPECT_EQ(m.latent_pool(1)[0], 0xAB);
  }
  EXPECT_EQ(g_frees, 2);

  set_device_allocator(&a);  // the process-wide allocator
  ASSERT_NE(device_allocator(), nullptr);
  {
    CacheManager m(c);
    EXPECT_EQ(g_allocs, 4);
  }
  g_fail_alloc = true;
  expect_error<OutOfMemoryError>([&] { CacheManager m(c); }, {"GPU memory", "smaller capacity"});
  g_fail_alloc = false;
  set_device_allocator(nullptr);
  EXPECT_EQ(g_frees, 4);
}

// ---- a long random sequence against a simple model -------------------------
namespace {

uint8_t pattern(int64_t id, int64_t pos, int64_t layer, int64_t j, int which) {
  uint64_t x = (uint64_t(id) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(pos) * 0xC2B2AE3D27D4EB4Full) ^
               (uint64_t(layer * 3 + which) << 40) ^ uint64_t(j);
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 32;
  return static_cast<uint8_t>(x);
}

// Writes (or checks) the pattern of positions [from, to) of request id in every layer,
// addressing the pools through the cache's own slots.
template <bool kCheck>
::testing::AssertionResult touch(CacheManager& m, int64_t id, int64_t from, int64_t to) {
  const CacheConfig& c = m.config();
  const int64_t lat = c.latent_bytes_per_token(), di = c.index_head_dim, tpb = c.tokens_per_block;
  for (int64_t L = 0; L < c.num_layers; ++L) {
    uint8_t* lp = m.latent_pool(L);
    uint8_t* ip = m.indexer_pool(L);
    for (int64_t p = from; p < to; ++p) {
      const int64_t s = m.slot(id, p), b = s / tpb, o = s % tpb;
      uint8_t* rows[3] = {lp + s * lat, ip + b * c.indexer_bytes_per_block() + o * di,
                          ip + b * c.indexer_bytes_per_block() + tpb * di + o * 4};
      const int64_t lens[3] = {lat, di, 4};
      for (int which = 0; which < 3; ++which) {
        for (int64_t j = 0; j < lens[which]; ++j) {
          const uint8_t want = pattern(id, p, L, j, which);
          if (kCheck) {
            if (rows[which][j] != want) {
              return ::testing::AssertionFailure() << "request " << id << " position " << p << " layer " << L << " part " << which
                                                   << " byte " << j << " changed";
            }
          } else {
            rows[which][j] = want;
          }
        }
      }
    }
  }
  return ::testing::AssertionSuccess();
}

struct ModelRequest {
  int64_t max_tokens = 0;
  int64_t tokens = 0;
};

}  // namespace

TEST(CacheManager, RandomOperationsMatchAModel) {
  CacheConfig c = small_config(8, 48, 2);
  c.kv_lora_rank = 128;  // small rows keep the content checks fast; the layout is the same
  c.rope_dim = 64;
  CacheManager m(c);
  std::mt19937_64 rng(12345);
  std::map<int64_t, ModelRequest> model;
  int64_t overflows = 0, limit_errors = 0, unknown_frees = 0, duplicates = 0, blocks_handed_out = 0, checks = 0;

  auto blocks = [&](int64_t t) { return (t + 7) / 8; };
  auto verify_all = [&]() {
    for (const auto& [id, r] : model) ASSERT_TRUE(touch<true>(m, id, 0, r.tokens));
    ++checks;
  };
  auto verify_state = [&]() {
    int64_t used = 0;
    std::set<int32_t> seen;
    ASSERT_EQ(m.num_requests(), static_cast<int64_t>(model.size()));
    for (const auto& [id, r] : model) {
      ASSERT_TRUE(m.has_request(id));
      ASSERT_EQ(m.num_tokens(id), r.tokens);
      const auto& bt = m.block_table(id);
      ASSERT_EQ(static_cast<int64_t>(bt.size()), blocks(r.tokens));
      for (int32_t b : bt) {
        ASSERT_TRUE(b >= 0 && b < 48);
        ASSERT_TRUE(seen.insert(b).second) << "block " << b << " given to two requests";
      }
      used += blocks(r.tokens);
    }
    ASSERT_EQ(m.free_blocks(), 48 - used);
  };

  for (int step = 0; step < 6000; ++step) {
    const int op = static_cast<int>(rng() % 10);
    const int64_t id = static_cast<int64_t>(rng() % 24);
    const bool live = model.count(id) != 0;
    if (op < 2) {  // add
      const int64_t max_tokens = (rng() % 3 == 0) ? static_cast<int64_t>(1 + rng() % 120) : 0;
      if (live) {
        EXPECT_THROW(m.add_request(id, max_tokens), CacheError);
        ++duplicates;
      } else {
        m.add_request(id, max_tokens);
        model[id] = ModelRequest{max_tokens, 0};
      }
    } else if (op < 8) {  // extend (or reserve to a total)
      const int64_t n = static_cast<int64_t>(rng() % 40);
      if (!live) {
        EXPECT_THROW(m.extend(id, n), CacheError);
        continue;
      }
      ModelRequest& r = model[id];
      const int64_t target = r.tokens + n;
      const int64_t need = blocks(target) - blocks(r.tokens);
      const bool over_limit = r.max_tokens > 0 && target > r.max_tokens;
      const bool overflow = !over_limit && need > m.free_blocks();
      if (over_limit || overflow) {
        const Snapshot before = snapshot(m);
        try {
          if (op == 7) m.reserve(id, target); else m.extend(id, n);
          ADD_FAILURE() << "step " << step << ": expected CacheError";
        } catch (const CacheError& e) {
          const std::string msg = e.what();
          EXPECT_NE(msg.find(over_limit ? "max_tokens" : "cache full"), std::string::npos) << msg;
        }
        EXPECT_EQ(snapshot(m), before) << "step " << step;
        over_limit ? ++limit_errors : ++overflows;
        verify_all();
        if (HasFatalFailure()) return;
      } else {
        if (op == 7) m.reserve(id, target); else m.extend(id, n);
        blocks_handed_out += need;
        ASSERT_TRUE(touch<false>(m, id, r.tokens, target));
        r.tokens = target;
      }
    } else {  // free
      if (live) {
        m.free_request(id);
        model.erase(id);
      } else {
        EXPECT_THROW(m.free_request(id), CacheError);
        ++unknown_frees;
      }
    }
    verify_state();
    if (HasFatalFailure()) return;
    if (step % 500 == 0) verify_all();
  }
  verify_all();
  // The sequence must have exercised every path, and reused blocks many times over.
  EXPECT_GT(overflows, 100);
  EXPECT_GT(limit_errors, 20);
  EXPECT_GT(unknown_frees, 20);
  EXPECT_GT(duplicates, 20);
  EXPECT_GT(blocks_handed_out, 20 * 48);
  EXPECT_GT(checks, 100);
}
