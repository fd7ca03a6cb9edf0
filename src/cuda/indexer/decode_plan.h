#pragma once
// The decode indexer-logits kernel's work split (sm90/sm90_fp8_indexer_decode.cuh),
// shared by its host launcher and the kernel.
//
// Work = groups of next_n consecutive query tokens (a decode step's tokens of
// one request) x 64-key column blocks of the logits (ceil(logits_stride / 64)).
// Flattened as group * col_blocks + block and cut into one contiguous run per
// CTA, one CTA per SM (persistent): at 64 requests x 32768 keys that is
// 32768 blocks over 132 SMs, 249 for the longest CTA against 248.2 on
// average, where splitting requests into whole CTA-sized pieces left whole
// waves partly idle. A run crosses at most a few group boundaries, so the
// query tile (next_n x 8 KB) is reloaded rarely. The split is made on the
// host, which does not know the per-token visible lengths (device memory):
// columns past a token's visible end still count as work, though they cost
// only -inf stores; batches of very unequal lengths balance less well.
#include <algorithm>
#include <cstdint>

#include "cuda/indexer/params.h"

namespace dsa::cuda::indexer {

struct DecodePlan {
  int64_t groups = 0;         // ceil(T / next_n)
  int64_t col_blocks = 0;     // ceil(logits_stride / 64)
  int64_t units_per_cta = 0;  // flattened (group, column block) units of each CTA's run
  int ctas = 0;               // grid size: ceil(groups * col_blocks / units_per_cta) <= num_sms
};

inline DecodePlan make_decode_plan(int64_t T, int next_n, int64_t logits_stride, int num_sms) {
  DecodePlan plan;
  plan.groups = (T + next_n - 1) / next_n;
  plan.col_blocks = (logits_stride + 63) / 64;
  const int64_t total = plan.groups * plan.col_blocks;
  const int64_t slots = std::max(1, num_sms);
  plan.units_per_cta = std::max<int64_t>(1, (total + slots - 1) / slots);
  plan.ctas = static_cast<int>((total + plan.units_per_cta - 1) / plan.units_per_cta);
  return plan;
}

// The dispatch's test (indexer_logits.cu, before any other branch): the
// caller asked for the new decode kernel (ctx.picks.indexer_decode == kNew),
// the device is sm_90 and decode_shape_ok. kAuto and kBaseline keep the
// baseline kernel.
bool decode_eligible(const DeviceContext& ctx, const IndexerLogitsParams& p);
// The kernel's own preconditions: the hint max_tokens_per_request (the
// next_n of the step) is 1 to 4, q_fp8 is 16-byte aligned (TMA), T < 2^31.
bool decode_shape_ok(const IndexerLogitsParams& p);
// Launches the variant for next_n = p.max_tokens_per_request; throws
// ShapeError when decode_shape_ok fails. decode_dispatch.cu.
void run_decode(const DeviceContext& ctx, const IndexerLogitsParams& p);

namespace sm90 {
// kNextN query tokens per group (1 to 4). Defined in sm90/sm90_fp8_indexer_decode.cuh,
// one instantiation per file in instantiations/.
template <int kNextN>
void launch_decode(const DeviceContext& ctx, const IndexerLogitsParams& p);
}  // namespace sm90

}  // namespace dsa::cuda::indexer
