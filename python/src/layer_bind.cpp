// LayerConfig, CacheManager / batch metadata and the layer (CPU reference or
// CUDA backend) for Python. The Python layer (dsalab/layer.py) wraps these
// with the caller's framework; here every tensor is a DLPack view.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <fmt/format.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/config.h"
#include "dsa/error.h"
#include "dsa/layer.h"
#include "dsa/ops.h"
#include "dsa/reference.h"
#include "tensor.h"

#ifdef DSA_HAVE_CUDA
#include "cuda_glue.h"
#include "dsa/cuda.h"
#include "dsa/cuda_layer.h"
#endif

namespace dsalab {


namespace {

using dsa::ops::DeviceKind;
using dsa::ops::DType;
using dsa::ops::Tensor;

using RequestTuple = std::tuple<int64_t, int64_t, int64_t>;

std::vector<dsa::StepRequest> to_requests(const std::vector<RequestTuple>& v) {
  std::vector<dsa::StepRequest> r;
  r.reserve(v.size());
  for (const auto& [id, cached, num_new] : v) r.push_back(dsa::StepRequest{id, cached, num_new});
  return r;
}

#ifdef DSA_HAVE_CUDA
using gpu::DeviceGuard;
#else
// Without the CUDA backend nothing lives on a device (CUDA objects are refused first).
struct DeviceGuard {
  explicit DeviceGuard(int) {}
};
#endif

void require_no_cuda_build_device(const char* what) {
#ifndef DSA_HAVE_CUDA
  throw dsa::NoDeviceError(fmt::format("{}: this dsalab build has no CUDA backend (configured without nvcc or with "
                                       "DSA_ENABLE_CUDA=OFF); use device='cpu' or rebuild with CUDA",
                                       what));
#else
  if (dsa::cuda::device_count() == 0) {
    throw dsa::NoDeviceError(fmt::format("{}: no CUDA device is visible; use device='cpu' or run on a machine with a GPU", what));
  }
#endif
}

// ---- the paged caches ------------------------------------------------------

// Python threads may call into one cache (and the layers using it) at once
// with the GIL released: `mu` serializes every use of the manager. Lock order
// everywhere: a layer's mutex, then a cache's; the GIL is released first and
// is never taken while either is held.
struct PyCache {
  dsa::LayerConfig cfg;
  bool on_device = false;
  int device_index = 0;
  mutable std::mutex mu;
  std::unique_ptr<dsa::CacheManager> m;

  PyCache(const dsa::LayerConfig& c, std::optional<int64_t> tokens, std::optional<int64_t> num_blocks, int64_t num_layers,
          bool cuda, int dev)
      : cfg(c), on_device(cuda), device_index(dev) {
    dsa::validate(cfg);
    if (tokens.has_value() == num_blocks.has_value()) {
      throw dsa::ConfigError("CacheManager needs exactly one of tokens= (capacity in tokens, rounded up to whole blocks) and "
                             "num_blocks=; give one of them",
                             "tokens");
    }
    dsa::CacheConfig cc = dsa::CacheConfig::for_layer(cfg, num_layers);
    if (tokens) {
      cc.with_tokens(*tokens);
    } else {
      if (*num_blocks <= 0) {
        throw dsa::ConfigError(fmt::format("num_blocks = {} must be at least 1; give the cache's capacity in blocks of {} tokens",
                                           *num_blocks, cfg.tokens_per_block),
                               "num_blocks");
      }
      cc.num_blocks = *num_blocks;
    }
    const dsa::DeviceAllocator* alloc = nullptr;
    if (cuda) {
      require_no_cuda_build_device("CacheManager(device='cuda')");
#ifdef DSA_HAVE_CUDA
      cc.storage = dsa::Storage::Device;
      alloc = dsa::cuda::device_allocator();
#endif
    }
    cc.validate();
    nb::gil_scoped_release nogil;
    const DeviceGuard dg(guard_device());
    m = std::make_unique<dsa::CacheManager>(cc, alloc);
  }

