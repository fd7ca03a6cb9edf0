// One layer's attention weights to and from safetensors, under the Hugging
// Face names of spec section 2.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dsa/error.h"
#include "dsa/layer.h"
#include "dsa/safetensors.h"

namespace dsa {

namespace {

struct WeightSlot {
  const char* name;  // after the prefix
  std::vector<bf16_t> LayerWeights::*member;
  int64_t rows, cols;  // cols 0: a vector [rows]
  // Stored as F8_E4M3 with 128x128 block scales in the DeepSeek-V3.2
  // checkpoint (every attention Linear); weights_proj and the norms are bf16 there.
  bool fp8_in_checkpoint = false;
};

std::vector<WeightSlot> weight_slots(const LayerConfig& c) {
  const int64_t h = c.hidden_size, H = c.num_heads, HI = c.index_n_heads, DI = c.index_head_dim;
  return {
      {"q_a_proj.weight", &LayerWeights::q_a_proj, c.q_lora_rank, h, true},
      {"q_a_layernorm.weight", &LayerWeights::q_a_layernorm, c.q_lora_rank, 0},
      {"q_b_proj.weight", &LayerWeights::q_b_proj, H * c.qk_head_dim(), c.q_lora_rank, true},
      {"kv_a_proj_with_mqa.weight", &LayerWeights::kv_a_proj_with_mqa, c.latent_dim(), h, true},
      {"kv_a_layernorm.weight", &LayerWeights::kv_a_layernorm, c.kv_lora_rank, 0},
      {"kv_b_proj.weight", &LayerWeights::kv_b_proj, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, true},
      {"o_proj.weight", &LayerWeights::o_proj, h, H * c.v_head_dim, true},
      {"indexer.wq_b.weight", &LayerWeights::idx_wq_b, HI * DI, c.q_lora_rank, true},
      {"indexer.wk.weight", &LayerWeights::idx_wk, DI, h, true},
      {"indexer.k_norm.weight", &LayerWeights::idx_k_norm_weight, DI, 0},
      {"indexer.k_norm.bias", &LayerWeights::idx_k_norm_bias, DI, 0},
      {"indexer.weights_proj.weight", &LayerWeights::idx_weights_proj, HI, h},
  };
}

// A shard name of an index must name a file inside the index's folder: a
// relative path without a ".." that climbs out of it. The check is lexical on
// purpose: a Hugging Face cache keeps shards as symlinks from snapshots/ into
// blobs/, which must keep working.
std::string shard_path(const std::string& index, const std::filesystem::path& dir, const std::string& tensor, const std::string& shard) {
  namespace fs = std::filesystem;
  // The operating system reads a path only up to its first NUL byte, so
  // "..\u0000x" passes the lexical check below yet opens the parent folder.
  if (shard.find('\0') != std::string::npos) {
    throw FileError(fmt::format("'{}': weight_map entry '{}' names shard {}, which holds a NUL byte; shard names must be plain "
                                "relative file names inside '{}'",
                                index, tensor, nlohmann::json(shard).dump(), dir.empty() ? "." : dir.string()));
  }
  const fs::path p(shard);
  const fs::path norm = p.lexically_normal();
  const bool escapes = !norm.empty() && *norm.begin() == "..";
  if (shard.empty() || p.is_absolute() || p.has_root_name() || p.has_root_directory() || escapes || norm == ".") {
    throw FileError(fmt::format("'{}': weight_map entry '{}' names shard '{}', which is not a file inside the index's folder; shard "
                                "names must be relative paths that stay in '{}'",
                                index, tensor, shard, dir.empty() ? "." : dir.string()));
  }
  return (dir / norm).string();
}

// Reading a FIFO or a device such as /dev/zero would block or never end.
void require_regular_file(const std::string& path, const char* what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) throw FileError(fmt::format("cannot open {} '{}': no such file; check the path", what, path));
  if (!fs::is_regular_file(st)) {
    throw FileError(fmt::format("{} '{}' is {}, not a regular file; give the file itself", what, path,
                                fs::is_directory(st) ? "a directory" : "a device, FIFO or socket"));
  }
}

// Where each tensor lives: one file, or the shards of an index.json.
class Source {
 public:
  explicit Source(const std::string& path) : path_(path) {
    if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0) {
      require_regular_file(path, "checkpoint index");
      std::ifstream f(path);
      if (!f) throw FileError(fmt::format("cannot open checkpoint index '{}'; check the path", path));
      std::ostringstream text;
      text << f.rdbuf();
      shard_of_ = checkpoint_index_shards(text.str(), path);
    } else {
      single_ = std::make_unique<st::Reader>(path);
    }
  }
  bool has(const std::string& name) const { return single_ ? single_->has(name) : shard_of_.count(name) != 0; }
  const st::Reader& reader(const std::string& name) {
    if (single_) return *single_;
    auto it = shard_of_.find(name);
    if (it == shard_of_.end()) throw FileError(fmt::format("checkpoint index '{}' lists no tensor '{}'; check the layer index", path_, name));
    auto& r = shards_[it->second];
    if (!r) r = std::make_unique<st::Reader>(it->second);
    return *r;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::unique_ptr<st::Reader> single_;
  std::map<std::string, std::string> shard_of_;
  std::map<std::string, std::unique_ptr<st::Reader>> shards_;
};

}  // namespace

