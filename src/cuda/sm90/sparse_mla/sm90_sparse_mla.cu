// Hopper sparse MLA: which shapes the wgmma kernel takes, and its dispatch.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include "cuda/check.cuh"
#include "cuda/sm90/sparse_mla/config.h"
#include "cuda/sparse_mla.h"

namespace dsa::cuda {
namespace {

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// sm_90 with enough opt-in shared memory; asked once per device.
bool device_is_hopper() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  int major = 0, minor = 0, smem = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0 && static_cast<size_t>(smem) >= sm90_sparse_mla::SmemPlan::bytes;
}

}  // namespace

bool sparse_mla_sm90_can_implement(const SparseMlaParams& p) {
  using namespace sm90_sparse_mla;
  if (p.num_heads != 64 && p.num_heads != 128) return false;
  if (p.d_qk != D_QK || p.d_v != D_V) return false;
  if (p.topk <= 0 || p.topk % BLOCK_KV != 0) return false;
  if (p.T < 0 || p.T * (p.num_heads / BLOCK_H) > 0x7fffffff) return false;
  if (p.num_slots < 0 || p.num_slots > 0x7fffffff) return false;
  // 16-byte cp.async of q and kv rows; 16-byte stores of out rows.
  if (!aligned(p.q, 16) || !aligned(p.kv, 16) || p.stride_q_t % 8 != 0 || !aligned(p.out, 16)) return false;
  if (p.stride_q_t < static_cast<int64_t>(p.num_heads) * D_QK) return false;
  if (!p.q || !p.kv || !p.indices || !p.out || !p.lse) return false;
  return device_is_hopper();
}

size_t sparse_mla_workspace_bytes(int64_t T, int num_heads, int topk, int64_t num_slots) {
  if ((num_heads != 64 && num_heads != 128) || T <= 0 || topk <= 0 || !device_is_hopper()) return 0;
  int dev = 0, sms = 0, l2_bytes = 0;
  DSA_CUDA_CHECK(cudaGetDevice(&dev));
  DSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  DSA_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, dev));
  return sm90_sparse_mla::workspace_bytes(T, num_heads / sm90_sparse_mla::BLOCK_H, topk, num_slots, sms, l2_bytes);
}

void sparse_mla_sm90(const SparseMlaParams& p) {
  if (!sparse_mla_sm90_can_implement(p))
    throw ShapeError(fmt::format(
        "sparse_mla_sm90: cannot take H = {}, d_qk = {}, d_v = {}, topk = {}, T = {} (needs an sm_90 GPU, H 64 or 128, "
        "576 / 512 dims, topk a multiple of 64, 16-byte aligned q / kv); call sparse_mla() to fall back to the simple kernel",
        p.num_heads, p.d_qk, p.d_v, p.topk, p.T));
  if (p.T == 0) return;
  if (p.num_heads == 64) {
    sm90_sparse_mla::launch_sparse_mla_sm90<1>(p);
  } else {
    sm90_sparse_mla::launch_sparse_mla_sm90<2>(p);
  }
}

}  // namespace dsa::cuda
