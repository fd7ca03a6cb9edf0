#pragma once
// The few CUDA runtime calls the bindings make themselves (only in builds
// with the CUDA backend; no CUDA headers here).
#include <cstdint>

struct CUstream_st;
struct CUevent_st;

namespace dsalab::gpu {

// Makes `device` current for its lifetime and restores the device that was
// current before (the caller's framework tracks its own per-thread device and
// must find it unchanged). Checked (CudaError); the restore never throws.
// A negative device: no-op (host objects).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// A timing-free CUDA event on the current device, created lazily at the first
// record(); destroyed with the object.
class Event {
 public:
  Event() = default;
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(CUstream_st* stream);
  // Blocks the host until the work recorded before it is done (no-op before the first record()).
  void synchronize() const;
  // Makes `stream` wait on the device for the recorded work.
  void wait_on(CUstream_st* stream) const;
  bool recorded() const { return recorded_; }

 private:
  CUevent_st* ev_ = nullptr;
  bool recorded_ = false;
};

// The legacy default stream (cudaStreamLegacy), where the CUDA layer's
// synchronous uploads run whatever the build's default-stream mode is.
CUstream_st* legacy_stream();

// rows x row_bytes from a dense src into dst rows dst_pitch bytes apart, on `stream`.
void copy_rows_async(void* dst, int64_t dst_pitch, const void* src, int64_t row_bytes, int64_t rows, CUstream_st* stream);

// cudaStreamSynchronize(stream) with `device` current.
void synchronize(int device, CUstream_st* stream);

}  // namespace dsalab::gpu
