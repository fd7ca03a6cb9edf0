// The CUDA paths of the standalone ops (dsa/ops.h): each fills the params of
// the kernel the layer runs for that stage (so that results are the layer's
// bit for bit) from the caller's strided views, with small kernels for what
// the views need first: dense copies where a kernel takes no strides, the
// indexer's paged layout and metadata, the -inf prefix of clean logits.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "cuda/check.cuh"
#include "cuda/indexer/params.h"
#include "cuda/layer/layer_kernels.h"
#include "cuda/ops/ops_cuda.h"
#include "cuda/sparse_mla/sparse_mla.h"
#include "cuda/topk/params.h"
#include "dsa/cuda.h"
#include "dsa/error.h"

namespace dsa::ops::cuda_impl {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kIdxBlock = 64;         // tokens per indexer cache block (the kernel's)
constexpr int64_t kIdxBlockBytes = 64 * 132;

unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 8192)); }

// Makes `device` current for the op and gives the caller's device back.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DSA_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) {
      DSA_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// A stream-ordered temporary: allocated and freed on the op's stream, so
// that it lives exactly as long as the work queued there needs it.
class StreamBuf {
 public:
  explicit StreamBuf(cudaStream_t s) : s_(s) {}
  ~StreamBuf() {
    if (p_) (void)cudaFreeAsync(p_, s_);
  }
  StreamBuf(const StreamBuf&) = delete;
  StreamBuf& operator=(const StreamBuf&) = delete;
  void* alloc(size_t bytes) {
    DSA_CUDA_CHECK(cudaMallocAsync(&p_, std::max<size_t>(bytes, 16), s_));
    return p_;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  cudaStream_t s_;
};

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

bool dense(const Tensor& t) {
  int64_t expect = 1;
  for (int64_t d = t.ndim() - 1; d >= 0; --d) {
    if (t.shape[d] != 1 && t.strides[d] != expect) return false;
    expect *= t.shape[d];
  }
  return true;
}

// ---- strided copies ------------------------------------------------------------------

// Right-aligned: a view of fewer dimensions has leading size-1 dimensions,
// so that the kernel's loop unrolls with constant indices (no local memory).
struct CopyDims {
  int64_t shape[4];
  int64_t src[4];
  int64_t dst[4];
};

template <class T>
__global__ void copy_strided_kernel(const T* __restrict__ src, T* __restrict__ dst, CopyDims c, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = i, so = 0, dof = 0;
#pragma unroll
    for (int d = 3; d >= 0; --d) {
      const int64_t x = r % c.shape[d];
      r /= c.shape[d];
      so += x * c.src[d];
      dof += x * c.dst[d];
    }
    dst[dof] = src[so];
  }
}

// Elements of `shape` from src (strides src_st) to dst (strides dst_st).
void copy_strided(const void* src, const std::vector<int64_t>& src_st, void* dst, const std::vector<int64_t>& dst_st,
                  const std::vector<int64_t>& shape, int64_t item, cudaStream_t s) {
  const int nd = static_cast<int>(shape.size());
  if (nd > 4) throw ShapeError(fmt::format("internal: a strided copy of {} dimensions (at most 4 are supported)", nd));
  CopyDims c{};
  int64_t n = 1;
  for (int d = 0; d < 4; ++d) {
    const int sd = d - (4 - nd);  // the view's dimension, or negative for a leading size-1 one
    c.shape[d] = sd >= 0 ? shape[sd] : 1;
    c.src[d] = sd >= 0 ? src_st[sd] : 0;
    c.dst[d] = sd >= 0 ? dst_st[sd] : 0;
    n *= c.shape[d];
  }
  if (n == 0) return;
  switch (item) {
    case 1: copy_strided_kernel<uint8_t><<<grid_for(n), kThreads, 0, s>>>(static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), c, n); break;
    case 2: copy_strided_kernel<uint16_t><<<grid_for(n), kThreads, 0, s>>>(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), c, n); break;
    case 4: copy_strided_kernel<uint32_t><<<grid_for(n), kThreads, 0, s>>>(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), c, n); break;
    default: copy_strided_kernel<uint64_t><<<grid_for(n), kThreads, 0, s>>>(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), c, n); break;
  }
  DSA_CHECK_LAUNCH("copy_strided_kernel");
}

