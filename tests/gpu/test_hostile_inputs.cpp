// Hostile inputs for the kernels (issue 19): every case has a defined
// result, checked exactly where it is exact (invalid indices skipped, empty
// rows 0 / +inf / -inf, -1 padding, -inf past visible_end, unselected NaN
// never leaking: bitwise equality with the run without it) and against the
// CPU reference where the reference defines it (NaN / +-inf positions
// exactly, finite values within the usual tolerances).
// Every output is poisoned before each run, twice with different bytes
// (0xFF: NaN; 0x7F: a large finite value), and the two runs must give the
// same bits: an element a kernel leaves unwritten shows even where the
// expected value is NaN. Shapes are small (T <= 134, a few hundred slots) so
// the whole file also runs under compute-sanitizer.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/indexer/params.h"
#include "cuda/sparse_mla/sparse_mla.h"
#include "cuda/topk/params.h"
#include "dev_buf.h"
#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/cuda.h"
#include "dsa/cuda_layer.h"
#include "dsa/dtypes.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "dsa/reference.h"
#include "small_gpu_config.h"

namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x
#define SKIP_WITHOUT_GPU() \
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

using dsa::test::DevBuf;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr uint8_t kPoisons[2] = {0xff, 0x7f};

// NaN, +inf, -inf or a number.
enum class Cls { NaN, PosInf, NegInf, Num };
Cls cls(float v) {
  if (std::isnan(v)) return Cls::NaN;
  if (std::isinf(v)) return v > 0 ? Cls::PosInf : Cls::NegInf;
  return Cls::Num;
}
const char* cls_name(Cls c) {
  switch (c) {
    case Cls::NaN: return "NaN";
    case Cls::PosInf: return "+inf";
    case Cls::NegInf: return "-inf";
    default: return "number";
  }
}

// ============================== sparse MLA ==================================

constexpr int kD = 576, kDv = 512;
constexpr float kScale = 0.1352338f;
constexpr int64_t kPadRows = 4;  // rows past num_slots in the allocation, all NaN: an index there must never be read

enum class Kernel { Simple, Sm90, Sm90Ws, Dispatch };
const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::Simple: return "simple";
    case Kernel::Sm90: return "sm90";
    case Kernel::Sm90Ws: return "sm90+workspace";
    default: return "dispatch";
  }
}

struct Mla {
  int64_t T = 0, num_slots = 0;
  int H = 64, topk = 64;
  std::vector<uint16_t> q, kv;  // bf16 bits; kv has num_slots + kPadRows rows
  std::vector<int32_t> idx;     // [T, topk]
  std::vector<int32_t> vlen;    // [T] or empty (null valid_len)
  void set_q(int64_t t, int h, int d, float v) { q[(static_cast<size_t>(t) * H + h) * kD + d] = dsa::float_to_bf16(v); }
  float get_q(int64_t t, int h, int d) const { return dsa::bf16_to_float(q[(static_cast<size_t>(t) * H + h) * kD + d]); }
  void set_kv(int64_t s, int d, float v) { kv[static_cast<size_t>(s) * kD + d] = dsa::float_to_bf16(v); }
  float get_kv(int64_t s, int d) const { return dsa::bf16_to_float(kv[static_cast<size_t>(s) * kD + d]); }
  int32_t& at(int64_t t, int j) { return idx[static_cast<size_t>(t) * topk + j]; }
};

// Normal q and kv (no zeros: a 0 times an infinity would be NaN where the
// tests expect +-inf), random valid indices, NaN rows past the end.
Mla make_mla(int64_t T, int H, int topk, int64_t num_slots, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto nz = [&] {
    float v = nd(gen);
    if (dsa::round_bf16(v) == 0.f) v = 0.5f;
    return dsa::float_to_bf16(v);
  };
  Mla m;
  m.T = T, m.H = H, m.topk = topk, m.num_slots = num_slots;
  m.q.resize(static_cast<size_t>(T) * H * kD);
  for (auto& v : m.q) v = nz();
  m.kv.resize(static_cast<size_t>(num_slots + kPadRows) * kD);
  for (int64_t i = 0; i < num_slots * kD; ++i) m.kv[i] = nz();
  for (size_t i = static_cast<size_t>(num_slots) * kD; i < m.kv.size(); ++i) m.kv[i] = 0x7fc0;
  m.idx.resize(static_cast<size_t>(T) * topk);
  std::uniform_int_distribution<int64_t> slot(0, num_slots - 1);
  for (auto& v : m.idx) v = static_cast<int32_t>(slot(gen));
  return m;
}

struct MlaOut {
  bool ran = false;
  std::vector<uint16_t> out;  // bf16 bits [T, H, 512]
  std::vector<float> lse, rmax;
};

bool same_bits(const MlaOut& a, const MlaOut& b) {
  return a.out == b.out && a.lse.size() == b.lse.size() && std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * 4) == 0 &&
         std::memcmp(a.rmax.data(), b.rmax.data(), a.rmax.size() * 4) == 0;
}

