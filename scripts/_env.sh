# Shared set-up for scripts/*.sh: a project virtualenv with the CPU build of torch first,
# so no requirement below can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${RLORA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q numpy setuptools wheel ninja "$@"
# --no-build-isolation: the extension builds against the torch above, not a fresh download.
RLORA_NO_BUILD=1 pip install -q --no-build-isolation --no-deps -e .
# The editable install skips the extension; it is compiled in place here instead.
# Without a compiler this only says so (RLORA_REQUIRE_BUILD=1 makes that an error).
MAX_JOBS=${MAX_JOBS:-2} python setup.py -q build_ext --inplace
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
