#!/usr/bin/env bash
# One command for a CUDA machine: install the package, run the GPU tests and the Triton
# suite compiled on the GPU, benchmark every op under every available backend, print a table.
#
#   bash benchmarks/gpu_check.sh            # outputs under ${OUT:-benchmarks/results}
#
# Installs nothing beyond `pip install -e .` (and triton when torch came without it).
# RLORA_NO_BUILD=0 also builds the compiled CUDA backend (minutes of nvcc); by default the
# package installs as pure Python + Triton. Exit status: non-zero if any test failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 RLORA_NO_BUILD="${RLORA_NO_BUILD:-1}"
unset TRITON_INTERPRET

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
"$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton
# --no-build-isolation --no-deps: use the torch already here; work offline.
if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1; then
  echo "gpu_check: pip install -e . failed (see $OUT/install.log); using the source tree"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__)"

status=0
echo "== pytest -m gpu"
"$PY" -m pytest -q -m gpu -p no:cacheprovider python_tests 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== Triton suite, compiled on the GPU"
"$PY" -m pytest -q -m "not gpu" -p no:cacheprovider python_tests/test_triton.py 2>&1 \
  | tee "$OUT/triton_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks/bench_ops.py"
"$PY" benchmarks/bench_ops.py --out "$OUT/bench_ops.json" >"$OUT/bench_ops.log" 2>&1 \
  || { status=1; tail -20 "$OUT/bench_ops.log"; }
"$PY" - "$OUT/bench_ops.json" <<'EOF'
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no benchmark results")
print(f"{doc['machine'].get('device')}  torch {doc['machine']['torch']}  "
      f"triton {doc['machine']['triton']}  rev {str(doc['machine']['git_revision'])[:10]}")
print(f"{'op':<12} {'m x n':>12} {'r':>3} {'backend':<10} {'ms':>9} {'GB/s':>8} "
      f"{'copy':>6} {'vs ref':>7}")
for row in doc["rows"]:
    sp = row.get("speedup_vs_reference", {}).get("median")
    print(f"{row['op']:<12} {row['shape'][0]:>6}x{row['shape'][1]:<5} {row['r']:>3} "
          f"{row['backend']:<10} {row['median_ms']:9.3f} {row['gbps']:8.1f} "
          f"{row['fraction_of_copy']:6.0%} {'' if sp is None else f'{sp:6.2f}x':>7}")
EOF
echo "gpu_check: outputs in $OUT (status $status)"
exit "$status"
