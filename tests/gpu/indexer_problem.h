#pragma once
// The paged indexer inputs of the GPU indexer-logits tests (test_indexer*.cpp),
// built by hand on the host: shuffled block ids, and NaN in every slot no
// request owns (whole unused blocks and the tail of each request's last
// block: e4m3fn 0x7f is NaN, 0xffffffff an fp32 NaN scale), so a stray read
// shows up as NaN in the output. New token i of a request sees cached + i + 1
// keys. Also the comparison against the reference and the device copies.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/indexer/params.h"
#include "dev_buf.h"
#include "dsa/dtypes.h"
#include "dsa/layer_check.h"
#include "dsa/reference.h"

namespace dsa::test::indexer {

constexpr int64_t kHeads = 64, kDim = 128, kTpb = 64, kBlockBytes = kTpb * (kDim + 4);

// One request: `cached` keys already in the cache, `num_new` query tokens
// (whose keys are in the cache too, as the layer appends them first).
struct Req {
  int64_t cached, num_new;
};

struct Problem {
  int64_t T = 0, R = 0, max_blocks = 0, stride = 0, num_blocks = 0;
  std::vector<dsa::fp8_t> q;
  std::vector<float> w;
  std::vector<uint8_t> cache;
  std::vector<int32_t> block_table, token_request, visible_end;

  // dsa::ref::indexer_logits on these inputs: [T, stride] fp32.
  std::vector<float> reference() const {
    std::vector<float> ref(static_cast<size_t>(T * stride));
    dsa::ref::indexer_logits(q.data(), w.data(), cache.data(), block_table.data(), token_request.data(),
                             visible_end.data(), T, kHeads, max_blocks, kTpb, stride, ref.data());
    return ref;
  }
};

// extra_stride: logits columns beyond the longest context (must be -inf);
// unowned_blocks: cache blocks no request owns; spare_table_columns: block
// table columns of -1 past every request's last block (never read).
inline Problem make_problem(const std::vector<Req>& reqs, int64_t extra_stride, uint64_t seed,
                            int64_t unowned_blocks = 3, int64_t spare_table_columns = 0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::uniform_int_distribution<int> exp2(-3, 3);
  Problem pb;
  pb.R = static_cast<int64_t>(reqs.size());
  int64_t max_seq = 0, used_blocks = 0;
  for (const Req& r : reqs) {
    const int64_t seq = r.cached + r.num_new;
    max_seq = std::max(max_seq, seq);
    pb.max_blocks = std::max(pb.max_blocks, (seq + kTpb - 1) / kTpb);
    used_blocks += (seq + kTpb - 1) / kTpb;
    pb.T += r.num_new;
  }
  pb.max_blocks += spare_table_columns;
  pb.stride = max_seq + extra_stride;
  pb.num_blocks = used_blocks + unowned_blocks;
  std::vector<int32_t> ids(static_cast<size_t>(pb.num_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), gen);  // block tables out of order

  pb.cache.assign(static_cast<size_t>(pb.num_blocks * kBlockBytes), 0x7f);
  for (int64_t b = 0; b < pb.num_blocks; ++b) std::memset(pb.cache.data() + b * kBlockBytes + kTpb * kDim, 0xff, kTpb * 4);
  pb.block_table.assign(static_cast<size_t>(pb.R * pb.max_blocks), -1);
  size_t next = 0;
  for (int64_t r = 0; r < pb.R; ++r) {
    const int64_t seq = reqs[r].cached + reqs[r].num_new;
    for (int64_t b = 0; b < (seq + kTpb - 1) / kTpb; ++b) pb.block_table[r * pb.max_blocks + b] = ids[next++];
    for (int64_t s = 0; s < seq; ++s) {
      uint8_t* blk = pb.cache.data() + static_cast<int64_t>(pb.block_table[r * pb.max_blocks + s / kTpb]) * kBlockBytes;
      for (int64_t i = 0; i < kDim; ++i) blk[(s % kTpb) * kDim + i] = dsa::float_to_fp8_e4m3(2.f * normal(gen));
      const float scale = std::ldexp(1.f, exp2(gen));
      std::memcpy(blk + kTpb * kDim + (s % kTpb) * 4, &scale, 4);
    }
    for (int64_t i = 0; i < reqs[r].num_new; ++i) {
      pb.token_request.push_back(static_cast<int32_t>(r));
      pb.visible_end.push_back(static_cast<int32_t>(reqs[r].cached + i + 1));
    }
  }
  pb.q.resize(static_cast<size_t>(pb.T * kHeads * kDim));
  for (auto& v : pb.q) v = dsa::float_to_fp8_e4m3(2.f * normal(gen));
  pb.w.resize(static_cast<size_t>(pb.T * kHeads));
  for (auto& v : pb.w) v = uni(gen);
  return pb;
}

inline int max_num_new(const std::vector<Req>& reqs) {
  int m = 0;
  for (const Req& r : reqs) m = std::max(m, static_cast<int>(r.num_new));
  return m;
}

// out against ref: dsa::check::compare's figures (rel L2 over the finite
// entries, NaN on either side, entries where either side is infinite and they
// differ, the worst entry), and how many entries differ in their bits.
struct Compare {
  double rel = 0;
  int64_t inf_mismatch = 0, nan = 0, worst = -1, bits_differ = 0;
};

inline Compare compare(const std::vector<float>& out, const std::vector<float>& ref) {
  const dsa::check::Diff d = dsa::check::compare(out.data(), ref.data(), static_cast<int64_t>(out.size()));
  Compare c;
  c.rel = d.err;
  c.inf_mismatch = d.inf_mismatch;
  c.nan = d.nan;
  c.worst = d.worst;
  for (size_t i = 0; i < out.size(); ++i)
    if (std::memcmp(&out[i], &ref[i], 4) != 0) ++c.bits_differ;
  return c;
}

// Device copies of a problem, and the params that point at them.
struct DeviceProblem {
  DevBuf<uint8_t> q, cache;
  DevBuf<float> w, logits;
  DevBuf<int32_t> bt, treq, vend;
  explicit DeviceProblem(const Problem& pb)
      : q(pb.q.size()),
        cache(pb.cache.size()),
        w(pb.w.size()),
        logits(static_cast<size_t>(pb.T * pb.stride)),
        bt(pb.block_table.size()),
        treq(pb.token_request.size()),
        vend(pb.visible_end.size()) {}

