#pragma once
// Tile sizes and the shared-memory plan of the Hopper sparse MLA kernel.
// One CTA = one query token x 64 heads; three warpgroups. The two consumer
// warpgroups own alternate KV tiles (WG0 even, WG1 odd): each computes the
// full 64 x 64 scores of its own tile, and each accumulates 256 of the 512
// value columns of O over both tiles (its own P from registers, the other's
// P from shared memory), with the row max handed along a chain (WG0 -> WG1
// -> WG0). The producer warpgroup gathers KV rows by index. The grid is
// persistent: a CTA runs the items (token, head group) blockIdx.x,
// blockIdx.x + gridDim.x, ... back to back.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cuda/sparse_mla/params.h"
#include "dsa/cuda.h"

namespace dsa::cuda::sm90_sparse_mla {

constexpr int BLOCK_H = 64;        // heads per CTA = wgmma M of one warpgroup
constexpr int BLOCK_KV = 64;       // selected rows per tile
constexpr int D_QK = 576;
constexpr int D_V = 512;
constexpr int SEG = 64;            // bf16 columns per 128-byte swizzle row
constexpr int NUM_SEG = D_QK / SEG;  // 9
constexpr int kNumThreads = 384;   // WG0, WG1 consumers; WG2 producer
// setmaxnreg moves registers within the CTA's launch allocation (168 x 384 =
// 64512 under __launch_bounds__(384, 1)): 2 x 128 x 232 + 128 x 40 = 64512.
// A larger producer share leaves the consumers' increase waiting forever;
// 224 for the consumers spilled.
constexpr int kConsumerRegs = 232;
constexpr int kProducerRegs = 40;

// One [64 rows x 576] bf16 tile stored as 9 segments of [64 rows x 128 B],
// each segment 128B-swizzled (16-byte chunk c of row r at chunk c ^ (r % 8)).
// The same bytes serve as K-major B for Q K^T and as MN-major B for P V.
// A tile has two halves with their own ready / free barriers: L = segments
// 0-3 (value columns 0-255, read by WG0's P V) and R = segments 4-8 (value
// columns 256-511 read by WG1's P V, plus the RoPE segment).
constexpr int kSegBytes = BLOCK_KV * 128;         // 8192
constexpr int kTileBytes = NUM_SEG * kSegBytes;   // 73728
constexpr int kHalfSplit = 4;                     // first segment of half R

struct SmemPlan {
  static constexpr size_t q = 0;                        // Q [64 heads x 576] of the current item
  static constexpr size_t kv0 = q + kTileBytes;         // WG0's tile; its RoPE segment later holds P_A
  static constexpr size_t kv1 = kv0 + kTileBytes;       // WG1's tile
  static constexpr size_t p1 = kv1 + kTileBytes;        // P_B [64 x 64] bf16, swizzled K-major
  static constexpr size_t chain_max = p1 + BLOCK_H * 128;  // float [64]: the row max handed WG0 <-> WG1
  static constexpr size_t valid = chain_max + BLOCK_H * 4;  // uint8 [2 pair parity][2 tile][64 rows]
  static constexpr size_t row_sum = valid + 2 * 2 * BLOCK_KV;  // float [2 item parity][2 WG][64]
  // uint64 mbarriers: q_ready, ready[2 tile][2 half], free[2][2], valid_ready[2 pair parity], q_free
  static constexpr size_t bars = row_sum + 2 * 2 * BLOCK_H * 4;
  // int [2 item parity]: the item's pair count; int [2 item parity][4 warps]: the producer's index scan
  static constexpr size_t item_pairs = bars + 12 * 8;
  // uint32 0, read to pin an instruction order ptxas would change (kEarlyMaxB)
  static constexpr size_t zero = item_pairs + 40;
  static constexpr size_t end = item_pairs + 48;
  static constexpr size_t bytes = end + 1024;  // slack to align the base to 1024 (swizzle atoms)
};
static_assert(SmemPlan::kv0 % 1024 == 0 && SmemPlan::kv1 % 1024 == 0 && SmemPlan::p1 % 1024 == 0,
              "swizzled tiles need 1024-byte alignment");
static_assert(SmemPlan::bytes <= 232448, "exceeds the 227 KB of shared memory a Hopper block may opt in to");

// The last round's split. With N items over G CTAs, N / G full rounds leave
// r = N % G items for a last round that would keep G - r SMs idle for an
// item's time (3% of the time at H = 64 in the sweep: 4096 items, 132 SMs).
// With a workspace, each of those r items is split into `parts` ranges of
// its pairs, one per CTA, and a second kernel combines the parts.
constexpr int kMaxParts = 16;
// Per part: O [2 warpgroups][32 chunks][128 threads][4] fp32 in the
// accumulator layout (unnormalized), then (max, sum) per head row.
constexpr size_t kPartOFloats = 2 * 32 * 128 * 4;
constexpr size_t kPartFloats = kPartOFloats + BLOCK_H * 2;
struct TailSplit {
  uint32_t num_full = 0;  // items run whole (a multiple of the grid)
  int parts = 0;          // 0: no split; else parts per leftover item
  uint32_t leftover = 0;  // items split
};
inline TailSplit tail_split(int64_t items, int64_t grid) {
  TailSplit s;
  s.num_full = static_cast<uint32_t>(items);
  if (grid <= 0 || items <= grid) return s;
  const int64_t r = items % grid;
  if (r == 0) return s;
  const int64_t parts = std::min<int64_t>(kMaxParts, grid / r);
  if (parts < 2) return s;
  s.num_full = static_cast<uint32_t>(items - r);
  s.parts = static_cast<int>(parts);
  s.leftover = static_cast<uint32_t>(r);
  return s;
}
inline size_t split_bytes(const TailSplit& s) {
  return static_cast<size_t>(s.leftover) * s.parts * kPartFloats * sizeof(float);
}
// Workspace bytes the launcher uses for `items` items with `sms` SMs (0: no split).
inline size_t split_workspace_bytes(int64_t items, int sms) {
  return split_bytes(tail_split(items, std::min<int64_t>(items, sms)));
}

// Gather order (sort_indices.cuh). With a cache larger than L2 and at least
// two rounds of items, the indices are first reordered by slot into the
// workspace, after the split parts (whether the split is used or not, so
// that the layout depends on the shape alone). Fewer items (decode batches:
// one token per request, each over its own part of the cache) leave nothing
// for the CTAs to share, and the pre-pass measured 5% of the sparse MLA time
// at 64 x 32768 decode. topk above 2048 is not reordered (one block of the
// sort holds 2048).
constexpr int kSortMaxTopkPerToken = 2048;
inline bool sort_wanted(int64_t num_slots, int topk, int64_t l2_bytes, int64_t items, int sms) {
  return num_slots * static_cast<int64_t>(D_QK * 2) > l2_bytes && topk <= kSortMaxTopkPerToken &&
         items >= 2 * static_cast<int64_t>(sms);
}
inline size_t sort_offset(const TailSplit& plan) { return (split_bytes(plan) + 255) / 256 * 256; }
inline size_t sort_bytes(int64_t T, int topk) { return static_cast<size_t>(T) * topk * sizeof(int32_t); }
// Writes p.indices reordered into sorted ([T, topk] int32, dense, -1 for
// invalid and masked entries, which come last) on ctx.stream
// (sort_indices.cu); slot buckets of 2^shift slots,
// sort_bucket_shift(p.num_slots) when shift < 0 (the dev bench passes
// coarser ones). p's strides must be resolved (resolve_strides).
void launch_sort_indices(const SparseMlaParams& p, int32_t* sorted, const DeviceContext& ctx, int shift = -1);
// All the workspace the launcher can use for this shape.
inline size_t workspace_bytes(int64_t T, int head_groups, int topk, int64_t num_slots, int sms, int64_t l2_bytes) {
  const int64_t items = T * head_groups;
  const TailSplit plan = tail_split(items, std::min<int64_t>(items, sms));
  if (!sort_wanted(num_slots, topk, l2_bytes, items, sms)) return split_bytes(plan);
  return sort_offset(plan) + sort_bytes(T, topk);
}

// How one call runs: the persistent grid, the split of its last round, the
// reordered indices, and the kernel build for the cache size.
struct LaunchPlan {
  unsigned grid = 0;            // CTAs: one per SM (shared memory allows no more), each looping over items
  TailSplit split;              // as run: no split when the workspace cannot hold the parts
  int32_t* sorted = nullptr;    // [T, topk] in the workspace when the indices are reordered first, else null
  bool release_first = false;   // kReleaseFirst of the kernel build
  bool early_max_b = false;     // kEarlyMaxB of the kernel build
};

// p's strides resolved; head_groups = H / 64.
inline LaunchPlan plan_launch(const SparseMlaParams& p, int head_groups, const DeviceContext& ctx) {
  const int sms = ctx.num_sms();
  const int64_t l2_bytes = static_cast<int64_t>(ctx.l2_bytes());
  LaunchPlan plan;
  const int64_t items = p.T * head_groups;
  plan.grid = static_cast<unsigned>(std::min<int64_t>(items, sms));
  const TailSplit wanted = tail_split(items, plan.grid);
  // The parts are written as float4 and the sorted indices as int32: a
  // workspace off 16 bytes, or too small for a use, is not used for it.
  const bool ws_ok = p.workspace != nullptr && reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0;
  plan.split = wanted;
  if (plan.split.parts && !(ws_ok && p.workspace_bytes >= split_bytes(wanted))) {
    plan.split = TailSplit{};
    plan.split.num_full = static_cast<uint32_t>(items);
  }
  const bool sort = sort_wanted(p.num_slots, p.topk, l2_bytes, items, sms) && ws_ok &&
                    p.workspace_bytes >= sort_offset(wanted) + sort_bytes(p.T, p.topk);
  if (sort) plan.sorted = reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(p.workspace) + sort_offset(wanted));
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
  plan.early_max_b = 2 * cache_bytes > l2_bytes;
  plan.release_first = head_groups == 1 && cache_bytes > l2_bytes && !sort;
  return plan;
}

