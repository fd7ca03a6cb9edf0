#pragma once
// Gather locality for the sparse MLA kernel: each token's indices reordered
// by slot before the attention kernel reads them.
//
// Why: every token picks its rows at random over the whole cache, and the
// 132 CTAs run different tokens at once, so in the given order the rows in
// flight at any moment are spread over all of it, and once the cache is
// larger than L2 most gathers come from DRAM. In slot order, CTAs that start
// their items together walk the cache from low to high slots side by side,
// and the rows in flight fall in a band that L2 holds. Measured (issue 6's
// sweep, H100, this pre-pass included): 10-16% faster at H = 64 and 1-4% at
// H = 128 with caches of 75 and 151 MB; the gain shrinks as the CTAs drift
// apart over the rounds (H = 128, s_kv 65536, indices reordered on the host:
// 7% with 264 tokens, 2% with 4096). With a cache of 38 MB (s_kv 32768) it
// was level, and with caches inside L2 level to 4% slower, so the launcher
// reorders only caches larger than L2, and only with two or more rounds of
// items (see sort_wanted in config.h).
// Softmax and the weighted sum do not depend on the order of the selected
// rows; only the rounding of the fp32 sums does, and the order is a function
// of the inputs alone, so results stay deterministic.
#include <cstdint>

#include "cuda/sm90/common/ptx.cuh"
#include "cuda/sparse_mla/sm90/config.h"

namespace dsa::cuda::sm90_sparse_mla {

constexpr int kSortThreads = 256;
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kSortMaxTopk = kSortMaxTopkPerToken;  // V3.2's topk; each warp owns 256 consecutive positions
constexpr int kSortBuckets = 256;
constexpr uint32_t kSortInvalidKey = kSortBuckets - 1;  // after every slot bucket

// Bucket shift for num_slots: slot >> shift <= 254, so that the invalid key
// comes last. Buckets of 2^shift slots keep the band narrow (128 to 255
// buckets over the cache); within a bucket the given order stays.
inline int sort_bucket_shift(int64_t num_slots) {
  int shift = 0;
  while (((num_slots - 1) >> shift) > static_cast<int64_t>(kSortInvalidKey) - 1) ++shift;
  return shift;
}

// One block per token (grid-stride over tokens), a stable counting sort on
// 256 buckets: each warp ranks its 256 positions, 32 at a time, against the
// others of the same bucket (peers from 8 ballots, one per key bit), a scan
// over (bucket, warp) gives each warp's first position in every bucket.
// Valid entries (0 <= slot < num_slots, position < valid_len) come first in
// bucket order, then -1 for every invalid or masked entry, so the attention
// kernel needs no valid_len and stops after the last valid tile. The next
// token's indices load while this one is ranked and written. (Measured for
// 4096 x 2048 indices on an H100: 66-74 us; with match.any for the peers,
// 84-98 us; with the loads inside the ranking steps, one DRAM latency per 32
// indices, 90-100 us. CUB's BlockRadixSort on the same 8-bit keys, also
// stable, measured 63-72 us in another call, the same within the spread;
// this kernel is the one the tests validated, and CUB's would do as well.)
__global__ void __launch_bounds__(kSortThreads, 4)
    sort_indices_kernel(const int32_t* __restrict__ indices, int64_t stride_indices_t,       // [T, topk]
                        const int32_t* __restrict__ valid_len, int64_t stride_valid_len_t,  // [T] or null
                        int64_t T, int topk, int64_t num_slots, int shift,
                        int32_t* __restrict__ sorted) {  // [T, topk], dense
  __shared__ uint32_t count[kSortWarps][kSortBuckets];  // per (warp, bucket); then its first output position
  __shared__ int32_t staged[kSortMaxTopk];
  __shared__ uint32_t warp_total[kSortWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t lane_lt = (1u << lane) - 1;
  int32_t next[8];
  auto load = [&](int64_t t) {
    if (t >= T) return;
    int n = topk;
    // t and the strides are below 2^31 (the launcher checks): 32 x 32 -> 64-bit products.
    const auto t32 = static_cast<uint32_t>(t);
    if (valid_len) n = min(max(__ldg(valid_len + sm90::mul_wide_u32(t32, static_cast<uint32_t>(stride_valid_len_t))), 0), topk);
    const int32_t* row = indices + sm90::mul_wide_u32(t32, static_cast<uint32_t>(stride_indices_t));
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const int pos = warp * 256 + s * 32 + lane;
      next[s] = pos < n ? __ldg(row + pos) : -1;
    }
  };
  load(blockIdx.x);
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
#pragma unroll
    for (int w = 0; w < kSortWarps; ++w) count[w][threadIdx.x] = 0;
    uint32_t key[8];
    int32_t val[8];
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const bool valid = next[s] >= 0 && next[s] < num_slots;
      key[s] = valid ? static_cast<uint32_t>(next[s]) >> shift : kSortInvalidKey;
      val[s] = valid ? next[s] : -1;
    }
    load(t + gridDim.x);
    __syncthreads();
    // key[s] |= rank << 16 (rank within the warp's bucket, < 256): one register each.
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      uint32_t peers = 0xffffffffu;
#pragma unroll
      for (int bit = 0; bit < 8; ++bit) {
        const bool set = (key[s] >> bit) & 1;
        const uint32_t v = __ballot_sync(0xffffffffu, set);
        peers &= set ? v : ~v;
      }
      const uint32_t before = count[warp][key[s]];
      const uint32_t k = key[s];
      key[s] |= (before + __popc(peers & lane_lt)) << 16;
      __syncwarp();
      if ((peers & lane_lt) == 0) count[warp][k] = before + __popc(peers);
      __syncwarp();
    }
    __syncthreads();
    // Exclusive scan in (bucket, warp) order: thread b owns bucket b.
    const int b = threadIdx.x;
    uint32_t c[kSortWarps], run = 0;
#pragma unroll
    for (int w = 0; w < kSortWarps; ++w) {
      c[w] = count[w][b];
      run += c[w];
    }
    uint32_t incl = run;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const uint32_t x = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += x;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    uint32_t first = incl - run;
    for (int w = 0; w < warp; ++w) first += warp_total[w];
#pragma unroll
    for (int w = 0; w < kSortWarps; ++w) {
      count[w][b] = first;
      first += c[w];
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 8; ++s) staged[count[warp][key[s] & 0xffff] + (key[s] >> 16)] = val[s];
    __syncthreads();
    for (int i = threadIdx.x; i < topk; i += kSortThreads) sorted[t * topk + i] = staged[i];
    __syncthreads();  // count and staged are reused by the next token
  }
}

}  // namespace dsa::cuda::sm90_sparse_mla
