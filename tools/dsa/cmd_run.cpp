// dsa run: registered here; filled in by its issue.
#include "commands.h"
#include "dsa/error.h"

namespace dsa::cli {
void register_run(CLI::App& app) {
  CLI::App* sub = app.add_subcommand("run", "run (not built yet)");
  sub->callback([] { throw Error("dsa run is not available in this build yet"); });
}
}  // namespace dsa::cli
