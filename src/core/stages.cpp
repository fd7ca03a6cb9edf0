// The stage registry and the cost model of spec section 8.
#include "dsa/stages.h"

#include <fmt/format.h>

#include <array>

#include "dsa/error.h"

namespace dsa {

namespace {
constexpr std::array<const char*, kNumStages> kStageNames = {
    "x_proj",         "q_a_proj",       "kv_a_proj",            "norms",         "q_b_proj",       "rope",
    "cache_append",   "indexer_q_proj", "indexer_k_proj",       "indexer_weights_proj", "indexer_quant", "indexer_logits",
    "topk",           "q_absorb",       "sparse_mla",           "v_up_proj",     "o_proj"};
}  // namespace

const char* stage_name(Stage s) {
  const int i = static_cast<int>(s);
  return i >= 0 && i < kNumStages ? kStageNames[i] : "?";
}

const std::vector<Stage>& all_stages() {
  static const std::vector<Stage> v = [] {
    std::vector<Stage> s;
    for (int i = 0; i < kNumStages; ++i) s.push_back(static_cast<Stage>(i));
    return s;
  }();
  return v;
}

const std::vector<std::string>& stage_names() {
  static const std::vector<std::string> v(kStageNames.begin(), kStageNames.end());
  return v;
}

Stage parse_stage(const std::string& name) {
  for (int i = 0; i < kNumStages; ++i)
    if (name == kStageNames[i]) return static_cast<Stage>(i);
  throw ConfigError(fmt::format("stage '{}' is not a stage of the layer; use one of: {}", name, fmt::join(kStageNames, ", ")));
}

bool is_part_of_x_proj(Stage s) {
  return s == Stage::q_a_proj || s == Stage::kv_a_proj || s == Stage::indexer_k_proj || s == Stage::indexer_weights_proj;
}

std::vector<Stage> layer_stages(const LayerConfig& cfg, bool fused) {
  std::vector<Stage> v;
  for (Stage s : all_stages()) {
    if (s == Stage::o_proj && !cfg.o_proj) continue;
    if (fused ? is_part_of_x_proj(s) : s == Stage::x_proj) continue;
    v.push_back(s);
  }
  return v;
}

double indexer_flops(const LayerConfig& c, double visible_keys) {
  return 2.0 * c.index_n_heads * c.index_head_dim * visible_keys;
}

double sparse_attention_flops(const LayerConfig& c, double valid_indices) {
  return 2.0 * c.num_heads * (c.latent_dim() + c.kv_lora_rank) * valid_indices;
}

StageWork stage_work(const LayerConfig& c, const BatchMetadata& md, Stage s, double distinct_rows, double valid_indices) {
  const double T = static_cast<double>(md.num_tokens), H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim;
  const double hid = c.hidden_size, ql = c.q_lora_rank, kvl = c.kv_lora_rank, rope = c.qk_rope_head_dim;
  const double nope = c.qk_nope_head_dim, vd = c.v_head_dim, lat = c.latent_dim(), qk = c.qk_head_dim(), k = c.index_topk;
  const double latent_b = static_cast<double>(c.latent_cache_bytes_per_token());
  const double vis = static_cast<double>(md.total_visible_keys());
  // y[M, N] = x[M, K] w[N, K]^T: bf16 weights read once, activations in/out at the stage's widths.
  auto gemm = [](double M, double N, double K, double in_b, double out_b) {
    return StageWork{2 * M * N * K, M * K * in_b + N * K * 2 + M * N * out_b};
  };
  switch (s) {
    // The fused projection of x reads x once and writes fp32.
    case Stage::x_proj: return gemm(T, ql + lat + DI + HI, hid, 2, 4);
    case Stage::q_a_proj: return gemm(T, ql, hid, 2, 2);
    case Stage::kv_a_proj: return gemm(T, lat, hid, 2, 2);
    case Stage::norms: return {0, 2 * T * (ql + kvl) * 2 + (ql + kvl) * 2};
    case Stage::q_b_proj: return gemm(T, H * qk, ql, 2, 2);
    case Stage::rope: return {0, 2 * T * (H + 1) * rope * 2};
    case Stage::cache_append: return {0, T * lat * 2 + T * latent_b};
    case Stage::indexer_q_proj: return gemm(T, HI * DI, ql, 2, 2);
    case Stage::indexer_k_proj: return gemm(T, DI, hid, 2, 4);
    case Stage::indexer_weights_proj: return gemm(T, HI, hid, 2, 4);
    case Stage::indexer_quant:
      return {0, T * HI * DI * 2 + T * DI * 4 + T * HI * 4 + T * HI * DI + 2 * T * HI * 4 + T * (DI + 4)};
    case Stage::indexer_logits: {
      double keys = 0;  // every cached key of the step's requests is read once
      for (int32_t sl : md.seq_lens) keys += sl;
      return {indexer_flops(c, vis), T * HI * DI + T * HI * 4 + keys * (DI + 4) + vis * 4};
    }
    case Stage::topk: return {0, vis * 4 + T * k * 4};
    case Stage::q_absorb: return {2 * T * H * nope * kvl, T * H * nope * 2 + H * nope * kvl * 2 + T * H * kvl * 2};
    case Stage::sparse_mla:
      return {sparse_attention_flops(c, valid_indices),
              T * H * lat * 2 + distinct_rows * latent_b + T * k * 4 + T * H * kvl * 2 + 2 * T * H * 4};
    case Stage::v_up_proj: return {2 * T * H * kvl * vd, T * H * kvl * 2 + H * vd * kvl * 2 + T * H * vd * 2};
    case Stage::o_proj: return gemm(T, hid, H * vd, 2, 2);
    case Stage::kCount: break;
  }
  throw ConfigError(fmt::format("stage value {} is not a stage of the layer", static_cast<int>(s)));
}

StageWork stage_work(const LayerConfig& cfg, const BatchMetadata& md, const std::string& stage, double distinct_rows,
                     double valid_indices) {
  return stage_work(cfg, md, parse_stage(stage), distinct_rows, valid_indices);
}

std::vector<StageCost> projection_costs(const LayerConfig& c) {
  BatchMetadata one;
  one.num_tokens = 1;
  std::vector<StageCost> v;
  for (Stage s : layer_stages(c, /*fused_x_projection=*/false)) {
    const double f = stage_work(c, one, s, 0, 0).flops;
    // Only the weight GEMMs: their FLOPs per token do not depend on the context.
    if (f > 0 && s != Stage::indexer_logits && s != Stage::sparse_mla) v.push_back({stage_name(s), f});
  }
  return v;
}

}  // namespace dsa
