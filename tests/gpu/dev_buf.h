#pragma once
// Device buffer for GPU tests: owns a cudaMalloc'd array; p stays null when
// the allocation fails, so a test can ASSERT on it instead of crashing.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

namespace dsa::test {

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  size_t bytes() const { return n * sizeof(T); }
};

}  // namespace dsa::test
