#include "cuda_glue.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include "dsa/error.h"

namespace dsalab::gpu {

namespace {
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw dsa::CudaError(fmt::format("{} failed: {} ({})", what, cudaGetErrorString(e), static_cast<int>(e)));
}
}  // namespace

void set_device(int device) { check(cudaSetDevice(device), fmt::format("cudaSetDevice({})", device).c_str()); }

void copy_rows_async(void* dst, int64_t dst_pitch, const void* src, int64_t row_bytes, int64_t rows, CUstream_st* stream) {
  if (rows == 0 || row_bytes == 0) return;
  check(cudaMemcpy2DAsync(dst, static_cast<size_t>(dst_pitch), src, static_cast<size_t>(row_bytes), static_cast<size_t>(row_bytes),
                          static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpy2DAsync (layer output to the caller's tensor)");
}

}  // namespace dsalab::gpu
