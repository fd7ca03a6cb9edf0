// The per-stage reference functions (dsa/reference_stages.h): composed in
// run order they give ref::layer_forward's trace, output and cache bytes bit
// for bit, and run on a sample of a step's tokens (what the GPU check does)
// they give the sampled rows of the full step bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <ostream>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/error.h"
#include "dsa/reference.h"
#include "dsa/reference_stages.h"
#include "small_layer_config.h"

using namespace dsa;
using dsa::test::small_layer_config;

namespace {

std::vector<float> widen(const std::vector<bf16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = bf16_to_float(v[i]);
  return f;
}

std::vector<float> fp8_values(const std::vector<fp8_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = fp8_e4m3_to_float(v[i]);
  return f;
}

// Rows idx (each len long) of a [*, len] tensor.
template <class T>
std::vector<T> take(const std::vector<T>& v, const std::vector<int64_t>& idx, int64_t len) {
  std::vector<T> o(idx.size() * len);
  for (size_t i = 0; i < idx.size(); ++i) std::copy(v.begin() + idx[i] * len, v.begin() + (idx[i] + 1) * len, o.begin() + i * len);
  return o;
}

// A cache whose requests hold a prefilled context (the layer run over
// `cached` tokens of each request), then reserved for the step.
struct Step {
  LayerConfig cfg;
  ref::PreparedWeights pw;
  CacheManager cache;
  std::vector<StepRequest> step;
  BatchMetadata md;
  std::vector<bf16_t> hidden;
  Step(const LayerConfig& c, const std::vector<StepRequest>& reqs, uint64_t seed)
      : cfg(c), pw(ref::prepare_weights(c, generate_weights(c, seed))), cache(CacheConfig::for_step(c, reqs)), step(reqs) {
    cache.fill(0xFF);  // NaN wherever nobody wrote
    std::vector<StepRequest> prefix;
    for (const StepRequest& r : reqs)
      if (r.cached > 0) prefix.push_back(StepRequest{r.id, 0, r.cached});
    if (!prefix.empty()) {
      reserve_step(cache, prefix);
      const BatchMetadata pmd = build_batch_metadata(cache, prefix);
      TraceOptions none;
      none.intermediates = false;
      ref::layer_forward(pw, generate_hidden(cfg, pmd.num_tokens, seed + 1), pmd, cache, 0, none, nullptr, nullptr);
    }
    reserve_step(cache, reqs);
    md = build_batch_metadata(cache, reqs);
    hidden = generate_hidden(cfg, md.num_tokens, seed + 2);
  }
};

struct Variant {
  LatentCacheDType latent;
  bool o_proj;
  bool hadamard;
};
// Lets test listings show the variant's name instead of its bytes.
void PrintTo(const Variant& v, std::ostream* os) {
  *os << (v.latent == LatentCacheDType::FP8 ? "fp8" : "bf16") << (v.o_proj ? " o_proj" : "") << (v.hadamard ? "" : " no_hadamard");
}

class StageFunctions : public ::testing::TestWithParam<Variant> {
 protected:
  LayerConfig config() const {
    LayerConfig cfg = small_layer_config();
    cfg.kv_cache_dtype = GetParam().latent;
    cfg.o_proj = GetParam().o_proj;
    cfg.indexer_hadamard = GetParam().hadamard;
    return cfg;
  }
};

// Prefill, decode and next_n 2 in one step, two contexts longer than topk.
const std::vector<StepRequest> kStep = {{0, 0, 40}, {1, 100, 1}, {2, 70, 2}};

}  // namespace

