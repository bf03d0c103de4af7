#!/usr/bin/env bash
# The command for a lent GPU machine (H100/H200; ~15 minutes of device time in all, a start costs 1-2):
# presets that each finish in ~5 minutes and write their own record under $OUT (default ./out/gpu_check):
#   MAEFAST_COMMIT=<sha> scripts/gpu_check.sh --preset step         # verify | step | profile | ops | table2 | kernels | data
#   MAEFAST_COMMIT=<sha> scripts/gpu_check.sh --preset verify,ops   # several, in order
#   scripts/gpu_check.sh --dry-run    # anywhere: every preset collects/parses, no GPU needed (the tests do)
# See scripts/gpu_check.py and benchmarks/results/README.md ("The next GPU run").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# wheels the machine lacks travel in .whl/ (git-ignored; run with carry [".whl"]), e.g. simplejpeg, the CPU
# data paths' JPEG reader (without it the data preset measures Pillow's reader, same pixels, slower)
if compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install --quiet --no-index --no-deps --target .whl/site .whl/*.whl; then
    export PYTHONPATH="$PWD/.whl/site:$PYTHONPATH"
  else
    echo "gpu_check: the wheels in .whl/ did not install (another python?); going on without them" >&2
  fi
fi
exec python3 scripts/gpu_check.py --out "${OUT:-$PWD/out/gpu_check}" "$@"
