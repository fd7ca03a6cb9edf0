// The one-read streaming top-k (ctx.picks.topk = kNew, src/cuda/topk/topk_stream.cuh)
// against the radix kernel (kBaseline) and dsa::ref::topk: the same output
// bytes, row for row, on rows that cut the candidate buffer many times
// (ascending logits), never (descending), on heavy ties across cuts
// (quantized logits, all-equal rows), -inf, +inf, NaN and signed zeros,
// lengths around k and the 4096-logit chunk, masked rows and out-of-range
// visible_end (clamped as the radix kernel does). Outputs are poisoned with
// two patterns; the two runs must agree bit for bit. Shapes the stream
// kernel does not take (k > 2048, strides not a multiple of 4) must fall back
// to the radix kernel.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "cuda/topk/params.h"
#include "dev_buf.h"
#include "dsa/cuda.h"
#include "dsa/reference.h"

namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

using dsa::cuda::KernelPick;
using dsa::test::DevBuf;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// splitmix64: fast enough for a billion logits on the host.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uni(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next() >> 40) * (1.f / 16777216.f); }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
};

enum class Values {
  Distinct,   // uniform in [-4, 4): almost no ties
  Quantized,  // multiples of 1/8 in [-4, 4]: 65 levels, ties across every cut
  FewLevels,  // 9 levels incl. -0.0 / +0.0
  Special,    // mostly 0.5, some -inf, +inf, NaN, +-0, +-denormals, a few large
  AllEqual,   // one value per row
  AllNegInf,
  AllNaN,
  Ascending,  // every logit beats the running threshold: the most cuts
  Descending, // the first chunk holds the answer: no cut after the first
  Narrow,     // 1 + tiny: every key in one top-level radix bin
  Sawtooth,   // ascending runs of 5000 with a slowly rising base
};

void fill_row(float* row, int64_t S, Values v, Rng& g) {
  const float levels[9] = {-2.f, -1.f, -0.0f, 0.0f, 0.25f, 0.5f, 1.f, 1.5f, 3.f};
  for (int64_t i = 0; i < S; ++i) {
    float x = 0;
    switch (v) {
      case Values::Distinct: x = g.uni(-4.f, 4.f); break;
      case Values::Quantized: x = std::round(g.uni(-4.f, 4.f) * 8.f) / 8.f; break;
      case Values::FewLevels: x = levels[g.below(9)]; break;
      case Values::Special: {
        const int c = g.below(100);
        // Denormals too: the filter compares floats, which must order them as their keys do.
        x = c < 62 ? 0.5f : c < 70 ? -kInf : c < 74 ? kNaN : c < 75 ? kInf : c < 81 ? -0.0f : c < 87 ? 0.0f
          : c < 89 ? 1e-40f : c < 91 ? -1e-40f : c < 92 ? 2e-45f : g.uni(6.f, 14.f);
        break;
      }
      case Values::AllEqual: x = 0.75f; break;
      case Values::AllNegInf: x = -kInf; break;
      case Values::AllNaN: x = kNaN; break;
      case Values::Ascending: x = static_cast<float>(i) * 1e-3f - 3.f; break;
      case Values::Descending: x = 3.f - static_cast<float>(i) * 1e-3f; break;
      case Values::Narrow: x = 1.f + static_cast<float>(g.next() % 4096) * 1e-7f; break;
      case Values::Sawtooth: x = static_cast<float>(i % 5000) * 1e-3f + static_cast<float>(i / 5000) * 0.5f; break;
    }
    row[i] = x;
  }
}

struct Problem {
  int64_t T = 0, S = 0;
  int k = 2048;
  std::vector<float> logits;  // [T, S]
  std::vector<int32_t> vis;   // [T], may be out of [0, S] (the kernels clamp)
};

