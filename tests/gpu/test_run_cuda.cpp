// `dsa run --backend cuda`: the same files as the reference path, the same
// dump layout, bitwise repeatable, and within dsa check's bounds of
// `dsa run --backend ref` (cached context as synthetic rows and as
// prefix_hidden); `dsa check` and `dsa bench` on checkpoint-format fp8
// weights. Runs the built binary (DSA_CLI_PATH); skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "../cpu/cli_run.h"
#include "dsa/cuda.h"
#include "dsa/layer.h"
#include "dsa/layer_check.h"
#include "dsa/safetensors.h"
#include "small_gpu_config.h"

namespace {

#define SKIP_WITHOUT_GPU() \
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

using dsa::test::CliResult;
using dsa::test::run_dsa;

std::string tmp(const std::string& name) { return testing::TempDir() + "dsa_run_cuda_" + name; }

// small_gpu_config(64, 64) as flags.
std::string shape_flags() {
  const dsa::LayerConfig c = dsa::test::small_gpu_config(64, 64);
  return "--hidden-size " + std::to_string(c.hidden_size) + " --q-lora-rank " + std::to_string(c.q_lora_rank) + " --num-heads " +
         std::to_string(c.num_heads) + " --topk " + std::to_string(c.index_topk);
}

CliResult run_ok(const std::string& args) {
  const CliResult r = run_dsa(args, 600);
  EXPECT_EQ(r.rc, 0) << "dsa " << args << "\nstdout: " << r.out << "\nstderr: " << r.err;
  return r;
}

std::vector<float> f32(const dsa::st::Reader& r, const std::string& name) { return r.read_f32(name); }
std::vector<int32_t> i32(const dsa::st::Reader& r, const std::string& name) {
  const std::vector<int64_t> v = r.read_i64(name);
  return std::vector<int32_t>(v.begin(), v.end());
}

// Every tensor of the reference dump is in the GPU dump with the same dtype
// and shape, and nothing else is.
void expect_same_layout(const dsa::st::Reader& g, const dsa::st::Reader& r) {
  EXPECT_EQ(g.tensors().size(), r.tensors().size());
  for (const auto& t : r.tensors()) {
    ASSERT_TRUE(g.has(t.name)) << t.name;
    EXPECT_EQ(g.info(t.name).dtype, t.dtype) << t.name;
    EXPECT_EQ(g.info(t.name).shape, t.shape) << t.name;
  }
}

// The GPU dump against the reference dump, as dsa check judges the whole
// layer: each projection within 1e-2 (relative L2), top-k sets overlapping
// >= 0.95 on average, and on the tokens whose sets are equal the attention
// and the output within 2e-2. The indexer's ue8m0 scales are powers of two
// that can flip between backends at a boundary, so the folded weights are
// compared without them.
void expect_close(const std::string& gpu_path, const std::string& ref_path) {
  const dsa::st::Reader g(gpu_path), r(ref_path);
  expect_same_layout(g, r);
  for (const char* n : {"position_ids", "request_ids", "request_cached", "request_new"}) EXPECT_EQ(g.read_i64(n), r.read_i64(n)) << n;
  const int64_t T = r.info("output").shape[0], row = r.info("output").shape[1];
  const int64_t K = r.info("topk_local").shape[1], HI = r.info("idx_weights").shape[1];
  const int64_t H = r.info("attn_lse").shape[1], dkv = r.info("attn_out").shape[2];
  dsa::check::Table tab;
  for (const char* n : {"q_lat", "c_kv", "k_pe", "q_nope", "q_pe", "idx_q", "idx_k", "q_cat"}) {
    tab.rel("tensor", n, f32(g, n), f32(r, n), 1e-2, r.info(n).shape.back());
  }
  {
    std::vector<float> wg = f32(g, "idx_weights"), wr = f32(r, "idx_weights");
    const std::vector<float> sg = f32(g, "idx_q_scale"), sr = f32(r, "idx_q_scale");
    for (size_t i = 0; i < wg.size(); ++i) wg[i] /= sg[i], wr[i] /= sr[i];
    tab.rel("tensor", "idx_weights / idx_q_scale", wg, wr, 1e-2, HI);
  }
  if (r.has("idx_logits")) tab.rel("tensor", "idx_logits", f32(g, "idx_logits"), f32(r, "idx_logits"), 2e-2, r.info("idx_logits").shape[1]);

  const std::vector<int32_t> kg = i32(g, "topk_local"), kr = i32(r, "topk_local");
  double sum = 0;
  std::vector<bool> same(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const double ov = dsa::check::overlap(kg.data() + t * K, kr.data() + t * K, K);
    sum += ov;
    same[t] = ov == 1.0;
  }
  tab.bound_check("topk", "set overlap (mean)", T ? sum / T : 1.0, 0.95, false);
  const std::vector<float> og = f32(g, "output"), orf = f32(r, "output"), ag = f32(g, "attn_out"), ar = f32(r, "attn_out");
  const std::vector<float> lg = f32(g, "attn_lse"), lr = f32(r, "attn_lse");
  std::vector<float> og_s, or_s, ag_s, ar_s, lg_s, lr_s;
  int64_t equal_rows = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (!same[t]) continue;
    ++equal_rows;
    og_s.insert(og_s.end(), og.begin() + t * row, og.begin() + (t + 1) * row);
    or_s.insert(or_s.end(), orf.begin() + t * row, orf.begin() + (t + 1) * row);
    ag_s.insert(ag_s.end(), ag.begin() + t * H * dkv, ag.begin() + (t + 1) * H * dkv);
    ar_s.insert(ar_s.end(), ar.begin() + t * H * dkv, ar.begin() + (t + 1) * H * dkv);
    lg_s.insert(lg_s.end(), lg.begin() + t * H, lg.begin() + (t + 1) * H);
    lr_s.insert(lr_s.end(), lr.begin() + t * H, lr.begin() + (t + 1) * H);
  }
  tab.bound_check("topk", "tokens with equal sets", static_cast<double>(equal_rows), 1, false, "the rows below need some");
  tab.rel("equal top-k rows", "attn_out", ag_s, ar_s, 2e-2, dkv);
  tab.rel("equal top-k rows", "attn_lse", lg_s, lr_s, 1e-2, H);
  tab.rel("equal top-k rows", "output", og_s, or_s, 2e-2, row);
  EXPECT_EQ(tab.failures(), 0) << gpu_path << " vs " << ref_path << "\n" << tab.format();
}

