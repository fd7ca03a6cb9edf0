#!/usr/bin/env bash
# Profiles one launch of the sparse MLA kernel (default: the library kernel,
# H = 128, s_kv = 8192) with ncu and writes, under $OUT, the details page and
# the per-SASS-instruction stall samples (source.csv). From the repo root:
#   dev/sparse_mla/ncu.sh [KERNEL_REGEX]
# e.g. 'sparse_mla_fwd_kernel<.int.2, .int.2, .bool.0, .bool.0>' for the math-only
# variant (template arguments: head groups, kDiag, kReleaseFirst, kEarlyMaxB).
set -e
re=${1:-'sparse_mla_fwd_kernel<.int.2, .int.0, .bool.0, .bool.0>'}
deps=.device-deps
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -lineinfo --expt-relaxed-constexpr ${DEV_FLAGS:-} \
  -isystem $deps/include -DFMT_HEADER_ONLY -Iinclude -Isrc -Idev/sparse_mla dev/sparse_mla/sparse_mla_dev.cu -o /tmp/dev
cd /tmp
SKV=${SKV:-8192} ncu --clock-control none --kernel-name-base demangled --kernel-name regex:"$re" --launch-skip 3 --launch-count 1 \
  --section WarpStateStats --section SourceCounters --section SpeedOfLight --section InstructionStats \
  --import-source yes -o "$OUT/prof" /tmp/dev 1 2>&1 | tail -5 || true
ncu --import "$OUT/prof.ncu-rep" --page details > "$OUT/details.txt" 2>&1 || true
ncu --import "$OUT/prof.ncu-rep" --page source --csv --print-source sass > "$OUT/source.csv" 2>&1 || true
rm -f "$OUT/prof.ncu-rep"
grep -E "Duration|SM Frequency|Executed Ipc|Issue Slots" "$OUT/details.txt"
