#!/usr/bin/env bash
# Submit the GSM8K-format GPU run as a Ray job with `ray job submit` and a runtime_env.
#   RAY_ADDRESS=http://HEAD:8265 OUT=/shared/runs/gsm8k-1 bash jobs/gsm8k.sh [--set key=value ...]
#   CONFIG=gsm8k-qwen-7b.yaml ... bash jobs/gsm8k.sh    # the 7B recipe (ZeRO-3, gradient checkpointing)
# Needs the restem-ray GPU image (docker/Dockerfile.gpu) on every node and /shared mounted everywhere.
# --auto-resume: the same OUT again continues that run (a new OUT, the default timestamped one, starts a new
# run): to continue a run after a failure, submit again with OUT set to its folder.
set -euo pipefail
OUT=${OUT:-/shared/runs/gsm8k-$(date +%Y%m%d-%H%M%S)}
CONFIG=${CONFIG:-gsm8k-qwen-0.5b.yaml}
here=$(cd "$(dirname "$0")" && pwd)
RAY=${RAY:-$( [ -x "$here/../.venv/bin/ray" ] && echo "$here/../.venv/bin/ray" || echo ray )}
exec "$RAY" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --runtime-env-json '{"env_vars": {"HF_HOME": "/shared/hf", "VLLM_LOGGING_LEVEL": "WARNING"}}' \
  --working-dir "$here" -- \
  restem-ray run "$CONFIG" --out "$OUT" --auto-resume "$@"
