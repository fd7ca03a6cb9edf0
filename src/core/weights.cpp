#include <fmt/format.h>

#include <cmath>

#include "dsa/error.h"
#include "dsa/hash.h"
#include "dsa/layer.h"
#include "dsa/safetensors.h"

namespace dsa {

namespace {

// Counter-based: element i of stream `tag` depends on (seed, tag, i) only, so
// any tensor can be regenerated alone and in any order.
float uniform_pm1(uint64_t seed, uint64_t tag, uint64_t i) {
  const uint64_t h = mix64(mix64(seed ^ (tag * 0xd1b54a32d192ed03ull)) + i);
  return static_cast<float>((h >> 40) * (1.0 / 16777216.0) * 2.0 - 1.0);  // [-1, 1)
}

// Values of standard deviation `std` with no zeros (magnitude >= 5% of the
// range), rounded to bf16.
std::vector<bf16_t> random_bf16(int64_t n, uint64_t seed, uint64_t tag, double std) {
  std::vector<bf16_t> v(static_cast<size_t>(n));
  // E[mag^2] for mag = 0.05 + 0.95 |u|, u uniform: 0.0025 + 0.0475 + 0.9025 / 3.
  const double range = std / std::sqrt(0.0025 + 0.0475 + 0.9025 / 3.0);
  for (int64_t i = 0; i < n; ++i) {
    const float u = uniform_pm1(seed, tag, static_cast<uint64_t>(i));
    const float mag = 0.05f + 0.95f * std::fabs(u);
    v[i] = float_to_bf16(static_cast<float>((u < 0 ? -mag : mag) * range));
  }
  return v;
}

std::vector<bf16_t> around_one(int64_t n, uint64_t seed, uint64_t tag, double spread) {
  std::vector<bf16_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = float_to_bf16(static_cast<float>(1.0 + spread * uniform_pm1(seed, tag, i)));
  return v;
}

}  // namespace

LayerWeights generate_weights(const LayerConfig& c, uint64_t seed) {
  validate(c);
  const int64_t h = c.hidden_size, H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim;
  LayerWeights w;
  // Each projection gets std 1/sqrt(in), so unit-RMS inputs give O(1) outputs.
  w.q_a_proj = random_bf16(c.q_lora_rank * h, seed, 1, 1.0 / std::sqrt(double(h)));
  w.q_a_layernorm = around_one(c.q_lora_rank, seed, 2, 0.25);
  w.q_b_proj = random_bf16(H * c.qk_head_dim() * c.q_lora_rank, seed, 3, 1.0 / std::sqrt(double(c.q_lora_rank)));
  w.kv_a_proj_with_mqa = random_bf16(c.latent_dim() * h, seed, 4, 1.0 / std::sqrt(double(h)));
  w.kv_a_layernorm = around_one(c.kv_lora_rank, seed, 5, 0.25);
  w.kv_b_proj = random_bf16(H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank, seed, 6, 1.0 / std::sqrt(double(c.kv_lora_rank)));
  w.o_proj = random_bf16(h * H * c.v_head_dim, seed, 7, 1.0 / std::sqrt(double(H * c.v_head_dim)));
  w.idx_wq_b = random_bf16(HI * DI * c.q_lora_rank, seed, 8, 1.0 / std::sqrt(double(c.q_lora_rank)));
  w.idx_wk = random_bf16(DI * h, seed, 9, 1.0 / std::sqrt(double(h)));
  w.idx_k_norm_weight = around_one(DI, seed, 10, 0.25);
  w.idx_k_norm_bias = random_bf16(DI, seed, 11, 0.1);
  w.idx_weights_proj = random_bf16(HI * h, seed, 12, 1.0 / std::sqrt(double(h)));
  return w;
}

std::vector<bf16_t> generate_hidden(const LayerConfig& c, int64_t T, uint64_t seed) {
  return random_bf16(T * c.hidden_size, seed, 100, 1.0);
}

void check_weights(const LayerConfig& c, const LayerWeights& w) {
  const int64_t h = c.hidden_size, H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim;
  auto chk = [](const char* name, const std::vector<bf16_t>& v, int64_t rows, int64_t cols) {
    if (static_cast<int64_t>(v.size()) != rows * cols) {
      throw ShapeError(fmt::format("weight '{}' has {} elements but the configuration needs [{}, {}] = {}; check num_heads "
                                   "and the other dimensions of the configuration against the checkpoint",
                                   name, v.size(), rows, cols, rows * cols));
    }
  };
  chk("q_a_proj.weight", w.q_a_proj, c.q_lora_rank, h);
  chk("q_a_layernorm.weight", w.q_a_layernorm, c.q_lora_rank, 1);
  chk("q_b_proj.weight", w.q_b_proj, H * c.qk_head_dim(), c.q_lora_rank);
  chk("kv_a_proj_with_mqa.weight", w.kv_a_proj_with_mqa, c.latent_dim(), h);
  chk("kv_a_layernorm.weight", w.kv_a_layernorm, c.kv_lora_rank, 1);
  chk("kv_b_proj.weight", w.kv_b_proj, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
  chk("o_proj.weight", w.o_proj, h, H * c.v_head_dim);
  chk("indexer.wq_b.weight", w.idx_wq_b, HI * DI, c.q_lora_rank);
  chk("indexer.wk.weight", w.idx_wk, DI, h);
  chk("indexer.k_norm.weight", w.idx_k_norm_weight, DI, 1);
  chk("indexer.k_norm.bias", w.idx_k_norm_bias, DI, 1);
  chk("indexer.weights_proj.weight", w.idx_weights_proj, HI, h);
}

namespace {
template <class T, class ToFloat>
void check_finite_impl(const std::string& tensor, const std::vector<int64_t>& shape, const T* v, int64_t n, ToFloat to_float) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = to_float(v[i]);
    if (!std::isfinite(x)) {
      throw ValueError(fmt::format("'{}' {} holds {} at {} (element {} of {}); fix the data, or let non-finite values through on "
                                   "purpose (allow_nonfinite)",
                                   tensor, st::shape_string(shape), x, st::index_string(shape, i), i, n),
                       "allow_nonfinite");
    }
  }
}
}  // namespace

void check_finite(const std::string& tensor, const std::vector<int64_t>& shape, const bf16_t* v, int64_t n) {
  check_finite_impl(tensor, shape, v, n, [](bf16_t b) { return bf16_to_float(b); });
}

void check_finite(const std::string& tensor, const std::vector<int64_t>& shape, const float* v, int64_t n) {
  check_finite_impl(tensor, shape, v, n, [](float f) { return f; });
}

}  // namespace dsa
