#include "cuda_glue.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <string>

#include "dsa/error.h"

namespace dsalab::gpu {

namespace {
void check(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return;
  // A non-sticky error stays in the runtime's last-error slot: clear it, or the
  // caller's framework reports it at its next launch as its own (as DSA_CUDA_CHECK does).
  (void)cudaGetLastError();
  const std::string msg = fmt::format("{} failed: {} ({})", what, cudaGetErrorString(e), cudaGetErrorName(e));
  if (e == cudaErrorMemoryAllocation) throw dsa::OutOfMemoryError(msg);
  throw dsa::CudaError(msg);
}
}  // namespace

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) return;
  int cur = -1;
  check(cudaGetDevice(&cur), "cudaGetDevice");
  if (cur != device) check(cudaSetDevice(device), fmt::format("cudaSetDevice({})", device));
  prev_ = cur;
}

DeviceGuard::~DeviceGuard() {
  if (prev_ < 0) return;
  int cur = -1;
  if (cudaGetDevice(&cur) == cudaSuccess && cur == prev_) return;
  // A destructor cannot throw: a failed restore leaves the error slot clean for the caller's framework.
  if (cudaSetDevice(prev_) != cudaSuccess) (void)cudaGetLastError();
}

Event::~Event() {
  // cudaEventDestroy on an event still pending returns at once and frees it when the work completes.
  if (ev_ && cudaEventDestroy(ev_) != cudaSuccess) (void)cudaGetLastError();
}

void Event::record(CUstream_st* stream) {
  if (!ev_) check(cudaEventCreateWithFlags(&ev_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  check(cudaEventRecord(ev_, stream), "cudaEventRecord");
  recorded_ = true;
}

void Event::synchronize() const {
  if (recorded_) check(cudaEventSynchronize(ev_), "cudaEventSynchronize (the layer's previous step)");
}

void Event::wait_on(CUstream_st* stream) const {
  if (recorded_) check(cudaStreamWaitEvent(stream, ev_, 0), "cudaStreamWaitEvent");
}

CUstream_st* legacy_stream() { return cudaStreamLegacy; }

void copy_rows_async(void* dst, int64_t dst_pitch, const void* src, int64_t row_bytes, int64_t rows, CUstream_st* stream) {
  if (rows == 0 || row_bytes == 0) return;
  check(cudaMemcpy2DAsync(dst, static_cast<size_t>(dst_pitch), src, static_cast<size_t>(row_bytes), static_cast<size_t>(row_bytes),
                          static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpy2DAsync (layer output to the caller's tensor)");
}

void synchronize(int device, CUstream_st* stream) {
  DeviceGuard g(device);
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize (the stream a dsalab op ran on)");
}

}  // namespace dsalab::gpu
