// The standalone ops (dsa/ops.h) on CPU tensors: each against a plain
// computation written here on fresh random inputs (fixed seeds, outputs
// poisoned first), strided views against dense ones, and every validation
// rule with the error type and the argument the message names.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "dsa/dtypes.h"
#include "dsa/ops.h"
#include "ops_host_tensor.h"
#include "dsa/reference.h"
#include "dsa/reference_stages.h"
#include "expect_error.h"

using dsa::ops::DType;
using dsa::ops::Tensor;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

using dsa::test::HostTensor;

// Same values in a dense and a padded view.
void copy_values(const HostTensor& from, HostTensor& to) {
  const int64_t item = dsa::ops::itemsize(from.t.dtype);
  for (int64_t i = 0; i < from.numel(); ++i)
    std::memcpy(static_cast<uint8_t*>(to.t.data) + to.off(i) * item,
                static_cast<const uint8_t*>(from.t.data) + from.off(i) * item, static_cast<size_t>(item));
}

void fill_bf16(HostTensor& h, std::mt19937& g, float scale = 1.f) {
  std::normal_distribution<float> n(0.f, scale);
  for (int64_t i = 0; i < h.numel(); ++i) h.at<uint16_t>(i) = dsa::float_to_bf16(n(g));
}
float bf(const HostTensor& h, int64_t i) { return dsa::bf16_to_float(h.at<uint16_t>(i)); }

// fp8 codes of moderate magnitude (2^-3 .. 2^3), both signs: sums stay exact enough to compare tightly.
void fill_fp8(HostTensor& h, std::mt19937& g) {
  std::uniform_int_distribution<int> e(4, 10), m(0, 7), s(0, 1);
  for (int64_t i = 0; i < h.numel(); ++i) h.at<uint8_t>(i) = static_cast<uint8_t>((s(g) << 7) | (e(g) << 3) | m(g));
}

// ---- sparse MLA -------------------------------------------------------------------

struct MlaCase {
  int64_t T, H, D, dv, S, topk;
};

// The attention of spec 3.6 in double: every valid index (duplicates
// included) of a row, softmax of the scaled scores, weighted sum of the
// first dv dims.
void plain_sparse_mla(const HostTensor& q, const HostTensor& kv, const HostTensor& idx, const MlaCase& c, double scale,
                      std::vector<double>& out, std::vector<double>& lse, std::vector<double>& mx) {
  out.assign(c.T * c.H * c.dv, 0.0);
  lse.assign(c.T * c.H, 0.0);
  mx.assign(c.T * c.H, 0.0);
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t h = 0; h < c.H; ++h) {
      std::vector<int64_t> rows;
      std::vector<double> s;
      for (int64_t j = 0; j < c.topk; ++j) {
        const int32_t v = idx.at<int32_t>(t * c.topk + j);
        if (v < 0 || v >= c.S) continue;
        double dot = 0;
        for (int64_t d = 0; d < c.D; ++d) dot += double(bf(q, (t * c.H + h) * c.D + d)) * bf(kv, v * c.D + d);
        rows.push_back(v);
        s.push_back(dot * scale);
      }
      if (rows.empty()) {
        lse[t * c.H + h] = kInf;
        mx[t * c.H + h] = -kInf;
        continue;
      }
      const double m = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - m));
      for (size_t j = 0; j < rows.size(); ++j)
        for (int64_t d = 0; d < c.dv; ++d) out[(t * c.H + h) * c.dv + d] += s[j] / sum * bf(kv, rows[j] * c.D + d);
      lse[t * c.H + h] = m + std::log(sum);
      mx[t * c.H + h] = m;
    }
}

void fill_indices(HostTensor& idx, const MlaCase& c, std::mt19937& g) {
  std::uniform_int_distribution<int32_t> slot(0, static_cast<int32_t>(c.S - 1)), pct(0, 99);
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t j = 0; j < c.topk; ++j) {
      const int r = pct(g);
      // Row 1 has no valid index at all; elsewhere -1, out-of-range and duplicate slots mixed in.
      int32_t v = r < 10 ? -1 : r < 15 ? static_cast<int32_t>(c.S + r) : slot(g);
      if (t == 1) v = (j % 2) ? -1 : static_cast<int32_t>(c.S);
      if (t == 2 && j == 1) v = idx.at<int32_t>(t * c.topk);  // duplicate of the row's first index
      idx.at<int32_t>(t * c.topk + j) = v;
    }
}

