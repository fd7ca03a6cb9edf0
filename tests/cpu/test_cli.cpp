// The built `dsa` command line: exit codes and messages for bad flags and
// configurations, and small CPU-reference runs of `dsa bench` in each output
// form (the reference backend is forced so that the tests behave the same on
// machines with and without a GPU).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "cli_run.h"

namespace {

using dsa::test::expect_rejected;

dsa::test::CliResult run(const std::string& args) { return dsa::test::run_dsa(args); }

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// A narrow layer so that the CPU reference takes milliseconds.
const std::string kSmall = "--hidden-size 256 --q-lora-rank 128 --num-heads 64 --topk 64 --backend ref --warmup 0 --iters 1";

}  // namespace

TEST(Cli, BenchRejectsBadFlags) {
  expect_rejected("bench --backend foo", {"--backend 'foo' is not known", "auto", "ref", "cuda"});
  expect_rejected("bench --iters 0", {"--iters 0", "at least one"});
  expect_rejected("bench --warmup -1", {"--warmup -1"});
  expect_rejected("bench --backend ref --new 0", {"num_new = 0 is invalid", "(set with --new)"});
  expect_rejected("bench --backend ref --requests 5", {"request '5' has no ':'", "cached:new"});
  expect_rejected("bench --backend ref --requests 0:4,3:0", {"at least one new token"});
  expect_rejected("bench --backend ref --num-heads 96", {"num_heads = 96", "multiple of 64"});
  expect_rejected("bench --backend ref --kv-cache-dtype fp9", {"kv_cache_dtype 'fp9'", "(set with --kv-cache-dtype)"});
  expect_rejected("bench --stage attention", {"--stage 'attention' is not a stage", "sparse_mla"});
  expect_rejected("bench --graph --backend ref", {"--graph", "CUDA backend"});
  expect_rejected("bench --json --csv", {"choose one"});
  expect_rejected("bench --sweep --backend ref", {"--stage sparse_mla"});
  expect_rejected("bench --sweep-sparse-mla --backend ref", {"needs the CUDA backend"});
  expect_rejected("bench --sweep-sparse-mla -a num_heads=64", {"--axis does not apply", "fixed grid", "--iters"});
  expect_rejected("bench --sweep-sparse-mla --num-heads 64", {"--num-heads does not apply"});
  expect_rejected("bench --sweep-sparse-mla --new 128", {"--new does not apply"});
  expect_rejected("bench --sweep-sparse-mla --stage topk", {"--stage does not apply"});
  expect_rejected("bench --stage sparse_mla --sweep --profile-once", {"--profile-once does not apply"});
  expect_rejected("bench --protocol flashmla --backend ref", {"--protocol", "give it with --sweep-sparse-mla"});
  expect_rejected("bench --sweep-sparse-mla --protocol fast", {"protocol 'fast' is not known", "sustained", "flashmla", "(set with --protocol)"});
  expect_rejected("bench --sweep-sparse-mla --protocol flashmla --iters 5", {"do not apply with --protocol flashmla"});
  expect_rejected("bench --sweep-sparse-mla --protocol flashmla --backend ref", {"needs the CUDA backend"});
  expect_rejected("bench --tokens 4 --new 4", {"--tokens and --new"});
  expect_rejected("bench -a bogus=1,2", {"axis 'bogus' is not known", "num_heads"});
  expect_rejected("bench -a new=1,x", {"value 'x' is not an integer"});
  expect_rejected("bench -a new", {"name=v1,v2"});
  expect_rejected("bench -a new=1 -a new=2", {"given twice"});
  expect_rejected("bench --backend ref -a cached=0,64 --requests 0:1", {"cannot be combined with --requests"});
  expect_rejected("bench --config /nonexistent/config.json", {"/nonexistent/config.json"});
  // Without a GPU the backend is refused; with one, the bad --new is. Either way: a clear error.
  const auto r = run("bench --backend cuda --new 0");
  EXPECT_TRUE(r.rc == 3 || r.rc == 1) << r.err;  // 3: no usable GPU
  EXPECT_TRUE(r.err.find("--backend cuda") != std::string::npos || r.err.find("num_new = 0") != std::string::npos) << r.err;
  // CLI11's own parse errors (not a number) are non-zero too.
  EXPECT_NE(run("bench --num-heads 1x").rc, 0);
  EXPECT_NE(run("bench --no-such-flag").rc, 0);
}

