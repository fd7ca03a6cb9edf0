// The standalone ops (dsa/ops.h) on caller-allocated tensors: the Python
// layer (dsalab/ops.py) allocates the outputs with the caller's framework and
// hands the current stream; everything is checked by the op before any work.
#include <nanobind/nanobind.h>

#include "dsa/error.h"
#include "dsa/ops.h"
#include "tensor.h"

#ifdef DSA_HAVE_CUDA
#include "cuda_glue.h"
#endif

namespace dsalab {

void bind_ops(nb::module_& m) {
  m.def("cuda_available", &dsa::ops::cuda_available,
        "True when this build has the CUDA backend and a usable device.");

  m.def(
      "synchronize",
      [](int device, uintptr_t stream) {
#ifdef DSA_HAVE_CUDA
        nb::gil_scoped_release nogil;
        gpu::synchronize(device, stream_of(stream));
#else
        (void)device;
        (void)stream;
        throw dsa::NoDeviceError("synchronize: this dsalab build has no CUDA backend; CUDA tensors cannot reach an op here");
#endif
      },
      nb::arg("device"), nb::arg("stream") = 0,
      "cudaStreamSynchronize(stream) on `device`: for frameworks whose stream dsalab does not know (JAX, other DLPack).");

  m.def(
      "sparse_mla_fwd",
      [](nb::handle q, nb::handle kv, nb::handle indices, double sm_scale, int64_t d_v, nb::handle out, nb::handle max_logits,
         nb::handle lse, uintptr_t stream) {
        Args a;
        const auto tq = a.tensor(q, "q"), tkv = a.tensor(kv, "kv"), ti = a.tensor(indices, "indices");
        const auto to = a.output(out, "out"), tm = a.output(max_logits, "max_logits"), tl = a.output(lse, "lse");
        nb::gil_scoped_release nogil;
        a.run([&] { dsa::ops::sparse_mla_fwd(tq, tkv, ti, sm_scale, d_v, to, tm, tl, stream_of(stream)); });
      },
      nb::arg("q"), nb::arg("kv"), nb::arg("indices"), nb::arg("sm_scale"), nb::arg("d_v"), nb::arg("out"), nb::arg("max_logits"),
      nb::arg("lse"), nb::arg("stream") = 0);

  m.def(
      "fp8_mqa_logits",
      [](nb::handle q, nb::handle k, nb::handle k_scale, nb::handle weights, nb::handle k_start, nb::handle k_end, nb::handle logits,
         bool clean_logits, uintptr_t stream) {
        Args a;
        // The op's own argument names (its messages use them): k, k_scale for DeepGEMM's pair kv.
        const auto tq = a.tensor(q, "q", As::Fp8), tk = a.tensor(k, "k", As::Fp8), ts = a.tensor(k_scale, "k_scale");
        const auto tw = a.tensor(weights, "weights"), t0 = a.tensor(k_start, "k_start"), t1 = a.tensor(k_end, "k_end");
        const auto tl = a.output(logits, "logits");
        nb::gil_scoped_release nogil;
        a.run([&] { dsa::ops::fp8_mqa_logits(tq, tk, ts, tw, t0, t1, tl, clean_logits, stream_of(stream)); });
      },
      nb::arg("q"), nb::arg("k"), nb::arg("k_scale"), nb::arg("weights"), nb::arg("k_start"), nb::arg("k_end"), nb::arg("logits"),
      nb::arg("clean_logits") = true, nb::arg("stream") = 0);

  m.def(
      "fp8_paged_mqa_logits",
      [](nb::handle q, nb::handle kv_cache, nb::handle weights, nb::handle context_lens, nb::handle block_table,
         int64_t max_context_len, nb::handle logits, bool clean_logits, uintptr_t stream) {
        Args a;
        const auto tq = a.tensor(q, "q", As::Fp8), tc = a.tensor(kv_cache, "kv_cache", As::Bytes);
        const auto tw = a.tensor(weights, "weights"), tn = a.tensor(context_lens, "context_lens"),
                   tb = a.tensor(block_table, "block_table");
        const auto tl = a.output(logits, "logits");
        nb::gil_scoped_release nogil;
        a.run([&] { dsa::ops::fp8_paged_mqa_logits(tq, tc, tw, tn, tb, max_context_len, tl, clean_logits, stream_of(stream)); });
      },
      nb::arg("q"), nb::arg("kv_cache"), nb::arg("weights"), nb::arg("context_lens"), nb::arg("block_table"),
      nb::arg("max_context_len"), nb::arg("logits"), nb::arg("clean_logits") = true, nb::arg("stream") = 0);

  m.def(
      "topk",
      [](nb::handle logits, int64_t k, nb::handle lengths, nb::handle out, uintptr_t stream) {
        Args a;
        const auto tl = a.tensor(logits, "logits"), tn = a.tensor(lengths, "lengths"), to = a.output(out, "out");
        nb::gil_scoped_release nogil;
        a.run([&] { dsa::ops::topk(tl, k, tn, to, stream_of(stream)); });
      },
      nb::arg("logits"), nb::arg("k"), nb::arg("lengths"), nb::arg("out"), nb::arg("stream") = 0);

  m.def(
      "rope_quant_append",
      [](const dsa::LayerConfig& cfg, nb::handle c_kv, nb::handle k_pe, nb::handle positions, nb::handle slot_mapping,
         nb::handle latent_cache, uintptr_t stream) {
        Args a;
        const auto tc = a.tensor(c_kv, "c_kv"), tk = a.tensor(k_pe, "k_pe"), tp = a.tensor(positions, "positions");
        const auto ts = a.tensor(slot_mapping, "slot_mapping");
        // The fp8 form is 656 raw bytes per row whatever dtype the caller's buffer has.
        const auto tlc = a.output(latent_cache, "latent_cache",
                                  cfg.kv_cache_dtype == dsa::LatentCacheDType::FP8 ? As::Bytes : As::Native);
        nb::gil_scoped_release nogil;
        a.run([&] { dsa::ops::rope_quant_append(cfg, tc, tk, tp, ts, tlc, stream_of(stream)); });
      },
      nb::arg("config"), nb::arg("c_kv"), nb::arg("k_pe"), nb::arg("positions"), nb::arg("slot_mapping"), nb::arg("latent_cache"),
      nb::arg("stream") = 0);
}

}  // namespace dsalab
