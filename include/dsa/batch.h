#pragma once
// The description of one forward step: which requests take part, how many of
// their tokens are already cached and how many are new (spec section 5), and
// everything the stages derive from that. Plain data, host side; the CUDA
// backend uploads it.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace dsa {

class CacheManager;

// One request in a step. Position of new token i is cached + i.
struct StepRequest {
  int64_t id = 0;      // request id in the CacheManager
  int64_t cached = 0;  // tokens already in the caches
  int64_t num_new = 1; // tokens in this step (decode: 1; speculative: next_n = 2..4)
};

// Limits of one step. Positions, sequence lengths and global cache slots are
// int32 in the metadata and in the kernels' index tensors, so a request's
// cached + num_new, and the slots of all requests together (each rounded up
// to whole blocks), must fit int32.
struct StepLimits {
  static constexpr int64_t kMaxSlots = std::numeric_limits<int32_t>::max();
  static constexpr int64_t kMaxRequests = int64_t{1} << 20;
};

// Checks a step's counts before anything is sized from them: 1..kMaxRequests
// requests, cached >= 0, num_new >= 1, cached + num_new <= kMaxSlots, and the
// blocks of all requests at most kMaxSlots slots. Every sum is checked before
// it is formed. `what` starts the message (e.g. the file the step came from).
// Throws ConfigError (parameter "requests").
void check_step_limits(const std::vector<StepRequest>& requests, int64_t tokens_per_block, const std::string& what = "the step");

struct BatchMetadata {
  int64_t num_requests = 0;
  int64_t num_tokens = 0;        // T, new tokens of all requests, concatenated (ragged)
  int64_t tokens_per_block = 64;
  int64_t max_blocks_per_request = 0;   // max over requests of ceil(seq_len / tokens_per_block)
  int64_t num_slots = 0;                // slots per layer in the cache (valid global slots: [0, num_slots))
  int64_t index_head_dim = 128;         // bytes of one fp8 indexer vector
  int64_t indexer_bytes_per_block = 8448;  // tokens_per_block * (index_head_dim + 4)

  std::vector<StepRequest> requests;     // [R]
  std::vector<int64_t> token_offsets;    // [R+1] first new token of request r in hidden
  std::vector<int32_t> seq_lens;         // [R] cached + num_new
  std::vector<int32_t> positions;        // [T] request-local position of each new token
  std::vector<int32_t> token_request;    // [T] request index (0..R-1) of each new token
  // Keys visible to token t: request-local positions [0, visible_end[t]) (causal: position + 1).
  std::vector<int32_t> visible_end;      // [T]
  // Block table of each request, padded with -1 to max_blocks_per_request.
  std::vector<int32_t> block_table;      // [R, max_blocks_per_request]
  // Global slot (block_id * tokens_per_block + offset) where each new token is written.
  std::vector<int64_t> slot_mapping;     // [T]
  // Byte offsets of each new token's indexer fp8 vector and fp32 scale inside
  // one layer's indexer pool (block layout: all fp8 vectors, then all scales).
  std::vector<int64_t> indexer_k_offset;      // [T]
  std::vector<int64_t> indexer_scale_offset;  // [T]

  int64_t max_seq_len() const;
  int64_t total_visible_keys() const;  // sum over t of visible_end[t] (indexer cost model)
  // Global slot of request-local position p of request r (r is the index in
  // `requests`, not the id). Throws ShapeError when r or p is out of range.
  int64_t slot_of(int64_t r, int64_t p) const;
  // Byte offsets of position p's indexer vector / scale in one layer's indexer pool.
  int64_t indexer_k_offset_of(int64_t r, int64_t p) const;
  int64_t indexer_scale_offset_of(int64_t r, int64_t p) const;
};

// Adds the step's requests the cache does not know yet and reserves
// cached + num_new tokens for each, all-or-nothing over the whole step: on
// CacheError the cache is exactly as before.
void reserve_step(CacheManager& cache, const std::vector<StepRequest>& requests);

// Builds the metadata of a step from the cache manager's block tables. Every
// request must already hold room for cached + num_new tokens (see
// CacheManager::reserve). Throws CacheError / ShapeError with a clear message.
BatchMetadata build_batch_metadata(const CacheManager& cache, const std::vector<StepRequest>& requests);

// Checks that position_ids (as handed to the layer) are the positions the
// metadata implies (cached + i per request, in order). Throws ShapeError that
// names the first token that disagrees.
void check_positions(const BatchMetadata& md, const int32_t* position_ids, int64_t n);
// The same check from the requests alone, before any cache exists, on 64-bit
// positions as a file holds them (a value past int32 is reported, not cut).
void check_positions(const std::vector<StepRequest>& requests, const int64_t* position_ids, int64_t n);

// Converts request-local top-k positions [T, topk] to global cache slots in
// place (-1 stays -1; a position outside the request's visible keys is an error).
void local_to_global_indices(const BatchMetadata& md, int32_t* indices, int64_t topk);

// Batch shapes as a front end gives them: a uniform batch (batch requests of
// cached + num_new tokens), or a ragged list "c0:n0,c1:n1,..." (cached:new per
// request). Throw ConfigError whose parameter() is "batch", "cached",
// "num_new" or "requests".
std::vector<StepRequest> parse_request_list(const std::string& list);
std::vector<StepRequest> uniform_requests(int64_t batch, int64_t cached, int64_t num_new);

}  // namespace dsa
