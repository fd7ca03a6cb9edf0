// Host side of the decode indexer-logits kernel (sm90/sm90_fp8_indexer_decode.cuh):
// when the dispatch may take it, its tensor maps, and the choice of the
// compiled next_n variant.
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda/check.cuh"
#include "cuda/indexer/config.h"
#include "cuda/indexer/decode_plan.h"
#include "cuda/indexer/params.h"

namespace dsa::cuda::indexer {

namespace sm90 {
// Declared beside the kernel (it needs CUtensorMap); defined here once.
void make_decode_tensor_maps(const DeviceContext& ctx, const IndexerLogitsParams& p, int next_n, CUtensorMap& k_map,
                             CUtensorMap& q_map);
}  // namespace sm90

namespace {

// The driver's encoder through the runtime (no link against libcuda), looked
// up once per process.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    DSA_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || f == nullptr) {
      throw CudaError("indexer_logits: the driver has no cuTensorMapEncodeTiled (needs CUDA 12.0 or newer); "
                      "use the baseline indexer kernel");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// [items][rows][128 bytes], item_stride bytes apart; boxes of box_items x rows
// x 128 with the 128-byte swizzle wgmma's K-major descriptors expect.
void encode_rows(CUtensorMap& map, const void* base, uint64_t rows, uint64_t items, uint64_t item_stride,
                 uint32_t box_items, const char* what) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(kIdxDim), rows, items};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(kIdxDim), item_stride};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(kIdxDim), static_cast<cuuint32_t>(rows), box_items};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(base), dims, strides,
                                          box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw CudaError(fmt::format("indexer_logits: encoding the {} tensor map failed (CUresult {})", what, static_cast<int>(r)));
  }
}

}  // namespace

void sm90::make_decode_tensor_maps(const DeviceContext& ctx, const IndexerLogitsParams& p, int next_n,
                                   CUtensorMap& k_map, CUtensorMap& q_map) {
  // The pool's size is not in the params; no pool is larger than the device's
  // memory, so that bounds the block ids (a larger id would read zeros, not
  // fault: TMA fills outside the map's extent).
  const uint64_t max_blocks =
      std::min<uint64_t>(std::numeric_limits<int32_t>::max(), ctx.device->global_memory / kIdxBlockBytes + 1);
  encode_rows(k_map, p.k_cache, kIdxBlockBytes / kIdxDim, max_blocks, kIdxBlockBytes, 1, "indexer K cache");
  encode_rows(q_map, p.q_fp8, kIdxHeads, static_cast<uint64_t>(p.T), static_cast<uint64_t>(kIdxHeads) * kIdxDim,
              static_cast<uint32_t>(next_n), "indexer query");
}

bool decode_eligible(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  return ctx.picks.resolved().indexer_decode == KernelPick::kNew && ctx.sm() == 90 && decode_shape_ok(p);
}

bool decode_shape_ok(const IndexerLogitsParams& p) {
  return p.max_tokens_per_request >= 1 && p.max_tokens_per_request <= 4 &&
         reinterpret_cast<uintptr_t>(p.q_fp8) % 16 == 0 && p.T <= std::numeric_limits<int32_t>::max();
}

void run_decode(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  if (!decode_shape_ok(p)) {
    throw ShapeError(fmt::format("indexer_logits (decode kernel): needs max_tokens_per_request 1 to 4 (got {}), q_fp8 "
                                 "16-byte aligned and T < 2^31; use indexer_logits, which falls back to the baseline",
                                 p.max_tokens_per_request));
  }
  switch (p.max_tokens_per_request) {
    case 1: sm90::launch_decode<1>(ctx, p); break;
    case 2: sm90::launch_decode<2>(ctx, p); break;
    case 3: sm90::launch_decode<3>(ctx, p); break;
    default: sm90::launch_decode<4>(ctx, p); break;
  }
}

}  // namespace dsa::cuda::indexer
