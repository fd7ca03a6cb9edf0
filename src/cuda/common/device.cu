// Device properties, queried once per device and process.
#include <memory>
#include <mutex>
#include <vector>

#include "cuda/check.cuh"
#include "dsa/cuda.h"

namespace dsa::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device / no driver" error
    return 0;
  }
  return n;
}

namespace {
DeviceInfo query(int index) {
  DeviceInfo d;
  d.index = index;
  cudaDeviceProp p{};
  DSA_CUDA_CHECK(cudaGetDeviceProperties(&p, index));
  d.name = p.name;
  d.sm_major = p.major;
  d.sm_minor = p.minor;
  d.multiprocessors = p.multiProcessorCount;
  d.global_memory = p.totalGlobalMem;
  d.l2_bytes = p.l2CacheSize;
  d.smem_optin_per_block = p.sharedMemPerBlockOptin;
  return d;
}
}  // namespace

const DeviceInfo& current_device() {
  static std::mutex mu;
  // One entry per device index, filled on first use; entries never move, so
  // references handed out stay valid for the process.
  static std::vector<std::unique_ptr<DeviceInfo>> cache;
  const int n = device_count();
  if (n == 0) throw CudaError("no CUDA device is visible: run on a GPU machine or use the CPU reference backend");
  int index = 0;
  DSA_CUDA_CHECK(cudaGetDevice(&index));
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() < static_cast<size_t>(n)) cache.resize(static_cast<size_t>(n));
  if (!cache[index]) cache[index] = std::make_unique<DeviceInfo>(query(index));
  return *cache[index];
}

DeviceContext device_context(CUstream_st* stream) {
  DeviceContext c;
  c.device = &current_device();
  c.stream = stream;
  return c;
}

}  // namespace dsa::cuda
