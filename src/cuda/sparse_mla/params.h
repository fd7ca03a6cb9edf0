#pragma once
// Sparse MLA attention over the paged bf16 latent cache (spec 3.6): the
// contract shared by the simple kernel, the sm90 warp-specialized one, their
// launchers and the tests.
//
// Every tensor is a strided view: element (i, j, k) of a [I, J, K] tensor
// lies at ptr[i * stride_i + j * stride_j + k] (the last dimension is always
// contiguous). A stride of 0 means the dense value given beside it; the
// launchers resolve those (resolve_strides) before checking and launching, so
// the kernels always see explicit strides. Strides count elements, not bytes.
// Views must not overlap within an output (out, lse, row_max), so every
// stride is at least the extent it steps over (stride_out_h >= d_v,
// stride_out_t >= num_heads * stride_out_h, ...); broadcast (stride 0) views
// are not supported.
#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

namespace dsa::cuda {

struct SparseMlaParams {
  const __nv_bfloat16* q = nullptr;    // [T, H, d_qk] bf16
  const __nv_bfloat16* kv = nullptr;   // [num_slots, d_qk] bf16, one latent row per global cache slot
  // Or (exactly one of kv and kv_fp8) the fp8 form of spec section 4, d_qk 576 and d_v 512 only:
  const uint8_t* kv_fp8 = nullptr;     // [num_slots, 656] bytes: 512 float8_e4m3 (c_kv), 4 fp32 scales (one per
                                       // 128 values), 64 bf16 (k_pe); value = bf16(float(e4m3) * scale)
  const int32_t* indices = nullptr;    // [T, topk] int32 global slots; -1 or >= num_slots is invalid (skipped)
  const int32_t* valid_len = nullptr;  // [T] int32, may be null: only indices[t, 0:valid_len[t]] are read
  __nv_bfloat16* out = nullptr;        // [T, H, d_v] bf16: softmax-weighted sum of the first d_v dims of the selected rows
  float* lse = nullptr;                // [T, H] fp32 natural-log sum-exp of the scaled scores; +inf with no valid index
  float* row_max = nullptr;            // [T, H] fp32 max scaled score; -inf with no valid index; may be null

  int64_t T = 0;
  int64_t num_slots = 0;
  int num_heads = 0;  // H: 64 or 128 for the sm90 kernel, any in [1, 65535] for the simple one
  int topk = 0;       // positive; a multiple of 64 for the sm90 kernel
  int d_qk = 576;
  int d_v = 512;
  float softmax_scale = 0.f;

  // Element strides; 0: dense (the value in the comment).
  int64_t stride_q_t = 0;          // between tokens of q (H * stride_q_h)
  int64_t stride_q_h = 0;          // between heads of q (d_qk)
  int64_t stride_kv_slot = 0;      // between cache rows of kv (d_qk); of kv_fp8 in bytes (656)
  int64_t stride_indices_t = 0;    // between tokens of indices (topk)
  int64_t stride_valid_len_t = 0;  // between tokens of valid_len (1)
  int64_t stride_out_t = 0;        // between tokens of out (H * stride_out_h)
  int64_t stride_out_h = 0;        // between heads of out (d_v)
  int64_t stride_lse_t = 0;        // between tokens of lse (H)
  int64_t stride_row_max_t = 0;    // between tokens of row_max (H)

  // Optional device memory of sparse_mla_workspace_bytes(ctx, T, num_heads,
  // topk, num_slots) bytes, contents irrelevant. With it the sm90 kernel
  // - splits the items of its last, partial round over the SMs that would
  //   idle, and a second kernel on the same stream combines the parts;
  // - with a cache larger than L2, topk <= 2048 and at least two rounds of
  //   items (T * num_heads / 64 >= 2 x SMs), first reorders each token's
  //   indices by slot (a pre-pass on the same stream), so that the CTAs
  //   gather from a narrow band of the cache at a time.
  // Either changes the order of the fp32 sums, so results differ from a run
  // without a workspace in the last bits; each way is deterministic.
  float* workspace = nullptr;
  size_t workspace_bytes = 0;  // bytes at workspace; null or not 16-byte aligned: neither; too small for one: not that one
};

// p with every 0 stride replaced by its dense value (the comments above);
// explicit strides are kept as given.
inline SparseMlaParams resolve_strides(SparseMlaParams p) {
  const int64_t H = p.num_heads;
  if (p.stride_q_h == 0) p.stride_q_h = p.d_qk;
  if (p.stride_q_t == 0) p.stride_q_t = H * p.stride_q_h;
  if (p.stride_kv_slot == 0) p.stride_kv_slot = p.kv_fp8 ? 656 : p.d_qk;
  if (p.stride_indices_t == 0) p.stride_indices_t = p.topk;
  if (p.stride_valid_len_t == 0) p.stride_valid_len_t = 1;
  if (p.stride_out_h == 0) p.stride_out_h = p.d_v;
  if (p.stride_out_t == 0) p.stride_out_t = H * p.stride_out_h;
  if (p.stride_lse_t == 0) p.stride_lse_t = H;
  if (p.stride_row_max_t == 0) p.stride_row_max_t = H;
  return p;
}

}  // namespace dsa::cuda
