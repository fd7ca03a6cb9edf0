#pragma once
// Sparse MLA attention (spec 3.6): the launchers. The contract is
// SparseMlaParams (params.h); every launcher runs on ctx.stream and reads
// device properties from ctx only. Launchers throw dsa::ShapeError for
// parameters they cannot take (naming the parameter) and dsa::CudaError for
// failed CUDA calls.
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/sparse_mla/params.h"
#include "dsa/cuda.h"

namespace dsa::cuda {

// Throws ShapeError, naming the parameter, the rule and the fix, for what
// no kernel takes: null required pointers, negative sizes, dims out of
// range, strides that would make a view overlap. p's strides must be
// resolved (resolve_strides); every launcher below resolves and checks.
void check_sparse_mla_params(const SparseMlaParams& p);

// Workspace the sm90 kernel can use for T tokens of num_heads heads, topk
// indices each, over a cache of num_slots rows, on ctx's device (0 when it
// would neither split nor reorder anything, or the kernel does not apply).
size_t sparse_mla_workspace_bytes(const DeviceContext& ctx, int64_t T, int num_heads, int topk, int64_t num_slots);

// Straightforward kernel: any T, H, topk, strides, either cache; the correctness baseline.
void sparse_mla_simple(const SparseMlaParams& p, const DeviceContext& ctx);
// Hopper kernel (sm_90a wgmma). can_implement says whether it takes p on
// ctx's device; when not and why is non-null, *why says what rules it out.
bool sparse_mla_sm90_can_implement(const SparseMlaParams& p, const DeviceContext& ctx, std::string* why = nullptr);
void sparse_mla_sm90(const SparseMlaParams& p, const DeviceContext& ctx);
// The Hopper kernel over the fp8 latent cache (p.kv_fp8, 656-byte rows): the
// rows are dequantized in shared memory, bit for bit as the layer's gather
// to bf16 does, so the output equals the gather followed by sparse_mla_sm90
// bit for bit (docs/sparse_mla.md).
bool sparse_mla_sm90_fp8_can_implement(const SparseMlaParams& p, const DeviceContext& ctx, std::string* why = nullptr);
void sparse_mla_sm90_fp8(const SparseMlaParams& p, const DeviceContext& ctx);
// Picks the fastest kernel that can implement p (bf16 or fp8 cache).
void sparse_mla(const SparseMlaParams& p, const DeviceContext& ctx);

}  // namespace dsa::cuda
