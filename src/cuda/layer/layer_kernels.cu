// Elementwise stages of the layer. Rounding points: docs/numerics.md.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <fmt/format.h>

#include <cmath>

#include "cuda/check.cuh"
#include "cuda/layer/layer_kernels.h"
#include "dsa/dtypes.h"
#include "dsa/error.h"

namespace dsa::cuda {

namespace {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFull, v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, m));
  return v;
}

// Same arithmetic as dsa::ue8m0_scale on the host: one IEEE fp32 division,
// then the exponent, so both sides pick the same power of two.
__device__ __forceinline__ float ue8m0(float amax) {
  const float x = fmaxf(amax, 1e-4f) / kFp8E4M3Max;
  int e;
  const float m = frexpf(x, &e);
  return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

__device__ __forceinline__ uint8_t to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Fixed-order block reduction (deterministic); blockDim.x a multiple of 32, <= 1024.
__device__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (l == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    float r = l < static_cast<int>(blockDim.x / 32) ? sh[l] : 0.0f;
    r = warp_sum(r);
    if (l == 0) sh[32] = r;
  }
  __syncthreads();
  return sh[32];
}

// ---- norms ------------------------------------------------------------------
constexpr int kNormThreads = 256;

// Eight consecutive inputs as fp32: bf16 as stored, or fp32 rounded through
// bf16 (the fused projection keeps fp32; numerics.md stores bf16 here).
__device__ __forceinline__ void load8(const __nv_bfloat16* b, const float* f, int64_t off, float v[8]) {
  if (f) {
    const float4 a = *reinterpret_cast<const float4*>(f + off), c = *reinterpret_cast<const float4*>(f + off + 4);
    const float in[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __bfloat162float(__float2bfloat16_rn(in[j]));
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(b + off);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 x = __bfloat1622float2(h[j]);
      v[2 * j] = x.x, v[2 * j + 1] = x.y;
    }
  }
}

__global__ void __launch_bounds__(kNormThreads) rms_norms_kernel(NormsParams p) {
  __shared__ float sh[33];
  const int64_t t = blockIdx.x;
  const bool is_q = blockIdx.y == 0;
  const int D = is_q ? p.dq : p.dkv;
  const int64_t row = t * (is_q ? p.ld_qa : p.ld_kv);
  const __nv_bfloat16* xb = is_q ? p.qa : p.kv;
  const float* xf = is_q ? p.qa_f32 : p.kv_f32;
  const __nv_bfloat16* w = is_q ? p.wq : p.wkv;
  __nv_bfloat16* y = is_q ? p.q_lat + t * p.dq : p.c_kv + t * p.dkv;
  const int chunks = D / 8;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < chunks; c += kNormThreads) {
    float v[8];
    load8(xb, xf, row + 8 * c, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
  }
  ss = block_sum(ss, sh);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(D) + p.eps);
  for (int c = threadIdx.x; c < chunks; c += kNormThreads) {
    float v[8];
    load8(xb, xf, row + 8 * c, v);
    const uint4 wu = reinterpret_cast<const uint4*>(w)[c];
    const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wu);
    uint4 o;
    __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 g = __bfloat1622float2(wh[j]);
      oh[j] = __floats2bfloat162_rn(v[2 * j] * inv * g.x, v[2 * j + 1] * inv * g.y);
    }
    reinterpret_cast<uint4*>(y)[c] = o;
  }
}

