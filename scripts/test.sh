#!/usr/bin/env bash
# Installs and builds (scripts/setup.sh), then runs every test through CTest.
# GPU tests report as skipped on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
. scripts/install-lib.sh
# Test-only dependencies of the Python package's pytest suite (python/tests):
# pytest, and PyTorch for its CPU tensors (never a build dependency of dsalab,
# so setup.sh does not install it). PyPI's torch wheel is the CUDA build (about 5 GB with its
# nvidia-* dependencies) and works on a CPU-only machine; the CPU-only wheel
# index is not reachable from our machines, so it is not used. matplotlib for
# the PNG checks of scripts/plot_bench.py (its test skips them without it).
for mod in pytest torch matplotlib; do
  if ! python3 -c "import $mod" >/dev/null 2>&1; then
    echo "test: installing $mod (Python tests only)"
    pip_install "$mod"
  fi
done
# The Python suite must run here (CI runs this script): a build that left the
# package out (no Python headers, no nanobind) fails instead of passing
# without it, and so does a Python.pytest that cannot import pytest or torch
# (it would skip elsewhere).
export DSALAB_REQUIRE_PYTEST=1
echo "test: the Python tests run with $(python3 -c 'import sys, torch, pytest; print(sys.executable, "torch", torch.__version__, "pytest", pytest.__version__)' 2>&1 | tail -1)"
# The listing is captured before it is searched: under pipefail, `ctest | grep -q`
# fails whenever grep quits on the match before ctest has written its last line
# (ctest dies of SIGPIPE, status 141), which is how the last two CI runs
# reported a registered suite as missing.
listed=$(ctest --test-dir build -N -R '^Python\.pytest$') || {
  echo "test: ctest could not list the tests of build/ (exit $?); see the output above"
  exit 1
}
if ! grep -q 'Python\.pytest' <<<"$listed"; then
  echo "test: the Python package's pytest suite is not registered: the package was not built (see the 'dsalab Python"
  echo "      package' line of cmake build); install python3-dev and nanobind (scripts/setup.sh does) and run again"
  exit 1
fi
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"
