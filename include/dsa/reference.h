#pragma once
// CPU reference of the layer of spec section 3 and of the operations its
// stages are built from (the stages themselves: dsa/reference_stages.h):
// plain loops, fp32 storage, fp32/fp64 accumulation, no CUDA. "Rounded inputs" means values that have
// already gone through round_bf16 / round_fp8_e4m3, so that a fast path and
// the reference see the same numbers. All tensors are row-major, dense.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/config.h"
#include "dsa/dtypes.h"
#include "dsa/layer.h"

namespace dsa::ref {

// ---- linear algebra -------------------------------------------------------
// C[M, N] (+)= A[M, K] @ op(B), op(B)[k][n] = b_trans ? B[n * ldb + k] : B[k * ldb + n].
// fp32 products summed in fp32 over 256-long K slices, slices summed in fp64;
// the summation order is fixed, so results do not depend on the thread count.
// parallel: use OpenMP threads (ignored inside an enclosing parallel region).
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, bool b_trans, float* C,
          int64_t ldc, bool accumulate = false, bool parallel = true);
// y[M, N] = x[M, K] @ w[N, K]^T (gemm above).
void linear(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K);

// ---- norms ----------------------------------------------------------------
// y = x / sqrt(mean(x^2) + eps) * weight, per row of length D.
void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t D, double eps);
// y = (x - mean) / sqrt(var + eps) * weight + bias (biased variance), per row.
void layer_norm(const float* x, const float* weight, const float* bias, float* y, int64_t rows, int64_t D, double eps);

// ---- RoPE (spec section 6) ------------------------------------------------
// Frequencies: dsa::rope_inv_freq (dsa/config.h).
using ::dsa::rope_inv_freq;
// In place on x[rows, stride] at columns [col0, col0 + rope_dim), each row at position pos[row / rows_per_pos].
// Interleaved: pairs (x[2i], x[2i+1]) (MLA). Half-split: pairs (x[i], x[i + rope_dim/2]) (indexer, NeoX).
enum class RopeStyle { Interleaved, HalfSplit };
void apply_rope(float* x, int64_t rows, int64_t stride, int64_t col0, int64_t rows_per_pos, const int32_t* pos,
                const std::vector<double>& inv_freq, RopeStyle style);

// ---- indexer helpers --------------------------------------------------------
// In place: v <- H128 v / sqrt(128) per 128-vector (Sylvester ordering).
void hadamard128(float* x, int64_t vectors);
// Quantizes each 128-vector to e4m3 with a ue8m0 scale (spec 3.5). q8 may be null.
void quantize_fp8_blocks(const float* x, int64_t vectors, int64_t block, fp8_t* q8, float* scale);

// Indexer logits over a paged indexer K cache, with the same inputs as the GPU
// kernel (src/cuda/indexer.h): q_fp8 [T, HI, 128] e4m3 bytes, weights [T, HI]
// folded fp32, k_cache one layer's indexer pool (per block: tokens_per_block x
// 128 e4m3 bytes, then tokens_per_block fp32 scales), block_table [R, max_blocks],
// token_request [T], visible_end [T]. Writes logits [T, logits_stride]:
// I[t, s] = kscale[s] * sum_h w[t,h] * relu(q8[t,h] . k8[s]) for s < visible_end[t], -inf after.
void indexer_logits(const fp8_t* q_fp8, const float* weights, const uint8_t* k_cache, const int32_t* block_table,
                    const int32_t* token_request, const int32_t* visible_end, int64_t T, int64_t HI,
                    int64_t max_blocks_per_request, int64_t tokens_per_block, int64_t logits_stride, float* logits);

// Top-k per row of logits[T, S] over columns [0, visible_end[t]): positions of the
// min(k, visible) largest, ties to the smaller position, listed in ascending
// position order (deterministic, and the order the GPU emits), padded with -1.
void topk(const float* logits, int64_t T, int64_t S, const int32_t* visible_end, int64_t k, int32_t* out);

// ---- sparse MLA (spec 3.6) ------------------------------------------------
// q: [T, H, Dqk] (Dqk = 576), kv: [num_slots, Dqk] (first Dv = 512 are values),
// indices: [T, topk] global slots (-1 or >= num_slots invalid).
// out: [T, H, Dv], lse: [T, H] natural log (+inf for no valid index, out = 0),
// rowmax: [T, H] max scaled score (-inf for no valid index).
void sparse_mla(const float* q, const float* kv, int64_t num_slots, const int32_t* indices, int64_t T, int64_t H,
                int64_t topk, int64_t Dqk, int64_t Dv, double softmax_scale, float* out, float* lse, float* rowmax);

// ---- the layer (spec section 3) ---------------------------------------------
// One latent cache row at a global slot of one layer's pool: bf16 [c_kv | k_pe]
// (2 * 576 bytes), or with cfg.kv_cache_dtype FP8 the 656-byte form: c_kv as
// e4m3 in groups of 128 with one ue8m0 fp32 scale each, then the scales, then
// k_pe bf16. read_latent_row dequantizes into row[576] fp32.
void write_latent_row(const LayerConfig& cfg, uint8_t* pool, int64_t slot, const float* c_kv, const float* k_pe);
void read_latent_row(const LayerConfig& cfg, const uint8_t* pool, int64_t slot, float* row);

// The forward step of spec section 3 for the T = md.num_tokens new tokens,
// composed of the per-stage functions of dsa/reference_stages.h: hidden
// [T, hidden_size] bf16 in md's token order, at md.positions. Writes each new
// token's latent row and indexer key into layer `layer` of `cache`
// (Storage::Host) at md's slots, then reads every key and latent row back
// from the paged cache. Returns the bf16-rounded output [T, H * v_head_dim],
// or [T, hidden_size] with cfg.o_proj. trace (may be null) receives the
// intermediates opt asks for; stage_ms (may be null) receives (stage name,
// wall ms) in run order, named by dsa::stage_name (dsa/stages.h): the stages
// of layer_stages(cfg, false).
// Converting the weights to fp32 happens before the first stage, outside
// stage_ms; callers that run many steps convert once with prepare_weights.
std::vector<float> layer_forward(const LayerConfig& cfg, const LayerWeights& w, const std::vector<bf16_t>& hidden,
                                 const BatchMetadata& md, CacheManager& cache, int64_t layer, const TraceOptions& opt,
                                 LayerTrace* trace, std::vector<std::pair<std::string, double>>* stage_ms);

// The weights as fp32 copies of their bf16 values, for repeated steps
// (o_proj only when cfg.o_proj). Same names and layouts as LayerWeights.
struct PreparedWeights {
  LayerConfig cfg;
  std::vector<float> q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj, idx_wq_b, idx_wk,
      idx_k_norm_weight, idx_k_norm_bias, idx_weights_proj;
};
PreparedWeights prepare_weights(const LayerConfig& cfg, const LayerWeights& w);
std::vector<float> layer_forward(const PreparedWeights& w, const std::vector<bf16_t>& hidden, const BatchMetadata& md,
                                 CacheManager& cache, int64_t layer, const TraceOptions& opt, LayerTrace* trace,
                                 std::vector<std::pair<std::string, double>>* stage_ms);

}  // namespace dsa::ref