// ---- MLA RoPE -----------------------------------------------------------------
__global__ void mla_rope_kernel(MlaRopeParams p) {
  const int64_t t = blockIdx.x;
  const int i = threadIdx.x;  // pair index
  if (i >= p.rope_dim / 2) return;
  // Angle from the fp32 product float(p) * f_i' (docs/numerics.md).
  const float ang = static_cast<float>(p.positions[t]) * p.inv_freq[i];
  float s, c;
  sincosf(ang, &s, &c);
  for (int h = threadIdx.y; h < p.num_heads; h += blockDim.y) {
    const __nv_bfloat162 v =
        *reinterpret_cast<const __nv_bfloat162*>(p.q + t * p.ld_q + h * p.q_head_stride + p.q_rope_col + 2 * i);
    const float2 f = __bfloat1622float2(v);
    *reinterpret_cast<__nv_bfloat162*>(p.q_out + t * p.ld_q_out + h * p.q_out_head_stride + p.q_out_col + 2 * i) =
        __floats2bfloat162_rn(f.x * c - f.y * s, f.x * s + f.y * c);
  }
  if (threadIdx.y == 0) {
    float2 f;
    if (p.kv_f32) {
      const float2 a = *reinterpret_cast<const float2*>(p.kv_f32 + t * p.ld_kv + p.k_rope_col + 2 * i);
      f = make_float2(__bfloat162float(__float2bfloat16_rn(a.x)), __bfloat162float(__float2bfloat16_rn(a.y)));
    } else {
      f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p.kv + t * p.ld_kv + p.k_rope_col + 2 * i));
    }
    *reinterpret_cast<__nv_bfloat162*>(p.k_out + t * p.rope_dim + 2 * i) =
        __floats2bfloat162_rn(f.x * c - f.y * s, f.x * s + f.y * c);
  }
}

// ---- latent cache append ------------------------------------------------------
__global__ void cache_append_bf16_kernel(CacheAppendParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0 || slot >= p.num_slots) return;  // validated on the host; never write out of the pool
  const int row_bytes = 2 * (p.dkv + p.rope);
  uint4* dst = reinterpret_cast<uint4*>(p.latent_pool + slot * row_bytes);
  const int nk = p.dkv / 8, nr = p.rope / 8;
  for (int c = threadIdx.x; c < nk + nr; c += blockDim.x) {
    dst[c] = c < nk ? reinterpret_cast<const uint4*>(p.c_kv + t * p.dkv)[c]
                    : reinterpret_cast<const uint4*>(p.k_pe + t * p.rope)[c - nk];
  }
}

// One warp per 128-value group of c_kv; the rope part stays bf16.
__global__ void cache_append_fp8_kernel(CacheAppendParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0 || slot >= p.num_slots) return;
  const int groups = p.dkv / 128;
  uint8_t* dst = p.latent_pool + slot * (p.dkv + 4 * groups + 2 * p.rope);  // 656 bytes at V3.2 sizes
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int g = warp; g < groups; g += blockDim.x / 32) {
    const uint2 u = *reinterpret_cast<const uint2*>(p.c_kv + t * p.dkv + g * 128 + 4 * lane);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    const float amax = warp_max(fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(b.x), fabsf(b.y))));
    const float s = ue8m0(amax);
    const uint32_t q = to_e4m3(a.x / s) | (to_e4m3(a.y / s) << 8) | (to_e4m3(b.x / s) << 16) |
                       (static_cast<uint32_t>(to_e4m3(b.y / s)) << 24);
    *reinterpret_cast<uint32_t*>(dst + g * 128 + 4 * lane) = q;
    if (lane == 0) reinterpret_cast<float*>(dst + p.dkv)[g] = s;
  }
  uint32_t* rope_dst = reinterpret_cast<uint32_t*>(dst + p.dkv + 4 * groups);
  const uint32_t* rope_src = reinterpret_cast<const uint32_t*>(p.k_pe + t * p.rope);
  for (int c = threadIdx.x; c < p.rope / 2; c += blockDim.x) rope_dst[c] = rope_src[c];
}

// ---- indexer RoPE + Hadamard + fp8 --------------------------------------------
constexpr int kQuantWarps = 8;

struct FoldConsts {
  float inv_sqrt_hi, inv_sqrt_di;
};

