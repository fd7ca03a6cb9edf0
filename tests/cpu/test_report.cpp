// Benchmark reports: derived rates and "% of peak" against hand-computed
// values, the layer total, empty % columns without peaks, JSON that parses
// back, CSV with a consistent column count, and the work model of spec 8.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "dsa/batch.h"
#include "dsa/bench.h"
#include "dsa/cache.h"
#include "dsa/error.h"

using namespace dsa;

namespace {

// Two stages with round numbers: 2e12 FLOPs in 10 ms = 200 TFLOP/s; 3e10
// bytes in 10 ms = 3000 GB/s; 1.5e9 bytes in 2 ms = 750 GB/s.
BenchResult sample(bool peaks) {
  BenchResult r;
  r.backend = "cuda";
  r.device = "NVIDIA H100 80GB HBM3, sm_90";
  r.requests = uniform_requests(2, 1024, 1);
  r.num_tokens = 2;
  r.output_shape = {2, 16384};
  StageResult a;
  a.name = "q_b_proj";
  a.median_ms = 10, a.min_ms = 9, a.max_ms = 11, a.flops = 2e12, a.bytes = 3e10;
  StageResult b;
  b.name = "cache_append";
  b.median_ms = 2, b.min_ms = 2, b.max_ms = 3, b.flops = 0, b.bytes = 1.5e9;
  r.stages = {a, b};
  r.layer_ms = 16;  // measured as one region: not the sum of the stages
  if (peaks) r.peak_tflops = 790, r.peak_gbps = 3000;
  return r;
}

std::vector<std::string> lines(const std::string& s) {
  std::vector<std::string> v;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) v.push_back(l);
  return v;
}

std::string line_starting(const std::string& text, const std::string& prefix) {
  for (const auto& l : lines(text))
    if (l.rfind(prefix, 0) == 0) return l;
  return "";
}

std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> out;
  std::string cur;
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') cur += '"', ++i;
      else if (c == '"') quoted = false;
      else cur += c;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.push_back(cur), cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

}  // namespace

TEST(Report, TableRatesAndPercentOfPeak) {
  const std::string t = format_table(sample(true));
  const std::string q = line_starting(t, "q_b_proj");
  ASSERT_FALSE(q.empty()) << t;
  EXPECT_NE(q.find("10.0000"), std::string::npos) << q;
  EXPECT_NE(q.find(" 200 "), std::string::npos) << q;   // TFLOP/s
  EXPECT_NE(q.find(" 3000 "), std::string::npos) << q;  // GB/s
  EXPECT_NE(q.find("25.3"), std::string::npos) << q;    // 200 / 790
  EXPECT_NE(q.find("100.0"), std::string::npos) << q;   // 3000 / 3000
  const std::string c = line_starting(t, "cache_append");
  EXPECT_NE(c.find(" 750 "), std::string::npos) << c;
  EXPECT_NE(c.find("25.0"), std::string::npos) << c;  // 750 / 3000
  // Layer total: 16 ms, 2e12 FLOPs -> 125 TFLOP/s (15.8 %), 3.15e10 bytes -> 1969 GB/s (65.6 %).
  const std::string l = line_starting(t, "layer total");
  ASSERT_FALSE(l.empty()) << t;
  EXPECT_NE(l.find("16.0000"), std::string::npos) << l;
  EXPECT_NE(l.find(" 125 "), std::string::npos) << l;
  EXPECT_NE(l.find("15.8"), std::string::npos) << l;
  EXPECT_NE(l.find("1969"), std::string::npos) << l;
  EXPECT_NE(l.find("65.6"), std::string::npos) << l;
  EXPECT_NE(t.find("sum to 12.0000 ms"), std::string::npos) << t;
  EXPECT_NE(t.find("output [2, 16384]"), std::string::npos) << t;
  EXPECT_NE(t.find("2x1024:1"), std::string::npos) << t;
  for (const char* col : {"stage", "median ms", "TFLOP/s", "GB/s", "% peak FL", "% peak BW"}) EXPECT_NE(t.find(col), std::string::npos) << col;
}

TEST(Report, NoPeaksLeavesPercentColumnsEmpty) {
  const std::string t = format_table(sample(false));
  const std::string q = line_starting(t, "q_b_proj");
  EXPECT_EQ(q.find("25.3"), std::string::npos) << q;
  EXPECT_EQ(q.find("100.0"), std::string::npos) << q;
  EXPECT_NE(q.find(" 200 "), std::string::npos) << q;
  EXPECT_EQ(t.find("% of peak against"), std::string::npos);
  const std::string j = format_json(sample(false));
  const auto parsed = nlohmann::json::parse(j);
  EXPECT_TRUE(parsed["stages"][0]["pct_peak_compute"].is_null());
  EXPECT_TRUE(parsed["peak_tflops"].is_null());
}

