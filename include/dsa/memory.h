#pragma once
// GPU memory one step of the CUDA layer needs, counted before anything is
// allocated, so that a step the card cannot hold stops with the sizes and
// the limit instead of failing part way (or, with managed memory, hanging).
#include <cstdint>
#include <string>
#include <vector>

#include "dsa/batch.h"
#include "dsa/config.h"

namespace dsa {

// Bytes, as doubles: the products of a bounded but large step (T x max
// context x 4 bytes of logits) can pass 2^63, and only the comparison with
// the card's memory and the message need them.
struct DeviceFootprint {
  double weights = 0;      // bf16 weights, with the fused x projection's stacked copy
  double caches = 0;       // the step-sized latent and indexer caches (CacheConfig::for_step)
  double activations = 0;  // every buffer CudaLayer::prepare sizes (and the trace's, with trace)
  double workspaces = 0;   // cuBLASLt's, the attention's (as given) and the CUDA context's reserve
  double total() const { return weights + caches + activations + workspaces; }
};

// attention_workspace_bytes: what sparse_mla_workspace_bytes gives for the
// step (the CUDA side knows it; 0 for none).
DeviceFootprint cuda_step_footprint(const LayerConfig& cfg, const std::vector<StepRequest>& requests,
                                    double attention_workspace_bytes, bool trace);

// Throws OutOfMemoryError naming every part, the total and the device's free
// and total memory when the footprint does not fit in free_bytes.
void check_fits_device(const DeviceFootprint& f, double free_bytes, double device_bytes, const std::string& device);

}  // namespace dsa
