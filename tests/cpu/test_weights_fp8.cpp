// save_weights_fp8: the layer written as the DeepSeek-V3.2 checkpoint stores
// it (e4m3 projections with 128x128 block scales, bf16 norms and
// weights_proj), checked against an e4m3 decoder and a nearest-value search
// written here, independently of dsa/dtypes.h, and read back by load_weights.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "cli_run.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "dsa/safetensors.h"
#include "scratch_dir.h"
#include "small_layer_config.h"

namespace {

using dsa::bf16_t;

// e4m3fn by its definition: 1 sign, 4 exponent (bias 7), 3 mantissa bits;
// exponent 0 is subnormal (m/8 * 2^-6); S.1111.111 is NaN; no infinities.
double decode_e4m3(uint8_t b) {
  const int sign = b >> 7, e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return sign ? -mag : mag;
}

// The e4m3 value nearest to x (|x| <= 448), ties to the even code.
double nearest_e4m3(double x) {
  static const std::vector<double> pos = [] {
    std::vector<double> v;
    for (int c = 0; c < 127; ++c) v.push_back(decode_e4m3(static_cast<uint8_t>(c)));  // 0 .. 448, ascending
    return v;
  }();
  const double a = std::fabs(x);
  const auto it = std::lower_bound(pos.begin(), pos.end(), a);
  size_t hi = static_cast<size_t>(it - pos.begin());
  if (hi >= pos.size()) hi = pos.size() - 1;
  size_t best = hi;
  if (hi > 0) {
    const double dl = a - pos[hi - 1], dh = pos[hi] - a;
    if (dl < dh || (dl == dh && (hi - 1) % 2 == 0)) best = hi - 1;
  }
  return x < 0 ? -pos[best] : pos[best];
}

float bf16f(bf16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Mat {
  std::string name;
  const std::vector<bf16_t>* w;
  int64_t rows, cols;
};

// A hidden size that is not a multiple of 128: q_a_proj, kv_a_proj_with_mqa,
// indexer.wk (in = 200) and o_proj (out = 200) have partial edge blocks, and
// kv_a_proj_with_mqa's 192 rows too.
dsa::LayerConfig odd_config() {
  dsa::LayerConfig c = dsa::test::small_layer_config();
  c.hidden_size = 200;
  dsa::validate(c);
  return c;
}

TEST(WeightsFp8, FileHoldsCheckpointDtypesAndBlockScales) {
  const dsa::LayerConfig c = odd_config();
  dsa::LayerWeights w = dsa::generate_weights(c, 11);
  // One all-zero 128x128 block: its scale must not be 0/0.
  for (int64_t i = 0; i < 128; ++i)
    for (int64_t j = 0; j < 128; ++j) w.q_b_proj[i * c.q_lora_rank + j] = 0;
  const std::string path = dsa::test::scratch_path("w_fp8_layout.safetensors");
  dsa::save_weights_fp8(c, w, path, 3, {{"dsa.layer", "3"}});

  const dsa::st::Reader r(path);
  EXPECT_EQ(r.metadata().at("dsa.layer"), "3");
  const std::string p = "model.layers.3.self_attn.";
  const int64_t H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim, h = c.hidden_size;
  const std::vector<Mat> fp8 = {
      {"q_a_proj.weight", &w.q_a_proj, c.q_lora_rank, h},
      {"q_b_proj.weight", &w.q_b_proj, H * c.qk_head_dim(), c.q_lora_rank},
      {"kv_a_proj_with_mqa.weight", &w.kv_a_proj_with_mqa, c.kv_lora_rank + c.qk_rope_head_dim, h},
      {"kv_b_proj.weight", &w.kv_b_proj, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank},
      {"o_proj.weight", &w.o_proj, h, H * c.v_head_dim},
      {"indexer.wq_b.weight", &w.idx_wq_b, HI * DI, c.q_lora_rank},
      {"indexer.wk.weight", &w.idx_wk, DI, h},
  };
  for (const Mat& m : fp8) {
    SCOPED_TRACE(m.name);
    ASSERT_TRUE(r.has(p + m.name));
    EXPECT_EQ(r.info(p + m.name).dtype, dsa::st::DType::F8_E4M3);
    EXPECT_EQ(r.info(p + m.name).shape, (std::vector<int64_t>{m.rows, m.cols}));
    const int64_t br = (m.rows + 127) / 128, bc = (m.cols + 127) / 128;
    ASSERT_TRUE(r.has(p + m.name + "_scale_inv"));
    EXPECT_EQ(r.info(p + m.name + "_scale_inv").dtype, dsa::st::DType::F32);
    EXPECT_EQ(r.info(p + m.name + "_scale_inv").shape, (std::vector<int64_t>{br, bc}));
    const std::vector<uint8_t> q = r.bytes(p + m.name);
    const std::vector<float> s = r.read_f32(p + m.name + "_scale_inv");
    int64_t off = 0;
    for (int64_t bi = 0; bi < br; ++bi) {
      for (int64_t bj = 0; bj < bc; ++bj) {
        float amax = 0;
        double qmax = 0;
        for (int64_t i = bi * 128; i < std::min(m.rows, bi * 128 + 128); ++i)
          for (int64_t j = bj * 128; j < std::min(m.cols, bj * 128 + 128); ++j) {
            amax = std::max(amax, std::fabs(bf16f((*m.w)[i * m.cols + j])));
            qmax = std::max(qmax, std::fabs(decode_e4m3(q[i * m.cols + j])));
          }
        const float want = amax > 0 ? amax / 448.0f : 1.0f;
        ASSERT_EQ(s[bi * bc + bj], want) << "block " << bi << "," << bj;
        // The block's largest magnitude maps to e4m3's largest.
        if (amax > 0) EXPECT_EQ(qmax, 448.0) << "block " << bi << "," << bj;
        for (int64_t i = bi * 128; i < std::min(m.rows, bi * 128 + 128); ++i)
          for (int64_t j = bj * 128; j < std::min(m.cols, bj * 128 + 128); ++j) {
            const double x = static_cast<double>(bf16f((*m.w)[i * m.cols + j]) / want);
            off += decode_e4m3(q[i * m.cols + j]) != nearest_e4m3(x);
          }
      }
    }
    EXPECT_EQ(off, 0) << "fp8 values that are not the nearest e4m3 of value / scale";
  }
  EXPECT_EQ(r.read_f32(p + "q_b_proj.weight_scale_inv")[0], 1.0f);  // the all-zero block
  // weights_proj and the norms stay bf16, bit for bit.
  const std::map<std::string, const std::vector<bf16_t>*> bf16 = {
      {"q_a_layernorm.weight", &w.q_a_layernorm},       {"kv_a_layernorm.weight", &w.kv_a_layernorm},
      {"indexer.k_norm.weight", &w.idx_k_norm_weight},  {"indexer.k_norm.bias", &w.idx_k_norm_bias},
      {"indexer.weights_proj.weight", &w.idx_weights_proj}};
  for (const auto& [name, v] : bf16) {
    EXPECT_EQ(r.info(p + name).dtype, dsa::st::DType::BF16) << name;
    EXPECT_EQ(r.read_bf16(p + name), *v) << name;
    EXPECT_FALSE(r.has(p + name + "_scale_inv")) << name;
  }
}

TEST(WeightsFp8, LoadsBackAsFp8TimesScaleRoundedToBf16) {
  const dsa::LayerConfig c = odd_config();
  const dsa::LayerWeights w = dsa::generate_weights(c, 12);
  const std::string path = dsa::test::scratch_path("w_fp8_roundtrip.safetensors");
  dsa::save_weights_fp8(c, w, path, 0);
  const dsa::LayerWeights back = dsa::load_weights(c, path, 0);

  // Independently: nearest e4m3 of value / (amax / 448), times the scale, to bf16.
  auto expect_dequantized = [](const char* name, const std::vector<bf16_t>& orig, const std::vector<bf16_t>& got, int64_t rows,
                               int64_t cols) {
    SCOPED_TRACE(name);
    ASSERT_EQ(got.size(), orig.size());
    int64_t bad = 0, changed = 0;
    for (int64_t bi = 0; bi < (rows + 127) / 128; ++bi)
      for (int64_t bj = 0; bj < (cols + 127) / 128; ++bj) {
        float amax = 0;
        for (int64_t i = bi * 128; i < std::min(rows, bi * 128 + 128); ++i)
          for (int64_t j = bj * 128; j < std::min(cols, bj * 128 + 128); ++j) amax = std::max(amax, std::fabs(bf16f(orig[i * cols + j])));
        const float s = amax > 0 ? amax / 448.0f : 1.0f;
        for (int64_t i = bi * 128; i < std::min(rows, bi * 128 + 128); ++i)
          for (int64_t j = bj * 128; j < std::min(cols, bj * 128 + 128); ++j) {
            const float v = bf16f(orig[i * cols + j]);
            const float deq = static_cast<float>(nearest_e4m3(static_cast<double>(v / s))) * s;
            // bf16 by hand: round to nearest even on the upper 16 bits.
            uint32_t u;
            std::memcpy(&u, &deq, 4);
            const bf16_t want = static_cast<bf16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            bad += got[i * cols + j] != want;
            changed += got[i * cols + j] != orig[i * cols + j];
            // e4m3 keeps 3 mantissa bits: within half a step of the value, or of the subnormal step.
            EXPECT_LE(std::fabs(bf16f(got[i * cols + j]) - v), std::max(std::fabs(v) * (1.0f / 16 + 1.0f / 256), s * std::ldexp(1.0f, -9)))
                << i << "," << j;
          }
      }
    EXPECT_EQ(bad, 0);
    EXPECT_GT(changed, 0) << "fp8 rounding left every value as it was: the test would not see a missing quantization";
  };
  const int64_t H = c.num_heads, h = c.hidden_size;
  expect_dequantized("q_a_proj", w.q_a_proj, back.q_a_proj, c.q_lora_rank, h);
  expect_dequantized("q_b_proj", w.q_b_proj, back.q_b_proj, H * c.qk_head_dim(), c.q_lora_rank);
  expect_dequantized("kv_a_proj_with_mqa", w.kv_a_proj_with_mqa, back.kv_a_proj_with_mqa, c.kv_lora_rank + c.qk_rope_head_dim, h);
  expect_dequantized("kv_b_proj", w.kv_b_proj, back.kv_b_proj, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
  expect_dequantized("o_proj", w.o_proj, back.o_proj, h, H * c.v_head_dim);
  expect_dequantized("indexer.wq_b", w.idx_wq_b, back.idx_wq_b, c.index_n_heads * c.index_head_dim, c.q_lora_rank);
  expect_dequantized("indexer.wk", w.idx_wk, back.idx_wk, c.index_head_dim, h);
  EXPECT_EQ(back.idx_weights_proj, w.idx_weights_proj);
  EXPECT_EQ(back.q_a_layernorm, w.q_a_layernorm);
  EXPECT_EQ(back.kv_a_layernorm, w.kv_a_layernorm);
  EXPECT_EQ(back.idx_k_norm_weight, w.idx_k_norm_weight);
  EXPECT_EQ(back.idx_k_norm_bias, w.idx_k_norm_bias);
}

TEST(WeightsFp8, RefusesNonFiniteWeightsByName) {
  const dsa::LayerConfig c = dsa::test::small_layer_config();
  dsa::LayerWeights w = dsa::generate_weights(c, 13);
  w.kv_b_proj[5] = 0x7fc0;  // NaN
  try {
    dsa::save_weights_fp8(c, w, dsa::test::scratch_path("w_fp8_nan.safetensors"), 0);
    FAIL() << "a NaN weight was quantized";
  } catch (const dsa::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("kv_b_proj"), std::string::npos) << e.what();
  }
}

// The command line: --save-weights-dtype fp8 writes the format, and a run on
// it reads it back.
TEST(WeightsFp8, CliWritesAndReplaysFp8Weights) {
  const std::string small = "--hidden-size 200 --q-lora-rank 128 --num-heads 64 --topk 64 --requests 0:8";
  const std::string w = dsa::test::scratch_path("cli_w8.safetensors");
  const auto a = dsa::test::run_dsa("run " + small + " --save-weights " + w + " --save-weights-dtype fp8");
  ASSERT_EQ(a.rc, 0) << a.err;
  EXPECT_NE(a.out.find("fp8"), std::string::npos) << a.out;
  const dsa::st::Reader r(w);
  EXPECT_EQ(r.info("model.layers.0.self_attn.o_proj.weight").dtype, dsa::st::DType::F8_E4M3);
  const auto b = dsa::test::run_dsa("run --weights " + w + " --requests 0:8");
  EXPECT_EQ(b.rc, 0) << b.err;
  dsa::test::expect_rejected("run " + small + " --save-weights " + w + " --save-weights-dtype fp4", {"--save-weights-dtype", "fp4", "bf16"});
  dsa::test::expect_rejected("run " + small + " --save-weights-dtype fp8", {"--save-weights-dtype", "--save-weights"});
}

}  // namespace
