// Issue 21, library side: every dimension and count is bounded from above,
// sizes are checked before they are formed, derived values are finite, NaN and
// Inf are reported by tensor and index, shard paths stay in their folder and
// special files are refused. Each case is a regression test for a crash, a
// hang or silent nonsense found by trying hostile inputs.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/config.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "dsa/safetensors.h"
#include "expect_error.h"
#include "scratch_dir.h"
#include "small_layer_config.h"

using namespace dsa;
using dsa::test::expect_error;
using dsa::test::small_layer_config;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t k2p62 = int64_t{1} << 62;

std::string tmp(const std::string& name) { return dsa::test::scratch_path(name); }
using dsa::test::write_text;

template <class E, class Fn>
std::string parameter_of(Fn fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.parameter();
  }
  ADD_FAILURE() << "expected an exception";
  return "<none>";
}

}  // namespace

// `--num-heads 2^62`, `v_head_dim` / `qk_nope_head_dim` / `kv_lora_rank` of 2^62
// crashed in apply_rope or printed negative sizes; `--tokens-per-block 2^62`
// divided by zero.
TEST(Bounds, EveryDimensionHasAnUpperBound) {
  struct Case {
    const char* name;
    int64_t LayerConfig::*field;
  };
  const Case cases[] = {{"hidden_size", &LayerConfig::hidden_size},         {"num_heads", &LayerConfig::num_heads},
                        {"q_lora_rank", &LayerConfig::q_lora_rank},         {"kv_lora_rank", &LayerConfig::kv_lora_rank},
                        {"qk_nope_head_dim", &LayerConfig::qk_nope_head_dim}, {"qk_rope_head_dim", &LayerConfig::qk_rope_head_dim},
                        {"v_head_dim", &LayerConfig::v_head_dim},           {"index_n_heads", &LayerConfig::index_n_heads},
                        {"index_head_dim", &LayerConfig::index_head_dim},   {"index_topk", &LayerConfig::index_topk},
                        {"tokens_per_block", &LayerConfig::tokens_per_block}};
  for (const Case& c : cases) {
    for (int64_t v : {k2p62, kI64Max, int64_t{1} << 40}) {
      LayerConfig cfg;
      cfg.*c.field = v;
      const std::string what = std::string(c.name) + " = " + std::to_string(v);
      expect_error<ConfigError>([&] { validate(cfg); }, {what.c_str(), "too large", "limit"});
      EXPECT_EQ(parameter_of<ConfigError>([&] { validate(cfg); }), c.name);
    }
  }
  // The same from a config.json.
  std::string j = R"({"hidden_size": 7168, "num_attention_heads": 4611686018427387904, "q_lora_rank": 1536, "kv_lora_rank": 512,
      "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "index_n_heads": 64, "index_head_dim": 128,
      "index_topk": 2048})";
  const LayerConfig big = load_config_json_text(j, "big.json");
  expect_error<ConfigError>([&] { validate(big); }, {"num_heads = 4611686018427387904", "too large"});
  // At the limits every size the layer computes stays positive (no overflow).
  LayerConfig m;
  m.hidden_size = m.q_lora_rank = m.kv_lora_rank = ConfigLimits::kMaxWidth;
  m.num_heads = ConfigLimits::kMaxHeads;
  m.qk_nope_head_dim = m.v_head_dim = ConfigLimits::kMaxHeadDim;
  m.index_n_heads = 64;
  m.tokens_per_block = ConfigLimits::kMaxTokensPerBlock;
  EXPECT_NO_THROW(validate(m));
  EXPECT_GT(weight_count(m), 0);
  EXPECT_GT(CacheConfig::for_layer(m, CacheConfig::kMaxLayers).bytes_per_block(), 0);
}

