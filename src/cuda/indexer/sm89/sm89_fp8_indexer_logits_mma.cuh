#pragma once
// Lightning-indexer logits on fp8 tensor cores (mma.sync m16n8k32 e4m3, sm_89+).
//
// A CTA of 8 warps takes kBT query tokens and a range of key tiles (kKB cache
// blocks of 64 keys each). Each token's 64 heads x 128 dims of q8 are the
// A operand of one warp (M = 64 heads = 4 m-tiles) and stay in registers for
// the whole key loop; the warps of one token split the tile's keys (N). The
// key tile is gathered through the block table with cp.async into a swizzled
// shared-memory stage that every warp of the CTA reads (so kBT tokens share
// each key load), several stages deep. The head reduction
// sum_h w[h] * relu(s[h]) happens in registers and across the 8 lanes that
// hold one key column, as a reduce-scatter, so that every lane ends with one
// distinct key's logit and a warp's store is 128 contiguous bytes.
//
// Named sm89: mma.sync with e4m3 operands needs sm_89 (Ada) or newer. On
// sm_90 the wgmma kernel (../sm90/) is faster; this one is the fallback and
// the cross-check.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.cuh"
#include "cuda/common/cp_async.cuh"
#include "cuda/indexer/config.h"
#include "cuda/indexer/launch.h"
#include "cuda/indexer/params.h"

namespace dsa::cuda::indexer::sm89 {

constexpr int kIdxThreads = 256;

// Shared-memory plan: kStages stages, each kKB * 64 key rows of 128 bytes
// (16-byte chunks XOR-swizzled by row % 8 so ldmatrix is conflict-free), then
// the tile's fp32 key scales.
template <int kKB, int kStages>
struct IndexerSmemPlan {
  static constexpr int kTileKeys = kKB * kIdxBlockTokens;
  static constexpr int kKeyBytes = kTileKeys * kIdxDim;
  static constexpr int kStageBytes = kKeyBytes + kTileKeys * 4;
  static constexpr int kBytes = kStages * kStageBytes;
};

namespace detail {

using ::dsa::cuda::cp_async_16;
using ::dsa::cuda::cp_async_commit;
using ::dsa::cuda::cp_async_wait;

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_src) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_src));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// D = A(16x32 e4m3, row) * B(32x8 e4m3, col) + D, fp32 accumulate.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ld_u32(const uint8_t* p) { return __ldg(reinterpret_cast<const uint32_t*>(p)); }

}  // namespace detail

