// Sparse MLA's simple kernel: every shape and stride the checks admit; the
// correctness baseline of the sm90 kernel and the fallback of sparse_mla().
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <fmt/format.h>

#include <cmath>

#include "cuda/check.cuh"
#include "cuda/sparse_mla/sparse_mla.h"
#include "dsa/error.h"

namespace dsa::cuda {
namespace {

constexpr int kSimpleThreads = 256;
constexpr int kSimpleChunk = 64;          // indices scored per pass
constexpr int kSimpleMaxDvPerThread = 4;  // d_v <= 1024

// Element d of cache row `slot` as float: the bf16 row, or the fp8 row
// dequantized as the layer's gather does (bf16_rn(float(e4m3) * scale),
// k_pe as stored), so that the simple kernel over kv_fp8 equals the simple
// kernel over the gathered bf16 rows bit for bit.
__device__ __forceinline__ float kv_value(const SparseMlaParams& p, int64_t slot, int d) {
  if (!p.kv_fp8) return __bfloat162float(p.kv[slot * p.stride_kv_slot + d]);
  const uint8_t* row = p.kv_fp8 + slot * p.stride_kv_slot;
  if (d >= 512) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row + 528)[d - 512]);
  const float scale = reinterpret_cast<const float*>(row + 512)[d / 128];
  const __half h = __half(__nv_cvt_fp8_to_halfraw(row[d], __NV_E4M3));
  return __bfloat162float(__float2bfloat16_rn(__fmul_rn(__half2float(h), scale)));
}

// p's strides are resolved (explicit).
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
  const __nv_bfloat16* q = p.q + t * p.stride_q_t + h * p.stride_q_h;
  for (int d = tid; d < p.d_qk; d += kSimpleThreads) s_q[d] = __bfloat162float(q[d]);

  int n = p.topk;
  if (p.valid_len) n = min(max(p.valid_len[t * p.stride_valid_len_t], 0), p.topk);
  const int32_t* idx_row = p.indices + t * p.stride_indices_t;

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
        for (int d = lane; d < p.d_qk; d += 32) dot += s_q[d] * kv_value(p, idx, d);
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
    // fmaxf skips NaN: m_new is -inf while every valid score so far is NaN
    // or -inf. Such a chunk is not skipped (a NaN score must reach l and the
    // output: NaN propagates, as in dsa::ref::sparse_mla); its exponentials
    // take base 0 instead (avoids -inf - -inf), which leaves an empty prefix
    // as it was (alpha = exp(-inf) = 0, l and acc stay 0).
    const float m_new = fmaxf(m, cmax);
    const float mu = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = expf(m - mu);  // 0 on the first valid chunk
    l *= alpha;
#pragma unroll
    for (int k = 0; k < kSimpleMaxDvPerThread; ++k) acc[k] *= alpha;
    for (int j = 0; j < kSimpleChunk; ++j) {
      const int idx = s_idx[j];
      if (idx < 0) continue;
      const float pj = expf(s_score[j] - mu);
      l += pj;
#pragma unroll
      for (int k = 0; k < kSimpleMaxDvPerThread; ++k) {
        const int d = tid + k * kSimpleThreads;
        if (d < p.d_v) acc[k] += pj * kv_value(p, idx, d);
      }
    }
    m = m_new;
    __syncthreads();  // s_score / s_idx are rewritten by the next chunk
  }

  // l is 0 exactly when nothing valid contributed (no valid index); NaN
  // (a NaN score) is not "nothing": lse and the output stay NaN.
  const bool any = l != 0.f;
  const float inv = any ? 1.f / l : 0.f;
  __nv_bfloat16* out = p.out + t * p.stride_out_t + h * p.stride_out_h;
#pragma unroll
  for (int k = 0; k < kSimpleMaxDvPerThread; ++k) {
    const int d = tid + k * kSimpleThreads;
    if (d < p.d_v) out[d] = __float2bfloat16(acc[k] * inv);
  }
  if (tid == 0) {
    p.lse[t * p.stride_lse_t + h] = any ? m + logf(l) : INFINITY;
    if (p.row_max) p.row_max[t * p.stride_row_max_t + h] = any ? m : -INFINITY;
  }
}

}  // namespace

void sparse_mla_simple(const SparseMlaParams& params, const DeviceContext& ctx) {
  const SparseMlaParams p = resolve_strides(params);
  check_sparse_mla_params(p);
  if (p.d_v > kSimpleThreads * kSimpleMaxDvPerThread)
    throw ShapeError(fmt::format("sparse_mla_simple: d_v = {} exceeds {}", p.d_v, kSimpleThreads * kSimpleMaxDvPerThread));
  if (p.T == 0) return;
  if (p.T > 0x7fffffff) throw ShapeError(fmt::format("sparse_mla: T = {} exceeds the grid limit 2^31 - 1; split the batch", p.T));
  const size_t smem = sizeof(float) * (p.d_qk + kSimpleChunk) + sizeof(int) * kSimpleChunk;
  const dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>(p.num_heads));
  sparse_mla_simple_kernel<<<grid, kSimpleThreads, smem, ctx.stream>>>(p);
  DSA_CHECK_LAUNCH("sparse_mla_simple_kernel");
}

}  // namespace dsa::cuda