TEST(Report, JsonParsesBack) {
  const auto j = nlohmann::json::parse(format_json(sample(true)));
  EXPECT_EQ(j["backend"], "cuda");
  EXPECT_EQ(j["config"]["num_heads"], 128);
  EXPECT_EQ(j["requests"].size(), 2u);
  EXPECT_EQ(j["requests"][1]["cached"], 1024);
  EXPECT_EQ(j["output_shape"], (std::vector<int64_t>{2, 16384}));
  ASSERT_EQ(j["stages"].size(), 2u);
  EXPECT_EQ(j["stages"][0]["name"], "q_b_proj");
  EXPECT_DOUBLE_EQ(j["stages"][0]["tflops"].get<double>(), 200.0);
  EXPECT_DOUBLE_EQ(j["stages"][0]["gbps"].get<double>(), 3000.0);
  EXPECT_NEAR(j["stages"][0]["pct_peak_compute"].get<double>(), 100.0 * 200 / 790, 1e-9);
  EXPECT_TRUE(j["stages"][1]["tflops"].is_null());  // no counted FLOPs
  EXPECT_DOUBLE_EQ(j["layer"]["median_ms"].get<double>(), 16.0);
  EXPECT_DOUBLE_EQ(j["layer"]["flops"].get<double>(), 2e12);
  EXPECT_DOUBLE_EQ(j["layer"]["bytes"].get<double>(), 3.15e10);
}

TEST(Report, CsvHasOneRowPerStageAndTheLayer) {
  const std::string csv = format_csv(sample(true));
  const auto ls = lines(csv);
  ASSERT_EQ(ls.size(), 4u) << csv;  // header, 2 stages, layer
  const auto header = split_csv(ls[0]);
  for (const auto& l : ls) EXPECT_EQ(split_csv(l).size(), header.size()) << l;
  const auto row = split_csv(ls[1]);
  auto col = [&](const std::string& name) {
    for (size_t i = 0; i < header.size(); ++i)
      if (header[i] == name) return row[i];
    ADD_FAILURE() << "no column " << name;
    return std::string();
  };
  EXPECT_EQ(col("device"), "NVIDIA H100 80GB HBM3, sm_90");  // quoted: it holds a comma
  EXPECT_EQ(col("stage"), "q_b_proj");
  EXPECT_EQ(col("requests"), "2x1024:1");
  EXPECT_EQ(std::stod(col("tflops")), 200.0);
  EXPECT_EQ(split_csv(ls[3])[7], "layer");
  EXPECT_EQ(split_csv(ls[2])[13], "");  // cache_append: no TFLOP/s
  EXPECT_EQ(lines(format_csv(sample(true), false)).size(), 3u);
}

// Two sweep cells: 2e12 FLOPs in 4 ms = 500 TFLOP/s against FlashMLA's 5 ms
// (400 TFLOP/s, 1.25x); the second cell's clock was not measured.
SparseMlaSweep sweep_sample() {
  SparseMlaSweep s;
  s.device = "NVIDIA H100 80GB HBM3, sm_90";
  s.kernel = "sm90";
  s.tokens = 4096, s.topk = 2048, s.d_qk = 576, s.d_v = 512, s.warmup = 3, s.iters = 20;
  s.peak_tflops = 800;
  SparseMlaSweepRow a;
  a.num_heads = 128, a.s_kv = 8192, a.median_ms = 4, a.min_ms = 3.9, a.max_ms = 4.2, a.flops = 2e12, a.sm_mhz = 1650,
  a.flashmla_ms = 5, a.mean_ms = 4.05, a.warmup = 3, a.runs = 20;
  SparseMlaSweepRow b = a;
  b.num_heads = 64, b.s_kv = 32768, b.median_ms = 2, b.min_ms = 1.9, b.max_ms = 2.1, b.flops = 1e12, b.sm_mhz = 0,
  b.flashmla_ms = 1.5;
  s.rows = {a, b};
  return s;
}

TEST(Report, SweepTableHasTheRatesAndTheClock) {
  const std::string t = format_sweep_table(sweep_sample());
  EXPECT_NE(t.find("on NVIDIA H100 80GB HBM3, sm_90: T = 4096, topk = 2048"), std::string::npos) << t;
  EXPECT_NE(t.find("| SM MHz |"), std::string::npos) << t;
  EXPECT_EQ(line_starting(t, "| 128 | 8192 "), "| 128 | 8192 | 4.000 | 500 | 62.5% | 1650 | 5.00 | 400 | 1.25x |") << t;
  EXPECT_EQ(line_starting(t, "| 64 | 32768 "), "| 64 | 32768 | 2.000 | 500 | 62.5% | - | 1.50 | 667 | 0.75x |") << t;
  EXPECT_NE(t.find("2 * H * 1088 * valid indices"), std::string::npos) << t;
  EXPECT_NE(t.find("median of 20 back-to-back runs after 3 warm-up, L2 not cleared"), std::string::npos) << t;
}

