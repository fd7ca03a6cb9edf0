// Sparse MLA over the fp8 latent cache (issue 18): the fused sm90 kernel
// (sparse_mla_sm90_fp8, rows dequantized in shared memory) against the path
// it replaces, the layer's gather to bf16 followed by the bf16 sm90 kernel.
// The two must agree bit for bit (out, lse, row_max): the fused producer
// dequantizes as the gather does, and the consumers are the bf16 kernel's.
// The gather side is the host's dequantization of the whole cache
// (bf16_rn(float(e4m3) * scale), which DeviceGatherMatchesHostDequant shows
// equal, byte for byte, to the device gather gather_latent_fp8), so both
// kernels see the same slots and the same launch plan. Also: the simple
// kernel over fp8 rows (the fallback) against the simple kernel over the
// dequantized rows, the CPU reference (reference_stages.h) within the spec's
// bounds, parameter checks, and a disabled benchmark.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/layer/layer_kernels.h"
#include "cuda/sparse_mla/sm90/config.h"
#include "cuda/sparse_mla/sparse_mla.h"
#include "dev_buf.h"
#include "dsa/config.h"
#include "dsa/cuda.h"
#include "dsa/dtypes.h"
#include "dsa/error.h"
#include "dsa/reference_stages.h"

namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

using dsa::test::DevBuf;
constexpr int D = 576, DV = 512, kRow = 656;
constexpr float kScale = 0.1352338f;
constexpr int64_t kNanRows = 8;  // rows past num_slots in the allocation: bytes 0x7f (e4m3 NaN), never read

enum class Scales { Pow2, Mixed };

// An e4m3 byte that is not NaN (S.1111.111).
uint8_t random_e4m3(std::mt19937_64& rng) {
  for (;;) {
    const uint8_t b = static_cast<uint8_t>(rng());
    if ((b & 0x7f) != 0x7f) return b;
  }
}

float random_scale(std::mt19937_64& rng, Scales mode) {
  std::uniform_int_distribution<int> k(-14, 2), kind(0, 99);
  if (mode == Scales::Pow2) return std::ldexp(1.f, k(rng));
  const int c = kind(rng);
  if (c < 40) return std::ldexp(1.f, k(rng));                        // ue8m0, the fast path
  if (c < 75) return std::uniform_real_distribution<float>(1e-5f, 4.f)(rng);  // arbitrary: the fp32 path
  if (c < 80) return -std::ldexp(1.f, k(rng));                       // negative power of two
  if (c < 84) return std::ldexp(1.f, 16 + c % 20);                   // 2^16 .. above the fast path's range
  if (c < 88) return std::ldexp(1.f, -118 - c % 8);                  // below it: products near bf16's subnormals
  if (c < 91) return std::ldexp(1.f, -130);                          // a subnormal scale
  if (c < 94) return 0.f;
  if (c < 97) return std::ldexp(1.f, 15);                            // the fast path's bounds
  return std::ldexp(1.f, -117);
}

// [num_slots + kNanRows, stride] bytes; the padding of each row (stride >
// 656) and the rows past num_slots hold 0x7f, so any stray read shows as NaN.
std::vector<uint8_t> make_cache(int64_t num_slots, int64_t stride, Scales mode, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint8_t> c(static_cast<size_t>((num_slots + kNanRows) * stride), 0x7f);
  for (int64_t s = 0; s < num_slots; ++s) {
    uint8_t* row = &c[s * stride];
    for (int i = 0; i < 512; ++i) row[i] = random_e4m3(rng);
    for (int g = 0; g < 4; ++g) {
      const float sc = random_scale(rng, mode);
      std::memcpy(row + 512 + 4 * g, &sc, 4);
    }
    for (int i = 0; i < 64; ++i) {
      const dsa::bf16_t b = dsa::float_to_bf16(nd(rng));
      std::memcpy(row + 528 + 2 * i, &b, 2);
    }
  }
  return c;
}

