#pragma once
// The whole layer on the GPU (spec section 3): weights uploaded once, every
// stage launched on one stream, optional per-stage CUDA-event timing, NVTX
// ranges named after the stages, and an optional download of every
// intermediate into the same LayerTrace the CPU reference fills.
// No CUDA headers here: streams are passed as CUstream_st* (= cudaStream_t).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/config.h"
#include "dsa/cuda.h"
#include "dsa/layer.h"
#include "dsa/stages.h"

struct CUstream_st;

namespace dsa::cuda {

// The stage list (names, order, what x_proj fuses) is dsa/stages.h's.
using ::dsa::Stage;

// One layer's two cache pools in GPU memory (spec section 4 layouts).
struct DeviceCacheView {
  uint8_t* latent = nullptr;   // [num_blocks * tokens_per_block, latent bytes per token]
  uint8_t* indexer = nullptr;  // [num_blocks, tokens_per_block * (index_head_dim + 4)]
  int64_t num_blocks = 0;
  int64_t tokens_per_block = 64;
  LatentCacheDType latent_dtype = LatentCacheDType::BF16;
  int64_t num_slots() const { return num_blocks * tokens_per_block; }
};

// The CUDA side of CacheManager's Storage::Device: cudaMalloc / cudaFree /
// cudaMemset / cudaMemcpy(Default), synchronous. install_device_allocator()
// makes it the process-wide default (idempotent).
const DeviceAllocator* device_allocator();
void install_device_allocator();

// A view of one layer of a CacheManager whose storage lives on the GPU
// (Storage::Device); throws CacheError for host storage.
DeviceCacheView device_view(CacheManager& cache, int64_t layer);

// Deterministic synthetic contents for every slot of every layer of a device
// cache (seeded hash of the byte position): latent rows of unit RMS (bf16, or
// the fp8 form with ue8m0 scales), indexer keys as e4m3 values over the whole
// range with power-of-two scales; the values are dsa/synthetic_cache.h's.
// Stands in for a long prefill when only the new tokens matter (decode
// benchmarks, dsa check); copy the pools to a host manager to give the
// reference the same bytes. Synchronous, on the legacy default stream.
void fill_synthetic(CacheManager& device_cache, uint64_t seed);

// Copies every pool of every layer between two managers of the same
// CacheConfig (any storage on either side).
void copy_pools(const CacheManager& src, CacheManager& dst);

struct StageTime {
  Stage stage;
  float ms = 0.f;
};

class CudaLayer {
 public:
  // Validates cfg for the current GPU and uploads the weights (bf16) once.
  CudaLayer(const LayerConfig& cfg, const LayerWeights& weights);
  ~CudaLayer();
  CudaLayer(const CudaLayer&) = delete;
  CudaLayer& operator=(const CudaLayer&) = delete;

  const LayerConfig& config() const;

  // Host hidden [T, hidden] bf16 in, host output out ([T, H*v] or [T, hidden]
  // with o_proj); the token positions are md.positions. With a trace, every
  // intermediate is downloaded into it (synchronizes).
  std::vector<bf16_t> forward(const std::vector<bf16_t>& hidden, const BatchMetadata& md, const DeviceCacheView& cache,
                              CUstream_st* stream = nullptr, LayerTrace* trace = nullptr, const TraceOptions& trace_options = {});
  // The three steps forward() is made of, for benchmarks and CUDA graphs:
  // prepare() checks and uploads the step's metadata and sizes the buffers
  // (synchronous; do it before capture); enqueue() launches every stage on
  // `stream` reading hidden from GPU memory (capturable when timing is off);
  // run_stage() launches one stage alone on the prepared step's buffers.
  void prepare(const BatchMetadata& md, const DeviceCacheView& cache);
  void enqueue(const void* hidden_device, CUstream_st* stream, bool timing = false);
  void run_stage(Stage s, CUstream_st* stream);
  // Per-stage times of the last timed enqueue (waits for it), and the whole step.
  std::vector<StageTime> stage_times() const;
  float last_layer_ms() const;

  // x_proj (default) or the four separate projections of x; takes effect at
  // the next prepare(). Same rounding either way (numerics.md): the fused
  // GEMM keeps fp32 and its bf16 consumers round on read.
  void set_fused_x_projection(bool on);
  bool fused_x_projection() const;
  std::vector<Stage> stages() const;  // what enqueue() runs, in order

  // Overlap of the two branches of a step (default on): an untimed enqueue
  // runs the indexer (indexer_q_proj .. topk) on a second stream of the
  // layer's, beside q_b_proj, rope, cache_append and q_absorb, and joins
  // before sparse_mla; a CUDA-graph capture of `stream` takes both branches
  // in. Same bits either way. Timed enqueues (stage_times) always run the
  // stages one after another on `stream`.
  void set_stream_overlap(bool on);
  bool stream_overlap() const;

  // Which kernel each op with a newer one runs (dsa/cuda.h; default kAuto
  // everywhere): stored in the layer's DeviceContext, so every launch sees
  // them. Set before prepare(), which sizes the buffers a pick needs (the
  // fp8 gather buffers are left out with sparse_mla_fp8 = kNew).
  void set_kernel_picks(const KernelPicks& picks);
  const KernelPicks& kernel_picks() const;

  // Makes forward() fill every GPU buffer with 0xFF bytes (NaN in bf16 and
  // fp32) after prepare and before launching: tests and dsa check.
  void set_poison(bool on);

  // Makes the next enqueue write the fp32 values the indexer quantizes (trace
  // only). Set it before prepare(), which sizes the buffers for them.
  void set_trace_mode(bool on);
  // Downloads every intermediate of the last enqueue (synchronizes `stream`).
  void download_trace(LayerTrace& trace, const TraceOptions& options, CUstream_st* stream) const;

  // The attention's indices of the last enqueue: [T, topk] global slots, -1 padded.
  std::vector<int32_t> download_topk_global(CUstream_st* stream) const;

  const void* output_device() const;  // bf16
  std::vector<int64_t> output_shape() const;
  void* hidden_buffer(int64_t tokens);  // a GPU buffer for [tokens, hidden] bf16 owned by the layer

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Before anything of a step is allocated: throws OutOfMemoryError naming the
// step's GPU memory (dsa::cuda_step_footprint) and the current device's free
// memory when it does not fit.
void check_step_fits(const LayerConfig& cfg, const std::vector<StepRequest>& requests, bool trace = false);

}  // namespace dsa::cuda
