#pragma once
// Prefill lightning-indexer logits on Hopper (issue 17): warp-specialized,
// 8 query tokens per CTA, fp8 wgmma m64n256k32 (QGMMA).
//
// Why the older wgmma kernel (sm90_fp8_indexer_logits_wgmma.cuh) stops near
// 610 TFLOP/s in prefill: its CTA holds 2 tokens, so every 8.4 KB key block
// it gathers from L2 feeds only 2 x 64 x 64 x 128 MACs (256 FLOP per byte;
// 1000 TFLOP/s would need ~4 TB/s of L2 -> shared traffic), every thread of
// its single warpgroup both issues the cp.async gather and runs the epilogue,
// and the epilogue only overlaps the tensor cores through other CTAs.
//
// Here:
// - 8 tokens per CTA share each key block (4x the reuse of a gathered byte).
// - Warpgroup 2 is a producer: its 128 threads gather 64-key cache blocks
//   (8192 B of keys, 128-byte swizzled, plus the 256 B of scales) with
//   cp.async into a kStages ring, completion signalled through mbarriers.
// - Warpgroups 0 and 1 are consumers, each owning 4 of the tokens (its Q tile,
//   4 x 64 heads x 128 B = 32 KB, stays in shared memory for the whole CTA).
//   Per key block each issues D[64 keys, 256] = K8 . Q8^T as 4 wgmma
//   m64n256k32 (keys as M, so the head sum needs no cross-warp step, exactly
//   as in the older kernel: per-thread sums over its 16 heads of a token, then
//   a 4-lane reduce-scatter), then runs the epilogue on its 128 accumulators.
// - Ping-pong: a pair of named barriers orders the MMAs WG0(i), WG1(i),
//   WG0(i+1), ... so one warpgroup's epilogue runs while the other's MMA
//   occupies the tensor cores (the epilogue, ~300 instructions per warp per
//   block, is shorter than one warpgroup's 2.1 M-MAC MMA).
// Arithmetic per element and the reduction tree are those of the older
// kernel (same heads per thread, same fma order, same shuffle tree), so the
// two agree bit for bit as long as QGMMA's per-element accumulation does not
// depend on N.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.cuh"
#include "cuda/common/cp_async.cuh"
#include "cuda/indexer/config.h"
#include "cuda/indexer/launch.h"
#include "cuda/indexer/params.h"
#include "cuda/sm90/common/mbarrier.cuh"
#include "cuda/sm90/common/ptx.cuh"
#include "cuda/sm90/common/wgmma.cuh"

