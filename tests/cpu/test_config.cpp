#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "expect_error.h"
#include "dsa/config.h"
#include "dsa/error.h"
#include "dsa/batch.h"
#include "dsa/stages.h"

using namespace dsa;

namespace {

std::string read_file(const std::string& p) {
  std::ifstream f(p);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

const std::string kV32 = std::string(DSA_TEST_DATA_DIR) + "/deepseek_v32_config.json";

using dsa::test::expect_error;

std::string replace(std::string s, const std::string& from, const std::string& to) {
  auto p = s.find(from);
  EXPECT_NE(p, std::string::npos) << from;
  if (p != std::string::npos) s.replace(p, from.size(), to);
  return s;
}

}  // namespace

TEST(Config, DefaultsAreDeepSeekV32) {
  LayerConfig c;
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.num_heads, 128);
  EXPECT_EQ(c.latent_dim(), 576);
  EXPECT_EQ(c.latent_cache_bytes_per_token(), 1152);
  EXPECT_EQ(c.indexer_cache_bytes_per_token(), 132);
  EXPECT_EQ(c.indexer_cache_bytes_per_block(), 8448);
  EXPECT_NEAR(c.softmax_scale(), 0.1352338, 1e-7);
  c.kv_cache_dtype = LatentCacheDType::FP8;
  EXPECT_EQ(c.latent_cache_bytes_per_token(), 656);
  EXPECT_NO_THROW(validate(LayerConfig{}));
}

TEST(Config, LoadsTheModelsOwnConfigJson) {
  LayerConfig c = load_config_json_file(kV32);
  LayerConfig d;
  EXPECT_EQ(c.hidden_size, d.hidden_size);
  EXPECT_EQ(c.num_heads, 128);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.index_topk, 2048);
  EXPECT_EQ(c.rope_scaling.type, "yarn");
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 40.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.softmax_scale(), d.softmax_scale());
  EXPECT_NO_THROW(validate(c));
}

TEST(Config, NullRopeScalingMeansNone) {
  std::string t = replace(read_file(kV32), "\"rope_scaling\": {", "\"rope_scaling\": null, \"unused\": {");
  LayerConfig c = load_config_json_text(t);
  EXPECT_EQ(c.rope_scaling.type, "none");
  EXPECT_NEAR(c.softmax_scale(), 1.0 / std::sqrt(192.0), 1e-12);
}

TEST(Config, MalformedJson) {
  expect_error<FileError>([] { load_config_json_text("{\"hidden_size\": 7168,", "x.json"); }, {"x.json", "malformed JSON"});
  expect_error<FileError>([] { load_config_json_text("[1, 2]", "x.json"); }, {"JSON object"});
  expect_error<FileError>([] { load_config_json_file("/nonexistent/config.json"); }, {"cannot open", "/nonexistent/config.json"});
}

