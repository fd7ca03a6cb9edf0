#!/usr/bin/env bash
# Builds on the GPU machine and checks the CUDA backend end to end, within 10
# minutes: GPU tests, `dsa check` at the seed's shape (T=4096, H=128, batch 1)
# and at decode (64 requests x 32768 cached), the `dsa bench` table for both.
# Logs are written to $LOGS (default /tmp/gpu-check-logs) and packed into
# $OUT/gpu-check-logs.tgz (the device tool brings back at most 8 files);
# $OUT/summary.txt and the bench tables come back as files too. A short
# summary is printed last. Every step has a time limit (seconds, override
# with the variables below) so the whole run stays inside 10 minutes.
#
# Usage: scripts/gpu-check.sh [--sanitize] [--sweep] [--quick] [--no-build] [--python] [--kernels-ab] [--no-tests]
#   --sanitize  also run compute-sanitizer --tool memcheck on the GPU tests
#               (last, within what is left of TOTAL seconds, default 570)
#   --sweep     also run the sparse MLA sweep beside FlashMLA's numbers
#               (`dsa bench --sweep-sparse-mla --iters 20`, ~15 s; $OUT/sweep.txt);
#               FlashMLA's figures come from $ANCHORS when set (the device
#               machine has no ../shared: copy the anchor file into the checkout)
#   --quick     GPU tests and the bench tables only (no dsa check)
#   --no-build  reuse build-dev from an earlier run on the same machine
#   --python    also build the Python package and run its pytest suite
#               (GPU tests included; DSALAB_SLOW=1 adds the seed shape)
#   --kernels-ab  the kernels that have a newer version (--kernels): `dsa
#               check --kernels new` at long context and at decode (bf16 and
#               fp8 latent cache, next_n 1 and 2), and the layer benches with
#               --kernels baseline and new (long context; decode with graph
#               replay, both cache forms), the sparse MLA decode sweep
#               (FlashMLA's figures from $ANCHORS_DECODE when set); tables
#               in $OUT/ab-*.txt
#   --no-tests  skip the GPU test binary (with --no-build: a second call)
# On the device tool: run with carry [".device-deps"], e.g.
#   command: scripts/gpu-check.sh --sanitize      timeout_s: 600
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
LOGS=${LOGS:-/tmp/gpu-check-logs}
TOTAL=${TOTAL:-570} TL_BUILD=${TL_BUILD:-300} TL_TESTS=${TL_TESTS:-240} TL_SAN=${TL_SAN:-300} TL_CHECK=${TL_CHECK:-240} TL_BENCH=${TL_BENCH:-120}
rm -rf "$LOGS"; mkdir -p "$OUT" "$LOGS"
SANITIZE=0 QUICK=0 BUILD=1 SWEEP=0 PY=0 AB=0 TESTS_ON=1
for a in "$@"; do
  case "$a" in
    --python) PY=1 ;;
    --kernels-ab) AB=1 ;;
    --no-tests) TESTS_ON=0 ;;
    --sanitize) SANITIZE=1 ;;
    --sweep) SWEEP=1 ;;
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    *) echo "unknown option $a (see the header of $0)"; exit 2 ;;
  esac
done

