#!/usr/bin/env bash
# Builds a wheel with rlora_kernels._C, installs it into a fresh venv (torch==2.13.0, the
# CPU build pip finds on local disk, plus numpy and pytest) and runs the compiled-backend
# tests from a scratch folder, so they import the installed package, not the source tree.
# Python: $PYTHON, else .venv/bin/python, else python3. About 3 min on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

# --no-build-isolation: the extension compiles against the torch already installed.
RLORA_REQUIRE_BUILD=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -q --no-build-isolation \
  --no-deps -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/rlora_kernels-*.whl)
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("rlora_kernels/_C") and n.endswith(".so") for n in names), names
print(f"wheel_check: {sys.argv[1].rsplit('/', 1)[1]} carries rlora_kernels._C")
PYEOF
echo "wheel_check: wheel built in $((SECONDS - start)) s"

"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install -q torch==2.13.0 numpy pytest transformers
"$VPY" -m pip install -q "$WHEEL"

mkdir "$WORK/tests"
# The suites that need only torch; the ini registers the markers.
cp python_tests/{conftest,shape_spy,test_compiled,test_ops_reference,test_optim,test_loi}.py \
  pytest.ini "$WORK/tests/"
cd "$WORK/tests"
"$VPY" - <<'PYEOF'
import rlora_kernels
from rlora_kernels.ops import compiled
assert "site-packages" in rlora_kernels.__file__, rlora_kernels.__file__
assert compiled.available("cpu", "cpu"), compiled.build_info()
print(f"wheel_check: testing the installed {rlora_kernels.__file__}")
PYEOF
"$VPY" -m pytest -q -p no:cacheprovider test_compiled.py test_ops_reference.py test_optim.py \
  test_loi.py
echo "wheel_check: done in $((SECONDS - start)) s"
