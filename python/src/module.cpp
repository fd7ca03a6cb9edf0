// _dsalab: the extension module of the Python package dsalab (python/dsalab).
#include <nanobind/nanobind.h>

#include "tensor.h"

namespace dsalab {
void bind_ops(nb::module_& m);
void bind_layer(nb::module_& m);
}  // namespace dsalab

NB_MODULE(_dsalab, m) {
  m.doc() = "dsalab's C++ core (DeepSeek-V3.2 DSA layer): ops, caches, the layer. Use the package dsalab, not this module.";
#ifdef DSA_HAVE_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  dsalab::register_errors(m);
  dsalab::bind_ops(m);
  dsalab::bind_layer(m);
}
