#pragma once
// The few CUDA runtime calls the bindings make themselves (only in builds
// with the CUDA backend; no CUDA headers here).
#include <cstdint>

struct CUstream_st;

namespace dsalab::gpu {

// cudaSetDevice, checked (CudaError).
void set_device(int device);
// rows x row_bytes from a dense src into dst rows dst_pitch bytes apart, on `stream`.
void copy_rows_async(void* dst, int64_t dst_pitch, const void* src, int64_t row_bytes, int64_t rows, CUstream_st* stream);

}  // namespace dsalab::gpu
