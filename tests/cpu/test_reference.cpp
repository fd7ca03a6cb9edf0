// Each reference stage against a plain float64 computation on small shapes,
// plus the known answers of issue 3.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "dsa/error.h"
#include "dsa/reference.h"

using namespace dsa;

namespace {

std::vector<float> randn(size_t n, uint32_t seed, float std = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace

TEST(RefGemm, MatchesFloat64OnOddShapes) {
  for (bool bt : {false, true}) {
    for (auto [M, N, K] : {std::tuple<int, int, int>{1, 1, 1}, {7, 33, 300}, {13, 17, 513}, {64, 300, 576}, {2, 1000, 5}}) {
      auto A = randn(size_t(M) * K, 1 + M), B = randn(size_t(N) * K, 2 + N);
      std::vector<float> C(size_t(M) * N, NAN);
      const int64_t ldb = bt ? K : N;
      ref::gemm(M, N, K, A.data(), K, B.data(), ldb, bt, C.data(), N);
      std::vector<double> want(size_t(M) * N);
      for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
          double acc = 0;
          for (int k = 0; k < K; ++k) acc += double(A[m * K + k]) * (bt ? B[n * K + k] : B[k * N + n]);
          want[m * N + n] = acc;
        }
      EXPECT_LT(rel_err(C, want), 1e-6) << M << "x" << N << "x" << K << " b_trans " << bt;
      // accumulate adds onto what is there.
      ref::gemm(M, N, K, A.data(), K, B.data(), ldb, bt, C.data(), N, /*accumulate=*/true);
      for (auto& w : want) w *= 2;
      EXPECT_LT(rel_err(C, want), 1e-6);
    }
  }
}

TEST(RefGemm, SameBitsSerialAndParallel) {
  const int M = 50, N = 70, K = 700;
  auto A = randn(M * K, 3), B = randn(N * K, 4);
  std::vector<float> c1(M * N), c2(M * N);
  ref::gemm(M, N, K, A.data(), K, B.data(), K, true, c1.data(), N, false, true);
  ref::gemm(M, N, K, A.data(), K, B.data(), K, true, c2.data(), N, false, false);
  EXPECT_EQ(0, std::memcmp(c1.data(), c2.data(), c1.size() * 4));
}

TEST(RefNorms, MatchFloat64) {
  const int rows = 5, D = 96;
  auto x = randn(rows * D, 5, 3.0f), w = randn(D, 6), b = randn(D, 7);
  std::vector<float> y(rows * D);
  ref::rms_norm(x.data(), w.data(), y.data(), rows, D, 1e-6);
  std::vector<double> want(rows * D);
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int i = 0; i < D; ++i) ss += double(x[r * D + i]) * x[r * D + i];
    for (int i = 0; i < D; ++i) want[r * D + i] = x[r * D + i] / std::sqrt(ss / D + 1e-6) * w[i];
  }
  EXPECT_LT(rel_err(y, want), 1e-6);
  ref::layer_norm(x.data(), w.data(), b.data(), y.data(), rows, D, 1e-6);
  for (int r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int i = 0; i < D; ++i) mean += x[r * D + i] / double(D);
    for (int i = 0; i < D; ++i) var += (x[r * D + i] - mean) * (x[r * D + i] - mean) / D;
    for (int i = 0; i < D; ++i) want[r * D + i] = (x[r * D + i] - mean) / std::sqrt(var + 1e-6) * w[i] + b[i];
  }
  EXPECT_LT(rel_err(y, want), 1e-6);
}

TEST(RefRope, YarnFrequenciesFollowSpecSection6) {
  LayerConfig cfg;
  const auto f = ref::rope_inv_freq(cfg);
  ASSERT_EQ(f.size(), 32u);
  // low = 10, high = 23: below low the frequency is untouched, above high divided by 40.
  for (int i = 0; i < 32; ++i) {
    const double base = std::pow(10000.0, -2.0 * i / 64.0);
    const double ramp = std::clamp((i - 10.0) / 13.0, 0.0, 1.0);
    EXPECT_NEAR(f[i], base / 40.0 * ramp + base * (1 - ramp), 1e-15 * base) << i;
  }
  EXPECT_EQ(f[0], 1.0);
  EXPECT_DOUBLE_EQ(f[31], std::pow(10000.0, -62.0 / 64.0) / 40.0);
  cfg.rope_scaling.type = "none";
  const auto g = ref::rope_inv_freq(cfg);
  EXPECT_DOUBLE_EQ(g[31], std::pow(10000.0, -62.0 / 64.0));
}

