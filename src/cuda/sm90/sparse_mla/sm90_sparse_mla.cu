// Hopper sparse MLA launcher. The warp-specialized wgmma kernel lands here
// next; until it does, can_implement declines every shape so that sparse_mla()
// takes the simple kernel.
#include <fmt/format.h>

#include "cuda/check.cuh"
#include "cuda/sparse_mla.h"

namespace dsa::cuda {

bool sparse_mla_sm90_can_implement(const SparseMlaParams&) { return false; }

void sparse_mla_sm90(const SparseMlaParams& p) {
  throw ShapeError(fmt::format("sparse_mla_sm90: no Hopper kernel for H = {}, topk = {} in this build; call sparse_mla() "
                               "to fall back to the simple kernel",
                               p.num_heads, p.topk));
}

}  // namespace dsa::cuda
