#include "ops/validate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "dsa/error.h"
#ifdef DSA_HAVE_CUDA
#include "dsa/cuda.h"
#endif

namespace dsa::ops {

const char* to_string(DType d) {
  switch (d) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::U8: return "uint8";
    case DType::FP8_E4M3: return "float8_e4m3fn";
  }
  return "unknown dtype";
}

int64_t itemsize(DType d) {
  switch (d) {
    case DType::BF16:
    case DType::F16: return 2;
    case DType::F32:
    case DType::I32: return 4;
    case DType::F64:
    case DType::I64: return 8;
    case DType::U8:
    case DType::FP8_E4M3: return 1;
  }
  return 1;
}

int64_t Tensor::numel() const {
  for (int64_t s : shape)
    if (s == 0) return 0;
  int64_t n = 1;
  for (int64_t s : shape) {
    // A view of a huge broadcast shape must not wrap to a small count (and
    // pass the layout checks that count gates).
    if (__builtin_mul_overflow(n, s, &n)) {
      std::string dims;
      for (int64_t d : shape) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
      throw ShapeError(fmt::format("{} has shape [{}], more elements than a 64-bit count holds; pass a valid tensor",
                                   name.empty() ? std::string("a tensor") : name, dims),
                       name);
    }
  }
  return n;
}

bool Tensor::contiguous() const { return detail::is_dense(*this); }

Tensor dense(void* data, DType dtype, std::vector<int64_t> shape, DeviceKind device, int device_index, std::string name) {
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.device_index = device_index;
  t.strides = detail::dense_strides(shape);
  t.shape = std::move(shape);
  t.name = std::move(name);
  return t;
}

bool cuda_available() {
#ifdef DSA_HAVE_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

namespace detail {

std::string device_string(const Tensor& t) { return t.is_cuda() ? fmt::format("cuda:{}", t.device_index) : "cpu"; }

std::string shape_string(const std::vector<int64_t>& v) { return fmt::format("[{}]", fmt::join(v, ", ")); }

std::vector<int64_t> dense_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> s(shape.size(), 1);
  for (int64_t d = static_cast<int64_t>(shape.size()) - 2; d >= 0; --d) s[d] = s[d + 1] * std::max<int64_t>(shape[d + 1], 1);
  return s;
}

bool is_dense(const Tensor& t) {
  int64_t expect = 1;
  for (int64_t d = t.ndim() - 1; d >= 0; --d) {
    if (t.shape[d] != 1 && t.strides[d] != expect) return false;
    expect *= t.shape[d];
  }
  return true;
}

void check_structure(const char* op, const Arg& a) {
  const Tensor& t = *a.t;
  if (t.strides.size() != t.shape.size()) {
    throw ShapeError(fmt::format("{}: {} has {} dimensions but {} strides; pass one stride per dimension (DLPack strides, in "
                                 "elements)",
                                 op, a.name, t.shape.size(), t.strides.size()));
  }
  for (int64_t d = 0; d < t.ndim(); ++d) {
    if (t.shape[d] < 0)
      throw ShapeError(fmt::format("{}: {} has shape {} with a negative dimension; pass a valid tensor", op, a.name,
                                   shape_string(t.shape)));
  }
  if (t.is_cuda() && t.device_index < 0)
    throw ShapeError(fmt::format("{}: {} is on CUDA device {}, which is not a device ordinal; pass a tensor on cuda:0, cuda:1, ...",
                                 op, a.name, t.device_index));
}

void check_dtype(const char* op, const Arg& a, DType want, const char* fix) {
  if (a.t->dtype != want) {
    throw DTypeError(fmt::format("{}: {} has dtype {} but must be {}; {}", op, a.name, to_string(a.t->dtype), to_string(want), fix),
                     a.name);
  }
}

void check_rank(const char* op, const Arg& a, std::initializer_list<int64_t> ranks, const char* layout) {
  if (std::find(ranks.begin(), ranks.end(), a.t->ndim()) == ranks.end()) {
    throw ShapeError(fmt::format("{}: {} has shape {} ({} dimensions) but must be {}", op, a.name, shape_string(a.t->shape),
                                 a.t->ndim(), layout),
                     a.name);
  }
}

void check_dim(const char* op, const Arg& a, int64_t dim, int64_t want, const std::string& what) {
  if (a.t->shape[dim] != want) {
    throw ShapeError(fmt::format("{}: {} has shape {}, but its dimension {} must be {} ({}); pass a tensor of that size", op,
                                 a.name, shape_string(a.t->shape), dim, want, what),
                     a.name);
  }
}

void check_layout(const char* op, const Arg& a) {
  const Tensor& t = *a.t;
  const int64_t n = t.numel();
  if (n == 0) return;
  if (t.data == nullptr) {
    throw ShapeError(fmt::format("{}: {} has {} elements (shape {}) but its data pointer is null; pass an allocated tensor", op,
                                 a.name, n, shape_string(t.shape)),
                     a.name);
  }
  const int64_t item = itemsize(t.dtype);
  if (reinterpret_cast<uintptr_t>(t.data) % static_cast<uintptr_t>(item) != 0) {
    throw ShapeError(fmt::format("{}: {} starts at {}, which is not aligned to its {}-byte {} elements; pass a tensor whose data "
                                 "is aligned (.contiguous() or .clone() gives one)",
                                 op, a.name, t.data, item, to_string(t.dtype)),
                     a.name);
  }
  const int64_t nd = t.ndim();
  // span: elements from the first to one past the last element of the
  // dimensions inside the current one (padding between rows allowed).
  int64_t span = 1;
  for (int64_t d = nd - 1; d >= 0; --d) {
    if (t.shape[d] == 1) continue;
    const int64_t s = t.strides[d];
    if (d == nd - 1 && s != 1) {
      throw ShapeError(fmt::format("{}: {}.stride({}) = {}, but the last dimension must be contiguous (stride 1); call "
                                   ".contiguous() on {}",
                                   op, a.name, d, s, a.name),
                       a.name);
    }
    if (s < span) {
      throw ShapeError(fmt::format("{}: {}.stride({}) = {} is smaller than the {} elements the dimensions inside it span (shape {}, "
                                   "strides {}): the view is transposed, broadcast or overlapping, which the op does not take; "
                                   "call .contiguous() on {}",
                                   op, a.name, d, s, span, shape_string(t.shape), shape_string(t.strides), a.name),
                       a.name);
    }
    int64_t reach = 0;
    if (__builtin_mul_overflow(t.shape[d] - 1, s, &reach) || __builtin_add_overflow(reach, int64_t{1}, &span) ||
        __builtin_mul_overflow(span, item, &reach)) {
      throw ShapeError(fmt::format("{}: {} with shape {} and strides {} spans more bytes than a 64-bit offset holds; pass a "
                                   "valid tensor",
                                   op, a.name, shape_string(t.shape), shape_string(t.strides)),
                       a.name);
    }
  }
}

Placement placement(const char* op, std::initializer_list<Arg> args) {
  Placement p;
  const Arg* first = nullptr;
  for (const Arg& a : args) {
    if (!first) {
      first = &a;
      p.cuda = a.t->is_cuda();
      p.device = p.cuda ? a.t->device_index : 0;
      continue;
    }
    const bool same = a.t->is_cuda() == p.cuda && (!p.cuda || a.t->device_index == p.device);
    if (!same) {
      throw ShapeError(fmt::format("{}: {} is on {} but {} is on {}; an op runs where its tensors live, so move all of them to one "
                                   "device (all on the CPU, or all on one CUDA device)",
                                   op, first->name, device_string(*first->t), a.name, device_string(*a.t)),
                       a.name);
    }
  }
  if (p.cuda) {
#ifdef DSA_HAVE_CUDA
    const int n = cuda::device_count();
    if (p.device >= n) {
      throw NoDeviceError(fmt::format("{}: the tensors are on cuda:{} but this process sees {} CUDA device(s); pass tensors on a "
                                      "visible device (check CUDA_VISIBLE_DEVICES)",
                                      op, p.device, n));
    }
#else
    throw NoDeviceError(fmt::format("{}: the tensors are on cuda:{} but this build of dsalab has no CUDA backend; move them to the "
                                    "CPU, or rebuild with -DDSA_ENABLE_CUDA=ON",
                                    op, p.device));
#endif
  }
  return p;
}

namespace {

struct Range {
  uintptr_t lo = 0, hi = 0;  // [lo, hi) bytes
};

Range byte_range(const Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.ndim(); ++d)
    if (t.shape[d] > 1) last += (t.shape[d] - 1) * t.strides[d];
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data);
  return {lo, lo + static_cast<uintptr_t>((last + 1) * itemsize(t.dtype))};
}

