#pragma once
// A host tensor for the standalone-op tests (CPU and GPU): owns poisoned
// memory (0xA5 bytes) and a dsa::ops::Tensor view of it, with `pad` extra
// elements after each row of the last dimension (a legal strided view when
// pad > 0).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "dsa/ops.h"

namespace dsa::test {

struct HostTensor {
  std::vector<uint64_t> mem;  // 8-byte aligned storage
  dsa::ops::Tensor t;
  HostTensor(dsa::ops::DType dt, std::vector<int64_t> shape, int64_t pad = 0) {
    const int64_t nd = static_cast<int64_t>(shape.size());
    std::vector<int64_t> st(shape.size(), 1);
    for (int64_t d = nd - 2; d >= 0; --d) st[d] = st[d + 1] * shape[d + 1] + (d == nd - 2 ? pad : 0);
    int64_t span = 1;
    for (int64_t d = 0; d < nd; ++d) span += (std::max<int64_t>(shape[d], 1) - 1) * st[d];
    const int64_t bytes = span * dsa::ops::itemsize(dt) + 64;
    mem.assign(static_cast<size_t>((bytes + 7) / 8), 0xA5A5A5A5A5A5A5A5ull);
    t.data = mem.data();
    t.dtype = dt;
    t.shape = std::move(shape);
    t.strides = std::move(st);
  }
  int64_t numel() const { return t.numel(); }
  // Element offset of dense index i.
  int64_t off(int64_t i) const {
    int64_t o = 0;
    for (int64_t d = t.ndim() - 1; d >= 0; --d) {
      o += (i % t.shape[d]) * t.strides[d];
      i /= t.shape[d];
    }
    return o;
  }
  template <class T>
  T& at(int64_t i) {
    return static_cast<T*>(t.data)[off(i)];
  }
  template <class T>
  T at(int64_t i) const {
    return static_cast<const T*>(t.data)[off(i)];
  }
  size_t byte_size() const { return mem.size() * 8; }
  // The whole allocation, padding included.
  std::vector<uint8_t> bytes() const {
    const auto* p = reinterpret_cast<const uint8_t*>(mem.data());
    return std::vector<uint8_t>(p, p + byte_size());
  }
};

}  // namespace dsa::test