// The gather's dequantization on the host: [num_slots + kNanRows, 576] bf16
// (the rows past num_slots NaN, as in the fp8 cache).
std::vector<dsa::bf16_t> dequantize(const std::vector<uint8_t>& c, int64_t num_slots, int64_t stride) {
  std::vector<dsa::bf16_t> out(static_cast<size_t>((num_slots + kNanRows) * D), 0x7fc0);
  for (int64_t s = 0; s < num_slots; ++s) {
    const uint8_t* row = &c[s * stride];
    for (int i = 0; i < 512; ++i) {
      float sc;
      std::memcpy(&sc, row + 512 + 4 * (i / 128), 4);
      out[s * D + i] = dsa::float_to_bf16(dsa::fp8_e4m3_to_float(row[i]) * sc);
    }
    std::memcpy(&out[s * D + 512], row + 528, 128);
  }
  return out;
}

// Indices as the sparse MLA tests draw them: valid slots mixed with -1,
// slots just past the end, INT_MAX and negatives; every 7th token has
// nothing valid; a fully invalid tile in some tokens; and a -1 tail (top-k's
// padding) in others.
std::vector<int32_t> make_indices(int64_t T, int topk, int64_t num_slots, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> slot(0, num_slots - 1);
  std::uniform_int_distribution<int> kind(0, 99);
  std::vector<int32_t> idx(static_cast<size_t>(T * topk));
  for (int64_t t = 0; t < T; ++t) {
    const bool none_valid = t % 7 == 3;
    for (int j = 0; j < topk; ++j) {
      const int k = kind(rng);
      int32_t v;
      if (none_valid)
        v = k < 50 ? -1 : (k < 80 ? static_cast<int32_t>(num_slots + k % kNanRows) : std::numeric_limits<int32_t>::max());
      else if (k < 85)
        v = static_cast<int32_t>(slot(rng));
      else if (k < 92)
        v = -1;
      else if (k < 96)
        v = static_cast<int32_t>(num_slots + k % kNanRows);
      else
        v = k < 98 ? std::numeric_limits<int32_t>::max() : -7;
      idx[t * topk + j] = v;
    }
    if (t % 5 == 1 && topk >= 128)
      for (int j = 64; j < 128; ++j) idx[t * topk + j] = -1;
    if (t % 4 == 2)
      for (int j = topk - topk / 3; j < topk; ++j) idx[t * topk + j] = -1;
  }
  return idx;
}

// Uniform in [-2, 2): cheap enough for the bench's 128 x 128 x 576 values.
// Uniform in [-2, 2) times `scale` (a power of two keeps the bf16 values exact).
std::vector<dsa::bf16_t> make_q(int64_t T, int H, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::vector<dsa::bf16_t> q(static_cast<size_t>(T * H * D));
  for (auto& v : q)
    v = dsa::float_to_bf16(static_cast<float>(static_cast<int32_t>(rng() >> 40) - (1 << 23)) * 0x1p-22f * scale);
  return q;
}

struct Outputs {
  std::vector<uint16_t> out;
  std::vector<float> lse, max;
};

enum class Path { Sm90, Simple, Dispatch };

