// Intermediate: the CUDA paths of the standalone ops are being written.
#include "cuda/ops/ops_cuda.h"

#include "dsa/error.h"

namespace dsa::ops::cuda_impl {

void sparse_mla_fwd(int, const Tensor&, const Tensor&, const Tensor&, double, int64_t, const Tensor&, const Tensor&, const Tensor&,
                    CUstream_st*) {
  throw Error("sparse_mla_fwd: the CUDA path is not built yet; use CPU tensors");
}
void fp8_mqa_logits(int, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                    CUstream_st*) {
  throw Error("fp8_mqa_logits: the CUDA path is not built yet; use CPU tensors");
}
void fp8_paged_mqa_logits(int, const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const Tensor&, int64_t,
                          const Tensor&, CUstream_st*) {
  throw Error("fp8_paged_mqa_logits: the CUDA path is not built yet; use CPU tensors");
}
void topk(int, const Tensor&, int64_t, const Tensor&, const Tensor&, CUstream_st*) {
  throw Error("topk: the CUDA path is not built yet; use CPU tensors");
}
void rope_quant_append(int, const LayerConfig&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                       CUstream_st*) {
  throw Error("rope_quant_append: the CUDA path is not built yet; use CPU tensors");
}

}  // namespace dsa::ops::cuda_impl
