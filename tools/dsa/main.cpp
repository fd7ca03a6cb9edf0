// dsa: run, check and time one DeepSeek-V3.2 DSA attention layer.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "cli_common.h"
#include "commands.h"
#include "dsa/error.h"

int main(int argc, char** argv) {
  CLI::App app{
      "dsa: one DeepSeek-V3.2 attention layer with DeepSeek Sparse Attention, run on its own.\n"
      "Subcommands print their own help: dsa <subcommand> --help"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "dsalab 0.1.0");
  dsa::cli::register_info(app);
  dsa::cli::register_run(app);
  dsa::cli::register_bench(app);
  dsa::cli::register_check(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const dsa::Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "error: {}\n", dsa::cli::error_text(e));
    return 2;
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    fmt::print(stderr, "error: out of host memory; try a smaller shape (--new, --cached, --batch)\n");
    return 3;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "error: {}\n", e.what());
    return 4;
  }
  return 0;
}
