// dsa check: one step on the GPU and on the CPU reference with the same
// weights, inputs and cache bytes. Each stage is compared against the
// reference stage run on the GPU's own inputs (the "same rounded inputs" of
// spec section 7) on a sample of tokens; then the whole layer against
// ref::layer_forward. Prints a table; exits non-zero on any failure.
#include <fmt/format.h>

#include "cli_common.h"
#include "commands.h"
#include "dsa/error.h"

#ifdef DSA_HAVE_CUDA
#include "dsa/kernel_picks.h"
#include "dsa/layer_check.h"
#endif

namespace dsa::cli {

#ifdef DSA_HAVE_CUDA
namespace {

struct CheckCliOptions {
  ConfigOptions cfg;
  BatchOptions batch;
  WeightsOptions weights;
  check::CheckOptions check;
  bool skip_layer = false;
  bool no_poison = false;
  bool digests = false;
  std::string kernels = "auto";
};

void run_check(const CheckCliOptions& o, const CLI::App& sub) {
  const cuda::KernelPicks picks = cuda::parse_kernel_picks(o.kernels);  // a bad token fails before any work
  ResolvedWeights rw;
  try {
    rw = resolve_weights(o.cfg, o.weights, sub.count("--layer") > 0);
  } catch (const ValueError& e) {
    // No --allow-nonfinite here: a comparison of non-finite results says nothing.
    throw ValueError(std::string(e.what()) + "; dsa check compares finite results only and has no --allow-nonfinite");
  }
  const LayerConfig& cfg = rw.cfg;
  const std::vector<StepRequest> requests = resolve_requests(o.batch);
  check::CheckOptions co = o.check;
  co.weights = rw.weights ? &*rw.weights : nullptr;
  co.whole_layer = !o.skip_layer;
  co.poison = !o.no_poison;
  co.picks = picks;
  const check::StepCheck r = check::check_step(cfg, requests, co);
  fmt::print("{}\nweights: {}\n\n{}\n", r.header, rw.description, r.table.format());
  if (o.digests)
    for (const auto& [name, h] : r.digests) fmt::print("digest {:<14} {:016x}\n", name, h);
  fmt::print("GPU step {:.2f} s (with trace download), stage checks on {} sampled tokens {:.1f} s, reference layer {:.1f} s, "
             "total {:.1f} s\n",
             r.gpu_s, r.sampled, r.stage_s, r.ref_s, r.total_s);
  if (co.whole_layer) {
    fmt::print("whole layer: {} of {} tokens select the same top-k set as the reference (output error {:.3e} on them); the "
               "other {} tokens differ in a few boundary keys (output error {:.3e} on them)\n",
               r.same_topk_rows, r.tokens, r.same_topk_err, r.tokens - r.same_topk_rows, r.diff_topk_err);
  }
  const std::vector<std::string> bad = r.table.failed();
  if (!bad.empty()) {
    std::string list;
    for (const std::string& b : bad) list += (list.empty() ? "" : "; ") + b;
    throw CheckError(fmt::format("dsa check failed {} of {} checks: {}", bad.size(), r.table.rows().size(), list));
  }
  fmt::print("dsa check: all {} checks passed\n", r.table.rows().size());
}

}  // namespace
#endif

void register_check(CLI::App& app) {
  CLI::App* sub = app.add_subcommand("check", "run one step on the GPU and on the CPU reference and compare every stage");
#ifdef DSA_HAVE_CUDA
  auto o = std::make_shared<CheckCliOptions>();
  add_config_options(sub, o->cfg);
  add_batch_options(sub, o->batch, 4096);
  sub->add_option("--seed", o->check.seed, "seed of the synthetic weights, hidden states and cached context");
  add_weights_options(sub, o->weights);
  sub->add_option("--sample-tokens", o->check.sample, "tokens (evenly spread) on which each stage is checked against the reference");
  sub->add_flag("--skip-layer", o->skip_layer, "skip the whole-layer comparison with ref::layer_forward (stage checks only)");
  sub->add_flag("--digests", o->digests, "print FNV-1a digests of the GPU output, every intermediate and the caches (compare builds bit for bit)");
  sub->add_flag("--no-poison", o->no_poison, "do not fill unused cache slots and GPU buffers with NaN before the runs");
  sub->add_option("--kernels", o->kernels,
                  "which kernel each op with a newer one runs: auto (default), baseline, new, or op=pick,... with op one of "
                  "indexer_prefill, indexer_decode, topk, sparse_mla_fp8")
      ->check(kNonEmpty);
  sub->callback([o, sub] { run_check(*o, *sub); });
#else
  sub->callback([] { throw NoDeviceError("dsa check needs the CUDA backend; this build has none (nvcc was not found at configure time)"); });
#endif
}

}  // namespace dsa::cli
