#include "ops/cpu_ops.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "dsa/dtypes.h"
#include "dsa/reference.h"
#include "dsa/reference_stages.h"
#include "ops/validate.h"

namespace dsa::ops::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class T>
const T* elem(const Tensor& t, int64_t off) {
  return static_cast<const T*>(t.data) + off;
}
template <class T>
T* elem_mut(const Tensor& t, int64_t off) {
  return static_cast<T*>(t.data) + off;
}

// The view's elements in dense row-major order, as stored (no conversion).
template <class T>
std::vector<T> gather(const Tensor& t) {
  std::vector<T> v(static_cast<size_t>(t.numel()));
  detail::for_each_element(t, [&](int64_t i, int64_t off) { v[i] = *elem<T>(t, off); });
  return v;
}

std::vector<float> gather_bf16(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  detail::for_each_element(t, [&](int64_t i, int64_t off) { v[i] = bf16_to_float(*elem<bf16_t>(t, off)); });
  return v;
}

template <class T>
void scatter(const Tensor& t, const std::vector<T>& v) {
  detail::for_each_element(t, [&](int64_t i, int64_t off) { *elem_mut<T>(t, off) = v[i]; });
}

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

}  // namespace

void sparse_mla_fwd(const Tensor& q, const Tensor& kv, const Tensor& indices, double sm_scale, int64_t d_v, const Tensor& out,
                    const Tensor& max_logits, const Tensor& lse) {
  const int64_t T = q.shape[0], H = q.shape[1], D = q.shape[2], S = kv.shape[0], topk = indices.shape[1];
  // Only the rows the indices select are converted (the cache may be far
  // larger than T * topk rows): the distinct valid slots, ascending, and the
  // indices remapped to rows of that table.
  const std::vector<int32_t> idx = gather<int32_t>(indices);
  std::vector<int32_t> slots;
  slots.reserve(idx.size());
  for (int32_t v : idx)
    if (v >= 0 && v < S) slots.push_back(v);
  std::sort(slots.begin(), slots.end());
  slots.erase(std::unique(slots.begin(), slots.end()), slots.end());
  std::vector<int32_t> local(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) {
    const int32_t v = idx[i];
    local[i] = v >= 0 && v < S ? static_cast<int32_t>(std::lower_bound(slots.begin(), slots.end(), v) - slots.begin()) : -1;
  }
  const int64_t rows = static_cast<int64_t>(slots.size());
  std::vector<float> table(static_cast<size_t>(rows * D));
  for (int64_t r = 0; r < rows; ++r) {
    const bf16_t* src = elem<bf16_t>(kv, slots[r] * kv.strides[0]);
    for (int64_t d = 0; d < D; ++d) table[r * D + d] = bf16_to_float(src[d]);
  }
  const std::vector<float> qf = gather_bf16(q);
  std::vector<float> o(static_cast<size_t>(T * H * d_v)), l(static_cast<size_t>(T * H)), m(static_cast<size_t>(T * H));
  ref::sparse_mla(qf.data(), table.data(), rows, local.data(), T, H, topk, D, d_v, sm_scale, o.data(), l.data(), m.data());
  detail::for_each_element(out, [&](int64_t i, int64_t off) { *elem_mut<bf16_t>(out, off) = float_to_bf16(o[i]); });
  scatter(lse, l);
  scatter(max_logits, m);
}

void fp8_mqa_logits(const Tensor& q, const Tensor& k, const Tensor& k_scale, const Tensor& weights, const Tensor& k_start,
                    const Tensor& k_end, const Tensor& logits, bool clean_logits) {
  const int64_t M = q.shape[0], HI = q.shape[1], N = k.shape[0];
  constexpr int64_t D = 128, B = 64;
  if (M == 0 || N == 0) return;
  // The keys as one request of a paged cache (64-token blocks, identity
  // block table), so that the reference's paged indexer_logits computes
  // them: the formula exists once.
  const int64_t nb = (N + B - 1) / B;
  std::vector<uint8_t> cache(static_cast<size_t>(nb * B * (D + 4)), 0);
  for (int64_t n = 0; n < N; ++n) {
    uint8_t* blk = cache.data() + (n / B) * B * (D + 4);
    std::memcpy(blk + (n % B) * D, elem<uint8_t>(k, n * k.strides[0]), D);
    const float s = *elem<float>(k_scale, n * k_scale.strides[0]);
    std::memcpy(blk + B * D + (n % B) * 4, &s, 4);
  }
  std::vector<int32_t> table(static_cast<size_t>(nb)), req(static_cast<size_t>(M), 0), vis(static_cast<size_t>(M));
  for (int64_t b = 0; b < nb; ++b) table[b] = static_cast<int32_t>(b);
  const std::vector<int32_t> ks = gather<int32_t>(k_start), ke = gather<int32_t>(k_end);
  for (int64_t m = 0; m < M; ++m) vis[m] = static_cast<int32_t>(clamp64(ke[m], 0, N));
  const std::vector<uint8_t> q8 = gather<uint8_t>(q);
  const std::vector<float> w = gather<float>(weights);
  std::vector<float> dense(static_cast<size_t>(M * N));
  ref::indexer_logits(q8.data(), w.data(), cache.data(), table.data(), req.data(), vis.data(), M, HI, nb, B, N, dense.data());
  if (clean_logits) {
    for (int64_t m = 0; m < M; ++m) std::fill_n(dense.data() + m * N, clamp64(ks[m], 0, N), kNegInf);
  }
  scatter(logits, dense);
}

