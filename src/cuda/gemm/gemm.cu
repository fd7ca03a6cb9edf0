#include <fmt/format.h>

#include "cuda/check.cuh"
#include "cuda/gemm/gemm.h"
#include "dsa/error.h"

#define DSA_CUBLAS_CHECK(expr)                                                                              \
  do {                                                                                                      \
    cublasStatus_t dsa_st_ = (expr);                                                                        \
    if (dsa_st_ != CUBLAS_STATUS_SUCCESS) {                                                                 \
      throw ::dsa::CudaError(fmt::format("{} failed: {} at {}:{}", #expr, cublasLtGetStatusString(dsa_st_), \
                                         __FILE__, __LINE__));                                              \
    }                                                                                                       \
  } while (0)

namespace dsa::cuda {

namespace {
// Enough for split-K schemes at every shape of the layer; allocated once.
constexpr size_t kWorkspaceBytes = 64ull << 20;
}  // namespace

struct Gemm::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

Gemm::Gemm() {
  DSA_CUBLAS_CHECK(cublasLtCreate(&handle_));
  workspace_bytes_ = kWorkspaceBytes;
  DSA_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

Gemm::~Gemm() {
  for (auto& kv : plans_) delete kv.second;
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

namespace {
void set_batch(cublasLtMatrixLayout_t l, int batch, int64_t stride) {
  if (batch <= 1) return;
  DSA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
  DSA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
}
}  // namespace

Gemm::Plan& Gemm::plan_for(const GemmParams& p) {
  const Key key{p.M, p.N, p.K, p.ldx, p.ldw, p.ldy, p.batch_stride_x, p.batch_stride_w, p.batch_stride_y,
                p.batch, p.w_is_nk ? 1 : 0, p.out == GemmOut::FP32 ? 1 : 0};
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;

  auto* plan = new Plan;
  try {
    // Row-major Y[M,N] is column-major Y^T[N,M]; so compute Y^T = op(W)^T X^T
    // with cuBLASLt's A = W (as stored), B = X (as stored, column-major [K, M]).
    const cudaDataType_t ytype = p.out == GemmOut::FP32 ? CUDA_R_32F : CUDA_R_16BF;
    DSA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = p.w_is_nk ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
    DSA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    DSA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    // A as stored: W [N,K] row-major is column-major [K,N]; W [K,N] row-major is column-major [N,K].
    if (p.w_is_nk) {
      DSA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, p.K, p.N, p.ldw));
    } else {
      DSA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, p.N, p.K, p.ldw));
    }
    DSA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, p.K, p.M, p.ldx));
    DSA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, ytype, p.N, p.M, p.ldy));
    set_batch(plan->a, p.batch, p.batch_stride_w);
    set_batch(plan->b, p.batch, p.batch_stride_x);
    set_batch(plan->c, p.batch, p.batch_stride_y);

    cublasLtMatmulPreference_t pref = nullptr;
    DSA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    DSA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &workspace_bytes_, sizeof(workspace_bytes_)));
    cublasLtMatmulHeuristicResult_t res[1]{};
    int found = 0;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(handle_, plan->op, plan->a, plan->b, plan->c, plan->c, pref, 1, res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
      throw CudaError(fmt::format("cuBLASLt has no algorithm for the bf16 GEMM M={} N={} K={} (batch {}, ldx {}, ldw {}, "
                                  "ldy {}): {}; leading dimensions must keep rows 16-byte aligned",
                                  p.M, p.N, p.K, p.batch, p.ldx, p.ldw, p.ldy, cublasLtGetStatusString(st)));
    }
    plan->algo = res[0].algo;
  } catch (...) {
    delete plan;
    throw;
  }
  plans_[key] = plan;
  return *plan;
}

void Gemm::run(const DeviceContext& ctx, const GemmParams& p) {
  if (p.M < 0 || p.N <= 0 || p.K <= 0 || p.batch < 1) {
    throw ShapeError(fmt::format("GEMM shape M={} N={} K={} batch={} is invalid: N, K and batch must be positive", p.M, p.N,
                                 p.K, p.batch));
  }
  if (p.M == 0) return;
  if (p.ldx < p.K || p.ldy < p.N || p.ldw < (p.w_is_nk ? p.K : p.N)) {
    throw ShapeError(fmt::format("GEMM leading dimensions ldx={} ldw={} ldy={} are smaller than the rows they hold "
                                 "(K={}, N={}); pass the row stride in elements",
                                 p.ldx, p.ldw, p.ldy, p.K, p.N));
  }
  Plan& plan = plan_for(p);
  const float alpha = 1.0f, beta = 0.0f;
  DSA_CUBLAS_CHECK(cublasLtMatmul(handle_, plan.op, &alpha, p.w, plan.a, p.x, plan.b, &beta, p.y, plan.c, p.y, plan.c,
                                  &plan.algo, workspace_, workspace_bytes_, ctx.stream));
}

}  // namespace dsa::cuda
