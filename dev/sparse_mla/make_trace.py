#!/usr/bin/env python3
"""Writes a timeline-instrumented copy of the library's sparse MLA kernel.

  python3 dev/sparse_mla/make_trace.py [kernel.cuh] > /tmp/trace_kernel.cuh

The copy lives in namespace sm90_sparse_mla_trace. For a few sampled CTAs
(trace_slot) the leader thread of each warpgroup writes clock64() at fixed
points of every pair (indexed by the CTA's global pair count) and of every
item into g_trace; dev/trace.cuh launches it from the dev bench and prints
the mean timeline of a pair and of the switch from one item to the next.
Anchors are exact strings of the kernel source: the script fails loudly
when one no longer matches.
"""
import re
import sys

path = sys.argv[1] if len(sys.argv) > 1 else 'src/cuda/sparse_mla/sm90/sm90_bf16_sparse_mla.cuh'
src = open(path).read()


def sub(old, new, count=1):
    """Replaces `old` (any run of whitespace in it matches any run) by `new`."""
    global src
    pattern = r'\s+'.join(re.escape(part) for part in old.split())
    if old[:1].isspace():
        pattern = r'(?<=\n)[ \t]*' + pattern if old.startswith(' ') else r'\s+' + pattern
    n = len(re.findall(pattern, src))
    if n != count:
        sys.exit(f'make_trace.py: anchor found {n} times, expected {count}: {old!r}')
    src = re.sub(pattern, lambda m: new, src)


def after(anchor, ev, count=1):
    sub(anchor, anchor + f'\n      TR({ev});', count)


def before(anchor, ev, count=1):
    sub(anchor, f'TR({ev});\n      ' + anchor, count)


sub('namespace dsa::cuda::sm90_sparse_mla {', '''namespace dsa::cuda::sm90_sparse_mla_trace {
using namespace dsa::cuda::sm90_sparse_mla;
constexpr int kTraceEv = 12, kTraceMaxPairs = 64, kTraceItemEv = 8, kTraceMaxItems = 8, kTraceSamples = 8;
// [0] start, [1..7] spare, then pairs [3 roles][kTraceMaxPairs][kTraceEv], then items [kTraceMaxItems][kTraceItemEv]
constexpr int kTracePairs = 8, kTraceItems = kTracePairs + 3 * kTraceMaxPairs * kTraceEv;
constexpr int kTraceStride = kTraceItems + kTraceMaxItems * kTraceItemEv;
__device__ unsigned long long g_trace[kTraceSamples * kTraceStride];
__device__ __forceinline__ int trace_slot(unsigned b) {
  constexpr unsigned kS[kTraceSamples] = {10, 11, 50, 51, 90, 91, 120, 121};
#pragma unroll
  for (int i = 0; i < kTraceSamples; ++i)
    if (b == kS[i]) return i;
  return -1;
}
#define TR(ev)                                                                 \\
  do {                                                                         \\
    if (trr != nullptr && gj < kTraceMaxPairs) trr[gj * kTraceEv + (ev)] = clock64(); \\
  } while (0)
#define TI(ev, value)                                                          \\
  do {                                                                         \\
    if (tri != nullptr && kk < kTraceMaxItems) tri[kk * kTraceItemEv + (ev)] = (value); \\
  } while (0)''', 1)
sub('}  // namespace dsa::cuda::sm90_sparse_mla', '#undef TR\n#undef TI\n}  // namespace dsa::cuda::sm90_sparse_mla_trace')
sub('  const uint32_t base = smem_addr(smem);\n', '''  const uint32_t base = smem_addr(smem);
  unsigned long long* tr = nullptr;
  if (const int s_ = trace_slot(blockIdx.x); s_ >= 0) tr = g_trace + s_ * kTraceStride;
  if (tr != nullptr && threadIdx.x == 0) tr[0] = clock64();
''')
# producer
sub('    uint32_t gp = 0;\n    int kk = 0;\n    for (uint32_t u = blockIdx.x;',
    '    unsigned long long* trr = (tr != nullptr && ptid == 0) ? tr + kTracePairs + 2 * kTraceMaxPairs * kTraceEv : nullptr;\n'
    '    unsigned long long* tri = (tr != nullptr && ptid == 0) ? tr + kTraceItems : nullptr;\n'
    '    uint32_t gp = 0;\n    int kk = 0;\n    for (uint32_t u = blockIdx.x;')
after('named_barrier_sync(kBarScan, 128);', 0)
sub('      named_barrier_sync(kBarScan, 128);\n      TR(0);', '      named_barrier_sync(kBarScan, 128);\n      TI(3, clock64());')
after('if (gj > 0) mbar_wait(free_bar(0, 0), parity);', 1)
after('if (gj > 0) mbar_wait(free_bar(1, 1), parity);', 2)
after('if (gj > 0) mbar_wait(free_bar(0, 1), parity);', 3)
after('if (gj > 0) mbar_wait(free_bar(1, 0), parity);', 4)
after('cp_async_arrive(ready_bar(1, 0));', 5)
sub('        s_item_pairs[kk & 1] = num_pairs;\n        mbar_arrive(q_ready);\n      }\n',
    '        s_item_pairs[kk & 1] = num_pairs;\n        mbar_arrive(q_ready);\n      }\n      TI(5, clock64());\n')
