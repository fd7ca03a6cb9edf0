// The reference of each stage of the layer (dsa/reference_stages.h), rounding
// exactly where docs/numerics.md says. ref::layer_forward and the GPU check
// both compose these, so any change here changes both.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "dsa/error.h"
#include "dsa/reference.h"
#include "dsa/reference_stages.h"
#include "internal.h"

namespace dsa::ref {

namespace {

void round_bf16_inplace(std::vector<float>& v) {
#pragma omp parallel for schedule(static) if (v.size() >= 65536)
  for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i) v[i] = round_bf16(v[i]);
}

// y [T, N] = x [T, K] @ w^T, rounded to bf16 (the GEMM outputs numerics.md stores as bf16).
std::vector<float> linear_bf16(const float* x, const std::vector<float>& w, int64_t T, int64_t N, int64_t K) {
  std::vector<float> y(static_cast<size_t>(T * N));
  linear(x, w.data(), y.data(), T, N, K);
  round_bf16_inplace(y);
  return y;
}

}  // namespace

std::vector<float> q_a_proj(const PreparedWeights& w, const float* x, int64_t T) {
  return linear_bf16(x, w.q_a_proj, T, w.cfg.q_lora_rank, w.cfg.hidden_size);
}

std::vector<float> kv_a_proj(const PreparedWeights& w, const float* x, int64_t T) {
  return linear_bf16(x, w.kv_a_proj_with_mqa, T, w.cfg.latent_dim(), w.cfg.hidden_size);
}

NormsOut norms(const PreparedWeights& w, const float* q_a, const float* kv, int64_t T) {
  const LayerConfig& cfg = w.cfg;
  const int64_t qr = cfg.q_lora_rank, dkv = cfg.kv_lora_rank, rope = cfg.qk_rope_head_dim, lat = cfg.latent_dim();
  NormsOut o;
  o.q_lat.resize(static_cast<size_t>(T * qr));
  rms_norm(q_a, w.q_a_layernorm.data(), o.q_lat.data(), T, qr, cfg.rms_norm_eps);
  round_bf16_inplace(o.q_lat);
  o.c_kv.resize(static_cast<size_t>(T * dkv));
  o.k_pe.resize(static_cast<size_t>(T * rope));
  for (int64_t t = 0; t < T; ++t) {
    std::copy(kv + t * lat, kv + t * lat + dkv, o.c_kv.begin() + t * dkv);
    std::copy(kv + t * lat + dkv, kv + (t + 1) * lat, o.k_pe.begin() + t * rope);
  }
  rms_norm(o.c_kv.data(), w.kv_a_layernorm.data(), o.c_kv.data(), T, dkv, cfg.rms_norm_eps);
  round_bf16_inplace(o.c_kv);
  return o;
}

std::vector<float> q_b_proj(const PreparedWeights& w, const float* q_lat, int64_t T) {
  return linear_bf16(q_lat, w.q_b_proj, T, w.cfg.num_heads * w.cfg.qk_head_dim(), w.cfg.q_lora_rank);
}

void rope(const LayerConfig& cfg, const int32_t* positions, int64_t T, float* q, float* k_pe) {
  const int64_t H = cfg.num_heads, nope = cfg.qk_nope_head_dim, dqk = cfg.qk_head_dim(), rope_dim = cfg.qk_rope_head_dim;
  const std::vector<double> inv_freq = rope_inv_freq(cfg);
  if (q) {
    apply_rope(q, T * H, dqk, nope, H, positions, inv_freq, RopeStyle::Interleaved);
#pragma omp parallel for schedule(static) if (T * H >= 4096)
    for (int64_t r = 0; r < T * H; ++r) {
      for (int64_t i = nope; i < dqk; ++i) q[r * dqk + i] = round_bf16(q[r * dqk + i]);
    }
  }
  if (k_pe) {
    apply_rope(k_pe, T, rope_dim, 0, 1, positions, inv_freq, RopeStyle::Interleaved);
    for (int64_t i = 0; i < T * rope_dim; ++i) k_pe[i] = round_bf16(k_pe[i]);
  }
}

void cache_append(const LayerConfig& cfg, uint8_t* latent_pool, const int64_t* slots, int64_t T, const float* c_kv,
                  const float* k_pe) {
  for (int64_t t = 0; t < T; ++t) {
    write_latent_row(cfg, latent_pool, slots[t], c_kv + t * cfg.kv_lora_rank, k_pe + t * cfg.qk_rope_head_dim);
  }
}

std::vector<float> indexer_q_proj(const PreparedWeights& w, const float* q_lat, int64_t T) {
  return linear_bf16(q_lat, w.idx_wq_b, T, w.cfg.index_n_heads * w.cfg.index_head_dim, w.cfg.q_lora_rank);
}

std::vector<float> indexer_k_proj(const PreparedWeights& w, const float* x, int64_t T) {
  const int64_t DI = w.cfg.index_head_dim;
  std::vector<float> ki(static_cast<size_t>(T * DI));
  linear(x, w.idx_wk.data(), ki.data(), T, DI, w.cfg.hidden_size);  // kept in fp32
  layer_norm(ki.data(), w.idx_k_norm_weight.data(), w.idx_k_norm_bias.data(), ki.data(), T, DI, w.cfg.rms_norm_eps);
  return ki;
}

