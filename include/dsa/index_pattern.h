#pragma once
// Where the indexer's top-k selection lands relative to the query: the
// attention's memory traffic depends on it (a selection near the query reads
// recently written, cache-warm blocks; one spread over the whole context does
// not), and real weights select differently from random ones. `dsa bench`
// reports it for one step.
#include <cstdint>
#include <vector>

#include "dsa/batch.h"
#include "dsa/error.h"

namespace dsa {

struct IndexPattern {
  bool measured = false;       // false: no selection was recorded (nothing to report)
  int64_t selections = 0;      // valid (>= 0) entries over all tokens
  int64_t window = 4096;       // positions counted as "recent": query - window + 1 .. query
  double mean_distance = 0;    // mean of (query position - selected position) over the selections
  double recent_share = 0;     // share of the selections with distance < window
};

inline constexpr int64_t kIndexPatternWindow = 4096;

// From request-local selections: topk_local [T, topk] (-1 padded), as
// LayerTrace::topk_local holds them. A selection past the query (a causality
// violation) is a ShapeError naming the token, not a negative distance.
inline IndexPattern index_pattern(const BatchMetadata& md, const int32_t* topk_local, int64_t topk,
                                  int64_t window = kIndexPatternWindow) {
  IndexPattern p;
  p.measured = true;
  p.window = window;
  double sum = 0;
  int64_t recent = 0;
  for (int64_t t = 0; t < md.num_tokens; ++t) {
    const int64_t q = md.positions[t];
    for (int64_t j = 0; j < topk; ++j) {
      const int64_t s = topk_local[t * topk + j];
      if (s < 0) continue;
      if (s > q) {
        throw ShapeError("index_pattern: token " + std::to_string(t) + " at position " + std::to_string(q) +
                         " selects position " + std::to_string(s) + ", past itself; the selection is not causal");
      }
      sum += static_cast<double>(q - s);
      recent += q - s < window;
      ++p.selections;
    }
  }
  if (p.selections > 0) {
    p.mean_distance = sum / static_cast<double>(p.selections);
    p.recent_share = static_cast<double>(recent) / static_cast<double>(p.selections);
  }
  return p;
}

// The same from global cache slots [T, topk] (CudaLayer::download_topk_global),
// mapped back to request-local positions through the step's block tables. A
// slot outside the token's own request's blocks is a ShapeError.
inline IndexPattern index_pattern_from_slots(const BatchMetadata& md, const int32_t* topk_global, int64_t topk,
                                             int64_t window = kIndexPatternWindow) {
  const int64_t tpb = md.tokens_per_block, mb = md.max_blocks_per_request;
  // Physical block -> (request index, block index in that request).
  std::vector<int64_t> owner(static_cast<size_t>(md.num_slots / tpb + 1), -1), index_in(owner.size(), -1);
  for (int64_t r = 0; r < md.num_requests; ++r) {
    for (int64_t b = 0; b < mb; ++b) {
      const int32_t blk = md.block_table[r * mb + b];
      if (blk < 0 || blk >= static_cast<int64_t>(owner.size())) continue;
      owner[blk] = r, index_in[blk] = b;
    }
  }
  std::vector<int32_t> local(static_cast<size_t>(md.num_tokens * topk));
  for (int64_t t = 0; t < md.num_tokens; ++t) {
    for (int64_t j = 0; j < topk; ++j) {
      const int64_t g = topk_global[t * topk + j];
      int32_t& l = local[t * topk + j];
      if (g < 0) {
        l = -1;
        continue;
      }
      const int64_t blk = g / tpb;
      if (g >= md.num_slots || owner[blk] != md.token_request[t]) {
        throw ShapeError("index_pattern: token " + std::to_string(t) + " selects cache slot " + std::to_string(g) +
                         ", which is not in its request's blocks");
      }
      l = static_cast<int32_t>(index_in[blk] * tpb + g % tpb);
    }
  }
  return index_pattern(md, local.data(), topk, window);
}

}  // namespace dsa
