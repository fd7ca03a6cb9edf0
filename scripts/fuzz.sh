#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang, ASan + UBSan, CPU only) in
# build-fuzz and runs each in turn, then prints one line per target:
# executions, reports (crashes, leaks, UB, timeouts, out-of-memory: 0
# expected) and the corpus it ended with.
#
# Usage: scripts/fuzz.sh [SECONDS | -runs=N] [TARGET...]
#   SECONDS   time per target (default 60); -runs=N: N executions per target
#   TARGET    config safetensors checkpoint_index requests batch_metadata (default: all)
# Seeds come from fuzz/corpus/<target>/ (read only; fuzz/make_seeds.py writes
# them), tokens from fuzz/<target>.dict where there is one; what a run finds goes to
# build-fuzz/corpus/<target>/ and, for a report, the input that caused it to
# build-fuzz/artifacts/<target>/ (rerun it: build-fuzz/fuzz/fuzz_<target> FILE).
# Exits 1 when any target reported something.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${DSA_FUZZ_BUILD:-build-fuzz}

limit=(-max_total_time=60)
if [ $# -gt 0 ]; then
  case "$1" in
    -runs=*) limit=("$1"); shift ;;
    [0-9]*) limit=(-max_total_time="$1"); shift ;;
  esac
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config safetensors checkpoint_index requests batch_metadata)

# What scripts/setup.sh installs, plus clang and its libFuzzer/sanitizer runtimes.
need_apt=()
for pkg in cmake ninja-build clang libclang-rt-14-dev libgtest-dev nlohmann-json3-dev libcli11-dev libfmt-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "fuzz: installing ${need_apt[*]}"
  . scripts/install-lib.sh
  apt_install "${need_apt[@]}"
fi

cxx=$(command -v clang++-14 || command -v clang++)
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
    -DDSA_ENABLE_CUDA=OFF -DDSA_BUILD_TESTS=OFF -DDSA_BUILD_FUZZERS=ON
fi
cmake --build "$build" -j"$(nproc)" --target "${targets[@]/#/fuzz_}"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
summary=()
failed=0
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t" art="$build/artifacts/$t" log="$build/logs/$t.log"
  mkdir -p "$corpus" "$art" "$(dirname "$log")"
  before=$(find "$art" -type f | wc -l)
  echo "fuzz: $t (${limit[*]})"
  dict=(); [ -f "fuzz/$t.dict" ] && dict=(-dict="fuzz/$t.dict")
  rc=0
  "$build/fuzz/fuzz_$t" "${limit[@]}" "${dict[@]}" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -artifact_prefix="$art/" "$corpus" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  reports=$(( $(find "$art" -type f | wc -l) - before ))
  # A sanitizer report, a failed property (abort) or an exception libFuzzer did not save an input for.
  if [ "$rc" -ne 0 ] && [ "$reports" -eq 0 ]; then reports=1; fi
  if [ "$reports" -ne 0 ]; then
    failed=1
    echo "fuzz: $t reported a problem (exit $rc); the log is $log:"
    grep -m5 -E "ERROR: |runtime error|fuzz property violated|deadly signal|terminate called" "$log" || tail -20 "$log"
  fi
  files=$(find "$corpus" -type f | wc -l)
  kib=$(( ($(find "$corpus" -type f -printf "%s\n" | awk "{s+=\$1} END {print s+0}") + 1023) / 1024 ))
  summary+=("$(printf '%-18s %14s %10s %8s %8s %9s' "$t" "${execs:-?}" "${rate:-?}" "$reports" "$files" "${kib}KiB")")
done

echo
printf '%-18s %14s %10s %8s %8s %9s\n' target executions exec/s reports corpus size
for line in "${summary[@]}"; do echo "$line"; done
exit $failed
