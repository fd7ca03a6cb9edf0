// dsa::cuda::bench_layer: the whole layer, or one stage, timed with CUDA
// events (median after warm-up), with work counted as spec section 8 counts it
// and the card's own measured peaks beside it.
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <map>
#include <numeric>

#include "check.cuh"
#include "dsa/bench.h"
#include "dsa/cache.h"
#include "dsa/cuda.h"
#include "dsa/cuda_layer.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "gemm.h"
#include "layer_kernels.h"

namespace dsa::cuda {

namespace {

struct Samples {
  std::vector<float> ms;
  void fill(StageResult& r) const {
    std::vector<float> s = ms;
    std::sort(s.begin(), s.end());
    r.median_ms = s.empty() ? 0 : (s.size() % 2 ? s[s.size() / 2] : 0.5 * (s[s.size() / 2 - 1] + s[s.size() / 2]));
    r.min_ms = s.empty() ? 0 : s.front();
    r.max_ms = s.empty() ? 0 : s.back();
  }
};

double median(std::vector<float> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// The card's ceilings, measured here rather than quoted: a square bf16 GEMM
// through the same cuBLASLt path, and a device-to-device copy (read + write).
void measure_peaks(cudaStream_t st, double& tflops, double& gbps) {
  const int64_t n = 8192;
  void *a, *b, *c;
  DSA_CUDA_CHECK(cudaMalloc(&a, n * n * 2));
  DSA_CUDA_CHECK(cudaMalloc(&b, n * n * 2));
  DSA_CUDA_CHECK(cudaMalloc(&c, n * n * 2));
  fill_u32(a, 0x3f803f80u, n * n / 2, st);  // 1.0 bf16: the value does not change tensor-core time
  fill_u32(b, 0x3c003c00u, n * n / 2, st);
  cudaEvent_t e0, e1;
  DSA_CUDA_CHECK(cudaEventCreate(&e0));
  DSA_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<float> t;
  {
    Gemm g;
    GemmParams p;
    p.x = a, p.ldx = n, p.w = b, p.ldw = n, p.y = c, p.ldy = n, p.M = n, p.N = n, p.K = n;
    for (int i = 0; i < 23; ++i) {
      DSA_CUDA_CHECK(cudaEventRecord(e0, st));
      g.run(p, st);
      DSA_CUDA_CHECK(cudaEventRecord(e1, st));
      DSA_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms;
      DSA_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 3) t.push_back(ms);
    }
  }
  // A ceiling: the fastest of the timed runs (a median would let one slow
  // clock ramp put stages above 100% of "peak").
  tflops = 2.0 * n * n * n / (*std::min_element(t.begin(), t.end()) * 1e-3) / 1e12;
  t.clear();
  const size_t bytes = static_cast<size_t>(n * n * 2);
  for (int i = 0; i < 23; ++i) {
    DSA_CUDA_CHECK(cudaEventRecord(e0, st));
    DSA_CUDA_CHECK(cudaMemcpyAsync(c, a, bytes, cudaMemcpyDeviceToDevice, st));
    DSA_CUDA_CHECK(cudaEventRecord(e1, st));
    DSA_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms;
    DSA_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 3) t.push_back(ms);
  }
  gbps = 2.0 * bytes / (*std::min_element(t.begin(), t.end()) * 1e-3) / 1e9;
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
}

struct Cost {
  double flops = 0, bytes = 0;
};

// Spec section 8: GEMMs 2MNK, each input read once and each output written once.
Cost stage_cost(const LayerConfig& c, const BatchMetadata& md, Stage s, double distinct_rows, double valid_indices) {
  const double T = static_cast<double>(md.num_tokens), H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim;
  const double hid = c.hidden_size, ql = c.q_lora_rank, kvl = c.kv_lora_rank, rope = c.qk_rope_head_dim;
  const double nope = c.qk_nope_head_dim, vd = c.v_head_dim, lat = c.latent_dim(), qk = c.qk_head_dim();
  const double k = c.index_topk;
  auto gemm = [&](double M, double N, double K, double in_b, double out_b, double batch = 1) {
    return Cost{2 * M * N * K * batch, batch * (M * K * in_b + N * K * 2 + M * N * out_b)};
  };
  const double latent_b = static_cast<double>(c.latent_cache_bytes_per_token());
  switch (s) {
    case Stage::x_proj: return gemm(T, ql + lat + DI + HI, hid, 2, 4);
    case Stage::q_a_proj: return gemm(T, ql, hid, 2, 2);
    case Stage::kv_a_proj: return gemm(T, lat, hid, 2, 2);
    case Stage::norms: return {0, 2 * T * (ql + kvl) * 2 + (ql + kvl) * 2};
    case Stage::q_b_proj: return gemm(T, H * qk, ql, 2, 2);
    case Stage::rope: return {0, 2 * T * (H + 1) * rope * 2};
    case Stage::cache_append: return {0, T * lat * 2 + T * latent_b};
    case Stage::indexer_q_proj: return gemm(T, HI * DI, ql, 2, 2);
    case Stage::indexer_k_proj: return gemm(T, DI, hid, 2, 4);
    case Stage::indexer_weights_proj: return gemm(T, HI, hid, 2, 4);
    case Stage::indexer_quant:
      return {0, T * HI * DI * 2 + T * DI * 4 + T * HI * 4 + T * HI * DI + 2 * T * HI * 4 + T * (DI + 4)};
    case Stage::indexer_logits: {
      double keys = 0;
      for (int32_t sl : md.seq_lens) keys += sl;
      const double vis = static_cast<double>(md.total_visible_keys());
      return {2 * HI * DI * vis, T * HI * DI + T * HI * 4 + keys * (DI + 4) + vis * 4};
    }
    case Stage::topk: return {0, static_cast<double>(md.total_visible_keys()) * 4 + T * k * 4};
    case Stage::q_absorb: return Cost{2 * T * H * nope * kvl, T * H * nope * 2 + H * nope * kvl * 2 + T * H * kvl * 2};
    case Stage::sparse_mla:
      return {2 * H * (lat + kvl) * valid_indices, T * H * lat * 2 + distinct_rows * latent_b + T * k * 4 + T * H * kvl * 2 + 2 * T * H * 4};
    case Stage::v_up_proj: return Cost{2 * T * H * kvl * vd, T * H * kvl * 2 + H * vd * kvl * 2 + T * H * vd * 2};
    case Stage::o_proj: return gemm(T, hid, H * vd, 2, 2);
    case Stage::kCount: break;
  }
  return {};
}

}  // namespace

