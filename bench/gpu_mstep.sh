#!/usr/bin/env bash
# One prepared GPU check of the M-step loop (no Ray, no vLLM on the GPU machine; shared/reference/gpu.md):
#   bash bench/gpu_mstep.sh            # deepspeed importable, or its sdist + wheels in ./shared/wheels
# Runs packed and unpacked variants and prints both; results in $OUT (or bench/results).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import deepspeed" 2>/dev/null; then
  whl=shared/wheels
  [ -d "$whl" ] || { echo "deepspeed is not importable and $whl is missing (see shared/reference/gpu.md)" >&2; exit 2; }
  pip install -q --no-index --no-deps --target /tmp/site "$whl"/*.whl
  src=$(mktemp -d) && tar -xzf "$whl"/deepspeed-*.tar.gz -C "$src"
  (cd "$src"/deepspeed-* && DS_BUILD_OPS=0 pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .)
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-bench/results}
OUT=$OUT/packed python bench/gpu_mstep.py --packing 1 "$@"
OUT=$OUT/padded python bench/gpu_mstep.py --packing 0 "$@"