// The parameters the attention kernel runs on: p, or p over the indices
// reordered into the workspace when the plan says so (the pre-pass is queued
// on ctx.stream here).
inline SparseMlaParams reorder_if_planned(const SparseMlaParams& p, const LaunchPlan& plan, const DeviceContext& ctx) {
  if (!plan.sorted) return p;
  launch_sort_indices(p, plan.sorted, ctx);
  SparseMlaParams run = p;
  run.indices = plan.sorted;
  run.stride_indices_t = p.topk;
  run.valid_len = nullptr;  // masked positions are -1 after the sort
  return run;
}

// Every view in its dense layout (what resolve_strides gives for 0 strides;
// q's token stride may be anything): the kernel then addresses with
// compile-time row lengths (the kDense builds).
inline bool strides_are_dense(const SparseMlaParams& p) {
  const int64_t H = p.num_heads;
  return p.stride_q_h == D_QK && p.stride_kv_slot == D_QK && p.stride_indices_t == p.topk && p.stride_valid_len_t == 1 &&
         p.stride_out_h == D_V && p.stride_out_t == H * D_V && p.stride_lse_t == H && p.stride_row_max_t == H;
}

// The library's kernel builds: kHeadGroups = H / 64, the cache-size choices
// of LaunchPlan, dense or strided views; one explicit instantiation per file
// in instantiations/, chosen in one place (sparse_mla_sm90, sm90_sparse_mla.cu).
template <int kHeadGroups, bool kReleaseFirst, bool kEarlyMaxB, bool kDense>
void launch_sparse_mla_sm90(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx);
// The fp8-cache builds (p.kv_fp8, 656-byte rows dequantized in shared
// memory by the producer, sm90_fp8_kv_tile.cuh): kHeadGroups = H / 64, dense
// (stride_kv_slot 656 bytes, every other view dense) or strided. One
// schedule for every cache size: kEarlyMaxB on, kReleaseFirst off (the bf16
// kernel's choice for caches over half of L2, the decode case the fp8 cache
// is for; the two flags change the schedule, not the bits).
// kOrder: how the producer interleaves the copies and conversions of a pair
// (sm90_bf16_sparse_mla.cuh, issue_pair_fp8); the library runs
// kFp8DefaultOrder, and sparse_mla_sm90_fp8_order (H = 128, dense views
// only) the other one too, for the benchmark that picks between them.
enum : int { kFp8ThreeFirst = 1, kFp8Interleaved = 2 };
constexpr int kFp8DefaultOrder = kFp8ThreeFirst;
template <int kHeadGroups, bool kDense, int kOrder = kFp8DefaultOrder>
void launch_sparse_mla_sm90_fp8(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx);
void sparse_mla_sm90_fp8_order(const SparseMlaParams& p, const DeviceContext& ctx, int order);

}  // namespace dsa::cuda::sm90_sparse_mla
