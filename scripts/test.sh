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
python -m pytest tests "$@"
