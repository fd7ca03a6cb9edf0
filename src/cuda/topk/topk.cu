// Host launcher of the causal top-k (spec 3.5).
#include <fmt/format.h>

#include <atomic>
#include <cstdint>

#include "cuda/check.cuh"
#include "cuda/topk/params.h"
#include "cuda/topk/topk_radix.cuh"
#include "cuda/topk/topk_stream.cuh"

namespace dsa::cuda {

size_t topk_workspace_bytes(int64_t, int64_t, int) { return 0; }  // everything lives in shared memory

namespace {

bool stream_shape_ok(const TopkParams& p) {
  return p.k >= 1 && p.k <= topk_stream::kMaxK && p.logits_stride % 4 == 0 &&
         reinterpret_cast<uintptr_t>(p.logits) % 16 == 0;
}

// cudaFuncSetAttribute once per device (bit d), so that launches stay legal
// inside CUDA graph capture.
template <class Kernel>
void opt_in_smem(const DeviceContext& ctx, std::atomic<uint64_t>& configured, Kernel kernel, int smem, bool max_carveout) {
  const int dev = ctx.device->index;
  const uint64_t bit = dev >= 0 && dev < 64 ? uint64_t{1} << dev : 0;
  if (bit == 0 || !(configured.load(std::memory_order_acquire) & bit)) {
    DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    // Two 104 KB CTAs per SM need the largest shared-memory carveout.
    if (max_carveout) {
      DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                          cudaSharedmemCarveoutMaxShared));
    }
    configured.fetch_or(bit, std::memory_order_release);
  }
}

}  // namespace

bool topk_runs_stream_kernel(const DeviceContext& ctx, const TopkParams& p) {
  return ctx.picks.resolved().topk == KernelPick::kNew && stream_shape_ok(p) &&
         ctx.smem_optin_per_block() >= sizeof(topk_stream::Smem);
}

void topk(const DeviceContext& ctx, const TopkParams& p) {
  if (p.T < 0 || p.k < 0) {
    throw ShapeError(fmt::format("topk: T = {} and k = {} must be >= 0", p.T, p.k));
  }
  if (p.T == 0 || p.k == 0) return;
  if (p.logits == nullptr || p.visible_end == nullptr || p.out == nullptr) {
    throw ShapeError("topk: logits, visible_end and out must be device pointers, not null");
  }
  // Positions are int32 in the output, and the per-row counters are 32-bit.
  if (p.logits_stride < 1 || p.logits_stride > 0x7fffffffLL) {
    throw ShapeError(fmt::format("topk: logits_stride = {} must be in [1, 2^31 - 1] (positions are int32)",
                                 p.logits_stride));
  }
  if (p.T > 0x7fffffffLL) {
    throw ShapeError(fmt::format("topk: T = {} rows exceed the 2^31 - 1 CTAs of one launch; split the batch", p.T));
  }
  if (reinterpret_cast<uintptr_t>(p.logits) % 4 != 0) {
    throw ShapeError("topk: logits must be 4-byte aligned (fp32); pass a cudaMalloc'd buffer");
  }
  if (topk_runs_stream_kernel(ctx, p)) {
    constexpr int kSmem = sizeof(topk_stream::Smem);
    static std::atomic<uint64_t> configured{0};
    opt_in_smem(ctx, configured, topk_stream::topk_stream_kernel, kSmem, true);
    topk_stream::topk_stream_kernel<<<static_cast<unsigned>(p.T), topk_stream::kThreads, kSmem, ctx.stream>>>(p);
    DSA_CHECK_LAUNCH("topk_stream_kernel");
    return;
  }
  const bool vec = p.logits_stride % 4 == 0 && reinterpret_cast<uintptr_t>(p.logits) % 16 == 0;
  constexpr int kSmem = sizeof(topk_impl::Smem);
  static std::atomic<uint64_t> configured{0};
  opt_in_smem(ctx, configured, topk_impl::topk_radix_kernel, kSmem, false);
  topk_impl::topk_radix_kernel<<<static_cast<unsigned>(p.T), topk_impl::kThreads, kSmem, ctx.stream>>>(p, vec);
  DSA_CHECK_LAUNCH("topk_radix_kernel");
}

}  // namespace dsa::cuda
