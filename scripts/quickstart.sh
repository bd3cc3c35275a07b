#!/usr/bin/env bash
# Set up, then run the main job: LoRA SFT of the embedded SmolLM2-135M-Instruct on the Acme
# support data set, printing held-out format compliance and perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python examples/sft_quickstart.py "$@"
