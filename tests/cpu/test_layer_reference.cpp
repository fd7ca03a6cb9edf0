// Invariants of the reference layer at small dimensions (issue 3): a float64
// dense-attention known answer, chunked prefill, decode after prefill, request
// order, H = 64 and 128, the fp8 latent cache, and what lands in the caches.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/error.h"
#include "dsa/reference.h"
#include "dsa/stages.h"
#include "small_layer_config.h"

using namespace dsa;
using dsa::test::small_layer_config;

namespace {

// One step on a fresh (or given) cache. hidden rows are in request order.
struct Runner {
  LayerConfig cfg;
  LayerWeights w;
  CacheManager cache;
  Runner(const LayerConfig& c, uint64_t seed, int64_t tokens = 1024)
      : cfg(c), w(generate_weights(c, seed)), cache(CacheConfig::for_layer(c).with_tokens(tokens)) {
    cache.fill(0xFF);  // NaN everywhere nobody wrote: stray reads poison the output
  }
  std::vector<float> step(const std::vector<StepRequest>& reqs, const std::vector<bf16_t>& hidden, LayerTrace* tr = nullptr,
                          std::vector<std::pair<std::string, double>>* ms = nullptr) {
    reserve_step(cache, reqs);
    const BatchMetadata md = build_batch_metadata(cache, reqs);
    return ref::layer_forward(cfg, w, hidden, md, cache, 0, TraceOptions{}, tr, ms);
  }
};

// Rows [r0, r1) of a [T, width] matrix.
template <class V>
V rows(const V& v, int64_t width, int64_t r0, int64_t r1) {
  return V(v.begin() + r0 * width, v.begin() + r1 * width);
}

double rel(const std::vector<float>& a, const std::vector<double>& b) {
  double n = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    n += (a[i] - b[i]) * (a[i] - b[i]);
    d += b[i] * b[i];
  }
  return std::sqrt(n / d);
}

std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

}  // namespace

// With top-k >= every visible key, sparse attention selects everything, so the
// layer equals plain causal MLA computed the unabsorbed way (k_nope and v
// expanded per head from c_kv) in float64. Checks the absorption, the RoPE
// placement, the softmax scale and the cache round trip in one known answer.
class LayerDense : public ::testing::TestWithParam<int64_t> {};

TEST_P(LayerDense, MatchesFloat64DenseMlaWhenTopkCoversEverything) {
  const LayerConfig cfg = small_layer_config(GetParam());
  const int64_t T = 40, H = cfg.num_heads, nope = cfg.qk_nope_head_dim, rope = cfg.qk_rope_head_dim, dkv = cfg.kv_lora_rank,
                dv = cfg.v_head_dim, dqk = cfg.qk_head_dim();
  Runner run(cfg, 21);
  const auto hidden = generate_hidden(cfg, T, 22);
  LayerTrace tr;
  const auto out = run.step({{0, 0, T}}, hidden, &tr);
  ASSERT_EQ(out.size(), size_t(T * H * dv));
  // Inputs of attention as the layer rounded them (each stage has its own test).
  std::vector<double> ref(T * H * dv, 0.0);
  std::vector<float> wkvb(run.w.kv_b_proj.size());
  for (size_t i = 0; i < wkvb.size(); ++i) wkvb[i] = bf16_to_float(run.w.kv_b_proj[i]);
  for (int64_t h = 0; h < H; ++h) {
    const float* wuk = wkvb.data() + h * (nope + dv) * dkv;
    const float* wuv = wuk + nope * dkv;
    // k_nope[s] = W_UK c_kv[s], v[s] = W_UV c_kv[s].
    std::vector<double> kn(T * nope), vv(T * dv);
    for (int64_t s = 0; s < T; ++s) {
      for (int64_t i = 0; i < nope; ++i) {
        double a = 0;
        for (int64_t c = 0; c < dkv; ++c) a += double(wuk[i * dkv + c]) * tr.c_kv[s * dkv + c];
        kn[s * nope + i] = a;
      }
      for (int64_t i = 0; i < dv; ++i) {
        double a = 0;
        for (int64_t c = 0; c < dkv; ++c) a += double(wuv[i * dkv + c]) * tr.c_kv[s * dkv + c];
        vv[s * dv + i] = a;
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> sc(t + 1);
      double m = -INFINITY;
      for (int64_t s = 0; s <= t; ++s) {
        double a = 0;
        for (int64_t i = 0; i < nope; ++i) a += double(tr.q_nope[(t * H + h) * nope + i]) * kn[s * nope + i];
        for (int64_t i = 0; i < rope; ++i) a += double(tr.q_pe[(t * H + h) * rope + i]) * tr.k_pe[s * rope + i];
        sc[s] = a / std::sqrt(double(dqk)) * std::pow(cfg.yarn_mscale(), 2);
        m = std::max(m, sc[s]);
      }
      double sum = 0;
      for (auto& x : sc) sum += (x = std::exp(x - m));
      for (int64_t s = 0; s <= t; ++s)
        for (int64_t i = 0; i < dv; ++i) ref[(t * H + h) * dv + i] += sc[s] / sum * vv[s * dv + i];
    }
  }
  EXPECT_LT(rel(out, ref), 1e-2);  // ~2.5e-3: bf16 rounding of q_cat, the attention output and v
  // Every query selects exactly its visible keys, in position order.
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < cfg.index_topk; ++j) EXPECT_EQ(tr.topk_local[t * cfg.index_topk + j], j <= t ? j : -1);
  }
}

