#pragma once
// Pieces of the reference shared between its own files (not public API).
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#else
// Builds without OpenMP run everything on one thread.
inline int omp_get_max_threads() { return 1; }
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline int omp_in_parallel() { return 0; }
#endif

namespace dsa::ref::detail {

// Per-thread scratch for one token of sparse attention.
struct MlaScratch {
  std::vector<float> k;       // [n, Dqk] gathered rows
  std::vector<float> s;       // [H, n] scores, then unnormalized probabilities
  std::vector<int32_t> rows;  // valid indices of the token
};

// One token of sparse MLA (spec 3.6): q_t [H, Dqk], kv [num_slots, Dqk],
// idx [topk]; writes out_t [H, Dv], lse_t [H], max_t [H] (max_t may be null).
void sparse_mla_token(const float* q_t, const float* kv, int64_t num_slots, const int32_t* idx, int64_t topk, int64_t H,
                      int64_t Dqk, int64_t Dv, double softmax_scale, float* out_t, float* lse_t, float* max_t,
                      bool parallel, MlaScratch& ws);

// Decoded float8_e4m3 values of all 256 codes.
const float* fp8_lut();

}  // namespace dsa::ref::detail
