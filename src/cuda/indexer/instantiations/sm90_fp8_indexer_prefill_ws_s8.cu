// One variant of the indexer-logits kernels (the dispatch in ../indexer_logits.cu picks it).
#include "cuda/indexer/sm90/sm90_fp8_indexer_prefill_ws.cuh"

namespace dsa::cuda::indexer::sm90 {
template void launch_prefill_ws<8>(const DeviceContext& ctx, const IndexerLogitsParams& p);
template int prefill_ws_smem_bytes<8>();
}
