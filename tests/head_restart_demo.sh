#!/usr/bin/env bash
# `restem-ray demo` on a two-node `ray start` cluster (a head and a worker node with a custom resource), its two
# sampler replicas spread over both nodes, whose head is killed mid-run (GCS, raylet, the E-step's actors; the
# worker node goes with it, as worker pods do when a head pod restarts without GCS fault tolerance), then
# continued on a fresh one-node head as a RayJob retry continues a run after a head-pod restart: submitted as a
# Ray job through jobs/submit.py (dashboard on 127.0.0.1) with --auto-resume, its logs streamed. Inside a
# private network namespace (loopback only). Used by test_resume.py.
#   unshare --net --pid --fork --mount-proc bash tests/head_restart_demo.sh OUT_DIR KILL_WHEN_DONE [demo args...]
# KILL_WHEN_DONE: a manifest key; the head is killed as soon as the run has committed it.
set -euo pipefail
out=$1; when=$2; shift 2
bin=$(dirname "$(command -v python)")
ip link set lo up
export RAY_AUTH_MODE=disabled  # a throw-away cluster in its own namespace
# its own Ray temp folder: `ray start` records its address there (ray_current_cluster), not in /tmp/ray
export RAY_TMPDIR=$(mktemp -d /tmp/rt-XXXXXX)
head=(--head --port=6379 --num-cpus=4 --node-ip-address=127.0.0.1 --disable-usage-stats)
trap '"$bin/ray" stop --force >/dev/null 2>&1 || true; rm -rf "$RAY_TMPDIR"' EXIT
"$bin/ray" start "${head[@]}" --temp-dir=/tmp/rt-head-1 --include-dashboard=false >/dev/null
"$bin/ray" start --address=127.0.0.1:6379 --num-cpus=2 --resources='{"second_node": 1}' \
  --node-ip-address=127.0.0.1 --disable-usage-stats >/dev/null
# The driver waits gcs_rpc_server_reconnect_timeout_s for a lost GCS to come back (Ray's default 60 s, for a GCS
# with external storage that restarts); this head never does, so the first driver gives up after 5 s.
RAY_gcs_rpc_server_reconnect_timeout_s=5 \
  python -m restem_ray.cli demo --out "$out" --set ray.address=127.0.0.1:6379 "$@" --set sampling.num_replicas=2 \
  --set sampling.placement_strategy=STRICT_SPREAD > "$out.first.log" 2>&1 &
driver=$!
for _ in $(seq 1800); do  # up to 15 minutes
  if python -c "import json,sys; sys.exit(0 if sys.argv[2] in json.load(open(sys.argv[1]))['completed'] else 1)" \
       "$out/manifest.json" "$when" 2>/dev/null; then break; fi
  kill -0 $driver 2>/dev/null || { echo "driver ended before $when"; exit 3; }
  sleep 0.5
done
"$bin/ray" stop --force >/dev/null 2>&1   # the head dies: GCS, raylet and every actor on it (and the worker node)
set +e
timeout 300 tail --pid=$driver -f /dev/null   # the driver loses its cluster and exits
wait $driver; rc=$?
set -e
echo "first driver exit code: $rc"
[ "$rc" -ne 0 ] || { echo "the first driver finished although its head was killed"; exit 4; }
"$bin/ray" start "${head[@]}" --temp-dir=/tmp/rt-head-2 --include-dashboard=true --dashboard-host=127.0.0.1 \
  --dashboard-port=8265 >/dev/null
printf 'env_vars:\n  PYTHONUNBUFFERED: "1"\n' > "$out.runtime_env.yaml"
set +e
python "$(dirname "$0")/../jobs/submit.py" --address http://127.0.0.1:8265 --runtime-env "$out.runtime_env.yaml" \
  --submission-id restem-test-retry -- restem-ray demo --out "$out" --set ray.address=auto --auto-resume "$@"
echo "SUBMIT_EXIT=$?"
