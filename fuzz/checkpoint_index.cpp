// model.safetensors.index.json resolver: the fuzz input is the index text.
// Whatever it names, every shard path it resolves to must stay inside the
// index's folder, also as the operating system reads the path (up to the
// first NUL byte); a malformed index must be a dsa::Error. The text is then
// also given to load_weights as a file, beside one real shard of a small
// layer, so that the shards an index names are opened and read.
#include <cstdint>
#include <filesystem>
#include <string>

#include "dsa/config.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "fuzz_util.h"

namespace {

dsa::LayerConfig small_config() {
  dsa::LayerConfig c;
  c.hidden_size = 64;
  c.num_heads = 64;
  c.q_lora_rank = 32;
  c.kv_lora_rank = 128;
  c.qk_nope_head_dim = 16;
  c.v_head_dim = 16;
  c.index_n_heads = 4;
  c.index_topk = 64;
  c.tokens_per_block = 16;
  dsa::validate(c);
  return c;
}

// "dir/x/y" is inside "dir" when, after lexical normalization, it is dir
// followed by at least one component that is not "..".
bool inside(const std::filesystem::path& dir, const std::string& resolved) {
  const std::string os_view = resolved.substr(0, resolved.find('\0'));  // what open(2) sees
  const auto norm = std::filesystem::path(os_view).lexically_normal();
  const auto rel = norm.lexically_relative(dir.lexically_normal());
  if (rel.empty() || rel == ".") return false;
  for (const auto& part : rel) {
    if (part == "..") return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const dsa::LayerConfig cfg = small_config();
  const auto& dir = dsa_fuzz::scratch_dir();
  static const bool shard_written = [&] {
    dsa::save_weights(cfg, dsa::generate_weights(cfg, 1), (dir / "model-00001-of-00001.safetensors").string(), 0);
    return true;
  }();
  (void)shard_written;

  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto index = dir / "model.safetensors.index.json";
  try {
    for (const auto& [tensor, shard] : dsa::checkpoint_index_shards(text, index.string())) {
      if (!inside(dir, shard)) dsa_fuzz::fail("a shard path leaves the index's folder");
    }
  } catch (const dsa::Error&) {
    return 0;
  }
  dsa_fuzz::write_file(index, data, size);
  try {
    (void)dsa::load_weights(cfg, index.string(), 0);
  } catch (const dsa::Error&) {
  }
  return 0;
}
