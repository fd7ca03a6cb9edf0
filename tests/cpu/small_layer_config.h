#pragma once
// The small layer shape the CPU layer tests share: every width of the real
// layer scaled down so a step runs in milliseconds, RoPE width and the
// indexer's 128-wide heads kept (their kernels depend on them).
#include "dsa/config.h"

namespace dsa::test {

inline LayerConfig small_layer_config(int64_t num_heads = 64) {
  LayerConfig c;
  c.hidden_size = 256;
  c.num_heads = num_heads;
  c.q_lora_rank = 128;
  c.kv_lora_rank = 128;
  c.qk_nope_head_dim = 32;
  c.v_head_dim = 32;
  c.index_n_heads = 8;
  c.index_topk = 64;
  c.tokens_per_block = 16;
  validate(c);
  return c;
}

}  // namespace dsa::test
