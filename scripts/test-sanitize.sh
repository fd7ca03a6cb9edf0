#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer (gcc),
# in its own build folder (default build-asan), without the CUDA backend and
# without the Python module (an ASan-instrumented extension cannot load into an
# uninstrumented python3).
# Only dsa_tests and the dsa command line the tests run are built. Any ASan
# report, leak or UB report fails the test that triggered it.
# Usage: scripts/test-sanitize.sh [extra ctest args]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${DSA_ASAN_BUILD:-build-asan}

# The same Debian packages as scripts/setup.sh (gcc's libasan/libubsan come with g++).
need_apt=()
for pkg in cmake ninja-build g++ libgtest-dev nlohmann-json3-dev libcli11-dev libfmt-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test-sanitize: installing ${need_apt[*]}"
  . scripts/install-lib.sh
  apt_install "${need_apt[@]}"
fi

san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSA_ENABLE_CUDA=OFF -DDSA_BUILD_PYTHON=OFF \
    -DCMAKE_CXX_COMPILER=g++ \
    -DCMAKE_CXX_FLAGS="$san" -DCMAKE_EXE_LINKER_FLAGS="$san" -DCMAKE_SHARED_LINKER_FLAGS="$san"
fi
cmake --build "$build" -j"$(nproc)" --target dsa_tests dsa

# halt_on_error and abort make a report a test failure; detect_leaks is on by default on Linux.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
ctest --test-dir "$build" -L cpu --output-on-failure -j"$(nproc)" "$@"
