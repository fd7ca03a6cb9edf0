// Sparse MLA kernels (src/cuda/sparse_mla/sparse_mla.h) against a float64 reference on
// the same bf16-rounded inputs, spec 3.6 / 7: out rel L2 <= 1e-2 and cosine
// distance <= 1e-5, |lse diff| <= 1e-3, row max likewise, rows with no valid
// index exactly (0, +inf, -inf); outputs poisoned before each run; two runs
// bitwise identical.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/sparse_mla/sparse_mla.h"
#include "dev_buf.h"
#include "dsa/cuda.h"
#include "dsa/dtypes.h"
#include "dsa/error.h"
#include "dsa/reference.h"

namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

enum class Kernel { Simple, Sm90, Dispatch };

struct Case {
  int64_t T;
  int H;
  int topk;
  int64_t num_slots;
  bool with_valid_len;
  Kernel kernel;
  uint64_t seed;
  bool workspace = true;  // pass sparse_mla_workspace_bytes() of workspace (the sm90 kernel may split its last round)
  int workspace_offset = 0;  // floats into the allocation (1: not 16-byte aligned, so no split)
  int64_t ws_slots = -1;     // >= 0: size the workspace as for that many cache rows (too small to reorder)
  int check_every = 1;       // compare every n-th token with the reference (T <= 600)
  int reorder = -1;          // 1 / 0: the workspace must / must not hold the reordered indices (H100, H200)
};

using dsa::test::DevBuf;

// Rows beyond num_slots exist in the allocation and hold NaN: an index that
// points there is invalid and must never be read (a stray read turns into NaN).
constexpr int64_t kNanRows = 16;
constexpr float kScale = 0.1352338f;
constexpr int64_t kQPeriod = 1024;

struct Inputs {
  std::vector<dsa::bf16_t> q, kv;
  std::vector<int32_t> idx, vlen;
};

Inputs make_inputs(const Case& c) {
  constexpr int D = 576;
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  Inputs in;
  // q repeats with period kQPeriod tokens: keeps host generation and the
  // reference cheap at T > 65535 while every CTA still reads its own row.
  in.q.resize(static_cast<size_t>(std::min<int64_t>(c.T, kQPeriod)) * c.H * D);
  for (auto& v : in.q) v = dsa::float_to_bf16(nd(rng));
  in.kv.resize(static_cast<size_t>(c.num_slots + kNanRows) * D);
  for (int64_t i = 0; i < c.num_slots * D; ++i) in.kv[i] = dsa::float_to_bf16(nd(rng));
  for (size_t i = static_cast<size_t>(c.num_slots) * D; i < in.kv.size(); ++i) in.kv[i] = 0x7fc0;  // NaN
  in.idx.resize(static_cast<size_t>(c.T) * c.topk);
  std::uniform_int_distribution<int64_t> slot(0, c.num_slots - 1);
  std::uniform_int_distribution<int> kind(0, 99);
  for (int64_t t = 0; t < c.T; ++t) {
    // Every 7th row has nothing valid; the rest mix valid slots with -1,
    // slots just past the end (NaN rows) and far past it.
    const bool none_valid = t % 7 == 3;
    for (int j = 0; j < c.topk; ++j) {
      int32_t v;
      const int k = kind(rng);
      if (none_valid) {
        v = k < 50 ? -1 : (k < 80 ? static_cast<int32_t>(c.num_slots + k % kNanRows) : std::numeric_limits<int32_t>::max());
      } else if (k < 80) {
        v = static_cast<int32_t>(slot(rng));
      } else if (k < 90) {
        v = -1;
      } else if (k < 95) {
        v = static_cast<int32_t>(c.num_slots + k % kNanRows);
      } else {
        v = k < 98 ? std::numeric_limits<int32_t>::max() : -7;
      }
      in.idx[t * c.topk + j] = v;
    }
    // A fully invalid 64-tile in the middle of some rows.
    if (t % 5 == 1 && c.topk >= 128)
      for (int j = 64; j < 128; ++j) in.idx[t * c.topk + j] = -1;
  }
  if (c.with_valid_len) {
    in.vlen.resize(c.T);
    std::uniform_int_distribution<int> vl(0, c.topk);
    for (int64_t t = 0; t < c.T; ++t) {
      const int r = kind(rng);
      in.vlen[t] = r < 10 ? 0 : (r < 30 ? c.topk : (r < 35 ? c.topk + 100 : (r < 38 ? -5 : vl(rng))));
    }
  }
  return in;
}

// Float64 reference for one (t, h) row on the bf16 inputs.
void ref_row(const Case& c, const Inputs& in, int64_t t, int h, std::vector<double>& out, double& lse, double& rmax) {
  constexpr int D = 576, DV = 512;
  int n = c.topk;
  if (c.with_valid_len) n = std::clamp(in.vlen[t], 0, c.topk);
  const dsa::bf16_t* q = &in.q[(static_cast<size_t>(t % kQPeriod) * c.H + h) * D];
  std::vector<double> s;
  std::vector<int64_t> rows;
  double m = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < n; ++j) {
    const int32_t idx = in.idx[t * c.topk + j];
    if (idx < 0 || idx >= c.num_slots) continue;
    const dsa::bf16_t* k = &in.kv[static_cast<size_t>(idx) * D];
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += static_cast<double>(dsa::bf16_to_float(q[d])) * dsa::bf16_to_float(k[d]);
    s.push_back(dot * static_cast<double>(kScale));
    rows.push_back(idx);
    m = std::max(m, s.back());
  }
  out.assign(DV, 0.0);
  if (s.empty()) {
    lse = std::numeric_limits<double>::infinity();
    rmax = -std::numeric_limits<double>::infinity();
    return;
  }
  double l = 0;
  for (size_t j = 0; j < s.size(); ++j) {
    const double pj = std::exp(s[j] - m);
    l += pj;
    const dsa::bf16_t* v = &in.kv[static_cast<size_t>(rows[j]) * D];
    for (int d = 0; d < DV; ++d) out[d] += pj * dsa::bf16_to_float(v[d]);
  }
  for (auto& o : out) o /= l;
  lse = m + std::log(l);
  rmax = m;
}

