// Dense building blocks of the reference: projections and norms.
#include <cmath>
#include <vector>

#include "dsa/reference.h"

namespace dsa::ref {

void linear(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K) {
  // Rows of x and w are both contiguous in K, so each output is one dot
  // product; blocks of 4 rows of w reuse each loaded x row. fp32 products,
  // accumulated in double per 4-wide lane group for a tight reference.
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      const float* xr = x + m * K;
      const int64_t n1 = std::min(N, n0 + 64);
      for (int64_t n = n0; n < n1; ++n) {
        const float* wr = w + n * K;
        double acc = 0.0;
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
          float part = 0.0f;
#pragma omp simd reduction(+ : part)
          for (int64_t kk = 0; kk < 64; ++kk) part += xr[k + kk] * wr[k + kk];
          acc += part;
        }
        for (; k < K; ++k) acc += static_cast<double>(xr[k]) * wr[k];
        y[m * N + n] = static_cast<float>(acc);
      }
    }
  }
}

void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t D, double eps) {
#pragma omp parallel for
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[r * D + i]) * x[r * D + i];
    const double inv = 1.0 / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) y[r * D + i] = static_cast<float>(x[r * D + i] * inv * weight[i]);
  }
}

void layer_norm(const float* x, const float* weight, const float* bias, float* y, int64_t rows, int64_t D, double eps) {
#pragma omp parallel for
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0.0;
    for (int64_t i = 0; i < D; ++i) mean += x[r * D + i];
    mean /= D;
    double var = 0.0;
    for (int64_t i = 0; i < D; ++i) var += (x[r * D + i] - mean) * (x[r * D + i] - mean);
    var /= D;
    const double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < D; ++i) y[r * D + i] = static_cast<float>((x[r * D + i] - mean) * inv * weight[i] + bias[i]);
  }
}

}  // namespace dsa::ref
