#pragma once
// The sparse MLA decode sweep of issue 18 (`dsa bench --sweep-sparse-mla-decode`):
// the attention alone over a paged latent cache, one cell per point of named
// axes (nvbench style), beside FlashMLA's sparse decode figures for the card.
//
// What is CUDA-free lives here and in src/core/decode_sweep.cpp (axes, the
// grid, which points cannot run and why, the spec section 8 cost model, the
// anchor file, the renderings), so the CPU build parses, checks and tests it;
// the timing is cuda::sweep_sparse_mla_decode (src/bench/cuda/sparse_mla_decode_sweep.cu).
//
// A cell: `batch` requests, each with a context of `s_k` tokens in the cache
// (the last `next_n` of them are the step's new tokens, the queries); query i
// of a request sits at position s_k - next_n + i and attends to
// min(topk, position + 1) distinct random positions in [0, position]. The
// cache is paged (64 slots per block, the blocks of all requests shuffled in
// one pool), so the indices are global slots as the layer hands them over.
// Ways of running it:
//   direct  bf16 cache (1152-byte rows), the bf16 kernel reads the pool
//   gather  fp8 cache (656-byte rows): the selected rows are dequantized into
//           a bf16 buffer, then the bf16 kernel (the layer's baseline; timed together)
//   fused   fp8 cache, the kernel reads the 656-byte rows itself
//           (SparseMlaParams::kv_fp8, KernelPicks::sparse_mla_fp8 = kNew)
#include <cstdint>
#include <string>
#include <vector>

#include "dsa/kernel_picks.h"

