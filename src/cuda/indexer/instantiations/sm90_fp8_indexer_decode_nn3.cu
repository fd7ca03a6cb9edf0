// One variant of the decode indexer-logits kernel (decode_dispatch.cu picks it by next_n).
#include "cuda/indexer/sm90/sm90_fp8_indexer_decode.cuh"

namespace dsa::cuda::indexer::sm90 {
template void launch_decode<3>(const DeviceContext& ctx, const IndexerLogitsParams& p);
}
