#include "dsa/config.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dsa/error.h"

namespace dsa {

using nlohmann::json;

const char* to_string(LatentCacheDType d) { return d == LatentCacheDType::BF16 ? "bf16" : "fp8"; }

LatentCacheDType parse_latent_cache_dtype(const std::string& s) {
  if (s == "bf16" || s == "bfloat16") return LatentCacheDType::BF16;
  if (s == "fp8" || s == "fp8_e4m3" || s == "float8_e4m3fn") return LatentCacheDType::FP8;
  throw ConfigError(fmt::format(
      "kv_cache_dtype '{}' is not known: use 'bf16' (1152 bytes per token, required by the sparse "
      "prefill kernel) or 'fp8' (656 bytes per token, decode only)",
      s), "kv_cache_dtype");
}

double LayerConfig::yarn_mscale() const {
  if (rope_scaling.type != "yarn" || rope_scaling.factor <= 1.0) return 1.0;
  return 0.1 * rope_scaling.mscale_all_dim * std::log(rope_scaling.factor) + 1.0;
}

double LayerConfig::softmax_scale() const {
  const double m = yarn_mscale();
  return std::pow(static_cast<double>(qk_head_dim()), -0.5) * m * m;
}

int64_t LayerConfig::latent_cache_bytes_per_token() const {
  if (kv_cache_dtype == LatentCacheDType::BF16) return latent_dim() * 2;
  // fp8 c_kv, one fp32 scale per 128 values, then k_pe in bf16.
  return kv_lora_rank + (kv_lora_rank / 128) * 4 + qk_rope_head_dim * 2;
}

int64_t LayerConfig::indexer_cache_bytes_per_token() const { return index_head_dim + 4; }

int64_t LayerConfig::indexer_cache_bytes_per_block() const {
  return tokens_per_block * indexer_cache_bytes_per_token();
}

namespace {

std::string type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "an integer";
  if (v.is_number_float()) return "a floating-point number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

const json* find(const json& obj, std::initializer_list<const char*> keys) {
  for (const char* k : keys) {
    auto it = obj.find(k);
    if (it != obj.end()) return &*it;
  }
  return nullptr;
}

int64_t get_int(const json& v, const std::string& key, const std::string& origin) {
  if (v.is_number_integer() || v.is_number_unsigned()) return v.get<int64_t>();
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::floor(d) == d && std::fabs(d) < 9e15) return static_cast<int64_t>(d);
  }
  throw ConfigError(fmt::format("{}: key '{}' must be an integer, but it is {} ({}); write it as a plain number, e.g. \"{}\": 128",
                                origin, key, type_name(v), v.dump(), key), key);
}

double get_num(const json& v, const std::string& key, const std::string& origin) {
  if (v.is_number()) return v.get<double>();
  throw ConfigError(fmt::format("{}: key '{}' must be a number, but it is {} ({}); write it as a plain number",
                                origin, key, type_name(v), v.dump()), key);
}

void req_int(const json& obj, std::initializer_list<const char*> keys, int64_t& out, const std::string& origin) {
  const json* v = find(obj, keys);
  if (!v) {
    throw ConfigError(fmt::format("{}: required key '{}' is missing; add it (DeepSeek-V3.2 uses {})", origin, *keys.begin(), out),
                      *keys.begin());
  }
  out = get_int(*v, *keys.begin(), origin);
}

void opt_num(const json& obj, const char* key, double& out, const std::string& origin) {
  auto it = obj.find(key);
  if (it != obj.end() && !it->is_null()) out = get_num(*it, key, origin);
}

json parse_object(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number past double (1e606)
    throw FileError(fmt::format("{}: malformed JSON ({}); fix the file or pass a valid Hugging Face config.json", origin, e.what()));
  }
  if (!j.is_object()) {
    throw FileError(fmt::format("{}: expected a JSON object at the top level, found {}", origin, type_name(j)));
  }
  return j;
}