TEST(OpsCpu, SparseMlaMatchesPlainComputation) {
  for (const MlaCase c : {MlaCase{5, 3, 64, 48, 40, 16}, MlaCase{3, 2, 576, 512, 300, 64}}) {
    std::mt19937 g(11 + static_cast<uint32_t>(c.D));
    HostTensor q(DType::BF16, {c.T, c.H, c.D}), kv(DType::BF16, {c.S, c.D}), idx(DType::I32, {c.T, c.topk});
    fill_bf16(q, g), fill_bf16(kv, g), fill_indices(idx, c, g);
    HostTensor out(DType::BF16, {c.T, c.H, c.dv}), mx(DType::F32, {c.T, c.H}), lse(DType::F32, {c.T, c.H});
    const double scale = 1.0 / std::sqrt(double(c.D));
    dsa::ops::sparse_mla_fwd(q.t, kv.t, idx.t, scale, c.dv, out.t, mx.t, lse.t);
    std::vector<double> po, pl, pm;
    plain_sparse_mla(q, kv, idx, c, scale, po, pl, pm);
    double num = 0, den = 0;
    for (int64_t i = 0; i < out.numel(); ++i) {
      const double d = bf(out, i) - po[i];
      num += d * d, den += po[i] * po[i];
      // bf16 output: within one rounding of the exact value (plus fp32 slack).
      EXPECT_LE(std::fabs(d), std::fabs(po[i]) * (1.0 / 256) + 1e-5) << "out " << i;
    }
    EXPECT_LE(std::sqrt(num / den), 4e-3);
    for (int64_t i = 0; i < c.T * c.H; ++i) {
      if (std::isinf(pl[i])) {
        EXPECT_EQ(lse.at<float>(i), kInf) << i;
        EXPECT_EQ(mx.at<float>(i), -kInf) << i;
        for (int64_t d = 0; d < c.dv; ++d) EXPECT_EQ(bf(out, i * c.dv + d), 0.f);
        continue;
      }
      EXPECT_NEAR(lse.at<float>(i), pl[i], 1e-4) << i;
      EXPECT_NEAR(mx.at<float>(i), pm[i], 1e-5 * std::max(1.0, std::fabs(pm[i]))) << i;
    }
  }
}

TEST(OpsCpu, SparseMlaStridedViewsEqualDense) {
  const MlaCase c{4, 2, 64, 32, 50, 8};
  std::mt19937 g(5);
  HostTensor q(DType::BF16, {c.T, c.H, c.D}), kv(DType::BF16, {c.S, c.D}), idx(DType::I32, {c.T, c.topk});
  fill_bf16(q, g), fill_bf16(kv, g), fill_indices(idx, c, g);
  HostTensor out(DType::BF16, {c.T, c.H, c.dv}), mx(DType::F32, {c.T, c.H}), lse(DType::F32, {c.T, c.H});
  dsa::ops::sparse_mla_fwd(q.t, kv.t, idx.t, 0.125, c.dv, out.t, mx.t, lse.t);
  // Padded rows everywhere; kv as [S, 1, D] and indices as [T, 1, topk] (the FlashMLA shapes).
  HostTensor q2(DType::BF16, {c.T, c.H, c.D}, 24), kv2(DType::BF16, {c.S, 1, c.D}, 8), idx2(DType::I32, {c.T, 1, c.topk}, 3);
  copy_values(q, q2), copy_values(kv, kv2), copy_values(idx, idx2);
  // The size-1 dimension's stride is arbitrary (frameworks put anything there).
  kv2.t.strides[1] = 12345;
  HostTensor out2(DType::BF16, {c.T, c.H, c.dv}, 8), mx2(DType::F32, {c.T, c.H}, 5), lse2(DType::F32, {c.T, c.H}, 1);
  const std::vector<uint8_t> before = out2.bytes();
  dsa::ops::sparse_mla_fwd(q2.t, kv2.t, idx2.t, 0.125, c.dv, out2.t, mx2.t, lse2.t);
  for (int64_t i = 0; i < out.numel(); ++i) ASSERT_EQ(out.at<uint16_t>(i), out2.at<uint16_t>(i)) << i;
  for (int64_t i = 0; i < c.T * c.H; ++i) {
    ASSERT_EQ(std::memcmp(&mx.at<float>(i), &mx2.at<float>(i), 4), 0) << i;
    ASSERT_EQ(std::memcmp(&lse.at<float>(i), &lse2.at<float>(i), 4), 0) << i;
  }
  // The padding between out2's rows keeps its poison.
  const std::vector<uint8_t> after = out2.bytes();
  std::vector<bool> inside(after.size() / 2, false);
  for (int64_t i = 0; i < out2.numel(); ++i) inside[out2.off(i)] = true;
  for (size_t e = 0; e < inside.size(); ++e)
    if (!inside[e]) ASSERT_TRUE(after[2 * e] == before[2 * e] && after[2 * e + 1] == before[2 * e + 1]) << "padding element " << e;
}

// ---- indexer logits ------------------------------------------------------------------