  ~PyCache() {
    // The pools are freed on their own device (the device allocator's cudaFree
    // waits for the device first, so a step still queued on them finishes).
    try {
      const DeviceGuard dg(guard_device());
      m.reset();
    } catch (const dsa::Error&) {
      // Setting the device failed (a dead context): free what can be freed.
      m.reset();
    }
  }

  // The device to make current around the manager's CUDA calls (-1: none, host storage).
  int guard_device() const { return on_device ? device_index : -1; }

  // f(manager) with the GIL released and the cache's mutex held (and its device current).
  template <typename F>
  auto locked(F&& f) const {
    nb::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lk(mu);
    const DeviceGuard dg(guard_device());
    return f(*m);
  }

  nb::object pool_view(nb::handle self, int64_t layer, bool latent) {
    const dsa::CacheConfig& cc = m->config();
    uint8_t* p = locked([&](dsa::CacheManager& cm) { return latent ? cm.latent_pool(layer) : cm.indexer_pool(layer); });
    size_t shape[2];
    nb::dlpack::dtype dt{static_cast<uint8_t>(nb::dlpack::dtype_code::UInt), 8, 1};
    if (latent) {
      shape[0] = static_cast<size_t>(cc.num_blocks * cc.tokens_per_block);
      if (cc.latent_dtype == dsa::LatentCacheDType::BF16) {
        dt = nb::dlpack::dtype{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
        shape[1] = static_cast<size_t>(cc.kv_lora_rank + cc.rope_dim);
      } else {
        shape[1] = static_cast<size_t>(cc.latent_bytes_per_token());
      }
    } else {
      shape[0] = static_cast<size_t>(cc.num_blocks);
      shape[1] = static_cast<size_t>(cc.indexer_bytes_per_block());
    }
    const int dev_type = on_device ? nb::device::cuda::value : nb::device::cpu::value;
    // The view keeps the cache (self) alive.
    return nb::cast(nb::ndarray<nb::array_api>(p, 2, shape, self, nullptr, dt, dev_type, on_device ? device_index : 0));
  }
};

struct PyBatch {
  dsa::BatchMetadata md;
  PyCache* cache = nullptr;  // kept alive by nb::keep_alive on step()/metadata()
};

// ---- the layer ---------------------------------------------------------------

Tensor checked_2d(const Tensor& t, DType dtype, DeviceKind dev, int dev_index, int64_t rows, int64_t cols, const char* what) {
  const char* devname = dev == DeviceKind::CUDA ? "CUDA" : "CPU";
  if (t.dtype != dtype) {
    throw dsa::DTypeError(fmt::format("{} has dtype {}; the layer takes {} (bfloat16; uint16 bf16 bits from NumPy/CuPy): convert it "
                                      "with .to(torch.bfloat16) or equivalent",
                                      t.name, dsa::ops::to_string(t.dtype), dsa::ops::to_string(dtype)),
                          t.name);
  }
  if (t.device != dev || (dev == DeviceKind::CUDA && t.device_index != dev_index)) {
    throw dsa::ShapeError(fmt::format("{} is on {}{}, but this layer runs on {}{}: move it there (e.g. .to('{}'))", t.name,
                                      t.is_cuda() ? "CUDA device " : "the CPU", t.is_cuda() ? std::to_string(t.device_index) : "",
                                      devname, dev == DeviceKind::CUDA ? fmt::format(" device {}", dev_index) : "",
                                      dev == DeviceKind::CUDA ? fmt::format("cuda:{}", dev_index) : "cpu"),
                          t.name);
  }
  if (t.ndim() != 2 || t.shape[0] != rows || t.shape[1] != cols) {
    std::string got = "[";
    for (int64_t i = 0; i < t.ndim(); ++i) got += (i ? ", " : "") + std::to_string(t.shape[i]);
    got += "]";
    throw dsa::ShapeError(fmt::format("{} has shape {}; {} must be [{}, {}] ({}): reshape it or build the batch for these tokens",
                                      t.name, got, t.name, rows, cols, what),
                          t.name);
  }
  return t;
}

class PyLayer {
 public:
  PyLayer(const dsa::LayerConfig& cfg, const std::string& weights, uint64_t seed, int64_t layer, bool cuda, int dev)
      : cfg_(cfg), cuda_(cuda), dev_(dev) {
    dsa::validate(cfg_);
    if (layer < 0) throw dsa::ConfigError(fmt::format("layer = {} is invalid: layer indices start at 0", layer), "layer");
    if (cuda) require_no_cuda_build_device("DSALayer(device='cuda')");
    nb::gil_scoped_release nogil;
    const dsa::LayerWeights w = weights.empty() ? dsa::generate_weights(cfg_, seed) : dsa::load_weights(cfg_, weights, layer);
    if (!cuda) {
      pw_ = std::make_unique<dsa::ref::PreparedWeights>(dsa::ref::prepare_weights(cfg_, w));
      return;
    }
#ifdef DSA_HAVE_CUDA
    const DeviceGuard dg(dev_);
    gpu_ = std::make_unique<dsa::cuda::CudaLayer>(cfg_, w);
#endif
  }

