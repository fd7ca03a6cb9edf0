// Batch metadata for every step mode against hand-computed values, position
// checks and the request-local -> global top-k index conversion.
#include <gtest/gtest.h>

#include <numeric>
#include <string>

#include "expect_error.h"
#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/error.h"

using namespace dsa;

namespace {

using dsa::test::expect_error;

CacheConfig cfg64(int64_t blocks = 16) {
  CacheConfig c;
  c.num_blocks = blocks;
  return c;
}

using I32 = std::vector<int32_t>;
using I64 = std::vector<int64_t>;

int64_t kofs(int64_t block, int64_t off) { return block * 8448 + off * 128; }
int64_t sofs(int64_t block, int64_t off) { return block * 8448 + 8192 + off * 4; }

}  // namespace

TEST(BatchMetadata, PrefillFromEmpty) {
  CacheManager m(cfg64());
  m.add_request(99);
  m.reserve(99, 64);  // block 0 taken by someone else
  reserve_step(m, {{7, 0, 70}});
  ASSERT_EQ(m.block_table(7), (I32{1, 2}));
  const BatchMetadata md = build_batch_metadata(m, {{7, 0, 70}});
  EXPECT_EQ(md.num_requests, 1);
  EXPECT_EQ(md.num_tokens, 70);
  EXPECT_EQ(md.token_offsets, (I64{0, 70}));
  EXPECT_EQ(md.seq_lens, (I32{70}));
  EXPECT_EQ(md.max_blocks_per_request, 2);
  EXPECT_EQ(md.block_table, (I32{1, 2}));
  EXPECT_EQ(md.num_slots, 16 * 64);
  for (int t = 0; t < 70; ++t) {
    EXPECT_EQ(md.positions[t], t);
    EXPECT_EQ(md.token_request[t], 0);
    EXPECT_EQ(md.visible_end[t], t + 1);
    // Positions 0..63 in block 1, 64..69 in block 2: both give slot 64 + t.
    EXPECT_EQ(md.slot_mapping[t], 64 + t);
  }
  EXPECT_EQ(md.indexer_k_offset[63], kofs(1, 63));
  EXPECT_EQ(md.indexer_scale_offset[63], sofs(1, 63));
  EXPECT_EQ(md.indexer_k_offset[65], kofs(2, 1));
  EXPECT_EQ(md.indexer_scale_offset[65], sofs(2, 1));
  EXPECT_EQ(md.total_visible_keys(), 70 * 71 / 2);
  EXPECT_EQ(md.max_seq_len(), 70);
}

TEST(BatchMetadata, PrefillAfterCachedPrefix) {
  CacheManager m(cfg64(4));
  m.add_request(1);
  m.reserve(1, 128);  // blocks 0, 1
  m.add_request(2);
  m.reserve(2, 64);  // block 2
  m.free_request(1);
  reserve_step(m, {{3, 100, 30}});  // 130 tokens: reuses 0, 1, then 3
  const BatchMetadata md = build_batch_metadata(m, {{3, 100, 30}});
  EXPECT_EQ(md.num_tokens, 30);
  EXPECT_EQ(md.seq_lens, (I32{130}));
  EXPECT_EQ(md.max_blocks_per_request, 3);
  EXPECT_EQ(md.block_table, (I32{0, 1, 3}));
  for (int i = 0; i < 30; ++i) {
    EXPECT_EQ(md.positions[i], 100 + i);
    EXPECT_EQ(md.visible_end[i], 101 + i);
  }
  EXPECT_EQ(md.slot_mapping[0], 100);
  EXPECT_EQ(md.slot_mapping[27], 127);
  EXPECT_EQ(md.slot_mapping[28], 192);  // position 128: block 3, offset 0
  EXPECT_EQ(md.slot_mapping[29], 193);
  EXPECT_EQ(md.indexer_k_offset[27], kofs(1, 63));
  EXPECT_EQ(md.indexer_k_offset[28], kofs(3, 0));
  EXPECT_EQ(md.indexer_scale_offset[29], sofs(3, 1));
  EXPECT_EQ(md.total_visible_keys(), (101 + 130) * 30 / 2);
  EXPECT_EQ(md.slot_of(0, 5), 5);  // a cached position
  EXPECT_EQ(md.slot_of(0, 70), 64 + 6);
}

