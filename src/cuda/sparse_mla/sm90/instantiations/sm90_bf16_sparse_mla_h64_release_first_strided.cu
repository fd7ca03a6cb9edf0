// H = 64, cache larger than L2 in the given order: early m_B, and WG0 releases buffer 1's half L first. Strided views (any resolved strides).
#include "cuda/sparse_mla/sm90/sm90_bf16_sparse_mla.cuh"

namespace dsa::cuda::sm90_sparse_mla {
template void launch_sparse_mla_sm90<1, true, true, false>(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx);
}  // namespace dsa::cuda::sm90_sparse_mla
