#pragma once
// Lightning-indexer logits over the paged fp8 indexer K cache, and causal
// top-k (spec 3.5). Logits are materialized: [T, logits_stride] fp32.
#include <cuda_runtime.h>

#include <cstdint>

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
  cudaStream_t stream = nullptr;
};

// Picks the fastest kernel for the device (wgmma on sm_90, else mma.sync).
// Throws ShapeError for inputs outside the contract (num_heads != 64,
// tokens_per_block != 64, null or misaligned pointers), CudaError below
// sm_89. Device-side values are not checked on the host (that would need a
// sync): a visible_end outside [0, min(logits_stride, max_blocks * 64)] is
// clamped into it, so a bad one gives wrong logits but never a stray access.
// Deterministic: fixed reduction order, no atomics. No workspace.
void indexer_logits(const IndexerLogitsParams& p);
// The two kernels, callable on their own (tests, benchmarks):
// sm_90a warpgroup MMA (QGMMA), and fp8 mma.sync (sm_89+; on sm_90 the
// compiler lowers it to fp8->f16 conversions plus HMMA).
void indexer_logits_sm90(const IndexerLogitsParams& p);
void indexer_logits_mma(const IndexerLogitsParams& p);

struct TopkParams {
  const float* logits = nullptr;        // [T, logits_stride] fp32
  const int32_t* visible_end = nullptr; // [T] int32: only columns [0, visible_end) are candidates
  int32_t* out = nullptr;               // [T, k] int32 request-local positions of the min(k, visible) largest
                                        // (ties to the smaller position), in ascending position order (a
                                        // deterministic order for the attention's sum), then -1 padding
  int64_t T = 0;
  int64_t logits_stride = 0;
  int k = 2048;
  void* workspace = nullptr;            // topk_workspace_bytes(...) bytes, may be null if that is 0
  cudaStream_t stream = nullptr;
};

// Always 0: the radix select keeps everything in shared memory.
size_t topk_workspace_bytes(int64_t T, int64_t logits_stride, int k);
// Exact and deterministic; NaN ranks with -inf and -0.0 ties with +0.0 (as
// dsa::ref::topk). visible_end is clamped into [0, logits_stride]. Throws
// ShapeError for negative T or k, logits_stride outside [1, 2^31 - 1], null
// or misaligned pointers.
void topk(const TopkParams& p);

// Microbenchmarks for `dsa bench` and docs/performance.md: inputs are made on
// the device from `seed` (random, never zeros), the op is timed with CUDA
// events after `warmup` runs, and the median of `iters` runs is reported with
// the work it did, counted as spec section 8 counts it.
struct KernelTiming {
  double median_ms = 0, min_ms = 0, max_ms = 0;
  double flops = 0;  // indexer: 2 * 64 * 128 * sum_t visible_end[t]; top-k: 0
  double bytes = 0;  // inputs read once + outputs written once
};
// `requests` requests, each with `cached` tokens in the paged cache and
// `num_new` new query tokens (prefill: cached 0, num_new 4096; decode:
// num_new 1). Causal: new token i sees cached + i + 1 keys.
enum class IndexerKernel { Auto, Sm90Wgmma, MmaSync };
KernelTiming bench_indexer_logits(int64_t requests, int64_t cached, int64_t num_new, int warmup, int iters,
                                  uint64_t seed, IndexerKernel kernel = IndexerKernel::Auto);
// Top-k of k over [T, S] fp32 logits. causal = false: every row sees all S
// columns (the torch.topk comparison); causal = true: row t sees S - T + t + 1.
KernelTiming bench_topk(int64_t T, int64_t S, int k, bool causal, int warmup, int iters, uint64_t seed);

}  // namespace dsa::cuda