// logits[m, n] = k_scale[n] * sum_h w[m, h] * relu(q[m, h] . k[n]) in double;
// *bound receives a bound on the fp32 rounding of that sum.
double plain_logit(const HostTensor& q, int64_t qrow, const HostTensor& w, int64_t wrow, int64_t HI, const uint8_t* k, float ks,
                   double* bound) {
  double acc = 0, mag = 0;
  for (int64_t h = 0; h < HI; ++h) {
    double dot = 0, dmag = 0;
    for (int64_t d = 0; d < 128; ++d) {
      const double p = double(dsa::fp8_e4m3_to_float(q.at<uint8_t>((qrow * HI + h) * 128 + d))) * dsa::fp8_e4m3_to_float(k[d]);
      dot += p, dmag += std::fabs(p);
    }
    const double wh = w.at<float>(wrow * HI + h);
    acc += wh * std::max(dot, 0.0);
    mag += std::fabs(wh) * dmag;
  }
  *bound = 1e-5 * mag * std::fabs(ks) + 1e-30;
  return acc * ks;
}

TEST(OpsCpu, Fp8MqaLogitsMatchesPlainComputation) {
  const int64_t M = 7, HI = 4, N = 150;
  std::mt19937 g(21);
  HostTensor q(DType::FP8_E4M3, {M, HI, 128}), k(DType::FP8_E4M3, {N, 128}, 16), ks(DType::F32, {N}), w(DType::F32, {M, HI});
  fill_fp8(q, g), fill_fp8(k, g);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int64_t n = 0; n < N; ++n) ks.at<float>(n) = std::ldexp(1.f, static_cast<int>(n % 5) - 3);
  for (int64_t i = 0; i < M * HI; ++i) w.at<float>(i) = u(g);
  HostTensor s(DType::I32, {M}), e(DType::I32, {M});
  const int32_t starts[M] = {0, 10, -5, 100, 149, 60, 30}, ends[M] = {150, 75, 64, 400, 150, 20, 30};
  for (int64_t m = 0; m < M; ++m) s.at<int32_t>(m) = starts[m], e.at<int32_t>(m) = ends[m];
  for (bool clean : {true, false}) {
    HostTensor logits(DType::F32, {M, N}, 6);
    dsa::ops::fp8_mqa_logits(q.t, k.t, ks.t, w.t, s.t, e.t, logits.t, clean);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t lo = std::clamp<int64_t>(starts[m], 0, N), hi = std::clamp<int64_t>(ends[m], 0, N);
      for (int64_t n = 0; n < N; ++n) {
        const float got = logits.at<float>(m * N + n);
        if (n >= lo && n < hi) {
          double bound;
          const double want = plain_logit(q, m, w, m, HI, &k.at<uint8_t>(n * 128), ks.at<float>(n), &bound);
          ASSERT_NEAR(got, want, bound) << "m " << m << " n " << n;
        } else if (clean || n >= hi) {
          ASSERT_EQ(got, -kInf) << "m " << m << " n " << n << " clean " << clean;
        }
      }
    }
  }
  // k_scale as [N, 1] (DeepGEMM hands it so) gives the same.
  HostTensor logits1(DType::F32, {M, N}), logits2(DType::F32, {M, N});
  Tensor ks2 = ks.t;
  ks2.shape = {N, 1}, ks2.strides = {1, 1};
  dsa::ops::fp8_mqa_logits(q.t, k.t, ks.t, w.t, s.t, e.t, logits1.t, true);
  dsa::ops::fp8_mqa_logits(q.t, k.t, ks2, w.t, s.t, e.t, logits2.t, true);
  EXPECT_EQ(logits1.bytes(), logits2.bytes());
}

struct PagedCase {
  int64_t B, next_n, HI, block_size, num_blocks, max_blocks, L;
};

