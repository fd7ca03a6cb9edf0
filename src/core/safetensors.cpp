#include "dsa/safetensors.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "dsa/error.h"

namespace dsa::st {

namespace {

// The format's own limit; also keeps a corrupt length from allocating gigabytes.
constexpr uint64_t kMaxHeader = 100'000'000;

struct DTypeDesc {
  DType d;
  const char* name;
  int64_t size;
};
constexpr DTypeDesc kDTypes[] = {
    {DType::BOOL, "BOOL", 1}, {DType::U8, "U8", 1},   {DType::I8, "I8", 1},   {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::F8_E4M3, "F8_E4M3", 1}, {DType::I16, "I16", 2}, {DType::U16, "U16", 2}, {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I32, "I32", 4}, {DType::U32, "U32", 4}, {DType::F32, "F32", 4},
    {DType::F64, "F64", 8},   {DType::I64, "I64", 8}, {DType::U64, "U64", 8},
};

float f16_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(1.0f + man / 1024.0f, exp - 15);
  }
  return sign ? -v : v;
}

float fp8_e5m2_to_float(uint8_t b) {
  // e5m2 is the top byte of an IEEE half.
  return f16_to_float(static_cast<uint16_t>(b) << 8);
}

template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

bool is_float(DType d) {
  return d == DType::BF16 || d == DType::F16 || d == DType::F32 || d == DType::F64 || d == DType::F8_E4M3 || d == DType::F8_E5M2;
}

}  // namespace

const char* dtype_name(DType d) {
  for (const auto& e : kDTypes)
    if (e.d == d) return e.name;
  return "?";
}

int64_t dtype_size(DType d) {
  for (const auto& e : kDTypes)
    if (e.d == d) return e.size;
  return 0;
}

DType parse_dtype(const std::string& s, const std::string& where) {
  for (const auto& e : kDTypes)
    if (s == e.name) return e.d;
  std::string names;
  for (const auto& e : kDTypes) names += (names.empty() ? "" : ", ") + std::string(e.name);
  throw FileError(fmt::format("{}: dtype '{}' is not a safetensors dtype this reader knows; expected one of {}", where, s, names));
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string index_string(const std::vector<int64_t>& shape, int64_t flat) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    const int64_t n = shape[d] > 0 ? shape[d] : 1;
    idx[d] = d == 0 ? flat : flat % n;
    flat /= n;
  }
  return shape_string(idx);
}