std::map<std::string, std::string> checkpoint_index_shards(const std::string& text, const std::string& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(fmt::format("'{}' is not valid JSON ({}); expected a model.safetensors.index.json", path, e.what()));
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    throw FileError(fmt::format("'{}' has no 'weight_map' object; expected a model.safetensors.index.json", path));
  }
  const auto dir = std::filesystem::path(path).parent_path();
  std::map<std::string, std::string> shard_of;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) throw FileError(fmt::format("'{}': weight_map entry '{}' is not a file name", path, it.key()));
    shard_of[it.key()] = shard_path(path, dir, it.key(), it.value().get<std::string>());
  }
  return shard_of;
}

std::string weight_prefix(int64_t layer) { return fmt::format("model.layers.{}.self_attn.", layer); }

LayerWeights load_weights(const LayerConfig& cfg, const std::string& path, int64_t layer, bool allow_nonfinite) {
  validate(cfg);
  if (layer < 0) throw ConfigError(fmt::format("layer index {} is invalid: it must be >= 0", layer), "layer");
  Source src(path);
  const std::string prefix = weight_prefix(layer);
  LayerWeights w;
  for (const auto& s : weight_slots(cfg)) {
    const std::string name = prefix + s.name;
    if (!src.has(name)) {
      throw FileError(fmt::format("'{}' has no tensor '{}'; the file must hold layer {}'s attention weights under their Hugging Face "
                                  "names (save_weights writes such a file), or pick another layer index",
                                  path, name, layer));
    }
    const st::Reader& r = src.reader(name);
    const std::vector<int64_t> shape = s.cols ? std::vector<int64_t>{s.rows, s.cols} : std::vector<int64_t>{s.rows};
    r.expect_shape(name, shape, "the checkpoint and the layer configuration (config.json, num_heads, ...) disagree");
    const st::TensorInfo& info = r.info(name);
    std::vector<bf16_t>& dst = w.*s.member;
    if (info.dtype == st::DType::F8_E4M3) {
      const std::string sname = name + "_scale_inv";
      if (!s.cols) throw FileError(fmt::format("'{}': tensor '{}' is F8_E4M3 but vectors must be BF16 or F32", path, name));
      if (!src.has(sname)) {
        throw FileError(fmt::format("'{}': tensor '{}' is F8_E4M3 but '{}' (fp32 scales per 128x128 block) is missing", path, name, sname));
      }
      const st::Reader& rs = src.reader(sname);
      const int64_t br = (s.rows + 127) / 128, bc = (s.cols + 127) / 128;
      rs.expect_shape(sname, {br, bc}, "fp8 weights carry one scale per 128x128 block");
      const auto scale = rs.read_f32(sname);
      if (!allow_nonfinite) check_finite(sname, {br, bc}, scale.data(), static_cast<int64_t>(scale.size()));
      const auto q = r.bytes(name);
      dst.resize(static_cast<size_t>(s.rows * s.cols));
      for (int64_t i = 0; i < s.rows; ++i) {
        for (int64_t j = 0; j < s.cols; ++j) {
          dst[i * s.cols + j] = float_to_bf16(fp8_e4m3_to_float(q[i * s.cols + j]) * scale[(i / 128) * bc + j / 128]);
        }
      }
    } else if (info.dtype == st::DType::BF16 || info.dtype == st::DType::F16 || info.dtype == st::DType::F32) {
      dst = r.read_bf16(name);
    } else {
      throw FileError(fmt::format("'{}': tensor '{}' is {}; weights must be BF16, F16, F32 or F8_E4M3 with _scale_inv", path, name,
                                  st::dtype_name(info.dtype)));
    }
  }
  check_weights(cfg, w);
  if (!allow_nonfinite) check_weights_finite(cfg, w, prefix);
  return w;
}

