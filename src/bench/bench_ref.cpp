// dsa::ref::bench_layer: the CPU reference timed per stage with steady_clock,
// so that `dsa bench` gives a result (and an output shape) on machines with no
// GPU. The work counted is the same model the CUDA backend uses; there is no
// measured ceiling for the CPU, so the "% of peak" columns stay empty.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <thread>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "dsa/bench.h"
#include "dsa/cache.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "dsa/reference.h"
#include "dsa/stats.h"
#include "dsa/synthetic_cache.h"

namespace dsa::ref {

namespace {

// Stands in for the cached context: every slot of every layer gets the values
// dsa::cuda::fill_synthetic writes on the GPU (dsa/synthetic_cache.h): bf16
// latent rows of RMS about 1, or the fp8 form with power-of-two scales; e4m3
// indexer keys over the whole range with power-of-two scales. The step's new
// tokens overwrite their own slots.
void fill_synthetic_host(CacheManager& cache, uint64_t seed) {
  namespace syn = synthetic_cache;
  const CacheConfig& cc = cache.config();
  const int64_t slots = cc.capacity_tokens(), tpb = cc.tokens_per_block, dkv = cc.kv_lora_rank, rope = cc.rope_dim;
  const int64_t DI = cc.index_head_dim, row = cc.latent_bytes_per_token(), block_bytes = cc.indexer_bytes_per_block();
  for (int64_t l = 0; l < cc.num_layers; ++l) {
    const uint64_t ls = syn::layer_seed(seed, l);
    uint8_t* lat = cache.latent_pool(l);
    uint8_t* idx = cache.indexer_pool(l);
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < slots; ++s) {
      uint8_t* r = lat + s * row;
      if (cc.latent_dtype == LatentCacheDType::BF16) {
        for (int64_t i = 0; i < dkv + rope; ++i) {
          const bf16_t b = float_to_bf16(syn::latent_bf16(ls, s * (dkv + rope) + i));
          std::memcpy(r + 2 * i, &b, 2);
        }
      } else {
        for (int64_t i = 0; i < dkv; ++i) r[i] = float_to_fp8_e4m3(syn::latent_fp8_ckv(ls, s * row + i));
        const float sc = syn::kLatentFp8Scale;
        for (int64_t g = 0; g < dkv / 128; ++g) std::memcpy(r + dkv + 4 * g, &sc, 4);
        for (int64_t i = 0; i < rope; ++i) {
          const bf16_t b = float_to_bf16(syn::latent_fp8_rope(ls, s * row + dkv + i));
          std::memcpy(r + dkv + 4 * (dkv / 128) + 2 * i, &b, 2);
        }
      }
      const int64_t blk = s / tpb, off = s % tpb;
      uint8_t* k8 = idx + blk * block_bytes + off * DI;
      for (int64_t i = 0; i < DI; ++i) k8[i] = float_to_fp8_e4m3(syn::indexer_key(ls, blk * block_bytes + off * DI + i));
      const float ks = std::ldexp(1.0f, syn::indexer_scale_exponent(ls, blk * tpb + off));
      std::memcpy(idx + blk * block_bytes + tpb * DI + off * 4, &ks, 4);
    }
  }
}

int threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

}  // namespace

