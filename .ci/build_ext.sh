#!/usr/bin/env bash
# Builds rlora_kernels._C in place (CPU kernels; the CUDA ones too where torch has CUDA and
# nvcc exists) and fails if it cannot, then checks that the compiled backend loads.
# Python: $PYTHON, else .venv/bin/python, else python3. About 40-100 s on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

start=$SECONDS
RLORA_REQUIRE_BUILD=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace
"$PY" - <<'PYEOF'
from rlora_kernels.ops import compiled
info = compiled.build_info()
assert compiled.available("cpu", "cpu"), f"rlora_kernels._C did not load: {info}"
print(f"rlora_kernels._C built: {info}")
PYEOF
echo "build_ext: $((SECONDS - start)) s"
