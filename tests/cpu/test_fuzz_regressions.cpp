// Inputs the libFuzzer targets (fuzz/, scripts/fuzz.sh) found to crash or to
// break a property, inlined as they were found (minimized), each with the
// rule the fix established.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "dsa/config.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "expect_error.h"
#include "small_layer_config.h"

using namespace dsa;
using dsa::test::expect_error;
namespace fs = std::filesystem;

// fuzz_config: a number past double's range made nlohmann::json throw
// out_of_range, which escaped load_config_json_text as a foreign exception
// (the CLI reported it as an internal error). It is malformed JSON: FileError.
TEST(FuzzRegressions, ConfigNumberPastDoubleIsMalformedJson) {
  const std::string crash = R"({"hidden!_size": 256, "num_attention__dim": 64, "v_head_dim": 32, "index_n_hes}": 1e606, )"
                            R"("rope_theta": 20000.0, "#ope_scaling": {"nk0}})";
  expect_error<FileError>([&] { load_config_json_text(crash, "crash.json"); }, {"crash.json", "malformed JSON", "1e606"});
  expect_error<FileError>([] { load_config_json_text(R"({"hidden_size": 1e400})", "c.json"); }, {"malformed JSON"});
  expect_error<FileError>([] { config_from_json_text(R"({"rope_theta": -1e309})", "run.safetensors"); }, {"malformed JSON"});
}

// fuzz_checkpoint_index: a shard name holding a NUL byte passed the lexical
// "stays inside the folder" check, but the operating system reads the path
// only up to the NUL, so "..\u0000x" named the index folder's parent.
TEST(FuzzRegressions, ShardNameWithNulByteIsRefused) {
  const std::string crash = R"({"weight_map":{"a":"..\u0000x"}})";
  expect_error<FileError>([&] { checkpoint_index_shards(crash, "/ckpt/model.safetensors.index.json"); },
                          {"weight_map entry 'a'", "NUL byte", R"("..\u0000x")", "/ckpt"});
  expect_error<FileError>([] { checkpoint_index_shards(R"({"weight_map":{"a":"ok.safetensors\u0000/../../x"}})", "/c/i.json"); },
                          {"NUL byte"});
  // Through load_weights as well (the path the CLI takes).
  const fs::path dir = fs::temp_directory_path() / ("dsa_fuzz_regr_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "model.safetensors.index.json") << crash;
  const LayerConfig cfg = test::small_layer_config();
  expect_error<FileError>([&] { load_weights(cfg, (dir / "model.safetensors.index.json").string(), 0); }, {"NUL byte"});
  fs::remove_all(dir);
  // Plain names still resolve inside the folder.
  const auto m = checkpoint_index_shards(R"({"weight_map":{"a":"s/../x.safetensors"}})", "/ckpt/model.safetensors.index.json");
  EXPECT_EQ(m.at("a"), "/ckpt/x.safetensors");
}