  ~PyLayer() {
#ifdef DSA_HAVE_CUDA
    if (!gpu_) return;
    // The last step's kernels may still be queued on the caller's stream and
    // read the layer's buffers: let them finish, then free on the layer's device.
    try {
      const DeviceGuard dg(dev_);
      step_done_.synchronize();
      gpu_.reset();
    } catch (const dsa::Error&) {
      gpu_.reset();
    }
#endif
  }
  PyLayer(const PyLayer&) = delete;
  PyLayer& operator=(const PyLayer&) = delete;

  const dsa::LayerConfig& config() const { return cfg_; }
  int64_t output_width() const { return cfg_.o_proj ? cfg_.hidden_size : cfg_.num_heads * cfg_.v_head_dim; }

  nb::object forward(nb::handle hidden, PyBatch& b, nb::handle out, uintptr_t stream, int64_t cache_layer, bool trace,
                     bool trace_logits) {
    if (!b.cache) throw dsa::CacheError("the batch is not attached to a cache; build it with CacheManager.step()");
    PyCache& pc = *b.cache;
    const dsa::BatchMetadata& md = b.md;
    const int64_t T = md.num_tokens, W = output_width();
    if (pc.on_device != cuda_ || (cuda_ && pc.device_index != dev_)) {
      throw dsa::ConfigError(fmt::format("the batch's cache lives on {} and this layer on {}: build the CacheManager with the "
                                         "layer's device",
                                         pc.on_device ? fmt::format("cuda:{}", pc.device_index) : "cpu",
                                         cuda_ ? fmt::format("cuda:{}", dev_) : "cpu"),
                             "device");
    }
    const dsa::CacheConfig& cc = pc.m->config();
    if (cc.tokens_per_block != cfg_.tokens_per_block || cc.latent_dtype != cfg_.kv_cache_dtype ||
        cc.kv_lora_rank != cfg_.kv_lora_rank || cc.rope_dim != cfg_.qk_rope_head_dim || cc.index_head_dim != cfg_.index_head_dim) {
      throw dsa::ConfigError("the cache was built for another layer configuration (tokens_per_block, kv_cache_dtype or widths "
                             "differ): build the CacheManager from this layer's config",
                             "config");
    }
    Args a;
    const DeviceKind dk = cuda_ ? DeviceKind::CUDA : DeviceKind::CPU;
    const Tensor h = checked_2d(a.tensor(hidden, "hidden"), DType::BF16, dk, dev_, T, cfg_.hidden_size,
                                "the batch's new tokens x hidden_size");
    const Tensor o = checked_2d(a.output(out, "out"), DType::BF16, dk, dev_, T, W, "tokens x output width");
    dsa::TraceOptions topt;
    topt.intermediates = trace;
    topt.logits = trace && trace_logits;
    dsa::LayerTrace tr;
    if (!cuda_) {
      nb::gil_scoped_release nogil;
      // Layer, then cache (the one lock order); both released before the GIL is taken back.
      const std::lock_guard<std::mutex> layer_lock(mu_);
      const std::lock_guard<std::mutex> cache_lock(pc.mu);
      std::vector<dsa::bf16_t> hv(static_cast<size_t>(T * cfg_.hidden_size));
      const auto* hp = static_cast<const dsa::bf16_t*>(h.data);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < cfg_.hidden_size; ++i) hv[t * cfg_.hidden_size + i] = hp[t * h.strides[0] + i * h.strides[1]];
      dsa::check_finite("hidden", {T, cfg_.hidden_size}, hv.data(), static_cast<int64_t>(hv.size()));
      const std::vector<float> y = dsa::ref::layer_forward(*pw_, hv, md, *pc.m, cache_layer, topt, trace ? &tr : nullptr, nullptr);
      auto* op = static_cast<dsa::bf16_t*>(o.data);
      // The reference's output is already bf16-rounded: the conversion is exact.
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < W; ++i) op[t * o.strides[0] + i * o.strides[1]] = dsa::float_to_bf16(y[t * W + i]);
    } else {
#ifdef DSA_HAVE_CUDA
      if (!h.contiguous()) {
        throw dsa::ShapeError("hidden is not contiguous; the CUDA layer reads it in place (zero copy): pass hidden.contiguous()",
                              "hidden");
      }
      // cuBLASLt and the vectorized kernels read hidden with 16-byte loads; a
      // misaligned address is a sticky fault that ends the CUDA context.
      if (T > 0 && reinterpret_cast<uintptr_t>(h.data) % 16 != 0) {
        throw dsa::ShapeError(fmt::format("hidden's data pointer is {} bytes past a 16-byte boundary (a view at an odd element "
                                          "offset); the CUDA layer reads it in place with 16-byte loads and needs it 16-byte "
                                          "aligned: pass hidden.clone() (a fresh allocation is aligned)",
                                          reinterpret_cast<uintptr_t>(h.data) % 16),
                              "hidden");
      }
      if (T > 0 && reinterpret_cast<uintptr_t>(o.data) % 16 != 0) {
        throw dsa::ShapeError("out's data pointer is not 16-byte aligned; the CUDA layer needs it so: pass a fresh tensor",
                              "out");
      }
      if (T > 1 && (o.strides[1] != 1 || o.strides[0] < W)) {
        throw dsa::ShapeError("out must have a contiguous last dimension (stride 1) and rows at least W apart", "out");
      }
      nb::gil_scoped_release nogil;
      // Layer, then cache (the one lock order); both released before the GIL is taken back.
      const std::lock_guard<std::mutex> layer_lock(mu_);
      const DeviceGuard dg(dev_);
      // prepare() uploads the step's metadata with synchronous copies on the
      // legacy default stream and may reallocate the layer's buffers, while the
      // previous step's kernels, queued on the caller's (possibly non-blocking)
      // stream, may still read them: wait for that step on the host first
      // (before taking the cache, which other threads may meanwhile step).
      // hidden needs nothing: its producer is ordered before us on `stream`.
      step_done_.synchronize();
      const std::lock_guard<std::mutex> cache_lock(pc.mu);
      // Trace mode sizes the debug buffers in prepare(): set it first.
      gpu_->set_trace_mode(trace);
      struct Reset {
        dsa::cuda::CudaLayer* l;
        ~Reset() { l->set_trace_mode(false); }
      } reset{gpu_.get()};
      gpu_->prepare(md, dsa::cuda::device_view(*pc.m, cache_layer));
      CUstream_st* const s = stream_of(stream);
      if (s != nullptr) {
        // A pageable host-to-device cudaMemcpy may return before its DMA lands,
        // and a non-blocking stream is not ordered after the legacy one: make
        // the caller's stream wait for prepare()'s uploads on the device.
        uploaded_.record(gpu::legacy_stream());
        uploaded_.wait_on(s);
      }
      // Whatever is queued from here on (even if a later call throws) is the
      // step the next forward waits for.
      struct RecordOnExit {
        gpu::Event& e;
        CUstream_st* s;
        ~RecordOnExit() {
          try {
            e.record(s);
          } catch (const dsa::Error&) {
            // The context is failing; the next call reports it.
          }
        }
      } record{step_done_, s};
      gpu_->enqueue(h.data, s, false);
      gpu::copy_rows_async(o.data, (T > 1 ? o.strides[0] : W) * 2, gpu_->output_device(), W * 2, T, s);
      if (trace) gpu_->download_trace(tr, topt, s);
#endif
    }
    if (!trace) return nb::none();
    return trace_dict(tr, T);
  }

