#include "cli_common.h"

#include <fmt/format.h>

#include <unistd.h>

#include <charconv>
#include <filesystem>
#include <utility>

#include "dsa/error.h"
#include "dsa/safetensors.h"

namespace dsa::cli {

void add_config_options(CLI::App* app, ConfigOptions& o) {
  app->add_option("--config", o.config_path, "Hugging Face config.json of the model (keys the layer does not use are ignored)")
      ->check(kNonEmpty);
  app->add_option("--hidden-size", o.hidden_size, "model width (7168)");
  app->add_option("--num-heads", o.num_heads, "attention heads on this rank, a multiple of 64 (128; 64 at TP=2)");
  app->add_option("--q-lora-rank", o.q_lora_rank, "query latent width (1536)");
  app->add_option("--kv-lora-rank", o.kv_lora_rank, "compressed KV latent width (512)");
  app->add_option("--qk-nope-head-dim", o.qk_nope_head_dim, "non-rotary q/k width per head (128)");
  app->add_option("--qk-rope-head-dim", o.qk_rope_head_dim, "rotary width (64)");
  app->add_option("--v-head-dim", o.v_head_dim, "value width per head (128)");
  app->add_option("--index-n-heads", o.index_n_heads, "indexer query heads (64)");
  app->add_option("--index-head-dim", o.index_head_dim, "indexer head width (128)");
  app->add_option("--topk", o.index_topk, "tokens each query attends to (2048)");
  app->add_option("--tokens-per-block", o.tokens_per_block, "page size of both caches (64)");
  app->add_option("--rope-theta", o.rope_theta, "RoPE base (10000)");
  app->add_option("--rms-norm-eps", o.rms_norm_eps, "RMSNorm / LayerNorm epsilon (1e-6)");
  app->add_option("--kv-cache-dtype", o.kv_cache_dtype, "latent cache format: bf16 (prefill and decode) or fp8 (decode only)");
  app->add_flag("--no-hadamard", o.no_hadamard, "skip the indexer's Hadamard rotation (some engines drop it)");
  app->add_flag("--o-proj", o.o_proj, "apply o_proj: output [T, hidden] instead of [T, H*v_head_dim]");
}

LayerConfig resolve_config(const ConfigOptions& o, const LayerConfig* recorded) {
  LayerConfig c = recorded ? *recorded : LayerConfig{};
  if (!o.config_path.empty()) c = load_config_json_file(o.config_path);
  auto set = [](auto& dst, const auto& src) {
    if (src) dst = *src;
  };
  set(c.hidden_size, o.hidden_size);
  set(c.num_heads, o.num_heads);
  set(c.q_lora_rank, o.q_lora_rank);
  set(c.kv_lora_rank, o.kv_lora_rank);
  set(c.qk_nope_head_dim, o.qk_nope_head_dim);
  set(c.qk_rope_head_dim, o.qk_rope_head_dim);
  set(c.v_head_dim, o.v_head_dim);
  set(c.index_n_heads, o.index_n_heads);
  set(c.index_head_dim, o.index_head_dim);
  set(c.index_topk, o.index_topk);
  set(c.tokens_per_block, o.tokens_per_block);
  set(c.rope_theta, o.rope_theta);
  set(c.rms_norm_eps, o.rms_norm_eps);
  if (o.kv_cache_dtype) c.kv_cache_dtype = parse_latent_cache_dtype(*o.kv_cache_dtype);
  if (o.no_hadamard) c.indexer_hadamard = false;
  if (o.o_proj) c.o_proj = true;
  validate(c);
  return c;
}

void add_batch_options(CLI::App* app, BatchOptions& o, int64_t default_new) {
  o.num_new = default_new;
  app->add_option("--batch", o.batch, "requests in the step (all of the same shape)");
  app->add_option("--cached", o.cached, "tokens already cached per request");
  app->add_option("--new", o.num_new, "new tokens per request (decode: 1; speculative: 2..4)");
  app->add_option("--requests", o.requests, "ragged batch as cached:new pairs, e.g. 0:4096,32768:1,1024:2 (overrides --batch/--cached/--new)")
      ->check(kNonEmpty);
}

std::vector<StepRequest> resolve_requests(const BatchOptions& o) {
  if (!o.requests.empty()) return parse_request_list(o.requests);
  return uniform_requests(o.batch, o.cached, o.num_new);
}

const CLI::Validator kNonEmpty(
    [](std::string& v) { return v.empty() ? std::string("the value is empty ('')") : std::string(); }, "NON-EMPTY", "NonEmpty");

void check_writable(const std::string& path, const char* flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (fs::exists(st)) {
    if (!fs::is_regular_file(st)) {
      throw ConfigError(fmt::format("{} '{}' is {}; give a file path", flag, path, fs::is_directory(st) ? "a directory" : "not a regular file"));
    }
    if (::access(path.c_str(), W_OK) != 0) throw ConfigError(fmt::format("{} '{}' exists and is not writable", flag, path));
    return;
  }
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  if (!fs::is_directory(dir, ec)) {
    throw ConfigError(fmt::format("{} '{}': the folder '{}' does not exist; create it first", flag, path, dir.string()));
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    throw ConfigError(fmt::format("{} '{}': the folder '{}' is not writable", flag, path, dir.string()));
  }
}

std::string flag_for_parameter(const std::string& parameter) {
  // One table: library parameter -> flag. config.json spellings that differ
  // from the LayerConfig field (num_attention_heads) are listed too.
  static const std::pair<const char*, const char*> kFlags[] = {
      {"hidden_size", "--hidden-size"},
      {"num_heads", "--num-heads"},
      {"num_attention_heads", "--num-heads"},
      {"q_lora_rank", "--q-lora-rank"},
      {"kv_lora_rank", "--kv-lora-rank"},
      {"qk_nope_head_dim", "--qk-nope-head-dim"},
      {"qk_rope_head_dim", "--qk-rope-head-dim"},
      {"v_head_dim", "--v-head-dim"},
      {"index_n_heads", "--index-n-heads"},
      {"index_head_dim", "--index-head-dim"},
      {"index_topk", "--topk"},
      {"tokens_per_block", "--tokens-per-block"},
      {"rope_theta", "--rope-theta"},
      {"rms_norm_eps", "--rms-norm-eps"},
      {"kv_cache_dtype", "--kv-cache-dtype"},
      {"indexer_hadamard", "--no-hadamard"},
      {"o_proj", "--o-proj"},
      {"batch", "--batch"},
      {"cached", "--cached"},
      {"num_new", "--new"},
      {"requests", "--requests"},
      {"num_layers", "--num-layers"},
      {"layer", "--layer"},
      {"seed", "--seed"},
      {"protocol", "--protocol"},
      {"stage", "--stage"},
      {"warmup", "--warmup"},
      {"iters", "--iters"},
      {"tokens", "--tokens"},
      {"bytes", "--memory-gib"},
      {"allow_nonfinite", "--allow-nonfinite"},
      {"sample", "--sample-tokens"},
      {"cuda_graph", "--graph"},
      {"kernels", "--kernels"},
  };
  for (const auto& [p, f] : kFlags)
    if (parameter == p) return f;
  return {};
}

std::string error_text(const Error& e) {
  const std::string flag = flag_for_parameter(e.parameter());
  if (flag.empty()) return e.what();
  return fmt::format("{} (set with {})", e.what(), flag);
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024.0 && u < 4) {
    b /= 1024.0;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} {}", b, units[u]) : fmt::format("{:.2f} {}", b, units[u]);
}

