#!/usr/bin/env bash
# Set up (with the test extra) and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
# The browser test (tests/test_label_browser.py) drives Debian's chromium through Playwright; install it
# quietly when missing and we may (root or passwordless sudo). Without it that one test skips, saying why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "[test] installing chromium for the browser test"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "[test] could not install chromium; the browser test will be skipped"
fi
. .venv/bin/activate
# DeepSpeed, for the ZeRO-2/ZeRO-3 preset tests (tests/test_distributed.py) on CPU: built from source
# against the venv's torch (no build isolation, which would fetch a second torch) without its CUDA
# ops; its CPU communication op compiles on first use (needs g++). Without it those two tests skip.
if ! python -c "import deepspeed" >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1; then
  echo "[test] installing deepspeed for the ZeRO preset tests"
  DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed==0.19.8" 2>&1 \
    | grep -v "is ignored: it is neither" || true
  python -c "import deepspeed" >/dev/null 2>&1 || echo "[test] could not install deepspeed; its tests will be skipped"
fi
python -m pytest tests "$@"
