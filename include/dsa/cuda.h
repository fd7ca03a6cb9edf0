#pragma once
// What the front ends may ask of the CUDA backend without including CUDA
// headers. Available when the library was built with DSA_HAVE_CUDA.
#include <cstddef>
#include <string>

struct CUstream_st;  // = cudaStream_t

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
// Properties of the current device, queried once per device and process;
// throws CudaError when there is none.
const DeviceInfo& current_device();

// What every launcher is handed: the properties of the device it launches on
// (queried once per device, see current_device) and the stream. Launchers
// never query device attributes themselves.
struct DeviceContext {
  const DeviceInfo* device = nullptr;  // never null in a context from device_context()
  CUstream_st* stream = nullptr;       // nullptr: the legacy default stream

  int num_sms() const { return device->multiprocessors; }
  size_t l2_bytes() const { return device->l2_bytes; }
  size_t smem_optin_per_block() const { return device->smem_optin_per_block; }
  int sm() const { return device->sm_major * 10 + device->sm_minor; }
};
// The current device's context on `stream`; throws CudaError when there is no device.
DeviceContext device_context(CUstream_st* stream = nullptr);

}  // namespace dsa::cuda
