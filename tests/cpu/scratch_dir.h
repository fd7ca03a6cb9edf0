#pragma once
// A per-process scratch folder for tests that write files, removed at exit.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace dsa::test {

// Path of `name` inside the process's scratch folder (one for the whole test binary).
inline std::string scratch_path(const std::string& name) {
  struct Dir {
    std::filesystem::path path;
    explicit Dir(std::filesystem::path p) : path(std::move(p)) { std::filesystem::create_directories(path); }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir d(std::filesystem::temp_directory_path() / ("dsa_tests_" + std::to_string(::getpid())));
  return (d.path / name).string();
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

}  // namespace dsa::test
