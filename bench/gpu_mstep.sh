#!/usr/bin/env bash
# The prepared GPU check: every M-step check that needs a GPU, in one call of a few minutes on one H100/H200.
# The GPU machine has torch and transformers but no deepspeed, pydantic or liger-kernel and no network
# (docs/measurements.md), so what it lacks travels as .gpu-wheels/ (made by bench/gpu_wheels.sh here):
#   device tool: run(command="bash bench/gpu_mstep.sh", carry=[".gpu-wheels"], timeout_s=480, kind="nvidia-h200")
#   (the MFU target is an H200's; on an H100 the script halves the micro-batch to fit 80 GB)
# Writes $OUT/gpu_mstep.json (OUT defaults to bench/results) and prints the table the README quotes.
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
wheels=${WHEELS:-.gpu-wheels}
if ! python -c "import deepspeed, pydantic, accelerate, liger_kernel, einops, math_verify" 2>/dev/null; then
  [ -d "$wheels" ] || { echo "deepspeed/pydantic/accelerate/liger-kernel/einops/math-verify missing and no $wheels: run bench/gpu_wheels.sh first" >&2; exit 2; }
  site=/tmp/restem-site
  t=$(date +%s)
  python -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl
  src=$(mktemp -d) && tar -xzf "$wheels"/deepspeed-*.tar.gz -C "$src"
  (cd "$src"/deepspeed-* && DS_BUILD_OPS=0 python -m pip install -q --no-index --no-deps --no-build-isolation \
     --target "$site" .)
  export PYTHONPATH=$site:${PYTHONPATH:-}
  echo "[gpu_mstep] installed the carried packages in $(( $(date +%s) - t )) s"
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Triton (Liger's kernels, torch.compile's) builds a small C launcher with the machine's C compiler
cc_path=$(command -v cc || command -v gcc || command -v clang || true)
echo "[gpu_mstep] C compiler: ${cc_path:-none (Triton kernels cannot build their launchers)}"
python -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
# The device call allows 480 s: the variants get what the install left, less 20 s to write and return
# (a --deadline-s given here comes later and wins).
PYTHONUNBUFFERED=1 python bench/gpu_mstep.py --out "$OUT" --deadline-s $((460 - ($(date +%s) - start))) "$@"