// Runs the step on both backends (and the GPU twice) with `args`, then
// compares: GPU runs bitwise equal, GPU within bounds of the reference.
void run_both_and_compare(const std::string& name, const std::string& args) {
  const std::string g1 = tmp(name + "_gpu1.safetensors"), g2 = tmp(name + "_gpu2.safetensors"), r = tmp(name + "_ref.safetensors");
  const CliResult a = run_ok("run --backend cuda " + args + " --dump " + g1);
  run_ok("run --backend cuda " + args + " --dump " + g2);
  run_ok("run --backend ref " + args + " --dump " + r);
  if (::testing::Test::HasFailure()) return;
  EXPECT_NE(a.out.find("wrote " + g1), std::string::npos) << a.out;
  const std::string b1 = dsa::test::slurp(g1), b2 = dsa::test::slurp(g2);
  EXPECT_GT(b1.size(), 1000u);
  EXPECT_TRUE(b1 == b2) << name << ": two GPU runs of the same step wrote different dumps";
  const dsa::st::Reader rd(g1);
  EXPECT_NE(rd.metadata().at("producer").find("CUDA"), std::string::npos);
  expect_close(g1, r);
}

TEST(RunCuda, PrefillMatchesReferenceAndRepeatsBitwise) {
  SKIP_WITHOUT_GPU();
  // 150 tokens, topk 64: tokens past position 63 select.
  run_both_and_compare("prefill", shape_flags() + " --requests 0:150 --seed 4 --logits");
}

TEST(RunCuda, SyntheticCachedRowsMatchReference) {
  SKIP_WITHOUT_GPU();
  // cached > 0 without prefix_hidden: both backends start from the same synthetic bytes.
  run_both_and_compare("synthetic_cache", shape_flags() + " --requests 300:2,100:1,700:3,0:40 --seed 6");
}

