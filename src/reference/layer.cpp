// The whole layer on the CPU (spec section 3): the stages of stages.cpp in
// run order, reading and writing the paged caches the way the GPU backend
// does so that both can be compared stage by stage.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "dsa/cache.h"
#include "dsa/error.h"
#include "dsa/reference.h"
#include "dsa/reference_stages.h"
#include "dsa/stages.h"
#include "internal.h"

namespace dsa::ref {

namespace {

std::vector<float> to_float(const std::vector<bf16_t>& v) {
  std::vector<float> f(v.size());
#pragma omp parallel for schedule(static) if (v.size() >= 65536)
  for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i) f[i] = bf16_to_float(v[i]);
  return f;
}

class StageTimer {
 public:
  explicit StageTimer(std::vector<std::pair<std::string, double>>* out) : out_(out), t0_(std::chrono::steady_clock::now()) {}
  // Closes stage s (named as dsa/stages.h names it) and starts the next one.
  void mark(Stage s) {
    const auto now = std::chrono::steady_clock::now();
    if (out_) out_->emplace_back(stage_name(s), std::chrono::duration<double, std::milli>(now - t0_).count());
    t0_ = now;
  }

 private:
  std::vector<std::pair<std::string, double>>* out_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace

void write_latent_row(const LayerConfig& cfg, uint8_t* pool, int64_t slot, const float* c_kv, const float* k_pe) {
  const int64_t dkv = cfg.kv_lora_rank, rope = cfg.qk_rope_head_dim;
  if (cfg.kv_cache_dtype == LatentCacheDType::BF16) {
    bf16_t* dst = reinterpret_cast<bf16_t*>(pool + slot * 2 * (dkv + rope));
    for (int64_t i = 0; i < dkv; ++i) dst[i] = float_to_bf16(c_kv[i]);
    for (int64_t i = 0; i < rope; ++i) dst[dkv + i] = float_to_bf16(k_pe[i]);
    return;
  }
  const int64_t groups = dkv / 128;
  uint8_t* dst = pool + slot * (dkv + 4 * groups + 2 * rope);
  std::vector<float> scales(static_cast<size_t>(groups));
  quantize_fp8_blocks(c_kv, groups, 128, dst, scales.data());
  std::memcpy(dst + dkv, scales.data(), 4 * groups);
  for (int64_t i = 0; i < rope; ++i) {
    const bf16_t b = float_to_bf16(k_pe[i]);
    std::memcpy(dst + dkv + 4 * groups + 2 * i, &b, 2);
  }
}

void read_latent_row(const LayerConfig& cfg, const uint8_t* pool, int64_t slot, float* row) {
  const int64_t dkv = cfg.kv_lora_rank, rope = cfg.qk_rope_head_dim;
  if (cfg.kv_cache_dtype == LatentCacheDType::BF16) {
    const uint8_t* src = pool + slot * 2 * (dkv + rope);
    for (int64_t i = 0; i < dkv + rope; ++i) {
      bf16_t b;
      std::memcpy(&b, src + 2 * i, 2);
      row[i] = bf16_to_float(b);
    }
    return;
  }
  const int64_t groups = dkv / 128;
  const uint8_t* src = pool + slot * (dkv + 4 * groups + 2 * rope);
  const float* lut = detail::fp8_lut();
  for (int64_t g = 0; g < groups; ++g) {
    float s;
    std::memcpy(&s, src + dkv + 4 * g, 4);
    for (int64_t i = 0; i < 128; ++i) row[g * 128 + i] = lut[src[g * 128 + i]] * s;
  }
  for (int64_t i = 0; i < rope; ++i) {
    bf16_t b;
    std::memcpy(&b, src + dkv + 4 * groups + 2 * i, 2);
    row[dkv + i] = bf16_to_float(b);
  }
}

PreparedWeights prepare_weights(const LayerConfig& cfg, const LayerWeights& w) {
  validate(cfg);
  check_weights(cfg, w);
  PreparedWeights p;
  p.cfg = cfg;
  p.q_a_proj = to_float(w.q_a_proj);
  p.q_a_layernorm = to_float(w.q_a_layernorm);
  p.q_b_proj = to_float(w.q_b_proj);
  p.kv_a_proj_with_mqa = to_float(w.kv_a_proj_with_mqa);
  p.kv_a_layernorm = to_float(w.kv_a_layernorm);
  p.kv_b_proj = to_float(w.kv_b_proj);
  if (cfg.o_proj) p.o_proj = to_float(w.o_proj);
  p.idx_wq_b = to_float(w.idx_wq_b);
  p.idx_wk = to_float(w.idx_wk);
  p.idx_k_norm_weight = to_float(w.idx_k_norm_weight);
  p.idx_k_norm_bias = to_float(w.idx_k_norm_bias);
  p.idx_weights_proj = to_float(w.idx_weights_proj);
  return p;
}

std::vector<float> layer_forward(const LayerConfig& cfg, const LayerWeights& w, const std::vector<bf16_t>& hidden,
                                 const BatchMetadata& md, CacheManager& cache, int64_t layer, const TraceOptions& opt,
                                 LayerTrace* trace, std::vector<std::pair<std::string, double>>* stage_ms) {
  return layer_forward(prepare_weights(cfg, w), hidden, md, cache, layer, opt, trace, stage_ms);
}

std::vector<float> layer_forward(const PreparedWeights& pw, const std::vector<bf16_t>& hidden, const BatchMetadata& md,
                                 CacheManager& cache, int64_t layer, const TraceOptions& opt, LayerTrace* trace,
                                 std::vector<std::pair<std::string, double>>* stage_ms) {
  const LayerConfig& cfg = pw.cfg;
  validate(cfg);
  const int64_t T = md.num_tokens, hs = cfg.hidden_size, H = cfg.num_heads, dkv = cfg.kv_lora_rank, rope_dim = cfg.qk_rope_head_dim,
                nope = cfg.qk_nope_head_dim, dqk = cfg.qk_head_dim(), DI = cfg.index_head_dim, K = cfg.index_topk;
  if (static_cast<int64_t>(hidden.size()) != T * hs) {
    throw ShapeError(fmt::format("layer_forward: hidden has {} values but the step has {} tokens x hidden_size {} = {}; pass "
                                 "[T, hidden_size] bf16 in the metadata's token order",
                                 hidden.size(), T, hs, T * hs));
  }
  const CacheConfig& cc = cache.config();
  if (cc.storage != Storage::Host) {
    throw CacheError("layer_forward (CPU reference) needs a cache with Storage::Host; copy a device cache's pools to a host "
                     "CacheManager first (cuda::copy_pools)");
  }
  if (cc.latent_dtype != cfg.kv_cache_dtype || cc.tokens_per_block != cfg.tokens_per_block || cc.kv_lora_rank != dkv ||
      cc.rope_dim != rope_dim || cc.index_head_dim != DI) {
    throw ConfigError(fmt::format("layer_forward: the cache (latent {}, {} tokens per block, kv_lora_rank {}, rope {}, index head "
                                  "dim {}) does not match the layer configuration (latent {}, {}, {}, {}, {}); build it with "
                                  "CacheConfig::for_layer(cfg)",
                                  to_string(cc.latent_dtype), cc.tokens_per_block, cc.kv_lora_rank, cc.rope_dim,
                                  cc.index_head_dim, to_string(cfg.kv_cache_dtype), cfg.tokens_per_block, dkv, rope_dim, DI));
  }
  if (md.tokens_per_block != cfg.tokens_per_block || md.num_slots != cc.capacity_tokens()) {
    throw ShapeError("layer_forward: the batch metadata was built for another cache; rebuild it with build_batch_metadata(cache, ...)");
  }
  // The positions are the metadata's own: only a hand-edited metadata can
  // disagree with its token count.
  for (const auto* v : {&md.positions, &md.visible_end, &md.token_request}) {
    if (static_cast<int64_t>(v->size()) != T) {
      throw ShapeError(fmt::format("layer_forward: the batch metadata has {} new tokens but per-token vectors of {} entries; "
                                   "rebuild it with build_batch_metadata(cache, ...)",
                                   T, v->size()));
    }
  }
  if (DI != 128) throw ConfigError(fmt::format("index_head_dim {} is not supported: the Hadamard rotation and fp8 blocks are 128 wide", DI));
  for (int64_t t = 0; t < T; ++t) {
    if (md.slot_mapping[t] < 0 || md.slot_mapping[t] >= md.num_slots) {
      throw ShapeError(fmt::format("layer_forward: token {} maps to slot {}, outside the cache's {} slots", t, md.slot_mapping[t], md.num_slots));
    }
  }

  const bool keep = trace && opt.intermediates;
  if (trace) *trace = LayerTrace{};
  StageTimer timer(stage_ms);
  const std::vector<float> x = to_float(hidden);
  const int32_t* positions = md.positions.data();

  // 1. Down projections and norms.
  const std::vector<float> q_a = q_a_proj(pw, x.data(), T);
  timer.mark(Stage::q_a_proj);
  const std::vector<float> kv = kv_a_proj(pw, x.data(), T);
  timer.mark(Stage::kv_a_proj);
  NormsOut n = norms(pw, q_a.data(), kv.data(), T);
  const std::vector<float>& q_lat = n.q_lat;
  const std::vector<float>& c_kv = n.c_kv;
  std::vector<float>& k_pe = n.k_pe;
  timer.mark(Stage::norms);

  // 2. Query up projection, then MLA RoPE on q_pe of every head and on k_pe.
  std::vector<float> q = q_b_proj(pw, q_lat.data(), T);
  timer.mark(Stage::q_b_proj);
  rope(cfg, positions, T, q.data(), k_pe.data());
  timer.mark(Stage::rope);

  // 3. Latent cache append.
  uint8_t* latent_pool = cache.latent_pool(layer);
  cache_append(cfg, latent_pool, md.slot_mapping.data(), T, c_kv.data(), k_pe.data());
  timer.mark(Stage::cache_append);

  // 4. Indexer.
  std::vector<float> qi = indexer_q_proj(pw, q_lat.data(), T);
  timer.mark(Stage::indexer_q_proj);
  std::vector<float> ki = indexer_k_proj(pw, x.data(), T);
  timer.mark(Stage::indexer_k_proj);
  std::vector<float> wts = indexer_weights_proj(pw, x.data(), T);
  timer.mark(Stage::indexer_weights_proj);
  const IndexerQuantOut iq = indexer_quant(cfg, positions, T, qi.data(), ki.data(), wts.data());
  write_indexer_keys(cache.indexer_pool(layer), md.indexer_k_offset.data(), md.indexer_scale_offset.data(), T, DI, iq.k8.data(),
                     iq.k_scale.data());
  timer.mark(Stage::indexer_quant);
  const int64_t S = std::max<int64_t>(md.max_seq_len(), 1);
  std::vector<float> logits(static_cast<size_t>(T * S));
  indexer_logits(iq.q8.data(), wts.data(), cache.indexer_pool(layer), md.block_table.data(), md.token_request.data(),
                 md.visible_end.data(), T, cfg.index_n_heads, md.max_blocks_per_request, cfg.tokens_per_block, S, logits.data());
  timer.mark(Stage::indexer_logits);
  TopkOut sel = topk(md, logits.data(), S, K);
  timer.mark(Stage::topk);
  if (trace && opt.logits) trace->idx_logits = std::move(logits);
  std::vector<float>().swap(logits);

  // 5. Absorbed attention over the latent rows the indexer selected.
  const std::vector<bf16_t> q_cat = q_absorb(pw, q.data(), dqk, q.data() + nope, dqk, T);
  timer.mark(Stage::q_absorb);
  AttentionOut attn;
  {
    const SelectedRows rows = gather_selected_rows(cfg, latent_pool, md.num_slots, sel.global.data(), T, K);
    attn = sparse_mla(cfg, q_cat.data(), rows, T);
  }
  timer.mark(Stage::sparse_mla);

  // 6. V up projection, then (cfg.o_proj) the output projection.
  std::vector<float> v = v_up_proj(pw, attn.out.data(), T);
  timer.mark(Stage::v_up_proj);
  std::vector<float> out;
  if (cfg.o_proj) {
    out = o_proj(pw, v.data(), T);
    timer.mark(Stage::o_proj);
  }

  if (keep) {
    LayerTrace& tr = *trace;
    tr.q_lat = q_lat;
    tr.c_kv = c_kv;
    tr.k_pe = k_pe;
    tr.q_nope.resize(static_cast<size_t>(T * H * nope));
    tr.q_pe.resize(static_cast<size_t>(T * H * rope_dim));
    for (int64_t r = 0; r < T * H; ++r) {
      std::copy(q.begin() + r * dqk, q.begin() + r * dqk + nope, tr.q_nope.begin() + r * nope);
      std::copy(q.begin() + r * dqk + nope, q.begin() + (r + 1) * dqk, tr.q_pe.begin() + r * rope_dim);
    }
    tr.idx_q = qi;
    tr.idx_q_fp8.resize(iq.q8.size());
    for (size_t i = 0; i < iq.q8.size(); ++i) tr.idx_q_fp8[i] = fp8_e4m3_to_float(iq.q8[i]);
    tr.idx_q_scale = iq.q_scale;
    tr.idx_k = ki;
    tr.idx_k_fp8.resize(iq.k8.size());
    for (size_t i = 0; i < iq.k8.size(); ++i) tr.idx_k_fp8[i] = fp8_e4m3_to_float(iq.k8[i]);
    tr.idx_k_scale = iq.k_scale;
    tr.idx_weights = wts;
    tr.topk_local = std::move(sel.local);
    tr.topk_global = std::move(sel.global);
    tr.q_cat.resize(q_cat.size());
    for (size_t i = 0; i < q_cat.size(); ++i) tr.q_cat[i] = bf16_to_float(q_cat[i]);
    tr.attn_out.resize(attn.out.size());
    for (size_t i = 0; i < attn.out.size(); ++i) tr.attn_out[i] = bf16_to_float(attn.out[i]);
    tr.attn_lse = std::move(attn.lse);
    tr.attn_max = std::move(attn.max);
  }
  if (!cfg.o_proj) out = std::move(v);
  if (trace) trace->output = out;
  return out;
}

}  // namespace dsa::ref
