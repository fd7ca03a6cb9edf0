#!/usr/bin/env bash
# Installs what dsalab needs (idempotent) and configures + builds it.
# Usage: scripts/setup.sh [build-dir]    (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
. scripts/install-lib.sh

need_apt=()
for pkg in cmake ninja-build g++ libgtest-dev nlohmann-json3-dev libcli11-dev libfmt-dev python3-pip python3-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt_install "${need_apt[@]}"
fi
if ! python3 -c 'import cutlass_library' >/dev/null 2>&1; then
  echo "setup: installing the nvidia-cutlass pip package (CUTLASS/CuTe headers)"
  pip_install nvidia-cutlass
fi

# The Python package dsalab (python/) builds with nanobind; scikit-build-core
# is what `pip install --no-build-isolation .` builds it with.
for mod in nanobind scikit_build_core; do
  if ! python3 -c "import $mod" >/dev/null 2>&1; then
    pkg=${mod//_/-}
    echo "setup: installing the $pkg pip package (Python bindings)"
    pip_install "$pkg"
  fi
done

# nvcc of the CUDA toolkit, where the machine has it but not on PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
# The Python package is built for, and its tests run with, the interpreter
# these scripts install into (python3 on PATH, resolved past pyenv's shims),
# not whichever one CMake's FindPython would pick on its own.
py=$(python3 -c 'import sys; print(sys.executable)')
if [ -f "$build/CMakeCache.txt" ]; then
  cmake "$build" -DPython_EXECUTABLE="$py" >/dev/null
else
  cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$py"
fi
cmake --build "$build" -j"$(nproc)"