std::vector<float> indexer_weights_proj(const PreparedWeights& w, const float* x, int64_t T) {
  const int64_t HI = w.cfg.index_n_heads;
  std::vector<float> wts(static_cast<size_t>(T * HI));
  linear(x, w.idx_weights_proj.data(), wts.data(), T, HI, w.cfg.hidden_size);  // fp32
  return wts;
}

void indexer_rotate(const LayerConfig& cfg, const int32_t* positions, int64_t T, float* qi, float* ki) {
  const int64_t HI = cfg.index_n_heads, DI = cfg.index_head_dim;
  if (DI != 128) throw ConfigError(fmt::format("index_head_dim {} is not supported: the Hadamard rotation and fp8 blocks are 128 wide", DI));
  const std::vector<double> inv_freq = rope_inv_freq(cfg);
  if (qi) {
    apply_rope(qi, T * HI, DI, 0, HI, positions, inv_freq, RopeStyle::HalfSplit);
    if (cfg.indexer_hadamard) hadamard128(qi, T * HI);
  }
  if (ki) {
    apply_rope(ki, T, DI, 0, 1, positions, inv_freq, RopeStyle::HalfSplit);
    if (cfg.indexer_hadamard) hadamard128(ki, T);
  }
}

void fold_indexer_weights(const LayerConfig& cfg, int64_t T, const float* q_scale, float* weights) {
  const int64_t HI = cfg.index_n_heads, DI = cfg.index_head_dim;
  const float inv_sqrt_hi = static_cast<float>(1.0 / std::sqrt(static_cast<double>(HI)));
  const float inv_sqrt_di = static_cast<float>(1.0 / std::sqrt(static_cast<double>(DI)));
  for (int64_t i = 0; i < T * HI; ++i) weights[i] = weights[i] * inv_sqrt_hi * q_scale[i] * inv_sqrt_di;
}

void write_indexer_keys(uint8_t* indexer_pool, const int64_t* k_offset, const int64_t* scale_offset, int64_t T, int64_t DI,
                        const fp8_t* k8, const float* k_scale) {
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(indexer_pool + k_offset[t], k8 + t * DI, DI);
    std::memcpy(indexer_pool + scale_offset[t], k_scale + t, 4);
  }
}

IndexerQuantOut indexer_quant(const LayerConfig& cfg, const int32_t* positions, int64_t T, float* qi, float* ki, float* weights) {
  const int64_t HI = cfg.index_n_heads, DI = cfg.index_head_dim;
  // Quantized straight from the rotated fp32 values, with no bf16 step (docs/numerics.md).
  indexer_rotate(cfg, positions, T, qi, ki);
  IndexerQuantOut o;
  o.q8.resize(static_cast<size_t>(T * HI * DI));
  o.q_scale.resize(static_cast<size_t>(T * HI));
  o.k8.resize(static_cast<size_t>(T * DI));
  o.k_scale.resize(static_cast<size_t>(T));
  quantize_fp8_blocks(qi, T * HI, DI, o.q8.data(), o.q_scale.data());
  quantize_fp8_blocks(ki, T, DI, o.k8.data(), o.k_scale.data());
  fold_indexer_weights(cfg, T, o.q_scale.data(), weights);
  return o;
}

TopkOut topk(const BatchMetadata& md, const float* logits, int64_t S, int64_t k) {
  const int64_t T = md.num_tokens;
  TopkOut o;
  o.local.resize(static_cast<size_t>(T * k));
  topk(logits, T, S, md.visible_end.data(), k, o.local.data());
  o.global = o.local;
  local_to_global_indices(md, o.global.data(), k);
  return o;
}

std::vector<bf16_t> q_absorb(const PreparedWeights& w, const float* q_nope, int64_t ld_nope, const float* q_pe, int64_t ld_pe,
                             int64_t T) {
  const LayerConfig& cfg = w.cfg;
  const int64_t H = cfg.num_heads, nope = cfg.qk_nope_head_dim, dv = cfg.v_head_dim, dkv = cfg.kv_lora_rank,
                rope_dim = cfg.qk_rope_head_dim, lat = cfg.latent_dim();
  // kv_b_proj per head: W_UK [nope, dkv] rows, then W_UV [dv, dkv] rows.
  const std::vector<float>& wkvb = w.kv_b_proj;
  std::vector<bf16_t> q_cat(static_cast<size_t>(T * H * lat));
  std::vector<float> qabs(static_cast<size_t>(T * dkv));
  for (int64_t h = 0; h < H; ++h) {
    gemm(T, dkv, nope, q_nope + h * ld_nope, H * ld_nope, wkvb.data() + h * (nope + dv) * dkv, dkv, /*b_trans=*/false, qabs.data(),
         dkv);
#pragma omp parallel for schedule(static) if (T >= 256)
    for (int64_t t = 0; t < T; ++t) {
      bf16_t* dst = q_cat.data() + (t * H + h) * lat;
      for (int64_t i = 0; i < dkv; ++i) dst[i] = float_to_bf16(qabs[t * dkv + i]);
      for (int64_t i = 0; i < rope_dim; ++i) dst[dkv + i] = float_to_bf16(q_pe[(t * H + h) * ld_pe + i]);
    }
  }
  return q_cat;
}

