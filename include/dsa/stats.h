#pragma once
// Summaries of timing samples, one definition for every benchmark.
#include <algorithm>
#include <vector>

namespace dsa {

struct SampleSummary {
  double median = 0, min = 0, max = 0, mean = 0;
};

// Median (mean of the two middle values for an even count), min, max, mean;
// all 0 for no samples.
inline SampleSummary summarize(std::vector<double> v) {
  SampleSummary s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  s.median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  s.min = v.front();
  s.max = v.back();
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(n);
  return s;
}

inline double median(std::vector<double> v) { return summarize(std::move(v)).median; }

}  // namespace dsa