namespace dsa {

struct DecodeSweepPoint {
  int64_t batch = 64;
  int64_t next_n = 1;
  std::string cache = "fp8";  // bf16 | fp8
  int64_t num_heads = 128;
  int64_t s_k = 32768;
  int64_t topk = 2048;
  std::string way = "gather";  // direct | gather | fused
  int64_t tokens() const { return batch * next_n; }
  // "batch=64 next_n=1 cache=fp8 num_heads=128 s_k=32768 topk=2048 way=gather"
  std::string label() const;
};

// The axes in the order the grid nests them (way innermost, so that the ways
// of one shape are neighbours).
const std::vector<std::string>& decode_sweep_axis_names();
// One "-a name=v1,v2,..." (aliases: h_q and heads for num_heads, s_q for
// next_n). Throws ConfigError naming the axis or the value at fault and the
// valid ones: unknown axis, not an integer, out of range, unknown word.
struct DecodeSweepAxis {
  std::string name;
  std::vector<std::string> values;  // as given; integers already checked
};
DecodeSweepAxis parse_decode_sweep_axis(const std::string& text);
// The grid: every axis at its default values (batch 2,64,128; next_n 1,2;
// cache fp8; num_heads 128; s_k 32768; topk 2048; way gather,fused: the
// cells FlashMLA's figures are for) unless an "-a" text sets it. Throws
// ConfigError for a bad text or an axis given twice.
std::vector<DecodeSweepPoint> decode_sweep_points(const std::vector<std::string>& axis_texts);
// Why a point cannot run, or "" when it can (checked before any GPU work):
// a way that does not read the point's cache format, an fp8 cache with more
// than 4 new tokens per request (the fp8 form serves decode, spec 4), a cache
// whose global slots do not fit int32. What only the GPU knows (memory, the
// kernel's own rules) is checked when the cell runs.
std::string decode_sweep_skip_reason(const DecodeSweepPoint& p);

// Spec section 8 for one cell: FLOPs 2 * H * (576 + 512) * valid indices;
// bytes: the distinct cache rows read, in the cache's format (1152 or 656
// bytes), q, the indices, out, lse, each once. The same for every way (the
// gather's own traffic is not counted: it is the cost of that way).
struct DecodeSweepWork {
  double flops = 0, bytes = 0;
};
inline constexpr int kDecodeDqk = 576, kDecodeDv = 512;
int64_t decode_cache_row_bytes(const std::string& cache);  // 1152 (bf16) or 656 (fp8)
DecodeSweepWork decode_sweep_work(const DecodeSweepPoint& p, int64_t valid_indices, int64_t distinct_rows);

// FlashMLA's sparse decode figures per card (data/anchors/flashmla-sparse-decode.json):
// for each device name (cudaDeviceProp::name) the shape they share
// (num_heads, s_k, topk, cache) and one time per (batch, next_n), in us,
// timed as FlashMLA's own decode test does (kernel time, an 8 GB memset
// before each run).
struct FlashMlaDecodeAnchors {
  std::string device;
  std::string source;  // "<file>: <device>, <protocol>, <measured>" or why there are no figures
  std::string protocol;
  int64_t num_heads = 0, s_k = 0, topk = 0;
  std::string cache;
  struct Cell {
    int64_t batch = 0, next_n = 0;
    double us = 0;
  };
  std::vector<Cell> cells;
  // The figure for the point, 0 when there is none (other card, shape or cache format).
  double at(const DecodeSweepPoint& p) const;
};
// Throws FileError for a file that cannot be read or is malformed (naming the
// file and the key); an unknown device gives no figures, and says so in source.
FlashMlaDecodeAnchors load_flashmla_decode_anchors(const std::string& path, const std::string& device);

struct DecodeSweepRow {
  DecodeSweepPoint point;
  std::string kernel;  // what ran, e.g. "sm90", "gather + sm90", "fp8 (kNew)"
  double median_us = 0, min_us = 0, max_us = 0, mean_us = 0;
  int warmup = 0, runs = 0;
  int64_t valid = 0, distinct = 0;  // valid indices and distinct cache rows of the cell
  double flops = 0, bytes = 0;
  double sm_mhz = 0;       // average SM clock over the timed runs; 0: not measured
  double flashmla_us = 0;  // FlashMLA's figure for the cell (FlashMlaDecodeAnchors::at); 0: none
};
struct DecodeSweepSkip {
  DecodeSweepPoint point;
  std::string reason;
};
struct DecodeSweep {
  std::string device;
  std::string protocol = "sustained";  // sustained | flashmla
  std::string kernels = "auto";        // cuda::format_kernel_picks of the run (fused cells force sparse_mla_fp8 = new)
  int warmup = 0, iters = 0;           // sustained: per cell; flashmla: fixed (see sparse_mla_decode_sweep.cu)
  std::string flashmla_source;
  std::vector<DecodeSweepRow> rows;
  std::vector<DecodeSweepSkip> skipped;
};

struct DecodeSweepOptions {
  std::vector<DecodeSweepPoint> points;  // decode_sweep_points
  std::string protocol = "sustained";    // check_sweep_protocol's names
  int warmup = 10, iters = 50;           // sustained only
  uint64_t seed = 1;
  std::string anchors_path;              // empty: no FlashMLA figures
  cuda::KernelPicks picks;               // into every launch's DeviceContext
};

// Rendering: a markdown table (ours, TFLOP/s, TB/s, SM MHz, FlashMLA beside),
// JSON (rows and skipped cells), CSV (one row per cell that ran).
std::string format_decode_sweep_table(const DecodeSweep& s);
std::string format_decode_sweep_json(const DecodeSweep& s);
std::string format_decode_sweep_csv(const DecodeSweep& s);

namespace cuda {
// Runs every point (skipping, with the reason, those decode_sweep_skip_reason
// refuses, those that do not fit the GPU's memory and those a launcher
// rejects). Throws CudaError for a failed CUDA call and ConfigError for a bad
// protocol. Built into dsa_bench with the CUDA backend only.
DecodeSweep sweep_sparse_mla_decode(const DecodeSweepOptions& opt);
}  // namespace cuda

}  // namespace dsa
