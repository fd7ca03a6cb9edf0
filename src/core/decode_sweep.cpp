// The CUDA-free half of the sparse MLA decode sweep (dsa/decode_sweep.h):
// axes and grid, the points that cannot run, the cost model, FlashMLA's
// figures from the anchor file, and the table / JSON / CSV.
#include "dsa/decode_sweep.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dsa/error.h"

namespace dsa {

namespace {

// One place for what each axis takes.
struct AxisSpec {
  const char* name;
  bool words;                      // cache, way: words; the others: integers
  int64_t lo, hi;                  // integer range
  std::vector<std::string> valid;  // words
  std::vector<std::string> dflt;   // default values
};

const std::vector<AxisSpec>& specs() {
  static const std::vector<AxisSpec> s = {
      {"batch", false, 1, 16384, {}, {"2", "64", "128"}},
      {"next_n", false, 1, 128, {}, {"1", "2"}},
      {"cache", true, 0, 0, {"bf16", "fp8"}, {"fp8"}},
      {"num_heads", false, 1, 65535, {}, {"128"}},
      {"s_k", false, 1, int64_t{1} << 27, {}, {"32768"}},
      {"topk", false, 1, 65536, {}, {"2048"}},
      {"way", true, 0, 0, {"direct", "gather", "fused"}, {"gather", "fused"}},
  };
  return s;
}

const AxisSpec* find_spec(const std::string& name) {
  for (const AxisSpec& a : specs())
    if (name == a.name) return &a;
  return nullptr;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

void set(DecodeSweepPoint& p, const std::string& axis, const std::string& v) {
  if (axis == "cache") {
    p.cache = v;
  } else if (axis == "way") {
    p.way = v;
  } else {
    const int64_t x = std::stoll(v);  // checked by parse_decode_sweep_axis
    if (axis == "batch") p.batch = x;
    if (axis == "next_n") p.next_n = x;
    if (axis == "num_heads") p.num_heads = x;
    if (axis == "s_k") p.s_k = x;
    if (axis == "topk") p.topk = x;
  }
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string num(double v) { return fmt::format("{:.6g}", v); }

// Rates of a cell; negative where not known.
struct Rates {
  double tflops = -1, tbps = -1, fm_tflops = -1, fm_over_ours = -1;
};
Rates rates(const DecodeSweepRow& r) {
  Rates x;
  if (r.median_us > 0) {
    x.tflops = r.flops / (r.median_us * 1e-6) / 1e12;
    x.tbps = r.bytes / (r.median_us * 1e-6) / 1e12;
  }
  if (r.flashmla_us > 0) {
    x.fm_tflops = r.flops / (r.flashmla_us * 1e-6) / 1e12;
    if (r.median_us > 0) x.fm_over_ours = r.flashmla_us / r.median_us;
  }
  return x;
}

std::string protocol_words(const DecodeSweep& s) {
  if (s.protocol == "flashmla") {
    return "FlashMLA's decode test protocol: 0.3 s idle per cell, one warm-up run, then 30 runs each after an 8 GB memset "
           "(L2 cold), each between its own CUDA events; median";
  }
  return fmt::format("median of {} runs after {} warm-up, each between its own CUDA events, L2 warm", s.iters, s.warmup);
}

}  // namespace

std::string DecodeSweepPoint::label() const {
  return fmt::format("batch={} next_n={} cache={} num_heads={} s_k={} topk={} way={}", batch, next_n, cache, num_heads, s_k, topk,
                     way);
}

const std::vector<std::string>& decode_sweep_axis_names() {
  static const std::vector<std::string> n = [] {
    std::vector<std::string> v;
    for (const AxisSpec& a : specs()) v.push_back(a.name);
    return v;
  }();
  return n;
}

DecodeSweepAxis parse_decode_sweep_axis(const std::string& text) {
  const std::string known = joined(decode_sweep_axis_names());
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == text.size()) {
    throw ConfigError(
        fmt::format("axis '{}' is not of the form name=v1,v2,... (e.g. -a batch=1,64 -a way=gather,fused); axes: {}", text, known));
  }
  DecodeSweepAxis a;
  a.name = text.substr(0, eq);
  if (a.name == "heads" || a.name == "h_q") a.name = "num_heads";
  if (a.name == "s_q") a.name = "next_n";
  const AxisSpec* spec = find_spec(a.name);
  if (!spec) throw ConfigError(fmt::format("axis '{}' is not known to the decode sweep; axes: {}", a.name, known));
  const std::string rest = text.substr(eq + 1);
  size_t pos = 0;
  while (true) {
    const size_t comma = rest.find(',', pos);
    const std::string item = rest.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (spec->words) {
      if (std::find(spec->valid.begin(), spec->valid.end(), item) == spec->valid.end()) {
        throw ConfigError(fmt::format("axis {}: value '{}' is not known; use {}", a.name, item, joined(spec->valid)));
      }
    } else {
      int64_t v = 0;
      try {
        size_t used = 0;
        v = std::stoll(item, &used);
        if (used != item.size()) throw std::invalid_argument(item);
      } catch (const std::exception&) {
        throw ConfigError(fmt::format("axis {}: value '{}' is not an integer; write -a {}=v1,v2,...", a.name, item, a.name));
      }
      if (v < spec->lo || v > spec->hi) {
        throw ConfigError(fmt::format("axis {}: value {} is out of range; give {} to {}", a.name, v, spec->lo, spec->hi));
      }
    }
    a.values.push_back(item);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return a;
}

std::vector<DecodeSweepPoint> decode_sweep_points(const std::vector<std::string>& axis_texts) {
  std::vector<DecodeSweepAxis> given;
  for (const std::string& t : axis_texts) {
    DecodeSweepAxis a = parse_decode_sweep_axis(t);
    for (const DecodeSweepAxis& prev : given) {
      if (prev.name == a.name) {
        throw ConfigError(fmt::format("axis {} is given twice; list all its values in one -a {}=...", a.name, a.name));
      }
    }
    given.push_back(std::move(a));
  }
  std::vector<DecodeSweepPoint> pts(1);
  for (const AxisSpec& spec : specs()) {
    std::vector<std::string> values = spec.dflt;
    for (const DecodeSweepAxis& a : given)
      if (a.name == spec.name) values = a.values;
    std::vector<DecodeSweepPoint> next;
    for (const DecodeSweepPoint& p : pts) {
      for (const std::string& v : values) {
        DecodeSweepPoint q = p;
        set(q, spec.name, v);
        next.push_back(q);
      }
    }
    pts = std::move(next);
  }
  return pts;
}

std::string decode_sweep_skip_reason(const DecodeSweepPoint& p) {
  if (p.way == "direct" && p.cache != "bf16") {
    return "way direct runs the bf16 kernel on the bf16 cache; the fp8 cache is read by way gather or fused";
  }
  if ((p.way == "gather" || p.way == "fused") && p.cache != "fp8") {
    return fmt::format("way {} reads the fp8 cache (656-byte rows); the bf16 cache is read by way direct", p.way);
  }
  if (p.cache == "fp8" && p.next_n > 4) {
    return fmt::format("the fp8 cache serves decode, 1 to 4 new tokens per request (spec section 4); next_n {} needs cache=bf16",
                       p.next_n);
  }
  if (p.next_n > p.s_k) return fmt::format("next_n {} new tokens do not fit a context of s_k {} tokens", p.next_n, p.s_k);
  const int64_t slots = p.batch * ((p.s_k + 63) / 64 * 64);
  if (slots > std::numeric_limits<int32_t>::max()) {
    return fmt::format("batch x s_k = {} cache slots do not fit the int32 global slot indices (at most 2^31 - 1)", slots);
  }
  return "";
}

int64_t decode_cache_row_bytes(const std::string& cache) { return cache == "fp8" ? 656 : 2 * kDecodeDqk; }

DecodeSweepWork decode_sweep_work(const DecodeSweepPoint& p, int64_t valid_indices, int64_t distinct_rows) {
  DecodeSweepWork w;
  const double T = static_cast<double>(p.tokens()), H = static_cast<double>(p.num_heads);
  w.flops = 2.0 * H * (kDecodeDqk + kDecodeDv) * static_cast<double>(valid_indices);
  w.bytes = static_cast<double>(distinct_rows) * static_cast<double>(decode_cache_row_bytes(p.cache))  // cache rows
            + T * H * kDecodeDqk * 2                                                                   // q bf16
            + T * static_cast<double>(p.topk) * 4                                                      // indices int32
            + T * H * kDecodeDv * 2                                                                    // out bf16
            + T * H * 4;                                                                               // lse fp32
  return w;
}

double FlashMlaDecodeAnchors::at(const DecodeSweepPoint& p) const {
  if (p.num_heads != num_heads || p.s_k != s_k || p.topk != topk || p.cache != cache) return 0;
  for (const Cell& c : cells)
    if (c.batch == p.batch && c.next_n == p.next_n) return c.us;
  return 0;
}

FlashMlaDecodeAnchors load_flashmla_decode_anchors(const std::string& path, const std::string& device) {
  namespace fs = std::filesystem;
  using nlohmann::json;
  FlashMlaDecodeAnchors a;
  a.device = device;
  std::error_code ec;
  const auto st = fs::status(path, ec);
  if (ec || !fs::exists(st)) {
    throw FileError(fmt::format("decode anchor file '{}' does not exist; give the path of flashmla-sparse-decode.json", path));
  }
  if (!fs::is_regular_file(st) || fs::file_size(path, ec) > (16u << 20)) {
    throw FileError(fmt::format("decode anchor file '{}' is not a regular file of at most 16 MiB; give flashmla-sparse-decode.json", path));
  }
  std::ifstream f(path, std::ios::binary);
  std::stringstream text;
  text << f.rdbuf();
  if (!f.good() && !f.eof()) throw FileError(fmt::format("cannot read decode anchor file '{}'", path));
  json j;
  try {
    j = json::parse(text.str());
  } catch (const json::exception& e) {
    throw FileError(fmt::format("decode anchor file '{}': malformed JSON ({})", path, e.what()));
  }
  if (!j.is_object() || !j.contains("devices") || !j["devices"].is_object()) {
    throw FileError(fmt::format("decode anchor file '{}' has no \"devices\" object", path));
  }
  const json& devices = j["devices"];
  if (!devices.contains(device)) {
    a.source = fmt::format("no FlashMLA decode figures for {} in {}", device, fs::path(path).filename().string());
    return a;
  }
  auto bad = [&](const std::string& what) {
    return FileError(fmt::format("decode anchor file '{}': {} for device '{}'; fix the file (see its \"what\" key)", path, what, device));
  };
  const json& d = devices[device];
  if (!d.is_object()) throw bad("the entry is not an object");
  try {
    a.num_heads = d.at("num_heads").get<int64_t>();
    a.s_k = d.at("s_k").get<int64_t>();
    a.topk = d.at("topk").get<int64_t>();
    a.cache = d.at("cache").get<std::string>();
    a.protocol = d.at("protocol").get<std::string>();
    const json& cells = d.at("cells");
    if (!cells.is_array()) throw bad("\"cells\" is not an array");
    for (const json& c : cells) {
      FlashMlaDecodeAnchors::Cell x;
      x.batch = c.at("batch").get<int64_t>();
      x.next_n = c.at("next_n").get<int64_t>();
      x.us = c.at("us").get<double>();
      if (!(x.us > 0 && x.us < 1e9)) throw bad(fmt::format("a cell holds {} us, not a positive time", x.us));
      if (x.batch < 1 || x.next_n < 1) throw bad("a cell has batch or next_n below 1");
      a.cells.push_back(x);
    }
  } catch (const json::exception& e) {
    throw bad(fmt::format("\"num_heads\", \"s_k\", \"topk\", \"cache\", \"protocol\" or \"cells\" (batch, next_n, us) is missing or "
                          "mistyped ({})",
                          e.what()));
  }
  if (a.cache != "fp8" && a.cache != "bf16") throw bad(fmt::format("\"cache\" is '{}', not bf16 or fp8", a.cache));
  const std::string measured = d.contains("measured") && d["measured"].is_string() ? d["measured"].get<std::string>() : "date not recorded";
  a.source = fmt::format("FlashMLA on {}: H {}, s_k {}, topk {}, {} cache, {} ({}; {})", device, a.num_heads, a.s_k, a.topk, a.cache,
                         a.protocol, measured, fs::path(path).filename().string());
  return a;
}

std::string format_decode_sweep_table(const DecodeSweep& s) {
  std::string out = fmt::format(
      "Sparse MLA decode sweep on {}: {}; kernels {}\n"
      "| batch | next_n | cache | H | s_k | topk | way | kernel | ours us | TFLOP/s | TB/s | SM MHz | FlashMLA us | FlashMLA TFLOP/s | "
      "FlashMLA / ours |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
      s.device, protocol_words(s), s.kernels);
  for (const DecodeSweepRow& r : s.rows) {
    const Rates x = rates(r);
    const DecodeSweepPoint& p = r.point;
    auto opt = [](double v, int digits) { return v >= 0 ? fmt::format("{:.{}f}", v, digits) : std::string("-"); };
    out += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {:.1f} | {} | {} | {} | {} | {} | {} |\n", p.batch, p.next_n,
                       p.cache, p.num_heads, p.s_k, p.topk, p.way, r.kernel, r.median_us, opt(x.tflops, 0),
                       opt(x.tbps, 2), r.sm_mhz > 0 ? fmt::format("{:.0f}", r.sm_mhz) : std::string("-"),
                       r.flashmla_us > 0 ? fmt::format("{:.1f}", r.flashmla_us) : std::string("-"), opt(x.fm_tflops, 0),
                       x.fm_over_ours >= 0 ? fmt::format("{:.2f}x", x.fm_over_ours) : std::string("-"));
  }
  out += fmt::format(
      "FLOPs = 2 * H * {} * valid indices; bytes = distinct cache rows ({} B bf16, {} B fp8) + q + indices + out + lse, each once "
      "(spec section 8, the same for every way); SM MHz: average SM clock over the timed runs (-: not measured)\n",
      kDecodeDqk + kDecodeDv, decode_cache_row_bytes("bf16"), decode_cache_row_bytes("fp8"));
  out += fmt::format("FlashMLA: {}{}\n", s.flashmla_source.empty() ? "no figures" : s.flashmla_source,
                     s.flashmla_source.empty() || s.flashmla_source.rfind("no ", 0) == 0
                         ? ""
                         : "; its kernel has an attention sink and is timed cold, as --protocol flashmla times ours");
  if (!s.skipped.empty()) out += fmt::format("{} cell(s) skipped (reasons on stderr, and in --json)\n", s.skipped.size());
  return out;
}

std::string format_decode_sweep_json(const DecodeSweep& s) {
  using nlohmann::json;
  auto opt = [](double v) { return v >= 0 ? json(v) : json(nullptr); };
  auto point = [](const DecodeSweepPoint& p) {
    return json{{"batch", p.batch}, {"next_n", p.next_n}, {"cache", p.cache}, {"num_heads", p.num_heads},
                {"s_k", p.s_k},     {"topk", p.topk},     {"way", p.way}};
  };
  json j;
  j["device"] = s.device;
  j["protocol"] = s.protocol;
  j["kernels"] = s.kernels;
  j["warmup"] = s.warmup;
  j["iters"] = s.iters;
  j["flashmla_source"] = s.flashmla_source;
  json rows = json::array();
  for (const DecodeSweepRow& r : s.rows) {
    const Rates x = rates(r);
    json o = point(r.point);
    o["kernel"] = r.kernel;
    o["median_us"] = r.median_us;
    o["min_us"] = r.min_us;
    o["max_us"] = r.max_us;
    o["mean_us"] = r.mean_us;
    o["warmup"] = r.warmup;
    o["runs"] = r.runs;
    o["valid"] = r.valid;
    o["distinct_rows"] = r.distinct;
    o["flops"] = r.flops;
    o["bytes"] = r.bytes;
    o["tflops"] = opt(x.tflops);
    o["tbps"] = opt(x.tbps);
    o["sm_mhz"] = r.sm_mhz > 0 ? json(r.sm_mhz) : json(nullptr);
    o["flashmla_us"] = r.flashmla_us > 0 ? json(r.flashmla_us) : json(nullptr);
    o["flashmla_tflops"] = opt(x.fm_tflops);
    o["flashmla_over_ours"] = opt(x.fm_over_ours);
    rows.push_back(o);
  }
  j["rows"] = rows;
  json skipped = json::array();
  for (const DecodeSweepSkip& k : s.skipped) {
    json o = point(k.point);
    o["reason"] = k.reason;
    skipped.push_back(o);
  }
  j["skipped"] = skipped;
  return j.dump(2) + "\n";
}

std::string format_decode_sweep_csv(const DecodeSweep& s) {
  std::string out =
      "device,protocol,kernels,batch,next_n,cache,num_heads,s_k,topk,way,kernel,median_us,min_us,max_us,mean_us,warmup,runs,valid,"
      "distinct_rows,flops,bytes,tflops,tbps,sm_mhz,flashmla_us,flashmla_tflops,flashmla_over_ours\n";
  auto opt = [](double v) { return v >= 0 ? num(v) : std::string(); };
  for (const DecodeSweepRow& r : s.rows) {
    const Rates x = rates(r);
    const DecodeSweepPoint& p = r.point;
    out += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", csv_field(s.device),
                       csv_field(s.protocol), csv_field(s.kernels), p.batch, p.next_n, p.cache, p.num_heads, p.s_k, p.topk, p.way,
                       csv_field(r.kernel), num(r.median_us), num(r.min_us), num(r.max_us), num(r.mean_us), r.warmup, r.runs,
                       r.valid, r.distinct, num(r.flops), num(r.bytes), opt(x.tflops), opt(x.tbps),
                       r.sm_mhz > 0 ? num(r.sm_mhz) : std::string(), r.flashmla_us > 0 ? num(r.flashmla_us) : std::string(),
                       opt(x.fm_tflops), opt(x.fm_over_ours));
  }
  return out;
}

}  // namespace dsa