TEST(OpsCpu, Fp8PagedMqaLogitsMatchesPlainComputation) {
  const PagedCase c{3, 2, 4, 16, 10, 5, 70};
  const int64_t T = c.B * c.next_n, bb = c.block_size * 132;
  std::mt19937 g(31);
  HostTensor q(DType::FP8_E4M3, {c.B, c.next_n, c.HI, 128}), w(DType::F32, {T, c.HI}, 2);
  fill_fp8(q, g);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int64_t i = 0; i < T * c.HI; ++i) w.at<float>(i) = u(g);
  HostTensor cache(DType::U8, {c.num_blocks, c.block_size, 1, 132});
  {
    HostTensor keys(DType::FP8_E4M3, {c.num_blocks * c.block_size, 128});
    fill_fp8(keys, g);
    auto* p = static_cast<uint8_t*>(cache.t.data);
    for (int64_t b = 0; b < c.num_blocks; ++b)
      for (int64_t r = 0; r < c.block_size; ++r) {
        std::memcpy(p + b * bb + r * 128, &keys.at<uint8_t>((b * c.block_size + r) * 128), 128);
        const float s = std::ldexp(1.f, static_cast<int>((b + r) % 4) - 2);
        std::memcpy(p + b * bb + c.block_size * 128 + r * 4, &s, 4);
      }
  }
  HostTensor lens(DType::I32, {c.B}), table(DType::I32, {c.B, c.max_blocks}, 3);
  // Request 0: 37 tokens; 1: 90 (beyond max_context_len 70: clamped); 2: 50 but its block 2 is invalid (-1), so
  // its context ends at 32.
  const int32_t L[3] = {37, 90, 50};
  const int32_t tbl[3][5] = {{7, 2, 9, 0, 0}, {1, 3, 5, 8, 6}, {4, 0, -1, 2, 3}};
  for (int64_t b = 0; b < c.B; ++b) {
    lens.at<int32_t>(b) = L[b];
    for (int64_t j = 0; j < c.max_blocks; ++j) table.at<int32_t>(b * c.max_blocks + j) = tbl[b][j];
  }
  HostTensor logits(DType::F32, {T, c.L}, 4);
  dsa::ops::fp8_paged_mqa_logits(q.t, cache.t, w.t, lens.t, table.t, c.L, logits.t, true);
  const auto* p = static_cast<const uint8_t*>(cache.t.data);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t b = t / c.next_n, j = t % c.next_n;
    int64_t vis = std::clamp<int64_t>(L[b] - c.next_n + j + 1, 0, c.L);
    if (b == 2) vis = std::min<int64_t>(vis, 32);
    for (int64_t n = 0; n < c.L; ++n) {
      const float got = logits.at<float>(t * c.L + n);
      if (n < vis) {
        const uint8_t* blk = p + tbl[b][n / c.block_size] * bb;
        float ks;
        std::memcpy(&ks, blk + c.block_size * 128 + (n % c.block_size) * 4, 4);
        double bound;
        const double want = plain_logit(q, t, w, t, c.HI, blk + (n % c.block_size) * 128, ks, &bound);
        ASSERT_NEAR(got, want, bound) << "t " << t << " n " << n;
      } else {
        ASSERT_EQ(got, -kInf) << "t " << t << " n " << n;
      }
    }
  }
  // The flat [num_blocks, block_size * 132] form of the same cache gives the same logits.
  Tensor flat = cache.t;
  flat.shape = {c.num_blocks, bb}, flat.strides = {bb, 1};
  HostTensor logits2(DType::F32, {T, c.L}, 4);
  dsa::ops::fp8_paged_mqa_logits(q.t, flat, w.t, lens.t, table.t, c.L, logits2.t, true);
  EXPECT_EQ(logits.bytes(), logits2.bytes());
}

// ---- top-k -----------------------------------------------------------------------

TEST(OpsCpu, TopkMatchesPlainSelection) {
  const int64_t T = 6, S = 300, k = 20;
  std::mt19937 g(41);
  std::uniform_int_distribution<int> lvl(0, 40);
  HostTensor logits(DType::F32, {T, S}, 7), lens(DType::I32, {T});
  // Few distinct levels: many ties, which go to the lower position; some NaN (ranks as -inf).
  for (int64_t i = 0; i < T * S; ++i) logits.at<float>(i) = i % 37 == 5 ? std::nanf("") : 0.25f * lvl(g) - 3.f;
  const int32_t L[T] = {0, 5, 20, 21, 300, 1000};
  for (int64_t t = 0; t < T; ++t) lens.at<int32_t>(t) = L[t];
  lens.at<int32_t>(0) = -3;  // negative: no candidates
  HostTensor out(DType::I32, {T, k}, 2);
  dsa::ops::topk(logits.t, k, lens.t, out.t);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t vis = std::clamp<int64_t>(lens.at<int32_t>(t), 0, S);
    std::vector<int32_t> cand(static_cast<size_t>(vis));
    std::iota(cand.begin(), cand.end(), 0);
    auto key = [&](int32_t i) {
      const float v = logits.at<float>(t * S + i);
      return std::isnan(v) ? -kInf : v;
    };
    std::stable_sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) { return key(a) > key(b); });
    cand.resize(static_cast<size_t>(std::min<int64_t>(vis, k)));
    std::sort(cand.begin(), cand.end());
    for (int64_t j = 0; j < k; ++j)
      ASSERT_EQ(out.at<int32_t>(t * k + j), j < static_cast<int64_t>(cand.size()) ? cand[j] : -1) << "t " << t << " j " << j;
  }
}

// ---- RoPE + cache append ---------------------------------------------------------------

