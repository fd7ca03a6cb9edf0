#pragma once
// The layer's weights and the intermediates a forward step can hand back
// (for `dsa run --dump`, `dsa check` and tests). Shared by the CPU reference
// and the CUDA backend so that both produce the same, comparable record.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dsa/config.h"
#include "dsa/dtypes.h"

namespace dsa {

// Hugging Face names of spec section 2 (prefix model.layers.{L}.self_attn.),
// [out, in] row-major, stored as bf16 (fp8 checkpoints are dequantized on load).
struct LayerWeights {
  std::vector<bf16_t> q_a_proj;            // [q_lora_rank, hidden]
  std::vector<bf16_t> q_a_layernorm;       // [q_lora_rank]
  std::vector<bf16_t> q_b_proj;            // [H * (nope + rope), q_lora_rank]
  std::vector<bf16_t> kv_a_proj_with_mqa;  // [kv_lora_rank + rope, hidden]
  std::vector<bf16_t> kv_a_layernorm;      // [kv_lora_rank]
  std::vector<bf16_t> kv_b_proj;           // [H * (nope + v), kv_lora_rank]: per head W_UK rows then W_UV rows
  std::vector<bf16_t> o_proj;              // [hidden, H * v]
  std::vector<bf16_t> idx_wq_b;            // indexer.wq_b [HI * DI, q_lora_rank]
  std::vector<bf16_t> idx_wk;              // indexer.wk [DI, hidden]
  std::vector<bf16_t> idx_k_norm_weight;   // indexer.k_norm.weight [DI]
  std::vector<bf16_t> idx_k_norm_bias;     // indexer.k_norm.bias [DI]
  std::vector<bf16_t> idx_weights_proj;    // indexer.weights_proj [HI, hidden]
};

// Which intermediates to keep. Logits are [T, max visible] fp32 and can be
// large (4096 x 4096 x 4 bytes = 64 MiB at the seed's shape), so they are opt-in.
struct TraceOptions {
  bool intermediates = true;
  bool logits = false;
};

// Intermediates of one forward step, host fp32 copies (bf16 / fp8 values as
// the stage stored them). Empty vectors mean "not recorded".
struct LayerTrace {
  std::vector<float> q_lat;        // [T, q_lora_rank] after q_a_layernorm
  std::vector<float> c_kv;         // [T, kv_lora_rank] after kv_a_layernorm
  std::vector<float> k_pe;         // [T, rope] after RoPE (interleaved)
  std::vector<float> q_nope;       // [T, H, nope]
  std::vector<float> q_pe;         // [T, H, rope] after RoPE
  std::vector<float> idx_q;        // [T, HI, DI] after RoPE and Hadamard, before fp8
  std::vector<float> idx_q_fp8;    // [T, HI, DI] fp8 values (unscaled)
  std::vector<float> idx_q_scale;  // [T, HI]
  std::vector<float> idx_k;        // [T, DI] after LayerNorm, RoPE and Hadamard, before fp8
  std::vector<float> idx_k_fp8;    // [T, DI]
  std::vector<float> idx_k_scale;  // [T]
  std::vector<float> idx_weights;  // [T, HI] folded weights w (spec 3.5)
  std::vector<float> idx_logits;   // [T, max_seq_len] (-inf where not visible), only with TraceOptions::logits
  std::vector<int32_t> topk_local;   // [T, topk] request-local positions, -1 padded
  std::vector<int32_t> topk_global;  // [T, topk] global slots, -1 padded
  std::vector<float> q_cat;        // [T, H, 576]
  std::vector<float> attn_out;     // [T, H, kv_lora_rank]
  std::vector<float> attn_lse;     // [T, H]
  std::vector<float> attn_max;     // [T, H]
  std::vector<float> output;       // [T, H * v] or [T, hidden] with o_proj
};

// Deterministic synthetic weights from a seed: no zeros, scaled so that
// activations stay in realistic ranges (unit-RMS hidden in, O(1) activations).
LayerWeights generate_weights(const LayerConfig& cfg, uint64_t seed);

// Deterministic synthetic hidden states [T, hidden] (bf16), unit RMS, no zeros.
std::vector<bf16_t> generate_hidden(const LayerConfig& cfg, int64_t T, uint64_t seed);

// Checks every tensor's size against the configuration; throws ShapeError naming the tensor.
void check_weights(const LayerConfig& cfg, const LayerWeights& w);

// NaN or Inf anywhere in a tensor is a ValueError naming the tensor and its
// first non-finite element as a multi-index of `shape` (parameter
// "allow_nonfinite": front ends may let such values through on request).
void check_finite(const std::string& tensor, const std::vector<int64_t>& shape, const bf16_t* v, int64_t n);
void check_finite(const std::string& tensor, const std::vector<int64_t>& shape, const float* v, int64_t n);
// Every weight, named by its Hugging Face name after `prefix` (weight_prefix(L)).
void check_weights_finite(const LayerConfig& cfg, const LayerWeights& w, const std::string& prefix = "");

// ---- weights files (src/core/weights_io.cpp) --------------------------------
// "model.layers.{layer}.self_attn."
std::string weight_prefix(int64_t layer);
// Loads one layer's attention weights by their Hugging Face names (spec
// section 2) from a .safetensors file, or from a sharded checkpoint's
// model.safetensors.index.json (each tensor read from the shard its
// weight_map names). Accepts BF16, F16, F32 (rounded to bf16), and F8_E4M3
// with a `<name>_scale_inv` tensor of fp32 scales per 128x128 block
// ([ceil(out/128), ceil(in/128)]; value = fp8 * scale, rounded to bf16).
// Shapes are checked against cfg. Throws FileError naming the tensor.
// Shard names in an index must stay inside the index's folder (no absolute
// paths, no ".." out of it). Unless allow_nonfinite, every weight and every
// fp8 block scale must be finite (ValueError naming the tensor and index).
LayerWeights load_weights(const LayerConfig& cfg, const std::string& path, int64_t layer = 0, bool allow_nonfinite = false);
// The weight_map of a model.safetensors.index.json given as text: tensor
// name -> shard path (the folder of `path` joined with the shard name, which
// must stay inside that folder, as load_weights requires). `path` names the
// index in messages. Throws FileError.
std::map<std::string, std::string> checkpoint_index_shards(const std::string& text, const std::string& path);
// Writes the weights as bf16 under the same names (a file load_weights reads
// back bit for bit), with `metadata` added to the file's __metadata__.
void save_weights(const LayerConfig& cfg, const LayerWeights& w, const std::string& path, int64_t layer = 0,
                  const std::map<std::string, std::string>& metadata = {});
// Writes the weights as the DeepSeek-V3.2 checkpoint stores them: the seven
// projection matrices (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj,
// o_proj, indexer.wq_b, indexer.wk) as F8_E4M3 with `<name>_scale_inv` F32
// [ceil(out/128), ceil(in/128)], one scale per 128x128 block (edge blocks
// partial), scale = block amax / 448 (1 for an all-zero block), fp8 = the
// value / scale rounded to nearest even; indexer.weights_proj and the norms
// as BF16. load_weights reads it back as round_bf16(fp8 * scale). Weights
// must be finite (ValueError naming the tensor).
void save_weights_fp8(const LayerConfig& cfg, const LayerWeights& w, const std::string& path, int64_t layer = 0,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace dsa
