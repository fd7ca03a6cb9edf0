#pragma once
// What the front ends may ask of the CUDA backend without including CUDA
// headers. Available when the library was built with DSA_HAVE_CUDA.
#include <cstddef>
#include <cstdint>
#include <string>

struct CUstream_st;  // = cudaStream_t

namespace dsa::cuda {

struct DeviceInfo {
  int index = -1;
  std::string name;
  int sm_major = 0, sm_minor = 0;
  int multiprocessors = 0;
  size_t global_memory = 0;
  size_t l2_bytes = 0;
  size_t smem_optin_per_block = 0;
};

// Number of usable CUDA devices; 0 (never an error) when there is no driver or GPU.
int device_count();
// Properties of the current device, queried once per device and process;
// throws CudaError when there is none.
const DeviceInfo& current_device();

// Which kernel an op that has a newer one runs. kAuto is the library's
// choice (KernelPicks::resolved): the kernel whose GPU tests and figures are
// on record (docs/performance.md); the others force one, for the tests of
// both and for before/after benchmarks in one run. An op with one kernel
// ignores it.
enum class KernelPick : uint8_t { kAuto, kBaseline, kNew };
struct KernelPicks {
  KernelPick indexer_prefill = KernelPick::kAuto;  // indexer logits, 2 or more new tokens per request
  KernelPick indexer_decode = KernelPick::kAuto;   // indexer logits over the paged cache, next_n 1 to 4
  KernelPick topk = KernelPick::kAuto;             // causal top-k over the logits
  // Sparse MLA over the fp8 latent cache: kBaseline gathers the selected rows
  // into bf16 and runs the bf16 kernel; kNew reads the 656-byte rows itself.
  KernelPick sparse_mla_fp8 = KernelPick::kAuto;

  // What kAuto runs, per op, decided by the GPU runs on record
  // (docs/performance.md, "The newer kernels"): the one-read top-k and both
  // indexer kernels passed every test bit-identical to the older kernels and
  // are faster; the fused fp8 sparse MLA passed its tests but measured
  // slower than gather + bf16, so kAuto keeps the gather.
  static constexpr KernelPick kAutoIndexerPrefill = KernelPick::kNew;
  static constexpr KernelPick kAutoIndexerDecode = KernelPick::kNew;
  static constexpr KernelPick kAutoTopk = KernelPick::kNew;
  static constexpr KernelPick kAutoSparseMlaFp8 = KernelPick::kBaseline;
  // These picks with every kAuto replaced by the library's choice: what the
  // dispatch reads.
  KernelPicks resolved() const {
    auto r = [](KernelPick p, KernelPick a) { return p == KernelPick::kAuto ? a : p; };
    KernelPicks out;
    out.indexer_prefill = r(indexer_prefill, kAutoIndexerPrefill);
    out.indexer_decode = r(indexer_decode, kAutoIndexerDecode);
    out.topk = r(topk, kAutoTopk);
    out.sparse_mla_fp8 = r(sparse_mla_fp8, kAutoSparseMlaFp8);
    return out;
  }
};

// What every launcher is handed: the properties of the device it launches on
// (queried once per device, see current_device) and the stream. Launchers
// never query device attributes themselves.
struct DeviceContext {
  const DeviceInfo* device = nullptr;  // never null in a context from device_context()
  CUstream_st* stream = nullptr;       // nullptr: the legacy default stream
  KernelPicks picks;                   // kAuto everywhere unless a test or the CLI (--kernels) asks

  int num_sms() const { return device->multiprocessors; }
  size_t l2_bytes() const { return device->l2_bytes; }
  size_t smem_optin_per_block() const { return device->smem_optin_per_block; }
  int sm() const { return device->sm_major * 10 + device->sm_minor; }
};
// The current device's context on `stream`; throws CudaError when there is no device.
DeviceContext device_context(CUstream_st* stream = nullptr);

}  // namespace dsa::cuda
