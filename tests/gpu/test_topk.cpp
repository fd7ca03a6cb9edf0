// Causal top-k on the GPU (src/cuda/topk/params.h) against dsa::ref::topk on the
// same logits: identical output, position for position, including ties (to
// the lower position), the ascending order and the -1 padding; output
// poisoned before each run; two runs bitwise identical. Rows cover visible 0,
// below k, exactly k, k + 1 and the full row; logits with heavy ties (so the
// threshold bin overflows shared memory and the kernel rereads the row),
// -0.0 next to +0.0, -inf and NaN; strides that allow or forbid float4 loads.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "bench/cuda/kernel_bench.h"
#include "cuda/topk/params.h"
#include "dev_buf.h"
#include "dsa/cuda.h"
#include "dsa/error.h"
#include "dsa/reference.h"

namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

using dsa::test::DevBuf;

enum class Values {
  Distinct,   // uniform floats: almost no ties
  FewLevels,  // 9 distinct values incl. -0.0 / +0.0: ties everywhere
  Special,    // mostly equal, some -inf, NaN, +-0, a few large
  Narrow,     // values 1 + tiny: all keys share the top 12 bits (one level-1 bin)
};

void fill_row(std::vector<float>& row, Values v, std::mt19937_64& gen) {
  std::uniform_real_distribution<float> uni(-4.f, 4.f);
  std::uniform_int_distribution<int> level(0, 8);
  std::uniform_int_distribution<int> pct(0, 99);
  const float levels[9] = {-2.f, -1.f, -0.0f, 0.0f, 0.25f, 0.5f, 1.f, 1.5f, 3.f};
  for (float& x : row) {
    switch (v) {
      case Values::Distinct:
        x = uni(gen);
        break;
      case Values::FewLevels:
        x = levels[level(gen)];
        break;
      case Values::Special: {
        const int c = pct(gen);
        x = c < 70 ? 0.5f : c < 78 ? -std::numeric_limits<float>::infinity()
                   : c < 82        ? std::numeric_limits<float>::quiet_NaN()
                   : c < 88        ? -0.0f
                   : c < 94        ? 0.0f
                                   : uni(gen) + 10.f;
        break;
      }
      case Values::Narrow:
        x = 1.f + static_cast<float>(gen() % 4096) * 1e-7f;
        break;
    }
  }
}

struct Case {
  int64_t T, S;
  int k;
  Values values;
  uint64_t seed;
};

void run_case(const Case& c) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 gen(c.seed);
  std::vector<float> logits(static_cast<size_t>(c.T * c.S));
  std::vector<int32_t> vis(static_cast<size_t>(c.T));
  std::uniform_int_distribution<int64_t> any(0, c.S);
  const int64_t k = c.k;
  for (int64_t t = 0; t < c.T; ++t) {
    std::vector<float> row(static_cast<size_t>(c.S));
    fill_row(row, c.values, gen);
    std::copy(row.begin(), row.end(), logits.begin() + t * c.S);
    // Edge rows first, then random visible lengths.
    const int64_t edges[] = {0, 1, k - 1, k, k + 1, c.S, c.S - 1};
    int64_t v = t < 7 ? edges[t] : any(gen);
    vis[t] = static_cast<int32_t>(std::clamp<int64_t>(v, 0, c.S));
  }
  std::vector<int32_t> ref(static_cast<size_t>(c.T * k));
  dsa::ref::topk(logits.data(), c.T, c.S, vis.data(), k, ref.data());

  DevBuf<float> dl(logits.size());
  DevBuf<int32_t> dv(vis.size()), dout(ref.size());
  ASSERT_TRUE(dl.p && dv.p && dout.p);
  CK(cudaMemcpy(dl.p, logits.data(), dl.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv.p, vis.data(), dv.bytes(), cudaMemcpyHostToDevice));
  dsa::cuda::TopkParams p;
  p.logits = dl.p;
  p.visible_end = dv.p;
  p.out = dout.p;
  p.T = c.T;
  p.logits_stride = c.S;
  p.k = c.k;
  ASSERT_EQ(dsa::cuda::topk_workspace_bytes(c.T, c.S, c.k), 0u);
  std::vector<int32_t> out1(ref.size()), out2(ref.size());
  for (std::vector<int32_t>* out : {&out1, &out2}) {
    CK(cudaMemset(dout.p, 0x5a, dout.bytes()));  // poison: 0x5a5a5a5a is no valid position
    ASSERT_NO_THROW(dsa::cuda::topk(dsa::cuda::device_context(), p));
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(out->data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
  }
  int64_t bad_rows = 0;
  for (int64_t t = 0; t < c.T; ++t) {
    if (!std::equal(out1.begin() + t * k, out1.begin() + (t + 1) * k, ref.begin() + t * k)) {
      if (bad_rows++ < 3) {
        int64_t j = 0;
        while (out1[t * k + j] == ref[t * k + j]) ++j;
        ADD_FAILURE() << "row " << t << " (visible " << vis[t] << ") differs first at output " << j << ": "
                      << out1[t * k + j] << " vs reference " << ref[t * k + j];
      }
    }
  }
  EXPECT_EQ(bad_rows, 0);
  EXPECT_EQ(std::memcmp(out1.data(), out2.data(), out1.size() * 4), 0) << "two runs differ";
}