TEST(Report, SweepTableNamesTheFlashMlaProtocol) {
  SparseMlaSweep s = sweep_sample();
  s.protocol = "flashmla";
  const std::string t = format_sweep_table(s);
  EXPECT_NE(t.find("0.2 s idle per cell, then triton.testing.do_bench(warmup=10 ms, rep=20 ms)"), std::string::npos) << t;
  EXPECT_NE(t.find("L2 cleared by a 256 MB memset before each timed run"), std::string::npos) << t;
  EXPECT_EQ(t.find("back-to-back"), std::string::npos) << t;
  const auto j = nlohmann::json::parse(format_sweep_json(s));
  EXPECT_EQ(j["protocol"], "flashmla");
}

TEST(Report, SweepJsonParsesBack) {
  const auto j = nlohmann::json::parse(format_sweep_json(sweep_sample()));
  EXPECT_EQ(j["kernel"], "sm90");
  EXPECT_EQ(j["tokens"], 4096);
  ASSERT_EQ(j["rows"].size(), 2u);
  EXPECT_EQ(j["rows"][0]["num_heads"], 128);
  EXPECT_EQ(j["rows"][0]["s_kv"], 8192);
  EXPECT_DOUBLE_EQ(j["rows"][0]["tflops"].get<double>(), 500.0);
  EXPECT_DOUBLE_EQ(j["rows"][0]["pct_peak"].get<double>(), 62.5);
  EXPECT_DOUBLE_EQ(j["rows"][0]["sm_mhz"].get<double>(), 1650.0);
  EXPECT_DOUBLE_EQ(j["rows"][0]["flashmla_over_ours"].get<double>(), 1.25);
  EXPECT_DOUBLE_EQ(j["rows"][0]["min_ms"].get<double>(), 3.9);
  EXPECT_DOUBLE_EQ(j["rows"][0]["mean_ms"].get<double>(), 4.05);
  EXPECT_EQ(j["rows"][0]["runs"], 20);
  EXPECT_EQ(j["rows"][0]["warmup"], 3);
  EXPECT_EQ(j["protocol"], "sustained");
  EXPECT_TRUE(j["rows"][1]["sm_mhz"].is_null());
  EXPECT_DOUBLE_EQ(j["rows"][1]["flashmla_over_ours"].get<double>(), 0.75);
}

TEST(Report, SweepCsvHasOneRowPerCell) {
  const auto ls = lines(format_sweep_csv(sweep_sample()));
  ASSERT_EQ(ls.size(), 3u);
  const auto header = split_csv(ls[0]);
  for (const auto& l : ls) EXPECT_EQ(split_csv(l).size(), header.size()) << l;
  auto col = [&](size_t r, const std::string& name) {
    const auto row = split_csv(ls[r]);
    for (size_t i = 0; i < header.size(); ++i)
      if (header[i] == name) return row[i];
    ADD_FAILURE() << "no column " << name;
    return std::string();
  };
  EXPECT_EQ(col(1, "device"), "NVIDIA H100 80GB HBM3, sm_90");
  EXPECT_EQ(col(1, "num_heads"), "128");
  EXPECT_EQ(std::stod(col(1, "tflops")), 500.0);
  EXPECT_EQ(std::stod(col(1, "sm_mhz")), 1650.0);
  EXPECT_EQ(col(2, "sm_mhz"), "");
  EXPECT_EQ(col(1, "protocol"), "sustained");
  EXPECT_EQ(std::stod(col(1, "mean_ms")), 4.05);
  EXPECT_EQ(col(1, "runs"), "20");
  EXPECT_EQ(std::stod(col(2, "flashmla_over_ours")), 0.75);
}

TEST(Report, DescribeRequests) {
  EXPECT_EQ(describe_requests(uniform_requests(64, 32768, 1)), "64x32768:1");
  EXPECT_EQ(describe_requests(parse_request_list("0:4096,32768:1")), "0:4096,32768:1");
}

