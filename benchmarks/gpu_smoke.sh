#!/usr/bin/env bash
# GPU smoke check of the HeterMoE GPU path (benchmarks/gpu_smoke.py): PASS/FAIL/SKIP per step, a summary, exit 1
# on any FAIL. Output under $OUT if set, else ./gpu_smoke_out. At most ~8 minutes on one GPU (a hard stop at 480 s
# of steps, plus start-up); on a machine without a GPU it runs the CPU-side steps and SKIPs the rest.
#   benchmarks/gpu_smoke.sh [--budget-s 450] [--dry-run] [--cpu-rehearsal]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
# Bounded: a step that hangs is killed by the script itself; this is the last line of defence.
exec timeout --signal=KILL 500 "$PY" benchmarks/gpu_smoke.py "$@"