TEST(BatchMetadata, Decode) {
  CacheManager m(cfg64());
  const std::vector<StepRequest> step = {{5, 10, 1}, {6, 64, 1}, {8, 127, 1}};
  reserve_step(m, step);  // 5: [0]; 6: [1, 2]; 8: [3, 4]
  const BatchMetadata md = build_batch_metadata(m, step);
  EXPECT_EQ(md.num_tokens, 3);
  EXPECT_EQ(md.token_offsets, (I64{0, 1, 2, 3}));
  EXPECT_EQ(md.seq_lens, (I32{11, 65, 128}));
  EXPECT_EQ(md.positions, (I32{10, 64, 127}));
  EXPECT_EQ(md.token_request, (I32{0, 1, 2}));
  EXPECT_EQ(md.visible_end, (I32{11, 65, 128}));
  EXPECT_EQ(md.max_blocks_per_request, 2);
  EXPECT_EQ(md.block_table, (I32{0, -1, 1, 2, 3, 4}));
  EXPECT_EQ(md.slot_mapping, (I64{10, 2 * 64, 4 * 64 + 63}));
  EXPECT_EQ(md.indexer_k_offset, (I64{kofs(0, 10), kofs(2, 0), kofs(4, 63)}));
  EXPECT_EQ(md.indexer_scale_offset, (I64{sofs(0, 10), sofs(2, 0), sofs(4, 63)}));
  EXPECT_EQ(md.total_visible_keys(), 11 + 65 + 128);
  EXPECT_EQ(md.max_seq_len(), 128);
  expect_error<ShapeError>([&] { md.slot_of(0, 64); }, {"position 64", "0..10"});
  expect_error<ShapeError>([&] { md.slot_of(3, 0); }, {"request index 3"});
}

TEST(BatchMetadata, SpeculativeNextN) {
  for (int n = 2; n <= 4; ++n) {
    CacheManager m(cfg64());
    m.add_request(50);
    m.reserve(50, 64);  // block 0
    m.add_request(51);
    m.reserve(51, 64);  // block 1
    m.free_request(50);
    const std::vector<StepRequest> step = {{1, 63, n}, {2, 5, n}};
    reserve_step(m, step);  // 1: [0, 2] (its tokens cross the block edge); 2: [3]
    ASSERT_EQ(m.block_table(1), (I32{0, 2}));
    ASSERT_EQ(m.block_table(2), (I32{3}));
    const BatchMetadata md = build_batch_metadata(m, step);
    ASSERT_EQ(md.num_tokens, 2 * n);
    EXPECT_EQ(md.token_offsets, (I64{0, n, 2 * n}));
    EXPECT_EQ(md.seq_lens, (I32{63 + n, 5 + n}));
    EXPECT_EQ(md.block_table, (I32{0, 2, 3, -1}));
    for (int i = 0; i < n; ++i) {
      // Request 1: position 63 is the last slot of block 0, then block 2.
      EXPECT_EQ(md.positions[i], 63 + i);
      EXPECT_EQ(md.visible_end[i], 64 + i);  // each draft token sees the ones before it, not after
      EXPECT_EQ(md.token_request[i], 0);
      EXPECT_EQ(md.slot_mapping[i], i == 0 ? 63 : 128 + (i - 1));
      EXPECT_EQ(md.positions[n + i], 5 + i);
      EXPECT_EQ(md.visible_end[n + i], 6 + i);
      EXPECT_EQ(md.token_request[n + i], 1);
      EXPECT_EQ(md.slot_mapping[n + i], 192 + 5 + i);
      EXPECT_EQ(md.indexer_scale_offset[n + i], sofs(3, 5 + i));
    }
  }
}

