// Indexer logits on the GPU (src/cuda/indexer/params.h) against dsa::ref::indexer_logits
// on the same fp8 inputs, spec 3.5 / 7: rel L2 <= 1e-3 over the visible
// entries, -inf exactly where the reference has it, no NaN; logits poisoned
// with NaN before each run; two runs bitwise identical. The paged inputs,
// with NaN in every slot no request owns, are indexer_problem.h's.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "bench/cuda/kernel_bench.h"
#include "cuda/indexer/params.h"
#include "cuda/topk/params.h"
#include "dev_buf.h"
#include "dsa/cuda.h"
#include "dsa/dtypes.h"
#include "dsa/error.h"
#include "dsa/reference.h"
#include "indexer_problem.h"

namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

using namespace dsa::test::indexer;
using dsa::test::DevBuf;

void run_case(const std::vector<Req>& reqs, int64_t extra_stride, uint64_t seed) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Problem pb = make_problem(reqs, extra_stride, seed);
  const std::vector<float> ref = pb.reference();
  DeviceProblem d(pb);
  ASSERT_NO_FATAL_FAILURE(d.upload(pb));
  const dsa::cuda::IndexerLogitsParams p = d.params(pb, max_num_new(reqs));
  DevBuf<float>& logits = d.logits;

  struct Kernel {
    const char* name;
    void (*fn)(const dsa::cuda::DeviceContext&, const dsa::cuda::IndexerLogitsParams&);
  };
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  for (const Kernel& k : {Kernel{"wgmma", dsa::cuda::indexer_logits_sm90}, Kernel{"mma.sync", dsa::cuda::indexer_logits_sm89},
                          Kernel{"dispatch", dsa::cuda::indexer_logits}}) {
    SCOPED_TRACE(k.name);
    std::vector<float> out1(ref.size()), out2(ref.size());
    for (std::vector<float>* out : {&out1, &out2}) {
      CK(cudaMemset(logits.p, 0xff, logits.bytes()));  // NaN poison
      ASSERT_NO_THROW(k.fn(ctx, p));
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(out->data(), logits.p, logits.bytes(), cudaMemcpyDeviceToHost));
    }
    const Compare c = compare(out1, ref);
    EXPECT_EQ(c.nan, 0) << "NaN in the output (poison left or stray read)";
    EXPECT_EQ(c.inf_mismatch, 0) << "-inf positions differ from the reference";
    EXPECT_LE(c.rel, 1e-3) << "worst at token " << c.worst / pb.stride << " key " << c.worst % pb.stride << ": "
                           << out1[c.worst] << " vs " << ref[c.worst];
    EXPECT_EQ(std::memcmp(out1.data(), out2.data(), out1.size() * 4), 0) << "two runs differ";
  }
}

// T < 512: one token per CTA. Ragged: contexts shorter and longer than top-k's 2048.
TEST(GpuIndexerLogits, RaggedBatchOfThree) { run_case({{100, 37}, {0, 300}, {2500, 40}}, 0, 11); }

// T >= 512: 8 tokens per CTA; tiles straddle requests of different lengths.
TEST(GpuIndexerLogits, RaggedPrefillTilesStraddleRequests) { run_case({{0, 517}, {1000, 3}, {64, 200}}, 0, 12); }

TEST(GpuIndexerLogits, PrefillChunkWithCachedPrefix) { run_case({{3000, 1100}}, 0, 13); }

TEST(GpuIndexerLogits, Decode) { run_case({{10, 1}, {2100, 1}, {4000, 1}, {63, 1}, {64, 1}, {0, 1}}, 0, 14); }

TEST(GpuIndexerLogits, SpeculativeNextN2) { run_case({{2047, 2}, {5000, 2}, {0, 2}, {130, 2}}, 0, 15); }

// Columns past every visible_end (stride not a multiple of 4 or of 64) are -inf.
TEST(GpuIndexerLogits, WideOddStride) { run_case({{700, 5}, {20, 9}}, 333, 16); }

TEST(GpuIndexerLogits, RejectsShapesTheKernelIsNotBuiltFor) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  dsa::cuda::IndexerLogitsParams p;
  int dummy_i = 0;
  float dummy_f = 0;
  alignas(16) uint8_t dummy_b[16] = {};
  p.q_fp8 = dummy_b;
  p.weights = &dummy_f;
  p.k_cache = dummy_b;
  p.block_table = p.token_request = p.visible_end = &dummy_i;
  p.logits = &dummy_f;
  p.T = 1;
  p.logits_stride = 64;
  p.max_blocks_per_request = 1;
  p.num_heads = 32;
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context();
  EXPECT_THROW(dsa::cuda::indexer_logits(ctx, p), dsa::ShapeError);
  p.num_heads = 64;
  p.tokens_per_block = 32;
  EXPECT_THROW(dsa::cuda::indexer_logits(ctx, p), dsa::ShapeError);
  p.tokens_per_block = 64;
  p.k_cache = dummy_b + 1;
  EXPECT_THROW(dsa::cuda::indexer_logits(ctx, p), dsa::ShapeError);
}

