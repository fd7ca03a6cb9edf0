#pragma once
// DLPack tensors of any framework (through nanobind's ndarray caster, zero
// copy) as dsa::ops::Tensor views, and the Python exceptions the library's
// errors become.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <vector>

#include "dsa/ops.h"

struct CUstream_st;

namespace dsalab {

namespace nb = nanobind;

// How an argument's dtype is read where frameworks cannot say what the op means.
enum class As {
  Native,  // the DLPack dtype as it is (uint16 / int16 read as bf16 bits: NumPy and CuPy have no bf16)
  Fp8,     // as Native, and uint8 / int8 read as float8_e4m3fn bits
  Bytes,   // any 1-byte dtype (uint8, int8, float8) read as uint8: byte buffers such as the paged caches
};

// Keeps the DLPack imports alive while the views are used (the GIL may be released meanwhile).
class Args {
 public:
  // `h` must export DLPack (torch, cupy, numpy, jax, ...); anything else is a
  // DTypeError (Python TypeError) naming the argument.
  dsa::ops::Tensor tensor(nb::handle h, const char* name, As as = As::Native);

 private:
  std::vector<nb::ndarray<nb::ro>> keep_;
};

// A stream handle from Python (an integer: cudaStream_t's value, 0 for the legacy default stream).
inline CUstream_st* stream_of(uintptr_t s) { return reinterpret_cast<CUstream_st*>(s); }

// Registers dsalab.Error and its subclasses on `m` and the translator from dsa::Error.
void register_errors(nb::module_& m);

// A host copy as a NumPy array (owned by a capsule).
template <typename T>
nb::object numpy_copy(const std::vector<T>& v, std::vector<size_t> shape);

}  // namespace dsalab
