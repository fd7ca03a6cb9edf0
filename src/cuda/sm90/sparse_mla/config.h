#pragma once
// Tile sizes and the shared-memory plan of the Hopper sparse MLA kernel.
// One CTA = one query token x 64 heads; three warpgroups: two consumers that
// split each 64-row KV tile's scores (32 columns each) and the 512 value
// columns of O (256 each), and one producer that gathers KV rows by index.
#include <cstddef>
#include <cstdint>

namespace dsa::cuda::sm90_sparse_mla {

constexpr int BLOCK_H = 64;        // heads per CTA = wgmma M of one warpgroup
constexpr int BLOCK_KV = 64;       // selected rows per tile
constexpr int D_QK = 576;
constexpr int D_V = 512;
constexpr int SEG = 64;            // bf16 columns per 128-byte swizzle row
constexpr int NUM_SEG = D_QK / SEG;  // 9
constexpr int kNumStages = 2;
constexpr int kNumThreads = 384;   // WG0, WG1 consumers; WG2 producer
constexpr int kConsumerRegs = 224;  // setmaxnreg: 2*128*224 + 128*56 <= 65536
constexpr int kProducerRegs = 56;

// One [64 rows x 576] bf16 tile stored as 9 segments of [64 rows x 128 B],
// each segment 128B-swizzled (16-byte chunk c of row r at chunk c ^ (r % 8)).
// The same bytes serve as K-major B for Q K^T and as MN-major B for P V.
constexpr int kSegBytes = BLOCK_KV * 128;         // 8192
constexpr int kTileBytes = NUM_SEG * kSegBytes;   // 73728

struct SmemPlan {
  static constexpr size_t q = 0;                                   // Q [64 heads x 576]
  static constexpr size_t kv = q + kTileBytes;                     // kNumStages KV tiles
  static constexpr size_t p = kv + size_t(kNumStages) * kTileBytes;  // P [64 x 64] bf16, swizzled K-major
  static constexpr size_t row_max = p + BLOCK_H * 128;             // float [2 parity][2 WG][64]
  static constexpr size_t row_sum = row_max + 2 * 2 * BLOCK_H * 4;   // float [2 WG][64]
  static constexpr size_t valid = row_sum + 2 * BLOCK_H * 4;       // uint8 [kNumStages][64]
  static constexpr size_t bars = valid + kNumStages * BLOCK_KV;    // uint64 full[2], empty[2]
  static constexpr size_t end = bars + 2 * kNumStages * 8;
  static constexpr size_t bytes = end + 1024;  // slack to align the base to 1024 (swizzle atoms)
};
static_assert(SmemPlan::kv % 1024 == 0 && SmemPlan::p % 1024 == 0, "swizzled tiles need 1024-byte alignment");
static_assert(SmemPlan::bytes <= 232448, "exceeds the 227 KB of shared memory a Hopper block may opt in to");

}  // namespace dsa::cuda::sm90_sparse_mla

#include "cuda/sparse_mla.h"

namespace dsa::cuda::sm90_sparse_mla {
// kHeadGroups = H / 64; one explicit instantiation per file in instantiations/.
template <int kHeadGroups>
void launch_sparse_mla_sm90(const SparseMlaParams& p);
}  // namespace dsa::cuda::sm90_sparse_mla
