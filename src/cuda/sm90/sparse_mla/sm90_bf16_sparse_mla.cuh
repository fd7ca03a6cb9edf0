#pragma once
// Hopper (sm_90a) sparse MLA prefill kernel, warp-specialized. One CTA =
// one token x 64 heads:
//   WG2 (producer) gathers the 64 selected KV rows of each tile with 16-byte
//   cp.async copies (invalid index -> zero-filled row, no read), into two
//   tile buffers whose halves are released and refilled independently;
//   WG0 / WG1 (consumers) own alternate tiles: each computes its tile's full
//   64 x 64 scores (wgmma m64n64k16, Q and K from shared memory), both agree
//   on the running row max through shared memory, and each accumulates 256 of
//   the 512 value columns of O over both tiles (wgmma m64n256k16: own P from
//   registers, the other's P from shared memory, V read as an MN-major view
//   of the same swizzled KV tile).
// See docs/sparse_mla.md for the schedule and the synchronization argument.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.cuh"
#include "cuda/sm90/sparse_mla/config.h"
#include "cuda/sparse_mla.h"

namespace dsa::cuda::sm90_sparse_mla {

// ---- PTX wrappers -----------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Generic-proxy writes (cp.async, st.shared) become visible to wgmma (async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses of wgmma accumulators across the
// asynchronous window (they are written by the tensor cores, not by the thread).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Shared-memory matrix descriptors, 128-byte swizzle. K-major: rows of 64
// bf16 along K, 8-row groups 1024 B apart (SBO); LBO unused. MN-major (the V
// view of a KV tile): 64 contiguous N values per 128-byte row, one row per K,
// 8-row K groups 1024 B apart (SBO), 64-column N blocks 8192 B apart (LBO).
__device__ __forceinline__ uint64_t desc_k_major(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}
__device__ __forceinline__ uint64_t desc_mn_major(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{kSegBytes >> 4} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// D[64 x 64] (+)= A[64 x 16] * B[16 x 64], A and B from shared memory (descriptors).
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D[64 x 256] (+)= A[64 x 16] * B[16 x 256], A and B from shared memory (descriptors), B MN-major.
__device__ __forceinline__ void wgmma_m64n256k16_ss_tb(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D[64 x 256] += A[64 x 16] * B[16 x 256], A from registers (bf16x2 a0..a3), B MN-major in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_rs_tb(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, {%128,%129,%130,%131}, %132, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));
}

// Arrives on `bar` once all cp.async copies this thread issued so far have
// landed; the thread itself moves on (the count is not incremented first, so
// the barrier's expected count includes these arrivals).
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` inside a swizzled
// [rows x 128 B] segment.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// Named barriers among the 256 consumer threads (0 is __syncthreads).
enum : uint32_t { kBarMax = 1, kBarP0 = 2, kBarP1 = 3, kBarSum = 4 };

// S (+)= Q K^T over 4 segments starting at segment `seg0` (a runtime value,
// so that both consumer warpgroups run the same code: a wgmma in a branch
// that ptxas sees as divergent gets serialized).
__device__ __forceinline__ void qk_4_segments(float (&s)[32], uint32_t q_addr, uint32_t tile, int seg0, bool first) {
#pragma unroll
  for (int kk = 0; kk < 16; ++kk) {
    const uint32_t off = (seg0 + (kk >> 2)) * kSegBytes + (kk & 3) * 32;
    wgmma_m64n64k16_ss(s, desc_k_major(q_addr + off), desc_k_major(tile + off), (first && kk == 0) ? 0 : 1);
  }
}
__device__ __forceinline__ void qk_rope_segment(float (&s)[32], uint32_t q_addr, uint32_t tile) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t off = 8 * kSegBytes + kk * 32;
    wgmma_m64n64k16_ss(s, desc_k_major(q_addr + off), desc_k_major(tile + off), 1);
  }
}

template <int kHeadGroups>
__global__ void __launch_bounds__(kNumThreads, 1)
    sparse_mla_fwd_kernel(const __grid_constant__ SparseMlaParams p, float scale_log2) {
  extern __shared__ uint8_t smem_raw[];
  // Swizzle atoms and the descriptors assume 1024-byte aligned tiles.
  const uint32_t raw_addr = smem_addr(smem_raw);
  uint8_t* smem = smem_raw + ((1024 - (raw_addr & 1023)) & 1023);
  const uint32_t base = smem_addr(smem);
  const uint32_t q_addr = base + SmemPlan::q;
  // Tile buffer b at kv_addr + b * kTileBytes (arithmetic, not an array: a
  // run-time index into a register array would go to local memory).
  const uint32_t kv_addr = base + SmemPlan::kv0;
  static_assert(SmemPlan::kv1 == SmemPlan::kv0 + kTileBytes, "tile buffers are adjacent");
  const uint32_t p0_addr = kv_addr + 8 * kSegBytes;  // P0 reuses WG0's RoPE segment once its Q K^T is done
  const uint32_t p1_addr = base + SmemPlan::p1;
  float* s_row_max = reinterpret_cast<float*>(smem + SmemPlan::row_max);
  float* s_row_sum = reinterpret_cast<float*>(smem + SmemPlan::row_sum);
  const uint32_t q_ready = base + SmemPlan::bars;
  // ready[b][h] / free[b][h]: tile buffer b (0, 1), half h (0 = L, 1 = R).
  auto ready_bar = [&](int b, int h) { return q_ready + 8 + 8 * (2 * b + h); };
  auto free_bar = [&](int b, int h) { return q_ready + 40 + 8 * (2 * b + h); };

  // Token on grid.x (T can exceed 65535); neighbouring CTAs of one token share
  // its KV rows through L2.
  const int64_t t = blockIdx.x / kHeadGroups;
  const int g = static_cast<int>(blockIdx.x % kHeadGroups);
  const int H = kHeadGroups * BLOCK_H;
  int n = p.topk;
  if (p.valid_len) n = min(max(p.valid_len[t], 0), p.topk);
  const int32_t* idx_row = p.indices + t * p.topk;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int lane = tid & 31;
  if (wg == 2) {
    // Q does not depend on the scan below: start its copies first.
    const int ptid = tid - 256;
    const int r_base = ptid >> 3, cc = ptid & 7;
    const __nv_bfloat16* q_rows = p.q + t * p.stride_q_t + static_cast<int64_t>(g) * BLOCK_H * D_QK;
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int r = r_base + 16 * it;
      const __nv_bfloat16* src = q_rows + r * D_QK + cc * 8;
#pragma unroll
      for (int seg = 0; seg < NUM_SEG; ++seg) cp_async_16(q_addr + seg * kSegBytes + swz(r, cc), src + seg * SEG, 16);
    }
  }
  int* s_last_valid = reinterpret_cast<int*>(s_row_sum);  // scratch: row sums are written only at the end
  if (tid == 0) {
    mbar_init(q_ready, 128);
    for (int b = 0; b < 2; ++b)
      for (int h = 0; h < 2; ++h) {
        mbar_init(ready_bar(b, h), 128);  // every producer thread, once its copies landed
        mbar_init(free_bar(b, h), 128);   // every thread of the one warpgroup that reads it last
      }
    *s_last_valid = -1;
  }
  __syncthreads();
  // Top-k pads short rows with invalid indices at the end: find the last valid
  // position and skip the tiles after it (same result, less work).
  {
    int last = -1;
    for (int pos = tid; pos < n; pos += kNumThreads) {
      const int32_t idx = __ldg(idx_row + pos);
      if (idx >= 0 && idx < p.num_slots) last = pos;
    }
    last = __reduce_max_sync(0xffffffffu, last);
    if (lane == 0 && last >= 0) atomicMax(s_last_valid, last);
  }
  __syncthreads();
  n = *s_last_valid + 1;
  const int num_tiles = (n + BLOCK_KV - 1) / BLOCK_KV;
  const int num_pairs = (num_tiles + 1) / 2;  // WG0 takes tile 2j, WG1 tile 2j+1 (past n: all invalid)

  if (wg == 2) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (num_pairs == 0) {
      cp_async_wait_all();
      return;
    }
    cp_async_arrive(q_ready);
    const int ptid = tid - 256;
    const int r_base = ptid >> 3;  // 16 rows per pass, 8 threads per 128-byte row segment
    const int cc = ptid & 7;
    for (int j = 0; j < num_pairs; ++j) {
      // Row pointers of both tiles (invalid -> no read, zero fill).
      const __nv_bfloat16* src[2][4];
      uint32_t bytes[2][4];
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int it = 0; it < 4; ++it) {
          const int pos = (2 * j + b) * BLOCK_KV + r_base + 16 * it;
          const int32_t idx = pos < n ? __ldg(idx_row + pos) : -1;
          const bool valid = idx >= 0 && idx < p.num_slots;
          src[b][it] = p.kv + (valid ? static_cast<int64_t>(idx) * D_QK : 0) + cc * 8;
          bytes[b][it] = valid ? 16u : 0u;
        }
      const uint32_t parity = (j - 1) & 1;
      auto load = [&](int b, int seg_begin, int seg_end) {
#pragma unroll
        for (int it = 0; it < 4; ++it) {
          const int r = r_base + 16 * it;
          for (int seg = seg_begin; seg < seg_end; ++seg)
            cp_async_16(kv_addr + b * kTileBytes + seg * kSegBytes + swz(r, cc), src[b][it] + seg * SEG, bytes[b][it]);
        }
      };
      // Order = the order in which the consumers free the halves.
      if (j > 0) mbar_wait(free_bar(0, 0), parity);
      load(0, 0, kHalfSplit);
      cp_async_arrive(ready_bar(0, 0));
      if (j > 0) mbar_wait(free_bar(1, 1), parity);
      load(1, kHalfSplit, NUM_SEG);
      cp_async_arrive(ready_bar(1, 1));
      if (j > 0) mbar_wait(free_bar(0, 1), parity);
      load(0, kHalfSplit, NUM_SEG);
      cp_async_arrive(ready_bar(0, 1));
      if (j > 0) mbar_wait(free_bar(1, 0), parity);
      load(1, 0, kHalfSplit);
      cp_async_arrive(ready_bar(1, 0));
    }
    cp_async_wait_all();
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
  const int w = wg;  // 0 or 1: owns tile buffer w, value columns [256 w, 256 w + 256)
  const int wtid = tid & 127;
  const int warp = wtid >> 5;
  const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8;
  const int cq = (lane & 3) * 2;  // first of the two accumulator columns this thread holds per 8
  const uint32_t my_tile = kv_addr + w * kTileBytes, other_tile = kv_addr + (1 - w) * kTileBytes;
  // WG0 reads half L first (it frees it first), WG1 half R.
  const int first_half = w == 0 ? 0 : 1;

  float o[128];
#pragma unroll
  for (int k = 0; k < 128; ++k) o[k] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float sc[32];

  // Q K^T in two parts, each waiting only for the half it reads. WG0 reads
  // segments 0-3 (half L) then 4-8; WG1 segments 4-7 and 8 (half R) then 0-3.
  auto issue_qk_first = [&](uint32_t parity) {
    mbar_wait(ready_bar(w, first_half), parity);
    fence_proxy_async();
    wgmma_fence();
    qk_4_segments(sc, q_addr, my_tile, 4 * w, true);
    wgmma_commit();
  };
  auto issue_qk_second = [&](uint32_t parity) {
    mbar_wait(ready_bar(w, 1 - first_half), parity);
    fence_proxy_async();
    wgmma_fence();  // explicit, on the uniform path (else ptxas injects one and serializes)
    qk_4_segments(sc, q_addr, my_tile, 4 - 4 * w, false);
    qk_rope_segment(sc, q_addr, my_tile);
    wgmma_commit();
  };

  if (num_pairs > 0) mbar_wait(q_ready, 0);

  for (int j = 0; j < num_pairs; ++j) {
    // Q K^T of this pair's tile. Before each half, free what the previous
    // pair's P V read last (groups retire in order: own P V, then the other's).
    if (j > 0) {
      // No fence_regs(o) here: O is still an operand of the pending P V, and
      // touching it would make ptxas serialize the wgmma pipeline.
      wgmma_wait<1>();  // own P V done: own half (WG0: L of tile 0, WG1: R of tile 1) is free
      mbar_arrive(free_bar(w, first_half));
    }
    issue_qk_first(j & 1);
    if (j > 0) {
      wgmma_wait<1>();  // the other tile's P V done
      mbar_arrive(free_bar(1 - w, first_half));
    }
    issue_qk_second(j & 1);

    // Validity of this thread's 16 score columns (read while Q K^T runs).
    uint32_t valid_bits = 0;
    {
      const int tile_pos = (2 * j + w) * BLOCK_KV;
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const int col = (k >> 1) * 8 + cq + (k & 1);
        const int pos = tile_pos + col;
        // Branch-free: the clamped load is always in bounds, pos < n decides.
        const int32_t idx = __ldg(idx_row + min(pos, p.topk - 1));
        if (pos < n && idx >= 0 && idx < p.num_slots) valid_bits |= 1u << k;
      }
    }
    wgmma_wait<0>();
    fence_regs(sc);
    fence_regs(o);

    // Mask, scale into the log2 domain, local row max over the 64 columns.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int jj = k >> 1, e = k & 1;
      const bool v = (valid_bits >> k) & 1u;
      sc[jj * 4 + e] = v ? sc[jj * 4 + e] * scale_log2 : -INFINITY;
      sc[jj * 4 + 2 + e] = v ? sc[jj * 4 + 2 + e] * scale_log2 : -INFINITY;
      mx0 = fmaxf(mx0, sc[jj * 4 + e]);
      mx1 = fmaxf(mx1, sc[jj * 4 + 2 + e]);
    }
#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o_));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o_));
    }
    // Both warpgroups rescale by the same running max: exchange the tile maxima
    // (double-buffered by pair parity) and combine them in a fixed order.
    float* xmax = s_row_max + (j & 1) * 2 * BLOCK_H;
    if ((lane & 3) == 0) {
      xmax[w * BLOCK_H + r0] = mx0;
      xmax[w * BLOCK_H + r1] = mx1;
    }
    named_barrier_sync(kBarMax, 256);
    const float mn0 = fmaxf(m0, fmaxf(xmax[r0], xmax[BLOCK_H + r0]));
    const float mn1 = fmaxf(m1, fmaxf(xmax[r1], xmax[BLOCK_H + r1]));
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0;  // no valid column yet: avoid -inf - -inf
    const float mu1 = mn1 == -INFINITY ? 0.f : mn1;
    const float alpha0 = fast_exp2(m0 - mu0), alpha1 = fast_exp2(m1 - mu1);
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int k = 0; k < 32; k += 4) {
      sc[k] = fast_exp2(sc[k] - mu0);
      sc[k + 1] = fast_exp2(sc[k + 1] - mu0);
      sc[k + 2] = fast_exp2(sc[k + 2] - mu1);
      sc[k + 3] = fast_exp2(sc[k + 3] - mu1);
      ps0 += sc[k] + sc[k + 1];
      ps1 += sc[k + 2] + sc[k + 3];
    }
    l0 = l0 * alpha0 + ps0;
    l1 = l1 * alpha1 + ps1;
#pragma unroll
    for (int k = 0; k < 128; k += 4) {
      o[k] *= alpha0;
      o[k + 1] *= alpha0;
      o[k + 2] *= alpha1;
      o[k + 3] *= alpha1;
    }
    // P as wgmma A fragments: k-step kk covers columns 16 kk .. 16 kk + 15.
    uint32_t pa[16];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk * 4 + 0] = pack_bf16(sc[8 * kk + 0], sc[8 * kk + 1]);
      pa[kk * 4 + 1] = pack_bf16(sc[8 * kk + 2], sc[8 * kk + 3]);
      pa[kk * 4 + 2] = pack_bf16(sc[8 * kk + 4], sc[8 * kk + 5]);
      pa[kk * 4 + 3] = pack_bf16(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
    // Publish P for the other warpgroup (swizzled K-major [64 x 64]).
    {
      uint8_t* sp = smem + (w == 0 ? SmemPlan::kv0 + 8 * kSegBytes : SmemPlan::p1);
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int col = jj * 8 + cq;
        const int chunk = col >> 3, within = (col & 7) * 2;
        *reinterpret_cast<uint32_t*>(sp + swz(r0, chunk) + within) = pa[(jj >> 1) * 4 + (jj & 1) * 2];
        *reinterpret_cast<uint32_t*>(sp + swz(r1, chunk) + within) = pa[(jj >> 1) * 4 + (jj & 1) * 2 + 1];
      }
      fence_proxy_async();
      named_barrier_arrive(w == 0 ? kBarP0 : kBarP1, 256);
    }

    // O += P_own V_own (this warpgroup's value columns of its own tile).
    wgmma_fence();
    fence_regs(o);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_m64n256k16_rs_tb(o, pa[kk * 4], pa[kk * 4 + 1], pa[kk * 4 + 2], pa[kk * 4 + 3],
                             desc_mn_major(my_tile + (w * 4) * kSegBytes + kk * 16 * 128));
    }
    wgmma_commit();
    // O += P_other V_other, once the other warpgroup has published its P.
    named_barrier_sync(w == 0 ? kBarP1 : kBarP0, 256);
    const uint32_t p_other = w == 0 ? p1_addr : p0_addr;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_m64n256k16_ss_tb(o, desc_k_major(p_other + kk * 32),
                             desc_mn_major(other_tile + (w * 4) * kSegBytes + kk * 16 * 128), 1);
    }
    wgmma_commit();
    fence_regs(o);

  }
  wgmma_wait<0>();
  fence_regs(o);

  // Row sums: thread partials -> quad -> both warpgroups (fixed order: WG0 + WG1).
#pragma unroll
  for (int o_ = 1; o_ <= 2; o_ <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o_);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o_);
  }
  if ((lane & 3) == 0) {
    s_row_sum[w * BLOCK_H + r0] = l0;
    s_row_sum[w * BLOCK_H + r1] = l1;
  }
  named_barrier_sync(kBarSum, 256);
  const float lt0 = s_row_sum[r0] + s_row_sum[BLOCK_H + r0];
  const float lt1 = s_row_sum[r1] + s_row_sum[BLOCK_H + r1];
  const float inv0 = lt0 > 0.f ? 1.f / lt0 : 0.f;
  const float inv1 = lt1 > 0.f ? 1.f / lt1 : 0.f;
  const int64_t row0 = t * H + g * BLOCK_H + r0, row1 = row0 + 8;
  __nv_bfloat16* out0 = p.out + row0 * D_V + w * 256;
  __nv_bfloat16* out1 = p.out + row1 * D_V + w * 256;
#pragma unroll
  for (int jj = 0; jj < 32; ++jj) {
    *reinterpret_cast<__nv_bfloat162*>(out0 + jj * 8 + cq) = __floats2bfloat162_rn(o[jj * 4] * inv0, o[jj * 4 + 1] * inv0);
    *reinterpret_cast<__nv_bfloat162*>(out1 + jj * 8 + cq) =
        __floats2bfloat162_rn(o[jj * 4 + 2] * inv1, o[jj * 4 + 3] * inv1);
  }
  if (w == 0 && (lane & 3) == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
    p.lse[row0] = lt0 > 0.f ? (m0 + __log2f(lt0)) * kLn2 : INFINITY;
    p.lse[row1] = lt1 > 0.f ? (m1 + __log2f(lt1)) * kLn2 : INFINITY;
    if (p.row_max) {
      p.row_max[row0] = lt0 > 0.f ? m0 * kLn2 : -INFINITY;
      p.row_max[row1] = lt1 > 0.f ? m1 * kLn2 : -INFINITY;
    }
  }
}

template <int kHeadGroups>
void launch_sparse_mla_sm90(const SparseMlaParams& p) {
  auto kernel = sparse_mla_fwd_kernel<kHeadGroups>;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(SmemPlan::bytes)));
  constexpr float kLog2e = 1.4426950408889634f;
  const dim3 grid(static_cast<unsigned>(p.T * kHeadGroups));
  kernel<<<grid, kNumThreads, SmemPlan::bytes, p.stream>>>(p, p.softmax_scale * kLog2e);
  DSA_CHECK_LAUNCH("sparse_mla_fwd_kernel");
}

}  // namespace dsa::cuda::sm90_sparse_mla