TEST_P(StageFunctions, ComposedInRunOrderTheyAreLayerForwardBitForBit) {
  const LayerConfig cfg = config();
  Step a(cfg, kStep, 31), b(cfg, kStep, 31);
  TraceOptions opt;
  opt.logits = true;
  LayerTrace tr;
  const std::vector<float> want = ref::layer_forward(a.pw, a.hidden, a.md, a.cache, 0, opt, &tr, nullptr);

  const BatchMetadata& md = b.md;
  const ref::PreparedWeights& w = b.pw;
  const int64_t T = md.num_tokens, H = cfg.num_heads, nope = cfg.qk_nope_head_dim, rope = cfg.qk_rope_head_dim,
                dqk = cfg.qk_head_dim(), K = cfg.index_topk;
  const std::vector<float> x = widen(b.hidden);
  const ref::NormsOut n = ref::norms(w, ref::q_a_proj(w, x.data(), T).data(), ref::kv_a_proj(w, x.data(), T).data(), T);
  EXPECT_EQ(n.q_lat, tr.q_lat);
  EXPECT_EQ(n.c_kv, tr.c_kv);
  std::vector<float> q = ref::q_b_proj(w, n.q_lat.data(), T), k_pe = n.k_pe;
  ref::rope(cfg, md.positions.data(), T, q.data(), k_pe.data());
  EXPECT_EQ(k_pe, tr.k_pe);
  std::vector<float> q_nope, q_pe;
  for (int64_t r = 0; r < T * H; ++r) {
    q_nope.insert(q_nope.end(), q.begin() + r * dqk, q.begin() + r * dqk + nope);
    q_pe.insert(q_pe.end(), q.begin() + r * dqk + nope, q.begin() + (r + 1) * dqk);
  }
  EXPECT_EQ(q_nope, tr.q_nope);
  EXPECT_EQ(q_pe, tr.q_pe);
  ref::cache_append(cfg, b.cache.latent_pool(0), md.slot_mapping.data(), T, n.c_kv.data(), k_pe.data());

  std::vector<float> qi = ref::indexer_q_proj(w, n.q_lat.data(), T), ki = ref::indexer_k_proj(w, x.data(), T),
                     wts = ref::indexer_weights_proj(w, x.data(), T);
  const ref::IndexerQuantOut iq = ref::indexer_quant(cfg, md.positions.data(), T, qi.data(), ki.data(), wts.data());
  ref::write_indexer_keys(b.cache.indexer_pool(0), md.indexer_k_offset.data(), md.indexer_scale_offset.data(), T,
                          cfg.index_head_dim, iq.k8.data(), iq.k_scale.data());
  EXPECT_EQ(qi, tr.idx_q);
  EXPECT_EQ(ki, tr.idx_k);
  EXPECT_EQ(fp8_values(iq.q8), tr.idx_q_fp8);
  EXPECT_EQ(iq.q_scale, tr.idx_q_scale);
  EXPECT_EQ(fp8_values(iq.k8), tr.idx_k_fp8);
  EXPECT_EQ(iq.k_scale, tr.idx_k_scale);
  EXPECT_EQ(wts, tr.idx_weights);

  const int64_t S = md.max_seq_len();
  std::vector<float> logits(T * S);
  ref::indexer_logits(iq.q8.data(), wts.data(), b.cache.indexer_pool(0), md.block_table.data(), md.token_request.data(),
                      md.visible_end.data(), T, cfg.index_n_heads, md.max_blocks_per_request, cfg.tokens_per_block, S, logits.data());
  EXPECT_EQ(logits, tr.idx_logits);
  const ref::TopkOut sel = ref::topk(md, logits.data(), S, K);
  EXPECT_EQ(sel.local, tr.topk_local);
  EXPECT_EQ(sel.global, tr.topk_global);

  const std::vector<bf16_t> q_cat = ref::q_absorb(w, q.data(), dqk, q.data() + nope, dqk, T);
  EXPECT_EQ(widen(q_cat), tr.q_cat);
  // The trace's separate q_nope / q_pe give the same q_cat (the check's inputs).
  EXPECT_EQ(ref::q_absorb(w, tr.q_nope.data(), nope, tr.q_pe.data(), rope, T), q_cat);
  const ref::SelectedRows rows = ref::gather_selected_rows(cfg, b.cache.latent_pool(0), md.num_slots, sel.global.data(), T, K);
  const ref::AttentionOut attn = ref::sparse_mla(cfg, q_cat.data(), rows, T);
  EXPECT_EQ(widen(attn.out), tr.attn_out);
  EXPECT_EQ(attn.lse, tr.attn_lse);
  EXPECT_EQ(attn.max, tr.attn_max);
  std::vector<float> out = ref::v_up_proj(w, attn.out.data(), T);
  if (cfg.o_proj) out = ref::o_proj(w, out.data(), T);
  EXPECT_EQ(out, want);
  EXPECT_EQ(out, tr.output);

  // The same bytes in both caches, cached context and new tokens alike.
  EXPECT_EQ(0, std::memcmp(a.cache.latent_pool(0), b.cache.latent_pool(0), a.cache.latent_pool_bytes()));
  EXPECT_EQ(0, std::memcmp(a.cache.indexer_pool(0), b.cache.indexer_pool(0), a.cache.indexer_pool_bytes()));
}

