// FlashMLA's figures measured on our cards, read from the anchor file the
// project keeps beside the code (shared/anchors/flashmla-sparse-prefill.json)
// rather than compiled in: a figure holds for one card and one protocol only.
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dsa/bench.h"
#include "dsa/error.h"

namespace dsa {

double FlashMlaAnchors::at(int num_heads, int64_t s) const {
  for (size_t h = 0; h < heads.size() && h < ms.size(); ++h) {
    if (heads[h] != num_heads) continue;
    for (size_t i = 0; i < s_kv.size() && i < ms[h].size(); ++i)
      if (s_kv[i] == s) return ms[h][i];
  }
  return 0;
}

FlashMlaAnchors load_flashmla_anchors(const std::string& path, const std::string& device, const std::string& protocol) {
  namespace fs = std::filesystem;
  using nlohmann::json;
  check_sweep_protocol(protocol);
  FlashMlaAnchors a;
  a.device = device;
  a.protocol = protocol == "flashmla" ? "dobench" : protocol;
  std::error_code ec;
  const auto st = fs::status(path, ec);
  if (ec || !fs::exists(st)) throw FileError(fmt::format("anchor file '{}' does not exist; give the path of flashmla-sparse-prefill.json", path));
  if (!fs::is_regular_file(st) || fs::file_size(path, ec) > (16u << 20))
    throw FileError(fmt::format("anchor file '{}' is not a regular file of at most 16 MiB; give flashmla-sparse-prefill.json", path));
  std::ifstream f(path, std::ios::binary);
  std::stringstream text;
  text << f.rdbuf();
  if (!f.good() && !f.eof()) throw FileError(fmt::format("cannot read anchor file '{}'", path));
  json j;
  try {
    j = json::parse(text.str());
  } catch (const json::exception& e) {
    throw FileError(fmt::format("anchor file '{}': malformed JSON ({})", path, e.what()));
  }
  auto bad = [&](const std::string& what) {
    return FileError(fmt::format("anchor file '{}': {} for device '{}'; fix the file (see its \"what\" key)", path, what, device));
  };
  if (!j.is_object() || !j.contains("devices") || !j["devices"].is_object())
    throw FileError(fmt::format("anchor file '{}' has no \"devices\" object", path));
  const json& devices = j["devices"];
  if (!devices.contains(device)) {
    a.source = fmt::format("no FlashMLA figures for {} in {}", device, path);
    return a;
  }
  const json& d = devices[device];
  if (!d.is_object()) throw bad("the entry is not an object");
  if (!d.contains(a.protocol)) {
    a.source = fmt::format("no FlashMLA figures timed as '{}' for {} in {}", a.protocol, device, path);
    return a;
  }
  try {
    a.heads = d.at("heads").get<std::vector<int>>();
    a.s_kv = d.at("s_kv").get<std::vector<int64_t>>();
    a.ms = d.at(a.protocol).get<std::vector<std::vector<double>>>();
  } catch (const json::exception& e) {
    throw bad(fmt::format("\"heads\", \"s_kv\" or \"{}\" is missing or mistyped ({})", a.protocol, e.what()));
  }
  if (a.ms.size() != a.heads.size()) throw bad(fmt::format("\"{}\" has {} rows for {} heads", a.protocol, a.ms.size(), a.heads.size()));
  for (const auto& row : a.ms) {
    if (row.size() != a.s_kv.size()) throw bad(fmt::format("a row of \"{}\" has {} values for {} s_kv", a.protocol, row.size(), a.s_kv.size()));
    for (double v : row)
      if (!(v > 0 && v < 1e6)) throw bad(fmt::format("\"{}\" holds {} ms, not a positive time", a.protocol, v));
  }
  const std::string measured = d.contains("measured") && d["measured"].is_string() ? d["measured"].get<std::string>() : "date not recorded";
  a.source = fmt::format("FlashMLA on {} timed as '{}' ({}; {})", device, a.protocol, measured, fs::path(path).filename().string());
  return a;
}

}  // namespace dsa
