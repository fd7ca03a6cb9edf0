// Batch shapes from the command line.
#include <fmt/format.h>

#include <charconv>
#include <string_view>

#include "dsa/batch.h"
#include "dsa/error.h"

namespace dsa {

namespace {
int64_t parse_count(std::string_view s, std::string_view item, const char* what) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) {
    throw ConfigError(fmt::format("request '{}': {} count '{}' is not an integer; write each request as cached:new, e.g. 32768:1",
                                  item, what, s),
                      "requests");
  }
  return v;
}
}  // namespace

std::vector<StepRequest> uniform_requests(int64_t batch, int64_t cached, int64_t num_new) {
  if (batch <= 0) throw ConfigError(fmt::format("batch = {} is invalid: a step needs at least one request", batch), "batch");
  if (cached < 0) throw ConfigError(fmt::format("cached = {} is invalid: cached token counts cannot be negative", cached), "cached");
  if (num_new <= 0) {
    throw ConfigError(fmt::format("num_new = {} is invalid: every request in a step needs at least one new token (decode: 1)", num_new),
                      "num_new");
  }
  if (batch > StepLimits::kMaxRequests) {
    throw ConfigError(fmt::format("batch = {} is too large: the limit is {} requests per step", batch, StepLimits::kMaxRequests), "batch");
  }
  if (num_new > StepLimits::kMaxSlots) {
    throw ConfigError(fmt::format("num_new = {} is too large: a request holds at most {} tokens (positions and cache slots are int32)",
                                  num_new, StepLimits::kMaxSlots),
                      "num_new");
  }
  if (cached > StepLimits::kMaxSlots - num_new) {
    throw ConfigError(fmt::format("cached = {} is too large: with num_new = {} a request would hold more than {} tokens (positions and "
                                  "cache slots are int32)",
                                  cached, num_new, StepLimits::kMaxSlots),
                      "cached");
  }
  std::vector<StepRequest> v(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) v[i] = StepRequest{i, cached, num_new};
  return v;
}

std::vector<StepRequest> parse_request_list(const std::string& list) {
  std::vector<StepRequest> out;
  std::string_view rest(list);
  if (rest.empty()) throw ConfigError("the request list is empty: give cached:new pairs separated by commas, e.g. 0:4096,32768:1", "requests");
  int64_t id = 0;
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view{} : rest.substr(comma + 1);
    const size_t colon = item.find(':');
    if (colon == std::string_view::npos) {
      throw ConfigError(fmt::format("request '{}' has no ':'; write each request as cached:new, e.g. 32768:1", item), "requests");
    }
    StepRequest r;
    r.id = id++;
    r.cached = parse_count(item.substr(0, colon), item, "cached");
    r.num_new = parse_count(item.substr(colon + 1), item, "new");
    if (r.cached < 0) throw ConfigError(fmt::format("request '{}': cached tokens cannot be negative", item), "requests");
    if (r.num_new <= 0) throw ConfigError(fmt::format("request '{}': every request needs at least one new token", item), "requests");
    if (r.num_new > StepLimits::kMaxSlots || r.cached > StepLimits::kMaxSlots - r.num_new) {
      throw ConfigError(fmt::format("request '{}': cached + new is more than the {} tokens a request can hold (positions and cache "
                                    "slots are int32)",
                                    item, StepLimits::kMaxSlots),
                        "requests");
    }
    if (static_cast<int64_t>(out.size()) >= StepLimits::kMaxRequests) {
      throw ConfigError(fmt::format("the request list has more than {} requests, the limit per step", StepLimits::kMaxRequests), "requests");
    }
    out.push_back(r);
  }
  return out;
}

}  // namespace dsa
