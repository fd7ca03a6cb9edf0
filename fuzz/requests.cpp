// The --requests parser (parse_request_list): the fuzz input is the list
// text. Anything it accepts must satisfy the step limits the rest of the
// code relies on (ids 0..R-1 in order, cached >= 0, new >= 1, cached + new
// within int32 slots), so check_step_limits and CacheConfig::for_step accept
// it or refuse it with a dsa::Error, never with anything else.
#include <cstdint>
#include <string>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/error.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<dsa::StepRequest> reqs;
  try {
    reqs = dsa::parse_request_list(text);
  } catch (const dsa::ConfigError& e) {
    if (e.parameter() != "requests") dsa_fuzz::fail("parse_request_list threw for a parameter other than requests");
    return 0;
  }
  if (reqs.empty() || static_cast<int64_t>(reqs.size()) > dsa::StepLimits::kMaxRequests) dsa_fuzz::fail("request count");
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& q = reqs[i];
    if (q.id != static_cast<int64_t>(i)) dsa_fuzz::fail("ids not 0..R-1 in order");
    if (q.cached < 0 || q.num_new < 1) dsa_fuzz::fail("cached < 0 or new < 1 accepted");
    if (q.num_new > dsa::StepLimits::kMaxSlots || q.cached > dsa::StepLimits::kMaxSlots - q.num_new) {
      dsa_fuzz::fail("cached + new past the int32 slot limit accepted");
    }
  }
  for (int64_t tpb : {1, 64, 4096}) {
    try {
      dsa::check_step_limits(reqs, tpb, "fuzz");
    } catch (const dsa::ConfigError&) {
    }
  }
  try {
    dsa::LayerConfig cfg;
    (void)dsa::CacheConfig::for_step(cfg, reqs);
  } catch (const dsa::ConfigError&) {
  }
  return 0;
}
