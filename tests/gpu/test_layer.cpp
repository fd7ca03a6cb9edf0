// The whole CUDA layer against the CPU reference: every stage on the GPU's
// own inputs and the whole layer against ref::layer_forward, at prefill,
// decode, speculative (next_n 2) and ragged mixed batches, H 64 and 128,
// contexts shorter and longer than topk. Unused cache slots and all GPU
// buffers are NaN-poisoned before each run; each step runs twice and must
// give the same bits (check_step does all of this and reports per stage).
#include <gtest/gtest.h>

#include <ostream>

#include <cstring>

#include "cuda/layer/layer_kernels.h"
#include "dsa/cuda.h"
#include "dsa/cuda_layer.h"
#include "dsa/error.h"
#include "dsa/layer_check.h"
#include "dsa/reference.h"
#include "small_gpu_config.h"

namespace {

using dsa::StepRequest;

#define SKIP_WITHOUT_GPU() \
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

using dsa::test::small_gpu_config;

struct Case {
  const char* name;
  int64_t heads, topk;
  std::vector<StepRequest> requests;
  bool o_proj = false;
  bool fused_x = true;
  dsa::LatentCacheDType latent = dsa::LatentCacheDType::BF16;
};
// Lets test listings (ctest) show the case's name instead of its bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::vector<StepRequest> reqs(std::initializer_list<std::pair<int64_t, int64_t>> cn) {
  std::vector<StepRequest> v;
  int64_t id = 0;
  for (auto [c, n] : cn) v.push_back(StepRequest{id++, c, n});
  return v;
}

class LayerStep : public ::testing::TestWithParam<Case> {};

