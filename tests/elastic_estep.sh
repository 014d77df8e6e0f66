#!/usr/bin/env bash
# Elastic E-step: start `restem-ray demo` on a one-node Ray cluster (127.0.0.1, private network namespace)
# with room for one sampler replica, and add a second node once the E-step is running. Used by
# test_multinode.py::test_node_joining_mid_e_step_gets_a_replica.
#   unshare --net --pid --fork --mount-proc bash tests/elastic_estep.sh OUT_DIR [demo args...]
set -euo pipefail
out=$1; shift
source "$(dirname "$0")/netns_ray.sh"
common=(--node-ip-address=127.0.0.1 --disable-usage-stats --include-dashboard=false)
"$bin/ray" start --head --port=6379 --num-cpus=2 --temp-dir=/tmp/rt-elastic "${common[@]}" >/dev/null
python -m restem_ray.cli demo --out "$out" --set ray.address=127.0.0.1:6379 "$@" > "$out.log" 2>&1 &
demo=$!
for _ in $(seq 600); do  # wait until the E-step is sampling, then add a node
  grep -q "E-step 1" "$out.log" 2>/dev/null && break
  kill -0 $demo 2>/dev/null || break
  sleep 0.5
done
"$bin/ray" start --address=127.0.0.1:6379 --num-cpus=2 --resources='{"second_node": 1}' \
  --node-ip-address=127.0.0.1 --disable-usage-stats >/dev/null
echo "JOINED_AT=$(date +%s.%N)"
wait $demo
python - "$out" <<'PY'
import json, sys, ray
ray.init(address="127.0.0.1:6379")
nodes = [{"id": n["NodeID"], "second": "second_node" in n["Resources"]} for n in ray.nodes() if n["Alive"]]
json.dump(nodes, open(f"{sys.argv[1]}/nodes.json", "w"))
PY