std::vector<int64_t> rows_to_check(int64_t T, int every) {
  std::vector<int64_t> r;
  if (T <= 600) {
    for (int64_t t = 0; t < T; t += every) r.push_back(t);
    return r;
  }
  for (int64_t t = 0; t < 96; ++t) r.push_back(t);
  for (int64_t t = std::max<int64_t>(96, 65536 - 48); t < std::min<int64_t>(T, 65536 + 48); ++t) r.push_back(t);
  for (int64_t t = std::max<int64_t>(65536 + 48, T - 96); t < T; ++t) r.push_back(t);
  std::mt19937_64 rng(T);
  for (int i = 0; i < 200; ++i) r.push_back(static_cast<int64_t>(rng() % T));
  std::sort(r.begin(), r.end());
  r.erase(std::unique(r.begin(), r.end()), r.end());
  return r;
}

void run_case(const Case& c) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  constexpr int D = 576, DV = 512;
  const Inputs in = make_inputs(c);

  DevBuf<__nv_bfloat16> dq(static_cast<size_t>(c.T) * c.H * D), dkv(in.kv.size()), dout(static_cast<size_t>(c.T) * c.H * DV);
  DevBuf<int32_t> didx(in.idx.size()), dvl(std::max<size_t>(in.vlen.size(), 1));
  DevBuf<float> dlse(static_cast<size_t>(c.T) * c.H), dmax(static_cast<size_t>(c.T) * c.H);
  ASSERT_TRUE(dq.p && dkv.p && dout.p && didx.p && dvl.p && dlse.p && dmax.p) << "cudaMalloc failed";
  CK(cudaMemcpy(dq.p, in.q.data(), in.q.size() * 2, cudaMemcpyHostToDevice));
  for (size_t off = in.q.size(); off < dq.n; off += in.q.size())
    CK(cudaMemcpy(dq.p + off, dq.p, std::min(in.q.size(), dq.n - off) * 2, cudaMemcpyDeviceToDevice));
  CK(cudaMemcpy(dkv.p, in.kv.data(), dkv.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(didx.p, in.idx.data(), didx.bytes(), cudaMemcpyHostToDevice));
  if (c.with_valid_len) CK(cudaMemcpy(dvl.p, in.vlen.data(), in.vlen.size() * 4, cudaMemcpyHostToDevice));

  dsa::cuda::SparseMlaParams p;
  p.q = dq.p;
  p.kv = dkv.p;
  p.indices = didx.p;
  p.valid_len = c.with_valid_len ? dvl.p : nullptr;
  p.out = dout.p;
  p.lse = dlse.p;
  p.row_max = dmax.p;
  p.T = c.T;
  p.num_slots = c.num_slots;
  p.num_heads = c.H;
  p.topk = c.topk;
  p.softmax_scale = kScale;
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  if (c.kernel == Kernel::Sm90 && !dsa::cuda::sparse_mla_sm90_can_implement(p, ctx))
    GTEST_SKIP() << "sm90 kernel does not take this shape on this device";
  // ws_slots < 0: the workspace for this cache; else sized as for a cache of ws_slots rows.
  const size_t ws_bytes =
      c.workspace ? dsa::cuda::sparse_mla_workspace_bytes(ctx, c.T, c.H, c.topk, c.ws_slots < 0 ? c.num_slots : c.ws_slots) : 0;
  if (c.reorder >= 0) {
    // The test's claim about the path: the launcher reorders when the size
    // query plans room for the reordered copy beyond the split parts (the
    // size for a one-row cache) and the workspace passed has that room.
    const size_t full = dsa::cuda::sparse_mla_workspace_bytes(ctx, c.T, c.H, c.topk, c.num_slots);
    const size_t split_only = dsa::cuda::sparse_mla_workspace_bytes(ctx, c.T, c.H, c.topk, 1);
    const bool reorders = full > split_only && ws_bytes >= full;
    EXPECT_EQ(reorders, c.reorder == 1) << "workspace of " << ws_bytes << " bytes (" << full << " with the reordering, "
                                        << split_only << " without): the launcher " << (c.reorder ? "would not" : "would")
                                        << " reorder the indices for this shape on this device";
  }
  DevBuf<float> dws(std::max<size_t>(ws_bytes / sizeof(float), 1) + c.workspace_offset);
  ASSERT_TRUE(dws.p) << "cudaMalloc failed";
  p.workspace = dws.p + c.workspace_offset;
  p.workspace_bytes = ws_bytes;

  std::vector<uint16_t> out[2];
  std::vector<float> lse[2], rmax[2];
  for (int run = 0; run < 2; ++run) {
    CK(cudaMemset(dout.p, 0xff, dout.bytes()));  // NaN poison
    CK(cudaMemset(dlse.p, 0xff, dlse.bytes()));
    CK(cudaMemset(dmax.p, 0xff, dmax.bytes()));
    CK(cudaMemset(dws.p, 0xff, dws.bytes()));  // the workspace needs no initialization
    switch (c.kernel) {
      case Kernel::Simple: dsa::cuda::sparse_mla_simple(p, ctx); break;
      case Kernel::Sm90: dsa::cuda::sparse_mla_sm90(p, ctx); break;
      case Kernel::Dispatch: dsa::cuda::sparse_mla(p, ctx); break;
    }
    CK(cudaDeviceSynchronize());
    out[run].resize(dout.n);
    lse[run].resize(dlse.n);
    rmax[run].resize(dmax.n);
    CK(cudaMemcpy(out[run].data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(lse[run].data(), dlse.p, dlse.bytes(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(rmax[run].data(), dmax.p, dmax.bytes(), cudaMemcpyDeviceToHost));
  }
  EXPECT_EQ(0, std::memcmp(out[0].data(), out[1].data(), dout.bytes())) << "out differs between two runs";
  EXPECT_EQ(0, std::memcmp(lse[0].data(), lse[1].data(), dlse.bytes())) << "lse differs between two runs";
  EXPECT_EQ(0, std::memcmp(rmax[0].data(), rmax[1].data(), dmax.bytes())) << "row_max differs between two runs";

  double err2 = 0, ref2 = 0, dot = 0, got2 = 0, worst_lse = 0, worst_max = 0;
  int64_t bad_special = 0, nan_count = 0, checked_rows = 0, empty_rows = 0;
  std::string first_bad;
  std::vector<double> ro;
  for (int64_t t : rows_to_check(c.T, c.check_every)) {
    for (int h = 0; h < c.H; ++h) {
      double rl, rm;
      ref_row(c, in, t, h, ro, rl, rm);
      ++checked_rows;
      const size_t base = (static_cast<size_t>(t) * c.H + h) * DV;
      const float gl = lse[0][t * c.H + h], gm = rmax[0][t * c.H + h];
      if (std::isinf(rl)) {
        ++empty_rows;
        bool ok = std::isinf(gl) && gl > 0 && std::isinf(gm) && gm < 0;
        for (int d = 0; d < DV; ++d) ok = ok && dsa::bf16_to_float(out[0][base + d]) == 0.f;
        if (!ok) {
          ++bad_special;
          if (first_bad.empty()) first_bad = "empty row t=" + std::to_string(t) + " h=" + std::to_string(h);
        }
        continue;
      }
      if (!std::isfinite(gl) || !std::isfinite(gm)) {
        ++bad_special;
        if (first_bad.empty()) first_bad = "non-finite lse/max at t=" + std::to_string(t) + " h=" + std::to_string(h);
        continue;
      }
      worst_lse = std::max(worst_lse, std::abs(gl - rl));
      worst_max = std::max(worst_max, std::abs(gm - rm));
      for (int d = 0; d < DV; ++d) {
        const double g = dsa::bf16_to_float(out[0][base + d]);
        if (std::isnan(g)) ++nan_count;
        err2 += (g - ro[d]) * (g - ro[d]);
        ref2 += ro[d] * ro[d];
        got2 += g * g;
        dot += g * ro[d];
      }
    }
  }
  const double rel = std::sqrt(err2 / std::max(ref2, 1e-300));
  const double cosd = 1.0 - dot / std::sqrt(std::max(ref2 * got2, 1e-300));
  EXPECT_GT(checked_rows - empty_rows, 0) << "test would check no non-empty rows";
  EXPECT_GT(empty_rows, 0) << "test would check no empty rows";
  EXPECT_EQ(nan_count, 0);
  EXPECT_EQ(bad_special, 0) << first_bad;
  EXPECT_LE(rel, 1e-2) << "rel L2 error of out";
  EXPECT_LE(cosd, 1e-5) << "cosine distance of out";
  EXPECT_LE(worst_lse, 1e-3) << "max |lse - ref|";
  EXPECT_LE(worst_max, 1e-3) << "max |row_max - ref|";
  std::printf("  T=%lld H=%d topk=%d rows=%lld (empty %lld): rel %.3e cosd %.3e |dlse| %.3e |dmax| %.3e\n",
              static_cast<long long>(c.T), c.H, c.topk, static_cast<long long>(checked_rows),
              static_cast<long long>(empty_rows), rel, cosd, worst_lse, worst_max);
}

}  // namespace

TEST(SparseMlaSimple, H64Topk128RaggedT) { run_case({77, 64, 128, 300, false, Kernel::Simple, 11}); }
TEST(SparseMlaSimple, H128Topk256ValidLen) { run_case({45, 128, 256, 1000, true, Kernel::Simple, 12}); }
TEST(SparseMlaSimple, H64TAbove65535) { run_case({65600, 64, 64, 2000, true, Kernel::Simple, 13}); }
TEST(SparseMlaDispatch, H128Topk512) { run_case({70, 128, 512, 5000, true, Kernel::Dispatch, 14}); }

TEST(SparseMlaSm90, H64Topk128RaggedT) { run_case({77, 64, 128, 300, false, Kernel::Sm90, 21}); }
TEST(SparseMlaSm90, H128Topk256ValidLen) { run_case({45, 128, 256, 1000, true, Kernel::Sm90, 22}); }
TEST(SparseMlaSm90, H64Topk64) { run_case({33, 64, 64, 100, true, Kernel::Sm90, 23}); }
TEST(SparseMlaSm90, H128Topk2048) { run_case({20, 128, 2048, 20000, true, Kernel::Sm90, 24}); }
// More items (token x 64 heads) than SMs with several pairs each: every
// persistent CTA runs a sequence of items, with empty rows and valid_len 0
// among them, so barrier phases and Q's reuse carry across items.
TEST(SparseMlaSm90, H64Topk256ItemsPerCta) { run_case({300, 64, 256, 4000, true, Kernel::Sm90, 27}); }
TEST(SparseMlaSm90, H128Topk384ItemsPerCta) { run_case({150, 128, 384, 3000, true, Kernel::Sm90, 28}); }
// A cache larger than L2 (60000 rows of 1152 B = 69 MB): with the workspace
// the launcher first reorders each token's indices by slot (invalid and
// masked ones last, as -1) and runs the attention on that copy.
TEST(SparseMlaSm90, H64CacheLargerThanL2) { run_case({300, 64, 256, 60000, true, Kernel::Sm90, 29, true, 0, -1, 1, 1}); }
TEST(SparseMlaSm90, H128CacheLargerThanL2) { run_case({150, 128, 256, 60000, true, Kernel::Sm90, 34, true, 0, -1, 1, 1}); }
// topk 2048, the most the reordering takes (one block of 256 threads x 8),
// and 2112, not reordered; 264 tokens = two rounds of items on 132 SMs (the
// reordering needs two), every 11th token checked (the float64 reference).
TEST(SparseMlaSm90, H64Topk2048CacheLargerThanL2) {
  run_case({264, 64, 2048, 60000, true, Kernel::Sm90, 35, true, 0, -1, 11, 1});
}
TEST(SparseMlaSm90, H64Topk2112CacheLargerThanL2) {
  run_case({264, 64, 2112, 60000, true, Kernel::Sm90, 36, true, 0, -1, 11, 0});
}
// One round of items: not reordered (the layout of a decode batch).
TEST(SparseMlaSm90, H128OneRoundCacheLargerThanL2) {
  run_case({60, 128, 512, 60000, true, Kernel::Sm90, 37, true, 0, -1, 1, 0});
}
// A workspace sized for a small cache has room for the split only: the
// indices stay in their order and, at H = 64, the launcher takes the variant
// that releases buffer 1's half L before queuing the next Q K^T.
TEST(SparseMlaSm90, H64CacheLargerThanL2SplitOnly) {
  run_case({300, 64, 256, 60000, true, Kernel::Sm90, 29, true, 0, 1, 1, 0});
}
// Caches over half of L2 (30000 rows, 35 MB): the launcher takes the build in
// which WG1 publishes m_B before its exponentials.
TEST(SparseMlaSm90, H128CacheOverHalfL2) { run_case({150, 128, 384, 30000, true, Kernel::Sm90, 32}); }
TEST(SparseMlaSm90, H64CacheOverHalfL2) { run_case({300, 64, 256, 30000, true, Kernel::Sm90, 33}); }
// Without a workspace the last round runs whole items (T = 300 above splits
// it into 3 parts per item on 132 SMs).
TEST(SparseMlaSm90, H64Topk256ItemsPerCtaNoWorkspace) {
  run_case({300, 64, 256, 4000, true, Kernel::Sm90, 27, false});
}
// 136 (H = 64) and 140 (H = 128) items on 132 SMs: the last round's 4 or 8
// items are split into 16 parts each, of one pair or none (topk 512), and
// combined by the second kernel.
TEST(SparseMlaSm90, H64SplitLastRound) { run_case({136, 64, 512, 3000, true, Kernel::Sm90, 30}); }
TEST(SparseMlaSm90, H128SplitLastRound) { run_case({70, 128, 512, 3000, false, Kernel::Sm90, 31}); }
// A workspace 4 bytes off 16-byte alignment is not used (no split, no fault).
TEST(SparseMlaSm90, H64MisalignedWorkspace) { run_case({136, 64, 512, 3000, true, Kernel::Sm90, 30, true, 1}); }
TEST(SparseMlaSm90, H64TAbove65535) { run_case({65600, 64, 64, 2000, true, Kernel::Sm90, 25}); }
TEST(SparseMlaSm90, H128TAbove65535) { run_case({65540, 128, 128, 3000, false, Kernel::Sm90, 26}); }

// The project's CPU reference (dsa::ref::sparse_mla) against the sm90 kernel
// (or the simple one where sm90 does not apply) on every row of a small case:
// ties the float64 loop above to the reference the rest of the layer uses.
TEST(SparseMlaVsReference, H64Topk256) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  constexpr int D = 576, DV = 512;
  const Case c{24, 64, 256, 700, false, Kernel::Dispatch, 31};
  const Inputs in = make_inputs(c);
  // The reference takes fp32 rows and no NaN rows past the end: give it the
  // valid part of the cache (indices >= num_slots stay invalid for both).
  std::vector<float> q(in.q.size()), kv(static_cast<size_t>(c.num_slots) * D);
  for (size_t i = 0; i < q.size(); ++i) q[i] = dsa::bf16_to_float(in.q[i]);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = dsa::bf16_to_float(in.kv[i]);
  std::vector<float> ref_out(static_cast<size_t>(c.T) * c.H * DV), ref_lse(c.T * c.H), ref_max(c.T * c.H);
  dsa::ref::sparse_mla(q.data(), kv.data(), c.num_slots, in.idx.data(), c.T, c.H, c.topk, D, DV, kScale, ref_out.data(),
                       ref_lse.data(), ref_max.data());

  DevBuf<__nv_bfloat16> dq(in.q.size()), dkv(in.kv.size()), dout(ref_out.size());
  DevBuf<int32_t> didx(in.idx.size());
  DevBuf<float> dlse(ref_lse.size()), dmax(ref_max.size());
  ASSERT_TRUE(dq.p && dkv.p && dout.p && didx.p && dlse.p && dmax.p);
  CK(cudaMemcpy(dq.p, in.q.data(), dq.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dkv.p, in.kv.data(), dkv.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(didx.p, in.idx.data(), didx.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemset(dout.p, 0xff, dout.bytes()));
  CK(cudaMemset(dlse.p, 0xff, dlse.bytes()));
  CK(cudaMemset(dmax.p, 0xff, dmax.bytes()));
  dsa::cuda::SparseMlaParams p;
  p.q = dq.p;
  p.kv = dkv.p;
  p.indices = didx.p;
  p.out = dout.p;
  p.lse = dlse.p;
  p.row_max = dmax.p;
  p.T = c.T;
  p.num_slots = c.num_slots;
  p.stride_q_t = static_cast<int64_t>(c.H) * D;  // explicit dense strides take the same path as 0
  p.num_heads = c.H;
  p.topk = c.topk;
  p.softmax_scale = kScale;
  dsa::cuda::sparse_mla(p, dsa::cuda::device_context());
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(ref_out.size());
  std::vector<float> lse(ref_lse.size()), rmax(ref_max.size());
  CK(cudaMemcpy(out.data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), dlse.p, dlse.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(rmax.data(), dmax.p, dmax.bytes(), cudaMemcpyDeviceToHost));
  double err2 = 0, ref2 = 0, dot = 0, got2 = 0, worst_lse = 0;
  int64_t mismatched_inf = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double g = dsa::bf16_to_float(out[i]), r = ref_out[i];
    err2 += (g - r) * (g - r);
    ref2 += r * r;
    got2 += g * g;
    dot += g * r;
  }
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref_lse[i]) || std::isinf(lse[i])) {
      mismatched_inf += !(lse[i] == ref_lse[i] && rmax[i] == ref_max[i]);
      continue;
    }
    worst_lse = std::max(worst_lse, static_cast<double>(std::abs(lse[i] - ref_lse[i])));
  }
  EXPECT_EQ(mismatched_inf, 0) << "+inf lse / -inf max rows differ from the reference";
  EXPECT_LE(std::sqrt(err2 / ref2), 1e-2);
  EXPECT_LE(1.0 - dot / std::sqrt(ref2 * got2), 1e-5);
  EXPECT_LE(worst_lse, 1e-3);
}