// Output of one pick, poisoned 0x5a then 0xa5; the two runs must match.
void run_pick(const Problem& pr, KernelPick pick, const float* dl, const int32_t* dv, int32_t* dout,
              std::vector<int32_t>* out) {
  dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  ctx.picks.topk = pick;
  dsa::cuda::TopkParams p;
  p.logits = dl;
  p.visible_end = dv;
  p.out = dout;
  p.T = pr.T;
  p.logits_stride = pr.S;
  p.k = pr.k;
  const size_t n = static_cast<size_t>(pr.T) * pr.k;
  std::vector<int32_t> again(n);
  out->assign(n, 0);
  for (int run = 0; run < 2; ++run) {
    CK(cudaMemset(dout, run ? 0xa5 : 0x5a, n * 4));
    ASSERT_NO_THROW(dsa::cuda::topk(ctx, p));
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(run ? again.data() : out->data(), dout, n * 4, cudaMemcpyDeviceToHost));
  }
  EXPECT_EQ(std::memcmp(out->data(), again.data(), n * 4), 0) << "two runs differ (poison left, or nondeterminism)";
}

// ref_rows < 0: every row against the CPU reference; else that many rows spread over T.
void check(const Problem& pr, bool expect_stream, int64_t ref_rows = -1) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  DevBuf<float> dl(pr.logits.size());
  DevBuf<int32_t> dv(pr.vis.size()), dout(static_cast<size_t>(pr.T) * pr.k);
  ASSERT_TRUE(dl.p && dv.p && dout.p) << "cudaMalloc failed";
  CK(cudaMemcpy(dl.p, pr.logits.data(), dl.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv.p, pr.vis.data(), dv.bytes(), cudaMemcpyHostToDevice));
  {
    dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
    ctx.picks.topk = KernelPick::kNew;
    dsa::cuda::TopkParams p;
    p.logits = dl.p;
    p.visible_end = dv.p;
    p.out = dout.p;
    p.T = pr.T;
    p.logits_stride = pr.S;
    p.k = pr.k;
    ASSERT_EQ(dsa::cuda::topk_runs_stream_kernel(ctx, p), expect_stream);
    ctx.picks.topk = KernelPick::kBaseline;
    ASSERT_FALSE(dsa::cuda::topk_runs_stream_kernel(ctx, p));
    ctx.picks.topk = KernelPick::kAuto;
    ASSERT_EQ(dsa::cuda::topk_runs_stream_kernel(ctx, p), expect_stream) << "kAuto runs the streaming kernel where it applies";
  }
  std::vector<int32_t> base, neu;
  ASSERT_NO_FATAL_FAILURE(run_pick(pr, KernelPick::kBaseline, dl.p, dv.p, dout.p, &base));
  ASSERT_NO_FATAL_FAILURE(run_pick(pr, KernelPick::kNew, dl.p, dv.p, dout.p, &neu));
  const int64_t k = pr.k;
  int64_t bad = 0;
  for (int64_t t = 0; t < pr.T; ++t) {
    if (!std::equal(neu.begin() + t * k, neu.begin() + (t + 1) * k, base.begin() + t * k)) {
      if (bad++ < 3) {
        int64_t j = 0;
        while (neu[t * k + j] == base[t * k + j]) ++j;
        ADD_FAILURE() << "row " << t << " (visible_end " << pr.vis[t] << ") new differs from baseline first at output "
                      << j << ": " << neu[t * k + j] << " vs " << base[t * k + j];
      }
    }
  }
  EXPECT_EQ(bad, 0) << "rows where the new kernel differs from the radix kernel";
  // The reference throws on visible_end outside [0, S]; the kernels clamp, so compare on clamped lengths.
  const int64_t step = ref_rows < 0 || ref_rows >= pr.T ? 1 : std::max<int64_t>(pr.T / std::max<int64_t>(ref_rows, 1), 1);
  std::vector<int32_t> ref(static_cast<size_t>(k));
  int64_t bad_ref = 0;
  for (int64_t t = 0; t < pr.T; t += step) {
    const int32_t v = static_cast<int32_t>(std::clamp<int64_t>(pr.vis[t], 0, pr.S));
    dsa::ref::topk(pr.logits.data() + t * pr.S, 1, pr.S, &v, k, ref.data());
    if (!std::equal(ref.begin(), ref.end(), neu.begin() + t * k)) {
      if (bad_ref++ < 3) {
        int64_t j = 0;
        while (neu[t * k + j] == ref[j]) ++j;
        ADD_FAILURE() << "row " << t << " (visible_end " << pr.vis[t] << ") differs from the reference first at output "
                      << j << ": " << neu[t * k + j] << " vs " << ref[j];
      }
    }
  }
  EXPECT_EQ(bad_ref, 0) << "rows where the new kernel differs from dsa::ref::topk";
}

