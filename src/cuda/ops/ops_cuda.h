#pragma once
// The CUDA paths of the standalone ops (dsa/ops.h), called by dsa_ops after
// it has validated every tensor and normalized the views (optional size-1
// dimensions dropped, strides of size-1 dimensions made dense). No CUDA
// headers here: dsa_ops is plain C++. Each function makes the tensors'
// device current for the call (and restores the caller's), runs on
// `stream`, allocates its temporaries stream-ordered there and checks every
// CUDA call (dsa::CudaError / OutOfMemoryError).
#include <cstdint>

#include "dsa/config.h"
#include "dsa/ops.h"

namespace dsa::ops::cuda_impl {

// kv [S, d_qk], indices [T, topk]; T, H >= 1.
void sparse_mla_fwd(int device, const Tensor& q, const Tensor& kv, const Tensor& indices, double sm_scale, int64_t d_v,
                    const Tensor& out, const Tensor& max_logits, const Tensor& lse, CUstream_st* stream);
// k_scale [N]; M, N >= 1; HI = 64.
void fp8_mqa_logits(int device, const Tensor& q, const Tensor& k, const Tensor& k_scale, const Tensor& weights,
                    const Tensor& k_start, const Tensor& k_end, const Tensor& logits, bool clean_logits, CUstream_st* stream);
// q [B, next_n, 64, 128]; kv_cache contiguous, 16-byte aligned, num_blocks x 64 tokens; T, max_context_len >= 1.
void fp8_paged_mqa_logits(int device, const Tensor& q, const Tensor& kv_cache, int64_t num_blocks, const Tensor& weights,
                          const Tensor& context_lens, const Tensor& block_table, int64_t max_context_len, const Tensor& logits,
                          CUstream_st* stream);
// T, k >= 1.
void topk(int device, const Tensor& logits, int64_t k, const Tensor& lengths, const Tensor& out, CUstream_st* stream);
// latent_cache contiguous and aligned for the form's stores; T >= 1.
void rope_quant_append(int device, const LayerConfig& cfg, const Tensor& c_kv, const Tensor& k_pe, const Tensor& positions,
                       const Tensor& slot_mapping, const Tensor& latent_cache, int64_t num_slots, CUstream_st* stream);

}  // namespace dsa::ops::cuda_impl
