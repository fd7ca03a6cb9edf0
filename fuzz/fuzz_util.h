#pragma once
// Helpers shared by the fuzz targets: a private scratch folder (on tmpfs when
// there is one) for the readers that take paths, and the failure hook.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace dsa_fuzz {

// A property the target checks was broken: print why and abort, which
// libFuzzer reports as a crash with the input saved.
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "fuzz property violated: %s\n", what);
  std::abort();
}

// One folder per process, removed at exit.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const char* base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
    std::string tmpl = std::string(base) + "/dsa-fuzz-XXXXXX";
    if (!mkdtemp(tmpl.data())) fail("mkdtemp");
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return std::filesystem::path(tmpl);
  }();
  return dir;
}

inline void write_file(const std::filesystem::path& p, const uint8_t* data, size_t size) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!f) fail("cannot write the scratch file");
}

}  // namespace dsa_fuzz