TEST(OpsCpu, RopeQuantAppendWritesWhatTheReferenceWrites) {
  for (dsa::LatentCacheDType dt : {dsa::LatentCacheDType::BF16, dsa::LatentCacheDType::FP8}) {
    dsa::LayerConfig cfg;
    cfg.kv_cache_dtype = dt;
    const bool fp8 = dt == dsa::LatentCacheDType::FP8;
    const int64_t T = 9, slots = 32, dkv = cfg.kv_lora_rank, rope = cfg.qk_rope_head_dim, row = cfg.latent_cache_bytes_per_token();
    std::mt19937 g(51);
    HostTensor ckv(DType::BF16, {T, dkv}, 8), kpe(DType::BF16, {T, rope}, 4), pos(DType::I32, {T}), slot(DType::I64, {T});
    fill_bf16(ckv, g, 2.f), fill_bf16(kpe, g);
    for (int64_t t = 0; t < T; ++t) {
      pos.at<int32_t>(t) = static_cast<int32_t>(t * 977 + 3);
      slot.at<int64_t>(t) = t == 3 ? -1 : t == 5 ? slots : (t * 7 + 2) % slots;  // two tokens outside the cache: skipped
    }
    HostTensor cache(fp8 ? DType::U8 : DType::BF16, {slots, fp8 ? row : dkv + rope});
    std::vector<uint8_t> want = cache.bytes();
    dsa::ops::rope_quant_append(cfg, ckv.t, kpe.t, pos.t, slot.t, cache.t);
    // Expected: the reference's RoPE (rounded to bf16) and row writer, by hand.
    std::vector<float> c(T * dkv), k(T * rope);
    for (int64_t i = 0; i < T * dkv; ++i) c[i] = bf(ckv, i);
    for (int64_t i = 0; i < T * rope; ++i) k[i] = bf(kpe, i);
    std::vector<int32_t> p(T);
    for (int64_t t = 0; t < T; ++t) p[t] = pos.at<int32_t>(t);
    dsa::ref::rope(cfg, p.data(), T, nullptr, k.data());
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = slot.at<int64_t>(t);
      if (s >= 0 && s < slots) dsa::ref::write_latent_row(cfg, want.data(), s, &c[t * dkv], &k[t * rope]);
    }
    EXPECT_EQ(cache.bytes(), want) << dsa::to_string(dt);
    // RoPE did rotate: position 3 moves k_pe away from its input.
    int moved = 0;
    for (int64_t i = 0; i < rope; ++i) moved += k[i] != bf(kpe, i);
    EXPECT_GT(moved, rope / 2);
  }
}

// ---- validation --------------------------------------------------------------------

struct MlaArgs {
  HostTensor q{DType::BF16, {2, 2, 64}}, kv{DType::BF16, {8, 64}}, idx{DType::I32, {2, 4}};
  HostTensor out{DType::BF16, {2, 2, 32}}, mx{DType::F32, {2, 2}}, lse{DType::F32, {2, 2}};
  MlaArgs() {
    std::mt19937 g(3);
    fill_bf16(q, g), fill_bf16(kv, g);
    for (int64_t i = 0; i < idx.numel(); ++i) idx.at<int32_t>(i) = static_cast<int32_t>(i % 8);
  }
  void run(double scale = 0.1, int64_t dv = 32) { dsa::ops::sparse_mla_fwd(q.t, kv.t, idx.t, scale, dv, out.t, mx.t, lse.t); }
};

template <class E>
void expect_param(const std::function<void()>& fn, const char* param, std::initializer_list<const char*> fragments) {
  dsa::test::expect_error<E>(fn, fragments);
  try {
    fn();
  } catch (const dsa::Error& e) {
    EXPECT_EQ(e.parameter(), param) << e.what();
  }
}

TEST(OpsCpuValidation, WrongDtypeIsDTypeError) {
  MlaArgs a;
  a.q.t.dtype = DType::F16;
  expect_param<dsa::DTypeError>([&] { a.run(); }, "q", {"sparse_mla_fwd", "q", "float16", "bfloat16"});
  MlaArgs b;
  b.idx.t.dtype = DType::I64;
  expect_param<dsa::DTypeError>([&] { b.run(); }, "indices", {"indices", "int64", "int32"});
  MlaArgs c;
  c.lse.t.dtype = DType::BF16;
  expect_param<dsa::DTypeError>([&] { c.run(); }, "lse", {"lse", "float32"});
}

