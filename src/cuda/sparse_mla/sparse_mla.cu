// Sparse MLA attention (spec 3.6): the parameter checks every kernel shares,
// and the dispatch to the fastest kernel that takes a call.
#include <fmt/format.h>

#include <cmath>
#include <utility>

#include "cuda/sparse_mla/sparse_mla.h"
#include "dsa/error.h"

namespace dsa::cuda {

void check_sparse_mla_params(const SparseMlaParams& p) {
  if (!p.q || !p.indices || !p.out || !p.lse)
    throw ShapeError("sparse_mla: q, indices, out and lse must be device pointers (only valid_len and row_max may be null)");
  if (!p.kv == !p.kv_fp8)
    throw ShapeError(p.kv ? "sparse_mla: both kv and kv_fp8 are set; pass exactly one cache (kv: bf16 rows, kv_fp8: 656-byte fp8 rows)"
                          : "sparse_mla: kv and kv_fp8 are both null; pass exactly one cache (kv: bf16 rows, kv_fp8: 656-byte fp8 rows)");
  if (p.kv_fp8 && (p.d_qk != 576 || p.d_v != 512))
    throw ShapeError(fmt::format("sparse_mla: d_qk = {}, d_v = {} with kv_fp8; the fp8 row (512 e4m3 + 64 bf16 k_pe) takes 576 / 512",
                                 p.d_qk, p.d_v));
  if (p.T < 0) throw ShapeError(fmt::format("sparse_mla: T = {} is negative; pass the number of query tokens (>= 0)", p.T));
  if (p.num_slots < 0)
    throw ShapeError(fmt::format("sparse_mla: num_slots = {} is negative; pass the number of rows in the latent cache", p.num_slots));
  if (p.num_heads <= 0 || p.num_heads > 65535)
    throw ShapeError(fmt::format("sparse_mla: num_heads = {} is out of range [1, 65535]; V3.2 uses 128 (64 at TP=2)", p.num_heads));
  if (p.topk <= 0) throw ShapeError(fmt::format("sparse_mla: topk = {} must be positive; V3.2 uses 2048", p.topk));
  if (p.d_qk <= 0 || p.d_v <= 0 || p.d_v > p.d_qk || p.d_qk > 1024)
    throw ShapeError(fmt::format("sparse_mla: d_qk = {}, d_v = {} need 0 < d_v <= d_qk <= 1024; the latent layout is 576 / 512",
                                 p.d_qk, p.d_v));
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale))
    throw ShapeError(fmt::format("sparse_mla: softmax_scale = {} must be finite and positive (V3.2: 0.1352338)", p.softmax_scale));
  // Strides (resolved: 0 has become the dense value): each at least the
  // extent it steps over, so that no two elements of a view share memory.
  const int64_t H = p.num_heads;
  struct Rule {
    const char* name;
    int64_t value;
    int64_t min;
    const char* min_words;
  };
  const Rule rules[] = {
      {"stride_q_h", p.stride_q_h, p.d_qk, "d_qk"},
      {"stride_q_t", p.stride_q_t, H * p.stride_q_h, "num_heads * stride_q_h"},
      {"stride_kv_slot", p.stride_kv_slot, p.kv_fp8 ? 656 : p.d_qk, p.kv_fp8 ? "the fp8 row's 656 bytes" : "d_qk"},
      {"stride_indices_t", p.stride_indices_t, p.topk, "topk"},
      {"stride_valid_len_t", p.stride_valid_len_t, 1, "1"},
      {"stride_out_h", p.stride_out_h, p.d_v, "d_v"},
      {"stride_out_t", p.stride_out_t, H * p.stride_out_h, "num_heads * stride_out_h"},
      {"stride_lse_t", p.stride_lse_t, H, "num_heads"},
      {"stride_row_max_t", p.stride_row_max_t, H, "num_heads"},
  };
  for (const Rule& r : rules)
    if (r.value < r.min)
      throw ShapeError(fmt::format("sparse_mla: {} = {} is smaller than {} = {}, so rows of the view would overlap; pass 0 for "
                                   "the dense layout or a stride of at least {}",
                                   r.name, r.value, r.min_words, r.min, r.min_words));
}

void sparse_mla(const SparseMlaParams& params, const DeviceContext& ctx) {
  const SparseMlaParams p = resolve_strides(params);
  check_sparse_mla_params(p);
  if (p.T == 0) return;
  if (p.kv_fp8) {
    if (sparse_mla_sm90_fp8_can_implement(p, ctx))
      sparse_mla_sm90_fp8(p, ctx);
    else
      sparse_mla_simple(p, ctx);
    return;
  }
  if (sparse_mla_sm90_can_implement(p, ctx)) {
    sparse_mla_sm90(p, ctx);
  } else {
    sparse_mla_simple(p, ctx);
  }
}

}  // namespace dsa::cuda
