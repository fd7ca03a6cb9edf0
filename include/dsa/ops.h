#pragma once
// The layer's stages as standalone ops, with the inputs engines hand them
// (the signatures of FlashMLA's flash_mla_sparse_fwd and DeepGEMM's
// fp8_mqa_logits / fp8_paged_mqa_logits): for the Python package and for
// anyone who wants to test or time one stage on their own tensors.
//
// Every tensor is a non-owning strided view, as DLPack describes one. An op
// runs where its tensors live: all on the CPU (the reference, dsa_reference)
// or all on one CUDA device (the CUDA backend, on `stream`, with that device
// made current for the call and restored after). Outputs are written in
// place; the caller allocates them (the Python package does so with the
// caller's framework). Every op checks every tensor first and throws, before
// touching anything:
//   - dsa::DTypeError for a wrong dtype (Python: TypeError);
//   - dsa::ShapeError naming the argument, the rule and the fix (Python:
//     ValueError) for a wrong rank or shape, tensors on different devices,
//     a bad stride, misalignment, null data with a non-zero size, an output
//     whose memory overlaps an input or another output, or an argument value
//     out of range (sm_scale, d_v, k, max_context_len);
//   - dsa::NoDeviceError for CUDA tensors in a build without the CUDA
//     backend, or on a device ordinal this process cannot see.
// Layout rules, the same for both backends (docs/ops.md):
//   - the last dimension is contiguous (stride 1): .contiguous() fixes a view
//     that is not;
//   - every other stride is at least the span of the dimensions inside it, so
//     views are row-major with optional padding (a slice such as q[:, :, :576]
//     of a wider tensor is fine; a transposed or broadcast view is not);
//     strides of size-1 dimensions are ignored;
//   - data is aligned to the dtype's size; an empty tensor may have null data.
// Where a CUDA kernel needs more (a dense layout, 16-byte alignment), the op
// copies the input into a stream-ordered temporary itself; the exceptions
// (caches written or read in place) are documented at the op.
// Device-side values (indices, lengths, block tables) are not checked on the
// host (that would need a synchronization); each op says what out-of-range
// values do, and none makes a kernel read or write outside the tensors.
//
// Messages name the op's own argument ("q", "kv", ...); Tensor::name is for
// the caller's bookkeeping and is not read by the ops.
//
// No CUDA headers here: streams are CUstream_st* (= cudaStream_t).
#include <cstdint>
#include <string>
#include <vector>

#include "dsa/config.h"
#include "dsa/error.h"

struct CUstream_st;

namespace dsa {

// A tensor of the wrong dtype (Python: TypeError).
class DTypeError : public Error {
 public:
  using Error::Error;
};

namespace ops {

enum class DType { BF16, F16, F32, F64, I32, I64, U8, FP8_E4M3 };
const char* to_string(DType d);
int64_t itemsize(DType d);

enum class DeviceKind { CPU, CUDA };

// A strided view. strides count elements (not bytes), one per dimension.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  DeviceKind device = DeviceKind::CPU;
  int device_index = 0;              // CUDA device ordinal; 0 for CPU
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;      // elements; same length as shape
  std::string name;                  // the caller's label; messages use the op's own argument names

