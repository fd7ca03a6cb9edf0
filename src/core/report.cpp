// Benchmark reports: the table people read, JSON and CSV for scripts, and the
// work model of spec section 8 that both backends' numbers are derived from.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "dsa/bench.h"
#include "dsa/error.h"

namespace dsa {

namespace {

struct Derived {
  double tflops = 0, gbps = 0, pct_compute = 0, pct_bw = 0;
  bool has_tflops = false, has_gbps = false, has_pct_compute = false, has_pct_bw = false;
};

// Rates are only meaningful where work was counted and time was measured.
Derived derive(const BenchResult& r, double ms, double flops, double bytes) {
  Derived d;
  if (ms > 0 && flops > 0) {
    d.tflops = flops / (ms * 1e-3) / 1e12;
    d.has_tflops = true;
    if (r.peak_tflops > 0) d.pct_compute = 100.0 * d.tflops / r.peak_tflops, d.has_pct_compute = true;
  }
  if (ms > 0 && bytes > 0) {
    d.gbps = bytes / (ms * 1e-3) / 1e9;
    d.has_gbps = true;
    if (r.peak_gbps > 0) d.pct_bw = 100.0 * d.gbps / r.peak_gbps, d.has_pct_bw = true;
  }
  return d;
}

struct Total {
  double ms = 0, flops = 0, bytes = 0;
};
Total layer_total(const BenchResult& r) {
  Total t;
  t.ms = r.layer_ms;
  for (const StageResult& s : r.stages) t.flops += s.flops, t.bytes += s.bytes;
  return t;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string num(double v) { return fmt::format("{:.6g}", v); }

}  // namespace

std::string describe_requests(const std::vector<StepRequest>& requests) {
  if (requests.empty()) return "";
  const bool uniform = std::all_of(requests.begin(), requests.end(), [&](const StepRequest& q) {
    return q.cached == requests[0].cached && q.num_new == requests[0].num_new;
  });
  if (uniform) return fmt::format("{}x{}:{}", requests.size(), requests[0].cached, requests[0].num_new);
  std::string s;
  for (size_t i = 0; i < requests.size(); ++i) s += fmt::format("{}{}:{}", i ? "," : "", requests[i].cached, requests[i].num_new);
  return s;
}

std::string format_table(const BenchResult& r) {
  std::string out;
  out += fmt::format("backend {}, device {}, kernels {}\n", r.backend, r.device, r.kernels);
  std::string reqs = describe_requests(r.requests);
  const bool uniform = reqs.find(',') == std::string::npos && reqs.find('x') != std::string::npos;
  if (reqs.size() > 100) reqs = reqs.substr(0, 97) + "...";
  out += fmt::format("requests {} ({}), {} new tokens, H {}, topk {}, latent cache {}{}\n", reqs, uniform ? "batch x cached:new" : "cached:new each", r.num_tokens,
                     r.config.num_heads, r.config.index_topk, to_string(r.config.kv_cache_dtype), r.config.o_proj ? ", o_proj on" : "");
  if (!r.output_shape.empty()) out += fmt::format("output {}\n", shape_text(r.output_shape));
  if (r.weights != "synthetic") out += fmt::format("weights {}\n", r.weights);

  size_t w = std::string("layer total").size();
  for (const StageResult& s : r.stages) w = std::max(w, s.name.size());
  auto row = [&](const std::string& name, double ms, double flops, double bytes) {
    const Derived d = derive(r, ms, flops, bytes);
    return fmt::format("{:<{}}  {:>10.4f}  {:>9}  {:>9}  {:>9}  {:>9}\n", name, w, ms, d.has_tflops ? fmt::format("{:.4g}", d.tflops) : "",
                       d.has_gbps ? fmt::format("{:.4g}", d.gbps) : "", d.has_pct_compute ? fmt::format("{:.1f}", d.pct_compute) : "",
                       d.has_pct_bw ? fmt::format("{:.1f}", d.pct_bw) : "");
  };
  out += fmt::format("{:<{}}  {:>10}  {:>9}  {:>9}  {:>9}  {:>9}\n", "stage", w, "median ms", "TFLOP/s", "GB/s", "% peak FL", "% peak BW");
  for (const StageResult& s : r.stages) out += row(s.name, s.median_ms, s.flops, s.bytes);
  if (r.stages.size() > 1) {
    const Total t = layer_total(r);
    out += std::string(w + 2 + 10 + 4 * 11, '-') + "\n";
    out += row("layer total", t.ms, t.flops, t.bytes);
    double sum = 0;
    for (const StageResult& s : r.stages) sum += s.median_ms;
    out += fmt::format("(layer total is the step timed as one region; the stage medians sum to {:.4f} ms)\n", sum);
  }
  if (r.peak_tflops > 0 || r.peak_gbps > 0) {
    out += fmt::format("% of peak against {:.0f} TFLOP/s (bf16 GEMM) and {:.0f} GB/s (device copy)\n", r.peak_tflops, r.peak_gbps);
  }
  if (r.index_pattern.measured) {
    const IndexPattern& p = r.index_pattern;
    out += fmt::format("top-k selection of one step: {} keys, mean distance from the query {:.1f} positions, {:.1f}% within the "
                       "last {} positions\n",
                       p.selections, p.mean_distance, 100.0 * p.recent_share, p.window);
  }
  return out;
}

std::string format_json(const BenchResult& r) {
  using nlohmann::json;
  auto opt = [](bool has, double v) { return has ? json(v) : json(nullptr); };
  json j;
  j["backend"] = r.backend;
  j["device"] = r.device;
  j["kernels"] = r.kernels;
  const LayerConfig& c = r.config;
  j["config"] = {{"hidden_size", c.hidden_size},
                 {"num_heads", c.num_heads},
                 {"q_lora_rank", c.q_lora_rank},
                 {"kv_lora_rank", c.kv_lora_rank},
                 {"qk_nope_head_dim", c.qk_nope_head_dim},
                 {"qk_rope_head_dim", c.qk_rope_head_dim},
                 {"v_head_dim", c.v_head_dim},
                 {"index_n_heads", c.index_n_heads},
                 {"index_head_dim", c.index_head_dim},
                 {"index_topk", c.index_topk},
                 {"tokens_per_block", c.tokens_per_block},
                 {"kv_cache_dtype", to_string(c.kv_cache_dtype)},
                 {"indexer_hadamard", c.indexer_hadamard},
                 {"o_proj", c.o_proj}};
  json reqs = json::array();
  for (const StepRequest& q : r.requests) reqs.push_back({{"id", q.id}, {"cached", q.cached}, {"new", q.num_new}});
  j["requests"] = reqs;
  j["num_tokens"] = r.num_tokens;
  j["output_shape"] = r.output_shape;
  j["peak_tflops"] = opt(r.peak_tflops > 0, r.peak_tflops);
  j["peak_gbps"] = opt(r.peak_gbps > 0, r.peak_gbps);
  j["weights"] = r.weights;
  if (r.index_pattern.measured) {
    j["index_pattern"] = {{"selections", r.index_pattern.selections},
                          {"mean_distance", r.index_pattern.mean_distance},
                          {"recent_window", r.index_pattern.window},
                          {"recent_share", r.index_pattern.recent_share}};
  } else {
    j["index_pattern"] = nullptr;
  }
  json stages = json::array();
  for (const StageResult& s : r.stages) {
    const Derived d = derive(r, s.median_ms, s.flops, s.bytes);
    stages.push_back({{"name", s.name},
                      {"median_ms", s.median_ms},
                      {"min_ms", s.min_ms},
                      {"max_ms", s.max_ms},
                      {"flops", s.flops},
                      {"bytes", s.bytes},
                      {"tflops", opt(d.has_tflops, d.tflops)},
                      {"gbps", opt(d.has_gbps, d.gbps)},
                      {"pct_peak_compute", opt(d.has_pct_compute, d.pct_compute)},
                      {"pct_peak_bandwidth", opt(d.has_pct_bw, d.pct_bw)}});
  }
  j["stages"] = stages;
  const Total t = layer_total(r);
  const Derived d = derive(r, t.ms, t.flops, t.bytes);
  j["layer"] = {{"median_ms", t.ms},
                {"flops", t.flops},
                {"bytes", t.bytes},
                {"tflops", opt(d.has_tflops, d.tflops)},
                {"gbps", opt(d.has_gbps, d.gbps)},
                {"pct_peak_compute", opt(d.has_pct_compute, d.pct_compute)},
                {"pct_peak_bandwidth", opt(d.has_pct_bw, d.pct_bw)}};
  return j.dump(2) + "\n";
}

std::string format_csv(const BenchResult& r, bool header) {
  std::string out;
  if (header) {
    out += "backend,device,requests,num_tokens,num_heads,topk,kv_cache_dtype,stage,median_ms,min_ms,max_ms,flops,bytes,tflops,gbps,"
           "pct_peak_compute,pct_peak_bandwidth,index_selections,index_mean_distance,index_recent_share,kernels\n";
  }
  const std::string prefix = fmt::format("{},{},{},{},{},{},{}", csv_field(r.backend), csv_field(r.device),
                                         csv_field(describe_requests(r.requests)), r.num_tokens, r.config.num_heads,
                                         r.config.index_topk, to_string(r.config.kv_cache_dtype));
  // The step's index pattern repeats on every row, so that each row stands alone.
  const IndexPattern& ip = r.index_pattern;
  const std::string pattern = ip.measured ? fmt::format("{},{},{}", ip.selections, num(ip.mean_distance), num(ip.recent_share)) : ",,";
  auto row = [&](const std::string& name, double med, double mn, double mx, double flops, double bytes) {
    const Derived d = derive(r, med, flops, bytes);
    auto o = [](bool has, double v) { return has ? num(v) : std::string(); };
    return fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{}\n", prefix, csv_field(name), num(med), num(mn), num(mx), num(flops),
                       num(bytes), o(d.has_tflops, d.tflops), o(d.has_gbps, d.gbps), o(d.has_pct_compute, d.pct_compute),
                       o(d.has_pct_bw, d.pct_bw), pattern, csv_field(r.kernels));
  };
  for (const StageResult& s : r.stages) out += row(s.name, s.median_ms, s.min_ms, s.max_ms, s.flops, s.bytes);
  const Total t = layer_total(r);
  out += row("layer", t.ms, t.ms, t.ms, t.flops, t.bytes);
  return out;
}

// ---- the sparse MLA sweep (issue 6) ------------------------------------------

void check_sweep_protocol(const std::string& protocol) {
  if (protocol != "sustained" && protocol != "flashmla") {
    throw ConfigError(fmt::format("protocol '{}' is not known; use sustained or flashmla", protocol), "protocol");
  }
}

namespace {
double sweep_tflops(double flops, double ms) { return ms > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0; }
// A cell's rates, each rendering's columns; pct_peak and flashmla_over_ours
// are absent (negative) when the peak or our time is not known.
struct SweepRates {
  double tflops = 0, pct_peak = -1, flashmla_over_ours = -1;
};
SweepRates sweep_rates(const SparseMlaSweep& s, const SparseMlaSweepRow& r) {
  SweepRates x;
  x.tflops = sweep_tflops(r.flops, r.median_ms);
  if (s.peak_tflops > 0) x.pct_peak = 100.0 * x.tflops / s.peak_tflops;
  if (r.median_ms > 0 && r.flashmla_ms > 0) x.flashmla_over_ours = r.flashmla_ms / r.median_ms;
  return x;
}
// How the cells were timed, in words (BenchOptions::protocol).
std::string sweep_protocol_words(const SparseMlaSweep& s) {
  if (s.protocol == "flashmla") {
    return "FlashMLA's benchmark protocol: 0.2 s idle per cell, then triton.testing.do_bench(warmup=10 ms, rep=20 ms) "
           "with L2 cleared by a 256 MB memset before each timed run; median of the timed runs";
  }
  return fmt::format("median of {} back-to-back runs after {} warm-up, L2 not cleared", s.iters, s.warmup);
}
}  // namespace

std::string format_sweep_table(const SparseMlaSweep& s) {
  std::string out = fmt::format(
      "Sparse MLA prefill sweep on {}: T = {}, topk = {}, d_qk = {}, d_v = {}, {}\n"
      "| H | s_kv | ours ms | ours TFLOP/s | % of {:.0f} | SM MHz | FlashMLA ms | FlashMLA TFLOP/s | FlashMLA / ours |\n"
      "|---|---|---|---|---|---|---|---|---|\n",
      s.device, s.tokens, s.topk, s.d_qk, s.d_v, sweep_protocol_words(s), s.peak_tflops);
  for (const SparseMlaSweepRow& r : s.rows) {
    const SweepRates x = sweep_rates(s, r);
    const bool fm = r.flashmla_ms > 0;
    out += fmt::format("| {} | {} | {:.3f} | {:.0f} | {:.1f}% | {} | {} | {} | {} |\n", r.num_heads, r.s_kv, r.median_ms, x.tflops,
                       std::max(0.0, x.pct_peak), r.sm_mhz > 0 ? fmt::format("{:.0f}", r.sm_mhz) : std::string("-"),
                       fm ? fmt::format("{:.2f}", r.flashmla_ms) : "-",
                       fm ? fmt::format("{:.0f}", sweep_tflops(r.flops, r.flashmla_ms)) : "-",
                       fm ? fmt::format("{:.2f}x", x.flashmla_over_ours) : "-");
  }
  out += fmt::format(
      "kernel: {}; FLOPs = 2 * H * {} * valid indices; SM MHz: average SM clock over the timed runs (clock64 / "
      "globaltimer); {}\n",
      s.kernel, s.d_qk + s.d_v, s.flashmla_source.empty() ? "no FlashMLA figures" : s.flashmla_source);
  return out;
}

std::string format_sweep_json(const SparseMlaSweep& s) {
  using nlohmann::json;
  json j;
  j["device"] = s.device;
  j["kernel"] = s.kernel;
  j["protocol"] = s.protocol;
  j["tokens"] = s.tokens;
  j["topk"] = s.topk;
  j["d_qk"] = s.d_qk;
  j["d_v"] = s.d_v;
  j["warmup"] = s.warmup;
  j["iters"] = s.iters;
  j["peak_tflops"] = s.peak_tflops;
  j["flashmla_source"] = s.flashmla_source;
  json rows = json::array();
  for (const SparseMlaSweepRow& r : s.rows) {
    const SweepRates x = sweep_rates(s, r);
    rows.push_back({{"num_heads", r.num_heads},
                    {"s_kv", r.s_kv},
                    {"median_ms", r.median_ms},
                    {"min_ms", r.min_ms},
                    {"max_ms", r.max_ms},
                    {"mean_ms", r.mean_ms},
                    {"warmup", r.warmup},
                    {"runs", r.runs},
                    {"flops", r.flops},
                    {"tflops", x.tflops},
                    {"pct_peak", x.pct_peak >= 0 ? json(x.pct_peak) : json(nullptr)},
                    {"sm_mhz", r.sm_mhz > 0 ? json(r.sm_mhz) : json(nullptr)},
                    {"flashmla_ms", r.flashmla_ms > 0 ? json(r.flashmla_ms) : json(nullptr)},
                    {"flashmla_over_ours", x.flashmla_over_ours >= 0 ? json(x.flashmla_over_ours) : json(nullptr)}});
  }
  j["rows"] = rows;
  return j.dump(2) + "\n";
}

std::string format_sweep_csv(const SparseMlaSweep& s) {
  std::string out =
      "device,kernel,protocol,tokens,topk,num_heads,s_kv,median_ms,min_ms,max_ms,mean_ms,warmup,runs,flops,tflops,pct_peak,"
      "sm_mhz,flashmla_ms,flashmla_over_ours\n";
  for (const SparseMlaSweepRow& r : s.rows) {
    const SweepRates x = sweep_rates(s, r);
    out += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", csv_field(s.device), csv_field(s.kernel),
                       csv_field(s.protocol), s.tokens, s.topk, r.num_heads, r.s_kv, num(r.median_ms), num(r.min_ms),
                       num(r.max_ms), num(r.mean_ms), r.warmup, r.runs, num(r.flops), num(x.tflops),
                       x.pct_peak >= 0 ? num(x.pct_peak) : std::string(), r.sm_mhz > 0 ? num(r.sm_mhz) : std::string(),
                       r.flashmla_ms > 0 ? num(r.flashmla_ms) : std::string(), x.flashmla_over_ours >= 0 ? num(x.flashmla_over_ours) : std::string());
  }
  return out;
}

}  // namespace dsa
