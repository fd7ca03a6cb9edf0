// Safetensors reading and writing, malformed files, and the layer's weights files.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <unistd.h>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "dsa/reference.h"
#include "dsa/safetensors.h"
#include "expect_error.h"
#include "small_layer_config.h"

using namespace dsa;
using dsa::test::expect_error;
using dsa::test::small_layer_config;
namespace fs = std::filesystem;

namespace {

// A fresh folder per process, removed at exit.
struct TmpDir {
  fs::path path = fs::temp_directory_path() / ("dsa_st_test_" + std::to_string(::getpid()));
  TmpDir() { fs::create_directories(path); }
  ~TmpDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

fs::path tmp_dir() {
  static const TmpDir d;
  return d.path;
}

std::string tmp(const std::string& name) { return (tmp_dir() / name).string(); }

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A file with the given header text and `data` bytes after it.
std::string raw_file(const std::string& header, size_t data_bytes, uint64_t len_override = UINT64_MAX) {
  std::string s(8, '\0');
  const uint64_t n = len_override == UINT64_MAX ? header.size() : len_override;
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s + header + std::string(data_bytes, '\x11');
}

void expect_bad(const std::string& name, const std::string& file, std::initializer_list<const char*> fragments) {
  const std::string p = tmp(name);
  write_bytes(p, file);
  SCOPED_TRACE(name);
  expect_error<FileError>([&] { st::Reader r(p); }, fragments);
}

bool same(const LayerWeights& a, const LayerWeights& b) {
  return a.q_a_proj == b.q_a_proj && a.q_a_layernorm == b.q_a_layernorm && a.q_b_proj == b.q_b_proj &&
         a.kv_a_proj_with_mqa == b.kv_a_proj_with_mqa && a.kv_a_layernorm == b.kv_a_layernorm && a.kv_b_proj == b.kv_b_proj &&
         a.o_proj == b.o_proj && a.idx_wq_b == b.idx_wq_b && a.idx_wk == b.idx_wk && a.idx_k_norm_weight == b.idx_k_norm_weight &&
         a.idx_k_norm_bias == b.idx_k_norm_bias && a.idx_weights_proj == b.idx_weights_proj;
}

}  // namespace

TEST(Safetensors, RoundTripsEveryKindOfTensor) {
  st::Writer w;
  w.add_bf16("b", {2, 3}, {0x3f80, 0xbf80, 0x4000, 0x0001, 0x7f80, 0x4049});
  w.add_f32("f", {3}, {1.5f, -2.25f, 1e30f});
  w.add_i32("i", {2, 2}, {1, -2, 3, 2147483647});
  w.add_i64("l", {1}, {-5});
  w.add_u8("q", st::DType::F8_E4M3, {2}, {0x38, 0xb8});  // 1.0, -1.0
  w.add_u8("e", st::DType::F8_E5M2, {1}, {0x3c});         // 1.0
  w.add("h", st::DType::F16, {2}, {0x00, 0x3c, 0x00, 0xc0}); // 1.0, -2.0
  w.add_f32("empty", {0, 4}, {});
  w.add_f32("scalar", {}, {7.0f});
  w.set_metadata("k", "v");
  const std::string p = tmp("ok.safetensors");
  w.write(p);
  st::Reader r(p);
  EXPECT_EQ(r.tensors().size(), 9u);
  EXPECT_EQ(r.metadata().at("k"), "v");
  EXPECT_EQ(r.info("b").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(r.read_bf16("b"), (std::vector<bf16_t>{0x3f80, 0xbf80, 0x4000, 0x0001, 0x7f80, 0x4049}));
  EXPECT_EQ(r.read_f32("f"), (std::vector<float>{1.5f, -2.25f, 1e30f}));
  EXPECT_EQ(r.read_bf16("f")[0], float_to_bf16(1.5f));
  EXPECT_EQ(r.read_i64("i"), (std::vector<int64_t>{1, -2, 3, 2147483647}));
  EXPECT_EQ(r.read_i64("l"), (std::vector<int64_t>{-5}));
  EXPECT_EQ(r.read_f32("q"), (std::vector<float>{1.0f, -1.0f}));
  EXPECT_EQ(r.read_f32("e"), (std::vector<float>{1.0f}));
  EXPECT_EQ(r.read_f32("h"), (std::vector<float>{1.0f, -2.0f}));
  EXPECT_TRUE(r.read_f32("empty").empty());
  EXPECT_EQ(r.read_f32("scalar"), (std::vector<float>{7.0f}));
  // The data section starts 8-byte aligned.
  std::ifstream f(p, std::ios::binary);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  expect_error<FileError>([&] { r.info("nope"); }, {"nope"});
  expect_error<FileError>([&] { r.read_i64("f"); }, {"'f'", "F32", "integer"});
  expect_error<FileError>([&] { r.read_f32("i"); }, {"'i'", "I32"});
  expect_error<FileError>([&] { r.expect_shape("b", {3, 2}); }, {"[2, 3]", "[3, 2]"});
}

TEST(Safetensors, MalformedFilesAreFileErrors) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  expect_bad("short", std::string(5, '\0'), {"fewer than the 8-byte header"});
  expect_bad("len_past_end", raw_file(ok, 8, 1000), {"runs past the end"});
  expect_bad("len_huge", raw_file(ok, 8, uint64_t(1) << 62), {"exceeds the format's limit"});
  expect_bad("bad_json", raw_file(R"({"a":{"dtype":"F32",)", 8), {"not valid JSON"});
  expect_bad("not_object", raw_file("[1,2,3]", 0), {"not an object"});
  expect_bad("dtype", raw_file(R"({"a":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}})", 8), {"'a'", "F12", "BF16"});
  expect_bad("size_mismatch", raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), {"'a'", "needs 12 bytes"});
  expect_bad("past_data", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 7), {"'a'", "run past"});
  expect_bad("overlap", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
             {"overlap", "'a'", "'b'"});
  expect_bad("overlap_after_empty",
             raw_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                      16),
             {"overlap"});
  expect_bad("reversed", raw_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), {"end before"});
  expect_bad("neg_shape", raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), {"non-negative"});
  expect_bad("float_shape", raw_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8), {"non-negative integer"});
  expect_bad("huge_shape", raw_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8), {"too many"});
  expect_bad("neg_offset", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8), {"non-negative"});
  expect_bad("one_offset", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), {"two byte offsets"});
  expect_bad("no_dtype", raw_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), {"'dtype'"});
  expect_bad("extra_field", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8), {"unknown field 'x'"});
  expect_bad("dup", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16),
             {"'a' appears twice"});
  expect_bad("meta", raw_file(R"({"__metadata__":{"k":1}})", 0), {"__metadata__"});
  expect_error<FileError>([] { st::Reader r(tmp("does_not_exist.safetensors")); }, {"does_not_exist"});

  // A valid file cut short anywhere in its data is caught before any read.
  st::Writer w;
  w.add_f32("x", {64}, std::vector<float>(64, 1.0f));
  const std::string p = tmp("trunc.safetensors");
  w.write(p);
  fs::resize_file(p, fs::file_size(p) - 3);
  expect_error<FileError>([&] { st::Reader r(p); }, {"'x'", "run past"});
}