namespace dsa::cuda::indexer::sm90 {

constexpr int kPfTokens = 8;     // query tokens per CTA
constexpr int kPfWgTokens = 4;   // per consumer warpgroup: wgmma N = 4 x 64 heads = 256
constexpr int kPfThreads = 384;  // WG0, WG1 consumers; WG2 producer
// setmaxnreg moves registers within the launch allocation (168 x 384 = 64512
// under __launch_bounds__(384, 1)): 2 x 128 x 232 + 128 x 40 = 64512. The
// consumers hold 128 accumulators plus 64 weights.
constexpr int kPfConsumerRegs = 232;
constexpr int kPfProducerRegs = 40;
// Named barriers (0 is __syncthreads): "WG0 has issued block i's MMA",
// "WG1 has issued it", and one per consumer warpgroup for its Q tile.
constexpr uint32_t kPfBarWg0Issued = 1, kPfBarWg1Issued = 2, kPfBarQ0 = 3;

// Q of both consumers first (1024-aligned swizzle atoms), then the key ring
// (one 64-key block per stage), the scale ring, the mbarriers.
template <int kStages>
struct PrefillSmemPlan {
  static constexpr int kQWgBytes = kPfWgTokens * kIdxHeads * kIdxDim;  // 32768
  static constexpr int kKeyOffset = 2 * kQWgBytes;
  static constexpr int kKeyStageBytes = kIdxBlockTokens * kIdxDim;  // 8192
  static constexpr int kScaleOffset = kKeyOffset + kStages * kKeyStageBytes;
  static constexpr int kScaleStageBytes = kIdxBlockTokens * 4;
  static constexpr int kBarOffset = kScaleOffset + kStages * kScaleStageBytes;  // full[kStages], empty[kStages]
  static constexpr int kBytes = kBarOffset + 2 * kStages * 8 + 1024;             // + alignment slack
  static_assert(kKeyOffset % 1024 == 0 && kKeyStageBytes % 1024 == 0, "swizzle atoms need 1024-byte alignment");
};

namespace pf_detail {

using ::dsa::cuda::cp_async_16;
using ::dsa::cuda::cp_async_arrive;
using ::dsa::cuda::cp_async_commit;
using ::dsa::cuda::cp_async_wait_all;
using ::dsa::cuda::sm90::fence_proxy_async;
using ::dsa::cuda::sm90::fence_regs;
using ::dsa::cuda::sm90::mbar_arrive;
using ::dsa::cuda::sm90::mbar_init;
using ::dsa::cuda::sm90::mbar_wait;
using ::dsa::cuda::sm90::named_barrier_arrive;
using ::dsa::cuda::sm90::named_barrier_sync;
using ::dsa::cuda::sm90::smem_addr;
using ::dsa::cuda::sm90::sw128_desc_k_major;
using ::dsa::cuda::sm90::wgmma_commit;
using ::dsa::cuda::sm90::wgmma_fence;
using ::dsa::cuda::sm90::wgmma_m64n256k32_e4m3_ss;
using ::dsa::cuda::sm90::wgmma_wait;

// The CTA's tokens are grouped into passes, one per distinct request among
// them (a tile can straddle requests in a ragged batch); token ps leads a
// pass when it is the first of its request. Every warpgroup walks the same
// passes, so producer and consumers agree on the blocks of each.
struct Pass {
  int request;
  int max_visible;  // keys [0, max_visible) of the request are needed by some token of the pass
  int active;       // bit q: token q of the CTA belongs to the pass
};
__device__ __forceinline__ bool pass_led_by(int ps, const int* s_req, const int* s_vis, Pass& pass) {
  const int r = s_req[ps];
  if (r < 0) return false;
  int maxvis = 0, active = 0;
#pragma unroll
  for (int q = 0; q < kPfTokens; ++q) {
    if (q < ps && s_req[q] == r) return false;
    if (s_req[q] == r) {
      maxvis = max(maxvis, s_vis[q]);
      active |= 1 << q;
    }
  }
  pass = Pass{r, maxvis, active};
  return true;
}

}  // namespace pf_detail

template <int kStages>
__global__ void __launch_bounds__(kPfThreads, 1)
    indexer_logits_prefill_ws_kernel(const IndexerLogitsParams p, int64_t tiles_per_split) {
  using namespace pf_detail;
  using Plan = PrefillSmemPlan<kStages>;
  const float kNegInf = __int_as_float(0xff800000u);

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __shared__ int s_req[kPfTokens];
  __shared__ int s_vis[kPfTokens];

  const int tid = threadIdx.x;
  const int wg = tid >> 7;  // 0, 1: consumers; 2: producer (warpgroup-uniform)
  const int wtid = tid & 127;
  const uint32_t key_base = smem_addr(smem + Plan::kKeyOffset);
  const uint32_t bar_base = smem_addr(smem + Plan::kBarOffset);
  auto full_bar = [&](int s) { return bar_base + 8u * s; };
  auto empty_bar = [&](int s) { return bar_base + 8u * (kStages + s); };

  const int64_t tile_tokens = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kPfTokens;  // long rows first
  const int64_t max_keys = min(p.logits_stride, p.max_blocks_per_request * static_cast<int64_t>(kIdxBlockTokens));
  if (tid < kPfTokens) {
    const int64_t t = tile_tokens + tid;
    int r = -1, v = 0;
    if (t < p.T) {
      r = p.token_request[t];
      v = static_cast<int>(min(max(static_cast<int64_t>(p.visible_end[t]), int64_t{0}), max_keys));
    }
    s_req[tid] = r;
    s_vis[tid] = v;
  }
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_bar(s), 128);  // the producer threads' cp.async arrivals
      mbar_init(empty_bar(s), 8);   // one lane of each consumer warp
    }
  }
  __syncthreads();

  // Key tiles are single 64-key cache blocks; a split owns [tile_begin, tile_end).
  const int64_t total_tiles = (p.logits_stride + kIdxBlockTokens - 1) / kIdxBlockTokens;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(total_tiles, tile_begin + tiles_per_split);
  if (tile_begin >= tile_end) return;  // whole CTA, before any barrier is used

  if (wg == 2) {
    // ---- producer: gather each pass's key blocks through its block table ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kPfProducerRegs));
    uint32_t it = 0;
    for (int ps = 0; ps < kPfTokens; ++ps) {
      Pass pass;
      if (!pass_led_by(ps, s_req, s_vis, pass)) continue;
      const int32_t* bt = p.block_table + static_cast<int64_t>(pass.request) * p.max_blocks_per_request;
      const int64_t comp_end = min(tile_end, (static_cast<int64_t>(pass.max_visible) + kIdxBlockTokens - 1) / kIdxBlockTokens);
      for (int64_t tile = tile_begin; tile < comp_end; ++tile, ++it) {
        const int s = static_cast<int>(it % kStages);
        const uint32_t use = it / kStages;
        if (use > 0) mbar_wait(empty_bar(s), (use - 1) & 1);
        const uint8_t* src = p.k_cache + static_cast<int64_t>(__ldg(bt + tile)) * kIdxBlockBytes;
        const uint32_t dst = key_base + s * Plan::kKeyStageBytes;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int c = wtid + 128 * k;
          const int row = c >> 3, ch = c & 7;
          cp_async_16(dst + row * kIdxDim + ((ch ^ (row & 7)) << 4), src + row * kIdxDim + ch * 16);
        }
        if (wtid < 16) {
          cp_async_16(smem_addr(smem + Plan::kScaleOffset + s * Plan::kScaleStageBytes + wtid * 16),
                      src + kIdxBlockTokens * kIdxDim + wtid * 16);
        }
        cp_async_arrive(full_bar(s));
      }
    }
    cp_async_wait_all();
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kPfConsumerRegs));
  const int warp = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int64_t wg_tokens = tile_tokens + wg * kPfWgTokens;

  // Q tile of this warpgroup's 4 tokens: row n = token * 64 + head, 128 B,
  // swizzled like the keys; rows of tokens past T are zeros.
  uint8_t* s_q = smem + wg * Plan::kQWgBytes;
  const uint32_t q_addr = smem_addr(s_q);
  for (int c = wtid; c < kPfWgTokens * kIdxHeads * 8; c += 128) {
    const int n = c >> 3, ch = c & 7;
    const bool valid = wg_tokens + (n >> 6) < p.T;
    const uint8_t* src = valid ? p.q_fp8 + wg_tokens * (kIdxHeads * kIdxDim) + n * kIdxDim + ch * 16 : p.q_fp8;
    cp_async_16(q_addr + n * kIdxDim + ((ch ^ (n & 7)) << 4), src, valid ? 16u : 0u);
  }
  cp_async_commit();

  // Thread's heads in the accumulator: columns tk * 64 + 8 * j + tig * 2 + c.
  float wreg[kPfWgTokens][8][2];