Reader::Reader(const std::string& path) : path_(path) {
  std::error_code ec;
  // A directory, FIFO or device has no size to check the header against.
  const auto st = std::filesystem::status(path, ec);
  if (!ec && std::filesystem::exists(st) && !std::filesystem::is_regular_file(st)) {
    throw FileError(fmt::format("'{}' is {}, not a safetensors file; give the file itself", path,
                                std::filesystem::is_directory(st) ? "a directory" : "a device, FIFO or socket"));
  }
  const auto fsize = std::filesystem::file_size(path, ec);
  if (ec) throw FileError(fmt::format("cannot read safetensors file '{}': {}; check the path", path, ec.message()));
  std::ifstream f(path, std::ios::binary);
  if (!f) throw FileError(fmt::format("cannot open safetensors file '{}'; check the path and permissions", path));
  const uint64_t size = static_cast<uint64_t>(fsize);
  if (size < 8) {
    throw FileError(fmt::format("'{}' is not a safetensors file: it has {} bytes, fewer than the 8-byte header length", path, size));
  }
  uint8_t lenb[8];
  f.read(reinterpret_cast<char*>(lenb), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | lenb[i];
  if (n > kMaxHeader) {
    throw FileError(fmt::format("'{}': header length {} exceeds the format's limit of {} bytes; the file is corrupt or not safetensors",
                                path, n, kMaxHeader));
  }
  if (n > size - 8) {
    throw FileError(fmt::format("'{}': header length {} runs past the end of the {}-byte file; the file is truncated or not safetensors",
                                path, n, size));
  }
  if (n < 2) throw FileError(fmt::format("'{}': header length {} is too short for a JSON object", path, n));
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  if (static_cast<uint64_t>(f.gcount()) != n) throw FileError(fmt::format("'{}': could not read the {}-byte header", path, n));
  data_start_ = static_cast<int64_t>(8 + n);
  const int64_t data_size = static_cast<int64_t>(size - 8 - n);

  // Duplicate top-level names would silently shadow each other in a JSON object.
  std::set<std::string> seen;
  std::string duplicate;
  const nlohmann::json::parser_callback_t cb = [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
    if (ev == nlohmann::json::parse_event_t::key && depth == 1) {
      const auto k = parsed.get<std::string>();
      if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header, cb);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(fmt::format("'{}': the header is not valid JSON ({}); the file is corrupt or not safetensors", path, e.what()));
  }
  if (!duplicate.empty()) throw FileError(fmt::format("'{}': tensor '{}' appears twice in the header; names must be unique", path, duplicate));
  if (!j.is_object()) throw FileError(fmt::format("'{}': the header is JSON but not an object of tensors", path));

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw FileError(fmt::format("'{}': __metadata__ must be an object of strings", path));
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw FileError(fmt::format("'{}': __metadata__ value '{}' is not a string", path, m.key()));
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = fmt::format("'{}': tensor '{}'", path, name);
    if (name.empty()) throw FileError(fmt::format("'{}': a tensor has an empty name", path));
    if (!v.is_object()) throw FileError(fmt::format("{}: entry is not an object with dtype, shape and data_offsets", where));
    for (auto k = v.begin(); k != v.end(); ++k) {
      if (k.key() != "dtype" && k.key() != "shape" && k.key() != "data_offsets") {
        throw FileError(fmt::format("{}: unknown field '{}' (allowed: dtype, shape, data_offsets)", where, k.key()));
      }
    }
    if (!v.contains("dtype") || !v["dtype"].is_string()) throw FileError(fmt::format("{}: missing or non-string 'dtype'", where));
    if (!v.contains("shape") || !v["shape"].is_array()) throw FileError(fmt::format("{}: missing or non-array 'shape'", where));
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2) {
      throw FileError(fmt::format("{}: 'data_offsets' must be an array of two byte offsets [begin, end]", where));
    }
    TensorInfo t;
    t.name = name;
    t.dtype = parse_dtype(v["dtype"].get<std::string>(), where);
    int64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        throw FileError(fmt::format("{}: shape {} has an entry that is not a non-negative integer", where, v["shape"].dump()));
      }
      const int64_t dim = d.get<int64_t>();
      if (dim != 0 && numel > (int64_t{1} << 52) / dim) {
        throw FileError(fmt::format("{}: shape {} has too many elements to be real", where, v["shape"].dump()));
      }
      numel *= dim;
      t.shape.push_back(dim);
    }
    for (const auto& o : v["data_offsets"]) {
      if (!o.is_number_integer() || o.get<int64_t>() < 0) {
        throw FileError(fmt::format("{}: data_offsets {} must be non-negative integers", where, v["data_offsets"].dump()));
      }
    }
    t.begin = v["data_offsets"][0].get<int64_t>();
    t.end = v["data_offsets"][1].get<int64_t>();
    if (t.end < t.begin) throw FileError(fmt::format("{}: data_offsets [{}, {}] end before they begin", where, t.begin, t.end));
    if (t.end > data_size) {
      throw FileError(fmt::format("{}: data_offsets [{}, {}] run past the {}-byte data section; the file is truncated or corrupt", where,
                                  t.begin, t.end, data_size));
    }
    const int64_t want = numel * dtype_size(t.dtype);
    if (t.end - t.begin != want) {
      throw FileError(fmt::format("{}: shape {} of {} needs {} bytes but data_offsets [{}, {}] hold {}", where, shape_string(t.shape),
                                  dtype_name(t.dtype), want, t.begin, t.end, t.end - t.begin));
    }
    tensors_.push_back(std::move(t));
  }
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Sorted by begin, a non-empty tensor overlaps an earlier one exactly when it
  // starts before the furthest end seen so far.
  const TensorInfo* furthest = nullptr;
  for (const auto& b : tensors_) {
    if (b.end == b.begin) continue;
    if (furthest && b.begin < furthest->end) {
      throw FileError(fmt::format("'{}': tensors '{}' [{}, {}] and '{}' [{}, {}] overlap; each tensor needs its own bytes", path,
                                  furthest->name, furthest->begin, furthest->end, b.name, b.begin, b.end));
    }
    if (!furthest || b.end > furthest->end) furthest = &b;
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

bool Reader::has(const std::string& name) const { return index_.count(name) != 0; }

const TensorInfo& Reader::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    throw FileError(fmt::format("'{}' has no tensor '{}' ({} tensors in the file); check the name and the layer index", path_, name,
                                tensors_.size()));
  }
  return tensors_[it->second];
}

