#pragma once
// Sparse MLA attention over the paged bf16 latent cache (spec 3.6), the
// contract shared by the simple kernel and the sm90 warp-specialized one.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa::cuda {

struct SparseMlaParams {
  const __nv_bfloat16* q = nullptr;    // [T, H, d_qk] bf16; row t at q + t * stride_q_t, head h at + h * d_qk
  const __nv_bfloat16* kv = nullptr;   // [num_slots, d_qk] bf16, one latent row per global slot (row stride d_qk)
  const int32_t* indices = nullptr;    // [T, topk] int32 global slots; -1 or >= num_slots is invalid (skipped)
  const int32_t* valid_len = nullptr;  // [T] int32, may be null: only indices[t, 0:valid_len[t]] are read
  __nv_bfloat16* out = nullptr;        // [T, H, d_v] bf16 (first d_v dims of each selected row, softmax-weighted)
  float* lse = nullptr;                // [T, H] fp32 natural-log sum-exp of the scaled scores; +inf with no valid index
  float* row_max = nullptr;            // [T, H] fp32 max scaled score; -inf with no valid index; may be null
  int64_t T = 0;
  int64_t num_slots = 0;
  int64_t stride_q_t = 0;  // elements between tokens of q (H * d_qk when dense)
  int num_heads = 0;       // 64 or 128
  int topk = 0;            // multiple of 64
  int d_qk = 576;
  int d_v = 512;
  float softmax_scale = 0.f;
  // Optional device memory of sparse_mla_workspace_bytes(T, num_heads, topk,
  // num_slots) bytes, contents irrelevant. With it the sm90 kernel
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
  cudaStream_t stream = nullptr;
};

// Workspace the sm90 kernel can use for T tokens of num_heads heads, topk
// indices each, over a cache of num_slots rows, on the current device (0 when
// it would neither split nor reorder anything).
size_t sparse_mla_workspace_bytes(int64_t T, int num_heads, int topk, int64_t num_slots);

// Straightforward kernel: any T, H, topk; the correctness baseline.
void sparse_mla_simple(const SparseMlaParams& p);
// Hopper kernel (sm_90a wgmma); can_implement says whether it takes p.
bool sparse_mla_sm90_can_implement(const SparseMlaParams& p);
void sparse_mla_sm90(const SparseMlaParams& p);
// Picks the fastest kernel that can implement p. Throws ShapeError / CudaError.
void sparse_mla(const SparseMlaParams& p);

}  // namespace dsa::cuda