namespace {

// ---- Strided views -----------------------------------------------------------
// Every tensor as a view with padding between its rows, heads and tokens.
// The inputs' padding holds NaN (a kernel that read it would produce NaN),
// the outputs' padding a sentinel that must survive; the strided call must
// give the dense call's bits (same kernel, same workspace, so the same path:
// split, reordering, kernel build).

struct Strides {
  int64_t q_h, q_t, kv_slot, indices_t, valid_len_t, out_h, out_t, lse_t, row_max_t;
};

// Padding from the dense sizes: a, b, c extra elements per head / token / row.
Strides padded(int H, int topk) {
  constexpr int D = 576, DV = 512;
  Strides s;
  s.q_h = D + 64;
  s.q_t = H * s.q_h + 64;
  s.kv_slot = D + 32;
  s.indices_t = topk + 3;
  s.valid_len_t = 2;
  s.out_h = DV + 8;
  s.out_t = H * s.out_h + 24;
  s.lse_t = H + 1;
  s.row_max_t = H + 7;
  return s;
}

// dense [n0, n1, n2] -> a view with strides (s0, s1, 1); the rest holds fill.
template <typename T>
std::vector<T> spread(const std::vector<T>& dense, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, T fill) {
  std::vector<T> v(static_cast<size_t>((n0 - 1) * s0 + (n1 - 1) * s1 + n2), fill);
  for (int64_t i = 0; i < n0; ++i)
    for (int64_t j = 0; j < n1; ++j)
      std::copy_n(dense.begin() + (i * n1 + j) * n2, n2, v.begin() + i * s0 + j * s1);
  return v;
}

// The view's elements back to dense; *padding_changed counts the elements
// outside the view that no longer hold fill (compared bitwise).
template <typename T>
std::vector<T> gather(const std::vector<T>& v, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, T fill,
                      int64_t* padding_changed) {
  std::vector<T> dense(static_cast<size_t>(n0 * n1 * n2));
  std::vector<char> in_view(v.size(), 0);
  for (int64_t i = 0; i < n0; ++i)
    for (int64_t j = 0; j < n1; ++j)
      for (int64_t k = 0; k < n2; ++k) {
        dense[(i * n1 + j) * n2 + k] = v[i * s0 + j * s1 + k];
        in_view[i * s0 + j * s1 + k] = 1;
      }
  *padding_changed = 0;
  for (size_t e = 0; e < v.size(); ++e)
    if (!in_view[e] && std::memcmp(&v[e], &fill, sizeof(T)) != 0) ++*padding_changed;
  return dense;
}

struct Outputs {
  std::vector<uint16_t> out;
  std::vector<float> lse, row_max;
};

// Runs `kernel` on the case's inputs laid out with strides s (null: dense,
// every stride 0). Returns the outputs gathered back to dense.
void run_view(const Case& c, const Inputs& in, Kernel kernel, const Strides* s, Outputs* got, int64_t* padding_changed) {
  constexpr int D = 576, DV = 512;
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  const int64_t T = c.T, H = c.H, K = c.topk;
  ASSERT_LE(T, kQPeriod) << "the strided tests lay out q from one period";
  const uint16_t kNan = 0x7fc0, kOutFill = 0x1234;
  const float kStatFill = 12345.f;
  const Strides d{D, H * D, D, K, 1, DV, H * DV, H, H};
  const Strides& v = s ? *s : d;
  const std::vector<uint16_t> q = spread<uint16_t>(in.q, T, H, D, v.q_t, v.q_h, kNan);
  const int64_t rows = static_cast<int64_t>(in.kv.size()) / D;  // the cache and its NaN rows past the end
  const std::vector<uint16_t> kv = spread<uint16_t>(in.kv, rows, 1, D, v.kv_slot, 0, kNan);
  const std::vector<int32_t> idx = spread<int32_t>(in.idx, T, 1, K, v.indices_t, 0, -1);
  std::vector<int32_t> vl;
  if (c.with_valid_len) vl = spread<int32_t>(in.vlen, T, 1, 1, v.valid_len_t, 0, 0);
  const std::vector<uint16_t> out0 = spread<uint16_t>(std::vector<uint16_t>(T * H * DV, kOutFill), T, H, DV, v.out_t, v.out_h, kOutFill);
  const std::vector<float> lse0 = spread<float>(std::vector<float>(T * H, kStatFill), T, 1, H, v.lse_t, 0, kStatFill);
  const std::vector<float> max0 = spread<float>(std::vector<float>(T * H, kStatFill), T, 1, H, v.row_max_t, 0, kStatFill);

  DevBuf<__nv_bfloat16> dq(q.size()), dkv(kv.size()), dout(out0.size());
  DevBuf<int32_t> didx(idx.size()), dvl(std::max<size_t>(vl.size(), 1));
  DevBuf<float> dlse(lse0.size()), dmax(max0.size());
  ASSERT_TRUE(dq.p && dkv.p && dout.p && didx.p && dvl.p && dlse.p && dmax.p) << "cudaMalloc failed";
  CK(cudaMemcpy(dq.p, q.data(), dq.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dkv.p, kv.data(), dkv.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(didx.p, idx.data(), didx.bytes(), cudaMemcpyHostToDevice));
  if (!vl.empty()) CK(cudaMemcpy(dvl.p, vl.data(), vl.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dout.p, out0.data(), dout.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dlse.p, lse0.data(), dlse.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dmax.p, max0.data(), dmax.bytes(), cudaMemcpyHostToDevice));

  dsa::cuda::SparseMlaParams p;
  p.q = dq.p;
  p.kv = dkv.p;
  p.indices = didx.p;
  p.valid_len = c.with_valid_len ? dvl.p : nullptr;
  p.out = dout.p;
  p.lse = dlse.p;
  p.row_max = dmax.p;
  p.T = T;
  p.num_slots = c.num_slots;
  p.num_heads = c.H;
  p.topk = c.topk;
  p.softmax_scale = kScale;
  if (s) {
    p.stride_q_t = s->q_t, p.stride_q_h = s->q_h, p.stride_kv_slot = s->kv_slot;
    p.stride_indices_t = s->indices_t, p.stride_valid_len_t = s->valid_len_t;
    p.stride_out_t = s->out_t, p.stride_out_h = s->out_h, p.stride_lse_t = s->lse_t, p.stride_row_max_t = s->row_max_t;
  }
  if (kernel == Kernel::Sm90) {
    std::string why;
    ASSERT_TRUE(dsa::cuda::sparse_mla_sm90_can_implement(p, ctx, &why)) << why;
  }
  const size_t ws_bytes = c.workspace ? dsa::cuda::sparse_mla_workspace_bytes(ctx, T, c.H, c.topk, c.num_slots) : 0;
  DevBuf<float> dws(std::max<size_t>(ws_bytes / sizeof(float), 1));
  ASSERT_TRUE(dws.p) << "cudaMalloc failed";
  CK(cudaMemset(dws.p, 0xff, dws.bytes()));
  p.workspace = dws.p;
  p.workspace_bytes = ws_bytes;
  switch (kernel) {
    case Kernel::Simple: dsa::cuda::sparse_mla_simple(p, ctx); break;
    case Kernel::Sm90: dsa::cuda::sparse_mla_sm90(p, ctx); break;
    case Kernel::Dispatch: dsa::cuda::sparse_mla(p, ctx); break;
  }
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(out0.size());
  std::vector<float> lse(lse0.size()), rmax(max0.size());
  CK(cudaMemcpy(out.data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), dlse.p, dlse.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(rmax.data(), dmax.p, dmax.bytes(), cudaMemcpyDeviceToHost));
  int64_t changed[3];
  got->out = gather<uint16_t>(out, T, H, DV, v.out_t, v.out_h, kOutFill, &changed[0]);
  got->lse = gather<float>(lse, T, 1, H, v.lse_t, 0, kStatFill, &changed[1]);
  got->row_max = gather<float>(rmax, T, 1, H, v.row_max_t, 0, kStatFill, &changed[2]);
  *padding_changed = changed[0] + changed[1] + changed[2];
}

// The strided call (strided_kernel, strides s) against the dense call
// (dense_kernel), bit for bit.
void run_strided_case(const Case& c, Kernel dense_kernel, Kernel strided_kernel, const Strides& s) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  if (dense_kernel == Kernel::Sm90 || strided_kernel == Kernel::Sm90) {
    // The dense call decides whether the kernel applies to the shape on this device.
    dsa::cuda::SparseMlaParams probe;
    probe.q = probe.kv = reinterpret_cast<const __nv_bfloat16*>(uintptr_t{256});
    probe.indices = reinterpret_cast<const int32_t*>(uintptr_t{256});
    probe.out = reinterpret_cast<__nv_bfloat16*>(uintptr_t{256});
    probe.lse = reinterpret_cast<float*>(uintptr_t{256});
    probe.T = c.T, probe.num_slots = c.num_slots, probe.num_heads = c.H, probe.topk = c.topk, probe.softmax_scale = kScale;
    if (!dsa::cuda::sparse_mla_sm90_can_implement(probe, dsa::cuda::device_context()))
      GTEST_SKIP() << "sm90 kernel does not take this shape on this device";
  }
  const Inputs in = make_inputs(c);
  Outputs dense, strided;
  int64_t dense_padding = 0, strided_padding = 0;
  ASSERT_NO_FATAL_FAILURE(run_view(c, in, dense_kernel, nullptr, &dense, &dense_padding));
  ASSERT_NO_FATAL_FAILURE(run_view(c, in, strided_kernel, &s, &strided, &strided_padding));
  EXPECT_EQ(strided_padding, 0) << "the kernel wrote outside the out / lse / row_max views";
  ASSERT_EQ(dense.out.size(), strided.out.size());
  EXPECT_EQ(0, std::memcmp(dense.out.data(), strided.out.data(), dense.out.size() * 2)) << "out differs from the dense call";
  EXPECT_EQ(0, std::memcmp(dense.lse.data(), strided.lse.data(), dense.lse.size() * 4)) << "lse differs from the dense call";
  EXPECT_EQ(0, std::memcmp(dense.row_max.data(), strided.row_max.data(), dense.row_max.size() * 4))
      << "row_max differs from the dense call";
  size_t nan_out = 0;
  for (uint16_t b : strided.out) nan_out += (b & 0x7fff) > 0x7f80;
  EXPECT_EQ(nan_out, 0u) << "NaN in out: padding of q or kv was read";
}

TEST(SparseMlaStrided, SimpleH64ValidLen) {
  run_strided_case({77, 64, 128, 300, true, Kernel::Simple, 41}, Kernel::Simple, Kernel::Simple, padded(64, 128));
}
TEST(SparseMlaStrided, SimpleH128) {
  run_strided_case({20, 128, 256, 1000, false, Kernel::Simple, 42}, Kernel::Simple, Kernel::Simple, padded(128, 256));
}
// Several items per CTA and the last round split (combine kernel).
TEST(SparseMlaStrided, Sm90H64ItemsPerCtaSplit) {
  run_strided_case({300, 64, 256, 4000, true, Kernel::Sm90, 43}, Kernel::Sm90, Kernel::Sm90, padded(64, 256));
}
TEST(SparseMlaStrided, Sm90H128SplitLastRound) {
  run_strided_case({70, 128, 512, 3000, true, Kernel::Sm90, 44}, Kernel::Sm90, Kernel::Sm90, padded(128, 512));
}
// Caches over half of L2 and larger than L2: the other kernel builds, and
// the reordering pre-pass reading strided indices and valid_len.
TEST(SparseMlaStrided, Sm90H128CacheOverHalfL2) {
  run_strided_case({150, 128, 384, 30000, true, Kernel::Sm90, 45}, Kernel::Sm90, Kernel::Sm90, padded(128, 384));
}
TEST(SparseMlaStrided, Sm90H64CacheLargerThanL2Reordered) {
  run_strided_case({300, 64, 256, 60000, true, Kernel::Sm90, 46}, Kernel::Sm90, Kernel::Sm90, padded(64, 256));
}
TEST(SparseMlaStrided, Sm90H64CacheLargerThanL2NoWorkspace) {
  run_strided_case({300, 64, 256, 60000, true, Kernel::Sm90, 47, false}, Kernel::Sm90, Kernel::Sm90, padded(64, 256));
}
// Strides the sm90 kernel does not take (rows not a multiple of 16 bytes):
// the dispatch falls back to the simple kernel, which gives its dense bits.
TEST(SparseMlaStrided, DispatchFallsBackOnUnalignedStrides) {
  Strides s = padded(64, 256);
  s.kv_slot = 577;
  s.out_h = 515;
  s.out_t = 64 * s.out_h + 1;
  run_strided_case({40, 64, 256, 2000, true, Kernel::Dispatch, 48}, Kernel::Simple, Kernel::Dispatch, s);
}

// ---- Parameter checks (no GPU needed: they throw before any CUDA call) -------

// A Hopper device as the launchers see it, and parameters that pass every
// check; the pointers are never dereferenced.
struct CheckFixture {
  dsa::cuda::DeviceInfo info;
  dsa::cuda::DeviceContext ctx;
  dsa::cuda::SparseMlaParams p;
  CheckFixture() {
    info.name = "fake H100";
    info.sm_major = 9;
    info.sm_minor = 0;
    info.multiprocessors = 132;
    info.l2_bytes = 50u << 20;
    info.smem_optin_per_block = 232448;
    ctx.device = &info;
    p.q = p.kv = reinterpret_cast<const __nv_bfloat16*>(uintptr_t{1} << 20);
    p.indices = reinterpret_cast<const int32_t*>(uintptr_t{1} << 20);
    p.out = reinterpret_cast<__nv_bfloat16*>(uintptr_t{1} << 20);
    p.lse = reinterpret_cast<float*>(uintptr_t{1} << 20);
    p.T = 4;
    p.num_slots = 1000;
    p.num_heads = 64;
    p.topk = 128;
    p.softmax_scale = kScale;
  }
};

// fn(p, ctx) throws ShapeError whose message names every word in `words`.
template <typename Fn>
void expect_shape_error(Fn fn, const dsa::cuda::SparseMlaParams& p, const dsa::cuda::DeviceContext& ctx,
                        std::initializer_list<const char*> words) {
  try {
    fn(p, ctx);
    ADD_FAILURE() << "no ShapeError";
  } catch (const dsa::ShapeError& e) {
    for (const char* w : words) EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << "'" << w << "' not in: " << e.what();
  }
}

TEST(SparseMlaParamsCheck, DenseDefaultsPass) {
  CheckFixture f;
  EXPECT_NO_THROW(dsa::cuda::check_sparse_mla_params(dsa::cuda::resolve_strides(f.p)));
  std::string why;
  EXPECT_TRUE(dsa::cuda::sparse_mla_sm90_can_implement(f.p, f.ctx, &why)) << why;
  const dsa::cuda::SparseMlaParams r = dsa::cuda::resolve_strides(f.p);
  EXPECT_EQ(r.stride_q_h, 576);
  EXPECT_EQ(r.stride_q_t, 64 * 576);
  EXPECT_EQ(r.stride_kv_slot, 576);
  EXPECT_EQ(r.stride_indices_t, 128);
  EXPECT_EQ(r.stride_valid_len_t, 1);
  EXPECT_EQ(r.stride_out_h, 512);
  EXPECT_EQ(r.stride_out_t, 64 * 512);
  EXPECT_EQ(r.stride_lse_t, 64);
  EXPECT_EQ(r.stride_row_max_t, 64);
  // Padded strides that every kernel takes.
  dsa::cuda::SparseMlaParams q = f.p;
  const Strides s = padded(64, 128);
  q.stride_q_t = s.q_t, q.stride_q_h = s.q_h, q.stride_kv_slot = s.kv_slot, q.stride_indices_t = s.indices_t;
  q.stride_valid_len_t = s.valid_len_t, q.stride_out_t = s.out_t, q.stride_out_h = s.out_h, q.stride_lse_t = s.lse_t;
  q.stride_row_max_t = s.row_max_t;
  EXPECT_TRUE(dsa::cuda::sparse_mla_sm90_can_implement(q, f.ctx, &why)) << why;
}

// Strides below the extent they step over (overlapping views) or negative:
// every launcher rejects them, naming the parameter and the rule.
TEST(SparseMlaParamsCheck, OverlappingStridesThrow) {
  struct Bad {
    int64_t dsa::cuda::SparseMlaParams::*field;
    int64_t value;
    const char* name;
    const char* rule;
  };
  const Bad bad[] = {
      {&dsa::cuda::SparseMlaParams::stride_q_h, 575, "stride_q_h", "d_qk"},
      {&dsa::cuda::SparseMlaParams::stride_q_t, 64 * 576 - 8, "stride_q_t", "num_heads * stride_q_h"},
      {&dsa::cuda::SparseMlaParams::stride_kv_slot, 512, "stride_kv_slot", "d_qk"},
      {&dsa::cuda::SparseMlaParams::stride_indices_t, 127, "stride_indices_t", "topk"},
      {&dsa::cuda::SparseMlaParams::stride_valid_len_t, -1, "stride_valid_len_t", "1"},
      {&dsa::cuda::SparseMlaParams::stride_out_h, 511, "stride_out_h", "d_v"},
      {&dsa::cuda::SparseMlaParams::stride_out_t, 64 * 512 - 1, "stride_out_t", "num_heads * stride_out_h"},
      {&dsa::cuda::SparseMlaParams::stride_lse_t, 63, "stride_lse_t", "num_heads"},
      {&dsa::cuda::SparseMlaParams::stride_row_max_t, -64, "stride_row_max_t", "num_heads"},
  };
  for (const Bad& b : bad) {
    CheckFixture f;
    f.p.*b.field = b.value;
    SCOPED_TRACE(b.name);
    expect_shape_error(dsa::cuda::sparse_mla, f.p, f.ctx, {b.name, b.rule});
    expect_shape_error(dsa::cuda::sparse_mla_simple, f.p, f.ctx, {b.name, b.rule});
    expect_shape_error(dsa::cuda::sparse_mla_sm90, f.p, f.ctx, {b.name, b.rule});
    EXPECT_FALSE(dsa::cuda::sparse_mla_sm90_can_implement(f.p, f.ctx));
  }
}

// Strides and pointers the sm90 kernel cannot take (the others can): it
// rejects them naming the parameter; the dispatch would use the simple kernel.
TEST(SparseMlaParamsCheck, Sm90RejectsUnalignedAndWideStrides) {
  struct Bad {
    int64_t dsa::cuda::SparseMlaParams::*field;
    int64_t value;
    const char* name;
    const char* rule;
  };
  const Bad bad[] = {
      {&dsa::cuda::SparseMlaParams::stride_q_h, 580, "stride_q_h", "multiple of 8"},
      {&dsa::cuda::SparseMlaParams::stride_q_t, 64 * 576 + 4, "stride_q_t", "multiple of 8"},
      {&dsa::cuda::SparseMlaParams::stride_kv_slot, 577, "stride_kv_slot", "multiple of 8"},
      {&dsa::cuda::SparseMlaParams::stride_out_h, 516, "stride_out_h", "multiple of 8"},
      {&dsa::cuda::SparseMlaParams::stride_out_t, 64 * 512 + 2, "stride_out_t", "multiple of 8"},
      {&dsa::cuda::SparseMlaParams::stride_out_t, int64_t{1} << 31, "stride_out_t", "2^31 - 1"},
      {&dsa::cuda::SparseMlaParams::stride_lse_t, int64_t{1} << 32, "stride_lse_t", "2^31 - 1"},
  };
  for (const Bad& b : bad) {
    CheckFixture f;
    f.p.*b.field = b.value;
    SCOPED_TRACE(b.name);
    EXPECT_NO_THROW(dsa::cuda::check_sparse_mla_params(dsa::cuda::resolve_strides(f.p)));
    std::string why;
    EXPECT_FALSE(dsa::cuda::sparse_mla_sm90_can_implement(f.p, f.ctx, &why));
    EXPECT_NE(why.find(b.name), std::string::npos) << why;
    expect_shape_error(dsa::cuda::sparse_mla_sm90, f.p, f.ctx, {b.name, b.rule, "sparse_mla()"});
  }
  CheckFixture f;
  f.p.kv = reinterpret_cast<const __nv_bfloat16*>((uintptr_t{1} << 20) + 2);
  expect_shape_error(dsa::cuda::sparse_mla_sm90, f.p, f.ctx, {"16-byte aligned"});
  CheckFixture g;
  g.info.sm_major = 8;
  expect_shape_error(dsa::cuda::sparse_mla_sm90, g.p, g.ctx, {"sm_80", "sm_90"});
  EXPECT_EQ(dsa::cuda::sparse_mla_workspace_bytes(g.ctx, 4096, 64, 2048, 100000), 0u);
}

// Library messages speak of parameters, never of command-line flags.
TEST(SparseMlaParamsCheck, MessagesNameParametersNotFlags) {
  CheckFixture f;
  f.p.num_heads = 0;
  try {
    dsa::cuda::sparse_mla(f.p, f.ctx);
    ADD_FAILURE() << "no ShapeError";
  } catch (const dsa::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("num_heads"), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find("--"), std::string::npos) << e.what();
  }
}

}  // namespace
