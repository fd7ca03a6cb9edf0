#pragma once
// Lightning-indexer logits on Hopper's fp8 warpgroup MMA (wgmma, QGMMA in SASS).
//
// Transposed problem: D[key, head] = K8[64 keys, 128] . Q8[kBT * 64 heads, 128]^T,
// one m64 x n(64 * kBT) x k32 wgmma per 32 dims, so that each warp of the
// warpgroup owns 16 whole keys and the head sum sum_h w[h] * relu(D[key, h])
// needs no cross-warp step: each thread sums its own heads, then 4 lanes
// finish it with a reduce-scatter. Both operands are K-major in shared memory
// with the 128-byte swizzle (16-byte chunk index XOR row % 8 inside 1024-byte
// atoms), which is also the layout cp.async writes when gathering key blocks
// through the block table. One warpgroup per CTA and several CTAs per SM, so
// one CTA's epilogue overlaps another's tensor-core work.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.cuh"
#include "cuda/common/cp_async.cuh"
#include "cuda/indexer/config.h"
#include "cuda/indexer/launch.h"
#include "cuda/indexer/params.h"
#include "cuda/sm90/common/ptx.cuh"
#include "cuda/sm90/common/wgmma.cuh"

namespace dsa::cuda::indexer::sm90 {

constexpr int kWgThreads = 128;

// Keys of all stages first (each 64-key block 8 KB, 1024-aligned for the
// swizzle atoms), then the query tile, then the key scales.
template <int kBT, int kKB, int kStages>
struct WgmmaSmemPlan {
  static constexpr int kTileKeys = kKB * kIdxBlockTokens;
  static constexpr int kKeyStageBytes = kKB * kIdxBlockTokens * kIdxDim;
  static constexpr int kQOffset = kStages * kKeyStageBytes;
  static constexpr int kScaleOffset = kQOffset + kBT * kIdxHeads * kIdxDim;
  static constexpr int kScaleStageBytes = kTileKeys * 4;
  static constexpr int kBytes = kScaleOffset + kStages * kScaleStageBytes + 1024;  // + alignment slack
};

namespace detail {

using ::dsa::cuda::cp_async_16;
using ::dsa::cuda::cp_async_commit;
using ::dsa::cuda::cp_async_wait;

// The shared sm90 helpers (src/cuda/sm90/common/); qualified because this
// kernel's own namespace is also called sm90.
using ::dsa::cuda::sm90::fence_proxy_async;
using ::dsa::cuda::sm90::sw128_desc_k_major;
using ::dsa::cuda::sm90::wgmma_commit;
using ::dsa::cuda::sm90::wgmma_fence;
using ::dsa::cuda::sm90::wgmma_wait;
// Keeps the compiler from touching accumulators across the asynchronous MMA.
using ::dsa::cuda::sm90::fence_reg;

template <int kBT>
__device__ __forceinline__ void wgmma_tile(float (&d)[32 * kBT], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  if constexpr (kBT == 1) {
    ::dsa::cuda::sm90::wgmma_m64n64k32_e4m3_ss(d, desc_a, desc_b, scale_d);
  } else {
    ::dsa::cuda::sm90::wgmma_m64n128k32_e4m3_ss(d, desc_a, desc_b, scale_d);
  }
}

}  // namespace detail

// kBT: query tokens per CTA (1 or 2, the wgmma's N = 64 * kBT); kKB: 64-key
// cache blocks per pipeline stage.
template <int kBT, int kKB, int kStages>
__global__ void __launch_bounds__(kWgThreads, 3)
    indexer_logits_wgmma_kernel(const IndexerLogitsParams p, int64_t tiles_per_split) {
  static_assert(kBT == 1 || kBT == 2, "N = 64 or 128");
  using Plan = WgmmaSmemPlan<kBT, kKB, kStages>;
  constexpr int kTileKeys = Plan::kTileKeys;
  constexpr int kAcc = 32 * kBT;
  const float kNegInf = __int_as_float(0xff800000u);

  // 128-byte aligned: the shared-memory layout this kernel was measured with
  // (it shared a file with the sm89 kernel, whose alignment applied to both).
  extern __shared__ __align__(128) uint8_t smem_raw[];
  // The swizzle is computed from address bits 7-9: atoms must start 1024-aligned.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* s_q = smem + Plan::kQOffset;
  __shared__ int s_req[kBT];
  __shared__ int s_vis[kBT];

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tig = lane & 3;

  const int64_t tile_tokens = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBT;  // long rows first
  const int64_t max_keys = min(p.logits_stride, p.max_blocks_per_request * static_cast<int64_t>(kIdxBlockTokens));
  if (tid < kBT) {
    const int64_t t = tile_tokens + tid;
    int r = -1, v = 0;
    if (t < p.T) {
      r = p.token_request[t];
      v = static_cast<int>(min(max(static_cast<int64_t>(p.visible_end[t]), int64_t{0}), max_keys));
    }
    s_req[tid] = r;
    s_vis[tid] = v;
  }
  __syncthreads();

  const int64_t total_tiles = (p.logits_stride + kTileKeys - 1) / kTileKeys;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(total_tiles, tile_begin + tiles_per_split);
  if (tile_begin >= tile_end) return;

  // Query tile: row n = tk * 64 + head, 128 bytes, swizzled like the keys.
  for (int c = tid; c < kBT * kIdxHeads * 8; c += kWgThreads) {
    const int n = c >> 3, ch = c & 7;
    const int64_t t = tile_tokens + (n >> 6);
    if (t < p.T) {
      detail::cp_async_16(s_q + n * kIdxDim + ((ch ^ (n & 7)) << 4),
                         p.q_fp8 + t * (kIdxHeads * kIdxDim) + (n & 63) * kIdxDim + ch * 16);
    }
  }
  detail::cp_async_commit();

  // Thread's heads in the accumulator: columns 8 * j + tig * 2 + c of each token.
  float wreg[kBT][8][2];
#pragma unroll
  for (int tk = 0; tk < kBT; ++tk) {
    const int64_t t = tile_tokens + tk;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) wreg[tk][j][c] = t < p.T ? __ldg(p.weights + t * kIdxHeads + 8 * j + tig * 2 + c) : 0.f;
  }

