// The layer with forced kernel picks (CudaLayer::set_kernel_picks, via
// check::CheckOptions::picks): every stage and the whole layer against the
// reference, as test_layer.cpp checks kAuto. Forcing an indexer pick hands
// the indexer the step's most new tokens per request (its kernel hint), which
// may pick another tile shape than kAuto; sparse_mla_fp8 = kNew passes the
// fp8 pool itself (kv_fp8, 656-byte rows) instead of gathering. Until the
// fused kernel is in the launcher, that path is refused with a ShapeError,
// which the test accepts; once it is, the check must pass.
#include <gtest/gtest.h>

#include "dsa/cuda.h"
#include "dsa/error.h"
#include "dsa/kernel_picks.h"
#include "dsa/layer_check.h"
#include "small_gpu_config.h"

namespace {

#define SKIP_WITHOUT_GPU() \
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

std::vector<dsa::StepRequest> reqs(std::initializer_list<std::pair<int64_t, int64_t>> cn) {
  std::vector<dsa::StepRequest> v;
  int64_t id = 0;
  for (auto [c, n] : cn) v.push_back(dsa::StepRequest{id++, c, n});
  return v;
}

dsa::check::StepCheck run(const dsa::LayerConfig& cfg, const std::vector<dsa::StepRequest>& r, const std::string& kernels) {
  dsa::check::CheckOptions o;
  o.seed = 5;
  o.sample = 100000;  // every token
  o.picks = dsa::cuda::parse_kernel_picks(kernels);
  return dsa::check::check_step(cfg, r, o);
}

}  // namespace

TEST(KernelPicksLayer, ForcedIndexerPicksMatchTheReference) {
  SKIP_WITHOUT_GPU();
  const dsa::LayerConfig cfg = dsa::test::small_gpu_config(64, 128);
  for (const char* k : {"indexer_decode=baseline,indexer_prefill=baseline", "indexer_decode=baseline"}) {
    for (const auto& r : {reqs({{500, 1}, {64, 1}, {1000, 1}}), reqs({{0, 70}, {300, 1}, {150, 2}})}) {
      const dsa::check::StepCheck c = run(cfg, r, k);
      EXPECT_EQ(c.table.failures(), 0) << k << "\n" << c.header << "\n" << c.table.format();
      EXPECT_NE(c.header.find("kernels "), std::string::npos) << c.header;
    }
  }
}

TEST(KernelPicksLayer, Fp8DecodeWithTheFusedPickMatchesTheReferenceOrIsRefused) {
  SKIP_WITHOUT_GPU();
  dsa::LayerConfig cfg = dsa::test::small_gpu_config(64, 128);
  cfg.kv_cache_dtype = dsa::LatentCacheDType::FP8;
  const auto r = reqs({{300, 1}, {64, 2}, {1000, 1}});
  // The baseline pick is the gather path kAuto runs today.
  const dsa::check::StepCheck base = run(cfg, r, "sparse_mla_fp8=baseline");
  EXPECT_EQ(base.table.failures(), 0) << base.table.format();
  try {
    const dsa::check::StepCheck fused = run(cfg, r, "sparse_mla_fp8=new");
    EXPECT_EQ(fused.table.failures(), 0) << fused.header << "\n" << fused.table.format();
  } catch (const dsa::ShapeError& e) {
    GTEST_SKIP() << "the sparse MLA launcher does not take kv_fp8 yet: " << e.what();
  }
}