// The layer replays decode steps as a CUDA graph: both ops must be legal
// inside stream capture (also as the very first launch in a process, which
// is why the capture comes first) and the replay must equal a direct launch.
TEST(GpuIndexerLogits, CudaGraphCaptureThenTopkMatchesDirectLaunch) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Problem pb = make_problem({{3000, 1}, {100, 1}, {2047, 2}, {5000, 1}}, 0, 17);
  constexpr int kTopk = 2048;
  DeviceProblem d(pb);
  ASSERT_NO_FATAL_FAILURE(d.upload(pb));
  DevBuf<int32_t> idx(static_cast<size_t>(pb.T * kTopk));
  ASSERT_TRUE(idx.p);
  DevBuf<float>& logits = d.logits;
  cudaStream_t st = nullptr;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const dsa::cuda::IndexerLogitsParams p = d.params(pb, 0);
  const dsa::cuda::DeviceContext ctx = dsa::cuda::device_context(st);
  dsa::cuda::TopkParams tp;
  tp.logits = logits.p;
  tp.visible_end = d.vend.p;
  tp.out = idx.p;
  tp.T = pb.T;
  tp.logits_stride = pb.stride;
  tp.k = kTopk;

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  EXPECT_NO_THROW({
    dsa::cuda::indexer_logits(ctx, p);
    dsa::cuda::topk(ctx, tp);
  });
  CK(cudaStreamEndCapture(st, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));

  std::vector<float> l_graph(logits.n), l_direct(logits.n);
  std::vector<int32_t> i_graph(idx.n), i_direct(idx.n);
  CK(cudaMemset(logits.p, 0xff, logits.bytes()));
  CK(cudaMemset(idx.p, 0x5a, idx.bytes()));
  CK(cudaGraphLaunch(exec, st));
  CK(cudaStreamSynchronize(st));
  CK(cudaMemcpy(l_graph.data(), logits.p, logits.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(i_graph.data(), idx.p, idx.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemset(logits.p, 0xff, logits.bytes()));
  CK(cudaMemset(idx.p, 0x5a, idx.bytes()));
  dsa::cuda::indexer_logits(ctx, p);
  dsa::cuda::topk(ctx, tp);
  CK(cudaStreamSynchronize(st));
  CK(cudaMemcpy(l_direct.data(), logits.p, logits.bytes(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(i_direct.data(), idx.p, idx.bytes(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(l_graph.data(), l_direct.data(), logits.bytes()), 0);
  EXPECT_EQ(i_graph, i_direct);
  // And the chained top-k is the reference's top-k of these logits.
  std::vector<int32_t> ref(idx.n);
  dsa::ref::topk(l_direct.data(), pb.T, pb.stride, pb.visible_end.data(), kTopk, ref.data());
  EXPECT_EQ(i_direct, ref);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(st);
}

TEST(GpuIndexerLogits, EmptyBatchIsANoOp) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  DevBuf<float> logits(4);
  ASSERT_TRUE(logits.p);
  CK(cudaMemset(logits.p, 0x7f, logits.bytes()));
  alignas(16) uint8_t b[16] = {};
  int i = 0;
  float f = 0;
  dsa::cuda::IndexerLogitsParams p;
  p.q_fp8 = p.k_cache = b;
  p.weights = &f;
  p.block_table = p.token_request = p.visible_end = &i;
  p.logits = logits.p;
  p.T = 0;
  p.logits_stride = 4;
  p.max_blocks_per_request = 1;
  EXPECT_NO_THROW(dsa::cuda::indexer_logits(dsa::cuda::device_context(), p));
  CK(cudaDeviceSynchronize());
  std::vector<uint32_t> host(4);
  CK(cudaMemcpy(host.data(), logits.p, 16, cudaMemcpyDeviceToHost));
  for (uint32_t v : host) EXPECT_EQ(v, 0x7f7f7f7fu) << "T = 0 wrote to logits";
}

// The microbenchmark runs and counts work as spec section 8 does.
TEST(GpuIndexerLogits, BenchCountsWorkPerSpec) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const dsa::cuda::KernelTiming t = dsa::cuda::indexer_logits_bench(2, 100, 3, 1, 3, 5);
  const double visible = 2.0 * (101 + 102 + 103);
  EXPECT_EQ(t.flops, 2.0 * 64 * 128 * visible);
  EXPECT_EQ(t.bytes, 2.0 * 2 * 8448 + 6.0 * (64 * 128 + 64 * 4) + 6.0 * 103 * 4);
  EXPECT_GT(t.median_ms, 0.0);
  EXPECT_LE(t.min_ms, t.median_ms);
  EXPECT_LE(t.median_ms, t.max_ms);
}

// Timing for docs/performance.md; run with --gtest_also_run_disabled_tests.
TEST(GpuIndexerLogits, DISABLED_Bench) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    const char* name;
    int64_t requests, cached, num_new;
  };
  for (const Shape& s : {Shape{"prefill T=4096 ctx 4096", 1, 0, 4096}, Shape{"T=4096 at end of 65536", 1, 61440, 4096},
                         Shape{"decode 64 x 1 x 32768", 64, 32767, 1}, Shape{"decode 64 x next_n 2 x 32768", 64, 32766, 2}}) {
    for (auto k : {dsa::cuda::IndexerKernel::Sm90Wgmma, dsa::cuda::IndexerKernel::Sm89Mma}) {
      const dsa::cuda::KernelTiming t = dsa::cuda::indexer_logits_bench(s.requests, s.cached, s.num_new, 3, 20, 1, k);
      std::printf("BENCH indexer_logits %-8s %-30s median %.4f ms (min %.4f max %.4f)  %.1f TFLOP/s  %.0f GB/s\n",
                  k == dsa::cuda::IndexerKernel::Sm90Wgmma ? "wgmma" : "mma.sync", s.name, t.median_ms, t.min_ms,
                  t.max_ms, t.flops / t.median_ms * 1e-9, t.bytes / t.median_ms * 1e-6);
    }
  }
}

}  // namespace
