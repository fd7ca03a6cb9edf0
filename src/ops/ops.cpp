// The standalone ops (dsa/ops.h): every check of every tensor, then the
// dispatch to the CPU path (the reference) or the CUDA path.
#include "dsa/ops.h"

#include <fmt/format.h>

#include <climits>
#include <cmath>

#include "dsa/error.h"
#include "ops/cpu_ops.h"
#include "ops/validate.h"
#ifdef DSA_HAVE_CUDA
#include "cuda/ops/ops_cuda.h"
#endif

namespace dsa::ops {

using detail::Arg;
using detail::check_dim;
using detail::check_dtype;
using detail::check_layout;
using detail::check_rank;
using detail::check_structure;

namespace {

constexpr const char* kToBf16 = "convert it with .to(torch.bfloat16) (or your framework's equivalent)";
constexpr const char* kToF32 = "convert it with .float() (or your framework's equivalent)";
constexpr const char* kToI32 = "convert it with .to(torch.int32) (or your framework's equivalent)";
constexpr const char* kToI64 = "convert it with .to(torch.int64) (or your framework's equivalent)";
constexpr const char* kToFp8 = "quantize it to float8_e4m3fn (torch.float8_e4m3fn)";

// Names a rule of the CUDA path only (the CPU path takes more).
[[noreturn]] void cuda_rule(const char* op, const std::string& what, const char* param) {
  throw ShapeError(fmt::format("{}: {} on CUDA tensors; run the op on CPU tensors for other sizes", op, what), param);
}

void check_int32_extent(const char* op, const char* what, int64_t v) {
  if (v > INT_MAX)
    throw ShapeError(fmt::format("{}: {} = {} exceeds 2^31 - 1 (positions are int32); split the work", op, what, v));
}

}  // namespace

// ---- sparse MLA ----------------------------------------------------------------

void sparse_mla_fwd(const Tensor& q, const Tensor& kv, const Tensor& indices, double sm_scale, int64_t d_v, const Tensor& out,
                    const Tensor& max_logits, const Tensor& lse, CUstream_st* stream) {
  const char* op = "sparse_mla_fwd";
  const Arg aq{&q, "q"}, akv{&kv, "kv"}, ai{&indices, "indices"}, ao{&out, "out"}, am{&max_logits, "max_logits"}, al{&lse, "lse"};
  for (const Arg& a : {aq, akv, ai, ao, am, al}) check_structure(op, a);
  check_dtype(op, aq, DType::BF16, kToBf16);
  check_dtype(op, akv, DType::BF16, kToBf16);
  check_dtype(op, ai, DType::I32, kToI32);
  check_dtype(op, ao, DType::BF16, "allocate it as bfloat16");
  check_dtype(op, am, DType::F32, "allocate it as float32");
  check_dtype(op, al, DType::F32, "allocate it as float32");
  check_rank(op, aq, {3}, "[T, H, d_qk]");
  check_rank(op, akv, {2, 3}, "[S, d_qk] or [S, 1, d_qk]");
  check_rank(op, ai, {2, 3}, "[T, topk] or [T, 1, topk]");
  check_rank(op, ao, {3}, "[T, H, d_v]");
  check_rank(op, am, {2}, "[T, H]");
  check_rank(op, al, {2}, "[T, H]");
  const int64_t T = q.shape[0], H = q.shape[1], D = q.shape[2];
  if (D < 1 || D > 1024)
    throw ShapeError(fmt::format("{}: q has d_qk = {} (shape {}); the ops take 1 <= d_qk <= 1024 (DeepSeek-V3.2: 576)", op, D,
                                 detail::shape_string(q.shape)),
                     "q");
  if (H > 65535)
    throw ShapeError(fmt::format("{}: q has H = {} heads; the ops take at most 65535 (split the heads)", op, H), "q");
  if (d_v < 1 || d_v > D)
    throw ShapeError(fmt::format("{}: d_v = {} must be in [1, d_qk = {}]: values are the first d_v dims of each kv row "
                                 "(DeepSeek-V3.2: 512)",
                                 op, d_v, D),
                     "d_v");
  if (!std::isfinite(sm_scale) || !(sm_scale > 0) || sm_scale > 3.0e38)
    throw ShapeError(fmt::format("{}: sm_scale = {} must be a finite positive float (DeepSeek-V3.2: 0.1352337788608801)", op,
                                 sm_scale),
                     "sm_scale");
  if (kv.ndim() == 3) check_dim(op, akv, 1, 1, "MLA has one latent kv head");
  check_dim(op, akv, kv.ndim() - 1, D, "d_qk of q");
  check_dim(op, ai, 0, T, "T of q");
  if (indices.ndim() == 3) check_dim(op, ai, 1, 1, "one kv head");
  const int64_t topk = indices.shape[indices.ndim() - 1];
  if (topk < 1 || topk > INT_MAX)
    throw ShapeError(fmt::format("{}: indices has topk = {} (shape {}); pass at least one index per token (-1 marks an unused one)",
                                 op, topk, detail::shape_string(indices.shape)),
                     "indices");
  check_int32_extent(op, "S (rows of kv)", kv.shape[0]);
  check_dim(op, ao, 0, T, "T of q");
  check_dim(op, ao, 1, H, "H of q");
  check_dim(op, ao, 2, d_v, "d_v");
  for (const Arg* a : {&am, &al}) {
    check_dim(op, *a, 0, T, "T of q");
    check_dim(op, *a, 1, H, "H of q");
  }
  for (const Arg& a : {aq, akv, ai, ao, am, al}) check_layout(op, a);
  const detail::Placement pl = detail::placement(op, {aq, akv, ai, ao, am, al});
  detail::check_no_overlap(op, {ao, am, al}, {aq, akv, ai});
  if (T == 0 || H == 0) return;
  const Tensor kv2 = detail::canonical_strides(kv.ndim() == 3 ? detail::drop_dim(kv, 1) : kv);
  const Tensor idx2 = detail::canonical_strides(indices.ndim() == 3 ? detail::drop_dim(indices, 1) : indices);
  if (pl.cuda) {
#ifdef DSA_HAVE_CUDA
    cuda_impl::sparse_mla_fwd(pl.device, detail::canonical_strides(q), kv2, idx2, sm_scale, d_v, detail::canonical_strides(out),
                              detail::canonical_strides(max_logits), detail::canonical_strides(lse), stream);
#endif
    return;
  }
  cpu::sparse_mla_fwd(q, kv2, idx2, sm_scale, d_v, out, max_logits, lse);
}

// ---- indexer logits ------------------------------------------------------------

void fp8_mqa_logits(const Tensor& q, const Tensor& k, const Tensor& k_scale, const Tensor& weights, const Tensor& k_start,
                    const Tensor& k_end, const Tensor& logits, bool clean_logits, CUstream_st* stream) {
  const char* op = "fp8_mqa_logits";
  const Arg aq{&q, "q"}, ak{&k, "k"}, aks{&k_scale, "k_scale"}, aw{&weights, "weights"}, as{&k_start, "k_start"},
      ae{&k_end, "k_end"}, al{&logits, "logits"};
  for (const Arg& a : {aq, ak, aks, aw, as, ae, al}) check_structure(op, a);
  check_dtype(op, aq, DType::FP8_E4M3, kToFp8);
  check_dtype(op, ak, DType::FP8_E4M3, kToFp8);
  check_dtype(op, aks, DType::F32, kToF32);
  check_dtype(op, aw, DType::F32, kToF32);
  check_dtype(op, as, DType::I32, kToI32);
  check_dtype(op, ae, DType::I32, kToI32);
  check_dtype(op, al, DType::F32, "allocate it as float32");
  check_rank(op, aq, {3}, "[M, HI, 128]");
  check_rank(op, ak, {2}, "[N, 128]");
  check_rank(op, aks, {1, 2}, "[N] or [N, 1]");
  check_rank(op, aw, {2}, "[M, HI]");
  check_rank(op, as, {1}, "[M]");
  check_rank(op, ae, {1}, "[M]");
  check_rank(op, al, {2}, "[M, N]");
  const int64_t M = q.shape[0], HI = q.shape[1], N = k.shape[0];
  check_dim(op, aq, 2, 128, "the indexer head dim: fp8 blocks are 128 wide");
  check_dim(op, ak, 1, 128, "the indexer head dim of q");
  check_dim(op, aks, 0, N, "N of k");
  if (k_scale.ndim() == 2) check_dim(op, aks, 1, 1, "one scale per key");
  check_dim(op, aw, 0, M, "M of q");
  check_dim(op, aw, 1, HI, "HI of q");
  check_dim(op, as, 0, M, "M of q");
  check_dim(op, ae, 0, M, "M of q");
  check_dim(op, al, 0, M, "M of q");
  check_dim(op, al, 1, N, "N of k");
  check_int32_extent(op, "N (keys)", N);
  for (const Arg& a : {aq, ak, aks, aw, as, ae, al}) check_layout(op, a);
  const detail::Placement pl = detail::placement(op, {aq, ak, aks, aw, as, ae, al});
  detail::check_no_overlap(op, {al}, {aq, ak, aks, aw, as, ae});
  if (pl.cuda && HI != 64 && M > 0)
    cuda_rule(op, fmt::format("q has HI = {} heads but the CUDA indexer kernel is built for 64 (DeepSeek-V3.2's index_n_heads)", HI),
              "q");
  if (M == 0 || N == 0) return;
  const Tensor ks1 = k_scale.ndim() == 2 ? detail::drop_dim(k_scale, 1) : k_scale;
  if (pl.cuda) {
#ifdef DSA_HAVE_CUDA
    cuda_impl::fp8_mqa_logits(pl.device, detail::canonical_strides(q), detail::canonical_strides(k), detail::canonical_strides(ks1),
                              detail::canonical_strides(weights), detail::canonical_strides(k_start),
                              detail::canonical_strides(k_end), detail::canonical_strides(logits), clean_logits, stream);
#endif
    return;
  }
  cpu::fp8_mqa_logits(q, k, detail::canonical_strides(ks1), weights, k_start, k_end, logits, clean_logits);
}

void fp8_paged_mqa_logits(const Tensor& q, const Tensor& kv_cache, const Tensor& weights, const Tensor& context_lens,
                          const Tensor& block_table, int64_t max_context_len, const Tensor& logits, bool clean_logits,
                          CUstream_st* stream) {
  // Accepted for DeepGEMM's signature: both paths write -inf past each row's
  // context whatever it says (ops.h), so it changes nothing.
  (void)clean_logits;
  const char* op = "fp8_paged_mqa_logits";
  const Arg aq{&q, "q"}, ac{&kv_cache, "kv_cache"}, aw{&weights, "weights"}, acl{&context_lens, "context_lens"},
      ab{&block_table, "block_table"}, al{&logits, "logits"};
  for (const Arg& a : {aq, ac, aw, acl, ab, al}) check_structure(op, a);
  check_dtype(op, aq, DType::FP8_E4M3, kToFp8);
  if (kv_cache.dtype != DType::U8 && kv_cache.dtype != DType::FP8_E4M3)
    throw DTypeError(fmt::format("{}: kv_cache has dtype {} but must be uint8 (or float8_e4m3fn): per block, block_size x 128 fp8 "
                                 "keys then block_size float32 scales, as bytes; view it as bytes with .view(torch.uint8)",
                                 op, to_string(kv_cache.dtype)),
                     "kv_cache");
  check_dtype(op, aw, DType::F32, kToF32);
  check_dtype(op, acl, DType::I32, kToI32);
  check_dtype(op, ab, DType::I32, kToI32);
  check_dtype(op, al, DType::F32, "allocate it as float32");
  check_rank(op, aq, {4}, "[B, next_n, HI, 128]");
  check_rank(op, ac, {2, 4}, "[num_blocks, block_size, 1, 132] or [num_blocks, block_size * 132]");
  check_rank(op, aw, {2}, "[B * next_n, HI]");
  check_rank(op, acl, {1}, "[B]");
  check_rank(op, ab, {2}, "[B, max_blocks]");
  check_rank(op, al, {2}, "[B * next_n, max_context_len]");
  const int64_t B = q.shape[0], next_n = q.shape[1], HI = q.shape[2], T = B * next_n;
  check_dim(op, aq, 3, 128, "the indexer head dim: fp8 blocks are 128 wide");
  const int64_t num_blocks = kv_cache.shape[0];
  int64_t block_size = 0;
  if (kv_cache.ndim() == 4) {
    block_size = kv_cache.shape[1];
    check_dim(op, ac, 2, 1, "one indexer key head");
    check_dim(op, ac, 3, 132, "128 fp8 bytes and a 4-byte scale per token");
  } else {
    if (kv_cache.shape[1] % 132 != 0)
      throw ShapeError(fmt::format("{}: kv_cache has shape {}; its second dimension must be block_size * 132 bytes (128 fp8 + a "
                                   "4-byte scale per token)",
                                   op, detail::shape_string(kv_cache.shape)),
                       "kv_cache");
    block_size = kv_cache.shape[1] / 132;
  }
  if (num_blocks > 0 && block_size < 1)
    throw ShapeError(fmt::format("{}: kv_cache has shape {}: block_size must be at least 1", op,
                                 detail::shape_string(kv_cache.shape)),
                     "kv_cache");
  check_dim(op, aw, 0, T, "B * next_n of q");
  check_dim(op, aw, 1, HI, "HI of q");
  check_dim(op, acl, 0, B, "B of q");
  check_dim(op, ab, 0, B, "B of q");
  check_dim(op, al, 0, T, "B * next_n of q");
  if (max_context_len < 0 || max_context_len != logits.shape[1])
    throw ShapeError(fmt::format("{}: max_context_len = {} but logits has shape {}; pass logits of shape [B * next_n, "
                                 "max_context_len] and max_context_len >= 0",
                                 op, max_context_len, detail::shape_string(logits.shape)),
                     "max_context_len");
  check_int32_extent(op, "max_context_len", max_context_len);
  check_int32_extent(op, "num_blocks", num_blocks);
  for (const Arg& a : {aq, ac, aw, acl, ab, al}) check_layout(op, a);
  if (!detail::is_dense(kv_cache))
    throw ShapeError(fmt::format("{}: kv_cache (shape {}, strides {}) must be contiguous: blocks are addressed as block * "
                                 "block_size * 132 bytes; pass the cache tensor itself, not a strided view of it",
                                 op, detail::shape_string(kv_cache.shape), detail::shape_string(kv_cache.strides)),
                     "kv_cache");
  const detail::Placement pl = detail::placement(op, {aq, ac, aw, acl, ab, al});
  detail::check_no_overlap(op, {al}, {aq, ac, aw, acl, ab});
  if (pl.cuda && T > 0) {
    if (HI != 64)
      cuda_rule(op, fmt::format("q has HI = {} heads but the CUDA indexer kernel is built for 64 (DeepSeek-V3.2's index_n_heads)", HI),
                "q");
    if (block_size != 64)
      cuda_rule(op, fmt::format("kv_cache has block_size = {} but the CUDA indexer kernel reads 64-token blocks (spec section 4)",
                                block_size),
                "kv_cache");
    if (kv_cache.numel() > 0 && reinterpret_cast<uintptr_t>(kv_cache.data) % 16 != 0)
      cuda_rule(op, "kv_cache must be 16-byte aligned (blocks are copied in 16-byte pieces); pass the start of an allocation",
                "kv_cache");
  }
  if (T == 0 || max_context_len == 0) return;
  if (pl.cuda) {
#ifdef DSA_HAVE_CUDA
    cuda_impl::fp8_paged_mqa_logits(pl.device, detail::canonical_strides(q), kv_cache, num_blocks, detail::canonical_strides(weights),
                                    detail::canonical_strides(context_lens), detail::canonical_strides(block_table),
                                    max_context_len, detail::canonical_strides(logits), stream);
#endif
    return;
  }
  cpu::fp8_paged_mqa_logits(q, kv_cache, num_blocks, block_size, weights, context_lens, block_table, max_context_len, logits);
}

// ---- top-k -------------------------------------------------------------------

void topk(const Tensor& logits, int64_t k, const Tensor& lengths, const Tensor& out, CUstream_st* stream) {
  const char* op = "topk";
  const Arg al{&logits, "logits"}, an{&lengths, "lengths"}, ao{&out, "out"};
  for (const Arg& a : {al, an, ao}) check_structure(op, a);
  check_dtype(op, al, DType::F32, kToF32);
  check_dtype(op, an, DType::I32, kToI32);
  check_dtype(op, ao, DType::I32, "allocate it as int32");
  check_rank(op, al, {2}, "[T, S]");
  check_rank(op, an, {1}, "[T]");
  check_rank(op, ao, {2}, "[T, k]");
  const int64_t T = logits.shape[0], S = logits.shape[1];
  if (k < 0 || k > INT_MAX)
    throw ShapeError(fmt::format("{}: k = {} must be in [0, 2^31 - 1] (DeepSeek-V3.2: 2048)", op, k), "k");
  check_dim(op, an, 0, T, "T of logits");
  check_dim(op, ao, 0, T, "T of logits");
  check_dim(op, ao, 1, k, "k");
  check_int32_extent(op, "S (logits columns)", S);
  for (const Arg& a : {al, an, ao}) check_layout(op, a);
  // The kernel addresses rows with an int32 stride: a padded view must keep it in range too.
  if (T > 1 && logits.strides[0] > INT_MAX)
    throw ShapeError(fmt::format("{}: logits.stride(0) = {} exceeds 2^31 - 1 (the kernel addresses rows with an int32 stride); "
                                 "call .contiguous() on logits",
                                 op, logits.strides[0]),
                     "logits");
  const detail::Placement pl = detail::placement(op, {al, an, ao});
  detail::check_no_overlap(op, {ao}, {al, an});
  if (T == 0 || k == 0) return;
  if (pl.cuda) {
#ifdef DSA_HAVE_CUDA
    cuda_impl::topk(pl.device, detail::canonical_strides(logits), k, detail::canonical_strides(lengths),
                    detail::canonical_strides(out), stream);
#endif
    return;
  }
  cpu::topk(logits, k, lengths, out);
}

// ---- RoPE + cache append -------------------------------------------------------

void rope_quant_append(const LayerConfig& cfg, const Tensor& c_kv, const Tensor& k_pe, const Tensor& positions,
                       const Tensor& slot_mapping, const Tensor& latent_cache, CUstream_st* stream) {
  const char* op = "rope_quant_append";
  validate(cfg);
  const Arg ac{&c_kv, "c_kv"}, ak{&k_pe, "k_pe"}, ap{&positions, "positions"}, as{&slot_mapping, "slot_mapping"},
      alc{&latent_cache, "latent_cache"};
  for (const Arg& a : {ac, ak, ap, as, alc}) check_structure(op, a);
  check_dtype(op, ac, DType::BF16, kToBf16);
  check_dtype(op, ak, DType::BF16, kToBf16);
  check_dtype(op, ap, DType::I32, kToI32);
  check_dtype(op, as, DType::I64, kToI64);
  const bool fp8 = cfg.kv_cache_dtype == LatentCacheDType::FP8;
  const int64_t dkv = cfg.kv_lora_rank, rope = cfg.qk_rope_head_dim, width = fp8 ? cfg.latent_cache_bytes_per_token() : dkv + rope;
  if (fp8 && latent_cache.dtype != DType::U8)
    throw DTypeError(fmt::format("{}: latent_cache has dtype {}, but cfg.kv_cache_dtype = fp8 writes the {}-byte fp8 form into a "
                                 "uint8 cache; pass the uint8 cache, or set kv_cache_dtype = bf16 for a bfloat16 one",
                                 op, to_string(latent_cache.dtype), width),
                     "latent_cache");
  if (!fp8 && latent_cache.dtype != DType::BF16)
    throw DTypeError(fmt::format("{}: latent_cache has dtype {}, but cfg.kv_cache_dtype = bf16 writes bfloat16 rows; pass a "
                                 "bfloat16 cache, or set kv_cache_dtype = fp8 for the uint8 fp8 form",
                                 op, to_string(latent_cache.dtype)),
                     "latent_cache");
  if (fp8 && dkv % 128 != 0)
    throw ShapeError(fmt::format("{}: kv_lora_rank = {} is not a multiple of 128, which the fp8 form's scale groups need", op, dkv),
                     "kv_lora_rank");
  check_rank(op, ac, {2}, "[T, kv_lora_rank]");
  check_rank(op, ak, {2}, "[T, qk_rope_head_dim]");
  check_rank(op, ap, {1}, "[T]");
  check_rank(op, as, {1}, "[T]");
  check_rank(op, alc, {2, 3}, fp8 ? "[num_slots, 656] or [num_blocks, block_size, 656] (the fp8 form's row bytes)"
                                  : "[num_slots, 576] or [num_blocks, block_size, 576] (kv_lora_rank + qk_rope_head_dim)");
  const int64_t T = c_kv.shape[0];
  check_dim(op, ac, 1, dkv, "cfg.kv_lora_rank");
  check_dim(op, ak, 0, T, "T of c_kv");
  check_dim(op, ak, 1, rope, "cfg.qk_rope_head_dim");
  check_dim(op, ap, 0, T, "T of c_kv");
  check_dim(op, as, 0, T, "T of c_kv");
  check_dim(op, alc, latent_cache.ndim() - 1, width,
            fp8 ? "bytes of one fp8 row: kv_lora_rank + 4 * kv_lora_rank / 128 + 2 * qk_rope_head_dim"
                : "kv_lora_rank + qk_rope_head_dim");
  for (const Arg& a : {ac, ak, ap, as, alc}) check_layout(op, a);
  if (!detail::is_dense(latent_cache))
    throw ShapeError(fmt::format("{}: latent_cache (shape {}, strides {}) must be contiguous: rows are written in place at slot * "
                                 "row size, so a copy would not do; pass the cache tensor itself",
                                 op, detail::shape_string(latent_cache.shape), detail::shape_string(latent_cache.strides)),
                     "latent_cache");
  const detail::Placement pl = detail::placement(op, {ac, ak, ap, as, alc});
  detail::check_no_overlap(op, {alc}, {ac, ak, ap, as});
  const int64_t num_slots = latent_cache.numel() / width;
  if (pl.cuda && T > 0) {
    if (rope % 8 != 0 || rope > 64)
      cuda_rule(op, fmt::format("cfg.qk_rope_head_dim = {}: the CUDA RoPE and append kernels take a multiple of 8 up to 64", rope),
                "qk_rope_head_dim");
    if (dkv % 128 != 0)
      cuda_rule(op, fmt::format("cfg.kv_lora_rank = {}: the CUDA append kernel takes a multiple of 128", dkv), "kv_lora_rank");
    const uintptr_t need = fp8 ? 4 : 16;
    if (num_slots > 0 && reinterpret_cast<uintptr_t>(latent_cache.data) % need != 0)
      cuda_rule(op, fmt::format("latent_cache must be {}-byte aligned for the append kernel's stores; pass the start of an allocation",
                                need),
                "latent_cache");
  }
  if (T == 0) return;
  if (pl.cuda) {
#ifdef DSA_HAVE_CUDA
    cuda_impl::rope_quant_append(pl.device, cfg, detail::canonical_strides(c_kv), detail::canonical_strides(k_pe),
                                 detail::canonical_strides(positions), detail::canonical_strides(slot_mapping), latent_cache,
                                 num_slots, stream);
#endif
    return;
  }
  cpu::rope_quant_append(cfg, c_kv, k_pe, positions, slot_mapping, latent_cache, num_slots);
}

}  // namespace dsa::ops
