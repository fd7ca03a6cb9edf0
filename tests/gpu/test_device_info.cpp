#include <gtest/gtest.h>

#include "dsa/config.h"
#include "dsa/cuda.h"

// The CUDA backend is built for sm_90a; anything else must be refused with a
// clear message rather than failing inside a kernel launch.
TEST(GpuDevice, IsHopperAndAcceptedByTheConfigRules) {
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const dsa::cuda::DeviceInfo d = dsa::cuda::current_device();
  EXPECT_FALSE(d.name.empty());
  EXPECT_GT(d.multiprocessors, 0);
  EXPECT_EQ(d.sm_major, 9) << d.name << " is not a Hopper GPU";
  EXPECT_GE(d.smem_optin_per_block, 227u * 1024u);
  EXPECT_NO_THROW(dsa::validate_for_gpu(dsa::LayerConfig{}, d.sm_major, d.sm_minor));
}