 private:
  nb::dict trace_dict(const dsa::LayerTrace& tr, int64_t T) const {
    const size_t t = static_cast<size_t>(T), H = static_cast<size_t>(cfg_.num_heads), HI = static_cast<size_t>(cfg_.index_n_heads),
                 DI = static_cast<size_t>(cfg_.index_head_dim), K = static_cast<size_t>(cfg_.index_topk);
    nb::dict d;
    auto put = [&](const char* name, const auto& v, std::vector<size_t> shape) {
      if (!v.empty()) d[name] = numpy_copy(v, std::move(shape));
    };
    put("q_lat", tr.q_lat, {t, size_t(cfg_.q_lora_rank)});
    put("c_kv", tr.c_kv, {t, size_t(cfg_.kv_lora_rank)});
    put("k_pe", tr.k_pe, {t, size_t(cfg_.qk_rope_head_dim)});
    put("q_nope", tr.q_nope, {t, H, size_t(cfg_.qk_nope_head_dim)});
    put("q_pe", tr.q_pe, {t, H, size_t(cfg_.qk_rope_head_dim)});
    put("idx_q", tr.idx_q, {t, HI, DI});
    put("idx_q_fp8", tr.idx_q_fp8, {t, HI, DI});
    put("idx_q_scale", tr.idx_q_scale, {t, HI});
    put("idx_k", tr.idx_k, {t, DI});
    put("idx_k_fp8", tr.idx_k_fp8, {t, DI});
    put("idx_k_scale", tr.idx_k_scale, {t});
    put("idx_weights", tr.idx_weights, {t, HI});
    if (!tr.idx_logits.empty() && t > 0) put("idx_logits", tr.idx_logits, {t, tr.idx_logits.size() / t});
    put("topk_local", tr.topk_local, {t, K});
    put("topk_global", tr.topk_global, {t, K});
    put("q_cat", tr.q_cat, {t, H, size_t(cfg_.latent_dim())});
    put("attn_out", tr.attn_out, {t, H, size_t(cfg_.kv_lora_rank)});
    put("attn_lse", tr.attn_lse, {t, H});
    put("attn_max", tr.attn_max, {t, H});
    put("output", tr.output, {t, size_t(output_width())});
    return d;
  }