__global__ void __launch_bounds__(kQuantWarps * 32) indexer_quant_kernel(IndexerQuantParams p, FoldConsts fc) {
  // One token per block: its RoPE cos/sin are computed once and shared by the
  // block's heads (sincosf of large angles is the kernel's most costly step).
  __shared__ float cs_cos[64], cs_sin[64];
  const int64_t t = blockIdx.x;
  const int half = p.rope_dim / 2;
  if (threadIdx.x < half) {
    sincosf(static_cast<float>(p.positions[t]) * p.inv_freq[threadIdx.x], &cs_sin[threadIdx.x], &cs_cos[threadIdx.x]);
  }
  __syncthreads();
  const int warp = blockIdx.y * kQuantWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp > p.num_heads) return;
  const bool is_k = warp == p.num_heads;
  const int HI = p.num_heads;
  float v[4];
  if (!is_k) {
    const uint2 u = *reinterpret_cast<const uint2*>(p.qi + (t * HI + warp) * 128 + 4 * lane);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  } else {
    const float4 f = *reinterpret_cast<const float4*>(p.kx + t * p.ld_kx + 4 * lane);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    // LayerNorm in fp32 (two passes: mean, then centred variance).
    const float mean = warp_sum(v[0] + v[1] + v[2] + v[3]) / 128.0f;
    float d2 = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) d2 += (v[j] - mean) * (v[j] - mean);
    const float var = warp_sum(d2) / 128.0f;
    const float inv = 1.0f / sqrtf(var + p.eps);
    const uint2 wu = *reinterpret_cast<const uint2*>(p.k_norm_w + 4 * lane);
    const uint2 bu = *reinterpret_cast<const uint2*>(p.k_norm_b + 4 * lane);
    const __nv_bfloat16* w = reinterpret_cast<const __nv_bfloat16*>(&wu);
    const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&bu);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = (v[j] - mean) * inv * __bfloat162float(w[j]) + __bfloat162float(b[j]);
  }

  // Half-split RoPE on dims [0, rope_dim): pairs (i, i + half).
  {
    const int lanes_half = half / 4;
    const bool lower = lane < lanes_half, upper = lane >= lanes_half && lane < 2 * lanes_half;
    const int src = lower ? lane + lanes_half : (upper ? lane - lanes_half : lane);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float other = __shfl_sync(kFull, v[j], src);
      if (lower || upper) {
        const int i = 4 * (lower ? lane : lane - lanes_half) + j;
        const float c = cs_cos[i], s = cs_sin[i];
        v[j] = lower ? v[j] * c - other * s : v[j] * c + other * s;
      }
    }
  }

  if (p.hadamard) {
    // Sylvester-ordered fast Walsh-Hadamard transform: element e = 4 * lane + j;
    // bits 0-1 of e live in j, bits 2-6 in the lane.
    float a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
    v[0] = a0 + a2, v[1] = a1 + a3, v[2] = a0 - a2, v[3] = a1 - a3;
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) {
      const bool hi = lane & m;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float o = __shfl_xor_sync(kFull, v[j], m);
        v[j] = hi ? o - v[j] : v[j] + o;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] *= fc.inv_sqrt_di;
  }

  const float amax = warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3]))));
  const float s = ue8m0(amax);
  // s is a power of two, so scaling by its exact reciprocal is the division's
  // result bit for bit, without the cost of four IEEE divisions.
  const float r = 1.0f / s;
  const uint32_t q = to_e4m3(v[0] * r) | (to_e4m3(v[1] * r) << 8) | (to_e4m3(v[2] * r) << 16) |
                     (static_cast<uint32_t>(to_e4m3(v[3] * r)) << 24);
  if (!is_k) {
    const int64_t row = t * HI + warp;
    *reinterpret_cast<uint32_t*>(p.q_fp8 + row * 128 + 4 * lane) = q;
    if (p.dbg_q) *reinterpret_cast<float4*>(p.dbg_q + row * 128 + 4 * lane) = make_float4(v[0], v[1], v[2], v[3]);
    if (lane == 0) {
      p.q_scale[row] = s;
      p.weights[row] = p.wraw[t * p.ld_wraw + warp] * fc.inv_sqrt_hi * s * fc.inv_sqrt_di;
    }
  } else {
    *reinterpret_cast<uint32_t*>(p.k_pool + p.k_offset[t] + 4 * lane) = q;
    if (lane == 0) *reinterpret_cast<float*>(p.k_pool + p.k_scale_offset[t]) = s;
    if (p.dbg_k) *reinterpret_cast<float4*>(p.dbg_k + t * 128 + 4 * lane) = make_float4(v[0], v[1], v[2], v[3]);
    if (p.dbg_k_fp8) *reinterpret_cast<uint32_t*>(p.dbg_k_fp8 + t * 128 + 4 * lane) = q;
    if (p.dbg_k_scale && lane == 0) p.dbg_k_scale[t] = s;
  }
}

