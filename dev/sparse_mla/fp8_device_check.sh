#!/bin/bash
# Issue 18 device check (helper wt-a, not run in its session): build, the fp8 sparse MLA tests, the bench,
# compute-sanitizer memcheck on the small cases, the other sparse MLA tests; summary last. Usage from the
# repository root on the device: bash dev/sparse_mla/fp8_device_check.sh <deps dir>; writes logs to $OUT.
D=$1
START=$(date +%s)
left() { echo $(( 228 - ($(date +%s) - START) )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt 2>&1
cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSA_BUILD_PYTHON=OFF -DDSA_DEPS_DIR=$D > $OUT/cmake.log 2>&1
timeout $(left) cmake --build /tmp/b -j16 --target dsa_gpu_tests dsa > $OUT/build.log 2>&1
BRC=$?
echo "build rc $BRC at $(( $(date +%s) - START )) s" > $OUT/summary.txt
grep -i "spill" $OUT/build.log | grep -i "sparse_mla" | head -5 >> $OUT/summary.txt
BIN=/tmp/b/tests/dsa_gpu_tests
if [ $BRC -eq 0 ]; then
  T=$(left); [ $T -gt 70 ] && T=70
  timeout $T $BIN --gtest_filter='SparseMlaFp8*' > $OUT/fp8.log 2>&1; echo "fp8 tests rc $? at $(( $(date +%s) - START )) s" >> $OUT/summary.txt
  T=$(left); [ $T -gt 40 ] && T=40
  timeout $T $BIN --gtest_filter='SparseMlaFp8Bench.*' --gtest_also_run_disabled_tests > $OUT/bench.log 2>&1; echo "bench rc $? at $(( $(date +%s) - START )) s" >> $OUT/summary.txt
  T=$(left); [ $T -gt 60 ] && T=60
  timeout $T compute-sanitizer --tool memcheck $BIN --gtest_filter='SparseMlaFp8.*' > $OUT/san.log 2>&1; echo "sanitizer rc $? at $(( $(date +%s) - START )) s" >> $OUT/summary.txt
  T=$(left)
  timeout $T $BIN --gtest_filter='SparseMla*-SparseMlaFp8*' > $OUT/mla.log 2>&1; echo "other SparseMla rc $? at $(( $(date +%s) - START )) s" >> $OUT/summary.txt
fi
cat $OUT/gpu.txt
cat $OUT/summary.txt
[ $BRC -ne 0 ] && grep -B2 -A10 -m3 "error" $OUT/build.log | head -60
for f in fp8 mla san; do [ -f $OUT/$f.log ] && { echo "== $f"; grep -E "^\[  FAILED|^\[  PASSED|^\[  SKIPPED|tests ran|ERROR SUMMARY|Failure|differs|Expected|Which is|actual" $OUT/$f.log | head -40; }; done
[ -f $OUT/bench.log ] && grep "\[bench\]\|SKIPPED\|FAILED" $OUT/bench.log
exit 0
