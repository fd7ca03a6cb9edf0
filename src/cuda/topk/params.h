#pragma once
// Causal top-k over the indexer logits (spec 3.5): the k largest visible
// logits of each row, as request-local positions.
#include <cstddef>
#include <cstdint>

#include "dsa/cuda.h"

namespace dsa::cuda {

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
};

// Always 0: the radix select keeps everything in shared memory.
size_t topk_workspace_bytes(int64_t T, int64_t logits_stride, int k);
// Launches on ctx.stream. Exact and deterministic; NaN ranks with -inf and
// -0.0 ties with +0.0 (as dsa::ref::topk). visible_end is clamped into
// [0, logits_stride]. Throws ShapeError for negative T or k, logits_stride
// outside [1, 2^31 - 1], null or misaligned pointers.
void topk(const DeviceContext& ctx, const TopkParams& p);

// Whether ctx.picks.topk == KernelPick::kNew runs the one-read streaming kernel
// (topk_stream.cuh) for p: k <= 2048 (its candidate buffer holds k plus one
// 4096-logit chunk) and 16-byte rows (logits 16-byte aligned, logits_stride a
// multiple of 4: it copies whole float4). Otherwise, and for kAuto and
// kBaseline, the radix kernel runs. Both give the same bytes.
bool topk_runs_stream_kernel(const DeviceContext& ctx, const TopkParams& p);

}  // namespace dsa::cuda
