#pragma once
// Errors the library reports to its users. Every message names the offending
// value, the rule it breaks, and what to do instead; front ends print it and
// exit non-zero. Nothing in the library aborts on bad input.
#include <stdexcept>
#include <string>

namespace dsa {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A configuration value (config.json key, CLI flag) is missing, mistyped or out of range.
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

}  // namespace dsa
