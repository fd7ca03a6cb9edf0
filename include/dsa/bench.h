#pragma once
// Benchmark results shared by the backends and the `dsa bench` front end.
// Times are medians over CUDA events (GPU) or steady_clock (CPU reference)
// after warm-up; FLOPs and bytes follow spec section 8.
#include <cstdint>
#include <string>
#include <vector>

#include "dsa/batch.h"
#include "dsa/config.h"
#include "dsa/index_pattern.h"
#include "dsa/kernel_picks.h"
#include "dsa/layer.h"
#include "dsa/stages.h"

namespace dsa {

struct BenchOptions {
  int warmup = 3;
  int iters = 20;
  std::string stage;      // empty: whole layer, per stage; else run only this stage (e.g. for ncu)
  bool profile_once = false;  // run once, no warm-up (for ncu / compute-sanitizer)
  bool cuda_graph = false;    // replay the step as a CUDA graph (decode)
  // The layer total with the indexer branch on a second stream (CudaLayer::
  // set_stream_overlap); false: every stage on one stream. Stage rows are
  // timed one after another either way.
  bool stream_overlap = true;
  uint64_t seed = 1;
  // The layer's weights (e.g. one layer of a checkpoint, load_weights); null:
  // generated from `seed`. Their shapes must match the configuration.
  const LayerWeights* weights = nullptr;
  // Which kernel each op with a newer one runs (--kernels); CUDA backend only.
  cuda::KernelPicks picks;
  // Sparse MLA sweep only: how a cell is timed. "sustained" (default):
  // `warmup` runs, then `iters` back-to-back timed runs on a warm L2.
  // "flashmla": FlashMLA's prefill benchmark (tests/test_flash_mla_prefill.py):
  // 0.2 s idle before each cell, then triton.testing.do_bench(warmup=10 ms,
  // rep=20 ms), which clears L2 with a 256 MB memset before each timed run
  // and sizes the run counts from a 5-run estimate (warmup / iters unused).
  std::string protocol = "sustained";
  // Sparse MLA sweep only: the FlashMLA anchor file (load_flashmla_anchors);
  // empty: no FlashMLA figures.
  std::string anchors_path;
};

struct StageResult {
  std::string name;
  double median_ms = 0, min_ms = 0, max_ms = 0;
  double flops = 0;   // counted work, spec section 8
  double bytes = 0;   // each input read once, each output written once
};

struct BenchResult {
  std::string backend;  // "cuda" or "reference"
  std::string device;   // GPU name or "CPU (N threads)"
  LayerConfig config;
  std::vector<StepRequest> requests;
  int64_t num_tokens = 0;
  std::vector<StageResult> stages;
  double layer_ms = 0;           // whole step, measured as one region (not the sum of stages)
  double peak_tflops = 0;        // measured ceilings used for the "% of peak" columns
  double peak_gbps = 0;
  std::vector<int64_t> output_shape;
  std::string weights = "synthetic";  // where the weights came from ("synthetic" or a file and layer)
  std::string kernels = "auto";       // the kernel picks of the run (cuda::format_kernel_picks)
  // Where one step's top-k selection lands (dsa/index_pattern.h); not
  // measured when a single stage is timed.
  IndexPattern index_pattern;
};

// Rendering (src/core/report.cpp). The table has one row per stage and a
// "layer total" row (measured layer_ms; FLOPs and bytes summed over the
// stages); the "% of peak" columns stay empty where a peak is 0. The index
// pattern, when measured, follows the table (JSON: "index_pattern"; CSV: the
// last three columns of every row).
std::string format_table(const BenchResult& r);
std::string format_json(const BenchResult& r);
std::string format_csv(const BenchResult& r, bool header = true);
// "64x32768:1" for a uniform batch (B x cached:new), else "c:n,c:n,...".
std::string describe_requests(const std::vector<StepRequest>& requests);

// The standalone sparse MLA sweep of issue 6 (`dsa bench --sweep-sparse-mla`):
// one row per (H, s_kv) cell, beside FlashMLA's sparse prefill figure.
struct SparseMlaSweepRow {
  int num_heads = 0;
  int64_t s_kv = 0;
  double median_ms = 0, min_ms = 0, max_ms = 0;
  double flops = 0;        // 2 * H * (d_qk + d_v) * valid indices
  double mean_ms = 0;      // what triton.testing.do_bench reports
  int warmup = 0, runs = 0;  // untimed and timed runs of this cell
  double sm_mhz = 0;       // average SM clock over the timed runs; 0 when not measured
  double flashmla_ms = 0;  // FlashMLA's figure for the cell on this card and protocol (FlashMlaAnchors); 0: none
};
struct SparseMlaSweep {
  std::string device, kernel;
  std::string protocol = "sustained";  // BenchOptions::protocol
  int tokens = 0, topk = 0, d_qk = 0, d_v = 0, warmup = 0, iters = 0;
  double peak_tflops = 0;  // for the "% of peak" column
  std::string flashmla_source;  // where the FlashMLA figures come from, or why there are none
  std::vector<SparseMlaSweepRow> rows;
};

// FlashMLA's sparse prefill figures measured on our cards
// (shared/anchors/flashmla-sparse-prefill.json): per device name, per timing
// protocol ("kineto", "dobench", "sustained"), one time in ms per (H, s_kv).
struct FlashMlaAnchors {
  std::string device, protocol;  // what was asked for
  std::string source;            // "<file>: <device>, <protocol>, <measured>" or why there are no figures
  std::vector<int> heads;
  std::vector<int64_t> s_kv;
  std::vector<std::vector<double>> ms;  // [heads][s_kv]; empty when the file has no figures for device / protocol
  // The figure for a cell, 0 when there is none.
  double at(int num_heads, int64_t s_kv) const;
};
// The file's figures for `device` (exact name, as cudaDeviceProp::name) timed
// as the sweep protocol `protocol` times ("sustained" -> "sustained",
// "flashmla" -> "dobench", FlashMLA's own triton.testing.do_bench). An
// unknown device or a protocol the file has no figures for gives none (and
// says so in source). Throws FileError for a file that cannot be read or is
// malformed, naming the file and the key.
FlashMlaAnchors load_flashmla_anchors(const std::string& path, const std::string& device, const std::string& protocol);
// Throws ConfigError unless `protocol` is one BenchOptions::protocol knows.
void check_sweep_protocol(const std::string& protocol);
// Rendering (src/core/report.cpp): the markdown table, JSON, CSV.
std::string format_sweep_table(const SparseMlaSweep& s);
std::string format_sweep_json(const SparseMlaSweep& s);
std::string format_sweep_csv(const SparseMlaSweep& s);

namespace ref {
BenchResult bench_layer(const LayerConfig& cfg, const std::vector<StepRequest>& requests, const BenchOptions& opt);
}
namespace cuda {
BenchResult bench_layer(const LayerConfig& cfg, const std::vector<StepRequest>& requests, const BenchOptions& opt);
// Standalone sparse MLA sweep of issue 6 (s_kv x H) beside FlashMLA's figures.
SparseMlaSweep sweep_sparse_mla(const BenchOptions& opt);
}

}  // namespace dsa