// `--rope-theta 1` and mscale_all_dim 1e308 or -100 were accepted and gave NaN
// output (or an infinite softmax scale) with exit code 0.
TEST(Bounds, DerivedValuesAreFiniteAndPositive) {
  LayerConfig c;
  c.rope_theta = 1.0;
  expect_error<ConfigError>([&] { validate(c); }, {"rope_theta = 1", "greater than 1"});
  c.rope_theta = 0.5;
  expect_error<ConfigError>([&] { validate(c); }, {"rope_theta = 0.5"});
  c = LayerConfig{};
  c.rope_theta = std::numeric_limits<double>::infinity();
  expect_error<ConfigError>([&] { validate(c); }, {"rope_theta = inf", "finite"});
  c = LayerConfig{};
  c.rope_theta = 1e300;  // frequencies underflow fp32
  expect_error<ConfigError>([&] { validate(c); }, {"RoPE inverse frequency", "rope_theta"});

  c = LayerConfig{};
  c.rope_scaling.mscale_all_dim = 1e308;
  expect_error<ConfigError>([&] { validate(c); }, {"softmax scale", "mscale_all_dim"});
  EXPECT_EQ(parameter_of<ConfigError>([&] { validate(c); }), "rope_scaling.mscale_all_dim");
  c.rope_scaling.mscale_all_dim = -100;
  expect_error<ConfigError>([&] { validate(c); }, {"mscale_all_dim = -100", "yarn mscale", "positive"});
  c.rope_scaling.mscale_all_dim = std::nan("");
  expect_error<ConfigError>([&] { validate(c); }, {"mscale_all_dim = nan"});
  c = LayerConfig{};
  c.rope_scaling.factor = std::numeric_limits<double>::infinity();
  expect_error<ConfigError>([&] { validate(c); }, {"rope_scaling.factor = inf"});
  c = LayerConfig{};
  c.rope_scaling.beta_fast = std::numeric_limits<double>::infinity();
  expect_error<ConfigError>([&] { validate(c); }, {"beta_fast = inf"});
  c = LayerConfig{};
  c.rope_scaling.original_max_position_embeddings = kI64Max;
  expect_error<ConfigError>([&] { validate(c); }, {"original_max_position_embeddings"});

  // What validate() accepts has finite positive frequencies and scale.
  for (double theta : {1.0001, 10000.0, 1e6}) {
    c = LayerConfig{};
    c.rope_theta = theta;
    ASSERT_NO_THROW(validate(c)) << theta;
    for (double f : rope_inv_freq(c)) EXPECT_TRUE(f > 0 && std::isfinite(f)) << theta;
    EXPECT_TRUE(c.softmax_scale() > 0 && std::isfinite(c.softmax_scale()));
  }
}

// `--requests 9223372036854775807:1`, `--cached 9223372036854775807 --new 1`
// and an inputs file with request_cached INT64_MAX crashed in CacheManager::slot.
TEST(Bounds, StepCountsAreCheckedBeforeTheyAreSummed) {
  expect_error<ConfigError>([] { uniform_requests(1, kI64Max, 1); }, {"cached = 9223372036854775807", "too large", "int32"});
  EXPECT_EQ(parameter_of<ConfigError>([] { uniform_requests(1, kI64Max, 1); }), "cached");
  EXPECT_EQ(parameter_of<ConfigError>([] { uniform_requests(1, 0, kI64Max); }), "num_new");
  EXPECT_EQ(parameter_of<ConfigError>([] { uniform_requests(kI64Max, 0, 1); }), "batch");
  expect_error<ConfigError>([] { parse_request_list("9223372036854775807:1"); }, {"9223372036854775807:1", "int32"});
  expect_error<ConfigError>([] { parse_request_list("0:9223372036854775807"); }, {"int32"});
  expect_error<ConfigError>([] { parse_request_list("1:99999999999999999999"); }, {"not an integer"});
  EXPECT_NO_THROW(uniform_requests(1, StepLimits::kMaxSlots - 1, 1));

  // Sums over requests: each request fits, all together do not.
  const auto two = uniform_requests(2, StepLimits::kMaxSlots - 64, 1);
  expect_error<ConfigError>([&] { check_step_limits(two, 64, "inputs 'x'"); }, {"inputs 'x'", "blocks of 64 tokens", "int32"});
  std::vector<StepRequest> bad = {{0, kI64Max, 1}};
  expect_error<ConfigError>([&] { check_step_limits(bad, 64, "inputs 'x'"); }, {"inputs 'x'", "cached 9223372036854775807"});
  bad = {{0, 0, kI64Max}};
  expect_error<ConfigError>([&] { check_step_limits(bad, 64); }, {"int32"});
  EXPECT_NO_THROW(check_step_limits(uniform_requests(4, 1000, 3), 64));

  // The cache refuses instead of indexing past its block tables.
  CacheConfig cc = CacheConfig::for_layer(small_layer_config());
  cc.with_tokens(256);
  CacheManager m(cc);
  expect_error<ShapeError>([&] { reserve_step(m, bad); }, {"int32"});
  bad = {{0, kI64Max - 1, 1}};
  expect_error<ShapeError>([&] { reserve_step(m, bad); }, {"int32"});
  m.add_request(7);
  expect_error<CacheError>([&] { m.reserve(7, kI64Max); }, {"cache full", "9223372036854775807"});
  EXPECT_EQ(m.free_blocks(), cc.num_blocks);
  EXPECT_GT(cc.blocks_for(kI64Max), 0);
  EXPECT_EQ(cc.blocks_for(kI64Max), kI64Max / cc.tokens_per_block + 1);
}