  int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const;
  bool is_cuda() const { return device == DeviceKind::CUDA; }
  // Dense row-major (C-contiguous), ignoring strides of size-1 dimensions.
  bool contiguous() const;
};

// A dense tensor view over `data` with row-major strides.
Tensor dense(void* data, DType dtype, std::vector<int64_t> shape, DeviceKind device = DeviceKind::CPU, int device_index = 0,
             std::string name = {});

// True when this build has the CUDA backend and a usable device.
bool cuda_available();

// ---- sparse MLA (spec 3.6), as FlashMLA's flash_mla_sparse_fwd ---------------
// q           [T, H, d_qk] bf16 (DeepSeek-V3.2: d_qk = 576; the ops take 1..1024, H <= 65535)
// kv          [S, d_qk] or [S, 1, d_qk] bf16: one latent row per global slot (S may be 0)
// indices     [T, topk] or [T, 1, topk] int32, topk >= 1: slots; -1, negative or >= S is skipped,
//             a slot listed twice counts twice
// sm_scale    finite, positive; d_v in [1, d_qk] (512)
// out         [T, H, d_v] bf16: the softmax-weighted sum of the first d_v dims
// max_logits  [T, H] f32: max scaled score sm_scale * q.k over the valid indices (-inf with none)
// lse         [T, H] f32: NATURAL-log sum-exp of the scaled scores (+inf with no valid index, out = 0)
// Differences from FlashMLA: its lse is base 2 (lse_flashmla = lse / ln 2);
// both write +inf / -inf and out = 0 for a row with no valid index.
// CUDA: dsa::cuda::sparse_mla with the views' strides and the layer's
// workspace (sparse_mla_workspace_bytes for T, H, topk, S), allocated
// stream-ordered on `stream`: bit for bit the layer's sparse_mla for the same
// q, cache and indices. Views the sm90 kernel cannot take (H not 64 / 128,
// topk not a multiple of 64, strides not multiples of 8, q / kv / out not
// 16-byte aligned) run on the simple kernel, as in the layer.
void sparse_mla_fwd(const Tensor& q, const Tensor& kv, const Tensor& indices, double sm_scale, int64_t d_v, const Tensor& out,
                    const Tensor& max_logits, const Tensor& lse, CUstream_st* stream = nullptr);

// ---- indexer logits (spec 3.5), as DeepGEMM's fp8_mqa_logits -----------------
// q        [M, HI, 128] fp8_e4m3 (unscaled; the q scale is folded into weights); HI = 64 on CUDA
// k        [N, 128] fp8_e4m3, k_scale [N] or [N, 1] f32 (N <= 2^31 - 1)
// weights  [M, HI] f32
// k_start, k_end [M] int32: query m sees keys [k_start[m], k_end[m]), both clamped to [0, N]
// logits   [M, N] f32 (row stride >= N): logits[m, n] = k_scale[n] * sum_h weights[m, h] * relu(q[m, h] . k[n])
//          for n in [k_start[m], k_end[m]); -inf at and after k_end[m] always; before k_start[m]
//          -inf with clean_logits, else the logit itself (computed anyway, see below).
// CUDA: the indexer kernel reads a paged cache, so k / k_scale are first
// repacked into a stream-ordered temporary of 64-token blocks (N * 132 bytes)
// with an identity block table, one "request" whose visible end for row m is
// clamp(k_end[m]); keys [0, k_start[m]) are computed and then overwritten
// with -inf by a small kernel: a cost of k_start / k_end of the work on rows
// with a late start (DeepGEMM skips them). Padded logits rows (row stride > N)
// go through a dense temporary (the kernel writes whole rows) and a 2-D copy.
void fp8_mqa_logits(const Tensor& q, const Tensor& k, const Tensor& k_scale, const Tensor& weights, const Tensor& k_start,
                    const Tensor& k_end, const Tensor& logits, bool clean_logits = true, CUstream_st* stream = nullptr);

// ---- indexer logits over the paged cache, as DeepGEMM's fp8_paged_mqa_logits -
// q             [B, next_n, HI, 128] fp8_e4m3; HI = 64 on CUDA
// kv_cache      [num_blocks, block_size, 1, 132] or [num_blocks, block_size * 132] uint8 (or fp8) bytes,
//               contiguous: per block block_size x 128 fp8 keys, then block_size f32 scales
//               (spec section 4); block_size = 64 and 16-byte aligned on CUDA
// weights       [B * next_n, HI] f32
// context_lens  [B] int32: tokens in each request's context, the next_n new ones included
// block_table   [B, max_blocks] int32
// logits        [B * next_n, max_context_len] f32: row b * next_n + j sees positions
//               [0, context_lens[b] - next_n + j + 1) (causal within the next_n), clamped to
//               [0, min(max_context_len, max_blocks * block_size)] and cut at the first block-table
//               entry outside [0, num_blocks) (the context ends there); -inf after, whatever
//               clean_logits says (the kernel writes whole rows).
void fp8_paged_mqa_logits(const Tensor& q, const Tensor& kv_cache, const Tensor& weights, const Tensor& context_lens,
                          const Tensor& block_table, int64_t max_context_len, const Tensor& logits, bool clean_logits = true,
                          CUstream_st* stream = nullptr);

// ---- top-k (spec 3.5) --------------------------------------------------------
// logits  [T, S] f32 (row stride >= S, S <= 2^31 - 1), lengths [T] int32 (candidates: columns
//         [0, lengths[t]), clamped to [0, S])
// k       in [0, 2^31 - 1]
// out     [T, k] int32: positions of the min(k, length) largest, ties to the lower position,
//         in ascending position order, then -1. NaN ranks as -inf. Exact on both backends.
void topk(const Tensor& logits, int64_t k, const Tensor& lengths, const Tensor& out, CUstream_st* stream = nullptr);

// ---- RoPE, quantization and the paged cache append (spec 3.4, section 4) ----
// Latent cache: k_pe gets the interleaved MLA RoPE at `positions` (cfg's
// rope_theta and yarn scaling), then [c_kv | k_pe] is written at each token's
// slot, as bf16 or in the 656-byte fp8 form (cfg.kv_cache_dtype).
// c_kv          [T, kv_lora_rank] bf16 (after kv_a_layernorm)
// k_pe          [T, qk_rope_head_dim] bf16 (before RoPE)
// positions     [T] int32, slot_mapping [T] int64 (slots outside [0, num_slots) are skipped)
// latent_cache  [num_slots, 576] (or [num_blocks, block_size, 576]) bf16 with kv_cache_dtype bf16,
//               [num_slots, 656] (or [.., .., 656]) uint8 with fp8; contiguous (written in place)
// CUDA: the layer's mla_rope (no query heads) into a stream-ordered temporary,
// then its cache_append: bit for bit what the layer writes for the same
// c_kv, k_pe and positions. The CPU path rounds the same way; its sin / cos
// may differ from the GPU's sincosf in the last bit of a rotated value.
void rope_quant_append(const LayerConfig& cfg, const Tensor& c_kv, const Tensor& k_pe, const Tensor& positions,
                       const Tensor& slot_mapping, const Tensor& latent_cache, CUstream_st* stream = nullptr);

}  // namespace ops
}  // namespace dsa