TEST(RefRope, PositionZeroIsIdentity) {
  LayerConfig cfg;
  const auto f = ref::rope_inv_freq(cfg);
  for (auto style : {ref::RopeStyle::Interleaved, ref::RopeStyle::HalfSplit}) {
    auto x = randn(3 * 100, 8);
    auto y = x;
    const int32_t pos[3] = {0, 0, 0};
    ref::apply_rope(y.data(), 3, 100, 20, 1, pos, f, style);
    EXPECT_EQ(x, y);
  }
}

TEST(RefRope, MatchesFloat64RotationAndConventionsDiffer) {
  LayerConfig cfg;
  const auto f = ref::rope_inv_freq(cfg);
  const int rows = 6, stride = 192, col0 = 128, rpp = 2;  // q_pe of 2 heads per token, 3 tokens
  const int32_t pos[3] = {5, 1000, 163839};
  auto x = randn(rows * stride, 9);
  for (auto style : {ref::RopeStyle::Interleaved, ref::RopeStyle::HalfSplit}) {
    auto y = x;
    ref::apply_rope(y.data(), rows, stride, col0, rpp, pos, f, style);
    std::vector<double> want(x.begin(), x.end());
    for (int r = 0; r < rows; ++r) {
      for (int i = 0; i < 32; ++i) {
        const int a = col0 + (style == ref::RopeStyle::Interleaved ? 2 * i : i);
        const int b = col0 + (style == ref::RopeStyle::Interleaved ? 2 * i + 1 : i + 32);
        const double ang = double(float(pos[r / rpp]) * float(f[i]));
        const double x0 = x[r * stride + a], x1 = x[r * stride + b];
        want[r * stride + a] = x0 * std::cos(ang) - x1 * std::sin(ang);
        want[r * stride + b] = x0 * std::sin(ang) + x1 * std::cos(ang);
      }
    }
    EXPECT_LT(rel_err(y, want), 1e-5);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < col0; ++c) EXPECT_EQ(y[r * stride + c], x[r * stride + c]);
  }
  auto a = x, b = x;
  ref::apply_rope(a.data(), rows, stride, col0, rpp, pos, f, ref::RopeStyle::Interleaved);
  ref::apply_rope(b.data(), rows, stride, col0, rpp, pos, f, ref::RopeStyle::HalfSplit);
  std::vector<double> bd(b.begin(), b.end());
  EXPECT_GT(rel_err(a, bd), 0.1);
}

TEST(RefHadamard, MatchesMatrixAndIsInvolution) {
  auto x = randn(3 * 128, 10);
  auto y = x;
  ref::hadamard128(y.data(), 3);
  std::vector<double> want(3 * 128);
  for (int v = 0; v < 3; ++v)
    for (int i = 0; i < 128; ++i) {
      double acc = 0;
      for (int j = 0; j < 128; ++j) acc += (__builtin_popcount(i & j) % 2 ? -1.0 : 1.0) * x[v * 128 + j];
      want[v * 128 + i] = acc / std::sqrt(128.0);
    }
  EXPECT_LT(rel_err(y, want), 1e-6);
  ref::hadamard128(y.data(), 3);
  std::vector<double> xd(x.begin(), x.end());
  EXPECT_LT(rel_err(y, xd), 1e-6);
}

TEST(RefQuant, ScalesArePowersOfTwoAndRoundTripWithinE4M3) {
  auto x = randn(6 * 128, 11, 3.0f);
  for (int i = 0; i < 128; ++i) x[128 + i] *= 1e-3f;   // small block
  for (int i = 0; i < 128; ++i) x[256 + i] = 1e-7f;     // below the 1e-4 amax floor
  x[384] = 1e6f;                                      // one outlier
  std::vector<fp8_t> q(6 * 128);
  std::vector<float> s(6);
  ref::quantize_fp8_blocks(x.data(), 6, 128, q.data(), s.data());
  for (int v = 0; v < 6; ++v) {
    int e;
    EXPECT_EQ(std::frexp(s[v], &e), 0.5f) << "scale " << s[v] << " is not a power of two";
    float amax = 0;
    for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(x[v * 128 + i]));
    const float am = std::max(amax, 1e-4f);
    EXPECT_LE(am / s[v], 448.0f);
    EXPECT_GT(am / s[v], 224.0f);
    for (int i = 0; i < 128; ++i) {
      const float back = fp8_e4m3_to_float(q[v * 128 + i]) * s[v];
      const float xi = x[v * 128 + i];
      // Half a step of e4m3: 2^-4 relative for normals, 2^-10 * s absolute in the subnormal range.
      EXPECT_LE(std::fabs(back - xi), std::max(std::fabs(xi) * 0.0625f, std::ldexp(s[v], -10)) * 1.0001f) << v << " " << i;
    }
  }
  // Scales only.
  std::vector<float> s2(6);
  ref::quantize_fp8_blocks(x.data(), 6, 128, nullptr, s2.data());
  EXPECT_EQ(s, s2);
}