std::vector<int64_t> dense_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> st(shape.size(), 1);
  for (int64_t d = static_cast<int64_t>(shape.size()) - 2; d >= 0; --d) st[d] = st[d + 1] * std::max<int64_t>(shape[d + 1], 1);
  return st;
}

// t's data when it is dense and aligned to `align` bytes, else a dense copy in `tmp`.
const void* dense_input(const Tensor& t, uintptr_t align, StreamBuf& tmp, cudaStream_t s) {
  if (dense(t) && aligned(t.data, align)) return t.data;
  const int64_t item = itemsize(t.dtype);
  void* p = tmp.alloc(static_cast<size_t>(t.numel() * item));
  copy_strided(t.data, t.strides, p, dense_strides(t.shape), t.shape, item, s);
  return p;
}

// A [rows, cols] matrix the kernels write with row stride cols: the view
// itself when its rows are packed, else a temporary copied back by write_back.
float* dense_output_f32(const Tensor& t, StreamBuf& tmp) {
  if (t.shape[0] == 1 || t.strides[0] == t.shape[1]) return static_cast<float*>(t.data);
  return static_cast<float*>(tmp.alloc(static_cast<size_t>(t.numel()) * 4));
}
void write_back(const Tensor& t, const void* dense_data, cudaStream_t s) {
  if (dense_data == t.data) return;
  const size_t item = static_cast<size_t>(itemsize(t.dtype));
  DSA_CUDA_CHECK(cudaMemcpy2DAsync(t.data, static_cast<size_t>(t.strides[0]) * item, dense_data, static_cast<size_t>(t.shape[1]) * item,
                                   static_cast<size_t>(t.shape[1]) * item, static_cast<size_t>(t.shape[0]), cudaMemcpyDeviceToDevice, s));
}

// ---- indexer metadata ---------------------------------------------------------------

// The keys k [N, 128] (row stride k_st bytes) and k_scale [N] (stride ks_st)
// as the indexer's paged cache: per 64-token block 64 x 128 fp8, then 64 fp32 scales.
__global__ void pack_keys_kernel(const uint8_t* __restrict__ k, int64_t k_st, const float* __restrict__ ks, int64_t ks_st, int64_t N,
                                 uint8_t* __restrict__ cache) {
  const int64_t words = N * 32;  // 4-byte pieces of the keys
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words + N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < words) {
      const int64_t n = i / 32, w = i % 32;
      const uint8_t* src = k + n * k_st + 4 * w;
      uint8_t* dst = cache + (n / kIdxBlock) * kIdxBlockBytes + (n % kIdxBlock) * 128 + 4 * w;
      // Byte loads: the caller's row stride need not keep 4-byte alignment.
      dst[0] = src[0], dst[1] = src[1], dst[2] = src[2], dst[3] = src[3];
    } else {
      const int64_t n = i - words;
      reinterpret_cast<float*>(cache + (n / kIdxBlock) * kIdxBlockBytes + kIdxBlock * 128)[n % kIdxBlock] = ks[n * ks_st];
    }
  }
}

// One request over all N keys: token_request 0, visible_end = clamp(k_end, 0, N),
// block_table the identity.
__global__ void mqa_meta_kernel(const int32_t* __restrict__ k_end, int64_t ke_st, int64_t M, int64_t N, int64_t num_blocks,
                                int32_t* __restrict__ token_request, int32_t* __restrict__ visible_end, int32_t* __restrict__ table) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < M + num_blocks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < M) {
      token_request[i] = 0;
      visible_end[i] = static_cast<int32_t>(min(max(static_cast<int64_t>(k_end[i * ke_st]), int64_t{0}), N));
    } else {
      table[i - M] = static_cast<int32_t>(i - M);
    }
  }
}

