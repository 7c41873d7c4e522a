#!/usr/bin/env bash
# Do the GPU paths work? One GPU, under 8 minutes, a PASS/FAIL line per check with its figure
# (bench/gpu_check.py says what each checks). Run after README's install:
#     bash bench/gpu_check.sh [--out DIR] [--skip throughput]
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec python bench/gpu_check.py "$@"
