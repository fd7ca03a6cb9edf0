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

// lse (natural log) and, when asked for, the row max of head rows row0 and
// row1 from their running max (log2 domain) and sum; a row with nothing
// valid (sum 0) gets lse +inf and max -inf. Used by the epilogue and by the
// combine kernel of split items.
__device__ __forceinline__ void store_row_stats(const SparseMlaParams& p, int64_t row0, int64_t row1, float m0, float m1,
                                                float l0, float l1) {
  constexpr float kLn2 = 0.6931471805599453f;
  p.lse[row0] = l0 > 0.f ? (m0 + __log2f(l0)) * kLn2 : INFINITY;
  p.lse[row1] = l1 > 0.f ? (m1 + __log2f(l1)) * kLn2 : INFINITY;
  if (p.row_max) {
    p.row_max[row0] = l0 > 0.f ? m0 * kLn2 : -INFINITY;
    p.row_max[row1] = l1 > 0.f ? m1 * kLn2 : -INFINITY;
  }
}

// Shared-memory matrix descriptors, 128-byte swizzle. K-major: rows of 64
// bf16 along K, 8-row groups 1024 B apart (SBO); LBO unused. MN-major (the V
// view of a KV tile): 64 contiguous N values per 128-byte row, one row per K,
// 8-row K groups 1024 B apart (SBO), 64-column N blocks 8192 B apart (LBO).
// Built from a 32-bit low word: the address field (bits 0-13, addr / 16)
// never carries into the high word for shared addresses below 256 KB, so a
// k-step's descriptor is its base's low word plus a constant (one IADD), and
// the high word (SBO, 128-byte swizzle mode) is a constant.
__device__ __forceinline__ uint32_t desc_lo_k_major(uint32_t addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }
__device__ __forceinline__ uint32_t desc_lo_mn_major(uint32_t addr) {
  return ((addr & 0x3FFFF) >> 4) | (static_cast<uint32_t>(kSegBytes >> 4) << 16);
}
__device__ __forceinline__ uint64_t make_desc(uint32_t lo) {
  return static_cast<uint64_t>(lo) | (static_cast<uint64_t>((1024 >> 4) | (1u << 30)) << 32);
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

// S (+)= Q K^T over 4 segments from segment seg0, descriptors from base low words.
__device__ __forceinline__ void qk_4_segments(float (&s)[32], uint32_t q_lo, uint32_t k_lo, int seg0, bool first) {
#pragma unroll
  for (int kk = 0; kk < 16; ++kk) {
    const uint32_t off = ((seg0 + (kk >> 2)) * kSegBytes + (kk & 3) * 32) >> 4;
    wgmma_m64n64k16_ss(s, make_desc(q_lo + off), make_desc(k_lo + off), (first && kk == 0) ? 0 : 1);
  }
}
__device__ __forceinline__ void qk_rope_segment(float (&s)[32], uint32_t q_lo, uint32_t k_lo) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t off = (8 * kSegBytes + kk * 32) >> 4;
    wgmma_m64n64k16_ss(s, make_desc(q_lo + off), make_desc(k_lo + off), 1);
  }
}

// Named barriers (0 is __syncthreads). Among the consumer threads: the row
// max chain (A: WG0 -> WG1, B: WG1 -> WG0), the two P hand-offs and the row
// sums; among the producer's: its index scan.
enum : uint32_t { kBarMaxA = 1, kBarMaxB = 2, kBarPA = 3, kBarPB = 4, kBarSum = 5, kBarScan = 6 };

