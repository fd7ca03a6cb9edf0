// Tensor-core ceilings for the sparse MLA kernel's wgmma shapes on one SM:
// two warpgroups issue back-to-back groups of one shape from shared memory
// (no loads, no softmax), one CTA per SM. Prints TFLOP/s per shape so the
// kernel's time can be read against what its instructions can reach.
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Iinclude -Isrc \
//     dev/sparse_mla/wgmma_rate.cu -o /tmp/wgmma_rate
#include <cstdio>

#include "cuda/sparse_mla/sm90/sm90_bf16_sparse_mla.cuh"

using namespace dsa::cuda::sm90_sparse_mla;

template <int kShape>
__global__ void __launch_bounds__(256, 1) rate_kernel(int iters, float* sink) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  uint8_t* smem = smem_raw + ((1024 - (raw & 1023)) & 1023);
  const uint32_t base = smem_addr(smem);
  for (int i = threadIdx.x; i < 200 * 1024 / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(smem)[i] = 0x3c003c00u ^ (i * 2654435761u & 0x00ff00ffu);
  fence_proxy_async();
  __syncthreads();
  const int w = threadIdx.x / 128;
  const uint32_t q = base, tile = base + kTileBytes + w * kTileBytes / 2;
  float sc[32];
  float o[128];
#pragma unroll
  for (int k = 0; k < 32; ++k) sc[k] = 0.f;
#pragma unroll
  for (int k = 0; k < 128; ++k) o[k] = 0.f;
  uint32_t pa[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  fence_regs(o);
  fence_regs(sc);
  for (int it = 0; it < iters; ++it) {
    wgmma_fence();
    if constexpr (kShape == 0) {  // Q K^T: 36 x m64n64k16, A and B from smem
      qk_4_segments(sc, sw128_desc_lo_k_major(q), sw128_desc_lo_k_major(tile), 0, true);
      qk_4_segments(sc, sw128_desc_lo_k_major(q), sw128_desc_lo_k_major(tile), 4, false);
      qk_rope_segment(sc, sw128_desc_lo_k_major(q), sw128_desc_lo_k_major(tile));
    } else if constexpr (kShape == 1) {  // P V own: 4 x m64n256k16, A from registers
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_bf16_rs_tb(o, pa[0], pa[1], pa[2], pa[3], sw128_desc(v_desc_lo(tile + kk * 16 * 128)));
    } else {  // P V other: 4 x m64n256k16, A from smem
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_bf16_ss_tb(o, sw128_desc_k_major(q + kk * 32), sw128_desc(v_desc_lo(tile + kk * 16 * 128)), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(sc);
  }
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < 32; ++k) acc += sc[k];
#pragma unroll
  for (int k = 0; k < 128; ++k) acc += o[k];
  if (acc == 12345.f) sink[threadIdx.x] = acc;
}

template <int kShape>
void run(const char* name, double flops_per_iter, int sms) {
  auto k = rate_kernel<kShape>;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 210 * 1024);
  float* sink;
  cudaMalloc(&sink, 4096);
  const int iters = 4000;
  k<<<sms, 256, 210 * 1024>>>(10, sink);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  k<<<sms, 256, 210 * 1024>>>(iters, sink);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  const double fl = flops_per_iter * 2 /*WGs*/ * iters * sms;
  std::printf("%-44s %8.3f ms  %6.1f TFLOP/s  (%s)\n", name, ms, fl / (ms * 1e-3) / 1e12,
              cudaGetErrorString(cudaGetLastError()));
  cudaFree(sink);
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  run<0>("QK^T 36 x m64n64k16 SS", 2.0 * 64 * 64 * 576, sms);
  run<1>("PV 4 x m64n256k16 RS (A in registers)", 2.0 * 64 * 256 * 64, sms);
  run<2>("PV 4 x m64n256k16 SS (A in smem)", 2.0 * 64 * 256 * 64, sms);
  return 0;
}