  for (int ps = 0; ps < kBT; ++ps) {
    const int r = s_req[ps];
    if (r < 0) continue;
    bool seen = false;
    int maxvis = 0;
#pragma unroll
    for (int q = 0; q < kBT; ++q) {
      if (q < ps && s_req[q] == r) seen = true;
      if (s_req[q] == r) maxvis = max(maxvis, s_vis[q]);
    }
    if (seen) continue;
    int active = 0;  // bit tk: token tk of the tile takes part in this pass (a mask: indexed at run time)
#pragma unroll
    for (int q = 0; q < kBT; ++q) active |= (s_req[q] == r) << q;
    const int32_t* bt = p.block_table + static_cast<int64_t>(r) * p.max_blocks_per_request;
    const int64_t comp_end = min(tile_end, (static_cast<int64_t>(maxvis) + kTileKeys - 1) / kTileKeys);
    const int n = static_cast<int>(max(int64_t{0}, comp_end - tile_begin));

    auto load_tile = [&](int64_t tile, int stage) {
      uint8_t* sk = smem + stage * Plan::kKeyStageBytes;
      for (int c = tid; c < kKB * 512; c += kWgThreads) {
        const int b = c >> 9;
        const int row = (c >> 3) & 63;
        const int ch = c & 7;
        const int64_t blk_idx = tile * kKB + b;
        if (blk_idx * kIdxBlockTokens < maxvis) {  // blocks past the last visible key may not exist
          const int64_t blk = __ldg(bt + blk_idx);
          detail::cp_async_16(sk + b * 8192 + row * kIdxDim + ((ch ^ (row & 7)) << 4),
                             p.k_cache + blk * kIdxBlockBytes + row * kIdxDim + ch * 16);
        }
      }
      if (tid < kKB * 16) {
        const int b = tid >> 4;
        const int ch = tid & 15;
        const int64_t blk_idx = tile * kKB + b;
        if (blk_idx * kIdxBlockTokens < maxvis) {
          const int64_t blk = __ldg(bt + blk_idx);
          detail::cp_async_16(smem + Plan::kScaleOffset + stage * Plan::kScaleStageBytes + b * 256 + ch * 16,
                             p.k_cache + blk * kIdxBlockBytes + kIdxBlockTokens * kIdxDim + ch * 16);
        }
      }
    };

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < n) load_tile(tile_begin + s, s);
      detail::cp_async_commit();
    }
    const uint32_t q_addr = static_cast<uint32_t>(__cvta_generic_to_shared(s_q));
    for (int i = 0; i < n; ++i) {
      detail::cp_async_wait<kStages - 2>();
      detail::fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads through the async one
      __syncthreads();
      {
        const int nx = i + kStages - 1;
        if (nx < n) load_tile(tile_begin + nx, nx % kStages);
        detail::cp_async_commit();
      }
      const int64_t tile = tile_begin + i;
      const int stage = i % kStages;
      const uint32_t k_addr =
          static_cast<uint32_t>(__cvta_generic_to_shared(smem + stage * Plan::kKeyStageBytes));
      const float* ss = reinterpret_cast<const float*>(smem + Plan::kScaleOffset + stage * Plan::kScaleStageBytes);
      float acc[kKB][kAcc];
      detail::wgmma_fence();
#pragma unroll
      for (int b = 0; b < kKB; ++b)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          detail::wgmma_tile<kBT>(acc[b], detail::sw128_desc_k_major(k_addr + b * 8192 + kk * 32),
                                  detail::sw128_desc_k_major(q_addr + kk * 32), kk);
      detail::wgmma_commit();
      detail::wgmma_wait<0>();
#pragma unroll
      for (int b = 0; b < kKB; ++b)
#pragma unroll
        for (int i2 = 0; i2 < kAcc; ++i2) detail::fence_reg(acc[b][i2]);

#pragma unroll
      for (int b = 0; b < kKB; ++b) {
        // acc[b][(tk * 8 + j) * 4 + half * 2 + c]: key 16 * warp + g + 8 * half, head 8 * j + tig * 2 + c of token tk.
        float v[kBT * 2];
#pragma unroll
        for (int tk = 0; tk < kBT; ++tk)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
              for (int c = 0; c < 2; ++c) s = fmaf(wreg[tk][j][c], fmaxf(acc[b][(tk * 8 + j) * 4 + half * 2 + c], 0.f), s);
            v[tk * 2 + half] = s;
          }
        // Reduce-scatter over the 4 lanes of a row group (tig bits 1, 0).
        const bool t1 = (tig >> 1) & 1, t0 = tig & 1;
        int tk_out, half_out;
        float total;
        if constexpr (kBT == 2) {
          float u[2];
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            const float keep = t1 ? v[2 + x] : v[x];
            const float send = t1 ? v[x] : v[2 + x];
            u[x] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
          }
          total = (t0 ? u[1] : u[0]) + __shfl_xor_sync(0xffffffffu, t0 ? u[0] : u[1], 1);
          tk_out = t1;
          half_out = t0;
        } else {
          const float u = (t1 ? v[1] : v[0]) + __shfl_xor_sync(0xffffffffu, t1 ? v[0] : v[1], 2);
          total = u + __shfl_xor_sync(0xffffffffu, u, 1);
          tk_out = 0;
          half_out = t1;
        }
        const int key = b * kIdxBlockTokens + 16 * warp + g + 8 * half_out;
        const int64_t pos = tile * kTileKeys + key;
        const bool writer = kBT == 2 || t0 == 0;
        if (writer && ((active >> tk_out) & 1) && pos < p.logits_stride) {
          // A select, not arithmetic: keys past visible_end may be stale or NaN.
          const float val = pos < s_vis[tk_out] ? total * ss[key] : kNegInf;
          p.logits[(tile_tokens + tk_out) * p.logits_stride + pos] = val;
        }
      }
    }
    detail::cp_async_wait<0>();
    __syncthreads();  // the next pass refills the stages

    for (int tk = 0; tk < kBT; ++tk) {
      if (!((active >> tk) & 1)) continue;
      float* row = p.logits + (tile_tokens + tk) * p.logits_stride;
      for (int64_t tile = max(tile_begin, comp_end); tile < tile_end; ++tile) {
        for (int c = tid; c < kTileKeys; c += kWgThreads) {
          const int64_t pos = tile * kTileKeys + c;
          if (pos < p.logits_stride) row[pos] = kNegInf;
        }
      }
    }
  }
}

// Host side; one explicit instantiation per variant in ../instantiations/.
template <int kBT, int kKB, int kStages>
void launch_wgmma(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  using Plan = WgmmaSmemPlan<kBT, kKB, kStages>;
  auto kernel = indexer_logits_wgmma_kernel<kBT, kKB, kStages>;
  static KernelSetup setup;
  const int occupancy = prepare_kernel(reinterpret_cast<const void*>(kernel), kWgThreads, Plan::kBytes, ctx, setup);
  int64_t tiles_per_split = 0;
  const dim3 grid = make_grid(p, ctx, kBT, Plan::kTileKeys, occupancy, tiles_per_split);
  kernel<<<grid, kWgThreads, Plan::kBytes, ctx.stream>>>(p, tiles_per_split);
  DSA_CHECK_LAUNCH("indexer_logits_wgmma_kernel");
}

}  // namespace dsa::cuda::indexer::sm90
