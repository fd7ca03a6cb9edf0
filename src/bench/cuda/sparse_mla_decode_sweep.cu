// Issue 18's sparse MLA decode sweep (dsa/decode_sweep.h says what a cell
// is and the ways of running it). The attention alone, on inputs made here:
// a paged pool of `batch` contexts of s_k tokens (blocks of all requests
// shuffled in one pool, as a long-running cache ends up), random bf16 / fp8
// rows, random queries, and per query min(topk, position + 1) distinct random
// positions of its request as global slots.
//
// Two ways to time a cell (DecodeSweepOptions::protocol):
// - "sustained": `warmup` runs, then `iters` runs each between its own CUDA
//   events (synchronized after each), L2 warm: what a decode loop sees when
//   the previous layer left nothing of this one's data in L2, but this
//   kernel's own last run did.
// - "flashmla": what FlashMLA's decode test does around its figures
//   (data/anchors/flashmla-sparse-decode.json): 0.3 s idle before the cell,
//   one warm-up call, then 30 calls, each after an 8 GB memset (which leaves
//   no line of the cache, the indices or the queries in L2), each between its
//   own events. FlashMLA reads kernel time from the profiler; events around
//   one launch add about the launch latency (a few us), which matters at
//   batch 2 (~18 us) and is stated in the docs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "bench/cuda/sparse_mla_sweep_inputs.cuh"
#include "cuda/check.cuh"
#include "cuda/layer/layer_kernels.h"
#include "cuda/sparse_mla/sparse_mla.h"
#include "dsa/bench.h"
#include "dsa/cuda.h"
#include "dsa/decode_sweep.h"
#include "dsa/error.h"
#include "dsa/hash.h"
#include "dsa/stats.h"

namespace dsa::cuda {
namespace {

using sparse_mla_sweep::EventPool;
using sparse_mla_sweep::fill_random_bf16;
using sparse_mla_sweep::probe_mhz;
using sparse_mla_sweep::sm_clock_probe;

constexpr int64_t kTpb = 64;          // slots per cache block (spec 4)
constexpr int64_t kFp8Row = 656;      // bytes of one fp8 latent row
constexpr size_t kFlushBytes = 8000000000ull;  // FlashMLA's flush: torch.empty(int(8e9 // 4), dtype=torch.int32).zero_()
constexpr int kFlashMlaRuns = 30;
constexpr float kSoftmaxScale = 0.1352338f;

// Device memory of one cell, freed when the cell ends. A failed cudaMalloc
// is an OutOfMemoryError (DSA_CUDA_CHECK), which skips the cell.
struct Buf {
  void* p = nullptr;
  explicit Buf(size_t bytes) { DSA_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16))); }
  ~Buf() { cudaFree(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// The fp8 latent rows of spec 4, written as 4-byte words (164 per row):
// words 0..127 four random e4m3 bytes (never the NaN codes 0x7f / 0xff),
// 128..131 the four fp32 scales (powers of two, 2^-9 to 2^-7, so values stay
// below 2 in magnitude as the layer's unit-RMS rows do), 132..163 two random
// bf16 of k_pe in [-1, 1).
__global__ void fill_fp8_rows(uint32_t* pool, int64_t rows, uint64_t seed) {
  const int64_t words = rows * (kFp8Row / 4);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int w = static_cast<int>(i % (kFp8Row / 4));
    const uint64_t h = mix64(seed * 0x100000001b3ull + static_cast<uint64_t>(i));
    uint32_t v;
    if (w < 128) {
      v = static_cast<uint32_t>(h);
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (v >> (8 * b)) & 0xffu;
        if ((byte & 0x7fu) == 0x7fu) v ^= 1u << (8 * b);
      }
    } else if (w < 132) {
      const float s = 1.0f / static_cast<float>(128 << (h % 3));
      v = __float_as_uint(s);
    } else {
      const __nv_bfloat16 a = __float2bfloat16(hash_unit_interval(h) * 2.f - 1.f);
      const __nv_bfloat16 b = __float2bfloat16(hash_unit_interval(mix64(h + 1)) * 2.f - 1.f);
      v = static_cast<uint32_t>(__bfloat16_as_ushort(a)) | (static_cast<uint32_t>(__bfloat16_as_ushort(b)) << 16);
    }
    pool[i] = v;
  }
}

// Host inputs of a cell: the same for every way of one shape (seeded by the shape).
struct CellIndices {
  std::vector<int32_t> idx;        // [T, topk] global slots, -1 padded
  std::vector<int32_t> valid_len;  // [T]
  int64_t valid = 0, distinct = 0, num_slots = 0;
};

