// Microbenchmarks of the indexer logits and top-k kernels (kernel_bench.h).
// Inputs are generated on the device from a hash of (seed, index) so that
// large shapes (1 GB of logits) cost no host time, and are never zero.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "bench/cuda/kernel_bench.h"
#include "cuda/check.cuh"
#include "cuda/indexer/params.h"
#include "cuda/topk/params.h"
#include "dsa/stats.h"
#include "dsa/cuda.h"
#include "dsa/hash.h"

namespace dsa::cuda {
namespace {

// Uniform in [lo, hi) from 24 random bits.
__device__ __forceinline__ float hash_uniform(uint64_t seed, uint64_t i, float lo, float hi) {
  const float u = hash_unit_interval(mix64(seed * 0x100000001b3ull + i));
  return lo + (hi - lo) * u;
}

__global__ void fill_uniform(float* x, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = hash_uniform(seed, i, lo, hi);
  }
}

// Random e4m3 bytes; 0x7f / 0xff are NaN in e4m3fn and are avoided.
__global__ void fill_fp8(uint8_t* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint8_t b = static_cast<uint8_t>(mix64(seed * 0x100000001b3ull + i) >> 56);
    if ((b & 0x7f) == 0x7f) b ^= 1;
    x[i] = b;
  }
}

// Each indexer-cache block ends with 64 fp32 scales: make them positive, in [0.5, 2).
__global__ void fill_block_scales(uint8_t* cache, uint64_t seed) {
  float* scales = reinterpret_cast<float*>(cache + static_cast<int64_t>(blockIdx.x) * 64 * 132 + 64 * 128);
  scales[threadIdx.x] = hash_uniform(seed, blockIdx.x * 64ull + threadIdx.x, 0.5f, 2.f);
}

template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) { DSA_CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T))); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

struct Events {
  cudaEvent_t a = nullptr, b = nullptr;
  Events() {
    DSA_CUDA_CHECK(cudaEventCreate(&a));
    DSA_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~Events() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
};

template <class F>
KernelTiming time_it(F&& f, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) f();
  DSA_CUDA_CHECK(cudaDeviceSynchronize());
  Events ev;
  std::vector<double> ms;
  for (int i = 0; i < std::max(iters, 1); ++i) {
    DSA_CUDA_CHECK(cudaEventRecord(ev.a));
    f();
    DSA_CUDA_CHECK(cudaEventRecord(ev.b));
    DSA_CUDA_CHECK(cudaEventSynchronize(ev.b));
    float t = 0;
    DSA_CUDA_CHECK(cudaEventElapsedTime(&t, ev.a, ev.b));
    ms.push_back(t);
  }
  const SampleSummary s = summarize(ms);
  KernelTiming r;
  r.median_ms = s.median, r.min_ms = s.min, r.max_ms = s.max;
  return r;
}

void launch_fill(float* x, int64_t n, uint64_t seed, float lo, float hi) {
  fill_uniform<<<1024, 256>>>(x, n, seed, lo, hi);
  DSA_CHECK_LAUNCH("fill_uniform");
}
void launch_fill(uint8_t* x, int64_t n, uint64_t seed) {
  fill_fp8<<<1024, 256>>>(x, n, seed);
  DSA_CHECK_LAUNCH("fill_fp8");
}

}  // namespace

