// dsa info: the configuration and what follows from it.
#include <fmt/format.h>

#include <algorithm>
#include <memory>

#include "cli_common.h"
#include "commands.h"
#include "dsa/cache.h"
#include "dsa/config.h"
#include "dsa/error.h"
#include "dsa/stages.h"

namespace dsa::cli {

namespace {

struct InfoOptions {
  ConfigOptions cfg;
  int64_t tokens = 0;        // cache bytes for this many tokens
  double memory_gib = 0.0;   // tokens that fit in this much memory
  int64_t num_layers = 1;
  BatchOptions batch;
};

// The whole report is built before anything is printed: every value is
// checked (and every size computed) first, so an error never follows half a
// report.
void run_info(const InfoOptions& o, const CLI::App& sub, bool batch_given) {
  const LayerConfig c = resolve_config(o.cfg);
  const std::vector<StepRequest> reqs = batch_given ? resolve_requests(o.batch) : std::vector<StepRequest>{};
  if (batch_given) check_step_limits(reqs, c.tokens_per_block);
  if (o.num_layers > CacheConfig::kMaxLayers) {
    throw ConfigError(fmt::format("num_layers = {} is too large: the limit is {} (DeepSeek-V3.2 has 61)", o.num_layers, CacheConfig::kMaxLayers),
                      "num_layers");
  }
  const bool tokens_given = sub.count("--tokens") > 0, memory_given = sub.count("--memory-gib") > 0;
  if (tokens_given && o.tokens <= 0) {
    throw ConfigError(fmt::format("tokens = {} is invalid: give a positive token count", o.tokens), "tokens");
  }
  // 2^62 bytes (4 EiB) keeps the byte count exact in int64; with_bytes then
  // refuses budgets past what int32 slot numbers address.
  constexpr double kMaxGib = double(int64_t{1} << 32);
  if (memory_given && !(o.memory_gib > 0.0 && o.memory_gib <= kMaxGib)) {
    throw ConfigError(fmt::format("memory = {} GiB is invalid: give a positive size of at most {} GiB", o.memory_gib, kMaxGib), "bytes");
  }
  std::string out;
  out += fmt::format("DSA layer configuration{}\n", o.cfg.config_path.empty() ? " (DeepSeek-V3.2 defaults)" : fmt::format(" (from {})", o.cfg.config_path));
  out += fmt::format("  hidden_size          {}\n", c.hidden_size);
  out += fmt::format("  num_heads (H)        {}\n", c.num_heads);
  out += fmt::format("  q_lora_rank          {}\n", c.q_lora_rank);
  out += fmt::format("  kv_lora_rank         {}\n", c.kv_lora_rank);
  out += fmt::format("  qk_nope_head_dim     {}\n", c.qk_nope_head_dim);
  out += fmt::format("  qk_rope_head_dim     {}\n", c.qk_rope_head_dim);
  out += fmt::format("  v_head_dim           {}\n", c.v_head_dim);
  out += fmt::format("  index_n_heads        {}\n", c.index_n_heads);
  out += fmt::format("  index_head_dim       {}\n", c.index_head_dim);
  out += fmt::format("  index_topk           {}\n", c.index_topk);
  out += fmt::format("  tokens_per_block     {}\n", c.tokens_per_block);
  out += fmt::format("  rms_norm_eps         {:g}\n", c.rms_norm_eps);
  out += fmt::format("  rope_theta           {:g}\n", c.rope_theta);
  if (c.rope_scaling.type == "yarn") {
    out += fmt::format("  rope_scaling         yarn: factor {:g}, original_max_position_embeddings {}, beta_fast {:g}, beta_slow {:g}, mscale {:g}, mscale_all_dim {:g}\n",
               c.rope_scaling.factor, c.rope_scaling.original_max_position_embeddings, c.rope_scaling.beta_fast,
               c.rope_scaling.beta_slow, c.rope_scaling.mscale, c.rope_scaling.mscale_all_dim);
  } else {
    out += fmt::format("  rope_scaling         none\n");
  }
  out += fmt::format("  kv_cache_dtype       {}\n", to_string(c.kv_cache_dtype));
  out += fmt::format("  indexer Hadamard     {}\n", c.indexer_hadamard ? "on" : "off");
  out += fmt::format("  o_proj               {}\n", c.o_proj ? "on" : "off");
  out += fmt::format("  softmax_scale        {:.7f} (qk_head_dim^-0.5 * mscale^2, mscale {:.6f})\n", c.softmax_scale(), c.yarn_mscale());

  const int64_t nw = weight_count(c);
  out += fmt::format("\nWeights\n  {} elements, {} in bf16 ({} bytes)\n", nw, human_bytes(2.0 * nw), 2 * nw);

  // Every number below comes from CacheConfig, the type the cache manager allocates with.
  const CacheConfig cc = CacheConfig::for_layer(c, o.num_layers);
  const int64_t lat = cc.latent_bytes_per_token(), idx = cc.indexer_bytes_per_token();
  out += fmt::format("\nCaches (per layer)\n");
  out += fmt::format("  latent cache         {} bytes per token, {} bytes per {}-token block ({})\n", lat, cc.latent_bytes_per_block(),
             cc.tokens_per_block, to_string(cc.latent_dtype));
  out += fmt::format("  indexer K cache      {} bytes per token, {} bytes per {}-token block ({} fp8 vectors then {} fp32 scales)\n", idx,
             cc.indexer_bytes_per_block(), cc.tokens_per_block, cc.tokens_per_block, cc.tokens_per_block);
  const int64_t per_block = cc.bytes_per_block();
  out += fmt::format("  {:<20} {} bytes per block\n", fmt::format("both, {} layer{}", o.num_layers, o.num_layers == 1 ? "" : "s"), per_block);
  if (tokens_given) {
    CacheConfig t = cc;
    t.with_tokens(o.tokens);
    out += fmt::format("  {} tokens need {} blocks = {} ({} bytes)\n", o.tokens, t.num_blocks, human_bytes(double(t.total_bytes())), t.total_bytes());
  }
  if (memory_given) {
    const double bytes = o.memory_gib * 1024.0 * 1024.0 * 1024.0;
    if (bytes < double(per_block)) {
      out += fmt::format("  {:g} GiB holds no block (one block takes {})\n", o.memory_gib, human_bytes(double(per_block)));
    } else {
      CacheConfig m = cc;
      m.with_bytes(static_cast<int64_t>(bytes));
      out += fmt::format("  {:g} GiB holds {} blocks = {} tokens\n", o.memory_gib, m.num_blocks, m.capacity_tokens());
    }
  }
  if (batch_given) {
    // Each request rounds up to whole blocks on its own.
    const int64_t blocks = CacheConfig::for_step(c, reqs).num_blocks;
    int64_t new_tokens = 0, max_seq = 0;
    for (const StepRequest& r : reqs) {
      new_tokens += r.num_new;
      max_seq = std::max(max_seq, r.cached + r.num_new);
    }
    out += fmt::format("  batch of {} request{} ({} new tokens, longest {} tokens) needs {} blocks = {} ({} bytes)\n", reqs.size(),
               reqs.size() == 1 ? "" : "s", new_tokens, max_seq, blocks, human_bytes(double(blocks) * per_block), blocks * per_block);
  }

  out += fmt::format("\nFLOPs per token (spec section 8)\n");
  double total = 0.0;
  for (const auto& s : projection_costs(c)) {
    out += fmt::format("  {:<22} {:>14.4g}\n", s.name, s.flops_per_token);
    total += s.flops_per_token;
  }
  out += fmt::format("  {:<22} {:>14.4g}\n", "projections, total", total);
  out += fmt::format("  {:<22} {:>14.4g} per visible key\n", "indexer logits", indexer_flops(c, 1.0));
  out += fmt::format("  {:<22} {:>14.4g} per selected key (x{} at full top-k = {:.4g})\n", "sparse attention", sparse_attention_flops(c, 1.0),
             c.index_topk, sparse_attention_flops(c, double(c.index_topk)));
  fmt::print("{}", out);
}

}  // namespace

void register_info(CLI::App& app) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* sub = app.add_subcommand("info", "print the configuration, weight and cache sizes, FLOPs per token");
  add_config_options(sub, o->cfg);
  sub->add_option("--tokens", o->tokens, "also print the cache bytes this many tokens need");
  sub->add_option("--memory-gib", o->memory_gib, "also print how many tokens fit in this much memory (GiB)");
  sub->add_option("--num-layers", o->num_layers, "layers sharing the cache pool")->check(CLI::PositiveNumber);
  add_batch_options(sub, o->batch, 1);
  sub->callback([o, sub] {
    const bool batch_given = sub->count("--batch") + sub->count("--cached") + sub->count("--new") + sub->count("--requests") > 0;
    run_info(*o, *sub, batch_given);
  });
}

}  // namespace dsa::cli
