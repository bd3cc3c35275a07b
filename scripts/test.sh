#!/usr/bin/env bash
# Set up (with the test extra) and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests "$@"
