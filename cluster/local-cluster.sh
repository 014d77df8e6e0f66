#!/usr/bin/env bash
# A multi-node Ray cluster on one machine (127.0.0.1) for trying job submission and scheduling.
#   bash cluster/local-cluster.sh start [WORKERS]   # head (dashboard on :8265) + WORKERS worker nodes
#   bash cluster/local-cluster.sh stop
# Each worker node is a separate raylet with its own logical CPUs and a custom resource `node_k`.
set -euo pipefail
RAY=${RAY:-$(dirname "$0")/../.venv/bin/ray}
# a job's entrypoint (`restem-ray ...`) runs in a shell with the raylets' PATH: the venv's bin must be on it
case "$RAY" in */*) bin=$(cd "$(dirname "$RAY")" 2>/dev/null && pwd) && export PATH="$bin:$PATH" ;; esac
# the raylets kill what a crashed worker leaves (a replica's vLLM engine processes): restem_ray/driver.py KILL_ORPHANS
export RAY_process_group_cleanup_enabled=true
case "${1:-}" in
  start)
    workers=${2:-1}
    "$RAY" start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=4 \
      --dashboard-host=127.0.0.1 --dashboard-port=8265 --include-dashboard=true
    for k in $(seq 1 "$workers"); do
      "$RAY" start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 --num-cpus=2 \
        --resources="{\"node_$k\": 1}"
    done
    echo "submit with: RAY_ADDRESS=http://127.0.0.1:8265 bash jobs/demo.sh --quick"
    ;;
  stop) "$RAY" stop --force ;;
  *) echo "usage: $0 start [WORKERS] | stop" >&2; exit 2 ;;
esac
