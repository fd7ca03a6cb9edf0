// H = 128 (two CTAs of 64 heads per token), cache within half of L2. Strided views (any resolved strides).
#include "cuda/sparse_mla/sm90/sm90_bf16_sparse_mla.cuh"

namespace dsa::cuda::sm90_sparse_mla {
template void launch_sparse_mla_sm90<2, false, false, false>(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx);
}  // namespace dsa::cuda::sm90_sparse_mla
