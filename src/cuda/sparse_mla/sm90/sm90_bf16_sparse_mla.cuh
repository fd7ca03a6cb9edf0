#pragma once
// Hopper (sm_90a) sparse MLA prefill kernel, warp-specialized and
// persistent. One work item = one token x 64 heads; a CTA runs one item after
// another:
//   WG2 (producer) gathers the 64 selected KV rows of each tile with 16-byte
//   cp.async copies (invalid index -> zero-filled row, no read), into two
//   tile buffers whose halves are released and refilled independently, and
//   publishes each tile's row validity in shared memory;
//   WG0 / WG1 (consumers) own alternate tiles: each computes its tile's full
//   64 x 64 scores (wgmma m64n64k16, Q and K from shared memory), the row max
//   runs along a chain (WG0's tile, then WG1's, then WG0 rescales), and each
//   accumulates 256 of the 512 value columns of O over both tiles (wgmma
//   m64n256k16: own P from registers, the other's P from shared memory, V
//   read as an MN-major view of the same swizzled KV tile); O goes from
//   registers to global memory in 16-byte stores, so Q's space is free for
//   the next item's Q before the epilogue.
// See docs/sparse_mla.md for the schedule and the synchronization argument.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/check.cuh"
#include "cuda/common/cp_async.cuh"
#include "cuda/sm90/common/mbarrier.cuh"
#include "cuda/sm90/common/ptx.cuh"
#include "cuda/sm90/common/wgmma.cuh"
#include "cuda/sparse_mla/params.h"
#include "cuda/sparse_mla/sm90/config.h"
#include "cuda/sparse_mla/sm90/sm90_fp8_kv_tile.cuh"
#include "dsa/cuda.h"

