// The standalone ops (dsa/ops.h) on CUDA tensors, against the same ops on
// CPU tensors (the reference) with the same inputs: sparse MLA within the
// spec's bounds (out rel L2 <= 1e-2, cosine distance <= 1e-5, lse and row
// max abs <= 1e-3, empty rows exactly 0 / +inf / -inf), indexer logits rel
// L2 <= 1e-3 with identical -inf masks (as dsa check), top-k exact, cache
// rows byte for byte what the layer's kernels write. Also: sparse_mla_fwd bit
// for bit the kernel called as the layer calls it; strided views; a
// non-blocking stream; reruns bitwise identical. Every output is poisoned
// first (0xA5 bytes), and device copies keep the host view's exact layout.
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

#include "cuda/layer/layer_kernels.h"
#include "cuda/sparse_mla/sparse_mla.h"
#include "dev_buf.h"
#include "dsa/config.h"
#include "dsa/cuda.h"
#include "dsa/dtypes.h"
#include "dsa/error.h"
#include "dsa/ops.h"
#include "../cpu/ops_host_tensor.h"

using dsa::ops::DType;
using dsa::ops::Tensor;

namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x
#define SKIP_WITHOUT_GPU() \
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

constexpr float kInf = std::numeric_limits<float>::infinity();

using dsa::test::HostTensor;

// The host tensor's whole allocation on the device, same layout.
struct DevTensor {
  dsa::test::DevBuf<uint64_t> buf;
  Tensor t;
  explicit DevTensor(const HostTensor& h) : buf(h.mem.size()) {
    t = h.t;
    if (!buf.p) return;
    cudaMemcpy(buf.p, h.mem.data(), h.byte_size(), cudaMemcpyHostToDevice);
    t.data = h.t.data ? reinterpret_cast<uint8_t*>(buf.p) + (static_cast<const uint8_t*>(h.t.data) -
                                                             reinterpret_cast<const uint8_t*>(h.mem.data()))
                      : nullptr;
    t.device = dsa::ops::DeviceKind::CUDA;
    cudaGetDevice(&t.device_index);
  }
  bool ok() const { return buf.p != nullptr; }
  // Whole allocation back into h (the same layout).
  void download(HostTensor& h) const { cudaMemcpy(h.mem.data(), buf.p, h.byte_size(), cudaMemcpyDeviceToHost); }
};

float bf(const HostTensor& h, int64_t i) { return dsa::bf16_to_float(h.at<uint16_t>(i)); }

void fill_bf16(HostTensor& h, std::mt19937& g, float scale = 1.f) {
  std::normal_distribution<float> n(0.f, scale);
  for (int64_t i = 0; i < h.numel(); ++i) h.at<uint16_t>(i) = dsa::float_to_bf16(n(g));
}

// e4m3 values of 2 * N(0, 1), the distribution the indexer kernel tests use.
uint8_t fp8_sample(std::mt19937& g) {
  std::normal_distribution<float> n(0.f, 2.f);
  return dsa::float_to_fp8_e4m3(n(g));
}
void fill_fp8(HostTensor& h, std::mt19937& g) {
  for (int64_t i = 0; i < h.numel(); ++i) h.at<uint8_t>(i) = fp8_sample(g);
}

// A non-blocking stream: the ops must queue everything on it.
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking); }
  ~Stream() { cudaStreamDestroy(s); }
};