// kDiag: 0 in the library. The dev bench (dev/sparse_mla_dev.cu) times two
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
// Both are chosen by the launcher by cache size (see there).
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
template <int kHeadGroups, int kDiag = 0, bool kReleaseFirst = false, bool kEarlyMaxB = false, bool kSkipMask = false>
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
  const int H = kHeadGroups * BLOCK_H;
  const int tid = threadIdx.x;
  // Warp-uniform in the compiler's eyes, so the role branches hold no wgmma
  // that ptxas would serialize.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int lane = tid & 31;
  auto item_rows = [&](uint32_t item, int& n) {
    const int64_t t = item / kHeadGroups;
    n = p.topk;
    if (p.valid_len) n = min(max(p.valid_len[t], 0), p.topk);
    return p.indices + t * p.topk;
  };
  auto q_rows_of = [&](uint32_t item) {
    return p.q + (item / kHeadGroups) * p.stride_q_t + static_cast<int64_t>(item % kHeadGroups) * BLOCK_H * D_QK;
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
      const __nv_bfloat16* src = q_rows + r * D_QK + cc * 8;
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
            const __nv_bfloat16* src = q_rows + r * D_QK + cc * 8;
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
              const __nv_bfloat16* src = p.kv + static_cast<int64_t>(max(row, 0)) * D_QK + cc * 8;
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
      for (int j = 0; j < num_pairs; ++j) issue_pair(j);
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
    qk_4_segments(sc, opaque(desc_lo_k_major(q_addr)), opaque(desc_lo_k_major(my_tile)), 4 * w, true);
    wgmma_commit();
  };
  auto issue_qk_second = [&](uint32_t parity) {
    mbar_wait(ready_bar(w, 1 - first_half), parity);
    fence_proxy_async();
    wgmma_fence();
    const uint32_t qa = opaque(desc_lo_k_major(q_addr)), ta = opaque(desc_lo_k_major(my_tile));
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
    const uint32_t v_lo = opaque(desc_lo_mn_major(my_tile + (w * 4) * kSegBytes));
    wgmma_fence();
    fence_regs(o);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n256k16_rs_tb(o, pa[kk * 4], pa[kk * 4 + 1], pa[kk * 4 + 2], pa[kk * 4 + 3],
                             make_desc(v_lo + ((kk * 16 * 128) >> 4)));
    wgmma_commit();
  };
  auto pv_other = [&](uint32_t p_other) {
    const uint32_t v_lo = opaque(desc_lo_mn_major(other_tile + (w * 4) * kSegBytes));
    const uint32_t p_lo = opaque(desc_lo_k_major(p_other));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n256k16_ss_tb(o, make_desc(p_lo + ((kk * 32) >> 4)), make_desc(v_lo + ((kk * 16 * 128) >> 4)), 1);
    wgmma_commit();
  };

  // An item's epilogue, called inside each role's own item loop: the two
  // branches never merge, so ptxas need not agree on where O lives in both
  // (a merge point made it spill).
  auto finish = [&](uint32_t item, int kk, int num_pairs_of_item, int part, uint32_t u) {
    const int64_t t = item / kHeadGroups;
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
    const int64_t row0 = t * H + g * BLOCK_H + r0, row1 = row0 + 8;
    // O goes straight from registers to global memory, 16 bytes per store:
    // a quad holds 8 consecutive columns of a row for each 8-column chunk,
    // so a 4 x 4 transpose of bf16x2 values within the quad (two
    // shuffle-exchange steps) gives each lane one whole chunk. Shared
    // memory is left alone, so Q's space is free for the next item.
    const int q = lane & 3;
    __nv_bfloat16* out0 = p.out + row0 * D_V + w * 256 + q * 8;
    __nv_bfloat16* out1 = out0 + 8 * D_V;
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
    if (w == 0 && (lane & 3) == 0) store_row_stats(p, row0, row1, rm0, rm1, lt0, lt1);
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
template <int kHeadGroups>
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
  const int64_t row0 = static_cast<int64_t>(item / kHeadGroups) * (kHeadGroups * BLOCK_H) + (item % kHeadGroups) * BLOCK_H + r0;
  const int64_t row1 = row0 + 8;
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int col = w * 256 + c * 8 + q * 2;
  *reinterpret_cast<uint32_t*>(p.out + row0 * D_V + col) = pack_bf16(acc.x * inv0, acc.y * inv0);
  *reinterpret_cast<uint32_t*>(p.out + row1 * D_V + col) = pack_bf16(acc.z * inv1, acc.w * inv1);
  if (w == 0 && c == 0 && q == 0) store_row_stats(p, row0, row1, m0, m1, l0, l1);
}

// Measured 1-4% faster with output bit-identical (dev bench, seventh and
// eighth sessions; docs/performance.md); the selects are identities when
// every bit is set, so the two paths give the same bits by construction.
constexpr bool kSkipMaskDefault = true;

