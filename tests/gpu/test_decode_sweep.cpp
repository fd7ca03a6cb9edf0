// The sparse MLA decode sweep on the GPU (dsa/decode_sweep.h): a tiny grid
// runs every valid cell and fills every column (ours, rates, work, FlashMLA
// from an anchor file naming this card), refuses the invalid pairings with
// the reason, times FlashMLA's protocol (one warm-up, 30 runs after an 8 GB
// memset), and the fused way either runs or is skipped with the launcher's
// reason (before the fused kernel lands, the launcher rejects kv_fp8).
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "dsa/cuda.h"
#include "dsa/decode_sweep.h"
#include "dsa/error.h"

namespace {

#define SKIP_WITHOUT_GPU() \
  if (dsa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

// An anchor file with one figure for this card at (batch 2, next_n 1).
std::string anchors_for_this_card() {
  const std::string path = testing::TempDir() + "dsa_decode_anchors_test.json";
  std::ofstream(path) << R"({"devices": {")" << dsa::cuda::current_device().name
                      << R"(": {"num_heads": 64, "s_k": 1024, "topk": 128, "cache": "fp8", "protocol": "test",
                       "cells": [{"batch": 2, "next_n": 1, "us": 10.0}]}}})";
  return path;
}

}  // namespace

TEST(DecodeSweepGpu, TinySweepRunsEveryValidCellAndFillsEveryColumn) {
  SKIP_WITHOUT_GPU();
  dsa::DecodeSweepOptions o;
  o.points = dsa::decode_sweep_points(
      {"batch=2", "next_n=1,2", "cache=bf16,fp8", "num_heads=64", "s_k=1024", "topk=128", "way=direct,gather"});
  ASSERT_EQ(o.points.size(), 8u);
  o.warmup = 2, o.iters = 5, o.seed = 3;
  o.anchors_path = anchors_for_this_card();
  const dsa::DecodeSweep s = dsa::cuda::sweep_sparse_mla_decode(o);
  EXPECT_EQ(s.device, dsa::cuda::current_device().name);
  EXPECT_EQ(s.kernels, "auto");
  ASSERT_EQ(s.rows.size(), 4u);     // direct on bf16, gather on fp8, next_n 1 and 2
  ASSERT_EQ(s.skipped.size(), 4u);  // the other pairings of way and cache
  for (const dsa::DecodeSweepSkip& k : s.skipped) EXPECT_FALSE(k.reason.empty()) << k.point.label();
  int with_flashmla = 0;
  for (const dsa::DecodeSweepRow& r : s.rows) {
    const std::string l = r.point.label();
    EXPECT_FALSE(r.kernel.empty()) << l;
    EXPECT_GT(r.median_us, 0) << l;
    EXPECT_LE(r.min_us, r.median_us) << l;
    EXPECT_GE(r.max_us, r.median_us) << l;
    EXPECT_GT(r.mean_us, 0) << l;
    EXPECT_EQ(r.warmup, 2) << l;
    EXPECT_EQ(r.runs, 5) << l;
    EXPECT_EQ(r.valid, r.point.tokens() * 128) << l;  // s_k 1024 > topk: every query has 128 valid indices
    EXPECT_GT(r.distinct, 0) << l;
    EXPECT_LE(r.distinct, r.valid) << l;
    EXPECT_GT(r.flops, 0) << l;
    EXPECT_GT(r.bytes, 0) << l;
    EXPECT_GE(r.sm_mhz, 0) << l;  // 0 ("-") only when the two clock probes ran on different SMs
    if (r.flashmla_us > 0) {
      ++with_flashmla;
      EXPECT_EQ(r.point.way, "gather");
      EXPECT_EQ(r.point.next_n, 1);
    }
  }
  EXPECT_EQ(with_flashmla, 1);
  const std::string t = dsa::format_decode_sweep_table(s);
  EXPECT_NE(t.find("| 10.0 |"), std::string::npos) << t;  // the anchor's figure beside ours
  EXPECT_NE(t.find("gather + "), std::string::npos) << t;
}

TEST(DecodeSweepGpu, FlashMlaProtocolRunsThirtyColdRuns) {
  SKIP_WITHOUT_GPU();
  dsa::DecodeSweepOptions o;
  o.points = dsa::decode_sweep_points({"batch=2", "next_n=1", "cache=fp8", "num_heads=64", "s_k=1024", "topk=128", "way=gather"});
  o.protocol = "flashmla";
  const dsa::DecodeSweep s = dsa::cuda::sweep_sparse_mla_decode(o);
  ASSERT_EQ(s.rows.size(), 1u);
  EXPECT_EQ(s.rows[0].warmup, 1);
  EXPECT_EQ(s.rows[0].runs, 30);
  EXPECT_GT(s.rows[0].median_us, 0);
  EXPECT_NE(dsa::format_decode_sweep_table(s).find("8 GB memset"), std::string::npos);
}

TEST(DecodeSweepGpu, FusedWayRunsOrIsSkippedWithTheLaunchersReason) {
  SKIP_WITHOUT_GPU();
  dsa::DecodeSweepOptions o;
  o.points = dsa::decode_sweep_points({"batch=2", "next_n=1,2", "cache=fp8", "num_heads=64,128", "s_k=1024", "topk=128", "way=fused"});
  o.warmup = 1, o.iters = 3;
  const dsa::DecodeSweep s = dsa::cuda::sweep_sparse_mla_decode(o);
  EXPECT_EQ(s.rows.size() + s.skipped.size(), 4u);
  for (const dsa::DecodeSweepSkip& k : s.skipped) EXPECT_FALSE(k.reason.empty()) << k.point.label();
  for (const dsa::DecodeSweepRow& r : s.rows) EXPECT_GT(r.median_us, 0) << r.point.label();
}