// kBT: query tokens per CTA (1, 2, 4 or 8); kKB: cache blocks per key tile.
// Warps per token = 8 / kBT; n-tiles (8 keys) per warp = kKB * kBT, a multiple of 4.
template <int kBT, int kKB, int kStages>
__global__ void __launch_bounds__(kIdxThreads, 1)
    indexer_logits_mma_kernel(const IndexerLogitsParams p, int64_t tiles_per_split) {
  using Plan = IndexerSmemPlan<kKB, kStages>;
  constexpr int kWarpsPerToken = 8 / kBT;
  constexpr int kTileKeys = Plan::kTileKeys;
  constexpr int kNTilesPerWarp = kKB * 8 / kWarpsPerToken;
  static_assert(kNTilesPerWarp % 4 == 0, "a warp's keys are reduced 4 n-tiles (32 keys) at a time");
  const float kNegInf = __int_as_float(0xff800000u);

  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int s_req[kBT];
  __shared__ int s_vis[kBT];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;   // mma groupID
  const int tig = lane & 3;  // mma thread-in-group
  const int slot = warp % kBT;
  const int sub = warp / kBT;

  // Later query tokens see more keys (causal): start them first so the short
  // ones fill the tail of the grid.
  const int64_t tile_tokens = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBT;
  const int64_t max_keys = min(p.logits_stride, p.max_blocks_per_request * static_cast<int64_t>(kIdxBlockTokens));
  if (threadIdx.x < kBT) {
    const int64_t t = tile_tokens + threadIdx.x;
    int r = -1, v = 0;
    if (t < p.T) {
      r = p.token_request[t];
      // Clamped so that a bad visible_end can never make the kernel read or
      // write outside the rows it was given; the host validates the contract.
      v = static_cast<int>(min(max(static_cast<int64_t>(p.visible_end[t]), int64_t{0}), max_keys));
    }
    s_req[threadIdx.x] = r;
    s_vis[threadIdx.x] = v;
  }
  __syncthreads();

  const int64_t total_tiles = (p.logits_stride + kTileKeys - 1) / kTileKeys;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(total_tiles, tile_begin + tiles_per_split);
  if (tile_begin >= tile_end) return;

  const int64_t my_t = tile_tokens + slot;
  const bool my_valid = my_t < p.T;

  // A fragments of m16n8k32 (8-bit): reg0 row g, k tig*4..+3; reg1 row g+8;
  // reg2 row g, k 16+tig*4; reg3 row g+8, k 16+tig*4.
  uint32_t qa[4][4][4];  // [m-tile][k-step][reg]
  float wt[4][2];        // weights of heads mt*16+g and mt*16+g+8
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    wt[mt][0] = wt[mt][1] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) qa[mt][kk][0] = qa[mt][kk][1] = qa[mt][kk][2] = qa[mt][kk][3] = 0u;
  }
  if (my_valid) {
    const uint8_t* q = p.q_fp8 + my_t * (kIdxHeads * kIdxDim);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      const uint8_t* r0 = q + (mt * 16 + g) * kIdxDim + tig * 4;
      const uint8_t* r1 = r0 + 8 * kIdxDim;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        qa[mt][kk][0] = detail::ld_u32(r0 + kk * 32);
        qa[mt][kk][1] = detail::ld_u32(r1 + kk * 32);
        qa[mt][kk][2] = detail::ld_u32(r0 + kk * 32 + 16);
        qa[mt][kk][3] = detail::ld_u32(r1 + kk * 32 + 16);
      }
      wt[mt][0] = __ldg(p.weights + my_t * kIdxHeads + mt * 16 + g);
      wt[mt][1] = __ldg(p.weights + my_t * kIdxHeads + mt * 16 + g + 8);
    }
  }
  float* out_row = p.logits + (my_valid ? my_t : 0) * p.logits_stride;

  // ldmatrix.x4 source of this lane: key row (n-tile base) + lane % 8, 16-byte
  // chunk q2 * 4 + lane / 8, swizzled by row % 8 (= lane % 8).
  int ld_off[2];