SelectedRows gather_selected_rows(const LayerConfig& cfg, const uint8_t* latent_pool, int64_t num_slots, const int32_t* global,
                                  int64_t T, int64_t k) {
  const int64_t lat = cfg.latent_dim();
  // Marks the selected slots, then numbers them in ascending slot order.
  std::vector<int32_t> slot_row(static_cast<size_t>(num_slots), -1);
  for (int64_t j = 0; j < T * k; ++j)
    if (global[j] >= 0 && global[j] < num_slots) slot_row[global[j]] = 0;
  std::vector<int64_t> used;
  for (int64_t s = 0; s < num_slots; ++s) {
    if (slot_row[s] == 0) {
      slot_row[s] = static_cast<int32_t>(used.size());
      used.push_back(s);
    }
  }
  SelectedRows o;
  o.count = static_cast<int64_t>(used.size());
  o.rows.resize(static_cast<size_t>(o.count * lat));
#pragma omp parallel for schedule(static) if (o.count >= 4096)
  for (int64_t i = 0; i < o.count; ++i) read_latent_row(cfg, latent_pool, used[i], o.rows.data() + i * lat);
  o.indices.resize(static_cast<size_t>(T * k));
  for (int64_t j = 0; j < T * k; ++j) o.indices[j] = global[j] >= 0 && global[j] < num_slots ? slot_row[global[j]] : -1;
  return o;
}

AttentionOut sparse_mla(const LayerConfig& cfg, const bf16_t* q_cat, const SelectedRows& rows, int64_t T) {
  const int64_t H = cfg.num_heads, dkv = cfg.kv_lora_rank, lat = cfg.latent_dim(), K = cfg.index_topk;
  if (static_cast<int64_t>(rows.indices.size()) != T * K) {
    throw ShapeError(fmt::format("sparse_mla: the selected rows carry {} indices for {} tokens x index_topk {}; gather them for the "
                                 "same tokens with gather_selected_rows",
                                 rows.indices.size(), T, K));
  }
  AttentionOut o;
  o.out.resize(static_cast<size_t>(T * H * dkv));
  o.lse.resize(static_cast<size_t>(T * H));
  o.max.resize(static_cast<size_t>(T * H));
  const bool per_token = T >= 2 * omp_get_max_threads();
#pragma omp parallel if (per_token)
  {
    detail::MlaScratch ws;
    std::vector<float> qt(static_cast<size_t>(H * lat)), ot(static_cast<size_t>(H * dkv));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < H * lat; ++i) qt[i] = bf16_to_float(q_cat[t * H * lat + i]);
      detail::sparse_mla_token(qt.data(), rows.rows.data(), rows.count, rows.indices.data() + t * K, K, H, lat, dkv,
                               cfg.softmax_scale(), ot.data(), o.lse.data() + t * H, o.max.data() + t * H, !per_token, ws);
      for (int64_t i = 0; i < H * dkv; ++i) o.out[t * H * dkv + i] = float_to_bf16(ot[i]);
    }
  }
  return o;
}

std::vector<float> v_up_proj(const PreparedWeights& w, const bf16_t* attn_out, int64_t T) {
  const LayerConfig& cfg = w.cfg;
  const int64_t H = cfg.num_heads, nope = cfg.qk_nope_head_dim, dv = cfg.v_head_dim, dkv = cfg.kv_lora_rank;
  const std::vector<float>& wkvb = w.kv_b_proj;
  std::vector<float> v(static_cast<size_t>(T * H * dv));
  std::vector<float> oh(static_cast<size_t>(T * dkv));
  for (int64_t h = 0; h < H; ++h) {
#pragma omp parallel for schedule(static) if (T >= 256)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < dkv; ++i) oh[t * dkv + i] = bf16_to_float(attn_out[(t * H + h) * dkv + i]);
    }
    gemm(T, dv, dkv, oh.data(), dkv, wkvb.data() + (h * (nope + dv) + nope) * dkv, dkv, /*b_trans=*/true, v.data() + h * dv, H * dv);
  }
  round_bf16_inplace(v);
  return v;
}

std::vector<float> o_proj(const PreparedWeights& w, const float* v, int64_t T) {
  const LayerConfig& cfg = w.cfg;
  if (w.o_proj.empty()) {
    throw ConfigError("o_proj: the weights were prepared without o_proj (cfg.o_proj = false); prepare them with cfg.o_proj = true");
  }
  return linear_bf16(v, w.o_proj, T, cfg.hidden_size, cfg.num_heads * cfg.v_head_dim);
}

}  // namespace dsa::ref