// clean_logits: -inf at [0, clamp(k_start[m], 0, N)) of each row.
__global__ void neg_inf_prefix_kernel(const int32_t* __restrict__ k_start, int64_t ks_st, int64_t N, float* __restrict__ logits) {
  const int64_t m = blockIdx.x;
  const int64_t end = min(max(static_cast<int64_t>(k_start[m * ks_st]), int64_t{0}), N);
  for (int64_t n = threadIdx.x; n < end; n += blockDim.x) logits[m * N + n] = -__int_as_float(0x7f800000);
}

// Row t = b * next_n + j: request b, visible end context_lens[b] - next_n + j
// + 1 clamped to [0, max_context_len] and to the table's blocks, cut at the
// first block-table entry outside [0, num_blocks) (as the CPU path).
__global__ void paged_meta_kernel(const int32_t* __restrict__ context_lens, int64_t cl_st, const int32_t* __restrict__ table,
                                  int64_t table_st, int64_t max_blocks, int64_t num_blocks, int64_t T, int64_t next_n,
                                  int64_t max_context_len, int32_t* __restrict__ token_request, int32_t* __restrict__ visible_end) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < T; t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / next_n, j = t % next_n;
    int64_t vis = static_cast<int64_t>(context_lens[b * cl_st]) - next_n + j + 1;
    vis = min(max(vis, int64_t{0}), max_context_len);
    vis = min(vis, max_blocks * kIdxBlock);
    for (int64_t blk = 0; blk * kIdxBlock < vis; ++blk) {
      const int32_t e = table[b * table_st + blk];
      if (e < 0 || e >= num_blocks) {
        vis = blk * kIdxBlock;
        break;
      }
    }
    token_request[t] = static_cast<int32_t>(b);
    visible_end[t] = static_cast<int32_t>(vis);
  }
}

__global__ void clamp_lengths_kernel(const int32_t* __restrict__ lengths, int64_t st, int64_t T, int64_t S, int32_t* __restrict__ out) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < T; t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[t] = static_cast<int32_t>(min(max(static_cast<int64_t>(lengths[t * st]), int64_t{0}), S));
}

int clamp_int(int64_t v) { return static_cast<int>(std::min<int64_t>(v, INT_MAX)); }

}  // namespace

// ---- sparse MLA ------------------------------------------------------------------------

void sparse_mla_fwd(int device, const Tensor& q, const Tensor& kv, const Tensor& indices, double sm_scale, int64_t d_v,
                    const Tensor& out, const Tensor& max_logits, const Tensor& lse, CUstream_st* stream) {
  DeviceGuard guard(device);
  const cuda::DeviceContext ctx = cuda::device_context(stream);
  const int64_t T = q.shape[0], H = q.shape[1], S = kv.shape[0], topk = indices.shape[1];
  cuda::SparseMlaParams p;
  p.q = static_cast<const __nv_bfloat16*>(q.data);
  // An empty cache has no rows to point at; with num_slots = 0 every index
  // is invalid and kv is never read, so any valid bf16 pointer does.
  p.kv = static_cast<const __nv_bfloat16*>(S > 0 ? kv.data : q.data);
  p.indices = static_cast<const int32_t*>(indices.data);
  p.out = static_cast<__nv_bfloat16*>(out.data);
  p.lse = static_cast<float*>(lse.data);
  p.row_max = static_cast<float*>(max_logits.data);
  p.T = T, p.num_slots = S, p.num_heads = static_cast<int>(H), p.topk = static_cast<int>(topk);
  p.d_qk = static_cast<int>(q.shape[2]), p.d_v = static_cast<int>(d_v);
  p.softmax_scale = static_cast<float>(sm_scale);
  p.stride_q_t = q.strides[0], p.stride_q_h = q.strides[1], p.stride_kv_slot = kv.strides[0];
  p.stride_indices_t = indices.strides[0];
  p.stride_out_t = out.strides[0], p.stride_out_h = out.strides[1];
  p.stride_lse_t = lse.strides[0], p.stride_row_max_t = max_logits.strides[0];
  // The layer's workspace for the same shape (CudaLayer::prepare), so that
  // the kernel makes the same split and reorder choices.
  const size_t ws = cuda::sparse_mla_workspace_bytes(ctx, T, p.num_heads, p.topk, S);
  StreamBuf w(stream);
  if (ws > 0) {
    p.workspace = static_cast<float*>(w.alloc(ws));
    p.workspace_bytes = ws;
  }
  cuda::sparse_mla(p, ctx);
}

