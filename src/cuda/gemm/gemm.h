#pragma once
// cuBLASLt wrapper for the layer's projections: bf16 in, fp32 accumulate,
// bf16 or fp32 out, row-major views, optional strided batch (one GEMM per
// head for q absorb and the V up-projection).
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "dsa/cuda.h"

namespace dsa::cuda {

enum class GemmOut { BF16, FP32 };

// Y[b][M, N] = X[b][M, K] @ op(W[b]), all row-major with explicit row strides.
//   w_is_nk = true : W is [N, K] (a Linear weight, y = x W^T)
//   w_is_nk = false: W is [K, N] (y = x W)
// Batch b of a tensor starts at ptr + b * batch_stride (elements).
struct GemmParams {
  const void* x = nullptr;  // bf16
  int64_t ldx = 0, batch_stride_x = 0;
  const void* w = nullptr;  // bf16
  int64_t ldw = 0, batch_stride_w = 0;
  bool w_is_nk = true;
  void* y = nullptr;  // bf16 or fp32 (out)
  int64_t ldy = 0, batch_stride_y = 0;
  GemmOut out = GemmOut::BF16;
  int64_t M = 0, N = 0, K = 0;
  int batch = 1;
};

// Owns the cuBLASLt handle, its workspace and one chosen algorithm per shape,
// so that a shape always runs the same algorithm (same bits every run) and
// the heuristic query happens once, outside CUDA-graph capture.
class Gemm {
 public:
  Gemm();
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // Runs on ctx.stream. Throws ShapeError for inconsistent sizes, CudaError
  // when cuBLASLt refuses.
  void run(const DeviceContext& ctx, const GemmParams& p);

 private:
  struct Plan;
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int>;
  Plan& plan_for(const GemmParams& p);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, Plan*> plans_;
};

}  // namespace dsa::cuda
