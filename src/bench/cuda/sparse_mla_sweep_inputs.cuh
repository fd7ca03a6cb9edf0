#pragma once
// Issue 6's sparse MLA sweep inputs, shared by `dsa bench --sweep-sparse-mla`
// (sparse_mla_sweep.cu) and the development bench
// (dev/sparse_mla/sparse_mla_dev.cu), with the input fill, clock probe and
// event pool also used by the decode sweep (sparse_mla_decode_sweep.cu): T = 4096
// queries at the end of a context of s_kv tokens, topk 2048, each query at
// position p attending to min(2048, p + 1) distinct random positions among
// 0..p, and FlashMLA's sparse prefill times on an H100 80GB HBM3 (issue 6).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda/check.cuh"
#include "dsa/hash.h"

namespace dsa::cuda::sparse_mla_sweep {

constexpr int kT = 4096;
constexpr int kTopk = 2048;
constexpr int kDqk = 576;
constexpr int kDv = 512;
constexpr double kPeakTflops = 790.0;
constexpr int64_t kSkv[] = {4096, 8192, 32768, 65536, 131072};

// Deterministic pseudo-random bf16 in [-1, 1) from (seed, element index),
// the project's hash (dsa/hash.h).
static __global__ void fill_random_bf16(__nv_bfloat16* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // mix64 of (i + seed - 1) times its own increment: the values every
    // earlier sweep and dev-bench figure was measured on (the data moves the
    // card's clock under this power-bound load, so it stays fixed).
    const uint64_t h = mix64((static_cast<uint64_t>(i) + seed - 1) * 0x9e3779b97f4a7c15ull);
    x[i] = __float2bfloat16(hash_unit_interval(h) * 2.0f - 1.0f);
  }
}

// The average SM clock over a stretch of stream work: one thread reads
// %globaltimer, clock64() and %smid into out[0..2]; launch it before the
// work (out) and after it (out + 3). Under this kernel's load the H100 holds
// its clock well below the 1980 MHz maximum (power), and lower the longer
// the load lasts, which is most of the spread between sweeps.
static __global__ void sm_clock_probe(unsigned long long* out) {
  unsigned long long g = 0;
  unsigned s = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g));
  const unsigned long long c = clock64();
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  out[0] = g;
  out[1] = c;
  out[2] = s;
}

// MHz from the two probes; clock64() counters of different SMs are not
// aligned, so a pair that ran on two SMs gives no figure (0).
inline double probe_mhz(const unsigned long long (&h)[6]) {
  if (h[2] != h[5] || h[3] <= h[0] || h[4] <= h[1]) return 0.0;
  return static_cast<double>(h[4] - h[1]) * 1e3 / static_cast<double>(h[3] - h[0]);
}

// Query t sits at position p = s_kv - T + t and picks min(topk, p + 1)
// distinct positions in [0, p] (slot = position), random order, -1 padded.
inline std::vector<int32_t> make_indices(int64_t s_kv, uint64_t seed, int64_t* valid_total) {
  std::vector<int32_t> idx(static_cast<size_t>(kT) * kTopk, -1);
  std::vector<uint32_t> stamp(static_cast<size_t>(s_kv), 0);
  std::mt19937_64 rng(seed ^ static_cast<uint64_t>(s_kv));
  int64_t total = 0;
  for (int t = 0; t < kT; ++t) {
    const int64_t pos = s_kv - kT + t;
    const int k = static_cast<int>(std::min<int64_t>(kTopk, pos + 1));
    int32_t* row = &idx[static_cast<size_t>(t) * kTopk];
    if (k == pos + 1) {
      for (int j = 0; j < k; ++j) row[j] = j;
      std::shuffle(row, row + k, rng);
    } else {
      std::uniform_int_distribution<int64_t> d(0, pos);
      const uint32_t mark = static_cast<uint32_t>(t) + 1;
      for (int j = 0; j < k;) {
        const int64_t c = d(rng);
        if (stamp[c] == mark) continue;
        stamp[c] = mark;
        row[j++] = static_cast<int32_t>(c);
      }
    }
    total += k;
  }
  *valid_total = total;
  return idx;
}

// CUDA events made on first use, destroyed with the pool (each timed run
// between its own pair, as both sweeps' protocols ask).
struct EventPool {
  std::vector<cudaEvent_t> ev;
  cudaEvent_t get(size_t i) {
    if (i >= ev.size()) ev.resize(i + 1, nullptr);
    if (!ev[i]) DSA_CUDA_CHECK(cudaEventCreate(&ev[i]));
    return ev[i];
  }
  EventPool() = default;
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;
  ~EventPool() {
    for (cudaEvent_t e : ev)
      if (e) cudaEventDestroy(e);
  }
};

}  // namespace dsa::cuda::sparse_mla_sweep
