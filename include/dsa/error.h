#pragma once
// Errors the library reports to its users. Every message names the offending
// value, the rule it breaks, and what to do instead; front ends print it and
// exit non-zero. Nothing in the library aborts on bad input.
//
// Messages speak of parameters (config.json keys, LayerConfig / CacheConfig
// fields, function arguments), never of a front end's flags. When a single
// parameter is at fault, the error carries its name in parameter(), so that
// a front end can say how to set it (the dsa CLI adds "(set with --flag)").
#include <stdexcept>
#include <string>
#include <utility>

namespace dsa {

class Error : public std::runtime_error {
 public:
  // `parameter`: the one parameter at fault, by its library name (e.g.
  // "num_heads", "index_topk", "tokens_per_block", "rope_scaling.factor");
  // empty when no single parameter is.
  explicit Error(const std::string& msg, std::string parameter = {})
      : std::runtime_error(msg), parameter_(std::move(parameter)) {}
  const std::string& parameter() const { return parameter_; }

 private:
  std::string parameter_;
};

// A configuration value (config.json key, LayerConfig / CacheConfig field,
// argument) is missing, mistyped or out of range.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A file (config.json, safetensors) could not be read or is malformed.
class FileError : public Error {
 public:
  using Error::Error;
};

// Tensor shapes or dtypes handed to an op do not match what it needs.
class ShapeError : public Error {
 public:
  using Error::Error;
};

// The paged cache has no room for a request, or a request id is unknown.
class CacheError : public Error {
 public:
  using Error::Error;
};

// A CUDA runtime / driver / cuBLAS call failed.
class CudaError : public Error {
 public:
  using Error::Error;
};

// Values handed in are unusable although their shapes are right: NaN or Inf
// in an input, a weight or an fp8 scale.
class ValueError : public Error {
 public:
  using Error::Error;
};

// No usable GPU: the build has no CUDA backend, no device is visible, or the
// device is not one the backend is compiled for.
class NoDeviceError : public Error {
 public:
  using Error::Error;
};

// Host or device memory could not be allocated for the requested sizes.
class OutOfMemoryError : public Error {
 public:
  using Error::Error;
};

// A comparison against the reference (dsa check) found results out of bounds.
class CheckError : public Error {
 public:
  using Error::Error;
};

}  // namespace dsa
