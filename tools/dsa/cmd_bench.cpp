// dsa bench: registered here; filled in by its issue.
#include "commands.h"
#include "dsa/error.h"

namespace dsa::cli {
void register_bench(CLI::App& app) {
  CLI::App* sub = app.add_subcommand("bench", "bench (not built yet)");
  sub->callback([] { throw Error("dsa bench is not available in this build yet"); });
}
}  // namespace dsa::cli