#pragma unroll
  for (int tk = 0; tk < kPfWgTokens; ++tk) {
    const int64_t t = wg_tokens + tk;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) wreg[tk][j][c] = t < p.T ? __ldg(p.weights + t * kIdxHeads + 8 * j + tig * 2 + c) : 0.f;
  }
  cp_async_wait_all();
  fence_proxy_async();  // cp.async wrote Q through the generic proxy; wgmma reads it through the async one
  named_barrier_sync(kPfBarQ0 + wg, 128);

  // After the reduce-scatter, lane (g, tig) holds token tig of this warpgroup
  // at keys 16 * warp + g and + 8 of the block.
  const int q_out = wg * kPfWgTokens + tig;
  uint32_t it = 0;
  for (int ps = 0; ps < kPfTokens; ++ps) {
    Pass pass;
    if (!pass_led_by(ps, s_req, s_vis, pass)) continue;
    const int64_t comp_end = min(tile_end, (static_cast<int64_t>(pass.max_visible) + kIdxBlockTokens - 1) / kIdxBlockTokens);
    const bool writer = (pass.active >> q_out) & 1;
    const int vis = s_vis[q_out];
    float* row = p.logits + (tile_tokens + q_out) * p.logits_stride;  // used only by writers (t < T)

    for (int64_t tile = tile_begin; tile < comp_end; ++tile, ++it) {
      const int s = static_cast<int>(it % kStages);
      mbar_wait(full_bar(s), (it / kStages) & 1);
      fence_proxy_async();
      // Issue order WG0(i) < WG1(i) < WG0(i + 1): the warpgroups alternate on
      // the tensor cores, each one's epilogue under the other's MMA.
      if (wg == 0) {
        if (it > 0) named_barrier_sync(kPfBarWg1Issued, 256);
      } else {
        named_barrier_sync(kPfBarWg0Issued, 256);
      }
      float acc[128];
      const uint32_t k_addr = key_base + s * Plan::kKeyStageBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        wgmma_m64n256k32_e4m3_ss(acc, sw128_desc_k_major(k_addr + kk * 32), sw128_desc_k_major(q_addr + kk * 32), kk);
      }
      wgmma_commit();
      named_barrier_arrive(wg == 0 ? kPfBarWg0Issued : kPfBarWg1Issued, 256);
      wgmma_wait<0>();
      fence_regs(acc);
      const float* ss = reinterpret_cast<const float*>(smem + Plan::kScaleOffset + s * Plan::kScaleStageBytes);
      const float sc0 = ss[16 * warp + g], sc1 = ss[16 * warp + g + 8];
      __syncwarp();
      if (lane == 0) mbar_arrive(empty_bar(s));  // this warp is done with the stage

      // acc[(tk * 8 + j) * 4 + half * 2 + c]: key 16 * warp + g + 8 * half,
      // head 8 * j + tig * 2 + c of token tk.
      float v[2 * kPfWgTokens];
#pragma unroll
      for (int tk = 0; tk < kPfWgTokens; ++tk)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) sum = fmaf(wreg[tk][j][c], fmaxf(acc[(tk * 8 + j) * 4 + half * 2 + c], 0.f), sum);
          v[tk * 2 + half] = sum;
        }
      // Reduce-scatter over the 4 lanes of a row group: tig bit 1 picks the
      // token pair, bit 0 the token within it (the older kernel's tree).
      const bool t1 = (tig >> 1) & 1, t0 = tig & 1;
      float u[4];
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        const float keep = t1 ? v[4 + y] : v[y];
        const float send = t1 ? v[y] : v[4 + y];
        u[y] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
      }
      float total[2];