  dsa::LayerConfig cfg_;
  bool cuda_ = false;
  int dev_ = 0;
  // Serializes forward() across Python threads (the GIL is released there):
  // neither the reference's prepared weights and scratch nor CudaLayer is
  // safe to share. Taken before the batch's cache mutex.
  std::mutex mu_;
  std::unique_ptr<dsa::ref::PreparedWeights> pw_;
#ifdef DSA_HAVE_CUDA
  gpu::Event uploaded_;   // prepare()'s uploads on the legacy stream
  gpu::Event step_done_;  // the last step's work on the caller's stream
  std::unique_ptr<dsa::cuda::CudaLayer> gpu_;
#endif
};

}  // namespace

void bind_layer(nb::module_& m) {
  using CM = dsa::CacheManager;
  // ---- configuration
  nb::class_<dsa::RopeScaling>(m, "RopeScaling")
      .def(nb::init<>())
      .def_rw("type", &dsa::RopeScaling::type)
      .def_rw("factor", &dsa::RopeScaling::factor)
      .def_rw("original_max_position_embeddings", &dsa::RopeScaling::original_max_position_embeddings)
      .def_rw("beta_fast", &dsa::RopeScaling::beta_fast)
      .def_rw("beta_slow", &dsa::RopeScaling::beta_slow)
      .def_rw("mscale", &dsa::RopeScaling::mscale)
      .def_rw("mscale_all_dim", &dsa::RopeScaling::mscale_all_dim);

  nb::class_<dsa::LayerConfig>(m, "LayerConfig",
                               "The layer's dimensions (DeepSeek-V3.2 defaults) and run settings; dsa::LayerConfig.")
      .def(nb::init<>())
      .def("__copy__", [](const dsa::LayerConfig& c) { return c; })
      .def_rw("hidden_size", &dsa::LayerConfig::hidden_size)
      .def_rw("num_heads", &dsa::LayerConfig::num_heads)
      .def_rw("q_lora_rank", &dsa::LayerConfig::q_lora_rank)
      .def_rw("kv_lora_rank", &dsa::LayerConfig::kv_lora_rank)
      .def_rw("qk_nope_head_dim", &dsa::LayerConfig::qk_nope_head_dim)
      .def_rw("qk_rope_head_dim", &dsa::LayerConfig::qk_rope_head_dim)
      .def_rw("v_head_dim", &dsa::LayerConfig::v_head_dim)
      .def_rw("index_n_heads", &dsa::LayerConfig::index_n_heads)
      .def_rw("index_head_dim", &dsa::LayerConfig::index_head_dim)
      .def_rw("index_topk", &dsa::LayerConfig::index_topk)
      .def_rw("tokens_per_block", &dsa::LayerConfig::tokens_per_block)
      .def_rw("rms_norm_eps", &dsa::LayerConfig::rms_norm_eps)
      .def_rw("rope_theta", &dsa::LayerConfig::rope_theta)
      .def_rw("rope_scaling", &dsa::LayerConfig::rope_scaling)
      .def_prop_rw(
          "kv_cache_dtype", [](const dsa::LayerConfig& c) { return std::string(dsa::to_string(c.kv_cache_dtype)); },
          [](dsa::LayerConfig& c, const std::string& s) { c.kv_cache_dtype = dsa::parse_latent_cache_dtype(s); })
      .def_rw("indexer_hadamard", &dsa::LayerConfig::indexer_hadamard)
      .def_rw("o_proj", &dsa::LayerConfig::o_proj)
      .def_prop_ro("qk_head_dim", &dsa::LayerConfig::qk_head_dim)
      .def_prop_ro("latent_dim", &dsa::LayerConfig::latent_dim)
      .def_prop_ro("softmax_scale", &dsa::LayerConfig::softmax_scale)
      .def("validate", [](const dsa::LayerConfig& c) { dsa::validate(c); })
      .def("to_json", [](const dsa::LayerConfig& c) { return dsa::config_to_json(c); })
      .def("__eq__", [](const dsa::LayerConfig& a, const dsa::LayerConfig& b) {
        return dsa::config_to_json(a) == dsa::config_to_json(b);
      })
      .def("__repr__", [](const dsa::LayerConfig& c) { return "LayerConfig(" + dsa::config_to_json(c) + ")"; });

  m.def("load_config_json_file", &dsa::load_config_json_file, nb::arg("path"));
  m.def("load_config_json_text", &dsa::load_config_json_text, nb::arg("text"), nb::arg("origin") = "<string>");
  m.def("config_from_json_text", &dsa::config_from_json_text, nb::arg("text"), nb::arg("origin") = "<string>");

  m.def(
      "generate_hidden",
      [](const dsa::LayerConfig& cfg, int64_t T, uint64_t seed) {
        dsa::validate(cfg);
        if (T < 0) throw dsa::ConfigError(fmt::format("tokens = {} must be >= 0", T), "tokens");
        std::vector<dsa::bf16_t> h;
        {
          nb::gil_scoped_release nogil;
          h = dsa::generate_hidden(cfg, T, seed);
        }
        return numpy_copy(h, {static_cast<size_t>(T), static_cast<size_t>(cfg.hidden_size)});
      },
      nb::arg("config"), nb::arg("tokens"), nb::arg("seed"),
      "dsa::generate_hidden: [tokens, hidden_size] bf16 bits as a NumPy uint16 array.");

  // ---- caches and batches
  nb::class_<PyBatch>(m, "Batch")
      .def_prop_ro("num_tokens", [](const PyBatch& b) { return b.md.num_tokens; })
      .def_prop_ro("num_requests", [](const PyBatch& b) { return b.md.num_requests; })
      .def_prop_ro("tokens_per_block", [](const PyBatch& b) { return b.md.tokens_per_block; })
      .def_prop_ro("max_blocks_per_request", [](const PyBatch& b) { return b.md.max_blocks_per_request; })
      .def_prop_ro("num_slots", [](const PyBatch& b) { return b.md.num_slots; })
      .def_prop_ro("max_seq_len", [](const PyBatch& b) { return b.md.max_seq_len(); })
      .def_prop_ro("requests",
                   [](const PyBatch& b) {
                     std::vector<RequestTuple> v;
                     for (const auto& r : b.md.requests) v.emplace_back(r.id, r.cached, r.num_new);
                     return v;
                   })
      .def_prop_ro("token_offsets", [](const PyBatch& b) { return numpy_copy(b.md.token_offsets, {b.md.token_offsets.size()}); })
      .def_prop_ro("seq_lens", [](const PyBatch& b) { return numpy_copy(b.md.seq_lens, {b.md.seq_lens.size()}); })
      .def_prop_ro("positions", [](const PyBatch& b) { return numpy_copy(b.md.positions, {b.md.positions.size()}); })
      .def_prop_ro("token_request", [](const PyBatch& b) { return numpy_copy(b.md.token_request, {b.md.token_request.size()}); })
      .def_prop_ro("visible_end", [](const PyBatch& b) { return numpy_copy(b.md.visible_end, {b.md.visible_end.size()}); })
      .def_prop_ro("block_table",
                   [](const PyBatch& b) {
                     return numpy_copy(b.md.block_table,
                                       {static_cast<size_t>(b.md.num_requests), static_cast<size_t>(b.md.max_blocks_per_request)});
                   })
      .def_prop_ro("slot_mapping", [](const PyBatch& b) { return numpy_copy(b.md.slot_mapping, {b.md.slot_mapping.size()}); })
      .def_prop_ro("indexer_k_offset",
                   [](const PyBatch& b) { return numpy_copy(b.md.indexer_k_offset, {b.md.indexer_k_offset.size()}); })
      .def_prop_ro("indexer_scale_offset",
                   [](const PyBatch& b) { return numpy_copy(b.md.indexer_scale_offset, {b.md.indexer_scale_offset.size()}); })
      .def("slot_of", [](const PyBatch& b, int64_t r, int64_t p) { return b.md.slot_of(r, p); }, nb::arg("request_index"),
           nb::arg("position"));

  nb::class_<PyCache>(m, "CacheManager")
      .def(nb::init<const dsa::LayerConfig&, std::optional<int64_t>, std::optional<int64_t>, int64_t, bool, int>(), nb::arg("config"),
           nb::arg("tokens").none() = nb::none(), nb::arg("num_blocks").none() = nb::none(), nb::arg("num_layers") = 1,
           nb::arg("cuda") = false, nb::arg("device_index") = 0)
      // config() is fixed at construction; everything else is read or changed under the cache's mutex.
      .def_prop_ro("num_blocks", [](const PyCache& c) { return c.m->config().num_blocks; })
      .def_prop_ro("tokens_per_block", [](const PyCache& c) { return c.m->config().tokens_per_block; })
      .def_prop_ro("num_layers", [](const PyCache& c) { return c.m->config().num_layers; })
      .def_prop_ro("capacity_tokens", [](const PyCache& c) { return c.m->config().capacity_tokens(); })
      .def_prop_ro("total_bytes", [](const PyCache& c) { return c.m->config().total_bytes(); })
      .def_prop_ro("is_cuda", [](const PyCache& c) { return c.on_device; })
      .def_prop_ro("device_index", [](const PyCache& c) { return c.device_index; })
      .def_prop_ro("config", [](const PyCache& c) { return c.cfg; })
      .def(
          "add_request",
          [](PyCache& c, int64_t id, int64_t max_tokens) { c.locked([&](CM& m) { m.add_request(id, max_tokens); }); },
          nb::arg("id"), nb::arg("max_tokens") = 0)
      .def("has_request", [](const PyCache& c, int64_t id) { return c.locked([&](CM& m) { return m.has_request(id); }); },
           nb::arg("id"))
      .def("reserve", [](PyCache& c, int64_t id, int64_t tokens) { c.locked([&](CM& m) { m.reserve(id, tokens); }); },
           nb::arg("id"), nb::arg("tokens"))
      .def("extend", [](PyCache& c, int64_t id, int64_t n) { c.locked([&](CM& m) { m.extend(id, n); }); }, nb::arg("id"),
           nb::arg("n"))
      .def("free_request", [](PyCache& c, int64_t id) { c.locked([&](CM& m) { m.free_request(id); }); }, nb::arg("id"))
      .def("num_tokens", [](const PyCache& c, int64_t id) { return c.locked([&](CM& m) { return m.num_tokens(id); }); },
           nb::arg("id"))
      .def("max_tokens", [](const PyCache& c, int64_t id) { return c.locked([&](CM& m) { return m.max_tokens(id); }); },
           nb::arg("id"))
      .def("block_table",
           [](const PyCache& c, int64_t id) {
             const std::vector<int32_t> v = c.locked([&](CM& m) { return m.block_table(id); });
             return numpy_copy(v, {v.size()});
           },
           nb::arg("id"))
      .def_prop_ro("free_blocks", [](const PyCache& c) { return c.locked([](CM& m) { return m.free_blocks(); }); })
      .def_prop_ro("used_blocks", [](const PyCache& c) { return c.locked([](CM& m) { return m.used_blocks(); }); })
      .def_prop_ro("num_requests", [](const PyCache& c) { return c.locked([](CM& m) { return m.num_requests(); }); })
      .def("request_ids", [](const PyCache& c) { return c.locked([](CM& m) { return m.request_ids(); }); })
      .def("slot", [](const PyCache& c, int64_t id, int64_t p) { return c.locked([&](CM& m) { return m.slot(id, p); }); },
           nb::arg("id"), nb::arg("position"))
      .def(
          "fill",
          [](PyCache& c, int byte) {
            if (byte < 0 || byte > 255) throw dsa::ConfigError(fmt::format("fill byte {} is not in [0, 255]", byte), "byte");
            c.locked([&](CM& m) { m.fill(static_cast<uint8_t>(byte)); });
          },
          nb::arg("byte"))
      .def(
          "step",
          [](PyCache& c, const std::vector<RequestTuple>& reqs) {
            const auto r = to_requests(reqs);
            dsa::BatchMetadata md = c.locked([&](CM& m) {
              dsa::check_step_limits(r, m.config().tokens_per_block, "the step");
              dsa::reserve_step(m, r);
              return dsa::build_batch_metadata(m, r);
            });
            return PyBatch{std::move(md), &c};
          },
          nb::arg("requests"), nb::keep_alive<0, 1>())
      .def(
          "metadata",
          [](PyCache& c, const std::vector<RequestTuple>& reqs) {
            const auto r = to_requests(reqs);
            dsa::BatchMetadata md = c.locked([&](CM& m) {
              dsa::check_step_limits(r, m.config().tokens_per_block, "the step");
              return dsa::build_batch_metadata(m, r);
            });
            return PyBatch{std::move(md), &c};
          },
          nb::arg("requests"), nb::keep_alive<0, 1>())
      .def("latent_cache", [](nb::handle self, int64_t layer) { return nb::cast<PyCache&>(self).pool_view(self, layer, true); },
           nb::arg("layer") = 0)
      .def("indexer_cache", [](nb::handle self, int64_t layer) { return nb::cast<PyCache&>(self).pool_view(self, layer, false); },
           nb::arg("layer") = 0);

  nb::class_<PyLayer>(m, "Layer")
      .def(nb::init<const dsa::LayerConfig&, const std::string&, uint64_t, int64_t, bool, int>(), nb::arg("config"),
           nb::arg("weights"), nb::arg("seed"), nb::arg("layer"), nb::arg("cuda"), nb::arg("device_index"))
      .def_prop_ro("config", &PyLayer::config)
      .def_prop_ro("output_width", &PyLayer::output_width)
      .def("forward", &PyLayer::forward, nb::arg("hidden"), nb::arg("batch"), nb::arg("out"), nb::arg("stream") = 0,
           nb::arg("cache_layer") = 0, nb::arg("trace") = false, nb::arg("trace_logits") = false);
}

}  // namespace dsalab