// `dsa info --tokens 2^63-1` printed negative block counts and byte sizes,
// `--tokens-per-block 2^62 --memory-gib 40` divided by zero.
TEST(Bounds, CacheCapacityAndBytesFitTheirTypes) {
  CacheConfig c = CacheConfig::for_layer(LayerConfig{});
  expect_error<ConfigError>([&] { c.with_tokens(kI64Max); }, {"9223372036854775807 tokens is too large", "int32"});
  EXPECT_EQ(parameter_of<ConfigError>([&] { c.with_tokens(kI64Max); }), "tokens");
  expect_error<ConfigError>([&] { c.with_bytes(kI64Max); }, {"more than the", "give at most"});
  EXPECT_EQ(parameter_of<ConfigError>([&] { c.with_bytes(kI64Max); }), "bytes");
  c.with_tokens(StepLimits::kMaxSlots / 64 * 64);  // the largest capacity: its byte size is positive
  EXPECT_GT(c.total_bytes(), 0);
  CacheConfig t = c;
  t.tokens_per_block = k2p62;
  expect_error<ConfigError>([&] { t.with_bytes(int64_t{40} << 30); }, {"tokens_per_block = 4611686018427387904"});
  t = c;
  t.num_layers = kI64Max;
  expect_error<ConfigError>([&] { t.with_bytes(int64_t{40} << 30); }, {"num_layers"});
  expect_error<ConfigError>([&] { t.validate(); }, {"num_layers"});
  t = c;
  t.kv_lora_rank = k2p62;
  expect_error<ConfigError>([&] { t.with_tokens(64); }, {"kv_lora_rank = 4611686018427387904"});
}

// I64 position_ids past 2^31 were cut to int32 instead of refused.
TEST(Bounds, PositionsAreCheckedLosslessly) {
  const std::vector<StepRequest> reqs = {{0, 0, 2}, {1, 5, 1}};
  const std::vector<int64_t> good = {0, 1, 5};
  EXPECT_NO_THROW(check_positions(reqs, good.data(), 3));
  // 2^32 + 5 would be 5 once cut to int32.
  const std::vector<int64_t> wrapped = {0, 1, (int64_t{1} << 32) + 5};
  expect_error<ShapeError>([&] { check_positions(reqs, wrapped.data(), 3); }, {"position_ids[2] = 4294967301", "is 5"});
  expect_error<ShapeError>([&] { check_positions(reqs, good.data(), 2); }, {"2 entries", "3 new tokens"});
}

