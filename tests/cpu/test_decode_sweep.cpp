// The CUDA-free half of the sparse MLA decode sweep (dsa/decode_sweep.h):
// axes and the grid, the cells refused before any GPU work and why, the cost
// model against FlashMLA's own TFLOP/s figure, the anchor file, the three
// renderings, and the command line's refusals (which need no GPU).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "cli_run.h"
#include "dsa/decode_sweep.h"
#include "dsa/error.h"
#include "expect_error.h"
#include "scratch_dir.h"

using namespace dsa;
using dsa::test::expect_error;
using dsa::test::expect_rejected;

namespace {

const std::string kAnchors = std::string(DSA_TEST_DATA_DIR) + "/../../data/anchors/flashmla-sparse-decode.json";

std::vector<std::string> lines(const std::string& s) {
  std::vector<std::string> v;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) v.push_back(l);
  return v;
}

size_t count_char(const std::string& s, char c) { return static_cast<size_t>(std::count(s.begin(), s.end(), c)); }

DecodeSweep sample_sweep() {
  DecodeSweep s;
  s.device = "NVIDIA H200";
  s.protocol = "flashmla";
  s.kernels = "sparse_mla_fp8=new";  // as format_kernel_picks would not print it, but any text must pass through
  s.warmup = 1, s.iters = 30;
  s.flashmla_source = "FlashMLA on NVIDIA H200: test";
  DecodeSweepRow a;
  a.point.batch = 64, a.point.next_n = 1, a.point.way = "gather";
  a.kernel = "gather + sm90";
  a.median_us = 193.8, a.min_us = 190, a.max_us = 200, a.mean_us = 194, a.warmup = 1, a.runs = 30;
  a.valid = 64 * 2048, a.distinct = 64 * 2048;
  const DecodeSweepWork w = decode_sweep_work(a.point, a.valid, a.distinct);
  a.flops = w.flops, a.bytes = w.bytes;
  a.sm_mhz = 1755;
  a.flashmla_us = 96.9;
  DecodeSweepRow b = a;
  b.point.batch = 3, b.point.way = "fused", b.kernel = "kv_fp8 (sparse_mla_fp8=new)";
  b.flashmla_us = 0, b.sm_mhz = 0;  // no figure, clock not measured
  s.rows = {a, b};
  DecodeSweepPoint k;
  k.way = "direct";
  s.skipped.push_back({k, decode_sweep_skip_reason(k)});
  return s;
}

}  // namespace

TEST(DecodeSweep, DefaultGridIsFlashMlasCellsWithBothFp8Ways) {
  const std::vector<DecodeSweepPoint> pts = decode_sweep_points({});
  ASSERT_EQ(pts.size(), 12u);  // batch 2,64,128 x next_n 1,2 x way gather,fused
  for (const DecodeSweepPoint& p : pts) {
    EXPECT_EQ(p.cache, "fp8");
    EXPECT_EQ(p.num_heads, 128);
    EXPECT_EQ(p.s_k, 32768);
    EXPECT_EQ(p.topk, 2048);
    EXPECT_EQ(decode_sweep_skip_reason(p), "") << p.label();
  }
  // way innermost: the two ways of one shape are neighbours.
  EXPECT_EQ(pts[0].way, "gather");
  EXPECT_EQ(pts[1].way, "fused");
  EXPECT_EQ(pts[0].batch, pts[1].batch);
  EXPECT_EQ(pts[0].batch, 2);
  EXPECT_EQ(pts[11].batch, 128);
  EXPECT_EQ(pts[11].next_n, 2);
}

TEST(DecodeSweep, AxesOverrideDefaultsAndAcceptAliases) {
  const auto pts = decode_sweep_points({"batch=1,2,64,128", "s_q=1,2", "h_q=64", "cache=bf16,fp8",
                                        "way=direct,gather,fused", "s_k=4096", "topk=512"});
  EXPECT_EQ(pts.size(), 4u * 2 * 2 * 3);
  for (const auto& p : pts) {
    EXPECT_EQ(p.num_heads, 64);
    EXPECT_EQ(p.s_k, 4096);
    EXPECT_EQ(p.topk, 512);
  }
  const DecodeSweepAxis a = parse_decode_sweep_axis("heads=64,128");
  EXPECT_EQ(a.name, "num_heads");
  EXPECT_EQ(a.values, (std::vector<std::string>{"64", "128"}));
  EXPECT_EQ(pts[0].label(), "batch=1 next_n=1 cache=bf16 num_heads=64 s_k=4096 topk=512 way=direct");
}