// The GPU check runs each stage on a sample of tokens with their own
// positions; that is only a fair comparison if a token's result does not
// depend on which other tokens are in the call.
TEST_P(StageFunctions, OnSampledTokensTheyGiveTheFullStepsRows) {
  const LayerConfig cfg = config();
  Step s(cfg, kStep, 41);
  TraceOptions opt;
  opt.logits = true;
  LayerTrace tr;
  const std::vector<float> out = ref::layer_forward(s.pw, s.hidden, s.md, s.cache, 0, opt, &tr, nullptr);
  const BatchMetadata& md = s.md;
  const ref::PreparedWeights& w = s.pw;
  const int64_t T = md.num_tokens, H = cfg.num_heads, hs = cfg.hidden_size, qr = cfg.q_lora_rank, dkv = cfg.kv_lora_rank,
                rope = cfg.qk_rope_head_dim, nope = cfg.qk_nope_head_dim, dqk = cfg.qk_head_dim(), lat = cfg.latent_dim(),
                HI = cfg.index_n_heads, DI = cfg.index_head_dim, K = cfg.index_topk;
  const std::vector<int64_t> tok = {0, 17, 39, 40, T - 1};
  const int64_t N = static_cast<int64_t>(tok.size());
  std::vector<int32_t> pos(N);
  for (int64_t i = 0; i < N; ++i) pos[i] = md.positions[tok[i]];
  const std::vector<float> x = widen(take(s.hidden, tok, hs));

  const ref::NormsOut n = ref::norms(w, ref::q_a_proj(w, x.data(), N).data(), ref::kv_a_proj(w, x.data(), N).data(), N);
  EXPECT_EQ(n.q_lat, take(tr.q_lat, tok, qr));
  EXPECT_EQ(n.c_kv, take(tr.c_kv, tok, dkv));
  std::vector<float> k_pe = n.k_pe;
  ref::rope(cfg, pos.data(), N, nullptr, k_pe.data());
  EXPECT_EQ(k_pe, take(tr.k_pe, tok, rope));
  std::vector<float> q = ref::q_b_proj(w, n.q_lat.data(), N);
  ref::rope(cfg, pos.data(), N, q.data(), nullptr);
  const std::vector<float> want_nope = take(tr.q_nope, tok, H * nope), want_pe = take(tr.q_pe, tok, H * rope);
  for (int64_t r = 0; r < N * H; ++r) {
    ASSERT_TRUE(std::equal(q.begin() + r * dqk, q.begin() + r * dqk + nope, want_nope.begin() + r * nope)) << "row " << r;
    ASSERT_TRUE(std::equal(q.begin() + r * dqk + nope, q.begin() + (r + 1) * dqk, want_pe.begin() + r * rope)) << "row " << r;
  }

  std::vector<float> qi = ref::indexer_q_proj(w, n.q_lat.data(), N), ki = ref::indexer_k_proj(w, x.data(), N);
  ref::indexer_rotate(cfg, pos.data(), N, qi.data(), ki.data());
  EXPECT_EQ(qi, take(tr.idx_q, tok, HI * DI));
  EXPECT_EQ(ki, take(tr.idx_k, tok, DI));
  std::vector<float> wts = ref::indexer_weights_proj(w, x.data(), N);
  ref::fold_indexer_weights(cfg, N, take(tr.idx_q_scale, tok, HI).data(), wts.data());
  EXPECT_EQ(wts, take(tr.idx_weights, tok, HI));

  const std::vector<bf16_t> q_cat = ref::q_absorb(w, q.data(), dqk, q.data() + nope, dqk, N);
  EXPECT_EQ(widen(q_cat), take(tr.q_cat, tok, H * lat));
  const std::vector<int32_t> global = take(tr.topk_global, tok, K);
  const ref::SelectedRows rows = ref::gather_selected_rows(cfg, s.cache.latent_pool(0), md.num_slots, global.data(), N, K);
  const ref::AttentionOut attn = ref::sparse_mla(cfg, q_cat.data(), rows, N);
  EXPECT_EQ(widen(attn.out), take(tr.attn_out, tok, H * dkv));
  EXPECT_EQ(attn.lse, take(tr.attn_lse, tok, H));
  std::vector<float> o = ref::v_up_proj(w, attn.out.data(), N);
  if (cfg.o_proj) o = ref::o_proj(w, o.data(), N);
  EXPECT_EQ(o, take(out, tok, static_cast<int64_t>(out.size()) / T));
}