TEST(BatchMetadata, MixedPrefillAndDecode) {
  CacheManager m(cfg64());
  const std::vector<StepRequest> step = {{100, 0, 3}, {200, 40, 1}, {300, 62, 4}};
  reserve_step(m, step);  // 100: [0]; 200: [1]; 300: [2, 3]
  const BatchMetadata md = build_batch_metadata(m, step);
  EXPECT_EQ(md.num_tokens, 8);
  EXPECT_EQ(md.token_offsets, (I64{0, 3, 4, 8}));
  EXPECT_EQ(md.positions, (I32{0, 1, 2, 40, 62, 63, 64, 65}));
  EXPECT_EQ(md.token_request, (I32{0, 0, 0, 1, 2, 2, 2, 2}));
  EXPECT_EQ(md.visible_end, (I32{1, 2, 3, 41, 63, 64, 65, 66}));
  EXPECT_EQ(md.seq_lens, (I32{3, 41, 66}));
  EXPECT_EQ(md.max_blocks_per_request, 2);
  EXPECT_EQ(md.block_table, (I32{0, -1, 1, -1, 2, 3}));
  EXPECT_EQ(md.slot_mapping, (I64{0, 1, 2, 104, 190, 191, 192, 193}));
  EXPECT_EQ(md.indexer_k_offset[3], kofs(1, 40));
  EXPECT_EQ(md.indexer_k_offset[6], kofs(3, 0));
  EXPECT_EQ(md.total_visible_keys(), 1 + 2 + 3 + 41 + 63 + 64 + 65 + 66);
  EXPECT_EQ(md.max_seq_len(), 66);
  EXPECT_EQ(md.requests[2].id, 300);
}

// A 200-token prompt in chunks of 80, 80, 40 describes the same tokens and
// slots as one step of 200.
TEST(BatchMetadata, ChunkedPrefillMatchesOneStep) {
  CacheManager whole(cfg64()), chunked(cfg64());
  reserve_step(whole, {{9, 0, 200}});
  const BatchMetadata one = build_batch_metadata(whole, {{9, 0, 200}});
  std::vector<int32_t> pos, vis;
  std::vector<int64_t> slots, kofs_all, sofs_all;
  for (auto [cached, n] : {std::pair<int64_t, int64_t>{0, 80}, {80, 80}, {160, 40}}) {
    reserve_step(chunked, {{9, cached, n}});
    const BatchMetadata md = build_batch_metadata(chunked, {{9, cached, n}});
    EXPECT_EQ(md.seq_lens[0], cached + n);
    EXPECT_EQ(md.max_blocks_per_request, (cached + n + 63) / 64);
    pos.insert(pos.end(), md.positions.begin(), md.positions.end());
    vis.insert(vis.end(), md.visible_end.begin(), md.visible_end.end());
    slots.insert(slots.end(), md.slot_mapping.begin(), md.slot_mapping.end());
    kofs_all.insert(kofs_all.end(), md.indexer_k_offset.begin(), md.indexer_k_offset.end());
    sofs_all.insert(sofs_all.end(), md.indexer_scale_offset.begin(), md.indexer_scale_offset.end());
  }
  EXPECT_EQ(pos, one.positions);
  EXPECT_EQ(vis, one.visible_end);
  EXPECT_EQ(slots, one.slot_mapping);
  EXPECT_EQ(kofs_all, one.indexer_k_offset);
  EXPECT_EQ(sofs_all, one.indexer_scale_offset);
  EXPECT_EQ(chunked.block_table(9), whole.block_table(9));

  // Chunks interleaved with another request's decode steps: blocks are no
  // longer contiguous, and every slot is still the cache's own slot.
  CacheManager mixed(cfg64());
  int64_t decode_cached = 30;
  for (auto [cached, n] : {std::pair<int64_t, int64_t>{0, 80}, {80, 80}, {160, 40}}) {
    const std::vector<StepRequest> step = {{4, decode_cached, 1}, {9, cached, n}};
    reserve_step(mixed, step);
    const BatchMetadata md = build_batch_metadata(mixed, step);
    EXPECT_EQ(md.slot_mapping[0], mixed.slot(4, decode_cached));
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(md.slot_mapping[1 + i], mixed.slot(9, cached + i));
    decode_cached += 60;  // the decode request also grows past block edges
  }
  EXPECT_NE(mixed.block_table(9), whole.block_table(9));
}

TEST(BatchMetadata, ErrorsNameTheRequest) {
  CacheManager m(cfg64());
  m.add_request(1);
  m.reserve(1, 10);
  expect_error<CacheError>([&] { build_batch_metadata(m, {{1, 10, 1}}); }, {"request 1 holds room for 10", "11", "reserve"});
  expect_error<CacheError>([&] { build_batch_metadata(m, {{2, 0, 1}}); }, {"request 2", "not in the cache"});
  expect_error<ShapeError>([&] { build_batch_metadata(m, {{1, 0, 2}, {1, 2, 1}}); }, {"request id 1 appears twice"});
  expect_error<ShapeError>([&] { build_batch_metadata(m, {{1, 0, 0}}); }, {"num_new = 0", "at least one new token"});
  expect_error<ShapeError>([&] { build_batch_metadata(m, {{1, -1, 1}}); }, {"cached = -1"});
  expect_error<ShapeError>([&] { build_batch_metadata(m, {}); }, {"no requests"});
}

