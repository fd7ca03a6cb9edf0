// One variant of the indexer-logits kernels (the dispatch in ../indexer_logits.cu picks it).
#include "cuda/indexer/sm89/sm89_fp8_indexer_logits_mma.cuh"

namespace dsa::cuda::indexer::sm89 {
template void launch_mma<1, 4, 3>(const DeviceContext& ctx, const IndexerLogitsParams& p);
}