INSTANTIATE_TEST_SUITE_P(Variants, StageFunctions,
                         ::testing::Values(Variant{LatentCacheDType::BF16, false, true}, Variant{LatentCacheDType::FP8, true, true},
                                           Variant{LatentCacheDType::BF16, true, false}),
                         [](const ::testing::TestParamInfo<Variant>& i) {
                           return std::string(i.param.latent == LatentCacheDType::FP8 ? "fp8" : "bf16") +
                                  (i.param.o_proj ? "_o_proj" : "") + (i.param.hadamard ? "" : "_no_hadamard");
                         });

// Distinct valid slots become dense rows in ascending slot order; repeats
// share a row; -1 and slots outside the pool are invalid (-1).
TEST(StageFunctionsGather, DistinctSlotsAscendingAndInvalidEntries) {
  const LayerConfig cfg = small_layer_config();
  const int64_t slots = 8, lat = cfg.latent_dim(), dkv = cfg.kv_lora_rank;
  std::vector<uint8_t> pool(slots * cfg.latent_cache_bytes_per_token(), 0xFF);
  std::vector<float> c(dkv), k(cfg.qk_rope_head_dim);
  for (int64_t s = 0; s < slots; ++s) {
    std::fill(c.begin(), c.end(), float(s + 1));
    std::fill(k.begin(), k.end(), float(-(s + 1)));
    ref::write_latent_row(cfg, pool.data(), s, c.data(), k.data());
  }
  // Two tokens, k = 4.
  const std::vector<int32_t> global = {6, 2, -1, 6, 9, 2, 0, -5};
  const ref::SelectedRows r = ref::gather_selected_rows(cfg, pool.data(), slots, global.data(), 2, 4);
  ASSERT_EQ(r.count, 3);  // slots 0, 2, 6
  EXPECT_EQ(r.indices, (std::vector<int32_t>{2, 1, -1, 2, -1, 1, 0, -1}));
  ASSERT_EQ(r.rows.size(), size_t(3 * lat));
  EXPECT_EQ(r.rows[0 * lat], 1.0f);
  EXPECT_EQ(r.rows[1 * lat], 3.0f);
  EXPECT_EQ(r.rows[2 * lat], 7.0f);
  EXPECT_EQ(r.rows[2 * lat + dkv], -7.0f);
  // Nothing selected: no rows, and attention gives output 0 and lse +inf.
  const std::vector<int32_t> none(cfg.index_topk, -1);
  const ref::SelectedRows e = ref::gather_selected_rows(cfg, pool.data(), slots, none.data(), 1, cfg.index_topk);
  EXPECT_EQ(e.count, 0);
  const std::vector<bf16_t> q_cat(cfg.num_heads * lat, float_to_bf16(1.0f));
  const ref::AttentionOut a = ref::sparse_mla(cfg, q_cat.data(), e, 1);
  for (bf16_t v : a.out) ASSERT_EQ(bf16_to_float(v), 0.0f);
  for (float v : a.lse) ASSERT_EQ(v, std::numeric_limits<float>::infinity());
  // Indices for another token count are a shape error.
  EXPECT_THROW(ref::sparse_mla(cfg, q_cat.data(), r, 1), ShapeError);
}

TEST(StageFunctionsOProj, NeedsWeightsPreparedWithOProj) {
  LayerConfig cfg = small_layer_config();
  cfg.o_proj = false;
  const ref::PreparedWeights pw = ref::prepare_weights(cfg, generate_weights(cfg, 3));
  const std::vector<float> v(cfg.num_heads * cfg.v_head_dim, 1.0f);
  EXPECT_THROW(ref::o_proj(pw, v.data(), 1), ConfigError);
}
