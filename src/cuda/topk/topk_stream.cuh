#pragma once
// Exact causal top-k that reads each visible logit once (issue 17), one CTA
// per row; same output as topk_radix_kernel, byte for byte.
//
// Why: the radix kernel reads a row two or three times (a histogram pass,
// then a gather or more passes), so it runs at a third of the memory rate.
// Here the row streams through a 3-stage cp.async ring of 4096-logit chunks
// once, and only logits whose order key beats a running threshold enter a
// candidate buffer in shared memory. The buffer is kept in position order
// (each chunk's survivors are placed by a block-wide scan, not by atomics),
// so ties resolve to the lower position exactly as in the radix kernel.
//
// When a chunk's survivors would not fit, the buffer is cut to exactly its
// k best (radix select on the 32-bit keys, then the first `need` ties in
// position order, compacted in place) and the threshold becomes the k-th key:
// a later logit must beat it strictly, because an equal key at a later
// position loses the tie to all k kept ones. The chunk is then filtered again
// with the new threshold; it always fits, since k + kChunk <= kCap. Every
// logit dropped (by the filter or a cut) is beaten by k others, so the buffer
// always holds the row's top k; the final cut over the buffer selects them
// and writes their positions in ascending order, as the radix kernel does.
//
// Until the first cut every visible logit enters (the first chunks fill the
// buffer unconditionally); after it the filter compares floats against the
// float of the k-th key (key_to_float), the same test as on keys.
// Uniform random rows of 64K logits cut four times (tests/scripts/
// topk_stream_model.py counts them); an ascending row cuts every chunk or
// two (slower, still exact).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/topk/params.h"
#include "cuda/topk/topk_radix.cuh"

namespace dsa::cuda::topk_stream {

using topk_impl::Digit;
using topk_impl::kThreads;
using topk_impl::Scan;
using topk_impl::SmemCandidates;

constexpr int kChunk = 4096;                 // logits per streaming step: two float4 per thread
constexpr int kHalf = kChunk / 2;            // thread i holds [4i, 4i+4) and [kHalf+4i, kHalf+4i+4): coalesced
constexpr int kStages = 3;                   // chunks c+1 and c+2 are in flight while c is filtered
constexpr int kCap = 6144;                   // candidate buffer entries
constexpr int kMaxK = kCap - kChunk;         // 2048: after a cut to k, a whole chunk always fits
constexpr int kPerThreadCap = kCap / kThreads;  // 12 buffer entries per thread in the in-place cut
static_assert(kPerThreadCap * kThreads == kCap && kPerThreadCap % 4 == 0, "cut loads uint4 groups");
static_assert(kHalf == 4 * kThreads, "one float4 per thread per half chunk");

// 112 KB: two CTAs per SM (2 x (112 KB + 1 KB reserved) <= 228 KB).
struct Smem {
  float ring[kStages][kChunk];
  uint32_t key[kCap];     // order keys of the candidates, ascending position
  int32_t pos[kCap];      // their positions
  uint32_t hist1[2048];   // candidates per top-11-bit bin, kept up to date as they enter and are cut
  uint32_t hist[2048];    // levels 2 and 3 of a cut
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Each thread copies (and later reads) only its own two float4 of a stage, so
// the ring needs no barrier: cp.async.wait_group makes a thread's own copies
// visible to it. A float4 that starts before `vis` is copied whole: it ends
// inside the row because the stride is a multiple of 4 (the dispatch checks);
// lanes past `vis` are masked when filtering.
__device__ __forceinline__ void issue_chunk(float* stage, const float* row, int base, int vis) {
  const int i = 4 * static_cast<int>(threadIdx.x);
  if (i < vis - base) cp_async16(stage + i, row + base + i);
  if (kHalf + i < vis - base) cp_async16(stage + kHalf + i, row + base + kHalf + i);
}

// Scan::exclusive with the 16 warp totals scanned by shuffles instead of
// read one by one by every thread: this runs once per chunk and
// per radix level, so its instructions count against the streaming rate. Same parity discipline.
__device__ __forceinline__ uint32_t block_exclusive(Scan& scan, uint32_t x, uint32_t& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t inc = x;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, inc, d);
    if (lane >= d) inc += y;
  }
  if (lane == 31) scan.warp_sums[scan.parity][warp] = inc;
  __syncthreads();
  uint32_t ws = lane < topk_impl::kWarps ? scan.warp_sums[scan.parity][lane] : 0u;
#pragma unroll
  for (int d = 1; d < topk_impl::kWarps; d <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, ws, d);
    if (lane >= d) ws += y;
  }
  total = __shfl_sync(0xffffffffu, ws, topk_impl::kWarps - 1);
  const uint32_t before = __shfl_sync(0xffffffffu, ws, warp > 0 ? warp - 1 : 0);
  scan.parity ^= 1;
  return (warp > 0 ? before : 0u) + inc - x;
}

// Keep keys > thr and the first `need` keys == thr in position order: exactly
// the k best by (key desc, position asc). d1 / above1: thr's top-11-bit bin
// and the keys in higher bins (to update hist1 after the cut).
struct Cut {
  uint32_t thr, need, d1, above1;
};

