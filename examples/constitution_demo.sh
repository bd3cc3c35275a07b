#!/usr/bin/env bash
# Constitutional AI end to end on the embedded SmolLM2-135M-Instruct, on CPU, in a few minutes:
#   1. check the constitution file
#   2. `constitution revise`: reply, critique against a sampled principle, revise -> sft.jsonl
#   3. `constitution pairs`: two differently-styled candidates, judged against a principle -> pairs.jsonl
#   4. a few LoRA SFT steps on sft.jsonl and DPO steps on pairs.jsonl (the files go in unchanged)
#
#   bash examples/constitution_demo.sh                 # 6 prompts, 48 new tokens per turn
#   PROMPTS=26 TOKENS=128 bash examples/constitution_demo.sh
#
# A 135M model cannot follow the judge's written "Verdict: A" format, so the judge here reads the
# label probabilities (--judge-method logprobs) and asks both orders, which cancels the position
# preference. Point --judge-base-url/--judge-model at a larger model's endpoint for real judgments.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
PROMPTS=${PROMPTS:-6}
TOKENS=${TOKENS:-48}
OUT=${OUT:-runs/constitution_demo}
COMMON=(--constitution examples/constitution.yaml --data examples/constitution_prompts.jsonl
        --limit "$PROMPTS" --max-new-tokens "$TOKENS")
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "1/4 check the constitution"
alignkit constitution check --constitution examples/constitution.yaml

step "2/4 critique and revise"
alignkit constitution revise "${COMMON[@]}" --out "$OUT/revise"
python - "$OUT/revise/sft.jsonl" <<'PY'
import json, sys
line = open(sys.argv[1]).readline()
if not line:
    sys.exit(0)
row = json.loads(line)
chain = row["constitution"]
print("prompt:   ", row["messages"][0]["content"])
print("initial:  ", chain["initial"][:200])
print("principle:", chain["steps"][0]["principle"])
print("critique: ", chain["steps"][0]["critique"][:200])
print("revision: ", chain["steps"][0]["revision"][:200])
PY

step "3/4 AI-feedback preference pairs"
alignkit constitution pairs "${COMMON[@]}" --judge-method logprobs --cache-dir "$OUT/judge_cache" \
    --out "$OUT/pairs"

step "4/4 train on what was written: SFT then DPO, a few LoRA steps each"
if [ -s "$OUT/revise/sft.jsonl" ]; then
    alignkit sft --set data.train="$OUT/revise/sft.jsonl" --set data.validation_fraction=0 \
        --set data.max_length=384 --set training.max_steps=3 --set training.batch_size=2 \
        --set training.eval_at_start=false --set training.output_dir="$OUT/sft" --overwrite
else
    echo "no revision survived (empty, or only repeating the critique); skipping SFT"
fi
if [ -s "$OUT/pairs/pairs.jsonl" ]; then
    alignkit dpo --set data.train="$OUT/pairs/pairs.jsonl" --set data.validation_fraction=0 \
        --set data.max_length=384 --set training.max_steps=2 --set training.batch_size=2 \
        --set training.eval_at_start=false --set training.output_dir="$OUT/dpo" --overwrite
else
    echo "no pairs survived judging (all ties / near-duplicates); skipping DPO"
fi
step "done: files under $OUT"