// ---- indexer logits ---------------------------------------------------------------------

void fp8_mqa_logits(int device, const Tensor& q, const Tensor& k, const Tensor& k_scale, const Tensor& weights,
                    const Tensor& k_start, const Tensor& k_end, const Tensor& logits, bool clean_logits, CUstream_st* stream) {
  DeviceGuard guard(device);
  const cuda::DeviceContext ctx = cuda::device_context(stream);
  const int64_t M = q.shape[0], N = k.shape[0], nb = (N + kIdxBlock - 1) / kIdxBlock;
  StreamBuf q_tmp(stream), w_tmp(stream), cache(stream), meta(stream), out_tmp(stream);
  // The kernel copies q in 16-byte pieces and reads dense rows of both.
  const void* qd = dense_input(q, 16, q_tmp, stream);
  const void* wd = dense_input(weights, 4, w_tmp, stream);
  cache.alloc(static_cast<size_t>(nb * kIdxBlockBytes));
  pack_keys_kernel<<<grid_for(N * 33), kThreads, 0, stream>>>(static_cast<const uint8_t*>(k.data), k.strides[0],
                                                              static_cast<const float*>(k_scale.data), k_scale.strides[0], N,
                                                              cache.as<uint8_t>());
  DSA_CHECK_LAUNCH("pack_keys_kernel");
  int32_t* m = static_cast<int32_t*>(meta.alloc(static_cast<size_t>(2 * M + nb) * 4));
  mqa_meta_kernel<<<grid_for(M + nb), kThreads, 0, stream>>>(static_cast<const int32_t*>(k_end.data), k_end.strides[0], M, N, nb, m,
                                                             m + M, m + 2 * M);
  DSA_CHECK_LAUNCH("mqa_meta_kernel");
  float* out = dense_output_f32(logits, out_tmp);
  cuda::IndexerLogitsParams ip;
  ip.q_fp8 = static_cast<const uint8_t*>(qd), ip.weights = static_cast<const float*>(wd), ip.k_cache = cache.as<uint8_t>();
  ip.block_table = m + 2 * M, ip.token_request = m, ip.visible_end = m + M, ip.logits = out;
  ip.T = M, ip.logits_stride = N, ip.max_blocks_per_request = nb, ip.num_heads = static_cast<int>(q.shape[1]);
  ip.tokens_per_block = static_cast<int>(kIdxBlock);
  // All M rows belong to one "request" and share its keys.
  ip.max_tokens_per_request = clamp_int(M);
  cuda::indexer_logits(ctx, ip);
  if (clean_logits) {
    if (M > 0x7fffffffLL) throw ShapeError(fmt::format("fp8_mqa_logits: M = {} rows exceed one launch's grid; split the batch", M));
    neg_inf_prefix_kernel<<<static_cast<unsigned>(M), kThreads, 0, stream>>>(static_cast<const int32_t*>(k_start.data),
                                                                             k_start.strides[0], N, out);
    DSA_CHECK_LAUNCH("neg_inf_prefix_kernel");
  }
  write_back(logits, out, stream);
}