BenchResult bench_layer(const LayerConfig& cfg, const std::vector<StepRequest>& requests, const BenchOptions& opt) {
  validate(cfg);
  if (opt.iters < 1 || opt.warmup < 0) {
    throw ConfigError(fmt::format("iters = {}, warmup = {}: need at least one timed run and no negative warm-up", opt.iters, opt.warmup),
                      opt.iters < 1 ? "iters" : "warmup");
  }
  if (opt.cuda_graph) throw ConfigError("cuda_graph replays a CUDA graph and needs the CUDA backend; switch it off for the CPU reference", "cuda_graph");
  if (!opt.stage.empty()) stage_work(cfg, BatchMetadata{}, opt.stage, 0, 0);  // rejects unknown names before any work

  BenchResult res;
  res.backend = opt.stage.empty() ? "reference" : "reference (whole layer run, one stage shown)";
  res.kernels = "-";  // no CUDA kernels to pick
  res.device = fmt::format("CPU ({} threads)", threads());
  res.config = cfg;
  res.requests = requests;

  // Room for exactly this step; the cached context is synthetic.
  CacheConfig cc = CacheConfig::for_step(cfg, requests);
  CacheManager cache(cc);
  reserve_step(cache, requests);
  const BatchMetadata md = build_batch_metadata(cache, requests);
  fill_synthetic_host(cache, opt.seed);
  res.num_tokens = md.num_tokens;

  // Converted to fp32 once, so that the timed region is the step alone.
  const PreparedWeights w = prepare_weights(cfg, opt.weights ? *opt.weights : generate_weights(cfg, opt.seed));
  const std::vector<bf16_t> hidden = generate_hidden(cfg, md.num_tokens, opt.seed + 1);
  const int64_t out_cols = cfg.o_proj ? cfg.hidden_size : cfg.num_heads * cfg.v_head_dim;
  res.output_shape = {md.num_tokens, out_cols};

  // The first run records the top-k indices, which the attention's work depends on.
  std::vector<std::pair<std::string, double>> times;
  std::vector<std::vector<std::pair<std::string, double>>> samples;
  std::vector<double> whole;
  auto run = [&](LayerTrace* trace) {
    TraceOptions topt;
    topt.intermediates = trace != nullptr;
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<float> out = layer_forward(w, hidden, md, cache, 0, topt, trace, &times);
    const auto t1 = std::chrono::steady_clock::now();
    if (static_cast<int64_t>(out.size()) != md.num_tokens * out_cols) {
      throw ShapeError(fmt::format("reference layer returned {} values, expected {} x {}", out.size(), md.num_tokens, out_cols));
    }
    return std::chrono::duration<double, std::milli>(t1 - t0).count();
  };
  double distinct = 0, valid = 0;
  {
    LayerTrace trace;
    const double ms = run(&trace);
    if (opt.stage.empty()) res.index_pattern = index_pattern(md, trace.topk_local.data(), cfg.index_topk);
    std::vector<uint8_t> seen(static_cast<size_t>(md.num_slots), 0);
    for (int32_t g : trace.topk_global) {
      if (g < 0 || g >= md.num_slots) continue;
      valid += 1;
      if (!seen[g]) seen[g] = 1, distinct += 1;
    }
    if (opt.profile_once) {
      samples.push_back(times);
      whole.push_back(ms);
    }
  }
  if (!opt.profile_once) {
    // The traced run above is the first warm-up run.
    for (int i = 1; i < opt.warmup; ++i) run(nullptr);
    for (int i = 0; i < opt.iters; ++i) {
      whole.push_back(run(nullptr));
      samples.push_back(times);
    }
  }

  std::vector<std::string> order;
  std::map<std::string, std::vector<double>> per;
  for (const auto& s : samples) {
    for (const auto& [name, ms] : s) {
      if (!per.count(name)) order.push_back(name);
      per[name].push_back(ms);
    }
  }
  for (const std::string& name : order) {
    if (!opt.stage.empty() && name != opt.stage) continue;
    StageResult r;
    r.name = name;
    const auto& v = per[name];
    r.median_ms = median(v);
    r.min_ms = *std::min_element(v.begin(), v.end());
    r.max_ms = *std::max_element(v.begin(), v.end());
    const StageWork wk = stage_work(cfg, md, name, distinct, valid);
    r.flops = wk.flops, r.bytes = wk.bytes;
    res.stages.push_back(r);
  }
  if (!opt.stage.empty()) {
    if (res.stages.empty()) {
      const char* why = opt.stage == "o_proj" ? "o_proj runs only with the o_proj projection switched on (cfg.o_proj)"
                        : opt.stage == "x_proj" ? "x_proj is the CUDA backend's fused projection of x; the reference times q_a_proj, kv_a_proj, indexer_k_proj and indexer_weights_proj separately"
                                                : "the reference does not run it";
      throw ConfigError(fmt::format("stage '{}' does not run in this configuration ({})", opt.stage, why));
    }
    res.layer_ms = res.stages[0].median_ms;
  } else {
    res.layer_ms = median(whole);
  }
  return res;
}

}  // namespace dsa::ref