TEST_P(LayerStep, EveryStageAndTheLayerMatchTheReference) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  dsa::LayerConfig cfg = small_gpu_config(c.heads, c.topk);
  cfg.o_proj = c.o_proj;
  cfg.kv_cache_dtype = c.latent;
  dsa::check::CheckOptions o;
  o.seed = 11;
  o.sample = 100000;  // every token
  o.fused_x_projection = c.fused_x;
  const dsa::check::StepCheck r = dsa::check::check_step(cfg, c.requests, o);
  EXPECT_EQ(r.table.failures(), 0) << r.header << "\n" << r.table.format();
  EXPECT_GE(r.table.rows().size(), 20u) << r.table.format();  // every stage reported
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, LayerStep,
    ::testing::Values(Case{"prefill_b1_h128_context_above_topk", 128, 64, reqs({{0, 150}})},
                      Case{"prefill_b1_h64_context_below_topk", 64, 256, reqs({{0, 100}})},
                      Case{"chunked_prefill_h64", 64, 128, reqs({{96, 64}})},
                      Case{"ragged3_prefill_decode_next2_h64", 64, 128, reqs({{0, 70}, {300, 1}, {150, 2}})},
                      Case{"decode_b3_h128", 128, 128, reqs({{500, 1}, {64, 1}, {1000, 1}})},
                      Case{"ragged3_h128_unfused_x_projections", 128, 128, reqs({{0, 33}, {129, 1}, {64, 2}}), false, false},
                      Case{"next_n2_b2_h128_o_proj", 128, 64, reqs({{200, 2}, {31, 2}}), true},
                      Case{"decode_fp8_latent_cache_h64", 64, 128, reqs({{300, 1}, {64, 2}, {1000, 1}}), false, true,
                           dsa::LatentCacheDType::FP8}),
    [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// DeepSeek-V3.2's own widths (hidden 7168, q_lora 1536, H 128, topk 2048) on
// a small mixed step whose decode request sees more keys than topk.
TEST(LayerGpu, FullWidthsMixedStep) {
  SKIP_WITHOUT_GPU();
  dsa::LayerConfig cfg;
  dsa::check::CheckOptions o;
  o.seed = 5;
  o.sample = 100000;
  const dsa::check::StepCheck r = dsa::check::check_step(cfg, reqs({{0, 24}, {3000, 1}, {2100, 2}}), o);
  EXPECT_EQ(r.table.failures(), 0) << r.header << "\n" << r.table.format();
}

// The fp8 latent form (656 bytes: e4m3 c_kv, ue8m0 scales, bf16 rope) and the
// bf16 form, written by the GPU at scattered slots, byte for byte what the
// reference writes; untouched slots keep their poison.
TEST(LayerGpu, CacheAppendBothFormsMatchReference) {
  SKIP_WITHOUT_GPU();
  for (dsa::LatentCacheDType dt : {dsa::LatentCacheDType::BF16, dsa::LatentCacheDType::FP8}) {
    dsa::LayerConfig cfg;
    cfg.kv_cache_dtype = dt;
    const int64_t T = 37, slots = 256, dkv = 512, rope = 64, row = cfg.latent_cache_bytes_per_token();
    std::vector<float> ckv(T * dkv), kpe(T * rope);
    std::vector<uint16_t> ckv_b(T * dkv), kpe_b(T * rope);
    for (int64_t i = 0; i < T * dkv; ++i) {
      ckv_b[i] = dsa::float_to_bf16(std::sin(0.37f * i + 1.f) * (1 + (i % 97) * 0.05f));
      ckv[i] = dsa::bf16_to_float(ckv_b[i]);
    }
    for (int64_t i = 0; i < T * rope; ++i) {
      kpe_b[i] = dsa::float_to_bf16(std::cos(0.11f * i) + 0.01f);
      kpe[i] = dsa::bf16_to_float(kpe_b[i]);
    }
    std::vector<int64_t> slot(T);
    for (int64_t t = 0; t < T; ++t) slot[t] = (t * 67 + 5) % slots;
    void *d_ckv, *d_kpe, *d_slot, *d_pool;
    ASSERT_EQ(cudaMalloc(&d_ckv, ckv_b.size() * 2), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_kpe, kpe_b.size() * 2), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_slot, T * 8), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_pool, slots * row), cudaSuccess);
    cudaMemcpy(d_ckv, ckv_b.data(), ckv_b.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(d_kpe, kpe_b.data(), kpe_b.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(d_slot, slot.data(), T * 8, cudaMemcpyHostToDevice);
    std::vector<uint8_t> expect(slots * row, 0xff);
    for (int64_t t = 0; t < T; ++t) dsa::ref::write_latent_row(cfg, expect.data(), slot[t], &ckv[t * dkv], &kpe[t * rope]);
    std::vector<uint8_t> first;
    for (int run = 0; run < 2; ++run) {
      cudaMemset(d_pool, 0xff, slots * row);
      dsa::cuda::CacheAppendParams p;
      p.c_kv = static_cast<const __nv_bfloat16*>(d_ckv), p.k_pe = static_cast<const __nv_bfloat16*>(d_kpe);
      p.slot_mapping = static_cast<const int64_t*>(d_slot), p.latent_pool = static_cast<uint8_t*>(d_pool);
      p.T = T, p.num_slots = slots, p.fp8 = dt == dsa::LatentCacheDType::FP8;
      dsa::cuda::cache_append(dsa::cuda::device_context(), p);
      std::vector<uint8_t> got(slots * row);
      ASSERT_EQ(cudaMemcpy(got.data(), d_pool, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      int64_t bad = 0;
      for (size_t i = 0; i < got.size(); ++i) bad += got[i] != expect[i];
      EXPECT_EQ(bad, 0) << dsa::to_string(dt) << " run " << run;
      if (run == 0) first = got;
      else EXPECT_EQ(std::memcmp(first.data(), got.data(), got.size()), 0);
    }
    cudaFree(d_ckv), cudaFree(d_kpe), cudaFree(d_slot), cudaFree(d_pool);
  }
}

TEST(LayerGpu, RejectsWhatItCannotRun) {
  SKIP_WITHOUT_GPU();
  dsa::LayerConfig cfg = small_gpu_config(64, 64);
  const dsa::LayerWeights w = dsa::generate_weights(cfg, 3);
  dsa::cuda::CudaLayer layer(cfg, w);
  dsa::CacheConfig cc = dsa::CacheConfig::for_layer(cfg);
  cc.with_tokens(256);
  cc.storage = dsa::Storage::Device;
  dsa::CacheManager cache(cc, dsa::cuda::device_allocator());
  const std::vector<StepRequest> rq = reqs({{10, 2}});
  dsa::reserve_step(cache, rq);
  const dsa::BatchMetadata md = dsa::build_batch_metadata(cache, rq);
  const std::vector<dsa::bf16_t> hidden = dsa::generate_hidden(cfg, 2, 4);
  EXPECT_THROW(layer.forward(std::vector<dsa::bf16_t>(5), md, dsa::cuda::device_view(cache, 0)), dsa::ShapeError);
  {
    // Metadata whose positions do not cover the step's tokens.
    dsa::BatchMetadata bad = md;
    bad.positions.pop_back();
    EXPECT_THROW(layer.forward(hidden, bad, dsa::cuda::device_view(cache, 0)), dsa::ShapeError);
  }
  EXPECT_THROW(dsa::parse_stage("attention"), dsa::ConfigError);
  {
    // The fp8 latent cache serves decode only; a prefill step over it is refused with the spec's message.
    dsa::LayerConfig f = cfg;
    f.kv_cache_dtype = dsa::LatentCacheDType::FP8;
    dsa::cuda::CudaLayer l8(f, w);
    dsa::CacheConfig c8 = dsa::CacheConfig::for_layer(f);
    c8.with_tokens(256);
    c8.storage = dsa::Storage::Device;
    dsa::CacheManager k8(c8, dsa::cuda::device_allocator());
    const std::vector<StepRequest> pre = reqs({{0, 8}});
    dsa::reserve_step(k8, pre);
    const dsa::BatchMetadata m8 = dsa::build_batch_metadata(k8, pre);
    EXPECT_THROW(l8.forward(dsa::generate_hidden(f, 8, 4), m8, dsa::cuda::device_view(k8, 0)), dsa::ConfigError);
  }
  {
    // Trace mode switched on after prepare(): the step has no buffers for the
    // indexer's fp32 values, and download_trace says so instead of copying
    // from null; the same layer then runs normally.
    dsa::CacheConfig ct = dsa::CacheConfig::for_layer(cfg);
    ct.with_tokens(256);
    ct.storage = dsa::Storage::Device;
    dsa::CacheManager kt(ct, dsa::cuda::device_allocator());
    const std::vector<StepRequest> one = reqs({{0, 2}});
    dsa::reserve_step(kt, one);
    const dsa::BatchMetadata mt = dsa::build_batch_metadata(kt, one);
    dsa::cuda::CudaLayer lt(cfg, w);
    lt.prepare(mt, dsa::cuda::device_view(kt, 0));
    lt.set_trace_mode(true);
    void* x = lt.hidden_buffer(2);
    const std::vector<dsa::bf16_t> h2 = dsa::generate_hidden(cfg, 2, 5);
    ASSERT_EQ(cudaMemcpy(x, h2.data(), h2.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    lt.enqueue(x, nullptr, false);
    dsa::LayerTrace tr;
    try {
      lt.download_trace(tr, dsa::TraceOptions{}, nullptr);
      ADD_FAILURE() << "download_trace after a late set_trace_mode did not throw";
    } catch (const dsa::Error& e) {
      EXPECT_NE(std::string(e.what()).find("set_trace_mode(true) before prepare()"), std::string::npos) << e.what();
    }
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    lt.set_trace_mode(false);
    EXPECT_NO_THROW(lt.forward(h2, mt, dsa::cuda::device_view(kt, 0)));
  }
  dsa::CacheConfig hc = dsa::CacheConfig::for_layer(cfg);
  hc.with_tokens(64);
  dsa::CacheManager host(hc);
  EXPECT_THROW(dsa::cuda::device_view(host, 0), dsa::CacheError);
}

}  // namespace

// The two branches of a step on two streams (the default) against one
// stream, and the overlapped step captured as a CUDA graph on a stream of
// the test's own: the same output and top-k bits every way.
TEST(LayerGpu, StreamOverlapSameBitsAndCapturesAsAGraph) {
  SKIP_WITHOUT_GPU();
  for (bool fused : {true, false}) {
    dsa::LayerConfig cfg = small_gpu_config(64, 128);
    const dsa::LayerWeights w = dsa::generate_weights(cfg, 9);
    dsa::cuda::CudaLayer layer(cfg, w);
    layer.set_fused_x_projection(fused);
    EXPECT_TRUE(layer.stream_overlap());
    const std::vector<StepRequest> rq = reqs({{300, 1}, {0, 40}, {150, 2}});
    dsa::CacheConfig cc = dsa::CacheConfig::for_step(cfg, rq);
    cc.storage = dsa::Storage::Device;
    dsa::CacheManager cache(cc, dsa::cuda::device_allocator());
    dsa::reserve_step(cache, rq);
    dsa::cuda::fill_synthetic(cache, 21);
    const dsa::BatchMetadata md = dsa::build_batch_metadata(cache, rq);
    const std::vector<dsa::bf16_t> hidden = dsa::generate_hidden(cfg, md.num_tokens, 6);
    layer.set_poison(true);
    layer.set_stream_overlap(false);
    const std::vector<dsa::bf16_t> serial = layer.forward(hidden, md, dsa::cuda::device_view(cache, 0));
    const std::vector<int32_t> serial_idx = layer.download_topk_global(nullptr);
    layer.set_stream_overlap(true);
    const std::vector<dsa::bf16_t> overlapped = layer.forward(hidden, md, dsa::cuda::device_view(cache, 0));
    EXPECT_EQ(serial, overlapped) << "fused x projection " << fused;
    EXPECT_EQ(serial_idx, layer.download_topk_global(nullptr));

    cudaStream_t st;
    ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    layer.prepare(md, dsa::cuda::device_view(cache, 0));
    void* x = layer.hidden_buffer(md.num_tokens);
    ASSERT_EQ(cudaMemcpy(x, hidden.data(), hidden.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    const std::vector<int64_t> shape = layer.output_shape();
    ASSERT_EQ(cudaMemset(const_cast<void*>(layer.output_device()), 0xff, shape[0] * shape[1] * 2), cudaSuccess);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    layer.enqueue(x, st, false);
    ASSERT_EQ(cudaStreamEndCapture(st, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, st), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(st), cudaSuccess);
    std::vector<dsa::bf16_t> replay(static_cast<size_t>(shape[0] * shape[1]));
    ASSERT_EQ(cudaMemcpy(replay.data(), layer.output_device(), replay.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(serial, replay) << "graph replay, fused x projection " << fused;
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(st);
  }
}
