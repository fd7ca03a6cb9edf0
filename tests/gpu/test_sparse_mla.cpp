// Sparse MLA kernels (src/cuda/sparse_mla.h) against a float64 reference on
// the same bf16-rounded inputs, spec 3.6 / 7: out rel L2 <= 1e-2 and cosine
// distance <= 1e-5, |lse diff| <= 1e-3, row max likewise, rows with no valid
// index exactly (0, +inf, -inf); outputs poisoned before each run; two runs
// bitwise identical.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/sparse_mla.h"
#include "dev_buf.h"
#include "dsa/cuda.h"
#include "dsa/dtypes.h"
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
  p.stride_q_t = static_cast<int64_t>(c.H) * D;
  p.num_heads = c.H;
  p.topk = c.topk;
  p.softmax_scale = kScale;
  if (c.kernel == Kernel::Sm90 && !dsa::cuda::sparse_mla_sm90_can_implement(p))
    GTEST_SKIP() << "sm90 kernel does not take this shape on this device";
  // ws_slots < 0: the workspace for this cache; else sized as for a cache of ws_slots rows.
  const size_t ws_bytes =
      c.workspace ? dsa::cuda::sparse_mla_workspace_bytes(c.T, c.H, c.topk, c.ws_slots < 0 ? c.num_slots : c.ws_slots) : 0;
  if (c.reorder >= 0) {
    // The test's claim about the path: the launcher reorders when the size
    // query plans room for the reordered copy beyond the split parts (the
    // size for a one-row cache) and the workspace passed has that room.
    const size_t full = dsa::cuda::sparse_mla_workspace_bytes(c.T, c.H, c.topk, c.num_slots);
    const size_t split_only = dsa::cuda::sparse_mla_workspace_bytes(c.T, c.H, c.topk, 1);
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
      case Kernel::Simple: dsa::cuda::sparse_mla_simple(p); break;
      case Kernel::Sm90: dsa::cuda::sparse_mla_sm90(p); break;
      case Kernel::Dispatch: dsa::cuda::sparse_mla(p); break;
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
  p.stride_q_t = static_cast<int64_t>(c.H) * D;
  p.num_heads = c.H;
  p.topk = c.topk;
  p.softmax_scale = kScale;
  dsa::cuda::sparse_mla(p);
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