// NaN/Inf in hidden, in a weight or in an fp8 scale gave "output rms nan" and exit 0.
TEST(Bounds, NonFiniteValuesAreReportedByTensorAndIndex) {
  std::vector<bf16_t> v(6, float_to_bf16(1.0f));
  EXPECT_NO_THROW(check_finite("hidden", {2, 3}, v.data(), 6));
  v[5] = float_to_bf16(std::numeric_limits<float>::infinity());
  expect_error<ValueError>([&] { check_finite("hidden", {2, 3}, v.data(), 6); }, {"'hidden' [2, 3]", "inf", "[1, 2]", "allow_nonfinite"});
  EXPECT_EQ(parameter_of<ValueError>([&] { check_finite("hidden", {2, 3}, v.data(), 6); }), "allow_nonfinite");
  std::vector<float> f = {1.0f, std::nanf("")};
  expect_error<ValueError>([&] { check_finite("s", {2}, f.data(), 2); }, {"'s'", "nan", "[1]"});

  const LayerConfig cfg = small_layer_config();
  LayerWeights w = generate_weights(cfg, 5);
  EXPECT_NO_THROW(check_weights_finite(cfg, w, weight_prefix(0)));
  w.kv_b_proj[130] = float_to_bf16(std::nanf(""));  // row 1, column 2 of [4096, 128]
  expect_error<ValueError>([&] { check_weights_finite(cfg, w, weight_prefix(0)); },
                           {"model.layers.0.self_attn.kv_b_proj.weight", "[1, 2]"});
  save_weights(cfg, w, tmp("nan_w.safetensors"), 0);
  expect_error<ValueError>([&] { load_weights(cfg, tmp("nan_w.safetensors"), 0); }, {"kv_b_proj.weight", "nan", "[1, 2]"});
  EXPECT_NO_THROW(load_weights(cfg, tmp("nan_w.safetensors"), 0, /*allow_nonfinite=*/true));

  // An fp8 weight whose block scale is Inf: named by the scale tensor.
  const LayerWeights g = generate_weights(cfg, 5);
  st::Writer sw;
  const std::string pre = weight_prefix(0);
  sw.add_u8(pre + "q_a_proj.weight", st::DType::F8_E4M3, {128, 256}, std::vector<uint8_t>(128 * 256, 0x38));
  sw.add_f32(pre + "q_a_proj.weight_scale_inv", {1, 2}, {1.0f, std::numeric_limits<float>::infinity()});
  sw.add_bf16(pre + "q_a_layernorm.weight", {128}, g.q_a_layernorm);
  sw.add_bf16(pre + "q_b_proj.weight", {64 * 96, 128}, g.q_b_proj);
  sw.add_bf16(pre + "kv_a_proj_with_mqa.weight", {192, 256}, g.kv_a_proj_with_mqa);
  sw.add_bf16(pre + "kv_a_layernorm.weight", {128}, g.kv_a_layernorm);
  sw.add_bf16(pre + "kv_b_proj.weight", {64 * 64, 128}, g.kv_b_proj);
  sw.add_bf16(pre + "o_proj.weight", {256, 64 * 32}, g.o_proj);
  sw.add_bf16(pre + "indexer.wq_b.weight", {8 * 128, 128}, g.idx_wq_b);
  sw.add_bf16(pre + "indexer.wk.weight", {128, 256}, g.idx_wk);
  sw.add_bf16(pre + "indexer.k_norm.weight", {128}, g.idx_k_norm_weight);
  sw.add_bf16(pre + "indexer.k_norm.bias", {128}, g.idx_k_norm_bias);
  sw.add_bf16(pre + "indexer.weights_proj.weight", {8, 256}, g.idx_weights_proj);
  sw.write(tmp("inf_scale.safetensors"));
  expect_error<ValueError>([&] { load_weights(cfg, tmp("inf_scale.safetensors"), 0); }, {"q_a_proj.weight_scale_inv", "[0, 1]", "inf"});
}