std::vector<uint8_t> Reader::bytes(const std::string& name) const {
  const TensorInfo& t = info(name);
  std::vector<uint8_t> out(static_cast<size_t>(t.end - t.begin));
  if (out.empty()) return out;
  std::ifstream f(path_, std::ios::binary);
  f.seekg(data_start_ + t.begin);
  f.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  if (!f || static_cast<size_t>(f.gcount()) != out.size()) {
    throw FileError(fmt::format("'{}': could not read the {} bytes of tensor '{}' (the file changed or is unreadable)", path_, out.size(), name));
  }
  return out;
}

std::vector<float> Reader::read_f32(const std::string& name) const {
  const TensorInfo& t = info(name);
  if (!is_float(t.dtype)) {
    throw FileError(fmt::format("'{}': tensor '{}' is {}, not a floating-point type; store it as BF16, F16, F32 or F8_E4M3", path_, name,
                                dtype_name(t.dtype)));
  }
  const auto b = bytes(name);
  const int64_t n = t.numel();
  std::vector<float> v(static_cast<size_t>(n));
  const uint8_t* p = b.data();
  for (int64_t i = 0; i < n; ++i) {
    switch (t.dtype) {
      case DType::BF16: v[i] = bf16_to_float(load<uint16_t>(p + 2 * i)); break;
      case DType::F16: v[i] = f16_to_float(load<uint16_t>(p + 2 * i)); break;
      case DType::F32: v[i] = load<float>(p + 4 * i); break;
      case DType::F64: v[i] = static_cast<float>(load<double>(p + 8 * i)); break;
      case DType::F8_E4M3: v[i] = fp8_e4m3_to_float(p[i]); break;
      case DType::F8_E5M2: v[i] = fp8_e5m2_to_float(p[i]); break;
      default: break;
    }
  }
  return v;
}

std::vector<bf16_t> Reader::read_bf16(const std::string& name) const {
  const TensorInfo& t = info(name);
  if (t.dtype == DType::BF16) {
    const auto b = bytes(name);
    std::vector<bf16_t> v(static_cast<size_t>(t.numel()));
    if (!v.empty()) std::memcpy(v.data(), b.data(), b.size());
    return v;
  }
  const auto f = read_f32(name);
  std::vector<bf16_t> v(f.size());
  for (size_t i = 0; i < f.size(); ++i) v[i] = float_to_bf16(f[i]);
  return v;
}

std::vector<int64_t> Reader::read_i64(const std::string& name) const {
  const TensorInfo& t = info(name);
  if (is_float(t.dtype)) {
    throw FileError(fmt::format("'{}': tensor '{}' is {}, but an integer type (I32, I64, ...) is needed", path_, name, dtype_name(t.dtype)));
  }
  const auto b = bytes(name);
  const int64_t n = t.numel();
  std::vector<int64_t> v(static_cast<size_t>(n));
  const uint8_t* p = b.data();
  for (int64_t i = 0; i < n; ++i) {
    switch (t.dtype) {
      case DType::BOOL:
      case DType::U8: v[i] = p[i]; break;
      case DType::I8: v[i] = static_cast<int8_t>(p[i]); break;
      case DType::I16: v[i] = load<int16_t>(p + 2 * i); break;
      case DType::U16: v[i] = load<uint16_t>(p + 2 * i); break;
      case DType::I32: v[i] = load<int32_t>(p + 4 * i); break;
      case DType::U32: v[i] = load<uint32_t>(p + 4 * i); break;
      case DType::I64: v[i] = load<int64_t>(p + 8 * i); break;
      case DType::U64: {
        const uint64_t u = load<uint64_t>(p + 8 * i);
        if (u > static_cast<uint64_t>(INT64_MAX)) throw FileError(fmt::format("'{}': tensor '{}' holds {} which does not fit int64", path_, name, u));
        v[i] = static_cast<int64_t>(u);
        break;
      }
      default: break;
    }
  }
  return v;
}

