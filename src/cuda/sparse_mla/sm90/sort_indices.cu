// Host launcher of the gather-order pre-pass (sort_indices.cuh), in its own
// translation unit: the launcher of every kernel build calls it.
#include "cuda/check.cuh"
#include "cuda/sparse_mla/sm90/config.h"
#include "cuda/sparse_mla/sm90/sort_indices.cuh"

namespace dsa::cuda::sm90_sparse_mla {

void launch_sort_indices(const SparseMlaParams& p, int32_t* sorted, const DeviceContext& ctx, int shift) {
  if (p.T <= 0) return;
  if (shift < 0) shift = sort_bucket_shift(p.num_slots);
  // 64 registers x 256 threads: 4 blocks per SM; each loops over tokens.
  const int64_t grid = std::min<int64_t>(p.T, static_cast<int64_t>(ctx.num_sms()) * 4);
  sort_indices_kernel<<<static_cast<unsigned>(grid), kSortThreads, 0, ctx.stream>>>(
      p.indices, p.stride_indices_t, p.valid_len, p.stride_valid_len_t, p.T, p.topk, p.num_slots, shift, sorted);
  DSA_CHECK_LAUNCH("sort_indices_kernel");
}

}  // namespace dsa::cuda::sm90_sparse_mla