declare -a SUMMARY
FAILED=0
T0=$(date +%s)
step() {  # name, log file, time limit (s), command...
  local name=$1 log=$2 limit=$3
  shift 3
  local t=$(date +%s)
  echo "=== $name: $*" | tee -a "$LOGS/gpu-check.log"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  tail -n 40 "$LOGS/$log" >>"$LOGS/gpu-check.log"
  local why="rc $rc"
  [ $rc -eq 124 ] && why="timed out after ${limit}s"
  if [ $rc -eq 0 ]; then SUMMARY+=("pass  ${dt}s  $name  ($log)"); else SUMMARY+=("FAIL  ${dt}s  $name  ($why, $log)"); FAILED=1; fi
  return $rc
}
finish() {
  cp "$LOGS"/bench-*.txt "$OUT/" 2>/dev/null
  [ $AB -eq 1 ] && cat "$LOGS"/ab-*.txt >"$OUT/ab-tables.txt" 2>/dev/null
  [ -f "$LOGS/sweep.txt" ] && cp "$LOGS/sweep.txt" "$OUT/"
  tar czf "$OUT/gpu-check-logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null
  {
    echo "==== gpu-check summary ($GPU; $(( $(date +%s) - T0 ))s; logs in $OUT/gpu-check-logs.tgz) ===="
    grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$LOGS/gpu-tests.log" 2>/dev/null | sed 's/^/tests: /'
    grep -E "^\[  FAILED  \] [A-Za-z]" "$LOGS/gpu-tests.log" 2>/dev/null | sort -u | sed 's/^/tests: /'
    grep -E "ERROR SUMMARY" "$LOGS/memcheck.log" 2>/dev/null | tail -1 | sed 's/^/memcheck: /'
    printf '%s\n' "${SUMMARY[@]}"
  } >"$OUT/summary.txt"
  echo
  cat "$OUT/summary.txt"
  exit $FAILED
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$LOGS/gpu.txt" 2>&1
GPU=$(head -2 "$LOGS/gpu.txt" | tail -1)
B=build-dev
if [ $BUILD -eq 1 ]; then
  DEPS=()
  [ -d .device-deps ] && DEPS=(-DDSA_DEPS_DIR="$PWD/.device-deps")
  step configure configure.log 120 cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release "${DEPS[@]}" || finish
  TARGETS=(dsa dsa_gpu_tests)
  [ $PY -eq 1 ] && TARGETS+=(_dsalab)
  step build build.log "$TL_BUILD" cmake --build $B --target "${TARGETS[@]}" -j"$(nproc)" || { grep -E "error|FAILED" "$LOGS/build.log" | head -30; finish; }
  grep -E "spill|Local memory" "$LOGS/build.log" | sort -u >"$LOGS/ptxas-spills.txt"
fi
DSA=$B/tools/dsa/dsa
TESTS=$B/tests/dsa_gpu_tests

[ $TESTS_ON -eq 1 ] && step "GPU tests" gpu-tests.log "$TL_TESTS" $TESTS --gtest_color=no
if [ $PY -eq 1 ]; then
  step "pytest (Python package, GPU tests included)" pytest.log 240 env PYTHONPATH=$B/python DSA_CLI=$PWD/$DSA \
    DSALAB_SLOW=${DSALAB_SLOW:-1} python3 -m pytest -q -p no:cacheprovider python/tests
fi
if [ $AB -eq 1 ]; then
  # Acceptance figures of the newer kernels: correctness first, then the
  # same shapes with the validated kernels and with the new ones, one
  # process each, back to back.
  step "dsa check --kernels new long context (61440 + 4096)" ab-check-long.txt 240 $DSA check --kernels new --cached 61440 --new 4096
  step "dsa check --kernels new decode 64 x 32768" ab-check-decode.txt 120 $DSA check --kernels new --batch 64 --cached 32768 --new 1
  for n in 1 2; do
    step "dsa check --kernels new decode fp8 next_n $n" ab-check-fp8-n$n.txt 120 $DSA check --kernels new --batch 64 --cached 32768 \
      --new $n --kv-cache-dtype fp8
  done
  for k in baseline new; do
    step "bench long context --kernels $k" ab-bench-long-$k.txt 150 $DSA bench --backend cuda --kernels $k \
      -a cached=0,32768,61440,126976 --new 4096
    for dt in bf16 fp8; do
      for n in 1 2; do
        step "bench decode $dt next_n $n --kernels $k" ab-bench-decode-$dt-n$n-$k.txt 60 $DSA bench --backend cuda --kernels $k \
          --batch 64 --cached 32768 --new $n --kv-cache-dtype $dt --graph
      done
    done
  done
  for k in baseline new; do
    step "bench decode fp8 next_n 1 --kernels $k, one stream" ab-bench-decode-fp8-n1-$k-serial.txt 60 $DSA bench --backend cuda \
      --kernels $k --batch 64 --cached 32768 --new 1 --kv-cache-dtype fp8 --graph --no-overlap
  done
  DEC_ARGS=()
  [ -n "${ANCHORS_DECODE:-}" ] && DEC_ARGS=(--anchors-decode "$ANCHORS_DECODE")
  step "sparse MLA decode sweep" ab-sweep-decode.txt 120 $DSA bench --sweep-sparse-mla-decode "${DEC_ARGS[@]}"
fi
if [ $QUICK -eq 0 ]; then
  step "dsa check seed shape (T=4096 H=128 b=1)" check-seed.log "$TL_CHECK" $DSA check --digests --batch 1 --cached 0 --new 4096
  step "dsa check decode (64 x 32768 cached)" check-decode.log "$TL_CHECK" $DSA check --digests --batch 64 --cached 32768 --new 1
fi
step "dsa bench seed shape" bench-seed.txt "$TL_BENCH" $DSA bench --backend cuda --batch 1 --cached 0 --new 4096
step "dsa bench decode (graph replay)" bench-decode.txt "$TL_BENCH" $DSA bench --backend cuda --batch 64 --cached 32768 --new 1 --graph
ANCHOR_ARGS=()
[ -n "${ANCHORS:-}" ] && ANCHOR_ARGS=(--anchors "$ANCHORS")
[ $SWEEP -eq 1 ] && step "sparse MLA sweep" sweep.txt "$TL_BENCH" $DSA bench --sweep-sparse-mla --iters 20 "${ANCHOR_ARGS[@]}"
if [ $SANITIZE -eq 1 ]; then
  # Last, with whatever is left of the TOTAL budget (default 570 s). memcheck
  # slows kernels 10-100x: every test but the T > 65535 sparse MLA ones and the
  # full-width layer (seconds natively; run them under memcheck alone), the
  # bench test, and the RunCuda tests, whose `dsa run` child processes the
  # sanitizer follows at a crawl (the CLI is memchecked directly below
  # instead). Override with SAN_FILTER.
  left=$(( TOTAL - ($(date +%s) - T0) - 15 ))
  [ $left -gt $TL_SAN ] && left=$TL_SAN
  if [ $left -lt 30 ]; then
    SUMMARY+=("skip  memcheck: only ${left}s of the ${TOTAL}s budget left (raise TOTAL or run with --quick --sanitize)")
  else
    step "memcheck on GPU tests" memcheck.log "$left" compute-sanitizer --tool memcheck --error-exitcode 1 \
      $TESTS --gtest_color=no \
      --gtest_filter="${SAN_FILTER:--*TAbove65535*:*FullWidth*:*Bench*:RunCuda*}"
    # `dsa run --backend cuda` (what the RunCuda tests spawn): a ragged prefill
    # and decode over synthetic cached rows, the fp8 latent cache, o_proj.
    n=0
    for args in "--requests 0:100,50:3 --seed 7" "--requests 64:1,100:2 --kv-cache-dtype fp8 --seed 8" \
                "--requests 0:40,40:8 --o-proj --seed 9"; do
      n=$((n + 1))
      step "memcheck dsa run --backend cuda $args" memcheck-run-$n.log 120 compute-sanitizer --tool memcheck \
        --error-exitcode 1 $DSA run --backend cuda $args --dump /tmp/gpu-check-run.safetensors
    done
  fi
fi
echo
echo "---- bench, seed shape ----"; cat "$LOGS/bench-seed.txt"
echo "---- bench, decode 64 x 32768 ----"; cat "$LOGS/bench-decode.txt"
[ -f "$LOGS/sweep.txt" ] && { echo "---- sparse MLA sweep ----"; cat "$LOGS/sweep.txt"; }
for f in check-seed.log check-decode.log; do
  [ -f "$LOGS/$f" ] && { echo "---- $f (table) ----"; grep -E "^dsa check|^stage|^[a-z_+]+ +[a-zA-Z]|passed|failed|error" "$LOGS/$f" | head -45; }
done
finish
