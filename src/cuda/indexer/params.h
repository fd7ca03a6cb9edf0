#pragma once
// Lightning-indexer logits over the paged fp8 indexer K cache (spec 3.5).
// Logits are materialized: [T, logits_stride] fp32; the top-k that reads
// them is cuda/topk/params.h.
#include <cstdint>
#include <string>

#include "dsa/cuda.h"

namespace dsa::cuda {

struct IndexerLogitsParams {
  const uint8_t* q_fp8 = nullptr;          // [T, HI, 128] float8_e4m3 (unscaled)
  const float* weights = nullptr;          // [T, HI] fp32, folded: w * 64^-0.5 * q_scale * 128^-0.5
  const uint8_t* k_cache = nullptr;        // [num_blocks, tokens_per_block * 132] one layer's indexer pool:
                                           // per block tokens_per_block x 128 fp8, then tokens_per_block fp32 scales
  const int32_t* block_table = nullptr;    // [R, max_blocks_per_request] int32
  const int32_t* token_request = nullptr;  // [T] int32 request of each query token
  const int32_t* visible_end = nullptr;    // [T] int32: keys at request-local positions [0, visible_end) are visible
  float* logits = nullptr;                 // [T, logits_stride] fp32; -inf written at [visible_end, logits_stride)
  int64_t T = 0;
  int64_t logits_stride = 0;               // >= max visible_end
  int64_t max_blocks_per_request = 0;
  int num_heads = 64;                      // HI
  int tokens_per_block = 64;
  // Optional hint, 0 = unknown: the most new tokens any request has in this
  // step. With 2 or more (prefill, speculative next_n), neighbouring query
  // tokens share key tiles; with 1 (plain decode) each token gets its own CTAs.
  int max_tokens_per_request = 0;
};

// Picks the fastest kernel for the context's device (wgmma on sm_90, else
// mma.sync) and launches on ctx.stream. Throws ShapeError for inputs outside
// the contract (num_heads != 64, tokens_per_block != 64, null or misaligned
// pointers: q_fp8 and k_cache 16-byte aligned, weights and logits 4-byte),
// CudaError below sm_89. Device-side values are not checked on the
// host (that would need a sync): a visible_end outside
// [0, min(logits_stride, max_blocks * 64)] is clamped into it, so a bad one
// gives wrong logits but never a stray access.
// Deterministic: fixed reduction order, no atomics. No workspace.
void indexer_logits(const DeviceContext& ctx, const IndexerLogitsParams& p);
// The two kernels, callable on their own (tests, benchmarks):
// sm_90a warpgroup MMA (QGMMA), and fp8 mma.sync (sm_89+; on sm_90 the
// compiler lowers it to fp8->f16 conversions plus HMMA).
void indexer_logits_sm90(const DeviceContext& ctx, const IndexerLogitsParams& p);
void indexer_logits_sm89(const DeviceContext& ctx, const IndexerLogitsParams& p);
// The decode kernel (sm_90a; TMA ring + wgmma, one CTA per SM), forced: needs
// max_tokens_per_request 1 to 4 (the step's next_n; any token layout is
// right, one request's next_n consecutive tokens is the fast one) and a
// 16-byte aligned q_fp8, else ShapeError. Bit-identical to
// indexer_logits_sm90. indexer_logits takes it only when
// ctx.picks.indexer_decode == KernelPick::kNew (cuda/indexer/decode_plan.h).
void indexer_logits_decode_sm90(const DeviceContext& ctx, const IndexerLogitsParams& p);

// The prefill kernel of issue 17 (sm_90a, warp-specialized, 8 query tokens
// per CTA share each gathered key block; sm90/sm90_fp8_indexer_prefill_ws.cuh).
// indexer_logits / indexer_logits_sm90 take it for prefill and speculative
// batches (the branch that shares key tiles) when ctx.picks.indexer_prefill
// is KernelPick::kNew; kAuto and kBaseline keep the older wgmma kernel.
// Same output as the older kernel, same contract; throws ShapeError when
// indexer_logits_sm90_prefill_can_implement says no.
void indexer_logits_sm90_prefill(const DeviceContext& ctx, const IndexerLogitsParams& p);
// Empty when the prefill kernel can run p on ctx's device; otherwise why not
// (device not sm_90, pointers not aligned as its copies need, shared memory).
// Does not check the rest of the contract (indexer_logits' checks do).
std::string indexer_logits_sm90_prefill_can_implement(const DeviceContext& ctx, const IndexerLogitsParams& p);

}  // namespace dsa::cuda
