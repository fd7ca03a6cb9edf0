#pragma once
// Host side shared by the indexer-logits dispatch (indexer_logits.cu) and the
// kernels' launch templates, which are instantiated one variant per file in
// instantiations/ (the set of compiled variants is the dispatch in
// indexer_logits.cu).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cuda/indexer/params.h"

namespace dsa::cuda::indexer {

// Per kernel instantiation and device: the shared-memory opt-in (above 48 KB
// it must be asked for) and the resulting CTAs per SM, both done once so
// that later launches are legal inside CUDA graph capture and cost no queries.
struct KernelSetup {
  std::atomic<int> ctas_per_sm[64] = {};
};
// CTAs of `kernel` per SM on ctx's device, opting in to smem_bytes of
// dynamic shared memory on first use; throws CudaError when none fits.
int prepare_kernel(const void* kernel, int threads, int smem_bytes, const DeviceContext& ctx, KernelSetup& setup);

// Token tiles on x, key splits on y; tiles_per_split receives the key tiles
// of one split.
dim3 make_grid(const IndexerLogitsParams& p, const DeviceContext& ctx, int tokens_per_cta, int tile_keys, int ctas_per_sm,
               int64_t& tiles_per_split);

// kBT query tokens per CTA, kKB 64-key cache blocks per key tile, kStages
// pipeline stages. Defined beside each kernel.
namespace sm89 {
template <int kBT, int kKB, int kStages>
void launch_mma(const DeviceContext& ctx, const IndexerLogitsParams& p);
}
namespace sm90 {
template <int kBT, int kKB, int kStages>
void launch_wgmma(const DeviceContext& ctx, const IndexerLogitsParams& p);
// The warp-specialized prefill kernel (8 tokens per CTA, kStages key blocks
// in flight) and the dynamic shared memory it asks for.
template <int kStages>
void launch_prefill_ws(const DeviceContext& ctx, const IndexerLogitsParams& p);
template <int kStages>
int prefill_ws_smem_bytes();
}

}  // namespace dsa::cuda::indexer