TEST(BatchMetadata, CheckPositions) {
  CacheManager m(cfg64());
  const std::vector<StepRequest> step = {{100, 0, 3}, {200, 40, 1}, {300, 62, 4}};
  reserve_step(m, step);
  const BatchMetadata md = build_batch_metadata(m, step);
  std::vector<int32_t> pos = {0, 1, 2, 40, 62, 63, 64, 65};
  EXPECT_NO_THROW(check_positions(md, pos.data(), 8));
  pos[4] = 0;  // restarting at 0 would be right only for a request with nothing cached
  expect_error<ShapeError>([&] { check_positions(md, pos.data(), 8); },
                           {"position_ids[4] = 0", "request 300", "cached 62", "is 62"});
  expect_error<ShapeError>([&] { check_positions(md, pos.data(), 7); }, {"7 entries", "8 new tokens"});
}

TEST(BatchMetadata, LocalToGlobalIndices) {
  CacheManager m(cfg64());
  m.add_request(77);
  m.reserve(77, 64);  // block 0 is someone else's: every slot below is offset
  const std::vector<StepRequest> step = {{100, 0, 3}, {200, 40, 1}, {300, 62, 4}};
  reserve_step(m, step);  // 100: [1]; 200: [2]; 300: [3, 4]
  const BatchMetadata md = build_batch_metadata(m, step);
  constexpr int64_t K = 3;
  std::vector<int32_t> idx(md.num_tokens * K, -1);
  auto row = [&](int t) { return idx.data() + t * K; };
  row(0)[0] = 0;
  row(2)[0] = 2, row(2)[1] = 1, row(2)[2] = 0;
  row(3)[0] = 40, row(3)[1] = 0;
  row(7)[0] = 65, row(7)[1] = 63, row(7)[2] = 64;
  row(4)[2] = 62;
  std::vector<int32_t> expect(idx.size(), -1);
  auto erow = [&](int t) { return expect.data() + t * K; };
  erow(0)[0] = 64;
  erow(2)[0] = 66, erow(2)[1] = 65, erow(2)[2] = 64;
  erow(3)[0] = 128 + 40, erow(3)[1] = 128;
  erow(7)[0] = 4 * 64 + 1, erow(7)[1] = 3 * 64 + 63, erow(7)[2] = 4 * 64;
  erow(4)[2] = 3 * 64 + 62;

  // Out of range positions: nothing is converted.
  std::vector<int32_t> bad = idx;
  bad[0 * K + 1] = 1;  // token 0 sees only position 0
  expect_error<ShapeError>([&] { local_to_global_indices(md, bad.data(), K); }, {"[0, 1] = 1", "positions 0..0", "request 100"});
  EXPECT_EQ(bad[0], 0) << "a failed conversion must leave the indices untouched";
  bad = idx;
  bad[5 * K] = -2;
  expect_error<ShapeError>([&] { local_to_global_indices(md, bad.data(), K); }, {"[5, 0] = -2"});
  bad = idx;
  bad[7 * K] = 66;  // == visible_end: the first key it may not see
  expect_error<ShapeError>([&] { local_to_global_indices(md, bad.data(), K); }, {"[7, 0] = 66", "0..65"});

  local_to_global_indices(md, idx.data(), K);
  EXPECT_EQ(idx, expect);
}

TEST(RequestList, ParsesAndRejects) {
  auto v = parse_request_list("0:4096,32768:1,1024:2");
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[1].id, 1);
  EXPECT_EQ(v[1].cached, 32768);
  EXPECT_EQ(v[2].num_new, 2);
  expect_error<ConfigError>([] { parse_request_list("12"); }, {"no ':'"});
  expect_error<ConfigError>([] { parse_request_list("1:x"); }, {"'x' is not an integer"});
  expect_error<ConfigError>([] { parse_request_list("1:0"); }, {"at least one new token"});
  auto u = uniform_requests(4, 100, 2);
  ASSERT_EQ(u.size(), 4u);
  EXPECT_EQ(u[3].id, 3);
  EXPECT_EQ(u[3].cached, 100);
  expect_error<ConfigError>([] { uniform_requests(0, 0, 1); }, {"batch = 0"});
}
