#pragma once
// The CPU paths of the standalone ops (dsa/ops.h), on views the op has
// validated and normalized (the optional size-1 dimensions dropped): each
// converts its inputs to the dense fp32 the reference takes, runs the
// reference and writes the outputs back in their dtypes and strides.
// Private to dsa_ops.
#include <cstdint>

#include "dsa/config.h"
#include "dsa/ops.h"

namespace dsa::ops::cpu {

// kv [S, d_qk], indices [T, topk].
void sparse_mla_fwd(const Tensor& q, const Tensor& kv, const Tensor& indices, double sm_scale, int64_t d_v, const Tensor& out,
                    const Tensor& max_logits, const Tensor& lse);
// k_scale [N].
void fp8_mqa_logits(const Tensor& q, const Tensor& k, const Tensor& k_scale, const Tensor& weights, const Tensor& k_start,
                    const Tensor& k_end, const Tensor& logits, bool clean_logits);
// q [B, next_n, HI, 128]; kv_cache contiguous, num_blocks x block_size tokens.
void fp8_paged_mqa_logits(const Tensor& q, const Tensor& kv_cache, int64_t num_blocks, int64_t block_size, const Tensor& weights,
                          const Tensor& context_lens, const Tensor& block_table, int64_t max_context_len, const Tensor& logits);
void topk(const Tensor& logits, int64_t k, const Tensor& lengths, const Tensor& out);
// latent_cache contiguous, num_slots rows in cfg.kv_cache_dtype's form.
void rope_quant_append(const LayerConfig& cfg, const Tensor& c_kv, const Tensor& k_pe, const Tensor& positions,
                       const Tensor& slot_mapping, const Tensor& latent_cache, int64_t num_slots);

// The visible end of row t = b * next_n + j of the paged logits: context_lens[b]
// - next_n + j + 1, clamped to [0, max_context_len] and cut at the first
// block-table entry outside [0, num_blocks) (the context ends there). The
// CUDA path computes the same on the device.
int64_t paged_visible_end(int64_t context_len, int64_t next_n, int64_t j, int64_t max_context_len, const int32_t* block_row,
                          int64_t max_blocks, int64_t block_size, int64_t num_blocks);

}  // namespace dsa::ops::cpu
