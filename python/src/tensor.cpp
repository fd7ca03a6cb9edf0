#include "tensor.h"

#include <fmt/format.h>

#include <cstring>
#include <string>

#include "dsa/error.h"

namespace dsalab {

namespace {

using dsa::ops::DType;
namespace dl = nb::dlpack;

std::string dlpack_dtype_name(const dl::dtype& d) {
  switch (static_cast<dl::dtype_code>(d.code)) {
    case dl::dtype_code::Int: return fmt::format("int{}", d.bits);
    case dl::dtype_code::UInt: return fmt::format("uint{}", d.bits);
    case dl::dtype_code::Float: return fmt::format("float{}", d.bits);
    case dl::dtype_code::Bfloat: return fmt::format("bfloat{}", d.bits);
    case dl::dtype_code::Bool: return "bool";
    case dl::dtype_code::Complex: return fmt::format("complex{}", d.bits);
    case dl::dtype_code::Float8_E4M3: return "float8_e4m3 (IEEE-style, with infinities)";
    case dl::dtype_code::Float8_E4M3FN: return "float8_e4m3fn";
    case dl::dtype_code::Float8_E5M2: return "float8_e5m2";
    case dl::dtype_code::Float8_E4M3FNUZ: return "float8_e4m3fnuz";
    case dl::dtype_code::Float8_E5M2FNUZ: return "float8_e5m2fnuz";
    case dl::dtype_code::Float8_E8M0FNU: return "float8_e8m0fnu";
    default: return fmt::format("DLPack code {} with {} bits", d.code, d.bits);
  }
}

DType to_dtype(const dl::dtype& d, const char* name, As as) {
  if (d.lanes != 1) {
    throw dsa::DTypeError(fmt::format("{} has a vector dtype ({} lanes); dsalab takes scalar element types: pass a plain tensor", name,
                                      d.lanes),
                          name);
  }
  const auto code = static_cast<dl::dtype_code>(d.code);
  const bool one_byte = d.bits == 8 && (code == dl::dtype_code::UInt || code == dl::dtype_code::Int ||
                                        code == dl::dtype_code::Float8_E4M3FN);
  if (as == As::Bytes && one_byte) return DType::U8;
  if (as == As::Fp8 && d.bits == 8 && (code == dl::dtype_code::UInt || code == dl::dtype_code::Int)) return DType::FP8_E4M3;
  if (code == dl::dtype_code::Bfloat && d.bits == 16) return DType::BF16;
  if (code == dl::dtype_code::Float && d.bits == 16) return DType::F16;
  if (code == dl::dtype_code::Float && d.bits == 32) return DType::F32;
  if (code == dl::dtype_code::Float && d.bits == 64) return DType::F64;
  if (code == dl::dtype_code::Int && d.bits == 32) return DType::I32;
  if (code == dl::dtype_code::Int && d.bits == 64) return DType::I64;
  if (code == dl::dtype_code::UInt && d.bits == 8) return DType::U8;
  if (code == dl::dtype_code::Float8_E4M3FN && d.bits == 8) return DType::FP8_E4M3;
  // NumPy and CuPy have no bfloat16: a 16-bit integer view carries its bits.
  if ((code == dl::dtype_code::UInt || code == dl::dtype_code::Int) && d.bits == 16) return DType::BF16;
  throw dsa::DTypeError(fmt::format("{} has dtype {}, which no dsalab op takes; pass bfloat16, float16, float32, float64, int32, "
                                    "int64, uint8 or float8_e4m3fn (uint16 for bf16 bits and uint8 for fp8 bits where the "
                                    "framework has no such dtype)",
                                    name, dlpack_dtype_name(d)),
                        name);
}

PyObject* g_error = nullptr;
PyObject* g_shape = nullptr;
PyObject* g_config = nullptr;
PyObject* g_file = nullptr;
PyObject* g_value = nullptr;
PyObject* g_dtype = nullptr;
PyObject* g_cache = nullptr;
PyObject* g_nodevice = nullptr;
PyObject* g_oom = nullptr;
PyObject* g_cuda = nullptr;
PyObject* g_check = nullptr;

PyObject* new_error(nb::module_& m, const char* name, PyObject* base, const char* doc) {
  const std::string qual = std::string("dsalab.") + name;
  PyObject* bases = base ? PyTuple_Pack(2, g_error, base) : PyTuple_Pack(1, PyExc_Exception);
  PyObject* t = PyErr_NewExceptionWithDoc(qual.c_str(), doc, bases, nullptr);
  Py_DECREF(bases);
  if (!t) throw nb::python_error();
  m.attr(name) = nb::handle(t);
  return t;
}

void raise(PyObject* type, const dsa::Error& e) {
  PyObject* inst = PyObject_CallFunction(type, "s", e.what());
  if (!inst) return;  // the call set its own exception
  PyObject* param = nullptr;
  if (e.parameter().empty()) {
    Py_INCREF(Py_None);
    param = Py_None;
  } else {
    param = PyUnicode_FromString(e.parameter().c_str());
  }
  if (param) {
    PyObject_SetAttrString(inst, "parameter", param);
    Py_DECREF(param);
  }
  PyErr_SetObject(type, inst);
  Py_DECREF(inst);
}

}  // namespace

dsa::ops::Tensor Args::tensor(nb::handle h, const char* name, As as) {
  nb::ndarray<nb::ro> a;
  // convert = false: never a copy; the op reads and writes the caller's memory.
  if (h.is_none() || !nb::try_cast(h, a, false)) {
    throw dsa::DTypeError(fmt::format("{} is a {}, not a tensor that exports DLPack; pass a torch, cupy, numpy or jax array "
                                      "(torch tensors that require grad: pass tensor.detach())",
                                      name, nb::inst_name(h).c_str()),
                          name);
  }
  return view(std::move(a), name, as);
}

dsa::ops::Tensor Args::output(nb::handle h, const char* name, As as) {
  // A writable import refuses a tensor its exporter flags read-only; a
  // read-only import that then succeeds tells that case from "not a tensor".
  nb::ndarray<> w;
  if (!h.is_none() && nb::try_cast(h, w, false)) return view(nb::ndarray<nb::ro>(w), name, as);
  nb::ndarray<nb::ro> r;
  if (!h.is_none() && nb::try_cast(h, r, false)) {
    throw dsa::ShapeError(fmt::format("{} is read-only (its exporter flags it so: np.frombuffer of bytes, a JAX array, a "
                                      "read-only DLPack capsule), and the op writes it in place; pass a writable tensor "
                                      "(e.g. a copy: np.array(x), x.clone())",
                                      name),
                          name);
  }
  return tensor(h, name, as);  // not a tensor at all: its DTypeError
}

dsa::ops::Tensor Args::view(nb::ndarray<nb::ro>&& a, const char* name, As as) {
  dsa::ops::Tensor t;
  t.name = name;
  t.dtype = to_dtype(a.dtype(), name, as);
  const auto code = static_cast<dl::dtype_code>(a.dtype().code);
  if (t.dtype == DType::BF16 && code != dl::dtype_code::Bfloat) bf16_bits_.emplace_back(name, dlpack_dtype_name(a.dtype()));
  switch (a.device_type()) {
    case nb::device::cpu::value:
    case nb::device::cuda_host::value:  // pinned host memory: the CPU reads it directly
      t.device = dsa::ops::DeviceKind::CPU;
      t.device_index = 0;
      break;
    case nb::device::cuda::value:
    case nb::device::cuda_managed::value:
      t.device = dsa::ops::DeviceKind::CUDA;
      t.device_index = a.device_id();
      break;
    default:
      throw dsa::ShapeError(fmt::format("{} lives on DLPack device type {}; dsalab ops run on CPU or CUDA tensors: move it to "
                                        "one of those",
                                        name, a.device_type()),
                            name);
  }
  t.shape.resize(a.ndim());
  t.strides.resize(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) {
    t.shape[i] = static_cast<int64_t>(a.shape(i));
    t.strides[i] = a.stride(i);
  }
  // Writable where output() imported it; inputs are only read.
  t.data = const_cast<void*>(a.data());
  keep_.push_back(std::move(a));
  return t;
}

void Args::rethrow_with_real_dtype(const dsa::DTypeError& e) const {
  for (const auto& [arg, real] : bf16_bits_) {
    if (e.parameter() != arg) continue;
    std::string msg = e.what();
    const std::string said = fmt::format("{} has dtype bfloat16", arg);
    const size_t at = msg.find(said);
    if (at != std::string::npos) {
      msg.replace(at, said.size(), fmt::format("{} has dtype {} (read as bf16 bits)", arg, real));
    } else {
      msg += fmt::format(" ({} has dtype {}, read as bf16 bits)", arg, real);
    }
    throw dsa::DTypeError(msg, arg);
  }
}

void register_errors(nb::module_& m) {
  g_error = new_error(m, "Error", nullptr, "Base of every error dsalab raises (the C++ library's dsa::Error).");
  g_shape = new_error(m, "ShapeError", PyExc_ValueError, "A tensor's shape, stride, device or alignment is not what the op needs.");
  g_config = new_error(m, "ConfigError", PyExc_ValueError, "A configuration value or argument is missing or out of range.");
  g_file = new_error(m, "FileError", PyExc_ValueError, "A config.json or safetensors file could not be read or is malformed.");
  g_value = new_error(m, "NonFiniteError", PyExc_ValueError, "NaN or Inf in an input, a weight or a scale.");
  g_dtype = new_error(m, "DTypeError", PyExc_TypeError, "A tensor of the wrong dtype, or an argument that is not a tensor.");
  g_cache = new_error(m, "CacheError", PyExc_RuntimeError, "The paged cache has no room, or a request id is unknown.");
  g_nodevice = new_error(m, "NoDeviceError", PyExc_RuntimeError, "No usable GPU, or a build without the CUDA backend.");
  g_oom = new_error(m, "OutOfMemoryError", PyExc_MemoryError, "Host or device memory could not be allocated.");
  g_cuda = new_error(m, "CudaError", PyExc_RuntimeError, "A CUDA runtime, driver or cuBLAS call failed.");
  g_check = new_error(m, "CheckError", PyExc_RuntimeError, "A comparison against the reference found results out of bounds.");
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const dsa::DTypeError& e) {
      raise(g_dtype, e);
    } catch (const dsa::ShapeError& e) {
      raise(g_shape, e);
    } catch (const dsa::ConfigError& e) {
      raise(g_config, e);
    } catch (const dsa::FileError& e) {
      raise(g_file, e);
    } catch (const dsa::ValueError& e) {
      raise(g_value, e);
    } catch (const dsa::CacheError& e) {
      raise(g_cache, e);
    } catch (const dsa::NoDeviceError& e) {
      raise(g_nodevice, e);
    } catch (const dsa::OutOfMemoryError& e) {
      raise(g_oom, e);
    } catch (const dsa::CudaError& e) {
      raise(g_cuda, e);
    } catch (const dsa::CheckError& e) {
      raise(g_check, e);
    } catch (const dsa::Error& e) {
      raise(g_error, e);
    }
  });
}

template <typename T>
nb::object numpy_copy(const std::vector<T>& v, std::vector<size_t> shape) {
  T* buf = new T[v.empty() ? 1 : v.size()];
  if (!v.empty()) std::memcpy(buf, v.data(), v.size() * sizeof(T));
  nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, T>(buf, shape.size(), shape.data(), owner));
}

template nb::object numpy_copy(const std::vector<uint16_t>&, std::vector<size_t>);
template nb::object numpy_copy(const std::vector<float>&, std::vector<size_t>);
template nb::object numpy_copy(const std::vector<int32_t>&, std::vector<size_t>);
template nb::object numpy_copy(const std::vector<int64_t>&, std::vector<size_t>);

}  // namespace dsalab
