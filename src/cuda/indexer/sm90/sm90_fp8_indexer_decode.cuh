#pragma once
// Decode indexer logits (spec 3.5) on sm_90a: a persistent, warp-specialized
// kernel that streams the paged fp8 indexer K cache at close to copy speed.
//
// Decode reads every visible cache block once per step (64 requests x 32768
// keys = 277 MB) and does little math per byte at next_n 1 or 2, so the
// kernel is built around keeping loads in flight: one CTA per SM, its run of
// (token group, 64-key block) units from decode_plan.h; a producer warp
// issues one TMA per cache block (the whole 8448-byte block: 64 x 128-byte
// keys, then 2 rows of scales, as a 66 x 128 box of a 3-D tensor map with
// the 128-byte swizzle that wgmma reads) into a 16-stage ring, with an
// evict-first L2 hint (each block is read once); two consumer warpgroups take
// alternate blocks, so one's epilogue overlaps the other's MMA.
//
// The math is the baseline kernel's (sm90_fp8_indexer_logits_wgmma.cuh),
// step for step, so the logits are bit-identical to it: D[key, head] =
// K8[64 keys] . Q8[next_n x 64 heads]^T with one m64 x n(64 or 128) x k32
// wgmma per 32 dims (accumulated in that order; tokens 2 at a time), each thread sums its 16
// heads per token in head order with fmaf(w, relu(d), s), then 4 lanes add
// the partial sums as (P0 + P2) + (P1 + P3), times the key's scale.
// Same outputs: every column of every token's row is written, -inf at and
// past visible_end (a select: keys there may be stale or NaN), blocks past
// the last visible key are not read at all.
//
// Measured (H100 80GB HBM3, 2026-12-05, 64 requests x 32768 keys, median of
// CUDA events, baseline in the same run): next_n 1 0.1062 ms (2.61 TB/s of
// cache; baseline 0.1085), 2 0.1123 (baseline 0.1302), 3 0.180 (0.309),
// 4 0.228 (0.256). Not yet measured on the H200.
//
// Groups are next_n consecutive tokens, which is one request's tokens in a
// decode step; a group whose tokens belong to several requests (a hint that
// does not fit the batch) is still right: it runs one pass per request,
// like the baseline's token tiles, only slower.
#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/check.cuh"
#include "cuda/indexer/config.h"
#include "cuda/indexer/decode_plan.h"
#include "cuda/indexer/launch.h"
#include "cuda/indexer/params.h"
#include "cuda/sm90/common/mbarrier.cuh"
#include "cuda/sm90/common/ptx.cuh"
#include "cuda/sm90/common/wgmma.cuh"

namespace dsa::cuda::indexer::sm90 {

// Warps 0-7: two consumer warpgroups (wgmma needs them at warp 0 and 4);
// warp 8: the producer. 288 threads leave up to 224 registers a thread.
constexpr int kDecThreads = 288;
constexpr int kDecStages = 16;    // 16 x 8448 B in flight per SM: ~2x what the latency needs at 3.9 TB/s
// A stage holds one block as 66 rows of 128 bytes (8448), padded to whole
// 1024-byte swizzle atoms so that each stage starts atom-aligned.
constexpr int kDecStageBytes = 9216;
constexpr int kDecBoxRows = kIdxBlockBytes / kIdxDim;  // 66: 64 key rows + 2 rows of fp32 scales

template <int kNextN>
struct DecodeSmem {
  static constexpr int kQBytes = kNextN * kIdxHeads * kIdxDim;  // next_n x 64 heads x 128 B
  static constexpr int kQOffset = kDecStages * kDecStageBytes;   // two query buffers (double-buffered by group)
  static constexpr int kBarOffset = kQOffset + 2 * kQBytes;      // full[16], empty[16], q_full[2], q_empty[2]
  static constexpr int kBytes = kBarOffset + (2 * kDecStages + 4) * 8 + 1024;  // + alignment slack
};

// Host: the two tensor maps (decode_dispatch.cu). k_map views the pool as
// [blocks][66 rows][128 B], q_map the queries as [T][64 heads][128 B].
void make_decode_tensor_maps(const DeviceContext& ctx, const IndexerLogitsParams& p, int next_n, CUtensorMap& k_map,
                             CUtensorMap& q_map);

namespace detail_dec {

using ::dsa::cuda::sm90::fence_regs;
using ::dsa::cuda::sm90::mbar_arrive;
using ::dsa::cuda::sm90::mbar_init;
using ::dsa::cuda::sm90::mbar_wait;
using ::dsa::cuda::sm90::smem_addr;
using ::dsa::cuda::sm90::sw128_desc_k_major;
using ::dsa::cuda::sm90::wgmma_commit;
using ::dsa::cuda::sm90::wgmma_fence;
using ::dsa::cuda::sm90::wgmma_wait;

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// 3-D tile copy global -> shared through the tensor map (a __grid_constant__
// parameter), completing on mbarrier `bar`, with an L2 cache policy.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar,
                                            uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4}], [%5], %6;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "l"(policy)
      : "memory");
}

