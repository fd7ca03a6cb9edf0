// Issue 6's sparse MLA sweep: T = 4096 queries at the end of a context of
// s_kv tokens, topk 2048, each query at position p attending to min(2048, p+1)
// distinct random positions among 0..p; ours beside FlashMLA's sparse prefill
// numbers measured on an H100 80GB HBM3 (issue 6).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda/check.cuh"
#include "cuda/sm90/sparse_mla/sweep_inputs.cuh"
#include "cuda/sparse_mla.h"
#include "dsa/bench.h"

namespace dsa::cuda {
namespace {

using namespace sparse_mla_sweep;

template <typename T>
struct Dev {
  T* p = nullptr;
  explicit Dev(size_t n) { DSA_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

}  // namespace

SparseMlaSweep sweep_sparse_mla(const BenchOptions& opt) {
  int dev = 0;
  DSA_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  DSA_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  const int64_t max_skv = kSkv[4];
  Dev<__nv_bfloat16> kv(static_cast<size_t>(max_skv) * kDqk);
  Dev<__nv_bfloat16> q(static_cast<size_t>(kT) * 128 * kDqk);
  Dev<__nv_bfloat16> out(static_cast<size_t>(kT) * 128 * kDv);
  Dev<float> lse(static_cast<size_t>(kT) * 128), row_max(static_cast<size_t>(kT) * 128);
  Dev<int32_t> indices(static_cast<size_t>(kT) * kTopk);
  const size_t ws_bytes =
      std::max(sparse_mla_workspace_bytes(kT, 128, kTopk, max_skv), sparse_mla_workspace_bytes(kT, 64, kTopk, max_skv));
  Dev<float> workspace(std::max<size_t>(ws_bytes / sizeof(float), 1));
  Dev<unsigned long long> probe(6);
  fill_random_bf16<<<1024, 256>>>(kv.p, max_skv * kDqk, opt.seed * 7 + 1);
  DSA_CHECK_LAUNCH("fill_random_bf16");
  fill_random_bf16<<<1024, 256>>>(q.p, static_cast<int64_t>(kT) * 128 * kDqk, opt.seed * 7 + 2);
  DSA_CHECK_LAUNCH("fill_random_bf16");
  cudaEvent_t e0, e1;
  DSA_CUDA_CHECK(cudaEventCreate(&e0));
  DSA_CUDA_CHECK(cudaEventCreate(&e1));

  SparseMlaParams p;
  p.q = q.p;
  p.kv = kv.p;
  p.indices = indices.p;
  p.out = out.p;
  p.lse = lse.p;
  p.row_max = row_max.p;
  p.workspace = workspace.p;
  p.workspace_bytes = ws_bytes;
  p.T = kT;
  p.topk = kTopk;
  p.softmax_scale = 0.1352338f;
  SparseMlaSweep sweep;
  sweep.device = prop.name;
  sweep.kernel = "simple";
  sweep.tokens = kT;
  sweep.topk = kTopk;
  sweep.d_qk = kDqk;
  sweep.d_v = kDv;
  sweep.warmup = opt.warmup;
  sweep.iters = std::max(1, opt.iters);
  sweep.peak_tflops = kPeakTflops;
  for (int hi = 0; hi < 2; ++hi) {
    const int H = hi == 0 ? 128 : 64;
    for (int si = 0; si < 5; ++si) {
      const int64_t s_kv = kSkv[si];
      int64_t valid = 0;
      const std::vector<int32_t> idx = make_indices(s_kv, opt.seed, &valid);
      DSA_CUDA_CHECK(cudaMemcpy(indices.p, idx.data(), idx.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
      p.num_heads = H;
      p.stride_q_t = static_cast<int64_t>(H) * kDqk;
      p.num_slots = s_kv;
      sweep.kernel = sparse_mla_sm90_can_implement(p) ? "sm90" : "simple";
      for (int i = 0; i < opt.warmup; ++i) sparse_mla(p);
      std::vector<float> ms;
      sm_clock_probe<<<1, 1, 0, p.stream>>>(probe.p);
      DSA_CHECK_LAUNCH("sm_clock_probe");
      for (int i = 0; i < std::max(1, opt.iters); ++i) {
        DSA_CUDA_CHECK(cudaEventRecord(e0, p.stream));
        sparse_mla(p);
        DSA_CUDA_CHECK(cudaEventRecord(e1, p.stream));
        DSA_CUDA_CHECK(cudaEventSynchronize(e1));
        float m = 0;
        DSA_CUDA_CHECK(cudaEventElapsedTime(&m, e0, e1));
        ms.push_back(m);
      }
      sm_clock_probe<<<1, 1, 0, p.stream>>>(probe.p + 3);
      DSA_CHECK_LAUNCH("sm_clock_probe");
      unsigned long long h[6];
      DSA_CUDA_CHECK(cudaMemcpy(h, probe.p, sizeof h, cudaMemcpyDeviceToHost));
      std::sort(ms.begin(), ms.end());
      SparseMlaSweepRow row;
      row.num_heads = H;
      row.s_kv = s_kv;
      row.median_ms = ms[ms.size() / 2];
      row.min_ms = ms.front();
      row.max_ms = ms.back();
      row.flops = 2.0 * H * (kDqk + kDv) * static_cast<double>(valid);
      row.sm_mhz = probe_mhz(h);
      row.flashmla_ms = kFlashMlaMs[hi][si];
      sweep.rows.push_back(row);
    }
  }
  DSA_CUDA_CHECK(cudaEventDestroy(e0));
  DSA_CUDA_CHECK(cudaEventDestroy(e1));
  return sweep;
}

}  // namespace dsa::cuda