TEST(Config, MissingKeysAreNamed) {
  const std::string base = read_file(kV32);
  for (const char* key : {"hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                          "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk"}) {
    std::string t = replace(base, std::string("\"") + key + "\"", std::string("\"x_") + key + "\"");
    expect_error<ConfigError>([&] { load_config_json_text(t, "m.json"); }, {"m.json", key, "missing"});
  }
  std::string t = replace(base, "\"factor\"", "\"x_factor\"");
  expect_error<ConfigError>([&] { load_config_json_text(t); }, {"rope_scaling.factor", "missing"});
  t = replace(base, "\"type\": \"yarn\"", "\"kind\": \"yarn\"");
  expect_error<ConfigError>([&] { load_config_json_text(t); }, {"rope_scaling", "type"});
}

TEST(Config, WrongTypesAreNamed) {
  const std::string base = read_file(kV32);
  expect_error<ConfigError>([&] { load_config_json_text(replace(base, "\"hidden_size\": 7168", "\"hidden_size\": \"7168\"")); },
                            {"hidden_size", "integer", "a string"});
  expect_error<ConfigError>([&] { load_config_json_text(replace(base, "\"index_topk\": 2048", "\"index_topk\": 2048.5")); },
                            {"index_topk", "integer"});
  expect_error<ConfigError>([&] { load_config_json_text(replace(base, "\"rope_theta\": 10000", "\"rope_theta\": [1]")); },
                            {"rope_theta", "number", "an array"});
  expect_error<ConfigError>([&] { load_config_json_text(replace(base, "\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": true")); },
                            {"rms_norm_eps", "number", "a boolean"});
  expect_error<ConfigError>([&] { load_config_json_text(replace(base, "\"type\": \"yarn\"", "\"type\": 3")); },
                            {"rope_scaling.type", "string"});
  expect_error<ConfigError>([&] { load_config_json_text(replace(base, "\"type\": \"yarn\"", "\"type\": \"linear\"")); },
                            {"linear", "yarn"});
  expect_error<ConfigError>([&] {
    std::string t = replace(base, "\"rope_scaling\": {", "\"rope_scaling\": 5, \"unused\": {");
    load_config_json_text(t);
  }, {"rope_scaling", "object"});
  // An integral float is accepted for an integer key (some exporters write 7168.0).
  EXPECT_EQ(load_config_json_text(replace(base, "\"hidden_size\": 7168", "\"hidden_size\": 7168.0")).hidden_size, 7168);
}

TEST(Config, ValidationMessages) {
  auto with = [](auto mutate) {
    LayerConfig c;
    mutate(c);
    return c;
  };
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.num_heads = 96; })); },
                            {"num_heads = 96", "multiple of 64", "set num_heads to 64 or 128"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.num_heads = 0; })); }, {"num_heads = 0", "positive"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.num_heads = -64; })); }, {"num_heads = -64", "positive"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.hidden_size = 0; })); }, {"hidden_size = 0", "positive"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.q_lora_rank = -1; })); }, {"q_lora_rank = -1"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.kv_lora_rank = 0; })); }, {"kv_lora_rank = 0"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.kv_lora_rank = 500; })); }, {"kv_lora_rank = 500", "128"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.qk_nope_head_dim = 0; })); }, {"qk_nope_head_dim = 0"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.qk_rope_head_dim = 0; })); }, {"qk_rope_head_dim = 0"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.qk_rope_head_dim = 63; })); }, {"qk_rope_head_dim = 63", "even"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.v_head_dim = 0; })); }, {"v_head_dim = 0"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.index_n_heads = 0; })); }, {"index_n_heads = 0"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.index_head_dim = 0; })); }, {"index_head_dim = 0"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.index_head_dim = 64; })); }, {"index_head_dim = 64", "128"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.index_topk = 0; })); }, {"index_topk = 0"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.index_topk = 100; })); }, {"index_topk = 100", "multiple of 64"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.tokens_per_block = 0; })); }, {"tokens_per_block = 0"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.rms_norm_eps = 0; })); }, {"rms_norm_eps"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.rope_theta = -1; })); }, {"rope_theta"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.rope_scaling.factor = 0.5; })); }, {"rope_scaling.factor"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.rope_scaling.original_max_position_embeddings = 0; })); },
                            {"original_max_position_embeddings"});
  expect_error<ConfigError>([&] { validate(with([](LayerConfig& c) { c.rope_scaling.beta_fast = 0.5; })); }, {"beta_fast"});
  EXPECT_NO_THROW(validate(with([](LayerConfig& c) { c.num_heads = 64; })));
  EXPECT_NO_THROW(validate(with([](LayerConfig& c) { c.num_heads = 256; })));
}

TEST(Config, GpuRules) {
  // The backend is compiled for sm_90a only: that code runs on sm_90 and on no other GPU.
  LayerConfig c;
  c.num_heads = 64;
  EXPECT_NO_THROW(validate_for_gpu(c, 9, 0));
  c.num_heads = 128;
  EXPECT_NO_THROW(validate_for_gpu(c, 9, 0));
  c.num_heads = 256;  // a multiple of 64 past the sm_90a kernel's 128 runs on the simple kernel
  EXPECT_NO_THROW(validate_for_gpu(c, 9, 0));
  expect_error<NoDeviceError>([&] { validate_for_gpu(c, 10, 0); }, {"sm_100", "sm_90a only", "Hopper"});
  expect_error<NoDeviceError>([&] { validate_for_gpu(c, 8, 0); }, {"sm_80", "sm_90a only"});
  expect_error<NoDeviceError>([&] { validate_for_gpu(c, 8, 9); }, {"sm_89"});
  c.num_heads = 96;
  expect_error<ConfigError>([&] { validate_for_gpu(c, 9, 0); }, {"num_heads = 96", "multiple of 64"});
  c.num_heads = 128;
  c.index_n_heads = 32;
  expect_error<ConfigError>([&] { validate_for_gpu(c, 9, 0); }, {"index_n_heads = 32", "64 indexer heads"});
  c.index_n_heads = 64;
  c.tokens_per_block = 32;
  expect_error<ConfigError>([&] { validate_for_gpu(c, 9, 0); }, {"tokens_per_block = 32", "64-token"});
}

