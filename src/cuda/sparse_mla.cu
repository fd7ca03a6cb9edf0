// Sparse MLA attention (spec 3.6): parameter checks, the simple kernel that
// every shape can use, and the dispatch to the Hopper kernel.
#include <cuda_bf16.h>
#include <fmt/format.h>

#include <cmath>

#include "check.cuh"
#include "sparse_mla.h"

namespace dsa::cuda {
namespace {

constexpr int kSimpleThreads = 256;
constexpr int kSimpleChunk = 64;          // indices scored per pass
constexpr int kSimpleMaxDvPerThread = 4;  // d_v <= 1024

void check_params(const SparseMlaParams& p) {
  if (!p.q || !p.kv || !p.indices || !p.out || !p.lse)
    throw ShapeError("sparse_mla: q, kv, indices, out and lse must be device pointers (only valid_len and row_max may be null)");
  if (p.T < 0) throw ShapeError(fmt::format("sparse_mla: T = {} is negative; pass the number of query tokens (>= 0)", p.T));
  if (p.num_slots < 0)
    throw ShapeError(fmt::format("sparse_mla: num_slots = {} is negative; pass the number of rows in the latent cache", p.num_slots));
  if (p.num_heads <= 0 || p.num_heads > 65535)
    throw ShapeError(fmt::format("sparse_mla: num_heads = {} is out of range [1, 65535]; V3.2 uses 128 (64 at TP=2)", p.num_heads));
  if (p.topk <= 0)
    throw ShapeError(fmt::format("sparse_mla: topk = {} must be positive; V3.2 uses 2048", p.topk));
  if (p.d_qk <= 0 || p.d_v <= 0 || p.d_v > p.d_qk || p.d_qk > 1024 || p.d_v > kSimpleThreads * kSimpleMaxDvPerThread)
    throw ShapeError(fmt::format("sparse_mla: d_qk = {}, d_v = {} need 0 < d_v <= d_qk <= 1024; the latent layout is 576 / 512",
                                 p.d_qk, p.d_v));
  if (p.stride_q_t < static_cast<int64_t>(p.num_heads) * p.d_qk)
    throw ShapeError(fmt::format("sparse_mla: stride_q_t = {} is smaller than num_heads * d_qk = {}; pass H * d_qk for dense q",
                                 p.stride_q_t, static_cast<int64_t>(p.num_heads) * p.d_qk));
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale))
    throw ShapeError(fmt::format("sparse_mla: softmax_scale = {} must be finite and positive (V3.2: 0.1352338)", p.softmax_scale));
}

// One CTA per (token, head): correctness first, any shape. Scores of 64
// indices at a time (one warp per index, fp32 dot), then an online softmax
// whose running max and sum every thread keeps identically, and each thread
// accumulates its own value columns in a fixed order (deterministic).
__global__ void __launch_bounds__(kSimpleThreads) sparse_mla_simple_kernel(SparseMlaParams p) {
  extern __shared__ float smem[];
  float* s_q = smem;                       // [d_qk]
  float* s_score = s_q + p.d_qk;           // [kSimpleChunk] scaled score, -inf when invalid
  int* s_idx = reinterpret_cast<int*>(s_score + kSimpleChunk);  // [kSimpleChunk]

  const int64_t t = blockIdx.x;  // T on grid.x: it can exceed 65535
  const int h = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const __nv_bfloat16* q = p.q + t * p.stride_q_t + static_cast<int64_t>(h) * p.d_qk;
  for (int d = tid; d < p.d_qk; d += kSimpleThreads) s_q[d] = __bfloat162float(q[d]);

  int n = p.topk;
  if (p.valid_len) n = min(max(p.valid_len[t], 0), p.topk);
  const int32_t* idx_row = p.indices + t * p.topk;

  float m = -INFINITY, l = 0.f;
  float acc[kSimpleMaxDvPerThread];
#pragma unroll
  for (int k = 0; k < kSimpleMaxDvPerThread; ++k) acc[k] = 0.f;
  __syncthreads();

  for (int c0 = 0; c0 < n; c0 += kSimpleChunk) {
    for (int j = warp; j < kSimpleChunk; j += kSimpleThreads / 32) {
      const int pos = c0 + j;
      const int idx = pos < n ? idx_row[pos] : -1;
      const bool valid = idx >= 0 && idx < p.num_slots;
      float dot = 0.f;
      if (valid) {
        const __nv_bfloat16* row = p.kv + static_cast<int64_t>(idx) * p.d_qk;
        for (int d = lane; d < p.d_qk; d += 32) dot += s_q[d] * __bfloat162float(row[d]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      }
      if (lane == 0) {
        s_score[j] = valid ? dot * p.softmax_scale : -INFINITY;
        s_idx[j] = valid ? idx : -1;
      }
    }
    __syncthreads();
    float cmax = -INFINITY;
    for (int j = 0; j < kSimpleChunk; ++j) cmax = fmaxf(cmax, s_score[j]);
    const float m_new = fmaxf(m, cmax);
    if (m_new != -INFINITY) {  // else nothing valid yet: skip (avoids -inf - -inf)
      const float alpha = expf(m - m_new);  // 0 on the first valid chunk
      l *= alpha;
#pragma unroll
      for (int k = 0; k < kSimpleMaxDvPerThread; ++k) acc[k] *= alpha;
      for (int j = 0; j < kSimpleChunk; ++j) {
        const int idx = s_idx[j];
        if (idx < 0) continue;
        const float pj = expf(s_score[j] - m_new);
        l += pj;
        const __nv_bfloat16* row = p.kv + static_cast<int64_t>(idx) * p.d_qk;
#pragma unroll
        for (int k = 0; k < kSimpleMaxDvPerThread; ++k) {
          const int d = tid + k * kSimpleThreads;
          if (d < p.d_v) acc[k] += pj * __bfloat162float(row[d]);
        }
      }
      m = m_new;
    }
    __syncthreads();  // s_score / s_idx are rewritten by the next chunk
  }

  const bool any = l > 0.f;
  const float inv = any ? 1.f / l : 0.f;
  __nv_bfloat16* out = p.out + (t * p.num_heads + h) * p.d_v;
#pragma unroll
  for (int k = 0; k < kSimpleMaxDvPerThread; ++k) {
    const int d = tid + k * kSimpleThreads;
    if (d < p.d_v) out[d] = __float2bfloat16(acc[k] * inv);
  }
  if (tid == 0) {
    p.lse[t * p.num_heads + h] = any ? m + logf(l) : INFINITY;
    if (p.row_max) p.row_max[t * p.num_heads + h] = any ? m : -INFINITY;
  }
}

}  // namespace

void sparse_mla_simple(const SparseMlaParams& p) {
  check_params(p);
  if (p.T == 0) return;
  if (p.T > 0x7fffffff) throw ShapeError(fmt::format("sparse_mla: T = {} exceeds the grid limit 2^31 - 1; split the batch", p.T));
  const size_t smem = sizeof(float) * (p.d_qk + kSimpleChunk) + sizeof(int) * kSimpleChunk;
  const dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>(p.num_heads));
  sparse_mla_simple_kernel<<<grid, kSimpleThreads, smem, p.stream>>>(p);
  DSA_CHECK_LAUNCH("sparse_mla_simple_kernel");
}

void sparse_mla(const SparseMlaParams& p) {
  check_params(p);
  if (p.T == 0) return;
  if (sparse_mla_sm90_can_implement(p)) {
    sparse_mla_sm90(p);
  } else {
    sparse_mla_simple(p);
  }
}

}  // namespace dsa::cuda