int64_t paged_visible_end(int64_t context_len, int64_t next_n, int64_t j, int64_t max_context_len, const int32_t* block_row,
                          int64_t max_blocks, int64_t block_size, int64_t num_blocks) {
  int64_t vis = clamp64(context_len - next_n + j + 1, 0, max_context_len);
  vis = std::min(vis, max_blocks * block_size);
  for (int64_t b = 0; b * block_size < vis; ++b) {
    if (block_row[b] < 0 || block_row[b] >= num_blocks) return b * block_size;
  }
  return vis;
}

void fp8_paged_mqa_logits(const Tensor& q, const Tensor& kv_cache, int64_t num_blocks, int64_t block_size, const Tensor& weights,
                          const Tensor& context_lens, const Tensor& block_table, int64_t max_context_len, const Tensor& logits) {
  const int64_t B = q.shape[0], next_n = q.shape[1], HI = q.shape[2], T = B * next_n, L = max_context_len;
  const int64_t max_blocks = block_table.shape[1];
  if (T == 0 || L == 0) return;
  const std::vector<int32_t> table = gather<int32_t>(block_table), lens = gather<int32_t>(context_lens);
  std::vector<int32_t> req(static_cast<size_t>(T)), vis(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t b = t / next_n;
    req[t] = static_cast<int32_t>(b);
    vis[t] = static_cast<int32_t>(
        paged_visible_end(lens[b], next_n, t % next_n, L, table.data() + b * max_blocks, max_blocks, block_size, num_blocks));
  }
  const std::vector<uint8_t> q8 = gather<uint8_t>(q);
  const std::vector<float> w = gather<float>(weights);
  std::vector<float> dense(static_cast<size_t>(T * L));
  // max_blocks may be 0 (no blocks: every visible end is 0); the reference
  // then reads no table entry.
  ref::indexer_logits(q8.data(), w.data(), static_cast<const uint8_t*>(kv_cache.data), table.data(), req.data(), vis.data(), T,
                      HI, std::max<int64_t>(max_blocks, 1), block_size, L, dense.data());
  scatter(logits, dense);
}

void topk(const Tensor& logits, int64_t k, const Tensor& lengths, const Tensor& out) {
  const int64_t T = logits.shape[0], S = logits.shape[1];
  if (T == 0 || k == 0) return;
  const std::vector<float> l = gather<float>(logits);
  std::vector<int32_t> vis = gather<int32_t>(lengths);
  for (int32_t& v : vis) v = static_cast<int32_t>(clamp64(v, 0, S));
  std::vector<int32_t> o(static_cast<size_t>(T * k));
  ref::topk(l.data(), T, S, vis.data(), k, o.data());
  scatter(out, o);
}

void rope_quant_append(const LayerConfig& cfg, const Tensor& c_kv, const Tensor& k_pe, const Tensor& positions,
                       const Tensor& slot_mapping, const Tensor& latent_cache, int64_t num_slots) {
  const int64_t T = c_kv.shape[0], dkv = cfg.kv_lora_rank, rope = cfg.qk_rope_head_dim;
  if (T == 0) return;
  const std::vector<float> ckv = gather_bf16(c_kv);
  std::vector<float> kpe = gather_bf16(k_pe);
  const std::vector<int32_t> pos = gather<int32_t>(positions);
  const std::vector<int64_t> slot = gather<int64_t>(slot_mapping);
  ref::rope(cfg, pos.data(), T, nullptr, kpe.data());
  uint8_t* pool = static_cast<uint8_t*>(latent_cache.data);
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0 || slot[t] >= num_slots) continue;  // as the CUDA kernel: never write outside the cache
    ref::write_latent_row(cfg, pool, slot[t], ckv.data() + t * dkv, kpe.data() + t * rope);
  }
}

}  // namespace dsa::ops::cpu
