#!/usr/bin/env bash
# The main job: installs and builds (scripts/setup.sh), then runs the layer
# benchmark: on the GPU when one is present, else on the CPU reference at a
# small default shape. Extra arguments go to `dsa bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
exec build/tools/dsa/dsa bench "$@"