// ---- local -> global indices --------------------------------------------------
__global__ void local_to_global_kernel(LocalToGlobalParams p) {
  const int64_t n = p.T * p.k;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / p.k;
    const int32_t loc = p.local[e];
    int32_t g = -1;
    if (loc >= 0 && loc < p.visible_end[t]) {
      const int32_t blk = p.block_table[p.token_request[t] * p.max_blocks + loc / p.tokens_per_block];
      if (blk >= 0) g = blk * p.tokens_per_block + loc % p.tokens_per_block;
    }
    p.global[e] = g;
  }
}

// One warp per selected row: lane l dequantizes 16 of the 512 c_kv values
// (group l / 8 of 128, one scale each); lanes 0-7 copy the 128 bytes of k_pe.
__global__ void gather_fp8_kernel(GatherFp8Params p) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (e >= p.T * p.k) return;
  const int32_t g = p.indices[e];
  if (g < 0 || g >= p.num_slots) {
    if (lane == 0) p.out_indices[e] = -1;
    return;
  }
  if (lane == 0) p.out_indices[e] = static_cast<int32_t>(e);
  const int groups = p.dkv / 128, row_bytes = p.dkv + 4 * groups + 2 * p.rope, width = p.dkv + p.rope;
  const uint8_t* src = p.latent_pool + int64_t(g) * row_bytes;
  __nv_bfloat16* dst = p.out + e * width;
  for (int c = lane; c < p.dkv / 16; c += 32) {
    const float scale = reinterpret_cast<const float*>(src + p.dkv)[c / 8];
    const uint4 u = *reinterpret_cast<const uint4*>(src + 16 * c);
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&u);
    uint4 o[2];
    __nv_bfloat16* ob = reinterpret_cast<__nv_bfloat16*>(o);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const __half h = __half(__nv_cvt_fp8_to_halfraw(b[j], __NV_E4M3));
      ob[j] = __float2bfloat16_rn(__half2float(h) * scale);
    }
    reinterpret_cast<uint4*>(dst + 16 * c)[0] = o[0];
    reinterpret_cast<uint4*>(dst + 16 * c)[1] = o[1];
  }
  for (int c = lane; c < p.rope / 8; c += 32)
    reinterpret_cast<uint4*>(dst + p.dkv)[c] = reinterpret_cast<const uint4*>(src + p.dkv + 4 * groups)[c];
}

__global__ void fill_u32_kernel(uint32_t* ptr, uint32_t value, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) ptr[i] = value;
}

