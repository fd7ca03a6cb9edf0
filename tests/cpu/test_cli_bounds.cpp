// Issue 21 through the built `dsa` binary: each input a new or a hostile user
// tried (that crashed, hung, did work before failing or exited 0 with
// nonsense) is refused with a message and a documented exit code before any
// work, with nothing on stdout; files a run saves replay exactly without
// repeating flags.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "cli_run.h"
#include "dsa/config.h"
#include "dsa/layer.h"
#include "dsa/safetensors.h"
#include "scratch_dir.h"
#include "small_layer_config.h"

using namespace dsa;
using dsa::test::CliResult;
using dsa::test::run_dsa;
using dsa::test::small_layer_config;
namespace fs = std::filesystem;

namespace {

// small_layer_config() as flags.
const std::string kDims =
    " --hidden-size 256 --num-heads 64 --q-lora-rank 128 --kv-lora-rank 128 --qk-nope-head-dim 32 --v-head-dim 32"
    " --index-n-heads 8 --topk 64 --tokens-per-block 16";

std::string tmp(const std::string& name) { return dsa::test::scratch_path(name); }
using dsa::test::write_text;

// Refused before any work: the given exit code, the fragments on stderr and
// nothing at all on stdout.
CliResult refused(const std::string& args, std::initializer_list<const char*> fragments, int rc = 1) {
  const CliResult r = dsa::test::expect_rejected(args, fragments, rc);
  EXPECT_EQ(r.out, "") << "dsa " << args << " printed before its error";
  return r;
}

// An inputs file of the small layer: `hidden` [T, 256] of ones, the request
// tensors, and optional position_ids.
void write_inputs(const std::string& path, const std::vector<int64_t>& cached, const std::vector<int64_t>& fresh,
                  const std::vector<int64_t>* positions = nullptr, float poison = 1.0f, int64_t poison_at = -1) {
  int64_t T = 0;
  for (int64_t n : fresh) T += n;
  std::vector<bf16_t> hidden(static_cast<size_t>(T * 256), float_to_bf16(1.0f));
  if (poison_at >= 0) hidden[poison_at] = float_to_bf16(poison);
  st::Writer w;
  w.add_bf16("hidden", {T, 256}, hidden);
  w.add_i64("request_cached", {static_cast<int64_t>(cached.size())}, cached);
  w.add_i64("request_new", {static_cast<int64_t>(fresh.size())}, fresh);
  if (positions) w.add_i64("position_ids", {static_cast<int64_t>(positions->size())}, *positions);
  w.write(path);
}

std::string config_json(const std::string& key, const std::string& value) {
  LayerConfig c;
  std::string j = config_to_json(c);
  const std::string needle = "\"" + key + "\":";
  const size_t p = j.find(needle);
  EXPECT_NE(p, std::string::npos) << key;
  const size_t end = j.find_first_of(",}", p);
  return j.substr(0, p + needle.size()) + value + j.substr(end);
}

}  // namespace

// SIGSEGV in CacheManager::slot; SIGSEGV in apply_rope.
TEST(CliBounds, HugeCountsAndDimensionsAreRefusedNotCrashed) {
  refused("run --requests 9223372036854775807:1", {"9223372036854775807:1", "int32", "(set with --requests)"});
  refused("run --cached 9223372036854775807 --new 1", {"cached = 9223372036854775807", "(set with --cached)"});
  refused("run --new 9223372036854775807", {"num_new = 9223372036854775807", "(set with --new)"});
  refused("run --batch 9223372036854775807", {"batch = 9223372036854775807", "(set with --batch)"});
  write_inputs(tmp("huge_cached.st"), {std::numeric_limits<int64_t>::max()}, {1});
  refused("run --inputs " + tmp("huge_cached.st") + kDims, {"huge_cached.st", "cached 9223372036854775807", "int32"});
  refused("run --num-heads 4611686018427387904", {"num_heads = 4611686018427387904", "too large", "(set with --num-heads)"});
  for (const char* key : {"num_attention_heads", "v_head_dim", "qk_nope_head_dim"}) {
    write_text(tmp("big.json"), config_json(key, "4611686018427387904"));
    refused("run --config " + tmp("big.json"), {"= 4611686018427387904", "too large"});
  }
}

