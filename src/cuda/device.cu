#include "check.cuh"
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

DeviceInfo current_device() {
  if (device_count() == 0) throw CudaError("no CUDA device is visible: run on a GPU machine or use the CPU reference (--backend ref)");
  DeviceInfo d;
  DSA_CUDA_CHECK(cudaGetDevice(&d.index));
  cudaDeviceProp p{};
  DSA_CUDA_CHECK(cudaGetDeviceProperties(&p, d.index));
  d.name = p.name;
  d.sm_major = p.major;
  d.sm_minor = p.minor;
  d.multiprocessors = p.multiProcessorCount;
  d.global_memory = p.totalGlobalMem;
  d.l2_bytes = p.l2CacheSize;
  d.smem_optin_per_block = p.sharedMemPerBlockOptin;
  return d;
}

}  // namespace dsa::cuda