TEST(OpsCpuValidation, WrongRankOrShapeIsShapeError) {
  MlaArgs a;
  a.kv.t.shape = {8, 2, 32}, a.kv.t.strides = {64, 32, 1};
  expect_param<dsa::ShapeError>([&] { a.run(); }, "kv", {"kv", "[8, 2, 32]", "one latent kv head"});
  MlaArgs b;
  b.kv.t.shape = {64 * 8}, b.kv.t.strides = {1};
  expect_param<dsa::ShapeError>([&] { b.run(); }, "kv", {"kv", "[S, d_qk] or [S, 1, d_qk]"});
  MlaArgs c;
  c.idx.t.shape = {1, 4};
  expect_param<dsa::ShapeError>([&] { c.run(); }, "indices", {"indices", "T of q"});
  MlaArgs d;
  d.out.t.shape = {2, 2, 16};
  expect_param<dsa::ShapeError>([&] { d.run(); }, "out", {"out", "d_v"});
  MlaArgs e;
  e.mx.t.shape = {2, 3};
  expect_param<dsa::ShapeError>([&] { e.run(); }, "max_logits", {"max_logits", "H of q"});
  MlaArgs f;
  f.q.t.strides = {128, 64};
  expect_param<dsa::ShapeError>([&] { f.run(); }, "", {"q", "3 dimensions but 2 strides"});
  MlaArgs h;
  expect_param<dsa::ShapeError>([&] { h.run(std::nan(""), 32); }, "sm_scale", {"sm_scale"});
  expect_param<dsa::ShapeError>([&] { h.run(-1.0, 32); }, "sm_scale", {"sm_scale"});
  expect_param<dsa::ShapeError>([&] { h.run(0.1, 65); }, "d_v", {"d_v = 65", "[1, d_qk = 64]"});
}

TEST(OpsCpuValidation, BadStridesAlignmentAndNullData) {
  MlaArgs a;
  a.q.t.strides = {128, 64, 2};  // last dimension not contiguous
  expect_param<dsa::ShapeError>([&] { a.run(); }, "q", {"q.stride(2) = 2", "contiguous", ".contiguous()"});
  MlaArgs b;
  b.kv.t.shape = {64, 8}, b.kv.t.strides = {1, 64};  // transposed view of the same memory
  b.kv.t.shape = {8, 64}, b.kv.t.strides = {1, 1};
  expect_param<dsa::ShapeError>([&] { b.run(); }, "kv", {"kv.stride(0) = 1", ".contiguous()"});
  MlaArgs c;
  c.q.t.strides = {64, 128, 1};  // heads and tokens swapped (a transpose)
  c.q.t.shape = {2, 2, 64};
  expect_param<dsa::ShapeError>([&] { c.run(); }, "q", {"q.stride(0) = 64", "transposed"});
  MlaArgs d;
  d.mx.t.data = static_cast<uint8_t*>(d.mx.t.data) + 2;
  expect_param<dsa::ShapeError>([&] { d.run(); }, "max_logits", {"max_logits", "aligned"});
  MlaArgs e;
  e.kv.t.data = nullptr;
  expect_param<dsa::ShapeError>([&] { e.run(); }, "kv", {"kv", "null"});
  MlaArgs f;
  f.q.t.shape = {2, -2, 64};
  expect_param<dsa::ShapeError>([&] { f.run(); }, "", {"q", "negative"});
}

TEST(OpsCpuValidation, OutputsOverlappingInputsAreRejectedBeforeAnyWrite) {
  MlaArgs a;
  // lse over q's memory.
  a.lse.t.data = a.q.t.data;
  const std::vector<uint8_t> q_before = a.q.bytes(), out_before = a.out.bytes();
  expect_param<dsa::ShapeError>([&] { a.run(); }, "lse", {"lse", "overlaps", "q"});
  EXPECT_EQ(a.q.bytes(), q_before);
  EXPECT_EQ(a.out.bytes(), out_before);
  MlaArgs b;
  b.mx.t.data = b.lse.t.data;  // two outputs on one buffer
  expect_param<dsa::ShapeError>([&] { b.run(); }, "max_logits", {"max_logits", "overlaps", "output lse"});
}

TEST(OpsCpuValidation, DevicesMustAgreeAndBeUsable) {
  MlaArgs a;
  a.kv.t.device = dsa::ops::DeviceKind::CUDA;
  expect_param<dsa::ShapeError>([&] { a.run(); }, "kv", {"q is on cpu", "kv is on cuda:0", "one device"});
  MlaArgs b;
  for (Tensor* t : {&b.q.t, &b.kv.t, &b.idx.t, &b.out.t, &b.mx.t, &b.lse.t}) t->device = dsa::ops::DeviceKind::CUDA, t->device_index = 99;
  const std::vector<uint8_t> before = b.out.bytes();
  dsa::test::expect_error<dsa::NoDeviceError>([&] { b.run(); }, {"sparse_mla_fwd", "cuda:99"});
  EXPECT_EQ(b.out.bytes(), before);
  MlaArgs c;
  c.out.t.device = dsa::ops::DeviceKind::CUDA;
  c.out.t.device_index = -1;
  expect_param<dsa::ShapeError>([&] { c.run(); }, "", {"out", "device ordinal"});
}

