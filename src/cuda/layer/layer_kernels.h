#pragma once
// The layer's elementwise and small stages (everything that is not a GEMM,
// the indexer logits / top-k or the sparse attention). Rounding points follow
// docs/numerics.md exactly. Every launcher runs on ctx.stream and checks its
// launch.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dsa/cuda.h"

namespace dsa::cuda {

// Both RMSNorms of step 1 in one launch: q_lat = RMSNorm(qa) * wq and
// c_kv = RMSNorm(kv[:, :dkv]) * wkv. fp32 math, bf16 out.
// With qa_f32 / kv_f32 set (the fused x projection's fp32 output), the
// inputs are read in fp32 and rounded to bf16 first, exactly the value a
// bf16-output GEMM would have stored (docs/numerics.md); qa / kv are then unused.
struct NormsParams {
  const __nv_bfloat16* qa = nullptr;   // [T, dq] (row stride ld_qa)
  const float* qa_f32 = nullptr;       // may be null
  const float* kv_f32 = nullptr;       // may be null
  const __nv_bfloat16* wq = nullptr;   // [dq]
  __nv_bfloat16* q_lat = nullptr;      // [T, dq] dense
  const __nv_bfloat16* kv = nullptr;   // [T, ld_kv]: c_kv in the first dkv columns
  const __nv_bfloat16* wkv = nullptr;  // [dkv]
  __nv_bfloat16* c_kv = nullptr;       // [T, dkv] dense
  int64_t T = 0, ld_qa = 0, ld_kv = 0;
  int dq = 1536, dkv = 512;
  float eps = 1e-6f;
};
void rms_norms(const DeviceContext& ctx, const NormsParams& p);

// MLA RoPE (interleaved pairs) on q_pe of every head and on k_pe.
//   q_pe of head h of token t at q[t * ld_q + h * q_head_stride + q_rope_col]
//   written to q_out[t * ld_q_out + h * q_out_head_stride + q_out_col]
//   k_pe at kv[t * ld_kv + k_rope_col], written to k_out[t * rope_dim].
struct MlaRopeParams {
  const __nv_bfloat16* q = nullptr;
  int64_t ld_q = 0, q_head_stride = 0, q_rope_col = 0;
  __nv_bfloat16* q_out = nullptr;
  int64_t ld_q_out = 0, q_out_head_stride = 0, q_out_col = 0;
  const __nv_bfloat16* kv = nullptr;
  const float* kv_f32 = nullptr;  // may be null: fp32 source, rounded to bf16 before RoPE (fused x projection)
  int64_t ld_kv = 0, k_rope_col = 0;
  __nv_bfloat16* k_out = nullptr;
  const int32_t* positions = nullptr;  // [T]
  const float* inv_freq = nullptr;     // [rope_dim / 2] fp32 f_i'
  int64_t T = 0;
  int num_heads = 0, rope_dim = 64;
};
void mla_rope(const DeviceContext& ctx, const MlaRopeParams& p);

// Appends [c_kv | k_pe] of each new token to the latent cache at its slot:
// bf16 (dkv + rope values per slot) or the 656-byte fp8 form (dkv e4m3 in
// groups of 128 with a ue8m0 fp32 scale each, then the scales, then rope bf16).
struct CacheAppendParams {
  const __nv_bfloat16* c_kv = nullptr;  // [T, dkv]
  const __nv_bfloat16* k_pe = nullptr;  // [T, rope]
  const int64_t* slot_mapping = nullptr;  // [T] global slots of this layer's pool
  uint8_t* latent_pool = nullptr;       // [num_slots, bytes_per_slot]
  int64_t T = 0;
  int64_t num_slots = 0;
  int dkv = 512, rope = 64;
  bool fp8 = false;
};
void cache_append(const DeviceContext& ctx, const CacheAppendParams& p);
inline int64_t latent_fp8_bytes(int dkv, int rope) { return dkv + 4 * (dkv / 128) + 2 * rope; }

// Indexer RoPE (half-split, first rope_dim dims) + optional 128-point
// Hadamard + ue8m0 fp8 quantization, for every query head and for the key,
// in one pass from the projections' outputs; also the weights fold
// w = wraw * HI^-0.5 * q_scale * DI^-0.5 and the key's write into the paged
// indexer K cache. The dbg_* outputs (trace only) may be null.
struct IndexerQuantParams {
  const __nv_bfloat16* qi = nullptr;  // [T, HI * 128] wq_b output
  const float* kx = nullptr;          // [T, 128] fp32 wk output, row stride ld_kx
  const float* wraw = nullptr;        // [T, HI] fp32 weights_proj output, row stride ld_wraw
  int64_t ld_kx = 128, ld_wraw = 64;
  const __nv_bfloat16* k_norm_w = nullptr;  // [128]
  const __nv_bfloat16* k_norm_b = nullptr;  // [128]
  const int32_t* positions = nullptr;       // [T]
  const float* inv_freq = nullptr;          // [rope_dim / 2]
  uint8_t* q_fp8 = nullptr;                 // [T, HI, 128] e4m3
  float* q_scale = nullptr;                 // [T, HI]
  float* weights = nullptr;                 // [T, HI] folded
  uint8_t* k_pool = nullptr;                // one layer's indexer pool
  const int64_t* k_offset = nullptr;        // [T] byte offset of the token's 128 fp8
  const int64_t* k_scale_offset = nullptr;  // [T] byte offset of its fp32 scale
  float* dbg_q = nullptr;       // [T, HI, 128] values before fp8, may be null
  float* dbg_k = nullptr;       // [T, 128], may be null
  uint8_t* dbg_k_fp8 = nullptr; // [T, 128], may be null
  float* dbg_k_scale = nullptr; // [T], may be null
  int64_t T = 0;
  int num_heads = 64, rope_dim = 64;
  bool hadamard = true;
  float eps = 1e-6f;
};
void indexer_quant(const DeviceContext& ctx, const IndexerQuantParams& p);

// Request-local top-k positions -> global cache slots (-1, and anything
// outside the token's visible keys, become -1).
struct LocalToGlobalParams {
  const int32_t* local = nullptr;      // [T, k]
  int32_t* global = nullptr;           // [T, k]
  const int32_t* block_table = nullptr;  // [R, max_blocks]
  const int32_t* token_request = nullptr;  // [T]
  const int32_t* visible_end = nullptr;    // [T]
  int64_t T = 0, max_blocks = 0;
  int k = 0, tokens_per_block = 64;
};
void local_to_global(const DeviceContext& ctx, const LocalToGlobalParams& p);

// Sparse decode over the fp8 latent cache: each selected row (656 bytes:
// e4m3 c_kv, ue8m0 scales, bf16 k_pe) is dequantized into a bf16 row of
// `out` at position t * k + j (exact: fp8 times a power of two fits bf16), and
// out_indices[t, j] becomes that position (-1 stays -1), so the bf16 sparse
// attention kernel reads the gathered rows.
struct GatherFp8Params {
  const uint8_t* latent_pool = nullptr;  // fp8 form, [num_slots, dkv + 4 * dkv / 128 + 2 * rope]
  const int32_t* indices = nullptr;      // [T, k] global slots, -1 padded
  __nv_bfloat16* out = nullptr;          // [T * k, dkv + rope]
  int32_t* out_indices = nullptr;        // [T, k]
  int64_t T = 0, num_slots = 0;
  int k = 0, dkv = 512, rope = 64;
};
void gather_latent_fp8(const DeviceContext& ctx, const GatherFp8Params& p);

// Writes `value` (a bit pattern) into n 32-bit words: poisons buffers in tests
// and before traced runs.
void fill_u32(const DeviceContext& ctx, void* ptr, uint32_t value, size_t n_words);

}  // namespace dsa::cuda
