// dsa bench: times the layer (or one stage) on the GPU when there is one, else
// the CPU reference at a small shape. Shapes are named axes, settable from the
// command line one value at a time (--new, --cached, ...) or as lists to sweep
// (-a new=1,2,4 -a cached=4096,32768); combinations a backend cannot run are
// skipped with the reason, nvbench style.
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "dsa/bench.h"
#include "dsa/config.h"
#include "dsa/decode_sweep.h"
#include "dsa/error.h"
#include "dsa/kernel_picks.h"
#ifdef DSA_HAVE_CUDA
#include "dsa/cuda.h"
#endif

namespace dsa::cli {

namespace {

struct BenchCli {
  ConfigOptions cfg;
  BatchOptions batch;
  WeightsOptions weights;
  std::optional<int64_t> tokens;  // alias of --new
  std::vector<std::string> axes;
  std::optional<int> warmup, iters;
  uint64_t seed = 1;
  std::string stage;
  bool profile_once = false, graph = false, json = false, csv = false, no_overlap = false;
  bool sweep = false, sweep_sparse_mla = false, list_stages = false;
  bool sweep_decode = false;  // --sweep-sparse-mla-decode
  std::string backend = "auto";
  std::string protocol;        // the sparse MLA sweeps only
  std::string anchors;         // sparse MLA sweep only: FlashMLA anchor file
  std::string anchors_decode;  // decode sweep only: FlashMLA decode anchor file
  std::string kernels;         // --kernels (dsa/kernel_picks.h); empty: auto
};

// The default shape when no --new/--tokens is given: the seed's check on a
// GPU (one request of 4096 new tokens), a small one for the CPU reference.
constexpr int64_t kDefaultNewGpu = 4096;
constexpr int64_t kDefaultNewRef = 256;

bool cuda_built() {
#ifdef DSA_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

int gpu_count() {
#ifdef DSA_HAVE_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

enum class Backend { Ref, Cuda };

Backend pick_backend(const std::string& name) {
  if (name == "ref" || name == "reference") return Backend::Ref;
  if (name == "cuda") {
    if (!cuda_built()) {
      throw NoDeviceError("--backend cuda: this build has no CUDA backend (nvcc was not found when it was configured); "
                          "rebuild on a machine with the CUDA toolkit or use --backend ref");
    }
    if (gpu_count() == 0) throw NoDeviceError("--backend cuda: no CUDA GPU is visible on this machine; use --backend ref (or auto)");
    return Backend::Cuda;
  }
  if (name == "auto") return gpu_count() > 0 ? Backend::Cuda : Backend::Ref;
  throw ConfigError(fmt::format("--backend '{}' is not known; use auto (the GPU when there is one), ref or cuda", name));
}

// One named axis: "name=v1,v2,...".
struct Axis {
  std::string name;
  std::vector<int64_t> values;
};

const std::vector<std::string>& axis_names() {
  static const std::vector<std::string> n = {"batch", "cached", "new", "num_heads", "topk"};
  return n;
}

Axis parse_axis(const std::string& text) {
  const size_t eq = text.find('=');
  std::string known;
  for (const auto& n : axis_names()) known += (known.empty() ? "" : ", ") + n;
  if (eq == std::string::npos || eq == 0 || eq + 1 == text.size()) {
    throw ConfigError(fmt::format("axis '{}' is not of the form name=v1,v2,... (e.g. -a new=1,2,4); axes: {}", text, known));
  }
  Axis a;
  a.name = text.substr(0, eq);
  if (a.name == "tokens") a.name = "new";
  if (a.name == "heads") a.name = "num_heads";
  if (std::find(axis_names().begin(), axis_names().end(), a.name) == axis_names().end()) {
    throw ConfigError(fmt::format("axis '{}' is not known; axes: {}", a.name, known));
  }
  std::string rest = text.substr(eq + 1);
  size_t pos = 0;
  while (pos <= rest.size()) {
    const size_t comma = rest.find(',', pos);
    const std::string item = rest.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    try {
      size_t used = 0;
      const long long v = std::stoll(item, &used);
      if (used != item.size()) throw std::invalid_argument(item);
      a.values.push_back(v);
    } catch (const std::exception&) {
      throw ConfigError(fmt::format("axis {}: value '{}' is not an integer; write -a {}=v1,v2,...", a.name, item, a.name));
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return a;
}

struct Point {
  std::map<std::string, int64_t> values;  // axis name -> value
  std::string label() const {
    std::string s;
    for (const auto& [k, v] : values) s += fmt::format("{}{}={}", s.empty() ? "" : " ", k, v);
    return s;
  }
};

std::vector<Point> cartesian(const std::vector<Axis>& axes) {
  std::vector<Point> pts(1);
  for (const Axis& a : axes) {
    std::vector<Point> next;
    for (const Point& p : pts) {
      for (int64_t v : a.values) {
        Point q = p;
        q.values[a.name] = v;
        next.push_back(q);
      }
    }
    pts = std::move(next);
  }
  return pts;
}

BenchResult run_backend(Backend b, const LayerConfig& cfg, const std::vector<StepRequest>& reqs, const BenchOptions& opt) {
#ifdef DSA_HAVE_CUDA
  if (b == Backend::Cuda) return cuda::bench_layer(cfg, reqs, opt);
#endif
  return ref::bench_layer(cfg, reqs, opt);
}

// --sweep-sparse-mla-decode: the attention alone over the decode cells of
// dsa/decode_sweep.h; its shapes are its own axes, so the layer's shape and
// config flags are refused rather than ignored.
void run_decode_sweep(const BenchCli& o, const CLI::App& sub, const cuda::KernelPicks& picks) {
  if (o.sweep_sparse_mla || o.sweep) {
    throw ConfigError("--sweep-sparse-mla-decode and --sweep-sparse-mla (or --sweep) are two different sweeps; give one");
  }
  static const std::vector<std::string> applies = {"axis",    "iters",   "warmup", "seed",  "json", "csv",
                                                   "backend", "protocol", "sweep-sparse-mla-decode", "anchors-decode", "kernels", "help"};
  for (const CLI::Option* opt : sub.get_options()) {
    if (opt->count() == 0 || opt->get_lnames().empty()) continue;
    const std::string& name = opt->get_lnames().front();
    if (std::find(applies.begin(), applies.end(), name) == applies.end()) {
      throw ConfigError(fmt::format(
          "--{} does not apply to the sparse MLA decode sweep, whose shapes are its own axes (-a name=v1,v2 with name one of {}); "
          "drop it (the sweep takes -a, --protocol, --anchors-decode, --kernels, --iters, --warmup, --seed, --json, --csv)",
          name, [] {
            std::string s;
            for (const std::string& n : decode_sweep_axis_names()) s += (s.empty() ? "" : ", ") + n;
            return s;
          }()));
    }
  }
  DecodeSweepOptions d;
  d.points = decode_sweep_points(o.axes);  // a bad axis is a usage error on any machine
  d.seed = o.seed;
  d.picks = picks;
  if (!o.protocol.empty()) {
    check_sweep_protocol(o.protocol);
    d.protocol = o.protocol;
  }
  if (d.protocol == "flashmla" && (o.iters || o.warmup)) {
    throw ConfigError(
        "--iters and --warmup do not apply with --protocol flashmla, which times a decode cell as FlashMLA's decode test does "
        "(one warm-up call, then 30 calls each after an 8 GB memset); drop them");
  }
  if (o.warmup) d.warmup = *o.warmup;
  if (o.iters) d.iters = *o.iters;
  if (!o.anchors_decode.empty()) {
    d.anchors_path = o.anchors_decode;  // given: it must be readable (load_flashmla_decode_anchors says why not)
  } else if (std::filesystem::exists(DSA_DEFAULT_DECODE_ANCHORS)) {
    d.anchors_path = DSA_DEFAULT_DECODE_ANCHORS;
  }
  if (pick_backend(o.backend) != Backend::Cuda) {
    const std::string msg = "the sparse MLA decode sweep times the GPU kernels and needs the CUDA backend on a GPU; none is in use here";
    if (o.backend == "auto") throw NoDeviceError(msg);
    throw ConfigError(msg + " (--backend " + o.backend + ")");
  }
#ifdef DSA_HAVE_CUDA
  const DecodeSweep s = cuda::sweep_sparse_mla_decode(d);
  for (const DecodeSweepSkip& k : s.skipped) fmt::print(stderr, "skip [{}]: {}\n", k.point.label(), k.reason);
  if (s.rows.empty()) {
    throw ConfigError(fmt::format("every one of the {} cells was skipped (reasons above); change the axes", d.points.size()));
  }
  fmt::print("{}", o.json ? format_decode_sweep_json(s) : o.csv ? format_decode_sweep_csv(s) : format_decode_sweep_table(s));
#endif
}

void run_bench(const BenchCli& o, const CLI::App& sub) {
  if (o.list_stages) {
    for (const std::string& s : stage_names()) fmt::print("{}\n", s);
    return;
  }
  if (o.json && o.csv) throw ConfigError("--json and --csv both given; choose one output format");
  if (o.tokens && sub.count("--new")) throw ConfigError("--tokens and --new both given; they are the same axis, give one");
  if (o.warmup && *o.warmup < 0) throw ConfigError(fmt::format("--warmup {} is invalid: give 0 or more warm-up runs", *o.warmup));
  if (o.iters && *o.iters < 1) throw ConfigError(fmt::format("--iters {} is invalid: give at least one timed run", *o.iters));
  if (!o.stage.empty()) {
    const auto& names = stage_names();
    if (std::find(names.begin(), names.end(), o.stage) == names.end()) {
      std::string all;
      for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
      throw ConfigError(fmt::format("--stage '{}' is not a stage of the layer; use one of: {}", o.stage, all));
    }
  }
  // A bad --kernels is a usage error on any machine, before the GPU is looked for.
  const cuda::KernelPicks picks = o.kernels.empty() ? cuda::KernelPicks{} : cuda::parse_kernel_picks(o.kernels);
  if (o.sweep_decode) {
    run_decode_sweep(o, sub, picks);
    return;
  }
  if (!o.anchors_decode.empty()) {
    throw ConfigError("--anchors-decode names the FlashMLA figures shown beside the decode sweep; give it with --sweep-sparse-mla-decode");
  }
  const Backend backend = pick_backend(o.backend);

  BenchOptions opt;
  opt.picks = picks;
  opt.seed = o.seed;
  opt.stage = o.stage;
  opt.profile_once = o.profile_once;
  opt.cuda_graph = o.graph;
  opt.stream_overlap = !o.no_overlap;
  if (backend == Backend::Ref) {
    // One CPU run of the full-width layer takes tens of seconds on a small
    // machine: fewer samples by default (the first, traced run is the warm-up).
    opt.warmup = 1;
    opt.iters = 2;
  }
  if (o.warmup) opt.warmup = *o.warmup;
  if (o.iters) opt.iters = *o.iters;

  const bool sweep_mla = o.sweep_sparse_mla || o.sweep;
  if (!o.protocol.empty()) {
    if (!sweep_mla) {
      throw ConfigError(
          "--protocol sets how the sparse MLA sweeps time a cell; give it with --sweep-sparse-mla or --sweep-sparse-mla-decode");
    }
    check_sweep_protocol(o.protocol);
    if (o.protocol == "flashmla" && (o.iters || o.warmup)) {
      throw ConfigError(
          "--iters and --warmup do not apply with --protocol flashmla, which sizes its runs as triton.testing.do_bench "
          "does (10 ms of warm-up, 20 ms of timed runs); drop them");
    }
    opt.protocol = o.protocol;
  }
  if (!o.anchors.empty() && !sweep_mla) {
    throw ConfigError("--anchors names the FlashMLA figures shown beside the sparse MLA sweep; give it with --sweep-sparse-mla");
  }
  if (o.sweep && o.stage != "sparse_mla") {
    throw ConfigError("--sweep is the standalone sparse MLA sweep: give it with --stage sparse_mla (or use --sweep-sparse-mla)");
  }
  if (o.graph && backend != Backend::Cuda) {
    throw ConfigError("--graph replays the step as a CUDA graph and needs the CUDA backend; drop --graph or run on a GPU");
  }
  if (o.no_overlap && backend != Backend::Cuda) {
    throw ConfigError("--no-overlap sets how the CUDA layer uses its streams and needs the CUDA backend; drop it or run on a GPU");
  }
  if (sweep_mla) {
    // The sweep is issue 6's fixed grid; a shape or config flag given with it
    // would be silently ignored, so it is refused instead.
    static const std::vector<std::string> applies = {"iters", "warmup",           "seed",  "json",  "csv",     "backend",
                                                     "protocol", "sweep-sparse-mla", "sweep", "stage", "help",
                                                     "anchors"};
    for (const CLI::Option* opt : sub.get_options()) {
      if (opt->count() == 0 || opt->get_lnames().empty()) continue;
      const std::string& name = opt->get_lnames().front();
      if (std::find(applies.begin(), applies.end(), name) == applies.end() || (name == "stage" && o.stage != "sparse_mla")) {
        throw ConfigError(fmt::format(
            "--{} does not apply to the sparse MLA sweep, which runs a fixed grid, the one FlashMLA's figures are measured on (T = 4096, topk 2048, H 64 "
            "and 128, five context lengths); drop it (the sweep takes --protocol, --anchors, --iters, --warmup, --seed, --json, --csv)",
            name));
      }
    }
    if (!o.anchors.empty()) {
      opt.anchors_path = o.anchors;  // given: it must be readable (load_flashmla_anchors says why not)
    } else if (std::filesystem::exists(DSA_DEFAULT_ANCHORS)) {
      opt.anchors_path = DSA_DEFAULT_ANCHORS;
    }
    if (backend != Backend::Cuda) {
      const std::string msg = "the sparse MLA sweep times the GPU kernel and needs the CUDA backend on a GPU; none is in use here";
      // Asked for the reference: a usage error; left to auto without a GPU: no usable GPU.
      if (o.backend == "auto") throw NoDeviceError(msg);
      throw ConfigError(msg + " (--backend " + o.backend + ")");
    }
#ifdef DSA_HAVE_CUDA
    const SparseMlaSweep sweep = cuda::sweep_sparse_mla(opt);
    fmt::print("{}", o.json ? format_sweep_json(sweep) : o.csv ? format_sweep_csv(sweep) : format_sweep_table(sweep));
#endif
    return;
  }

  if (!o.kernels.empty() && backend != Backend::Cuda) {
    throw ConfigError("--kernels picks the CUDA kernels and needs the CUDA backend; drop --kernels or run on a GPU");
  }
  // After the sweep's refusal of shape flags: a checkpoint layer is read only for a run that uses it.
  const ResolvedWeights rw = resolve_weights(o.cfg, o.weights, sub.count("--layer") > 0);
  const LayerConfig& base = rw.cfg;
  opt.weights = rw.weights ? &*rw.weights : nullptr;

  std::vector<Axis> axes;
  for (const std::string& a : o.axes) {
    Axis ax = parse_axis(a);
    for (const Axis& prev : axes) {
      if (prev.name == ax.name) throw ConfigError(fmt::format("axis {} is given twice; list all its values in one -a {}=...", ax.name, ax.name));
    }
    axes.push_back(std::move(ax));
  }
  if (rw.weights) {
    for (const Axis& a : axes) {
      if (a.name == "num_heads") {
        throw ConfigError("axis num_heads changes the shapes of the weights, and --weights fixes them (one layer of a checkpoint); "
                          "drop the axis or --weights");
      }
    }
  }
  const bool explicit_list = !o.batch.requests.empty();
  for (const Axis& a : axes) {
    if (explicit_list && (a.name == "batch" || a.name == "cached" || a.name == "new")) {
      throw ConfigError(fmt::format("axis {} cannot be combined with --requests (the list fixes every request's shape); drop one", a.name));
    }
  }
  int64_t default_new = backend == Backend::Cuda ? kDefaultNewGpu : kDefaultNewRef;
  const bool new_given = o.tokens || sub.count("--new");
  const int64_t num_new = o.tokens ? *o.tokens : (new_given ? o.batch.num_new : default_new);
  if (backend == Backend::Ref && !new_given && !explicit_list && !o.json && !o.csv) {
    fmt::print(stderr, "dsa bench: {}; timing the CPU reference at {} new token(s) per request (set --new, --cached, --batch)\n",
               gpu_count() > 0 ? "--backend ref" : "no CUDA GPU in use", num_new);
  }

  const std::vector<Point> points = cartesian(axes);
  std::vector<std::string> json_items;
  int ran = 0, skipped = 0;
  for (const Point& p : points) {
    auto get = [&](const char* name, int64_t dflt) {
      auto it = p.values.find(name);
      return it == p.values.end() ? dflt : it->second;
    };
    BenchResult res;
    try {
      LayerConfig cfg = base;
      cfg.num_heads = get("num_heads", cfg.num_heads);
      cfg.index_topk = get("topk", cfg.index_topk);
      validate(cfg);
      std::vector<StepRequest> reqs =
          explicit_list ? parse_request_list(o.batch.requests)
                        : uniform_requests(get("batch", o.batch.batch), get("cached", o.batch.cached), get("new", num_new));
      check_step_limits(reqs, cfg.tokens_per_block);  // before the backend allocates anything
      res = run_backend(backend, cfg, reqs, opt);
      res.weights = rw.description;
    } catch (const Error& e) {
      // An invalid combination of a sweep is skipped; a single run fails.
      if (points.size() == 1) throw;
      if (dynamic_cast<const CudaError*>(&e) || dynamic_cast<const FileError*>(&e) || dynamic_cast<const NoDeviceError*>(&e)) throw;
      fmt::print(stderr, "skip [{}]: {}\n", p.label(), e.what());
      ++skipped;
      continue;
    }
    if (o.json) {
      json_items.push_back(format_json(res));
    } else if (o.csv) {
      fmt::print("{}", format_csv(res, ran == 0));
    } else {
      if (!p.values.empty()) fmt::print("{}== {} ==\n", ran ? "\n" : "", p.label());
      fmt::print("{}", format_table(res));
    }
    std::fflush(stdout);
    ++ran;
  }
  if (o.json) {
    if (points.size() == 1) {
      fmt::print("{}", json_items.empty() ? "" : json_items[0]);
    } else {
      fmt::print("[\n");
      for (size_t i = 0; i < json_items.size(); ++i) {
        std::string item = json_items[i];
        while (!item.empty() && item.back() == '\n') item.pop_back();
        fmt::print("{}{}\n", item, i + 1 < json_items.size() ? "," : "");
      }
      fmt::print("]\n");
    }
  }
  if (ran == 0) {
    throw ConfigError(fmt::format("every one of the {} combinations was skipped (reasons above); change the axes", skipped));
  }
  if (skipped > 0 && !o.json && !o.csv) fmt::print(stderr, "{} of {} combinations skipped\n", skipped, points.size());
}

}  // namespace

void register_bench(CLI::App& app) {
  auto o = std::make_shared<BenchCli>();
  CLI::App* sub = app.add_subcommand(
      "bench",
      "time the layer per stage: on the GPU when there is one, else the CPU reference (default shape: one request, "
      "4096 new tokens on a GPU, 256 on the CPU)");
  add_config_options(sub, o->cfg);
  add_batch_options(sub, o->batch, kDefaultNewRef);
  sub->add_option("--tokens", o->tokens, "same as --new: new tokens per request");
  sub->add_option("-a,--axis", o->axes,
                  "sweep a named axis: name=v1,v2,... with name one of batch, cached, new, num_heads, topk; several -a give every "
                  "combination, and combinations that cannot run are skipped with the reason (with --sweep-sparse-mla-decode: batch, "
                  "next_n, cache, num_heads, s_k, topk, way; warm-up 10 and 50 timed runs by default)");
  sub->add_option("--warmup", o->warmup, "untimed runs first (GPU 3, CPU reference 1)");
  sub->add_option("--iters", o->iters, "timed runs; the median is reported (GPU 20, CPU reference 2)");
  sub->add_option("--seed", o->seed, "seed of the synthetic weights, inputs and cache contents");
  add_weights_options(sub, o->weights);
  sub->add_flag("--allow-nonfinite", o->weights.allow_nonfinite,
                "with --weights: let NaN/Inf in the weights or their fp8 scales through (by default the first one is reported and "
                "the run fails)");
  sub->add_option("--stage", o->stage, "time one stage alone (see --list-stages), e.g. for ncu");
  sub->add_flag("--list-stages", o->list_stages, "print the stage names and exit");
  sub->add_flag("--profile-once", o->profile_once, "run once without warm-up (for ncu / compute-sanitizer)");
  sub->add_flag("--graph", o->graph, "replay the step as a CUDA graph (GPU only; decode)");
  sub->add_flag("--no-overlap", o->no_overlap,
                "time the layer with every stage on one stream (default: the indexer branch on a second stream beside "
                "q_b_proj .. q_absorb; GPU only)");
  sub->add_flag("--json", o->json, "print JSON (an array when sweeping axes; one object for the sparse MLA sweep)");
  sub->add_flag("--csv", o->csv, "print CSV, one row per stage and one for the layer (per cell for the sparse MLA sweep)");
  sub->add_option("--backend", o->backend, "auto (GPU when there is one), ref or cuda");
  sub->add_flag("--sweep-sparse-mla", o->sweep_sparse_mla, "standalone sparse MLA sweep (s_kv x H) beside FlashMLA's numbers, with the SM clock per cell (GPU)");
  sub->add_option("--anchors", o->anchors,
                  "FlashMLA figures for the sparse MLA sweep, per card and protocol (default: the project's "
                  "shared/anchors/flashmla-sparse-prefill.json beside the source tree, when present)");
  sub->add_flag("--sweep", o->sweep, "with --stage sparse_mla: the same sweep");
  sub->add_flag("--sweep-sparse-mla-decode", o->sweep_decode,
                "standalone sparse MLA decode sweep (GPU) over the axes batch, next_n, cache (bf16|fp8), num_heads, s_k, topk, way "
                "(direct|gather|fused), set with -a name=v1,v2; FlashMLA's decode figures beside ours");
  sub->add_option("--anchors-decode", o->anchors_decode,
                  "FlashMLA decode figures for the decode sweep, per card (default: data/anchors/flashmla-sparse-decode.json of the "
                  "source tree, when present)")
      ->check(kNonEmpty);
  sub->add_option("--kernels", o->kernels,
                  "which kernel each op with a newer one runs (CUDA backend): auto (default), baseline, new, or op=pick,... with op "
                  "one of indexer_prefill, indexer_decode, topk, sparse_mla_fp8; recorded in the report")
      ->check(kNonEmpty);
  sub->add_option("--protocol", o->protocol,
                  "how the sparse MLA sweep times a cell: sustained (default: --warmup runs, then --iters back to back, "
                  "L2 warm) or flashmla (as FlashMLA's prefill benchmark: 0.2 s idle, then triton.testing.do_bench(warmup=10, "
                  "rep=20), L2 cleared before each timed run); with --sweep-sparse-mla-decode, flashmla is FlashMLA's decode test "
                  "(one warm-up, then 30 runs each after an 8 GB memset)");
  sub->callback([o, sub] { run_bench(*o, *sub); });
}

}  // namespace dsa::cli