TEST(OpsCpuValidation, IndexerRules) {
  const int64_t M = 2, N = 70;
  HostTensor q(DType::FP8_E4M3, {M, 4, 128}), k(DType::FP8_E4M3, {N, 128}), ks(DType::F32, {N}), w(DType::F32, {M, 4});
  HostTensor s(DType::I32, {M}), e(DType::I32, {M}), logits(DType::F32, {M, N});
  auto run = [&] { dsa::ops::fp8_mqa_logits(q.t, k.t, ks.t, w.t, s.t, e.t, logits.t, true); };
  q.t.dtype = DType::U8;
  expect_param<dsa::DTypeError>(run, "q", {"q", "uint8", "float8_e4m3fn"});
  q.t.dtype = DType::FP8_E4M3;
  k.t.shape = {N, 64};
  expect_param<dsa::ShapeError>(run, "k", {"k", "128"});
  k.t.shape = {N, 128};
  w.t.shape = {M, 3};
  expect_param<dsa::ShapeError>(run, "weights", {"weights", "HI of q"});
  w.t.shape = {M, 4};
  logits.t.shape = {M, N - 1};
  expect_param<dsa::ShapeError>(run, "logits", {"logits", "N of k"});
  logits.t.shape = {M, N};
  logits.t.data = w.t.data;
  expect_param<dsa::ShapeError>(run, "logits", {"logits", "overlaps", "weights"});
}

TEST(OpsCpuValidation, PagedRules) {
  HostTensor q(DType::FP8_E4M3, {2, 1, 4, 128}), cache(DType::U8, {3, 16, 1, 132}), w(DType::F32, {2, 4});
  HostTensor lens(DType::I32, {2}), table(DType::I32, {2, 3}), logits(DType::F32, {2, 40});
  for (int i = 0; i < 2; ++i) lens.at<int32_t>(i) = 10;
  for (int i = 0; i < 6; ++i) table.at<int32_t>(i) = i % 3;
  int64_t L = 40;
  auto run = [&] { dsa::ops::fp8_paged_mqa_logits(q.t, cache.t, w.t, lens.t, table.t, L, logits.t, true); };
  EXPECT_NO_THROW(run());
  L = 41;
  expect_param<dsa::ShapeError>(run, "max_context_len", {"max_context_len = 41", "[B * next_n, max_context_len]"});
  L = 40;
  cache.t.dtype = DType::F32;
  expect_param<dsa::DTypeError>(run, "kv_cache", {"kv_cache", "uint8"});
  cache.t.dtype = DType::U8;
  cache.t.strides = {16 * 132 + 4, 132, 132, 1};  // padded blocks
  expect_param<dsa::ShapeError>(run, "kv_cache", {"kv_cache", "contiguous"});
  cache.t.strides = {16 * 132, 132, 132, 1};
  cache.t.shape = {3, 16 * 131};
  cache.t.strides = {16 * 131, 1};
  expect_param<dsa::ShapeError>(run, "kv_cache", {"kv_cache", "block_size * 132"});
  cache.t.shape = {3, 16, 1, 132};
  cache.t.strides = {16 * 132, 132, 132, 1};
  table.t.dtype = DType::I64;
  expect_param<dsa::DTypeError>(run, "block_table", {"block_table", "int32"});
  table.t.dtype = DType::I32;
  lens.t.shape = {3};
  expect_param<dsa::ShapeError>(run, "context_lens", {"context_lens", "B of q"});
}