TEST(RunCuda, PrefixHiddenMatchesReference) {
  SKIP_WITHOUT_GPU();
  // An inputs file with prefix_hidden: each backend runs the prefill step over it first.
  const dsa::LayerConfig c = dsa::test::small_gpu_config(64, 64);
  const std::vector<int64_t> cached = {90, 130}, nw = {2, 40};
  dsa::st::Writer w;
  w.add_bf16("hidden", {42, c.hidden_size}, dsa::generate_hidden(c, 42, 21));
  w.add_bf16("prefix_hidden", {220, c.hidden_size}, dsa::generate_hidden(c, 220, 22));
  w.add_i64("request_cached", {2}, cached);
  w.add_i64("request_new", {2}, nw);
  const std::string in = tmp("prefix_inputs.safetensors");
  w.write(in);
  run_both_and_compare("prefix_hidden", shape_flags() + " --inputs " + in + " --seed 8");
  const CliResult r = run_ok("run --backend cuda " + shape_flags() + " --inputs " + in);
  EXPECT_NE(r.out.find("prefix: ran the layer over 220 cached tokens (prefix_hidden) on the GPU"), std::string::npos) << r.out;
}

TEST(RunCuda, OutputWithoutTraceIsTheSameBits) {
  SKIP_WITHOUT_GPU();
  // What a caller without the trace gets (the Python package's layer) is the dump's output, bit for bit.
  const std::string args = "run --backend cuda " + shape_flags() + " --requests 200:3,0:20 --seed 9";
  const std::string full = tmp("notrace_full.safetensors"), bare = tmp("notrace_bare.safetensors");
  run_ok(args + " --dump " + full);
  run_ok(args + " --no-intermediates --dump " + bare);
  if (HasFailure()) return;
  const dsa::st::Reader a(full), b(bare);
  EXPECT_FALSE(b.has("q_lat"));
  EXPECT_EQ(a.bytes("output"), b.bytes("output"));
}

TEST(RunCuda, SavedWeightsAndInputsReplayOnTheGpu) {
  SKIP_WITHOUT_GPU();
  // Files written by one run replay on the GPU with no flag repeated, to the same bits.
  const std::string w = tmp("replay_w.safetensors"), in = tmp("replay_in.safetensors");
  const std::string d1 = tmp("replay_d1.safetensors"), d2 = tmp("replay_d2.safetensors");
  run_ok("run --backend cuda " + shape_flags() + " --requests 100:2,0:30 --seed 12 --save-weights " + w + " --save-inputs " + in +
         " --dump " + d1);
  run_ok("run --backend cuda --weights " + w + " --inputs " + in + " --dump " + d2);
  if (HasFailure()) return;
  // Every tensor, bit for bit (the metadata names where the weights came from, which differs).
  const dsa::st::Reader a(d1), b(d2);
  expect_same_layout(a, b);
  for (const auto& t : a.tensors()) EXPECT_TRUE(a.bytes(t.name) == b.bytes(t.name)) << t.name;
}

TEST(RunCuda, CheckAndBenchOnCheckpointFormatFp8Weights) {
  SKIP_WITHOUT_GPU();
  const std::string w8 = tmp("fp8_weights.safetensors");
  run_ok("run " + shape_flags() + " --requests 0:4 --seed 14 --save-weights " + w8 + " --save-weights-dtype fp8");
  if (HasFailure()) return;
  // The configuration comes from the file's dsa.config.
  const CliResult c = run_ok("check --weights " + w8 + " --requests 0:150,300:2,700:1");
  EXPECT_NE(c.out.find("weights: " + w8 + " (layer 0)"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("checks passed"), std::string::npos) << c.out;
  // 64 new tokens and topk 64: token p selects all p + 1 visible keys, so the
  // pattern is known: 2080 selections, mean distance 43680 / 2080 = 21.
  const CliResult b = run_ok("bench --backend cuda --weights " + w8 + " --new 64 --warmup 1 --iters 2 --json");
  EXPECT_NE(b.out.find("\"selections\": 2080"), std::string::npos) << b.out;
  EXPECT_NE(b.out.find("\"mean_distance\": 21.0"), std::string::npos) << b.out;
  EXPECT_NE(b.out.find("\"recent_share\": 1.0"), std::string::npos) << b.out;
  EXPECT_NE(b.out.find("\"weights\": \"" + w8 + " (layer 0)\""), std::string::npos) << b.out;
}

}  // namespace
