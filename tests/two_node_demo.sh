#!/usr/bin/env bash
# Run `restem-ray demo` on a two-node Ray cluster inside a private network namespace (only loopback:
# Ray's nodes, its ports and all its traffic stay on 127.0.0.1 there). Used by test_multinode.py.
#   unshare --net bash tests/two_node_demo.sh OUT_DIR [demo args...]
set -euo pipefail
out=$1; shift
bin=$(dirname "$(command -v python)")
ip link set lo up
export RAY_AUTH_MODE=disabled  # a throw-away cluster in its own namespace
common=(--node-ip-address=127.0.0.1 --disable-usage-stats --include-dashboard=false)
trap '"$bin/ray" stop --force >/dev/null 2>&1 || true' EXIT
"$bin/ray" start --head --port=6379 --num-cpus=3 --temp-dir=/tmp/rt-two-node "${common[@]}" >/dev/null
"$bin/ray" start --address=127.0.0.1:6379 --num-cpus=2 --resources='{"second_node": 1}' \
  --node-ip-address=127.0.0.1 --disable-usage-stats >/dev/null
python -m restem_ray.cli demo --out "$out" --set ray.address=127.0.0.1:6379 "$@"
python - "$out" <<'PY'
import json, sys, ray
ray.init(address="127.0.0.1:6379")
nodes = [{"id": n["NodeID"], "second": "second_node" in n["Resources"]} for n in ray.nodes() if n["Alive"]]
json.dump(nodes, open(f"{sys.argv[1]}/nodes.json", "w"))
PY