// Runs one kernel twice (outputs poisoned 0xFF, then 0x7F); the two runs must
// agree bit for bit. o->ran is false when the sm90 kernel does not take the
// call on this device.
void run_mla(const Mla& m, Kernel k, MlaOut* o) {
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  DevBuf<__nv_bfloat16> dq(m.q.size()), dkv(m.kv.size()), dout(static_cast<size_t>(m.T) * m.H * kDv);
  DevBuf<int32_t> didx(m.idx.size()), dvl(std::max<size_t>(m.vlen.size(), 1));
  DevBuf<float> dlse(static_cast<size_t>(m.T) * m.H), dmax(static_cast<size_t>(m.T) * m.H);
  ASSERT_TRUE(dq.p && dkv.p && dout.p && didx.p && dvl.p && dlse.p && dmax.p) << "cudaMalloc failed";
  CK(cudaMemcpy(dq.p, m.q.data(), dq.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dkv.p, m.kv.data(), dkv.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(didx.p, m.idx.data(), didx.bytes(), cudaMemcpyHostToDevice));
  if (!m.vlen.empty()) CK(cudaMemcpy(dvl.p, m.vlen.data(), m.vlen.size() * 4, cudaMemcpyHostToDevice));
  dsa::cuda::SparseMlaParams p;
  p.q = dq.p, p.kv = dkv.p, p.indices = didx.p, p.valid_len = m.vlen.empty() ? nullptr : dvl.p;
  p.out = dout.p, p.lse = dlse.p, p.row_max = dmax.p;
  p.T = m.T, p.num_slots = m.num_slots, p.num_heads = m.H, p.topk = m.topk, p.softmax_scale = kScale;
  o->ran = false;
  if ((k == Kernel::Sm90 || k == Kernel::Sm90Ws) && !dsa::cuda::sparse_mla_sm90_can_implement(p, ctx)) return;
  const size_t ws_bytes = k == Kernel::Sm90Ws ? dsa::cuda::sparse_mla_workspace_bytes(ctx, m.T, m.H, m.topk, m.num_slots) : 0;
  DevBuf<float> dws(std::max<size_t>(ws_bytes / 4, 1) + 4);
  ASSERT_TRUE(dws.p) << "cudaMalloc failed";
  p.workspace = ws_bytes ? dws.p : nullptr;
  p.workspace_bytes = ws_bytes;
  MlaOut r[2];
  for (int run = 0; run < 2; ++run) {
    CK(cudaMemset(dout.p, kPoisons[run], dout.bytes()));
    CK(cudaMemset(dlse.p, kPoisons[run], dlse.bytes()));
    CK(cudaMemset(dmax.p, kPoisons[run], dmax.bytes()));
    CK(cudaMemset(dws.p, kPoisons[run], dws.bytes()));
    switch (k) {
      case Kernel::Simple: ASSERT_NO_THROW(dsa::cuda::sparse_mla_simple(p, ctx)); break;
      case Kernel::Sm90:
      case Kernel::Sm90Ws: ASSERT_NO_THROW(dsa::cuda::sparse_mla_sm90(p, ctx)); break;
      case Kernel::Dispatch: ASSERT_NO_THROW(dsa::cuda::sparse_mla(p, ctx)); break;
    }
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    r[run].out.resize(dout.n);
    r[run].lse.resize(dlse.n);
    r[run].rmax.resize(dmax.n);
    CK(cudaMemcpy(r[run].out.data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(r[run].lse.data(), dlse.p, dlse.bytes(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(r[run].rmax.data(), dmax.p, dmax.bytes(), cudaMemcpyDeviceToHost));
  }
  EXPECT_TRUE(same_bits(r[0], r[1])) << kernel_name(k)
                                     << ": outputs differ between a run poisoned 0xFF and one poisoned 0x7F (an element left "
                                        "unwritten, or a nondeterministic kernel)";
  *o = std::move(r[0]);
  o->ran = true;
}

struct MlaRef {
  std::vector<float> out, lse, rmax;
};

// dsa::ref::sparse_mla on the same bf16 values; positions at or past a
// row's valid_len become -1 (what valid_len means), the pad rows are not
// given (indices >= num_slots are invalid for both).
MlaRef ref_mla(const Mla& m) {
  std::vector<float> q(m.q.size()), kv(static_cast<size_t>(m.num_slots) * kD);
  for (size_t i = 0; i < q.size(); ++i) q[i] = dsa::bf16_to_float(m.q[i]);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = dsa::bf16_to_float(m.kv[i]);
  std::vector<int32_t> idx = m.idx;
  if (!m.vlen.empty())
    for (int64_t t = 0; t < m.T; ++t)
      for (int j = std::clamp(m.vlen[t], 0, m.topk); j < m.topk; ++j) idx[t * m.topk + j] = -1;
  MlaRef r;
  r.out.resize(static_cast<size_t>(m.T) * m.H * kDv);
  r.lse.resize(static_cast<size_t>(m.T) * m.H);
  r.rmax.resize(r.lse.size());
  dsa::ref::sparse_mla(q.data(), kv.data(), m.num_slots, idx.data(), m.T, m.H, m.topk, kD, kDv, kScale, r.out.data(), r.lse.data(),
                       r.rmax.data());
  return r;
}

// Every element in the reference's class (NaN / +inf / -inf / number); numbers
// within tolerance (out: rel L2 <= 1e-2 overall and |d| <= 0.05 + 0.05 |ref|
// per element; lse and row max: |d| <= 1e-3); rows the reference leaves
// empty (lse +inf) exactly 0 / +inf / -inf.
void expect_like_ref(const MlaOut& g, const MlaRef& r, const std::string& what) {
  ASSERT_EQ(g.out.size(), r.out.size());
  int64_t bad_cls = 0, bad_num = 0, bad_empty = 0;
  std::string first;
  auto note = [&](const std::string& s) {
    if (first.empty()) first = s;
  };
  double err2 = 0, ref2 = 0;
  const int64_t rows = static_cast<int64_t>(r.lse.size());
  for (int64_t row = 0; row < rows; ++row) {
    const bool empty = std::isinf(r.lse[row]) && r.lse[row] > 0;
    for (int d = 0; d < kDv; ++d) {
      const size_t i = static_cast<size_t>(row) * kDv + d;
      const float gv = dsa::bf16_to_float(g.out[i]), rv = r.out[i];
      if (cls(gv) != cls(rv)) {
        if (bad_cls++ == 0)
          note("out row " + std::to_string(row) + " col " + std::to_string(d) + ": " + cls_name(cls(gv)) + " vs reference " +
               cls_name(cls(rv)));
        continue;
      }
      if (cls(rv) != Cls::Num) continue;
      if (empty && gv != 0.f) {
        if (bad_empty++ == 0) note("empty row " + std::to_string(row) + ": out " + std::to_string(gv) + " != 0");
      }
      const double dd = static_cast<double>(gv) - rv;
      err2 += dd * dd;
      ref2 += static_cast<double>(rv) * rv;
      if (std::fabs(dd) > 0.05 + 0.05 * std::fabs(rv)) {
        if (bad_num++ == 0)
          note("out row " + std::to_string(row) + " col " + std::to_string(d) + ": " + std::to_string(gv) + " vs reference " +
               std::to_string(rv));
      }
    }
    for (int which = 0; which < 2; ++which) {
      const float gv = which ? g.rmax[row] : g.lse[row], rv = which ? r.rmax[row] : r.lse[row];
      const char* name = which ? "row_max" : "lse";
      if (cls(gv) != cls(rv)) {
        if (bad_cls++ == 0)
          note(std::string(name) + " row " + std::to_string(row) + ": " + cls_name(cls(gv)) + " (" + std::to_string(gv) +
               ") vs reference " + cls_name(cls(rv)) + " (" + std::to_string(rv) + ")");
        continue;
      }
      if (cls(rv) == Cls::Num && std::fabs(static_cast<double>(gv) - rv) > 1e-3) {
        if (bad_num++ == 0)
          note(std::string(name) + " row " + std::to_string(row) + ": " + std::to_string(gv) + " vs reference " + std::to_string(rv));
      }
    }
  }
  EXPECT_EQ(bad_cls, 0) << what << ": NaN / inf positions differ from the reference; first: " << first;
  EXPECT_EQ(bad_num, 0) << what << ": numbers off the reference; first: " << first;
  EXPECT_EQ(bad_empty, 0) << what << ": rows without a valid index not exactly 0; first: " << first;
  if (ref2 > 0) EXPECT_LE(std::sqrt(err2 / ref2), 1e-2) << what << ": rel L2 of the finite outputs";
}

const std::vector<Kernel> kAllKernels = {Kernel::Simple, Kernel::Sm90, Kernel::Sm90Ws, Kernel::Dispatch};

// Runs every kernel on m, compares each with the reference, and checks that
// the dispatch gave the sm90 kernel's bits where that kernel applies.
// outs (may be null) receives each kernel's outputs in kAllKernels order.
void check_mla(const Mla& m, const MlaRef& ref, const std::string& what, std::vector<MlaOut>* outs = nullptr,
               const std::vector<Kernel>& kernels = kAllKernels) {
  std::vector<MlaOut> got(kernels.size());
  for (size_t i = 0; i < kernels.size(); ++i) {
    SCOPED_TRACE(kernel_name(kernels[i]));
    ASSERT_NO_FATAL_FAILURE(run_mla(m, kernels[i], &got[i]));
    if (got[i].ran) expect_like_ref(got[i], ref, what + " [" + kernel_name(kernels[i]) + "]");
  }
  const auto at = [&](Kernel k) -> const MlaOut* {
    for (size_t i = 0; i < kernels.size(); ++i)
      if (kernels[i] == k && got[i].ran) return &got[i];
    return nullptr;
  };
  if (at(Kernel::Sm90) && at(Kernel::Dispatch))
    EXPECT_TRUE(same_bits(*at(Kernel::Sm90), *at(Kernel::Dispatch))) << what << ": the dispatch did not give the sm90 kernel's bits";
  if (outs) *outs = std::move(got);
}

// m with every invalid or masked index replaced by -1 and valid_len dropped:
// what a kernel must treat the hostile indices as, bit for bit.
Mla cleaned(const Mla& m) {
  Mla c = m;
  for (int64_t t = 0; t < m.T; ++t) {
    const int n = m.vlen.empty() ? m.topk : std::clamp(m.vlen[t], 0, m.topk);
    for (int j = 0; j < m.topk; ++j) {
      int32_t& v = c.idx[t * m.topk + j];
      if (j >= n || v < 0 || v >= m.num_slots) v = -1;
    }
  }
  c.vlen.clear();
  return c;
}

// Hostile run vs cleaned run: the same bits, kernel by kernel.
void expect_same_as_cleaned(const Mla& m, const std::string& what) {
  const Mla c = cleaned(m);
  for (Kernel k : kAllKernels) {
    SCOPED_TRACE(kernel_name(k));
    MlaOut a, b;
    ASSERT_NO_FATAL_FAILURE(run_mla(m, k, &a));
    ASSERT_NO_FATAL_FAILURE(run_mla(c, k, &b));
    if (!a.ran) continue;
    EXPECT_TRUE(same_bits(a, b)) << what << " [" << kernel_name(k)
                                 << "]: the hostile indices did not act exactly as -1 (skipped)";
  }
}

bool is_empty_row(const MlaOut& g, int64_t t, int h, int H) {
  const size_t row = static_cast<size_t>(t) * H + h;
  for (int d = 0; d < kDv; ++d)
    if (dsa::bf16_to_float(g.out[row * kDv + d]) != 0.f) return false;
  return g.lse[row] == kInf && g.rmax[row] == -kInf;
}

// Exactly 0 / +inf / -inf for every head of token t, every kernel that ran.
void expect_empty_token(const std::vector<MlaOut>& outs, int64_t t, int H, const char* why) {
  for (size_t k = 0; k < outs.size(); ++k) {
    if (!outs[k].ran) continue;
    for (int h = 0; h < H; ++h) {
      EXPECT_TRUE(is_empty_row(outs[k], t, h, H)) << why << ": token " << t << " head " << h << " [" << kernel_name(kAllKernels[k])
                                                  << "] is not out 0, lse +inf, row_max -inf";
    }
  }
}

const int32_t kBadIndices[] = {-1, -2, INT32_MIN, INT32_MAX, -7};

// Every kind of invalid index, alone and mixed with valid ones in a row.
TEST(HostileSparseMla, InvalidIndicesAreSkipped) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 200;
  Mla m = make_mla(8, 64, 128, S, 101);
  std::mt19937_64 gen(7);
  auto bad = [&](int j) -> int32_t {
    const int32_t extra[] = {static_cast<int32_t>(S), static_cast<int32_t>(S + 1), static_cast<int32_t>(S + kPadRows - 1)};
    const int k = j % 8;
    return k < 5 ? kBadIndices[k] : extra[k - 5];
  };
  for (int j = 0; j < 128; ++j) {
    if (j % 3 != 0) m.at(0, j) = bad(j);  // t0: a third valid, the rest every invalid kind (>= S points at NaN rows)
    m.at(1, j) = -1;                      // t1: all -1
    m.at(2, j) = bad(j);                  // t2: all invalid, every kind
    m.at(3, j) = INT32_MIN;               // t3: all INT32_MIN
    if (j != 127) m.at(4, j) = bad(j);    // t4: one valid index, the last position
    if (j != 0) m.at(5, j) = bad(j + 1);  // t5: one valid index, the first position
    if (j < 64) m.at(6, j) = bad(j);      // t6: the first 64-tile entirely invalid
    if (j >= 64) m.at(7, j) = static_cast<int32_t>(S + (j % kPadRows));  // t7: second tile just past the end (NaN rows)
  }
  std::vector<MlaOut> outs;
  ASSERT_NO_FATAL_FAILURE(check_mla(m, ref_mla(m), "invalid indices", &outs));
  expect_empty_token(outs, 1, m.H, "all -1");
  expect_empty_token(outs, 2, m.H, "all invalid");
  expect_empty_token(outs, 3, m.H, "all INT32_MIN");
  expect_same_as_cleaned(m, "invalid indices");
}

// The same slot many times: each occurrence counts (the reference's
// definition); a row of one slot repeated is exactly that slot's values.
TEST(HostileSparseMla, DuplicatedIndices) {
  SKIP_WITHOUT_GPU();
  Mla m = make_mla(5, 64, 128, 50, 102);
  for (int j = 0; j < 128; ++j) {
    m.at(0, j) = 7;                               // all the same slot
    m.at(1, j) = j < 100 ? 3 : 9;                 // two slots, 100 : 28
    m.at(2, j) = j % 2 ? 11 : 12;                 // alternating
    m.at(3, j) = j % 4 == 0 ? 20 : kBadIndices[j % 5];  // duplicates among invalid entries
    if (j >= 64) m.at(4, j) = m.at(4, j - 64);    // the second tile repeats the first
  }
  std::vector<MlaOut> outs;
  ASSERT_NO_FATAL_FAILURE(check_mla(m, ref_mla(m), "duplicated indices", &outs));
  for (size_t k = 0; k < outs.size(); ++k) {
    if (!outs[k].ran) continue;
    int64_t differ = 0;
    for (int h = 0; h < m.H; ++h)
      for (int d = 0; d < kDv; ++d) differ += outs[k].out[(static_cast<size_t>(0) * m.H + h) * kDv + d] != m.kv[7 * kD + d];
    EXPECT_EQ(differ, 0) << kernel_name(kAllKernels[k]) << ": a row of slot 7 x 128 is not exactly slot 7's values";
  }
  expect_same_as_cleaned(m, "duplicated indices");
}

// valid_len 0, negative, INT32_MIN, past topk, INT32_MAX, 1, topk - 1; the
// masked positions point at a slot holding NaN and at the NaN rows past the
// end: none of them may be read.
TEST(HostileSparseMla, ValidLenEdges) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 100;
  Mla m = make_mla(8, 64, 128, S, 103);
  for (int d = 0; d < kD; ++d) m.set_kv(0, d, kNaN);  // slot 0: NaN, only ever at masked positions
  for (int64_t t = 0; t < m.T; ++t)
    for (int j = 0; j < m.topk; ++j)
      if (m.at(t, j) == 0) m.at(t, j) = 1;
  m.vlen = {0, -5, INT32_MIN, 128 + 100, INT32_MAX, 1, 127, 64};
  for (int64_t t = 0; t < m.T; ++t) {
    const int n = std::clamp(m.vlen[t], 0, m.topk);
    for (int j = n; j < m.topk; ++j) m.at(t, j) = j % 2 ? 0 : static_cast<int32_t>(S + j % kPadRows);
  }
  std::vector<MlaOut> outs;
  ASSERT_NO_FATAL_FAILURE(check_mla(m, ref_mla(m), "valid_len edges", &outs));
  expect_empty_token(outs, 0, m.H, "valid_len 0");
  expect_empty_token(outs, 1, m.H, "valid_len -5");
  expect_empty_token(outs, 2, m.H, "valid_len INT32_MIN");
  expect_same_as_cleaned(m, "valid_len edges");
}

// A cache of one row (num_slots 1): index 0 valid, 1 (a NaN row past the
// end) and the rest invalid.
TEST(HostileSparseMla, SingleSlotCache) {
  SKIP_WITHOUT_GPU();
  Mla m = make_mla(3, 64, 64, 1, 104);
  for (int j = 0; j < 64; ++j) {
    m.at(0, j) = 0;
    m.at(1, j) = j == 5 ? 0 : (j % 2 ? 1 : kBadIndices[j % 5]);
    m.at(2, j) = j % 2 ? 1 : -1;
  }
  std::vector<MlaOut> outs;
  ASSERT_NO_FATAL_FAILURE(check_mla(m, ref_mla(m), "one-slot cache", &outs));
  expect_empty_token(outs, 2, m.H, "only indices past a one-row cache");
  for (size_t k = 0; k < outs.size(); ++k) {
    if (!outs[k].ran) continue;
    int64_t differ = 0;
    for (int64_t t = 0; t < 2; ++t)
      for (int h = 0; h < m.H; ++h)
        for (int d = 0; d < kDv; ++d) differ += outs[k].out[(static_cast<size_t>(t) * m.H + h) * kDv + d] != m.kv[d];
    EXPECT_EQ(differ, 0) << kernel_name(kAllKernels[k]) << ": attention over the single row is not exactly that row";
  }
  expect_same_as_cleaned(m, "one-slot cache");
}

// One token, at both sm90 head counts, and an odd shape only the simple
// kernel takes (the dispatch falls back to it).
TEST(HostileSparseMla, SingleToken) {
  SKIP_WITHOUT_GPU();
  for (int H : {64, 128}) {
    Mla m = make_mla(1, H, 128, 300, 105 + H);
    for (int j = 0; j < 128; j += 9) m.at(0, j) = kBadIndices[j % 5];
    ASSERT_NO_FATAL_FAILURE(check_mla(m, ref_mla(m), "T = 1, H = " + std::to_string(H)));
  }
  Mla odd = make_mla(1, 3, 5, 7, 106);
  odd.at(0, 1) = -1;
  odd.at(0, 3) = 7;
  ASSERT_NO_FATAL_FAILURE(check_mla(odd, ref_mla(odd), "T = 1, H = 3, topk = 5", nullptr, {Kernel::Simple, Kernel::Dispatch}));
}

// NaN in q: every score of that (token, head) is NaN, so that head's output
// and lse are NaN and its row max -inf (no score is a number; the reference
// and the kernels take maxima that skip NaN); the token's other heads are
// untouched. +inf in q: the scores of that head are +-inf by the sign of the
// key's element; one +inf score makes the head's output and lse NaN
// (inf - inf) and its row max +inf.
TEST(HostileSparseMla, NanAndInfInQuery) {
  SKIP_WITHOUT_GPU();
  Mla m = make_mla(4, 64, 128, 120, 107);
  for (int j = 0; j < 128; j += 5) m.at(2, j) = -1;
  m.set_q(1, 5, 17, kNaN);    // a latent dim
  m.set_q(2, 63, 570, kNaN);  // a rope dim
  m.set_q(3, 10, 0, kInf);
  m.set_q(3, 20, 100, -kInf);
  // Some selected key of token 3 has element 0 > 0 and some element 100 > 0
  // (-inf * positive = -inf, so head 20 needs a negative one): +inf scores exist.
  bool pos0 = false, neg100 = false;
  for (int j = 0; j < 128; ++j) pos0 |= m.get_kv(m.at(3, j), 0) > 0, neg100 |= m.get_kv(m.at(3, j), 100) < 0;
  ASSERT_TRUE(pos0 && neg100) << "test setup: pick another seed";
  const MlaRef ref = ref_mla(m);
  // The reference's own behaviour, stated (the kernels must match it).
  auto ref_row_nan = [&](int64_t t, int h) {
    bool all = std::isnan(ref.lse[t * 64 + h]);
    for (int d = 0; d < kDv; ++d) all = all && std::isnan(ref.out[(t * 64 + h) * kDv + d]);
    return all;
  };
  EXPECT_TRUE(ref_row_nan(1, 5) && ref.rmax[1 * 64 + 5] == -kInf) << "reference: NaN q row";
  EXPECT_TRUE(ref_row_nan(2, 63) && ref.rmax[2 * 64 + 63] == -kInf) << "reference: NaN q row (rope dim)";
  EXPECT_TRUE(ref_row_nan(3, 10) && ref.rmax[3 * 64 + 10] == kInf) << "reference: +inf q";
  EXPECT_TRUE(ref_row_nan(3, 20) && ref.rmax[3 * 64 + 20] == kInf) << "reference: -inf q";
  EXPECT_TRUE(std::isfinite(ref.lse[1 * 64 + 4]) && std::isfinite(ref.lse[3 * 64 + 11])) << "reference: other heads untouched";
  ASSERT_NO_FATAL_FAILURE(check_mla(m, ref, "NaN / inf in q"));
}

// NaN in a selected kv row: that score is NaN for every head of every token
// selecting it: output and lse NaN, row max the max of the other scores
// (-inf when it was the only valid index). Tokens not selecting it are bit
// for bit what they are without the NaN. +inf in a value column of a
// selected row: heads whose q element there is positive score +inf (output
// and lse NaN, row max +inf); negative ones score -inf, weight 0, and only
// that value column is NaN (0 * inf). -inf in a rope column: heads scoring
// -inf keep a finite output (the rope columns carry no values).
TEST(HostileSparseMla, NanAndInfInSelectedKvRow) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 100;
  Mla clean = make_mla(6, 64, 128, S, 108);
  for (int64_t t = 0; t < clean.T; ++t)
    for (int j = 0; j < clean.topk; ++j)
      if (clean.at(t, j) >= 40 && clean.at(t, j) < 50) clean.at(t, j) = 60;  // slots 40-49 only where put below
  clean.at(0, 77) = 42;   // t0: 42 among others
  for (int j = 0; j < 128; ++j) clean.at(2, j) = j == 100 ? 42 : -1;  // t2: 42 alone
  clean.at(3, 3) = 43;    // t3: +inf in a value column
  clean.at(4, 64) = 44;   // t4: -inf in a rope column
  // t1 and t5 select none of 40-49.
  Mla m = clean;
  m.set_kv(42, 100, kNaN);
  m.set_kv(43, 3, kInf);
  m.set_kv(44, 540, -kInf);
  const MlaRef ref = ref_mla(m);
  auto row = [](int64_t t, int h) { return static_cast<size_t>(t) * 64 + h; };
  // The reference's own behaviour, stated.
  for (int h = 0; h < 64; ++h) {
    EXPECT_TRUE(std::isnan(ref.lse[row(0, h)]) && std::isfinite(ref.rmax[row(0, h)])) << "reference t0 h" << h;
    EXPECT_TRUE(std::isnan(ref.lse[row(2, h)]) && ref.rmax[row(2, h)] == -kInf) << "reference t2 h" << h;
    const bool up = m.get_q(3, h, 3) > 0;
    EXPECT_EQ(std::isnan(ref.lse[row(3, h)]), up) << "reference t3 h" << h;
    EXPECT_TRUE(std::isnan(ref.out[row(3, h) * kDv + 3])) << "reference t3 h" << h << ": 0 * inf or NaN";
    EXPECT_EQ(std::isnan(ref.out[row(3, h) * kDv + 4]), up) << "reference t3 h" << h;
    EXPECT_EQ(std::isnan(ref.lse[row(4, h)]), m.get_q(4, h, 540) < 0) << "reference t4 h" << h;
  }
  std::vector<MlaOut> with_nan, without;
  ASSERT_NO_FATAL_FAILURE(check_mla(m, ref, "NaN / inf in a selected kv row", &with_nan));
  ASSERT_NO_FATAL_FAILURE(check_mla(clean, ref_mla(clean), "the same without them", &without));
  for (size_t k = 0; k < with_nan.size(); ++k) {
    if (!with_nan[k].ran) continue;
    for (int64_t t : {1, 5}) {
      const size_t o0 = row(t, 0) * kDv, o1 = row(t + 1, 0) * kDv;
      EXPECT_TRUE(std::equal(with_nan[k].out.begin() + o0, with_nan[k].out.begin() + o1, without[k].out.begin() + o0))
          << kernel_name(kAllKernels[k]) << ": token " << t << " selects no poisoned row but its output changed";
      EXPECT_EQ(std::memcmp(&with_nan[k].lse[row(t, 0)], &without[k].lse[row(t, 0)], 64 * 4), 0) << kernel_name(kAllKernels[k]);
      EXPECT_EQ(std::memcmp(&with_nan[k].rmax[row(t, 0)], &without[k].rmax[row(t, 0)], 64 * 4), 0) << kernel_name(kAllKernels[k]);
    }
  }
}

// NaN in rows nobody selects (slot 0, neighbours of selected slots, the last
// slot) changes no bit of any output.
TEST(HostileSparseMla, NanInUnselectedKvRowDoesNotLeak) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 300;
  Mla clean = make_mla(8, 64, 128, S, 109);
  const int64_t poisoned[] = {0, 1, 150, 151, 152, S - 1};
  for (int64_t t = 0; t < clean.T; ++t)
    for (int j = 0; j < clean.topk; ++j) {
      int32_t& v = clean.at(t, j);
      for (int64_t s : poisoned)
        if (v == s) v = 100;
      if (j % 11 == 0) v = kBadIndices[j % 5];
    }
  for (int j = 0; j < 128; ++j) {
    clean.at(3, j) = j % 2 ? 149 : 153;  // next to the poisoned 150-152
    clean.at(4, j) = -1;                 // nothing valid (the sm90 producer aims invalid rows at slot 0, copying nothing)
  }
  Mla m = clean;
  for (int64_t s : poisoned)
    for (int d = 0; d < kD; ++d) m.set_kv(s, d, kNaN);
  for (Kernel k : kAllKernels) {
    SCOPED_TRACE(kernel_name(k));
    MlaOut a, b;
    ASSERT_NO_FATAL_FAILURE(run_mla(clean, k, &a));
    ASSERT_NO_FATAL_FAILURE(run_mla(m, k, &b));
    if (!a.ran) continue;
    EXPECT_TRUE(same_bits(a, b)) << kernel_name(k) << ": NaN in unselected rows changed the output";
    expect_like_ref(b, ref_mla(m), std::string("unselected NaN [") + kernel_name(k) + "]");
  }
}