// topk_impl::find_digit with block_exclusive. Needs 1 <= k_rem <= keys in
// hist; bins a multiple of 8, at most 8 * kThreads.
__device__ __forceinline__ Digit find_digit_fast(const uint32_t* hist, int bins, uint32_t k_rem, Scan& scan,
                                                 uint32_t* s_sel) {
  return topk_impl::find_digit_with(hist, bins, k_rem, s_sel,
                                    [&](uint32_t x, uint32_t& total) { return block_exclusive(scan, x, total); });
}

// Radix select of the k-th largest key over the buffer: 11 + 11 + 10 bits,
// the first level from hist1 (no pass over the buffer). Needs 1 <= k <= c.n
// and hist1, the buffer's writes and their hist1 counts published (a barrier
// since the last of them).
__device__ __forceinline__ Cut select_cut(const SmemCandidates& c, uint32_t k, const uint32_t* hist1, uint32_t* hist,
                                          Scan& scan, uint32_t* s_sel) {
  Digit d = find_digit_fast(hist1, 2048, k, scan, s_sel);
  const uint32_t d1 = d.digit, above1 = d.above;
  uint32_t prefix = d.digit << 21;
  k -= d.above;
  topk_impl::histogram(c, hist, 2048, 10, 0xffe00000u, prefix);
  d = find_digit_fast(hist, 2048, k, scan, s_sel);
  prefix |= d.digit << 10;
  k -= d.above;
  topk_impl::histogram(c, hist, 1024, 0, 0xfffffc00u, prefix);
  d = find_digit_fast(hist, 1024, k, scan, s_sel);
  prefix |= d.digit;
  k -= d.above;
  return {prefix, k, d1, above1};
}