// SIGFPE; exit 0 with negative block counts and byte sizes; half a report before the error.
TEST(CliBounds, InfoChecksEverythingBeforePrinting) {
  refused("info --tokens-per-block 4611686018427387904 --memory-gib 40", {"tokens_per_block = 4611686018427387904", "(set with --tokens-per-block)"});
  refused("info --tokens 9223372036854775807", {"9223372036854775807 tokens is too large", "(set with --tokens)"});
  refused("info --num-heads 4611686018427387904", {"num_heads = 4611686018427387904"});
  refused("info --kv-lora-rank 4611686018427387904", {"kv_lora_rank = 4611686018427387904"});
  refused("info --memory-gib 1e30", {"1e+30 GiB", "(set with --memory-gib)"});
  refused("info --memory-gib 100000", {"more than the", "blocks", "give at most"});
  refused("info --memory-gib -1", {"-1 GiB"});
  refused("info --tokens 0", {"tokens = 0"});
  refused("info --num-layers 1000000", {"num_layers = 1000000", "(set with --num-layers)"});
  refused("info --requests 2147483647:1", {"int32"});
  refused("bench --backend ref --batch 1048576 --cached 4096", {"blocks", "int32"});
  // Still fine at sane sizes, and the largest capacities print positive sizes.
  const CliResult r = run_dsa("info --tokens 2147483584 --memory-gib 2000");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.out.find("-"), r.out.find("-V3.2")) << "a negative number in: " << r.out;
}

// Accepted, then NaN output (or an infinite softmax scale) and exit 0.
TEST(CliBounds, DerivedValuesMustBeFinite) {
  refused("run --rope-theta 1", {"rope_theta = 1", "greater than 1", "(set with --rope-theta)"});
  refused("info --rope-theta 1", {"rope_theta = 1"});
  for (const char* v : {"1e308", "-100"}) {
    LayerConfig c;
    std::string j = config_to_json(c);
    const std::string key = "\"mscale_all_dim\":";
    const size_t p = j.find(key), end = j.find_first_of(",}", p);
    write_text(tmp("mscale.json"), j.substr(0, p + key.size()) + v + j.substr(end));
    refused("info --config " + tmp("mscale.json"), {"mscale_all_dim"});
  }
}

// "output rms nan" and exit 0.
TEST(CliBounds, NonFiniteInputsAndWeightsAreReportedByName) {
  write_inputs(tmp("nan_hidden.st"), {0}, {3}, nullptr, std::nanf(""), 256 + 7);
  refused("run --inputs " + tmp("nan_hidden.st") + kDims, {"'hidden' [3, 256]", "nan", "[1, 7]", "(set with --allow-nonfinite)"});
  const CliResult ok = run_dsa("run --allow-nonfinite --inputs " + tmp("nan_hidden.st") + kDims);
  EXPECT_EQ(ok.rc, 0) << ok.err;
  EXPECT_NE(ok.out.find("output rms nan"), std::string::npos) << ok.out;

  const LayerConfig cfg = small_layer_config();
  LayerWeights w = generate_weights(cfg, 1);
  w.o_proj[5] = float_to_bf16(std::numeric_limits<float>::infinity());
  save_weights(cfg, w, tmp("inf_w.st"), 0);
  refused("run --weights " + tmp("inf_w.st") + kDims, {"model.layers.0.self_attn.o_proj.weight", "inf", "[0, 5]"});
}

