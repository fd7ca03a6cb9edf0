// One variant of the indexer-logits kernels (the dispatch in ../indexer_logits.cu picks it).
#include "cuda/indexer/sm90/sm90_fp8_indexer_logits_wgmma.cuh"

namespace dsa::cuda::indexer::sm90 {
template void launch_wgmma<2, 1, 4>(const DeviceContext& ctx, const IndexerLogitsParams& p);
}
