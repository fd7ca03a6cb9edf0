#pragma once
// Stage-by-stage comparison of one GPU step with the CPU reference (spec
// section 7), shared by `dsa check` and the GPU tests. Each stage is compared
// with the reference's own stage function (dsa/reference_stages.h) run on the
// GPU's inputs to that stage ("the same rounded inputs") on a sample of
// tokens; then the whole layer with ref::layer_forward. Library dsa_check
// (CUDA builds only; src/check/).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dsa/batch.h"
#include "dsa/config.h"
#include "dsa/cuda.h"
#include "dsa/layer.h"

namespace dsa::check {

struct CheckOptions {
  uint64_t seed = 1;
  int64_t sample = 256;     // tokens (evenly spread, first and last included) for the stage checks
  bool whole_layer = true;  // also run ref::layer_forward and compare the output and top-k sets
  // Unused cache slots and the new tokens' slots start as 0xFF (NaN in every
  // format), and every GPU buffer is poisoned before each run.
  bool poison = true;
  bool fused_x_projection = true;  // CudaLayer::set_fused_x_projection
  cuda::KernelPicks picks;         // CudaLayer::set_kernel_picks (--kernels); named in the header
  // The layer's weights (one layer of a checkpoint, load_weights); null:
  // generated from `seed`. Shapes must match the configuration.
  const LayerWeights* weights = nullptr;
};

struct Diff {
  double err = 0;       // ||a - b|| / ||b||
  double max_abs = 0;
  int64_t worst = -1;   // index of the largest |a - b|
  int64_t nan = 0;      // NaN in either
  int64_t inf_mismatch = 0;
};
// a [n] against the reference b [n]; NaN and infinite entries are counted,
// not summed.
Diff compare(const float* a, const float* b, int64_t n);

struct Row {
  std::string stage, what;
  double value = 0, bound = 0;
  bool pass = false;
  bool info = false;  // printed with its bound, but does not decide the exit code
  std::string note;
};

class Table {
 public:
  void add(Row r);
  // Relative L2 error against a bound; NaN and mismatched infinities fail.
  // row_len > 0 names the worst element by row and column.
  void rel(const std::string& stage, const std::string& what, const std::vector<float>& gpu, const std::vector<float>& ref,
           double bound, int64_t row_len = 0);
  // value <= bound (at_most) or value >= bound; NaN fails.
  void bound_check(const std::string& stage, const std::string& what, double value, double bound, bool at_most,
                   std::string note = {});
  // Turns the last row into information only (see the whole-layer rows).
  void last_is_info(const std::string& why);
  int failures() const;
  std::string format() const;
  const std::vector<Row>& rows() const { return rows_; }
  // "stage: what" of every failed, gated row.
  std::vector<std::string> failed() const;

 private:
  std::vector<Row> rows_;
};

// Set overlap |a ∩ b| / |b| of the valid (>= 0) entries of one top-k row of
// length k (1 when both are empty).
double overlap(const int32_t* a, const int32_t* b, int64_t k);

struct StepCheck {
  std::string header;
  Table table;
  double gpu_s = 0, stage_s = 0, ref_s = 0, total_s = 0;
  int64_t sampled = 0;
  int64_t tokens = 0;
  // Whole-layer error split by whether a token's top-k set equals the reference's.
  int64_t same_topk_rows = 0;
  double same_topk_err = 0, diff_topk_err = 0;
  // FNV-1a fingerprints of the GPU step's output, every intermediate of its
  // trace and both cache pools after it, in a fixed order: two builds or two
  // runs produced the same bits exactly when their lists are equal.
  std::vector<std::pair<std::string, uint64_t>> digests;
};

// One step of `requests` with o.weights (or synthetic weights), and hidden
// states and cached context from o.seed, on the current GPU and on the reference, compared
// stage by stage. Throws CudaError without a GPU and ConfigError for
// o.sample < 1.
StepCheck check_step(const LayerConfig& cfg, const std::vector<StepRequest>& requests, const CheckOptions& o);

}  // namespace dsa::check
