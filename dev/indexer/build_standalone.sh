#!/usr/bin/env bash
# Builds the indexer-logits and top-k GPU tests on their own (nvcc + g++, no
# CMake), so they can be compiled and run on the GPU machine while other parts
# of src/cuda are being edited. Usage (repo root):
#   dev/indexer/build_standalone.sh OUTDIR [DEPS_DIR]
# DEPS_DIR: .device-deps (GPU machine); empty: system GoogleTest / fmt / json.
set -euo pipefail
out=${1:?output folder}
deps=${2:-}
mkdir -p "$out"
jobs=${JOBS:-$(nproc)}
inc=(-Iinclude -Isrc)
gtest_objs=()
if [[ -n "$deps" ]]; then
  inc+=(-isystem "$deps/include" -isystem "$deps/googletest/googletest/include" -I"$deps/googletest/googletest" -DFMT_HEADER_ONLY)
fi
nv=(nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -lineinfo --expt-relaxed-constexpr
    -Xptxas=-v,-warn-spills,-warn-lmem-usage "${inc[@]}")
cxx=(g++ -std=c++20 -O2 -fopenmp "${inc[@]}" -I/usr/local/cuda/include)
pids=()
for f in src/cuda/indexer/indexer_logits.cu src/cuda/indexer/instantiations/*.cu src/cuda/topk/topk.cu \
         src/bench/cuda/kernel_bench.cu src/cuda/common/device.cu; do
  o="$out/$(basename "$f").o"
  "${nv[@]}" -c "$f" -o "$o" >"$o.log" 2>&1 &
  pids+=($!)
done
for f in src/core/dtypes.cpp src/reference/ops.cpp src/reference/linalg.cpp tests/gpu/test_indexer.cpp tests/gpu/test_topk.cpp; do
  o="$out/$(basename "$f").o"
  "${cxx[@]}" -c "$f" -o "$o" >"$o.log" 2>&1 &
  pids+=($!)
done
if [[ -n "$deps" ]]; then
  for f in gtest-all.cc gtest_main.cc; do
    "${cxx[@]}" -c "$deps/googletest/googletest/src/$f" -o "$out/$f.o" >"$out/$f.o.log" 2>&1 &
    pids+=($!)
    gtest_objs+=("$out/$f.o")
  done
fi
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
cat "$out"/*.log | grep -E "error|registers|spill|stack frame|warning" | grep -v "0 bytes spill" || true
[[ $fail == 0 ]] || { cat "$out"/*.log; exit 1; }
libs=(-lgtest -lgtest_main -lfmt)
[[ -n "$deps" ]] && libs=("${gtest_objs[@]}")
objs=("$out"/*.cu.o "$out"/*.cpp.o)
nvcc -gencode arch=compute_90a,code=sm_90a -o "$out/indexer_tests" "${objs[@]}" "${libs[@]}" -Xcompiler -fopenmp -lpthread
echo "built $out/indexer_tests"
