// H = 64: 1 CTA(s) of 64 heads per token.
#include "cuda/sm90/sparse_mla/sm90_bf16_sparse_mla.cuh"

namespace dsa::cuda::sm90_sparse_mla {
template void launch_sparse_mla_sm90<1>(const SparseMlaParams& p);
}  // namespace dsa::cuda::sm90_sparse_mla
