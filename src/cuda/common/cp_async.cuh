#pragma once
// cp.async (sm_80+: the sm_89 and sm_90a kernels share it): 16-byte global ->
// shared copies through L2 only (.cg), their groups, and their arrival on an
// mbarrier.
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa::cuda {

// 16-byte copy to shared address dst (16-byte aligned) from global src
// (16-byte aligned); src_bytes < 16 reads that many bytes and zero-fills the
// rest: 0 writes zeros and reads nothing (src need not be valid memory then,
// but must still be a global address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
// The same to a generic pointer into shared memory.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(dst)), src);
}

// Groups: commit the copies issued so far; wait until at most N groups are pending.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Arrives on mbarrier `bar` once all cp.async copies this thread issued so
// far have landed; the thread itself moves on (the count is not incremented
// first, so the barrier's expected count includes these arrivals).
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

}  // namespace dsa::cuda