namespace {

template <class T>
void metadata_integer(const st::Reader& r, const char* key, std::optional<T>& out) {
  const auto it = r.metadata().find(key);
  if (it == r.metadata().end()) return;
  const std::string& s = it->second;
  T v{};
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size()) {
    throw FileError(fmt::format("'{}': metadata {} = '{}' is not an integer; the file was not written by dsa run", r.path(), key, s));
  }
  out = v;
}

}  // namespace

Recorded read_recorded(const std::string& path) {
  Recorded rec;
  const st::Reader r(path);  // the header only
  if (auto it = r.metadata().find(kMetaConfig); it != r.metadata().end()) {
    rec.cfg = config_from_json_text(it->second, fmt::format("'{}' metadata {}", path, kMetaConfig));
  }
  metadata_integer(r, kMetaSeed, rec.seed);
  metadata_integer(r, kMetaLayer, rec.layer);
  return rec;
}

bool is_checkpoint_index(const std::string& path) {
  return path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0;
}

void add_weights_options(CLI::App* app, WeightsOptions& o) {
  app->add_option("--weights", o.path,
                  "one layer's weights: .safetensors (bf16, or fp8 with weight_scale_inv) or a model.safetensors.index.json; "
                  "omitted: synthetic weights from --seed")
      ->check(kNonEmpty);
  app->add_option("--layer", o.layer, "with --weights: layer index L of the names model.layers.L.self_attn.* (default: the file's dsa.layer, else 0)");
}

ResolvedWeights resolve_weights(const ConfigOptions& c, const WeightsOptions& w, bool layer_given) {
  ResolvedWeights r;
  if (w.path.empty()) {
    if (layer_given) throw ConfigError("--layer picks a layer of the --weights file; give --weights too, or drop --layer");
    r.cfg = resolve_config(c);
    return r;
  }
  const Recorded rec = is_checkpoint_index(w.path) ? Recorded{} : read_recorded(w.path);
  r.cfg = resolve_config(c, rec.cfg ? &*rec.cfg : nullptr);
  const int64_t layer = layer_given ? w.layer : rec.layer ? *rec.layer : 0;
  if (layer < 0) throw ConfigError(fmt::format("layer = {} is invalid: layer indices start at 0", layer), "layer");
  r.weights = load_weights(r.cfg, w.path, layer, w.allow_nonfinite);
  r.description = fmt::format("{} (layer {})", w.path, layer);
  return r;
}

}  // namespace dsa::cli