LayerConfig parse_model_keys(const json& j, const std::string& origin) {
  LayerConfig c;
  req_int(j, {"hidden_size"}, c.hidden_size, origin);
  req_int(j, {"num_attention_heads", "num_heads"}, c.num_heads, origin);
  req_int(j, {"q_lora_rank"}, c.q_lora_rank, origin);
  req_int(j, {"kv_lora_rank"}, c.kv_lora_rank, origin);
  req_int(j, {"qk_nope_head_dim"}, c.qk_nope_head_dim, origin);
  req_int(j, {"qk_rope_head_dim"}, c.qk_rope_head_dim, origin);
  req_int(j, {"v_head_dim"}, c.v_head_dim, origin);
  req_int(j, {"index_n_heads"}, c.index_n_heads, origin);
  req_int(j, {"index_head_dim"}, c.index_head_dim, origin);
  req_int(j, {"index_topk"}, c.index_topk, origin);
  opt_num(j, "rms_norm_eps", c.rms_norm_eps, origin);
  opt_num(j, "rope_theta", c.rope_theta, origin);
  if (auto it = j.find("tokens_per_block"); it != j.end()) c.tokens_per_block = get_int(*it, "tokens_per_block", origin);

  auto rs = j.find("rope_scaling");
  if (rs == j.end() || rs->is_null()) {
    c.rope_scaling = RopeScaling{};
    c.rope_scaling.type = "none";
    c.rope_scaling.factor = 1.0;
  } else if (!rs->is_object()) {
    throw ConfigError(fmt::format("{}: key 'rope_scaling' must be an object or null, but it is {}", origin, type_name(*rs)));
  } else {
    const json* t = find(*rs, {"type", "rope_type"});
    if (!t) throw ConfigError(fmt::format("{}: 'rope_scaling' has no 'type'; DeepSeek-V3.2 uses \"type\": \"yarn\"", origin));
    if (!t->is_string()) {
      throw ConfigError(fmt::format("{}: key 'rope_scaling.type' must be a string, but it is {}", origin, type_name(*t)));
    }
    c.rope_scaling.type = t->get<std::string>();
    if (c.rope_scaling.type != "yarn" && c.rope_scaling.type != "none" && c.rope_scaling.type != "default") {
      throw ConfigError(fmt::format("{}: rope_scaling.type '{}' is not supported: the layer implements 'yarn' (DeepSeek-V3.2) or no scaling",
                                    origin, c.rope_scaling.type));
    }
    if (c.rope_scaling.type == "default") c.rope_scaling.type = "none";
    if (c.rope_scaling.type == "yarn") {
      const json* f = find(*rs, {"factor"});
      if (!f) throw ConfigError(fmt::format("{}: required key 'rope_scaling.factor' is missing; DeepSeek-V3.2 uses 40", origin));
      c.rope_scaling.factor = get_num(*f, "rope_scaling.factor", origin);
      const json* o = find(*rs, {"original_max_position_embeddings"});
      if (!o) {
        throw ConfigError(fmt::format("{}: required key 'rope_scaling.original_max_position_embeddings' is missing; DeepSeek-V3.2 uses 4096", origin));
      }
      c.rope_scaling.original_max_position_embeddings = get_int(*o, "rope_scaling.original_max_position_embeddings", origin);
      opt_num(*rs, "beta_fast", c.rope_scaling.beta_fast, origin);
      opt_num(*rs, "beta_slow", c.rope_scaling.beta_slow, origin);
      opt_num(*rs, "mscale", c.rope_scaling.mscale, origin);
      opt_num(*rs, "mscale_all_dim", c.rope_scaling.mscale_all_dim, origin);
    }
  }
  return c;
}

bool get_bool(const json& j, const char* key, const std::string& origin) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_boolean()) {
    throw ConfigError(fmt::format("{}: key '{}' must be true or false", origin, key), key);
  }
  return it->get<bool>();
}

}  // namespace

LayerConfig load_config_json_text(const std::string& text, const std::string& origin) {
  return parse_model_keys(parse_object(text, origin), origin);
}