// Runs one kernel on either cache (exactly one of kv / kv_fp8 non-null) with
// poisoned outputs and the workspace sparse_mla_workspace_bytes gives.
void run_kernel(const dsa::cuda::DeviceContext& ctx, Path which, const __nv_bfloat16* q, const __nv_bfloat16* kv, const uint8_t* kv_fp8,
         int64_t stride_kv, const int32_t* idx, const int32_t* vlen, int64_t T, int H, int topk, int64_t num_slots, Outputs& o) {
  DevBuf<__nv_bfloat16> dout(static_cast<size_t>(T * H * DV));
  DevBuf<float> dlse(static_cast<size_t>(T * H)), dmax(static_cast<size_t>(T * H));
  const size_t ws_bytes = dsa::cuda::sparse_mla_workspace_bytes(ctx, T, H, topk, num_slots);
  DevBuf<uint8_t> ws(std::max<size_t>(ws_bytes, 16));
  ASSERT_TRUE(dout.p && dlse.p && dmax.p && ws.p);
  CK(cudaMemset(dout.p, 0xff, dout.bytes()));
  CK(cudaMemset(dlse.p, 0xff, dlse.bytes()));
  CK(cudaMemset(dmax.p, 0xff, dmax.bytes()));
  dsa::cuda::SparseMlaParams p;
  p.q = q;
  p.kv = kv;
  p.kv_fp8 = kv_fp8;
  p.stride_kv_slot = stride_kv;
  p.indices = idx;
  p.valid_len = vlen;
  p.out = dout.p;
  p.lse = dlse.p;
  p.row_max = dmax.p;
  p.T = T;
  p.num_slots = num_slots;
  p.num_heads = H;
  p.topk = topk;
  p.softmax_scale = kScale;
  p.workspace = reinterpret_cast<float*>(ws.p);
  p.workspace_bytes = ws_bytes;
  if (which == Path::Sm90) {
    if (kv_fp8)
      dsa::cuda::sparse_mla_sm90_fp8(p, ctx);
    else
      dsa::cuda::sparse_mla_sm90(p, ctx);
  } else if (which == Path::Simple) {
    dsa::cuda::sparse_mla_simple(p, ctx);
  } else {
    dsa::cuda::sparse_mla(p, ctx);
  }
  CK(cudaStreamSynchronize(ctx.stream));
  CK(cudaGetLastError());
  o.out.resize(dout.n);
  o.lse.resize(dlse.n);
  o.max.resize(dmax.n);
  CK(cudaMemcpy(o.out.data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(o.lse.data(), dlse.p, dlse.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(o.max.data(), dmax.p, dmax.bytes(), cudaMemcpyDeviceToHost));
}

// Bit-identity of two runs, with the first differing place in the message.
void expect_same_bits(const Outputs& a, const Outputs& b, int H, const std::string& what) {
  auto first_diff = [](const void* x, const void* y, size_t n, size_t elem) -> int64_t {
    for (size_t i = 0; i < n; ++i)
      if (std::memcmp(static_cast<const char*>(x) + i * elem, static_cast<const char*>(y) + i * elem, elem) != 0)
        return static_cast<int64_t>(i);
    return -1;
  };
  ASSERT_EQ(a.out.size(), b.out.size());
  const int64_t o = first_diff(a.out.data(), b.out.data(), a.out.size(), 2);
  EXPECT_EQ(o, -1) << what << ": out differs first at token " << o / (H * DV) << " head " << (o / DV) % H << " column " << o % DV
                   << " (" << (o >= 0 ? a.out[o] : 0) << " vs " << (o >= 0 ? b.out[o] : 0) << ")";
  const int64_t l = first_diff(a.lse.data(), b.lse.data(), a.lse.size(), 4);
  EXPECT_EQ(l, -1) << what << ": lse differs first at token " << l / H << " head " << l % H << " ("
                   << (l >= 0 ? a.lse[l] : 0.f) << " vs " << (l >= 0 ? b.lse[l] : 0.f) << ")";
  const int64_t m = first_diff(a.max.data(), b.max.data(), a.max.size(), 4);
  EXPECT_EQ(m, -1) << what << ": row_max differs first at row " << m;
}

struct Fp8Case {
  int64_t batch;
  int s_q;
  int H;
  int topk;
  int64_t num_slots;
  int64_t stride;  // bytes between fp8 rows (656 dense)
  Scales scales;
  uint64_t seed;
  bool valid_len = false;
};

// Fused fp8 kernel vs the bf16 kernel over the host-dequantized cache; both
// over the same indices, T = batch x s_q tokens (s_q > 1: the next_n tokens
// of a request share its slots' range).
void run_fused_vs_gather(const Fp8Case& c) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  const int64_t T = c.batch * c.s_q;
  const std::vector<uint8_t> cache = make_cache(c.num_slots, c.stride, c.scales, c.seed);
  const std::vector<dsa::bf16_t> kv = dequantize(cache, c.num_slots, c.stride);
  const std::vector<int32_t> idx = make_indices(T, c.topk, c.num_slots, c.seed + 1);
  const std::vector<dsa::bf16_t> q = make_q(T, c.H, c.seed + 2);
  std::vector<int32_t> vlen(static_cast<size_t>(T));
  std::mt19937_64 rng(c.seed + 3);
  for (auto& v : vlen) v = static_cast<int32_t>(rng() % (c.topk + 40)) - 20;

  DevBuf<uint8_t> dcache(cache.size());
  DevBuf<__nv_bfloat16> dkv(kv.size()), dq(q.size());
  DevBuf<int32_t> didx(idx.size()), dvl(vlen.size());
  ASSERT_TRUE(dcache.p && dkv.p && dq.p && didx.p && dvl.p);
  CK(cudaMemcpy(dcache.p, cache.data(), cache.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dkv.p, kv.data(), kv.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dq.p, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(didx.p, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dvl.p, vlen.data(), vlen.size() * 4, cudaMemcpyHostToDevice));
  const int32_t* vl = c.valid_len ? dvl.p : nullptr;

  dsa::cuda::SparseMlaParams probe;
  probe.q = dq.p;
  probe.kv_fp8 = dcache.p;
  probe.stride_kv_slot = c.stride;
  probe.indices = didx.p;
  probe.out = reinterpret_cast<__nv_bfloat16*>(dq.p);
  probe.lse = reinterpret_cast<float*>(dq.p);
  probe.T = T;
  probe.num_slots = c.num_slots;
  probe.num_heads = c.H;
  probe.topk = c.topk;
  probe.softmax_scale = kScale;
  std::string why;
  if (!dsa::cuda::sparse_mla_sm90_fp8_can_implement(probe, ctx, &why)) GTEST_SKIP() << "fused fp8 kernel: " << why;

  Outputs fused, ref, again;
  ASSERT_NO_FATAL_FAILURE(run_kernel(ctx, Path::Sm90, dq.p, nullptr, dcache.p, c.stride, didx.p, vl, T, c.H, c.topk, c.num_slots, fused));
  ASSERT_NO_FATAL_FAILURE(run_kernel(ctx, Path::Sm90, dq.p, dkv.p, nullptr, 0, didx.p, vl, T, c.H, c.topk, c.num_slots, ref));
  expect_same_bits(fused, ref, c.H, "fused fp8 vs gather + bf16");
  ASSERT_NO_FATAL_FAILURE(run_kernel(ctx, Path::Sm90, dq.p, nullptr, dcache.p, c.stride, didx.p, vl, T, c.H, c.topk, c.num_slots, again));
  expect_same_bits(fused, again, c.H, "fused fp8, second run");
  // Tokens with nothing valid: zeros, lse +inf, max -inf (as the bf16 path).
  for (int64_t t = 3; t < T; t += 7)
    for (int h = 0; h < c.H; ++h) {
      EXPECT_EQ(fused.lse[t * c.H + h], std::numeric_limits<float>::infinity()) << "token " << t;
      EXPECT_EQ(fused.max[t * c.H + h], -std::numeric_limits<float>::infinity()) << "token " << t;
      for (int d = 0; d < DV; d += 37) ASSERT_EQ(fused.out[(t * c.H + h) * DV + d], 0) << "token " << t;
    }
  for (float v : fused.lse) ASSERT_FALSE(std::isnan(v)) << "a stray read of a NaN row";
}

// ---- small cases (run under compute-sanitizer) ----
TEST(SparseMlaFp8, H64Batch1Topk64) { run_fused_vs_gather({1, 1, 64, 64, 300, kRow, Scales::Mixed, 101}); }
TEST(SparseMlaFp8, H128Batch3Sq2Topk128) { run_fused_vs_gather({3, 2, 128, 128, 500, kRow, Scales::Mixed, 102}); }
TEST(SparseMlaFp8, H64Batch8Sq3Topk2048Pow2) { run_fused_vs_gather({8, 3, 64, 2048, 3000, kRow, Scales::Pow2, 103}); }
TEST(SparseMlaFp8, H128Batch5Sq4Topk576ValidLen) { run_fused_vs_gather({5, 4, 128, 576, 2000, kRow, Scales::Mixed, 104, true}); }
TEST(SparseMlaFp8, H64StridedRows672) { run_fused_vs_gather({6, 2, 64, 256, 700, 672, Scales::Mixed, 105}); }
TEST(SparseMlaFp8, H128StridedRows1024) { run_fused_vs_gather({4, 1, 128, 320, 900, 1024, Scales::Mixed, 106, true}); }

// ---- the sweep: batch 1..64, s_q 1..4, topk 2048 and smaller multiples of 64 ----
TEST(SparseMlaFp8Sweep, NextN) {
  const int64_t batches[] = {1, 2, 7, 33, 64};
  const int topks[] = {2048, 64, 640, 2048};
  uint64_t seed = 1000;
  for (int H : {64, 128})
    for (int64_t b : batches)
      for (int s_q = 1; s_q <= 4; ++s_q) {
        const int topk = topks[(b + s_q) % 4];
        const Scales sc = (b + s_q) % 2 ? Scales::Mixed : Scales::Pow2;
        const int64_t stride = s_q == 3 ? 704 : kRow;
        SCOPED_TRACE("H " + std::to_string(H) + " batch " + std::to_string(b) + " s_q " + std::to_string(s_q) + " topk " +
                     std::to_string(topk) + " stride " + std::to_string(stride));
        run_fused_vs_gather({b, s_q, H, topk, 6000, stride, sc, ++seed, s_q == 4});
        if (HasFatalFailure() || IsSkipped()) return;
      }
}
// A cache larger than L2 with enough tokens that the launcher reorders the
// indices by slot first (both paths get the same plan).
TEST(SparseMlaFp8Sweep, H64CacheLargerThanL2Reordered) { run_fused_vs_gather({300, 1, 64, 256, 60000, kRow, Scales::Mixed, 2001}); }
TEST(SparseMlaFp8Sweep, H128ManyItemsSplitTail) { run_fused_vs_gather({150, 1, 128, 512, 20000, kRow, Scales::Pow2, 2002}); }

// The device gather the layer runs today gives the host's dequantization
// byte for byte, so "bit-identical to host dequant + bf16 kernel" above is
// "bit-identical to the layer's gather + bf16 kernel".
TEST(SparseMlaFp8, DeviceGatherMatchesHostDequant) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  constexpr int64_t kSlots = 4096;
  const std::vector<uint8_t> cache = make_cache(kSlots, kRow, Scales::Mixed, 7);
  const std::vector<dsa::bf16_t> kv = dequantize(cache, kSlots, kRow);
  std::vector<int32_t> idx(kSlots);
  for (int64_t i = 0; i < kSlots; ++i) idx[i] = static_cast<int32_t>(i);
  DevBuf<uint8_t> dcache(cache.size());
  DevBuf<int32_t> didx(kSlots), dout_idx(kSlots);
  DevBuf<__nv_bfloat16> dout(static_cast<size_t>(kSlots) * D);
  ASSERT_TRUE(dcache.p && didx.p && dout_idx.p && dout.p);
  CK(cudaMemcpy(dcache.p, cache.data(), cache.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(didx.p, idx.data(), kSlots * 4, cudaMemcpyHostToDevice));
  dsa::cuda::GatherFp8Params g;
  g.latent_pool = dcache.p;
  g.indices = didx.p;
  g.out = dout.p;
  g.out_indices = dout_idx.p;
  g.T = 1;
  g.num_slots = kSlots;
  g.k = static_cast<int>(kSlots);
  dsa::cuda::gather_latent_fp8(ctx, g);
  CK(cudaStreamSynchronize(ctx.stream));
  std::vector<dsa::bf16_t> got(static_cast<size_t>(kSlots) * D);
  CK(cudaMemcpy(got.data(), dout.p, got.size() * 2, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got[i], kv[i]) << "slot " << i / D << " column " << i % D;
}

// The fallback: the simple kernel over fp8 rows equals the simple kernel over
// the dequantized rows; sparse_mla() takes it where the fused kernel cannot
// (a row stride off 16 bytes, H = 32).
TEST(SparseMlaFp8, SimpleAndDispatchFallback) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  struct C {
    int H;
    int topk;
    int64_t stride;
    Path path;
  };
  for (const C& c : {C{32, 100, 664, Path::Dispatch}, C{64, 128, 664, Path::Dispatch}, C{16, 192, kRow, Path::Simple}}) {
    const int64_t T = 9, slots = 400;
    const std::vector<uint8_t> cache = make_cache(slots, c.stride, Scales::Mixed, 31 + c.H);
    const std::vector<dsa::bf16_t> kv = dequantize(cache, slots, c.stride);
    const std::vector<int32_t> idx = make_indices(T, c.topk, slots, 32);
    const std::vector<dsa::bf16_t> q = make_q(T, c.H, 33);
    DevBuf<uint8_t> dcache(cache.size());
    DevBuf<__nv_bfloat16> dkv(kv.size()), dq(q.size());
    DevBuf<int32_t> didx(idx.size());
    ASSERT_TRUE(dcache.p && dkv.p && dq.p && didx.p);
    CK(cudaMemcpy(dcache.p, cache.data(), cache.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dkv.p, kv.data(), kv.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dq.p, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(didx.p, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
    Outputs a, b;
    ASSERT_NO_FATAL_FAILURE(run_kernel(ctx, c.path, dq.p, nullptr, dcache.p, c.stride, didx.p, nullptr, T, c.H, c.topk, slots, a));
    ASSERT_NO_FATAL_FAILURE(run_kernel(ctx, Path::Simple, dq.p, dkv.p, nullptr, 0, didx.p, nullptr, T, c.H, c.topk, slots, b));
    expect_same_bits(a, b, c.H, "simple fp8 vs simple bf16, H " + std::to_string(c.H));
  }
}

TEST(SparseMlaFp8, ParameterChecks) {
  dsa::cuda::SparseMlaParams p;
  alignas(16) static uint8_t buf[4096];
  p.q = reinterpret_cast<const __nv_bfloat16*>(buf);
  p.indices = reinterpret_cast<const int32_t*>(buf);
  p.out = reinterpret_cast<__nv_bfloat16*>(buf);
  p.lse = reinterpret_cast<float*>(buf);
  p.T = 1;
  p.num_slots = 1;
  p.num_heads = 64;
  p.topk = 64;
  p.softmax_scale = kScale;
  auto check = [](dsa::cuda::SparseMlaParams x) { dsa::cuda::check_sparse_mla_params(dsa::cuda::resolve_strides(x)); };
  EXPECT_THROW(check(p), dsa::ShapeError);  // neither cache
  p.kv_fp8 = buf;
  EXPECT_NO_THROW(check(p));
  p.kv = reinterpret_cast<const __nv_bfloat16*>(buf);
  EXPECT_THROW(check(p), dsa::ShapeError);  // both
  p.kv = nullptr;
  p.stride_kv_slot = 600;
  EXPECT_THROW(check(p), dsa::ShapeError);  // rows would overlap
  p.stride_kv_slot = 0;
  p.d_qk = 512;
  p.d_v = 448;
  EXPECT_THROW(check(p), dsa::ShapeError);  // the fp8 row is 576 / 512
  p.d_qk = 576;
  p.d_v = 512;
  if (dsa::cuda::device_count() == 0) return;
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  std::string why;
  EXPECT_FALSE(dsa::cuda::sparse_mla_sm90_can_implement(p, ctx, &why)) << "the bf16 kernel must refuse an fp8 cache";
  p.kv_fp8 = buf + 8;
  EXPECT_FALSE(dsa::cuda::sparse_mla_sm90_fp8_can_implement(p, ctx, &why));
  p.kv_fp8 = buf;
  p.stride_kv_slot = 664;
  EXPECT_FALSE(dsa::cuda::sparse_mla_sm90_fp8_can_implement(p, ctx, &why));
  p.stride_kv_slot = 0;
  p.kv_fp8 = nullptr;
  p.kv = reinterpret_cast<const __nv_bfloat16*>(buf);
  EXPECT_FALSE(dsa::cuda::sparse_mla_sm90_fp8_can_implement(p, ctx, &why)) << "the fp8 kernel must refuse a bf16 cache";
}

// Against the CPU reference (ue8m0 scales, as the cache writes them: the
// reference's fp32 dequantization is then exact in bf16 too) within spec
// 3.6's bounds: out rel L2 <= 1e-2, |lse diff| <= 1e-3; rows with nothing
// valid exactly 0 / +inf.
TEST(SparseMlaFp8, MatchesCpuReference) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  constexpr int64_t T = 10, kSlots = 700;
  constexpr int H = 64, K = 256;
  dsa::LayerConfig cfg;
  cfg.num_heads = H;
  cfg.index_topk = K;
  cfg.kv_cache_dtype = dsa::LatentCacheDType::FP8;
  const std::vector<uint8_t> cache = make_cache(kSlots, kRow, Scales::Pow2, 55);
  const std::vector<int32_t> idx = make_indices(T, K, kSlots, 56);
  // q scaled by 2^-8: with q in [-2, 2) the scores of these cache rows reach
  // ~1500, where one fp32 ulp of the lse is 1.2e-4 and the spec's absolute
  // bound (1e-3) is 8 ulps; the H100 run measured 1.1e-3 to 1.8e-3 there
  // (the fused output is bit-identical to the gather path's, tested above).
  // Scores of a few units, as the layer produces, make the bound meaningful.
  const std::vector<dsa::bf16_t> q = make_q(T, H, 57, 0x1p-8f);
  const dsa::ref::SelectedRows rows = dsa::ref::gather_selected_rows(cfg, cache.data(), kSlots, idx.data(), T, K);
  const dsa::ref::AttentionOut want = dsa::ref::sparse_mla(cfg, q.data(), rows, T);

  DevBuf<uint8_t> dcache(cache.size());
  DevBuf<__nv_bfloat16> dq(q.size()), dout(static_cast<size_t>(T * H * DV));
  DevBuf<int32_t> didx(idx.size());
  DevBuf<float> dlse(T * H);
  ASSERT_TRUE(dcache.p && dq.p && dout.p && didx.p && dlse.p);
  CK(cudaMemcpy(dcache.p, cache.data(), cache.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dq.p, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(didx.p, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(dout.p, 0xff, dout.bytes()));
  dsa::cuda::SparseMlaParams p;
  p.q = dq.p;
  p.kv_fp8 = dcache.p;
  p.indices = didx.p;
  p.out = dout.p;
  p.lse = dlse.p;
  p.T = T;
  p.num_slots = kSlots;
  p.num_heads = H;
  p.topk = K;
  p.softmax_scale = static_cast<float>(cfg.softmax_scale());
  dsa::cuda::sparse_mla(p, ctx);  // the fused kernel where it applies, else the simple one
  CK(cudaStreamSynchronize(ctx.stream));
  std::vector<dsa::bf16_t> got(dout.n);
  std::vector<float> lse(dlse.n);
  CK(cudaMemcpy(got.data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), dlse.p, dlse.bytes(), cudaMemcpyDeviceToHost));
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) {
      const int64_t r = t * H + h;
      double num = 0, den = 0;
      for (int d = 0; d < DV; ++d) {
        const double a = dsa::bf16_to_float(got[r * DV + d]), b = dsa::bf16_to_float(want.out[r * DV + d]);
        num += (a - b) * (a - b);
        den += b * b;
      }
      if (std::isinf(want.lse[r])) {
        EXPECT_EQ(lse[r], want.lse[r]) << "token " << t;
        EXPECT_EQ(num, 0.0) << "token " << t << ": a row with nothing valid must be zeros";
      } else {
        EXPECT_LE(std::sqrt(num / std::max(den, 1e-30)), 1e-2) << "token " << t << " head " << h;
        EXPECT_NEAR(lse[r], want.lse[r], 1e-3) << "token " << t << " head " << h;
      }
    }
}

// Median CUDA-event time of the fused kernel and of the path it replaces
// (device gather to bf16 + bf16 kernel) at decode: batch 64 requests of
// 32768 cached tokens each (a 1.4 GB fp8 cache), H 128, topk 2048, next_n
// s_q 1 and 2, each token's indices random over its request's slots.
TEST(SparseMlaFp8Bench, DISABLED_Bench) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  constexpr int64_t kBatch = 64, kCtx = 32768, kSlots = kBatch * kCtx;
  constexpr int H = 128, K = 2048, kIters = 30;
  // The cache: a 32768-row block of random rows (ue8m0 scales) copied over.
  const std::vector<uint8_t> block = make_cache(kCtx, kRow, Scales::Pow2, 77);
  DevBuf<uint8_t> dcache(static_cast<size_t>(kSlots) * kRow);
  ASSERT_TRUE(dcache.p) << "cudaMalloc of the 1.4 GB cache failed";
  CK(cudaMemcpy(dcache.p, block.data(), static_cast<size_t>(kCtx) * kRow, cudaMemcpyHostToDevice));
  for (int64_t b = 1; b < kBatch; ++b)
    CK(cudaMemcpy(dcache.p + b * kCtx * kRow, dcache.p, static_cast<size_t>(kCtx) * kRow, cudaMemcpyDeviceToDevice));
  for (int s_q : {1, 2}) {
    const int64_t T = kBatch * s_q;
    std::mt19937_64 rng(78 + s_q);
    std::vector<int32_t> idx(static_cast<size_t>(T * K));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t req = t / s_q;
      for (int j = 0; j < K; ++j) idx[t * K + j] = static_cast<int32_t>(req * kCtx + static_cast<int64_t>(rng() % kCtx));
    }
    const std::vector<dsa::bf16_t> q = make_q(T, H, 79);
    DevBuf<__nv_bfloat16> dq(q.size()), dout(static_cast<size_t>(T * H * DV)), dgather(static_cast<size_t>(T * K * D));
    DevBuf<int32_t> didx(idx.size()), dgidx(idx.size());
    DevBuf<float> dlse(T * H);
    const size_t ws_fused = dsa::cuda::sparse_mla_workspace_bytes(ctx, T, H, K, kSlots);
    const size_t ws_gather = dsa::cuda::sparse_mla_workspace_bytes(ctx, T, H, K, T * K);
    DevBuf<uint8_t> ws(std::max<size_t>(std::max(ws_fused, ws_gather), 16));
    ASSERT_TRUE(dq.p && dout.p && dgather.p && didx.p && dgidx.p && dlse.p && ws.p);
    CK(cudaMemcpy(dq.p, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(didx.p, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));

    dsa::cuda::SparseMlaParams pf;
    pf.q = dq.p;
    pf.kv_fp8 = dcache.p;
    pf.indices = didx.p;
    pf.out = dout.p;
    pf.lse = dlse.p;
    pf.T = T;
    pf.num_slots = kSlots;
    pf.num_heads = H;
    pf.topk = K;
    pf.softmax_scale = kScale;
    pf.workspace = reinterpret_cast<float*>(ws.p);
    pf.workspace_bytes = ws_fused;
    std::string why;
    if (!dsa::cuda::sparse_mla_sm90_fp8_can_implement(pf, ctx, &why)) GTEST_SKIP() << why;
    dsa::cuda::SparseMlaParams pb = pf;
    pb.kv_fp8 = nullptr;
    pb.kv = dgather.p;
    pb.indices = dgidx.p;
    pb.num_slots = T * K;
    pb.workspace_bytes = ws_gather;
    dsa::cuda::GatherFp8Params g;
    g.latent_pool = dcache.p;
    g.indices = didx.p;
    g.out = dgather.p;
    g.out_indices = dgidx.p;
    g.T = T;
    g.num_slots = kSlots;
    g.k = K;

    auto time_ms = [&](auto&& fn) {
      cudaEvent_t a, b;
      cudaEventCreate(&a);
      cudaEventCreate(&b);
      std::vector<float> ms;
      for (int i = 0; i < kIters + 3; ++i) {
        cudaEventRecord(a, ctx.stream);
        fn();
        cudaEventRecord(b, ctx.stream);
        cudaEventSynchronize(b);
        float x = 0;
        cudaEventElapsedTime(&x, a, b);
        if (i >= 3) ms.push_back(x);
      }
      cudaEventDestroy(a);
      cudaEventDestroy(b);
      std::sort(ms.begin(), ms.end());
      return ms[ms.size() / 2];
    };
    namespace sm = dsa::cuda::sm90_sparse_mla;
    const int other = sm::kFp8DefaultOrder == sm::kFp8Interleaved ? sm::kFp8ThreeFirst : sm::kFp8Interleaved;
    // The producer's two orders give the same bits (only the schedule differs).
    std::vector<uint16_t> o1(dout.n), o2(dout.n);
    dsa::cuda::sparse_mla_sm90_fp8(pf, ctx);
    CK(cudaMemcpy(o1.data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
    sm::sparse_mla_sm90_fp8_order(pf, ctx, other);
    CK(cudaMemcpy(o2.data(), dout.p, dout.bytes(), cudaMemcpyDeviceToHost));
    EXPECT_TRUE(o1 == o2) << "the producer's other order changed the output";
    const float fused = time_ms([&] { dsa::cuda::sparse_mla_sm90_fp8(pf, ctx); });
    const float fused_other = time_ms([&] { sm::sparse_mla_sm90_fp8_order(pf, ctx, other); });
    const float gather_only = time_ms([&] { dsa::cuda::gather_latent_fp8(ctx, g); });
    const float path = time_ms([&] {
      dsa::cuda::gather_latent_fp8(ctx, g);
      dsa::cuda::sparse_mla_sm90(pb, ctx);
    });
    CK(cudaStreamSynchronize(ctx.stream));
    CK(cudaGetLastError());
    std::printf("[bench] %s: batch %lld x %lld slots, H %d, topk %d, s_q %d: fused fp8 %.1f us (order %d; order %d: %.1f us); "
                "gather + bf16 %.1f us (gather %.1f us)\n",
                ctx.device ? ctx.device->name.c_str() : "?", static_cast<long long>(kBatch), static_cast<long long>(kCtx), H, K, s_q,
                fused * 1e3f, sm::kFp8DefaultOrder, other, fused_other * 1e3f, path * 1e3f, gather_only * 1e3f);
  }
}

}  // namespace