CellIndices make_cell_indices(const DecodeSweepPoint& p, uint64_t seed) {
  CellIndices c;
  const int64_t bpr = (p.s_k + kTpb - 1) / kTpb;
  const int64_t blocks = p.batch * bpr;
  c.num_slots = blocks * kTpb;
  const uint64_t shape = mix64(static_cast<uint64_t>(p.batch) * 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(p.next_n) << 48 ^
                               static_cast<uint64_t>(p.s_k) << 20 ^ static_cast<uint64_t>(p.topk));
  std::mt19937_64 rng(seed ^ shape);
  std::vector<int32_t> perm(static_cast<size_t>(blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  const int64_t T = p.tokens(), K = p.topk;
  c.idx.assign(static_cast<size_t>(T * K), -1);
  c.valid_len.assign(static_cast<size_t>(T), 0);
  std::vector<uint32_t> pick_mark(static_cast<size_t>(p.s_k), 0), seen_mark(static_cast<size_t>(p.s_k), 0);
  std::vector<int32_t> pool(static_cast<size_t>(p.s_k));
  uint32_t mark = 0;
  for (int64_t r = 0; r < p.batch; ++r) {
    const uint32_t req_mark = static_cast<uint32_t>(r) + 1;
    for (int64_t i = 0; i < p.next_n; ++i) {
      const int64_t t = r * p.next_n + i;
      const int64_t pos = p.s_k - p.next_n + i;
      const int64_t k = std::min<int64_t>(K, pos + 1);
      int32_t* row = &c.idx[static_cast<size_t>(t * K)];
      if (2 * k > pos + 1) {
        // Most positions: a partial Fisher-Yates over 0..pos.
        std::iota(pool.begin(), pool.begin() + pos + 1, 0);
        for (int64_t j = 0; j < k; ++j) {
          std::uniform_int_distribution<int64_t> d(j, pos);
          std::swap(pool[j], pool[d(rng)]);
          row[j] = pool[j];
        }
      } else {
        ++mark;
        std::uniform_int_distribution<int64_t> d(0, pos);
        for (int64_t j = 0; j < k;) {
          const int64_t x = d(rng);
          if (pick_mark[x] == mark) continue;
          pick_mark[x] = mark;
          row[j++] = static_cast<int32_t>(x);
        }
      }
      for (int64_t j = 0; j < k; ++j) {
        const int32_t x = row[j];
        if (seen_mark[x] != req_mark) seen_mark[x] = req_mark, ++c.distinct;
        row[j] = static_cast<int32_t>(perm[static_cast<size_t>(r * bpr + x / kTpb)] * kTpb + x % kTpb);
      }
      c.valid_len[t] = static_cast<int32_t>(k);
      c.valid += k;
    }
  }
  return c;
}

// GPU memory a cell allocates (decode_sweep.h: pool, q, out, lse, row_max,
// indices, valid_len, the gathered rows for way gather, the workspace).
double cell_bytes(const DecodeSweepPoint& p, int64_t num_slots, size_t ws) {
  const double T = static_cast<double>(p.tokens()), H = static_cast<double>(p.num_heads), K = static_cast<double>(p.topk);
  double b = static_cast<double>(num_slots) * static_cast<double>(decode_cache_row_bytes(p.cache));
  b += T * H * (kDecodeDqk * 2 + kDecodeDv * 2 + 8) + T * K * 4 + T * 4 + static_cast<double>(ws);
  if (p.way == "gather") b += T * K * (kDecodeDqk * 2 + 4);
  return b;
}

double gib(double b) { return b / (1024.0 * 1024.0 * 1024.0); }

}  // namespace

DecodeSweep sweep_sparse_mla_decode(const DecodeSweepOptions& opt) {
  check_sweep_protocol(opt.protocol);
  if (opt.protocol == "sustained" && (opt.iters < 1 || opt.warmup < 0)) {
    throw ConfigError(fmt::format("iters = {}, warmup = {}: need at least one timed run and no negative warm-up", opt.iters, opt.warmup),
                      opt.iters < 1 ? "iters" : "warmup");
  }
  const bool flashmla = opt.protocol == "flashmla";
  DeviceContext base = device_context();  // the legacy default stream
  base.picks = opt.picks;
  const cudaStream_t stream = base.stream;

  DecodeSweep sweep;
  sweep.device = base.device->name;
  sweep.protocol = opt.protocol;
  sweep.kernels = format_kernel_picks(opt.picks);
  sweep.warmup = flashmla ? 1 : opt.warmup;
  sweep.iters = flashmla ? kFlashMlaRuns : opt.iters;
  FlashMlaDecodeAnchors anchors;
  if (!opt.anchors_path.empty()) {
    anchors = load_flashmla_decode_anchors(opt.anchors_path, sweep.device);
  } else {
    anchors.source = "no FlashMLA decode anchor file given";
  }
  sweep.flashmla_source = anchors.source;

  std::unique_ptr<Buf> flush;
  if (flashmla) {
    try {
      flush = std::make_unique<Buf>(kFlushBytes);
    } catch (const OutOfMemoryError&) {
      throw OutOfMemoryError(fmt::format("--protocol flashmla clears the caches with an 8 GB memset before each run, and {} has no "
                                         "8 GB of GPU memory free; use --protocol sustained",
                                         sweep.device));
    }
  }
  Buf probe(6 * sizeof(unsigned long long));
  EventPool events;
  auto elapsed_ms = [](cudaEvent_t a, cudaEvent_t b) {
    float m = 0;
    DSA_CUDA_CHECK(cudaEventElapsedTime(&m, a, b));
    return static_cast<double>(m);
  };

  for (const DecodeSweepPoint& pt : opt.points) {
    const std::string why = decode_sweep_skip_reason(pt);
    if (!why.empty()) {
      sweep.skipped.push_back({pt, why});
      continue;
    }
    try {
      const CellIndices ci = make_cell_indices(pt, opt.seed);
      const int64_t T = pt.tokens();
      const int H = static_cast<int>(pt.num_heads), K = static_cast<int>(pt.topk);
      const bool direct = pt.way == "direct", gather = pt.way == "gather", fused = pt.way == "fused";
      DeviceContext ctx = base;
      if (fused) ctx.picks.sparse_mla_fp8 = KernelPick::kNew;
      // As the layer sizes it: for the cache with the bf16 cache, for none
      // (split only) with the fp8 cache, whose gathered rows are in token order.
      const size_t ws = sparse_mla_workspace_bytes(ctx, T, H, K, direct ? ci.num_slots : 0);
      {
        size_t free_b = 0, total_b = 0;
        DSA_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        const double need = cell_bytes(pt, ci.num_slots, ws);
        if (need + 256.0 * 1024 * 1024 > static_cast<double>(free_b)) {
          sweep.skipped.push_back({pt, fmt::format("needs {:.2f} GiB of GPU memory, {:.2f} GiB are free", gib(need), gib(free_b))});
          continue;
        }
      }
      const int64_t row_bytes = decode_cache_row_bytes(pt.cache);
      Buf pool(static_cast<size_t>(ci.num_slots * row_bytes));
      Buf q(static_cast<size_t>(T * H * kDecodeDqk * 2)), out(static_cast<size_t>(T * H * kDecodeDv * 2));
      Buf lse(static_cast<size_t>(T * H * 4)), row_max(static_cast<size_t>(T * H * 4));
      Buf idx(ci.idx.size() * 4), vlen(ci.valid_len.size() * 4), work(ws);
      std::unique_ptr<Buf> kv_gather, idx_gather;
      if (gather) {
        kv_gather = std::make_unique<Buf>(static_cast<size_t>(T * K * kDecodeDqk * 2));
        idx_gather = std::make_unique<Buf>(static_cast<size_t>(T * K * 4));
      }
      if (pt.cache == "fp8") {
        fill_fp8_rows<<<1024, 256, 0, stream>>>(pool.as<uint32_t>(), ci.num_slots, opt.seed * 7 + 1);
        DSA_CHECK_LAUNCH("fill_fp8_rows");
      } else {
        fill_random_bf16<<<1024, 256, 0, stream>>>(pool.as<__nv_bfloat16>(), ci.num_slots * kDecodeDqk, opt.seed * 7 + 1);
        DSA_CHECK_LAUNCH("fill_random_bf16");
      }
      fill_random_bf16<<<1024, 256, 0, stream>>>(q.as<__nv_bfloat16>(), T * H * kDecodeDqk, opt.seed * 7 + 2);
      DSA_CHECK_LAUNCH("fill_random_bf16");
      DSA_CUDA_CHECK(cudaMemcpy(idx.p, ci.idx.data(), ci.idx.size() * 4, cudaMemcpyHostToDevice));
      DSA_CUDA_CHECK(cudaMemcpy(vlen.p, ci.valid_len.data(), ci.valid_len.size() * 4, cudaMemcpyHostToDevice));

      SparseMlaParams p;
      p.q = q.as<__nv_bfloat16>();
      p.indices = idx.as<int32_t>();
      p.valid_len = vlen.as<int32_t>();
      p.out = out.as<__nv_bfloat16>();
      p.lse = lse.as<float>();
      p.row_max = row_max.as<float>();
      p.T = T;
      p.num_slots = ci.num_slots;
      p.num_heads = H;
      p.topk = K;
      p.d_qk = kDecodeDqk;
      p.d_v = kDecodeDv;
      p.softmax_scale = kSoftmaxScale;
      p.workspace = ws ? work.as<float>() : nullptr;
      p.workspace_bytes = ws;
      GatherFp8Params gp;
      std::string kernel;
      if (direct) {
        p.kv = pool.as<__nv_bfloat16>();
        kernel = sparse_mla_sm90_can_implement(resolve_strides(p), ctx) ? "sm90" : "simple";
      } else if (gather) {
        gp.latent_pool = pool.as<uint8_t>(), gp.indices = idx.as<int32_t>(), gp.out = kv_gather->as<__nv_bfloat16>();
        gp.out_indices = idx_gather->as<int32_t>(), gp.T = T, gp.num_slots = ci.num_slots, gp.k = K;
        gp.dkv = kDecodeDv, gp.rope = kDecodeDqk - kDecodeDv;
        p.kv = kv_gather->as<__nv_bfloat16>(), p.indices = idx_gather->as<int32_t>(), p.num_slots = T * K;
        kernel = std::string("gather + ") + (sparse_mla_sm90_can_implement(resolve_strides(p), ctx) ? "sm90" : "simple");
      } else {
        p.kv_fp8 = pool.as<uint8_t>(), p.stride_kv_slot = kFp8Row;
        kernel = "kv_fp8 (sparse_mla_fp8=new)";
      }
      auto run = [&] {
        if (gather) gather_latent_fp8(ctx, gp);
        sparse_mla(p, ctx);
      };
      // One untimed call first: a launcher that rejects the cell (ShapeError) skips it here.
      run();
      DSA_CUDA_CHECK(cudaStreamSynchronize(stream));

      std::vector<double> ms;
      int warmup = opt.warmup, runs = opt.iters;
      if (flashmla) {
        warmup = 1, runs = kFlashMlaRuns;
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        for (int i = 0; i < 2 * runs; ++i) events.get(static_cast<size_t>(i));  // made before the timed calls are queued
      }
      for (int i = 0; i < warmup; ++i) run();
      sm_clock_probe<<<1, 1, 0, stream>>>(probe.as<unsigned long long>());
      DSA_CHECK_LAUNCH("sm_clock_probe");
      if (flashmla) {
        for (int i = 0; i < runs; ++i) {
          DSA_CUDA_CHECK(cudaMemsetAsync(flush->p, 0, kFlushBytes, stream));
          DSA_CUDA_CHECK(cudaEventRecord(events.get(2 * i), stream));
          run();
          DSA_CUDA_CHECK(cudaEventRecord(events.get(2 * i + 1), stream));
        }
        DSA_CUDA_CHECK(cudaEventSynchronize(events.get(2 * runs - 1)));
        for (int i = 0; i < runs; ++i) ms.push_back(elapsed_ms(events.get(2 * i), events.get(2 * i + 1)));
      } else {
        cudaEvent_t e0 = events.get(0), e1 = events.get(1);
        for (int i = 0; i < runs; ++i) {
          DSA_CUDA_CHECK(cudaEventRecord(e0, stream));
          run();
          DSA_CUDA_CHECK(cudaEventRecord(e1, stream));
          DSA_CUDA_CHECK(cudaEventSynchronize(e1));
          ms.push_back(elapsed_ms(e0, e1));
        }
      }
      sm_clock_probe<<<1, 1, 0, stream>>>(probe.as<unsigned long long>() + 3);
      DSA_CHECK_LAUNCH("sm_clock_probe");
      unsigned long long h[6];
      DSA_CUDA_CHECK(cudaMemcpy(h, probe.p, sizeof h, cudaMemcpyDeviceToHost));

      const SampleSummary st = summarize(ms);
      DecodeSweepRow row;
      row.point = pt;
      row.kernel = kernel;
      row.median_us = st.median * 1e3;
      row.min_us = st.min * 1e3;
      row.max_us = st.max * 1e3;
      row.mean_us = st.mean * 1e3;
      row.warmup = warmup;
      row.runs = runs;
      row.valid = ci.valid;
      row.distinct = ci.distinct;
      const DecodeSweepWork w = decode_sweep_work(pt, ci.valid, ci.distinct);
      row.flops = w.flops;
      row.bytes = w.bytes;
      row.sm_mhz = probe_mhz(h);
      row.flashmla_us = anchors.at(pt);
      sweep.rows.push_back(row);
    } catch (const ShapeError& e) {
      sweep.skipped.push_back({pt, e.what()});
    } catch (const OutOfMemoryError& e) {
      sweep.skipped.push_back({pt, e.what()});
    }
  }
  return sweep;
}

}  // namespace dsa::cuda