// Library errors name parameters, never a front end's flags; the one parameter
// at fault travels in Error::parameter() for the front end to map.
TEST(Config, ErrorsNameTheParameterNotAFlag) {
  auto param_of = [](auto fn) -> std::string {
    try {
      fn();
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).find("--"), std::string::npos) << "a library message names a flag: " << e.what();
      return e.parameter();
    }
    ADD_FAILURE() << "expected an exception";
    return {};
  };
  auto with = [](auto mutate) {
    LayerConfig c;
    mutate(c);
    return c;
  };
  EXPECT_EQ(param_of([&] { validate(with([](LayerConfig& c) { c.num_heads = 96; })); }), "num_heads");
  EXPECT_EQ(param_of([&] { validate(with([](LayerConfig& c) { c.index_topk = 100; })); }), "index_topk");
  EXPECT_EQ(param_of([&] { validate(with([](LayerConfig& c) { c.tokens_per_block = 0; })); }), "tokens_per_block");
  EXPECT_EQ(param_of([&] { validate(with([](LayerConfig& c) { c.rope_theta = -1; })); }), "rope_theta");
  EXPECT_EQ(param_of([&] { validate(with([](LayerConfig& c) { c.rope_scaling.factor = 0.5; })); }), "rope_scaling.factor");
  EXPECT_EQ(param_of([] { parse_latent_cache_dtype("int4"); }), "kv_cache_dtype");
  EXPECT_EQ(param_of([&] { validate_for_sparse_prefill(with([](LayerConfig& c) { c.kv_cache_dtype = LatentCacheDType::FP8; })); }),
            "kv_cache_dtype");
  EXPECT_EQ(param_of([] { load_config_json_text(R"({"hidden_size": 7168})"); }), "num_attention_heads");
  EXPECT_EQ(param_of([] { uniform_requests(0, 0, 1); }), "batch");
  EXPECT_EQ(param_of([] { uniform_requests(1, -1, 1); }), "cached");
  EXPECT_EQ(param_of([] { uniform_requests(1, 0, 0); }), "num_new");
  EXPECT_EQ(param_of([] { parse_request_list(""); }), "requests");
  EXPECT_EQ(param_of([] { validate_for_gpu(LayerConfig{}, 8, 0); }), "");
}

TEST(Config, Fp8LatentCacheRefusedForSparsePrefill) {
  LayerConfig c;
  EXPECT_NO_THROW(validate_for_sparse_prefill(c));
  c.kv_cache_dtype = LatentCacheDType::FP8;
  expect_error<ConfigError>([&] { validate_for_sparse_prefill(c); }, {"fp8", "bf16", "sparse prefill", "set kv_cache_dtype to bf16"});
  expect_error<ConfigError>([] { parse_latent_cache_dtype("int4"); }, {"int4", "bf16", "fp8"});
  EXPECT_EQ(parse_latent_cache_dtype("fp8"), LatentCacheDType::FP8);
  EXPECT_EQ(parse_latent_cache_dtype("bf16"), LatentCacheDType::BF16);
}

TEST(Config, CostModel) {
  LayerConfig c;
  EXPECT_DOUBLE_EQ(indexer_flops(c, 1), 2.0 * 64 * 128);
  EXPECT_DOUBLE_EQ(sparse_attention_flops(c, 1), 2.0 * 128 * 1088);
  double q_a = 0;
  for (auto& s : projection_costs(c))
    if (s.name == "q_a_proj") q_a = s.flops_per_token;
  EXPECT_DOUBLE_EQ(q_a, 2.0 * 7168 * 1536);
}