// A config.json is small; the cap keeps a wrong path (a disk image, a log)
// from being read whole.
constexpr uintmax_t kMaxConfigBytes = uintmax_t{64} << 20;

LayerConfig load_config_json_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) {
    throw FileError(fmt::format("cannot open config file '{}': {}; check the path (it should be a Hugging Face config.json)", path,
                                ec ? ec.message() : "no such file"));
  }
  // Reading a FIFO or a device such as /dev/zero would block or never end.
  if (fs::is_directory(st)) {
    throw FileError(fmt::format("config '{}' is a directory; give the config.json inside it", path));
  }
  if (!fs::is_regular_file(st)) {
    throw FileError(fmt::format("config '{}' is not a regular file (a device, FIFO or socket); give a Hugging Face config.json", path));
  }
  const uintmax_t size = fs::file_size(path, ec);
  if (ec || size > kMaxConfigBytes) {
    throw FileError(fmt::format("config '{}' has {} bytes, more than the {} a config.json can reasonably have; check the path", path,
                                size, kMaxConfigBytes));
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) throw FileError(fmt::format("cannot open config file '{}': check the path and permissions", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return load_config_json_text(ss.str(), path);
}

std::string config_to_json(const LayerConfig& c) {
  json j = json::object();
  j["hidden_size"] = c.hidden_size;
  j["num_attention_heads"] = c.num_heads;
  j["q_lora_rank"] = c.q_lora_rank;
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["index_n_heads"] = c.index_n_heads;
  j["index_head_dim"] = c.index_head_dim;
  j["index_topk"] = c.index_topk;
  j["tokens_per_block"] = c.tokens_per_block;
  j["rms_norm_eps"] = c.rms_norm_eps;  // nlohmann writes doubles with enough digits to read back exactly
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.type == "yarn") {
    j["rope_scaling"] = {{"type", "yarn"},
                         {"factor", c.rope_scaling.factor},
                         {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings},
                         {"beta_fast", c.rope_scaling.beta_fast},
                         {"beta_slow", c.rope_scaling.beta_slow},
                         {"mscale", c.rope_scaling.mscale},
                         {"mscale_all_dim", c.rope_scaling.mscale_all_dim}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["kv_cache_dtype"] = to_string(c.kv_cache_dtype);
  j["indexer_hadamard"] = c.indexer_hadamard;
  j["o_proj"] = c.o_proj;
  return j.dump();
}

LayerConfig config_from_json_text(const std::string& text, const std::string& origin) {
  const json j = parse_object(text, origin);
  LayerConfig c = parse_model_keys(j, origin);
  if (!j.contains("tokens_per_block")) {
    throw ConfigError(fmt::format("{}: key 'tokens_per_block' is missing; the configuration was not written by config_to_json", origin),
                      "tokens_per_block");
  }
  const auto dt = j.find("kv_cache_dtype");
  if (dt == j.end() || !dt->is_string()) {
    throw ConfigError(fmt::format("{}: key 'kv_cache_dtype' must be \"bf16\" or \"fp8\"", origin), "kv_cache_dtype");
  }
  c.kv_cache_dtype = parse_latent_cache_dtype(dt->get<std::string>());
  c.indexer_hadamard = get_bool(j, "indexer_hadamard", origin);
  c.o_proj = get_bool(j, "o_proj", origin);
  return c;
}

namespace {

void in_range(const char* name, int64_t v, int64_t max, const char* why) {
  if (v <= 0) throw ConfigError(fmt::format("{} = {} is invalid: it must be a positive integer ({})", name, v, why), name);
  if (v > max) {
    throw ConfigError(fmt::format("{} = {} is too large: the limit is {} ({})", name, v, max, why), name);
  }
}

void finite_positive(const char* name, double v, const char* why) {
  if (!(v > 0.0) || !std::isfinite(v)) {
    throw ConfigError(fmt::format("{} = {} is invalid: it must be a positive finite number; {}", name, v, why), name);
  }
}

void finite(const char* name, double v, const char* why) {
  if (!std::isfinite(v)) throw ConfigError(fmt::format("{} = {} is invalid: it must be finite; {}", name, v, why), name);
}

}  // namespace

void validate(const LayerConfig& c) {
  using L = ConfigLimits;
  in_range("hidden_size", c.hidden_size, L::kMaxWidth, "DeepSeek-V3.2 uses 7168");
  in_range("num_heads", c.num_heads, L::kMaxHeads, "DeepSeek-V3.2 uses 128, or 64 per rank at TP=2");
  in_range("q_lora_rank", c.q_lora_rank, L::kMaxWidth, "DeepSeek-V3.2 uses 1536");
  in_range("kv_lora_rank", c.kv_lora_rank, L::kMaxWidth, "DeepSeek-V3.2 uses 512");
  in_range("qk_nope_head_dim", c.qk_nope_head_dim, L::kMaxHeadDim, "DeepSeek-V3.2 uses 128");
  in_range("qk_rope_head_dim", c.qk_rope_head_dim, L::kMaxHeadDim, "DeepSeek-V3.2 uses 64");
  in_range("v_head_dim", c.v_head_dim, L::kMaxHeadDim, "DeepSeek-V3.2 uses 128");
  in_range("index_n_heads", c.index_n_heads, L::kMaxHeads, "DeepSeek-V3.2 uses 64");
  in_range("index_head_dim", c.index_head_dim, L::kMaxHeadDim, "DeepSeek-V3.2 uses 128");
  in_range("index_topk", c.index_topk, L::kMaxTopk, "DeepSeek-V3.2 uses 2048");
  in_range("tokens_per_block", c.tokens_per_block, L::kMaxTokensPerBlock, "both caches use 64-token pages");
  if (c.num_heads % 64 != 0) {
    throw ConfigError(fmt::format(
        "num_heads = {} is not supported: the sm_90 sparse MLA kernel needs a multiple of 64 (64 or 128 for "
        "DeepSeek-V3.2; 128 is one rank at TP=1, 64 at TP=2), and every backend enforces it so that what runs on the "
        "reference also runs on the GPU; set num_heads to 64 or 128",
        c.num_heads), "num_heads");
  }
  if (c.kv_lora_rank % 128 != 0) {
    throw ConfigError(fmt::format("kv_lora_rank = {} is not supported: it must be a multiple of 128 (fp8 cache scales cover 128 values); DeepSeek-V3.2 uses 512",
                                  c.kv_lora_rank), "kv_lora_rank");
  }
  if (c.qk_rope_head_dim % 2 != 0) {
    throw ConfigError(fmt::format("qk_rope_head_dim = {} is invalid: RoPE rotates pairs, so it must be even; DeepSeek-V3.2 uses 64", c.qk_rope_head_dim),
                      "qk_rope_head_dim");
  }
  if (c.index_head_dim != 128) {
    throw ConfigError(fmt::format(
        "index_head_dim = {} is not supported: the indexer K cache layout (132 bytes per token) and the 128-point Hadamard "
        "rotation fix it at 128; use 128",
        c.index_head_dim), "index_head_dim");
  }
  if (c.qk_rope_head_dim > c.index_head_dim) {
    throw ConfigError(fmt::format("qk_rope_head_dim = {} exceeds index_head_dim = {}: the indexer ropes its first qk_rope_head_dim dims",
                                  c.qk_rope_head_dim, c.index_head_dim), "qk_rope_head_dim");
  }
  if (c.index_topk % 64 != 0) {
    throw ConfigError(fmt::format("index_topk = {} is not supported: it must be a multiple of 64 (the attention kernels take indices in tiles of 64); DeepSeek-V3.2 uses 2048",
                                  c.index_topk), "index_topk");
  }
  finite_positive("rms_norm_eps", c.rms_norm_eps, "DeepSeek-V3.2 uses 1e-6");
  finite_positive("rope_theta", c.rope_theta, "DeepSeek-V3.2 uses 10000");
  if (!(c.rope_theta > 1.0)) {
    // theta^(-2i/d) must fall with i, and yarn divides by ln(theta).
    throw ConfigError(fmt::format("rope_theta = {} is invalid: RoPE needs a base greater than 1 (its frequencies theta^(-2i/d) must "
                                  "fall with i); DeepSeek-V3.2 uses 10000",
                                  c.rope_theta),
                      "rope_theta");
  }
  if (c.rope_scaling.type == "yarn") {
    const RopeScaling& y = c.rope_scaling;
    if (!(y.factor >= 1.0) || !std::isfinite(y.factor)) {
      throw ConfigError(fmt::format("rope_scaling.factor = {} is invalid: yarn needs a finite factor >= 1; DeepSeek-V3.2 uses 40", y.factor),
                        "rope_scaling.factor");
    }
    if (y.original_max_position_embeddings <= 0 || y.original_max_position_embeddings > ConfigLimits::kMaxPositionEmbeddings) {
      throw ConfigError(fmt::format("rope_scaling.original_max_position_embeddings = {} is invalid: it must be in [1, {}]; "
                                    "DeepSeek-V3.2 uses 4096",
                                    y.original_max_position_embeddings, ConfigLimits::kMaxPositionEmbeddings),
                        "rope_scaling.original_max_position_embeddings");
    }
    finite("rope_scaling.beta_fast", y.beta_fast, "DeepSeek-V3.2 uses 32");
    finite("rope_scaling.beta_slow", y.beta_slow, "DeepSeek-V3.2 uses 1");
    if (!(y.beta_fast > y.beta_slow) || !(y.beta_slow > 0.0)) {
      throw ConfigError(fmt::format("rope_scaling beta_fast = {} / beta_slow = {} are invalid: need beta_fast > beta_slow > 0; DeepSeek-V3.2 uses 32 and 1",
                                    y.beta_fast, y.beta_slow),
                        y.beta_slow > 0.0 ? "rope_scaling.beta_fast" : "rope_scaling.beta_slow");
    }
    finite("rope_scaling.mscale", y.mscale, "DeepSeek-V3.2 uses 1");
    finite("rope_scaling.mscale_all_dim", y.mscale_all_dim, "DeepSeek-V3.2 uses 1");
  }
  // Derived values: each must be finite and positive, in fp32 too (the GPU
  // kernels take them as float).
  const double m = c.yarn_mscale();
  if (!(m > 0.0) || !std::isfinite(m)) {
    throw ConfigError(fmt::format("rope_scaling.mscale_all_dim = {} gives a yarn mscale of {} (0.1 * mscale_all_dim * ln(factor {}) + 1), "
                                  "which must be positive and finite; DeepSeek-V3.2 uses mscale_all_dim 1 (mscale 1.368888)",
                                  c.rope_scaling.mscale_all_dim, m, c.rope_scaling.factor),
                      "rope_scaling.mscale_all_dim");
  }
  const double scale = c.softmax_scale();
  if (!(scale > 0.0) || !(scale <= std::numeric_limits<float>::max())) {
    throw ConfigError(fmt::format("the softmax scale qk_head_dim^-0.5 * mscale^2 = {} (mscale {}) is not a positive finite fp32 "
                                  "number; lower rope_scaling.mscale_all_dim (DeepSeek-V3.2: softmax scale 0.1352)",
                                  scale, m),
                      "rope_scaling.mscale_all_dim");
  }
  const std::vector<double> f = rope_inv_freq(c);
  for (size_t i = 0; i < f.size(); ++i) {
    if (!(f[i] > 0.0) || !std::isfinite(f[i]) || !(static_cast<float>(f[i]) > 0.0f)) {
      throw ConfigError(fmt::format("RoPE inverse frequency {} is {}: it must be positive and finite (and not underflow in fp32); "
                                    "check rope_theta = {} and the rope_scaling values",
                                    i, f[i], c.rope_theta),
                        "rope_theta");
    }
  }
}

void validate_for_gpu(const LayerConfig& c, int sm_major, int sm_minor) {
  validate(c);
  // The backend is compiled for sm_90a only (CMAKE_CUDA_ARCHITECTURES 90a):
  // wgmma and setmaxnreg code of an "a" target runs on that exact compute
  // capability and is neither forward- nor backward-compatible.
  if (sm_major != 9 || sm_minor != 0) {
    throw NoDeviceError(fmt::format(
        "GPU sm_{}{} is not supported: the CUDA backend is compiled for sm_90a only (Hopper, compute capability 9.0: "
        "H100, H200, H800, GH200), and sm_90a code runs on no other architecture; run on a Hopper GPU or on the CPU reference",
        sm_major, sm_minor));
  }
  // Heads: validate() already requires a multiple of 64; the sm_90a sparse MLA
  // kernel takes 64 or 128 heads (one or two 64-head wgmma tiles), other
  // multiples of 64 run on the simple CUDA kernel. The indexer logits kernels
  // are built for 64 indexer heads reading 64-token cache blocks.
  if (c.index_n_heads != 64) {
    throw ConfigError(fmt::format("index_n_heads = {} is not supported on the GPU: the sm_90a indexer kernels are built for 64 "
                                  "indexer heads (DeepSeek-V3.2); set index_n_heads to 64 or run on the CPU reference",
                                  c.index_n_heads),
                      "index_n_heads");
  }
  if (c.tokens_per_block != 64) {
    throw ConfigError(fmt::format("tokens_per_block = {} is not supported on the GPU: the sm_90a indexer kernels read 64-token "
                                  "cache blocks (spec section 4); set tokens_per_block to 64 or run on the CPU reference",
                                  c.tokens_per_block),
                      "tokens_per_block");
  }
}

void validate_for_sparse_prefill(const LayerConfig& c) {
  if (c.kv_cache_dtype != LatentCacheDType::BF16) {
    throw ConfigError(
        "kv_cache_dtype = fp8 cannot be used for the sparse prefill path: the sparse prefill kernel reads a bf16 latent "
        "cache only (the 656-byte fp8 form is for sparse decode); set kv_cache_dtype to bf16",
        "kv_cache_dtype");
  }
}

std::vector<double> rope_inv_freq(const LayerConfig& cfg) {
  const int64_t dim = cfg.qk_rope_head_dim;
  const int64_t half = dim / 2;
  std::vector<double> f(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) f[i] = std::pow(cfg.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
  if (cfg.rope_scaling.type != "yarn") return f;
  const auto& y = cfg.rope_scaling;
  const double two_pi = 2.0 * std::acos(-1.0);
  auto corr_dim = [&](double rotations) {
    return static_cast<double>(dim) * std::log(static_cast<double>(y.original_max_position_embeddings) / (rotations * two_pi)) /
           (2.0 * std::log(cfg.rope_theta));
  };
  double low = std::max(std::floor(corr_dim(y.beta_fast)), 0.0);
  double high = std::min(std::ceil(corr_dim(y.beta_slow)), static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // avoids 0/0 in the ramp, as DeepSeek's reference does
  for (int64_t i = 0; i < half; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    f[i] = f[i] / y.factor * ramp + f[i] * (1.0 - ramp);
  }
  return f;
}

int64_t weight_count(const LayerConfig& c) {
  const int64_t h = c.hidden_size, H = c.num_heads;
  int64_t n = 0;
  n += c.q_lora_rank * h + c.q_lora_rank;                                  // q_a_proj, q_a_layernorm
  n += H * c.qk_head_dim() * c.q_lora_rank;                                // q_b_proj
  n += c.latent_dim() * h + c.kv_lora_rank;                                // kv_a_proj_with_mqa, kv_a_layernorm
  n += H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank;          // kv_b_proj
  n += h * H * c.v_head_dim;                                               // o_proj
  n += c.index_n_heads * c.index_head_dim * c.q_lora_rank;                 // indexer.wq_b
  n += c.index_head_dim * h + 2 * c.index_head_dim;                        // indexer.wk, k_norm
  n += c.index_n_heads * h;                                                // indexer.weights_proj
  return n;
}

}  // namespace dsa
