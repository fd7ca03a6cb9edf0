// Development bench for the Hopper sparse MLA kernel: times kernel variants
// side by side on issue 6's sweep inputs, including diagnostic variants that
// isolate the gather (copies only) and the math (no copies), and checks each
// real variant's output against the library kernel bit for bit or within a
// tolerance. Not part of the library build; build and run on the GPU machine:
//   dev/sparse_mla/run.sh [DEPS_DIR] [iters] [rounds]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "bench/cuda/sparse_mla_sweep_inputs.cuh"
#include "cuda/sparse_mla/sm90/sm90_bf16_sparse_mla.cuh"
#include "launch.cuh"
// The library is not linked: its reordering pre-pass launcher comes in as source.
#include "cuda/sparse_mla/sm90/sort_indices.cu"
// A candidate kernel under test can be added with -DDSA_DEV_CANDIDATE=header.cuh;
// the header defines dev_candidate_variants(std::vector<Variant>&).
#ifdef DSA_DEV_CANDIDATE
#include DSA_DEV_CANDIDATE
#endif

using namespace dsa::cuda;

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s: %s at %s:%d\n", #x, cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

namespace {
using namespace sparse_mla_sweep;

struct Variant {
  const char* name;
  bool check;  // compare the output with the library kernel's
  std::function<void(const SparseMlaParams&)> run;
};

// kDiag: 0 the library's kernel, 1 gather only, 2 math only; kFlags >= 0
// forces the kernel build (bit 0 kReleaseFirst, bit 1 kEarlyMaxB);
// kSkipMaskChoice: -1 the library's kSkipMask, 0 / 1 off / on.
template <int kDiag, int kFlags = -1, int kSkipMaskChoice = -1>
void launch_diag(const SparseMlaParams& p) {
  dev_mla::launch_like_library<dev_mla::LibBuild<kDiag, kSkipMaskChoice>, kFlags>(p);
}
// The library's pre-pass; buckets > 0: about that many buckets over the
// cache instead of the library's 128-255.
void launch_sort(const SparseMlaParams& p, int32_t* sorted, int buckets = 0) {
  using namespace sm90_sparse_mla;
  int shift = -1;
  if (buckets > 0) {
    shift = sort_bucket_shift(p.num_slots);
    while (((p.num_slots - 1) >> shift) + 1 > buckets) ++shift;
  }
  launch_sort_indices(resolve_strides(p), sorted, dev_mla::context(), shift);
}
}  // namespace

// SMID_PROBE=1: which SM each CTA of a persistent-size grid lands on (same
// block size and shared memory as the kernel), to relate the sweep's
// per-process modes to where the two CTAs of a token (H = 128) run.
__global__ void smid_probe(int* out) {
  if (threadIdx.x == 0) {
    int s;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
    out[blockIdx.x] = s;
  }
}

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 10;
  const int rounds = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
  std::vector<Variant> variants = {{"library", false, launch_diag<0>}};
  // NO_DIAG=1 leaves out the diagnostic builds (shorter A/B runs).
  if (!std::getenv("NO_DIAG")) {
    variants.push_back({"gather-only", false, launch_diag<1>});
    variants.push_back({"math-only", false, launch_diag<2>});
  }
  // SKIPMASK=1: the library kernel with kSkipMask forced off and on.
  if (std::getenv("SKIPMASK")) {
    variants.push_back({"mask always applied", true, launch_diag<0, -1, 0>});
    variants.push_back({"mask skipped when valid", true, launch_diag<0, -1, 1>});
  }
#ifdef DSA_DEV_CANDIDATE
  dev_candidate_variants(variants);