TEST(WeightsFile, WriteThenReadIsBitExactAndGivesIdenticalLayerResults) {
  const LayerConfig cfg = small_layer_config();
  const LayerWeights w = generate_weights(cfg, 31);
  const std::string p = tmp("layer3.safetensors");
  save_weights(cfg, w, p, 3);
  st::Reader r(p);
  EXPECT_TRUE(r.has("model.layers.3.self_attn.indexer.k_norm.bias"));
  EXPECT_EQ(r.info("model.layers.3.self_attn.kv_b_proj.weight").shape, (std::vector<int64_t>{64 * 64, 128}));
  const LayerWeights back = load_weights(cfg, p, 3);
  EXPECT_TRUE(same(w, back));
  expect_error<FileError>([&] { load_weights(cfg, p, 0); }, {"model.layers.0.self_attn.q_a_proj.weight", "layer index"});
  LayerConfig other = cfg;
  other.num_heads = 128;
  expect_error<FileError>([&] { load_weights(other, p, 3); }, {"q_b_proj.weight", "[6144, 128]", "[12288, 128]"});

  // Same weights -> the same output, bit for bit.
  auto run = [&](const LayerWeights& lw) {
    CacheManager cache(CacheConfig::for_layer(cfg).with_tokens(256));
    const std::vector<StepRequest> reqs = {{0, 0, 30}};
    reserve_step(cache, reqs);
    const auto md = build_batch_metadata(cache, reqs);
    return ref::layer_forward(cfg, lw, generate_hidden(cfg, 30, 32), md, cache, 0, {}, nullptr, nullptr);
  };
  EXPECT_EQ(run(w), run(back));
}

