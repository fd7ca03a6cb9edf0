// The layer's orchestration on the GPU: buffers, stage launches in spec
// order, per-stage events and NVTX ranges, trace download.
#include <cuda_bf16.h>
#include <fmt/format.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "cuda/check.cuh"
#include "cuda/gemm/gemm.h"
#include "cuda/indexer/params.h"
#include "cuda/layer/layer_kernels.h"
#include "cuda/sparse_mla/sparse_mla.h"
#include "cuda/topk/params.h"
#include "dsa/cuda.h"
#include "dsa/cuda_layer.h"
#include "dsa/error.h"
#include "dsa/memory.h"

namespace dsa::cuda {

namespace {

// A GPU buffer that only grows; contents are not kept across growth.
struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  void ensure(size_t n) {
    n = std::max<size_t>(n, 16);
    if (n <= bytes) return;
    if (p) DSA_CUDA_CHECK(cudaFree(p));
    p = nullptr;
    bytes = 0;
    const cudaError_t e = cudaMalloc(&p, n);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      p = nullptr;
      const std::string msg = fmt::format("cudaMalloc of {} bytes for a layer buffer failed ({}); the step is too large for this GPU's "
                                  "memory: use fewer new tokens per request (num_new), fewer requests or a shorter context",
                                  n, cudaGetErrorString(e));
      if (e == cudaErrorMemoryAllocation) throw OutOfMemoryError(msg);
      throw CudaError(msg);
    }
    bytes = n;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

template <class T>
void upload(DevBuf& b, const std::vector<T>& v) {
  b.ensure(v.size() * sizeof(T));
  if (!v.empty()) DSA_CUDA_CHECK(cudaMemcpy(b.p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
}

template <class T>
std::vector<T> download(const void* src, size_t n, cudaStream_t s) {
  std::vector<T> v(n);
  if (n) DSA_CUDA_CHECK(cudaMemcpyAsync(v.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost, s));
  DSA_CUDA_CHECK(cudaStreamSynchronize(s));
  return v;
}

std::vector<float> widen(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = ::dsa::bf16_to_float(v[i]);
  return f;
}

// Columns [c0, c0 + n) of every row of a [rows, ld] bf16 matrix, as fp32.
std::vector<float> bf16_cols(const void* src, int64_t rows, int64_t ld, int64_t c0, int64_t n, cudaStream_t s) {
  const std::vector<uint16_t> all = download<uint16_t>(src, static_cast<size_t>(rows * ld), s);
  std::vector<float> out(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) out[r * n + c] = ::dsa::bf16_to_float(all[r * ld + c0 + c]);
  return out;
}

}  // namespace

struct CudaLayer::Impl {
  LayerConfig cfg;
  // The device's properties, queried once at construction; the stream is set
  // by each call (enqueue, run_stage, forward) before it launches anything.
  DeviceContext ctx;
  Gemm gemm;
  // The indexer branch's GEMMs run on their own wrapper in every mode: its
  // cuBLASLt workspace must not be shared with a GEMM running concurrently
  // on the main stream, and the same wrapper in both modes keeps the chosen
  // algorithm, so overlap on or off gives the same bits.
  Gemm gemm_side;
  // Overlap (set_stream_overlap): the indexer branch (indexer_q_proj ..
  // topk) runs on `side`, forked after the norms and joined before
  // sparse_mla, beside q_b_proj, rope, cache_append and q_absorb.
  bool overlap = true;
  cudaStream_t side = nullptr;
  cudaEvent_t ev_fork = nullptr, ev_join = nullptr;
  // Weights (bf16).
  DevBuf w_x;  // [q_lora + latent + DI + HI, hidden]: q_a_proj, kv_a_proj, indexer wk, weights_proj stacked
  bool fuse_x = true, fused_prepared = true;
  DevBuf xproj;  // [T, NX] fp32 output of x_proj
  DevBuf w_q_a, w_q_a_norm, w_q_b, w_kv_a, w_kv_a_norm, w_kv_b, w_o, w_idx_q, w_idx_k, w_idx_kn_w, w_idx_kn_b, w_idx_w;
  DevBuf inv_freq;
  // Step metadata.
  BatchMetadata md;
  DeviceCacheView cache;
  int64_t T = 0, logits_stride = 0;
  int max_new_per_request = 0;  // most new tokens of any request of the step (the indexer's kernel hint)
  DevBuf positions, token_request, visible_end, block_table, slot_mapping, k_off, k_scale_off, valid_len;
  // Activations.
  DevBuf hidden, qa, q_lat, kv, c_kv, k_pe, q, q_cat, qi, kx, wraw, qi8, q_scale, weights, logits, topk_local, topk_global,
      topk_ws, mla_ws, attn_out, lse, row_max, v, out, kv_gather, idx_gather;
  DevBuf dbg_q, dbg_k, dbg_k8, dbg_ks;
  bool trace_mode = false;
  bool poison = false;
  const void* x = nullptr;  // hidden of the last enqueue
  // Timing.
  std::array<cudaEvent_t, 2 * static_cast<size_t>(Stage::kCount)> ev{};
  cudaEvent_t ev_layer[2]{};
  std::vector<Stage> timed;
  bool have_times = false;

  Impl(const LayerConfig& c, const DeviceContext& context) : cfg(c), ctx(context) {
    for (auto& e : ev) DSA_CUDA_CHECK(cudaEventCreate(&e));
    DSA_CUDA_CHECK(cudaEventCreate(&ev_layer[0]));
    DSA_CUDA_CHECK(cudaEventCreate(&ev_layer[1]));
    DSA_CUDA_CHECK(cudaEventCreateWithFlags(&ev_fork, cudaEventDisableTiming));
    DSA_CUDA_CHECK(cudaEventCreateWithFlags(&ev_join, cudaEventDisableTiming));
    // The indexer branch is the longer one (logits and top-k over the whole
    // context): the higher priority lets its blocks go first when both wait.
    int least = 0, greatest = 0;
    DSA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    DSA_CUDA_CHECK(cudaStreamCreateWithPriority(&side, cudaStreamNonBlocking, greatest));
  }
  ~Impl() {
    for (auto& e : ev) cudaEventDestroy(e);
    cudaEventDestroy(ev_layer[0]);
    cudaEventDestroy(ev_layer[1]);
    cudaEventDestroy(ev_fork);
    cudaEventDestroy(ev_join);
    if (side) cudaStreamDestroy(side);
  }

  int64_t H() const { return cfg.num_heads; }
  int64_t HI() const { return cfg.index_n_heads; }
  int64_t qk() const { return cfg.qk_head_dim(); }
  int64_t lat() const { return cfg.latent_dim(); }
  int64_t NX() const { return cfg.q_lora_rank + cfg.latent_dim() + cfg.index_head_dim + cfg.index_n_heads; }

  void launch(Stage s);
};

namespace {
// The indexer's stages: they read x (or x_proj) and q_lat only, and nothing
// of the attention branch reads what they write before sparse_mla.
bool on_indexer_branch(Stage s) {
  switch (s) {
    case Stage::indexer_q_proj:
    case Stage::indexer_k_proj:
    case Stage::indexer_weights_proj:
    case Stage::indexer_quant:
    case Stage::indexer_logits:
    case Stage::topk:
      return true;
    default:
      return false;
  }
}
}  // namespace

// Launches stage s on ctx.stream.
void CudaLayer::Impl::launch(Stage s) {
  const LayerConfig& c = cfg;
  const int64_t hid = c.hidden_size, ql = c.q_lora_rank, kvl = c.kv_lora_rank, rope = c.qk_rope_head_dim;
  const int64_t nope = c.qk_nope_head_dim, vd = c.v_head_dim, DI = c.index_head_dim;
  Gemm& gemm_of_stage = on_indexer_branch(s) ? gemm_side : gemm;
  auto linear = [&](const void* xin, int64_t ldx, const DevBuf& w, void* y, int64_t N, int64_t K, GemmOut o) {
    GemmParams g;
    g.x = xin, g.ldx = ldx, g.w = w.p, g.ldw = K, g.w_is_nk = true, g.y = y, g.ldy = N, g.out = o;
    g.M = T, g.N = N, g.K = K;
    gemm_of_stage.run(ctx, g);
  };
  const bool fx = fused_prepared;
  const float* xp = xproj.as<float>();
  switch (s) {
    case Stage::x_proj:
      linear(x, hid, w_x, xproj.p, NX(), hid, GemmOut::FP32);
      break;
    case Stage::q_a_proj:
      linear(x, hid, w_q_a, qa.p, ql, hid, GemmOut::BF16);
      break;
    case Stage::kv_a_proj:
      linear(x, hid, w_kv_a, kv.p, lat(), hid, GemmOut::BF16);
      break;
    case Stage::norms: {
      NormsParams p;
      p.qa = qa.as<__nv_bfloat16>(), p.wq = w_q_a_norm.as<__nv_bfloat16>(), p.q_lat = q_lat.as<__nv_bfloat16>();
      p.kv = kv.as<__nv_bfloat16>(), p.wkv = w_kv_a_norm.as<__nv_bfloat16>(), p.c_kv = c_kv.as<__nv_bfloat16>();
      p.T = T, p.ld_qa = ql, p.ld_kv = lat(), p.dq = static_cast<int>(ql), p.dkv = static_cast<int>(kvl);
      if (fx) p.qa_f32 = xp, p.kv_f32 = xp + ql, p.ld_qa = NX(), p.ld_kv = NX();
      p.eps = static_cast<float>(c.rms_norm_eps);
      rms_norms(ctx, p);
      break;
    }
    case Stage::q_b_proj:
      linear(q_lat.p, ql, w_q_b, q.p, H() * qk(), ql, GemmOut::BF16);
      break;
    case Stage::rope: {
      MlaRopeParams p;
      p.q = q.as<__nv_bfloat16>(), p.ld_q = H() * qk(), p.q_head_stride = qk(), p.q_rope_col = nope;
      p.q_out = q_cat.as<__nv_bfloat16>(), p.ld_q_out = H() * lat(), p.q_out_head_stride = lat(), p.q_out_col = kvl;
      p.kv = kv.as<__nv_bfloat16>(), p.ld_kv = lat(), p.k_rope_col = kvl, p.k_out = k_pe.as<__nv_bfloat16>();
      if (fx) p.kv_f32 = xp + ql, p.ld_kv = NX();
      p.positions = positions.as<int32_t>(), p.inv_freq = inv_freq.as<float>();
      p.T = T, p.num_heads = static_cast<int>(H()), p.rope_dim = static_cast<int>(rope);
      mla_rope(ctx, p);
      break;
    }
    case Stage::cache_append: {
      CacheAppendParams p;
      p.c_kv = c_kv.as<__nv_bfloat16>(), p.k_pe = k_pe.as<__nv_bfloat16>(), p.slot_mapping = slot_mapping.as<int64_t>();
      p.latent_pool = cache.latent, p.T = T, p.num_slots = cache.num_slots(), p.dkv = static_cast<int>(kvl);
      p.rope = static_cast<int>(rope), p.fp8 = cache.latent_dtype == LatentCacheDType::FP8;
      cache_append(ctx, p);
      break;
    }
    case Stage::indexer_q_proj:
      linear(q_lat.p, ql, w_idx_q, qi.p, HI() * DI, ql, GemmOut::BF16);
      break;
    case Stage::indexer_k_proj:
      linear(x, hid, w_idx_k, kx.p, DI, hid, GemmOut::FP32);
      break;
    case Stage::indexer_weights_proj:
      linear(x, hid, w_idx_w, wraw.p, HI(), hid, GemmOut::FP32);
      break;
    case Stage::indexer_quant: {
      IndexerQuantParams p;
      p.qi = qi.as<__nv_bfloat16>(), p.kx = kx.as<float>(), p.wraw = wraw.as<float>(), p.ld_kx = DI, p.ld_wraw = HI();
      if (fx) p.kx = xp + ql + lat(), p.wraw = xp + ql + lat() + DI, p.ld_kx = NX(), p.ld_wraw = NX();
      p.k_norm_w = w_idx_kn_w.as<__nv_bfloat16>(), p.k_norm_b = w_idx_kn_b.as<__nv_bfloat16>();
      p.positions = positions.as<int32_t>(), p.inv_freq = inv_freq.as<float>();
      p.q_fp8 = qi8.as<uint8_t>(), p.q_scale = q_scale.as<float>(), p.weights = weights.as<float>();
      p.k_pool = cache.indexer, p.k_offset = k_off.as<int64_t>(), p.k_scale_offset = k_scale_off.as<int64_t>();
      if (trace_mode && dbg_q.bytes >= static_cast<size_t>(T * HI() * DI * 4) && dbg_ks.bytes >= static_cast<size_t>(T * 4)) {
        p.dbg_q = dbg_q.as<float>(), p.dbg_k = dbg_k.as<float>(), p.dbg_k_fp8 = dbg_k8.as<uint8_t>();
        p.dbg_k_scale = dbg_ks.as<float>();
      }
      p.T = T, p.num_heads = static_cast<int>(HI()), p.rope_dim = static_cast<int>(rope), p.hadamard = c.indexer_hadamard;
      p.eps = static_cast<float>(c.rms_norm_eps);
      indexer_quant(ctx, p);
      break;
    }
    case Stage::indexer_logits: {
      IndexerLogitsParams p;
      p.q_fp8 = qi8.as<uint8_t>(), p.weights = weights.as<float>(), p.k_cache = cache.indexer;
      p.block_table = block_table.as<int32_t>(), p.token_request = token_request.as<int32_t>();
      p.visible_end = visible_end.as<int32_t>(), p.logits = logits.as<float>(), p.T = T, p.logits_stride = logits_stride;
      p.max_blocks_per_request = md.max_blocks_per_request, p.num_heads = static_cast<int>(HI());
      p.tokens_per_block = static_cast<int>(c.tokens_per_block);
      // The hint picks the decode (1 to 4 new tokens per request) or the
      // prefill kernel. Given whenever one of the newer indexer kernels may
      // run; with both forced to the older kernels the launch stays the one
      // validated without it (the hint moves small prefill steps and decode
      // batches of 512 or more tokens to the other tile shape).
      {
        const KernelPicks r = ctx.picks.resolved();
        if (r.indexer_prefill == KernelPick::kNew || r.indexer_decode == KernelPick::kNew)
          p.max_tokens_per_request = max_new_per_request;
      }
      indexer_logits(ctx, p);
      break;
    }
    case Stage::topk: {
      TopkParams p;
      p.logits = logits.as<float>(), p.visible_end = visible_end.as<int32_t>(), p.out = topk_local.as<int32_t>();
      p.T = T, p.logits_stride = logits_stride, p.k = static_cast<int>(c.index_topk);
      p.workspace = topk_ws.bytes > 16 ? topk_ws.p : nullptr;
      topk(ctx, p);
      LocalToGlobalParams g;
      g.local = topk_local.as<int32_t>(), g.global = topk_global.as<int32_t>(), g.block_table = block_table.as<int32_t>();
      g.token_request = token_request.as<int32_t>(), g.visible_end = visible_end.as<int32_t>(), g.T = T;
      g.max_blocks = md.max_blocks_per_request, g.k = static_cast<int>(c.index_topk);
      g.tokens_per_block = static_cast<int>(c.tokens_per_block);
      local_to_global(ctx, g);
      break;
    }
    case Stage::q_absorb: {
      // q_abs[t,h] = q_nope[t,h] @ W_UK[h]: W_UK[h] is rows [h*(nope+v), h*(nope+v)+nope) of kv_b_proj, [nope, kvl].
      GemmParams g;
      g.x = q.p, g.ldx = H() * qk(), g.batch_stride_x = qk();
      g.w = w_kv_b.p, g.ldw = kvl, g.batch_stride_w = (nope + vd) * kvl, g.w_is_nk = false;
      g.y = q_cat.p, g.ldy = H() * lat(), g.batch_stride_y = lat(), g.out = GemmOut::BF16;
      g.M = T, g.N = kvl, g.K = nope, g.batch = static_cast<int>(H());
      gemm.run(ctx, g);
      break;
    }
    case Stage::sparse_mla: {
      SparseMlaParams p;
      p.q = q_cat.as<__nv_bfloat16>(), p.kv = reinterpret_cast<const __nv_bfloat16*>(cache.latent);
      p.indices = topk_global.as<int32_t>(), p.valid_len = valid_len.as<int32_t>();
      p.num_slots = cache.num_slots();
      if (cache.latent_dtype == LatentCacheDType::FP8 && ctx.picks.resolved().sparse_mla_fp8 == KernelPick::kNew) {
        // The fused kernel reads the 656-byte rows of the pool itself: no gather.
        p.kv = nullptr, p.kv_fp8 = cache.latent, p.stride_kv_slot = c.latent_cache_bytes_per_token();
      } else if (cache.latent_dtype == LatentCacheDType::FP8) {
        // Decode over the fp8 cache: dequantize the selected rows, then the bf16 kernel.
        const size_t need = static_cast<size_t>(T * c.index_topk * lat()) * sizeof(__nv_bfloat16);
        if (kv_gather.bytes < need || idx_gather.bytes < static_cast<size_t>(T * c.index_topk) * sizeof(int32_t)) {
          throw Error("CudaLayer: sparse_mla_fp8 was switched away from kNew after prepare(), which sized no buffers for the "
                      "gathered rows; call set_kernel_picks before prepare()");
        }
        GatherFp8Params gp;
        gp.latent_pool = cache.latent, gp.indices = topk_global.as<int32_t>(), gp.out = kv_gather.as<__nv_bfloat16>();
        gp.out_indices = idx_gather.as<int32_t>(), gp.T = T, gp.num_slots = cache.num_slots();
        gp.k = static_cast<int>(c.index_topk), gp.dkv = static_cast<int>(kvl), gp.rope = static_cast<int>(rope);
        gather_latent_fp8(ctx, gp);
        p.kv = kv_gather.as<__nv_bfloat16>(), p.indices = idx_gather.as<int32_t>(), p.num_slots = T * c.index_topk;
      }
      p.out = attn_out.as<__nv_bfloat16>(), p.lse = lse.as<float>(), p.row_max = row_max.as<float>();
      p.T = T, p.stride_q_t = H() * lat(), p.num_heads = static_cast<int>(H());
      p.topk = static_cast<int>(c.index_topk), p.d_qk = static_cast<int>(lat()), p.d_v = static_cast<int>(kvl);
      p.softmax_scale = static_cast<float>(c.softmax_scale());
      p.workspace = mla_ws.as<float>(), p.workspace_bytes = mla_ws.bytes;
      // Other strides 0: dense.
      sparse_mla(p, ctx);
      break;
    }
    case Stage::v_up_proj: {
      // v[t,h] = o[t,h] @ W_UV[h]^T: W_UV[h] is rows [h*(nope+v)+nope, (h+1)*(nope+v)) of kv_b_proj, [v, kvl].
      GemmParams g;
      g.x = attn_out.p, g.ldx = H() * kvl, g.batch_stride_x = kvl;
      g.w = w_kv_b.as<uint16_t>() + nope * kvl, g.ldw = kvl, g.batch_stride_w = (nope + vd) * kvl, g.w_is_nk = true;
      g.y = v.p, g.ldy = H() * vd, g.batch_stride_y = vd, g.out = GemmOut::BF16;
      g.M = T, g.N = vd, g.K = kvl, g.batch = static_cast<int>(H());
      gemm.run(ctx, g);
      break;
    }
    case Stage::o_proj:
      linear(v.p, H() * vd, w_o, out.p, hid, H() * vd, GemmOut::BF16);
      break;
    case Stage::kCount:
      break;
  }
}

CudaLayer::CudaLayer(const LayerConfig& cfg, const LayerWeights& w) {
  validate(cfg);
  const DeviceContext ctx = device_context();
  validate_for_gpu(cfg, ctx.device->sm_major, ctx.device->sm_minor);
  check_weights(cfg, w);
  if (cfg.index_head_dim != 128) {
    throw ConfigError(fmt::format("index_head_dim = {}: the CUDA indexer quantizes 128-wide vectors (one warp, one fp8 scale "
                                  "each); use 128 (the DeepSeek-V3.2 value)",
                                  cfg.index_head_dim));
  }
  if (cfg.qk_rope_head_dim > 64 || cfg.qk_rope_head_dim % 8 != 0) {
    throw ConfigError(fmt::format("qk_rope_head_dim = {}: the CUDA RoPE kernels take a multiple of 8 up to 64; use 64",
                                  cfg.qk_rope_head_dim));
  }
  if (cfg.kv_lora_rank % 128 != 0 || cfg.q_lora_rank % 8 != 0 || cfg.hidden_size % 8 != 0) {
    throw ConfigError(fmt::format("kv_lora_rank = {}, q_lora_rank = {}, hidden_size = {}: the CUDA kernels need kv_lora_rank a "
                                  "multiple of 128 and the others multiples of 8",
                                  cfg.kv_lora_rank, cfg.q_lora_rank, cfg.hidden_size));
  }
  impl_ = std::make_unique<Impl>(cfg, ctx);
  Impl& m = *impl_;
  upload(m.w_q_a, w.q_a_proj);
  upload(m.w_q_a_norm, w.q_a_layernorm);
  upload(m.w_q_b, w.q_b_proj);
  upload(m.w_kv_a, w.kv_a_proj_with_mqa);
  upload(m.w_kv_a_norm, w.kv_a_layernorm);
  upload(m.w_kv_b, w.kv_b_proj);
  upload(m.w_o, w.o_proj);
  upload(m.w_idx_q, w.idx_wq_b);
  upload(m.w_idx_k, w.idx_wk);
  upload(m.w_idx_kn_w, w.idx_k_norm_weight);
  upload(m.w_idx_kn_b, w.idx_k_norm_bias);
  upload(m.w_idx_w, w.idx_weights_proj);
  {
    std::vector<bf16_t> stacked;
    stacked.reserve(static_cast<size_t>(m.NX() * cfg.hidden_size));
    for (const std::vector<bf16_t>* part : {&w.q_a_proj, &w.kv_a_proj_with_mqa, &w.idx_wk, &w.idx_weights_proj})
      stacked.insert(stacked.end(), part->begin(), part->end());
    upload(m.w_x, stacked);
  }
  const std::vector<double> f64 = rope_inv_freq(cfg);
  std::vector<float> f32(f64.begin(), f64.end());
  upload(m.inv_freq, f32);
}

CudaLayer::~CudaLayer() = default;

const LayerConfig& CudaLayer::config() const { return impl_->cfg; }

void CudaLayer::prepare(const BatchMetadata& md, const DeviceCacheView& cache) {
  Impl& m = *impl_;
  const LayerConfig& c = m.cfg;
  if (md.tokens_per_block != c.tokens_per_block || cache.tokens_per_block != c.tokens_per_block) {
    throw ShapeError(fmt::format("tokens_per_block differs: layer {}, batch metadata {}, cache {}; build the cache and the "
                                 "metadata from the same configuration",
                                 c.tokens_per_block, md.tokens_per_block, cache.tokens_per_block));
  }
  if (cache.latent_dtype != c.kv_cache_dtype) {
    throw ShapeError(fmt::format("the latent cache holds {} but the layer is configured for {}; build the cache with "
                                 "CacheConfig::for_layer(cfg)",
                                 to_string(cache.latent_dtype), to_string(c.kv_cache_dtype)));
  }
  if (cache.latent_dtype == LatentCacheDType::FP8) {
    // The fp8 form serves decode (spec 4): one to four new tokens per request.
    for (const StepRequest& r : md.requests)
      if (r.num_new > 4) validate_for_sparse_prefill(c);
  }
  if (!cache.latent || !cache.indexer) throw ShapeError("the device cache view has no pools; pass device_view(cache, layer)");
  if (md.num_slots != cache.num_slots()) {
    throw ShapeError(fmt::format("batch metadata was built for {} slots but the cache has {}; build both from the same cache",
                                 md.num_slots, cache.num_slots()));
  }
  if (md.index_head_dim != c.index_head_dim) {
    throw ShapeError(fmt::format("batch metadata has index_head_dim {} but the layer {}", md.index_head_dim, c.index_head_dim));
  }
  if (static_cast<int64_t>(md.positions.size()) != md.num_tokens || static_cast<int64_t>(md.slot_mapping.size()) != md.num_tokens) {
    throw ShapeError(fmt::format("batch metadata has {} positions and {} slots for {} tokens; build it with build_batch_metadata",
                                 md.positions.size(), md.slot_mapping.size(), md.num_tokens));
  }
  for (int64_t t = 0; t < md.num_tokens; ++t) {
    if (md.slot_mapping[t] < 0 || md.slot_mapping[t] >= cache.num_slots()) {
      throw ShapeError(fmt::format("token {} maps to slot {} outside the cache's {} slots; rebuild the metadata from this cache", t,
                                   md.slot_mapping[t], cache.num_slots()));
    }
  }
  for (int32_t b : md.block_table) {
    if (b >= cache.num_blocks) {
      throw ShapeError(fmt::format("block table entry {} is outside the cache's {} blocks; rebuild the metadata from this cache",
                                   b, cache.num_blocks));
    }
  }
  m.md = md;
  m.cache = cache;
  const int64_t T = md.num_tokens;
  m.T = T;
  int64_t most_new = 0;
  for (const StepRequest& r : md.requests) most_new = std::max(most_new, r.num_new);
  m.max_new_per_request = static_cast<int>(std::min<int64_t>(most_new, std::numeric_limits<int>::max()));
  const int64_t max_vis = std::max<int64_t>(1, md.max_seq_len());
  m.logits_stride = (max_vis + 7) / 8 * 8;  // 32-byte rows for vector stores
  const int64_t H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim, k = c.index_topk;
  upload(m.positions, md.positions);
  upload(m.token_request, md.token_request);
  upload(m.visible_end, md.visible_end);
  upload(m.block_table, md.block_table);
  upload(m.slot_mapping, md.slot_mapping);
  upload(m.k_off, md.indexer_k_offset);
  upload(m.k_scale_off, md.indexer_scale_offset);
  std::vector<int32_t> vl(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) vl[t] = static_cast<int32_t>(std::min<int64_t>(k, md.visible_end[t]));
  upload(m.valid_len, vl);

  const size_t bf = 2, f4 = 4;
  m.fused_prepared = m.fuse_x;
  if (m.fuse_x) {
    m.xproj.ensure(T * m.NX() * f4);
  } else {
    m.qa.ensure(T * c.q_lora_rank * bf);
    m.kv.ensure(T * c.latent_dim() * bf);
    m.kx.ensure(T * DI * f4);
    m.wraw.ensure(T * HI * f4);
  }
  m.q_lat.ensure(T * c.q_lora_rank * bf);
  m.c_kv.ensure(T * c.kv_lora_rank * bf);
  m.k_pe.ensure(T * c.qk_rope_head_dim * bf);
  m.q.ensure(T * H * c.qk_head_dim() * bf);
  m.q_cat.ensure(T * H * c.latent_dim() * bf);
  m.qi.ensure(T * HI * DI * bf);
  m.qi8.ensure(T * HI * DI);
  m.q_scale.ensure(T * HI * f4);
  m.weights.ensure(T * HI * f4);
  m.logits.ensure(static_cast<size_t>(T) * m.logits_stride * f4);
  m.topk_local.ensure(T * k * f4);
  m.topk_global.ensure(T * k * f4);
  m.topk_ws.ensure(topk_workspace_bytes(T, m.logits_stride, static_cast<int>(k)));
  // Sized for the call's cache; with the fp8 cache the call reads the rows
  // gathered in token order (see Stage::sparse_mla), which reordering would
  // not help, so its workspace (sized as for no cache) leaves no room for it.
  const int64_t mla_slots = cache.latent_dtype == LatentCacheDType::FP8 ? 0 : cache.num_slots();
  m.mla_ws.ensure(sparse_mla_workspace_bytes(m.ctx, T, static_cast<int>(H), static_cast<int>(k), mla_slots));
  m.attn_out.ensure(T * H * c.kv_lora_rank * bf);
  m.lse.ensure(T * H * f4);
  m.row_max.ensure(T * H * f4);
  m.v.ensure(T * H * c.v_head_dim * bf);
  if (c.o_proj) m.out.ensure(T * c.hidden_size * bf);
  if (cache.latent_dtype == LatentCacheDType::FP8 && m.ctx.picks.resolved().sparse_mla_fp8 != KernelPick::kNew) {
    m.kv_gather.ensure(T * k * c.latent_dim() * bf);
    m.idx_gather.ensure(T * k * f4);
  }
  if (m.trace_mode) {
    m.dbg_q.ensure(T * HI * DI * f4);
    m.dbg_k.ensure(T * DI * f4);
    m.dbg_k8.ensure(T * DI);
    m.dbg_ks.ensure(T * f4);
  }
}

void CudaLayer::enqueue(const void* hidden_device, CUstream_st* stream, bool timing) {
  Impl& m = *impl_;
  m.x = hidden_device;
  m.ctx.stream = stream;
  const std::vector<Stage> stages = layer_stages(m.cfg, m.fused_prepared);
  if (!timing && m.overlap) {
    // Main stream: everything up to the norms; fork; the indexer branch on
    // the side stream, launched first (it is the longer chain), and the
    // attention branch's stages before sparse_mla on the main stream; join
    // before sparse_mla, which reads both. Per-stage timing stays serial
    // (below): stage times of overlapped kernels would not add up.
    auto run_on = [&](Stage s, cudaStream_t st) {
      nvtxRangePushA(stage_name(s));
      m.ctx.stream = st;
      m.launch(s);
      nvtxRangePop();
    };
    size_t i = 0;
    for (; i < stages.size() && stages[i] != Stage::q_b_proj && !on_indexer_branch(stages[i]); ++i) run_on(stages[i], stream);
    DSA_CUDA_CHECK(cudaEventRecord(m.ev_fork, stream));
    DSA_CUDA_CHECK(cudaStreamWaitEvent(m.side, m.ev_fork, 0));
    try {
      for (size_t j = i; j < stages.size() && stages[j] != Stage::sparse_mla; ++j)
        if (on_indexer_branch(stages[j])) run_on(stages[j], m.side);
      for (; i < stages.size() && stages[i] != Stage::sparse_mla; ++i)
        if (!on_indexer_branch(stages[i])) run_on(stages[i], stream);
    } catch (...) {
      // Join even on a failed launch, so that a capture on `stream` can end.
      cudaEventRecord(m.ev_join, m.side);
      cudaStreamWaitEvent(stream, m.ev_join, 0);
      m.ctx.stream = stream;
      throw;
    }
    DSA_CUDA_CHECK(cudaEventRecord(m.ev_join, m.side));
    DSA_CUDA_CHECK(cudaStreamWaitEvent(stream, m.ev_join, 0));
    for (; i < stages.size(); ++i) run_on(stages[i], stream);
    return;
  }
  if (timing) DSA_CUDA_CHECK(cudaEventRecord(m.ev_layer[0], stream));
  for (Stage s : stages) {
    nvtxRangePushA(stage_name(s));
    const size_t i = static_cast<size_t>(s);
    if (timing) DSA_CUDA_CHECK(cudaEventRecord(m.ev[2 * i], stream));
    m.launch(s);
    if (timing) DSA_CUDA_CHECK(cudaEventRecord(m.ev[2 * i + 1], stream));
    nvtxRangePop();
  }
  if (timing) {
    DSA_CUDA_CHECK(cudaEventRecord(m.ev_layer[1], stream));
    m.timed = stages;
    m.have_times = true;
  }
}

void CudaLayer::run_stage(Stage s, CUstream_st* stream) {
  Impl& m = *impl_;
  if (!m.x) throw Error("run_stage: enqueue one whole step first so that every stage has its inputs");
  if (s == Stage::o_proj && !m.cfg.o_proj) {
    throw ConfigError("run_stage(Stage::o_proj): this layer has no output projection; construct it with cfg.o_proj = true");
  }
  const std::vector<Stage> run = layer_stages(m.cfg, m.fused_prepared);
  if (std::find(run.begin(), run.end(), s) == run.end()) {
    throw ConfigError(fmt::format("stage {} does not run in this configuration: {}", stage_name(s),
                                  m.fused_prepared ? "q_a_proj, kv_a_proj, indexer_k_proj and indexer_weights_proj run fused "
                                                     "as x_proj (time x_proj, or switch the fusion off)"
                                                   : "x_proj runs only with the fused x projection"));
  }
  m.ctx.stream = stream;
  nvtxRangePushA(stage_name(s));
  m.launch(s);
  nvtxRangePop();
}

std::vector<StageTime> CudaLayer::stage_times() const {
  const Impl& m = *impl_;
  if (!m.have_times) throw Error("stage_times: no timed enqueue has run; call enqueue(..., timing = true) first");
  DSA_CUDA_CHECK(cudaEventSynchronize(m.ev_layer[1]));
  std::vector<StageTime> v;
  for (Stage s : m.timed) {
    const size_t i = static_cast<size_t>(s);
    StageTime st{s, 0.f};
    DSA_CUDA_CHECK(cudaEventElapsedTime(&st.ms, m.ev[2 * i], m.ev[2 * i + 1]));
    v.push_back(st);
  }
  return v;
}

float CudaLayer::last_layer_ms() const {
  const Impl& m = *impl_;
  if (!m.have_times) throw Error("last_layer_ms: no timed enqueue has run");
  DSA_CUDA_CHECK(cudaEventSynchronize(m.ev_layer[1]));
  float ms = 0;
  DSA_CUDA_CHECK(cudaEventElapsedTime(&ms, m.ev_layer[0], m.ev_layer[1]));
  return ms;
}

void CudaLayer::set_trace_mode(bool on) { impl_->trace_mode = on; }

void CudaLayer::set_kernel_picks(const KernelPicks& picks) { impl_->ctx.picks = picks; }
const KernelPicks& CudaLayer::kernel_picks() const { return impl_->ctx.picks; }

void CudaLayer::set_poison(bool on) { impl_->poison = on; }

void CudaLayer::set_fused_x_projection(bool on) { impl_->fuse_x = on; }
void CudaLayer::set_stream_overlap(bool on) { impl_->overlap = on; }
bool CudaLayer::stream_overlap() const { return impl_->overlap; }
bool CudaLayer::fused_x_projection() const { return impl_->fuse_x; }
std::vector<Stage> CudaLayer::stages() const { return layer_stages(impl_->cfg, impl_->fuse_x); }

std::vector<int32_t> CudaLayer::download_topk_global(CUstream_st* stream) const {
  return download<int32_t>(impl_->topk_global.p, static_cast<size_t>(impl_->T * impl_->cfg.index_topk), stream);
}

const void* CudaLayer::output_device() const { return impl_->cfg.o_proj ? impl_->out.p : impl_->v.p; }

std::vector<int64_t> CudaLayer::output_shape() const {
  const LayerConfig& c = impl_->cfg;
  return {impl_->T, c.o_proj ? c.hidden_size : c.num_heads * c.v_head_dim};
}

void* CudaLayer::hidden_buffer(int64_t tokens) {
  impl_->hidden.ensure(static_cast<size_t>(tokens * impl_->cfg.hidden_size) * 2);
  return impl_->hidden.p;
}

std::vector<bf16_t> CudaLayer::forward(const std::vector<bf16_t>& hidden, const BatchMetadata& md, const DeviceCacheView& cache,
                                       CUstream_st* stream, LayerTrace* trace, const TraceOptions& topt) {
  Impl& m = *impl_;
  const int64_t T = md.num_tokens;
  if (static_cast<int64_t>(hidden.size()) != T * m.cfg.hidden_size) {
    throw ShapeError(fmt::format("hidden has {} values but the step has {} tokens x hidden_size {} = {}", hidden.size(), T,
                                 m.cfg.hidden_size, T * m.cfg.hidden_size));
  }
  const bool old_mode = m.trace_mode;
  m.trace_mode = trace != nullptr && topt.intermediates;
  try {
    prepare(md, cache);
    m.ctx.stream = stream;
    void* x = hidden_buffer(T);
    if (T) DSA_CUDA_CHECK(cudaMemcpyAsync(x, hidden.data(), hidden.size() * 2, cudaMemcpyHostToDevice, stream));
    if (m.poison) {
      for (DevBuf* b : {&m.xproj, &m.qa, &m.q_lat, &m.kv, &m.c_kv, &m.k_pe, &m.q, &m.q_cat, &m.qi, &m.kx, &m.wraw, &m.qi8, &m.q_scale,
                        &m.weights, &m.logits, &m.topk_local, &m.topk_global, &m.mla_ws, &m.attn_out, &m.lse, &m.row_max, &m.v, &m.out,
                        &m.dbg_q, &m.dbg_k, &m.dbg_k8, &m.dbg_ks}) {
        if (b->p) fill_u32(m.ctx, b->p, 0xffffffffu, b->bytes / 4);
      }
    }
    enqueue(x, stream, false);
    const std::vector<int64_t> shape = output_shape();
    std::vector<bf16_t> out = download<uint16_t>(output_device(), static_cast<size_t>(shape[0] * shape[1]), stream);
    if (trace) download_trace(*trace, topt, stream);
    m.trace_mode = old_mode;
    return out;
  } catch (...) {
    m.trace_mode = old_mode;
    throw;
  }
}

void CudaLayer::download_trace(LayerTrace& tr, const TraceOptions& opt, CUstream_st* stream) const {
  const Impl& m = *impl_;
  const LayerConfig& c = m.cfg;
  const int64_t T = m.T, H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim, k = c.index_topk;
  tr = LayerTrace{};
  const std::vector<int64_t> shape = output_shape();
  tr.output = widen(download<uint16_t>(output_device(), static_cast<size_t>(shape[0] * shape[1]), stream));
  if (!opt.intermediates) return;
  tr.q_lat = widen(download<uint16_t>(m.q_lat.p, T * c.q_lora_rank, stream));
  tr.c_kv = widen(download<uint16_t>(m.c_kv.p, T * c.kv_lora_rank, stream));
  tr.k_pe = widen(download<uint16_t>(m.k_pe.p, T * c.qk_rope_head_dim, stream));
  tr.q_nope = bf16_cols(m.q.p, T * H, c.qk_head_dim(), 0, c.qk_nope_head_dim, stream);
  tr.q_pe = bf16_cols(m.q_cat.p, T * H, c.latent_dim(), c.kv_lora_rank, c.qk_rope_head_dim, stream);
  tr.q_cat = widen(download<uint16_t>(m.q_cat.p, T * H * c.latent_dim(), stream));
  if (m.trace_mode) {
    if (m.dbg_q.bytes < static_cast<size_t>(T * HI * DI * 4) || m.dbg_ks.bytes < static_cast<size_t>(T * 4)) {
      throw Error("CudaLayer::download_trace: trace mode was switched on after prepare(), so the step has no buffers for the "
                  "indexer's fp32 values; call set_trace_mode(true) before prepare()");
    }
    tr.idx_q = download<float>(m.dbg_q.p, T * HI * DI, stream);
    tr.idx_k = download<float>(m.dbg_k.p, T * DI, stream);
    const std::vector<uint8_t> k8 = download<uint8_t>(m.dbg_k8.p, T * DI, stream);
    tr.idx_k_fp8.resize(k8.size());
    for (size_t i = 0; i < k8.size(); ++i) tr.idx_k_fp8[i] = fp8_e4m3_to_float(k8[i]);
    tr.idx_k_scale = download<float>(m.dbg_ks.p, T, stream);
  }
  const std::vector<uint8_t> q8 = download<uint8_t>(m.qi8.p, T * HI * DI, stream);
  tr.idx_q_fp8.resize(q8.size());
  for (size_t i = 0; i < q8.size(); ++i) tr.idx_q_fp8[i] = fp8_e4m3_to_float(q8[i]);
  tr.idx_q_scale = download<float>(m.q_scale.p, T * HI, stream);
  tr.idx_weights = download<float>(m.weights.p, T * HI, stream);
  if (opt.logits) {
    const int64_t S = m.md.max_seq_len();
    const std::vector<float> all = download<float>(m.logits.p, static_cast<size_t>(T) * m.logits_stride, stream);
    tr.idx_logits.assign(static_cast<size_t>(T * S), -std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < m.md.visible_end[t]; ++s) tr.idx_logits[t * S + s] = all[t * m.logits_stride + s];
  }
  tr.topk_local = download<int32_t>(m.topk_local.p, T * k, stream);
  tr.topk_global = download<int32_t>(m.topk_global.p, T * k, stream);
  tr.attn_out = widen(download<uint16_t>(m.attn_out.p, T * H * c.kv_lora_rank, stream));
  tr.attn_lse = download<float>(m.lse.p, T * H, stream);
  tr.attn_max = download<float>(m.row_max.p, T * H, stream);
}

void check_step_fits(const LayerConfig& cfg, const std::vector<StepRequest>& requests, bool trace) {
  const DeviceContext ctx = device_context();
  int64_t T = 0;
  for (const StepRequest& r : requests) T += r.num_new;
  // The attention's workspace as prepare() sizes it: for the step's cache
  // (none to reorder with the fp8 cache, whose rows are gathered first).
  const int64_t slots = cfg.kv_cache_dtype == LatentCacheDType::FP8 ? 0 : CacheConfig::for_step(cfg, requests).capacity_tokens();
  const double ws = static_cast<double>(
      sparse_mla_workspace_bytes(ctx, T, static_cast<int>(cfg.num_heads), static_cast<int>(cfg.index_topk), slots));
  size_t free_b = 0, total_b = 0;
  DSA_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  check_fits_device(cuda_step_footprint(cfg, requests, ws, trace), static_cast<double>(free_b), static_cast<double>(total_b),
                    ctx.device->name);
}

}  // namespace dsa::cuda