INSTANTIATE_TEST_SUITE_P(Heads, LayerDense, ::testing::Values(64, 128));

TEST(LayerReference, StagesAreNamedAndOrderedLikeTheGpuBackend) {
  LayerConfig cfg = small_layer_config();
  cfg.o_proj = true;
  Runner run(cfg, 1);
  std::vector<std::pair<std::string, double>> ms;
  const auto out = run.step({{0, 0, 8}}, generate_hidden(cfg, 8, 2), nullptr, &ms);
  EXPECT_EQ(out.size(), size_t(8 * cfg.hidden_size));
  std::vector<std::string> names;
  for (auto& [n, t] : ms) {
    names.push_back(n);
    EXPECT_GE(t, 0.0);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"q_a_proj", "kv_a_proj", "norms", "q_b_proj", "rope", "cache_append", "indexer_q_proj",
                                             "indexer_k_proj", "indexer_weights_proj", "indexer_quant", "indexer_logits", "topk",
                                             "q_absorb", "sparse_mla", "v_up_proj", "o_proj"}));
  // ... which is the shared stage list's order for the unfused projections.
  std::vector<std::string> registry;
  for (Stage st : layer_stages(cfg, /*fused_x_projection=*/false)) registry.push_back(stage_name(st));
  EXPECT_EQ(names, registry);
  for (float v : out) {
    ASSERT_TRUE(std::isfinite(v));
    ASSERT_EQ(v, round_bf16(v));
  }
}

TEST(LayerReference, TwoChunksEqualOneStep) {
  const LayerConfig cfg = small_layer_config();
  const int64_t T = 150, W = cfg.num_heads * cfg.v_head_dim;
  const auto hidden = generate_hidden(cfg, T, 5);
  Runner one(cfg, 3), two(cfg, 3);
  LayerTrace t1, t2;
  const auto full = one.step({{7, 0, T}}, hidden, &t1);
  const auto a = two.step({{7, 0, 90}}, rows(hidden, cfg.hidden_size, 0, 90));
  const auto b = two.step({{7, 90, T - 90}}, rows(hidden, cfg.hidden_size, 90, T), &t2);
  EXPECT_EQ(a, rows(full, W, 0, 90));
  EXPECT_EQ(b, rows(full, W, 90, T));
  EXPECT_EQ(t2.topk_local, rows(t1.topk_local, cfg.index_topk, 90, T));
  // Top-k really selected (visible keys exceed k for these tokens).
  EXPECT_EQ(std::count(t2.topk_local.begin(), t2.topk_local.end(), -1), 0);
}

TEST(LayerReference, DecodeAfterPrefillEqualsLastTokenOfFullPrefill) {
  const LayerConfig cfg = small_layer_config();
  const int64_t T = 130, W = cfg.num_heads * cfg.v_head_dim;
  const auto hidden = generate_hidden(cfg, T, 6);
  Runner full(cfg, 4), inc(cfg, 4);
  const auto ref = full.step({{1, 0, T}}, hidden);
  inc.step({{1, 0, T - 2}}, rows(hidden, cfg.hidden_size, 0, T - 2));
  const auto d1 = inc.step({{1, T - 2, 1}}, rows(hidden, cfg.hidden_size, T - 2, T - 1));
  const auto d2 = inc.step({{1, T - 1, 1}}, rows(hidden, cfg.hidden_size, T - 1, T));
  EXPECT_EQ(d1, rows(ref, W, T - 2, T - 1));
  EXPECT_EQ(d2, rows(ref, W, T - 1, T));
}

TEST(LayerReference, ReorderingRequestsReordersOutputsOnly) {
  const LayerConfig cfg = small_layer_config();
  const int64_t W = cfg.num_heads * cfg.v_head_dim, hs = cfg.hidden_size;
  const auto ha = generate_hidden(cfg, 70, 8), hb = generate_hidden(cfg, 100, 9), hc = generate_hidden(cfg, 3, 10);
  auto cat = [](std::initializer_list<const std::vector<bf16_t>*> parts) {
    std::vector<bf16_t> v;
    for (auto* p : parts) v.insert(v.end(), p->begin(), p->end());
    return v;
  };
  Runner x(cfg, 11), y(cfg, 11);
  // Request 2 decodes 3 speculative tokens after a 60-token prefix of its own.
  const auto prefix = generate_hidden(cfg, 60, 12);
  x.step({{2, 0, 60}}, prefix);
  y.step({{2, 0, 60}}, prefix);
  const auto o1 = x.step({{0, 0, 70}, {1, 0, 100}, {2, 60, 3}}, cat({&ha, &hb, &hc}));
  const auto o2 = y.step({{2, 60, 3}, {1, 0, 100}, {0, 0, 70}}, cat({&hc, &hb, &ha}));
  EXPECT_EQ(rows(o1, W, 0, 70), rows(o2, W, 103, 173));
  EXPECT_EQ(rows(o1, W, 70, 170), rows(o2, W, 3, 103));
  EXPECT_EQ(rows(o1, W, 170, 173), rows(o2, W, 0, 3));
  (void)hs;
}

