// dsa::cuda::bench_layer: the whole layer, or one stage, timed with CUDA
// events (median after warm-up), with work counted as spec section 8 counts it
// and the card's own measured peaks beside it.
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <map>
#include <numeric>

#include "cuda/check.cuh"
#include "dsa/bench.h"
#include "dsa/cache.h"
#include "dsa/cuda.h"
#include "dsa/cuda_layer.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "dsa/stats.h"
#include "cuda/gemm/gemm.h"
#include "cuda/layer/layer_kernels.h"

namespace dsa::cuda {

namespace {

struct Samples {
  std::vector<double> ms;
  void fill(StageResult& r) const {
    const SampleSummary x = summarize(ms);
    r.median_ms = x.median, r.min_ms = x.min, r.max_ms = x.max;
  }
};

// The card's ceilings, measured here rather than quoted: a square bf16 GEMM
// through the same cuBLASLt path, and a device-to-device copy (read + write).
void measure_peaks(const DeviceContext& ctx, double& tflops, double& gbps) {
  cudaStream_t st = ctx.stream;
  const int64_t n = 8192;
  void *a, *b, *c;
  DSA_CUDA_CHECK(cudaMalloc(&a, n * n * 2));
  DSA_CUDA_CHECK(cudaMalloc(&b, n * n * 2));
  DSA_CUDA_CHECK(cudaMalloc(&c, n * n * 2));
  fill_u32(ctx, a, 0x3f803f80u, n * n / 2);  // 1.0 bf16: the value does not change tensor-core time
  fill_u32(ctx, b, 0x3c003c00u, n * n / 2);
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
      g.run(ctx, p);
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

}  // namespace

BenchResult bench_layer(const LayerConfig& cfg, const std::vector<StepRequest>& requests, const BenchOptions& opt) {
  validate(cfg);
  if (device_count() == 0) throw NoDeviceError("the CUDA layer benchmark needs a CUDA GPU; none is visible (use the CPU reference backend)");
  if (opt.iters < 1 || opt.warmup < 0) {
    throw ConfigError(fmt::format("iters = {}, warmup = {}: need at least one timed run and no negative warm-up", opt.iters, opt.warmup),
                      opt.iters < 1 ? "iters" : "warmup");
  }
  const DeviceInfo& dev = current_device();
  BenchResult res;
  res.backend = opt.cuda_graph ? "cuda (graph replay)" : "cuda";
  if (!opt.stream_overlap) res.backend += ", one stream";
  res.device = fmt::format("{} (sm_{}{}, {} SMs)", dev.name, dev.sm_major, dev.sm_minor, dev.multiprocessors);
  res.config = cfg;
  res.requests = requests;
  res.kernels = format_kernel_picks(opt.picks);

  cudaStream_t st;
  DSA_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } guard{st};

  check_step_fits(cfg, requests);  // before the first allocation
  if (!opt.profile_once) measure_peaks(device_context(st), res.peak_tflops, res.peak_gbps);

  // Cache with room for exactly this step, on the GPU, filled with synthetic
  // rows standing in for the cached context (the new tokens overwrite theirs).
  CacheConfig cc = CacheConfig::for_step(cfg, requests);
  cc.storage = Storage::Device;
  CacheManager cache(cc, device_allocator());
  reserve_step(cache, requests);
  const BatchMetadata md = build_batch_metadata(cache, requests);
  fill_synthetic(cache, opt.seed);
  res.num_tokens = md.num_tokens;

  const LayerWeights generated = opt.weights ? LayerWeights{} : generate_weights(cfg, opt.seed);
  CudaLayer layer(cfg, opt.weights ? *opt.weights : generated);
  layer.set_kernel_picks(opt.picks);
  layer.set_stream_overlap(opt.stream_overlap);
  if (!opt.stage.empty()) {
    // One of the projections x_proj fuses, timed alone: run them unfused.
    const Stage one = parse_stage(opt.stage);
    if (is_part_of_x_proj(one)) layer.set_fused_x_projection(false);
  }
  const std::vector<bf16_t> hidden = generate_hidden(cfg, md.num_tokens, opt.seed + 1);
  void* x = layer.hidden_buffer(md.num_tokens);
  DSA_CUDA_CHECK(cudaMemcpy(x, hidden.data(), hidden.size() * 2, cudaMemcpyHostToDevice));
  layer.prepare(md, device_view(cache, 0));
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
    const StageWork c = stage_work(cfg, md, s, distinct, valid);
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
      const StageWork c = stage_work(cfg, md, s, distinct, valid);
      r.flops = c.flops, r.bytes = c.bytes;
      res.stages.push_back(r);
    }
    // The step as one region, without per-stage events between launches.
    std::vector<double> whole;
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
    // Every run of the step selects the same keys (deterministic), so the
    // last one's selection is the step's.
    DSA_CUDA_CHECK(cudaStreamSynchronize(st));
    const std::vector<int32_t> sel = layer.download_topk_global(st);
    res.index_pattern = index_pattern_from_slots(md, sel.data(), cfg.index_topk);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  DSA_CUDA_CHECK(cudaStreamSynchronize(st));
  return res;
}

}  // namespace dsa::cuda