// More work items than SMs (T = SMs + 2 at H = 64): with the workspace the
// sm90 launcher splits the last two tokens over many CTAs and a second
// kernel combines the parts. NaN in q and in a selected row of those tokens
// must come through the combine as the reference has it.
TEST(HostileSparseMla, NanThroughSplitAndCombine) {
  SKIP_WITHOUT_GPU();
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  const int64_t T = ctx.num_sms() + 2;
  Mla m = make_mla(T, 64, 64, 200, 110);
  if (dsa::cuda::sparse_mla_workspace_bytes(ctx, T, 64, 64, 200) == 0) GTEST_SKIP() << "the sm90 kernel would not split here";
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < 64; ++j)
      if (m.at(t, j) == 77) m.at(t, j) = 78;
  m.set_q(T - 1, 33, 200, kNaN);
  m.at(T - 2, 10) = 77;
  m.set_kv(77, 5, kNaN);
  for (int j = 0; j < 64; ++j) m.at(T - 3, j) = -1;  // an empty item among the whole ones
  ASSERT_NO_FATAL_FAILURE(check_mla(m, ref_mla(m), "NaN through split and combine", nullptr, {Kernel::Sm90, Kernel::Sm90Ws}));
}

// ================================= top-k ====================================

struct TopkRun {
  std::vector<int32_t> out;
};

