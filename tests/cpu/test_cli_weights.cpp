// Checkpoint weights on the command line (--weights / --layer for bench and
// check, run --backend cuda without a GPU) and the index-pattern report of
// dsa bench (dsa/index_pattern.h) on hand-made selections.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cli_run.h"
#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/error.h"
#include "dsa/index_pattern.h"
#include "scratch_dir.h"
#include "small_layer_config.h"

namespace {

using dsa::test::CliResult;
using dsa::test::expect_rejected;
using dsa::test::run_dsa;

const std::string kShape = "--hidden-size 256 --q-lora-rank 128 --num-heads 64 --topk 64";

// A weights file of the small shape that records its configuration (dsa.config).
const std::string& small_weights() {
  static const std::string path = [] {
    const std::string p = dsa::test::scratch_path("cli_weights_small.safetensors");
    const CliResult r = run_dsa("run " + kShape + " --requests 0:4 --seed 3 --save-weights " + p + " --layer 2");
    EXPECT_EQ(r.rc, 0) << r.err;
    return p;
  }();
  return path;
}

TEST(CliWeights, RunBackendCudaWithoutGpuExits3) {
  const CliResult r = run_dsa("run --backend cuda " + kShape + " --requests 0:4");
  if (r.rc == 0) GTEST_SKIP() << "a CUDA GPU is present: the GPU tests (test_run_cuda) cover this path";
  EXPECT_EQ(r.rc, 3) << r.err;
  EXPECT_NE(r.err.find("--backend cuda"), std::string::npos) << r.err;
  EXPECT_TRUE(r.err.find("no CUDA GPU") != std::string::npos || r.err.find("no CUDA backend") != std::string::npos) << r.err;
  EXPECT_EQ(r.out, "") << "nothing is computed or printed before the backend is known to be usable";
}

TEST(CliWeights, RunRejectsUnknownBackend) { expect_rejected("run --backend tpu " + kShape, {"--backend", "tpu", "ref", "cuda"}); }

TEST(CliWeights, BadWeightsFileIsNamed) {
  const std::string missing = dsa::test::scratch_path("no_such_weights.safetensors");
  expect_rejected("bench --backend ref " + kShape + " --weights " + missing, {missing.c_str()});
  const std::string junk = dsa::test::scratch_path("junk_weights.safetensors");
  dsa::test::write_text(junk, "not a safetensors file");
  expect_rejected("bench --backend ref " + kShape + " --weights " + junk, {junk.c_str()});
  // A file of another layer: the tensor it lacks is named.
  expect_rejected("bench --backend ref --weights " + small_weights() + " --layer 0", {small_weights().c_str(), "model.layers.0.self_attn."});
  const CliResult help = run_dsa("check --help");
  if (help.out.find("--weights") == std::string::npos) GTEST_SKIP() << "this build has no CUDA backend: dsa check takes no options";
  expect_rejected("check " + kShape + " --weights " + missing, {missing.c_str()});
  expect_rejected("check " + kShape + " --weights " + junk, {junk.c_str()});
}

TEST(CliWeights, LayerWithoutWeightsIsRefused) {
  expect_rejected("bench --backend ref " + kShape + " --layer 3", {"--layer", "--weights"});
}

TEST(CliWeights, BenchRefRunsOnAWeightsFileWithItsRecordedConfig) {
  // No shape flag: the configuration comes from the file's dsa.config, the layer from dsa.layer.
  const CliResult r = run_dsa("bench --backend ref --weights " + small_weights() + " --warmup 0 --iters 1 --new 8 --cached 40");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("weights " + small_weights() + " (layer 2)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("output [8, 8192]"), std::string::npos) << r.out;  // H 64 x v 128: the recorded shape
  // Positions 40..47 see 41..48 keys, all within topk 64: 356 selections, and
  // a token at p selecting 0..p has distances summing to p (p + 1) / 2: 7764 / 356 = 21.8.
  EXPECT_NE(r.out.find("top-k selection of one step: 356 keys, mean distance from the query 21.8 positions, 100.0% within the last "
                       "4096 positions"),
            std::string::npos)
      << r.out;
  const CliResult j = run_dsa("bench --backend ref --weights " + small_weights() + " --warmup 0 --iters 1 --new 8 --json");
  ASSERT_EQ(j.rc, 0) << j.err;
  EXPECT_NE(j.out.find("\"index_pattern\""), std::string::npos) << j.out;
  // 8 new tokens, nothing cached: token i sees i + 1 keys and topk 64 takes them all.
  EXPECT_NE(j.out.find("\"selections\": 36"), std::string::npos) << j.out;
  EXPECT_NE(j.out.find("\"recent_share\": 1.0"), std::string::npos) << j.out;
  const CliResult c = run_dsa("bench --backend ref --weights " + small_weights() + " --warmup 0 --iters 1 --new 8 --csv");
  ASSERT_EQ(c.rc, 0) << c.err;
  EXPECT_NE(c.out.find("index_selections,index_mean_distance,index_recent_share"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find(",36,"), std::string::npos) << c.out;
}

TEST(CliWeights, BenchRefusesHeadAxisWithWeights) {
  expect_rejected("bench --backend ref --weights " + small_weights() + " -a num_heads=64,128", {"num_heads", "--weights"});
}

TEST(CliWeights, BenchWithWeightsDiffersFromSynthetic) {
  // The weights are used: a file saved from seed 3 gives seed 3's output, not --seed 1's synthetic one.
  const std::string d1 = dsa::test::scratch_path("cli_w_d1.safetensors"), d2 = dsa::test::scratch_path("cli_w_d2.safetensors");
  ASSERT_EQ(run_dsa("run --weights " + small_weights() + " --requests 0:4 --seed 1 --dump " + d1).rc, 0);
  ASSERT_EQ(run_dsa("run " + kShape + " --requests 0:4 --seed 1 --dump " + d2).rc, 0);
  EXPECT_NE(dsa::test::slurp(d1), dsa::test::slurp(d2));
}

// ---- index_pattern on hand-made selections ----------------------------------

struct Step {
  dsa::LayerConfig cfg = dsa::test::small_layer_config();  // tokens_per_block 16
  std::vector<dsa::StepRequest> reqs{{7, 5000, 2}, {3, 10, 1}};
  dsa::CacheManager cache{dsa::CacheConfig::for_step(cfg, reqs)};
  dsa::BatchMetadata md;
  Step() {
    dsa::reserve_step(cache, reqs);
    md = dsa::build_batch_metadata(cache, reqs);
  }
};

// Token 0 (position 5000): distances 0, 1, 5000; token 1 (5001): 4095 (the
// last one inside the window), 4096 (the first outside); token 2 (request 3,
// position 10): 0, 7, 10.
const std::vector<int32_t> kLocal = {5000, 4999, 0, -1,  //
                                     906, 905, -1, -1,   //
                                     10, 3, 0, -1};

TEST(IndexPattern, MeanDistanceAndRecentShare) {
  Step s;
  const dsa::IndexPattern p = dsa::index_pattern(s.md, kLocal.data(), 4);
  EXPECT_TRUE(p.measured);
  EXPECT_EQ(p.selections, 8);
  EXPECT_EQ(p.window, 4096);
  EXPECT_DOUBLE_EQ(p.mean_distance, (0 + 1 + 5000 + 4095 + 4096 + 0 + 7 + 10) / 8.0);
  EXPECT_DOUBLE_EQ(p.recent_share, 6 / 8.0);
  // A smaller window moves the boundary.
  EXPECT_DOUBLE_EQ(dsa::index_pattern(s.md, kLocal.data(), 4, 8).recent_share, 4 / 8.0);  // 0, 1, 0, 7
}

TEST(IndexPattern, FromGlobalSlotsEqualsFromLocalPositions) {
  Step s;
  std::vector<int32_t> global = kLocal;
  dsa::local_to_global_indices(s.md, global.data(), 4);
  ASSERT_NE(global, kLocal);  // the mapping is not the identity here
  const dsa::IndexPattern a = dsa::index_pattern(s.md, kLocal.data(), 4);
  const dsa::IndexPattern b = dsa::index_pattern_from_slots(s.md, global.data(), 4);
  EXPECT_EQ(b.selections, a.selections);
  EXPECT_DOUBLE_EQ(b.mean_distance, a.mean_distance);
  EXPECT_DOUBLE_EQ(b.recent_share, a.recent_share);
}

TEST(IndexPattern, NoSelectionsGiveZeros) {
  Step s;
  const std::vector<int32_t> none(12, -1);
  const dsa::IndexPattern p = dsa::index_pattern(s.md, none.data(), 4);
  EXPECT_TRUE(p.measured);
  EXPECT_EQ(p.selections, 0);
  EXPECT_EQ(p.mean_distance, 0.0);
  EXPECT_EQ(p.recent_share, 0.0);
}

TEST(IndexPattern, RejectsNonCausalAndForeignSelections) {
  Step s;
  std::vector<int32_t> bad = kLocal;
  bad[8] = 11;  // request 3's token at position 10 selecting position 11
  EXPECT_THROW(dsa::index_pattern(s.md, bad.data(), 4), dsa::ShapeError);
  std::vector<int32_t> global = kLocal;
  dsa::local_to_global_indices(s.md, global.data(), 4);
  global[8] = global[0];  // request 3's token selecting a slot of request 7
  EXPECT_THROW(dsa::index_pattern_from_slots(s.md, global.data(), 4), dsa::ShapeError);
}

}  // namespace