// Shards were opened wherever the index pointed.
TEST(CliBounds, ShardsOutsideTheIndexFolderAreRefused) {
  fs::create_directories(tmp("ckpt"));
  write_text(tmp("ckpt/model.safetensors.index.json"),
             R"({"weight_map": {"model.layers.0.self_attn.q_a_proj.weight": "../elsewhere.safetensors"}})");
  refused("run --weights " + tmp("ckpt/model.safetensors.index.json") + kDims, {"../elsewhere.safetensors", "inside the index's folder"});
  write_text(tmp("ckpt/model.safetensors.index.json"), R"({"weight_map": {"model.layers.0.self_attn.q_a_proj.weight": "/etc/passwd"}})");
  refused("run --weights " + tmp("ckpt/model.safetensors.index.json") + kDims, {"/etc/passwd", "inside the index's folder"});
}

// --config /dev/zero hung; a directory as a config.
TEST(CliBounds, SpecialFilesAreRefusedAsConfig) {
  const auto t0 = std::chrono::steady_clock::now();
  refused("info --config /dev/zero", {"/dev/zero", "not a regular file"});
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 30.0);
  refused("info --config " + fs::temp_directory_path().string(), {"is a directory"});
  refused("run --weights /dev/zero", {"/dev/zero", "not a safetensors file"});
}

// Errors after minutes of work: the position check after filling the cache,
// an unwritable --dump after the step, --requests abc after generating weights.
TEST(CliBounds, ErrorsComeBeforeAnyWork) {
  std::vector<int64_t> pos = {10'000'000, 10'000'002};  // the second should be 10'000'001
  write_inputs(tmp("late_pos.st"), {10'000'000}, {2}, &pos);
  const auto t0 = std::chrono::steady_clock::now();
  refused("run --inputs " + tmp("late_pos.st") + kDims, {"position_ids[1] = 10000002", "is 10000001"});
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0) << "the cache was filled first";
  refused("run --dump /nonexistent-dir/out.st" + kDims, {"--dump", "/nonexistent-dir", "does not exist"});
  refused("run --dump " + fs::temp_directory_path().string() + kDims, {"--dump", "is a directory"});
  refused("run --save-inputs /nonexistent-dir/in.st" + kDims, {"--save-inputs"});
  refused("run --requests abc" + kDims, {"request 'abc'"});
  refused("run --layer -1" + kDims, {"layer = -1", "(set with --layer)"});
}

// --requests/--batch/--new with --inputs were ignored.
TEST(CliBounds, InputsConflictWithStepFlags) {
  write_inputs(tmp("plain.st"), {0}, {2});
  for (const char* f : {"--requests 0:2", "--batch 2", "--new 3", "--cached 5"}) {
    refused("run --inputs " + tmp("plain.st") + " " + f + kDims, {"does not apply with --inputs"});
  }
}

// I64 position_ids past 2^31 were cut to int32; --seed -1 and --seed 2^64 were one seed;
// empty --requests '' / --dump '' fell back to defaults.
TEST(CliBounds, IntegersAndStringsAreTakenLosslessly) {
  std::vector<int64_t> pos = {0, (int64_t{1} << 32) + 1};  // int32 would cut it to 1, the right value
  write_inputs(tmp("wrap_pos.st"), {0}, {2}, &pos);
  refused("run --inputs " + tmp("wrap_pos.st") + kDims, {"position_ids[1] = 4294967297", "is 1"});
  refused("run --seed -1" + kDims, {"--seed", "'-1'"});
  refused("run --seed 18446744073709551616" + kDims, {"--seed", "18446744073709551616"});
  refused("bench --seed -1", {"--seed"});
  refused("run --requests ''" + kDims, {"--requests", "empty"});
  refused("run --dump ''" + kDims, {"--dump", "empty"});
  refused("info --config ''", {"--config", "empty"});
  const CliResult max_seed = run_dsa("run --seed 18446744073709551615 --requests 0:2" + kDims);
  EXPECT_EQ(max_seed.rc, 0) << max_seed.err;
  EXPECT_NE(max_seed.out.find("seed 18446744073709551615"), std::string::npos) << max_seed.out;
}

