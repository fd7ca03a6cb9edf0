// The CUDA layer's memory for one step, counted before any allocation
// (dsa/memory.h), and the refusal that names the sizes and the limit.
#include <gtest/gtest.h>

#include <string>

#include "dsa/batch.h"
#include "dsa/cache.h"
#include "dsa/config.h"
#include "dsa/error.h"
#include "dsa/memory.h"

using namespace dsa;

TEST(Memory, FootprintCountsWeightsCachesAndTheLogits) {
  const LayerConfig c;
  const std::vector<StepRequest> seed = uniform_requests(1, 0, 4096);
  const DeviceFootprint f = cuda_step_footprint(c, seed, 0, false);
  // bf16 weights plus the stacked copy of the four projections of x.
  EXPECT_EQ(f.weights, 2.0 * weight_count(c) + 2.0 * (1536 + 576 + 128 + 64) * 7168);
  EXPECT_EQ(f.caches, static_cast<double>(CacheConfig::for_step(c, seed).total_bytes()));
  // The fp32 logits [T, max context] are in the activations.
  EXPECT_GT(f.activations, 4096.0 * 4096 * 4);
  EXPECT_GT(f.workspaces, 0.0);
  EXPECT_EQ(f.total(), f.weights + f.caches + f.activations + f.workspaces);
  // A longer context: the logits grow with it, T x S x 4 bytes.
  const DeviceFootprint g = cuda_step_footprint(c, uniform_requests(1, 126976, 4096), 0, false);
  EXPECT_GE(g.activations - f.activations, 4096.0 * 126976 * 4);
  // The trace's buffers and the attention's workspace are counted when asked for.
  EXPECT_GT(cuda_step_footprint(c, seed, 0, true).activations, f.activations);
  EXPECT_EQ(cuda_step_footprint(c, seed, 1e6, false).workspaces, f.workspaces + 1e6);
}

TEST(Memory, AStepTooLargeForTheCardIsRefusedWithTheSizes) {
  const LayerConfig c;
  // The largest step the limits allow: T x S logits far past any card, counted without overflow.
  const DeviceFootprint huge = cuda_step_footprint(c, uniform_requests(1, 0, (int64_t{1} << 31) - 128), 0, false);
  EXPECT_GT(huge.total(), 1e18);
  try {
    check_fits_device(huge, 140e9, 150e9, "NVIDIA H200");
    ADD_FAILURE() << "expected OutOfMemoryError";
  } catch (const OutOfMemoryError& e) {
    const std::string m = e.what();
    for (const char* part : {"GPU memory", "weights", "caches", "activations", "NVIDIA H200", "130.39 GiB free", "num_new"})
      EXPECT_NE(m.find(part), std::string::npos) << part << " in: " << m;
  }
  const DeviceFootprint seed = cuda_step_footprint(c, uniform_requests(1, 0, 4096), 0, false);
  EXPECT_NO_THROW(check_fits_device(seed, 140e9, 150e9, "NVIDIA H200"));
  EXPECT_THROW(check_fits_device(seed, seed.total() - 1, 150e9, "NVIDIA H200"), OutOfMemoryError);
}