void fp8_paged_mqa_logits(int device, const Tensor& q, const Tensor& kv_cache, int64_t num_blocks, const Tensor& weights,
                          const Tensor& context_lens, const Tensor& block_table, int64_t max_context_len, const Tensor& logits,
                          CUstream_st* stream) {
  DeviceGuard guard(device);
  const cuda::DeviceContext ctx = cuda::device_context(stream);
  const int64_t B = q.shape[0], next_n = q.shape[1], T = B * next_n, max_blocks = block_table.shape[1];
  StreamBuf q_tmp(stream), w_tmp(stream), t_tmp(stream), meta(stream), out_tmp(stream);
  const void* qd = dense_input(q, 16, q_tmp, stream);
  const void* wd = dense_input(weights, 4, w_tmp, stream);
  // The kernel reads the table with a row stride of max_blocks_per_request
  // (at least 1): a table without columns becomes one unread entry.
  const int32_t* table = static_cast<const int32_t*>(block_table.data);
  int64_t table_st = block_table.strides[0];
  if (max_blocks == 0) {
    table = static_cast<const int32_t*>(t_tmp.alloc(16));
    DSA_CUDA_CHECK(cudaMemsetAsync(const_cast<int32_t*>(table), 0, 16, stream));
    table_st = 1;
  } else if (B > 1 && table_st != max_blocks) {
    table = static_cast<const int32_t*>(dense_input(block_table, 4, t_tmp, stream));
    table_st = max_blocks;
  }
  int32_t* m = static_cast<int32_t*>(meta.alloc(static_cast<size_t>(2 * T) * 4));
  paged_meta_kernel<<<grid_for(T), kThreads, 0, stream>>>(static_cast<const int32_t*>(context_lens.data), context_lens.strides[0],
                                                          table, table_st, max_blocks, num_blocks, T, next_n, max_context_len, m,
                                                          m + T);
  DSA_CHECK_LAUNCH("paged_meta_kernel");
  float* out = dense_output_f32(logits, out_tmp);
  cuda::IndexerLogitsParams ip;
  ip.q_fp8 = static_cast<const uint8_t*>(qd), ip.weights = static_cast<const float*>(wd);
  ip.k_cache = static_cast<const uint8_t*>(kv_cache.data);
  StreamBuf empty_cache(stream);
  if (num_blocks == 0) {
    // An empty cache (a null pointer from the framework): every row's context
    // ends at its first table entry, so nothing is read, but the kernel wants
    // an aligned block to point at.
    ip.k_cache = static_cast<const uint8_t*>(empty_cache.alloc(kIdxBlockBytes));
  }
  ip.block_table = table, ip.token_request = m, ip.visible_end = m + T, ip.logits = out;
  ip.T = T, ip.logits_stride = max_context_len, ip.max_blocks_per_request = std::max<int64_t>(max_blocks, 1);
  ip.num_heads = static_cast<int>(q.shape[2]), ip.tokens_per_block = static_cast<int>(kIdxBlock);
  ip.max_tokens_per_request = clamp_int(next_n);
  cuda::indexer_logits(ctx, ip);
  write_back(logits, out, stream);
}

// ---- top-k --------------------------------------------------------------------------------

void topk(int device, const Tensor& logits, int64_t k, const Tensor& lengths, const Tensor& out, CUstream_st* stream) {
  DeviceGuard guard(device);
  const cuda::DeviceContext ctx = cuda::device_context(stream);
  const int64_t T = logits.shape[0], S = logits.shape[1];
  if (S == 0) {
    // No candidates anywhere: every entry is padding (-1 = all bits set).
    DSA_CUDA_CHECK(cudaMemset2DAsync(out.data, static_cast<size_t>(out.strides[0]) * 4, 0xff, static_cast<size_t>(k) * 4,
                                     static_cast<size_t>(T), stream));
    return;
  }
  StreamBuf vis_tmp(stream), out_tmp(stream), ws_tmp(stream);
  int32_t* vis = static_cast<int32_t*>(vis_tmp.alloc(static_cast<size_t>(T) * 4));
  // The kernel clamps to its row stride, which may exceed S for padded rows.
  clamp_lengths_kernel<<<grid_for(T), kThreads, 0, stream>>>(static_cast<const int32_t*>(lengths.data), lengths.strides[0], T, S, vis);
  DSA_CHECK_LAUNCH("clamp_lengths_kernel");
  int32_t* o = T == 1 || out.strides[0] == k ? static_cast<int32_t*>(out.data)
                                              : static_cast<int32_t*>(out_tmp.alloc(static_cast<size_t>(T * k) * 4));
  cuda::TopkParams p;
  p.logits = static_cast<const float*>(logits.data), p.visible_end = vis, p.out = o;
  p.T = T, p.logits_stride = logits.strides[0], p.k = static_cast<int>(k);
  const size_t ws = cuda::topk_workspace_bytes(T, p.logits_stride, p.k);
  if (ws > 0) p.workspace = ws_tmp.alloc(ws);
  cuda::topk(ctx, p);
  write_back(out, o, stream);
}