#endif
  // SORTED=1: the library kernel (which reorders the indices by slot
  // bucket when the cache is larger than L2) beside: the same without the
  // reordering; the reordering pre-pass alone; the pre-pass with 4, 16 or 64
  // buckets over the cache, then the kernel, at every s_kv; the kernel with
  // its builds forced on indices reordered on the host (the pre-pass not
  // timed). Also checks the pre-pass against a host stable sort.
  int32_t* idx_alt[2] = {nullptr, nullptr};
  // The split-only workspace size (no room for the reordered indices).
  static size_t split_only = 0;
  if (std::getenv("SORTED")) {
    for (int a = 0; a < 2; ++a) CK(cudaMalloc(&idx_alt[a], int64_t(kT) * kTopk * 4));
    int32_t* d = idx_alt[0];
    int32_t* d2 = idx_alt[1];
    variants.push_back({"library, not reordered", true, [](const SparseMlaParams& p) {
                          SparseMlaParams q = p;
                          q.workspace_bytes = split_only;
                          launch_diag<0>(q);
                        }});
    variants.push_back({"reorder pre-pass", false, [d2](const SparseMlaParams& p) { launch_sort(p, d2); }});
    // The library on d2, reordered with nb buckets (nb > 0, pre-pass timed), or
    // on d, reordered on the host, with kernel build kFlags (pre-pass not timed).
    auto on_copy = [](const char* name, int32_t* idx, int nb, auto launch) {
      return Variant{name, true, [idx, nb, launch](const SparseMlaParams& p) {
                       if (nb > 0) launch_sort(p, idx, nb);
                       SparseMlaParams q = p;
                       q.indices = idx;
                       q.valid_len = nullptr;
                       q.workspace_bytes = split_only;
                       launch(q);
                     }};
    };
    variants.push_back(on_copy("reorder 4 buckets + library", d2, 4, launch_diag<0>));
    variants.push_back(on_copy("reorder 16 buckets + library", d2, 16, launch_diag<0>));
    variants.push_back(on_copy("reorder 64 buckets + library", d2, 64, launch_diag<0>));
    variants.push_back(on_copy("presorted, plain", d, 0, launch_diag<0, 0>));
    variants.push_back(on_copy("presorted, early m_B", d, 0, launch_diag<0, 2>));
  }
  const int64_t max_skv = 131072;
  // PAD_MB=n allocates n MB first, moving every buffer after it (for the
  // sweep's process-to-process modes: see docs/performance.md).
  if (const char* pad = std::getenv("PAD_MB")) {
    void* p = nullptr;
    const long mb = std::atol(pad);
    if (mb > 0) CK(cudaMalloc(&p, static_cast<size_t>(mb) << 20));
  }
  __nv_bfloat16 *kv, *q, *out, *out_ref;
  float *lse, *lse_ref, *rmax;
  int32_t* indices;
  CK(cudaMalloc(&kv, max_skv * kDqk * 2));
  CK(cudaMalloc(&q, int64_t(kT) * 128 * kDqk * 2));
  CK(cudaMalloc(&out, int64_t(kT) * 128 * kDv * 2));
  CK(cudaMalloc(&out_ref, int64_t(kT) * 128 * kDv * 2));
  CK(cudaMalloc(&lse, int64_t(kT) * 128 * 4));
  CK(cudaMalloc(&lse_ref, int64_t(kT) * 128 * 4));
  CK(cudaMalloc(&rmax, int64_t(kT) * 128 * 4));
  CK(cudaMalloc(&indices, int64_t(kT) * kTopk * 4));
  // The library kernel splits its last round with a workspace (NO_SPLIT=1: without).
  float* workspace = nullptr;
  const int sms = dev_mla::context().num_sms();
  const int64_t l2_bytes = static_cast<int64_t>(dev_mla::context().l2_bytes());
  split_only = std::max(sm90_sparse_mla::split_workspace_bytes(int64_t(kT) * 2, sms), sm90_sparse_mla::split_workspace_bytes(kT, sms));
  // NO_SPLIT=1: no workspace (no split, no reordering).
  const size_t ws_bytes =
      std::getenv("NO_SPLIT") ? 0
                              : std::max(sm90_sparse_mla::workspace_bytes(kT, 2, kTopk, max_skv, sms, l2_bytes),
                                         sm90_sparse_mla::workspace_bytes(kT, 1, kTopk, max_skv, sms, l2_bytes));
  if (ws_bytes) CK(cudaMalloc(&workspace, ws_bytes));
  fill_random_bf16<<<1024, 256>>>(kv, max_skv * kDqk, 8);
  fill_random_bf16<<<1024, 256>>>(q, int64_t(kT) * 128 * kDqk, 9);
  CK(cudaGetLastError());
  // PLACEMENT=1: the library kernel on copies of the cache, Q and out in
  // other allocations (each behind a 256 MB spacer), same contents: does
  // where a buffer lies in memory set the speed within one process?
  if (std::getenv("PLACEMENT")) {
    const size_t kv_bytes = max_skv * kDqk * 2, q_bytes = int64_t(kT) * 128 * kDqk * 2, o_bytes = int64_t(kT) * 128 * kDv * 2;
    static __nv_bfloat16* kv_copy[3];
    static __nv_bfloat16 *q_copy, *o_copy;
    void* spacer;  // never freed: each copy stays behind its spacer for the whole run
    for (int c = 0; c < 3; ++c) {
      CK(cudaMalloc(&spacer, 256 << 20));
      CK(cudaMalloc(&kv_copy[c], kv_bytes));
      CK(cudaMemcpy(kv_copy[c], kv, kv_bytes, cudaMemcpyDeviceToDevice));
    }
    CK(cudaMalloc(&spacer, 256 << 20));
    CK(cudaMalloc(&q_copy, q_bytes));
    CK(cudaMemcpy(q_copy, q, q_bytes, cudaMemcpyDeviceToDevice));
    CK(cudaMalloc(&spacer, 256 << 20));
    CK(cudaMalloc(&o_copy, o_bytes));
    static const char* names[3] = {"cache copy 1", "cache copy 2", "cache copy 3"};
    for (int c = 0; c < 3; ++c)
      variants.push_back({names[c], true, [c](const SparseMlaParams& p) {
                            SparseMlaParams x = p;
                            x.kv = kv_copy[c];
                            launch_diag<0>(x);
                          }});
    variants.push_back({"Q copy", true, [](const SparseMlaParams& p) {
                          SparseMlaParams x = p;
                          x.q = q_copy;
                          launch_diag<0>(x);
                        }});
    variants.push_back({"out copy", false, [](const SparseMlaParams& p) {
                          SparseMlaParams x = p;
                          x.out = o_copy;
                          launch_diag<0>(x);
                        }});
    variants.push_back({"library (2nd copy)", true, launch_diag<0>});
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const char* env = std::getenv("SKV");
  std::vector<int64_t> skvs(std::begin(kSkv), std::end(kSkv));
  if (env) {
    skvs.clear();
    for (const char* s = env; *s;) {
      skvs.push_back(std::strtoll(s, const_cast<char**>(&s), 10));
      if (*s == ',') ++s;
    }
  }
  if (std::getenv("SMID_PROBE")) {
    int* d = nullptr;
    CK(cudaMalloc(&d, sms * sizeof(int)));
    CK(cudaFuncSetAttribute(smid_probe, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            static_cast<int>(sm90_sparse_mla::SmemPlan::bytes)));
    std::vector<int> h(sms);
    for (int rep = 0; rep < 2; ++rep) {
      smid_probe<<<sms, 384, sm90_sparse_mla::SmemPlan::bytes>>>(d);
      CK(cudaMemcpy(h.data(), d, sms * sizeof(int), cudaMemcpyDeviceToHost));
      int same_tpc = 0, maxid = 0;
      for (int b = 0; b + 1 < sms; b += 2) same_tpc += (h[b] >> 1) == (h[b + 1] >> 1);
      for (int x : h) maxid = std::max(maxid, x);
      std::printf("smid probe %d: block pairs (2k, 2k+1) on one TPC %d of %d, max smid %d, first blocks ->", rep, same_tpc,
                  sms / 2, maxid);
      for (int b = 0; b < 8; ++b) std::printf(" %d", h[b]);
      std::printf("\n");
    }
  }
  std::vector<int> hs = {128, 64};
  std::printf("%-28s", "variant \\ H,s_kv (ms)");
  for (int H : hs)
    for (auto s : skvs) std::printf(" %4d,%-7ld", H, static_cast<long>(s));
  std::printf("\n");
  std::vector<std::vector<double>> res(variants.size());
  std::vector<std::string> notes;
  for (int H : hs)
    for (int64_t s_kv : skvs) {
      int64_t valid = 0;
      auto idx = make_indices(s_kv, 1, &valid);
      CK(cudaMemcpy(indices, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
      if (idx_alt[0]) {
        std::vector<int32_t> alt = idx;
        const int shift = sm90_sparse_mla::sort_bucket_shift(s_kv);
        auto key = [shift](int32_t v) -> uint32_t { return v < 0 ? 256u : static_cast<uint32_t>(v) >> shift; };
        for (int t = 0; t < kT; ++t) {
          int32_t* row = alt.data() + size_t(t) * kTopk;
          std::stable_sort(row, row + kTopk, [&](int32_t x, int32_t y) { return key(x) < key(y); });
        }
        CK(cudaMemcpy(idx_alt[0], alt.data(), alt.size() * 4, cudaMemcpyHostToDevice));
        SparseMlaParams sp;
        sp.indices = indices;
        sp.T = kT;
        sp.topk = kTopk;
        sp.num_slots = s_kv;
        CK(cudaMemset(idx_alt[1], 0x7f, alt.size() * 4));
        launch_sort(sp, idx_alt[1]);
        std::vector<int32_t> dev_sorted(alt.size());
        CK(cudaMemcpy(dev_sorted.data(), idx_alt[1], alt.size() * 4, cudaMemcpyDeviceToHost));
        size_t diff = 0;
        for (size_t i = 0; i < alt.size(); ++i) diff += dev_sorted[i] != alt[i];
        char buf[120];
        std::snprintf(buf, sizeof buf, "sort kernel vs host stable sort, s_kv %ld: %zu entries differ", static_cast<long>(s_kv), diff);
        notes.push_back(buf);
      }
      SparseMlaParams p;
      p.q = q;
      p.kv = kv;
      p.indices = indices;
      p.lse = lse_ref;
      p.out = out_ref;
      p.row_max = rmax;
      p.T = kT;
      // TT=n: only the first n tokens (fewer rounds of the persistent grid).
      if (const char* tt = std::getenv("TT")) p.T = std::min<int64_t>(kT, std::atol(tt));
      p.topk = kTopk;
      p.softmax_scale = 0.1352338f;
      p.num_heads = H;
      p.num_slots = s_kv;
      p.workspace = workspace;
      p.workspace_bytes = ws_bytes;
      launch_diag<0>(p);
      CK(cudaDeviceSynchronize());
      const size_t n_out = size_t(p.T) * H * kDv;
      std::vector<__nv_bfloat16> ref(n_out), got(n_out);
      CK(cudaMemcpy(ref.data(), out_ref, n_out * 2, cudaMemcpyDeviceToHost));
      p.out = out;
      p.lse = lse;
      // Rounds interleave the variants so that slow drifts of the card (clocks,
      // DRAM) hit all of them alike, and each round starts one variant later
      // (the first variant of a round measured ~5% slower than the same code
      // later in the round); each variant's figure is the median over rounds
      // of its per-round medians.
      std::vector<std::vector<double>> per_round(variants.size());
      for (int round = 0; round < rounds; ++round)
        for (size_t i = 0; i < variants.size(); ++i) {
          const size_t v = (i + round) % variants.size();
          for (int warm = 0; warm < 3; ++warm) variants[v].run(p);
          CK(cudaDeviceSynchronize());
          std::vector<float> ms;
          static unsigned long long* probe = nullptr;
          const bool probe_clock = std::getenv("CLOCK_PROBE") != nullptr;
          if (probe_clock && !probe) CK(cudaMalloc(&probe, 6 * 8));
          // CLOCK_PROBE=1: the SM clock over the round's timed launches.
          if (probe_clock) sm_clock_probe<<<1, 1>>>(probe);
          for (int it = 0; it < iters; ++it) {
            CK(cudaEventRecord(e0));
            variants[v].run(p);
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float m = 0;
            CK(cudaEventElapsedTime(&m, e0, e1));
            ms.push_back(m);
          }
          if (probe_clock) {
            sm_clock_probe<<<1, 1>>>(probe + 3);
            unsigned long long h[6];
            CK(cudaMemcpy(h, probe, sizeof h, cudaMemcpyDeviceToHost));
            if (const double mhz = probe_mhz(h); mhz > 0)
              std::printf("clock %s H=%d s_kv=%ld round %d: %.0f MHz over %.2f ms\n", variants[v].name, H,
                          static_cast<long>(s_kv), round, mhz, double(h[3] - h[0]) * 1e-6);
          }
          std::sort(ms.begin(), ms.end());
          per_round[v].push_back(ms[ms.size() / 2]);
        }
      for (size_t v = 0; v < variants.size(); ++v) {
        std::sort(per_round[v].begin(), per_round[v].end());
        res[v].push_back(per_round[v][per_round[v].size() / 2]);
        if (variants[v].check) {
          CK(cudaMemset(out, 0xff, n_out * 2));
          variants[v].run(p);
          CK(cudaDeviceSynchronize());
          CK(cudaMemcpy(got.data(), out, n_out * 2, cudaMemcpyDeviceToHost));
          double worst = 0;
          size_t bad = 0;
          for (size_t i = 0; i < n_out; ++i) {
            const float a = __bfloat162float(got[i]), b = __bfloat162float(ref[i]);
            const double d = std::fabs(double(a) - b);
            if (!(d <= 2e-2)) ++bad;
            if (d > worst || std::isnan(d)) worst = std::isnan(d) ? INFINITY : d;
          }
          char buf[200];
          std::snprintf(buf, sizeof buf, "%s H=%d s_kv=%ld: max |diff| vs library %.3g, %zu elements over 2e-2", variants[v].name,
                        H, static_cast<long>(s_kv), worst, bad);
          notes.push_back(buf);
        }
      }
    }
  for (size_t v = 0; v < variants.size(); ++v) {
    std::printf("%-28s", variants[v].name);
    for (double m : res[v]) std::printf(" %-12.3f", m);
    std::printf("\n");
  }
  std::printf("%-28s", "FlashMLA (issue 6)");
  for (int hi = 0; hi < 2; ++hi)
    for (auto s : skvs) {
      const int64_t* it = std::find(std::begin(kSkv), std::end(kSkv), s);
      std::printf(" %-12.2f", it == std::end(kSkv) ? NAN : kFlashMlaMs[hi][it - std::begin(kSkv)]);
    }
  std::printf("\n");
  for (auto& n : notes) std::printf("%s\n", n.c_str());
  return 0;
}