// Runs the GPU top-k twice (output poisoned 0xFF, then 0x7F; same bits).
void run_topk(const std::vector<float>& logits, const std::vector<int32_t>& vis, int64_t S, int k, std::vector<int32_t>* out) {
  const int64_t T = static_cast<int64_t>(vis.size());
  DevBuf<float> dl(logits.size());
  DevBuf<int32_t> dv(vis.size()), dout(static_cast<size_t>(T) * k);
  ASSERT_TRUE(dl.p && dv.p && dout.p);
  CK(cudaMemcpy(dl.p, logits.data(), dl.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv.p, vis.data(), dv.bytes(), cudaMemcpyHostToDevice));
  dsa::cuda::TopkParams p;
  p.logits = dl.p, p.visible_end = dv.p, p.out = dout.p, p.T = T, p.logits_stride = S, p.k = k;
  ASSERT_EQ(dsa::cuda::topk_workspace_bytes(T, S, k), 0u);
  std::vector<int32_t> r[2];
  for (int run = 0; run < 2; ++run) {
    CK(cudaMemset(dout.p, kPoisons[run], dout.bytes()));
    ASSERT_NO_THROW(dsa::cuda::topk(dsa::cuda::device_context(), p));
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    r[run].resize(dout.n);
    CK(cudaMemcpy(r[run].data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
  }
  EXPECT_EQ(r[0], r[1]) << "top-k: differs between runs poisoned 0xFF and 0x7F";
  *out = r[0];
}

// The rule of params.h, independently of dsa::ref::topk: NaN as -inf, -0 as
// +0, ties to the lower position; the chosen positions ascending, then -1.
std::vector<int32_t> topk_expected(const float* row, int64_t vis, int k) {
  std::vector<int32_t> c(static_cast<size_t>(vis));
  std::iota(c.begin(), c.end(), 0);
  auto key = [&](int32_t i) { return std::isnan(row[i]) ? -kInf : row[i] + 0.f; };
  std::stable_sort(c.begin(), c.end(), [&](int32_t a, int32_t b) { return key(a) > key(b); });
  c.resize(std::min<size_t>(c.size(), static_cast<size_t>(k)));
  std::sort(c.begin(), c.end());
  c.resize(static_cast<size_t>(k), -1);
  return c;
}

void check_topk(const std::vector<float>& logits, const std::vector<int32_t>& vis, int64_t S, int k, bool with_ref = true) {
  std::vector<int32_t> got;
  ASSERT_NO_FATAL_FAILURE(run_topk(logits, vis, S, k, &got));
  const int64_t T = static_cast<int64_t>(vis.size());
  std::vector<int32_t> ref(static_cast<size_t>(T) * k);
  if (with_ref) dsa::ref::topk(logits.data(), T, S, vis.data(), k, ref.data());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t v = std::clamp<int64_t>(vis[t], 0, S);  // params.h: visible_end is clamped into [0, logits_stride]
    const std::vector<int32_t> want = topk_expected(&logits[t * S], v, k);
    const std::vector<int32_t> row(got.begin() + t * k, got.begin() + (t + 1) * k);
    EXPECT_EQ(row, want) << "row " << t << " (visible_end " << vis[t] << ", k " << k << ")";
    if (with_ref)
      EXPECT_TRUE(std::equal(row.begin(), row.end(), ref.begin() + t * k)) << "row " << t << " differs from dsa::ref::topk";
  }
}

// Fewer visible positions than k (0, 1, a few, all of a short row): exactly
// those positions ascending, then -1; the values (NaN and infinities
// included) do not matter. k = 2048 (V3.2) over a 40-column row too.
TEST(HostileTopk, ContextShorterThanK) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 40;
  const std::vector<int32_t> vis = {0, 1, 2, 5, 39, 40, 0, 1};
  std::vector<float> logits(vis.size() * S);
  std::mt19937_64 gen(201);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = i % 7 == 0 ? kNaN : (i % 7 == 1 ? -kInf : (i % 7 == 2 ? kInf : u(gen)));
  for (int k : {64, 2048, 41}) {
    SCOPED_TRACE(k);
    ASSERT_NO_FATAL_FAILURE(check_topk(logits, vis, S, k));
  }
}

