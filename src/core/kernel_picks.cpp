// --kernels text <-> cuda::KernelPicks (dsa/kernel_picks.h).
#include "dsa/kernel_picks.h"

#include <fmt/format.h>

#include <array>

#include "dsa/error.h"

namespace dsa::cuda {

namespace {

constexpr std::array<KernelPick, 3> kPicks = {KernelPick::kAuto, KernelPick::kBaseline, KernelPick::kNew};

// The one place that maps op names to KernelPicks fields.
KernelPick* field(KernelPicks& p, const std::string& op) {
  if (op == "indexer_prefill") return &p.indexer_prefill;
  if (op == "indexer_decode") return &p.indexer_decode;
  if (op == "topk") return &p.topk;
  if (op == "sparse_mla_fp8") return &p.sparse_mla_fp8;
  return nullptr;
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

bool pick_from_name(const std::string& name, KernelPick* out) {
  for (KernelPick k : kPicks) {
    if (name == kernel_pick_name(k)) {
      *out = k;
      return true;
    }
  }
  return false;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

const char* kPickWords = "auto, baseline, new";

}  // namespace

const char* kernel_pick_name(KernelPick pick) {
  switch (pick) {
    case KernelPick::kAuto:
      return "auto";
    case KernelPick::kBaseline:
      return "baseline";
    case KernelPick::kNew:
      return "new";
  }
  return "auto";
}

const std::vector<std::string>& kernel_pick_ops() {
  static const std::vector<std::string> ops = {"indexer_prefill", "indexer_decode", "topk", "sparse_mla_fp8"};
  return ops;
}

KernelPicks parse_kernel_picks(const std::string& text) {
  const std::string all = trim(text);
  KernelPicks p;
  KernelPick one;
  if (pick_from_name(all, &one)) {
    p.indexer_prefill = p.indexer_decode = p.topk = p.sparse_mla_fp8 = one;
    return p;
  }
  if (all.empty()) {
    throw ConfigError(fmt::format("kernels '' is empty; give {} (every op) or op=pick,... with op one of {}", kPickWords,
                                  joined(kernel_pick_ops())),
                      "kernels");
  }
  std::vector<std::string> seen;
  size_t pos = 0;
  while (true) {
    const size_t comma = all.find(',', pos);
    const std::string item = trim(all.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos));
    if (item.empty()) {
      throw ConfigError(fmt::format("kernels '{}' has an empty item; write op=pick,op=pick with no empty entries", text), "kernels");
    }
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      throw ConfigError(fmt::format("kernels: '{}' is neither {} (for every op) nor op=pick; ops: {}", item, kPickWords,
                                    joined(kernel_pick_ops())),
                        "kernels");
    }
    const std::string op = trim(item.substr(0, eq)), pick = trim(item.substr(eq + 1));
    KernelPick* f = field(p, op);
    if (!f) {
      throw ConfigError(fmt::format("kernels: op '{}' (in '{}') is not known; ops: {}", op, item, joined(kernel_pick_ops())),
                        "kernels");
    }
    for (const std::string& s : seen) {
      if (s == op) throw ConfigError(fmt::format("kernels: op '{}' is given twice; give each op once", op), "kernels");
    }
    seen.push_back(op);
    if (!pick_from_name(pick, f)) {
      throw ConfigError(fmt::format("kernels: pick '{}' (in '{}') is not known; picks: {}", pick, item, kPickWords), "kernels");
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return p;
}

std::string format_kernel_picks(const KernelPicks& picks) {
  KernelPicks copy = picks;
  std::vector<KernelPick> v;
  for (const std::string& op : kernel_pick_ops()) v.push_back(*field(copy, op));
  bool same = true;
  for (KernelPick k : v) same = same && k == v[0];
  if (same) return kernel_pick_name(v[0]);
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += fmt::format("{}{}={}", i ? "," : "", kernel_pick_ops()[i], kernel_pick_name(v[i]));
  return s;
}

}  // namespace dsa::cuda