  // Fatal gtest failure when an allocation or a copy failed (ASSERT_NO_FATAL_FAILURE).
  void upload(const Problem& pb) {
    ASSERT_TRUE(q.p && cache.p && w.p && logits.p && bt.p && treq.p && vend.p) << "cudaMalloc failed";
    ASSERT_EQ(cudaMemcpy(q.p, pb.q.data(), q.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(cache.p, pb.cache.data(), cache.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(w.p, pb.w.data(), w.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(bt.p, pb.block_table.data(), bt.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(treq.p, pb.token_request.data(), treq.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(vend.p, pb.visible_end.data(), vend.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  }

  // max_tokens_per_request: the hint handed to the kernels (0: none).
  dsa::cuda::IndexerLogitsParams params(const Problem& pb, int max_tokens_per_request) const {
    dsa::cuda::IndexerLogitsParams p;
    p.q_fp8 = q.p;
    p.weights = w.p;
    p.k_cache = cache.p;
    p.block_table = bt.p;
    p.token_request = treq.p;
    p.visible_end = vend.p;
    p.logits = logits.p;
    p.T = pb.T;
    p.logits_stride = pb.stride;
    p.max_blocks_per_request = pb.max_blocks;
    p.max_tokens_per_request = max_tokens_per_request;
    return p;
  }
};

}  // namespace dsa::test::indexer