// Rows take the listed lengths first, then random ones in [0, S].
Problem make(int64_t T, int64_t S, int k, Values v, uint64_t seed, std::vector<int64_t> lengths = {}) {
  Problem pr;
  pr.T = T, pr.S = S, pr.k = k;
  pr.logits.resize(static_cast<size_t>(T * S));
  pr.vis.resize(static_cast<size_t>(T));
  Rng g{seed};
  for (int64_t t = 0; t < T; ++t) {
    fill_row(pr.logits.data() + t * S, S, v, g);
    const int64_t len = t < static_cast<int64_t>(lengths.size()) ? lengths[t] : g.below(static_cast<int>(S) + 1);
    pr.vis[t] = static_cast<int32_t>(std::clamp<int64_t>(len, INT32_MIN, INT32_MAX));
  }
  return pr;
}

// Lengths around k, a chunk (4096), the first cut (6144 + ...) and the row.
std::vector<int64_t> edge_lengths(int64_t S, int k) {
  std::vector<int64_t> l = {0, 1, k - 1, k, k + 1, 4095, 4096, 4097, 6144, 6145, 8191, 8192, 8193, 12289, S - 1, S};
  for (int64_t& x : l) x = std::clamp<int64_t>(x, 0, S);
  return l;
}

// Small cases (also run under compute-sanitizer).
TEST(TopkNew, SmallDistinctEdges) { check(make(24, 20000, 2048, Values::Distinct, 1, edge_lengths(20000, 2048)), true); }
TEST(TopkNew, SmallSpecialInfNaN) { check(make(24, 20000, 2048, Values::Special, 2, edge_lengths(20000, 2048)), true); }
TEST(TopkNew, SmallQuantizedTies) { check(make(24, 20000, 2048, Values::Quantized, 3, edge_lengths(20000, 2048)), true); }
TEST(TopkNew, SmallAscendingCutsEveryChunk) { check(make(6, 20000, 2048, Values::Ascending, 4, {20000, 19999, 9000, 6145, 2049, 0}), true); }
TEST(TopkNew, SmallKs) {
  for (int k : {1, 2, 7, 100, 1000, 2047}) {
    SCOPED_TRACE(k);
    check(make(12, 12000, k, Values::FewLevels, 5 + k, edge_lengths(12000, k)), true);
  }
}
TEST(TopkNew, SmallMaskedAndOutOfRangeLengths) {
  // visible_end <= 0 writes only -1; past the stride clamps to the row.
  check(make(8, 9000, 2048, Values::Distinct, 6, {0, -1, INT32_MIN, 9001, INT32_MAX, 9000, 2048, -5}), true);
}

// Longer rows.
TEST(TopkNew, DistinctLongRows) {
  check(make(48, 65536, 2048, Values::Distinct, 11, edge_lengths(65536, 2048)), true);
}
TEST(TopkNew, LengthsTo131072) {
  check(make(10, 131072, 2048, Values::Distinct, 12, {1, 2047, 2048, 2049, 65536, 131072, 131071, 100000, 4096, 0}),
        true);
}
TEST(TopkNew, QuantizedTiesLongRows) {
  check(make(16, 131072, 2048, Values::Quantized, 13, {131072, 131071, 65536, 70001}), true);
}
TEST(TopkNew, FewLevels) { check(make(24, 40000, 2048, Values::FewLevels, 14, edge_lengths(40000, 2048)), true); }
TEST(TopkNew, SpecialLongRows) { check(make(20, 70000, 2048, Values::Special, 15, edge_lengths(70000, 2048)), true); }
TEST(TopkNew, Narrow) { check(make(12, 30000, 2048, Values::Narrow, 16, edge_lengths(30000, 2048)), true); }
TEST(TopkNew, DegenerateRows) {
  for (Values v : {Values::AllEqual, Values::AllNegInf, Values::AllNaN, Values::Ascending, Values::Descending,
                   Values::Sawtooth}) {
    SCOPED_TRACE(static_cast<int>(v));
    check(make(6, 131072, 2048, v, 17, {131072, 65536, 2049, 10000, 131071, 4097}), true);
  }
}
TEST(TopkNew, OneRow) { check(make(1, 65536, 2048, Values::Distinct, 18, {65536}), true); }

