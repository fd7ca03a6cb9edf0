#pragma once
// The one integer hash behind every synthetic tensor (weights, hidden states,
// cache contents, benchmark inputs), on the host and in device code alike, so
// that host and device fills of the same (seed, index) agree bit for bit.
#include <cstdint>

#if defined(__CUDACC__)
#define DSA_HOST_DEVICE __host__ __device__
#else
#define DSA_HOST_DEVICE
#endif

namespace dsa {

// SplitMix64's step and finalizer: a bijection of 64-bit integers whose
// output bits all depend on every input bit.
DSA_HOST_DEVICE constexpr uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Top 24 bits of a hash as a float in [0, 1).
DSA_HOST_DEVICE constexpr float hash_unit_interval(uint64_t h) {
  return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
}

}  // namespace dsa
