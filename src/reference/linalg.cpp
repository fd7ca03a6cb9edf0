// Dense building blocks of the reference: a blocked GEMM, projections and norms.
//
// The GEMM is a small BLIS-style loop nest (packed 6x16 register tiles) so
// that the seed's shape runs in minutes on a CPU without OpenBLAS, which the
// GPU machine lacks. Accuracy: fp32 products summed in fp32 within each
// 256-long slice of K, slices summed in fp64. With K <= 256 per slice the fp32
// part contributes ~1e-6 relative error, far below bf16 rounding (4e-3), and
// the summation order is fixed, so the result does not depend on the number of
// threads.
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "dsa/reference.h"
#include "internal.h"

namespace dsa::ref {

namespace {

constexpr int64_t kMR = 6;    // rows of a register tile
constexpr int64_t kNR = 16;   // columns of a register tile (two AVX2 vectors)
constexpr int64_t kKC = 256;  // K slice summed in fp32
constexpr int64_t kNC = 256;  // columns per fp64 accumulation block

#if defined(__x86_64__)
// tile[kMR][kNR] = ap[kc][kMR]^T-packed A times bp[kc][kNR] packed B, fresh (not accumulated).
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t kc, const float* ap, const float* bp, float* tile) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp + k * kNR);
    const __m256 b1 = _mm256_loadu_ps(bp + k * kNR + 8);
    const float* a = ap + k * kMR;
    __m256 av = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  _mm256_storeu_ps(tile + 0 * kNR, c00);
  _mm256_storeu_ps(tile + 0 * kNR + 8, c01);
  _mm256_storeu_ps(tile + 1 * kNR, c10);
  _mm256_storeu_ps(tile + 1 * kNR + 8, c11);
  _mm256_storeu_ps(tile + 2 * kNR, c20);
  _mm256_storeu_ps(tile + 2 * kNR + 8, c21);
  _mm256_storeu_ps(tile + 3 * kNR, c30);
  _mm256_storeu_ps(tile + 3 * kNR + 8, c31);
  _mm256_storeu_ps(tile + 4 * kNR, c40);
  _mm256_storeu_ps(tile + 4 * kNR + 8, c41);
  _mm256_storeu_ps(tile + 5 * kNR, c50);
  _mm256_storeu_ps(tile + 5 * kNR + 8, c51);
}

#endif

void micro_generic(int64_t kc, const float* ap, const float* bp, float* tile) {
  float acc[kMR][kNR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t i = 0; i < kMR; ++i) {
      const float a = ap[k * kMR + i];
      for (int64_t j = 0; j < kNR; ++j) acc[i][j] += a * bp[k * kNR + j];
    }
  }
  std::memcpy(tile, acc, sizeof(acc));
}

using MicroFn = void (*)(int64_t, const float*, const float*, float*);

MicroFn pick_micro() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return micro_avx2;
#endif
  return micro_generic;
}

const MicroFn kMicro = pick_micro();

// A rows [m0, m0+rows) x K slice [k0, k0+kb) -> ap[kb][kMR], missing rows zero.
void pack_a(const float* A, int64_t lda, int64_t m0, int64_t rows, int64_t k0, int64_t kb, float* ap) {
  for (int64_t k = 0; k < kb; ++k) {
    for (int64_t i = 0; i < kMR; ++i) ap[k * kMR + i] = i < rows ? A[(m0 + i) * lda + k0 + k] : 0.0f;
  }
}

// op(B) columns [n0, n0+cols) x K slice [k0, k0+kb) -> bp[kb][kNR], missing columns zero.
void pack_b(const float* B, int64_t ldb, bool b_trans, int64_t n0, int64_t cols, int64_t k0, int64_t kb, float* bp) {
  if (b_trans) {  // op(B)[k][n] = B[n][k]
    for (int64_t j = 0; j < kNR; ++j) {
      if (j < cols) {
        const float* src = B + (n0 + j) * ldb + k0;
        for (int64_t k = 0; k < kb; ++k) bp[k * kNR + j] = src[k];
      } else {
        for (int64_t k = 0; k < kb; ++k) bp[k * kNR + j] = 0.0f;
      }
    }
  } else {
    for (int64_t k = 0; k < kb; ++k) {
      const float* src = B + (k0 + k) * ldb + n0;
      for (int64_t j = 0; j < kNR; ++j) bp[k * kNR + j] = j < cols ? src[j] : 0.0f;
    }
  }
}

}  // namespace