TEST(LayerReference, CachesHoldWhatTheStepWrote) {
  for (auto dt : {LatentCacheDType::BF16, LatentCacheDType::FP8}) {
    LayerConfig cfg = small_layer_config();
    cfg.kv_cache_dtype = dt;
    Runner run(cfg, 13);
    const int64_t T = 20, dkv = cfg.kv_lora_rank, rope = cfg.qk_rope_head_dim;
    LayerTrace tr;
    const std::vector<StepRequest> reqs = {{5, 0, T}};
    run.step(reqs, generate_hidden(cfg, T, 14), &tr);
    const BatchMetadata md = build_batch_metadata(run.cache, reqs);
    std::vector<float> row(dkv + rope);
    for (int64_t t = 0; t < T; ++t) {
      ref::read_latent_row(cfg, run.cache.latent_pool(0), md.slot_mapping[t], row.data());
      for (int64_t i = 0; i < rope; ++i) ASSERT_EQ(row[dkv + i], tr.k_pe[t * rope + i]);
      for (int64_t i = 0; i < dkv; ++i) {
        const float want = tr.c_kv[t * dkv + i];
        if (dt == LatentCacheDType::BF16) {
          ASSERT_EQ(row[i], want);
        } else {
          ASSERT_NEAR(row[i], want, std::fabs(want) * 0.0625 + 1e-3) << t << " " << i;
        }
      }
      const uint8_t* ip = run.cache.indexer_pool(0);
      float s;
      std::memcpy(&s, ip + md.indexer_scale_offset[t], 4);
      EXPECT_EQ(s, tr.idx_k_scale[t]);
      for (int64_t i = 0; i < 128; ++i) ASSERT_EQ(fp8_e4m3_to_float(ip[md.indexer_k_offset[t] + i]), tr.idx_k_fp8[t * 128 + i]);
    }
    if (dt == LatentCacheDType::FP8) {
      // The fp8 form changes the layer's output by about e4m3's rounding, no more.
      LayerConfig c16 = cfg;
      c16.kv_cache_dtype = LatentCacheDType::BF16;
      Runner r16(c16, 13);
      LayerTrace t16;
      const auto o16 = r16.step(reqs, generate_hidden(cfg, T, 14), &t16);
      EXPECT_LT(rel(tr.output, to_double(o16)), 5e-2);
      EXPECT_GT(rel(tr.output, to_double(o16)), 0.0);
    }
  }
}

TEST(LayerReference, RejectsMismatchedInputs) {
  const LayerConfig cfg = small_layer_config();
  Runner run(cfg, 15);
  const std::vector<StepRequest> reqs = {{0, 0, 4}};
  reserve_step(run.cache, reqs);
  const BatchMetadata md = build_batch_metadata(run.cache, reqs);
  const auto hidden = generate_hidden(cfg, 4, 16);
  EXPECT_THROW(ref::layer_forward(cfg, run.w, rows(hidden, cfg.hidden_size, 0, 3), md, run.cache, 0, {}, nullptr, nullptr),
               ShapeError);
  // Positions come from the metadata; one whose per-token vectors disagree with its token count is rejected.
  BatchMetadata short_md = md;
  short_md.positions.pop_back();
  EXPECT_THROW(ref::layer_forward(cfg, run.w, hidden, short_md, run.cache, 0, {}, nullptr, nullptr), ShapeError);
  LayerConfig other = cfg;
  other.num_heads = 128;
  EXPECT_THROW(ref::layer_forward(other, run.w, hidden, md, run.cache, 0, {}, nullptr, nullptr), ShapeError);
}

TEST(LayerReference, PreparedWeightsGiveTheSameBits) {
  LayerConfig cfg = small_layer_config(128);
  cfg.o_proj = true;
  Runner a(cfg, 17), b(cfg, 17);
  const std::vector<StepRequest> reqs = {{0, 0, 30}};
  const auto hidden = generate_hidden(cfg, 30, 18);
  const auto want = a.step(reqs, hidden);
  const ref::PreparedWeights pw = ref::prepare_weights(cfg, b.w);
  reserve_step(b.cache, reqs);
  const BatchMetadata md = build_batch_metadata(b.cache, reqs);
  EXPECT_EQ(ref::layer_forward(pw, hidden, md, b.cache, 0, {}, nullptr, nullptr), want);
}
