#pragma once
// The dev benches' way into the sparse MLA kernel: the library's launch plan
// (grid, split, reordering, kernel build by cache size: config.h) with the
// development knobs the library leaves out. Not part of any library target.
//   Build::run<kHeadGroups, kReleaseFirst, kEarlyMaxB>(run, plan, ctx)
// launches one kernel build; LibBuild<kDiag, kSkipMaskChoice> is the
// library kernel template's (dev/sparse_mla/trace.cuh has the traced copy's).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "cuda/sparse_mla/sm90/config.h"
#include "cuda/sparse_mla/sm90/sm90_bf16_sparse_mla.cuh"
#include "dsa/cuda.h"

namespace dev_mla {

using dsa::cuda::DeviceContext;
using dsa::cuda::SparseMlaParams;

// Device 0's properties, queried once (the library's device_context() is not
// linked here), on the legacy default stream.
inline DeviceContext context() {
  static const dsa::cuda::DeviceInfo info = [] {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
      std::fprintf(stderr, "no CUDA device\n");
      std::exit(1);
    }
    dsa::cuda::DeviceInfo d;
    d.index = 0;
    d.name = p.name;
    d.sm_major = p.major;
    d.sm_minor = p.minor;
    d.multiprocessors = p.multiProcessorCount;
    d.global_memory = p.totalGlobalMem;
    d.l2_bytes = p.l2CacheSize;
    d.smem_optin_per_block = p.sharedMemPerBlockOptin;
    return d;
  }();
  DeviceContext c;
  c.device = &info;
  return c;
}

// kDiag: 0 the library's kernel, 1 gather only, 2 math only (see the
// kernel). kSkipMaskChoice: -1 the library's kSkipMask, 0 / 1 force it off / on.
template <int kDiag, int kSkipMaskChoice = -1>
struct LibBuild {
  template <int kHeadGroups, bool kReleaseFirst, bool kEarlyMaxB>
  static void run(const SparseMlaParams& run, const dsa::cuda::sm90_sparse_mla::LaunchPlan& plan, const DeviceContext& ctx) {
    using namespace dsa::cuda::sm90_sparse_mla;
    constexpr bool skip = kSkipMaskChoice < 0 ? kSkipMaskDefault : kSkipMaskChoice != 0;
    launch_fwd_and_combine<kHeadGroups, kDiag, kReleaseFirst, kEarlyMaxB, skip>(run, plan, ctx);
  }
};

// As the library launches p (sparse_mla_sm90), with Build's kernels;
// kFlags >= 0 forces the build: bit 0 kReleaseFirst, bit 1 kEarlyMaxB.
template <class Build, int kFlags = -1>
void launch_like_library(const SparseMlaParams& params) {
  using namespace dsa::cuda::sm90_sparse_mla;
  const SparseMlaParams p = dsa::cuda::resolve_strides(params);
  const DeviceContext ctx = context();
  const LaunchPlan plan = plan_launch(p, p.num_heads / BLOCK_H, ctx);
  const SparseMlaParams run = reorder_if_planned(p, plan, ctx);
  auto go = [&](auto head_groups) {
    constexpr int kH = decltype(head_groups)::value;
    if constexpr (kFlags >= 0) {
      Build::template run<kH, (kFlags & 1) != 0, (kFlags & 2) != 0>(run, plan, ctx);
      return;
    }
    if constexpr (kH == 1) {  // releasing buffer 1 first is an H = 64 build only
      if (plan.release_first) {
        Build::template run<kH, true, true>(run, plan, ctx);
        return;
      }
    }
    if (plan.early_max_b)
      Build::template run<kH, false, true>(run, plan, ctx);
    else
      Build::template run<kH, false, false>(run, plan, ctx);
  };
  if (p.num_heads == 64)
    go(std::integral_constant<int, 1>{});
  else
    go(std::integral_constant<int, 2>{});
}

}  // namespace dev_mla
