// Host launcher of the gather-order pre-pass (sort_indices.cuh), in its own
// translation unit: the H = 64 and H = 128 instantiations both call it.
#include "cuda/check.cuh"
#include "cuda/sm90/sparse_mla/config.h"
#include "cuda/sm90/sparse_mla/sort_indices.cuh"

namespace dsa::cuda::sm90_sparse_mla {

void launch_sort_indices(const SparseMlaParams& p, int32_t* sorted, int sms, int shift) {
  if (p.T <= 0) return;
  if (shift < 0) shift = sort_bucket_shift(p.num_slots);
  // 64 registers x 256 threads: 4 blocks per SM; each loops over tokens.
  const int64_t grid = std::min<int64_t>(p.T, static_cast<int64_t>(sms) * 4);
  sort_indices_kernel<<<static_cast<unsigned>(grid), kSortThreads, 0, p.stream>>>(
      p.indices, p.valid_len, p.T, p.topk, p.num_slots, shift, sorted);
  DSA_CHECK_LAUNCH("sort_indices_kernel");
}

}  // namespace dsa::cuda::sm90_sparse_mla
