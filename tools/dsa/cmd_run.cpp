// dsa run: replays one forward step on the CPU reference or on the GPU
// (--backend cuda) from files (or from seeds) and dumps the output and the
// intermediates, so that the layer can be compared with another
// implementation tensor by tensor. File formats: docs/run-format.md.
#include <fmt/format.h>

#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <optional>

#include "cli_common.h"
#include "commands.h"
#include "dsa/cache.h"
#include "dsa/error.h"
#include "dsa/hash.h"
#include "dsa/kernel_picks.h"
#include "dsa/layer.h"
#include "dsa/reference.h"
#include "dsa/safetensors.h"
#ifdef DSA_HAVE_CUDA
#include "dsa/cuda.h"
#include "dsa/cuda_layer.h"
#endif

namespace dsa::cli {

namespace {

struct RunOptions {
  ConfigOptions cfg;
  BatchOptions batch;
  std::string weights, inputs, dump, save_weights, save_inputs;
  std::string save_weights_dtype = "bf16";
  std::string backend = "ref";
  std::string kernels;  // --kernels (dsa/kernel_picks.h); CUDA backend only
  uint64_t seed = 1;
  int64_t layer = 0;
  bool logits = false;
  bool no_intermediates = false;
  bool allow_nonfinite = false;
};

std::map<std::string, std::string> run_metadata(const LayerConfig& cfg, uint64_t seed) {
  return {{kMetaConfig, config_to_json(cfg)}, {kMetaSeed, std::to_string(seed)}};
}

// Everything a step needs besides the weights.
struct StepInputs {
  std::vector<StepRequest> requests;
  std::vector<bf16_t> hidden;          // [T, hidden]
  std::vector<int32_t> position_ids;   // [T]
  std::vector<bf16_t> prefix_hidden;   // [sum cached, hidden] or empty
};

// Uniform in [-sqrt(3), sqrt(3)) (unit RMS), a function of its arguments only.
float synth(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
  const uint64_t h = mix64(mix64(mix64(seed ^ 0x5eed) + a) + b * 0x100000001b3ull + c);
  return static_cast<float>(((h >> 40) * (1.0 / 16777216.0) * 2.0 - 1.0) * std::sqrt(3.0));
}

// Cached positions without their hidden states: latent rows and indexer keys
// of unit RMS derived from (seed, request id, position, element), written in
// the layer's own formats.
void fill_synthetic_prefix(const LayerConfig& cfg, CacheManager& cache, const StepRequest& r, uint64_t seed) {
  const int64_t dkv = cfg.kv_lora_rank, rope = cfg.qk_rope_head_dim, DI = cfg.index_head_dim;
  const int64_t tpb = cfg.tokens_per_block, ibb = cache.config().indexer_bytes_per_block();
  std::vector<float> c(dkv), k(rope), key(DI);
  std::vector<fp8_t> k8(DI);
  for (int64_t p = 0; p < r.cached; ++p) {
    const int64_t slot = cache.slot(r.id, p);
    for (int64_t i = 0; i < dkv; ++i) c[i] = round_bf16(synth(seed, r.id, p, i));
    for (int64_t i = 0; i < rope; ++i) k[i] = round_bf16(synth(seed, r.id, p, dkv + i));
    ref::write_latent_row(cfg, cache.latent_pool(0), slot, c.data(), k.data());
    for (int64_t i = 0; i < DI; ++i) key[i] = synth(seed + 1, r.id, p, i);
    float s;
    ref::quantize_fp8_blocks(key.data(), 1, DI, k8.data(), &s);
    uint8_t* blk = cache.indexer_pool(0) + (slot / tpb) * ibb;
    std::memcpy(blk + (slot % tpb) * DI, k8.data(), DI);
    std::memcpy(blk + tpb * DI + (slot % tpb) * 4, &s, 4);
  }
}

// Reads and checks an inputs file: the step's counts first (bounded before
// anything is sized from them), then the positions, then the tensors, each
// checked for NaN/Inf unless allow_nonfinite.
StepInputs read_inputs(const LayerConfig& cfg, const std::string& path, bool allow_nonfinite) {
  st::Reader r(path);
  StepInputs in;
  if (!r.has("hidden")) throw FileError(fmt::format("inputs '{}' has no tensor 'hidden' [T, hidden_size]; see docs/run-format.md", path));
  const auto& hi = r.info("hidden");
  if (hi.shape.size() != 2 || hi.shape[1] != cfg.hidden_size) {
    throw FileError(fmt::format("inputs '{}': 'hidden' has shape {} but [T, {}] is needed (hidden_size); check --hidden-size / --config",
                                path, st::shape_string(hi.shape), cfg.hidden_size));
  }
  const int64_t T = hi.shape[0];
  for (const char* name : {"request_new", "request_cached", "request_ids"}) {
    if (r.has(name) && r.info(name).shape.size() != 1) {
      throw FileError(fmt::format("inputs '{}': '{}' has shape {} but one entry per request [R] is needed", path, name,
                                  st::shape_string(r.info(name).shape)));
    }
  }
  if (r.has("request_new")) {
    const auto nw = r.read_i64("request_new");
    const auto cached = r.has("request_cached") ? r.read_i64("request_cached") : std::vector<int64_t>(nw.size(), 0);
    const auto ids = r.has("request_ids") ? r.read_i64("request_ids") : [&] {
      std::vector<int64_t> v(nw.size());
      std::iota(v.begin(), v.end(), 0);
      return v;
    }();
    if (cached.size() != nw.size() || ids.size() != nw.size()) {
      throw FileError(fmt::format("inputs '{}': request_new, request_cached and request_ids must have one entry per request ({}, {}, {})",
                                  path, nw.size(), cached.size(), ids.size()));
    }
    for (size_t i = 0; i < nw.size(); ++i) in.requests.push_back(StepRequest{ids[i], cached[i], nw[i]});
  } else {
    if (r.has("request_cached")) throw FileError(fmt::format("inputs '{}' has request_cached but no request_new", path));
    in.requests.push_back(StepRequest{0, 0, T});
  }
  // Bounded, and every sum below safe, before anything is sized from the counts.
  check_step_limits(in.requests, cfg.tokens_per_block, fmt::format("inputs '{}'", path));
  int64_t total_new = 0, total_cached = 0;
  for (const auto& q : in.requests) {
    total_new += q.num_new;
    total_cached += q.cached;
  }
  if (total_new != T) {
    throw FileError(fmt::format("inputs '{}': the requests' new tokens add up to {} but 'hidden' has {} rows", path, total_new, T));
  }
  // Positions are compared as the file holds them (an I64 past 2^31 is an
  // error, not cut to int32) before any cache is filled; then they fit int32.
  if (r.has("position_ids")) {
    r.expect_shape("position_ids", {T}, "one position per row of hidden");
    const std::vector<int64_t> pos = r.read_i64("position_ids");
    try {
      check_positions(in.requests, pos.data(), T);
    } catch (const ShapeError& e) {
      throw FileError(fmt::format("inputs '{}': {}", path, e.what()));
    }
  }
  for (const auto& q : in.requests)
    for (int64_t i = 0; i < q.num_new; ++i) in.position_ids.push_back(static_cast<int32_t>(q.cached + i));
  if (r.has("prefix_hidden")) {
    r.expect_shape("prefix_hidden", {total_cached, cfg.hidden_size}, "the cached tokens of every request, in request order");
  }
  in.hidden = r.read_bf16("hidden");
  if (!allow_nonfinite) check_finite("hidden", {T, cfg.hidden_size}, in.hidden.data(), static_cast<int64_t>(in.hidden.size()));
  if (r.has("prefix_hidden")) {
    in.prefix_hidden = r.read_bf16("prefix_hidden");
    if (!allow_nonfinite) {
      check_finite("prefix_hidden", {total_cached, cfg.hidden_size}, in.prefix_hidden.data(),
                   static_cast<int64_t>(in.prefix_hidden.size()));
    }
  }
  return in;
}

void write_inputs(const LayerConfig& cfg, uint64_t seed, const StepInputs& in, const std::string& path) {
  st::Writer w;
  const int64_t T = static_cast<int64_t>(in.position_ids.size()), R = static_cast<int64_t>(in.requests.size());
  w.add_bf16("hidden", {T, cfg.hidden_size}, in.hidden);
  w.add_i32("position_ids", {T}, in.position_ids);
  std::vector<int64_t> ids, cached, nw;
  for (const auto& q : in.requests) {
    ids.push_back(q.id);
    cached.push_back(q.cached);
    nw.push_back(q.num_new);
  }
  w.add_i64("request_ids", {R}, ids);
  w.add_i64("request_cached", {R}, cached);
  w.add_i64("request_new", {R}, nw);
  if (!in.prefix_hidden.empty()) {
    w.add_bf16("prefix_hidden", {static_cast<int64_t>(in.prefix_hidden.size()) / cfg.hidden_size, cfg.hidden_size}, in.prefix_hidden);
  }
  w.set_metadata("producer", "dsa run");
  for (const auto& [k, v] : run_metadata(cfg, seed)) w.set_metadata(k, v);
  w.write(path);
}

template <class T>
std::vector<T> take(std::vector<T>& v) {
  std::vector<T> out;
  out.swap(v);
  return out;
}

std::vector<uint8_t> to_fp8(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_fp8_e4m3(v[i]);
  return b;
}

// Host bytes the step needs at least: weights (bf16 and the reference's fp32
// copy), both caches, hidden, and the largest activations ([T, H, 576] q_cat,
// [T, H, kv_lora_rank] attention output, [T, topk] indices, logits on request).
// Every factor is bounded (validate, check_step_limits): no overflow in double.
double step_host_bytes(const LayerConfig& cfg, const CacheConfig& cc, const std::vector<StepRequest>& reqs, bool logits) {
  double T = 0, S = 0, cached = 0;
  for (const auto& q : reqs) {
    T += double(q.num_new);
    cached += double(q.cached);
    S = std::max(S, double(q.cached + q.num_new));
  }
  const double H = double(cfg.num_heads);
  double b = 6.0 * double(weight_count(cfg)) + double(cc.total_bytes()) + 2.0 * (T + cached) * double(cfg.hidden_size);
  b += 4.0 * T * H * double(cfg.latent_dim() + cfg.kv_lora_rank) + 8.0 * T * double(cfg.index_topk);
  if (logits) b += 4.0 * T * S;
  return b;
}

double physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? double(pages) * double(page) : 0.0;
}

enum class RunBackend { Ref, Cuda };

// --backend: the reference (default) or the GPU, whose absence is exit code 3
// before anything is read.
RunBackend pick_run_backend(const std::string& name) {
  if (name == "ref" || name == "reference") return RunBackend::Ref;
  if (name != "cuda") throw ConfigError(fmt::format("--backend '{}' is not known; use ref (the CPU reference) or cuda (the GPU)", name));
#ifdef DSA_HAVE_CUDA
  if (cuda::device_count() == 0) {
    throw NoDeviceError("dsa run --backend cuda: no CUDA GPU is visible on this machine; run on one with a GPU, or use --backend ref");
  }
  return RunBackend::Cuda;
#else
  throw NoDeviceError("dsa run --backend cuda: this build has no CUDA backend (nvcc was not found when it was configured); "
                      "rebuild with the CUDA toolkit, or use --backend ref");
#endif
}

// One step's results, from either backend.
struct StepResult {
  BatchMetadata md;
  std::vector<float> out_f32;   // reference: fp32, rounded to bf16 in the dump
  std::vector<bf16_t> out_bf16; // GPU: the bf16 the layer wrote
  LayerTrace trace;
  std::vector<std::pair<std::string, double>> ms;  // per stage (reference) or per step (GPU)
  double step_s = 0;
  std::string producer;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The cache before the step: every slot NaN (0xFF: a stray read shows in the
// output), the prefix requests' room reserved, and for cached tokens without
// prefix_hidden the synthetic rows. With prefix_hidden the caller runs the
// prefill step on it. Both backends start from these bytes and block tables.
void prepare_prefix_cache(const LayerConfig& cfg, CacheManager& cache, const StepInputs& in, const std::vector<StepRequest>& prefix,
                          uint64_t seed) {
  cache.fill(0xFF);
  if (prefix.empty()) return;
  reserve_step(cache, prefix);
  if (in.prefix_hidden.empty()) {
    for (const auto& q : in.requests)
      if (q.cached > 0) fill_synthetic_prefix(cfg, cache, q, seed);
  }
}

void print_prefix(const LayerConfig& cfg, const StepInputs& in, const std::vector<StepRequest>& prefix, uint64_t seed, const char* where) {
  if (prefix.empty()) return;
  if (!in.prefix_hidden.empty()) {
    fmt::print("prefix: ran the layer over {} cached tokens (prefix_hidden) on the {}\n", in.prefix_hidden.size() / cfg.hidden_size, where);
  } else {
    fmt::print("prefix: synthetic cache rows for the cached tokens (seed {}; give prefix_hidden for real ones)\n", seed);
  }
}

StepResult run_ref(const LayerConfig& cfg, const CacheConfig& cc, const LayerWeights& w, const StepInputs& in,
                   const std::vector<StepRequest>& prefix, uint64_t seed, const TraceOptions& topt) {
  StepResult res;
  res.producer = "dsa run (CPU reference)";
  const ref::PreparedWeights pw = ref::prepare_weights(cfg, w);
  CacheManager cache(cc);
  prepare_prefix_cache(cfg, cache, in, prefix, seed);
  if (!prefix.empty() && !in.prefix_hidden.empty()) {
    const BatchMetadata pmd = build_batch_metadata(cache, prefix);
    TraceOptions none;
    none.intermediates = false;
    ref::layer_forward(pw, in.prefix_hidden, pmd, cache, 0, none, nullptr, nullptr);
  }
  print_prefix(cfg, in, prefix, seed, "CPU");
  reserve_step(cache, in.requests);
  res.md = build_batch_metadata(cache, in.requests);
  // The layer takes the positions from the metadata; an inputs file's own
  // position_ids must agree with them.
  check_positions(res.md, in.position_ids.data(), static_cast<int64_t>(in.position_ids.size()));
  const auto t0 = std::chrono::steady_clock::now();
  res.out_f32 = ref::layer_forward(pw, in.hidden, res.md, cache, 0, topt, &res.trace, &res.ms);
  res.step_s = seconds_since(t0);
  return res;
}

#ifdef DSA_HAVE_CUDA
// The same step with cuda::CudaLayer at its default settings on a device
// cache that starts with the reference's bytes: synthetic rows are made on
// the host exactly as the reference makes them and copied over; prefix_hidden
// runs the prefill step on the GPU.
// The GPU memory of the step, and of the prefill step over prefix_hidden
// (often the larger), each with the cache: checked in run() before the
// weights are read and before anything is printed or written.
void check_cuda_fits(const LayerConfig& cfg, const StepInputs& in, const std::vector<StepRequest>& prefix, const TraceOptions& topt) {
  cuda::check_step_fits(cfg, in.requests, topt.intermediates || topt.logits);
  if (!prefix.empty() && !in.prefix_hidden.empty()) cuda::check_step_fits(cfg, prefix, false);
}

StepResult run_cuda(const LayerConfig& cfg, const CacheConfig& cc, const LayerWeights& w, const StepInputs& in,
                    const std::vector<StepRequest>& prefix, uint64_t seed, const TraceOptions& topt, const cuda::KernelPicks& picks) {
  StepResult res;
  const cuda::DeviceInfo& dev = cuda::current_device();
  const std::string kernels = cuda::format_kernel_picks(picks);
  res.producer = kernels == "auto" ? fmt::format("dsa run (CUDA, {})", dev.name) : fmt::format("dsa run (CUDA, {}, kernels {})", dev.name, kernels);
  CacheConfig dcc = cc;
  dcc.storage = Storage::Device;
  CacheManager dcache(dcc, cuda::device_allocator());
  if (!prefix.empty() && in.prefix_hidden.empty()) {
    // Same operations on both managers: the same block tables and bytes.
    CacheManager host(cc);
    prepare_prefix_cache(cfg, host, in, prefix, seed);
    dcache.fill(0xFF);
    reserve_step(dcache, prefix);
    cuda::copy_pools(host, dcache);
  } else {
    prepare_prefix_cache(cfg, dcache, in, prefix, seed);
  }
  cuda::CudaLayer layer(cfg, w);
  layer.set_kernel_picks(picks);
  if (!prefix.empty() && !in.prefix_hidden.empty()) {
    const BatchMetadata pmd = build_batch_metadata(dcache, prefix);
    const auto t0 = std::chrono::steady_clock::now();
    layer.forward(in.prefix_hidden, pmd, cuda::device_view(dcache, 0));
    res.ms.emplace_back("prefix step (GPU)", seconds_since(t0) * 1e3);
  }
  print_prefix(cfg, in, prefix, seed, "GPU");
  reserve_step(dcache, in.requests);
  res.md = build_batch_metadata(dcache, in.requests);
  check_positions(res.md, in.position_ids.data(), static_cast<int64_t>(in.position_ids.size()));
  // Logits without the other intermediates still need the traced download
  // (the trace mode only adds writes; the output bits are the same).
  TraceOptions gopt = topt;
  gopt.intermediates = topt.intermediates || topt.logits;
  const auto t0 = std::chrono::steady_clock::now();
  res.out_bf16 = layer.forward(in.hidden, res.md, cuda::device_view(dcache, 0), nullptr, gopt.intermediates ? &res.trace : nullptr, gopt);
  res.step_s = seconds_since(t0);
  return res;
}
#else
void check_cuda_fits(const LayerConfig&, const StepInputs&, const std::vector<StepRequest>&, const TraceOptions&) {
  throw NoDeviceError("dsa run --backend cuda: this build has no CUDA backend");
}
StepResult run_cuda(const LayerConfig&, const CacheConfig&, const LayerWeights&, const StepInputs&, const std::vector<StepRequest>&,
                    uint64_t, const TraceOptions&, const cuda::KernelPicks&) {
  throw NoDeviceError("dsa run --backend cuda: this build has no CUDA backend");
}
#endif

// The dump of docs/run-format.md: the same names, dtypes and shapes from either backend.
// The trace's vectors are moved into the writer (the dump can be gigabytes).
void write_dump(const std::string& path, const LayerConfig& cfg, uint64_t seed, const StepInputs& in, StepResult& res,
                const TraceOptions& topt, const std::string& weights) {
  LayerTrace& tr = res.trace;
  const int64_t T = res.md.num_tokens, H = cfg.num_heads, HI = cfg.index_n_heads, DI = cfg.index_head_dim, K = cfg.index_topk;
  const int64_t width = cfg.o_proj ? cfg.hidden_size : H * cfg.v_head_dim;
  st::Writer d;
  if (res.out_bf16.empty()) {
    d.add_bf16_from_f32("output", {T, width}, take(res.out_f32));
  } else {
    d.add_bf16("output", {T, width}, res.out_bf16);
  }
  d.add_i32("position_ids", {T}, in.position_ids);
  {
    std::vector<int64_t> ids, cached, nw;
    for (const auto& q : in.requests) ids.push_back(q.id), cached.push_back(q.cached), nw.push_back(q.num_new);
    const int64_t R = static_cast<int64_t>(in.requests.size());
    d.add_i64("request_ids", {R}, ids);
    d.add_i64("request_cached", {R}, cached);
    d.add_i64("request_new", {R}, nw);
  }
  if (topt.intermediates) {
    const int64_t nope = cfg.qk_nope_head_dim, rope = cfg.qk_rope_head_dim, dkv = cfg.kv_lora_rank;
    d.add_bf16_from_f32("q_lat", {T, cfg.q_lora_rank}, take(tr.q_lat));
    d.add_bf16_from_f32("c_kv", {T, dkv}, take(tr.c_kv));
    d.add_bf16_from_f32("k_pe", {T, rope}, take(tr.k_pe));
    d.add_bf16_from_f32("q_nope", {T, H, nope}, take(tr.q_nope));
    d.add_bf16_from_f32("q_pe", {T, H, rope}, take(tr.q_pe));
    d.add_f32("idx_q", {T, HI, DI}, take(tr.idx_q));
    d.add_u8("idx_q_fp8", st::DType::F8_E4M3, {T, HI, DI}, to_fp8(take(tr.idx_q_fp8)));
    d.add_f32("idx_q_scale", {T, HI}, take(tr.idx_q_scale));
    d.add_f32("idx_k", {T, DI}, take(tr.idx_k));
    d.add_u8("idx_k_fp8", st::DType::F8_E4M3, {T, DI}, to_fp8(take(tr.idx_k_fp8)));
    d.add_f32("idx_k_scale", {T}, take(tr.idx_k_scale));
    d.add_f32("idx_weights", {T, HI}, take(tr.idx_weights));
    d.add_i32("topk_local", {T, K}, take(tr.topk_local));
    d.add_i32("topk_global", {T, K}, take(tr.topk_global));
    d.add_bf16_from_f32("q_cat", {T, H, cfg.latent_dim()}, take(tr.q_cat));
    d.add_bf16_from_f32("attn_out", {T, H, dkv}, take(tr.attn_out));
    d.add_f32("attn_lse", {T, H}, take(tr.attn_lse));
    d.add_f32("attn_max", {T, H}, take(tr.attn_max));
  }
  if (topt.logits) {
    const int64_t S = static_cast<int64_t>(tr.idx_logits.size()) / std::max<int64_t>(T, 1);
    d.add_f32("idx_logits", {T, S}, take(tr.idx_logits));
  }
  d.set_metadata("producer", res.producer);
  d.set_metadata("weights", weights);
  for (const auto& [k, v] : run_metadata(cfg, seed)) d.set_metadata(k, v);
  d.write(path);
}

void run(const RunOptions& o, const CLI::App& sub) {
  const auto wall0 = std::chrono::steady_clock::now();
  // Everything is resolved and checked before any work and before anything is
  // printed: a bad flag or file fails in milliseconds, not after the step.
  // A bad --kernels is a usage error on any machine, before the GPU is looked for.
  const cuda::KernelPicks picks = o.kernels.empty() ? cuda::KernelPicks{} : cuda::parse_kernel_picks(o.kernels);
  if (!o.kernels.empty() && o.backend != "cuda") {
    throw ConfigError("--kernels picks the CUDA kernels of the GPU layer; give it with --backend cuda, or drop it");
  }
  const RunBackend backend = pick_run_backend(o.backend);
  if (o.save_weights_dtype != "bf16" && o.save_weights_dtype != "fp8") {
    throw ConfigError(fmt::format("--save-weights-dtype '{}' is not known; use bf16 (exact) or fp8 (the checkpoint's format: "
                                  "e4m3 with 128x128 block scales)",
                                  o.save_weights_dtype));
  }
  if (sub.count("--save-weights-dtype") > 0 && o.save_weights.empty()) {
    throw ConfigError("--save-weights-dtype sets the format of --save-weights; give --save-weights too, or drop it");
  }
  if (!o.inputs.empty()) {
    for (const char* flag : {"--requests", "--batch", "--cached", "--new"}) {
      if (sub.count(flag) > 0) {
        throw ConfigError(fmt::format("{} does not apply with --inputs: the inputs file fixes the step (request_cached, "
                                      "request_new); drop one of them",
                                      flag));
      }
    }
  }
  // Configuration and seed recorded by the files dsa run wrote (defaults for
  // a replay; --config and flags still win).
  const Recorded from_inputs = o.inputs.empty() ? Recorded{} : read_recorded(o.inputs);
  const bool weights_file = !o.weights.empty() && !is_checkpoint_index(o.weights);
  const Recorded from_weights = weights_file ? read_recorded(o.weights) : Recorded{};
  if (from_inputs.cfg && from_weights.cfg && config_to_json(*from_inputs.cfg) != config_to_json(*from_weights.cfg)) {
    throw ConfigError(fmt::format("inputs '{}' and weights '{}' were saved by runs of different configurations ({} / {}); give "
                                  "files of one run, or set the configuration with --config and flags",
                                  o.inputs, o.weights, config_to_json(*from_inputs.cfg), config_to_json(*from_weights.cfg)));
  }
  const std::optional<LayerConfig>& recorded = from_inputs.cfg ? from_inputs.cfg : from_weights.cfg;
  const LayerConfig cfg = resolve_config(o.cfg, recorded ? &*recorded : nullptr);
  const bool seed_given = sub.count("--seed") > 0;
  const uint64_t seed = seed_given ? o.seed : from_inputs.seed ? *from_inputs.seed : from_weights.seed ? *from_weights.seed : o.seed;
  const int64_t layer = sub.count("--layer") > 0 ? o.layer : from_weights.layer ? *from_weights.layer : o.layer;
  if (layer < 0) throw ConfigError(fmt::format("layer = {} is invalid: layer indices start at 0", layer), "layer");
  for (const auto& [path, flag] : {std::pair{&o.dump, "--dump"}, std::pair{&o.save_weights, "--save-weights"},
                                   std::pair{&o.save_inputs, "--save-inputs"}}) {
    if (path->empty()) continue;
    check_writable(*path, flag);
    for (const std::string* in : {&o.inputs, &o.weights}) {
      std::error_code ec;
      if (!in->empty() && std::filesystem::equivalent(*path, *in, ec)) {
        throw ConfigError(fmt::format("{} '{}' is the file the run reads; write to another file", flag, *path));
      }
    }
  }

  StepInputs in;
  if (!o.inputs.empty()) {
    in = read_inputs(cfg, o.inputs, o.allow_nonfinite);
  } else {
    in.requests = resolve_requests(o.batch);
    check_step_limits(in.requests, cfg.tokens_per_block);
  }
  const CacheConfig cc = CacheConfig::for_step(cfg, in.requests);
  const double need = step_host_bytes(cfg, cc, in.requests, o.logits), have = physical_memory_bytes();
  if (have > 0 && need > have) {
    throw OutOfMemoryError(fmt::format("the step needs at least {} of host memory (weights, caches of {} blocks, activations) and "
                                       "this machine has {}; give a smaller step (--new, --cached, --batch, --requests) or layer",
                                       human_bytes(need), cc.num_blocks, human_bytes(have)));
  }
  if (o.inputs.empty()) {
    int64_t T = 0;
    for (const auto& q : in.requests) {
      for (int64_t i = 0; i < q.num_new; ++i) in.position_ids.push_back(static_cast<int32_t>(q.cached + i));
      T += q.num_new;
    }
    in.hidden = generate_hidden(cfg, T, seed + 1000);
  }
  // The cached part of each request: the layer over prefix_hidden, or synthetic rows.
  std::vector<StepRequest> prefix;
  for (const auto& q : in.requests)
    if (q.cached > 0) prefix.push_back(StepRequest{q.id, 0, q.cached});
  TraceOptions topt;
  topt.intermediates = !o.no_intermediates;
  topt.logits = o.logits;
  if (backend == RunBackend::Cuda) check_cuda_fits(cfg, in, prefix, topt);
  const LayerWeights w = o.weights.empty() ? generate_weights(cfg, seed) : load_weights(cfg, o.weights, layer, o.allow_nonfinite);

  fmt::print("weights: {}\n", o.weights.empty() ? fmt::format("generated from seed {}", seed)
                                                   : fmt::format("{} (layer {})", o.weights, layer));
  if (!o.save_weights.empty()) {
    std::map<std::string, std::string> meta = run_metadata(cfg, seed);
    meta[kMetaLayer] = std::to_string(layer);
    if (o.save_weights_dtype == "fp8") {
      save_weights_fp8(cfg, w, o.save_weights, layer, meta);
    } else {
      save_weights(cfg, w, o.save_weights, layer, meta);
    }
    fmt::print("wrote weights to {} ({}, prefix {})\n", o.save_weights,
               o.save_weights_dtype == "fp8" ? "fp8 projections with 128x128 block scales, bf16 norms and weights_proj" : "bf16",
               weight_prefix(layer));
  }
  if (!o.save_inputs.empty()) {
    write_inputs(cfg, seed, in, o.save_inputs);
    fmt::print("wrote inputs to {}\n", o.save_inputs);
  }

  StepResult res = backend == RunBackend::Cuda ? run_cuda(cfg, cc, w, in, prefix, seed, topt, picks)
                                                     : run_ref(cfg, cc, w, in, prefix, seed, topt);
  const BatchMetadata& md = res.md;

  const int64_t T = md.num_tokens;
  const int64_t width = cfg.o_proj ? cfg.hidden_size : cfg.num_heads * cfg.v_head_dim;
  fmt::print("step: {} requests, {} new tokens, {} cached; output [{}, {}]\n", md.num_requests, T,
             std::accumulate(in.requests.begin(), in.requests.end(), int64_t{0}, [](int64_t a, const StepRequest& q) { return a + q.cached; }),
             T, width);
  double ss = 0;
  int64_t first_nonfinite = -1;
  float bad_value = 0.0f;
  const size_t n_out = res.out_bf16.empty() ? res.out_f32.size() : res.out_bf16.size();
  for (size_t i = 0; i < n_out; ++i) {
    const float v = res.out_bf16.empty() ? res.out_f32[i] : bf16_to_float(res.out_bf16[i]);
    ss += double(v) * v;
    if (first_nonfinite < 0 && !std::isfinite(v)) first_nonfinite = static_cast<int64_t>(i), bad_value = v;
  }
  fmt::print("output rms {:.6g}\n", std::sqrt(ss / std::max<size_t>(n_out, 1)));
  for (const auto& [name, t] : res.ms) fmt::print("  {:<22} {:>10.1f} ms\n", name, t);
  fmt::print("  {:<22} {:>10.1f} ms\n", "layer", res.step_s * 1e3);

  if (!o.dump.empty()) {
    write_dump(o.dump, cfg, seed, in, res, topt, o.weights.empty() ? fmt::format("seed {}", seed) : o.weights);
    fmt::print("wrote {}\n", o.dump);
  }
  fmt::print("wall {:.1f} s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count());
  // Inputs and weights were finite (checked above), so a non-finite output is
  // an overflow inside the layer: an error, not a result.
  if (first_nonfinite >= 0 && !o.allow_nonfinite) {
    throw ValueError(fmt::format("the output holds {} at {} although the inputs and weights are finite (an overflow inside the "
                                 "layer); check the scale of hidden and the weights, or keep it (allow_nonfinite)",
                                 bad_value, st::index_string({T, width}, first_nonfinite)),
                     "allow_nonfinite");
  }
}

}  // namespace

void register_run(CLI::App& app) {
  auto o = std::make_shared<RunOptions>();
  CLI::App* sub = app.add_subcommand("run",
                                     "run one forward step on the CPU reference (or the GPU, --backend cuda) and dump the "
                                     "output and intermediates (file formats: docs/run-format.md)");
  add_config_options(sub, o->cfg);
  add_batch_options(sub, o->batch, 16);
  sub->add_flag("--allow-nonfinite", o->allow_nonfinite,
                "let NaN/Inf in hidden, prefix_hidden, the weights or their fp8 scales through (and in the output); by default "
                "the first one is reported by tensor and index and the run fails");
  sub->add_option("--weights", o->weights, "weights: .safetensors (bf16, or fp8 with weight_scale_inv) or a model.safetensors.index.json; "
                                           "omitted: generated from --seed");
  sub->add_option("--layer", o->layer, "layer index L of the weight names model.layers.L.self_attn.* (0)");
  sub->add_option("--seed", o->seed, "seed for generated weights, inputs and synthetic cache rows (1)");
  sub->add_option("--inputs", o->inputs, "inputs .safetensors: hidden, position_ids, request_cached/request_new[, request_ids, prefix_hidden]; "
                                         "omitted: generated from --seed and --batch/--cached/--new/--requests");
  sub->add_option("--dump", o->dump, "write the output and the intermediates to this .safetensors file");
  sub->add_flag("--logits", o->logits, "also dump the indexer logits [T, max_seq_len] fp32 (large)");
  sub->add_flag("--no-intermediates", o->no_intermediates, "dump only the output (and the step's shape)");
  sub->add_option("--save-weights", o->save_weights, "also write the weights (Hugging Face names; format: --save-weights-dtype) to this file");
  sub->add_option("--save-weights-dtype", o->save_weights_dtype,
                  "format of --save-weights: bf16 (default; reads back bit for bit) or fp8 (as the DeepSeek-V3.2 checkpoint: "
                  "e4m3 projections with 128x128 block scale_inv, bf16 norms and weights_proj)");
  sub->add_option("--backend", o->backend,
                  "ref (default: the CPU reference) or cuda (the GPU layer, same files in and out; exit code 3 without a GPU)");
  sub->add_option("--save-inputs", o->save_inputs, "also write the step's inputs to this file (replayable with --inputs)");
  sub->add_option("--kernels", o->kernels,
                  "with --backend cuda: which kernel each op with a newer one runs: auto (default), baseline, new, or "
                  "op=pick,... with op one of indexer_prefill, indexer_decode, topk, sparse_mla_fp8");
  for (const char* name : {"--weights", "--inputs", "--dump", "--save-weights", "--save-inputs", "--kernels"}) sub->get_option(name)->check(kNonEmpty);
  sub->callback([o, sub] { run(*o, *sub); });
}

}  // namespace dsa::cli
