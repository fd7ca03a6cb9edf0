#pragma once
// DLPack tensors of any framework (through nanobind's ndarray caster, zero
// copy) as dsa::ops::Tensor views, and the Python exceptions the library's
// errors become.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dsa/error.h"
#include "dsa/ops.h"

struct CUstream_st;

namespace dsalab {

namespace nb = nanobind;

// How an argument's dtype is read where frameworks cannot say what the op means.
enum class As {
  Native,  // the DLPack dtype as it is (uint16 / int16 read as bf16 bits: NumPy and CuPy have no bf16; see Args::run)
  Fp8,     // as Native, and uint8 / int8 read as float8_e4m3fn bits
  Bytes,   // any 1-byte dtype (uint8, int8, float8) read as uint8: byte buffers such as the paged caches
};

// Keeps the DLPack imports alive while the views are used (the GIL may be released meanwhile).
class Args {
 public:
  // An input. `h` must export DLPack (torch, cupy, numpy, jax, ...); anything
  // else is a DTypeError (Python TypeError) naming the argument.
  dsa::ops::Tensor tensor(nb::handle h, const char* name, As as = As::Native);
  // A tensor the op writes (an output or a cache updated in place): as
  // tensor(), and a read-only one (np.frombuffer of bytes, a JAX array, a
  // DLPack capsule flagged read-only) is a ShapeError (Python ValueError).
  dsa::ops::Tensor output(nb::handle h, const char* name, As as = As::Native);

  // Runs the op (with the GIL released or not). The ops read 16-bit integer
  // tensors as bf16 bits, so their "has dtype bfloat16" about such a tensor
  // would misname it: a DTypeError about one says its real dtype instead.
  template <typename F>
  void run(F&& op) const {
    try {
      op();
    } catch (const dsa::DTypeError& e) {
      rethrow_with_real_dtype(e);
      throw;
    }
  }

 private:
  dsa::ops::Tensor view(nb::ndarray<nb::ro>&& a, const char* name, As as);
  // Throws the message with the real dtype when e is about a 16-bit integer tensor; returns otherwise.
  void rethrow_with_real_dtype(const dsa::DTypeError& e) const;

  std::vector<nb::ndarray<nb::ro>> keep_;
  std::vector<std::pair<std::string, std::string>> bf16_bits_;  // (argument, its dtype) for 16-bit integers read as bf16
};

// A stream handle from Python (an integer: cudaStream_t's value, 0 for the legacy default stream).
inline CUstream_st* stream_of(uintptr_t s) { return reinterpret_cast<CUstream_st*>(s); }

// Registers dsalab.Error and its subclasses on `m` and the translator from dsa::Error.
void register_errors(nb::module_& m);

// A host copy as a NumPy array (owned by a capsule).
template <typename T>
nb::object numpy_copy(const std::vector<T>& v, std::vector<size_t> shape);

}  // namespace dsalab
