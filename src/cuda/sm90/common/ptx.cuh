#pragma once
// Hopper (sm_90a) PTX helpers shared by the kernels under src/cuda: shared
// addresses, proxy fences, named barriers, register fences, conversions.
// The asynchronous copies, mbarriers and wgmma have their own headers
// (mbarrier.cuh, wgmma.cuh); all live in dsa::cuda::sm90. cp.async, which the sm_89
// indexer kernel uses too, is in src/cuda/common/cp_async.cuh (dsa::cuda).
#include <cuda_bf16.h>

#include <cstdint>

namespace dsa::cuda::sm90 {

// 32-bit shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Generic-proxy writes (cp.async, st.shared) become visible to the async
// proxy (wgmma, bulk copies).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Named barriers (id 0 is __syncthreads): `threads` is a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Keeps the compiler from moving accesses of wgmma accumulators across the
// asynchronous window (they are written by the tensor cores, not by the thread).
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// a * b, two unsigned 32-bit values to a 64-bit product: one IMAD.WIDE.U32
// (the second operand may come straight from the parameter bank). Address
// math with 64-bit strides truncated to 32 bits in C++ is not always seen
// through and becomes a 64 x 64-bit multiply (three IMADs and shifts).
__device__ __forceinline__ uint64_t mul_wide_u32(uint32_t a, uint32_t b) {
  uint64_t d;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(d) : "r"(a), "r"(b));
  return d;
}

// 2^x, MUFU.EX2 (flushes denormals).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Two floats rounded to bf16 (round to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace dsa::cuda::sm90