// kSkipMaskChoice (dev bench): -1 the library's choice, 0 / 1 force the kernel's kSkipMask off / on.
template <int kHeadGroups, int kDiag = 0, int kFlags = -1, int kSkipMaskChoice = -1>
void launch_sparse_mla_sm90_variant(const SparseMlaParams& p) {
  constexpr bool skip = kSkipMaskChoice < 0 ? kSkipMaskDefault : kSkipMaskChoice != 0;
  int dev = 0, sms = 0, l2_bytes = 0;
  DSA_CUDA_CHECK(cudaGetDevice(&dev));
  DSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  DSA_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, dev));
  // One CTA per SM (shared memory allows no more), each looping over items.
  const int64_t items = static_cast<int64_t>(p.T) * kHeadGroups;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(items, sms)));
  const TailSplit plan = tail_split(items, grid.x);
  // The parts are written as float4 and the sorted indices as int32: a
  // workspace off 16 bytes, or too small for a use, is not used for it.
  const bool ws_ok = p.workspace != nullptr && reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0;
  TailSplit split = plan;
  if (split.parts && !(ws_ok && p.workspace_bytes >= split_bytes(plan))) {
    split = TailSplit{};
    split.num_full = static_cast<uint32_t>(items);
  }
  const bool sort = sort_wanted(p.num_slots, p.topk, l2_bytes, items, sms) && ws_ok &&
                    p.workspace_bytes >= sort_offset(plan) + sort_bytes(p.T, p.topk);
  SparseMlaParams run = p;
  if (sort) {
    int32_t* sorted = reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(p.workspace) + sort_offset(plan));
    launch_sort_indices(p, sorted, sms);
    run.indices = sorted;
    run.valid_len = nullptr;  // masked positions are -1 after the sort
  }
  // The larger the cache, the more the refills (L2 misses, DRAM) and not
  // the tensor cores bound the pair loop. With a cache over half of L2,
  // WG1's early m_B (earlier release of buffer 0's half R) measured 2-3%
  // faster at H = 128 from s_kv 32768 and up to 2% at H = 64, and 1-2% slower
  // at s_kv 4096 and 8192. At H = 64 with a cache larger than L2 in the given
  // (random) order, releasing buffer 1's half L a few hundred cycles earlier
  // measured 3-5% faster at s_kv 65536 and 131072 (four calls), and 3-11%
  // slower at 8192 and 32768, where the next Q K^T must be queued before
  // P_B V_B retires; at H = 128 it was slower or level in every cell (the
  // two CTAs of a token share each row through L2). In slot order the rows
  // come from L2 more often, and early m_B alone measured best at both H.
  const int64_t cache_bytes = p.num_slots * static_cast<int64_t>(D_QK * 2);
  auto kernel = sparse_mla_fwd_kernel<kHeadGroups, kDiag, false, false, skip>;
  if (2 * cache_bytes > l2_bytes) kernel = sparse_mla_fwd_kernel<kHeadGroups, kDiag, false, true, skip>;
  if constexpr (kHeadGroups == 1) {
    if (cache_bytes > l2_bytes && !sort) kernel = sparse_mla_fwd_kernel<kHeadGroups, kDiag, true, true, skip>;
  }
  // kFlags >= 0 (dev bench): bit 0 forces kReleaseFirst, bit 1 kEarlyMaxB.
  if constexpr (kFlags >= 0) kernel = sparse_mla_fwd_kernel<kHeadGroups, kDiag, (kFlags & 1) != 0, (kFlags & 2) != 0, skip>;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(SmemPlan::bytes)));
  constexpr float kLog2e = 1.4426950408889634f;
  kernel<<<grid, kNumThreads, SmemPlan::bytes, p.stream>>>(run, p.softmax_scale * kLog2e, split);
  DSA_CHECK_LAUNCH("sparse_mla_fwd_kernel");
  if (split.parts) {
    sparse_mla_combine_kernel<kHeadGroups><<<split.leftover * 64, 128, 0, p.stream>>>(p, split);
    DSA_CHECK_LAUNCH("sparse_mla_combine_kernel");
  }
}

template <int kHeadGroups>
void launch_sparse_mla_sm90(const SparseMlaParams& p) {
  launch_sparse_mla_sm90_variant<kHeadGroups, 0>(p);
}

}  // namespace dsa::cuda::sm90_sparse_mla
