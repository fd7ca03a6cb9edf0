#pragma once
// Dev-bench candidate: the library kernel with a timeline trace (generated
// by dev/make_trace.py into the header named by DSA_TRACE_KERNEL). The first
// launch of each (H, s_kv) prints, over the sampled CTAs, the mean timeline
// of a pair (every event's clock offset from WG0's "scores ready" of the
// same pair, inner pairs of an item), the pair period, the switch from one
// item to the next (offsets from the last pair's scores) and the first
// item's prologue (CTA start to its first scores). ptxas may schedule a
// clock64() read across a barrier: offsets between warpgroups are good to a
// few hundred cycles, within one warpgroup's sequence they are reliable.
//   python3 dev/sparse_mla/make_trace.py > /tmp/trace_kernel.cuh
//   DEV_FLAGS='-DDSA_DEV_CANDIDATE="trace.cuh" -DDSA_TRACE_KERNEL="/tmp/trace_kernel.cuh"' \
//     dev/sparse_mla/run.sh
#include <cstdio>
#include <set>
#include <utility>
#include <vector>

#include DSA_TRACE_KERNEL

namespace dev_trace {
namespace tk = dsa::cuda::sm90_sparse_mla_trace;

// The traced copy's kernel builds, for dev_mla::launch_like_library.
template <int kDiag>
struct TraceBuild {
  template <int kHeadGroups, bool kReleaseFirst, bool kEarlyMaxB>
  static void run(const dsa::cuda::SparseMlaParams& run, const dsa::cuda::sm90_sparse_mla::LaunchPlan& plan,
                  const dsa::cuda::DeviceContext& ctx) {
    tk::launch_fwd_and_combine<kHeadGroups, kDiag, kReleaseFirst, kEarlyMaxB, tk::kSkipMaskDefault>(run, plan, ctx);
  }
};

inline const char* const kNames[3][tk::kTraceEv] = {
    {"scores ready", "m_A published", "PV own issued", "m_B read", "P_A' stored", "PV own retired", "P_B read",
     "P_B V issued", "next QK L issued", "P_B V retired", "next QK R issued", "next validity read"},
    {"scores ready", "m_A read", "m_B published", "PV own issued", "P_B stored", "P_A' read", "P_A' V issued",
     "PV own retired", "P_A' V retired", "next QK R issued", "next QK L issued", ""},
    {"", "0L free", "1R free", "0R free", "1L free", "all issued", "", "", "", "", "", ""}};
inline const char* const kRole[3] = {"WG0", "WG1", "producer"};

inline void report(const char* label, int H, long s_kv) {
  std::vector<unsigned long long> b(tk::kTraceSamples * tk::kTraceStride);
  if (cudaMemcpyFromSymbol(b.data(), tk::g_trace, b.size() * 8) != cudaSuccess) return;
  double sum[3][tk::kTraceEv] = {}, period = 0, pro = 0, sw[7] = {};
  int cnt[3][tk::kTraceEv] = {}, nper = 0, ns = 0, nsw = 0;
  for (int s = 0; s < tk::kTraceSamples; ++s) {
    const unsigned long long* t = b.data() + s * tk::kTraceStride;
    if (t[0] == 0) continue;
    auto at = [&](int r, int j, int e) { return t[tk::kTracePairs + (r * tk::kTraceMaxPairs + j) * tk::kTraceEv + e]; };
    auto item = [&](int k, int e) { return t[tk::kTraceItems + k * tk::kTraceItemEv + e]; };
    auto d = [](unsigned long long a, unsigned long long z) { return static_cast<double>(static_cast<long long>(a - z)); };
    // Item k covers global pairs [item(k, 7), item(k + 1, 7)).
    for (int k = 0; k + 1 < tk::kTraceMaxItems; ++k) {
      if (item(k + 1, 0) == 0) break;
      const int g0 = static_cast<int>(item(k, 7)), g1 = static_cast<int>(item(k + 1, 7));
      for (int j = g0 + 1; j + 1 < g1 && j + 1 < tk::kTraceMaxPairs; ++j) {
        const unsigned long long base = at(0, j, 0);
        for (int r = 0; r < 3; ++r)
          for (int e = 0; e < tk::kTraceEv; ++e)
            if (at(r, j, e) != 0) {
              sum[r][e] += d(at(r, j, e), base);
              ++cnt[r][e];
            }
        period += d(at(0, j + 1, 0), base);
        ++nper;
      }
      if (g1 >= 1 && g1 < tk::kTraceMaxPairs && g1 > g0) {
        const unsigned long long ref = at(0, g1 - 1, 0);
        const unsigned long long ev[7] = {item(k, 1), item(k, 2), item(k + 1, 3), item(k + 1, 4), item(k + 1, 5), item(k + 1, 0), at(0, g1, 0)};
        for (int e = 0; e < 7; ++e) sw[e] += d(ev[e], ref);
        ++nsw;
      }
    }
    pro += d(at(0, 0, 0), t[0]);
    ++ns;
  }
  if (ns == 0 || nper == 0) return;
  std::printf("trace %s H=%d s_kv=%ld: pair period %.0f cycles, first item's prologue %.0f (%d CTAs)\n", label, H, s_kv,
              period / nper, pro / ns, ns);
  if (nsw)
    std::printf("  item switch, from the last pair's scores | finish begins %.0f | finish ends %.0f | next scan done %.0f"
                " | next pair 0 issued %.0f | next Q issued %.0f | next Q landed %.0f | next scores ready %.0f (%d switches)\n",
                sw[0] / nsw, sw[1] / nsw, sw[2] / nsw, sw[3] / nsw, sw[4] / nsw, sw[5] / nsw, sw[6] / nsw, nsw);
  for (int r = 0; r < 3; ++r) {
    std::printf("  %-8s", kRole[r]);
    for (int e = 0; e < tk::kTraceEv; ++e)
      if (cnt[r][e]) std::printf(" | %s %+.0f", kNames[r][e], sum[r][e] / cnt[r][e]);
    std::printf("\n");
  }
}

template <int kHeadGroups, int kDiag>
void run_traced(const char* label, const dsa::cuda::SparseMlaParams& p) {
  static std::set<std::pair<int, long>> done;
  const auto key = std::make_pair(p.num_heads, static_cast<long>(p.num_slots));
  const bool first = done.insert(key).second;
  if (first) {
    std::vector<unsigned long long> z(tk::kTraceSamples * tk::kTraceStride, 0);
    cudaMemcpyToSymbol(tk::g_trace, z.data(), z.size() * 8);
  }
  dev_mla::launch_like_library<TraceBuild<kDiag>>(p);
  if (first) {
    cudaDeviceSynchronize();
    report(label, p.num_heads, static_cast<long>(p.num_slots));
  }
}
}  // namespace dev_trace

// kDiag as in the library kernel: 2 traces the math-only build (no copies).
template <int kDiag = 0, typename V>
void dev_trace_variants(std::vector<V>& v, const char* label) {
  v.push_back({label, kDiag == 0, [label](const dsa::cuda::SparseMlaParams& p) {
                 if (p.num_heads == 64)
                   dev_trace::run_traced<1, kDiag>(label, p);
                 else
                   dev_trace::run_traced<2, kDiag>(label, p);
               }});
}
#ifndef DSA_DEV_MULTI
template <typename V>
void dev_candidate_variants(std::vector<V>& v) {
  dev_trace_variants(v, "traced");
}
#endif