TEST(Cli, InfoRejectsBadFlagsAndSizesABatch) {
  expect_rejected("info --batch 0", {"batch = 0", "(set with --batch)"});
  expect_rejected("info --requests 1:2:3", {"'2:3' is not an integer"});
  expect_rejected("info --tokens-per-block 0", {"tokens_per_block = 0"});
  EXPECT_NE(run("info --num-layers 0").rc, 0);
  // 2 requests: 64 tokens -> 1 block, 101 tokens -> 2 blocks; 2 layers x (64 x 1152 + 8448) bytes per block.
  const auto r = run("info --requests 0:64,100:1 --num-layers 2");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("batch of 2 requests (65 new tokens, longest 101 tokens) needs 3 blocks"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(493056 bytes)"), std::string::npos) << r.out;
  const auto t = run("info --tokens 129 --memory-gib 1");
  ASSERT_EQ(t.rc, 0) << t.err;
  EXPECT_NE(t.out.find("129 tokens need 3 blocks"), std::string::npos) << t.out;
  // floor(2^30 / 82176) = 13066 blocks.
  EXPECT_NE(t.out.find("1 GiB holds 13066 blocks = 836224 tokens"), std::string::npos) << t.out;
}

// The library names the parameter; the command line adds the flag that sets it.
TEST(Cli, ErrorsNameTheParameterAndTheFlag) {
  expect_rejected("info --num-heads 96", {"num_heads = 96", "multiple of 64", "(set with --num-heads)"});
  expect_rejected("info --topk 100", {"index_topk = 100", "(set with --topk)"});
  expect_rejected("info --tokens-per-block 0", {"tokens_per_block = 0", "(set with --tokens-per-block)"});
}

TEST(Cli, BenchReferenceTable) {
  const auto r = run("bench " + kSmall + " --new 8");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("backend reference"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("output [8, 8192]"), std::string::npos) << r.out;  // [T, H * v_head_dim]
  for (const char* s : {"q_a_proj", "indexer_logits", "topk", "sparse_mla", "v_up_proj", "layer total"}) {
    EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
  }
  EXPECT_EQ(r.out.find("% of peak against"), std::string::npos) << "the CPU has no measured peak";
}

TEST(Cli, BenchReferenceJsonForARaggedBatch) {
  const auto r = run("bench " + kSmall + " --requests 0:5,70:1,10:3 --json --o-proj");
  ASSERT_EQ(r.rc, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["num_tokens"], 9);
  EXPECT_EQ(j["output_shape"], (std::vector<int64_t>{9, 256}));  // o_proj: [T, hidden]
  EXPECT_EQ(j["requests"].size(), 3u);
  EXPECT_EQ(j["stages"].size(), 16u);
  EXPECT_EQ(j["stages"][15]["name"], "o_proj");
  EXPECT_GT(j["layer"]["median_ms"].get<double>(), 0.0);
  EXPECT_GT(j["layer"]["flops"].get<double>(), 0.0);
}

TEST(Cli, BenchSweepSkipsInvalidCombinations) {
  const auto r = run("bench " + kSmall + " -a new=1,2 -a num_heads=64,96 --csv");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.err.find("skip [new=1 num_heads=96]: num_heads = 96"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("skip [new=2 num_heads=96]"), std::string::npos) << r.err;
  EXPECT_EQ(count_lines(r.out), 1 + 2 * 16) << r.out;  // header, then 15 stages + layer per run
  EXPECT_NE(r.out.find("1x0:2"), std::string::npos) << r.out;

  const auto j = run("bench " + kSmall + " -a cached=0,100 --new 2 --json");
  ASSERT_EQ(j.rc, 0) << j.err;
  const auto arr = nlohmann::json::parse(j.out);
  ASSERT_TRUE(arr.is_array());
  ASSERT_EQ(arr.size(), 2u);
  EXPECT_EQ(arr[1]["requests"][0]["cached"], 100);

  expect_rejected("bench " + kSmall + " -a num_heads=96,32", {"every one of the 2 combinations was skipped"});
}

TEST(Cli, BenchOneStageAndStageList) {
  const auto r = run("bench " + kSmall + " --new 4 --stage topk");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("\ntopk "), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("sparse_mla"), std::string::npos) << r.out;
  const auto l = run("bench --list-stages");
  ASSERT_EQ(l.rc, 0);
  // 16 stages of the layer, plus x_proj: the CUDA backend's fused projection of x.
  EXPECT_EQ(count_lines(l.out), 17);
  EXPECT_EQ(l.out.rfind("x_proj\n", 0), 0u);
  EXPECT_NE(l.out.find("\nq_a_proj\n"), std::string::npos);
}
