#pragma once
// Exact causal top-k per row by radix select (spec 3.5), one CTA per row.
//
// Logits map to order-preserving uint32 keys. Level 1 histograms the top 12
// bits of every visible key and finds the bin holding the k-th largest. When
// that bin and everything above it fit in shared memory (the usual case), one
// more pass over the row gathers them there, in position order, and levels 2
// (12 bits) and 3 (8 bits) run on shared memory alone; otherwise (many ties,
// degenerate rows) levels 2 and 3 reread the row. The threshold key and the
// number of its ties to keep then give the selection exactly, and an ordered
// compaction (block-wide scans, position order) writes the positions of all
// keys above the threshold and of the first `need` ties, ascending, which is
// also what makes the result deterministic and ties go to the lower position.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/topk/params.h"

namespace dsa::cuda::topk_impl {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 8;                 // consecutive elements per thread in an ordered-compaction step
constexpr int kChunk = kThreads * kPerThread;  // 4096 per step: counts fit the 16-bit halves of one scan word
constexpr int kHistBins = 4096;
constexpr int kCandCap = 8192;  // candidates gathered in shared memory

struct Smem {
  uint32_t hist[kHistBins];
  uint32_t cand_key[kCandCap];
  int32_t cand_pos[kCandCap];
};

// Larger float -> larger key. NaN ranks with -inf and -0 ties with +0, as in
// the reference (which compares floats and maps NaN to -inf).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct GlobalRow {
  const float* row;
  int n;
  bool vec;  // row 16-byte aligned: float4 loads
  __device__ __forceinline__ void load4(int i0, uint32_t (&k)[4]) const {
    if (vec && i0 + 3 < n) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(row + i0));
      k[0] = order_key(v.x);
      k[1] = order_key(v.y);
      k[2] = order_key(v.z);
      k[3] = order_key(v.w);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) k[j] = i0 + j < n ? order_key(__ldg(row + i0 + j)) : 0u;
    }
  }
  __device__ __forceinline__ int pos(int i) const { return i; }
};

struct SmemCandidates {
  const uint32_t* key;
  const int32_t* position;
  int n;
  __device__ __forceinline__ void load4(int i0, uint32_t (&k)[4]) const {
    if (i0 + 3 < n) {
      const uint4 v = *reinterpret_cast<const uint4*>(key + i0);
      k[0] = v.x;
      k[1] = v.y;
      k[2] = v.z;
      k[3] = v.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) k[j] = i0 + j < n ? key[i0 + j] : 0u;
    }
  }
  __device__ __forceinline__ int pos(int i) const { return position[i]; }
};

struct Scan {
  uint32_t (*warp_sums)[kWarps];  // [2][kWarps], alternated so one barrier per scan suffices
  int parity = 0;

  // Exclusive prefix sum over the CTA in thread order; total = sum of all.
  __device__ __forceinline__ uint32_t exclusive(uint32_t x, uint32_t& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t inc = x;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const uint32_t y = __shfl_up_sync(0xffffffffu, inc, d);
      if (lane >= d) inc += y;
    }
    if (lane == 31) warp_sums[parity][warp] = inc;
    __syncthreads();
    uint32_t off = 0, tot = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const uint32_t s = warp_sums[parity][w];
      off += w < warp ? s : 0u;
      tot += s;
    }
    parity ^= 1;
    total = tot;
    return off + inc - x;
  }
};

// hist[(key >> shift) & (bins-1)] over the keys with (key & mask) == prefix.
template <class Src>
__device__ __forceinline__ void histogram(const Src& src, uint32_t* hist, int bins, int shift, uint32_t mask,
                                          uint32_t prefix) {
  for (int i = threadIdx.x; i < bins; i += kThreads) hist[i] = 0;
  __syncthreads();
#pragma unroll 4
  for (int i0 = threadIdx.x * 4; i0 < src.n; i0 += kThreads * 4) {
    uint32_t k[4];
    src.load4(i0, k);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (i0 + j < src.n && (k[j] & mask) == prefix) atomicAdd(&hist[(k[j] >> shift) & (bins - 1)], 1u);
    }
  }
  __syncthreads();
}

struct Digit {
  uint32_t digit, above, count;  // bin of the k_rem-th largest, keys in higher bins, keys in that bin
};

// Needs 1 <= k_rem <= keys in hist; bins a multiple of 8, at most 8 * kThreads.
// exclusive(x, total): the CTA's exclusive prefix sum in thread order (one
// barrier; Scan::exclusive, or the streaming kernel's shuffle scan).
template <class Exclusive>
__device__ __forceinline__ Digit find_digit_with(const uint32_t* hist, int bins, uint32_t k_rem, uint32_t* s_sel,
                                                 Exclusive&& exclusive) {
  const int hi = bins - 8 * static_cast<int>(threadIdx.x);  // this thread: bins [hi-8, hi), scanned from the top
  uint32_t c[8], sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = hi > 0 ? hist[hi - 1 - j] : 0u;
    sum += c[j];
  }
  uint32_t total;
  const uint32_t above = exclusive(sum, total);
  if (hi > 0 && above < k_rem && above + sum >= k_rem) {
    uint32_t run = above;
    bool found = false;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (!found && run + c[j] >= k_rem) {
        s_sel[0] = static_cast<uint32_t>(hi - 1 - j);
        s_sel[1] = run;
        s_sel[2] = c[j];
        found = true;
      }
      run += c[j];
    }
  }
  __syncthreads();
  return Digit{s_sel[0], s_sel[1], s_sel[2]};
}