// Prefill at the end of a 64K context: row t sees S - T + t + 1 (every row
// against the radix kernel, 64 against the CPU reference).
TEST(TopkNew, PrefillCausal4096x65536) {
  const int64_t T = 4096, S = 65536;
  Problem pr = make(T, S, 2048, Values::Distinct, 19);
  for (int64_t t = 0; t < T; ++t) pr.vis[t] = static_cast<int32_t>(S - T + t + 1);
  check(pr, true, 64);
}

// Shapes the stream kernel does not take run the radix kernel under kNew.
TEST(TopkNew, FallbackKAbove2048) { check(make(6, 9000, 2049, Values::Distinct, 20, edge_lengths(9000, 2049)), false); }
TEST(TopkNew, FallbackOddStride) { check(make(12, 5001, 100, Values::FewLevels, 21, edge_lengths(5001, 100)), false); }

// Median CUDA-event times of both picks; run with --gtest_also_run_disabled_tests.
TEST(TopkNew, DISABLED_BenchBothPicks) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t T = 4096;
  const int k = 2048;
  for (int64_t S : {int64_t{65536}, int64_t{131072}}) {
    std::vector<float> h(static_cast<size_t>(T * S));
    Rng g{99};
    for (float& x : h) x = g.uni(-4.f, 4.f);
    std::vector<int32_t> vis(static_cast<size_t>(T));
    double read = 0;
    for (int64_t t = 0; t < T; ++t) {
      vis[t] = static_cast<int32_t>(S - T + t + 1);  // cached S - T, row t sees cached + t + 1
      read += vis[t];
    }
    DevBuf<float> dl(h.size());
    DevBuf<int32_t> dv(vis.size()), dout(static_cast<size_t>(T) * k);
    ASSERT_TRUE(dl.p && dv.p && dout.p);
    CK(cudaMemcpy(dl.p, h.data(), dl.bytes(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv.p, vis.data(), dv.bytes(), cudaMemcpyHostToDevice));
    const double bytes = read * 4 + static_cast<double>(T) * k * 4;
    std::vector<int32_t> outs[2];
    for (KernelPick pick : {KernelPick::kBaseline, KernelPick::kNew}) {
      dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
      ctx.picks.topk = pick;
      dsa::cuda::TopkParams p;
      p.logits = dl.p, p.visible_end = dv.p, p.out = dout.p, p.T = T, p.logits_stride = S, p.k = k;
      cudaEvent_t e0, e1;
      CK(cudaEventCreate(&e0));
      CK(cudaEventCreate(&e1));
      for (int i = 0; i < 3; ++i) dsa::cuda::topk(ctx, p);
      CK(cudaDeviceSynchronize());
      std::vector<float> ms;
      for (int i = 0; i < 20; ++i) {
        CK(cudaEventRecord(e0, ctx.stream));
        dsa::cuda::topk(ctx, p);
        CK(cudaEventRecord(e1, ctx.stream));
        CK(cudaEventSynchronize(e1));
        float m = 0;
        CK(cudaEventElapsedTime(&m, e0, e1));
        ms.push_back(m);
      }
      CK(cudaEventDestroy(e0));
      CK(cudaEventDestroy(e1));
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      std::printf("BENCH topk k=2048 [4096 x %lld] causal prefill  %-8s median %.4f ms (min %.4f max %.4f)  %.0f GB/s\n",
                  static_cast<long long>(S), pick == KernelPick::kNew ? "new" : "baseline", med, ms.front(), ms.back(),
                  bytes / med * 1e-6);
      std::vector<int32_t>& o = outs[pick == KernelPick::kNew];
      o.resize(dout.n);
      CK(cudaMemcpy(o.data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
    }
    EXPECT_TRUE(outs[0] == outs[1]) << "bench outputs differ between the picks";
  }
}

}  // namespace
