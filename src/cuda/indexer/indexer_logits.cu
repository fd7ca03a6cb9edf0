// Host launcher of the lightning-indexer logits (spec 3.5): checks the
// contract, picks the kernel and its tile shape (the one place that lists the
// compiled variants; each is instantiated in instantiations/), sizes the grid.
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

#include "cuda/check.cuh"
#include "cuda/indexer/config.h"
#include "cuda/indexer/decode_plan.h"
#include "cuda/indexer/launch.h"
#include "cuda/indexer/params.h"

namespace dsa::cuda {
namespace {

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

void check_params(const IndexerLogitsParams& p) {
  auto need = [](const void* ptr, const char* name) {
    if (ptr == nullptr) throw ShapeError(fmt::format("indexer_logits: {} is null; pass a device pointer", name));
  };
  if (p.T < 0) throw ShapeError(fmt::format("indexer_logits: T = {} is negative; pass the number of query tokens", p.T));
  need(p.q_fp8, "q_fp8");
  need(p.weights, "weights");
  need(p.k_cache, "k_cache");
  need(p.block_table, "block_table");
  need(p.token_request, "token_request");
  need(p.visible_end, "visible_end");
  need(p.logits, "logits");
  if (p.num_heads != indexer::kIdxHeads) {
    throw ShapeError(fmt::format("indexer_logits: num_heads = {}, but the kernel is built for {} indexer heads "
                                 "(index_n_heads of DeepSeek-V3.2); use the reference for other head counts",
                                 p.num_heads, indexer::kIdxHeads));
  }
  if (p.tokens_per_block != indexer::kIdxBlockTokens) {
    throw ShapeError(fmt::format("indexer_logits: tokens_per_block = {}, but the kernel reads {}-token cache blocks "
                                 "(spec section 4); build the cache with tokens_per_block = {}",
                                 p.tokens_per_block, indexer::kIdxBlockTokens, indexer::kIdxBlockTokens));
  }
  if (p.logits_stride < 1 || p.max_blocks_per_request < 1) {
    throw ShapeError(fmt::format("indexer_logits: logits_stride = {} and max_blocks_per_request = {} must both be >= 1",
                                 p.logits_stride, p.max_blocks_per_request));
  }
  // Every kernel copies each head's 128-byte q vector in 16-byte pieces
  // (cp.async); 4-byte alignment let a misaligned q reach them and fault.
  if (!aligned(p.q_fp8, 16)) {
    throw ShapeError("indexer_logits: q_fp8 must be 16-byte aligned (the kernels copy q in 16-byte pieces); "
                     "pass a cudaMalloc'd buffer or an offset of it that is a multiple of 16 bytes");
  }
  if (!aligned(p.weights, 4) || !aligned(p.logits, 4)) {
    throw ShapeError("indexer_logits: weights and logits must be 4-byte aligned; pass cudaMalloc'd buffers");
  }
  if (!aligned(p.k_cache, 16)) {
    throw ShapeError("indexer_logits: k_cache must be 16-byte aligned (blocks are copied in 16-byte pieces); "
                     "pass the start of the indexer pool");
  }
}

}  // namespace

namespace indexer {

int prepare_kernel(const void* kernel, int threads, int smem_bytes, const DeviceContext& ctx, KernelSetup& setup) {
  const int index = ctx.device->index;
  const bool cached = index >= 0 && index < 64;
  if (cached) {
    const int o = setup.ctas_per_sm[index].load(std::memory_order_acquire);
    if (o > 0) return o;
  }
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  int o = 0;
  DSA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o, kernel, threads, smem_bytes));
  if (o < 1) {
    throw CudaError(fmt::format("indexer_logits: a {}-thread CTA with {} bytes of shared memory does not fit on an SM "
                                "of this device",
                                threads, smem_bytes));
  }
  if (cached) setup.ctas_per_sm[index].store(o, std::memory_order_release);
  return o;
}

// Token tiles on x; keys split on y when token tiles alone leave SMs idle
// (decode). The split count minimizes a simple model: waves of CTAs (the
// last one partly empty) times key tiles per CTA plus ~2 tiles of prologue
// (query tile, pipeline fill). Decode 64 x 32768: 6 splits = one full wave,
// where "about 2 waves" gave 2.1 waves, a third of them idle.
dim3 make_grid(const IndexerLogitsParams& p, const DeviceContext& ctx, int tokens_per_cta, int tile_keys, int ctas_per_sm,
               int64_t& tiles_per_split) {
  const int64_t token_tiles = (p.T + tokens_per_cta - 1) / tokens_per_cta;
  const int64_t key_tiles = (p.logits_stride + tile_keys - 1) / tile_keys;
  if (token_tiles > 0x7fffffffLL) {
    throw ShapeError(fmt::format("indexer_logits: T = {} needs more than 2^31 - 1 CTAs; split the batch", p.T));
  }
  const int64_t slots = std::max<int64_t>(1, static_cast<int64_t>(ctas_per_sm) * ctx.num_sms());
  const int64_t max_splits = std::min<int64_t>({65535, 4096, std::max<int64_t>(1, key_tiles / 2)});
  int64_t best_tps = key_tiles, best_cost = -1;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t tps = (key_tiles + s - 1) / s;
    const int64_t splits = (key_tiles + tps - 1) / tps;
    const int64_t waves = (token_tiles * splits + slots - 1) / slots;
    const int64_t cost = waves * (tps + 2);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_tps = tps;
    }
  }
  tiles_per_split = best_tps;
  const int64_t splits = (key_tiles + tiles_per_split - 1) / tiles_per_split;
  return dim3(static_cast<unsigned>(token_tiles), static_cast<unsigned>(splits));
}

}  // namespace indexer

