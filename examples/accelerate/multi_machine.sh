#!/usr/bin/env bash
# Two machines with 8 GPUs each (16 processes), FSDP2. Run this on every machine with its own
# MACHINE_RANK (0 on the machine whose address is MAIN_IP); the job file, the model and the data
# must be at the same paths on both (a shared file system, or copies), and only machine 0's
# process 0 writes the run folder: put training.output_dir on storage that survives the job.
#
#   MACHINE_RANK=0 MAIN_IP=10.0.0.1 bash examples/accelerate/multi_machine.sh job.yaml   # on 10.0.0.1
#   MACHINE_RANK=1 MAIN_IP=10.0.0.1 bash examples/accelerate/multi_machine.sh job.yaml   # on the other
set -euo pipefail
JOB=${1:?usage: multi_machine.sh JOB.yaml [alignkit overrides...]}
shift
accelerate launch \
  --config_file "$(dirname "$0")/fsdp2.yaml" \
  --num_machines 2 --num_processes 16 \
  --machine_rank "${MACHINE_RANK:?set MACHINE_RANK}" \
  --main_process_ip "${MAIN_IP:?set MAIN_IP}" --main_process_port "${MAIN_PORT:-29500}" \
  -m alignkit train "$JOB" "$@"
