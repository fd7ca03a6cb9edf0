// The reference of the non-GEMM stages of spec section 3: RoPE, the Hadamard
// rotation, fp8 block quantization, indexer logits, top-k and sparse MLA.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "dsa/error.h"
#include "dsa/reference.h"
#include "internal.h"

namespace dsa::ref {

namespace detail {

const float* fp8_lut() {
  static const std::vector<float> lut = [] {
    std::vector<float> v(256);
    for (int i = 0; i < 256; ++i) v[i] = fp8_e4m3_to_float(static_cast<fp8_t>(i));
    return v;
  }();
  return lut.data();
}

void sparse_mla_token(const float* q_t, const float* kv, int64_t num_slots, const int32_t* idx, int64_t topk, int64_t H,
                      int64_t Dqk, int64_t Dv, double softmax_scale, float* out_t, float* lse_t, float* max_t,
                      bool parallel, MlaScratch& ws) {
  ws.rows.clear();
  for (int64_t j = 0; j < topk; ++j) {
    if (idx[j] >= 0 && idx[j] < num_slots) ws.rows.push_back(idx[j]);
  }
  const int64_t n = static_cast<int64_t>(ws.rows.size());
  if (n == 0) {
    // Nothing to attend to: defined as output 0 and lse +inf (so that merging
    // it with another partial result gives that result's weight 1).
    std::fill(out_t, out_t + H * Dv, 0.0f);
    std::fill(lse_t, lse_t + H, std::numeric_limits<float>::infinity());
    if (max_t) std::fill(max_t, max_t + H, -std::numeric_limits<float>::infinity());
    return;
  }
  // Gathering the selected rows once turns both products into dense GEMMs.
  ws.k.resize(static_cast<size_t>(n * Dqk));
  for (int64_t j = 0; j < n; ++j) std::copy(kv + ws.rows[j] * Dqk, kv + (ws.rows[j] + 1) * Dqk, ws.k.data() + j * Dqk);
  ws.s.resize(static_cast<size_t>(H * n));
  gemm(H, n, Dqk, q_t, Dqk, ws.k.data(), Dqk, /*b_trans=*/true, ws.s.data(), n, false, parallel);
  const float scale = static_cast<float>(softmax_scale);
  std::vector<double> inv_sum(static_cast<size_t>(H));
  for (int64_t h = 0; h < H; ++h) {
    float* s = ws.s.data() + h * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      s[j] *= scale;
      m = std::max(m, s[j]);
    }
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m);
      sum += s[j];
    }
    lse_t[h] = static_cast<float>(m + std::log(sum));
    if (max_t) max_t[h] = m;
    inv_sum[h] = 1.0 / sum;
  }
  gemm(H, Dv, n, ws.s.data(), n, ws.k.data(), Dqk, /*b_trans=*/false, out_t, Dv, false, parallel);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t d = 0; d < Dv; ++d) out_t[h * Dv + d] = static_cast<float>(out_t[h * Dv + d] * inv_sum[h]);
  }
}

}  // namespace detail

void apply_rope(float* x, int64_t rows, int64_t stride, int64_t col0, int64_t rows_per_pos, const int32_t* pos,
                const std::vector<double>& inv_freq, RopeStyle style) {
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  std::vector<float> f(inv_freq.begin(), inv_freq.end());  // kernels receive fp32 f_i' (docs/numerics.md)
#pragma omp parallel for schedule(static) if (rows >= 1024)
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * stride + col0;
    const float p = static_cast<float>(pos[r / rows_per_pos]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = p * f[i];
      const float c = std::cos(angle), s = std::sin(angle);
      float* a = style == RopeStyle::Interleaved ? v + 2 * i : v + i;
      float* b = style == RopeStyle::Interleaved ? v + 2 * i + 1 : v + i + half;
      const float x0 = *a, x1 = *b;
      *a = x0 * c - x1 * s;
      *b = x0 * s + x1 * c;
    }
  }
}

void hadamard128(float* x, int64_t vectors) {
  constexpr int64_t n = 128;
  const double norm = 1.0 / std::sqrt(static_cast<double>(n));
#pragma omp parallel for schedule(static) if (vectors >= 512)
  for (int64_t v = 0; v < vectors; ++v) {
    double t[n];
    for (int64_t i = 0; i < n; ++i) t[i] = x[v * n + i];
    // Butterflies in this order give the Sylvester matrix H_{2m} = [[H, H], [H, -H]].
    for (int64_t h = 1; h < n; h *= 2) {
      for (int64_t i = 0; i < n; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const double a = t[j], b = t[j + h];
          t[j] = a + b;
          t[j + h] = a - b;
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) x[v * n + i] = static_cast<float>(t[i] * norm);
  }
}

void quantize_fp8_blocks(const float* x, int64_t vectors, int64_t block, fp8_t* q8, float* scale) {
#pragma omp parallel for schedule(static) if (vectors >= 512)
  for (int64_t v = 0; v < vectors; ++v) {
    const float* src = x + v * block;
    float amax = 0.0f;
    for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(src[i]));
    const float s = ue8m0_scale(amax);
    scale[v] = s;
    if (q8) {
      // s is a power of two, so v / s is exact and only the e4m3 rounding remains.
      for (int64_t i = 0; i < block; ++i) q8[v * block + i] = float_to_fp8_e4m3(src[i] / s);
    }
  }
}