namespace {

void require_sm(const DeviceContext& ctx, int min_cc, const char* what) {
  if (ctx.sm() < min_cc) {
    throw CudaError(fmt::format("indexer_logits: the {} kernel needs sm_{} or newer, this device is sm_{}{}; "
                                "use the reference backend",
                                what, min_cc, ctx.device->sm_major, ctx.device->sm_minor));
  }
}

}  // namespace

// Decode-like batches (one new token per request) share nothing between
// tokens: one token per CTA and longer key tiles. Prefill and speculative
// steps: the tokens of a CTA (same request, neighbours) share every key tile
// they load. Without the hint, a big T means prefill.
static bool share_key_tiles(const IndexerLogitsParams& p) {
  return p.max_tokens_per_request >= 2 || (p.max_tokens_per_request == 0 && p.T >= 512);
}

void indexer_logits_sm89(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  check_params(p);
  if (p.T == 0) return;
  require_sm(ctx, 89, "fp8 mma.sync");
  // 8 tokens per CTA: only worth it when most CTAs hold one request's tokens
  // (prefill), not for pairs of speculative tokens (measured 2.5x slower there).
  if (p.T < 512) {
    indexer::sm89::launch_mma<1, 4, 3>(ctx, p);
  } else {
    indexer::sm89::launch_mma<8, 1, 4>(ctx, p);
  }
}

void indexer_logits_sm90(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  check_params(p);
  if (p.T == 0) return;
  require_sm(ctx, 90, "wgmma");
  if (!share_key_tiles(p)) {
    indexer::sm90::launch_wgmma<1, 2, 3>(ctx, p);
  } else if (ctx.picks.resolved().indexer_prefill == KernelPick::kNew) {
    indexer_logits_sm90_prefill(ctx, p);  // issue 17's kernel (kAuto since its GPU run)
  } else {
    indexer::sm90::launch_wgmma<2, 1, 4>(ctx, p);
  }
}

void indexer_logits_decode_sm90(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  check_params(p);
  if (p.T == 0) return;
  require_sm(ctx, 90, "decode (TMA + wgmma)");
  indexer::run_decode(ctx, p);
}

// Issue 17's prefill kernel: 8 key-block stages in flight (66 KB of the ring
// beside 64 KB of Q; one CTA per SM either way).
constexpr int kPrefillStages = 8;

std::string indexer_logits_sm90_prefill_can_implement(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  if (ctx.sm() != 90) {
    return fmt::format("the prefill kernel uses sm_90a wgmma and setmaxnreg; this device is sm_{}{}",
                       ctx.device->sm_major, ctx.device->sm_minor);
  }
  if (!aligned(p.q_fp8, 16) || !aligned(p.k_cache, 16)) {
    return "q_fp8 and k_cache must be 16-byte aligned (both are copied in 16-byte pieces)";
  }
  if (!aligned(p.weights, 4) || !aligned(p.logits, 4)) return "weights and logits must be 4-byte aligned";
  const int smem = indexer::sm90::prefill_ws_smem_bytes<kPrefillStages>();
  if (static_cast<size_t>(smem) > ctx.smem_optin_per_block()) {
    return fmt::format("the prefill kernel needs {} bytes of shared memory per block, the device allows {}", smem,
                       ctx.smem_optin_per_block());
  }
  return {};
}

void indexer_logits_sm90_prefill(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  check_params(p);
  if (p.T == 0) return;
  require_sm(ctx, 90, "prefill wgmma");
  const std::string why = indexer_logits_sm90_prefill_can_implement(ctx, p);
  if (!why.empty()) throw ShapeError(fmt::format("indexer_logits (prefill kernel): {}", why));
  indexer::sm90::launch_prefill_ws<kPrefillStages>(ctx, p);
}

void indexer_logits(const DeviceContext& ctx, const IndexerLogitsParams& p) {
  check_params(p);
  if (p.T == 0) return;
  // Decode steps first, before any prefill branch (kNew; kAuto since its GPU run).
  if (indexer::decode_eligible(ctx, p)) return indexer::run_decode(ctx, p);
  if (ctx.sm() == 90) {
    indexer_logits_sm90(ctx, p);
  } else {
    indexer_logits_sm89(ctx, p);
  }
}

}  // namespace dsa::cuda
