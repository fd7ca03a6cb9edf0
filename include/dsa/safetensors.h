#pragma once
// Safetensors files (https://github.com/huggingface/safetensors format): an
// 8-byte little-endian header length, a JSON header mapping tensor names to
// dtype, shape and [begin, end) byte offsets into the data section that
// follows, then the data. Reading is strict: every malformed file (bad header
// length, bad JSON, unknown dtype, shape that does not match its byte range,
// ranges outside the file or overlapping, duplicate names, truncation) is a
// FileError naming the file, the tensor and the rule; nothing reads outside
// the file. Only the header is read on open; tensor bytes are read on demand,
// so one layer can be taken from a large checkpoint shard.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dsa/dtypes.h"

namespace dsa::st {

enum class DType { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

const char* dtype_name(DType d);      // "BF16", "F8_E4M3", ...
int64_t dtype_size(DType d);          // bytes per element
DType parse_dtype(const std::string& s, const std::string& where);  // throws FileError naming `where`

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  int64_t begin = 0, end = 0;  // byte range inside the data section
  int64_t numel() const;
};

std::string shape_string(const std::vector<int64_t>& shape);  // "[4096, 7168]"
// The multi-index of row-major element `flat` of a tensor of this shape: "[3, 17]".
std::string index_string(const std::vector<int64_t>& shape, int64_t flat);

class Reader {
 public:
  // Reads and checks the header against the file size. Throws FileError.
  explicit Reader(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const;
  // Throws FileError naming the missing tensor.
  const TensorInfo& info(const std::string& name) const;

  // Raw bytes of a tensor.
  std::vector<uint8_t> bytes(const std::string& name) const;
  // Converting readers; each throws FileError when the dtype cannot be
  // converted without loss of meaning (e.g. floats as integers).
  std::vector<float> read_f32(const std::string& name) const;   // BF16, F16, F32, F64, F8_E4M3, F8_E5M2
  std::vector<bf16_t> read_bf16(const std::string& name) const; // BF16 as is; F32/F16/F64 rounded to nearest even
  std::vector<int64_t> read_i64(const std::string& name) const; // any integer type
  // Checks the tensor's shape; throws FileError with both shapes and a hint.
  void expect_shape(const std::string& name, const std::vector<int64_t>& shape, const std::string& hint = "") const;

 private:
  std::string path_;
  int64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Builds a file in memory and writes it in one go. Tensors are laid out in
// the order they are added, each data range 8-byte aligned via header padding.
class Writer {
 public:
  void add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::vector<uint8_t> bytes);
  void add_bf16(const std::string& name, const std::vector<int64_t>& shape, const std::vector<bf16_t>& v);
  // Rounds each value to bf16 (for values that are bf16 already, exact).
  void add_bf16_from_f32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& v);
  void add_f32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& v);
  void add_i32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<int32_t>& v);
  void add_i64(const std::string& name, const std::vector<int64_t>& shape, const std::vector<int64_t>& v);
  void add_u8(const std::string& name, DType dtype, const std::vector<int64_t>& shape, const std::vector<uint8_t>& v);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  bool has(const std::string& name) const;
  // Throws FileError when the file cannot be written.
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace dsa::st
