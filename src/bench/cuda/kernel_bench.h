#pragma once
// Kernel microbenchmarks for the GPU tests, `dsa bench` and
// docs/performance.md (target dsa_bench, not the library): inputs are made
// on the device from `seed` (random, never zeros), the op is timed with CUDA
// events on the default stream after `warmup` runs, and the median of `iters`
// runs is reported with the work it did, counted as spec section 8 counts it.
#include <cstdint>

#include "dsa/cuda.h"

namespace dsa::cuda {

struct KernelTiming {
  double median_ms = 0, min_ms = 0, max_ms = 0;
  double flops = 0;  // indexer: 2 * 64 * 128 * sum_t visible_end[t]; top-k: 0
  double bytes = 0;  // inputs read once + outputs written once
};

// Indexer logits (cuda/indexer/params.h): `requests` requests, each with
// `cached` tokens in the paged cache and `num_new` new query tokens (prefill:
// cached 0, num_new 4096; decode: num_new 1). Causal: new token i sees
// cached + i + 1 keys. `kernel` picks the launcher: the dispatch or one kernel.
// `picks` go into the launch's DeviceContext (indexer_prefill /
// indexer_decode), so one process can time the baseline and the new kernel.
enum class IndexerKernel { Auto, Sm90Wgmma, Sm89Mma };
KernelTiming indexer_logits_bench(int64_t requests, int64_t cached, int64_t num_new, int warmup, int iters,
                                  uint64_t seed, IndexerKernel kernel = IndexerKernel::Auto, const KernelPicks& picks = {});

// Top-k (cuda/topk/params.h) of k over [T, S] fp32 logits. causal = false:
// every row sees all S columns (the torch.topk comparison); causal = true:
// row t sees S - T + t + 1. `picks` (topk) go into the launch's DeviceContext.
KernelTiming topk_bench(int64_t T, int64_t S, int k, bool causal, int warmup, int iters, uint64_t seed,
                        const KernelPicks& picks = {});

}  // namespace dsa::cuda