TEST(DecodeSweep, BadAxesNameTheTokenAndTheValidValues) {
  expect_error<ConfigError>([] { parse_decode_sweep_axis("bogus=1"); }, {"'bogus'", "batch, next_n, cache, num_heads, s_k, topk, way"});
  expect_error<ConfigError>([] { parse_decode_sweep_axis("batch=1,x"); }, {"'x'", "not an integer"});
  expect_error<ConfigError>([] { parse_decode_sweep_axis("batch=0"); }, {"batch", "0", "1 to 16384"});
  expect_error<ConfigError>([] { parse_decode_sweep_axis("cache=fp16"); }, {"'fp16'", "bf16, fp8"});
  expect_error<ConfigError>([] { parse_decode_sweep_axis("way=fast"); }, {"'fast'", "direct, gather, fused"});
  expect_error<ConfigError>([] { parse_decode_sweep_axis("batch"); }, {"name=v1,v2"});
  expect_error<ConfigError>([] { parse_decode_sweep_axis("batch="); }, {"name=v1,v2"});
  expect_error<ConfigError>([] { parse_decode_sweep_axis("batch=1,,2"); }, {"''"});
  expect_error<ConfigError>([] { decode_sweep_points({"batch=1", "batch=2"}); }, {"given twice"});
}

TEST(DecodeSweep, CellsThatCannotRunAreSkippedWithTheReason) {
  DecodeSweepPoint p;
  p.cache = "fp8", p.way = "direct";
  EXPECT_NE(decode_sweep_skip_reason(p).find("way direct runs the bf16 kernel"), std::string::npos);
  p.cache = "bf16", p.way = "fused";
  EXPECT_NE(decode_sweep_skip_reason(p).find("way fused reads the fp8 cache"), std::string::npos);
  p.way = "gather";
  EXPECT_NE(decode_sweep_skip_reason(p).find("way gather reads the fp8 cache"), std::string::npos);
  p.way = "direct";
  EXPECT_EQ(decode_sweep_skip_reason(p), "");
  p.next_n = 8;
  EXPECT_EQ(decode_sweep_skip_reason(p), "");  // the bf16 cache takes any next_n
  p.cache = "fp8", p.way = "gather";
  EXPECT_NE(decode_sweep_skip_reason(p).find("1 to 4 new tokens"), std::string::npos);
  p.next_n = 4;
  EXPECT_EQ(decode_sweep_skip_reason(p), "");
  p.s_k = 2;
  EXPECT_NE(decode_sweep_skip_reason(p).find("do not fit a context"), std::string::npos);
  p.s_k = int64_t{1} << 27, p.batch = 64, p.next_n = 1;
  EXPECT_NE(decode_sweep_skip_reason(p).find("int32"), std::string::npos);
}

TEST(DecodeSweep, CostModelMatchesFlashMlasOwnTflops) {
  // FlashMLA reports 377 TFLOP/s for batch 64, s_q 1, h_q 128, topk 2048 in 96.9 us (spec 8 counts the same FLOPs).
  DecodeSweepPoint p;
  p.batch = 64, p.next_n = 1, p.num_heads = 128, p.topk = 2048, p.cache = "fp8";
  const DecodeSweepWork w = decode_sweep_work(p, 64 * 2048, 64 * 2048);
  EXPECT_DOUBLE_EQ(w.flops, 2.0 * 128 * 1088 * 64 * 2048);
  EXPECT_NEAR(w.flops / 96.9e-6 / 1e12, 377.0, 0.5);
  const double T = 64, H = 128;
  EXPECT_DOUBLE_EQ(w.bytes, 64.0 * 2048 * 656 + T * H * 576 * 2 + T * 2048 * 4 + T * H * 512 * 2 + T * H * 4);
  p.cache = "bf16";
  EXPECT_DOUBLE_EQ(decode_sweep_work(p, 10, 7).bytes - decode_sweep_work(p, 10, 6).bytes, 1152.0);
  EXPECT_EQ(decode_cache_row_bytes("fp8"), 656);
  EXPECT_EQ(decode_cache_row_bytes("bf16"), 1152);
}