// Shard paths of a model.safetensors.index.json could leave the index's folder.
TEST(Bounds, ShardsMustStayInTheIndexFolder) {
  const LayerConfig cfg = small_layer_config();
  fs::create_directories(tmp("ckpt"));
  save_weights(cfg, generate_weights(cfg, 1), tmp("outside.safetensors"), 0);
  const std::string name = weight_prefix(0) + "q_a_proj.weight";
  for (const std::string& shard : std::vector<std::string>{"../outside.safetensors", tmp("outside.safetensors"), "sub/../../outside.safetensors", "", "."}) {
    write_text(tmp("ckpt/model.safetensors.index.json"), R"({"weight_map": {")" + name + R"(": ")" + shard + R"("}})");
    expect_error<FileError>([&] { load_weights(cfg, tmp("ckpt/model.safetensors.index.json"), 0); },
                            {"not a file inside the index's folder", "weight_map entry"});
  }
  // Inside the folder (also through a subfolder) is accepted: the error is then the missing shard file.
  write_text(tmp("ckpt/model.safetensors.index.json"), R"({"weight_map": {")" + name + R"(": "sub/../a.safetensors"}})");
  expect_error<FileError>([&] { load_weights(cfg, tmp("ckpt/model.safetensors.index.json"), 0); }, {"ckpt/a.safetensors", "No such file"});
}

// `--config /dev/zero` hung; a directory as a config, an index or weights.
TEST(Bounds, SpecialFilesAndDirectoriesAreRefused) {
  expect_error<FileError>([] { load_config_json_file("/dev/zero"); }, {"/dev/zero", "not a regular file"});
  expect_error<FileError>([] { load_config_json_file(fs::temp_directory_path().string()); }, {"is a directory"});
  expect_error<FileError>([] { load_config_json_file("/nonexistent/config.json"); }, {"cannot open", "/nonexistent/config.json"});
  const LayerConfig cfg = small_layer_config();
  expect_error<FileError>([&] { load_weights(cfg, "/dev/zero", 0); }, {"/dev/zero", "not a safetensors file"});
  expect_error<FileError>([&] { load_weights(cfg, fs::temp_directory_path().string(), 0); }, {"a directory"});
  fs::create_directories(tmp("dir.json"));
  expect_error<FileError>([&] { load_weights(cfg, tmp("dir.json"), 0); }, {"a directory", "not a regular file"});
  expect_error<FileError>([] { st::Reader r("/dev/null"); }, {"/dev/null", "not a safetensors file"});
}

// Saved run files record the configuration; it must come back exactly.
TEST(Bounds, ConfigJsonRoundTripsExactly) {
  LayerConfig c = small_layer_config();
  c.rms_norm_eps = 1.0 / 3.0;
  c.rope_theta = 12345.678901234567;
  c.rope_scaling.factor = 0.1 + 0.2 + 39.7;
  c.rope_scaling.mscale_all_dim = 0.7071067811865476;
  c.kv_cache_dtype = LatentCacheDType::FP8;
  c.indexer_hadamard = false;
  c.o_proj = true;
  const LayerConfig b = config_from_json_text(config_to_json(c), "meta");
  EXPECT_EQ(config_to_json(b), config_to_json(c));
  EXPECT_EQ(b.rms_norm_eps, c.rms_norm_eps);
  EXPECT_EQ(b.rope_theta, c.rope_theta);
  EXPECT_EQ(b.rope_scaling.factor, c.rope_scaling.factor);
  EXPECT_EQ(b.rope_scaling.mscale_all_dim, c.rope_scaling.mscale_all_dim);
  EXPECT_EQ(b.tokens_per_block, 16);
  EXPECT_EQ(b.index_n_heads, 8);
  EXPECT_EQ(b.kv_cache_dtype, LatentCacheDType::FP8);
  EXPECT_FALSE(b.indexer_hadamard);
  EXPECT_TRUE(b.o_proj);
  LayerConfig none;
  none.rope_scaling.type = "none";
  none.rope_scaling.factor = 1.0;
  EXPECT_EQ(config_from_json_text(config_to_json(none), "meta").rope_scaling.type, "none");
  expect_error<ConfigError>([] { config_from_json_text(R"({"hidden_size": 1})", "meta"); }, {"meta", "missing"});
}
