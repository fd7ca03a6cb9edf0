// Hopper sparse MLA: which calls the wgmma kernel takes, and the one place
// where runtime values (H, the cache-size choices of the launch plan) pick a
// compiled kernel build.
#include <fmt/format.h>

#include <climits>
#include <string>
#include <utility>

#include "cuda/check.cuh"
#include "cuda/sparse_mla/sm90/config.h"
#include "cuda/sparse_mla/sm90/sm90_fp8_kv_tile.cuh"
#include "cuda/sparse_mla/sparse_mla.h"
#include "dsa/error.h"

namespace dsa::cuda {
namespace {

using namespace sm90_sparse_mla;

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool device_is_hopper(const DeviceContext& ctx) {
  return ctx.sm() == 90 && ctx.smem_optin_per_block() >= SmemPlan::bytes;
}

std::string sm90_unsupported_common(const SparseMlaParams& p);

// What rules p (strides resolved, check_sparse_mla_params passed) out for
// the sm90 kernel on ctx's device; empty when nothing does.
std::string sm90_unsupported(const SparseMlaParams& p, const DeviceContext& ctx) {
  if (!device_is_hopper(ctx))
    return fmt::format("the device is sm_{} with {} bytes of opt-in shared memory per block; the kernel needs sm_90 and {}",
                       ctx.sm(), ctx.smem_optin_per_block(), SmemPlan::bytes);
  if (p.kv_fp8) return "kv_fp8 is set: the fp8 cache takes sparse_mla_sm90_fp8";
  return sm90_unsupported_common(p);
}

// What rules p out for the fp8-cache build (kv_fp8, 656-byte rows).
std::string sm90_fp8_unsupported(const SparseMlaParams& p, const DeviceContext& ctx) {
  if (!device_is_hopper(ctx))
    return fmt::format("the device is sm_{} with {} bytes of opt-in shared memory per block; the kernel needs sm_90 and {}",
                       ctx.sm(), ctx.smem_optin_per_block(), SmemPlan::bytes);
  if (!p.kv_fp8) return "kv_fp8 is null: the bf16 cache takes sparse_mla_sm90";
  // 16-byte cp.async of every 16-byte piece of a row.
  if (!aligned16(p.kv_fp8)) return "kv_fp8 must be 16-byte aligned (16-byte copies of its rows); pass an aligned pool";
  if (p.stride_kv_slot % 16 != 0)
    return fmt::format("stride_kv_slot = {} bytes is not a multiple of 16, which the kernel's 16-byte copies need", p.stride_kv_slot);
  return sm90_unsupported_common(p);
}

// The rules both caches share (the kv pointer and its stride aside).
std::string sm90_unsupported_common(const SparseMlaParams& p) {
  if (p.num_heads != 64 && p.num_heads != 128) return fmt::format("num_heads = {}: the kernel takes 64 or 128", p.num_heads);
  if (p.d_qk != D_QK || p.d_v != D_V)
    return fmt::format("d_qk = {}, d_v = {}: the kernel takes the latent layout {} / {}", p.d_qk, p.d_v, D_QK, D_V);
  if (p.topk % BLOCK_KV != 0) return fmt::format("topk = {} is not a multiple of {}", p.topk, BLOCK_KV);
  if (p.T * (p.num_heads / BLOCK_H) > INT_MAX)
    return fmt::format("T = {}: T * num_heads / 64 exceeds 2^31 - 1 work items; split the batch", p.T);
  if (p.num_slots > INT_MAX) return fmt::format("num_slots = {} exceeds 2^31 - 1 (int32 indices)", p.num_slots);
  // 16-byte cp.async of q and kv rows, 16-byte stores of out rows (kv_fp8's
  // rows: sm90_fp8_unsupported).
  if (!aligned16(p.q) || !aligned16(p.kv) || !aligned16(p.out))
    return "q, kv and out must be 16-byte aligned (16-byte copies and stores); pass aligned views";
  const std::pair<const char*, int64_t> vec_strides[] = {{"stride_q_t", p.stride_q_t},
                                                         {"stride_q_h", p.stride_q_h},
                                                         {"stride_kv_slot", p.kv_fp8 ? 8 : p.stride_kv_slot},
                                                         {"stride_out_t", p.stride_out_t},
                                                         {"stride_out_h", p.stride_out_h}};
  for (const auto& [name, v] : vec_strides)
    if (v % 8 != 0)
      return fmt::format("{} = {} is not a multiple of 8 elements (16 bytes), which the kernel's 16-byte copies and stores "
                         "need; pad the rows to a multiple of 8",
                         name, v);
  // The kernel's address math multiplies 32-bit values (32 x 32 -> 64-bit products).
  const std::pair<const char*, int64_t> strides[] = {
      {"stride_q_t", p.stride_q_t},         {"stride_q_h", p.stride_q_h},
      {"stride_kv_slot", p.stride_kv_slot}, {"stride_indices_t", p.stride_indices_t},
      {"stride_valid_len_t", p.stride_valid_len_t}, {"stride_out_t", p.stride_out_t},
      {"stride_out_h", p.stride_out_h},     {"stride_lse_t", p.stride_lse_t},
      {"stride_row_max_t", p.stride_row_max_t}};
  for (const auto& [name, v] : strides)
    if (v > INT_MAX) return fmt::format("{} = {} exceeds 2^31 - 1 elements, the most the kernel's 32-bit address math takes", name, v);
  return {};
}

template <bool kDense>
void launch_build(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx, int head_groups) {
  if (head_groups == 1) {
    if (plan.release_first)
      launch_sparse_mla_sm90<1, true, true, kDense>(run, plan, ctx);
    else if (plan.early_max_b)
      launch_sparse_mla_sm90<1, false, true, kDense>(run, plan, ctx);
    else
      launch_sparse_mla_sm90<1, false, false, kDense>(run, plan, ctx);
  } else {
    if (plan.early_max_b)
      launch_sparse_mla_sm90<2, false, true, kDense>(run, plan, ctx);
    else
      launch_sparse_mla_sm90<2, false, false, kDense>(run, plan, ctx);
  }
}

// The fp8 views are dense when the rows are 656 bytes apart and every other
// view is dense (strides_are_dense, with the bf16 row length put aside).
bool fp8_strides_are_dense(const SparseMlaParams& p) {
  if (p.stride_kv_slot != kFp8RowBytes) return false;
  SparseMlaParams q = p;
  q.stride_kv_slot = D_QK;
  return strides_are_dense(q);
}

}  // namespace

bool sparse_mla_sm90_fp8_can_implement(const SparseMlaParams& params, const DeviceContext& ctx, std::string* why) {
  const SparseMlaParams p = resolve_strides(params);
  std::string reason;
  try {
    check_sparse_mla_params(p);
    reason = sm90_fp8_unsupported(p, ctx);
  } catch (const ShapeError& e) {
    reason = e.what();
  }
  if (why) *why = reason;
  return reason.empty();
}

void sparse_mla_sm90_fp8(const SparseMlaParams& params, const DeviceContext& ctx) {
  const SparseMlaParams p = resolve_strides(params);
  check_sparse_mla_params(p);
  if (const std::string why = sm90_fp8_unsupported(p, ctx); !why.empty())
    throw ShapeError(fmt::format("sparse_mla_sm90_fp8: {}; call sparse_mla() to fall back to the simple kernel", why));
  if (p.T == 0) return;
  const int head_groups = p.num_heads / BLOCK_H;
  // The bf16 kernel's plan (split of the last round, slot-order pre-pass),
  // so that sparse_mla_workspace_bytes serves both caches; its schedule
  // flags are not used (one fp8 build per H and view kind; config.h).
  const LaunchPlan plan = plan_launch(p, head_groups, ctx);
  const SparseMlaParams run = reorder_if_planned(p, plan, ctx);
  const bool dense = fp8_strides_are_dense(run);
  if (head_groups == 1) {
    if (dense)
      launch_sparse_mla_sm90_fp8<1, true>(run, plan, ctx);
    else
      launch_sparse_mla_sm90_fp8<1, false>(run, plan, ctx);
  } else {
    if (dense)
      launch_sparse_mla_sm90_fp8<2, true>(run, plan, ctx);
    else
      launch_sparse_mla_sm90_fp8<2, false>(run, plan, ctx);
  }
}

namespace sm90_sparse_mla {
void sparse_mla_sm90_fp8_order(const SparseMlaParams& params, const DeviceContext& ctx, int order) {
  const SparseMlaParams p = resolve_strides(params);
  if (order == kFp8DefaultOrder) return sparse_mla_sm90_fp8(p, ctx);
  check_sparse_mla_params(p);
  if (const std::string why = sm90_fp8_unsupported(p, ctx); !why.empty()) throw ShapeError(fmt::format("sparse_mla_sm90_fp8_order: {}", why));
  if (order != kFp8Interleaved || p.num_heads != 128 || !fp8_strides_are_dense(p))
    throw ShapeError("sparse_mla_sm90_fp8_order: the other order is built for H = 128 and dense views only");
  if (p.T == 0) return;
  const LaunchPlan plan = plan_launch(p, 2, ctx);
  const SparseMlaParams run = reorder_if_planned(p, plan, ctx);
  launch_sparse_mla_sm90_fp8<2, true, kFp8Interleaved>(run, plan, ctx);
}
}  // namespace sm90_sparse_mla

bool sparse_mla_sm90_can_implement(const SparseMlaParams& params, const DeviceContext& ctx, std::string* why) {
  const SparseMlaParams p = resolve_strides(params);
  std::string reason;
  try {
    check_sparse_mla_params(p);
    reason = sm90_unsupported(p, ctx);
  } catch (const ShapeError& e) {
    reason = e.what();
  }
  if (why) *why = reason;
  return reason.empty();
}

size_t sparse_mla_workspace_bytes(const DeviceContext& ctx, int64_t T, int num_heads, int topk, int64_t num_slots) {
  if ((num_heads != 64 && num_heads != 128) || T <= 0 || topk <= 0 || !device_is_hopper(ctx)) return 0;
  return workspace_bytes(T, num_heads / BLOCK_H, topk, num_slots, ctx.num_sms(), static_cast<int64_t>(ctx.l2_bytes()));
}

void sparse_mla_sm90(const SparseMlaParams& params, const DeviceContext& ctx) {
  const SparseMlaParams p = resolve_strides(params);
  check_sparse_mla_params(p);
  if (const std::string why = sm90_unsupported(p, ctx); !why.empty())
    throw ShapeError(fmt::format("sparse_mla_sm90: {}; call sparse_mla() to fall back to the simple kernel", why));
  if (p.T == 0) return;
  const int head_groups = p.num_heads / BLOCK_H;
  const LaunchPlan plan = plan_launch(p, head_groups, ctx);
  const SparseMlaParams run = reorder_if_planned(p, plan, ctx);
  // The compiled builds (instantiations/): H = 64 in three, H = 128 in two
  // (releasing buffer 1 first never paid at H = 128; see plan_launch), each
  // for dense views and for strided ones.
  if (strides_are_dense(run))
    launch_build<true>(run, plan, ctx, head_groups);
  else
    launch_build<false>(run, plan, ctx, head_groups);
}

}  // namespace dsa::cuda
