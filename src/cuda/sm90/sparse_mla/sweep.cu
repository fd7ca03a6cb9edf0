// Issue 6's sparse MLA sweep: T = 4096 queries at the end of a context of
// s_kv tokens, topk 2048, each query at position p attending to min(2048, p+1)
// distinct random positions among 0..p; ours beside FlashMLA's sparse prefill
// numbers measured on an H100 80GB HBM3 (issue 6).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda/check.cuh"
#include "cuda/sparse_mla.h"
#include "dsa/bench.h"

namespace dsa::cuda {
namespace {

constexpr int kT = 4096;
constexpr int kTopk = 2048;
constexpr int kDqk = 576;
constexpr int kDv = 512;
constexpr double kPeakTflops = 790.0;
constexpr int64_t kSkv[] = {4096, 8192, 32768, 65536, 131072};
// FlashMLA sparse prefill, ms, issue 6 (H100 80GB HBM3): rows H = 128, 64.
constexpr double kFlashMlaMs[2][5] = {{3.57, 3.88, 4.02, 4.36, 4.48}, {1.96, 1.83, 2.17, 2.50, 3.02}};

// Deterministic pseudo-random bf16 in [-1, 1) from the element index.
__global__ void fill_random_bf16(__nv_bfloat16* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t z = (static_cast<uint64_t>(i) + seed) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x[i] = __float2bfloat16(static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
}

// Query t sits at position p = s_kv - T + t and picks min(topk, p + 1)
// distinct positions in [0, p] (slot = position), random order, -1 padded.
std::vector<int32_t> make_indices(int64_t s_kv, uint64_t seed, int64_t* valid_total) {
  std::vector<int32_t> idx(static_cast<size_t>(kT) * kTopk, -1);
  std::vector<uint32_t> stamp(static_cast<size_t>(s_kv), 0);
  std::mt19937_64 rng(seed ^ static_cast<uint64_t>(s_kv));
  int64_t total = 0;
  for (int t = 0; t < kT; ++t) {
    const int64_t pos = s_kv - kT + t;
    const int k = static_cast<int>(std::min<int64_t>(kTopk, pos + 1));
    int32_t* row = &idx[static_cast<size_t>(t) * kTopk];
    if (k == pos + 1) {
      for (int j = 0; j < k; ++j) row[j] = j;
      std::shuffle(row, row + k, rng);
    } else {
      std::uniform_int_distribution<int64_t> d(0, pos);
      const uint32_t mark = static_cast<uint32_t>(t) + 1;
      for (int j = 0; j < k;) {
        const int64_t c = d(rng);
        if (stamp[c] == mark) continue;
        stamp[c] = mark;
        row[j++] = static_cast<int32_t>(c);
      }
    }
    total += k;
  }
  *valid_total = total;
  return idx;
}

template <typename T>
struct Dev {
  T* p = nullptr;
  explicit Dev(size_t n) { DSA_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

}  // namespace

std::string sweep_sparse_mla(const BenchOptions& opt) {
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
  p.T = kT;
  p.topk = kTopk;
  p.softmax_scale = 0.1352338f;
  const char* kernel = "simple";

  std::string table = fmt::format(
      "Sparse MLA prefill sweep on {}: T = {}, topk = {}, d_qk = {}, d_v = {}, median of {} runs after {} warm-up\n"
      "| H | s_kv | ours ms | ours TFLOP/s | % of {:.0f} | FlashMLA ms | FlashMLA TFLOP/s | FlashMLA / ours |\n"
      "|---|---|---|---|---|---|---|---|\n",
      prop.name, kT, kTopk, kDqk, kDv, opt.iters, opt.warmup, kPeakTflops);
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
      kernel = sparse_mla_sm90_can_implement(p) ? "sm90" : "simple";
      for (int i = 0; i < opt.warmup; ++i) sparse_mla(p);
      std::vector<float> ms;
      for (int i = 0; i < std::max(1, opt.iters); ++i) {
        DSA_CUDA_CHECK(cudaEventRecord(e0, p.stream));
        sparse_mla(p);
        DSA_CUDA_CHECK(cudaEventRecord(e1, p.stream));
        DSA_CUDA_CHECK(cudaEventSynchronize(e1));
        float m = 0;
        DSA_CUDA_CHECK(cudaEventElapsedTime(&m, e0, e1));
        ms.push_back(m);
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      const double flops = 2.0 * H * (kDqk + kDv) * static_cast<double>(valid);
      const double tflops = flops / (med * 1e-3) / 1e12;
      const double fm = kFlashMlaMs[hi][si];
      table += fmt::format("| {} | {} | {:.3f} | {:.0f} | {:.1f}% | {:.2f} | {:.0f} | {:.2f}x |\n", H, s_kv, med, tflops,
                           100.0 * tflops / kPeakTflops, fm, flops / (fm * 1e-3) / 1e12, fm / med);
    }
  }
  DSA_CUDA_CHECK(cudaEventDestroy(e0));
  DSA_CUDA_CHECK(cudaEventDestroy(e1));
  table += fmt::format("kernel: {}; FLOPs = 2 * H * 1088 * valid indices; FlashMLA from issue 6 (H100 80GB HBM3)\n", kernel);
  return table;
}

}  // namespace dsa::cuda