KernelTiming indexer_logits_bench(int64_t requests, int64_t cached, int64_t num_new, int warmup, int iters,
                                  uint64_t seed, IndexerKernel kernel, const KernelPicks& picks) {
  if (requests < 1 || cached < 0 || num_new < 1) {
    throw ShapeError("indexer_logits_bench: needs requests >= 1, cached >= 0, num_new >= 1");
  }
  DeviceContext ctx = device_context();
  ctx.picks = picks;
  constexpr int64_t kTpb = 64, kHeads = 64, kDim = 128;
  const int64_t seq = cached + num_new;
  const int64_t blocks_per_req = (seq + kTpb - 1) / kTpb;
  const int64_t num_blocks = requests * blocks_per_req;
  const int64_t T = requests * num_new;

  // Blocks of different requests interleaved in the pool, as a real cache ends up.
  std::vector<int32_t> perm(static_cast<size_t>(num_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(seed));
  std::vector<int32_t> token_request(static_cast<size_t>(T)), visible_end(static_cast<size_t>(T));
  double visible = 0, cache_bytes = 0;
  for (int64_t r = 0; r < requests; ++r) {
    for (int64_t i = 0; i < num_new; ++i) {
      token_request[r * num_new + i] = static_cast<int32_t>(r);
      visible_end[r * num_new + i] = static_cast<int32_t>(cached + i + 1);
      visible += static_cast<double>(cached + i + 1);
    }
    cache_bytes += static_cast<double>(blocks_per_req) * kTpb * (kDim + 4);
  }

  DeviceBuffer<uint8_t> q(T * kHeads * kDim), cache(num_blocks * kTpb * (kDim + 4));
  DeviceBuffer<float> w(T * kHeads), logits(T * seq);
  DeviceBuffer<int32_t> bt(num_blocks), treq(T), vend(T);
  launch_fill(q.ptr, T * kHeads * kDim, seed + 1);
  launch_fill(w.ptr, T * kHeads, seed + 2, -1.f, 1.f);
  launch_fill(cache.ptr, num_blocks * kTpb * (kDim + 4), seed + 3);
  fill_block_scales<<<static_cast<unsigned>(num_blocks), kTpb>>>(cache.ptr, seed + 4);
  DSA_CHECK_LAUNCH("fill_block_scales");
  DSA_CUDA_CHECK(cudaMemcpy(bt.ptr, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
  DSA_CUDA_CHECK(cudaMemcpy(treq.ptr, token_request.data(), token_request.size() * 4, cudaMemcpyHostToDevice));
  DSA_CUDA_CHECK(cudaMemcpy(vend.ptr, visible_end.data(), visible_end.size() * 4, cudaMemcpyHostToDevice));

  IndexerLogitsParams p;
  p.q_fp8 = q.ptr;
  p.weights = w.ptr;
  p.k_cache = cache.ptr;
  p.block_table = bt.ptr;
  p.token_request = treq.ptr;
  p.visible_end = vend.ptr;
  p.logits = logits.ptr;
  p.T = T;
  p.logits_stride = seq;
  p.max_blocks_per_request = blocks_per_req;
  p.max_tokens_per_request = static_cast<int>(num_new);
  auto fn = kernel == IndexerKernel::Sm90Wgmma ? indexer_logits_sm90
            : kernel == IndexerKernel::Sm89Mma   ? indexer_logits_sm89
                                                 : indexer_logits;
  KernelTiming r = time_it([&] { fn(ctx, p); }, warmup, iters);
  r.flops = 2.0 * kHeads * kDim * visible;
  r.bytes = cache_bytes + static_cast<double>(T) * (kHeads * kDim + kHeads * 4) + static_cast<double>(T) * seq * 4;
  return r;
}

KernelTiming topk_bench(int64_t T, int64_t S, int k, bool causal, int warmup, int iters, uint64_t seed,
                        const KernelPicks& picks) {
  if (T < 1 || S < 1 || k < 1 || (causal && T > S)) {
    throw ShapeError("topk_bench: needs T >= 1, S >= 1, k >= 1 and, when causal, T <= S");
  }
  DeviceContext ctx = device_context();
  ctx.picks = picks;
  DeviceBuffer<float> logits(T * S);
  DeviceBuffer<int32_t> vend(T), out(T * k);
  launch_fill(logits.ptr, T * S, seed, -4.f, 4.f);
  std::vector<int32_t> ve(static_cast<size_t>(T));
  double read = 0;
  for (int64_t t = 0; t < T; ++t) {
    ve[t] = static_cast<int32_t>(causal ? S - T + t + 1 : S);
    read += ve[t];
  }
  DSA_CUDA_CHECK(cudaMemcpy(vend.ptr, ve.data(), ve.size() * 4, cudaMemcpyHostToDevice));
  TopkParams p;
  p.logits = logits.ptr;
  p.visible_end = vend.ptr;
  p.out = out.ptr;
  p.T = T;
  p.logits_stride = S;
  p.k = k;
  KernelTiming r = time_it([&] { topk(ctx, p); }, warmup, iters);
  r.bytes = read * 4 + static_cast<double>(T) * k * 4;
  return r;
}

}  // namespace dsa::cuda
