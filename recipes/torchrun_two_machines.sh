#!/bin/bash
# Two machines with plain torchrun (what `hetermoe launch --processes-per-machine` runs): machine 0 runs the
# attention ranks, machine 1 the expert servers (recipes/hetermoe/two_machines.yaml), with any number of
# processes on each. Run on every machine, with that machine's rank and process count:
#
#   MACHINE_RANK=0 NPROC=2 MAIN_IP=10.0.0.1 bash recipes/torchrun_two_machines.sh     # on machine 0
#   MACHINE_RANK=1 NPROC=4 MAIN_IP=10.0.0.1 bash recipes/torchrun_two_machines.sh     # on machine 1
#
# Arguments after the script name go to recipes/train_loop.py (default: --output_dir out --max_steps 1000).
#
# The c10d rendezvous numbers machines in the order they join; HETERMOE_MACHINE_RANK tells every process which
# machine it is on, so `attention_machines` names machines by MACHINE_RANK (hf_hetermoe/launch_facts.py).
# Add ACCELERATE_USE_CPU=1 to run on CPU (gloo). Run from the repository root. Run once on one host as 2 + 1 CPU
# processes (MAIN_IP=127.0.0.1, --max_steps 2): trained, losses equal to the stock loop's.
set -euo pipefail
: "${MACHINE_RANK:?}" "${NPROC:?}" "${MAIN_IP:?}"
PORT=${PORT:-29500}
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--output_dir out --max_steps 1000)
HETERMOE_MACHINE_RANK=$MACHINE_RANK torchrun \
  --nnodes 2 --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MAIN_IP:$PORT" --rdzv-id hetermoe \
  -m hf_hetermoe.launch --hetermoe-config recipes/hetermoe/two_machines.yaml \
  recipes/train_loop.py "${ARGS[@]}"