// visible_end 0 and 1 with k = 1 and with k > S; visible_end outside
// [0, S] (negative, INT32_MIN, S + 1, INT32_MAX), clamped as params.h says.
TEST(HostileTopk, VisibleEndEdgesAndClamping) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 70;
  std::vector<float> logits(8 * S);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = static_cast<float>((i * 37) % 23) - 11.f;
  ASSERT_NO_FATAL_FAILURE(check_topk(logits, {0, 1, 0, 1, 70, 69, 2, 3}, S, 1));
  ASSERT_NO_FATAL_FAILURE(check_topk(logits, {0, 1, 0, 1, 70, 69, 2, 3}, S, 100));
  // Out of range: the reference refuses these, so only the clamped rule is checked.
  ASSERT_NO_FATAL_FAILURE(check_topk(logits, {-1, INT32_MIN, 71, INT32_MAX, -70, 1000, 0, 70}, S, 64, false));
}

// NaN, +inf and -inf among the logits, more visible than k: NaN ranks with
// -inf (equal to it: ties to the lower position, NaN or -inf alike), +inf
// above everything, -0.0 ties with +0.0.
TEST(HostileTopk, NanAndInfLogits) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 300;
  const int k = 64;
  const int T = 8;
  std::vector<float> logits(T * S);
  std::vector<int32_t> vis(T, static_cast<int32_t>(S));
  std::mt19937_64 gen(202);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (int64_t s = 0; s < S; ++s) {
    logits[0 * S + s] = kNaN;                               // all NaN: positions 0..63
    logits[1 * S + s] = s % 2 ? kNaN : -kInf;               // NaN and -inf interleaved: 0..63 (equal ranks)
    logits[2 * S + s] = s % 3 == 0 ? kInf : u(gen);         // 100 +inf: the first 64 of them
    logits[3 * S + s] = s < 10 ? u(gen) : (s % 2 ? kNaN : -kInf);  // 10 numbers then NaN / -inf: 0..63
    logits[4 * S + s] = s % 50 == 7 ? u(gen) : (s % 2 ? kNaN : -kInf);  // 6 numbers scattered, the rest NaN / -inf
    logits[5 * S + s] = s % 4 == 0 ? kNaN : (s % 4 == 1 ? kInf : (s % 4 == 2 ? -kInf : u(gen)));  // 75 +inf, then 75 numbers
    logits[6 * S + s] = s % 2 ? -0.0f : 0.0f;               // signed zeros: all equal, 0..63
    logits[7 * S + s] = s > 250 ? kInf : (s % 5 == 0 ? kNaN : u(gen));  // +inf at the end: 49 of them first
  }
  vis[7] = 280;  // 29 +inf visible
  ASSERT_NO_FATAL_FAILURE(check_topk(logits, vis, S, k));
}

