#pragma once
// The reference of each stage of the layer (dsa::Stage, spec section 3), one
// function per stage in run order. ref::layer_forward is their composition;
// the GPU check (dsa::check::check_step) calls the same functions on a sample
// of tokens with the GPU's own inputs, so a stage's math exists once.
//
// Every function works on any T tokens: a whole step, or a sample of it with
// the sampled tokens' positions. Tensors are dense, row-major, fp32 holding
// the values docs/numerics.md says the stage stores (bf16 values where it
// rounds to bf16). q_cat and the attention output are the exception: they
// stay bf16 because at the seed's shape ([4096, 128, 576]) fp32 copies would
// double the reference's largest buffers.
//
// x_proj has no function here: it is the CUDA backend's fusion of q_a_proj,
// kv_a_proj, indexer_k_proj and indexer_weights_proj, which the reference
// runs on their own.
#include <cstdint>
#include <vector>

#include "dsa/batch.h"
#include "dsa/config.h"
#include "dsa/dtypes.h"
#include "dsa/reference.h"

namespace dsa::ref {

// ---- projections and norms --------------------------------------------------
// q_a_proj: x [T, hidden] -> [T, q_lora_rank], bf16, before q_a_layernorm.
std::vector<float> q_a_proj(const PreparedWeights& w, const float* x, int64_t T);
// kv_a_proj: x [T, hidden] -> [T, kv_lora_rank + rope], bf16: c_kv before
// kv_a_layernorm, then k_pe before RoPE.
std::vector<float> kv_a_proj(const PreparedWeights& w, const float* x, int64_t T);

struct NormsOut {
  std::vector<float> q_lat;  // [T, q_lora_rank] bf16, after q_a_layernorm
  std::vector<float> c_kv;   // [T, kv_lora_rank] bf16, after kv_a_layernorm
  std::vector<float> k_pe;   // [T, rope] bf16, before RoPE (kv's last rope columns)
};
// norms: RMSNorm of q_a_proj's output [T, q_lora_rank] and of the c_kv part
// of kv_a_proj's output [T, kv_lora_rank + rope]; k_pe is split off as is.
NormsOut norms(const PreparedWeights& w, const float* q_a, const float* kv, int64_t T);

// q_b_proj: q_lat [T, q_lora_rank] -> q [T, H, qk_head_dim] bf16 (q_nope,
// then q_pe before RoPE).
std::vector<float> q_b_proj(const PreparedWeights& w, const float* q_lat, int64_t T);

// rope: interleaved RoPE (spec section 6) in place on the q_pe columns of
// every head of q [T, H, qk_head_dim] and on k_pe [T, rope], token t at
// positions[t]; the rotated values are rounded to bf16. Either q or k_pe may
// be null.
void rope(const LayerConfig& cfg, const int32_t* positions, int64_t T, float* q, float* k_pe);

// cache_append: write_latent_row of each token's c_kv [T, kv_lora_rank] and
// k_pe [T, rope] at global slot slots[t] of one layer's latent pool.
void cache_append(const LayerConfig& cfg, uint8_t* latent_pool, const int64_t* slots, int64_t T, const float* c_kv,
                  const float* k_pe);

// ---- indexer (spec 3.5) -------------------------------------------------------
// indexer_q_proj: q_lat [T, q_lora_rank] -> qi [T, HI, DI] bf16.
std::vector<float> indexer_q_proj(const PreparedWeights& w, const float* q_lat, int64_t T);
// indexer_k_proj: x [T, hidden] -> ki [T, DI] fp32 after the k_norm LayerNorm.
std::vector<float> indexer_k_proj(const PreparedWeights& w, const float* x, int64_t T);
// indexer_weights_proj: x [T, hidden] -> [T, HI] fp32, before the fold.
std::vector<float> indexer_weights_proj(const PreparedWeights& w, const float* x, int64_t T);

// indexer_quant, in the parts the check needs on their own:
// Half-split RoPE on the first rope dims of each DI-vector at positions[t],
// then (cfg.indexer_hadamard) the 128-point Hadamard rotation, in place in
// fp32: qi [T, HI, DI], ki [T, DI]. Either may be null.
void indexer_rotate(const LayerConfig& cfg, const int32_t* positions, int64_t T, float* qi, float* ki);
// weights [T, HI] <- weights * HI^-0.5 * q_scale * DI^-0.5 (fp32, in that order).
void fold_indexer_weights(const LayerConfig& cfg, int64_t T, const float* q_scale, float* weights);
// Each token's key k8 [T, DI] and scale k_scale [T] into one layer's indexer
// pool at byte offsets k_offset[t] / scale_offset[t] (BatchMetadata's
// indexer_k_offset / indexer_scale_offset).
void write_indexer_keys(uint8_t* indexer_pool, const int64_t* k_offset, const int64_t* scale_offset, int64_t T, int64_t DI,
                        const fp8_t* k8, const float* k_scale);

struct IndexerQuantOut {
  std::vector<fp8_t> q8;       // [T, HI, DI] e4m3
  std::vector<float> q_scale;  // [T, HI] ue8m0
  std::vector<fp8_t> k8;       // [T, DI] e4m3
  std::vector<float> k_scale;  // [T] ue8m0
};
// indexer_quant without its cache write (write_indexer_keys): rotates qi and
// ki in place (indexer_rotate), quantizes both straight from fp32
// (quantize_fp8_blocks) and folds weights [T, HI] in place.
IndexerQuantOut indexer_quant(const LayerConfig& cfg, const int32_t* positions, int64_t T, float* qi, float* ki, float* weights);

// indexer_logits: ref::indexer_logits (reference.h).

struct TopkOut {
  std::vector<int32_t> local;   // [T, k] request-local positions, ascending, -1 padded
  std::vector<int32_t> global;  // [T, k] global slots, -1 padded
};
// topk stage: ref::topk over each token's visible logits [T, S] (T =
// md.num_tokens), then local_to_global_indices with md's block tables.
TopkOut topk(const BatchMetadata& md, const float* logits, int64_t S, int64_t k);

// ---- attention (spec 3.6) -------------------------------------------------------
// q_absorb: q_cat[t, h] = [q_nope[t, h] @ W_UK[h] | q_pe[t, h]] -> [T, H,
// latent] bf16. Row (t, h) of q_nope [.., nope] starts at q_nope + (t * H + h)
// * ld_nope, of q_pe [.., rope] at q_pe + (t * H + h) * ld_pe: q_b_proj's q
// gives (q, qk_head_dim, q + nope, qk_head_dim), separate tensors (q_nope,
// nope, q_pe, rope).
std::vector<bf16_t> q_absorb(const PreparedWeights& w, const float* q_nope, int64_t ld_nope, const float* q_pe, int64_t ld_pe,
                             int64_t T);

// The latent cache rows an attention step reads: every distinct slot of
// global [T, k] inside [0, num_slots) decoded once (read_latent_row), in
// ascending slot order, and global's entries remapped to rows of that dense
// table. Bounded by T * k rows, so a long decode batch does not decode its
// whole context.
struct SelectedRows {
  int64_t count = 0;
  std::vector<float> rows;       // [count, latent] fp32
  std::vector<int32_t> indices;  // [T, k] row in `rows`, -1 where the slot is -1 or outside [0, num_slots)
};
SelectedRows gather_selected_rows(const LayerConfig& cfg, const uint8_t* latent_pool, int64_t num_slots, const int32_t* global,
                                  int64_t T, int64_t k);

struct AttentionOut {
  std::vector<bf16_t> out;   // [T, H, kv_lora_rank]
  std::vector<float> lse;    // [T, H] natural log, +inf where nothing is selected
  std::vector<float> max;    // [T, H] max scaled score, -inf where nothing is selected
};
// sparse_mla stage: attention of q_cat [T, H, latent] over the rows it
// selected (rows.indices, k = cfg.index_topk per token), as ref::sparse_mla
// (reference.h) computes it; the output is rounded to bf16.
AttentionOut sparse_mla(const LayerConfig& cfg, const bf16_t* q_cat, const SelectedRows& rows, int64_t T);

// v_up_proj: v[t, h] = attn_out[t, h] @ W_UV[h]^T, attn_out [T, H,
// kv_lora_rank] -> [T, H * v_head_dim] bf16.
std::vector<float> v_up_proj(const PreparedWeights& w, const bf16_t* attn_out, int64_t T);
// o_proj: v [T, H * v_head_dim] -> [T, hidden] bf16. The weights must have
// been prepared with cfg.o_proj (ConfigError otherwise).
std::vector<float> o_proj(const PreparedWeights& w, const float* v, int64_t T);

}  // namespace dsa::ref
