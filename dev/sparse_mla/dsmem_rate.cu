// Distributed shared memory ceilings for sharing gathered KV rows between the
// two CTAs of a token (H = 128): clusters of 2, one thread per CTA pushes
// bytes from its shared memory into the peer's with the bulk copy engine
// (cp.async.bulk.shared::cluster.shared::cta, completion counted on the
// peer's mbarrier), both directions at once, every SM busy (or every other
// cluster). Prints per-SM bytes per cycle and the cycles of one round
// (copies + the handshake below).
//
// Protocol: a receiver arms its barrier for round r (arrive.expect_tx) and
// then tells the sender, by a remote arrival on the sender's "may send"
// barrier, that round r's bytes may come. Without that handshake (a CTA's
// round r + 1 bytes could land before the peer had armed round r + 1) the
// first version of this test hung.
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Isrc \
//     dev/sparse_mla/dsmem_rate.cu -o /tmp/dsmem_rate
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/sm90/common/mbarrier.cuh"
#include "cuda/sm90/common/ptx.cuh"

using dsa::cuda::sm90::fence_proxy_async;
using dsa::cuda::sm90::mbar_init;
using dsa::cuda::sm90::smem_addr;

#define CK(x)                                                                                \
  do {                                                                                       \
    cudaError_t e_ = (x);                                                                    \
    if (e_ != cudaSuccess) {                                                                 \
      std::printf("%s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__);               \
      return 1;                                                                              \
    }                                                                                        \
  } while (0)

namespace {
constexpr int kSmemBytes = 200 * 1024;
constexpr uint32_t kSrc = 0, kDst = 100 * 1024, kSpan = 96 * 1024;  // source and landing areas

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ int g_timeouts;
// Waits for the phase of `parity` to complete; gives up after 0.5 s and
// counts it, so that a protocol error shows as a message instead of a hang.
__device__ __forceinline__ void wait_parity(uint32_t bar, uint32_t parity) {
  const uint64_t t0 = global_ns();
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (!done && global_ns() - t0 > 500000000ull) {
      atomicAdd(&g_timeouts, 1);
      return;
    }
  } while (!done);
}

__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(128, 1)
    push_kernel(int rounds, int chunks, int chunk_bytes, int every_cluster, long long* cycles) {
  extern __shared__ __align__(1024) uint8_t buf[];
  __shared__ __align__(8) uint64_t full, may_send;
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const uint32_t peer = rank ^ 1u;
  const uint32_t full_a = smem_addr(&full), send_a = smem_addr(&may_send);
  const uint32_t round_bytes = static_cast<uint32_t>(chunks * chunk_bytes);
  for (int i = threadIdx.x; i < kSmemBytes / 4; i += blockDim.x) reinterpret_cast<uint32_t*>(buf)[i] = i * 2654435761u;
  if (threadIdx.x == 0) {
    mbar_init(full_a, 1);
    mbar_init(send_a, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(full_a), "r"(round_bytes) : "memory");
  }
  fence_proxy_async();  // the fill above, for the copy engine
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
  const bool active = every_cluster || (blockIdx.x / 2) % 2 == 0;  // both CTAs of a cluster alike
  if (threadIdx.x == 0) {
    long long spent = -1;
    if (active) {
      uint32_t peer_full, peer_send, peer_dst;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(peer_full) : "r"(full_a), "r"(peer));
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(peer_send) : "r"(send_a), "r"(peer));
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(peer_dst) : "r"(smem_addr(buf) + kDst), "r"(peer));
      const uint32_t src = smem_addr(buf) + kSrc;
      const long long t0 = clock64();
      for (int r = 0; r < rounds; ++r) {
        if (r > 0) wait_parity(send_a, (r - 1) & 1);  // the peer has armed round r
        for (int c = 0; c < chunks; ++c) {
          const uint32_t off = static_cast<uint32_t>(c * chunk_bytes) % kSpan;
          asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                           peer_dst + off),
                       "r"(src + off), "r"(chunk_bytes), "r"(peer_full)
                       : "memory");
        }
        wait_parity(full_a, r & 1);
        if (r + 1 < rounds) {
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(full_a), "r"(round_bytes) : "memory");
          asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(peer_send) : "memory");
        }
      }
      spent = clock64() - t0;
    }
    cycles[blockIdx.x] = spent;
  }
  // No CTA leaves while its peer may still write into it.
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}
}  // namespace

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaFuncSetAttribute(push_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(128);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.gridDim = dim3(sms);
  int clusters = 0;
  CK(cudaOccupancyMaxActiveClusters(&clusters, reinterpret_cast<void*>(push_kernel), &cfg));
  const int grid = 2 * std::min(clusters, sms / 2);
  cfg.gridDim = dim3(grid);
  std::printf("clusters of 2 resident at once: %d (%d SMs); grid %d\n", clusters, sms, grid);
  long long* d_cycles = nullptr;
  CK(cudaMalloc(&d_cycles, grid * sizeof(long long)));
  std::vector<long long> cycles(grid);
  struct Case {
    int rounds, chunks, chunk_bytes, every_cluster;
    const char* name;
  };
  const Case cases[] = {
      {20, 24, 4096, 1, "24 x 4 KB per round, all clusters"}, {20, 24, 4096, 0, "24 x 4 KB, every other cluster"},
      {20, 6, 16384, 1, "6 x 16 KB, all clusters"},          {20, 96, 1024, 1, "96 x 1 KB, all clusters"},
      {200, 1, 4096, 1, "1 x 4 KB (round trip), all"},        {200, 4, 4096, 1, "4 x 4 KB (16 KB), all"},
      {200, 5, 4096, 1, "5 x 4 KB (20 KB), all"},             {200, 1, 4096, 0, "1 x 4 KB, every other cluster"},
  };
  std::printf("%-36s %12s %12s %12s %10s\n", "case", "cyc/round", "min", "max", "B/clk/SM");
  for (const Case& c : cases) {
    for (int rep = 0; rep < 2; ++rep) {  // the second launch is the one reported
      CK(cudaLaunchKernelEx(&cfg, push_kernel, c.rounds, c.chunks, c.chunk_bytes, c.every_cluster, d_cycles));
      CK(cudaDeviceSynchronize());
    }
    int timeouts = 0;
    CK(cudaMemcpyFromSymbol(&timeouts, g_timeouts, sizeof timeouts));
    if (timeouts) {
      std::printf("%s: %d waits timed out (protocol error)\n", c.name, timeouts);
      return 1;
    }
    CK(cudaMemcpy(cycles.data(), d_cycles, grid * sizeof(long long), cudaMemcpyDeviceToHost));
    std::vector<double> per_round;
    for (long long v : cycles)
      if (v > 0) per_round.push_back(static_cast<double>(v) / c.rounds);
    std::sort(per_round.begin(), per_round.end());
    const double med = per_round[per_round.size() / 2];
    std::printf("%-36s %12.0f %12.0f %12.0f %10.1f\n", c.name, med, per_round.front(), per_round.back(),
                static_cast<double>(c.chunks) * c.chunk_bytes / med);
  }
  return 0;
}