__device__ __forceinline__ Digit find_digit(const uint32_t* hist, int bins, uint32_t k_rem, Scan& scan,
                                            uint32_t* s_sel) {
  return find_digit_with(hist, bins, k_rem, s_sel,
                         [&](uint32_t x, uint32_t& total) { return scan.exclusive(x, total); });
}

// In position order, selects every key > thr and the first `need` keys == thr,
// calling emit(j, position, key) for the j-th selected; stops after `limit`.
// Each thread takes kPerThread consecutive elements per step (one block scan
// per step), and the next step's loads are issued before this step's scan so
// that the pass streams instead of waiting on memory once per barrier.
template <class Src, class Emit>
__device__ __forceinline__ void ordered_compact(const Src& src, uint32_t thr, uint32_t need, uint32_t limit, Scan& scan,
                                                Emit emit) {
  uint32_t gt_run = 0, eq_run = 0;
  uint32_t cur[kPerThread], nxt[kPerThread];
  const int first = static_cast<int>(threadIdx.x) * kPerThread;
#pragma unroll
  for (int q = 0; q < kPerThread / 4; ++q) src.load4(first + 4 * q, *reinterpret_cast<uint32_t(*)[4]>(cur + 4 * q));
  for (int base = 0; base < src.n; base += kChunk) {
    const int i0 = base + first;
    if (base + kChunk < src.n) {
#pragma unroll
      for (int q = 0; q < kPerThread / 4; ++q)
        src.load4(i0 + kChunk + 4 * q, *reinterpret_cast<uint32_t(*)[4]>(nxt + 4 * q));
    }
    uint32_t cg = 0, ce = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (i0 + j < src.n) {
        cg += cur[j] > thr;
        ce += cur[j] == thr;
      }
    }
    uint32_t tot;
    const uint32_t ex = scan.exclusive(cg | (ce << 16), tot);
    if (cg + ce != 0) {
      uint32_t gb = gt_run + (ex & 0xffffu), eb = eq_run + (ex >> 16);
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        if (i0 + j < src.n) {
          if (cur[j] > thr) {
            emit(gb + min(eb, need), src.pos(i0 + j), cur[j]);
            ++gb;
          } else if (cur[j] == thr) {
            if (eb < need) emit(gb + eb, src.pos(i0 + j), cur[j]);
            ++eb;
          }
        }
      }
    }
    gt_run += tot & 0xffffu;
    eq_run += tot >> 16;
    if (gt_run + min(eq_run, need) >= limit) break;  // uniform: every thread has the same totals
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) cur[j] = nxt[j];
  }
}

// Levels 2 and 3, then the final ordered compaction into out.
template <class Src>
__device__ __forceinline__ void finish_row(const Src& src, uint32_t prefix, uint32_t k_rem, int k, int32_t* out,
                                           Smem& sm, Scan& scan, uint32_t* s_sel) {
  histogram(src, sm.hist, kHistBins, 8, 0xfff00000u, prefix);
  Digit d = find_digit(sm.hist, kHistBins, k_rem, scan, s_sel);
  prefix |= d.digit << 8;
  k_rem -= d.above;
  histogram(src, sm.hist, 256, 0, 0xffffff00u, prefix);
  d = find_digit(sm.hist, 256, k_rem, scan, s_sel);
  prefix |= d.digit;
  k_rem -= d.above;
  ordered_compact(src, prefix, k_rem, static_cast<uint32_t>(k), scan,
                  [&](uint32_t j, int pos, uint32_t) { out[j] = pos; });
}

__global__ void __launch_bounds__(kThreads, 2) topk_radix_kernel(const TopkParams p, bool vec) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  __shared__ uint32_t s_warp[2][kWarps];
  __shared__ uint32_t s_sel[3];
  Scan scan{s_warp};

  const int64_t t = blockIdx.x;
  const int k = p.k;
  int32_t* out = p.out + t * k;
  const int vis = static_cast<int>(min(max(static_cast<int64_t>(p.visible_end[t]), int64_t{0}), p.logits_stride));
  if (vis <= k) {
    for (int i = threadIdx.x; i < k; i += kThreads) out[i] = i < vis ? i : -1;
    return;
  }
  const GlobalRow row{p.logits + t * p.logits_stride, vis, vec};
  histogram(row, sm.hist, kHistBins, 20, 0u, 0u);
  const Digit d1 = find_digit(sm.hist, kHistBins, static_cast<uint32_t>(k), scan, s_sel);
  const uint32_t prefix = d1.digit << 20;
  const uint32_t k_rem = static_cast<uint32_t>(k) - d1.above;
  const uint32_t count_ge = d1.above + d1.count;  // keys in the k-th largest's bin or above
  if (count_ge <= static_cast<uint32_t>(kCandCap)) {
    ordered_compact(row, prefix, 0xffffffffu, count_ge, scan, [&](uint32_t j, int pos, uint32_t key) {
      sm.cand_key[j] = key;
      sm.cand_pos[j] = pos;
    });
    // histogram() starts with a barrier-separated clear, which also publishes the candidates.
    const SmemCandidates cand{sm.cand_key, sm.cand_pos, static_cast<int>(count_ge)};
    finish_row(cand, prefix, k_rem, k, out, sm, scan, s_sel);
  } else {
    finish_row(row, prefix, k_rem, k, out, sm, scan, s_sel);
  }
}

}  // namespace dsa::cuda::topk_impl