#pragma unroll
  for (int q2 = 0; q2 < 2; ++q2) ld_off[q2] = (lane & 7) * kIdxDim + (((q2 * 4 + (lane >> 3)) ^ (lane & 7)) << 4);

  // Lane's key inside a 32-key chunk after the reduce-scatter below.
  const int rs_idx = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
  const int rs_key = (rs_idx >> 1) * 8 + tig * 2 + (rs_idx & 1);

  // Tokens of different requests read different keys: one pass per distinct
  // request among the CTA's tokens (one pass in prefill).
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
    const bool active = my_valid && s_req[slot] == r;
    const int my_vis = s_vis[slot];
    const int32_t* bt = p.block_table + static_cast<int64_t>(r) * p.max_blocks_per_request;
    const int64_t comp_end = min(tile_end, (static_cast<int64_t>(maxvis) + kTileKeys - 1) / kTileKeys);
    const int n = static_cast<int>(max(int64_t{0}, comp_end - tile_begin));

    auto load_tile = [&](int64_t tile, int stage) {
      uint8_t* sk = smem + stage * Plan::kStageBytes;
      for (int c = threadIdx.x; c < kKB * 512; c += kIdxThreads) {
        const int b = c >> 9;
        const int row = (c >> 3) & 63;
        const int ch = c & 7;
        const int64_t blk_idx = tile * kKB + b;
        // Blocks past the last visible key may not exist (-1 in the table): not read.
        if (blk_idx * kIdxBlockTokens < maxvis) {
          const int64_t blk = __ldg(bt + blk_idx);
          const int krow = b * 64 + row;
          detail::cp_async_16(sk + krow * kIdxDim + ((ch ^ (krow & 7)) << 4),
                             p.k_cache + blk * kIdxBlockBytes + row * kIdxDim + ch * 16);
        }
      }
      if (threadIdx.x < kKB * 16) {
        const int b = threadIdx.x >> 4;
        const int ch = threadIdx.x & 15;
        const int64_t blk_idx = tile * kKB + b;
        if (blk_idx * kIdxBlockTokens < maxvis) {
          const int64_t blk = __ldg(bt + blk_idx);
          detail::cp_async_16(sk + Plan::kKeyBytes + b * 256 + ch * 16,
                             p.k_cache + blk * kIdxBlockBytes + kIdxBlockTokens * kIdxDim + ch * 16);
        }
      }
    };

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < n) load_tile(tile_begin + s, s);
      detail::cp_async_commit();
    }
    for (int i = 0; i < n; ++i) {
      detail::cp_async_wait<kStages - 2>();
      __syncthreads();  // stage i landed for everyone; stage i-1 is free to refill
      {
        const int nx = i + kStages - 1;
        if (nx < n) load_tile(tile_begin + nx, nx % kStages);
        detail::cp_async_commit();
      }
      if (!active) continue;
      const int64_t tile = tile_begin + i;
      const uint8_t* sk = smem + (i % kStages) * Plan::kStageBytes;
      const float* ss = reinterpret_cast<const float*>(sk + Plan::kKeyBytes);
#pragma unroll 1
      for (int cc = 0; cc < kNTilesPerWarp / 4; ++cc) {
        const int nt0 = sub * kNTilesPerWarp + cc * 4;
        float acc[4][4][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) acc[mt][jj][0] = acc[mt][jj][1] = acc[mt][jj][2] = acc[mt][jj][3] = 0.f;
#pragma unroll
        for (int q2 = 0; q2 < 2; ++q2) {
          uint32_t b[4][4];
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) detail::ldmatrix_x4(b[jj], sk + (nt0 + jj) * 8 * kIdxDim + ld_off[q2]);
#pragma unroll
          for (int kh = 0; kh < 2; ++kh)
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
              for (int jj = 0; jj < 4; ++jj) detail::mma_e4m3(acc[mt][jj], qa[mt][q2 * 2 + kh], b[jj][2 * kh], b[jj][2 * kh + 1]);
        }
        // v[jj*2+c]: this thread's 8 heads of key column nt*8 + tig*2 + c.
        float v[8];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float s = 0.f;
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
              s = fmaf(wt[mt][0], fmaxf(acc[mt][jj][c], 0.f), s);
              s = fmaf(wt[mt][1], fmaxf(acc[mt][jj][c + 2], 0.f), s);
            }
            v[jj * 2 + c] = s;
          }
        // Reduce-scatter over the 8 lanes of equal tig (lane bits 4, 3, 2).
        const bool b4 = (lane >> 4) & 1, b3 = (lane >> 3) & 1, b2 = (lane >> 2) & 1;
        float u[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float keep = b4 ? v[j + 4] : v[j];
          const float send = b4 ? v[j] : v[j + 4];
          u[j] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
        }
        float w2[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float keep = b3 ? u[j + 2] : u[j];
          const float send = b3 ? u[j] : u[j + 2];
          w2[j] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
        }
        const float total = (b2 ? w2[1] : w2[0]) + __shfl_xor_sync(0xffffffffu, b2 ? w2[0] : w2[1], 4);
        const int key = nt0 * 8 + rs_key;
        const int64_t pos = tile * kTileKeys + key;
        // A select, not arithmetic: keys past visible_end may be stale or NaN.
        const float val = pos < my_vis ? total * ss[key] : kNegInf;
        if (pos < p.logits_stride) out_row[pos] = val;
      }
    }
    detail::cp_async_wait<0>();
    __syncthreads();  // the next pass refills the stages

    if (active) {
      for (int64_t tile = max(tile_begin, comp_end); tile < tile_end; ++tile) {
        for (int c = sub * 32 + lane; c < kTileKeys; c += kWarpsPerToken * 32) {
          const int64_t pos = tile * kTileKeys + c;
          if (pos < p.logits_stride) out_row[pos] = kNegInf;
        }
      }
    }
  }
}

// Host side; one explicit instantiation per variant in ../instantiations/.
template <int kBT, int kKB, int kStages>
void launch_mma(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  using Plan = IndexerSmemPlan<kKB, kStages>;
  auto kernel = indexer_logits_mma_kernel<kBT, kKB, kStages>;
  static KernelSetup setup;
  const int occupancy = prepare_kernel(reinterpret_cast<const void*>(kernel), kIdxThreads, Plan::kBytes, ctx, setup);
  int64_t tiles_per_split = 0;
  const dim3 grid = make_grid(p, ctx, kBT, Plan::kTileKeys, occupancy, tiles_per_split);
  kernel<<<grid, kIdxThreads, Plan::kBytes, ctx.stream>>>(p, tiles_per_split);
  DSA_CHECK_LAUNCH("indexer_logits_mma_kernel");
}

}  // namespace dsa::cuda::indexer::sm89
