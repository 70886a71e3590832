#!/usr/bin/env bash
# The GPU check as one command on the GPU machine (its own python3 holds torch+CUDA; mixsparse runs from src/).
# Make the kit here first: python benchmarks/gpu_kit.py (writes .gpu_kit/, carried along). Extra args go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py "$@"