// All logits equal (at many values, and at -inf): ties go to the lower
// positions, so the first k positions.
TEST(HostileTopk, AllEqualLogits) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 500;
  const float values[] = {0.f, 1.f, -1.f, 3.4e38f, -kInf, 1e-40f};
  std::vector<float> logits;
  std::vector<int32_t> vis;
  for (float v : values) {
    logits.insert(logits.end(), S, v);
    vis.push_back(static_cast<int32_t>(S));
  }
  for (int k : {1, 64, 499, 500, 2048}) {
    SCOPED_TRACE(k);
    ASSERT_NO_FATAL_FAILURE(check_topk(logits, vis, S, k));
  }
}

// ============================= indexer logits ===============================

constexpr int64_t kHI = 64, kDI = 128, kTpb = 64, kBlockBytes = kTpb * (kDI + 4);

struct Idx {
  int64_t T = 0, max_blocks = 0, stride = 0, num_blocks = 0;
  int max_tokens_per_request = 0;
  std::vector<uint8_t> q, cache;
  std::vector<float> w;
  std::vector<int32_t> block_table, token_request, visible_end;
  void set_key(int64_t block, int64_t off, uint8_t byte, const float* scale) {
    uint8_t* b = cache.data() + block * kBlockBytes;
    std::memset(b + off * kDI, byte, kDI);
    if (scale) std::memcpy(b + kTpb * kDI + off * 4, scale, 4);
  }
};

