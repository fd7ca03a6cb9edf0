// --kernels text (dsa/kernel_picks.h): every form parses to the intended
// picks, every bad token is named in the error with the valid values, and
// the printed form parses back to the same picks.
#include <gtest/gtest.h>

#include "dsa/error.h"
#include "dsa/kernel_picks.h"
#include "expect_error.h"

using namespace dsa;
using namespace dsa::cuda;
using dsa::test::expect_error;

namespace {

bool same(const KernelPicks& a, const KernelPicks& b) {
  return a.indexer_prefill == b.indexer_prefill && a.indexer_decode == b.indexer_decode && a.topk == b.topk &&
         a.sparse_mla_fp8 == b.sparse_mla_fp8;
}

KernelPicks all(KernelPick k) {
  KernelPicks p;
  p.indexer_prefill = p.indexer_decode = p.topk = p.sparse_mla_fp8 = k;
  return p;
}

}  // namespace

TEST(KernelPicks, WholeWordsSetEveryOp) {
  EXPECT_TRUE(same(parse_kernel_picks("auto"), all(KernelPick::kAuto)));
  EXPECT_TRUE(same(parse_kernel_picks("new"), all(KernelPick::kNew)));
  EXPECT_TRUE(same(parse_kernel_picks("baseline"), all(KernelPick::kBaseline)));
  EXPECT_TRUE(same(parse_kernel_picks(" new "), all(KernelPick::kNew)));
}

TEST(KernelPicks, ListSetsNamedOpsAndLeavesTheRestAuto) {
  const KernelPicks p = parse_kernel_picks("sparse_mla_fp8=new,topk=baseline");
  EXPECT_EQ(p.sparse_mla_fp8, KernelPick::kNew);
  EXPECT_EQ(p.topk, KernelPick::kBaseline);
  EXPECT_EQ(p.indexer_prefill, KernelPick::kAuto);
  EXPECT_EQ(p.indexer_decode, KernelPick::kAuto);
  const KernelPicks q = parse_kernel_picks("indexer_prefill=new, indexer_decode = baseline");
  EXPECT_EQ(q.indexer_prefill, KernelPick::kNew);
  EXPECT_EQ(q.indexer_decode, KernelPick::kBaseline);
}

TEST(KernelPicks, FormatRoundTrips) {
  EXPECT_EQ(format_kernel_picks(KernelPicks{}), "auto");
  EXPECT_EQ(format_kernel_picks(all(KernelPick::kNew)), "new");
  EXPECT_EQ(format_kernel_picks(all(KernelPick::kBaseline)), "baseline");
  const KernelPicks p = parse_kernel_picks("topk=new");
  EXPECT_EQ(format_kernel_picks(p), "indexer_prefill=auto,indexer_decode=auto,topk=new,sparse_mla_fp8=auto");
  EXPECT_TRUE(same(parse_kernel_picks(format_kernel_picks(p)), p));
  for (KernelPick a : {KernelPick::kAuto, KernelPick::kBaseline, KernelPick::kNew}) {
    for (KernelPick b : {KernelPick::kAuto, KernelPick::kBaseline, KernelPick::kNew}) {
      KernelPicks x;
      x.indexer_decode = a;
      x.sparse_mla_fp8 = b;
      EXPECT_TRUE(same(parse_kernel_picks(format_kernel_picks(x)), x)) << format_kernel_picks(x);
    }
  }
}

TEST(KernelPicks, ErrorsNameTheTokenAndTheValidValues) {
  expect_error<ConfigError>([] { parse_kernel_picks("fast"); }, {"'fast'", "auto, baseline, new", "indexer_prefill", "sparse_mla_fp8"});
  expect_error<ConfigError>([] { parse_kernel_picks("topk=fast"); }, {"'fast'", "topk=fast", "auto, baseline, new"});
  expect_error<ConfigError>([] { parse_kernel_picks("mla=new"); },
                            {"'mla'", "indexer_prefill, indexer_decode, topk, sparse_mla_fp8"});
  expect_error<ConfigError>([] { parse_kernel_picks("topk=new,topk=auto"); }, {"'topk'", "twice"});
  expect_error<ConfigError>([] { parse_kernel_picks("topk=new,,indexer_decode=new"); }, {"empty item"});
  expect_error<ConfigError>([] { parse_kernel_picks("topk=new,"); }, {"empty item"});
  expect_error<ConfigError>([] { parse_kernel_picks(""); }, {"empty", "auto, baseline, new"});
  expect_error<ConfigError>([] { parse_kernel_picks("topk="); }, {"pick ''", "auto, baseline, new"});
  try {
    parse_kernel_picks("nope");
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.parameter(), "kernels");  // the CLI adds "(set with --kernels)"
  }
}
