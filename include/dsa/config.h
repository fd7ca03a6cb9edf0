#pragma once
// Layer configuration: the dimensions of spec section 1 with DeepSeek-V3.2
// defaults, readable from a Hugging Face config.json (same key names) and
// overridable from the command line.
#include <cstdint>
#include <string>
#include <vector>

namespace dsa {

enum class LatentCacheDType { BF16, FP8 };

const char* to_string(LatentCacheDType d);
LatentCacheDType parse_latent_cache_dtype(const std::string& s);  // "bf16" | "fp8"; throws ConfigError

struct RopeScaling {
  std::string type = "yarn";  // "yarn" or "none"
  double factor = 40.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 1.0;
};

// Upper bounds validate() enforces (lower bounds and divisibility: validate()).
// They are far above any real model (DeepSeek-V3.2's value in parentheses)
// and keep every size product of the layer (weights, activations, cache rows,
// FLOP counts) well inside int64, so nothing downstream overflows; what a
// machine can hold is checked where memory is sized (CacheConfig, the CLI).
struct ConfigLimits {
  static constexpr int64_t kMaxWidth = int64_t{1} << 16;          // hidden_size (7168), q_lora_rank (1536), kv_lora_rank (512)
  static constexpr int64_t kMaxHeads = int64_t{1} << 12;          // num_heads (128), index_n_heads (64)
  static constexpr int64_t kMaxHeadDim = int64_t{1} << 10;        // qk_nope_head_dim, v_head_dim (128)
  static constexpr int64_t kMaxTopk = int64_t{1} << 16;           // index_topk (2048)
  static constexpr int64_t kMaxTokensPerBlock = int64_t{1} << 12; // tokens_per_block (64)
  static constexpr int64_t kMaxPositionEmbeddings = int64_t{1} << 31;  // rope_scaling.original_max_position_embeddings (4096)
};

struct LayerConfig {
  int64_t hidden_size = 7168;
  int64_t num_heads = 128;  // H, heads on this rank
  int64_t q_lora_rank = 1536;
  int64_t kv_lora_rank = 512;
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;
  int64_t index_n_heads = 64;
  int64_t index_head_dim = 128;
  int64_t index_topk = 2048;
  int64_t tokens_per_block = 64;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;

  // Not model keys: how this layer is run.
  LatentCacheDType kv_cache_dtype = LatentCacheDType::BF16;
  bool indexer_hadamard = true;  // rotate indexer q/k by the 128-point Hadamard before fp8
  bool o_proj = false;           // apply o_proj, output [T, hidden] instead of [T, H*v_head_dim]

  // Derived quantities.
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }  // 192
  int64_t latent_dim() const { return kv_lora_rank + qk_rope_head_dim; }        // 576
  double yarn_mscale() const;       // 0.1 * mscale_all_dim * ln(factor) + 1 (1 without yarn)
  double softmax_scale() const;     // qk_head_dim^-0.5 * yarn_mscale()^2
  int64_t latent_cache_bytes_per_token() const;   // 1152 bf16, 656 fp8
  int64_t indexer_cache_bytes_per_token() const;  // index_head_dim + 4 = 132
  int64_t indexer_cache_bytes_per_block() const;  // tokens_per_block * 132 = 8448
};

// Rebuilds from a JSON object string / file. Keys the layer uses are checked
// for type; missing required keys are an error naming the key; every other key
// of a full model config is ignored. Throws ConfigError / FileError.
// The file must be a regular file of at most 64 MiB (a directory, a FIFO or a
// device such as /dev/zero is refused before anything is read).
LayerConfig load_config_json_text(const std::string& text, const std::string& origin = "<string>");
LayerConfig load_config_json_file(const std::string& path);

// The configuration as a JSON object: every key load_config_json_text reads
// (config.json spellings) plus the run settings tokens_per_block,
// kv_cache_dtype, indexer_hadamard and o_proj, with doubles written exactly.
// config_from_json_text(config_to_json(c)) == c; saved run files record it.
std::string config_to_json(const LayerConfig& cfg);
LayerConfig config_from_json_text(const std::string& text, const std::string& origin);

// Checks sizes and rules every backend shares: every dimension within
// ConfigLimits, and the derived values (yarn mscale, softmax scale, RoPE
// inverse frequencies) finite and positive. Throws ConfigError with a message
// that names the value, the rule and a fix, and parameter() set to the field.
void validate(const LayerConfig& cfg);

// What the CUDA backend accepts on a GPU of this compute capability: it is
// compiled for sm_90a only, so the GPU must be sm_90 (Hopper), else
// NoDeviceError; its indexer kernels take index_n_heads = 64 and
// tokens_per_block = 64 (ConfigError). Heads a multiple of 64 (the sm_90a
// sparse MLA kernel runs 64 or 128, the simple kernel other multiples) is
// enforced by validate() on every backend, so that whatever runs on the
// reference also runs on the GPU.
void validate_for_gpu(const LayerConfig& cfg, int sm_major, int sm_minor);

// The sparse prefill path reads a bf16 latent cache only.
void validate_for_sparse_prefill(const LayerConfig& cfg);

// Yarn-corrected RoPE inverse frequencies f_i' of spec section 6 in fp64,
// i in [0, qk_rope_head_dim / 2): the reference uses them as they are, the
// CUDA kernels receive them cast to fp32.
std::vector<double> rope_inv_freq(const LayerConfig& cfg);

// Number of weight elements of one layer (FLOPs per stage: dsa/stages.h).
int64_t weight_count(const LayerConfig& cfg);

}  // namespace dsa