TEST(GpuTopk, DistinctK2048LongRows) { run_case({24, 65536, 2048, Values::Distinct, 21}); }
TEST(GpuTopk, FewLevelsK2048LongRowsOverflowSharedCandidates) { run_case({16, 40000, 2048, Values::FewLevels, 22}); }
TEST(GpuTopk, SpecialValuesInfNanSignedZero) { run_case({20, 9000, 2048, Values::Special, 23}); }
TEST(GpuTopk, NarrowRangeOneTopBin) { run_case({12, 30000, 2048, Values::Narrow, 24}); }
TEST(GpuTopk, OddStrideScalarLoads) { run_case({40, 5001, 100, Values::FewLevels, 25}); }
TEST(GpuTopk, SmallKDistinct) { run_case({40, 3001, 7, Values::Distinct, 26}); }
TEST(GpuTopk, ManyShortRows) { run_case({300, 2500, 2048, Values::Distinct, 27}); }

TEST(GpuTopk, RejectsBadShapes) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  float f = 0;
  int32_t i = 0;
  dsa::cuda::TopkParams p;
  p.logits = &f;
  p.visible_end = &i;
  p.out = &i;
  p.T = 1;
  p.logits_stride = 0;
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  EXPECT_THROW(dsa::cuda::topk(ctx, p), dsa::ShapeError);
  p.logits_stride = 8;
  p.k = -1;
  EXPECT_THROW(dsa::cuda::topk(ctx, p), dsa::ShapeError);
}

TEST(GpuTopk, BenchCountsBytesRead) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const dsa::cuda::KernelTiming t = dsa::cuda::topk_bench(8, 5000, 100, true, 1, 3, 7);
  double read = 0;
  for (int t8 = 0; t8 < 8; ++t8) read += 5000 - 8 + t8 + 1;
  EXPECT_EQ(t.bytes, read * 4 + 8.0 * 100 * 4);
  EXPECT_GT(t.median_ms, 0.0);
}

// Timing for docs/performance.md; run with --gtest_also_run_disabled_tests.
TEST(GpuTopk, DISABLED_Bench) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (bool causal : {false, true}) {
    const dsa::cuda::KernelTiming t = dsa::cuda::topk_bench(4096, 65536, 2048, causal, 3, 20, 1);
    std::printf("BENCH topk k=2048 [4096 x 65536] %-8s median %.4f ms (min %.4f max %.4f)  %.0f GB/s\n",
                causal ? "causal" : "full", t.median_ms, t.min_ms, t.max_ms, t.bytes / t.median_ms * 1e-6);
  }
  const dsa::cuda::KernelTiming d = dsa::cuda::topk_bench(64, 32768, 2048, false, 3, 50, 2);
  std::printf("BENCH topk k=2048 [64 x 32768] decode   median %.4f ms (min %.4f max %.4f)\n", d.median_ms, d.min_ms,
              d.max_ms);
}

}  // namespace
