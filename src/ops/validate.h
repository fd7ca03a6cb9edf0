#pragma once
// The checks every standalone op (dsa/ops.h) runs on its tensors before
// anything else, and small view helpers. Private to dsa_ops.
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "dsa/ops.h"

namespace dsa::ops::detail {

// One argument of an op: the view and the op's name for it.
struct Arg {
  const Tensor* t;
  const char* name;
};

// "cpu" or "cuda:N".
std::string device_string(const Tensor& t);
// "[2, 3, 576]".
std::string shape_string(const std::vector<int64_t>& v);

// strides has one entry per dimension and no dimension is negative.
void check_structure(const char* op, const Arg& a);
// dtype is `want` (DTypeError otherwise).
void check_dtype(const char* op, const Arg& a, DType want, const char* fix);
// rank is one of `ranks`; `layout` spells the accepted shapes.
void check_rank(const char* op, const Arg& a, std::initializer_list<int64_t> ranks, const char* layout);
// shape[dim] == want; `what` says where the value comes from ("T of q").
void check_dim(const char* op, const Arg& a, int64_t dim, int64_t want, const std::string& what);
// The layout rules of dsa/ops.h: last dimension contiguous, other strides
// at least the span inside them, data aligned to the dtype, non-null when
// non-empty, offsets within int64.
void check_layout(const char* op, const Arg& a);

// Where the op runs: all tensors on the CPU, or all on one CUDA device.
struct Placement {
  bool cuda = false;
  int device = 0;
};
// ShapeError naming the tensors and their devices when they differ;
// NoDeviceError for CUDA tensors this build or process cannot use.
Placement placement(const char* op, std::initializer_list<Arg> args);

// ShapeError when an output's memory range meets an input's or another
// output's (ranges from the lowest to the highest byte a view touches, so
// interleaved views count as overlapping too).
void check_no_overlap(const char* op, std::initializer_list<Arg> outputs, std::initializer_list<Arg> inputs);

// The view without dimension `dim` (of size 1).
Tensor drop_dim(const Tensor& t, int64_t dim);
// Strides of size-1 dimensions replaced by the dense value (what the
// dimension inside them spans), so that kernels that take the strides as
// given see row-major order everywhere.
Tensor canonical_strides(const Tensor& t);
// Dense row-major strides for `shape`.
std::vector<int64_t> dense_strides(const std::vector<int64_t>& shape);
// Whether the view is row-major dense (size-1 dimensions ignored).
bool is_dense(const Tensor& t);

// Calls fn(i, off) for every element in row-major order: i its index in the
// dense layout, off its offset in elements from t.data. CPU helper.
template <class Fn>
void for_each_element(const Tensor& t, Fn&& fn) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const int64_t nd = t.ndim();
  std::vector<int64_t> idx(static_cast<size_t>(nd), 0);
  int64_t off = 0;
  for (int64_t i = 0; i < n; ++i) {
    fn(i, off);
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < t.shape[d]) {
        off += t.strides[d];
        break;
      }
      off -= (t.shape[d] - 1) * t.strides[d];
      idx[d] = 0;
    }
  }
}

}  // namespace dsa::ops::detail
