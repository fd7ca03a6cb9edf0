// H = 128, fp8 latent cache (656-byte rows dequantized in shared memory), dense views.
#include "cuda/sparse_mla/sm90/sm90_bf16_sparse_mla.cuh"

namespace dsa::cuda::sm90_sparse_mla {
template void launch_sparse_mla_sm90_fp8<2, true, kFp8DefaultOrder>(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx);
}  // namespace dsa::cuda::sm90_sparse_mla
