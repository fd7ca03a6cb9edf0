// dsa run end to end: files written by one run replay bit for bit, the dump
// matches the library, and prefix_hidden reproduces a longer prefill.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <unistd.h>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/layer.h"
#include "dsa/reference.h"
#include "dsa/safetensors.h"
#include "small_layer_config.h"

using namespace dsa;
using dsa::test::small_layer_config;
namespace fs = std::filesystem;

namespace {

// small_layer_config() as dsa CLI flags.
const char* kDims =
    " --hidden-size 256 --num-heads 64 --q-lora-rank 128 --kv-lora-rank 128 --qk-nope-head-dim 32 --v-head-dim 32"
    " --index-n-heads 8 --topk 64 --tokens-per-block 16";

// A fresh folder per process, removed at exit.
struct TmpDir {
  fs::path path = fs::temp_directory_path() / ("dsa_run_test_" + std::to_string(::getpid()));
  TmpDir() { fs::create_directories(path); }
  ~TmpDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string dir() {
  static const TmpDir d;
  return d.path.string();
}

int run_cli(const std::string& args, const std::string& env = "") {
  const std::string cmd = env + " " + std::string(DSA_CLI_PATH) + " run" + kDims + " " + args + " > " + dir() + "/log.txt 2>&1";
  return std::system(cmd.c_str());
}

}  // namespace

TEST(DsaRun, FilesReplayBitForBitAndMatchTheLibrary) {
  const std::string d = dir();
  ASSERT_EQ(0, run_cli("--requests 0:70,20:2 --seed 9 --save-weights " + d + "/w.st --save-inputs " + d + "/in.st --dump " + d + "/a.st"));
  ASSERT_EQ(0, run_cli("--weights " + d + "/w.st --inputs " + d + "/in.st --dump " + d + "/b.st --logits --seed 9"));
  st::Reader a(d + "/a.st"), b(d + "/b.st");
  for (const auto& t : a.tensors()) {
    ASSERT_TRUE(b.has(t.name)) << t.name;
    EXPECT_EQ(a.bytes(t.name), b.bytes(t.name)) << t.name;
  }
  EXPECT_TRUE(b.has("idx_logits"));
  EXPECT_FALSE(a.has("idx_logits"));
  EXPECT_EQ(a.info("output").shape, (std::vector<int64_t>{72, 64 * 32}));
  EXPECT_EQ(a.info("topk_local").shape, (std::vector<int64_t>{72, 64}));

  // The first request (no cache) matches the library run directly on the same files.
  const LayerConfig cfg = small_layer_config();
  const LayerWeights w = load_weights(cfg, d + "/w.st", 0);
  st::Reader in(d + "/in.st");
  const auto hidden = in.read_bf16("hidden");
  CacheManager cache(CacheConfig::for_layer(cfg).with_tokens(512));
  const std::vector<StepRequest> reqs = {{0, 0, 70}};
  reserve_step(cache, reqs);
  const auto md = build_batch_metadata(cache, reqs);
  const auto out = ref::layer_forward(cfg, w, std::vector<bf16_t>(hidden.begin(), hidden.begin() + 70 * 256), md, cache, 0,
                                      {}, nullptr, nullptr);
  const auto dumped = a.read_f32("output");
  EXPECT_EQ(std::vector<float>(dumped.begin(), dumped.begin() + 70 * 2048), out);

  // Bad inputs are reported, not crashed on.
  EXPECT_NE(0, run_cli("--inputs " + d + "/w.st"));
  EXPECT_NE(0, run_cli("--weights " + d + "/in.st"));
}

TEST(DsaRun, PrefixHiddenEqualsTheLongerPrefill) {
  const std::string d = dir();
  const LayerConfig cfg = small_layer_config();
  const int64_t T = 90, C = 80;
  const auto hidden = generate_hidden(cfg, T, 41);
  // Full prefill of T tokens in one step.
  st::Writer full;
  full.add_bf16("hidden", {T, 256}, hidden);
  full.write(d + "/full_in.st");
  // The same as C cached tokens (given as prefix_hidden) + T - C new ones.
  st::Writer split;
  split.add_bf16("hidden", {T - C, 256}, std::vector<bf16_t>(hidden.begin() + C * 256, hidden.end()));
  split.add_bf16("prefix_hidden", {C, 256}, std::vector<bf16_t>(hidden.begin(), hidden.begin() + C * 256));
  split.add_i32("request_cached", {1}, {int32_t(C)});
  split.add_i32("request_new", {1}, {int32_t(T - C)});
  split.write(d + "/split_in.st");
  ASSERT_EQ(0, run_cli("--seed 3 --inputs " + d + "/full_in.st --dump " + d + "/full.st"));
  ASSERT_EQ(0, run_cli("--seed 3 --inputs " + d + "/split_in.st --dump " + d + "/split.st"));
  st::Reader f(d + "/full.st"), s(d + "/split.st");
  const auto fo = f.read_bf16("output"), so = s.read_bf16("output");
  EXPECT_EQ(std::vector<bf16_t>(fo.begin() + C * 2048, fo.end()), so);
  const auto fk = f.read_i64("topk_local"), sk = s.read_i64("topk_local");
  EXPECT_EQ(std::vector<int64_t>(fk.begin() + C * 64, fk.end()), sk);
  // Synthetic prefixes instead: a different, but finite and deterministic, answer.
  st::Writer syn;
  syn.add_bf16("hidden", {T - C, 256}, std::vector<bf16_t>(hidden.begin() + C * 256, hidden.end()));
  syn.add_i32("request_cached", {1}, {int32_t(C)});
  syn.add_i32("request_new", {1}, {int32_t(T - C)});
  syn.write(d + "/syn_in.st");
  ASSERT_EQ(0, run_cli("--seed 3 --inputs " + d + "/syn_in.st --dump " + d + "/syn1.st"));
  ASSERT_EQ(0, run_cli("--seed 3 --inputs " + d + "/syn_in.st --dump " + d + "/syn2.st"));
  st::Reader y1(d + "/syn1.st"), y2(d + "/syn2.st");
  EXPECT_EQ(y1.bytes("output"), y2.bytes("output"));
  const auto yo = y1.read_f32("output");
  for (float v : yo) ASSERT_TRUE(std::isfinite(v));
  EXPECT_NE(y1.read_bf16("output"), so);
}

TEST(DsaRun, SameBitsWithOneOrThreeThreads) {
  const std::string d = dir();
  const std::string args = "--requests 0:40,70:1,30:3 --seed 4 --logits --dump ";
  ASSERT_EQ(0, run_cli(args + d + "/t1.st", "OMP_NUM_THREADS=1"));
  ASSERT_EQ(0, run_cli(args + d + "/t3.st", "OMP_NUM_THREADS=3"));
  st::Reader a(d + "/t1.st"), b(d + "/t3.st");
  ASSERT_EQ(a.tensors().size(), b.tensors().size());
  for (const auto& t : a.tensors()) EXPECT_EQ(a.bytes(t.name), b.bytes(t.name)) << t.name;
}
