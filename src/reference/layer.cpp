// The whole layer on the CPU (spec section 3), rounding exactly where
// docs/numerics.md says, reading and writing the paged caches the way the GPU
// backend does so that both can be compared stage by stage.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "dsa/cache.h"
#include "dsa/error.h"
#include "dsa/reference.h"
#include "internal.h"

namespace dsa::ref {

namespace {

std::vector<float> to_float(const std::vector<bf16_t>& v) {
  std::vector<float> f(v.size());
#pragma omp parallel for schedule(static) if (v.size() >= 65536)
  for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i) f[i] = bf16_to_float(v[i]);
  return f;
}

void round_bf16_inplace(std::vector<float>& v) {
#pragma omp parallel for schedule(static) if (v.size() >= 65536)
  for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i) v[i] = round_bf16(v[i]);
}

class StageTimer {
 public:
  explicit StageTimer(std::vector<std::pair<std::string, double>>* out) : out_(out), t0_(std::chrono::steady_clock::now()) {}
  // Closes the current stage under `name` and starts the next one.
  void mark(const char* name) {
    const auto now = std::chrono::steady_clock::now();
    if (out_) out_->emplace_back(name, std::chrono::duration<double, std::milli>(now - t0_).count());
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
                                 const std::vector<int32_t>& position_ids, const BatchMetadata& md, CacheManager& cache,
                                 int64_t layer, const TraceOptions& opt, LayerTrace* trace,
                                 std::vector<std::pair<std::string, double>>* stage_ms) {
  return layer_forward(prepare_weights(cfg, w), hidden, position_ids, md, cache, layer, opt, trace, stage_ms);
}

std::vector<float> layer_forward(const PreparedWeights& pw, const std::vector<bf16_t>& hidden, const std::vector<int32_t>& position_ids,
                                 const BatchMetadata& md, CacheManager& cache, int64_t layer, const TraceOptions& opt,
                                 LayerTrace* trace, std::vector<std::pair<std::string, double>>* stage_ms) {
  const LayerConfig& cfg = pw.cfg;
  validate(cfg);
  const int64_t T = md.num_tokens, hs = cfg.hidden_size, H = cfg.num_heads, qr = cfg.q_lora_rank, dkv = cfg.kv_lora_rank,
                rope = cfg.qk_rope_head_dim, nope = cfg.qk_nope_head_dim, dqk = cfg.qk_head_dim(), dv = cfg.v_head_dim,
                lat = cfg.latent_dim(), HI = cfg.index_n_heads, DI = cfg.index_head_dim, K = cfg.index_topk;
  if (static_cast<int64_t>(hidden.size()) != T * hs) {
    throw ShapeError(fmt::format("layer_forward: hidden has {} values but the step has {} tokens x hidden_size {} = {}; pass "
                                 "[T, hidden_size] bf16 in the metadata's token order",
                                 hidden.size(), T, hs, T * hs));
  }
  if (static_cast<int64_t>(position_ids.size()) != T) {
    throw ShapeError(fmt::format("layer_forward: {} position ids for {} tokens; pass one per new token", position_ids.size(), T));
  }
  check_positions(md, position_ids.data(), T);
  const CacheConfig& cc = cache.config();
  if (cc.storage != Storage::Host) {
    throw CacheError("layer_forward (CPU reference) needs a cache with Storage::Host; copy a device cache's pools to a host "
                     "CacheManager first (cuda::copy_pools)");
  }
  if (cc.latent_dtype != cfg.kv_cache_dtype || cc.tokens_per_block != cfg.tokens_per_block || cc.kv_lora_rank != dkv ||
      cc.rope_dim != rope || cc.index_head_dim != DI) {
    throw ConfigError(fmt::format("layer_forward: the cache (latent {}, {} tokens per block, kv_lora_rank {}, rope {}, index head "
                                  "dim {}) does not match the layer configuration (latent {}, {}, {}, {}, {}); build it with "
                                  "CacheConfig::for_layer(cfg)",
                                  to_string(cc.latent_dtype), cc.tokens_per_block, cc.kv_lora_rank, cc.rope_dim,
                                  cc.index_head_dim, to_string(cfg.kv_cache_dtype), cfg.tokens_per_block, dkv, rope, DI));
  }
  if (md.tokens_per_block != cfg.tokens_per_block || md.num_slots != cc.capacity_tokens()) {
    throw ShapeError("layer_forward: the batch metadata was built for another cache; rebuild it with build_batch_metadata(cache, ...)");
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

  // 1. Down projections and norms.
  std::vector<float> q_lat(static_cast<size_t>(T * qr));
  {
    linear(x.data(), pw.q_a_proj.data(), q_lat.data(), T, qr, hs);
    round_bf16_inplace(q_lat);
  }
  timer.mark("q_a_proj");
  std::vector<float> kv(static_cast<size_t>(T * lat));
  {
    linear(x.data(), pw.kv_a_proj_with_mqa.data(), kv.data(), T, lat, hs);
    round_bf16_inplace(kv);
  }
  timer.mark("kv_a_proj");
  std::vector<float> c_kv(static_cast<size_t>(T * dkv)), k_pe(static_cast<size_t>(T * rope));
  {
    rms_norm(q_lat.data(), pw.q_a_layernorm.data(), q_lat.data(), T, qr, cfg.rms_norm_eps);
    round_bf16_inplace(q_lat);
    for (int64_t t = 0; t < T; ++t) {
      std::copy(kv.begin() + t * lat, kv.begin() + t * lat + dkv, c_kv.begin() + t * dkv);
      std::copy(kv.begin() + t * lat + dkv, kv.begin() + (t + 1) * lat, k_pe.begin() + t * rope);
    }
    rms_norm(c_kv.data(), pw.kv_a_layernorm.data(), c_kv.data(), T, dkv, cfg.rms_norm_eps);
    round_bf16_inplace(c_kv);
  }
  timer.mark("norms");

  // 2. Query up projection.
  std::vector<float> q(static_cast<size_t>(T * H * dqk));
  {
    linear(q_lat.data(), pw.q_b_proj.data(), q.data(), T, H * dqk, qr);
    round_bf16_inplace(q);
  }
  timer.mark("q_b_proj");

  // 3. MLA RoPE, interleaved, on q_pe of every head and on k_pe.
  const std::vector<double> inv_freq = rope_inv_freq(cfg);
  apply_rope(q.data(), T * H, dqk, nope, H, position_ids.data(), inv_freq, RopeStyle::Interleaved);
  apply_rope(k_pe.data(), T, rope, 0, 1, position_ids.data(), inv_freq, RopeStyle::Interleaved);
#pragma omp parallel for schedule(static) if (T * H >= 4096)
  for (int64_t r = 0; r < T * H; ++r) {
    for (int64_t i = nope; i < dqk; ++i) q[r * dqk + i] = round_bf16(q[r * dqk + i]);
  }
  round_bf16_inplace(k_pe);
  timer.mark("rope");

  // 4. Latent cache append.
  uint8_t* latent_pool = cache.latent_pool(layer);
  for (int64_t t = 0; t < T; ++t) write_latent_row(cfg, latent_pool, md.slot_mapping[t], c_kv.data() + t * dkv, k_pe.data() + t * rope);
  timer.mark("cache_append");

  // 5. Indexer.
  std::vector<float> qi(static_cast<size_t>(T * HI * DI));
  {
    linear(q_lat.data(), pw.idx_wq_b.data(), qi.data(), T, HI * DI, qr);
    round_bf16_inplace(qi);
  }
  timer.mark("indexer_q_proj");
  std::vector<float> ki(static_cast<size_t>(T * DI));
  {
    linear(x.data(), pw.idx_wk.data(), ki.data(), T, DI, hs);  // kept in fp32
    layer_norm(ki.data(), pw.idx_k_norm_weight.data(), pw.idx_k_norm_bias.data(), ki.data(), T, DI, cfg.rms_norm_eps);
  }
  timer.mark("indexer_k_proj");
  std::vector<float> wts(static_cast<size_t>(T * HI));
  {
    linear(x.data(), pw.idx_weights_proj.data(), wts.data(), T, HI, hs);  // fp32
  }
  timer.mark("indexer_weights_proj");
  std::vector<fp8_t> qi8(static_cast<size_t>(T * HI * DI)), ki8(static_cast<size_t>(T * DI));
  std::vector<float> qi_scale(static_cast<size_t>(T * HI)), ki_scale(static_cast<size_t>(T));
  {
    // Half-split RoPE on the first rope dims of each head, then the rotation;
    // quantized straight from fp32 (docs/numerics.md).
    apply_rope(qi.data(), T * HI, DI, 0, HI, position_ids.data(), inv_freq, RopeStyle::HalfSplit);
    apply_rope(ki.data(), T, DI, 0, 1, position_ids.data(), inv_freq, RopeStyle::HalfSplit);
    if (cfg.indexer_hadamard) {
      hadamard128(qi.data(), T * HI);
      hadamard128(ki.data(), T);
    }
    quantize_fp8_blocks(qi.data(), T * HI, DI, qi8.data(), qi_scale.data());
    quantize_fp8_blocks(ki.data(), T, DI, ki8.data(), ki_scale.data());
    const float inv_sqrt_hi = static_cast<float>(1.0 / std::sqrt(static_cast<double>(HI)));
    const float inv_sqrt_di = static_cast<float>(1.0 / std::sqrt(static_cast<double>(DI)));
    for (int64_t i = 0; i < T * HI; ++i) wts[i] = wts[i] * inv_sqrt_hi * qi_scale[i] * inv_sqrt_di;
    uint8_t* ipool = cache.indexer_pool(layer);
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(ipool + md.indexer_k_offset[t], ki8.data() + t * DI, DI);
      std::memcpy(ipool + md.indexer_scale_offset[t], &ki_scale[t], 4);
    }
  }
  timer.mark("indexer_quant");
  const int64_t S = std::max<int64_t>(md.max_seq_len(), 1);
  std::vector<float> logits(static_cast<size_t>(T * S));
  indexer_logits(qi8.data(), wts.data(), cache.indexer_pool(layer), md.block_table.data(), md.token_request.data(),
                 md.visible_end.data(), T, HI, md.max_blocks_per_request, cfg.tokens_per_block, S, logits.data());
  timer.mark("indexer_logits");
  std::vector<int32_t> sel(static_cast<size_t>(T * K));
  topk(logits.data(), T, S, md.visible_end.data(), K, sel.data());
  std::vector<int32_t> sel_global = sel;
  local_to_global_indices(md, sel_global.data(), K);
  timer.mark("topk");
  if (trace && opt.logits) trace->idx_logits = std::move(logits);
  std::vector<float>().swap(logits);

  // 6. Absorbed attention. q_cat = [q_nope[h] @ W_UK[h] | q_pe], bf16.
  const std::vector<float>& wkvb = pw.kv_b_proj;  // per head: W_UK [nope, dkv] rows, then W_UV [dv, dkv] rows
  std::vector<bf16_t> q_cat(static_cast<size_t>(T * H * lat));
  {
    std::vector<float> qabs(static_cast<size_t>(T * dkv));
    for (int64_t h = 0; h < H; ++h) {
      gemm(T, dkv, nope, q.data() + h * dqk, H * dqk, wkvb.data() + h * (nope + dv) * dkv, dkv, /*b_trans=*/false, qabs.data(), dkv);
#pragma omp parallel for schedule(static) if (T >= 256)
      for (int64_t t = 0; t < T; ++t) {
        bf16_t* dst = q_cat.data() + (t * H + h) * lat;
        for (int64_t i = 0; i < dkv; ++i) dst[i] = float_to_bf16(qabs[t * dkv + i]);
        for (int64_t i = 0; i < rope; ++i) dst[dkv + i] = float_to_bf16(q[(t * H + h) * dqk + nope + i]);
      }
    }
  }
  timer.mark("q_absorb");

  // The latent cache rows some token selected, each decoded once (ascending
  // slot order); global slots map onto them. Bounded by T * topk, so long
  // decode batches do not decode their whole context.
  std::vector<bf16_t> attn_out(static_cast<size_t>(T * H * dkv));
  std::vector<float> lse(static_cast<size_t>(T * H)), rmax(static_cast<size_t>(T * H));
  {
    std::vector<int32_t> slot_row(static_cast<size_t>(md.num_slots), -1);
    for (int32_t g : sel_global)
      if (g >= 0) slot_row[g] = 0;
    std::vector<int64_t> used;
    for (int64_t s = 0; s < md.num_slots; ++s) {
      if (slot_row[s] == 0) {
        slot_row[s] = static_cast<int32_t>(used.size());
        used.push_back(s);
      }
    }
    const int64_t nrows = static_cast<int64_t>(used.size());
    std::vector<float> rows(static_cast<size_t>(nrows * lat));
#pragma omp parallel for schedule(static) if (nrows >= 4096)
    for (int64_t i = 0; i < nrows; ++i) read_latent_row(cfg, latent_pool, used[i], rows.data() + i * lat);
    const bool per_token = T >= 2 * omp_get_max_threads();
#pragma omp parallel if (per_token)
    {
      detail::MlaScratch ws;
      std::vector<float> qt(static_cast<size_t>(H * lat)), ot(static_cast<size_t>(H * dkv));
      std::vector<int32_t> idx(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < H * lat; ++i) qt[i] = bf16_to_float(q_cat[t * H * lat + i]);
        for (int64_t j = 0; j < K; ++j) {
          const int32_t g = sel_global[t * K + j];
          idx[j] = g < 0 ? -1 : slot_row[g];
        }
        detail::sparse_mla_token(qt.data(), rows.data(), nrows, idx.data(), K, H, lat, dkv, cfg.softmax_scale(), ot.data(),
                                 lse.data() + t * H, rmax.data() + t * H, !per_token, ws);
        for (int64_t i = 0; i < H * dkv; ++i) attn_out[t * H * dkv + i] = float_to_bf16(ot[i]);
      }
    }
  }
  timer.mark("sparse_mla");

