#!/usr/bin/env bash
# Compile-checks every .cu of csrc/build_config.json for sm_80 and sm_90 through CMake's
# nvcc_check target (so the check reads the same source list as the builds), runs the
# torch-free C++ test, and syntax-checks csrc/cuda/bindings.cpp against torch's headers.
# Without nvcc the CUDA part says "skipped" and exits 0. About 30 s on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
BUILD=build/nvcc_check
mkdir -p build

cmake -S . -B "$BUILD" -DRLORA_BUILD_EXTENSION=OFF > "$BUILD.log" 2>&1 \
  || { cat "$BUILD.log"; exit 1; }
cmake --build "$BUILD" -j 2 --target test_small_linalg
ctest --test-dir "$BUILD" --output-on-failure

NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC=$CUDA_HOME/bin/nvcc
fi
if [ -z "$NVCC" ]; then
  echo "nvcc_check: skipped (no nvcc on this machine)"
  exit 0
fi
cmake --build "$BUILD" -j 2 --target nvcc_check
echo "nvcc_check: every .cu compiled for sm_80 and sm_90 with $("$NVCC" --version | tail -1)"

# bindings.cpp is only compiled in a CUDA build of torch; check its syntax against this
# torch's c10/cuda headers. A CPU wheel lacks one generated header, stubbed here.
# nvcc may be a wrapper script; ask it where its headers are.
CUDA_INC=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 \
  | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1 | sed 's/ *$//')
if TORCH_INC=$("$PY" -c "from torch.utils import cpp_extension as c
print(' '.join('-I' + p for p in c.include_paths()))" 2>/dev/null); then
  STUB=$(mktemp -d)
  trap 'rm -rf "$STUB"' EXIT
  mkdir -p "$STUB/c10/cuda/impl"
  TORCH_DIR=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
  [ -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ] \
    || echo "#pragma once" > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
  # shellcheck disable=SC2086
  ${CXX:-g++} -std=c++20 -fsyntax-only -w -DRLORA_WITH_CUDA -Icsrc $TORCH_INC -I"$STUB" \
    -I"$CUDA_INC" -I"$CUDA_INC/cccl" csrc/cuda/bindings.cpp
  echo "nvcc_check: csrc/cuda/bindings.cpp syntax-checked against torch's CUDA headers"
else
  echo "nvcc_check: bindings.cpp syntax check skipped (torch not importable)"
fi