TEST(DecodeSweep, AnchorFileGivesH200FiguresAndNoneElsewhere) {
  const FlashMlaDecodeAnchors a = load_flashmla_decode_anchors(kAnchors, "NVIDIA H200");
  DecodeSweepPoint p;  // defaults: H 128, s_k 32768, topk 2048, fp8
  p.batch = 64, p.next_n = 1;
  EXPECT_DOUBLE_EQ(a.at(p), 96.9);
  p.next_n = 2;
  EXPECT_DOUBLE_EQ(a.at(p), 186.0);
  p.batch = 128, p.next_n = 1;
  EXPECT_DOUBLE_EQ(a.at(p), 187.9);
  p.batch = 2;
  EXPECT_DOUBLE_EQ(a.at(p), 17.9);
  p.batch = 3;
  EXPECT_EQ(a.at(p), 0.0);  // no such cell
  p.batch = 64, p.cache = "bf16";
  EXPECT_EQ(a.at(p), 0.0);  // FlashMLA's figures are for the fp8 cache
  p.cache = "fp8", p.num_heads = 64;
  EXPECT_EQ(a.at(p), 0.0);
  EXPECT_NE(a.source.find("NVIDIA H200"), std::string::npos);
  const FlashMlaDecodeAnchors none = load_flashmla_decode_anchors(kAnchors, "Some Other GPU");
  EXPECT_TRUE(none.cells.empty());
  EXPECT_NE(none.source.find("no FlashMLA decode figures for Some Other GPU"), std::string::npos);
}

TEST(DecodeSweep, BadAnchorFilesNameTheFileAndTheKey) {
  auto write = [](const std::string& name, const std::string& text) {
    const std::string path = dsa::test::scratch_path("decode_anchors_" + name);
    dsa::test::write_text(path, text);
    return path;
  };
  expect_error<FileError>([&] { load_flashmla_decode_anchors(dsa::test::scratch_path("missing.json"), "X"); }, {"missing.json", "does not exist"});
  const std::string bad = write("bad.json", "{ not json");
  expect_error<FileError>([&] { load_flashmla_decode_anchors(bad, "X"); }, {"bad.json", "malformed JSON"});
  const std::string nodev = write("nodev.json", "{\"x\": 1}");
  expect_error<FileError>([&] { load_flashmla_decode_anchors(nodev, "X"); }, {"\"devices\""});
  const std::string nocells = write("nocells.json", R"({"devices": {"X": {"num_heads": 128, "s_k": 1, "topk": 1, "cache": "fp8", "protocol": "p"}}})");
  expect_error<FileError>([&] { load_flashmla_decode_anchors(nocells, "X"); }, {"nocells.json", "\"cells\"", "'X'"});
  const std::string neg = write("neg.json",
                                R"({"devices": {"X": {"num_heads": 128, "s_k": 1, "topk": 1, "cache": "fp8", "protocol": "p",
                                   "cells": [{"batch": 1, "next_n": 1, "us": -3}]}}})");
  expect_error<FileError>([&] { load_flashmla_decode_anchors(neg, "X"); }, {"neg.json", "not a positive time"});
}

TEST(DecodeSweep, TableShowsOursBesideFlashMlaAndDashesWhereUnknown) {
  const std::string t = format_decode_sweep_table(sample_sweep());
  EXPECT_NE(t.find("NVIDIA H200"), std::string::npos) << t;
  EXPECT_NE(t.find("8 GB memset"), std::string::npos) << t;
  EXPECT_NE(t.find("kernels sparse_mla_fp8=new"), std::string::npos) << t;
  // 36.5 GFLOP in 193.8 us = 188 TFLOP/s; FlashMLA's 96.9 us = 377; FlashMLA / ours = 0.50x.
  EXPECT_NE(t.find("| 64 | 1 | fp8 | 128 | 32768 | 2048 | gather | gather + sm90 | 193.8 | 188 |"), std::string::npos) << t;
  EXPECT_NE(t.find("| 1755 | 96.9 | 377 | 0.50x |"), std::string::npos) << t;
  EXPECT_NE(t.find("| - | - | - | - |"), std::string::npos) << t;  // batch 3: no clock, no FlashMLA figure
  EXPECT_NE(t.find("1 cell(s) skipped"), std::string::npos) << t;
  // Every table row has the header's 15 columns.
  for (const std::string& l : lines(t))
    if (l.rfind("|", 0) == 0) EXPECT_EQ(count_char(l, '|'), 16u) << l;
}