void require(bool ok, const char* what) {
  if (!ok) throw ShapeError(what);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

void rms_norms(const DeviceContext& ctx, const NormsParams& p) {
  if (p.T == 0) return;
  require(p.dq % 8 == 0 && p.dkv % 8 == 0 && p.ld_qa % 8 == 0 && p.ld_kv % 8 == 0,
          "rms_norms: widths and row strides must be multiples of 8 values (16-byte rows); pad the projection output");
  require((p.qa_f32 ? aligned16(p.qa_f32) : aligned16(p.qa)) && (p.kv_f32 ? aligned16(p.kv_f32) : aligned16(p.kv)) &&
              aligned16(p.q_lat) && aligned16(p.c_kv) && aligned16(p.wq) && aligned16(p.wkv),
          "rms_norms: every tensor must be 16-byte aligned");
  rms_norms_kernel<<<dim3(static_cast<unsigned>(p.T), 2), kNormThreads, 0, ctx.stream>>>(p);
  DSA_CHECK_LAUNCH("rms_norms");
}

void mla_rope(const DeviceContext& ctx, const MlaRopeParams& p) {
  if (p.T == 0) return;
  require(p.rope_dim % 2 == 0 && p.rope_dim <= 64, "mla_rope: rope_dim must be even and at most 64 (one thread per pair)");
  mla_rope_kernel<<<static_cast<unsigned>(p.T), dim3(p.rope_dim / 2, 8), 0, ctx.stream>>>(p);
  DSA_CHECK_LAUNCH("mla_rope");
}

void cache_append(const DeviceContext& ctx, const CacheAppendParams& p) {
  if (p.T == 0) return;
  require(p.dkv % 128 == 0 && p.rope % 8 == 0,
          "cache_append: kv_lora_rank must be a multiple of 128 (fp8 scale groups) and rope a multiple of 8");
  if (p.fp8) {
    cache_append_fp8_kernel<<<static_cast<unsigned>(p.T), 128, 0, ctx.stream>>>(p);
  } else {
    cache_append_bf16_kernel<<<static_cast<unsigned>(p.T), 128, 0, ctx.stream>>>(p);
  }
  DSA_CHECK_LAUNCH("cache_append");
}

void indexer_quant(const DeviceContext& ctx, const IndexerQuantParams& p) {
  if (p.T == 0) return;
  require(p.rope_dim % 8 == 0 && p.rope_dim <= 128,
          "indexer_quant: the indexer rope width must be a multiple of 8 and at most the head width 128");
  require(p.ld_kx % 4 == 0 && (reinterpret_cast<uintptr_t>(p.kx) & 15) == 0,
          "indexer_quant: the key projection rows must be 16-byte aligned (row stride a multiple of 4 floats)");
  const FoldConsts fc{static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.num_heads))),
                      static_cast<float>(1.0 / std::sqrt(128.0))};
  const unsigned gy = static_cast<unsigned>((p.num_heads + 1 + kQuantWarps - 1) / kQuantWarps);
  indexer_quant_kernel<<<dim3(static_cast<unsigned>(p.T), gy), kQuantWarps * 32, 0, ctx.stream>>>(p, fc);
  DSA_CHECK_LAUNCH("indexer_quant");
}

void local_to_global(const DeviceContext& ctx, const LocalToGlobalParams& p) {
  const int64_t n = p.T * p.k;
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
  local_to_global_kernel<<<blocks, 256, 0, ctx.stream>>>(p);
  DSA_CHECK_LAUNCH("local_to_global");
}

void gather_latent_fp8(const DeviceContext& ctx, const GatherFp8Params& p) {
  const int64_t n = p.T * p.k;
  if (n == 0) return;
  require(p.dkv % 128 == 0 && p.rope % 8 == 0, "gather_latent_fp8: kv_lora_rank must be a multiple of 128 and rope of 8");
  gather_fp8_kernel<<<static_cast<unsigned>((n + 3) / 4), 128, 0, ctx.stream>>>(p);
  DSA_CHECK_LAUNCH("gather_latent_fp8");
}

void fill_u32(const DeviceContext& ctx, void* ptr, uint32_t value, size_t n_words) {
  if (n_words == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>((n_words + 255) / 256, 8192));
  fill_u32_kernel<<<blocks, 256, 0, ctx.stream>>>(static_cast<uint32_t*>(ptr), value, n_words);
  DSA_CHECK_LAUNCH("fill_u32");
}

}  // namespace dsa::cuda
