// H = 128, cache over half of L2: WG1 publishes m_B early.
#include "cuda/sparse_mla/sm90/sm90_bf16_sparse_mla.cuh"

namespace dsa::cuda::sm90_sparse_mla {
template void launch_sparse_mla_sm90<2, false, true, true>(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx);
}  // namespace dsa::cuda::sm90_sparse_mla