void Reader::expect_shape(const std::string& name, const std::vector<int64_t>& shape, const std::string& hint) const {
  const TensorInfo& t = info(name);
  if (t.shape != shape) {
    throw FileError(fmt::format("'{}': tensor '{}' has shape {} but {} is needed{}{}", path_, name, shape_string(t.shape), shape_string(shape),
                                hint.empty() ? "" : "; ", hint));
  }
}

void Writer::add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::vector<uint8_t> bytes) {
  if (name.empty() || name == "__metadata__") throw FileError(fmt::format("cannot write a tensor named '{}'", name));
  if (has(name)) throw FileError(fmt::format("tensor '{}' is added twice to one safetensors file", name));
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw ShapeError(fmt::format("tensor '{}': shape {} has a negative dimension", name, shape_string(shape)));
    n *= d;
  }
  if (static_cast<int64_t>(bytes.size()) != n * dtype_size(dtype)) {
    throw ShapeError(fmt::format("tensor '{}': shape {} of {} needs {} bytes, got {}", name, shape_string(shape), dtype_name(dtype),
                                 n * dtype_size(dtype), bytes.size()));
  }
  entries_.push_back(Entry{name, dtype, shape, std::move(bytes)});
}

namespace {
template <class T>
std::vector<uint8_t> as_bytes(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}
}  // namespace

void Writer::add_bf16(const std::string& name, const std::vector<int64_t>& shape, const std::vector<bf16_t>& v) {
  add(name, DType::BF16, shape, as_bytes(v));
}
void Writer::add_bf16_from_f32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& v) {
  std::vector<bf16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bf16(v[i]);
  add_bf16(name, shape, b);
}
void Writer::add_f32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& v) {
  add(name, DType::F32, shape, as_bytes(v));
}
void Writer::add_i32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<int32_t>& v) {
  add(name, DType::I32, shape, as_bytes(v));
}
void Writer::add_i64(const std::string& name, const std::vector<int64_t>& shape, const std::vector<int64_t>& v) {
  add(name, DType::I64, shape, as_bytes(v));
}
void Writer::add_u8(const std::string& name, DType dtype, const std::vector<int64_t>& shape, const std::vector<uint8_t>& v) {
  add(name, dtype, shape, v);
}

bool Writer::has(const std::string& name) const {
  return std::any_of(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.name == name; });
}

void Writer::write(const std::string& path) const {
  nlohmann::json j = nlohmann::json::object();
  if (!metadata_.empty()) j["__metadata__"] = metadata_;
  int64_t off = 0;
  for (const auto& e : entries_) {
    const int64_t end = off + static_cast<int64_t>(e.bytes.size());
    j[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {off, end}}};
    off = end;
  }
  std::string header = j.dump();
  // Pad with spaces (valid JSON whitespace) so that the data section starts 8-byte aligned.
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw FileError(fmt::format("cannot create '{}'; check that the folder exists and is writable", path));
  uint8_t lenb[8];
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) lenb[i] = static_cast<uint8_t>(n >> (8 * i));
  f.write(reinterpret_cast<const char*>(lenb), 8);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const auto& e : entries_) f.write(reinterpret_cast<const char*>(e.bytes.data()), static_cast<std::streamsize>(e.bytes.size()));
  f.flush();
  if (!f) throw FileError(fmt::format("writing '{}' failed (disk full or not writable)", path));
}

}  // namespace dsa::st
