#pragma once
// The layer configuration of the GPU layer tests.
#include <cstdint>

#include "dsa/config.h"

namespace dsa::test {

// Smaller hidden and q_lora widths keep the CPU reference quick; every width
// the kernels specialize on (latent 512 + 64, heads 64 / 128, indexer 64 x 128) is real.
inline dsa::LayerConfig small_gpu_config(int64_t heads, int64_t topk) {
  dsa::LayerConfig c;
  c.hidden_size = 1024;
  c.q_lora_rank = 512;
  c.num_heads = heads;
  c.index_topk = topk;
  dsa::validate(c);
  return c;
}

}  // namespace dsa::test
