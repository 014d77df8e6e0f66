#!/usr/bin/env bash
# Start a real Ray head with its dashboard on 127.0.0.1 inside a private network namespace, submit
# `restem-ray demo` as a Ray job through jobs/submit.py, and stop the cluster. Used by test_jobs.py.
#   unshare --net bash tests/job_submit.sh OUT_DIR [demo args...]
set -euo pipefail
out=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$(dirname "$(command -v python)")
ip link set lo up
export RAY_AUTH_MODE=disabled  # a throw-away cluster in its own namespace
trap '"$bin/ray" stop --force >/dev/null 2>&1 || true' EXIT
"$bin/ray" start --head --port=6379 --num-cpus=4 --node-ip-address=127.0.0.1 --disable-usage-stats \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=8265 --temp-dir=/tmp/rt-jobs >/dev/null
printf 'env_vars:\n  PYTHONUNBUFFERED: "1"\n' > "$out.runtime_env.yaml"
set +e
python "$here/jobs/submit.py" --address http://127.0.0.1:8265 --runtime-env "$out.runtime_env.yaml" \
  --submission-id restem-test-job -- restem-ray demo --out "$out" --set ray.address=auto "$@"
echo "SUBMIT_EXIT=$?"