TEST(DecodeSweep, JsonAndCsvCarryEveryColumnAndTheSkips) {
  const DecodeSweep s = sample_sweep();
  const nlohmann::json j = nlohmann::json::parse(format_decode_sweep_json(s));
  EXPECT_EQ(j["device"], "NVIDIA H200");
  EXPECT_EQ(j["protocol"], "flashmla");
  EXPECT_EQ(j["kernels"], "sparse_mla_fp8=new");
  ASSERT_EQ(j["rows"].size(), 2u);
  EXPECT_NEAR(j["rows"][0]["flashmla_tflops"].get<double>(), 377.0, 0.5);
  EXPECT_NEAR(j["rows"][0]["tbps"].get<double>(), s.rows[0].bytes / 193.8e-6 / 1e12, 1e-9);
  EXPECT_TRUE(j["rows"][1]["flashmla_us"].is_null());
  EXPECT_TRUE(j["rows"][1]["sm_mhz"].is_null());
  ASSERT_EQ(j["skipped"].size(), 1u);
  EXPECT_EQ(j["skipped"][0]["way"], "direct");
  EXPECT_NE(j["skipped"][0]["reason"].get<std::string>().find("bf16"), std::string::npos);

  const auto ls = lines(format_decode_sweep_csv(s));
  ASSERT_EQ(ls.size(), 3u);
  const size_t cols = count_char(ls[0], ',');
  EXPECT_EQ(cols, 26u);
  for (const std::string& l : ls) EXPECT_EQ(count_char(l, ','), cols) << l;
  EXPECT_NE(ls[1].find(",gather,gather + sm90,193.8,"), std::string::npos) << ls[1];
}

TEST(DecodeSweep, CommandLineRefusesWhatDoesNotApply) {
  expect_rejected("bench --sweep-sparse-mla-decode -a bogus=1", {"axis 'bogus' is not known", "next_n"});
  expect_rejected("bench --sweep-sparse-mla-decode -a way=fast", {"'fast'", "direct, gather, fused"});
  expect_rejected("bench --sweep-sparse-mla-decode --new 4", {"--new does not apply to the sparse MLA decode sweep"});
  expect_rejected("bench --sweep-sparse-mla-decode --sweep-sparse-mla", {"two different sweeps"});
  expect_rejected("bench --sweep-sparse-mla-decode --protocol flashmla --iters 5", {"do not apply with --protocol flashmla"});
  expect_rejected("bench --sweep-sparse-mla-decode --protocol cold", {"protocol 'cold' is not known"});
  expect_rejected("bench --sweep-sparse-mla-decode --backend ref", {"needs the CUDA backend"});
  expect_rejected("bench --anchors-decode x.json", {"--anchors-decode", "--sweep-sparse-mla-decode"});
  expect_rejected("bench --sweep-sparse-mla --kernels new", {"--kernels does not apply to the sparse MLA sweep"});
}

TEST(KernelPicksCli, BadKernelsAreUsageErrorsEverywhere) {
  expect_rejected("bench --kernels fast", {"'fast'", "auto, baseline, new", "(set with --kernels)"});
  expect_rejected("bench --kernels topk=fast", {"pick 'fast'"});
  expect_rejected("bench --kernels mla=new", {"op 'mla'", "sparse_mla_fp8"});
  expect_rejected("bench --backend ref --kernels new", {"--kernels", "needs the CUDA backend"});
  expect_rejected("run --kernels new", {"--kernels", "--backend cuda"});
  expect_rejected("run --backend cuda --kernels sparse_mla_fp8=neww", {"pick 'neww'"});
  const dsa::test::CliResult r = dsa::test::run_dsa("check --kernels bogus");
  EXPECT_NE(r.rc, 0) << r.err;  // without a CUDA build: no device; with one: the bad token
  EXPECT_TRUE(r.err.find("bogus") != std::string::npos || r.err.find("CUDA") != std::string::npos) << r.err;
}