// Keeps exactly the cut's entries of buffer[0, n), in order, at [0, k). Each
// thread reads its kPerThreadCap consecutive entries into registers before
// the scan's barrier and writes after it; a destination never exceeds its
// source index, and every read precedes the barrier, so in place is safe.
__device__ __forceinline__ void cut_in_place(uint32_t* key, int32_t* pos, int n, Cut cut, Scan& scan) {
  const int first = static_cast<int>(threadIdx.x) * kPerThreadCap;
  uint32_t kk[kPerThreadCap];
  int32_t pp[kPerThreadCap];
  uint32_t cg = 0, ce = 0;
#pragma unroll
  for (int q = 0; q < kPerThreadCap; q += 4) {
    if (first + q + 3 < n) {
      const uint4 kv = *reinterpret_cast<const uint4*>(key + first + q);
      const int4 pv = *reinterpret_cast<const int4*>(pos + first + q);
      kk[q] = kv.x, kk[q + 1] = kv.y, kk[q + 2] = kv.z, kk[q + 3] = kv.w;
      pp[q] = pv.x, pp[q + 1] = pv.y, pp[q + 2] = pv.z, pp[q + 3] = pv.w;
    } else {
#pragma unroll
      for (int j = q; j < q + 4; ++j) {
        kk[j] = first + j < n ? key[first + j] : 0u;  // 0: below every threshold, never kept
        pp[j] = first + j < n ? pos[first + j] : 0;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kPerThreadCap; ++j) {
    cg += kk[j] > cut.thr;
    ce += kk[j] == cut.thr;  // thr is a real key (>= 0x007fffff), never the padding 0
  }
  uint32_t tot;
  const uint32_t ex = block_exclusive(scan, cg | (ce << 16), tot);  // counts <= kCap < 2^16
  uint32_t gb = ex & 0xffffu, eb = ex >> 16;
#pragma unroll
  for (int j = 0; j < kPerThreadCap; ++j) {
    if (kk[j] > cut.thr) {
      const uint32_t dst = gb + min(eb, cut.need);
      key[dst] = kk[j];
      pos[dst] = pp[j];
      ++gb;
    } else if (kk[j] == cut.thr) {
      if (eb < cut.need) {
        key[gb + eb] = kk[j];
        pos[gb + eb] = pp[j];
      }
      ++eb;
    }
  }
}

// The float whose order key is `key` (a key of a non-NaN float). For such a
// threshold, key(x) > key ⇔ x > that float, for every x: NaN compares false
// and its key is -inf's, never above a real key; -0 and +0 compare equal, as
// their keys do. So the filter compares floats and computes keys only for
// the survivors.
__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Bits 0-3 for [base + 4i, +4), bits 4-7 for [base + kHalf + 4i, +4): set
// when visible and above the threshold (every visible logit when keep_all).
__device__ __forceinline__ uint32_t pass_mask(const float4& a, const float4& b, int left_lo, int left_hi, float fthr,
                                              bool keep_all) {
  uint32_t m = (a.x > fthr ? 1u : 0u) | (a.y > fthr ? 2u : 0u) | (a.z > fthr ? 4u : 0u) | (a.w > fthr ? 8u : 0u) |
               (b.x > fthr ? 16u : 0u) | (b.y > fthr ? 32u : 0u) | (b.z > fthr ? 64u : 0u) | (b.w > fthr ? 128u : 0u);
  if (keep_all) m = 0xffu;
  const uint32_t vlo = left_lo >= 4 ? 0xfu : left_lo <= 0 ? 0u : (1u << left_lo) - 1u;
  const uint32_t vhi = left_hi >= 4 ? 0xfu : left_hi <= 0 ? 0u : (1u << left_hi) - 1u;
  return m & (vlo | (vhi << 4));
}

__global__ void __launch_bounds__(kThreads, 2) topk_stream_kernel(const TopkParams p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  __shared__ uint32_t s_warp[2][topk_impl::kWarps];
  __shared__ uint32_t s_sel[3];
  Scan scan{s_warp};

  const int64_t t = blockIdx.x;
  const int k = p.k;
  int32_t* out = p.out + t * k;
  const int vis = static_cast<int>(min(max(static_cast<int64_t>(p.visible_end[t]), int64_t{0}), p.logits_stride));
  if (vis <= k) {  // as the radix kernel: every visible position, then -1
    for (int i = threadIdx.x; i < k; i += kThreads) out[i] = i < vis ? i : -1;
    return;
  }
  const float* row = p.logits + t * p.logits_stride;
  const int nch = (vis - 1) / kChunk + 1;
  issue_chunk(sm.ring[0], row, 0, vis);
  cp_async_commit();
  if (nch > 1) issue_chunk(sm.ring[1], row, kChunk, vis);
  cp_async_commit();

  for (int i = threadIdx.x; i < 2048; i += kThreads) sm.hist1[i] = 0;  // published by the first scan's barrier
  const int i4 = 4 * static_cast<int>(threadIdx.x);
  bool keep_all = true;  // until the first cut
  float fthr = 0.f;      // after it: keep x > fthr, i.e. key(x) > the k-th key of the cut
  int n = 0;             // candidates in the buffer
  for (int c = 0; c < nch; ++c) {
    if (c + 2 < nch) issue_chunk(sm.ring[(c + 2) % kStages], row, (c + 2) * kChunk, vis);
    cp_async_commit();  // an empty group past the end keeps the wait count uniform
    cp_async_wait<2>();  // chunk c (this thread's part) has landed
    const int base = c * kChunk;
    const float* st = sm.ring[c % kStages];
    const float4 a = *reinterpret_cast<const float4*>(st + i4);
    const float4 b = *reinterpret_cast<const float4*>(st + kHalf + i4);
    const int left_lo = vis - base - i4, left_hi = vis - base - kHalf - i4;  // visible logits from each float4 on
    uint32_t mask = pass_mask(a, b, left_lo, left_hi, fthr, keep_all);
    uint32_t tot;
    uint32_t ex = block_exclusive(scan, __popc(mask & 0xfu) | (__popc(mask >> 4) << 16), tot);
    if (n + static_cast<int>((tot & 0xffffu) + (tot >> 16)) > kCap) {  // uniform: tot is the CTA's
      const Cut cut =
          select_cut(SmemCandidates{sm.key, sm.pos, n}, static_cast<uint32_t>(k), sm.hist1, sm.hist, scan, s_sel);
      cut_in_place(sm.key, sm.pos, n, cut, scan);
      // The k kept: every key in bins above d1, k - above1 in d1, none below. find_digit read hist1 before
      // its barriers; the next atomics on it follow the rescan's barrier.
      for (int i = threadIdx.x; i <= static_cast<int>(cut.d1); i += kThreads) {
        sm.hist1[i] = i == static_cast<int>(cut.d1) ? static_cast<uint32_t>(k) - cut.above1 : 0u;
      }
      n = k;
      keep_all = false;
      fthr = key_to_float(cut.thr);
      mask = pass_mask(a, b, left_lo, left_hi, fthr, keep_all);
      ex = block_exclusive(scan, __popc(mask & 0xfu) | (__popc(mask >> 4) << 16), tot);
    }
    // Survivors in position order: first halves of all threads, then second halves.
    if (mask != 0) {
      const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      uint32_t o = static_cast<uint32_t>(n) + (ex & 0xffffu);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j == 4) o = static_cast<uint32_t>(n) + (tot & 0xffffu) + (ex >> 16);
        if (mask & (1u << j)) {
          const uint32_t key = topk_impl::order_key(v[j]);
          sm.key[o] = key;
          sm.pos[o] = base + (j < 4 ? i4 + j : kHalf + i4 + j - 4);
          atomicAdd(&sm.hist1[key >> 21], 1u);  // counts only: order-independent
          ++o;
        }
      }
    }
    n += static_cast<int>((tot & 0xffffu) + (tot >> 16));
  }
  // n >= k: before the first cut every visible logit is in, after it k are.
  __syncthreads();  // the last chunk's candidates and hist1 counts
  const SmemCandidates cand{sm.key, sm.pos, n};
  const Cut cut = select_cut(cand, static_cast<uint32_t>(k), sm.hist1, sm.hist, scan, s_sel);
  topk_impl::ordered_compact(cand, cut.thr, cut.need, static_cast<uint32_t>(k), scan,
                             [&](uint32_t j, int position, uint32_t) { out[j] = position; });
}

}  // namespace dsa::cuda::topk_stream
