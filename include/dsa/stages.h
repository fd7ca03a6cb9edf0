#pragma once
// The layer's stages (spec section 3) and the work each one does (spec
// section 8): the one list the reference, the CUDA backend, the reports and
// the command line share. Names are NVTX range names, the rows of a bench
// report and the values a front end accepts to run one stage alone.
#include <string>
#include <vector>

#include "dsa/batch.h"
#include "dsa/config.h"

namespace dsa {

// In the order the layer runs them. x_proj is q_a_proj, kv_a_proj,
// indexer_k_proj and indexer_weights_proj as one GEMM over x ([T, hidden]
// read once; N = q_lora_rank + 576 + index_head_dim + index_n_heads): the CUDA
// backend's default. The reference always runs the four on their own.
enum class Stage : int {
  x_proj, q_a_proj, kv_a_proj, norms, q_b_proj, rope, cache_append,
  indexer_q_proj, indexer_k_proj, indexer_weights_proj, indexer_quant, indexer_logits, topk,
  q_absorb, sparse_mla, v_up_proj, o_proj,
  kCount
};
constexpr int kNumStages = static_cast<int>(Stage::kCount);

const char* stage_name(Stage s);  // "?" for a value outside the enum
// Throws ConfigError naming the value and listing the valid names.
Stage parse_stage(const std::string& name);
// Every stage, in run order, and their names.
const std::vector<Stage>& all_stages();
const std::vector<std::string>& stage_names();
// The stages of the four projections of x that x_proj fuses.
bool is_part_of_x_proj(Stage s);

// The stages a configuration runs, in order: o_proj only with cfg.o_proj;
// x_proj, or the four projections it fuses.
std::vector<Stage> layer_stages(const LayerConfig& cfg, bool fused_x_projection);

// Work of one stage as spec section 8 counts it: GEMMs 2MNK, each input read
// once and each output written once. distinct_rows: latent cache rows the
// attention reads; valid_indices: sum over tokens of valid top-k entries.
struct StageWork {
  double flops = 0, bytes = 0;
};
StageWork stage_work(const LayerConfig& cfg, const BatchMetadata& md, Stage s, double distinct_rows, double valid_indices);
// By name; throws ConfigError for a name that is not a stage.
StageWork stage_work(const LayerConfig& cfg, const BatchMetadata& md, const std::string& stage, double distinct_rows,
                     double valid_indices);

// FLOPs of each weight GEMM per new token (context-independent), from
// stage_work at one token: for `dsa info`.
struct StageCost {
  std::string name;
  double flops_per_token;
};
std::vector<StageCost> projection_costs(const LayerConfig& cfg);
// Context-dependent FLOPs (spec section 8), the terms stage_work uses.
double indexer_flops(const LayerConfig& cfg, double visible_keys);
double sparse_attention_flops(const LayerConfig& cfg, double valid_indices);

}  // namespace dsa