// The work model against spec section 8 for a decode step, computed by hand.
TEST(Report, StageWorkFollowsSpecSection8) {
  CacheConfig cc;
  cc.num_blocks = 64;
  CacheManager m(cc);
  const std::vector<StepRequest> step = {{0, 3000, 1}, {1, 99, 2}};
  reserve_step(m, step);
  const BatchMetadata md = build_batch_metadata(m, step);
  LayerConfig c;
  const double T = 3;
  EXPECT_EQ(stage_work(c, md, "q_a_proj", 0, 0).flops, 2 * T * 1536 * 7168);
  EXPECT_EQ(stage_work(c, md, "q_b_proj", 0, 0).flops, 2 * T * 128 * 192 * 1536);
  // Indexer: 2 * 64 * 128 per visible key; visible keys 3001 + 100 + 101.
  EXPECT_EQ(md.total_visible_keys(), 3001 + 100 + 101);
  EXPECT_EQ(stage_work(c, md, "indexer_logits", 0, 0).flops, 2.0 * 64 * 128 * 3202);
  // Sparse attention: 2 * H * (576 + 512) per valid index.
  const double valid = 2048 + 100 + 101;
  EXPECT_EQ(stage_work(c, md, "sparse_mla", 2000, valid).flops, 2.0 * 128 * 1088 * valid);
  // Its bytes grow by one 1152-byte row per distinct row read.
  EXPECT_EQ(stage_work(c, md, "sparse_mla", 2001, valid).bytes - stage_work(c, md, "sparse_mla", 2000, valid).bytes, 1152.0);
  EXPECT_EQ(stage_work(c, md, "cache_append", 0, 0).flops, 0.0);
  EXPECT_GT(stage_work(c, md, "cache_append", 0, 0).bytes, 0.0);
  for (const auto& n : stage_names()) EXPECT_NO_THROW(stage_work(c, md, n, 1, 1)) << n;
  try {
    stage_work(c, md, "attention", 0, 0);
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("'attention' is not a stage of the layer"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("sparse_mla"), std::string::npos);
  }
}

// FlashMLA's figures come from the anchor file, per card and protocol; an
// unknown card or protocol has none, and the table shows "-" for them.
TEST(Anchors, FiguresAreReadPerCardAndProtocol) {
  const std::string path = std::string(DSA_TEST_DATA_DIR) + "/flashmla_anchors_sample.json";
  const FlashMlaAnchors h200 = load_flashmla_anchors(path, "NVIDIA H200", "sustained");
  EXPECT_EQ(h200.at(128, 4096), 3.619);
  EXPECT_EQ(h200.at(64, 32768), 1.890);
  EXPECT_EQ(h200.at(64, 1000), 0.0);
  EXPECT_NE(h200.source.find("NVIDIA H200"), std::string::npos) << h200.source;
  // FlashMLA's own protocol (do_bench) maps to the file's "dobench" figures.
  EXPECT_EQ(load_flashmla_anchors(path, "NVIDIA H200", "flashmla").at(64, 8192), 1.771);
  EXPECT_EQ(load_flashmla_anchors(path, "NVIDIA H100 80GB HBM3", "sustained").at(128, 8192), 3.88);
  // The H100 entry has no do_bench figures; an unknown card has none at all.
  const FlashMlaAnchors none = load_flashmla_anchors(path, "NVIDIA H100 80GB HBM3", "flashmla");
  EXPECT_EQ(none.at(128, 8192), 0.0);
  EXPECT_NE(none.source.find("no FlashMLA figures"), std::string::npos) << none.source;
  EXPECT_EQ(load_flashmla_anchors(path, "NVIDIA B200", "sustained").at(128, 8192), 0.0);
  try {
    load_flashmla_anchors(path, "Broken Card", "sustained");
    ADD_FAILURE() << "expected FileError";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("Broken Card"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_flashmla_anchors(path + ".missing", "NVIDIA H200", "sustained"), FileError);
  EXPECT_THROW(load_flashmla_anchors(DSA_TEST_DATA_DIR, "NVIDIA H200", "sustained"), FileError);
}

TEST(Anchors, CellsWithoutAFigureShowNone) {
  SparseMlaSweep s = sweep_sample();
  s.rows[1].flashmla_ms = 0;
  s.flashmla_source = "no FlashMLA figures for NVIDIA B200 in anchors.json";
  const std::string t = format_sweep_table(s);
  EXPECT_EQ(line_starting(t, "| 64 | 32768 "), "| 64 | 32768 | 2.000 | 500 | 62.5% | - | - | - | - |") << t;
  EXPECT_NE(t.find("no FlashMLA figures for NVIDIA B200"), std::string::npos) << t;
  const auto j = nlohmann::json::parse(format_sweep_json(s));
  EXPECT_TRUE(j["rows"][1]["flashmla_ms"].is_null());
  EXPECT_TRUE(j["rows"][1]["flashmla_over_ours"].is_null());
}
