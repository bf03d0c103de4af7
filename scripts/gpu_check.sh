#!/usr/bin/env bash
# The one command for a lent GPU machine (H100/H200, ~15 minutes, no network): builds maefast._C in
# place, runs the cuda-marked tests, the GPU benchmarks and Table 2, and writes one JSON record
# (card, date, versions, commit, every figure) + chart + logs under $OUT (default ./out/gpu_check).
#   scripts/gpu_check.sh            # on the GPU machine
#   scripts/gpu_check.sh --dry-run  # anywhere: checks every step collects/parses, no GPU needed (CI)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 scripts/gpu_check.py --out "${OUT:-$PWD/out/gpu_check}" "$@"