// Relative L2 error over the entries finite in both, and the count of
// entries whose -inf / +inf / NaN status differs.
struct Diff {
  double rel = 0;
  int64_t mask_mismatch = 0;
};
Diff compare(const std::vector<double>& gpu, const std::vector<double>& ref) {
  double num = 0, den = 0;
  Diff d;
  for (size_t i = 0; i < gpu.size(); ++i) {
    const bool fg = std::isfinite(gpu[i]), fr = std::isfinite(ref[i]);
    if (!fg || !fr) {
      d.mask_mismatch += !(gpu[i] == ref[i]);  // NaN never equals: counted
      continue;
    }
    num += (gpu[i] - ref[i]) * (gpu[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  d.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return d;
}

// ---- sparse MLA ----------------------------------------------------------------------

struct MlaCase {
  int64_t T, H, S, topk, pad;
};

void fill_indices(HostTensor& idx, int64_t T, int64_t topk, int64_t S, std::mt19937& g) {
  std::uniform_int_distribution<int32_t> slot(0, static_cast<int32_t>(S - 1)), pct(0, 99);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < topk; ++j) {
      const int r = pct(g);
      int32_t v = r < 8 ? -1 : r < 12 ? static_cast<int32_t>(S + r) : slot(g);
      if (t == 1) v = -1;  // a row with nothing to attend to
      idx.at<int32_t>(t * topk + j) = v;
    }
}

TEST(OpsGpu, SparseMlaMatchesCpuOp) {
  SKIP_WITHOUT_GPU();
  Stream st;
  // sm90 kernel (H 64 / 128, topk a multiple of 64, dense and padded views), simple kernel (H 16, topk 100).
  for (const MlaCase c : {MlaCase{37, 64, 1000, 128, 0}, MlaCase{21, 128, 3000, 256, 8}, MlaCase{9, 16, 500, 100, 0}}) {
    SCOPED_TRACE(testing::Message() << "T " << c.T << " H " << c.H << " topk " << c.topk << " pad " << c.pad);
    std::mt19937 g(static_cast<uint32_t>(7 * c.H + c.topk));
    HostTensor q(DType::BF16, {c.T, c.H, 576}, c.pad), kv(DType::BF16, {c.S, 1, 576}, c.pad), idx(DType::I32, {c.T, c.topk});
    fill_bf16(q, g), fill_bf16(kv, g), fill_indices(idx, c.T, c.topk, c.S, g);
    HostTensor out(DType::BF16, {c.T, c.H, 512}, c.pad), mx(DType::F32, {c.T, c.H}, c.pad), lse(DType::F32, {c.T, c.H});
    const double scale = 0.1352337788608801;
    dsa::ops::sparse_mla_fwd(q.t, kv.t, idx.t, scale, 512, out.t, mx.t, lse.t);
    HostTensor gout(DType::BF16, {c.T, c.H, 512}, c.pad), gmx(DType::F32, {c.T, c.H}, c.pad), glse(DType::F32, {c.T, c.H});
    DevTensor dq(q), dkv(kv), didx(idx), dout(gout), dmx(gmx), dlse(glse);
    ASSERT_TRUE(dq.ok() && dkv.ok() && didx.ok() && dout.ok() && dmx.ok() && dlse.ok());
    std::vector<uint8_t> first;
    for (int run = 0; run < 2; ++run) {
      CK(cudaMemset(dout.buf.p, 0xA5, dout.buf.bytes()));
      dsa::ops::sparse_mla_fwd(dq.t, dkv.t, didx.t, scale, 512, dout.t, dmx.t, dlse.t, st.s);
      CK(cudaStreamSynchronize(st.s));
      dout.download(gout), dmx.download(gmx), dlse.download(glse);
      const std::vector<uint8_t> all = gout.bytes();
      if (run == 0) first = all;
      else EXPECT_EQ(all, first) << "rerun differs";
    }
    std::vector<double> go, co;
    for (int64_t i = 0; i < out.numel(); ++i) go.push_back(bf(gout, i)), co.push_back(bf(out, i));
    const Diff d = compare(go, co);
    EXPECT_EQ(d.mask_mismatch, 0);
    EXPECT_LE(d.rel, 1e-2);
    double dot = 0, na = 0, nb = 0;
    for (size_t i = 0; i < go.size(); ++i) dot += go[i] * co[i], na += go[i] * go[i], nb += co[i] * co[i];
    EXPECT_LE(1.0 - dot / std::sqrt(na * nb), 1e-5);
    for (int64_t i = 0; i < c.T * c.H; ++i) {
      const float gl = glse.at<float>(i), cl = lse.at<float>(i), gm = gmx.at<float>(i), cm = mx.at<float>(i);
      if (std::isinf(cl)) {
        EXPECT_EQ(gl, kInf) << i;
        EXPECT_EQ(gm, -kInf) << i;
        for (int64_t dd = 0; dd < 512; ++dd) ASSERT_EQ(bf(gout, i * 512 + dd), 0.f) << i;
        continue;
      }
      EXPECT_NEAR(gl, cl, 1e-3) << i;
      EXPECT_NEAR(gm, cm, 1e-3) << i;
    }
  }
}

// The op is the layer's call: same params (dense strides), the workspace
// sparse_mla_workspace_bytes gives for the shape, and the result is bit for
// bit the kernel's. The layer also passes valid_len (its top-k pads with -1
// after the valid entries); the op passes none, which changes nothing for
// such indices. The shape reorders the indices (a cache larger than L2, more
// than two rounds of items) and splits the last round.
TEST(OpsGpu, SparseMlaIsBitForBitTheLayersCall) {
  SKIP_WITHOUT_GPU();
  const int64_t T = 300, H = 128, S = 65536, topk = 512;
  std::mt19937 g(99);
  HostTensor q(DType::BF16, {T, H, 576}), kv(DType::BF16, {S, 576}), idx(DType::I32, {T, topk});
  fill_bf16(q, g), fill_bf16(kv, g);
  std::vector<int32_t> vlen(T);
  std::uniform_int_distribution<int32_t> slot(0, S - 1);
  for (int64_t t = 0; t < T; ++t) {
    vlen[t] = static_cast<int32_t>(t == 0 ? 0 : std::min<int64_t>(topk, 1 + t * 7));
    for (int64_t j = 0; j < topk; ++j) idx.at<int32_t>(t * topk + j) = j < vlen[t] ? slot(g) : -1;
  }
  HostTensor out(DType::BF16, {T, H, 512}), mx(DType::F32, {T, H}), lse(DType::F32, {T, H});
  DevTensor dq(q), dkv(kv), didx(idx), dout(out), dmx(mx), dlse(lse);
  ASSERT_TRUE(dq.ok() && dkv.ok() && didx.ok() && dout.ok() && dmx.ok() && dlse.ok());
  dsa::ops::sparse_mla_fwd(dq.t, dkv.t, didx.t, 0.1352337788608801, 512, dout.t, dmx.t, dlse.t);
  CK(cudaDeviceSynchronize());
  HostTensor o1(DType::BF16, {T, H, 512}), m1(DType::F32, {T, H}), l1(DType::F32, {T, H});
  dout.download(o1), dmx.download(m1), dlse.download(l1);

  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  const size_t ws = dsa::cuda::sparse_mla_workspace_bytes(ctx, T, static_cast<int>(H), static_cast<int>(topk), S);
  EXPECT_GT(ws, 0u) << "the shape was chosen so that the kernel uses its workspace";
  dsa::test::DevBuf<uint8_t> wbuf(std::max<size_t>(ws, 16)), vl(T * 4);
  ASSERT_TRUE(wbuf.p && vl.p);
  CK(cudaMemcpy(vl.p, vlen.data(), T * 4, cudaMemcpyHostToDevice));
  HostTensor o2(DType::BF16, {T, H, 512}), m2(DType::F32, {T, H}), l2(DType::F32, {T, H});
  DevTensor dout2(o2), dmx2(m2), dlse2(l2);
  ASSERT_TRUE(dout2.ok() && dmx2.ok() && dlse2.ok());
  dsa::cuda::SparseMlaParams p;
  p.q = static_cast<const __nv_bfloat16*>(dq.t.data), p.kv = static_cast<const __nv_bfloat16*>(dkv.t.data);
  p.indices = static_cast<const int32_t*>(didx.t.data), p.valid_len = reinterpret_cast<const int32_t*>(vl.p);
  p.out = static_cast<__nv_bfloat16*>(dout2.t.data), p.lse = static_cast<float*>(dlse2.t.data);
  p.row_max = static_cast<float*>(dmx2.t.data);
  p.T = T, p.num_slots = S, p.num_heads = static_cast<int>(H), p.topk = static_cast<int>(topk);
  p.softmax_scale = static_cast<float>(0.1352337788608801);
  p.workspace = reinterpret_cast<float*>(wbuf.p), p.workspace_bytes = wbuf.n;
  dsa::cuda::sparse_mla(p, ctx);
  CK(cudaDeviceSynchronize());
  dout2.download(o2), dmx2.download(m2), dlse2.download(l2);
  EXPECT_EQ(std::memcmp(o1.mem.data(), o2.mem.data(), o1.byte_size()), 0) << "out";
  EXPECT_EQ(std::memcmp(m1.mem.data(), m2.mem.data(), m1.byte_size()), 0) << "max_logits";
  EXPECT_EQ(std::memcmp(l1.mem.data(), l2.mem.data(), l1.byte_size()), 0) << "lse";
  EXPECT_EQ(l1.at<float>(0), kInf);  // token 0 selects nothing
}

// ---- indexer logits -------------------------------------------------------------------

void fill_weights(HostTensor& w, std::mt19937& g) {
  std::uniform_real_distribution<float> u(-0.02f, 0.02f);
  for (int64_t i = 0; i < w.numel(); ++i) w.at<float>(i) = u(g);
}

// The entries of logits [rows, cols] where want(r, c), as doubles.
template <class Want>
std::vector<double> pick(const HostTensor& l, int64_t rows, int64_t cols, Want want) {
  std::vector<double> v;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (want(r, c)) v.push_back(l.at<float>(r * cols + c));
  return v;
}

TEST(OpsGpu, Fp8MqaLogitsMatchesCpuOp) {
  SKIP_WITHOUT_GPU();
  Stream st;
  const int64_t M = 40, HI = 64, N = 700;
  std::mt19937 g(123);
  HostTensor q(DType::FP8_E4M3, {M, HI, 128}), k(DType::FP8_E4M3, {N, 128}, 16), ks(DType::F32, {N}), w(DType::F32, {M, HI});
  fill_fp8(q, g), fill_fp8(k, g), fill_weights(w, g);
  for (int64_t n = 0; n < N; ++n) ks.at<float>(n) = std::ldexp(1.f, static_cast<int>(n % 7) - 12);
  HostTensor s(DType::I32, {M}), e(DType::I32, {M});
  std::uniform_int_distribution<int32_t> pos(-20, 760);
  for (int64_t m = 0; m < M; ++m) {
    int32_t a = pos(g), b = pos(g);
    if (m % 5 != 4 && a > b) std::swap(a, b);  // every fifth row may have k_start > k_end (empty)
    s.at<int32_t>(m) = m == 0 ? 0 : a, e.at<int32_t>(m) = m == 0 ? static_cast<int32_t>(N) : b;
  }
  auto lo = [&](int64_t m) { return std::clamp<int64_t>(s.at<int32_t>(m), 0, N); };
  auto hi = [&](int64_t m) { return std::clamp<int64_t>(e.at<int32_t>(m), 0, N); };
  DevTensor dq(q), dk(k), dks(ks), dw(w), ds(s), de(e);
  ASSERT_TRUE(dq.ok() && dk.ok() && dks.ok() && dw.ok() && ds.ok() && de.ok());
  for (bool clean : {true, false}) {
    for (int64_t pad : {0, 5}) {
      SCOPED_TRACE(testing::Message() << "clean " << clean << " pad " << pad);
      HostTensor ref(DType::F32, {M, N}, pad), got(DType::F32, {M, N}, pad);
      dsa::ops::fp8_mqa_logits(q.t, k.t, ks.t, w.t, s.t, e.t, ref.t, clean);
      DevTensor dl(got);
      ASSERT_TRUE(dl.ok());
      std::vector<uint64_t> first;
      for (int run = 0; run < 2; ++run) {
        dsa::ops::fp8_mqa_logits(dq.t, dk.t, dks.t, dw.t, ds.t, de.t, dl.t, clean, st.s);
        CK(cudaStreamSynchronize(st.s));
        dl.download(got);
        if (run == 0) first = got.mem;
        else EXPECT_EQ(got.mem, first) << "rerun differs";
      }
      auto in_range = [&](int64_t r, int64_t c) { return c >= lo(r) && c < hi(r); };
      const Diff d = compare(pick(got, M, N, in_range), pick(ref, M, N, in_range));
      EXPECT_EQ(d.mask_mismatch, 0);
      EXPECT_LE(d.rel, 1e-3);
      // -inf from k_end on always, before k_start with clean_logits.
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n)
          if (n >= hi(m) || (clean && n < lo(m))) ASSERT_EQ(got.at<float>(m * N + n), -kInf) << "m " << m << " n " << n;
      // The padding between rows keeps its poison.
      if (pad) {
        for (int64_t m = 0; m + 1 < M; ++m)
          for (int64_t x = 0; x < pad; ++x) {
            uint32_t bits;
            std::memcpy(&bits, static_cast<const float*>(got.t.data) + m * (N + pad) + N + x, 4);
            ASSERT_EQ(bits, 0xA5A5A5A5u) << "padding of row " << m;
          }
      }
    }
  }
}

TEST(OpsGpu, Fp8PagedMqaLogitsMatchesCpuOp) {
  SKIP_WITHOUT_GPU();
  Stream st;
  const int64_t B = 5, HI = 64, bs = 64, num_blocks = 40, max_blocks = 8, L = 500;
  for (int64_t next_n : {1, 2}) {
    SCOPED_TRACE(testing::Message() << "next_n " << next_n);
    const int64_t T = B * next_n;
    std::mt19937 g(static_cast<uint32_t>(200 + next_n));
    HostTensor q(DType::FP8_E4M3, {B, next_n, HI, 128}), w(DType::F32, {T, HI}), cache(DType::U8, {num_blocks, bs, 1, 132});
    fill_fp8(q, g), fill_weights(w, g);
    {
      auto* p = static_cast<uint8_t*>(cache.t.data);
      for (int64_t b = 0; b < num_blocks; ++b) {
        for (int64_t i = 0; i < bs * 128; ++i) p[b * bs * 132 + i] = fp8_sample(g);
        for (int64_t r = 0; r < bs; ++r) {
          const float sc = std::ldexp(1.f, static_cast<int>((b + r) % 5) - 10);
          std::memcpy(p + b * bs * 132 + bs * 128 + r * 4, &sc, 4);
        }
      }
    }
    // Context lengths: short, a block edge, beyond L (clamped), beyond the table (clamped), and one whose
    // table has an invalid entry (-1) and one with an entry past the cache (its context ends there).
    const int32_t lens[B] = {1, 64 + static_cast<int32_t>(next_n), 700, 333, 450};
    HostTensor cl(DType::I32, {B}), table(DType::I32, {B, max_blocks}, 3);
    std::vector<int32_t> perm(num_blocks);
    for (int64_t i = 0; i < num_blocks; ++i) perm[i] = static_cast<int32_t>(i);
    std::shuffle(perm.begin(), perm.end(), g);
    for (int64_t b = 0; b < B; ++b) {
      cl.at<int32_t>(b) = lens[b];
      for (int64_t j = 0; j < max_blocks; ++j) table.at<int32_t>(b * max_blocks + j) = perm[(b * max_blocks + j) % num_blocks];
    }
    table.at<int32_t>(3 * max_blocks + 2) = -1;
    table.at<int32_t>(4 * max_blocks + 5) = static_cast<int32_t>(num_blocks);
    HostTensor ref(DType::F32, {T, L}, 3), got(DType::F32, {T, L}, 3);
    dsa::ops::fp8_paged_mqa_logits(q.t, cache.t, w.t, cl.t, table.t, L, ref.t, true);
    DevTensor dq(q), dw(w), dc(cache), dcl(cl), dt(table), dl(got);
    ASSERT_TRUE(dq.ok() && dw.ok() && dc.ok() && dcl.ok() && dt.ok() && dl.ok());
    std::vector<uint64_t> first;
    for (int run = 0; run < 2; ++run) {
      dsa::ops::fp8_paged_mqa_logits(dq.t, dc.t, dw.t, dcl.t, dt.t, L, dl.t, true, st.s);
      CK(cudaStreamSynchronize(st.s));
      dl.download(got);
      if (run == 0) first = got.mem;
      else EXPECT_EQ(got.mem, first) << "rerun differs";
    }
    std::vector<double> a, b;
    int64_t finite = 0;
    for (int64_t i = 0; i < T * L; ++i) {
      a.push_back(got.at<float>(i)), b.push_back(ref.at<float>(i));
      finite += std::isfinite(b.back());
    }
    const Diff d = compare(a, b);
    EXPECT_EQ(d.mask_mismatch, 0);
    EXPECT_LE(d.rel, 1e-3);
    EXPECT_GT(finite, 1000);
    // Request 3's context ends at its invalid block 2 (128 keys), request 4's at block 5 (320).
    for (int64_t j = 0; j < next_n; ++j) {
      EXPECT_TRUE(std::isfinite(got.at<float>((3 * next_n + j) * L + 127)));
      EXPECT_EQ(got.at<float>((3 * next_n + j) * L + 128), -kInf);
      EXPECT_EQ(got.at<float>((4 * next_n + j) * L + 320), -kInf);
    }
  }
}

TEST(OpsGpu, Fp8PagedMqaLogitsOverAnEmptyCache) {
  // A cache of no blocks (frameworks hand a null pointer for it): every row
  // is -inf on the GPU as on the CPU, not an error about the kernel's inputs.
  SKIP_WITHOUT_GPU();
  const int64_t B = 2, next_n = 1, HI = 64, L = 64, T = B * next_n;
  std::mt19937 g(11);
  HostTensor q(DType::FP8_E4M3, {B, next_n, HI, 128}), w(DType::F32, {T, HI}), cache(DType::U8, {0, 64, 1, 132});
  HostTensor cl(DType::I32, {B}), table(DType::I32, {B, 2}), got(DType::F32, {T, L}), ref(DType::F32, {T, L});
  fill_fp8(q, g);
  for (int64_t i = 0; i < T * HI; ++i) w.at<float>(i) = 0.5f;
  for (int64_t b = 0; b < B; ++b) {
    cl.at<int32_t>(b) = 40;
    table.at<int32_t>(b * 2) = 0, table.at<int32_t>(b * 2 + 1) = 0;
  }
  dsa::ops::fp8_paged_mqa_logits(q.t, cache.t, w.t, cl.t, table.t, L, ref.t, true);
  DevTensor dq(q), dw(w), dcl(cl), dt(table), dl(got);
  ASSERT_TRUE(dq.ok() && dw.ok() && dcl.ok() && dt.ok() && dl.ok());
  Tensor dc = cache.t;
  dc.data = nullptr;
  dc.device = dsa::ops::DeviceKind::CUDA;
  CK(cudaGetDevice(&dc.device_index));
  dsa::ops::fp8_paged_mqa_logits(dq.t, dc, dw.t, dcl.t, dt.t, L, dl.t, true, nullptr);
  CK(cudaDeviceSynchronize());
  dl.download(got);
  for (int64_t i = 0; i < T * L; ++i) {
    EXPECT_EQ(ref.at<float>(i), -kInf) << i;
    EXPECT_EQ(got.at<float>(i), -kInf) << i;
  }
}

// ---- top-k ------------------------------------------------------------------------------

TEST(OpsGpu, TopkMatchesCpuOp) {
  SKIP_WITHOUT_GPU();
  Stream st;
  const int64_t T = 50, S = 5000;
  std::mt19937 g(7);
  std::uniform_int_distribution<int> lvl(0, 300);
  HostTensor logits(DType::F32, {T, S}, 7), lens(DType::I32, {T});
  for (int64_t i = 0; i < T * S; ++i) logits.at<float>(i) = i % 101 == 3 ? std::nanf("") : 0.01f * lvl(g) - 1.f;
  std::uniform_int_distribution<int32_t> len(-10, 6000);
  for (int64_t t = 0; t < T; ++t) lens.at<int32_t>(t) = t == 0 ? 0 : t == 1 ? 2048 : len(g);
  DevTensor dlog(logits), dlen(lens);
  ASSERT_TRUE(dlog.ok() && dlen.ok());
  for (int64_t k : {2048, 100}) {
    for (int64_t pad : {0, 3}) {
      SCOPED_TRACE(testing::Message() << "k " << k << " pad " << pad);
      HostTensor ref(DType::I32, {T, k}, pad), got(DType::I32, {T, k}, pad);
      dsa::ops::topk(logits.t, k, lens.t, ref.t);
      DevTensor dout(got);
      ASSERT_TRUE(dout.ok());
      for (int run = 0; run < 2; ++run) {
        CK(cudaMemset(dout.buf.p, 0xA5, dout.buf.bytes()));
        dsa::ops::topk(dlog.t, k, dlen.t, dout.t, st.s);
        CK(cudaStreamSynchronize(st.s));
        dout.download(got);
        ASSERT_EQ(got.mem, ref.mem) << "run " << run;  // positions and the padding's poison alike
      }
    }
  }
  // No columns: every entry is -1.
  HostTensor empty(DType::F32, {3, 0}), l3(DType::I32, {3}), o3(DType::I32, {3, 16});
  for (int t = 0; t < 3; ++t) l3.at<int32_t>(t) = 9;
  HostTensor one(DType::F32, {3, 1});
  DevTensor de(one), dl3(l3), do3(o3);
  ASSERT_TRUE(de.ok() && dl3.ok() && do3.ok());
  de.t.shape = {3, 0};
  dsa::ops::topk(de.t, 16, dl3.t, do3.t, st.s);
  CK(cudaStreamSynchronize(st.s));
  do3.download(o3);
  for (int64_t i = 0; i < 48; ++i) EXPECT_EQ(o3.at<int32_t>(i), -1);
}

// ---- RoPE + cache append -------------------------------------------------------------------

TEST(OpsGpu, RopeQuantAppendWritesWhatTheLayerWrites) {
  SKIP_WITHOUT_GPU();
  Stream st;
  for (dsa::LatentCacheDType dt : {dsa::LatentCacheDType::BF16, dsa::LatentCacheDType::FP8}) {
    SCOPED_TRACE(dsa::to_string(dt));
    dsa::LayerConfig cfg;
    cfg.kv_cache_dtype = dt;
    const bool fp8 = dt == dsa::LatentCacheDType::FP8;
    const int64_t T = 45, slots = 128, dkv = 512, rope = 64, row = cfg.latent_cache_bytes_per_token();
    const int64_t width = fp8 ? row : dkv + rope;
    std::mt19937 g(17);
    HostTensor ckv(DType::BF16, {T, dkv}, 8), kpe(DType::BF16, {T, rope}, 2), pos(DType::I32, {T}), slot(DType::I64, {T});
    fill_bf16(ckv, g, 3.f), fill_bf16(kpe, g);
    for (int64_t t = 0; t < T; ++t) {
      pos.at<int32_t>(t) = static_cast<int32_t>(t * 1531 + 11);
      slot.at<int64_t>(t) = t == 4 ? -7 : t == 9 ? slots + 3 : (t * 37 + 1) % slots;
    }
    HostTensor cpu_cache(fp8 ? DType::U8 : DType::BF16, {slots, width});
    dsa::ops::rope_quant_append(cfg, ckv.t, kpe.t, pos.t, slot.t, cpu_cache.t);
    HostTensor gpu_cache(fp8 ? DType::U8 : DType::BF16, {slots, width});
    DevTensor dckv(ckv), dkpe(kpe), dpos(pos), dslot(slot), dcache(gpu_cache);
    ASSERT_TRUE(dckv.ok() && dkpe.ok() && dpos.ok() && dslot.ok() && dcache.ok());
    dsa::ops::rope_quant_append(cfg, dckv.t, dkpe.t, dpos.t, dslot.t, dcache.t, st.s);
    CK(cudaStreamSynchronize(st.s));
    dcache.download(gpu_cache);

    // The layer's kernels on dense copies of the same values.
    std::vector<uint16_t> c(T * dkv), k(T * rope);
    std::vector<int32_t> p(T);
    std::vector<int64_t> sl(T);
    for (int64_t i = 0; i < T * dkv; ++i) c[i] = ckv.at<uint16_t>(i);
    for (int64_t i = 0; i < T * rope; ++i) k[i] = kpe.at<uint16_t>(i);
    for (int64_t t = 0; t < T; ++t) p[t] = pos.at<int32_t>(t), sl[t] = slot.at<int64_t>(t);
    const std::vector<double> f64 = dsa::rope_inv_freq(cfg);
    const std::vector<float> f32(f64.begin(), f64.end());
    dsa::test::DevBuf<uint16_t> bc(c.size()), bk(k.size()), bkout(k.size());
    dsa::test::DevBuf<int32_t> bp(T);
    dsa::test::DevBuf<int64_t> bs(T);
    dsa::test::DevBuf<float> bf_(f32.size());
    dsa::test::DevBuf<uint8_t> pool(static_cast<size_t>(slots * row));
    ASSERT_TRUE(bc.p && bk.p && bkout.p && bp.p && bs.p && bf_.p && pool.p);
    CK(cudaMemcpy(bc.p, c.data(), c.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bk.p, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bp.p, p.data(), T * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bs.p, sl.data(), T * 8, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bf_.p, f32.data(), f32.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(pool.p, 0xA5, pool.bytes()));
    const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
    dsa::cuda::MlaRopeParams rp;
    rp.kv = reinterpret_cast<const __nv_bfloat16*>(bk.p), rp.ld_kv = rope, rp.k_rope_col = 0;
    rp.k_out = reinterpret_cast<__nv_bfloat16*>(bkout.p), rp.positions = bp.p, rp.inv_freq = bf_.p;
    rp.T = T, rp.num_heads = 0, rp.rope_dim = static_cast<int>(rope);
    dsa::cuda::mla_rope(ctx, rp);
    dsa::cuda::CacheAppendParams ap;
    ap.c_kv = reinterpret_cast<const __nv_bfloat16*>(bc.p), ap.k_pe = reinterpret_cast<const __nv_bfloat16*>(bkout.p);
    ap.slot_mapping = bs.p, ap.latent_pool = pool.p, ap.T = T, ap.num_slots = slots, ap.fp8 = fp8;
    dsa::cuda::cache_append(ctx, ap);
    CK(cudaDeviceSynchronize());
    std::vector<uint8_t> layer(static_cast<size_t>(slots * row));
    CK(cudaMemcpy(layer.data(), pool.p, layer.size(), cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::memcmp(layer.data(), gpu_cache.t.data, layer.size()), 0) << "op and layer kernels differ";

    // Against the CPU op: c_kv (and its fp8 scales) byte for byte; the rotated k_pe within one bf16
    // rounding (sincosf on the GPU, std::sin / cos on the CPU).
    const auto* gb = static_cast<const uint8_t*>(gpu_cache.t.data);
    const auto* cb = static_cast<const uint8_t*>(cpu_cache.t.data);
    const int64_t rope_off = fp8 ? dkv + 4 * (dkv / 128) : 2 * dkv;
    int64_t written = 0;
    for (int64_t s = 0; s < slots; ++s) {
      ASSERT_EQ(std::memcmp(gb + s * row, cb + s * row, static_cast<size_t>(rope_off)), 0) << "slot " << s;
      for (int64_t i = 0; i < rope; ++i) {
        uint16_t a, b;
        std::memcpy(&a, gb + s * row + rope_off + 2 * i, 2);
        std::memcpy(&b, cb + s * row + rope_off + 2 * i, 2);
        const float fa = dsa::bf16_to_float(a), fb = dsa::bf16_to_float(b);
        if (a == 0xA5A5 || b == 0xA5A5) {
          ASSERT_EQ(a, b) << "slot " << s << " written on one side only";
          continue;
        }
        ++written;
        ASSERT_LE(std::fabs(fa - fb), std::fabs(fb) / 128 + 1e-6f) << "slot " << s << " rope " << i;
      }
    }
    EXPECT_EQ(written, (T - 2) * rope);  // slot collisions aside: (t * 37 + 1) % 128 is distinct for t < 128
  }
}

// ---- device-specific rules -------------------------------------------------------------------

TEST(OpsGpu, CudaOnlyRulesAndMixedDevices) {
  SKIP_WITHOUT_GPU();
  HostTensor q(DType::FP8_E4M3, {2, 32, 128}), k(DType::FP8_E4M3, {70, 128}), ks(DType::F32, {70}), w(DType::F32, {2, 32});
  HostTensor s(DType::I32, {2}), e(DType::I32, {2}), l(DType::F32, {2, 70});
  DevTensor dq(q), dk(k), dks(ks), dw(w), ds(s), de(e), dl(l);
  ASSERT_TRUE(dq.ok() && dk.ok() && dks.ok() && dw.ok() && ds.ok() && de.ok() && dl.ok());
  try {
    dsa::ops::fp8_mqa_logits(dq.t, dk.t, dks.t, dw.t, ds.t, de.t, dl.t, true);
    ADD_FAILURE() << "HI = 32 on CUDA must be refused";
  } catch (const dsa::ShapeError& err) {
    EXPECT_EQ(err.parameter(), "q");
    EXPECT_NE(std::string(err.what()).find("64"), std::string::npos) << err.what();
  }
  // The CPU path takes HI = 32.
  EXPECT_NO_THROW(dsa::ops::fp8_mqa_logits(q.t, k.t, ks.t, w.t, s.t, e.t, l.t, true));
  try {
    dsa::ops::fp8_mqa_logits(q.t, dk.t, dks.t, dw.t, ds.t, de.t, dl.t, true);
    ADD_FAILURE() << "mixed devices must be refused";
  } catch (const dsa::ShapeError& err) {
    EXPECT_NE(std::string(err.what()).find("q is on cpu"), std::string::npos) << err.what();
  }
  HostTensor pq(DType::FP8_E4M3, {1, 1, 64, 128}), cache(DType::U8, {4, 32, 1, 132}), pw(DType::F32, {1, 64});
  HostTensor cl(DType::I32, {1}), tbl(DType::I32, {1, 4}), pl(DType::F32, {1, 100});
  DevTensor dpq(pq), dc(cache), dpw(pw), dcl(cl), dtbl(tbl), dpl(pl);
  ASSERT_TRUE(dpq.ok() && dc.ok() && dpw.ok() && dcl.ok() && dtbl.ok() && dpl.ok());
  try {
    dsa::ops::fp8_paged_mqa_logits(dpq.t, dc.t, dpw.t, dcl.t, dtbl.t, 100, dpl.t, true);
    ADD_FAILURE() << "block_size 32 on CUDA must be refused";
  } catch (const dsa::ShapeError& err) {
    EXPECT_EQ(err.parameter(), "kv_cache");
  }
  EXPECT_TRUE(dsa::ops::cuda_available());
}

}  // namespace