#pragma unroll
      for (int z = 0; z < 2; ++z) {
        const float keep = t0 ? u[2 + z] : u[z];
        const float send = t0 ? u[z] : u[2 + z];
        total[z] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
      }
      if (writer) {
#pragma unroll
        for (int z = 0; z < 2; ++z) {
          const int64_t pos = tile * kIdxBlockTokens + 16 * warp + g + 8 * z;
          // A select, not arithmetic: keys past visible_end may be stale or NaN.
          if (pos < p.logits_stride) row[pos] = pos < vis ? total[z] * (z ? sc1 : sc0) : kNegInf;
        }
      }
    }

    // Blocks of this split past every visible key of the pass: -inf, never loaded.
    const int64_t fill_begin = max(tile_begin, comp_end) * kIdxBlockTokens;
    const int64_t fill_end = min(tile_end * kIdxBlockTokens, p.logits_stride);
    for (int tk = 0; tk < kPfWgTokens; ++tk) {
      const int q = wg * kPfWgTokens + tk;
      if (!((pass.active >> q) & 1)) continue;
      float* r = p.logits + (tile_tokens + q) * p.logits_stride;
      for (int64_t pos = fill_begin + wtid; pos < fill_end; pos += 128) r[pos] = kNegInf;
    }
  }
  // WG1 arrived once after each of its `it` issues, WG0 waited before all but
  // its first: one wait left, so no barrier is left half-arrived at exit.
  if (wg == 0 && it > 0) named_barrier_sync(kPfBarWg1Issued, 256);
}

template <int kStages>
int prefill_ws_smem_bytes() {
  return PrefillSmemPlan<kStages>::kBytes;
}

// Host side; one explicit instantiation per variant in ../instantiations/.
template <int kStages>
void launch_prefill_ws(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  using Plan = PrefillSmemPlan<kStages>;
  auto kernel = indexer_logits_prefill_ws_kernel<kStages>;
  static KernelSetup setup;
  const int occupancy = prepare_kernel(reinterpret_cast<const void*>(kernel), kPfThreads, Plan::kBytes, ctx, setup);
  int64_t tiles_per_split = 0;
  const dim3 grid = make_grid(p, ctx, kPfTokens, kIdxBlockTokens, occupancy, tiles_per_split);
  kernel<<<grid, kPfThreads, Plan::kBytes, ctx.stream>>>(p, tiles_per_split);
  DSA_CHECK_LAUNCH("indexer_logits_prefill_ws_kernel");
}

}  // namespace dsa::cuda::indexer::sm90
