#!/usr/bin/env bash
# A node lost mid-E-step with no room elsewhere: start `restem-ray demo` on a two-node Ray cluster (127.0.0.1,
# private network namespace) whose only place for the sampler replica is the second node, then SIGKILL that
# node's raylet and everything under it once the E-step has written its first shard. Used by
# test_multinode.py::test_a_replica_whose_node_is_lost_without_a_replacement_stops_the_e_step_in_one_line.
#   unshare --net --pid --fork --mount-proc bash tests/node_loss_estep.sh OUT_DIR [demo args...]
set -euo pipefail
out=$1; shift
source "$(dirname "$0")/netns_ray.sh"
# the GCS declares a silent node dead after 3 missed checks of 1 s (Ray's default: 5 of 3 s)
export RAY_health_check_period_ms=1000 RAY_health_check_timeout_ms=1000 RAY_health_check_failure_threshold=3
common=(--node-ip-address=127.0.0.1 --disable-usage-stats)
# the head: room for the verifier only (1 CPU); the replica (2 CPUs) fits the second node alone
"$bin/ray" start --head --port=6379 --num-cpus=1 --include-dashboard=false "${common[@]}" >/dev/null
head_raylet=$(pgrep -x raylet)
"$bin/ray" start --address=127.0.0.1:6379 --num-cpus=2 "${common[@]}" >/dev/null
second=$(pgrep -x raylet | grep -vx "$head_raylet")
python -m restem_ray.cli demo --out "$out" --set ray.address=127.0.0.1:6379 "$@" > "$out.log" 2>&1 &
demo=$!
for _ in $(seq 600); do  # wait until the E-step has finished a shard, then lose the second node
  compgen -G "$out/iter_001/samples/part-*.parquet" >/dev/null && break
  kill -0 $demo 2>/dev/null || break
  sleep 0.5
done
tree() { echo "$1"; for c in $(pgrep -P "$1"); do tree "$c"; done; }
kill -9 $(tree "$second") 2>/dev/null || true
echo "LOST_AT=$(date +%s.%N)"
set +e
wait $demo
echo "DEMO_RC=$?"
