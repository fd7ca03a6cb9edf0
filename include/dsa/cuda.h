#pragma once
// What the front ends may ask of the CUDA backend without including CUDA
// headers. Available when the library was built with DSA_HAVE_CUDA.
#include <string>

namespace dsa::cuda {

struct DeviceInfo {
  int index = -1;
  std::string name;
  int sm_major = 0, sm_minor = 0;
  int multiprocessors = 0;
  size_t global_memory = 0;
  size_t l2_bytes = 0;
  size_t smem_optin_per_block = 0;
};

// Number of usable CUDA devices; 0 (never an error) when there is no driver or GPU.
int device_count();
// Properties of the current device; throws CudaError when there is none.
DeviceInfo current_device();

}  // namespace dsa::cuda