__device__ __forceinline__ uint64_t policy_evict_first() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ uint64_t policy_evict_last() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}

// N = 64 heads x kTokens (1 or 2).
template <int kTokens>
__device__ __forceinline__ void wgmma_tile(float (&d)[32 * kTokens], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  if constexpr (kTokens == 1) {
    ::dsa::cuda::sm90::wgmma_m64n64k32_e4m3_ss(d, desc_a, desc_b, scale_d);
  } else {
    ::dsa::cuda::sm90::wgmma_m64n128k32_e4m3_ss(d, desc_a, desc_b, scale_d);
  }
}

// The tokens of group g: request (-1 past T) and visible end clamped into
// [0, max_keys], as the baseline clamps it.
template <int kNextN>
struct Group {
  int req[kNextN];
  int vis[kNextN];
  uint32_t pass_masks = 0;  // 4 bits per pass: the group's tokens of one request
  int passes = 0;

  __device__ __forceinline__ void load(const IndexerLogitsParams& p, int64_t g, int64_t max_keys) {
#pragma unroll
    for (int tk = 0; tk < kNextN; ++tk) {
      const int64_t t = g * kNextN + tk;
      req[tk] = -1;
      vis[tk] = 0;
      if (t < p.T) {
        req[tk] = __ldg(p.token_request + t);
        vis[tk] = static_cast<int>(min(max(static_cast<int64_t>(__ldg(p.visible_end + t)), int64_t{0}), max_keys));
      }
    }
    pass_masks = 0;
    passes = 0;
    uint32_t taken = 0;
#pragma unroll
    for (int a = 0; a < kNextN; ++a) {
      if (req[a] >= 0 && !((taken >> a) & 1)) {
        uint32_t m = 0;
#pragma unroll
        for (int q = 0; q < kNextN; ++q) m |= static_cast<uint32_t>(req[q] == req[a]) << q;
        taken |= m;
        pass_masks |= m << (4 * passes);
        ++passes;
      }
    }
  }
  __device__ __forceinline__ uint32_t mask(int pass) const { return (pass_masks >> (4 * pass)) & 0xfu; }
  __device__ __forceinline__ int request(uint32_t m) const {
    int r = -1;
#pragma unroll
    for (int tk = kNextN - 1; tk >= 0; --tk)
      if ((m >> tk) & 1) r = req[tk];
    return r;
  }
  __device__ __forceinline__ int max_vis(uint32_t m) const {
    int v = 0;
#pragma unroll
    for (int tk = 0; tk < kNextN; ++tk)
      if ((m >> tk) & 1) v = max(v, vis[tk]);
    return v;
  }
};

}  // namespace detail_dec