TEST(WeightsFile, Fp8WithBlockScalesIsDequantizedOnLoadAndShardsFollowTheIndex) {
  const LayerConfig cfg = small_layer_config();
  const LayerWeights w = generate_weights(cfg, 33);
  const std::string pre = weight_prefix(0);
  // Quantize the 2-D weights the way the released checkpoint stores them:
  // e4m3 per element, one fp32 scale_inv per 128x128 block (amax / 448).
  st::Writer a, b;  // two shards
  std::vector<std::pair<std::string, const std::vector<bf16_t>*>> mats = {
      {"q_a_proj.weight", &w.q_a_proj}, {"q_b_proj.weight", &w.q_b_proj}, {"kv_a_proj_with_mqa.weight", &w.kv_a_proj_with_mqa},
      {"kv_b_proj.weight", &w.kv_b_proj}, {"o_proj.weight", &w.o_proj}, {"indexer.wq_b.weight", &w.idx_wq_b}, {"indexer.wk.weight", &w.idx_wk}};
  std::map<std::string, std::pair<int64_t, int64_t>> dims = {
      {"q_a_proj.weight", {128, 256}}, {"q_b_proj.weight", {64 * 96, 128}}, {"kv_a_proj_with_mqa.weight", {192, 256}},
      {"kv_b_proj.weight", {64 * 64, 128}}, {"o_proj.weight", {256, 64 * 32}}, {"indexer.wq_b.weight", {8 * 128, 128}}, {"indexer.wk.weight", {128, 256}}};
  std::map<std::string, std::vector<bf16_t>> expected;
  int k = 0;
  for (auto& [name, src] : mats) {
    const auto [R, C] = dims[name];
    const int64_t br = (R + 127) / 128, bc = (C + 127) / 128;
    std::vector<float> scale(br * bc, 0.0f);
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j) {
        float& s = scale[(i / 128) * bc + j / 128];
        s = std::max(s, std::fabs(bf16_to_float((*src)[i * C + j])) / 448.0f);
      }
    std::vector<uint8_t> q(R * C);
    std::vector<bf16_t> want(R * C);
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j) {
        const float s = scale[(i / 128) * bc + j / 128];
        q[i * C + j] = float_to_fp8_e4m3(bf16_to_float((*src)[i * C + j]) / s);
        want[i * C + j] = float_to_bf16(fp8_e4m3_to_float(q[i * C + j]) * s);
      }
    expected[name] = want;
    st::Writer& sh = (k++ % 2) ? a : b;
    sh.add_u8(pre + name, st::DType::F8_E4M3, {R, C}, q);
    sh.add_f32(pre + name + "_scale_inv", {br, bc}, scale);
  }
  a.add_bf16(pre + "q_a_layernorm.weight", {128}, w.q_a_layernorm);
  a.add_bf16(pre + "kv_a_layernorm.weight", {128}, w.kv_a_layernorm);
  b.add_bf16(pre + "indexer.k_norm.weight", {128}, w.idx_k_norm_weight);
  // F32 vectors are accepted and rounded to bf16.
  std::vector<float> bias(128);
  for (int i = 0; i < 128; ++i) bias[i] = bf16_to_float(w.idx_k_norm_bias[i]);
  b.add_f32(pre + "indexer.k_norm.bias", {128}, bias);
  b.add_bf16(pre + "indexer.weights_proj.weight", {8, 256}, w.idx_weights_proj);
  a.write(tmp("shard-1.safetensors"));
  b.write(tmp("shard-2.safetensors"));
  // A single-file fp8 checkpoint cannot be assembled from shards here, so the
  // shard index is the only way to read all of it.
  std::string index = R"({"metadata":{},"weight_map":{)";
  for (const auto* sh : {&a, &b}) {
    const std::string file = sh == &a ? "shard-1.safetensors" : "shard-2.safetensors";
    st::Reader r(tmp(file));
    for (const auto& t : r.tensors()) index += "\"" + t.name + "\":\"" + file + "\",";
  }
  index.back() = '}';
  index += "}";
  write_bytes(tmp("model.safetensors.index.json"), index);
  const LayerWeights got = load_weights(cfg, tmp("model.safetensors.index.json"), 0);
  EXPECT_EQ(got.q_a_proj, expected["q_a_proj.weight"]);
  EXPECT_EQ(got.kv_b_proj, expected["kv_b_proj.weight"]);
  EXPECT_EQ(got.o_proj, expected["o_proj.weight"]);
  EXPECT_EQ(got.idx_wk, expected["indexer.wk.weight"]);
  EXPECT_EQ(got.idx_k_norm_bias, w.idx_k_norm_bias);
  EXPECT_EQ(got.idx_weights_proj, w.idx_weights_proj);
  // Dequantized weights stay within e4m3's rounding of the originals.
  double num = 0, den = 0;
  for (size_t i = 0; i < w.q_b_proj.size(); ++i) {
    const double x = bf16_to_float(w.q_b_proj[i]), y = bf16_to_float(got.q_b_proj[i]);
    num += (x - y) * (x - y);
    den += x * x;
  }
  EXPECT_LT(std::sqrt(num / den), 0.05);
  EXPECT_GT(std::sqrt(num / den), 0.0);

  // fp8 without its scales is an error naming the missing tensor.
  st::Writer c;
  c.add_u8(pre + "q_a_proj.weight", st::DType::F8_E4M3, {128, 256}, std::vector<uint8_t>(128 * 256, 0x38));
  c.write(tmp("noscale.safetensors"));
  expect_error<FileError>([&] { load_weights(cfg, tmp("noscale.safetensors"), 0); }, {"q_a_proj.weight_scale_inv"});
}
