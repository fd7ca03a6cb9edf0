#pragma once
// Options every subcommand shares: the layer configuration (defaults, then
// --config file, then explicit flags) and the batch shape.
#include <CLI/CLI.hpp>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "dsa/batch.h"
#include "dsa/config.h"
#include "dsa/error.h"
#include "dsa/layer.h"

namespace dsa::cli {

struct ConfigOptions {
  std::string config_path;
  std::optional<int64_t> hidden_size, num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
      v_head_dim, index_n_heads, index_head_dim, index_topk, tokens_per_block;
  std::optional<double> rope_theta, rms_norm_eps;
  std::optional<std::string> kv_cache_dtype;
  bool no_hadamard = false;
  bool o_proj = false;
};

void add_config_options(CLI::App* app, ConfigOptions& o);
// Defaults (or `recorded`, the configuration a saved run file holds), then
// the --config file, then flags; validated. Throws ConfigError / FileError.
LayerConfig resolve_config(const ConfigOptions& o, const LayerConfig* recorded = nullptr);

// CLI11 check for options whose value is a path or a list: an empty value
// ('') would otherwise read as "not given" and fall back to a default.
extern const CLI::Validator kNonEmpty;
// The parent folder of `path` exists and is writable, and `path` is not a
// directory or special file: checked before any work, so that a step does not
// run for minutes and then fail to write. Throws ConfigError naming `flag`.
void check_writable(const std::string& path, const char* flag);

struct BatchOptions {
  int64_t batch = 1;
  int64_t cached = 0;
  int64_t num_new = 0;     // 0: the subcommand's default
  std::string requests;    // "c:n,c:n,..." ragged list; overrides batch/cached/new
};
void add_batch_options(CLI::App* app, BatchOptions& o, int64_t default_new);
std::vector<StepRequest> resolve_requests(const BatchOptions& o);

std::string human_bytes(double bytes);

// Keys of the __metadata__ every file dsa run writes, so that a replay needs
// no flags repeated (docs/run-format.md).
inline constexpr const char* kMetaConfig = "dsa.config";  // config_to_json of the run's LayerConfig
inline constexpr const char* kMetaSeed = "dsa.seed";      // decimal uint64: weights, hidden and synthetic cache rows
inline constexpr const char* kMetaLayer = "dsa.layer";    // weights only: L of model.layers.L.self_attn.*

// What a file dsa run saved recorded (each part absent when it did not).
struct Recorded {
  std::optional<LayerConfig> cfg;
  std::optional<uint64_t> seed;
  std::optional<int64_t> layer;
};
// Reads the header of a .safetensors file only. Throws FileError.
Recorded read_recorded(const std::string& path);
// A model.safetensors.index.json (by its name) rather than one .safetensors file.
bool is_checkpoint_index(const std::string& path);

// --weights / --layer for the subcommands that run the layer on a
// checkpoint's weights instead of synthetic ones (bench, check).
struct WeightsOptions {
  std::string path;  // empty: synthetic weights
  int64_t layer = 0;
  bool allow_nonfinite = false;
};
void add_weights_options(CLI::App* app, WeightsOptions& o);

// The configuration (defaults, else the weights file's dsa.config, then
// --config, then flags) and, with --weights, the layer's weights.
struct ResolvedWeights {
  LayerConfig cfg;
  std::optional<LayerWeights> weights;  // absent: synthetic
  std::string description = "synthetic";  // "<path> (layer L)" for a file
};
// `layer_given`: --layer was on the command line (else the file's dsa.layer, else 0).
ResolvedWeights resolve_weights(const ConfigOptions& c, const WeightsOptions& w, bool layer_given);

// The command-line flag that sets a library parameter (dsa::Error::parameter():
// a LayerConfig / CacheConfig field, a config.json key or a function
// argument), or "" when no flag does.
std::string flag_for_parameter(const std::string& parameter);
// The text printed after "error: ": the library's message, then "(set with
// --flag)" when the error names a parameter a flag sets.
std::string error_text(const Error& e);

}  // namespace dsa::cli