template <int kNextN>
__global__ void __launch_bounds__(kDecThreads, 1)
    indexer_decode_kernel(const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap q_map,
                          const IndexerLogitsParams p, const DecodePlan plan) {
  static_assert(kNextN >= 1 && kNextN <= 4, "next_n 1 to 4 (4 bits per pass mask, n <= 256)");
  using namespace detail_dec;
  using Smem = DecodeSmem<kNextN>;
  const float kNegInf = __int_as_float(0xff800000u);

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // The swizzle is computed from address bits 7-9: stages and query buffers must start 1024-aligned.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sbase = smem_addr(smem);
  const uint32_t bar_full = sbase + Smem::kBarOffset;
  const uint32_t bar_empty = bar_full + 8 * kDecStages;
  const uint32_t bar_qfull = bar_empty + 8 * kDecStages;
  const uint32_t bar_qempty = bar_qfull + 16;

  const int tid = threadIdx.x;
  if (tid == 0) {
#pragma unroll 1
    for (int s = 0; s < kDecStages; ++s) {
      mbar_init(bar_full + 8 * s, 1);     // the producer's expect_tx; the TMA's bytes complete it
      mbar_init(bar_empty + 8 * s, 128);  // every thread of the consuming warpgroup
    }
    for (int b = 0; b < 2; ++b) {
      mbar_init(bar_qfull + 8 * b, 1);
      mbar_init(bar_qempty + 8 * b, 256);  // both consumer warpgroups, every thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the async proxy (TMA)
  }
  __syncthreads();

  const int64_t NB = plan.col_blocks;
  const int64_t u_begin = static_cast<int64_t>(blockIdx.x) * plan.units_per_cta;
  const int64_t u_end = min(plan.groups * NB, u_begin + plan.units_per_cta);
  if (u_begin >= u_end) return;
  const int64_t g_first = u_begin / NB, g_last = (u_end - 1) / NB;
  const int64_t max_keys = min(p.logits_stride, p.max_blocks_per_request * static_cast<int64_t>(kIdxBlockTokens));

  if (tid >= 256) {
    // ---------------- producer ----------------
    const int lane = tid & 31;
    const uint64_t pol_k = policy_evict_first();
    const uint64_t pol_q = policy_evict_last();
    uint32_t it = 0, sg = 0;
#pragma unroll 1
    for (int64_t g = g_first; g <= g_last; ++g, ++sg) {
      const int64_t b0 = max(u_begin, g * NB) - g * NB, b1 = min(u_end, (g + 1) * NB) - g * NB;
      Group<kNextN> grp;
      grp.load(p, g, max_keys);
      const uint32_t qb = sg & 1;
      mbar_wait(bar_qempty + 8 * qb, ((sg >> 1) & 1) ^ 1);
      if (lane == 0) {
        mbar_expect_tx(bar_qfull + 8 * qb, Smem::kQBytes);  // a box past T is zero-filled and still counts in full
        tma_load_3d(sbase + Smem::kQOffset + qb * Smem::kQBytes, &q_map, 0, 0, static_cast<int>(g * kNextN),
                    bar_qfull + 8 * qb, pol_q);
      }
#pragma unroll 1
      for (int ps = 0; ps < grp.passes; ++ps) {
        const uint32_t m = grp.mask(ps);
        const int64_t iend = min(b1, (static_cast<int64_t>(grp.max_vis(m)) + kIdxBlockTokens - 1) / kIdxBlockTokens);
        const int32_t* bt = p.block_table + static_cast<int64_t>(grp.request(m)) * p.max_blocks_per_request;
        // Block ids 32 at a time, one per lane: one global latency per 32 blocks, hidden by the ring.
#pragma unroll 1
        for (int64_t base = b0; base < iend; base += 32) {
          const int n = static_cast<int>(min(int64_t{32}, iend - base));
          const int32_t mine = lane < n ? __ldg(bt + base + lane) : 0;
#pragma unroll 1
          for (int k = 0; k < n; ++k, ++it) {
            const int32_t blk = __shfl_sync(0xffffffffu, mine, k);
            const uint32_t s = it % kDecStages;
            mbar_wait(bar_empty + 8 * s, ((it / kDecStages) & 1) ^ 1);
            if (lane == 0) {
              mbar_expect_tx(bar_full + 8 * s, kIdxBlockBytes);
              tma_load_3d(sbase + s * kDecStageBytes, &k_map, 0, 0, blk, bar_full + 8 * s, pol_k);
            }
          }
        }
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  const int cw = tid >> 7;  // consumer warpgroup 0 or 1: items of its parity
  const int ctid = tid;     // 0..255 over both
  const int warp = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int g8 = lane >> 2;
  const int tig = lane & 3;
  const bool t1 = (tig >> 1) & 1, t0 = tig & 1;
  uint32_t it = 0, sg = 0;
#pragma unroll 1
  for (int64_t g = g_first; g <= g_last; ++g, ++sg) {
    const int64_t b0 = max(u_begin, g * NB) - g * NB, b1 = min(u_end, (g + 1) * NB) - g * NB;
    Group<kNextN> grp;
    grp.load(p, g, max_keys);
    // Thread's heads in the accumulator: columns 8 * j + tig * 2 + c of each
    // token. Held in registers for next_n <= 2; at 3 and 4 they spilled
    // (168 registers a thread), so there each
    // chunk loads its tokens' weights per block instead (L1 hits, issued
    // before the MMA wait).
    constexpr int kWRegTokens = kNextN <= 2 ? kNextN : 0;
    float wreg[kWRegTokens > 0 ? kWRegTokens : 1][8][2];
#pragma unroll
    for (int tk = 0; tk < kWRegTokens; ++tk) {
      const int64_t t = g * kNextN + tk;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) wreg[tk][j][c] = t < p.T ? __ldg(p.weights + t * kIdxHeads + 8 * j + tig * 2 + c) : 0.f;
    }
    const uint32_t qb = sg & 1;
    const uint32_t q_addr = sbase + Smem::kQOffset + qb * Smem::kQBytes;
    mbar_wait(bar_qfull + 8 * qb, (sg >> 1) & 1);

#pragma unroll 1
    for (int ps = 0; ps < grp.passes; ++ps) {
      const uint32_t m = grp.mask(ps);
      const int64_t vis_blocks = (static_cast<int64_t>(grp.max_vis(m)) + kIdxBlockTokens - 1) / kIdxBlockTokens;
      const int64_t n_items = max(int64_t{0}, min(b1, vis_blocks) - b0);
#pragma unroll 1
      for (int64_t k = (cw - static_cast<int>(it)) & 1; k < n_items; k += 2) {
        const uint32_t item = it + static_cast<uint32_t>(k);
        const uint32_t s = item % kDecStages;
        mbar_wait(bar_full + 8 * s, (item / kDecStages) & 1);
        const uint32_t k_addr = sbase + s * kDecStageBytes;
        // Scale of key k: row 64 + k / 32 of the box, 16-byte chunk (k % 32) / 4,
        // which the swizzle moved to chunk ((k % 32) / 4) ^ (k / 32).
        float sc[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int key = 16 * warp + g8 + 8 * half;
          const int row = key >> 5, chunk = ((key & 31) >> 2) ^ row;
          sc[half] = *reinterpret_cast<const float*>(smem + s * kDecStageBytes + kIdxBlockTokens * kIdxDim + row * 128 +
                                                      chunk * 16 + (key & 3) * 4);
        }
        const int64_t pos0 = (b0 + k) * kIdxBlockTokens + 16 * warp + g8;
        auto store = [&](int tk_out, int vis, int half_out, float total) {
          const int64_t pos = pos0 + 8 * half_out;
          if (((m >> tk_out) & 1) && pos < p.logits_stride) {
            // A select, not arithmetic: keys past visible_end may be stale or NaN.
            const float val = pos < vis ? total * (half_out ? sc[1] : sc[0]) : kNegInf;
            p.logits[(g * kNextN + tk_out) * p.logits_stride + pos] = val;
          }
        };
        // Tokens in chunks of at most 2 (N <= 128): 64 accumulators plus the
        // weights fit at next_n 4, where one n256 MMA spilled (168 registers a
        // thread: 9 warps, 3 of them on one SM sub-partition's register file).
        // Each output's MMA chain is the same either way.
        auto chunk = [&](auto c0_tag) {
          constexpr int c0 = decltype(c0_tag)::value;
          // next_n 3: the odd token first, then a pair (this order spilled less).
          constexpr int cn = (kNextN == 3 && c0 == 0) ? 1 : (kNextN - c0 >= 2 ? 2 : 1);
          float acc[32 * cn];
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk)
            wgmma_tile<cn>(acc, sw128_desc_k_major(k_addr + kk * 32),
                           sw128_desc_k_major(q_addr + c0 * kIdxHeads * kIdxDim + kk * 32), kk);
          wgmma_commit();
          float wl[cn][8][2];
#pragma unroll
          for (int tk = 0; tk < cn; ++tk)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                if constexpr (kNextN <= 2) {
                  wl[tk][j][c] = wreg[c0 + tk][j][c];
                } else {
                  const int64_t t = g * kNextN + c0 + tk;
                  wl[tk][j][c] = t < p.T ? __ldg(p.weights + t * kIdxHeads + 8 * j + tig * 2 + c) : 0.f;
                }
              }
          wgmma_wait<0>();
          fence_regs(acc);
          // Release after the last chunk's MMA: the scales are in registers already.
          if constexpr (c0 + cn >= kNextN) mbar_arrive(bar_empty + 8 * s);

          // acc[(tk * 8 + j) * 4 + half * 2 + c]: key 16 * warp + g8 + 8 * half, head 8 * j + tig * 2 + c
          // of token c0 + tk.
          float v[cn][2];
#pragma unroll
          for (int tk = 0; tk < cn; ++tk)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              float sum = 0.f;
#pragma unroll
              for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int c = 0; c < 2; ++c)
                  sum = fmaf(wl[tk][j][c], fmaxf(acc[(tk * 8 + j) * 4 + half * 2 + c], 0.f), sum);
              v[tk][half] = sum;
            }
          if constexpr (cn == 2) {
            // Reduce-scatter over the 4 lanes of a row group: lane (t1, t0)
            // ends with token c0 + t1, key half t0 (the baseline's kBT = 2).
            float u[2];
#pragma unroll
            for (int x = 0; x < 2; ++x) {
              const float keep = t1 ? v[1][x] : v[0][x];
              const float send = t1 ? v[0][x] : v[1][x];
              u[x] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
            }
            const float total = (t0 ? u[1] : u[0]) + __shfl_xor_sync(0xffffffffu, t0 ? u[0] : u[1], 1);
            store(c0 + t1, t1 ? grp.vis[c0 + 1] : grp.vis[c0], t0, total);
          } else {
            // One token: lanes t0 = 0 end with key half t1 (the baseline's kBT = 1).
            const float u = (t1 ? v[0][1] : v[0][0]) + __shfl_xor_sync(0xffffffffu, t1 ? v[0][0] : v[0][1], 2);
            const float total = u + __shfl_xor_sync(0xffffffffu, u, 1);
            if (!t0) store(c0, grp.vis[c0], t1, total);
          }
        };
        chunk(std::integral_constant<int, 0>{});
        if constexpr (kNextN == 3) chunk(std::integral_constant<int, 1>{});
        if constexpr (kNextN == 4) chunk(std::integral_constant<int, 2>{});
      }
      it += static_cast<uint32_t>(n_items);

      // Blocks of this run past the pass's last visible key: -inf, nothing read.
      const int64_t f0 = max(b0, vis_blocks);
      if (f0 < b1) {
        const int64_t pend = min(b1 * kIdxBlockTokens, p.logits_stride);
#pragma unroll
        for (int tk = 0; tk < kNextN; ++tk) {
          if (!((m >> tk) & 1)) continue;
          float* row = p.logits + (g * kNextN + tk) * p.logits_stride;
          for (int64_t pos = f0 * kIdxBlockTokens + ctid; pos < pend; pos += 256) row[pos] = kNegInf;
        }
      }
    }
    mbar_arrive(bar_qempty + 8 * qb);  // this warpgroup's MMAs on the group's queries are done
  }
}

// Host side; one explicit instantiation per next_n in ../instantiations/.
template <int kNextN>
void launch_decode(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  using Smem = DecodeSmem<kNextN>;
  auto kernel = indexer_decode_kernel<kNextN>;
  static KernelSetup setup;
  (void)prepare_kernel(reinterpret_cast<const void*>(kernel), kDecThreads, Smem::kBytes, ctx, setup);
  const DecodePlan plan = make_decode_plan(p.T, kNextN, p.logits_stride, ctx.num_sms());
  if (plan.ctas < 1) return;
  CUtensorMap k_map, q_map;
  make_decode_tensor_maps(ctx, p, kNextN, k_map, q_map);
  kernel<<<plan.ctas, kDecThreads, Smem::kBytes, ctx.stream>>>(k_map, q_map, p, plan);
  DSA_CHECK_LAUNCH("indexer_decode_kernel");
}

}  // namespace dsa::cuda::indexer::sm90
