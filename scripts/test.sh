#!/usr/bin/env bash
# Installs and builds (scripts/setup.sh), then runs every test through CTest.
# GPU tests report as skipped on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"
