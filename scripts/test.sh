#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite on CPU
# (Triton kernels under TRITON_INTERPRET=1, GPU-only tests skipped).
source "$(dirname "$0")/_env.sh" pytest pytest-benchmark triton transformers peft safetensors \
  tqdm matplotlib
python -m pytest -q -rs "$@"
