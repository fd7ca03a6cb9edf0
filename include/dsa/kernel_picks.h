#pragma once
// The text form of cuda::KernelPicks (dsa/cuda.h), as `--kernels` takes it
// and as reports record it. CUDA-free (library dsa_core), so that the CPU
// build parses, prints and tests it too.
//
//   auto | baseline | new          every op
//   op=pick[,op=pick...]           ops not named stay auto; op is one of
//                                  indexer_prefill, indexer_decode, topk, sparse_mla_fp8
#include <string>
#include <vector>

#include "dsa/cuda.h"

namespace dsa::cuda {

// "auto", "baseline", "new".
const char* kernel_pick_name(KernelPick pick);
// The ops of KernelPicks, in declaration order.
const std::vector<std::string>& kernel_pick_ops();
// Throws ConfigError (parameter "kernels") naming the token at fault and the
// valid values: an unknown op or pick, an op given twice, an empty item.
KernelPicks parse_kernel_picks(const std::string& text);
// "auto", "baseline" or "new" when every op has that pick; else every op as
// op=pick, comma-separated, in kernel_pick_ops() order (parses back to the same).
std::string format_kernel_picks(const KernelPicks& picks);

}  // namespace dsa::cuda