void run_indexer(const Idx& x, void (*fn)(const dsa::cuda::DeviceContext&, const dsa::cuda::IndexerLogitsParams&),
                 std::vector<float>* out) {
  DevBuf<uint8_t> q(x.q.size()), cache(x.cache.size());
  DevBuf<float> w(x.w.size()), logits(static_cast<size_t>(x.T * x.stride));
  DevBuf<int32_t> bt(x.block_table.size()), treq(x.token_request.size()), vend(x.visible_end.size());
  ASSERT_TRUE(q.p && cache.p && w.p && logits.p && bt.p && treq.p && vend.p);
  CK(cudaMemcpy(q.p, x.q.data(), q.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(cache.p, x.cache.data(), cache.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(w.p, x.w.data(), w.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(bt.p, x.block_table.data(), bt.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(treq.p, x.token_request.data(), treq.bytes(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(vend.p, x.visible_end.data(), vend.bytes(), cudaMemcpyHostToDevice));
  dsa::cuda::IndexerLogitsParams p;
  p.q_fp8 = q.p, p.weights = w.p, p.k_cache = cache.p, p.block_table = bt.p, p.token_request = treq.p;
  p.visible_end = vend.p, p.logits = logits.p, p.T = x.T, p.logits_stride = x.stride, p.max_blocks_per_request = x.max_blocks;
  p.max_tokens_per_request = x.max_tokens_per_request;
  std::vector<float> r[2];
  for (int run = 0; run < 2; ++run) {
    CK(cudaMemset(logits.p, kPoisons[run], logits.bytes()));
    ASSERT_NO_THROW(fn(dsa::cuda::device_context(), p));
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    r[run].resize(logits.n);
    CK(cudaMemcpy(r[run].data(), logits.p, logits.bytes(), cudaMemcpyDeviceToHost));
  }
  EXPECT_EQ(std::memcmp(r[0].data(), r[1].data(), logits.bytes()), 0) << "logits differ between runs poisoned 0xFF and 0x7F";
  *out = r[0];
}

// Three requests: r0 holds a single key (one token sees it); r1 holds 70
// keys, its tokens see 0, 1, 2, 64 and 65 of them, and keys 65..69 (seen by
// nobody) hold NaN: key 65 a NaN scale with finite values, key 66 NaN values
// with a finite scale, 67..69 both, like the unowned tail of the block; r2's
// only token sees nothing and its block is all NaN. Visible logits match the
// reference, everything from visible_end on is exactly -inf, and the NaN
// keys change no bit (against the same cache with finite keys there).
TEST(HostileIndexer, VisibleEndEdgesSingleKeyAndHiddenNan) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 gen(301);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::uniform_int_distribution<int> e2(-3, 3);
  Idx x;
  x.max_blocks = 2;
  x.num_blocks = 5;
  x.stride = 67;  // >= every visible_end, neither a multiple of 4 nor of 64
  x.cache.assign(static_cast<size_t>(x.num_blocks * kBlockBytes), 0x7f);  // e4m3fn 0x7f: NaN
  for (int64_t b = 0; b < x.num_blocks; ++b) std::memset(x.cache.data() + b * kBlockBytes + kTpb * kDI, 0xff, kTpb * 4);  // NaN scales
  // Block tables: r0 -> {3}, r1 -> {0, 4}, r2 -> {1}; block 2 is nobody's.
  x.block_table = {3, -1, 0, 4, 1, -1};
  auto fill_key = [&](int64_t block, int64_t off) {
    uint8_t* b = x.cache.data() + block * kBlockBytes;
    for (int64_t i = 0; i < kDI; ++i) b[off * kDI + i] = dsa::float_to_fp8_e4m3(2.f * nd(gen));
    const float s = std::ldexp(1.f, e2(gen));
    std::memcpy(b + kTpb * kDI + off * 4, &s, 4);
  };
  fill_key(3, 0);                                        // r0: one key
  for (int64_t p = 0; p < 70; ++p) fill_key(p < 64 ? 0 : 4, p % 64);  // r1: 70 keys
  x.token_request = {0, 1, 1, 1, 1, 1, 2, 1};
  x.visible_end = {1, 0, 1, 2, 64, 65, 0, 1};
  x.max_tokens_per_request = 6;
  x.T = static_cast<int64_t>(x.token_request.size());
  x.q.resize(static_cast<size_t>(x.T * kHI * kDI));
  for (auto& v : x.q) v = dsa::float_to_fp8_e4m3(2.f * nd(gen));
  x.w.resize(static_cast<size_t>(x.T * kHI));
  for (auto& v : x.w) v = u(gen);
  Idx clean = x;
  // Keys 65..69 of r1 (block 4, offsets 1..5): NaN in the poisoned copy only.
  const float nan_scale = kNaN, one = 1.f;
  x.set_key(4, 1, 0x00, &nan_scale);  // finite (zero) values, NaN scale
  for (int64_t i = 0; i < kDI; ++i) x.cache[4 * kBlockBytes + 1 * kDI + i] = dsa::float_to_fp8_e4m3(0.5f);
  x.set_key(4, 2, 0x7f, &one);        // NaN values, finite scale
  x.set_key(4, 3, 0x7f, &nan_scale);
  x.set_key(4, 4, 0xff, &nan_scale);  // 0xff: -NaN in e4m3fn
  x.set_key(4, 5, 0x7f, &nan_scale);
  // The clean copy: every slot no token sees finite too (0x38 = 1.0, scale 1):
  // r0's block past its key, r1's tail, r2's block and the unowned block.
  for (int64_t off = 1; off < kTpb; ++off) clean.set_key(3, off, 0x38, &one);
  for (int64_t off = 6; off < kTpb; ++off) clean.set_key(4, off, 0x38, &one);
  for (int64_t b : {1, 2})
    for (int64_t off = 0; off < kTpb; ++off) clean.set_key(b, off, 0x38, &one);

  std::vector<float> ref(static_cast<size_t>(x.T * x.stride));
  dsa::ref::indexer_logits(x.q.data(), x.w.data(), x.cache.data(), x.block_table.data(), x.token_request.data(),
                           x.visible_end.data(), x.T, kHI, x.max_blocks, kTpb, x.stride, ref.data());
  struct K {
    const char* name;
    void (*fn)(const dsa::cuda::DeviceContext&, const dsa::cuda::IndexerLogitsParams&);
  };
  for (const K& k : {K{"wgmma", dsa::cuda::indexer_logits_sm90}, K{"mma.sync", dsa::cuda::indexer_logits_sm89},
                     K{"dispatch", dsa::cuda::indexer_logits}}) {
    SCOPED_TRACE(k.name);
    std::vector<float> got, got_clean;
    ASSERT_NO_FATAL_FAILURE(run_indexer(x, k.fn, &got));
    ASSERT_NO_FATAL_FAILURE(run_indexer(clean, k.fn, &got_clean));
    EXPECT_EQ(std::memcmp(got.data(), got_clean.data(), got.size() * 4), 0) << "NaN in keys nobody sees changed the logits";
    double num = 0, den = 0;
    int64_t bad = 0;
    for (int64_t t = 0; t < x.T; ++t)
      for (int64_t s = 0; s < x.stride; ++s) {
        const float g = got[t * x.stride + s], r = ref[t * x.stride + s];
        if (s >= x.visible_end[t]) {
          if (g != -kInf && bad++ < 5) ADD_FAILURE() << "token " << t << " key " << s << " past visible_end: " << g << ", not -inf";
          continue;
        }
        if (!std::isfinite(g) || !std::isfinite(r)) {
          if (bad++ < 5) ADD_FAILURE() << "token " << t << " key " << s << ": " << g << " vs reference " << r;
          continue;
        }
        num += (static_cast<double>(g) - r) * (static_cast<double>(g) - r);
        den += static_cast<double>(r) * r;
      }
    EXPECT_EQ(bad, 0);
    EXPECT_LE(std::sqrt(num / std::max(den, 1e-300)), 1e-3) << "visible logits vs the reference";
  }
}

// ================================ the layer =================================

using dsa::test::small_gpu_config;

struct LayerRun {
  std::vector<dsa::bf16_t> gpu;  // [T, H * 128]
  std::vector<float> ref;
};

// The GPU layer (buffers poisoned) and ref::layer_forward on the same
// weights, hidden states and caches (cached context: synthetic rows copied
// byte for byte to the host). The GPU runs twice: same bits.
void run_layer(const dsa::LayerConfig& cfg, const std::vector<dsa::StepRequest>& rq, const std::vector<dsa::bf16_t>& hidden,
               LayerRun* out) {
  const dsa::CacheConfig cc = dsa::CacheConfig::for_step(cfg, rq);
  dsa::CacheConfig dcc = cc;
  dcc.storage = dsa::Storage::Device;
  dsa::CacheManager hcache(cc);
  dsa::CacheManager dcache(dcc, dsa::cuda::device_allocator());
  dsa::reserve_step(hcache, rq);
  dsa::reserve_step(dcache, rq);
  const dsa::BatchMetadata md = dsa::build_batch_metadata(hcache, rq);
  ASSERT_EQ(dsa::build_batch_metadata(dcache, rq).block_table, md.block_table);
  dsa::cuda::fill_synthetic(dcache, 77);
  dsa::cuda::copy_pools(dcache, hcache);
  const dsa::LayerWeights w = dsa::generate_weights(cfg, 5);
  dsa::cuda::CudaLayer layer(cfg, w);
  layer.set_poison(true);
  std::vector<dsa::bf16_t> a, b;
  ASSERT_NO_THROW(a = layer.forward(hidden, md, dsa::cuda::device_view(dcache, 0)));
  ASSERT_NO_THROW(b = layer.forward(hidden, md, dsa::cuda::device_view(dcache, 0)));
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  EXPECT_EQ(a, b) << "the layer's output differs between two runs";
  out->gpu = a;
  out->ref = dsa::ref::layer_forward(cfg, w, hidden, md, hcache, 0, dsa::TraceOptions{}, nullptr, nullptr);
  ASSERT_EQ(out->gpu.size(), out->ref.size());
}

// Per token row: NaN / inf positions exactly the reference's; finite rows
// within rel L2 2e-2 (the layer test's tolerance).
void expect_layer_like_ref(const LayerRun& r, int64_t row, const std::string& what) {
  int64_t bad_cls = 0;
  double num = 0, den = 0;
  for (size_t i = 0; i < r.gpu.size(); ++i) {
    const float g = dsa::bf16_to_float(r.gpu[i]), f = r.ref[i];
    if (cls(g) != cls(f)) {
      if (bad_cls++ == 0)
        ADD_FAILURE() << what << ": token " << i / row << " col " << i % row << " is " << cls_name(cls(g)) << ", the reference "
                      << cls_name(cls(f));
      continue;
    }
    if (cls(f) != Cls::Num) continue;
    num += (static_cast<double>(g) - f) * (static_cast<double>(g) - f);
    den += static_cast<double>(f) * f;
  }
  EXPECT_EQ(bad_cls, 0) << what;
  if (den > 0) EXPECT_LE(std::sqrt(num / den), 2e-2) << what << ": rel L2 of the finite outputs";
}

// T = 1 with nothing cached (a token that sees only itself), and contexts
// shorter than topk (every visible key selected, the rest -1).
TEST(HostileLayer, SingleTokenAndContextShorterThanTopk) {
  SKIP_WITHOUT_GPU();
  const dsa::LayerConfig cfg = small_gpu_config(64, 64);
  const int64_t row = cfg.num_heads * cfg.v_head_dim;
  {
    const std::vector<dsa::StepRequest> rq = {{0, 0, 1}};
    LayerRun r;
    ASSERT_NO_FATAL_FAILURE(run_layer(cfg, rq, dsa::generate_hidden(cfg, 1, 3), &r));
    expect_layer_like_ref(r, row, "T = 1, cached 0");
  }
  {
    const std::vector<dsa::StepRequest> rq = {{0, 0, 5}, {1, 10, 1}, {2, 62, 2}};  // contexts 1..5, 11, 63 and 64 (= topk)
    LayerRun r;
    ASSERT_NO_FATAL_FAILURE(run_layer(cfg, rq, dsa::generate_hidden(cfg, 8, 4), &r));
    expect_layer_like_ref(r, row, "contexts up to topk");
  }
}

// NaN in one token's hidden state. Request A (3 new tokens, nothing cached):
// token 1 gets NaN in one element. Its q and its latent row are NaN, so its
// whole output row is NaN; token 2 selects token 1's latent row (its context,
// 3 keys, is below topk, so every key is selected whatever the logits) and is
// NaN too; token 0 sees only itself. Request B's tokens see nothing of A.
// Tokens 0 of A and all of B: exactly the bits of the run without the NaN.
TEST(HostileLayer, NanInHiddenStaysInItsRows) {
  SKIP_WITHOUT_GPU();
  const dsa::LayerConfig cfg = small_gpu_config(64, 64);
  const int64_t row = cfg.num_heads * cfg.v_head_dim;
  const std::vector<dsa::StepRequest> rq = {{0, 0, 3}, {1, 20, 2}};
  const std::vector<dsa::bf16_t> hidden = dsa::generate_hidden(cfg, 5, 6);
  std::vector<dsa::bf16_t> poisoned = hidden;
  poisoned[1 * cfg.hidden_size + 17] = dsa::float_to_bf16(kNaN);
  LayerRun clean, bad;
  ASSERT_NO_FATAL_FAILURE(run_layer(cfg, rq, hidden, &clean));
  ASSERT_NO_FATAL_FAILURE(run_layer(cfg, rq, poisoned, &bad));
  expect_layer_like_ref(clean, row, "clean");
  expect_layer_like_ref(bad, row, "NaN in token 1's hidden");
  for (int64_t t : {1, 2}) {
    int64_t nan = 0;
    for (int64_t c = 0; c < row; ++c) nan += std::isnan(dsa::bf16_to_float(bad.gpu[t * row + c]));
    EXPECT_EQ(nan, row) << "token " << t << ": NaN should fill the row (q or a selected latent row is NaN)";
  }
  for (int64_t t : {0, 3, 4}) {
    EXPECT_TRUE(std::equal(bad.gpu.begin() + t * row, bad.gpu.begin() + (t + 1) * row, clean.gpu.begin() + t * row))
        << "token " << t << " cannot see token 1 but its output changed";
  }
}

}  // namespace