TEST(OpsCpuValidation, TopkAndAppendRules) {
  HostTensor logits(DType::F32, {2, 50}), lens(DType::I32, {2}), out(DType::I32, {2, 8});
  int64_t k = 8;
  auto run = [&] { dsa::ops::topk(logits.t, k, lens.t, out.t); };
  k = -1;
  expect_param<dsa::ShapeError>(run, "k", {"k = -1"});
  k = 9;
  expect_param<dsa::ShapeError>(run, "out", {"out", "k"});
  k = 8;
  lens.t.dtype = DType::I64;
  expect_param<dsa::DTypeError>(run, "lengths", {"lengths", "int32"});

  dsa::LayerConfig cfg;
  HostTensor ckv(DType::BF16, {3, 512}), kpe(DType::BF16, {3, 64}), pos(DType::I32, {3}), slot(DType::I64, {3});
  HostTensor cache(DType::BF16, {16, 576});
  for (int t = 0; t < 3; ++t) pos.at<int32_t>(t) = t, slot.at<int64_t>(t) = t;
  auto app = [&] { dsa::ops::rope_quant_append(cfg, ckv.t, kpe.t, pos.t, slot.t, cache.t); };
  EXPECT_NO_THROW(app());
  cfg.kv_cache_dtype = dsa::LatentCacheDType::FP8;
  expect_param<dsa::DTypeError>(app, "latent_cache", {"latent_cache", "bfloat16", "fp8"});
  cfg.kv_cache_dtype = dsa::LatentCacheDType::BF16;
  slot.t.dtype = DType::I32;
  expect_param<dsa::DTypeError>(app, "slot_mapping", {"slot_mapping", "int64"});
  slot.t.dtype = DType::I64;
  kpe.t.shape = {3, 32};
  expect_param<dsa::ShapeError>(app, "k_pe", {"k_pe", "qk_rope_head_dim"});
  kpe.t.shape = {3, 64};
  cache.t.shape = {8, 576}, cache.t.strides = {1152, 1};  // every other row: a strided view of a cache
  expect_param<dsa::ShapeError>(app, "latent_cache", {"latent_cache", "contiguous", "in place"});
  cache.t.shape = {16, 576}, cache.t.strides = {576, 1};
  cache.t.data = ckv.t.data;
  expect_param<dsa::ShapeError>(app, "latent_cache", {"latent_cache", "overlaps", "c_kv"});
  cfg.num_heads = 0;
  EXPECT_THROW(app(), dsa::ConfigError);

  // Rows further apart than an int32 stride reaches: refused before any
  // memory is touched (the data pointer is never read), naming the fix.
  k = 8;
  lens.t.dtype = DType::I32;
  Tensor far = logits.t;
  far.strides = {int64_t{1} << 31, 1};
  auto run_far = [&] { dsa::ops::topk(far, k, lens.t, out.t); };
  expect_param<dsa::ShapeError>(run_far, "logits", {"logits.stride(0)", "2^31 - 1", ".contiguous()"});
}

TEST(OpsCpuValidation, ElementCountsThatOverflowAreShapeErrors) {
  // A broadcast-like view whose element count wraps a 64-bit integer must not
  // pass as a small tensor.
  HostTensor lens(DType::I32, {2}), out(DType::I32, {2, 8});
  Tensor huge = dsa::ops::dense(lens.t.data, DType::F32, {2, 8});
  huge.shape = {int64_t{1} << 40, int64_t{1} << 40};
  huge.strides = {0, 1};
  huge.name = "logits";
  EXPECT_THROW((void)huge.numel(), dsa::ShapeError);
  EXPECT_THROW(dsa::ops::topk(huge, 8, lens.t, out.t), dsa::ShapeError);
  huge.shape = {int64_t{1} << 40, 0};  // empty whatever the other dimension
  EXPECT_EQ(huge.numel(), 0);
}

TEST(OpsCpu, TensorHelpers) {
  EXPECT_STREQ(dsa::ops::to_string(DType::BF16), "bfloat16");
  EXPECT_STREQ(dsa::ops::to_string(DType::FP8_E4M3), "float8_e4m3fn");
  EXPECT_EQ(dsa::ops::itemsize(DType::BF16), 2);
  EXPECT_EQ(dsa::ops::itemsize(DType::I64), 8);
  EXPECT_EQ(dsa::ops::itemsize(DType::FP8_E4M3), 1);
  int x = 0;
  const Tensor t = dsa::ops::dense(&x, DType::F32, {2, 3, 4});
  EXPECT_EQ(t.strides, (std::vector<int64_t>{12, 4, 1}));
  EXPECT_EQ(t.numel(), 24);
  EXPECT_TRUE(t.contiguous());
  Tensor s = t;
  s.strides = {16, 4, 1};
  EXPECT_FALSE(s.contiguous());
  s.shape = {1, 3, 4};  // a size-1 dimension's stride does not matter
  EXPECT_TRUE(s.contiguous());
#ifndef DSA_HAVE_CUDA
  EXPECT_FALSE(dsa::ops::cuda_available());
#endif
}

TEST(OpsCpu, EmptyTensorsAreNoOps) {
  HostTensor q(DType::BF16, {0, 2, 64}), kv(DType::BF16, {8, 64}), idx(DType::I32, {0, 4});
  HostTensor out(DType::BF16, {0, 2, 32}), mx(DType::F32, {0, 2}), lse(DType::F32, {0, 2});
  q.t.data = nullptr, out.t.data = nullptr;  // empty: null data allowed
  EXPECT_NO_THROW(dsa::ops::sparse_mla_fwd(q.t, kv.t, idx.t, 0.1, 32, out.t, mx.t, lse.t));
  HostTensor logits(DType::F32, {3, 0}), lens(DType::I32, {3}), o(DType::I32, {3, 4});
  for (int t = 0; t < 3; ++t) lens.at<int32_t>(t) = 5;
  dsa::ops::topk(logits.t, 4, lens.t, o.t);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(o.at<int32_t>(i), -1);  // no columns: every position is padding
}

}  // namespace