TEST(RefIndexer, LogitsMatchFloat64OverPagedCache) {
  const int tpb = 4, HI = 8, D = 128, maxb = 3, nblocks = 7;
  const int block_bytes = tpb * (D + 4);
  std::mt19937 g(12);
  std::vector<uint8_t> cache(nblocks * block_bytes);
  for (int b = 0; b < nblocks; ++b) {
    for (int i = 0; i < tpb * D; ++i) {
      fp8_t c;
      do c = static_cast<fp8_t>(g() & 0xff);
      while ((c & 0x7f) == 0x7f);  // no NaN codes
      cache[b * block_bytes + i] = c;
    }
    for (int o = 0; o < tpb; ++o) {
      const float s = std::ldexp(1.0f, int(g() % 9) - 12);
      std::memcpy(&cache[b * block_bytes + tpb * D + o * 4], &s, 4);
    }
  }
  // Two requests with scattered blocks; request 1 owns only two blocks.
  const std::vector<int32_t> table = {5, 0, 3, 2, 6, -1};
  const std::vector<int32_t> treq = {0, 0, 1, 0, 1};
  const std::vector<int32_t> vis = {1, 12, 8, 9, 0};
  const int T = 5, stride = 13;
  std::vector<fp8_t> q(T * HI * D);
  for (auto& c : q) {
    do c = static_cast<fp8_t>(g() & 0xff);
    while ((c & 0x7f) == 0x7f);
  }
  auto w = randn(T * HI, 13, 0.01f);
  std::vector<float> logits(T * stride, NAN);
  ref::indexer_logits(q.data(), w.data(), cache.data(), table.data(), treq.data(), vis.data(), T, HI, maxb, tpb, stride,
                      logits.data());
  std::vector<double> want(T * stride, -INFINITY);
  for (int t = 0; t < T; ++t) {
    for (int s = 0; s < vis[t]; ++s) {
      const int blk = table[treq[t] * maxb + s / tpb], off = s % tpb;
      float ks;
      std::memcpy(&ks, &cache[blk * block_bytes + tpb * D + off * 4], 4);
      double acc = 0;
      for (int h = 0; h < HI; ++h) {
        double dot = 0;
        for (int i = 0; i < D; ++i) dot += double(fp8_e4m3_to_float(q[(t * HI + h) * D + i])) * fp8_e4m3_to_float(cache[blk * block_bytes + off * D + i]);
        acc += w[t * HI + h] * std::max(dot, 0.0);
      }
      want[t * stride + s] = acc * ks;
    }
  }
  double num = 0, den = 0;
  for (int i = 0; i < T * stride; ++i) {
    if (std::isinf(want[i])) {
      EXPECT_EQ(logits[i], -INFINITY) << i;
    } else {
      num += (logits[i] - want[i]) * (logits[i] - want[i]);
      den += want[i] * want[i];
    }
  }
  EXPECT_LT(std::sqrt(num / den), 1e-6);
  // A visible key in a block the request does not own is an error, not a stray read.
  const std::vector<int32_t> bad_vis = {1, 12, 9, 9, 0};
  EXPECT_THROW(ref::indexer_logits(q.data(), w.data(), cache.data(), table.data(), treq.data(), bad_vis.data(), T, HI, maxb, tpb,
                                   stride, logits.data()),
               ShapeError);
}

TEST(RefTopk, TiesPaddingAndOrder) {
  const int S = 10, k = 4;
  // Row 0: ties at value 5 (positions 1, 3, 6, 8): the lower positions win.
  // Row 1: fewer visible than k: all visible, then -1.
  // Row 2: nothing visible: all -1.
  // Row 3: NaN ranks as -inf; -inf is still a candidate when visible, ties to the lower position.
  std::vector<float> L = {
      0, 5, 1, 5, 2, 9, 5, 0, 5, 0,  //
      3, 1, 2, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
      -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
      NAN, 1, -INFINITY, 2, 3, NAN, 0, 0, 0, 0};
  const std::vector<int32_t> vis = {10, 3, 0, 6};
  std::vector<int32_t> out(4 * k, 77);
  ref::topk(L.data(), 4, S, vis.data(), k, out.data());
  EXPECT_EQ(std::vector<int32_t>(out.begin(), out.begin() + 4), (std::vector<int32_t>{1, 3, 5, 6}));
  EXPECT_EQ(std::vector<int32_t>(out.begin() + 4, out.begin() + 8), (std::vector<int32_t>{0, 1, 2, -1}));
  EXPECT_EQ(std::vector<int32_t>(out.begin() + 8, out.begin() + 12), (std::vector<int32_t>{-1, -1, -1, -1}));
  EXPECT_EQ(std::vector<int32_t>(out.begin() + 12, out.begin() + 16), (std::vector<int32_t>{0, 1, 3, 4}));
}

