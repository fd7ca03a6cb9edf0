// config.json reader: load_config_json_text + validate. Any input may be
// refused with a dsa::Error; anything else escaping (another exception, a
// sanitizer report) is a bug. A configuration validate() accepts must
// survive its own JSON form unchanged, and everything derived from it must be
// finite and computable.
#include <cmath>
#include <cstdint>
#include <string>

#include "dsa/cache.h"
#include "dsa/config.h"
#include "dsa/error.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  dsa::LayerConfig c;
  try {
    c = dsa::load_config_json_text(text, "fuzz.json");
    dsa::validate(c);
  } catch (const dsa::Error&) {
    return 0;
  }
  const std::string j = dsa::config_to_json(c);
  dsa::LayerConfig back;
  try {
    back = dsa::config_from_json_text(j, "round trip");
  } catch (const dsa::Error&) {
    dsa_fuzz::fail("config_to_json of a valid configuration does not read back");
  }
  if (dsa::config_to_json(back) != j) dsa_fuzz::fail("config round trip changed the configuration");
  if (!std::isfinite(c.softmax_scale()) || !(c.softmax_scale() > 0)) dsa_fuzz::fail("softmax_scale not finite and positive");
  for (double f : dsa::rope_inv_freq(c)) {
    if (!std::isfinite(f)) dsa_fuzz::fail("rope_inv_freq not finite");
  }
  if (dsa::weight_count(c) <= 0) dsa_fuzz::fail("weight_count not positive");
  try {
    dsa::validate_for_gpu(c, 9, 0);
  } catch (const dsa::Error&) {
  }
  try {
    dsa::validate_for_sparse_prefill(c);
  } catch (const dsa::Error&) {
  }
  try {
    dsa::CacheConfig cc = dsa::CacheConfig::for_layer(c);
    cc.with_tokens(1);
    cc.validate();
  } catch (const dsa::Error&) {
  }
  return 0;
}