namespace dsa::cuda::sm90_sparse_mla {

using namespace dsa::cuda::sm90;  // the shared PTX helpers (src/cuda/sm90/common/)

// lse (natural log) and, when asked for, the row max of head rows h0 and
// h0 + 8 of token t from their running max (log2 domain) and sum; a row with
// nothing valid (sum 0) gets lse +inf and max -inf; a NaN sum (a NaN score)
// keeps lse NaN, as dsa::ref::sparse_mla does. Used by the epilogue and
// by the combine kernel of split items.
// The dense form (kDense builds): rows row0 and row1 of [T * H] lse / max.
__device__ __forceinline__ void store_row_stats_dense(const SparseMlaParams& p, int64_t row0, int64_t row1, float m0, float m1,
                                                      float l0, float l1) {
  constexpr float kLn2 = 0.6931471805599453f;
  p.lse[row0] = l0 == 0.f ? INFINITY : (m0 + __log2f(l0)) * kLn2;
  p.lse[row1] = l1 == 0.f ? INFINITY : (m1 + __log2f(l1)) * kLn2;
  if (p.row_max) {
    p.row_max[row0] = l0 == 0.f ? -INFINITY : m0 * kLn2;
    p.row_max[row1] = l1 == 0.f ? -INFINITY : m1 * kLn2;
  }
}
__device__ __forceinline__ void store_row_stats(const SparseMlaParams& p, uint32_t t, int h0, float m0, float m1, float l0,
                                                float l1) {
  constexpr float kLn2 = 0.6931471805599453f;
  float* lse = p.lse + mul_wide_u32(t, static_cast<uint32_t>(p.stride_lse_t)) + h0;
  lse[0] = l0 == 0.f ? INFINITY : (m0 + __log2f(l0)) * kLn2;
  lse[8] = l1 == 0.f ? INFINITY : (m1 + __log2f(l1)) * kLn2;
  if (p.row_max) {
    float* row_max = p.row_max + mul_wide_u32(t, static_cast<uint32_t>(p.stride_row_max_t)) + h0;
    row_max[0] = l0 == 0.f ? -INFINITY : m0 * kLn2;
    row_max[8] = l1 == 0.f ? -INFINITY : m1 * kLn2;
  }
}

// The V view of a KV tile (MN-major): 64-column N blocks one segment apart.
__device__ __forceinline__ uint32_t v_desc_lo(uint32_t addr) { return sw128_desc_lo_mn_major(addr, kSegBytes); }

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` inside a swizzled
// [rows x 128 B] segment.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// S (+)= Q K^T over 4 segments from segment seg0, descriptors from base low words.
__device__ __forceinline__ void qk_4_segments(float (&s)[32], uint32_t q_lo, uint32_t k_lo, int seg0, bool first) {
#pragma unroll
  for (int kk = 0; kk < 16; ++kk) {
    const uint32_t off = ((seg0 + (kk >> 2)) * kSegBytes + (kk & 3) * 32) >> 4;
    wgmma_m64n64k16_bf16_ss(s, sw128_desc(q_lo + off), sw128_desc(k_lo + off), (first && kk == 0) ? 0 : 1);
  }
}
__device__ __forceinline__ void qk_rope_segment(float (&s)[32], uint32_t q_lo, uint32_t k_lo) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t off = (8 * kSegBytes + kk * 32) >> 4;
    wgmma_m64n64k16_bf16_ss(s, sw128_desc(q_lo + off), sw128_desc(k_lo + off), 1);
  }
}

// Named barriers (0 is __syncthreads). Among the consumer threads: the row
// max chain (A: WG0 -> WG1, B: WG1 -> WG0), the two P hand-offs and the row
// sums; among the producer's: its index scan.
enum : uint32_t { kBarMaxA = 1, kBarMaxB = 2, kBarPA = 3, kBarPB = 4, kBarSum = 5, kBarScan = 6 };

// kDiag: 0 in the library. The dev bench (dev/sparse_mla/) times two
// diagnostic variants that split the bounds apart: 1 = gather only (the
// consumers release each half as soon as it lands), 2 = math only (the
// producer issues no copies; the tiles hold whatever shared memory held).
//
// Persistent: a CTA takes the work items (token, head group) blockIdx.x,
// blockIdx.x + gridDim.x, ... so that the next item's index scan, Q and
// first KV tiles load while the current item's last pair and epilogue run
// (a fresh CTA per item spent 8000 - 14000 cycles before its first scores,
// against a pair period of ~6300). The barriers' phases run on across items:
// `gp`, the CTA's global pair count, picks every buffer and validity parity;
// `kk`, the item count, the phase of q_ready / q_free.
//
// kReleaseFirst: WG0 retires P_B V_B and releases buffer 1's half L before it
// queues the next Q K^T, instead of after queuing its first half.
// kEarlyMaxB: WG1 publishes m_B before its exponentials. ptxas otherwise
// schedules them above the barrier arrival (they only read registers), so
// WG0 waits for them before it rescales and stores P_A', and buffer 0's half
// R (read by WG1's P_A' V_A) comes free that much later; the exponentials
// are pinned below the arrival through a shared load of 0 they depend on.
// Both are chosen by cache size (plan_launch, config.h).
// kSkipMask: a thread whose 16 score columns of the tile are all valid skips
// the 32 selects of the masking (the common case: every tile of a row with
// 2048 visible keys). WG0's mask and row max come before it publishes m_A,
// on the chain both warpgroups wait for, so the selects sit on the pair's
// critical path (kSkipMaskDefault).
//
// Work units: the items below split.num_full whole; with a split, unit
// num_full + k is part k % parts of item num_full + k / parts (each CTA gets
// at most one), which writes its partial O and row (max, sum) to the
// workspace for sparse_mla_combine_kernel.
//
// p's strides are resolved (explicit) and checked by the launcher: q, kv and
// out rows 16-byte aligned (cp.async, 16-byte stores), every stride below
// 2^31, so that each address product is one 32 x 32 -> 64-bit multiply
// (mul_wide_u32) with the stride read from the parameter bank.
// kDense: every view has its dense layout (strides_are_dense) and the
// addresses use the compile-time row lengths instead. Measured on the H200
// (2026-12-04, same call, 3 runs each): the runtime strides alone made the
// kernel 2-3% slower at H = 64 (8 more constant-bank loads and wide
// multiplies per pair in the producer's gather loop), so the dense layout,
// which every caller in the library uses, keeps its own builds.
template <int kHeadGroups, int kDiag = 0, bool kReleaseFirst = false, bool kEarlyMaxB = false, bool kSkipMask = false,
          bool kDense = true, int kFp8 = 0>
__global__ void __launch_bounds__(kNumThreads, 1)
    sparse_mla_fwd_kernel(const __grid_constant__ SparseMlaParams p, float scale_log2, const TailSplit split) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  uint8_t* smem = smem_raw + ((1024 - (raw_addr & 1023)) & 1023);
  const uint32_t base = smem_addr(smem);
  const uint32_t q_addr = base + SmemPlan::q;
  const uint32_t kv_addr = base + SmemPlan::kv0;
  const uint32_t p0_addr = kv_addr + 8 * kSegBytes;
  const uint32_t p1_addr = base + SmemPlan::p1;
  const uint32_t s_max_addr = base + SmemPlan::chain_max;
  const uint32_t q_ready = base + SmemPlan::bars;
  auto ready_bar = [&](int b, int h) { return q_ready + 8 + 8 * (2 * b + h); };
  auto free_bar = [&](int b, int h) { return q_ready + 40 + 8 * (2 * b + h); };
  // Row validity of both tiles of a pair, written by the producer (one byte
  // per row, slot = pair parity) and published through valid_ready[slot]:
  // the consumers read it from shared memory instead of re-reading indices
  // from global memory behind the producer's flood of copies.
  const uint32_t valid_addr = base + SmemPlan::valid;
  auto valid_ready = [&](int slot) { return q_ready + 72 + 8 * slot; };
  const uint32_t q_free = q_ready + 88;
  // Pair count of the item (slot = item parity), written by the producer
  // before its plain arrival on q_ready.
  volatile int* s_item_pairs = reinterpret_cast<volatile int*>(smem + SmemPlan::item_pairs);

  const uint32_t num_items = static_cast<uint32_t>(p.T) * kHeadGroups;  // T * H / 64 < 2^32
  const uint32_t num_units = split.parts ? split.num_full + split.leftover * split.parts : num_items;
  auto unit_item = [&](uint32_t u, int& part) {
    part = -1;
    if (u < split.num_full) return u;
    const uint32_t k = u - split.num_full;
    part = static_cast<int>(k % split.parts);
    return split.num_full + k / split.parts;
  };
  const int tid = threadIdx.x;
  // Warp-uniform in the compiler's eyes, so the role branches hold no wgmma
  // that ptxas would serialize.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int lane = tid & 31;
  const int H = kHeadGroups * BLOCK_H;
  auto item_rows = [&](uint32_t item, int& n) -> const int32_t* {
    if constexpr (kDense) {
      const int64_t t = item / kHeadGroups;
      n = p.topk;
      if (p.valid_len) n = min(max(p.valid_len[t], 0), p.topk);
      return p.indices + t * p.topk;
    } else {
      const uint32_t t = item / kHeadGroups;
      n = p.topk;
      if (p.valid_len) n = min(max(p.valid_len[mul_wide_u32(t, static_cast<uint32_t>(p.stride_valid_len_t))], 0), p.topk);
      return p.indices + mul_wide_u32(t, static_cast<uint32_t>(p.stride_indices_t));
    }
  };
  auto q_rows_of = [&](uint32_t item) -> const __nv_bfloat16* {
    if constexpr (kDense) {
      return p.q + (item / kHeadGroups) * p.stride_q_t + static_cast<int64_t>(item % kHeadGroups) * BLOCK_H * D_QK;
    } else {
      return p.q + mul_wide_u32(item / kHeadGroups, static_cast<uint32_t>(p.stride_q_t)) +
             mul_wide_u32((item % kHeadGroups) * BLOCK_H, static_cast<uint32_t>(p.stride_q_h));
    }
  };
  // Element offset of row r of a head block in q, and of cache slot `slot` in kv.
  auto q_row_offset = [&](int r) -> int64_t {
    if constexpr (kDense) return r * D_QK;
    else return mul_wide_u32(r, static_cast<uint32_t>(p.stride_q_h));
  };
  if (wg == 2) {
    // The first item's Q copies go out before anything else.
    const int ptid = tid - 256;
    const int r_base = ptid >> 3, cc = ptid & 7;
    int part0;
    const __nv_bfloat16* q_rows = q_rows_of(unit_item(blockIdx.x, part0));
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int r = r_base + 16 * it;
      const __nv_bfloat16* src = q_rows + q_row_offset(r) + cc * 8;
#pragma unroll
      for (int seg = 0; seg < NUM_SEG; ++seg) cp_async_16(q_addr + seg * kSegBytes + swz(r, cc), src + seg * SEG, 16);
    }
  }
  const uint32_t zero_addr = base + SmemPlan::zero;
  if (tid == 0) {
    asm volatile("st.shared.u32 [%0], %1;" ::"r"(zero_addr), "r"(0u) : "memory");
    mbar_init(q_ready, 128 + 1);  // the producer's Q copies + its plain arrival after writing the pair count
    for (int b = 0; b < 2; ++b)
      for (int h = 0; h < 2; ++h) {
        mbar_init(ready_bar(b, h), 128);
        mbar_init(free_bar(b, h), 128);
      }
    mbar_init(valid_ready(0), 16);  // the producer threads that own a row (cc == 0)
    mbar_init(valid_ready(1), 16);
    mbar_init(q_free, 256);
  }
  __syncthreads();

  if (wg == 2) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    const int ptid = tid - 256;
    const int r_base = ptid >> 3;
    const int cc = ptid & 7;
    int* s_scan = const_cast<int*>(s_item_pairs) + 2;  // int [2 item parity][4 warps]
    uint32_t gp = 0;
    int kk = 0;
    for (uint32_t u = blockIdx.x; u < num_units; u += gridDim.x, ++kk) {
      int part;
      const uint32_t item = unit_item(u, part);
      int n;
      const int32_t* idx_row = item_rows(item, n);
      // Last valid position: tiles after it are never loaded or computed
      // (top-k pads the tail with -1). Loads 8 at a time so that they
      // overlap; they also bring pair 0's indices into L1. (Holding pair 0's
      // indices in registers across the scan spilled.)
      int last = -1;
      for (int pos0 = ptid; pos0 < n; pos0 += 8 * 128) {
        int32_t v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = pos0 + u * 128 < n ? __ldg(idx_row + pos0 + u * 128) : -1;
#pragma unroll
        for (int u = 0; u < 8; ++u)
          if (v[u] >= 0 && v[u] < p.num_slots) last = pos0 + u * 128;
      }
      last = __reduce_max_sync(0xffffffffu, last);
      if (lane == 0) s_scan[(kk & 1) * 4 + (ptid >> 5)] = last;
      named_barrier_sync(kBarScan, 128);
      last = max(max(s_scan[(kk & 1) * 4], s_scan[(kk & 1) * 4 + 1]), max(s_scan[(kk & 1) * 4 + 2], s_scan[(kk & 1) * 4 + 3]));
      const int item_pairs = ((last + 1 + BLOCK_KV - 1) / BLOCK_KV + 1) / 2;
      // A part of a split item takes its share of the item's pairs (maybe none).
      const int pair0 = part < 0 ? 0 : part * item_pairs / split.parts;
      const int num_pairs = part < 0 ? item_pairs : (part + 1) * item_pairs / split.parts - pair0;
      // Q, then the pair count through q_ready. The first item's copies are
      // in flight; a later item's wait for the consumers to release Q's space
      // at the top of the previous item's last pair (after its last Q K^T),
      // before that pair frees the tile buffers for this item's pair 0.
      if (kk > 0) {
        mbar_wait(q_free, (kk - 1) & 1);
        if (num_pairs > 0) {
          const __nv_bfloat16* q_rows = q_rows_of(item);
#pragma unroll
          for (int it = 0; it < 4; ++it) {
            // Recomputed per item from an opaque row: hoisted out of the
            // item loop, these offsets were spilled.
            int r = r_base + 16 * it;
            asm volatile("mov.b32 %0, %0;" : "+r"(r));
            const __nv_bfloat16* src = q_rows + q_row_offset(r) + cc * 8;
#pragma unroll
            for (int seg = 0; seg < NUM_SEG; ++seg) cp_async_16(q_addr + seg * kSegBytes + swz(r, cc), src + seg * SEG, 16);
          }
        }
      }
      cp_async_arrive(q_ready);
      if (ptid == 0) {
        s_item_pairs[kk & 1] = num_pairs;
        mbar_arrive(q_ready);
      }
      auto issue_pair = [&](int j) {
        const uint32_t gj = gp + j;
        int32_t rows[2][4];  // cache slot of each of this thread's rows, -1 when invalid
#pragma unroll
        for (int b = 0; b < 2; ++b)
#pragma unroll
          for (int it = 0; it < 4; ++it) {
            const int pos = (2 * (pair0 + j) + b) * BLOCK_KV + r_base + 16 * it;
            const int32_t idx = pos < n ? __ldg(idx_row + pos) : -1;
            const bool valid = idx >= 0 && idx < p.num_slots;
            if (cc == 0) {
              const uint32_t a = valid_addr + static_cast<uint32_t>(((gj & 1) * 2 + b) * BLOCK_KV + r_base + 16 * it);
              asm volatile("st.shared.u8 [%0], %1;" ::"r"(a), "r"(valid ? 1u : 0u) : "memory");
            }
            rows[b][it] = valid ? idx : -1;
          }
        if (cc == 0) mbar_arrive(valid_ready(gj & 1));
        const uint32_t parity = (gj - 1) & 1;
        auto load = [&](int b, int seg_begin, int seg_end) {
          if constexpr (kDiag != 2) {
#pragma unroll
            for (int it = 0; it < 4; ++it) {
              const int r = r_base + 16 * it;
              const int32_t row = rows[b][it];
              const __nv_bfloat16* src =
                  kDense ? p.kv + static_cast<int64_t>(max(row, 0)) * D_QK + cc * 8
                         : p.kv + mul_wide_u32(max(row, 0), static_cast<uint32_t>(p.stride_kv_slot)) + cc * 8;
              for (int seg = seg_begin; seg < seg_end; ++seg)
                cp_async_16(kv_addr + b * kTileBytes + seg * kSegBytes + swz(r, cc), src + seg * SEG, row >= 0 ? 16u : 0u);
            }
          }
        };
        if (gj > 0) mbar_wait(free_bar(0, 0), parity);
        load(0, 0, kHalfSplit);
        cp_async_arrive(ready_bar(0, 0));
        if (gj > 0) mbar_wait(free_bar(1, 1), parity);
        load(1, kHalfSplit, NUM_SEG);
        cp_async_arrive(ready_bar(1, 1));
        if (gj > 0) mbar_wait(free_bar(0, 1), parity);
        load(0, kHalfSplit, NUM_SEG);
        cp_async_arrive(ready_bar(0, 1));
        if (gj > 0) mbar_wait(free_bar(1, 0), parity);
        load(1, 0, kHalfSplit);
        cp_async_arrive(ready_bar(1, 0));
      };
      // kFp8: the rows are 656-byte fp8 rows (sm90_fp8_kv_tile.cuh), copied
      // into the tile in place and dequantized there by the thread that
      // copied them, so a half is ready only after its copies have landed
      // and been converted: the copies of a pair go out in cp.async groups
      // (A = buffer 0 L, B = 1 R, C = 0 R, D = 1 L, the bf16 order) and are
      // converted as they land, in one of two orders:
      // kFp8ThreeFirst: A, B and C's copies, then A's conversion, D's
      // copies, B, C, D's conversions (three halves in flight; 16 bytes of
      // producer spill);
      // kFp8Interleaved: each half converted once the next one's copies
      // are out (A after B's copies, B after C's, C after D's). C's half is
      // released late in the previous pair (after WG1's P_A V_A), so A's
      // conversion does not wait for it and WG0's next Q K^T can start
      // sooner; two halves in flight, 52 bytes of producer spill.
      // No wait depends on a conversion after it in either order: D's free
      // barrier (buffer 1's half L of the previous pair) is released by WG0
      // only after it has queued its Q K^T on A of this pair, and A is
      // converted before that wait; every other release of the previous
      // pair needs nothing of this one.
      auto issue_pair_fp8 = [&](int j) {
        const uint32_t gj = gp + j;
        int32_t rows[2][4];
#pragma unroll
        for (int b = 0; b < 2; ++b)
#pragma unroll
          for (int it = 0; it < 4; ++it) {
            const int pos = (2 * (pair0 + j) + b) * BLOCK_KV + r_base + 16 * it;
            const int32_t idx = pos < n ? __ldg(idx_row + pos) : -1;
            const bool valid = idx >= 0 && idx < p.num_slots;
            if (cc == 0) {
              const uint32_t a = valid_addr + static_cast<uint32_t>(((gj & 1) * 2 + b) * BLOCK_KV + r_base + 16 * it);
              asm volatile("st.shared.u8 [%0], %1;" ::"r"(a), "r"(valid ? 1u : 0u) : "memory");
            }
            rows[b][it] = valid ? idx : -1;
          }
        if (cc == 0) mbar_arrive(valid_ready(gj & 1));
        const uint32_t parity = (gj - 1) & 1;
        // Copies of half `half` of buffer b: this lane's e4m3 chunks cc and
        // cc + 8 of the half, lane 0 the scales, and for half R the k_pe chunk
        // cc; an invalid row reads nothing and its bytes are zero (so it
        // dequantizes to zeros).
        auto load = [&](int b, int half) {
#pragma unroll
          for (int it = 0; it < 4; ++it) {
            // An opaque row: offsets hoisted out of the pair loop spilled.
            int r = r_base + 16 * it;
            asm volatile("mov.b32 %0, %0;" : "+r"(r));
            const int32_t row = rows[b][it];
            const uint8_t* src = kDense ? p.kv_fp8 + static_cast<int64_t>(max(row, 0)) * kFp8RowBytes
                                        : p.kv_fp8 + mul_wide_u32(max(row, 0), static_cast<uint32_t>(p.stride_kv_slot));
            const uint32_t tile = kv_addr + b * kTileBytes;
            const uint32_t bytes = row >= 0 ? 16u : 0u;
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              const int jj = 16 * half + cc + 8 * k;
              cp_async_16(tile + fp8_chunk_offset(r, jj), src + 16 * jj, bytes);
            }
            if (cc == 0) cp_async_16(tile + fp8_scale_offset(r, half), src + kFp8ScaleOffset, bytes);
            if (half == 1) cp_async_16(tile + 8 * kSegBytes + swz(r, cc), src + kFp8RopeOffset + 16 * cc, bytes);
          }
          cp_async_commit();
        };
        // Dequantizes this lane's chunks of half `half` of buffer b (its own
        // copies have landed), then publishes the half.
        auto convert = [&](int b, int half) {
          const uint32_t tile = kv_addr + b * kTileBytes;
          __syncwarp();  // every lane's copies (the row's scales among them) have landed
          // Not unrolled: the producer has 40 registers (setmaxnreg), and
          // unrolled rows spilled.
#pragma unroll 1
          for (int it = 0; it < 4; ++it) {
            int r = r_base + 16 * it;
            asm volatile("mov.b32 %0, %0;" : "+r"(r));
            float s0, s1;  // the scales of groups 2 half and 2 half + 1
            asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                         : "=f"(s0), "=f"(s1)
                         : "r"(tile + fp8_scale_offset(r, half) + 8 * half)
                         : "memory");
            __syncwarp();  // the row's lanes have read the scales before lane 0 overwrites them
            // One chunk at a time (reading both first spilled).
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              const uint32_t a = tile + fp8_chunk_offset(r, 16 * half + cc + 8 * k);
              uint4 v, lo, hi;
              asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                           : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                           : "r"(a)
                           : "memory");
              dequant_chunk(v, k == 0 ? s0 : s1, lo, hi);
              asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a), "r"(lo.x), "r"(lo.y), "r"(lo.z), "r"(lo.w)
                           : "memory");
              asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a ^ 16u), "r"(hi.x), "r"(hi.y), "r"(hi.z),
                           "r"(hi.w)
                           : "memory");
            }
          }
          fence_proxy_async();  // the generic-proxy stores, before wgmma reads them
        };
        if constexpr (kFp8 == kFp8Interleaved) {
          if (gj > 0) mbar_wait(free_bar(0, 0), parity);
          load(0, 0);  // A
          if (gj > 0) mbar_wait(free_bar(1, 1), parity);
          load(1, 1);  // B
          cp_async_wait<1>();
          convert(0, 0);
          mbar_arrive(ready_bar(0, 0));
          if (gj > 0) mbar_wait(free_bar(0, 1), parity);
          load(0, 1);  // C
          cp_async_wait<1>();
          convert(1, 1);
          mbar_arrive(ready_bar(1, 1));
          if (gj > 0) mbar_wait(free_bar(1, 0), parity);
          load(1, 0);  // D
          cp_async_wait<1>();
          convert(0, 1);
          mbar_arrive(ready_bar(0, 1));
        } else {
          if (gj > 0) mbar_wait(free_bar(0, 0), parity);
          load(0, 0);  // A
          if (gj > 0) mbar_wait(free_bar(1, 1), parity);
          load(1, 1);  // B
          if (gj > 0) mbar_wait(free_bar(0, 1), parity);
          load(0, 1);  // C
          cp_async_wait<2>();
          convert(0, 0);
          mbar_arrive(ready_bar(0, 0));
          if (gj > 0) mbar_wait(free_bar(1, 0), parity);
          load(1, 0);  // D
          cp_async_wait<2>();
          convert(1, 1);
          mbar_arrive(ready_bar(1, 1));
          cp_async_wait<1>();
          convert(0, 1);
          mbar_arrive(ready_bar(0, 1));
        }
        cp_async_wait<0>();
        convert(1, 0);
        mbar_arrive(ready_bar(1, 0));
      };
      if constexpr (kFp8) {
        for (int j = 0; j < num_pairs; ++j) issue_pair_fp8(j);
      } else {
        for (int j = 0; j < num_pairs; ++j) issue_pair(j);
      }
      // The next item's Q into L2 while this item's last pair runs.
      if (ptid == 0 && u + gridDim.x < num_units) {
        int next_part;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(q_rows_of(unit_item(u + gridDim.x, next_part))),
                     "r"(BLOCK_H * D_QK * 2)
                     : "memory");
      }
      gp += num_pairs;
    }
    cp_async_wait_all();
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
  const int w = wg;
  const int wtid = tid & 127;
  const int warp = wtid >> 5;
  const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8;
  const int cq = (lane & 3) * 2;
  const uint32_t my_tile = kv_addr + w * kTileBytes, other_tile = kv_addr + (1 - w) * kTileBytes;
  const int first_half = w == 0 ? 0 : 1;

  float o[128];
  // rm: the max this warpgroup's O and l are relative to (log2 domain).
  float rm0, rm1, l0, l1;
  float* s_row_sum = reinterpret_cast<float*>(smem + SmemPlan::row_sum);  // float [2 item parity][2 WG][64]
  float sc[32];
  uint32_t pa[16];

  // Descriptor bases pass through an opaque move at each use, so that ptxas
  // does not hoist dozens of loop-invariant 64-bit descriptors into
  // registers (that spilled).
  auto opaque = [](uint32_t x) {
    asm volatile("mov.b32 %0, %0;" : "+r"(x));
    return x;
  };
  // The chained row max lives in shared memory as float [64] (rows r0, r1 =
  // r0 + 8 of this thread); 32-bit shared addresses from an opaque base keep
  // it to one register.
  auto ld_max = [&](float& a, float& b) {
    const uint32_t ad = opaque(s_max_addr + static_cast<uint32_t>(r0 * 4));
    asm volatile("ld.shared.f32 %0, [%2];\n\tld.shared.f32 %1, [%2+32];" : "=f"(a), "=f"(b) : "r"(ad) : "memory");
  };
  auto st_max = [&](float a, float b) {
    const uint32_t ad = opaque(s_max_addr + static_cast<uint32_t>(r0 * 4));
    asm volatile("st.shared.f32 [%0], %1;\n\tst.shared.f32 [%0+32], %2;" ::"r"(ad), "f"(a), "f"(b) : "memory");
  };
  auto issue_qk_first = [&](uint32_t parity) {
    mbar_wait(ready_bar(w, first_half), parity);
    fence_proxy_async();
    wgmma_fence();
    qk_4_segments(sc, opaque(sw128_desc_lo_k_major(q_addr)), opaque(sw128_desc_lo_k_major(my_tile)), 4 * w, true);
    wgmma_commit();
  };
  auto issue_qk_second = [&](uint32_t parity) {
    mbar_wait(ready_bar(w, 1 - first_half), parity);
    fence_proxy_async();
    wgmma_fence();
    const uint32_t qa = opaque(sw128_desc_lo_k_major(q_addr)), ta = opaque(sw128_desc_lo_k_major(my_tile));
    qk_4_segments(sc, qa, ta, 4 - 4 * w, false);
    qk_rope_segment(sc, qa, ta);
    wgmma_commit();
  };
  // Validity of this thread's 16 score columns of the pair's tile w (bit k: column
  // 8 (k / 2) + cq + k % 2), from the producer's bytes.
  auto valid_bits_of = [&](uint32_t gj) {
    mbar_wait(valid_ready(gj & 1), (gj >> 1) & 1);
    const uint32_t a = opaque(valid_addr + static_cast<uint32_t>(((gj & 1) * 2 + w) * BLOCK_KV + cq));
    uint32_t bits = 0;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      uint32_t v;
      asm volatile("ld.shared.u16 %0, [%1];" : "=r"(v) : "r"(a + jj * 8) : "memory");
      bits |= ((v & 1u) | ((v >> 7) & 2u)) << (2 * jj);
    }
    return bits;
  };
  // An item's first scores (pair gj), issued and retired in iteration 0 of
  // the pair loop (see there); returns the tile's validity bits.
  auto first_scores = [&](uint32_t gj) {
    issue_qk_first(gj & 1);
    issue_qk_second(gj & 1);
    const uint32_t bits = valid_bits_of(gj);
    wgmma_wait<0>();
    fence_regs(sc);
    fence_regs(o);
    return bits;
  };
  // Mask invalid columns to -inf and take this tile's row max, in the log2
  // domain (scale_log2 > 0 commutes with max, and rounding is monotonic: the
  // same bits as the max of the scaled scores).
  auto mask_and_max = [&](uint32_t bits, float& mx0, float& mx1) {
    mx0 = -INFINITY;
    mx1 = -INFINITY;
    if (kSkipMask && bits == 0xFFFFu) {
      // All 16 of this thread's columns valid: the selects would change nothing.
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const int jj = k >> 1, e = k & 1;
        mx0 = fmaxf(mx0, sc[jj * 4 + e]);
        mx1 = fmaxf(mx1, sc[jj * 4 + 2 + e]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const int jj = k >> 1, e = k & 1;
        const bool v = (bits >> k) & 1u;
        sc[jj * 4 + e] = v ? sc[jj * 4 + e] : -INFINITY;
        sc[jj * 4 + 2 + e] = v ? sc[jj * 4 + 2 + e] : -INFINITY;
        mx0 = fmaxf(mx0, sc[jj * 4 + e]);
        mx1 = fmaxf(mx1, sc[jj * 4 + 2 + e]);
      }
    }
#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o_));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o_));
    }
    mx0 *= scale_log2;
    mx1 *= scale_log2;
  };
  // O *= (a0, a1) by row; skipped when the whole warp's factors are 1 (the
  // max did not move: the common case after the first tiles; same bits).
  auto scale_o = [&](float a0, float a1) {
    if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
      for (int k = 0; k < 128; k += 4) {
        o[k] *= a0;
        o[k + 1] *= a0;
        o[k + 2] *= a1;
        o[k + 3] *= a1;
      }
    }
  };
  // P = exp2(S - m) with the new max m (>= rm), rescale O and l to m.
  auto exp_and_rescale = [&](float mn0, float mn1) {
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0;
    const float mu1 = mn1 == -INFINITY ? 0.f : mn1;
    const float a0 = fast_exp2(rm0 - mu0), a1 = fast_exp2(rm1 - mu1);
    rm0 = mn0;
    rm1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int k = 0; k < 32; k += 4) {
      sc[k] = fast_exp2(fmaf(sc[k], scale_log2, -mu0));
      sc[k + 1] = fast_exp2(fmaf(sc[k + 1], scale_log2, -mu0));
      sc[k + 2] = fast_exp2(fmaf(sc[k + 2], scale_log2, -mu1));
      sc[k + 3] = fast_exp2(fmaf(sc[k + 3], scale_log2, -mu1));
      ps0 += sc[k] + sc[k + 1];
      ps1 += sc[k + 2] + sc[k + 3];
    }
    l0 = l0 * a0 + ps0;
    l1 = l1 * a1 + ps1;
    scale_o(a0, a1);
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk * 4 + 0] = pack_bf16(sc[8 * kk + 0], sc[8 * kk + 1]);
      pa[kk * 4 + 1] = pack_bf16(sc[8 * kk + 2], sc[8 * kk + 3]);
      pa[kk * 4 + 2] = pack_bf16(sc[8 * kk + 4], sc[8 * kk + 5]);
      pa[kk * 4 + 3] = pack_bf16(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
  };
  // P_A at WG1's max, for WG1: scaled from the fragments the own P V is
  // still reading (reads do not disturb an in-flight wgmma) and stored a
  // pair at a time, so WG1 gets P_A without waiting for that P V.
  auto scale_bf16x2 = [](uint32_t v, float f) {
    __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&v);
    return pack_bf16(__low2float(b) * f, __high2float(b) * f);
  };
  // P as swizzled K-major [64 x 64] bf16 at shared address sp, scaled by
  // (s0, s1) per row when `scaled` is std::true_type. Row r1 = r0 + 8 has the same
  // swizzle phase, 1024 bytes further. Offsets are recomputed from opaque
  // values at each call (hoisted, they cost 16 registers for the whole loop).
  auto store_p = [&](uint32_t sp, auto scaled, float s0, float s1) {
    const uint32_t row = opaque(sp + static_cast<uint32_t>(r0 * 128 + cq * 2));
    const uint32_t x = opaque(static_cast<uint32_t>(r0 & 7));
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const uint32_t a = row + ((static_cast<uint32_t>(jj) ^ x) << 4);
      uint32_t v0 = pa[(jj >> 1) * 4 + (jj & 1) * 2], v1 = pa[(jj >> 1) * 4 + (jj & 1) * 2 + 1];
      if constexpr (decltype(scaled)::value) {
        v0 = scale_bf16x2(v0, s0);
        v1 = scale_bf16x2(v1, s1);
      }
      asm volatile("st.shared.u32 [%0], %1;" ::"r"(a), "r"(v0) : "memory");
      asm volatile("st.shared.u32 [%0+1024], %1;" ::"r"(a), "r"(v1) : "memory");
    }
    fence_proxy_async();
  };
  auto pv_own = [&]() {
    const uint32_t v_lo = opaque(v_desc_lo(my_tile + (w * 4) * kSegBytes));
    wgmma_fence();
    fence_regs(o);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n256k16_bf16_rs_tb(o, pa[kk * 4], pa[kk * 4 + 1], pa[kk * 4 + 2], pa[kk * 4 + 3],
                                  sw128_desc(v_lo + ((kk * 16 * 128) >> 4)));
    wgmma_commit();
  };
  auto pv_other = [&](uint32_t p_other) {
    const uint32_t v_lo = opaque(v_desc_lo(other_tile + (w * 4) * kSegBytes));
    const uint32_t p_lo = opaque(sw128_desc_lo_k_major(p_other));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n256k16_bf16_ss_tb(o, sw128_desc(p_lo + ((kk * 32) >> 4)), sw128_desc(v_lo + ((kk * 16 * 128) >> 4)), 1);
    wgmma_commit();
  };

  // An item's epilogue, called inside each role's own item loop: the two
  // branches never merge, so ptxas need not agree on where O lives in both
  // (a merge point made it spill).
  auto finish = [&](uint32_t item, int kk, int num_pairs_of_item, int part, uint32_t u) {
    const std::conditional_t<kDense, int64_t, uint32_t> t = item / kHeadGroups;
    const int g = static_cast<int>(item % kHeadGroups);
    float* row_sum = s_row_sum + (kk & 1) * 2 * BLOCK_H;
    // Row sums: thread partials -> quad -> both warpgroups (fixed order: WG0 + WG1).
#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, o_);
      l1 += __shfl_xor_sync(0xffffffffu, l1, o_);
    }
    if ((lane & 3) == 0) {
      row_sum[w * BLOCK_H + r0] = l0;
      row_sum[w * BLOCK_H + r1] = l1;
    }
    named_barrier_sync(kBarSum, 256);
    const float lt0 = row_sum[r0] + row_sum[BLOCK_H + r0];
    const float lt1 = row_sum[r1] + row_sum[BLOCK_H + r1];
    if (part >= 0) {
      // A part of a split item: O (unnormalized, accumulator layout) and
      // the rows' (max, sum) go to the workspace; the combine kernel writes
      // out, lse and row_max.
      float* ws = p.workspace + static_cast<size_t>(u - split.num_full) * kPartFloats;
      float4* wo = reinterpret_cast<float4*>(ws) + w * 32 * 128 + (tid & 127);
#pragma unroll
      for (int c = 0; c < 32; ++c) wo[c * 128] = make_float4(o[4 * c], o[4 * c + 1], o[4 * c + 2], o[4 * c + 3]);
      if (w == 0 && (lane & 3) == 0) {
        float2* ml = reinterpret_cast<float2*>(ws + kPartOFloats);
        ml[r0] = make_float2(rm0, lt0);
        ml[r1] = make_float2(rm1, lt1);
      }
      if (num_pairs_of_item == 0) mbar_arrive(q_free);
      return;
    }
    const float inv0 = lt0 > 0.f ? 1.f / lt0 : 0.f;
    const float inv1 = lt1 > 0.f ? 1.f / lt1 : 0.f;
    const int h0 = g * BLOCK_H + r0;  // head of row r0 (r1 = r0 + 8: head h0 + 8)
    // O goes straight from registers to global memory, 16 bytes per store:
    // a quad holds 8 consecutive columns of a row for each 8-column chunk,
    // so a 4 x 4 transpose of bf16x2 values within the quad (two
    // shuffle-exchange steps) gives each lane one whole chunk. Shared
    // memory is left alone, so Q's space is free for the next item.
    const int q = lane & 3;
    __nv_bfloat16* out0;
    __nv_bfloat16* out1;
    if constexpr (kDense) {
      out0 = p.out + (t * H + h0) * D_V + w * 256 + q * 8;
      out1 = out0 + 8 * D_V;
    } else {
      out0 = p.out + mul_wide_u32(t, static_cast<uint32_t>(p.stride_out_t)) + mul_wide_u32(h0, static_cast<uint32_t>(p.stride_out_h)) +
             w * 256 + q * 8;
      out1 = out0 + mul_wide_u32(8, static_cast<uint32_t>(p.stride_out_h));
    }
    auto quad_transpose = [&](uint32_t (&a)[4]) {
#pragma unroll
      for (int x = 2; x >= 1; x >>= 1) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (i & x) continue;
          const uint32_t send = (q & x) ? a[i] : a[i + x];
          const uint32_t got = __shfl_xor_sync(0xffffffffu, send, x);
          if (q & x)
            a[i] = got;
          else
            a[i + x] = got;
        }
      }
    };
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      uint32_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int jj = 4 * m + i;
        a[i] = pack_bf16(o[jj * 4] * inv0, o[jj * 4 + 1] * inv0);
        b[i] = pack_bf16(o[jj * 4 + 2] * inv1, o[jj * 4 + 3] * inv1);
      }
      quad_transpose(a);
      quad_transpose(b);
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(out0 + m * 32), "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])
                   : "memory");
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(out1 + m * 32), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3])
                   : "memory");
    }
    if (w == 0 && (lane & 3) == 0) {
      if constexpr (kDense)
        store_row_stats_dense(p, t * H + h0, t * H + h0 + 8, rm0, rm1, lt0, lt1);
      else
        store_row_stats(p, t, h0, rm0, rm1, lt0, lt1);
    }
    // Q's space is released at the top of an item's last pair (after its
    // last Q K^T), or here when the item had no pairs.
    if (num_pairs_of_item == 0) mbar_arrive(q_free);
  };
  // Per item: wait for Q and the pair count, reset the running state.
  auto start_item = [&](int kk) {
    mbar_wait(q_ready, kk & 1);
    const int num_pairs = s_item_pairs[kk & 1];
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.f;
    rm0 = -INFINITY;
    rm1 = -INFINITY;
    l0 = 0.f;
    l1 = 0.f;
    return num_pairs;
  };

  uint32_t gp = 0;
  int kk = 0;
  if constexpr (kDiag == 1) {
    for (uint32_t u = blockIdx.x; u < num_units; u += gridDim.x, ++kk) {
      int part;
      const uint32_t item = unit_item(u, part);
      const int num_pairs = start_item(kk);
      if (num_pairs > 0) mbar_arrive(q_free);  // no Q K^T here
      for (int j = 0; j < num_pairs; ++j) {
        mbar_wait(ready_bar(w, first_half), (gp + j) & 1);
        mbar_wait(ready_bar(1 - w, first_half), (gp + j) & 1);
        mbar_arrive(free_bar(w, first_half));
        mbar_arrive(free_bar(1 - w, first_half));
      }
      gp += num_pairs;
      finish(item, kk, num_pairs, part, u);
    }
  } else if (w == 0) {
    // WG0: tile A = 2j in buffer 0; value columns 0-255.
    for (uint32_t u = blockIdx.x; u < num_units; u += gridDim.x, ++kk) {
      int part;
      const uint32_t item = unit_item(u, part);
      const int num_pairs = start_item(kk);
      uint32_t bits = 0;
      // O's zeros must be in place before the first wgmma is in flight: ptxas
      // serializes wgmma when accumulator registers are written mid-pipeline.
      fence_regs(o);
      // Every wgmma group is retired inside the iteration that issued it: a
      // pipeline that stays open across the loop's back edge (or from before
      // the loop) makes ptxas serialize all wgmma.
      for (int j = 0; j < num_pairs; ++j) {
        const uint32_t gj = gp + j;
        if (j == 0) bits = first_scores(gj);
        // The item's last Q K^T has retired: Q's space may take the next item's Q.
        if (j == num_pairs - 1) mbar_arrive(q_free);
        float mx0, mx1;
        mask_and_max(bits, mx0, mx1);
        const float mn0 = fmaxf(rm0, mx0), mn1 = fmaxf(rm1, mx1);
        __syncwarp();
        if ((lane & 3) == 0) {
          st_max(mn0, mn1);
        }
        named_barrier_arrive(kBarMaxA, 256);
        exp_and_rescale(mn0, mn1);
        pack_p();
        pv_own();
        // WG1's max continues the chain: P_A rescaled for WG1 while the own
        // P V still runs, then O and l once it is done.
        named_barrier_sync(kBarMaxB, 256);
        float mb0, mb1;
        ld_max(mb0, mb1);
        const float f0 = mb0 == -INFINITY ? 1.f : fast_exp2(rm0 - mb0);
        const float f1 = mb1 == -INFINITY ? 1.f : fast_exp2(rm1 - mb1);
        rm0 = mb0;
        rm1 = mb1;
        // Mostly m_B did not move the max: P_A is then already relative to
        // it (same bits; 16 bf16 packs and 32 multiplies fewer per thread,
        // a change within the run-to-run spread of the sweep).
        if (__any_sync(0xffffffffu, f0 != 1.f || f1 != 1.f))
          store_p(p0_addr, std::true_type{}, f0, f1);
        else
          store_p(p0_addr, std::false_type{}, 1.f, 1.f);
        named_barrier_arrive(kBarPA, 256);
        l0 *= f0;
        l1 *= f1;
        wgmma_wait<0>();  // own P V done: buffer 0's half L is free
        fence_regs(o);
        mbar_arrive(free_bar(0, 0));
        scale_o(f0, f1);
        named_barrier_sync(kBarPB, 256);
        pv_other(p1_addr);
        if (j + 1 < num_pairs) {
          if constexpr (kReleaseFirst) {
            wgmma_wait<0>();  // P_B V_B done: buffer 1's half L is free
            fence_regs(o);
            mbar_arrive(free_bar(1, 0));
            issue_qk_first((gj + 1) & 1);
          } else {
            issue_qk_first((gj + 1) & 1);
            wgmma_wait<1>();  // P_B V_B done: buffer 1's half L is free
            mbar_arrive(free_bar(1, 0));
          }
          issue_qk_second((gj + 1) & 1);
          bits = valid_bits_of(gj + 1);
          wgmma_wait<0>();
          fence_regs(sc);
          fence_regs(o);
        } else {
          wgmma_wait<0>();
          fence_regs(o);
          mbar_arrive(free_bar(1, 0));
        }
      }
      gp += num_pairs;
      finish(item, kk, num_pairs, part, u);
    }
  } else {
    // WG1: tile B = 2j + 1 in buffer 1; value columns 256-511. (Issuing the
    // next Q K^T on half R before P_A V_A retires was measured slower: WG1
    // then blocks on the refill before it frees buffer 0's half R.)
    for (uint32_t u = blockIdx.x; u < num_units; u += gridDim.x, ++kk) {
      int part;
      const uint32_t item = unit_item(u, part);
      const int num_pairs = start_item(kk);
      uint32_t bits = 0;
      fence_regs(o);
      for (int j = 0; j < num_pairs; ++j) {
        const uint32_t gj = gp + j;
        if (j == 0) bits = first_scores(gj);
        // The item's last Q K^T has retired: Q's space may take the next item's Q.
        if (j == num_pairs - 1) mbar_arrive(q_free);
        float mx0, mx1;
        mask_and_max(bits, mx0, mx1);
        named_barrier_sync(kBarMaxA, 256);
        float ma0, ma1;
        ld_max(ma0, ma1);
        const float mn0 = fmaxf(ma0, mx0), mn1 = fmaxf(ma1, mx1);
        __syncwarp();
        if ((lane & 3) == 0) {
          st_max(mn0, mn1);
        }
        named_barrier_arrive(kBarMaxB, 256);
        float e0 = mn0, e1 = mn1;
        if constexpr (kEarlyMaxB) {
          uint32_t z;  // 0; a shared load stays below the arrival, and the exponentials depend on it
          asm volatile("ld.shared.u32 %0, [%1];" : "=r"(z) : "r"(zero_addr) : "memory");
          e0 = __uint_as_float(__float_as_uint(e0) | z);
          e1 = __uint_as_float(__float_as_uint(e1) | z);
        }
        exp_and_rescale(e0, e1);
        pack_p();
        pv_own();
        store_p(p1_addr, std::false_type{}, 1.f, 1.f);
        named_barrier_sync(kBarPA, 256);
        pv_other(p0_addr);
        named_barrier_arrive(kBarPB, 256);
        wgmma_wait<1>();  // own P V done: buffer 1's half R is free
        mbar_arrive(free_bar(1, 1));
        wgmma_wait<0>();  // P_A V_A done: buffer 0's half R (and P_A) is free
        fence_regs(o);
        mbar_arrive(free_bar(0, 1));
        if (j + 1 < num_pairs) {
          issue_qk_first((gj + 1) & 1);
          issue_qk_second((gj + 1) & 1);
          bits = valid_bits_of(gj + 1);
          wgmma_wait<0>();
          fence_regs(sc);
          fence_regs(o);
        }
      }
      gp += num_pairs;
      finish(item, kk, num_pairs, part, u);
    }
  }
}

// Combines the parts of the split items: one block per (split item,
// warpgroup, 8-column chunk c), thread t in the place of consumer thread t,
// so it reads the parts' accumulator layout as written. Parts in order
// (deterministic); a part without valid columns in a row has max -inf, sum 0.
template <int kHeadGroups, bool kDense>
__global__ void __launch_bounds__(128) sparse_mla_combine_kernel(const __grid_constant__ SparseMlaParams p,
                                                                 const TailSplit split) {
  const uint32_t k = blockIdx.x / 64;
  const int w = (blockIdx.x / 32) & 1, c = blockIdx.x & 31;
  const int t = threadIdx.x, lane = t & 31;
  const int r0 = (t >> 5) * 16 + (lane >> 2), r1 = r0 + 8, q = lane & 3;
  const float* ws = p.workspace + static_cast<size_t>(k) * split.parts * kPartFloats;
  constexpr int kMl = kPartOFloats;
  float m0 = -INFINITY, m1 = -INFINITY;
  for (int u = 0; u < split.parts; ++u) {
    const float2* ml = reinterpret_cast<const float2*>(ws + u * kPartFloats + kMl);
    m0 = fmaxf(m0, ml[r0].x);
    m1 = fmaxf(m1, ml[r1].x);
  }
  float l0 = 0.f, l1 = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int u = 0; u < split.parts; ++u) {
    const float* pw = ws + u * kPartFloats;
    const float2 a = reinterpret_cast<const float2*>(pw + kMl)[r0];
    const float2 b = reinterpret_cast<const float2*>(pw + kMl)[r1];
    const float f0 = a.x == -INFINITY ? 0.f : exp2f(a.x - m0);
    const float f1 = b.x == -INFINITY ? 0.f : exp2f(b.x - m1);
    const float4 v = reinterpret_cast<const float4*>(pw)[(w * 32 + c) * 128 + t];
    l0 += a.y * f0;
    l1 += b.y * f1;
    acc.x += v.x * f0;
    acc.y += v.y * f0;
    acc.z += v.z * f1;
    acc.w += v.w * f1;
  }
  const uint32_t item = split.num_full + k;
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int col = w * 256 + c * 8 + q * 2;
  if constexpr (kDense) {
    const int64_t row0 = static_cast<int64_t>(item / kHeadGroups) * (kHeadGroups * BLOCK_H) + (item % kHeadGroups) * BLOCK_H + r0;
    const int64_t row1 = row0 + 8;
    *reinterpret_cast<uint32_t*>(p.out + row0 * D_V + col) = pack_bf16(acc.x * inv0, acc.y * inv0);
    *reinterpret_cast<uint32_t*>(p.out + row1 * D_V + col) = pack_bf16(acc.z * inv1, acc.w * inv1);
    if (w == 0 && c == 0 && q == 0) store_row_stats_dense(p, row0, row1, m0, m1, l0, l1);
  } else {
    const uint32_t t_ = item / kHeadGroups;
    const int h0 = static_cast<int>(item % kHeadGroups) * BLOCK_H + r0;  // r1's head is h0 + 8
    __nv_bfloat16* out0 = p.out + mul_wide_u32(t_, static_cast<uint32_t>(p.stride_out_t)) +
                          mul_wide_u32(h0, static_cast<uint32_t>(p.stride_out_h));
    __nv_bfloat16* out1 = out0 + mul_wide_u32(8, static_cast<uint32_t>(p.stride_out_h));
    *reinterpret_cast<uint32_t*>(out0 + col) = pack_bf16(acc.x * inv0, acc.y * inv0);
    *reinterpret_cast<uint32_t*>(out1 + col) = pack_bf16(acc.z * inv1, acc.w * inv1);
    if (w == 0 && c == 0 && q == 0) store_row_stats(p, t_, h0, m0, m1, l0, l1);
  }
}

// Measured 1-4% faster with output bit-identical (dev bench, seventh and
// eighth sessions; docs/performance.md); the selects are identities when
// every bit is set, so the two paths give the same bits by construction.
constexpr bool kSkipMaskDefault = true;

// Launches build <kHeadGroups, kDiag, kReleaseFirst, kEarlyMaxB, kSkipMask>
// of the attention kernel on `run` (the indices reordered when plan.sorted),
// then the combine kernel when the plan splits the last round. The library
// instantiates only its production builds (launch_sparse_mla_sm90 below, one
// per file in instantiations/); the dev bench (dev/sparse_mla/) also its
// diagnostic ones.
template <int kHeadGroups, int kDiag, bool kReleaseFirst, bool kEarlyMaxB, bool kSkipMask, bool kDense = true,
          int kFp8 = 0>
void launch_fwd_and_combine(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx) {
  auto kernel = sparse_mla_fwd_kernel<kHeadGroups, kDiag, kReleaseFirst, kEarlyMaxB, kSkipMask, kDense, kFp8>;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(SmemPlan::bytes)));
  constexpr float kLog2e = 1.4426950408889634f;
  kernel<<<plan.grid, kNumThreads, SmemPlan::bytes, ctx.stream>>>(run, run.softmax_scale * kLog2e, plan.split);
  DSA_CHECK_LAUNCH("sparse_mla_fwd_kernel");
  if (plan.split.parts) {
    sparse_mla_combine_kernel<kHeadGroups, kDense><<<plan.split.leftover * 64, 128, 0, ctx.stream>>>(run, plan.split);
    DSA_CHECK_LAUNCH("sparse_mla_combine_kernel");
  }
}

template <int kHeadGroups, bool kReleaseFirst, bool kEarlyMaxB, bool kDense>
void launch_sparse_mla_sm90(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx) {
  launch_fwd_and_combine<kHeadGroups, 0, kReleaseFirst, kEarlyMaxB, kSkipMaskDefault, kDense>(run, plan, ctx);
}

template <int kHeadGroups, bool kDense, int kOrder>
void launch_sparse_mla_sm90_fp8(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx) {
  launch_fwd_and_combine<kHeadGroups, 0, false, true, kSkipMaskDefault, kDense, kOrder>(run, plan, ctx);
}

}  // namespace dsa::cuda::sm90_sparse_mla