TEST(RefTopk, MatchesFullSortOnRandomRows) {
  const int T = 20, S = 300, k = 64;
  std::mt19937 g(14);
  std::vector<float> L(T * S);
  for (auto& x : L) x = float(g() % 50);  // many ties
  std::vector<int32_t> vis(T);
  for (int t = 0; t < T; ++t) vis[t] = int32_t(g() % (S + 1));
  std::vector<int32_t> out(T * k);
  ref::topk(L.data(), T, S, vis.data(), k, out.data());
  for (int t = 0; t < T; ++t) {
    std::vector<int32_t> idx(vis[t]);
    for (int i = 0; i < vis[t]; ++i) idx[i] = i;
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return L[t * S + a] > L[t * S + b]; });
    idx.resize(std::min<size_t>(idx.size(), k));
    std::sort(idx.begin(), idx.end());
    while (idx.size() < size_t(k)) idx.push_back(-1);
    EXPECT_EQ(std::vector<int32_t>(out.begin() + t * k, out.begin() + (t + 1) * k), idx) << "row " << t;
  }
}

TEST(RefSparseMla, MatchesFloat64WithInvalidAndEmptyRows) {
  const int T = 5, H = 16, Dqk = 576, Dv = 512, topk = 64, slots = 200;
  auto q = randn(T * H * Dqk, 15, 0.5f), kv = randn(slots * Dqk, 16);
  std::mt19937 g(17);
  std::vector<int32_t> idx(T * topk);
  for (auto& i : idx) i = int32_t(g() % slots);
  for (int j = 0; j < topk; j += 5) idx[j] = -1;          // token 0: some -1
  for (int j = 0; j < topk; j += 7) idx[topk + j] = slots; // token 1: some out of range
  idx[2 * topk + 3] = idx[2 * topk + 4];                   // token 2: a duplicate counts twice
  for (int j = 0; j < topk; ++j) idx[4 * topk + j] = -1;   // token 4: nothing valid
  const double scale = LayerConfig{}.softmax_scale();
  std::vector<float> out(T * H * Dv, NAN), lse(T * H, NAN), mx(T * H, NAN);
  ref::sparse_mla(q.data(), kv.data(), slots, idx.data(), T, H, topk, Dqk, Dv, scale, out.data(), lse.data(), mx.data());
  std::vector<double> want(T * H * Dv, 0.0);
  for (int t = 0; t < 4; ++t) {
    for (int h = 0; h < H; ++h) {
      std::vector<double> s;
      std::vector<int> rows;
      for (int j = 0; j < topk; ++j) {
        const int r = idx[t * topk + j];
        if (r < 0 || r >= slots) continue;
        double d = 0;
        for (int c = 0; c < Dqk; ++c) d += double(q[(t * H + h) * Dqk + c]) * kv[r * Dqk + c];
        s.push_back(d * scale);
        rows.push_back(r);
      }
      const double m = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double v : s) sum += std::exp(v - m);
      EXPECT_NEAR(lse[t * H + h], m + std::log(sum), 1e-5);
      EXPECT_NEAR(mx[t * H + h], m, 1e-5);
      for (size_t j = 0; j < s.size(); ++j)
        for (int c = 0; c < Dv; ++c) want[(t * H + h) * Dv + c] += std::exp(s[j] - m) / sum * kv[rows[j] * Dqk + c];
    }
  }
  EXPECT_LT(rel_err(out, want), 1e-5);
  for (int h = 0; h < H; ++h) {
    EXPECT_EQ(lse[4 * H + h], INFINITY);
    EXPECT_EQ(mx[4 * H + h], -INFINITY);
    for (int c = 0; c < Dv; ++c) EXPECT_EQ(out[(4 * H + h) * Dv + c], 0.0f);
  }
  // One token alone (the decode path parallelizes inside the token) gives the same bits.
  std::vector<float> out1(H * Dv), lse1(H), mx1(H);
  ref::sparse_mla(q.data() + 2 * H * Dqk, kv.data(), slots, idx.data() + 2 * topk, 1, H, topk, Dqk, Dv, scale, out1.data(),
                  lse1.data(), mx1.data());
  EXPECT_EQ(0, std::memcmp(out1.data(), out.data() + 2 * H * Dv, out1.size() * 4));
  EXPECT_EQ(0, std::memcmp(lse1.data(), lse.data() + 2 * H, lse1.size() * 4));
}
