#pragma once
// cp.async (sm_80+) as both indexer-logits kernels use it: 16-byte copies
// from global to shared memory that gather key blocks through the block table.
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa::cuda::indexer::detail {

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace dsa::cuda::indexer::detail
