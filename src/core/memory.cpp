// The CUDA layer's memory for one step, from the same sizes CudaLayer::prepare
// uses (src/cuda/layer/cuda_layer.cu); keep the two in step.
#include "dsa/memory.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "dsa/cache.h"
#include "dsa/error.h"

namespace dsa {

namespace {
// cuBLASLt workspaces of the layer's two GEMM wrappers (src/cuda/gemm/gemm.cu;
// the indexer branch has its own, see CudaLayer::set_stream_overlap) and a
// reserve for what the CUDA context, cuBLASLt handles and kernel images take.
constexpr double kGemmWorkspace = 2 * 64.0 * (1 << 20);
constexpr double kContextReserve = 512.0 * (1 << 20);

std::string gib(double b) { return fmt::format("{:.2f} GiB", b / (1024.0 * 1024.0 * 1024.0)); }
}  // namespace

DeviceFootprint cuda_step_footprint(const LayerConfig& c, const std::vector<StepRequest>& requests, double attention_ws,
                                    bool trace) {
  DeviceFootprint f;
  double T = 0, S = 1;
  for (const StepRequest& r : requests) {
    T += static_cast<double>(r.num_new);
    S = std::max(S, static_cast<double>(r.cached) + static_cast<double>(r.num_new));
  }
  const double H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim, k = c.index_topk;
  const double hid = c.hidden_size, ql = c.q_lora_rank, kvl = c.kv_lora_rank, rope = c.qk_rope_head_dim;
  const double lat = c.latent_dim(), qk = c.qk_head_dim(), vd = c.v_head_dim;
  const double nx = ql + lat + DI + HI;
  f.weights = 2.0 * static_cast<double>(weight_count(c)) + 2.0 * nx * hid;
  f.caches = static_cast<double>(CacheConfig::for_step(c, requests).total_bytes());
  const double stride = std::ceil(S / 8) * 8;  // logits rows padded to 32 bytes
  double a = 0;
  a += T * hid * 2;                                   // hidden
  a += T * nx * 4;                                    // x_proj (fp32)
  a += T * (ql + lat) * 2 + T * DI * 4 + T * HI * 4;  // the unfused projections' outputs (bench of one of them)
  a += T * ql * 2 + T * kvl * 2 + T * rope * 2;       // q_lat, c_kv, k_pe
  a += T * H * qk * 2 + T * H * lat * 2;              // q, q_cat
  a += T * HI * DI * 2 + T * HI * DI + 2 * T * HI * 4;  // qi, qi8, q_scale, weights
  a += T * stride * 4;                                // logits
  a += 2 * T * k * 4;                                 // top-k local and global
  a += T * H * kvl * 2 + 2 * T * H * 4 + T * H * vd * 2;  // attention out, lse, row max, v
  if (c.o_proj) a += T * hid * 2;
  if (c.kv_cache_dtype == LatentCacheDType::FP8) a += T * k * lat * 2 + T * k * 4;  // gathered rows, their indices
  if (trace) a += T * HI * DI * 4 + T * DI * 4 + T * DI + T * 4;
  f.activations = a;
  f.workspaces = kGemmWorkspace + kContextReserve + std::max(0.0, attention_ws);
  return f;
}

void check_fits_device(const DeviceFootprint& f, double free_bytes, double device_bytes, const std::string& device) {
  if (f.total() <= free_bytes) return;
  throw OutOfMemoryError(fmt::format(
      "the step needs {} of GPU memory (weights {}, caches {}, activations {}, workspaces {}) but {} has {} free of {}; "
      "use fewer new tokens (num_new), fewer requests or shorter contexts (cached)",
      gib(f.total()), gib(f.weights), gib(f.caches), gib(f.activations), gib(f.workspaces), device, gib(free_bytes),
      gib(device_bytes)));
}

}  // namespace dsa