sub('      for (int j = 0; j < num_pairs; ++j) issue_pair(j);\n',
    '      for (int j = 0; j < num_pairs; ++j) {\n        issue_pair(j);\n        if (j == 0) TI(4, clock64());\n      }\n')
sub('      gp += num_pairs;\n    }\n    cp_async_wait_all();', '      TI(6, clock64());\n      gp += num_pairs;\n    }\n    cp_async_wait_all();')
# consumers
sub('  const int w = wg;\n',
    '  const int w = wg;\n'
    '  unsigned long long* trr = (tr != nullptr && (tid & 127) == 0) ? tr + kTracePairs + w * kTraceMaxPairs * kTraceEv : nullptr;\n'
    '  unsigned long long* tri = (tr != nullptr && tid == 0) ? tr + kTraceItems : nullptr;\n')
sub('const int num_pairs = start_item(kk);\n', 'const int num_pairs = start_item(kk);\n    TI(0, clock64());\n    TI(7, gp);\n', 3)
sub('''  auto finish = [&](uint32_t item, int kk, int num_pairs_of_item, int part, uint32_t u) {
''', '''  auto finish = [&](uint32_t item, int kk, int num_pairs_of_item, int part, uint32_t u) {
    TI(1, clock64());
''')
sub('''    if (num_pairs_of_item == 0) mbar_arrive(q_free);
  };''', '''    if (num_pairs_of_item == 0) mbar_arrive(q_free);
    TI(2, clock64());
  };''')
# WG0
before('mask_and_max(bits, mx0, mx1);\n      const float mn0 = fmaxf(rm0, mx0)', 0)
after('named_barrier_arrive(kBarMaxA, 256);', 1)
sub('      pv_own();\n      // WG1', '      pv_own();\n      TR(2);\n      // WG1')
after('named_barrier_sync(kBarMaxB, 256);', 3)
after('named_barrier_arrive(kBarPA, 256);', 4)
after("wgmma_wait<0>();  // own P V done: buffer 0's half L is free", 5)
after('named_barrier_sync(kBarPB, 256);', 6)
after('pv_other(p1_addr);', 7)
sub("            issue_qk_first((gj + 1) & 1);\n            wgmma_wait<1>();  // P_B V_B done: buffer 1's half L is free\n"
    "            mbar_arrive(free_bar(1, 0));\n          }\n          issue_qk_second((gj + 1) & 1);\n          bits = valid_bits_of(gj + 1);\n",
    "            issue_qk_first((gj + 1) & 1);\n            TR(8);\n            wgmma_wait<1>();  // P_B V_B done: buffer 1's half L is free\n            TR(9);\n"
    "            mbar_arrive(free_bar(1, 0));\n          }\n          issue_qk_second((gj + 1) & 1);\n          TR(10);\n          bits = valid_bits_of(gj + 1);\n          TR(11);\n")
# WG1
before('mask_and_max(bits, mx0, mx1);\n      named_barrier_sync(kBarMaxA, 256);', 0)
after('named_barrier_sync(kBarMaxA, 256);', 1)
after('named_barrier_arrive(kBarMaxB, 256);', 2)
sub('      pv_own();\n      store_p(p1_addr', '      pv_own();\n      TR(3);\n      store_p(p1_addr')
after('store_p(p1_addr, std::false_type{}, 1.f, 1.f);', 4)
after('named_barrier_sync(kBarPA, 256);', 5)
after('pv_other(p0_addr);', 6)
after("wgmma_wait<1>();  // own P V done: buffer 1's half R is free", 7)
after('wgmma_wait<0>();  // P_A V_A done: buffer 0\'s half R (and P_A) is free', 8)
sub("        issue_qk_first((gj + 1) & 1);\n        issue_qk_second((gj + 1) & 1);\n",
    "        issue_qk_first((gj + 1) & 1);\n        TR(9);\n        issue_qk_second((gj + 1) & 1);\n        TR(10);\n")
sub('void launch_sparse_mla_sm90(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx) {',
    'void launch_sparse_mla_sm90_unused(const SparseMlaParams& run, const LaunchPlan& plan, const DeviceContext& ctx) {')
# The library's combine kernel is visible here too (using-directive): name the copy's.
sub('sparse_mla_combine_kernel<kHeadGroups, kDense><<<', '::dsa::cuda::sm90_sparse_mla_trace::sparse_mla_combine_kernel<kHeadGroups, kDense><<<')
sys.stdout.write(src)
