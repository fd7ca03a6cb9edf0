#pragma once
// Each subcommand lives in its own file and registers itself on the app.
#include <CLI/CLI.hpp>

namespace dsa::cli {
void register_info(CLI::App& app);
void register_run(CLI::App& app);
void register_bench(CLI::App& app);
void register_check(CLI::App& app);
}  // namespace dsa::cli