BenchResult bench_layer(const LayerConfig& cfg, const std::vector<StepRequest>& requests, const BenchOptions& opt) {
  validate(cfg);
  if (device_count() == 0) throw CudaError("dsa bench --backend cuda needs a CUDA GPU; none is visible (use --backend ref)");
  if (opt.iters < 1 || opt.warmup < 0) {
    throw ConfigError(fmt::format("--iters {} / --warmup {}: need at least one timed run and no negative warm-up", opt.iters,
                                  opt.warmup));
  }
  const DeviceInfo dev = current_device();
  BenchResult res;
  res.backend = opt.cuda_graph ? "cuda (graph replay)" : "cuda";
  res.device = fmt::format("{} (sm_{}{}, {} SMs)", dev.name, dev.sm_major, dev.sm_minor, dev.multiprocessors);
  res.config = cfg;
  res.requests = requests;

  cudaStream_t st;
  DSA_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } guard{st};

  if (!opt.profile_once) measure_peaks(st, res.peak_tflops, res.peak_gbps);

  // Cache with room for exactly this step, on the GPU, filled with synthetic
  // rows standing in for the cached context (the new tokens overwrite theirs).
  CacheConfig cc = CacheConfig::for_layer(cfg);
  int64_t tokens = 0;
  for (const StepRequest& r : requests) tokens += cc.blocks_for(r.cached + r.num_new) * cc.tokens_per_block;
  cc.with_tokens(tokens);
  cc.storage = Storage::Device;
  CacheManager cache(cc, device_allocator());
  reserve_step(cache, requests);
  const BatchMetadata md = build_batch_metadata(cache, requests);
  fill_synthetic(cache, opt.seed);
  res.num_tokens = md.num_tokens;

  const LayerWeights w = generate_weights(cfg, opt.seed);
  CudaLayer layer(cfg, w);
  if (!opt.stage.empty()) {
    // One of the projections x_proj fuses, timed alone: run them unfused.
    const Stage one = parse_stage(opt.stage);
    if (one == Stage::q_a_proj || one == Stage::kv_a_proj || one == Stage::indexer_k_proj ||
        one == Stage::indexer_weights_proj) {
      layer.set_fused_x_projection(false);
    }
  }
  const std::vector<bf16_t> hidden = generate_hidden(cfg, md.num_tokens, opt.seed + 1);
  void* x = layer.hidden_buffer(md.num_tokens);
  DSA_CUDA_CHECK(cudaMemcpy(x, hidden.data(), hidden.size() * 2, cudaMemcpyHostToDevice));
  layer.prepare(md, md.positions.data(), device_view(cache, 0));
  res.output_shape = layer.output_shape();

  const int warmup = opt.profile_once ? 0 : opt.warmup;
  const int iters = opt.profile_once ? 1 : opt.iters;

  // Distinct cache rows the attention reads (cost model) need one real run.
  layer.enqueue(x, st, false);
  DSA_CUDA_CHECK(cudaStreamSynchronize(st));
  double distinct = 0, valid = 0;
  {
    const std::vector<int32_t> idx = layer.download_topk_global(st);
    const int64_t k = cfg.index_topk;
    std::vector<uint8_t> seen(static_cast<size_t>(md.num_slots), 0);
    for (int64_t t = 0; t < md.num_tokens; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int32_t g = idx[t * k + j];
        if (g < 0 || g >= md.num_slots) continue;
        valid += 1;
        if (!seen[g]) seen[g] = 1, distinct += 1;
      }
  }

  cudaEvent_t e0, e1;
  DSA_CUDA_CHECK(cudaEventCreate(&e0));
  DSA_CUDA_CHECK(cudaEventCreate(&e1));
  auto time_region = [&](auto&& body) {
    DSA_CUDA_CHECK(cudaEventRecord(e0, st));
    body();
    DSA_CUDA_CHECK(cudaEventRecord(e1, st));
    DSA_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    DSA_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    return ms;
  };

  if (!opt.stage.empty()) {
    const Stage s = parse_stage(opt.stage);
    for (int i = 0; i < warmup; ++i) layer.run_stage(s, st);
    Samples smp;
    for (int i = 0; i < iters; ++i) smp.ms.push_back(time_region([&] { layer.run_stage(s, st); }));
    StageResult r;
    r.name = stage_name(s);
    smp.fill(r);
    const Cost c = stage_cost(cfg, md, s, distinct, valid);
    r.flops = c.flops, r.bytes = c.bytes;
    res.stages.push_back(r);
    res.layer_ms = r.median_ms;
  } else {
    for (int i = 0; i < warmup; ++i) layer.enqueue(x, st, false);
    std::map<Stage, Samples> per;
    for (int i = 0; i < iters; ++i) {
      layer.enqueue(x, st, true);
      for (const StageTime& t : layer.stage_times()) per[t.stage].ms.push_back(t.ms);
    }
    for (Stage s : layer.stages()) {
      StageResult r;
      r.name = stage_name(s);
      per[s].fill(r);
      const Cost c = stage_cost(cfg, md, s, distinct, valid);
      r.flops = c.flops, r.bytes = c.bytes;
      res.stages.push_back(r);
    }
    // The step as one region, without per-stage events between launches.
    std::vector<float> whole;
    if (opt.cuda_graph) {
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      DSA_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      try {
        layer.enqueue(x, st, false);
      } catch (...) {
        cudaGraph_t g;
        cudaStreamEndCapture(st, &g);
        (void)cudaGetLastError();
        throw;
      }
      DSA_CUDA_CHECK(cudaStreamEndCapture(st, &graph));
      DSA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      for (int i = 0; i < std::max(warmup, 1); ++i) DSA_CUDA_CHECK(cudaGraphLaunch(exec, st));
      for (int i = 0; i < iters; ++i) whole.push_back(time_region([&] { DSA_CUDA_CHECK(cudaGraphLaunch(exec, st)); }));
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    } else {
      for (int i = 0; i < iters; ++i) whole.push_back(time_region([&] { layer.enqueue(x, st, false); }));
    }
    res.layer_ms = median(whole);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  DSA_CUDA_CHECK(cudaStreamSynchronize(st));
  return res;
}

}  // namespace dsa::cuda