namespace {

// C[m0:m1, n0:n1] of the product, packing its own B slices: no state shared
// between threads, so no barriers (which cost whole scheduler time slices on
// an oversubscribed machine).
void gemm_part(int64_t m0, int64_t m1, int64_t n_begin, int64_t n_end, int64_t K, const float* A, int64_t lda, const float* B,
               int64_t ldb, bool b_trans, float* C, int64_t ldc, bool accumulate) {
  if (m1 <= m0 || n_end <= n_begin) return;
  const int64_t rows_total = m1 - m0;
  thread_local std::vector<float> apack, bpack;
  thread_local std::vector<double> cd;
  apack.resize(static_cast<size_t>(kKC * kMR));
  bpack.resize(static_cast<size_t>(kKC * kNC));
  cd.resize(static_cast<size_t>(rows_total * kNC));
  float tile[kMR * kNR];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNC) {
    const int64_t nb = std::min(kNC, n_end - n0);
    const int64_t npanels = (nb + kNR - 1) / kNR;
    std::fill(cd.begin(), cd.begin() + rows_total * nb, 0.0);
    for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += kKC) {
      const int64_t kb = std::min(kKC, K - k0);
      for (int64_t p = 0; p < npanels; ++p) {
        pack_b(B, ldb, b_trans, n0 + p * kNR, std::min(kNR, nb - p * kNR), k0, kb, bpack.data() + p * kb * kNR);
      }
      for (int64_t mt = m0; mt < m1; mt += kMR) {
        const int64_t rows = std::min(kMR, m1 - mt);
        pack_a(A, lda, mt, rows, k0, kb, apack.data());
        for (int64_t p = 0; p < npanels; ++p) {
          const int64_t cols = std::min(kNR, nb - p * kNR);
          kMicro(kb, apack.data(), bpack.data() + p * kb * kNR, tile);
          for (int64_t i = 0; i < rows; ++i) {
            double* dst = cd.data() + (mt - m0 + i) * nb + p * kNR;
            for (int64_t j = 0; j < cols; ++j) dst[j] += tile[i * kNR + j];
          }
        }
      }
    }
    for (int64_t m = m0; m < m1; ++m) {
      float* dst = C + m * ldc + n0;
      const double* src = cd.data() + (m - m0) * nb;
      if (accumulate) {
        for (int64_t j = 0; j < nb; ++j) dst[j] = static_cast<float>(dst[j] + src[j]);
      } else {
        for (int64_t j = 0; j < nb; ++j) dst[j] = static_cast<float>(src[j]);
      }
    }
  }
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, bool b_trans, float* C,
          int64_t ldc, bool accumulate, bool parallel) {
  if (M <= 0 || N <= 0) return;
  // Small products are not worth waking threads for.
  const bool par = parallel && omp_get_max_threads() > 1 && !omp_in_parallel() && double(M) * N * std::max<int64_t>(K, 1) >= 4e6;
  if (!par) {
    gemm_part(0, M, 0, N, K, A, lda, B, ldb, b_trans, C, ldc, accumulate);
    return;
  }
  const int64_t mtiles = (M + kMR - 1) / kMR;
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    if (mtiles >= 2 * nt) {
      // Contiguous row-tile ranges: each thread streams B once.
      const int64_t t0 = mtiles * id / nt, t1 = mtiles * (id + 1) / nt;
      gemm_part(t0 * kMR, std::min(M, t1 * kMR), 0, N, K, A, lda, B, ldb, b_trans, C, ldc, accumulate);
    } else {
      const int64_t panels = (N + kNR - 1) / kNR;
      const int64_t p0 = panels * id / nt, p1 = panels * (id + 1) / nt;
      gemm_part(0, M, p0 * kNR, std::min(N, p1 * kNR), K, A, lda, B, ldb, b_trans, C, ldc, accumulate);
    }
  }
}

void linear(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K) {
  gemm(M, N, K, x, K, w, K, /*b_trans=*/true, y, N, /*accumulate=*/false, /*parallel=*/true);
}

void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t D, double eps) {
#pragma omp parallel for if (rows * D >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[r * D + i]) * x[r * D + i];
    const double inv = 1.0 / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) y[r * D + i] = static_cast<float>(x[r * D + i] * inv * weight[i]);
  }
}

void layer_norm(const float* x, const float* weight, const float* bias, float* y, int64_t rows, int64_t D, double eps) {
#pragma omp parallel for if (rows * D >= 65536)
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
