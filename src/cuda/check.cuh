#pragma once
// Every CUDA call and launch is checked; failures become dsa::CudaError with
// the call, file and line, so a front end reports them instead of crashing.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include "dsa/error.h"

#define DSA_CUDA_CHECK(expr)                                                                                      \
  do {                                                                                                            \
    cudaError_t dsa_err_ = (expr);                                                                                \
    if (dsa_err_ == cudaErrorMemoryAllocation) {                                                                  \
      (void)cudaGetLastError();                                                                                   \
      throw ::dsa::OutOfMemoryError(fmt::format("{} failed: out of GPU memory ({}) at {}:{}", #expr,              \
                                                cudaGetErrorName(dsa_err_), __FILE__, __LINE__));                 \
    }                                                                                                             \
    if (dsa_err_ != cudaSuccess) {                                                                                \
      /* A non-sticky error stays in the runtime's last-error slot: clear it, or the next framework */            \
      /* call on this thread (PyTorch checks cudaGetLastError after its launches) reports it as its own. */      \
      (void)cudaGetLastError();                                                                                   \
      throw ::dsa::CudaError(fmt::format("{} failed: {} ({}) at {}:{}", #expr, cudaGetErrorString(dsa_err_),      \
                                         cudaGetErrorName(dsa_err_), __FILE__, __LINE__));                        \
    }                                                                                                             \
  } while (0)

// After a <<<>>> launch: configuration errors show up in cudaGetLastError.
#define DSA_CHECK_LAUNCH(name) DSA_CUDA_CHECK(cudaGetLastError())