void check_weights_finite(const LayerConfig& cfg, const LayerWeights& w, const std::string& prefix) {
  check_weights(cfg, w);
  for (const auto& s : weight_slots(cfg)) {
    const std::vector<bf16_t>& v = w.*s.member;
    const std::vector<int64_t> shape = s.cols ? std::vector<int64_t>{s.rows, s.cols} : std::vector<int64_t>{s.rows};
    check_finite(prefix + s.name, shape, v.data(), static_cast<int64_t>(v.size()));
  }
}

void save_weights(const LayerConfig& cfg, const LayerWeights& w, const std::string& path, int64_t layer,
                  const std::map<std::string, std::string>& metadata) {
  check_weights(cfg, w);
  st::Writer out;
  const std::string prefix = weight_prefix(layer);
  for (const auto& s : weight_slots(cfg)) {
    const std::vector<int64_t> shape = s.cols ? std::vector<int64_t>{s.rows, s.cols} : std::vector<int64_t>{s.rows};
    out.add_bf16(prefix + s.name, shape, w.*s.member);
  }
  for (const auto& [k, v] : metadata) out.set_metadata(k, v);
  out.set_metadata("format", "pt");
  out.set_metadata("producer", "dsalab");
  out.write(path);
}

namespace {

// One [rows, cols] bf16 matrix as the checkpoint stores it: e4m3 values and
// one fp32 scale per 128x128 block (edge blocks partial), scale = amax / 448
// so that the block's largest magnitude maps to e4m3's largest, and
// value = fp8 * scale on load.
void quantize_fp8_128x128(const std::vector<bf16_t>& w, int64_t rows, int64_t cols, std::vector<uint8_t>& q, std::vector<float>& scale) {
  const int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
  q.assign(static_cast<size_t>(rows * cols), 0);
  scale.assign(static_cast<size_t>(br * bc), 0.0f);
  for (int64_t bi = 0; bi < br; ++bi) {
    for (int64_t bj = 0; bj < bc; ++bj) {
      const int64_t r0 = bi * 128, r1 = std::min(rows, r0 + 128), c0 = bj * 128, c1 = std::min(cols, c0 + 128);
      float amax = 0.0f;
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = c0; j < c1; ++j) amax = std::max(amax, std::fabs(bf16_to_float(w[i * cols + j])));
      // An all-zero block: any scale dequantizes its zeros to zero; 1 avoids 0/0.
      const float s = amax > 0.0f ? amax / kFp8E4M3Max : 1.0f;
      scale[bi * bc + bj] = s;
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = c0; j < c1; ++j) q[i * cols + j] = float_to_fp8_e4m3(bf16_to_float(w[i * cols + j]) / s);
    }
  }
}

}  // namespace

void save_weights_fp8(const LayerConfig& cfg, const LayerWeights& w, const std::string& path, int64_t layer,
                      const std::map<std::string, std::string>& metadata) {
  check_weights(cfg, w);
  // A NaN or Inf would poison its whole block's scale; refuse it by name.
  check_weights_finite(cfg, w, weight_prefix(layer));
  st::Writer out;
  const std::string prefix = weight_prefix(layer);
  std::vector<uint8_t> q;
  std::vector<float> scale;
  for (const auto& s : weight_slots(cfg)) {
    const std::string name = prefix + s.name;
    if (!s.fp8_in_checkpoint) {
      const std::vector<int64_t> shape = s.cols ? std::vector<int64_t>{s.rows, s.cols} : std::vector<int64_t>{s.rows};
      out.add_bf16(name, shape, w.*s.member);
      continue;
    }
    quantize_fp8_128x128(w.*s.member, s.rows, s.cols, q, scale);
    out.add_u8(name, st::DType::F8_E4M3, {s.rows, s.cols}, q);
    out.add_f32(name + "_scale_inv", {(s.rows + 127) / 128, (s.cols + 127) / 128}, scale);
  }
  for (const auto& [k, v] : metadata) out.set_metadata(k, v);
  out.set_metadata("format", "pt");
  out.set_metadata("producer", "dsalab");
  out.write(path);
}

}  // namespace dsa
