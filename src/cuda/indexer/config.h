#pragma once
// What the indexer-logits launcher and both of its kernels agree on: the
// shapes they are built for (DeepSeek-V3.2's indexer, spec sections 3.5 and 4).
namespace dsa::cuda::indexer {

constexpr int kIdxHeads = 64;
constexpr int kIdxDim = 128;
constexpr int kIdxBlockTokens = 64;
constexpr int kIdxBlockBytes = kIdxBlockTokens * (kIdxDim + 4);  // 8448: 64 x 128 fp8, then 64 fp32 scales

}  // namespace dsa::cuda::indexer