// ---- RoPE + cache append ---------------------------------------------------------------

void rope_quant_append(int device, const LayerConfig& cfg, const Tensor& c_kv, const Tensor& k_pe, const Tensor& positions,
                       const Tensor& slot_mapping, const Tensor& latent_cache, int64_t num_slots, CUstream_st* stream) {
  DeviceGuard guard(device);
  const cuda::DeviceContext ctx = cuda::device_context(stream);
  const int64_t T = c_kv.shape[0];
  const int rope = static_cast<int>(cfg.qk_rope_head_dim), dkv = static_cast<int>(cfg.kv_lora_rank);
  StreamBuf c_tmp(stream), pos_tmp(stream), slot_tmp(stream), freq(stream), kout(stream);
  // cache_append reads c_kv rows in 16-byte pieces; mla_rope reads k_pe in bf16 pairs (row stride even, 4-byte aligned).
  const void* cd = dense_input(c_kv, 16, c_tmp, stream);
  const void* pd = dense_input(positions, 4, pos_tmp, stream);
  const void* sd = dense_input(slot_mapping, 8, slot_tmp, stream);
  StreamBuf k_tmp(stream);
  const void* kd = k_pe.data;
  int64_t ld_k = k_pe.strides[0];
  if (ld_k % 2 != 0 || !aligned(kd, 4)) {
    kd = dense_input(k_pe, 16, k_tmp, stream);
    ld_k = rope;
  }
  // f_i' cast to fp32, as CudaLayer uploads them.
  const std::vector<double> f64 = rope_inv_freq(cfg);
  const std::vector<float> f32(f64.begin(), f64.end());
  freq.alloc(f32.size() * 4);
  DSA_CUDA_CHECK(cudaMemcpyAsync(freq.as<float>(), f32.data(), f32.size() * 4, cudaMemcpyHostToDevice, stream));
  kout.alloc(static_cast<size_t>(T * rope) * 2);
  cuda::MlaRopeParams rp;
  rp.num_heads = 0;  // k_pe only: no query heads
  rp.kv = static_cast<const __nv_bfloat16*>(kd), rp.ld_kv = ld_k, rp.k_rope_col = 0;
  rp.k_out = kout.as<__nv_bfloat16>();
  rp.positions = static_cast<const int32_t*>(pd), rp.inv_freq = freq.as<float>();
  rp.T = T, rp.rope_dim = rope;
  cuda::mla_rope(ctx, rp);
  cuda::CacheAppendParams ap;
  ap.c_kv = static_cast<const __nv_bfloat16*>(cd), ap.k_pe = kout.as<__nv_bfloat16>();
  ap.slot_mapping = static_cast<const int64_t*>(sd), ap.latent_pool = static_cast<uint8_t*>(latent_cache.data);
  ap.T = T, ap.num_slots = num_slots, ap.dkv = dkv, ap.rope = rope, ap.fp8 = cfg.kv_cache_dtype == LatentCacheDType::FP8;
  cuda::cache_append(ctx, ap);
}

}  // namespace dsa::ops::cuda_impl