// "A subcommand is required".
TEST(CliBounds, UnknownSubcommandIsNamed) {
  refused("foo", {"'foo' is not a dsa subcommand", "info, run, bench, check"});
  refused("", {"subcommand"});
  EXPECT_EQ(run_dsa("--help").rc, 0);
  EXPECT_EQ(run_dsa("run --help").rc, 0);
}

// docs/run-format.md: the replay is bit-identical with cached > 0 without repeating flags.
TEST(CliBounds, ReplayNeedsNoFlagsRepeated) {
  const std::string w = tmp("r_w.st"), in = tmp("r_in.st"), a = tmp("r_a.st"), b = tmp("r_b.st"), c = tmp("r_c.st");
  ASSERT_EQ(run_dsa("run --requests 0:40,50:3,17:1 --seed 7 --kv-cache-dtype fp8 --no-hadamard" + kDims + " --save-weights " + w +
                    " --save-inputs " + in + " --dump " + a)
                .rc,
            0);
  // No dimension, dtype or seed flag: all come from the files' metadata.
  const CliResult r = run_dsa("run --weights " + w + " --inputs " + in + " --dump " + b);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("synthetic cache rows for the cached tokens (seed 7"), std::string::npos) << r.out;
  // Inputs alone: the weights are generated again from the recorded seed.
  ASSERT_EQ(run_dsa("run --inputs " + in + " --dump " + c).rc, 0);
  const st::Reader ra(a), rb(b), rc(c);
  for (const auto& t : ra.tensors()) {
    ASSERT_TRUE(rb.has(t.name)) << t.name;
    EXPECT_EQ(ra.bytes(t.name), rb.bytes(t.name)) << t.name;
    EXPECT_EQ(ra.bytes(t.name), rc.bytes(t.name)) << t.name;
  }
  for (const std::string& f : {w, in, a}) {
    const st::Reader m(f);
    ASSERT_TRUE(m.metadata().count("dsa.config")) << f;
    EXPECT_EQ(m.metadata().at("dsa.seed"), "7") << f;
    const LayerConfig cfg = config_from_json_text(m.metadata().at("dsa.config"), f);
    EXPECT_EQ(cfg.hidden_size, 256);
    EXPECT_EQ(cfg.kv_cache_dtype, LatentCacheDType::FP8);
    EXPECT_FALSE(cfg.indexer_hadamard);
  }
  // A flag still overrides what a file recorded; a different seed gives other synthetic rows.
  ASSERT_EQ(run_dsa("run --weights " + w + " --inputs " + in + " --seed 8 --dump " + b).rc, 0);
  EXPECT_NE(st::Reader(b).bytes("output"), ra.bytes("output"));
  // Files of runs with different configurations are not mixed silently.
  ASSERT_EQ(run_dsa("run --requests 0:2 --seed 7" + kDims + " --save-inputs " + tmp("other_in.st")).rc, 0);
  refused("run --weights " + w + " --inputs " + tmp("other_in.st"), {"different configurations"});
}

// README: 1 usage or input error, 2 check failed, 3 no usable GPU, 4 out of memory.
TEST(CliBounds, ExitCodesAreDistinct) {
  refused("run --num-heads 96", {"num_heads = 96"}, 1);
  refused("run --no-such-flag", {"no-such-flag"}, 1);
  // A step whose caches alone exceed any machine's memory: refused before allocating.
  refused("run --requests 2000000000:1", {"host memory", "this machine has"}, 4);
  const CliResult gpu = run_dsa("bench --backend cuda --new 1");
  if (gpu.rc != 0) {
    EXPECT_TRUE(gpu.rc == 3) << gpu.err;  // no CUDA backend or no GPU here
    EXPECT_EQ(gpu.out, "");
  }
}