  // 7. V up projection: v[t, h] = o[t, h] @ W_UV[h]^T.
  std::vector<float> v(static_cast<size_t>(T * H * dv));
  {
    std::vector<float> oh(static_cast<size_t>(T * dkv));
    for (int64_t h = 0; h < H; ++h) {
#pragma omp parallel for schedule(static) if (T >= 256)
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < dkv; ++i) oh[t * dkv + i] = bf16_to_float(attn_out[(t * H + h) * dkv + i]);
      }
      gemm(T, dv, dkv, oh.data(), dkv, wkvb.data() + (h * (nope + dv) + nope) * dkv, dkv, /*b_trans=*/true, v.data() + h * dv, H * dv);
    }
    round_bf16_inplace(v);
  }
  timer.mark("v_up_proj");

  std::vector<float> out;
  if (cfg.o_proj) {
    out.resize(static_cast<size_t>(T * hs));
    linear(v.data(), pw.o_proj.data(), out.data(), T, hs, H * dv);
    round_bf16_inplace(out);
    timer.mark("o_proj");
  }

  if (keep) {
    LayerTrace& tr = *trace;
    tr.q_lat = q_lat;
    tr.c_kv = c_kv;
    tr.k_pe = k_pe;
    tr.q_nope.resize(static_cast<size_t>(T * H * nope));
    tr.q_pe.resize(static_cast<size_t>(T * H * rope));
    for (int64_t r = 0; r < T * H; ++r) {
      std::copy(q.begin() + r * dqk, q.begin() + r * dqk + nope, tr.q_nope.begin() + r * nope);
      std::copy(q.begin() + r * dqk + nope, q.begin() + (r + 1) * dqk, tr.q_pe.begin() + r * rope);
    }
    tr.idx_q = qi;
    tr.idx_q_fp8.resize(qi8.size());
    for (size_t i = 0; i < qi8.size(); ++i) tr.idx_q_fp8[i] = fp8_e4m3_to_float(qi8[i]);
    tr.idx_q_scale = qi_scale;
    tr.idx_k = ki;
    tr.idx_k_fp8.resize(ki8.size());
    for (size_t i = 0; i < ki8.size(); ++i) tr.idx_k_fp8[i] = fp8_e4m3_to_float(ki8[i]);
    tr.idx_k_scale = ki_scale;
    tr.idx_weights = wts;
    tr.topk_local = sel;
    tr.topk_global = sel_global;
    tr.q_cat.resize(q_cat.size());
    for (size_t i = 0; i < q_cat.size(); ++i) tr.q_cat[i] = bf16_to_float(q_cat[i]);
    tr.attn_out.resize(attn_out.size());
    for (size_t i = 0; i < attn_out.size(); ++i) tr.attn_out[i] = bf16_to_float(attn_out[i]);
    tr.attn_lse = lse;
    tr.attn_max = rmax;
  }
  if (!cfg.o_proj) out = std::move(v);
  if (trace) trace->output = out;
  return out;
}

}  // namespace dsa::ref
