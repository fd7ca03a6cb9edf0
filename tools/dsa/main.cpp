// dsa: run, check and time one DeepSeek-V3.2 DSA attention layer.
//
// Exit codes (README.md):
//   0  success
//   1  usage or input error: a bad flag, value, configuration or file
//   2  dsa check ran and found results out of bounds (dsa::CheckError)
//   3  no usable GPU: no CUDA backend in the build, no device, or a device the
//      backend is not compiled for (dsa::NoDeviceError)
//   4  out of memory, host or device (dsa::OutOfMemoryError, std::bad_alloc)
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <charconv>
#include <cstdio>
#include <exception>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "dsa/error.h"

namespace {

constexpr int kExitUsage = 1;
constexpr int kExitCheckFailed = 2;
constexpr int kExitNoGpu = 3;
constexpr int kExitOutOfMemory = 4;

// A seed is a decimal uint64: CLI11 alone reads "-1" as 2^64 - 1 and
// saturates 2^64, so two different flags would give one seed.
const CLI::Validator kSeed(
    [](std::string& v) -> std::string {
      uint64_t x = 0;
      const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
      if (v.empty() || v[0] == '-' || v[0] == '+' || ec != std::errc() || p != v.data() + v.size()) {
        return fmt::format("seed '{}' is not an integer in [0, 18446744073709551615]", v);
      }
      return {};
    },
    "UINT64", "Seed");

int exit_code(const dsa::Error& e) {
  if (dynamic_cast<const dsa::CheckError*>(&e)) return kExitCheckFailed;
  if (dynamic_cast<const dsa::NoDeviceError*>(&e)) return kExitNoGpu;
  if (dynamic_cast<const dsa::OutOfMemoryError*>(&e)) return kExitOutOfMemory;
  return kExitUsage;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "dsa: one DeepSeek-V3.2 attention layer with DeepSeek Sparse Attention, run on its own.\n"
      "Subcommands print their own help: dsa <subcommand> --help\n"
      "Exit codes: 0 success, 1 usage or input error, 2 dsa check failed, 3 no usable GPU, 4 out of memory."};
  app.require_subcommand(1);
  app.set_version_flag("--version", "dsalab 0.1.0");
  dsa::cli::register_info(app);
  dsa::cli::register_run(app);
  dsa::cli::register_bench(app);
  dsa::cli::register_check(app);
  for (CLI::App* sub : app.get_subcommands({})) {
    if (CLI::Option* seed = sub->get_option_no_throw("--seed")) seed->check(kSeed);
  }
  // CLI11 takes an unknown first word for a stray argument and says only "A
  // subcommand is required".
  std::string names;
  bool known = false;
  for (const CLI::App* sub : app.get_subcommands({})) {
    names += (names.empty() ? "" : ", ") + sub->get_name();
    known = known || (argc > 1 && sub->get_name() == argv[1]);
  }
  if (argc > 1 && argv[1][0] != '-' && !known) {
    fmt::print(stderr, "error: '{}' is not a dsa subcommand; use one of {} (dsa --help)\n", argv[1], names);
    return kExitUsage;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);  // --help, --version
    fmt::print(stderr, "error: {}\nRun with --help for more information.\n", e.what());
    return kExitUsage;
  } catch (const dsa::Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "error: {}\n", dsa::cli::error_text(e));
    return exit_code(e);
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    fmt::print(stderr, "error: out of host memory; try a smaller shape (--new, --cached, --batch)\n");
    return kExitOutOfMemory;
  } catch (const std::length_error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "error: a buffer would exceed the largest size this machine can allocate ({}); try a smaller shape\n", e.what());
    return kExitOutOfMemory;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "error: {}\n", e.what());
    return kExitUsage;
  }
  return 0;
}