bool same_memory_space(const Tensor& a, const Tensor& b) {
  return a.is_cuda() == b.is_cuda() && (!a.is_cuda() || a.device_index == b.device_index);
}

}  // namespace

void check_no_overlap(const char* op, std::initializer_list<Arg> outputs, std::initializer_list<Arg> inputs) {
  auto check = [&](const Arg& o, const Arg& other, const char* kind) {
    if (o.t->numel() == 0 || other.t->numel() == 0 || !same_memory_space(*o.t, *other.t)) return;
    const Range a = byte_range(*o.t), b = byte_range(*other.t);
    if (a.lo < b.hi && b.lo < a.hi) {
      throw ShapeError(fmt::format("{}: output {} (bytes [{:#x}, {:#x})) overlaps {} {} (bytes [{:#x}, {:#x})); outputs must not "
                                   "share memory with inputs or with each other: pass a separate tensor for {}",
                                   op, o.name, a.lo, a.hi, kind, other.name, b.lo, b.hi, o.name),
                       o.name);
    }
  };
  for (auto oi = outputs.begin(); oi != outputs.end(); ++oi) {
    for (const Arg& in : inputs) check(*oi, in, "input");
    for (auto oj = oi + 1; oj != outputs.end(); ++oj) check(*oi, *oj, "output");
  }
}

Tensor drop_dim(const Tensor& t, int64_t dim) {
  Tensor v = t;
  v.shape.erase(v.shape.begin() + dim);
  v.strides.erase(v.strides.begin() + dim);
  return v;
}

Tensor canonical_strides(const Tensor& t) {
  Tensor v = t;
  for (int64_t d = v.ndim() - 1; d >= 0; --d) {
    if (v.shape[d] > 1) continue;
    v.strides[d] = d == v.ndim() - 1 ? 1 : v.strides[d + 1] * std::max<int64_t>(v.shape[d + 1], 1);
  }
  return v;
}

}  // namespace detail
}  // namespace dsa::ops