void indexer_logits(const fp8_t* q_fp8, const float* weights, const uint8_t* k_cache, const int32_t* block_table,
                    const int32_t* token_request, const int32_t* visible_end, int64_t T, int64_t HI,
                    int64_t max_blocks_per_request, int64_t tokens_per_block, int64_t logits_stride, float* logits) {
  constexpr int64_t D = 128;
  const int64_t block_bytes = tokens_per_block * (D + 4);
  // Checked up front: errors cannot leave an OpenMP region.
  for (int64_t t = 0; t < T; ++t) {
    const int64_t vis = visible_end[t];
    if (vis < 0 || vis > logits_stride || vis > max_blocks_per_request * tokens_per_block) {
      throw ShapeError(fmt::format("indexer_logits: token {} has visible_end {}, outside [0, min(logits_stride {}, {} blocks x {} "
                                   "tokens)]; build the metadata with build_batch_metadata",
                                   t, vis, logits_stride, max_blocks_per_request, tokens_per_block));
    }
    const int64_t r = token_request[t];
    if (r < 0) throw ShapeError(fmt::format("indexer_logits: token {} has request index {}, which is negative", t, r));
    for (int64_t b = 0; b < (vis + tokens_per_block - 1) / tokens_per_block; ++b) {
      if (block_table[r * max_blocks_per_request + b] < 0) {
        throw ShapeError(fmt::format("indexer_logits: token {} sees {} keys but request {} has no block {} (block table entry -1); "
                                     "reserve the request's tokens in the cache first",
                                     t, vis, r, b));
      }
    }
  }
  const float* lut = detail::fp8_lut();
  const bool per_token = T >= 2 * omp_get_max_threads();
#pragma omp parallel if (per_token)
  {
    std::vector<float> q(static_cast<size_t>(HI * D)), k, kscale, s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t vis = visible_end[t];
      const int64_t r = token_request[t];
      float* row = logits + t * logits_stride;
      std::fill(row + vis, row + logits_stride, -std::numeric_limits<float>::infinity());
      if (vis == 0) continue;
      for (int64_t i = 0; i < HI * D; ++i) q[i] = lut[q_fp8[t * HI * D + i]];
      k.resize(static_cast<size_t>(vis * D));
      kscale.resize(static_cast<size_t>(vis));
      for (int64_t p = 0; p < vis; ++p) {
        const uint8_t* blk = k_cache + static_cast<int64_t>(block_table[r * max_blocks_per_request + p / tokens_per_block]) * block_bytes;
        const int64_t off = p % tokens_per_block;
        for (int64_t i = 0; i < D; ++i) k[p * D + i] = lut[blk[off * D + i]];
        std::memcpy(&kscale[p], blk + tokens_per_block * D + off * 4, 4);
      }
      s.resize(static_cast<size_t>(HI * vis));
      gemm(HI, vis, D, q.data(), D, k.data(), D, /*b_trans=*/true, s.data(), vis, false, !per_token);
      const float* w = weights + t * HI;
      for (int64_t p = 0; p < vis; ++p) {
        double acc = 0.0;
        for (int64_t h = 0; h < HI; ++h) acc += static_cast<double>(w[h]) * std::max(s[h * vis + p], 0.0f);
        row[p] = static_cast<float>(acc * kscale[p]);
      }
    }
  }
}

void topk(const float* logits, int64_t T, int64_t S, const int32_t* visible_end, int64_t k, int32_t* out) {
  for (int64_t t = 0; t < T; ++t) {
    if (visible_end[t] < 0 || visible_end[t] > S) {
      throw ShapeError(fmt::format("topk: token {} has visible_end {}, outside the logits row [0, {}]", t, visible_end[t], S));
    }
  }
#pragma omp parallel if (T >= 64)
  {
    std::vector<int32_t> cand;
#pragma omp for schedule(dynamic, 16)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t vis = visible_end[t];
      const float* row = logits + t * S;
      int32_t* dst = out + t * k;
      int64_t n = 0;
      if (vis <= k || k == 0) {
        for (; n < std::min(vis, k); ++n) dst[n] = static_cast<int32_t>(n);
      } else {
        cand.resize(static_cast<size_t>(vis));
        std::iota(cand.begin(), cand.end(), 0);
        // NaN ranks below everything so that the order stays a strict weak ordering.
        auto key = [row](int32_t i) { return std::isnan(row[i]) ? -std::numeric_limits<float>::infinity() : row[i]; };
        auto before = [&](int32_t a, int32_t b) {
          const float ka = key(a), kb = key(b);
          return ka > kb || (ka == kb && a < b);  // ties to the smaller position
        };
        std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
        std::sort(cand.begin(), cand.begin() + k);
        for (; n < k; ++n) dst[n] = cand[n];
      }
      for (; n < k; ++n) dst[n] = -1;
    }
  }
}

void sparse_mla(const float* q, const float* kv, int64_t num_slots, const int32_t* indices, int64_t T, int64_t H,
                int64_t topk, int64_t Dqk, int64_t Dv, double softmax_scale, float* out, float* lse, float* rowmax) {
  if (Dv > Dqk) throw ShapeError(fmt::format("sparse_mla: d_v {} exceeds d_qk {}; values are the first d_v dims of each row", Dv, Dqk));
  const bool per_token = T >= 2 * omp_get_max_threads();
#pragma omp parallel if (per_token)
  {
    detail::MlaScratch ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < T; ++t) {
      detail::sparse_mla_token(q + t * H * Dqk, kv, num_slots, indices + t * topk, topk, H, Dqk, Dv, softmax_scale,
                               out + t * H * Dv, lse + t * H, rowmax ? rowmax + t * H : nullptr, !per_token, ws);
    }
  }
}

}  // namespace dsa::ref
