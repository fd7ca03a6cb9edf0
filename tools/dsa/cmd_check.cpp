// dsa check: registered here; filled in by its issue.
#include "commands.h"
#include "dsa/error.h"

namespace dsa::cli {
void register_check(CLI::App& app) {
  CLI::App* sub = app.add_subcommand("check", "check (not built yet)");
  sub->callback([] { throw Error("dsa check is not available in this build yet"); });
}
}  // namespace dsa::cli
